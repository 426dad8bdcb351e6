"""The remote engine against a real vLLM OpenAI server: vLLM's own app, served in-process on
127.0.0.1 by uvicorn on the test event loop and backed by the session's tiny engine (no second load)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from api.app import create_app
from engine.base import Delta, Engine, EngineError, EngineUnavailable, ModelNotFound, Sampling
from engine.config import EngineConfig
from engine.factory import build_engine
from engine.openai_engine import OpenAIEngine, server_root
from engine.parser import FunctionCallEvent, parse_forced_call
from engine.protocol import FORCED_SEARCH_REGEX, Message, PromptEncoder
from engine.vllm_engine import VLLMEngine
from scripts.net import free_port
from scripts.tiny_models import serve_in_process

SERVED = "megrez-tiny"
PROMPT = "<|role_start|>user<|role_end|>The weather today?<|turn_end|><|role_start|>assistant<|role_end|>"
_ids = itertools.count()


def rid() -> str:
    return f"remote-{next(_ids)}"


def remote_config(base_url: str, model_dir: Path | str = "/nonexistent", **overrides: object) -> EngineConfig:
    fields: dict[str, object] = {
        "backend": "openai",
        "model": str(model_dir),
        "openai_base_url": base_url,
        "openai_model": SERVED,
        "retry_backoff_s": 0.01,
    }
    return EngineConfig(**(fields | overrides))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server_url(tiny_engine: VLLMEngine) -> AsyncIterator[str]:
    app = await tiny_engine.openai_app(SERVED, ["--enable-prompt-tokens-details"])
    async with serve_in_process(app) as url:
        yield f"{url}/v1"


@pytest_asyncio.fixture(loop_scope="session")
async def remote(server_url: str, tiny_model_dir: Path) -> AsyncIterator[OpenAIEngine]:
    engine = build_engine(remote_config(server_url, tiny_model_dir))
    assert isinstance(engine, OpenAIEngine)
    async with engine:
        yield engine


async def collect(engine: Engine, prompt: str | list[int], sampling: Sampling) -> list[Delta]:
    return [d async for d in engine.stream(prompt, sampling, request_id=rid())]


async def wait_idle(tiny_engine: VLLMEngine) -> int:
    for _ in range(100):
        if tiny_engine.llm.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    return tiny_engine.llm.get_num_unfinished_requests()


def test_server_root() -> None:
    assert server_root("http://h:8000/v1/") == server_root("http://h:8000") == "http://h:8000"


async def test_stream_matches_the_embedded_engine(remote: OpenAIEngine, tiny_engine: VLLMEngine) -> None:
    sampling = Sampling(max_tokens=12, logprobs=True)
    deltas = await collect(remote, PROMPT, sampling)
    local = await collect(tiny_engine, PROMPT, sampling)
    assert [t for d in deltas for t in d.token_ids] == [t for d in local for t in d.token_ids]
    assert "".join(d.text for d in deltas) == "".join(d.text for d in local)
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].prompt_tokens == await remote.count_tokens(PROMPT)
    assert deltas[-1].num_cached_tokens is not None
    assert sum(len(d.logprobs or ()) for d in deltas) == 12
    assert remote.model == SERVED and remote.max_model_len == 2048


async def test_token_id_prompt_and_stop_token(remote: OpenAIEngine) -> None:
    ids = remote.tokenizer.encode(PROMPT, add_special_tokens=False)
    free = await collect(remote, ids, Sampling(max_tokens=6))
    assert [d.token_ids for d in free] == [d.token_ids for d in await collect(remote, PROMPT, Sampling(max_tokens=6))]
    third = free[2].token_ids[0]
    stopped = await collect(remote, ids, Sampling(max_tokens=6, stop_token_ids=(third,)))
    assert [t for d in stopped for t in d.token_ids] == [t for d in free[:3] for t in d.token_ids]
    assert (stopped[-1].finish_reason, stopped[-1].stop_reason) == ("stop", third)
    # The Megrez stop tokens go by id: a biased <|eos|> ends the turn, and stays out of the text.
    eos = remote.tokenizer.get_vocab()["<|eos|>"]
    biased = await collect(remote, ids, Sampling(max_tokens=20, min_tokens=2, logit_bias={eos: 100}))
    assert (biased[-1].finish_reason, biased[-1].stop_reason) == ("stop", eos)
    assert "<|eos|>" not in "".join(d.text for d in biased)


async def test_forced_search_regex_goes_to_the_server(remote: OpenAIEngine) -> None:
    tok = remote.tokenizer
    prompt = PromptEncoder(tok).encode([Message("user", "北京今天的天气")], force_search=True)
    close = tok.encode('"}}', add_special_tokens=False)[0]  # see test_engine_vllm: closes the query soon
    sampling = Sampling(max_tokens=40, regex=FORCED_SEARCH_REGEX, logit_bias={close: 30})
    deltas = await collect(remote, prompt, sampling)
    call = parse_forced_call("".join(d.text for d in deltas))
    assert isinstance(call, FunctionCallEvent), call
    assert call.arguments["query"]


async def test_abort_from_another_task_ends_the_stream(remote: OpenAIEngine, tiny_engine: VLLMEngine) -> None:
    request_id = rid()
    first = asyncio.Event()
    deltas: list[Delta] = []

    async def consume() -> None:
        async for delta in remote.stream(PROMPT, Sampling(max_tokens=1000, min_tokens=1000), request_id=request_id):
            deltas.append(delta)
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    await remote.abort(request_id)
    await asyncio.wait_for(task, 10)
    assert deltas[-1].finish_reason == "abort"
    assert await wait_idle(tiny_engine) == 0


async def test_cancelling_the_consumer_aborts_on_the_server(remote: OpenAIEngine, tiny_engine: VLLMEngine) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in remote.stream(PROMPT, Sampling(max_tokens=1000, min_tokens=1000), request_id=rid()):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await wait_idle(tiny_engine) == 0


async def test_wrong_model_name_lists_the_served_models(server_url: str) -> None:
    engine = OpenAIEngine(remote_config(server_url, openai_model="Megrez-3B-Omni"))
    with pytest.raises(ModelNotFound, match=SERVED) as info:
        await engine.start()
    assert info.value.served == [SERVED]


async def test_model_gone_after_start_is_reported_with_the_served_models(remote: OpenAIEngine) -> None:
    remote._model = "renamed"  # as if the server restarted with another model
    with pytest.raises(ModelNotFound, match=SERVED):
        await collect(remote, PROMPT, Sampling(max_tokens=2))


async def test_served_model_is_picked_when_none_is_configured(server_url: str, tiny_engine) -> None:
    tiny_model_vocab = tiny_engine.tokenizer.get_vocab()
    async with OpenAIEngine(remote_config(server_url, openai_model=None)) as engine:
        assert engine.model == SERVED
        # No local tokenizer at /nonexistent: counting goes through the server's /tokenize.
        assert engine.tokenizer is None
        assert await engine.count_tokens("The weather today") > 0
        # Special tokens are looked up by text through the server too (the agent bans one by id).
        assert await engine.tokenize("<|function_start|>") == [tiny_model_vocab["<|function_start|>"]]
        assert (await engine.health()).ok


async def test_unreachable_server_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    engine = OpenAIEngine(remote_config(url, retries=1))
    with pytest.raises(EngineUnavailable, match=r"127\.0\.0\.1.*2 attempts"):
        await engine.start()


class FlakyTransport(httpx.AsyncBaseTransport):
    """Refuses the first ``failures`` connections, like a server that is still starting."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_connection_errors_are_retried(server_url: str, tiny_model_dir: Path) -> None:
    transport = FlakyTransport(failures=2)
    async with OpenAIEngine(remote_config(server_url, tiny_model_dir, retries=2), transport=transport) as engine:
        assert transport.attempts == 3  # /v1/models: two refusals, then through
        transport.attempts, transport.failures = 0, 1
        deltas = await collect(engine, PROMPT, Sampling(max_tokens=3))
        assert transport.attempts == 2 and deltas[-1].finish_reason == "length"
        transport.attempts, transport.failures = 0, 5
        with pytest.raises(EngineUnavailable, match="3 attempts"):
            await collect(engine, PROMPT, Sampling(max_tokens=3))


