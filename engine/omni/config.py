"""Megrez-3B-Omni's configuration as our own class, so the checkpoint loads without its remote code.

The checkpoint's ``config.json`` says ``model_type: "megrezo"`` and carries the Llama fields of the
language model at the top level, the SigLIP (NaViT) tower under ``vision_config`` and the Whisper-style
audio encoder under ``audio_config``. The plugin registers this class with vLLM and transformers, so
``trust_remote_code`` is not needed and, when it is on, the hub's ``configuration_megrezo.py`` is not run.
"""

from __future__ import annotations

from transformers import LlamaConfig, PreTrainedConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig


class MegrezOAudioConfig(PreTrainedConfig):
    """Field names as in the vendor's ``AudioEncoder(**audio_config)`` (Qwen-Audio's Whisper encoder)."""

    model_type = "megrezo_audio"
    base_config_key = "audio_config"

    n_mels: int = 128
    n_ctx: int = 1500  # positions after conv2: 30 s of 10 ms frames, halved
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 32
    output_dim: int = 2560
    avg_pool: bool = True
    add_audio_bos_eos_token: bool = True


class MegrezOConfig(LlamaConfig):
    """Megrez-3B-Omni: Megrez-3B-Instruct's Llama plus a vision tower, a resampler and an audio encoder."""

    model_type = "megrezo"
    sub_configs = {"vision_config": Idefics2VisionConfig, "audio_config": MegrezOAudioConfig}  # noqa: RUF012 - transformers reads it as a plain class attribute

    query_num: int = 64  # resampler queries: prompt tokens per image slice
    patch_size: int = 14
    max_slice_nums: int = 9
    scale_resolution: int = 448
    vision_batch_size: int = 8  # slices per vision-tower forward, bounding activation memory
    drop_vision_last_layer: bool = False
    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None

    def __post_init__(self, **kwargs):
        # The vendor's vision_config says model_type "siglip"; its fields are Idefics2VisionConfig's.
        if not isinstance(self.vision_config, PreTrainedConfig):
            fields = {k: v for k, v in (self.vision_config or {}).items() if k != "model_type"}
            self.vision_config = Idefics2VisionConfig(**fields)
        if not isinstance(self.audio_config, PreTrainedConfig):
            fields = {k: v for k, v in (self.audio_config or {}).items() if k != "model_type"}
            self.audio_config = MegrezOAudioConfig(**fields)
        super().__post_init__(**kwargs)
