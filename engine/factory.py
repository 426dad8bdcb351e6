"""Build the configured engine (not started: ``await engine.start()`` or ``async with``)."""

from __future__ import annotations

from engine.base import Engine
from engine.config import EngineConfig


def build_engine(config: EngineConfig) -> Engine:
    # Imported here so that the openai backend never imports vLLM (slow, and absent from lean installs).
    if config.backend == "vllm":
        from engine.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    from engine.openai_engine import OpenAIEngine

    return OpenAIEngine(config)
