"""Pytest plugin (loaded by ``tests/conftest.py``): the session's one embedded vLLM engine on the tiny
Llama, :func:`tiny_engine`. Starting vLLM costs ≈30 s, so every test shares it.

The checkpoint builders live in ``scripts/tiny_models.py``, shared with the benchmarks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from scripts.tiny_models import build_tiny_llama, tiny_engine_config

if TYPE_CHECKING:
    from engine.vllm_engine import VLLMEngine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tiny_engine(tiny_model_dir: Path) -> AsyncIterator[VLLMEngine]:
    """The session's embedded vLLM engine on the tiny Llama."""
    from engine.vllm_engine import VLLMEngine

    async with VLLMEngine(tiny_engine_config(tiny_model_dir)) as engine:
        yield engine
