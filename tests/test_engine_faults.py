"""The remote model server failing under a running service, against real processes on 127.0.0.1.

The model server is ``scripts/scripted_server.py`` in a child process (SIGKILLed, restarted on the same
port, swapped for one that never answers, or behind a proxy that resets connections or swallows
requests); the API is the real app on uvicorn with the engine it builds from its settings
(``OpenAIEngine``, without a local tokenizer), the fixture corpus and in-process memory. Every wait is bounded;
the bounds are generous ("does not hang"), not timings. What is asserted: each turn's stream ends with
``done``, and ``/readyz`` and ``/chat`` tell the truth about the engine throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Self

import httpx
import pytest

from agent.config import AgentConfig
from api.app import create_app
from api.config import AuthConfig
from api.memory import LocalMemory
from api.settings import Settings
from engine.config import EngineConfig
from scripts.scripted_engine import ScriptedEngine
from scripts.scripted_server import ScriptedServerProcess
from scripts.tiny_models import serve_in_process
from tests.agent_fixtures import make_retriever, parse_sse

ANSWER = "The tower was designed by the company of Gustave Eiffel."
BOUND_S = 30.0  # far above anything these should take: only a hang reaches it


def settings_for(url: str, **engine: object) -> Settings:
    """Short timeouts and a fast probe, so that each failure shows within seconds."""
    fields: dict[str, object] = {
        "backend": "openai",
        "model": "/nonexistent",  # no local tokenizer: the server's /tokenize counts, as in the issue
        "openai_base_url": url,
        "connect_timeout_s": 1.0,
        "request_timeout_s": 2.0,
        "retries": 2,
        "retry_backoff_s": 0.05,
        "health_interval_s": 0.2,
        "start_retry_max_s": 0.5,
    }
    return Settings(engine=EngineConfig(**(fields | engine)), agent=AgentConfig(related=False))


@contextlib.asynccontextmanager
async def serve(settings: Settings, corpus_backend) -> AsyncIterator[httpx.AsyncClient]:
    """The app on uvicorn, *without* waiting for its engine (some tests start it with the server down)."""
    app = create_app(settings, retriever=make_retriever(corpus_backend), memory=LocalMemory())
    async with (
        app.router.lifespan_context(app),
        serve_in_process(app) as url,
        httpx.AsyncClient(base_url=url, timeout=BOUND_S) as client,
    ):
        yield client


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    async with asyncio.timeout(BOUND_S):
        while not await check():
            await asyncio.sleep(0.1)
    assert await check(), what


def ready_is(client: httpx.AsyncClient, status: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await client.get("/readyz")).status_code == status

    return check


async def turn(client: httpx.AsyncClient, on_first_token: Callable[[], None] | None = None) -> list[dict]:
    """One streamed /chat turn, read to its end (bounded); ``on_first_token`` runs when the first token arrives."""
    text, fired = "", False
    async with asyncio.timeout(BOUND_S):
        async with client.stream(
            "POST", "/chat?websearch=off", json={"message": "Who designed it?"}, headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200, await response.aread()
            async for chunk in response.aiter_text():
                text += chunk
                if on_first_token and not fired and any(f.get("event") == "token" for f in parse_sse(text)):
                    fired = True
                    on_first_token()
    frames = parse_sse(text)
    assert frames[-1]["event"] == "done", frames[-3:]
    return frames


def of(frames: list[dict], event: str) -> list[dict]:
    return [json.loads(f["data"]) for f in frames if f.get("event") == event]


@pytest.fixture
def model_server(tokenizer_dir: Path):
    server = ScriptedServerProcess(tokenizer_dir, "--answer", ANSWER + "<|turn_end|>", "--delay-s", "0.05")
    yield server
    server.stop()


async def test_model_server_killed_mid_stream_then_back(model_server, corpus_backend):
    model_server.start()
    async with serve(settings_for(model_server.url), corpus_backend) as client:
        await eventually(ready_is(client, 200), "ready with the server up")
        frames = await turn(client, on_first_token=model_server.kill)
        assert of(frames, "token") and not of(frames, "answer")
        (error,) = of(frames, "error")
        assert error["code"] == "engine_unavailable" and "127.0.0.1" not in error["message"]
        assert of(frames, "done")[0]["status"] == "failed"

        await eventually(ready_is(client, 503), "/readyz turns 503 while the server is down")
        problems = (await client.get("/readyz")).json()["problems"]
        assert any(p.startswith("engine unavailable:") and model_server.url in p for p in problems), problems
        refused = await client.post("/chat?websearch=off", json={"message": "again?"})
        assert refused.status_code == 503 and "unavailable" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        body = {"model": "megrez-search", "messages": [{"role": "user", "content": "again?"}]}
        openai_refused = await client.post("/v1/chat/completions", json=body)
        assert openai_refused.status_code == 503 and openai_refused.json()["error"]["code"] == "engine_unavailable"
        assert int(openai_refused.headers["Retry-After"]) >= 1  # OpenAI's clients back off by it

        model_server.start()
        await eventually(ready_is(client, 200), "/readyz back to 200 once the server is back")
        answer = of(await turn(client), "answer")[0]["answer"]
        assert answer["answer"] == ANSWER


async def test_a_stream_that_stalls_ends_the_turn(tokenizer_dir, corpus_backend):
    server = ScriptedServerProcess(tokenizer_dir, "--answer", ANSWER + "<|turn_end|>", "--stall-after", "2").start()
    try:
        async with serve(settings_for(server.url, request_timeout_s=1.0), corpus_backend) as client:
            await eventually(ready_is(client, 200), "ready")
            frames = await turn(client)
            (error,) = of(frames, "error")
            assert error["code"] == "engine_unavailable" and of(frames, "done")[0]["status"] == "failed"
            # The server still answers its health checks: it is up, only that stream hung.
            assert (await client.get("/readyz")).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("down", ["refused", "black_hole"])
async def test_model_server_down_when_the_api_starts_and_up_later(model_server, corpus_backend, down):
    if down == "black_hole":
        model_server.start("--black-hole")  # accepts connections, never answers
    async with serve(settings_for(model_server.url), corpus_backend) as client:
        failure = "ReadTimeout" if down == "black_hole" else "ConnectError"

        async def start_failed() -> bool:
            ready = await client.get("/readyz")
            return ready.status_code == 503 and failure in " ".join(ready.json()["problems"])

        await eventually(start_failed, f"/readyz reports the failed start ({failure})")
        (problem,) = (await client.get("/readyz")).json()["problems"]
        assert problem.startswith("engine failed to start (attempt") and model_server.url in problem
        refused = await client.post("/chat?websearch=off", json={"message": "q"})
        assert refused.status_code == 503 and "being retried" in refused.json()["detail"]
        info = (await client.get("/info")).json()
        assert info["engine"] == "unavailable" and not info["ready"] and "engine_detail" not in info  # no keys

        model_server.start()  # the real one, on the same port; the API is not restarted
        await eventually(ready_is(client, 200), "/readyz turns 200 once the server is up")
        assert (await client.get("/info")).json()["engine"] == "ready"
        assert of(await turn(client), "answer")[0]["answer"]["answer"] == ANSWER


class FaultyProxy:
    """A TCP proxy in front of the model server. It resets (RST) the connection of the next ``resets``
    completion requests before any byte of the answer; while ``silent``, it swallows every request (a
    server that accepts and never answers, on connections already open too); otherwise it forwards."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.resets, self.done, self.silent = upstream_port, 0, 0, False
        self.server: asyncio.Server | None = None
        self.connections: dict[asyncio.Task, list[asyncio.StreamWriter]] = {}

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writers in self.connections.values():  # pooled connections the client left open: end them
            for writer in writers:
                writer.transport.abort()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.connections[asyncio.current_task()] = [writer, up_writer]  # type: ignore[index]

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if self.silent:
                    continue
                if self.resets and data.startswith(b"POST /v1/completions"):
                    self.resets -= 1
                    self.done += 1
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # with SO_LINGER 0: a reset, not a clean close
                    break
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(client_to_server(), server_to_client())


