"""Megrez-3B-Omni as a vLLM 0.32 model: Llama + SigLIP NaViT tower + resampler + Whisper-style audio encoder.

The structure follows the vendor's module tree (infinigence/Infini-Megrez-Omni ``vllm_demo/megrezo.py``,
written for vLLM 0.6), rebuilt on the current interfaces: media are encoded in ``embed_multimodal``
and vLLM scatters the embeddings onto the ``<|unk|>`` fillers that the processor
(:mod:`engine.omni.processing`) marks, so ``forward`` is the plain language model.

Checkpoint names map as the vendor's loader did: ``llm.*`` stays (vLLM's Llama under prefix ``llm``),
``vision.vpm.*`` is the tower, ``vision.resampler.*`` the resampler, ``audio.audio.*`` the audio encoder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.idefics2_vision_model import Idefics2VisionTransformer
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.minicpmv import Resampler2_5
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from engine.omni.audio import encoder_frames, pooled_frames
from engine.omni.config import MegrezOAudioConfig, MegrezOConfig
from engine.omni.processing import MegrezODummyInputsBuilder, MegrezOMultiModalProcessor, MegrezOProcessingInfo
from engine.protocol import MEDIA_PLACEHOLDERS

if not torch.cuda.is_available():
    # vLLM's Resampler2_5 asks torch.cuda.is_current_stream_capturing(), which raises on CPU builds of
    # torch instead of answering False. Without CUDA nothing can be capturing, so answer that.
    torch.cuda.is_current_stream_capturing = lambda: False


class AudioAttention(nn.Module):
    """Whisper self-attention with the vendor's names (``query``/``key``/``value``/``out``; no key bias)."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.n_head, -1).transpose(1, 2)

        # SDPA's boolean mask marks keys that may be attended to.
        mask = None if key_padding is None else ~key_padding[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), mask)
        return self.out(out.transpose(1, 2).reshape(batch, length, width))


class AudioBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = AudioAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), key_padding)
        return x + self.mlp(self.mlp_ln(x))


class MegrezOAudioEncoder(nn.Module):
    """Whisper-large-v3 encoder, pooled by 2 and projected to the LM width, with learned bos/eos.

    Each 30 s segment yields ``[bos] + pooled + [eos]``; the pooling comes before ``ln_post``, as in
    the vendor's encoder (Whisper's own encoder normalises first).
    """

    def __init__(self, config: MegrezOAudioConfig) -> None:
        super().__init__()
        if not (config.avg_pool and config.add_audio_bos_eos_token):
            raise ValueError("MegrezO's audio encoder needs avg_pool and add_audio_bos_eos_token")
        width = config.n_state
        self.conv1 = nn.Conv1d(config.n_mels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        # A parameter in the checkpoint (sinusoids), loaded like any weight.
        self.positional_embedding = nn.Parameter(torch.empty(config.n_ctx, width), requires_grad=False)
        self.blocks = nn.ModuleList(AudioBlock(width, config.n_head) for _ in range(config.n_layer))
        self.ln_post = nn.LayerNorm(width)
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.proj = nn.Linear(width, config.output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, config.output_dim)

    def forward(self, features: torch.Tensor, mel_frames: Sequence[int]) -> list[torch.Tensor]:
        """``features`` (segments, n_mels, frames) → one ``(span, output_dim)`` tensor per segment."""
        lengths = [encoder_frames(n) for n in mel_frames]
        longest = max(lengths)
        x = features[:, :, : 2 * longest].to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (segments, frames, width)
        x = x + self.positional_embedding[: x.shape[1]]
        key_padding = None
        if min(lengths) < longest:
            positions = torch.arange(x.shape[1], device=x.device)
            key_padding = positions[None, :] >= torch.tensor(lengths, device=x.device)[:, None]
            x = x.masked_fill(key_padding[..., None], 0.0)
        for block in self.blocks:
            x = block(x, key_padding)
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)
        x = self.proj(self.ln_post(x))
        bos, eos = self.audio_bos_eos_token.weight[:1], self.audio_bos_eos_token.weight[1:]
        # Only the pooled frames of each segment's real length; padding frames are dropped.
        return [torch.cat([bos, x[i, : pooled_frames(n)], eos]) for i, n in enumerate(lengths)]


def _flat_list(value: object) -> list[torch.Tensor]:
    """Items of a batched field (a tensor with a leading item axis, or a list) as a flat tensor list."""
    if isinstance(value, torch.Tensor):
        return list(value)
    out: list[torch.Tensor] = []
    for item in value:  # type: ignore[union-attr]
        out.extend(_flat_list(item) if isinstance(item, (list, tuple)) else [item])
    return out


