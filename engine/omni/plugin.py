"""vLLM plugin entry point (``vllm.general_plugins`` in pyproject.toml): makes MegrezO loadable.

vLLM runs general plugins in the frontend, the engine core and every spawned worker, so this is the only
registration that all of them see; it must stay cheap and idempotent.
"""

from __future__ import annotations

ARCHITECTURE = "MegrezO"  # ``architectures`` in the checkpoint's config.json
MODEL_TYPE = "megrezo"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from engine.omni.config import MegrezOConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The path form defers importing torch modules until a MegrezO model is actually built.
        ModelRegistry.register_model(ARCHITECTURE, "engine.omni.model:MegrezOForCausalLM")
    # vLLM consults its registry before the checkpoint's auto_map, so our config class is used whether
    # trust_remote_code is on or off (private name; tests/test_omni_engine.py guards it).
    _CONFIG_REGISTRY[MODEL_TYPE] = MegrezOConfig
    AutoConfig.register(MODEL_TYPE, MegrezOConfig, exist_ok=True)
