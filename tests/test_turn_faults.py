"""Faults while a turn runs, against real processes on 127.0.0.1: every stream ends with ``done`` within a
bound, the conversation keeps every finished turn and the interrupted one (done, stopped or failed, with
its sources), slots and locks are free afterwards, ``/readyz`` tells the truth.

The app under test is served by uvicorn (``client_for``); Redis is a redis-server of the test's own when
it is killed (append-only file on, as in docker-compose.yml), the session's otherwise; a replica that is
killed runs in a process of its own (``scripts/scripted_service.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
import redis.asyncio as redis

from agent.config import AgentConfig
from api import redis_schema as schema
from api.config import ApiConfig, RateConfig
from api.memory import ANONYMOUS, LocalMemory
from api.redis_memory import RedisMemory
from api.settings import Settings
from engine.base import EngineUnavailable
from scripts.net import RedisServer
from scripts.scripted_service import service_process
from tests.agent_fixtures import DOCUMENTS, app_with, call, client_for, parse_sse

SLOTS = schema.owner_keys(ANONYMOUS)[1]  # the anonymous owner's turn slots

SLOW = "Gustave Eiffel's company designed it [citation:1]. " + "It took two years to build. " * 20 + "<|turn_end|>"
SSE = {"Accept": "text/event-stream"}


def settings(**api) -> Settings:
    return Settings(agent=AgentConfig(related=False), api=ApiConfig(**api), rate=RateConfig(concurrent_turns=8))


async def open_stream(client: httpx.AsyncClient, until: Callable[[list[dict]], bool], **request) -> tuple:
    """POST /chat as SSE until ``until(frames)``; returns (frames so far, the rest as a task that reads on)."""
    request.setdefault("json", {"message": "Who designed the Eiffel Tower?"})
    context = client.stream("POST", request.pop("url", "/chat?websearch=auto"), headers=SSE, **request)
    response = await context.__aenter__()
    chunks = response.aiter_text()
    seen = ""
    while not until(parse_sse(seen)):
        seen += await chunks.__anext__()

    async def rest() -> list[dict]:
        nonlocal seen
        try:
            async for chunk in chunks:
                seen += chunk
        finally:
            await context.__aexit__(None, None, None)
        return parse_sse(seen)

    return parse_sse(seen), asyncio.create_task(rest())


def tokens(n: int) -> Callable[[list[dict]], bool]:
    return lambda frames: sum(f.get("event") == "token" for f in frames) >= n


def text_of(frames: list[dict]) -> str:
    return "".join(json.loads(f["data"])["text"] for f in frames if f.get("event") == "token")


def meta_of(frames: list[dict]) -> dict:
    return json.loads(frames[0]["data"])


async def eventually(check: Callable, timeout_s: float = 10.0) -> None:
    """Wait until ``await check()`` (or ``check()``) is true; fail with the last value after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = check()
        value = await value if asyncio.iscoroutine(value) else value
        if value or asyncio.get_running_loop().time() > deadline:
            assert value, f"still not true after {timeout_s} s"
            return
        await asyncio.sleep(0.05)


@pytest.fixture(params=["local", "redis"])
def memory_factory(request, redis_url):
    return (lambda: LocalMemory()) if request.param == "local" else (lambda: RedisMemory(redis_url))


async def test_delete_during_a_turn_stops_it_and_leaves_nothing(tokenizer_dir, corpus_backend, memory_factory):
    memory = memory_factory()
    app, engine = app_with(tokenizer_dir, corpus_backend, memory, call("Eiffel Tower"), SLOW, delay_s=0.01)
    async with client_for(app) as client:
        frames, rest = await open_stream(client, tokens(2))
        meta = meta_of(frames)
        keys = [f"{schema.conversation(meta['conversation_id'])}*", schema.message_index(meta["message_id"])]
        if isinstance(memory, RedisMemory):  # what the delete must remove is there while the turn runs
            store = redis.from_url(memory_url(memory))
            assert all([await store.keys(key) for key in keys])
            assert await store.zcard(SLOTS) == 1
            await store.aclose()
        deleted = await client.delete(f"/conversations/{meta['conversation_id']}")
        assert deleted.status_code == 204
        frames = await asyncio.wait_for(rest, 10)
        assert frames[-1]["event"] == "done" and json.loads(frames[-1]["data"])["status"] == "stopped"
        assert engine.requests[-1].closed_early  # the engine request was aborted
        assert (await client.get(f"/conversations/{meta['conversation_id']}")).status_code == 404
        again = await client.post("/chat", json={"message": "more", "conversation_id": meta["conversation_id"]})
        assert again.status_code == 404
        assert meta["conversation_id"] not in [c["id"] for c in (await client.get("/conversations")).json()]
        assert (await client.get(f"/chat/{meta['message_id']}/events")).status_code == 404
        await eventually(lambda: app.state.services.runner.slots_held == 0)
        if isinstance(memory, RedisMemory):
            store = redis.from_url(memory_url(memory))
            assert [await store.keys(key) for key in keys] == [[], []]
            assert await store.zcard(SLOTS) == 0
            await store.aclose()
        fresh = await client.post("/chat?websearch=off", json={"message": "still works"})
        assert fresh.status_code == 200 and fresh.json()["status"] == "done"


