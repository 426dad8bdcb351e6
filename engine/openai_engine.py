"""A remote OpenAI-compatible server (normally ``vllm serve``), through its *completions* API.

The completions API takes a raw prompt (text or token ids), so the Megrez template and its special
tokens stay ours. vLLM-only request fields used here: ``skip_special_tokens``, ``stop_token_ids``,
``structured_outputs``, ``return_token_ids``, ``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``request_id``; other servers may reject or ignore them.

Tokenizer: loaded locally from ``config.tokenizer`` / ``config.model`` when those files are on this
machine (a folder, or a hub id already in the local cache; never downloaded). Without it,
``tokenizer`` is ``None``, the default stop tokens go as stop *strings*, and :meth:`tokenize` (so
:meth:`count_tokens`) asks the server's ``/tokenize`` endpoint (one HTTP round trip per call).

Failures: every transport failure (refused, reset, a peer that closed mid-body, a timeout) and a
502/503/504 from a proxy in front of the server is :class:`EngineUnavailable`, never a raw httpx
exception. It is retried (``retries``, backoff from ``retry_backoff_s`` doubling) while nothing was
generated yet: the request could not be sent, or the stream broke off before its first delta was
yielded. Once a delta went out a retry would repeat it, so the stream fails instead. Messages name
the server and what happened, also for httpx's timeouts, whose own text is empty ("no data from
http://… for 120 s (ReadTimeout)"). :meth:`health` is one quick attempt (``connect_timeout_s`` for
every phase), for a periodic probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from engine.base import (
    Delta,
    Engine,
    EngineError,
    EngineUnavailable,
    Health,
    ModelNotFound,
    MultiModalData,
    Prompt,
    Sampling,
    TokenizerLike,
    stop_markers,
)
from engine.config import EngineConfig

log = logging.getLogger(__name__)

# A proxy in front of the server answers these while the server is down or restarting.
_UNAVAILABLE_STATUS = frozenset({502, 503, 504})
# httpx's timeouts carry no text: what each one means, with the timeout it ran out of.
_TIMEOUTS: dict[type[httpx.TimeoutException], tuple[str, str]] = {
    httpx.ConnectTimeout: ("connect", "no connection to {root} within {s:g} s"),
    httpx.ReadTimeout: ("read", "no data from {root} for {s:g} s"),
    httpx.WriteTimeout: ("write", "could not send to {root} within {s:g} s"),
    httpx.PoolTimeout: ("pool", "no free connection to {root} within {s:g} s"),
}


class _Unavailable(Exception):
    """One attempt failed in a way another attempt may not (a transport failure, a 502/503/504)."""


def describe_transport_error(exc: httpx.TransportError, root: str) -> str:
    """What went wrong, for the operator: never empty (httpx timeouts have no message of their own)."""
    name = type(exc).__name__
    for kind, (phase, text) in _TIMEOUTS.items():
        if isinstance(exc, kind):
            try:
                seconds = exc.request.extensions["timeout"][phase]
            except (RuntimeError, KeyError, TypeError):  # no request attached: say what we know
                return f"{text.split(' {s')[0].format(root=root)} ({name})"
            return f"{text.format(root=root, s=seconds)} ({name})"
    return f"{root}: {str(exc) or 'the connection failed'} ({name})"


def server_root(base_url: str) -> str:
    """``http://h:8000/v1/`` → ``http://h:8000`` (vLLM serves ``/tokenize`` and ``/health`` at the root)."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


