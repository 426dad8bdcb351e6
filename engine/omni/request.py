"""Turning a chat with images and audio into one Megrez-3B-Omni engine request that fits the context.

:func:`prepare_omni_request` decodes and checks every item (clear :class:`MediaError` messages), works out
how many prompt tokens each will take, and when the whole prompt does not fit it downscales images
(fewer slices, down to the overview alone) and then cuts audio, before anything reaches the engine. The
result reports the tokens of every item, so callers can show or log them before generation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soundfile
from PIL import Image

from engine.omni.audio import SAMPLE_RATE, audio_placeholder_text, audio_token_count, resample, to_mono_float
from engine.omni.budget import fit_media
from engine.omni.errors import MediaError
from engine.omni.image import (
    MAX_SLICE_NUMS,
    QUERY_NUM,
    SCALE_RESOLUTION,
    grid_placeholder_text,
    load_image,
    sliced_grid,
)
from engine.protocol import MEDIA_PLACEHOLDERS, Message, PromptEncoder

# One clip arrives as encoded bytes (WAV, FLAC, OGG, MP3: whatever libsndfile reads) or as samples + rate.
AudioInput = bytes | tuple[np.ndarray, int]
ImageInput = bytes | Image.Image


@dataclass(frozen=True)
class MediaReport:
    """What one item costs in the prompt, and what was done to make it fit."""

    kind: Literal["image", "audio"]
    index: int  # among items of its kind, in prompt order
    tokens: int  # prompt tokens it occupies (fillers and markers)
    original_tokens: int
    adjustment: str | None = None  # e.g. "downscaled 4000x3000 -> 1288x966"


@dataclass(frozen=True)
class OmniRequest:
    prompt_ids: list[int]  # with one placeholder per item; the engine expands them
    multimodal: dict[str, list]  # vLLM's multi_modal_data
    media: list[MediaReport]
    prompt_tokens: int  # after expansion


def decode_audio(data: AudioInput) -> np.ndarray:
    """Mono float32 samples at 16 kHz from encoded bytes or (samples, rate)."""
    if isinstance(data, tuple):
        samples, rate = data
    else:
        if not data:
            raise MediaError("audio is empty (0 bytes)")
        try:
            frames, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
            raise MediaError(f"cannot decode audio: {exc}") from exc
        samples = frames.mean(axis=1)  # any channel count
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise MediaError(f"invalid sample rate {rate!r}")
    return resample(to_mono_float(samples), int(rate))


def downscale_to_slices(image: Image.Image, max_slices: int) -> Image.Image:
    """The image shrunk (aspect kept) until MiniCPM-V slicing gives at most ``max_slices`` slices.

    Downscaling, not a per-image slice cap, because the engine's processor slices every image the same
    way; a smaller image simply yields a smaller grid.
    """

    def slices(size: tuple[int, int]) -> int:
        grid = sliced_grid(*size)
        return 0 if grid is None else grid[0] * grid[1]

    width, height = image.size
    if slices((width, height)) <= max_slices:
        return image
    # Start at the area that allows max_slices tiles (one tile when the overview must stand alone).
    scale = math.sqrt(max(max_slices, 1) * SCALE_RESOLUTION**2 / (width * height))
    while True:
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        if slices(size) <= max_slices or scale < 1e-3:
            return image.resize(size, Image.Resampling.BICUBIC)
        scale *= 0.95


def prepare_omni_request(
    encoder: PromptEncoder,
    messages: Sequence[Message],
    *,
    images: Sequence[ImageInput] = (),
    audios: Sequence[AudioInput] = (),
    max_model_len: int = 4096,
    reserve_tokens: int = 512,
) -> OmniRequest:
    """Prompt ids plus media for the engine; the items are consumed in the order the messages list them."""
    wanted = [kind for m in messages for kind in m.media]
    if wanted.count("image") != len(images) or wanted.count("audio") != len(audios):
        raise MediaError(
            f"the messages place {wanted.count('image')} image(s) and {wanted.count('audio')} audio clip(s), "
            f"but {len(images)} image(s) and {len(audios)} audio clip(s) were given"
        )
    pictures = [img.convert("RGB") if isinstance(img, Image.Image) else load_image(img) for img in images]
    clips = [decode_audio(a) for a in audios]

    tokenizer = encoder.tokenizer
    prompt_ids = encoder.encode(messages)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def image_tokens(size: tuple[int, int]) -> int:
        return count(grid_placeholder_text(sliced_grid(*size)))

    def audio_tokens(samples: int) -> int:
        return count(audio_placeholder_text(samples))

    placeholder_tokens = sum(len(encoder.placeholder_ids(MEDIA_PLACEHOLDERS[kind])) for kind in wanted)
    text_tokens = len(prompt_ids) - placeholder_tokens
    # Marker tokens per piece, measured on this tokenizer (the filler count per piece is fixed).
    piece = count(grid_placeholder_text(None))  # one overview: markers + QUERY_NUM fillers
    plan = fit_media(
        [p.size for p in pictures],
        [len(c) for c in clips],
        text_tokens=text_tokens,
        max_model_len=max_model_len,
        reserve_tokens=reserve_tokens,
        marker_tokens_per_slice=piece - QUERY_NUM,
        marker_tokens_per_audio_segment=audio_tokens(SAMPLE_RATE) - audio_token_count(SAMPLE_RATE),
    )

    # Each placeholder text is tokenized once per item, and again only for an item that was changed.
    reports: list[MediaReport] = []
    for image_plan, picture in zip(plan.images, pictures, strict=True):
        original = tokens = image_tokens(picture.size)
        note = None
        if image_plan.max_slice_nums < MAX_SLICE_NUMS:
            grid = sliced_grid(*picture.size, max_slice_nums=image_plan.max_slice_nums)
            smaller = downscale_to_slices(picture, 0 if grid is None else grid[0] * grid[1])
            if smaller.size != picture.size:
                note = f"downscaled {picture.size[0]}x{picture.size[1]} -> {smaller.size[0]}x{smaller.size[1]}"
                pictures[image_plan.index] = smaller
                tokens = image_tokens(smaller.size)
        reports.append(MediaReport("image", image_plan.index, tokens, original, note))
    for audio_plan in plan.audios:
        clip = clips[audio_plan.index]
        original = tokens = audio_tokens(len(clip))
        note = None
        if audio_plan.num_samples < len(clip):
            note = f"cut from {len(clip) / SAMPLE_RATE:.1f} s to {audio_plan.num_samples / SAMPLE_RATE:.1f} s"
            clips[audio_plan.index] = clip[: audio_plan.num_samples]
            tokens = audio_tokens(audio_plan.num_samples)
        reports.append(MediaReport("audio", audio_plan.index, tokens, original, note))

    total = text_tokens + sum(r.tokens for r in reports)
    if total + reserve_tokens > max_model_len:
        raise MediaError(
            f"the request needs {total} prompt tokens plus {reserve_tokens} for the answer, "
            f"but the context holds {max_model_len}; send fewer or smaller media or a shorter question"
        )
    multimodal: dict[str, list] = {}
    if pictures:
        multimodal["image"] = pictures
    if clips:
        multimodal["audio"] = [(c, SAMPLE_RATE) for c in clips]
    return OmniRequest(prompt_ids, multimodal, reports, total)
