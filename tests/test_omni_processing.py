"""Megrez-3B-Omni media preprocessing: slicing, token counts, audio features, errors, budgeting."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.omni.audio import (
    AUDIO_END,
    AUDIO_START,
    SAMPLE_RATE,
    audio_placeholder_text,
    audio_token_count,
    preprocess_audio,
    resample,
    segment_lengths,
)
from engine.omni.budget import fit_media
from engine.omni.errors import MediaError
from engine.omni.image import (
    FILLER_TOKEN,
    PATCH_SIZE,
    image_placeholder_text,
    image_token_count,
    load_image,
    preprocess_image,
    reshape_by_patch,
    sliced_grid,
)


def _png(width: int, height: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


# --- images -------------------------------------------------------------------------------------


def test_vendor_example_1480x720_is_overview_plus_3x2_slices() -> None:
    # 1480*720/448² = 5.31 -> 6 slices; of grids for 5, 6, 7 slices, 3x2 (log 1.5) is nearest log(2.06).
    assert sliced_grid(1480, 720) == (3, 2)
    assert sliced_grid(720, 1480) == (2, 3)
    assert image_token_count(1480, 720) == 448
    assert image_token_count(720, 1480) == 448


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    [
        ((448, 448), None, 64),
        ((300, 200), None, 64),
        ((16, 16), None, 64),
        ((449, 449), (1, 2), 192),
        ((896, 896), (2, 2), 320),
        ((1344, 1344), (3, 3), 640),
        ((4000, 4000), (3, 3), 640),  # capped at 9 slices
        ((4000, 200), (5, 1), 384),
        ((200, 4000), (1, 5), 384),
        ((10000, 300), (9, 1), 640),
    ],
)
def test_grid_and_token_counts(size: tuple[int, int], grid: tuple[int, int] | None, tokens: int) -> None:
    assert sliced_grid(*size) == grid
    assert image_token_count(*size) == tokens


def test_max_slice_nums_limits_slices() -> None:
    assert image_token_count(1480, 720, max_slice_nums=1) == 64
    # Cap 4: candidates 3 and 4 slices; 3x1 (log 3) beats 2x2 and 4x1 for a 2.06:1 image.
    assert sliced_grid(1480, 720, max_slice_nums=4) == (3, 1)
    assert image_token_count(1480, 720, max_slice_nums=4) == 4 * 64


def test_preprocess_1480x720_shapes_match_tgt_sizes() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (720, 1480, 3), dtype=np.uint8))
    out = preprocess_image(img)
    assert out.num_slices == 7 and out.num_tokens == 448 and out.grid == (3, 2)
    # Overview 644x308; slices cut from a 1554x756 refine image, 518x378 each.
    assert out.tgt_sizes == [(22, 46)] + [(27, 37)] * 6
    for pixels, (h, w) in zip(out.pixel_values, out.tgt_sizes, strict=True):
        assert pixels.dtype == np.float32
        assert pixels.shape == (3, h * PATCH_SIZE, w * PATCH_SIZE)
        assert -1.0 <= pixels.min() and pixels.max() <= 1.0


@pytest.mark.parametrize("size", [(300, 200), (5000, 120), (120, 5000), (1000, 999)])
def test_preprocess_sizes_are_patch_multiples_and_count_matches(size: tuple[int, int]) -> None:
    out = preprocess_image(Image.new("RGB", size))
    assert out.num_tokens == image_token_count(*size)
    for pixels in out.pixel_values:
        assert pixels.shape[1] % PATCH_SIZE == 0 and pixels.shape[2] % PATCH_SIZE == 0


def test_small_image_is_upscaled_overview_and_normalised() -> None:
    out = preprocess_image(Image.new("RGB", (100, 100), (255, 0, 128)))
    assert out.grid is None and out.num_tokens == 64
    assert out.tgt_sizes == [(32, 32)]  # upscaled to fill one 448x448 tile
    pixels = out.pixel_values[0]
    np.testing.assert_allclose(pixels[:, 5, 5], [1.0, -1.0, 128 / 127.5 - 1], atol=1e-6)


def test_reshape_by_patch_matches_torch_unfold_layout() -> None:
    pixels = np.random.default_rng(1).standard_normal((3, 28, 42)).astype(np.float32)
    t = torch.from_numpy(pixels)
    ref = torch.nn.functional.unfold(t, (14, 14), stride=(14, 14)).reshape(3, 14, 14, -1)
    ref = ref.permute(0, 1, 3, 2).reshape(3, 14, -1).numpy()
    np.testing.assert_array_equal(reshape_by_patch(pixels), ref)


def test_image_placeholder_text() -> None:
    text = image_placeholder_text(1480, 720)
    assert text.count(FILLER_TOKEN) == 448
    assert text.startswith("<image>") and text.count("<slice>") == 6 and text.count("\n") == 1
    assert image_placeholder_text(448, 448) == "<image>" + FILLER_TOKEN * 64 + "</image>"


def test_load_image_ok_and_errors() -> None:
    img = load_image(_png(30, 20))
    assert img.size == (30, 20) and img.mode == "RGB"
    with pytest.raises(MediaError, match="decode"):
        load_image(b"definitely not an image")
    with pytest.raises(MediaError):
        load_image(_png(64, 64)[:60])  # truncated
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")
    with pytest.raises(MediaError, match="unsupported image format"):
        load_image(_png(8, 8, fmt="TIFF"))


def test_zero_size_and_extreme_aspect_images_rejected() -> None:
    with pytest.raises(MediaError, match="zero size"):
        preprocess_image(Image.new("RGB", (0, 10)))
    with pytest.raises(MediaError, match="zero size"):
        image_token_count(10, 0)
    with pytest.raises(MediaError, match="aspect ratio"):
        image_token_count(10000, 10)


# --- audio --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "tokens"),
    [
        (1.0, 27),  # 100 mel -> 50 -> 25 pooled + bos/eos
        (29.9, 749),  # 2990 -> 1495 -> 747 + 2
        (30.0, 752),  # 3000 -> 1500 -> 750 + 2
        (45.0, 752 + 377),  # two segments: 30 s + 15 s (1500 -> 750 -> 375 + 2)
        (60.0, 2 * 752),
    ],
)
def test_audio_token_counts(seconds: float, tokens: int) -> None:
    assert audio_token_count(round(seconds * SAMPLE_RATE)) == tokens


def test_audio_token_count_other_rate_uses_resampled_length() -> None:
    assert audio_token_count(44_100, sample_rate=44_100) == audio_token_count(16_000)


def test_preprocess_audio_segments_and_features() -> None:
    t = np.arange(45 * SAMPLE_RATE) / SAMPLE_RATE
    out = preprocess_audio((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SAMPLE_RATE)
    assert out.input_features.shape == (2, 128, 3000)
    assert out.mel_frames == [3000, 1500] and out.encoder_frames == [1500, 750]
    assert out.span_tokens == [752, 377] and out.num_tokens == 1129
    assert np.isfinite(out.input_features).all()
    text = audio_placeholder_text(out.num_samples)
    assert text.count(AUDIO_START) == 2 and text.count(AUDIO_END) == 2 and text.count(FILLER_TOKEN) == 1129


@pytest.mark.parametrize("rate", [44_100, 8_000])
def test_resampling_to_16k(rate: int) -> None:
    t = np.arange(2 * rate) / rate
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(wave, rate)
    assert out.shape == (32_000,)
    # The 440 Hz tone survives at the new rate.
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / out.shape[0] - 440) < 1
    assert preprocess_audio(wave, rate).num_samples == 32_000


def test_resampling_odd_lengths() -> None:
    assert resample(np.zeros(44_101, np.float32), 44_100).shape == (16_000,)
    assert resample(np.zeros(7, np.float32), 8_000).shape == (14,)


def test_stereo_and_int16_inputs() -> None:
    stereo = (np.random.default_rng(2).standard_normal((2, 16_000)) * 1000).astype(np.int16)
    assert preprocess_audio(stereo, SAMPLE_RATE).num_tokens == 27
    assert preprocess_audio(stereo.T, SAMPLE_RATE).num_tokens == 27


@pytest.mark.parametrize(
    ("wave", "match"),
    [
        (np.zeros(0, np.float32), "empty"),
        (np.array([0.1, np.nan] * 8000, np.float32), "NaN"),
        (np.array([np.inf] * 16000, np.float32), "NaN or infinite"),
        (np.zeros((3, 4, 5), np.float32), "shape"),
        (np.zeros((8, 16000), np.float32), "shape"),
        (np.zeros(16000, np.complex64), "sample type"),
        (np.zeros(100, np.float32), "too short"),
    ],
)
def test_audio_errors(wave: np.ndarray, match: str) -> None:
    with pytest.raises(MediaError, match=match):
        preprocess_audio(wave, SAMPLE_RATE)


def test_audio_too_long_and_bad_rate() -> None:
    with pytest.raises(MediaError, match="limit is 10 s"):
        preprocess_audio(np.zeros(11 * SAMPLE_RATE, np.float32), SAMPLE_RATE, max_seconds=10)
    with pytest.raises(MediaError, match="sample rate"):
        preprocess_audio(np.zeros(SAMPLE_RATE, np.float32), 0)
    with pytest.raises(MediaError, match="empty"):
        audio_token_count(0)


# --- budget -------------------------------------------------------------------------------------


def test_fit_media_within_budget_is_unchanged() -> None:
    plan = fit_media(
        [(1480, 720)], [SAMPLE_RATE], text_tokens=100, marker_tokens_per_slice=0, marker_tokens_per_audio_segment=0
    )
    assert not plan.adjusted
    assert [p.tokens for p in plan.images] == [448] and [p.tokens for p in plan.audios] == [27]
    assert plan.total_tokens == 100 + 448 + 27


def test_fit_media_reduces_slices_of_the_largest_image_first() -> None:
    plan = fit_media([(4000, 4000), (1480, 720)], [], text_tokens=0, max_model_len=900, marker_tokens_per_slice=0)
    assert plan.adjusted and plan.total_tokens <= 900
    big, small = plan.images
    assert big.tokens < 640 and big.max_slice_nums < 9
    assert small.tokens == 448  # untouched while the big one could still shrink


def test_fit_media_cuts_audio_after_images_reach_overview_only() -> None:
    plan = fit_media([(1480, 720)], [45 * SAMPLE_RATE], text_tokens=200, max_model_len=1000)
    image, audio = plan.images[0], plan.audios[0]
    assert image.max_slice_nums == 1 and image.tokens == 64 + 2
    assert audio.num_samples < audio.original_samples
    assert plan.total_tokens <= 1000
    assert audio.tokens == audio_token_count(audio.num_samples) + 2 * len(segment_lengths(audio.num_samples))


def test_fit_media_clear_error_when_impossible() -> None:
    with pytest.raises(MediaError, match="context holds 4096"):
        fit_media([(1000, 1000)] * 70, [], text_tokens=100)
    with pytest.raises(MediaError, match="reserved for the answer"):
        fit_media([(448, 448)], [SAMPLE_RATE], text_tokens=4000, reserve_tokens=100)
