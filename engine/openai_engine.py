"""A remote OpenAI-compatible server (normally ``vllm serve``), through its *completions* API.

The completions API takes a raw prompt (text or token ids), so the Megrez template and its special
tokens stay ours. vLLM-only request fields used here: ``skip_special_tokens``, ``stop_token_ids``,
``structured_outputs``, ``return_token_ids``, ``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``request_id``; other servers may reject or ignore them.

Tokenizer: loaded locally from ``config.tokenizer`` / ``config.model`` when those files are on this
machine (a folder, or a hub id already in the local cache; never downloaded). Without it,
``tokenizer`` is ``None``, the default stop tokens go as stop *strings*, and :meth:`tokenize` (so
:meth:`count_tokens`) asks the server's ``/tokenize`` endpoint (one HTTP round trip per call).
"""

from __future__ import annotations

import asyncio
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

# Failures that happen before the server has sent anything back, so a retry cannot duplicate output.
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def server_root(base_url: str) -> str:
    """``http://h:8000/v1/`` → ``http://h:8000`` (vLLM serves ``/tokenize`` and ``/health`` at the root)."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


class OpenAIEngine(Engine):
    backend = "openai"

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
            transport=self._transport,
        )
        try:
            served = {m["id"]: m for m in await self.served_models()}
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

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange with retries on connection errors; the response is left unread (streaming)."""
        c = self.config
        request = self.client.build_request(method, path, **kwargs)
        for attempt in range(c.retries + 1):
            try:
                return await self.client.send(request, stream=True)
            except _RETRYABLE as exc:
                if attempt == c.retries:
                    raise EngineUnavailable(
                        f"cannot reach the OpenAI-compatible server at {self.root} "
                        f"({type(exc).__name__}: {exc}; {attempt + 1} attempts)"
                    ) from exc
                delay = c.retry_backoff_s * 2**attempt
                log.warning("%s %s%s failed (%s); retrying in %.1f s", method, self.root, path, exc, delay)
                await asyncio.sleep(delay)
            except httpx.TimeoutException as exc:
                raise EngineUnavailable(f"the server at {self.root} timed out ({type(exc).__name__})") from exc
        raise AssertionError("unreachable")

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        try:
            await response.aread()
        finally:
            await response.aclose()
        if response.is_error:
            raise EngineError(f"{method} {self.root}{path}: HTTP {response.status_code}: {_error_message(response)}")
        return response.json()

    async def served_models(self) -> list[dict[str, Any]]:
        """The server's ``/v1/models`` entries (``id``, and ``max_model_len`` from vLLM)."""
        return list((await self._json("GET", "/v1/models"))["data"])

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
        response = await self._request("POST", "/v1/completions", json=body)
        self._responses[request_id] = response
        try:
            if response.is_error:
                await response.aread()
                await self._raise_for_status(response)
            async for delta in self._parse(response):
                yield delta
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if request_id not in self._aborted:
                raise EngineUnavailable(f"stream from {self.root} broke off: {type(exc).__name__}: {exc}") from exc
            yield Delta(text="", finish_reason="abort")
        finally:
            self._responses.pop(request_id, None)
            self._aborted.discard(request_id)
            await response.aclose()  # closing the connection makes vLLM abort the request

    async def _parse(self, response: httpx.Response) -> AsyncIterator[Delta]:
        """SSE events → deltas. The finishing chunk is held back until the usage chunk that follows it,
        so the last delta carries the cached-token count too."""
        prompt_tokens: int | None = None
        finished: dict[str, Any] | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise EngineError(f"server error: {chunk['error'].get('message', chunk['error'])}")
            usage = chunk.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
            for choice in chunk.get("choices", ()):
                if choice.get("finish_reason") is not None:
                    finished = choice
                    continue
                yield _delta(choice, prompt_tokens, None)
            if not chunk.get("choices") and finished is not None:  # the final usage chunk
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                yield _delta(finished, prompt_tokens, cached)
                finished = None
        if finished is not None:  # a server that sends no usage chunk
            yield _delta(finished, prompt_tokens, None)

    async def _raise_for_status(self, response: httpx.Response) -> None:
        message = _error_message(response)
        if response.status_code == 404 and "model" in message.lower():
            served = [m["id"] for m in await self.served_models()]
            raise ModelNotFound(self._model, served, self.root)
        raise EngineError(f"POST {self.root}/v1/completions: HTTP {response.status_code}: {message}")

    async def abort(self, request_id: str) -> None:
        response = self._responses.get(request_id)
        if response is not None:
            self._aborted.add(request_id)
            await response.aclose()

    async def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is not None:
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        result = await self._json(
            "POST", "/tokenize", json={"model": self._model, "prompt": text, "add_special_tokens": False}
        )
        return [int(t) for t in result["tokens"]]

    async def health(self) -> Health:
        try:
            response = await self._request("GET", "/health")
            await response.aclose()
        except EngineError as exc:
            return Health(ok=False, backend=self.backend, model=self._model, detail=str(exc))
        ok = response.status_code == 200
        return Health(
            ok=ok, backend=self.backend, model=self._model, detail="" if ok else f"HTTP {response.status_code}"
        )


def _delta(choice: dict[str, Any], prompt_tokens: int | None, cached: int | None) -> Delta:
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
        num_cached_tokens=cached,
        logprobs=logprobs,
    )


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return response.text[:500]
