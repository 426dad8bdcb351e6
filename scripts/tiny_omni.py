"""A tiny random Megrez-3B-Omni checkpoint, and a plain PyTorch reference of the same network (for tests
and benchmarks; never the product).

:class:`ReferenceMegrezO` is assembled from transformers modules (``LlamaForCausalLM``,
``Idefics2VisionTransformer``, Whisper's ``WhisperEncoderLayer``) plus the vendor's resampler and audio
head written out in torch. It shares nothing with ``engine/omni/model.py`` except the 2-D sin-cos table,
so the parity test compares two independent implementations. Its state dict is renamed to the vendor's
checkpoint names (``llm.*``, ``vision.vpm.*``, ``vision.resampler.*``, ``audio.audio.*``) and saved as
safetensors, which is what vLLM loads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from engine.omni.audio import AudioInputs, encoder_frames
from engine.omni.config import MegrezOConfig
from engine.omni.image import ImageInputs
from scripts.megrez_tokenizer import build_megrez_tokenizer
from scripts.tiny_models import renumber_special_tokens

SEED = 4321

# Small widths; the language model's head_dim is 64, which vLLM's CPU attention supports.
TINY_FIELDS: dict[str, object] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "rope_theta": 5_000_000.0,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 980,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
    },
    "audio_config": {"n_mels": 128, "n_ctx": 1500, "n_state": 64, "n_head": 2, "n_layer": 2, "output_dim": 128},
}

# Megrez-3B-Omni's real widths (HF Infinigence/Megrez-3B-Omni): Megrez-3B-Instruct's Llama, SigLIP-so400m
# (NaViT, 980 px position grid), Whisper-large-v3's encoder. Tests shrink the layer counts.
REAL_FIELDS: dict[str, object] = {
    "hidden_size": 2560,
    "intermediate_size": 7168,
    "num_hidden_layers": 32,
    "num_attention_heads": 40,
    "num_key_value_heads": 10,
    "vocab_size": 122880,
    "max_position_embeddings": 4096,
    "rope_theta": 5_000_000.0,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 980,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
    },
    "audio_config": {"n_mels": 128, "n_ctx": 1500, "n_state": 1280, "n_head": 20, "n_layer": 32, "output_dim": 2560},
}


def megrezo_config(tokenizer_dir: Path, fields: dict[str, object]) -> MegrezOConfig:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = {"vocab_size": len(tok)} | fields
    return MegrezOConfig(
        architectures=["MegrezO"],
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|turn_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|pad|>"),
        torch_dtype="float32",
        **fields,
    )


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table (the checkpoint stores it as a parameter)."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class ReferenceResampler(nn.Module):
    """The vendor's resampler: 64 learned queries cross-attending to tower patches plus 2-D sin-cos."""

    def __init__(self, queries: int, width: int, kv_width: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.kv_proj = nn.Linear(kv_width, width, bias=False)
        self.attn = nn.MultiheadAttention(width, max(width // 128, 1))
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(width, eps=1e-6) for _ in range(3))
        self.proj = nn.Parameter(width**-0.5 * torch.randn(width, width))

    def forward(self, patches: torch.Tensor, tgt_size: tuple[int, int]) -> torch.Tensor:
        from vllm.model_executor.layers.resampler import get_2d_sincos_pos_embed

        height, width = tgt_size
        table = get_2d_sincos_pos_embed(self.query.shape[1], (70, 70), version=(2, 5))
        pos = torch.from_numpy(np.ascontiguousarray(table[:height, :width])).float().reshape(height * width, -1)
        x = self.ln_kv(self.kv_proj(patches))  # (L, D)
        out = self.attn(self.ln_q(self.query)[:, None], (x + pos)[:, None], x[:, None])[0][:, 0]
        return self.ln_post(out) @ self.proj


class ReferenceAudio(nn.Module):
    """Whisper encoder layers from transformers, with the vendor's conv front, pooling and bos/eos."""

    def __init__(self, cfg: dict[str, int]) -> None:
        super().__init__()
        width = cfg["n_state"]
        whisper = WhisperConfig(
            d_model=width,
            encoder_attention_heads=cfg["n_head"],
            encoder_ffn_dim=4 * width,
            activation_function="gelu",
            attn_implementation="eager",
        )
        self.conv1 = nn.Conv1d(cfg["n_mels"], width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(cfg["n_ctx"], width))
        self.layers = nn.ModuleList(WhisperEncoderLayer(whisper) for _ in range(cfg["n_layer"]))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg["output_dim"])
        self.bos_eos = nn.Embedding(2, cfg["output_dim"])

    def forward(self, features: torch.Tensor, mel_frames: int) -> torch.Tensor:
        frames = encoder_frames(mel_frames)
        x = features[None, :, : 2 * frames]
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)
        x = x + self.positional_embedding[: x.shape[1]]
        for layer in self.layers:
            x = layer(x, attention_mask=None)
        x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)
        x = self.proj(self.ln_post(x))[0, : (frames - 2) // 2 + 1]
        return torch.cat([self.bos_eos.weight[:1], x, self.bos_eos.weight[1:]])


# Reference names -> the vendor's checkpoint names.
_AUDIO_RENAMES = (
    (r"^layers\.(\d+)\.self_attn\.q_proj\.", r"blocks.\1.attn.query."),
    (r"^layers\.(\d+)\.self_attn\.k_proj\.", r"blocks.\1.attn.key."),
    (r"^layers\.(\d+)\.self_attn\.v_proj\.", r"blocks.\1.attn.value."),
    (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.out."),
    (r"^layers\.(\d+)\.self_attn_layer_norm\.", r"blocks.\1.attn_ln."),
    (r"^layers\.(\d+)\.fc1\.", r"blocks.\1.mlp.0."),
    (r"^layers\.(\d+)\.fc2\.", r"blocks.\1.mlp.2."),
    (r"^layers\.(\d+)\.final_layer_norm\.", r"blocks.\1.mlp_ln."),
    (r"^bos_eos\.", "audio_bos_eos_token."),
)


class ReferenceMegrezO(nn.Module):
    def __init__(self, config: MegrezOConfig) -> None:
        super().__init__()
        llama = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k not in ("vision_config", "audio_config")})
        llama.architectures = ["LlamaForCausalLM"]
        self.llm = LlamaForCausalLM(llama)
        vision = Idefics2VisionConfig(**config.vision_config.to_dict())
        vision._attn_implementation = "eager"
        self.vpm = Idefics2VisionTransformer(vision)
        self.resampler = ReferenceResampler(config.query_num, config.hidden_size, vision.hidden_size)
        self.audio = ReferenceAudio(config.audio_config.to_dict())

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """The state dict under the vendor's names (the audio positions are stored, as the vendor does)."""
        out = {f"llm.{k}": v for k, v in self.llm.state_dict().items()}
        out |= {f"vision.vpm.{k}": v for k, v in self.vpm.state_dict().items()}
        out |= {f"vision.resampler.{k}": v for k, v in self.resampler.state_dict().items()}
        for name, value in self.audio.state_dict().items():
            for pattern, repl in _AUDIO_RENAMES:
                name = re.sub(pattern, repl, name)
            out[f"audio.audio.{name}"] = value
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    @torch.no_grad()
    def embed_image(self, image: ImageInputs) -> torch.Tensor:
        """Tower + resampler per slice, in the natural (3, H, W) layout, one slice at a time."""
        pieces = []
        for pixels, size in zip(image.pixel_values, image.tgt_sizes, strict=True):
            patches = self.vpm(torch.from_numpy(pixels)[None]).last_hidden_state[0]
            pieces.append(self.resampler(patches, size))
        return torch.cat(pieces)

    @torch.no_grad()
    def embed_audio(self, audio: AudioInputs) -> torch.Tensor:
        segments = [self.audio(torch.from_numpy(audio.input_features[i]), n) for i, n in enumerate(audio.mel_frames)]
        return torch.cat(segments)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], filler_id: int, media: list[torch.Tensor], steps: int, stop_ids=()):
        """Greedy tokens and their log-probabilities, with media embeddings pasted on the fillers in order;
        like the engine, it stops after emitting a stop token."""
        ids = torch.tensor([prompt_ids])
        embeds = self.llm.get_input_embeddings()(ids)
        fillers = (ids[0] == filler_id).nonzero().flatten()
        if media:
            stacked = torch.cat(media)
            assert len(fillers) == len(stacked), (len(fillers), len(stacked))
            embeds[0, fillers] = stacked
        tokens, logprobs = [], []
        for _ in range(steps):
            logits = self.llm(inputs_embeds=embeds).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(float(lp[token]))
            if token in stop_ids:
                break
            embeds = torch.cat([embeds, self.llm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        return tokens, logprobs


def build_tiny_megrezo(path: Path) -> tuple[Path, ReferenceMegrezO]:
    """Write a seeded tiny MegrezO (config, tokenizer, safetensors) to ``path``; also return the reference."""
    build_megrez_tokenizer(path)
    config = megrezo_config(path, TINY_FIELDS)
    torch.manual_seed(SEED)
    reference = ReferenceMegrezO(config).float().eval()
    with torch.no_grad():
        # Random LayerNorm affine parameters, so a wrong mapping of any of them shows in the output.
        for module in reference.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    config.save_pretrained(path)
    save_file(reference.checkpoint(), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path, reference


def build_megrezo_shape(path: Path, *, llm_layers: int, vision_layers: int, audio_layers: int) -> Path:
    """Megrez-3B-Omni's real widths and vocabulary with fewer layers and no weights (``load_format="dummy"``)."""
    build_megrez_tokenizer(path)
    renumber_special_tokens(path)
    fields = dict(REAL_FIELDS, num_hidden_layers=llm_layers)
    fields["vision_config"] = dict(REAL_FIELDS["vision_config"], num_hidden_layers=vision_layers)  # type: ignore[arg-type]
    fields["audio_config"] = dict(REAL_FIELDS["audio_config"], n_layer=audio_layers)  # type: ignore[arg-type]
    megrezo_config(path, fields).save_pretrained(path)
    return path