async def test_a_model_server_that_stops_answering(model_server, corpus_backend):
    model_server.start()
    async with FaultyProxy(model_server.port) as proxy, serve(settings_for(proxy.url), corpus_backend) as client:
        await eventually(ready_is(client, 200), "ready")
        proxy.silent = True  # the next probe needs its timeout to fail: this turn still starts
        frames = await turn(client)
        (error,) = of(frames, "error")
        assert error["code"] == "engine_unavailable" and of(frames, "done")[0]["status"] == "failed"
        await eventually(ready_is(client, 503), "/readyz turns 503 while the server does not answer")
        assert "ReadTimeout" in " ".join((await client.get("/readyz")).json()["problems"])
        proxy.silent = False
        await eventually(ready_is(client, 200), "/readyz back to 200 when it answers again")


async def test_connection_resets_before_the_first_byte_are_retried(model_server, corpus_backend):
    model_server.start()
    async with FaultyProxy(model_server.port) as proxy, serve(settings_for(proxy.url), corpus_backend) as client:
        await eventually(ready_is(client, 200), "ready")
        proxy.resets = 2  # the configured retries: two resets, then the third attempt goes through
        frames = await turn(client)
        assert proxy.done == 2 and not of(frames, "error")
        assert of(frames, "answer")[0]["answer"]["answer"] == ANSWER and of(frames, "done")[0]["status"] == "done"


async def test_a_failed_local_load_is_not_retried_and_only_key_holders_see_why(tokenizer_dir, corpus_backend):
    class NoWeights(ScriptedEngine):  # an embedded engine (start_retryable is False) whose load fails
        attempts = 0

        async def start(self) -> None:
            NoWeights.attempts += 1
            raise OSError("no weights at /models/megrez")

    settings = Settings(auth=AuthConfig(api_keys=["k"]), engine=EngineConfig(retry_backoff_s=0.01))
    app = create_app(settings, engine=NoWeights(tokenizer_dir), retriever=make_retriever(corpus_backend))
    key = {"Authorization": "Bearer k"}
    async with (
        app.router.lifespan_context(app),
        serve_in_process(app) as url,
        httpx.AsyncClient(base_url=url, timeout=BOUND_S, headers=key) as client,
    ):

        async def failed() -> bool:
            return "not retried" in " ".join((await client.get("/readyz")).json()["problems"])

        await eventually(failed, "/readyz says the load failed for good")
        assert NoWeights.attempts == 1 and app.state.services.engine_state.failed  # and nothing will retry it
        refused = await client.post("/chat?websearch=off", json={"message": "q"})
        assert refused.status_code == 503 and "Retry-After" not in refused.headers  # waiting will not help
        assert "/models/megrez" not in refused.json()["detail"]
        info = (await client.get("/info")).json()
        assert info["engine"] == "unavailable" and "no weights at /models/megrez" in info["engine_detail"]
        assert (await client.get("/info", headers={"Authorization": "Bearer nope"})).json() == {"keys_required": True}