@MULTIMODAL_REGISTRY.register_processor(
    MegrezOMultiModalProcessor, info=MegrezOProcessingInfo, dummy_inputs=MegrezODummyInputsBuilder
)
class MegrezOForCausalLM(nn.Module, SupportsMultiModal, SupportsPP):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={"vision.vpm.": "vpm.", "vision.resampler.": "resampler.", "audio.audio.": "audio."}
    )
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        for kind, placeholder in MEDIA_PLACEHOLDERS.items():
            if modality.startswith(kind):
                return placeholder
        raise ValueError(f"MegrezO takes images and audio, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: MegrezOConfig = vllm_config.model_config.hf_config
        self.config = config
        quant_config = vllm_config.quant_config
        with self._mark_language_model(vllm_config):
            self.llm = LlamaForCausalLM(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "llm"))
        with self._mark_tower_model(vllm_config, "image"):
            self.vpm = Idefics2VisionTransformer(
                config.vision_config,
                quant_config=quant_config,
                # The vendor's NaViT SigLIP masks padded patches in attention.
                apply_encoder_attention_mask=True,
                num_hidden_layers_override=config.vision_config.num_hidden_layers - config.drop_vision_last_layer,
                prefix=maybe_prefix(prefix, "vpm"),
            )
            self.resampler = Resampler2_5(
                num_queries=config.query_num,
                embed_dim=config.hidden_size,
                num_heads=max(config.hidden_size // 128, 1),
                kv_dim=config.vision_config.hidden_size,
                quant_config=quant_config,
                prefix=maybe_prefix(prefix, "resampler"),
            )
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio = MegrezOAudioEncoder(config.audio_config)
        self.make_empty_intermediate_tensors = self.llm.make_empty_intermediate_tensors

    def _embed_images(self, pixel_values: object, tgt_sizes: object) -> list[torch.Tensor]:
        per_image = [_flat_list(p) for p in pixel_values]  # type: ignore[union-attr]
        slices = [s for image in per_image for s in image]
        sizes = torch.cat([t.reshape(-1, 2) for t in _flat_list(tgt_sizes)]).to(torch.long)
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        device = self.vpm.embeddings.patch_embedding.weight.device
        features = []
        step = max(int(self.config.vision_batch_size), 1)
        for start in range(0, len(slices), step):
            chunk, chunk_sizes = slices[start : start + step], sizes[start : start + step]
            # Slices arrive in the patch-major (3, 14, patches*14) layout; pad them to the longest.
            width = max(s.shape[-1] for s in chunk)
            batch = torch.zeros((len(chunk), 3, chunk[0].shape[-2], width), dtype=dtype, device=device)
            for i, s in enumerate(chunk):
                batch[i, ..., : s.shape[-1]] = s
            patches = chunk_sizes.prod(-1)
            mask = torch.arange(width // self.config.patch_size, device=device)[None, :] < patches.to(device)[:, None]
            hidden = self.vpm(batch, patch_attention_mask=mask[:, None, :], tgt_sizes=chunk_sizes.to(device))
            features.append(self.resampler(hidden, chunk_sizes.to(device)))
        flat = torch.cat(features)
        counts = [len(image) for image in per_image]
        return [f.flatten(0, 1) for f in flat.split(counts)]

    def _embed_audios(self, audio_features: object, audio_mel_frames: object) -> list[torch.Tensor]:
        per_audio = [_flat_list(f) for f in audio_features]  # type: ignore[union-attr]
        frames = [[int(n) for n in t.reshape(-1)] for t in _flat_list(audio_mel_frames)]
        segments = torch.stack([s for audio in per_audio for s in audio])
        spans = self.audio(segments, [n for audio in frames for n in audio])
        out, start = [], 0
        for audio in per_audio:
            out.append(torch.cat(spans[start : start + len(audio)]))
            start += len(audio)
        return out

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        # vLLM batches one modality per call, in prompt order.
        if kwargs.get("pixel_values") is not None:
            return self._embed_images(kwargs["pixel_values"], kwargs["tgt_sizes"])
        if kwargs.get("audio_features") is not None:
            return self._embed_audios(kwargs["audio_features"], kwargs["audio_mel_frames"])
        return []

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.llm.model(
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.llm.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Every parameter must come from the checkpoint: the loader raises on any left out.
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="llm", connector="resampler", tower_model=["vpm", "audio"]
        )
