"""Image slicing for Megrez-3B-Omni, following the MiniCPM-V (2.5) scheme that MegrezO inherits.

An image becomes one downscaled overview plus, when it is larger than one 448x448 tile, a grid of
up to ``max_slice_nums`` slices cut from an upscaled copy. Every piece has sides that are multiples
of the 14-pixel patch, so the NaViT SigLIP tower takes it at its own size (``tgt_size`` in patches),
and the resampler turns each piece into 64 query tokens.

The geometry mirrors ``MiniCPMVImageProcessor`` (``get_sliced_grid``, ``find_best_resize``,
``get_refine_size``, ``ensure_divide``, ``slice_image``) from openbmb's HF remote code, including
Python's round-half-to-even in ``ensure_divide``, so token counts match the vendor exactly.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.omni.errors import MediaError
from engine.protocol import MEDIA_PLACEHOLDERS

SCALE_RESOLUTION = 448
PATCH_SIZE = 14
MAX_SLICE_NUMS = 9
QUERY_NUM = 64  # resampler queries, i.e. prompt tokens per overview or slice

# SigLIP normalisation. MegrezO's model computes (x - 127.5) / 127.5 on 0..255 pixels, which is the
# same as (x / 255 - 0.5) / 0.5; we hand out the normalised values so the plugin must not redo it.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5

# Guard beyond the vendor: past this ratio the overview resize makes one side thousands of
# patches long (a 100000x1 image would become ~100000 px wide), which no prompt budget can take.
MAX_ASPECT_RATIO = 50.0

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})

# Prompt text the processor substitutes for each image. MiniCPM-V 2.5's convention (no image-id
# prefix): overview ``<image>`` + fillers + ``</image>``, then one ``<slice>`` + fillers +
# ``</slice>`` per grid cell, cells of a row concatenated and rows joined by newlines. The filler is
# Megrez's ``<|unk|>`` (id 120001), the token that receives the image embeddings. ASSUMED, not
# verified: the vendor's ``processing_megrezo.py`` was not available to read, so the marker strings
# below are the MiniCPM-V defaults; adjust them here once checked against the checkpoint.
IMAGE_PLACEHOLDER = MEDIA_PLACEHOLDERS["image"]  # what a prompt holds for one image
FILLER_TOKEN = "<|unk|>"
IMAGE_START, IMAGE_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
SLICE_ROW_SEPARATOR = "\n"


@dataclass(frozen=True)
class ImageInputs:
    """One preprocessed image: overview first, then slices row by row.

    ``pixel_values[i]`` is float32 ``(3, 14*h_i, 14*w_i)`` normalised to [-1, 1] and
    ``tgt_sizes[i] == (h_i, w_i)`` in patches. ``grid`` is ``(cols, rows)`` or ``None`` when the
    image is only an overview.
    """

    pixel_values: list[np.ndarray]
    tgt_sizes: list[tuple[int, int]]
    grid: tuple[int, int] | None
    num_tokens: int
    original_size: tuple[int, int]

    @property
    def num_slices(self) -> int:
        """Pieces fed to the tower, overview included."""
        return len(self.pixel_values)


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"image has zero size ({width}x{height})")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MediaError(f"image aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO:g}:1; crop it before sending")


def _ensure_divide(length: float, divisor: int) -> int:
    # Nearest multiple (Python round, as the vendor uses), never below one unit.
    return max(round(length / divisor) * divisor, divisor)


def _best_resize(
    size: tuple[float, float], *, allow_upscale: bool, scale_resolution: int = SCALE_RESOLUTION
) -> tuple[int, int]:
    """Keep the aspect ratio, bring the area to about scale_resolution², snap sides to patches."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(width, PATCH_SIZE), _ensure_divide(height, PATCH_SIZE)


