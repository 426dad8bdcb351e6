"""Conversation memory and event streams, in process and on a real redis-server (the session's own)."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.events import Answer, TranscriptMessage, TurnRecord
from api.memory import DONE, ConversationBusy, LocalMemory, StoredTurn, StoreUnavailable, title_of
from api.redis_memory import RedisMemory
from scripts.net import free_port


@pytest.fixture(params=["local", "redis"])
async def memory(request, redis_url):
    store = LocalMemory() if request.param == "local" else RedisMemory(redis_url)
    yield store
    await store.aclose()


def turn(question: str, answer: str = "ok") -> StoredTurn:
    record = TurnRecord(
        question=question,
        transcript=[TranscriptMessage(role="assistant", content=answer)],
        answer=Answer(answer=answer),
    )
    return StoredTurn(message_id=f"m-{question}", record=record)


async def test_conversations_round_trip_newest_first(memory):
    first = await memory.create_conversation("What is  the\nEiffel Tower?")
    second = await memory.create_conversation("x" * 300)
    assert first.title == "What is the Eiffel Tower?" and second.title.endswith("…") and len(second.title) <= 81
    await memory.add_turn(first.id, turn("What is the Eiffel Tower?"))
    await memory.add_turn(first.id, turn("How tall is it?", "330 m"))
    listed = [c.id for c in await memory.list_conversations()]
    assert listed.index(first.id) < listed.index(second.id)  # the updated one comes first
    turns = await memory.turns(first.id)
    assert [t.record.question for t in turns] == ["What is the Eiffel Tower?", "How tall is it?"]
    assert turns[1].record.answer.answer == "330 m"
    assert (await memory.get_conversation(first.id)).updated > first.updated
    assert await memory.delete_conversation(first.id)
    assert await memory.get_conversation(first.id) is None and await memory.turns(first.id) == []
    assert first.id not in [c.id for c in await memory.list_conversations()]
    assert not await memory.delete_conversation(first.id)


async def test_event_stream_replays_resumes_and_follows_live(memory):
    conv = await memory.create_conversation("q")
    await memory.start_message(conv.id, "m1")
    assert await memory.message_status("m1") == (conv.id, "running")
    ids = await memory.append_events("m1", [("token", json.dumps({"text": str(i)})) for i in range(3)])
    assert len(ids) == 3

    async def read(after=None):
        return [e async for e in memory.events("m1", after)]

    follower = asyncio.create_task(read())
    await asyncio.sleep(0.05)
    assert not follower.done()  # still running: the reader waits for more
    [late] = await memory.append_events("m1", [("token", json.dumps({"text": "3"}))])
    done = await memory.end_message("m1", "done")
    events = await asyncio.wait_for(follower, 5)
    assert [e.id for e in events] == [*ids, late, done]
    assert [json.loads(e.data).get("text") for e in events[:4]] == ["0", "1", "2", "3"]
    assert events[-1].type == DONE and json.loads(events[-1].data) == {"type": "done", "status": "done"}
    resumed = await read(after=ids[1])
    assert [e.id for e in resumed] == [ids[2], late, done]  # exactly what came after, once
    assert await memory.message_status("m1") == (conv.id, "done")
    assert [e async for e in memory.events("unknown")] == []


async def test_media_is_stored_once_by_content_hash(memory):
    assert await memory.put_media(b"png bytes") == await memory.put_media(b"png bytes")


async def test_a_second_replica_reads_the_stream_live(redis_url):
    writer, reader = RedisMemory(redis_url), RedisMemory(redis_url)
    conv = await writer.create_conversation("q")
    await writer.start_message(conv.id, "shared")

    async def follow():
        return [e.type async for e in reader.events("shared")]

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await writer.append_events("shared", [("status", "{}")])
    await writer.end_message("shared", "stopped")
    assert await asyncio.wait_for(task, 5) == ["status", DONE]
    assert (await reader.turns(conv.id)) == [] and (await reader.get_conversation(conv.id)).title == "q"
    await writer.aclose()
    await reader.aclose()


async def test_writes_set_their_lifetimes(redis_url):
    import redis.asyncio as redis

    memory = RedisMemory(redis_url, conversation_ttl_s=1000, stream_ttl_s=50)
    conv = await memory.create_conversation("q")
    await memory.add_turn(conv.id, turn("q"))
    await memory.start_message(conv.id, "ttl")
    await memory.append_events("ttl", [("token", "{}")])
    client = redis.from_url(redis_url)
    assert 900 < await client.ttl(f"megrez:conv:{conv.id}") <= 1000
    assert 900 < await client.ttl(f"megrez:conv:{conv.id}:turns") <= 1000
    assert 0 < await client.ttl("megrez:msg:ttl:events") <= 50 and 0 < await client.ttl("megrez:msg:ttl") <= 50
    await client.aclose()
    await memory.aclose()


async def test_redis_down_is_a_clear_error_not_a_hang():
    memory = RedisMemory(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable, match="Redis is unavailable"):
        await asyncio.wait_for(memory.ping(), 5)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(memory.add_turn("c", turn("q")), 5)
    await memory.aclose()


def test_title_keeps_short_questions_and_cuts_long_ones_at_a_word():
    assert title_of("  Hi\tthere ") == "Hi there"
    long = "word " * 40
    assert title_of(long) == ("word " * 16).strip() + "…"


async def test_turns_survive_a_redis_restart_and_the_store_reconnects(tmp_path):
    from scripts.net import RedisServer

    server = RedisServer(tmp_path, persist=True).start()
    memory = RedisMemory(server.url)
    try:
        conv = await memory.create_conversation("before the restart")
        await memory.add_turn(conv.id, turn("before the restart"))
        server.stop()
        with pytest.raises(StoreUnavailable):  # down: a clear error at once
            await asyncio.wait_for(memory.turns(conv.id), 5)
        server.start()  # same port, same data directory
        assert [t.record.question for t in await memory.turns(conv.id)] == ["before the restart"]  # nothing lost
        await memory.add_turn(conv.id, turn("after the restart"))  # the same store object works again
        assert len(await memory.turns(conv.id)) == 2
    finally:
        await memory.aclose()
        server.stop()


async def test_local_streams_expire_like_redis_ones():
    memory = LocalMemory(stream_ttl_s=0)
    conv = await memory.create_conversation("q")
    await memory.start_message(conv.id, "old")
    await memory.end_message("old", "done")
    await memory.start_message(conv.id, "new")  # starting a message drops ended streams past their lifetime
    assert await memory.message_status("old") is None and await memory.message_status("new") == (conv.id, "running")


async def test_more_followers_on_another_replica_than_redis_pys_default_pool(redis_url):
    writer, reader = RedisMemory(redis_url), RedisMemory(redis_url)
    mids = [f"many-{i}" for i in range(150)]  # each remote follower blocks on its own connection
    for mid in mids:
        await writer.start_message((await writer.create_conversation("q")).id, mid)

    async def follow(mid):
        return [e.type async for e in reader.events(mid)]

    followers = [asyncio.create_task(follow(mid)) for mid in mids]
    await asyncio.sleep(0.2)
    for mid in mids:
        await writer.append_events(mid, [("token", "{}")])
        await writer.end_message(mid, "done")
    assert await asyncio.wait_for(asyncio.gather(*followers), 20) == [["token", DONE]] * len(mids)
    await writer.aclose()
    await reader.aclose()


async def test_followers_here_and_on_another_replica_see_the_same_events_and_ids(redis_url):
    writer, reader = RedisMemory(redis_url), RedisMemory(redis_url)
    conv = await writer.create_conversation("q")
    await writer.start_message(conv.id, "same")

    async def follow(memory, after=None):
        return [(e.id, e.type, e.data) async for e in memory.events("same", after)]

    here, there = asyncio.create_task(follow(writer)), asyncio.create_task(follow(reader))
    await asyncio.sleep(0.05)
    first = await writer.append_events("same", [("token", '{"text": "a"}'), ("token", '{"text": "b"}')])
    await writer.append_events("same", [("sources", "[]")])
    await writer.end_message("same", "done")
    local, remote = await asyncio.wait_for(asyncio.gather(here, there), 5)
    assert local == remote and [t for _, t, _ in local] == ["token", "token", "sources", DONE]
    assert [i for i, _, _ in local[:2]] == first
    assert await follow(writer, after=first[0]) == remote[1:]  # after the end: read back from Redis
    await writer.aclose()
    await reader.aclose()


async def test_one_running_turn_per_conversation_across_replicas(redis_url):
    one, two = RedisMemory(redis_url), RedisMemory(redis_url)
    conv = await one.create_conversation("q")
    await one.start_message(conv.id, "first")
    with pytest.raises(ConversationBusy):
        await two.start_message(conv.id, "second")
    other = await two.create_conversation("another")
    await two.start_message(other.id, "elsewhere")  # other conversations are not held up
    await one.end_message("first", "done")
    await two.start_message(conv.id, "second")  # free again once the first ended
    assert await one.message_status("second") == (conv.id, "running")
    await one.aclose()
    await two.aclose()


async def test_local_memory_runs_one_turn_per_conversation():
    memory = LocalMemory()
    conv = await memory.create_conversation("q")
    await memory.start_message(conv.id, "a")
    with pytest.raises(ConversationBusy):
        await memory.start_message(conv.id, "b")
    await memory.end_message("a", "stopped")
    await memory.start_message(conv.id, "b")


async def test_a_stop_request_reaches_the_other_replica(redis_url):
    one, two = RedisMemory(redis_url), RedisMemory(redis_url)
    heard = asyncio.Queue()

    async def listen():
        async for mid in one.stop_requests():
            await heard.put(mid)

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.2)  # subscribed
    await two.request_stop("m-42")
    assert await asyncio.wait_for(heard.get(), 5) == "m-42"
    listener.cancel()
    await one.aclose()
    await two.aclose()


def test_event_ids_are_checked():
    from api.memory import event_id_key

    assert event_id_key("1700000000000-3") == (1700000000000, 3) and event_id_key("2-0") > event_id_key("1-9")
    for bad in ("", "abc", "1-", "-1", "1-2-3", "１-0"):
        with pytest.raises(ValueError, match="not an event id"):
            event_id_key(bad)