async def test_multimodal_is_refused(remote: OpenAIEngine) -> None:
    with pytest.raises(EngineError, match="no images or audio"):
        async for _ in remote.stream(PROMPT, Sampling(), request_id=rid(), multimodal={"image": []}):
            pass


# --- transport failures, on a mock transport (no server): what is retried, what is said --------------------------


def sse(*texts: str) -> list[bytes]:
    """vLLM's completion chunks for ``texts`` (the last one finishes), the usage chunk and [DONE]."""
    chunks = []
    for i, text in enumerate(texts):
        finish = "stop" if i == len(texts) - 1 else None
        choice = {"index": 0, "text": text, "token_ids": [i], "finish_reason": finish, "stop_reason": None}
        chunks.append({"choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": i + 1}})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(texts)}})
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


class Body(httpx.AsyncByteStream):
    """A response body that sends ``parts`` and then raises ``error`` (None: ends normally)."""

    def __init__(self, parts: list[bytes], error: Exception | None = None) -> None:
        self.parts, self.error = parts, error

    async def __aiter__(self):
        for part in self.parts:
            yield part
        if self.error is not None:
            raise self.error


class MockServer(httpx.AsyncBaseTransport):
    """A vLLM-shaped server; ``completions``: what each POST /v1/completions gets, in order (an exception
    to raise at send, or a function of the request returning the response)."""

    def __init__(self, *completions) -> None:
        self.completions = list(completions)
        self.calls: list[str] = []
        self.models_failures = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if request.url.path == "/v1/models":
            if self.models_failures:
                self.models_failures -= 1
                raise httpx.ReadError("Connection reset by peer", request=request)
            return httpx.Response(200, json={"data": [{"id": SERVED, "max_model_len": 2048}]})
        if request.url.path == "/health":
            return httpx.Response(200)
        action = (
            self.completions.pop(0) if self.completions else (lambda r: httpx.Response(200, stream=Body(sse("OK"))))
        )
        if isinstance(action, Exception):
            raise action
        return action(request)


