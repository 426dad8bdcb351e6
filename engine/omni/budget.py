"""Fitting images and audio into the context window before any pixels or samples are processed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.omni.audio import SAMPLE_RATE, audio_token_count, segment_lengths
from engine.omni.errors import MediaError
from engine.omni.image import MAX_SLICE_NUMS, QUERY_NUM, sliced_grid

# Audio is never cut below this; a shorter clip is unlikely to be worth keeping.
MIN_AUDIO_SECONDS = 1.0


@dataclass(frozen=True)
class ImagePlan:
    """How to preprocess one image: pass ``max_slice_nums`` to ``preprocess_image``."""

    index: int
    size: tuple[int, int]
    max_slice_nums: int
    tokens: int
    original_tokens: int


@dataclass(frozen=True)
class AudioPlan:
    """How to preprocess one 16 kHz clip: keep its first ``num_samples`` samples."""

    index: int
    num_samples: int
    original_samples: int
    tokens: int
    original_tokens: int


@dataclass(frozen=True)
class MediaPlan:
    images: list[ImagePlan]
    audios: list[AudioPlan]
    text_tokens: int
    total_tokens: int
    max_model_len: int

    @property
    def adjusted(self) -> bool:
        return any(i.tokens != i.original_tokens for i in self.images) or any(
            a.num_samples != a.original_samples for a in self.audios
        )


def _image_cost(size: tuple[int, int], max_slice_nums: int, markers_per_piece: int) -> int:
    grid = sliced_grid(*size, max_slice_nums=max_slice_nums)
    pieces = 1 + (0 if grid is None else grid[0] * grid[1])
    return pieces * (QUERY_NUM + markers_per_piece)


def _audio_cost(num_samples: int, markers_per_segment: int) -> int:
    return audio_token_count(num_samples) + len(segment_lengths(num_samples)) * markers_per_segment


def fit_media(
    images: Sequence[tuple[int, int]],
    audios: Sequence[int],
    *,
    text_tokens: int,
    max_model_len: int = 4096,
    reserve_tokens: int = 0,
    max_slice_nums: int = MAX_SLICE_NUMS,
    marker_tokens_per_slice: int = 2,
    marker_tokens_per_audio_segment: int = 2,
    min_audio_seconds: float = MIN_AUDIO_SECONDS,
) -> MediaPlan:
    """Plan token use for images ``(width, height)`` and 16 kHz audio sample counts.

    ``text_tokens`` is the prompt without media; ``reserve_tokens`` is kept free for the answer.
    The marker allowances cover the start/end strings around each piece of fillers, whose token
    cost depends on the tokenizer. When over budget, images lose slices first (largest consumer
    first, down to the overview alone), then audio is cut from its end (longest first, not below
    ``min_audio_seconds``). Raises MediaError when even that does not fit.
    """
    budget = max_model_len - reserve_tokens - text_tokens
    image_plans = [
        ImagePlan(i, size, max_slice_nums, t, t)
        for i, size in enumerate(images)
        for t in [_image_cost(size, max_slice_nums, marker_tokens_per_slice)]
    ]
    audio_plans = [
        AudioPlan(i, n, n, t, t)
        for i, n in enumerate(audios)
        for t in [_audio_cost(n, marker_tokens_per_audio_segment)]
    ]

    def used() -> int:
        return sum(p.tokens for p in image_plans) + sum(p.tokens for p in audio_plans)

    while used() > budget:
        reducible = [p for p in image_plans if p.max_slice_nums > 1]
        if not reducible:
            break
        target = max(reducible, key=lambda p: p.tokens)
        # Step the cap down until the grid actually shrinks (several caps can give the same grid).
        cap = target.max_slice_nums - 1
        cost = _image_cost(target.size, cap, marker_tokens_per_slice)
        while cap > 1 and cost >= target.tokens:
            cap -= 1
            cost = _image_cost(target.size, cap, marker_tokens_per_slice)
        image_plans[target.index] = replace(target, max_slice_nums=cap, tokens=cost)

    min_samples = int(min_audio_seconds * SAMPLE_RATE)
    for plan in sorted(audio_plans, key=lambda p: -p.tokens):
        over = used() - budget
        if over <= 0:
            break
        floor = min(plan.num_samples, min_samples)
        allowed = plan.tokens - over
        if _audio_cost(floor, marker_tokens_per_audio_segment) > allowed:
            new_samples = floor
        else:
            # Largest whole-frame length whose cost fits; the cost grows monotonically with length.
            lo, hi = floor // 160, plan.num_samples // 160
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _audio_cost(mid * 160, marker_tokens_per_audio_segment) <= allowed:
                    lo = mid
                else:
                    hi = mid - 1
            new_samples = max(lo * 160, floor)
        audio_plans[plan.index] = replace(
            plan, num_samples=new_samples, tokens=_audio_cost(new_samples, marker_tokens_per_audio_segment)
        )

    total = text_tokens + used()
    if total + reserve_tokens > max_model_len:
        raise MediaError(
            f"the request needs at least {total} prompt tokens ({text_tokens} text, "
            f"{used()} for {len(images)} image(s) at one overview each and {len(audios)} audio clip(s) "
            f"cut to at most {min_audio_seconds:g} s) plus {reserve_tokens} reserved for the answer, "
            f"but the context holds {max_model_len}; send fewer or shorter media or a shorter question"
        )
    return MediaPlan(image_plans, audio_plans, text_tokens, total, max_model_len)