def memory_url(memory: RedisMemory) -> str:
    kwargs = memory._redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


async def test_a_stopped_turn_is_stored_with_what_the_user_saw(tokenizer_dir, corpus_backend, memory_factory):
    app, _ = app_with(tokenizer_dir, corpus_backend, memory_factory(), call("Eiffel Tower"), SLOW, delay_s=0.01)
    async with client_for(app) as client:
        frames, rest = await open_stream(client, lambda frames: any(f.get("event") == "citation" for f in frames))
        meta = meta_of(frames)
        stopped = await client.post(f"/chat/{meta['message_id']}/stop")
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        frames = await asyncio.wait_for(rest, 10)
        shown = [s for f in frames if f.get("event") == "sources" for s in json.loads(f["data"])["sources"]]
        [turn] = (await client.get(f"/conversations/{meta['conversation_id']}")).json()["turns"]
        assert turn["status"] == "stopped" and turn["question"] == "Who designed the Eiffel Tower?"
        assert shown and turn["answer"]["sources"] == shown  # everything the stream showed
        assert turn["answer"]["queries"] == ["Eiffel Tower"] and turn["answer"]["searched"]
        assert turn["answer"]["answer"] == text_of(frames) and SLOW.startswith(turn["answer"]["answer"][:30])
        assert [c["n"] for c in turn["answer"]["citations"]] == [1]  # cited before the stop
        assert {"code": "stopped", "message": "stopped by the user", "params": {}} in turn["answer"]["notes"]
        await eventually(lambda: app.state.services.runner.slots_held == 0)


async def test_a_failed_turn_is_stored_with_its_error(tokenizer_dir, corpus_backend, memory_factory):
    down = EngineUnavailable("GPU host down")
    app, _ = app_with(tokenizer_dir, corpus_backend, memory_factory(), down)
    async with client_for(app) as client:
        response = await client.post("/chat?websearch=off", json={"message": "q"}, headers=SSE)
        frames = parse_sse(response.text)
        assert [f["event"] for f in frames[-2:]] == ["error", "done"]
        assert json.loads(frames[-1]["data"])["status"] == "failed"
        meta = meta_of(frames)
        [listed] = [c for c in (await client.get("/conversations")).json() if c["id"] == meta["conversation_id"]]
        [turn] = (await client.get(f"/conversations/{listed['id']}")).json()["turns"]
        assert turn["status"] == "failed" and turn["error"]["code"] == "engine_unavailable" and turn["question"] == "q"
        [note] = turn["answer"]["notes"]  # how it ended, as a code a page can word (the error's code with it)
        assert note["code"] == "failed" and note["params"] == {"code": "engine_unavailable"}


async def test_redis_killed_mid_turn_and_restarted_from_its_aof_loses_nothing(tokenizer_dir, corpus_backend, tmp_path):
    server = RedisServer(tmp_path, persist=True).start()
    memory = RedisMemory(server.url)
    app, _ = app_with(
        tokenizer_dir, corpus_backend, memory, call("Eiffel Tower"), SLOW, delay_s=0.02, settings=settings()
    )
    try:
        async with client_for(app) as client:
            frames, rest = await open_stream(client, tokens(2))
            meta = meta_of(frames)
            server.kill()
            assert (await client.get("/readyz")).status_code == 503  # the store is down: not ready
            await asyncio.sleep(3)
            server.start()  # same port, same append-only file
            frames = await asyncio.wait_for(rest, 40)
            assert frames[-1]["event"] == "done" and json.loads(frames[-1]["data"])["status"] == "done"
            assert text_of(frames) == SLOW.removesuffix("<|turn_end|>").replace("[citation:1]", "[1]")
            await eventually(lambda: _ready(client), 10)  # and ready again
            [turn] = (await client.get(f"/conversations/{meta['conversation_id']}")).json()["turns"]
            assert (
                turn["status"] == "done" and turn["answer"]["sources"] and turn["answer"]["answer"] == text_of(frames)
            )
            resumed = parse_sse((await client.get(f"/chat/{meta['message_id']}/events")).text)
            assert text_of(resumed) == text_of(frames)  # the stored stream has every event, once
            assert await memory.running_message(meta["conversation_id"]) is None
            store = redis.from_url(server.url)
            assert await store.zcard(SLOTS) == 0 and await store.zcard(schema.LEASES) == 0
            await store.aclose()
            assert app.state.services.runner.slots_held == 0
    finally:
        server.stop()


