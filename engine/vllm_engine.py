"""vLLM embedded in this process (``AsyncLLM``), streaming deltas.

Before vLLM starts, :func:`check_weights` makes sure the weights can be had: a local folder, a copy in
the Hugging Face cache, or a hub that answers (one request, bounded). A machine without any of them —
the first ``make run`` offline — gets :class:`WeightsMissing` in well under a second, with the two ways
forward, instead of vLLM's retries against an unreachable hub (≈23 s) and two tracebacks.

vLLM runs its EngineCore (and, on CPU, a worker) in *spawned* processes, so every program that
starts this engine needs its entry point under ``if __name__ == "__main__":``. The spawned worker
imports that ``__main__`` module again and then scans every loaded module; llvmlite (numba, which
bm25s imports) breaks the scan, so the entry module must import the search backends lazily
(``api/cli.py`` does, and a test keeps it so).

Several API processes can share one engine core (``megrez-search serve --workers N``, ``api/workers.py``):
the serving process starts the core with vLLM's multi-frontend machinery, and each frontend builds its
engine as ``VLLMEngine(config, frontend=client_config)`` — an ``AsyncLLM`` connected to that core
(:func:`connect_frontend`) instead of one starting its own. Both are built from :func:`engine_args`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from engine.base import (
    MEDIA_KINDS,
    Delta,
    Engine,
    EngineError,
    EngineUnavailable,
    Health,
    MultiModalData,
    Prompt,
    Sampling,
    TokenizerLike,
    stop_markers,
)
from engine.config import EngineConfig

if TYPE_CHECKING:
    from fastapi import FastAPI
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.outputs import CompletionOutput
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 5.0  # the hub answers in well under a second where it can be reached at all
WAYS_FORWARD = (
    "point MEGREZ_ENGINE__MODEL at a folder with the weights (MEGREZ_ENGINE__MODEL=/path/to/weights), or use a "
    "remote engine (MEGREZ_ENGINE__BACKEND=openai MEGREZ_ENGINE__OPENAI_BASE_URL=http://gpu-host:8000)"
)


class WeightsMissing(EngineError):
    """The model's weights are not on this machine and cannot be downloaded: configuration to fix, so the
    message says how (one line, for the log and ``/readyz``); ``model`` is the configured name."""

    def __init__(self, model: str, why: str) -> None:
        super().__init__(f"the model {model} cannot be loaded: {why}; {WAYS_FORWARD}")
        self.model = model


def check_weights(model: str, revision: str | None = None) -> None:
    """Return if vLLM can find ``model``'s weights: a local folder, a snapshot in the Hugging Face cache, or a
    hub that answers within :data:`HUB_PROBE_TIMEOUT_S` (vLLM then downloads them); raise
    :class:`WeightsMissing` otherwise. ``revision``: the hub revision the engine will load. With
    ``VLLM_USE_MODELSCOPE`` vLLM fetches from ModelScope instead, whose cache this does not know: no check."""
    modelscope = os.environ.get("VLLM_USE_MODELSCOPE", "").strip().lower() in ("1", "true")  # as vllm.envs reads it
    if modelscope or Path(model).expanduser().is_dir():
        return
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot_download(model, revision=revision, local_files_only=True)
        return
    except HFValidationError:
        raise WeightsMissing(model, "it is neither a folder on this machine nor a Hugging Face hub id") from None
    except LocalEntryNotFoundError:
        pass
    where = "it is not a folder on this machine nor in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise WeightsMissing(model, f"{where}, and HF_HUB_OFFLINE forbids downloading it")
    try:
        # Any answer will do: vLLM's own download then says what is wrong (a private or misspelt model).
        httpx.head(f"{constants.ENDPOINT}/api/models/{model}", timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        why = f"{where}, and the hub ({constants.ENDPOINT}) cannot be reached ({type(exc).__name__}: {exc})"
        raise WeightsMissing(model, why) from None


def engine_args(config: EngineConfig) -> AsyncEngineArgs:
    """vLLM's engine arguments for ``config``: what an engine core is started from and a frontend connects with.

    Building them loads vLLM's general plugins (our Megrez-3B-Omni registration) in the calling process.
    """
    from vllm import AsyncEngineArgs

    c = config
    return AsyncEngineArgs(
        model=c.model,
        tokenizer=c.tokenizer,
        revision=c.revision,
        tokenizer_revision=c.revision,
        dtype=c.dtype,
        max_model_len=c.max_model_len,
        gpu_memory_utilization=c.gpu_memory_utilization,
        enable_prefix_caching=c.enable_prefix_caching,
        load_format=c.load_format,
        hf_overrides=dict(c.hf_overrides),
        trust_remote_code=c.trust_remote_code,
        enforce_eager=c.enforce_eager,
        **({"limit_mm_per_prompt": c.limit_mm_per_prompt} if c.limit_mm_per_prompt else {}),
    )


def connect_frontend(args: AsyncEngineArgs, client_config: Mapping[str, Any]) -> AsyncLLM:
    """An ``AsyncLLM`` that joins a running engine core as one of its frontends, as each API process of
    ``vllm serve --api-server-count N`` does (``vllm/entrypoints/launchers/api_server/entry.py``); blocks
    until the core is up.

    :param args: the engine arguments the core was started from (:func:`engine_args`).
    :param client_config: what vLLM's ``APIServerProcessManager`` hands each frontend process: the core's
        ZMQ addresses and this frontend's listeners, ``client_count`` and ``client_index``.
    """
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    addresses = dict(client_config)
    count, index = addresses.pop("client_count"), addresses.pop("client_index")
    # The shared array behind vLLM's own accept balancing on one shared socket; our workers listen on
    # sockets of their own (api/workers.py), so it has no reader here.
    addresses.pop("api_server_loads", None)
    args._api_process_count, args._api_process_rank = count, index
    return AsyncLLM.from_vllm_config(
        args.create_engine_config(UsageContext.ENGINE_CONTEXT),
        enable_log_requests=args.enable_log_requests,
        disable_log_stats=args.disable_log_stats,
        client_addresses=addresses,
        client_count=count,
        client_index=index,
    )


class VLLMEngine(Engine):
    """vLLM's ``AsyncLLM`` behind our :class:`Engine` interface.

    Example::

        async with VLLMEngine(EngineConfig(model="/models/megrez")) as engine:
            async for delta in engine.stream("Hello", Sampling(max_tokens=16), request_id="r1"):
                print(delta.text, end="")

    :param config: the engine settings.
    :param frontend: a frontend's ``client_config`` from vLLM's ``APIServerProcessManager``: the engine
        joins that running engine core (:func:`connect_frontend`) instead of starting one in this process.
    """

    backend = "vllm"

    def __init__(self, config: EngineConfig, *, frontend: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self._frontend = frontend
        self._llm: AsyncLLM | None = None
        self._stop_ids: tuple[int, ...] = ()
        self._stop_strings: tuple[str, ...] = ()

    @property
    def llm(self) -> AsyncLLM:
        """The underlying ``AsyncLLM`` (e.g. to mount vLLM's own OpenAI app next to ours)."""
        if self._llm is None:
            raise EngineUnavailable("the vLLM engine is not started")
        return self._llm

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def max_model_len(self) -> int:
        return self.llm.model_config.max_model_len

    @property
    def tokenizer(self) -> TokenizerLike:
        return self.llm.get_tokenizer()

    @property
    def media(self) -> frozenset[str]:
        # vLLM knows from the model class (Megrez-3B-Omni through our plugin); the Omni model takes both kinds.
        return MEDIA_KINDS if self._llm is not None and self._llm.model_config.is_multimodal_model else frozenset()

    async def start(self) -> None:
        """Check the weights can be had (:func:`check_weights`), then load the model; raises
        :class:`WeightsMissing` at once when they cannot, vLLM's errors otherwise."""
        if self._llm is not None:
            return
        c = self.config
        await asyncio.to_thread(check_weights, c.model, c.revision)  # the cache lookup reads the disk
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(c)
        # Starting the engine processes and loading weights takes ≈30 s on CPU (minutes for a big model on
        # GPU) and blocks — so does a frontend's wait for a shared core that is still loading: it runs in a
        # thread, so the caller's event loop keeps serving (/healthz) meanwhile. AsyncLLM binds to the
        # running loop only on its first request, so building it off-loop is safe.
        if self._frontend is None:
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        else:
            self._llm = await asyncio.to_thread(connect_frontend, args, self._frontend)
        self._stop_ids, self._stop_strings = stop_markers(self._llm.get_tokenizer())
        log.info("vLLM engine ready: %s (stop ids %s, stop strings %s)", c.model, self._stop_ids, self._stop_strings)

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()

    def sampling_params(self, sampling: Sampling) -> SamplingParams:
        """Our :class:`Sampling` as vLLM ``SamplingParams`` (delta output, special tokens visible)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        s = sampling
        return SamplingParams(
            max_tokens=s.max_tokens,
            min_tokens=s.min_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            seed=s.seed,
            stop=list(dict.fromkeys((*self._stop_strings, *s.stop))),
            stop_token_ids=list(dict.fromkeys((*self._stop_ids, *s.stop_token_ids))),
            include_stop_str_in_output=s.include_stop_str_in_output,
            logprobs=0 if s.logprobs else None,
            logit_bias=dict(s.logit_bias) or None,
            # The function-call markers are special tokens; the parser needs to see them in the text.
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            structured_outputs=StructuredOutputsParams(regex=s.regex) if s.regex else None,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _engine_input(self, prompt: Prompt, multimodal: MultiModalData | None) -> Any:
        """Render the prompt through vLLM's renderer (the non-deprecated input path)."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        llm = self.llm
        prompt_dict: dict[str, Any] = (
            {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        )
        if multimodal:
            prompt_dict["multi_modal_data"] = dict(multimodal)
        renderer = llm.renderer
        # Megrez has no BOS: text prompts must tokenize exactly as the same prompt given as ids.
        params = renderer.default_cmpl_tok_params.with_kwargs(add_special_tokens=False)
        (engine_input,) = await renderer.render_cmpl_async([parse_model_prompt(llm.model_config, prompt_dict)], params)
        return engine_input

    async def stream(
        self,
        prompt: Prompt,
        sampling: Sampling,
        *,
        request_id: str,
        multimodal: MultiModalData | None = None,
    ) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self.llm
        params = self.sampling_params(sampling)
        try:
            engine_input = await self._engine_input(prompt, multimodal)
        except (ValueError, VLLMClientError) as exc:  # too long, out-of-vocabulary ids, bad multimodal data
            raise EngineError(f"invalid prompt: {exc}") from exc
        # aclosing: when our consumer stops early, vLLM's generator is closed right away, which aborts
        # the request in the engine (rather than whenever it is garbage-collected).
        try:
            async with contextlib.aclosing(llm.generate(engine_input, params, request_id)) as outputs:
                async for out in outputs:
                    yield _delta(out.outputs[0], len(out.prompt_token_ids or ()), out.num_cached_tokens)
        except EngineDeadError as exc:
            raise EngineUnavailable(f"the vLLM engine died: {exc}") from exc
        except VLLMClientError as exc:  # validation in the engine: prompt plus max_tokens too long, …
            raise EngineError(f"invalid request: {exc}") from exc

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def health(self) -> Health:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None:
            return Health(ok=False, backend=self.backend, model=self.model, detail="not started")
        try:
            await self._llm.check_health()
        except EngineDeadError as exc:
            return Health(ok=False, backend=self.backend, model=self.model, detail=f"engine dead: {exc}")
        return Health(
            ok=True,
            backend=self.backend,
            model=self.model,
            unfinished_requests=self._llm.get_num_unfinished_requests(),
        )

    async def openai_app(self, served_model_name: str, extra_args: Sequence[str] = ()) -> FastAPI:
        """vLLM's own OpenAI-compatible app, served by *this* engine (no second model load).

        Mount it (``app.mount("/vllm", ...)``) or serve it with uvicorn on the same event loop.
        Uses vLLM 0.32 internals (the import paths move in 0.33).
        """
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        llm = self.llm
        argv = ["--model", self.config.model, "--served-model-name", served_model_name, *extra_args]
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        tasks = await llm.get_supported_tasks()
        app = build_app(args, tasks, llm.model_config)
        await init_app_state(llm, app.state, args, tasks)
        return app


def _delta(c: CompletionOutput, prompt_tokens: int, num_cached_tokens: int | None) -> Delta:
    token_ids = tuple(c.token_ids)
    logprobs = None
    if c.logprobs is not None:
        logprobs = tuple(position[tid].logprob for tid, position in zip(token_ids, c.logprobs, strict=True))
    return Delta(
        text=c.text,
        token_ids=token_ids,
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
        prompt_tokens=prompt_tokens or None,
        num_cached_tokens=num_cached_tokens,
        logprobs=logprobs,
    )
