"""Engine settings section (composed into ``api.settings.Settings`` as ``settings.engine``).

Environment: ``MEGREZ_ENGINE__BACKEND=openai``, ``MEGREZ_ENGINE__MODEL=/models/megrez``,
``MEGREZ_ENGINE__HF_OVERRIDES='{"num_hidden_layers": 2}'`` (dicts as JSON), etc.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class EngineConfig(BaseModel):
    backend: Literal["vllm", "openai"] = Field(
        default="vllm",
        description="'vllm': run vLLM inside this process; 'openai': call a remote OpenAI-compatible server "
        "(e.g. `vllm serve`) through its completions API.",
    )
    model: str = Field(
        default="Infinigence/Megrez-3B-Instruct",
        description="Local checkpoint folder or Hugging Face hub id (vllm backend; the openai backend loads "
        "its tokenizer from here when it can).",
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer folder or hub id, if not the model's.")
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of model and tokenizer."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights and activations; use float32 on CPUs without native bf16 (AVX2)."
    )
    max_model_len: int | None = Field(
        default=4096, ge=128, description="Prompt plus answer tokens per request; unset = the model's maximum."
    )
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="Share of GPU memory vLLM may use (weights + KV cache)."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse the KV cache of shared prompt prefixes (multi-turn, retries)."
    )
    limit_mm_per_prompt: dict[str, int] = Field(
        default={}, description='Most items per prompt by modality, e.g. {"image": 2, "audio": 1} for Omni.'
    )
    load_format: str = Field(
        default="auto", description="vLLM load format; 'dummy' = random weights from config.json (tests, benchmarks)."
    )
    hf_overrides: dict[str, Any] = Field(
        default={}, description='Overrides of the model\'s config.json, e.g. {"num_hidden_layers": 2}.'
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip torch.compile and CUDA graphs: starts much faster (CPU tests), decodes slower on GPU.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the checkpoint's own Python code (not needed for Omni: our plugin has its config).",
    )
    openai_base_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Root of the OpenAI-compatible server; a trailing /v1 is accepted.",
    )
    openai_api_key: str | None = Field(default=None, description="Bearer token for the server, if it needs one.")
    openai_model: str | None = Field(
        default=None, description="Served model name; unset = the server's only (or first) model."
    )
    connect_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Connecting to the server; also each phase of the quick exchanges (the model list at "
        "start, health probes).",
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest wait for the server's next bytes (first token included)."
    )
    retries: int = Field(
        default=2,
        ge=0,
        description="Extra attempts on transport errors (refused, reset, timed out) and HTTP 502/503/504, "
        "only while nothing was generated yet (a retry then cannot duplicate output).",
    )
    retry_backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles each attempt.")
    health_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the running engine's health is probed; /readyz, /chat and /v1 answer 503 "
        "while the last probe failed.",
    )
    start_retry_max_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait between attempts to start a remote engine (retried forever, from "
        "retry_backoff_s doubling); the embedded vLLM engine is not retried.",
    )