async def test_redis_gone_for_good_ends_the_stream_with_a_clear_error(tokenizer_dir, corpus_backend, tmp_path):
    server = RedisServer(tmp_path).start()
    app, _ = app_with(
        tokenizer_dir, corpus_backend, RedisMemory(server.url), SLOW, delay_s=0.02, settings=settings(store_retry_s=1)
    )
    try:
        async with client_for(app) as client:
            frames, rest = await open_stream(client, tokens(2), url="/chat?websearch=off")
            server.kill()
            frames = await asyncio.wait_for(rest, 30)
            assert [f["event"] for f in frames[-2:]] == ["error", "done"]
            assert json.loads(frames[-2]["data"])["code"] == "store_unavailable"
            assert json.loads(frames[-1]["data"])["status"] == "failed"
            assert app.state.services.runner.slots_held == 0
            assert (await client.get("/readyz")).status_code == 503
    finally:
        server.stop()


async def test_a_replica_killed_mid_turn_is_failed_and_frees_the_conversation(
    tokenizer_dir, corpus_backend, redis_url, tmp_path
):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCUMENTS), encoding="utf-8")
    # The page harness's model searches with the question, then answers citing two contexts, slowly.
    doomed = service_process(
        redis_url, "--tokenizer", str(tokenizer_dir), "--corpus", str(corpus), "--lease-s", "1", "--delay-s", "0.05"
    ).start()
    survivor, _ = app_with(
        tokenizer_dir, corpus_backend, RedisMemory(redis_url, lease_s=1), "Answered here.<|turn_end|>"
    )
    try:
        async with client_for(survivor) as b, httpx.AsyncClient(base_url=f"http://127.0.0.1:{doomed.port}") as a:
            await eventually(lambda: _ready(a), 60)
            frames, rest = await open_stream(a, tokens(2), json={"message": "Who designed the Eiffel Tower?"})
            meta, last = meta_of(frames), frames[-1]["id"]
            doomed.kill()
            with pytest.raises(httpx.HTTPError):
                await asyncio.wait_for(rest, 10)  # the connection to the dead replica breaks
            resumed = await asyncio.wait_for(
                b.get(f"/chat/{meta['message_id']}/events", headers={"Last-Event-ID": last}), 20
            )
            tail = parse_sse(resumed.text)
            assert [f["event"] for f in tail[-2:]] == ["error", "done"]
            assert json.loads(tail[-2]["data"])["code"] == "interrupted"
            assert json.loads(tail[-1]["data"])["status"] == "failed"
            [turn] = (await b.get(f"/conversations/{meta['conversation_id']}")).json()["turns"]
            assert turn["status"] == "failed" and turn["answer"]["sources"] and turn["answer"]["queries"]
            shown, kept = text_of(frames), turn["answer"]["answer"]
            if kept.startswith(shown):  # the store had more than this client read: the resume sent the rest
                assert kept == shown + text_of(tail)
            else:  # the client saw the dead replica's last interval (MEGREZ_API__EVENT_WRITE_MS), never stored
                assert shown.startswith(kept) and text_of(tail) == ""
            stop = await b.post(f"/chat/{meta['message_id']}/stop")
            assert stop.status_code == 200 and stop.json()["status"] == "failed"  # not a 504
            follow_up = await b.post(
                "/chat?websearch=off", json={"message": "again", "conversation_id": meta["conversation_id"]}
            )
            assert follow_up.status_code == 200 and follow_up.json()["answer"]["answer"] == "Answered here."
            store = redis.from_url(redis_url)
            assert await store.zscore(SLOTS, meta["message_id"]) is None
            await store.aclose()
    finally:
        doomed.stop()


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_resume_on_another_replica_follows_a_turn_that_is_slow_between_tokens(
    tokenizer_dir, corpus_backend, redis_url
):
    # Two pieces 6 s apart: longer than one blocking read (5 s), and than redis-py's default socket timeout.
    slow, _ = app_with(
        tokenizer_dir, corpus_backend, RedisMemory(redis_url), "Slow but sure.<|turn_end|>", chunk_chars=7, delay_s=6
    )
    other, _ = app_with(tokenizer_dir, corpus_backend, RedisMemory(redis_url))
    async with client_for(slow) as a, client_for(other) as b:
        frames, rest = await open_stream(a, lambda frames: len(frames) >= 1, url="/chat?websearch=off")
        meta = meta_of(frames)
        rest.cancel()  # this client leaves; the turn goes on
        resumed = await asyncio.wait_for(b.get(f"/chat/{meta['message_id']}/events", timeout=30), 30)
        frames = parse_sse(resumed.text)
        assert frames[-1]["event"] == "done" and json.loads(frames[-1]["data"])["status"] == "done"
        assert text_of(frames) == "Slow but sure."


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/responses", "/chat"])
async def test_clients_that_leave_early_release_every_slot(tokenizer_dir, corpus_backend, memory_factory, route):
    memory = memory_factory()
    app_settings = settings()
    app, _ = app_with(
        tokenizer_dir, corpus_backend, memory, default="Short answer. " * 100, delay_s=0.01, settings=app_settings
    )  # ≈3 s a turn: none ends (and gives its slot back) before all 25 requests were answered
    async with client_for(app) as client:
        answered: list[int] = []
        everyone_answered = asyncio.Event()

        async def leave_after_first_chunk(clients: int) -> int:
            """Read the first chunk, wait until all ``clients`` have their status (a slot given back earlier could
            be taken by a later request), then leave."""
            if route == "/chat":
                request = {"url": "/chat?websearch=off", "json": {"message": "q"}, "headers": SSE}
            elif route == "/v1/responses":
                request = {"url": route, "json": {"model": "megrez-search", "input": "q", "stream": True}}
            else:
                body = {"model": "megrez-search", "stream": True, "messages": [{"role": "user", "content": "q"}]}
                request = {"url": route, "json": body}
            async with client.stream("POST", **request) as response:
                chunks = response.aiter_bytes()  # kept: a dropped iterator, once collected, closes the response
                if response.status_code == 200:
                    await anext(chunks)
                answered.append(response.status_code)
                if len(answered) == clients:
                    everyone_answered.set()
                await everyone_answered.wait()
                return response.status_code

        statuses = await asyncio.gather(*(leave_after_first_chunk(25) for _ in range(25)))
        assert statuses.count(200) == app_settings.rate.concurrent_turns and set(statuses) <= {200, 429}
        runner = app.state.services.runner
        await eventually(lambda: runner.slots_held == 0, 15)  # the turns ended (/chat) or were closed (/v1)
        if isinstance(memory, RedisMemory):
            store = redis.from_url(memory_url(memory))
            await eventually(lambda: _no_slots(store), 5)
            await store.aclose()
        answered.clear()
        everyone_answered.clear()
        again = await asyncio.gather(*(leave_after_first_chunk(8) for _ in range(8)))
        assert again == [200] * 8  # all eight slots are free again