class OpenAIEngine(Engine):
    """A remote completions server.

    Example::

        async with OpenAIEngine(EngineConfig(backend="openai", openai_base_url="http://gpu:8000")) as engine:
            async for delta in engine.stream(prompt, Sampling(max_tokens=64), request_id="r1"):
                print(delta.text, end="")
    """

    backend = "openai"
    start_retryable = True  # the server may simply not be up yet

    def __init__(self, config: EngineConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.root = server_root(config.openai_base_url)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._model = config.openai_model or ""
        self._max_model_len = config.max_model_len or 0
        self._tokenizer: TokenizerLike | None = None
        self._stop_ids: tuple[int, ...] = ()
        self._stop_strings: tuple[str, ...] = ()
        self._responses: dict[str, httpx.Response] = {}
        self._streaming: set[str] = set()
        self._aborted: set[str] = set()

    @property
    def model(self) -> str:
        return self._model

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def tokenizer(self) -> TokenizerLike | None:
        return self._tokenizer

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineUnavailable(f"the OpenAI engine for {self.root} is not started")
        return self._client

    async def start(self) -> None:
        """Connect, check the model is served (or pick the served one) and load the tokenizer."""
        if self._client is not None:
            return
        c = self.config
        headers = {"Authorization": f"Bearer {c.openai_api_key}"} if c.openai_api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.root,
            headers=headers,
            timeout=httpx.Timeout(c.request_timeout_s, connect=c.connect_timeout_s),
            # One connection per streaming request: httpx's default cap of 100 would queue the 101st concurrent
            # turn behind the others (and fail it after the timeout), far below what one GPU serves at once.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
            transport=self._transport,
        )
        try:
            # A quick exchange: a black hole at the server's address fails the start in seconds, not minutes.
            served = {m["id"]: m for m in await self.served_models(timeout=c.connect_timeout_s)}
            if not self._model and served:
                self._model = next(iter(served))
            if self._model not in served:
                raise ModelNotFound(self._model or "(any)", list(served), self.root)
            # The server's limit wins; the configured one only caps it.
            limits = (served[self._model].get("max_model_len"), c.max_model_len)
            self._max_model_len = min(filter(None, limits), default=0)
            self._tokenizer = await asyncio.to_thread(self._load_local_tokenizer)
        except BaseException:
            await self.shutdown()
            raise
        self._stop_ids, self._stop_strings = stop_markers(self._tokenizer)

    def _load_local_tokenizer(self) -> TokenizerLike | None:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(
                self.config.tokenizer or self.config.model, revision=self.config.revision, local_files_only=True
            )
        except (ImportError, OSError, ValueError) as exc:
            log.info(
                "no local tokenizer for %s (%s); counting tokens with %s/tokenize", self.config.model, exc, self.root
            )
            return None

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One attempt; the response is left unread (streaming). Raises :class:`_Unavailable` for what a
        retry may fix."""
        try:
            response = await self.client.send(self.client.build_request(method, path, **kwargs), stream=True)
        except httpx.TransportError as exc:
            raise _Unavailable(describe_transport_error(exc, self.root)) from exc
        if response.status_code in _UNAVAILABLE_STATUS:
            await self._read(response)
            raise _Unavailable(f"{method} {self.root}{path}: HTTP {response.status_code}: {_error_message(response)}")
        return response

    async def _read(self, response: httpx.Response) -> None:
        try:
            await response.aread()
        except httpx.TransportError as exc:
            raise _Unavailable(f"reading the answer broke off: {describe_transport_error(exc, self.root)}") from exc
        finally:
            await response.aclose()

    async def _wait_before_retry(self, attempt: int, what: str, failure: _Unavailable) -> None:
        """Back off before attempt ``attempt + 1``; after the last attempt, raise :class:`EngineUnavailable`."""
        c = self.config
        if attempt > c.retries:
            attempts = f"{attempt} attempt{'s' if attempt > 1 else ''}"
            raise EngineUnavailable(f"cannot reach the model server: {failure} ({what}, {attempts})") from failure
        delay = c.retry_backoff_s * 2 ** (attempt - 1)
        log.warning("%s failed (%s); retrying in %.2f s", what, failure, delay)
        await asyncio.sleep(delay)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """A small JSON exchange (models, tokenize), retried on transport failures: it generates nothing."""
        for attempt in itertools.count(1):
            try:
                response = await self._send(method, path, **kwargs)
                await self._read(response)
                break
            except _Unavailable as failure:
                await self._wait_before_retry(attempt, f"{method} {path}", failure)
        if response.is_error:
            raise EngineError(f"{method} {self.root}{path}: HTTP {response.status_code}: {_error_message(response)}")
        try:
            return response.json()
        except ValueError as exc:
            raise EngineError(f"{method} {self.root}{path}: the answer is not JSON ({exc})") from exc

    async def served_models(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The server's ``/v1/models`` entries (``id``, and ``max_model_len`` from vLLM); ``timeout``: seconds for
        each phase of the exchange, if not the configured ones."""
        extra = {} if timeout is None else {"timeout": timeout}
        return list((await self._json("GET", "/v1/models", **extra))["data"])

    def request_body(self, prompt: Prompt, sampling: Sampling, request_id: str) -> dict[str, Any]:
        """The completions request for our :class:`Sampling` (vLLM's extra fields included)."""
        s = sampling
        body: dict[str, Any] = {
            "model": self._model,
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "return_token_ids": True,
            "request_id": request_id,
            "max_tokens": s.max_tokens,
            "min_tokens": s.min_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repetition_penalty": s.repetition_penalty,
            "seed": s.seed,
            "stop": list(dict.fromkeys((*self._stop_strings, *s.stop))),
            "stop_token_ids": list(dict.fromkeys((*self._stop_ids, *s.stop_token_ids))),
            "include_stop_str_in_output": s.include_stop_str_in_output,
            # The function-call markers are special tokens; the parser needs to see them in the text.
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "add_special_tokens": False,
        }
        if s.regex is not None:
            body["structured_outputs"] = {"regex": s.regex}
        if s.logprobs:
            body["logprobs"] = 0
        if s.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}
        return body

    async def stream(
        self,
        prompt: Prompt,
        sampling: Sampling,
        *,
        request_id: str,
        multimodal: MultiModalData | None = None,
    ) -> AsyncIterator[Delta]:
        if multimodal:
            raise EngineError("the OpenAI completions API takes no images or audio; use the vllm backend")
        body = self.request_body(prompt, sampling, request_id)
        self._streaming.add(request_id)
        try:
            for attempt in itertools.count(1):
                if request_id in self._aborted:  # aborted while waiting to retry
                    yield Delta(text="", finish_reason="abort")
                    return
                yielded = False
                try:
                    async with contextlib.aclosing(self._stream_once(body, request_id)) as deltas:
                        async for delta in deltas:
                            yielded = True
                            yield delta
                    return
                except _Unavailable as failure:
                    if yielded:  # output went out already: a retry would repeat it
                        raise EngineUnavailable(f"the stream from the model server broke off: {failure}") from failure
                    await self._wait_before_retry(attempt, "POST /v1/completions", failure)
        finally:
            self._streaming.discard(request_id)
            self._aborted.discard(request_id)

    async def _stream_once(self, body: dict[str, Any], request_id: str) -> AsyncIterator[Delta]:
        response = await self._send("POST", "/v1/completions", json=body)
        self._responses[request_id] = response
        try:
            if request_id in self._aborted:  # aborted while the request was being sent
                yield Delta(text="", finish_reason="abort")
                return
            if response.is_error:
                await response.aread()
                await self._raise_for_status(response)
            async for delta in self._parse(response):
                yield delta
        except (httpx.TransportError, httpx.StreamError) as exc:
            if request_id in self._aborted:  # abort() closed the response under us
                yield Delta(text="", finish_reason="abort")
                return
            if isinstance(exc, httpx.StreamError):
                raise EngineUnavailable(f"the stream from {self.root} was closed ({type(exc).__name__})") from exc
            raise _Unavailable(describe_transport_error(exc, self.root)) from exc
        finally:
            self._responses.pop(request_id, None)
            await response.aclose()  # closing the connection makes vLLM abort the request

    async def _parse(self, response: httpx.Response) -> AsyncIterator[Delta]:
        """SSE events → deltas. The finishing chunk is held back until the usage chunk that follows it,
        so the last delta carries the cached-token count and the final completion-token count too."""
        prompt_tokens: int | None = None
        completion_tokens: int | None = None  # the server's count: what a server without token ids still reports
        finished: dict[str, Any] | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise EngineError(f"the model server at {self.root} sent a malformed event ({exc})") from exc
            if "error" in chunk:
                raise EngineError(f"server error: {chunk['error'].get('message', chunk['error'])}")
            usage = chunk.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
            completion_tokens = usage.get("completion_tokens", completion_tokens)
            for choice in chunk.get("choices", ()):
                if choice.get("finish_reason") is not None:
                    finished = choice
                    continue
                yield _delta(choice, prompt_tokens, completion_tokens, None)
            if not chunk.get("choices") and finished is not None:  # the final usage chunk
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                yield _delta(finished, prompt_tokens, completion_tokens, cached)
                finished = None
        if finished is not None:  # a server that sends no usage chunk
            yield _delta(finished, prompt_tokens, completion_tokens, None)

    async def _raise_for_status(self, response: httpx.Response) -> None:
        message = _error_message(response)
        if response.status_code == 404 and "model" in message.lower():
            served = [m["id"] for m in await self.served_models()]
            raise ModelNotFound(self._model, served, self.root)
        raise EngineError(f"POST {self.root}/v1/completions: HTTP {response.status_code}: {message}")

    async def abort(self, request_id: str) -> None:
        if request_id not in self._streaming:
            return
        self._aborted.add(request_id)
        response = self._responses.get(request_id)
        if response is not None:
            await response.aclose()

    async def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is not None:
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        result = await self._json(
            "POST", "/tokenize", json={"model": self._model, "prompt": text, "add_special_tokens": False}
        )
        return [int(t) for t in result["tokens"]]

    async def health(self) -> Health:
        """One ``GET /health`` bounded by ``connect_timeout_s`` (no retries: a probe runs again soon)."""

        def down(detail: str) -> Health:
            return Health(ok=False, backend=self.backend, model=self._model, detail=detail)

        if self._client is None:
            return down("not started")
        try:
            response = await self._client.get("/health", timeout=self.config.connect_timeout_s)
        except httpx.TransportError as exc:
            return down(describe_transport_error(exc, self.root))
        if response.status_code != 200:
            return down(f"GET {self.root}/health: HTTP {response.status_code}")
        return Health(ok=True, backend=self.backend, model=self._model)


def _delta(
    choice: dict[str, Any], prompt_tokens: int | None, completion_tokens: int | None, cached: int | None
) -> Delta:
    token_ids = tuple(choice.get("token_ids") or ())
    logprobs = None
    if choice.get("logprobs"):
        logprobs = tuple(choice["logprobs"]["token_logprobs"])
    return Delta(
        text=choice.get("text", ""),
        token_ids=token_ids,
        finish_reason=choice.get("finish_reason"),
        stop_reason=choice.get("stop_reason"),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        num_cached_tokens=cached,
        logprobs=logprobs,
    )


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return response.text[:500]
