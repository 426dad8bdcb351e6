"""vLLM's multimodal processing for Megrez-3B-Omni, built on our own preprocessing (no hub remote code).

vLLM calls these classes in the frontend process, before a request reaches a worker:
- :class:`MegrezOProcessingInfo` says what the model accepts and how many prompt tokens an item can take;
- :class:`MegrezOMultiModalProcessor` turns images and audio into tensors (:mod:`engine.omni.image`,
  :mod:`engine.omni.audio`) and expands each ``(<image>./</image>)`` / ``(<audio>./</audio>)`` placeholder
  in the prompt's token ids into marker and ``<|unk|>`` filler tokens; only the fillers receive embeddings;
- :class:`MegrezODummyInputsBuilder` gives the largest inputs, for vLLM's start-up profiling.

A bad item raises :class:`~engine.omni.errors.MediaError` here, so the request fails with its message and
the engine's workers never see it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import AudioProcessorItems, ImageProcessorItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import BaseDummyInputsBuilder
from vllm.multimodal.processing.processor import (
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    MultiModalPromptUpdates,
    PlaceholderFeaturesInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from engine.omni.audio import (
    MAX_AUDIO_SECONDS,
    SAMPLE_RATE,
    SEGMENT_SAMPLES,
    audio_placeholder_text,
    preprocess_audio,
)
from engine.omni.config import MegrezOConfig
from engine.omni.errors import MediaError
from engine.omni.image import (
    FILLER_TOKEN,
    MAX_SLICE_NUMS,
    SCALE_RESOLUTION,
    grid_placeholder_text,
    preprocess_image,
    reshape_by_patch,
    sliced_grid,
)
from engine.protocol import MEDIA_PLACEHOLDERS

__all__ = [
    "MegrezODummyInputsBuilder",
    "MegrezOMultiModalProcessor",
    "MegrezOProcessingInfo",
]

# The largest image: an area of 9 tiles gives the full 3x3 grid plus the overview (640 fillers).
LARGEST_IMAGE_SIDE = 3 * SCALE_RESOLUTION


def _as_pil(image: object) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.dtype != np.uint8:
        raise MediaError(f"image arrays must be uint8 pixels, got {array.dtype}")
    return Image.fromarray(array.squeeze())


class MegrezOProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MegrezOConfig:
        return self.ctx.get_hf_config(MegrezOConfig)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "audio": None}

    def get_data_parser(self) -> MultiModalDataParser:
        # soxr: torchaudio (vLLM's default) is CUDA-linked on PyPI and absent on CPU installs.
        return MultiModalDataParser(
            target_sr=SAMPLE_RATE,
            target_channels=1,
            audio_resample_method="soxr",
            expected_hidden_size=self._get_expected_hidden_size(),
        )

    @functools.cached_property
    def filler_id(self) -> int:
        token_id = self.get_tokenizer().convert_tokens_to_ids(FILLER_TOKEN)
        if not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"the tokenizer has no {FILLER_TOKEN} token, which MegrezO's media fillers use")
        return token_id

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one info object per engine; the key is a small grid
    def _piece_ids(self, grid: tuple[int, int] | None) -> tuple[int, ...]:
        return tuple(self.get_tokenizer().encode(grid_placeholder_text(grid), add_special_tokens=False))

    def placeholder_ids(self, modality: str) -> list[int]:
        """The placeholder's token ids as callers must insert them (encoded on its own, no merges)."""
        return self.get_tokenizer().encode(MEDIA_PLACEHOLDERS[modality], add_special_tokens=False)

    def image_prompt_ids(self, width: int, height: int) -> list[int]:
        """Token ids that replace one image's placeholder: markers plus 64 fillers per slice."""
        return list(self._piece_ids(sliced_grid(width, height, max_slice_nums=self.max_slice_nums)))

    def audio_prompt_ids(self, num_samples: int) -> list[int]:
        """Token ids that replace one 16 kHz clip's placeholder: one marked block per 30 s segment."""
        return self.get_tokenizer().encode(audio_placeholder_text(num_samples), add_special_tokens=False)

    @property
    def max_slice_nums(self) -> int:
        return int(getattr(self.get_hf_config(), "max_slice_nums", MAX_SLICE_NUMS))

    def max_audio_samples(self, seq_len: int) -> int:
        """The longest clip accepted, in 30 s segments that fit the context (at least one)."""
        segments = int(MAX_AUDIO_SECONDS * SAMPLE_RATE) // SEGMENT_SAMPLES
        while segments > 1 and len(self.audio_prompt_ids(segments * SEGMENT_SAMPLES)) > seq_len:
            segments -= 1
        return segments * SEGMENT_SAMPLES

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {
            "image": len(self.image_prompt_ids(LARGEST_IMAGE_SIDE, LARGEST_IMAGE_SIDE)),
            "audio": len(self.audio_prompt_ids(self.max_audio_samples(seq_len))),
        }