async def _no_slots(store) -> bool:
    return await store.zcard(SLOTS) == 0


class CountingMemory(RedisMemory):
    """Redis memory that records each batch the turns' writer stores (its size, per message)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.batches: list[int] = []

    async def append_events(self, batches) -> None:
        self.batches += [len(events) for events in batches.values()]
        await super().append_events(batches)


async def stored_stream(redis_url: str, meta: dict) -> list[tuple[str, str, str]]:
    store = redis.from_url(redis_url, decode_responses=True)
    entries = await store.xrange(schema.events(meta["conversation_id"], meta["message_id"]))
    await store.aclose()
    return [(i, f["type"], f["data"]) for i, f in entries]


def shown_stream(frames: list[dict]) -> list[tuple[str, str, str]]:
    return [(f["id"], f["event"], f["data"]) for f in frames if f.get("id") and f["id"] != "0-0"]  # 0-0: meta


async def test_followers_here_see_events_before_the_store_which_gets_them_with_the_turns_end(
    tokenizer_dir, corpus_backend, redis_url
):
    memory = CountingMemory(redis_url)
    app, _ = app_with(tokenizer_dir, corpus_backend, memory, SLOW, delay_s=0.01, settings=settings(event_write_ms=5000))
    async with client_for(app) as client:
        frames, rest = await open_stream(client, tokens(3), url="/chat?websearch=off")
        meta = meta_of(frames)
        assert [t for _, t, _ in await stored_stream(redis_url, meta)] == []  # shown, not stored yet
        frames = await asyncio.wait_for(rest, 30)
        assert frames[-1]["event"] == "done" and memory.batches == []  # all of it went with the turn's end
        assert await stored_stream(redis_url, meta) == shown_stream(frames)


async def test_a_turns_events_are_stored_in_a_few_batches_each_once_in_order(tokenizer_dir, corpus_backend, redis_url):
    memory = CountingMemory(redis_url)
    app, _ = app_with(tokenizer_dir, corpus_backend, memory, SLOW, delay_s=0.01, settings=settings(event_write_ms=100))
    async with client_for(app) as client:
        frames, rest = await open_stream(client, tokens(1), url="/chat?websearch=off")
        frames = await asyncio.wait_for(rest, 30)
        stored = await stored_stream(redis_url, meta_of(frames))
        assert stored == shown_stream(frames) and len(stored) > 100
        # ≈1.4 s of tokens every 10 ms, written every 100 ms: about 14 batches, not one per event
        assert 5 <= len(memory.batches) <= 30 and sum(memory.batches) < len(stored)
