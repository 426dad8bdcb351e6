"""Tiny model checkpoints, built on the fly (no downloaded weights), for tests and benchmarks.

- :func:`build_tiny_llama`: a random 2-layer Llama (hidden 128, 2 heads, 1 KV head → head_dim 64, which
  vLLM's CPU attention supports) saved as float32 safetensors next to the tiny Megrez tokenizer.
- :func:`build_megrez_shape`: Megrez-3B-Instruct's real config (vocabulary, heads, rope) with only
  2 layers and no weights: load it with ``load_format="dummy"``. Its tokenizer keeps the real ids of
  the Megrez special tokens (``<|eos|>`` = 120000 … ``<|turn_end|>`` = 120005).
- :func:`tiny_engine_config`, :func:`serve_in_process`: engine settings for these models on a CPU,
  and an app served on the current event loop.

Importing this module changes no environment variable: the tests keep themselves off the hub
(``tests/conftest.py``), while a benchmark given a hub id must be able to download it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from scripts.megrez_tokenizer import MEGREZ_SPECIAL_TOKENS, build_megrez_tokenizer
from scripts.net import free_port

if TYPE_CHECKING:
    from fastapi import FastAPI
    from transformers import LlamaConfig

SEED = 1234

# Megrez-3B-Instruct's config.json (HF Infinigence/Megrez-3B-Instruct), except num_hidden_layers (32).
MEGREZ_3B_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 2560,
    "intermediate_size": 7168,
    "num_attention_heads": 40,
    "num_key_value_heads": 10,
    "vocab_size": 122880,
    "rope_theta": 5_000_000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}
# The real ids of the Megrez special tokens; the remaining special tokens follow them.
MEGREZ_SPECIAL_IDS: dict[str, int] = {
    "<|eos|>": 120000,
    "<|unk|>": 120001,
    "<|pad|>": 120002,
    "<|role_start|>": 120003,
    "<|role_end|>": 120004,
    "<|turn_end|>": 120005,
}


def _llama_config(tokenizer_dir: Path, **fields: object) -> LlamaConfig:
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return LlamaConfig(
        bos_token_id=None,  # Megrez prompts have no BOS
        eos_token_id=tok.convert_tokens_to_ids("<|turn_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|pad|>"),
        torch_dtype="float32",
        **fields,
    )


def build_tiny_llama(path: Path) -> Path:
    """A seeded random tiny Llama with the tiny Megrez tokenizer in ``path``; returns ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    tok = build_megrez_tokenizer(path)
    config = _llama_config(
        path,
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_theta=5_000_000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


def renumber_special_tokens(path: Path) -> None:
    """Move the special tokens of the saved tiny tokenizer to Megrez's real ids (120000 and up).

    The byte-level BPE merges refer to tokens by string, so only the vocabulary entries and the
    added-token records change; the freed low ids stay unused.
    """
    new_ids = dict(MEGREZ_SPECIAL_IDS)
    for token in MEGREZ_SPECIAL_TOKENS:
        new_ids.setdefault(token, max(new_ids.values()) + 1)
    tokenizer_json = path / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    for token, new_id in new_ids.items():
        vocab[token] = new_id
    for added in data["added_tokens"]:
        added["id"] = new_ids[added["content"]]
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def build_megrez_shape(path: Path, num_hidden_layers: int = 2) -> Path:
    """Megrez-3B-Instruct's config (``num_hidden_layers`` layers) and tokenizer ids, no weights."""
    build_megrez_tokenizer(path)
    renumber_special_tokens(path)
    _llama_config(path, num_hidden_layers=num_hidden_layers, **MEGREZ_3B_CONFIG).save_pretrained(path)
    return path


def tiny_engine_config(model_dir: Path, **overrides: object) -> EngineConfig:
    """Engine settings for tests on this CPU: fp32 (no native bf16 on AVX2), eager (starts ≈3× faster)."""
    fields: dict[str, object] = {
        "model": str(model_dir),
        "dtype": "float32",
        "max_model_len": 2048,
        "enforce_eager": True,
    }
    return EngineConfig(**(fields | overrides))


@contextlib.asynccontextmanager
async def serve_in_process(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 as a task of the *current* event loop; yields its base URL.

    Same loop on purpose: vLLM's ``AsyncLLM`` delivers outputs through asyncio objects of the loop it
    runs on, so its OpenAI app cannot be served from another thread's loop.
    """
    import uvicorn

    class Server(uvicorn.Server):
        # Leave SIGINT/SIGTERM to the host program (pytest, the benchmark).
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    port = free_port()
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