class MegrezODummyInputsBuilder(BaseDummyInputsBuilder[MegrezOProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "".join(text * mm_counts.get(kind, 0) for kind, text in MEDIA_PLACEHOLDERS.items())

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Mapping[str, object]):
        return {
            "image": self._get_dummy_images(
                width=LARGEST_IMAGE_SIDE,
                height=LARGEST_IMAGE_SIDE,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image") if mm_options else None,
            ),
            "audio": self._get_dummy_audios(
                length=self.info.max_audio_samples(seq_len),
                num_audios=mm_counts.get("audio", 0),
                overrides=mm_options.get("audio") if mm_options else None,
            ),
        }


class MegrezOMultiModalProcessor(BaseMultiModalProcessor[MegrezOProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        out: dict[str, list] = {}
        images = hf_data.get("images") or []
        if images:
            processed = [preprocess_image(_as_pil(img), max_slice_nums=self.info.max_slice_nums) for img in images]
            out["pixel_values"] = [
                [torch.from_numpy(reshape_by_patch(p)) for p in img.pixel_values] for img in processed
            ]
            out["tgt_sizes"] = [torch.tensor(img.tgt_sizes, dtype=torch.int64) for img in processed]
        audios = hf_data.get("audio") or []
        if audios:
            processed_audio = [preprocess_audio(np.asarray(a), SAMPLE_RATE) for a in audios]
            out["audio_features"] = [torch.from_numpy(a.input_features) for a in processed_audio]
            out["audio_mel_frames"] = [torch.tensor(a.mel_frames, dtype=torch.int64) for a in processed_audio]
        return BatchFeature(out)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "tgt_sizes": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "audio_features": MultiModalFieldConfig.batched("audio"),
            "audio_mel_frames": MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        filler = self.info.filler_id

        def image_replacement(item_idx: int) -> PromptUpdateDetails:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return PromptUpdateDetails.select_token_id(self.info.image_prompt_ids(size.width, size.height), filler)

        def audio_replacement(item_idx: int) -> PromptUpdateDetails:
            samples = mm_items.get_items("audio", AudioProcessorItems).get_audio_length(item_idx)
            return PromptUpdateDetails.select_token_id(self.info.audio_prompt_ids(samples), filler)

        return [
            PromptReplacement(
                modality="image", target=self.info.placeholder_ids("image"), replacement=image_replacement
            ),
            PromptReplacement(
                modality="audio", target=self.info.placeholder_ids("audio"), replacement=audio_replacement
            ),
        ]

    def _apply_prompt_updates(
        self, token_ids: list[int], mm_prompt_updates: MultiModalPromptUpdates
    ) -> tuple[list[int], Mapping[str, list[PlaceholderFeaturesInfo]]]:
        # Token-level matching only. vLLM's fallback decodes the prompt to text and encodes it again,
        # which would turn special-token text from users or web pages into real special tokens.
        new_ids, result, placeholders = self._apply_token_matches_with_placeholders(token_ids, mm_prompt_updates)
        for modality, matched in result.items():
            missing = sum(1 for m in matched if m is None)
            if missing:
                raise MediaError(
                    f"{missing} of {len(matched)} {modality} input(s) have no {MEDIA_PLACEHOLDERS[modality]} "
                    "placeholder in the prompt; insert one per item, tokenized on its own"
                )
        return new_ids, {m: p for m, p in placeholders.items() if p}