def sliced_grid(
    width: int, height: int, *, max_slice_nums: int = MAX_SLICE_NUMS, scale_resolution: int = SCALE_RESOLUTION
) -> tuple[int, int] | None:
    """The (cols, rows) slice grid, or None for an overview-only image.

    The slice count is ceil(area / 448²) capped at max_slice_nums; the counts one below and one
    above are candidates too (never 1, never above the cap), and of all their factorisations the
    grid whose log aspect ratio is closest to the image's wins (first found on ties).
    """
    _check_size(width, height)
    if max_slice_nums < 1:
        raise MediaError(f"max_slice_nums must be at least 1, got {max_slice_nums}")
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best: tuple[int, int] | None = None
    best_error = math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slice_nums:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            error = abs(log_ratio - math.log(cols / (count // cols)))
            if error < best_error:
                best, best_error = (cols, count // cols), error
    return best


def image_token_count(width: int, height: int, *, max_slice_nums: int = MAX_SLICE_NUMS) -> int:
    """Embedding (filler) tokens the image occupies in the prompt: 64 per overview or slice."""
    grid = sliced_grid(width, height, max_slice_nums=max_slice_nums)
    slices = 0 if grid is None else grid[0] * grid[1]
    return (1 + slices) * QUERY_NUM


def image_placeholder_text(width: int, height: int, *, max_slice_nums: int = MAX_SLICE_NUMS) -> str:
    """The prompt text that replaces IMAGE_PLACEHOLDER for an image of this size."""
    return grid_placeholder_text(sliced_grid(width, height, max_slice_nums=max_slice_nums))


def grid_placeholder_text(grid: tuple[int, int] | None) -> str:
    """The placeholder text for a (cols, rows) slice grid, or for an overview-only image (None)."""
    piece = FILLER_TOKEN * QUERY_NUM
    text = IMAGE_START + piece + IMAGE_END
    if grid is not None:
        cols, rows = grid
        row = (SLICE_START + piece + SLICE_END) * cols
        text += SLICE_ROW_SEPARATOR.join([row] * rows)
    return text


def load_image(data: bytes) -> Image.Image:
    """Decode image bytes into an RGB PIL image, raising MediaError for anything unusable."""
    if not data:
        raise MediaError("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()  # decoding is lazy; truncated or corrupt data only fails here
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise MediaError(f"cannot decode image: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"corrupt image data: {exc}") from exc
    if fmt not in ALLOWED_FORMATS:
        raise MediaError(f"unsupported image format {fmt}; use one of {', '.join(sorted(ALLOWED_FORMATS))}")
    _check_size(*img.size)
    return img.convert("RGB")


def _normalise(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - IMAGE_MEAN) / IMAGE_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _tgt_size(img: Image.Image) -> tuple[int, int]:
    return img.height // PATCH_SIZE, img.width // PATCH_SIZE


def preprocess_image(img: Image.Image, *, max_slice_nums: int = MAX_SLICE_NUMS) -> ImageInputs:
    """Slice, resize (bicubic, as the vendor) and normalise one image for the vision tower."""
    width, height = img.size
    grid = sliced_grid(width, height, max_slice_nums=max_slice_nums)
    rgb = img.convert("RGB")
    # An unsliced image is upscaled to fill one tile; a sliced one keeps a downscaled overview.
    overview = rgb.resize(_best_resize((width, height), allow_upscale=grid is None), Image.Resampling.BICUBIC)
    pieces = [overview]
    if grid is not None:
        cols, rows = grid
        refine_w = _ensure_divide(width, cols)
        refine_h = _ensure_divide(height, rows)
        cell_w, cell_h = _best_resize((refine_w / cols, refine_h / rows), allow_upscale=True)
        refined = rgb.resize((cell_w * cols, cell_h * rows), Image.Resampling.BICUBIC)
        for r in range(rows):
            for c in range(cols):
                pieces.append(refined.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)))
    return ImageInputs(
        pixel_values=[_normalise(p) for p in pieces],
        tgt_sizes=[_tgt_size(p) for p in pieces],
        grid=grid,
        num_tokens=len(pieces) * QUERY_NUM,
        original_size=(width, height),
    )


def reshape_by_patch(pixels: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (3, 14, H*W/14): the patch-major layout MiniCPM-style NaViT towers consume.

    Patches are ordered row by row; each patch's 14 rows are laid side by side along the last axis.
    """
    channels, height, width = pixels.shape
    p = PATCH_SIZE
    if height % p or width % p:
        raise MediaError(f"slice {width}x{height} is not a multiple of the {p}-pixel patch")
    blocks = pixels.reshape(channels, height // p, p, width // p, p)  # C, gh, py, gw, px
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3, 4).reshape(channels, p, -1))