def mock_engine(server: MockServer, **overrides: object) -> OpenAIEngine:
    return OpenAIEngine(remote_config("http://model:8000", **({"retries": 2} | overrides)), transport=server)


def broken(parts: list[bytes], error_type: type[httpx.TransportError]):
    return lambda request: httpx.Response(200, stream=Body(parts, error_type("peer closed", request=request)))


async def test_transport_failures_before_the_first_delta_are_retried() -> None:
    reset = httpx.ReadError("Connection reset by peer")
    server = MockServer(reset, broken([], httpx.RemoteProtocolError), broken([], httpx.ReadError))
    async with mock_engine(server, retries=3) as engine:
        deltas = await collect(engine, PROMPT, Sampling(max_tokens=3))
    assert "".join(d.text for d in deltas) == "OK" and deltas[-1].finish_reason == "stop"
    assert server.calls.count("/v1/completions") == 4  # a reset at send, two bodies broken before any chunk, then OK


async def test_a_stream_broken_after_output_is_not_retried() -> None:
    server = MockServer(broken(sse("Hel", "lo")[:1], httpx.RemoteProtocolError))
    deltas: list[Delta] = []
    async with mock_engine(server) as engine:
        with pytest.raises(EngineUnavailable, match=r"broke off: .*peer closed \(RemoteProtocolError\)"):
            async for delta in engine.stream(PROMPT, Sampling(), request_id=rid()):
                deltas.append(delta)
    assert [d.text for d in deltas] == ["Hel"]  # what went out, once: no retry could repeat it
    assert server.calls.count("/v1/completions") == 1


async def test_every_transport_failure_is_engine_unavailable_with_a_message() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("", request=request)  # httpx's own timeouts carry no text

    failures = [httpx.ConnectError("refused"), httpx.WriteError("broken pipe"), timeout]
    server = MockServer(*failures)
    async with mock_engine(server, request_timeout_s=7) as engine:
        with pytest.raises(EngineUnavailable) as info:
            await collect(engine, PROMPT, Sampling())
    message = str(info.value)
    assert "no data from http://model:8000 for 7 s (ReadTimeout)" in message and "3 attempts" in message


async def test_models_are_retried_and_health_is_one_quick_attempt() -> None:
    server = MockServer()
    server.models_failures = 2
    async with mock_engine(server) as engine:
        assert server.calls == ["/v1/models"] * 3
        assert (await engine.health()).ok

        def down(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("All connection attempts failed", request=request)

        engine.client._transport = httpx.MockTransport(down)  # the server went away after the start
        health = await engine.health()
    assert not health.ok and "All connection attempts failed (ConnectError)" in health.detail


async def test_a_proxy_answering_503_is_retried_then_unavailable() -> None:
    def busy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "no upstream"}})

    server = MockServer(busy, busy, busy)
    async with mock_engine(server) as engine:
        with pytest.raises(EngineUnavailable, match=r"HTTP 503: no upstream.*3 attempts"):
            await collect(engine, PROMPT, Sampling())


# --- usage: the server's count, also when it sends no token ids ----------------------------------------------------


async def test_a_server_without_token_ids_still_counts_the_completion() -> None:
    chunks = [json.loads(part[6:]) for part in sse("Hel", "lo", "!")[:-1]]
    for chunk in chunks:
        for choice in chunk["choices"]:
            del choice["token_ids"]  # as OpenAI-compatible servers other than vLLM answer
    body = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
    server = MockServer(lambda request: httpx.Response(200, stream=Body(body)))
    async with mock_engine(server) as engine:
        deltas = await collect(engine, PROMPT, Sampling())
    assert [d.token_ids for d in deltas] == [(), (), ()]
    assert [d.completion_tokens for d in deltas] == [1, 2, 3] and deltas[-1].finish_reason == "stop"


async def test_the_services_usage_is_the_servers_count_with_or_without_token_ids(tokenizer_dir, corpus_backend) -> None:
    from api.memory import LocalMemory
    from scripts.scripted_server import ScriptedServerProcess
    from tests.agent_fixtures import client_for, make_retriever
    from tests.test_engine_faults import settings_for

    answer = "The tower was designed by the company of Gustave Eiffel."
    body = {"model": "megrez-search", "messages": [{"role": "user", "content": "Who?"}], "megrez_websearch": "off"}
    usage = {}
    for ids in ([], ["--no-token-ids"]):
        server = ScriptedServerProcess(tokenizer_dir, "--answer", answer + "<|turn_end|>", *ids).start()
        try:
            app = create_app(settings_for(server.url), retriever=make_retriever(corpus_backend), memory=LocalMemory())
            async with client_for(app) as client:
                done = (await client.post("/v1/chat/completions", json=body)).json()
        finally:
            server.stop()
        assert done["choices"][0]["message"]["content"] == answer
        usage[bool(ids)] = done["usage"]
    assert usage[True] == usage[False] and usage[True]["completion_tokens"] > 0
