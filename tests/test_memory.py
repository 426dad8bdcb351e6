"""Conversation memory and event streams, in process, on a real redis-server and on a real three-master Redis
Cluster (the session's own)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agent.events import Answer, ErrorEvent, MediaRef, TranscriptMessage, TurnRecord
from api import redis_schema as schema
from api.memory import (
    DONE,
    Conversation,
    ConversationBusy,
    ConversationGone,
    EventIds,
    LocalMemory,
    MessageStart,
    StoredEvent,
    StoredTurn,
    StoreUnavailable,
    TooManyTurns,
    done_data,
    event_id_key,
    title_of,
)
from api.redis_memory import RedisMemory
from retrieval.cache import redis_client
from scripts.net import free_port


@pytest.fixture(params=["redis", "cluster"])
def store_url(request) -> str:
    """The session's redis-server, or its Redis Cluster (a ``redis+cluster://`` URL)."""
    return request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")


@pytest.fixture(params=["local", "redis", "cluster"])
async def memory(request):
    if request.param == "local":
        store = LocalMemory()
    else:
        store = RedisMemory(request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url"))
    yield store
    await store.aclose()


def turn(mid: str, question: str, answer: str = "ok", status: str = "done") -> StoredTurn:
    record = TurnRecord(
        question=question,
        transcript=[TranscriptMessage(role="assistant", content=answer)],
        answer=Answer(answer=answer),
    )
    return StoredTurn(message_id=mid, record=record, status=status)


class Writer:
    """A turn's writes, as the runner makes them: numbered events, then the end."""

    def __init__(self, memory, mid: str) -> None:
        self.memory, self.mid, self.ids = memory, mid, EventIds()

    async def events(self, *pairs: tuple[str, str]) -> list[str]:
        stored = [StoredEvent(self.ids.next(), t, d) for t, d in pairs]
        self.memory.show(self.mid, stored)
        await self.memory.append_events({self.mid: stored})
        return [e.id for e in stored]

    async def finish(self, stored: StoredTurn | None, status: str = "done") -> tuple[bool, str]:
        done = StoredEvent(self.ids.next(), DONE, done_data(status))
        return await self.memory.finish_message(self.mid, stored, done), done.id


async def start(memory, cid: str, mid: str, question: str = "q", owner: str = "anonymous") -> Writer:
    await memory.start_message(mid, MessageStart(cid, owner, question))
    return Writer(memory, mid)


async def test_conversations_round_trip_newest_first(memory):
    first = await memory.create_conversation("What is  the\nEiffel Tower?")
    second = await memory.create_conversation("x" * 300)
    assert first.title == "What is the Eiffel Tower?" and second.title.endswith("…") and len(second.title) <= 81
    await (await start(memory, first.id, "a")).finish(turn("a", "What is the Eiffel Tower?"))
    await (await start(memory, first.id, "b")).finish(turn("b", "How tall is it?", "330 m"))
    listed = [c.id for c in await memory.list_conversations()]
    assert listed.index(first.id) < listed.index(second.id)  # the updated one comes first
    turns = await memory.turns(first.id)
    assert [t.record.question for t in turns] == ["What is the Eiffel Tower?", "How tall is it?"]
    assert turns[1].record.answer.answer == "330 m"
    assert (await memory.get_conversation(first.id)).updated > first.updated
    assert await memory.delete_conversation(first.id)
    assert await memory.get_conversation(first.id) is None and await memory.turns(first.id) == []
    assert first.id not in [c.id for c in await memory.list_conversations()]
    assert await memory.message_status("a") is None  # its message streams went with it
    assert not await memory.delete_conversation(first.id)


async def test_event_stream_replays_resumes_and_follows_live(memory):
    conv = await memory.create_conversation("q")
    writer = await start(memory, conv.id, "m1")
    assert await memory.message_status("m1") == (conv.id, "running")
    ids = await writer.events(*[("token", json.dumps({"text": str(i)})) for i in range(3)])
    assert len(ids) == 3

    async def read(after=None):
        return [e async for e in memory.events("m1", after)]

    follower = asyncio.create_task(read())
    await asyncio.sleep(0.05)
    assert not follower.done()  # still running: the reader waits for more
    [late] = await writer.events(("token", json.dumps({"text": "3"})))
    finished, done = await writer.finish(turn("m1", "q"))
    events = await asyncio.wait_for(follower, 5)
    assert finished and [e.id for e in events] == [*ids, late, done]
    assert [json.loads(e.data).get("text") for e in events[:4]] == ["0", "1", "2", "3"]
    assert events[-1].type == DONE and json.loads(events[-1].data) == {"type": "done", "status": "done"}
    resumed = await read(after=ids[1])
    assert [e.id for e in resumed] == [ids[2], late, done]  # exactly what came after, once
    assert await memory.message_status("m1") == (conv.id, "done")
    assert [t.message_id for t in await memory.turns(conv.id)] == ["m1"]
    assert [e async for e in memory.events("unknown")] == []


async def test_media_is_stored_once_by_content_hash(memory):
    assert await memory.put_media(b"png bytes") == await memory.put_media(b"png bytes")


async def test_a_second_replica_reads_the_stream_live(store_url):
    writer, reader = RedisMemory(store_url), RedisMemory(store_url)
    conv = await writer.create_conversation("q")
    turn_writer = await start(writer, conv.id, "shared")

    async def follow():
        return [e.type async for e in reader.events("shared")]

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await turn_writer.events(("status", "{}"))
    await turn_writer.finish(None, "stopped")
    assert await asyncio.wait_for(task, 5) == ["status", DONE]
    assert (await reader.turns(conv.id)) == [] and (await reader.get_conversation(conv.id)).title == "q"
    await writer.aclose()
    await reader.aclose()


async def test_writes_set_their_lifetimes(store_url):
    memory = RedisMemory(store_url, conversation_ttl_s=1000, stream_ttl_s=50, lease_s=20)
    conv = await memory.create_conversation("q", owner="ttl-owner")
    await (await start(memory, conv.id, "first", owner="ttl-owner")).finish(turn("first", "q"))
    writer = await start(memory, conv.id, "ttl", owner="ttl-owner")
    await writer.events(("token", "{}"))
    client = redis_client(store_url)
    conv_key, turns_key, messages_key, lock_key = schema.conversation_keys(conv.id)
    for key in (conv_key, turns_key, messages_key, schema.owner_keys("ttl-owner")[0]):
        assert 900 < await client.ttl(key) <= 1000
    for key in (schema.message(conv.id, "ttl"), schema.events(conv.id, "ttl"), schema.message_index("ttl")):
        assert 0 < await client.ttl(key) <= 50
    assert 0 < await client.pttl(lock_key) <= 20_000  # the lock lives as long as the lease
    await client.aclose()
    await memory.aclose()


async def test_redis_down_is_a_clear_error_not_a_hang():
    memory = RedisMemory(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable, match="Redis is unavailable"):
        await asyncio.wait_for(memory.ping(), 5)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(memory.start_message("m", MessageStart("c", "anonymous", "q")), 5)
    assert "m" not in memory._live  # the failed start left no live stream behind
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
        await (await start(memory, conv.id, "before")).finish(turn("before", "before the restart"))
        server.stop()
        with pytest.raises(StoreUnavailable):  # down: a clear error at once
            await asyncio.wait_for(memory.turns(conv.id), 5)
        server.start()  # same port, same data directory
        assert [t.record.question for t in await memory.turns(conv.id)] == ["before the restart"]  # nothing lost
        await (await start(memory, conv.id, "after")).finish(turn("after", "after the restart"))  # works again
        assert len(await memory.turns(conv.id)) == 2
    finally:
        await memory.aclose()
        server.stop()


async def test_local_streams_expire_like_redis_ones():
    memory = LocalMemory(stream_ttl_s=0)
    conv = await memory.create_conversation("q")
    await (await start(memory, conv.id, "old")).finish(None)
    await start(memory, conv.id, "new")  # starting a message drops ended streams past their lifetime
    assert await memory.message_status("old") is None and await memory.message_status("new") == (conv.id, "running")


async def test_more_followers_on_another_replica_than_redis_pys_default_pool(redis_url):
    writer, reader = RedisMemory(redis_url), RedisMemory(redis_url)
    mids = [f"many-{i}" for i in range(150)]  # each remote follower blocks on its own connection
    writers = [await start(writer, (await writer.create_conversation("q")).id, mid) for mid in mids]

    async def follow(mid):
        return [e.type async for e in reader.events(mid)]

    followers = [asyncio.create_task(follow(mid)) for mid in mids]
    await asyncio.sleep(0.2)
    for one in writers:
        await one.events(("token", "{}"))
        await one.finish(None)
    assert await asyncio.wait_for(asyncio.gather(*followers), 20) == [["token", DONE]] * len(mids)
    await writer.aclose()
    await reader.aclose()


async def test_followers_here_and_on_another_replica_see_the_same_events_and_ids(store_url):
    writer, reader = RedisMemory(store_url), RedisMemory(store_url)
    conv = await writer.create_conversation("q")
    turn_writer = await start(writer, conv.id, "same")

    async def follow(memory, after=None):
        return [(e.id, e.type, e.data) async for e in memory.events("same", after)]

    here, there = asyncio.create_task(follow(writer)), asyncio.create_task(follow(reader))
    await asyncio.sleep(0.05)
    first = await turn_writer.events(("token", '{"text": "a"}'), ("token", '{"text": "b"}'))
    await turn_writer.events(("sources", "[]"))
    await turn_writer.finish(None)
    local, remote = await asyncio.wait_for(asyncio.gather(here, there), 5)
    assert local == remote and [t for _, t, _ in local] == ["token", "token", "sources", DONE]
    assert [i for i, _, _ in local[:2]] == first
    assert await follow(writer, after=first[0]) == remote[1:]  # after the end: read back from Redis
    await writer.aclose()
    await reader.aclose()


async def test_a_retried_batch_is_not_stored_twice(store_url):
    memory = RedisMemory(store_url)
    conv = await memory.create_conversation("q")
    writer = await start(memory, conv.id, "retried")
    batch = [StoredEvent(writer.ids.next(), "token", '{"text": "once"}')]
    await memory.append_events({"retried": batch})
    await memory.append_events({"retried": batch})  # its reply was lost: the writer sends it again
    finished, _ = await writer.finish(turn("retried", "q"))
    again = await memory.finish_message("retried", turn("retried", "q"), StoredEvent("1-0", DONE, done_data("done")))
    reader = RedisMemory(store_url)
    events = [e async for e in reader.events("retried")]
    assert [e.type for e in events] == ["token", DONE] and finished and not again
    assert len(await memory.turns(conv.id)) == 1  # the second finish wrote nothing
    await reader.aclose()
    await memory.aclose()


async def test_one_running_turn_per_conversation_across_replicas(store_url):
    one, two = RedisMemory(store_url), RedisMemory(store_url)
    conv = await one.create_conversation("q")
    first = await start(one, conv.id, "first")
    with pytest.raises(ConversationBusy):
        await start(two, conv.id, "second")
    other = await two.create_conversation("another")
    await start(two, other.id, "elsewhere")  # other conversations are not held up
    assert await two.running_message(conv.id) == "first"
    await first.finish(None)
    await start(two, conv.id, "second")  # free again once the first ended
    assert await one.message_status("second") == (conv.id, "running")
    await one.aclose()
    await two.aclose()


async def test_local_memory_runs_one_turn_per_conversation():
    memory = LocalMemory()
    conv = await memory.create_conversation("q")
    first = await start(memory, conv.id, "a")
    with pytest.raises(ConversationBusy):
        await start(memory, conv.id, "b")
    await first.finish(None, "stopped")
    await start(memory, conv.id, "b")


async def test_a_deleted_conversation_takes_no_new_turn_and_a_late_end_writes_nothing(memory):
    conv = await memory.create_conversation("q")
    writer = await start(memory, conv.id, "late")
    with pytest.raises(ConversationBusy):  # not while its turn runs (the API stops it first)
        await memory.delete_conversation(conv.id)
    assert await memory.get_conversation(conv.id) is not None
    await writer.finish(turn("late", "q"), "stopped")
    assert await memory.delete_conversation(conv.id)
    with pytest.raises(ConversationGone):
        await start(memory, conv.id, "after")
    assert await memory.get_conversation(conv.id) is None
    assert conv.id not in [c.id for c in await memory.list_conversations(limit=500)]


async def test_a_turn_that_ends_after_its_conversation_was_deleted_leaves_nothing(store_url):
    one, two = RedisMemory(store_url, lease_s=1), RedisMemory(store_url)
    conv = await one.create_conversation("q", owner="late-owner")
    writer = await start(one, conv.id, "orphan", owner="late-owner")
    await asyncio.sleep(1.2)  # the lease (and so the lock) ran out: the delete goes through
    assert await two.delete_conversation(conv.id)
    finished, _ = await writer.finish(turn("orphan", "q"))
    assert not finished  # its message went with the conversation
    client = redis_client(store_url)
    assert await client.keys(f"{schema.conversation(conv.id)}*") == [] and not await client.exists(
        schema.message_index("orphan")
    )
    assert await client.zscore(schema.LEASES, schema.lease_member(conv.id, "orphan")) is None
    assert await two.list_conversations("late-owner") == []
    await client.aclose()
    await one.aclose()
    await two.aclose()


async def test_a_dead_replicas_turn_is_reaped_with_what_it_showed(store_url):
    dead, alive = RedisMemory(store_url, lease_s=1), RedisMemory(store_url, lease_s=1)
    conv = await dead.create_conversation("Who designed it?", owner="reaped-owner")
    assert await dead.acquire_slot("reaped-owner", "dying", 1)
    media = (MediaRef.of("image", b"png"),)
    await dead.start_message("dying", MessageStart(conv.id, "reaped-owner", "Who designed it?", media))
    writer = Writer(dead, "dying")
    source = {"n": 1, "url": "https://e.org/a", "title": "A", "domain": "e.org", "snippet": "Eiffel's firm."}
    await writer.events(
        ("query", json.dumps({"type": "query", "query": "eiffel tower designer", "round": 1})),
        ("sources", json.dumps({"type": "sources", "round": 1, "sources": [source]})),
        ("token", json.dumps({"type": "token", "text": "Gustave Eiffel's company"})),
    )
    assert not await alive.reap("dying")  # the lease still runs: alive
    assert await alive.reap_expired() == []
    dead._live.clear()  # the replica dies: nobody renews the lease

    async def follow():
        return [(e.type, json.loads(e.data)) async for e in alive.events("dying")]

    events = await asyncio.wait_for(follow(), 15)  # the follower notices the lease ran out and reaps it
    assert [t for t, _ in events[-2:]] == ["error", DONE] and events[-1][1]["status"] == "failed"
    assert events[-2][1]["code"] == "interrupted"
    [stored] = await alive.turns(conv.id)
    assert stored.status == "failed" and stored.error.code == "interrupted" and stored.record.media == list(media)
    assert stored.record.answer.answer == "Gustave Eiffel's company"
    assert [n.code for n in stored.record.answer.notes] == ["interrupted"]
    assert [s.url for s in stored.record.answer.sources] == ["https://e.org/a"]
    assert stored.record.answer.queries == ["eiffel tower designer"]
    assert await alive.running_message(conv.id) is None  # the conversation is free
    assert await alive.acquire_slot("reaped-owner", "next", 1)  # and the owner's slot
    await dead.aclose()
    await alive.aclose()


async def test_renewed_leases_keep_a_turn_alive_and_expired_ones_are_swept(store_url):
    one, two = RedisMemory(store_url, lease_s=1), RedisMemory(store_url, lease_s=1)
    alive = await one.create_conversation("alive")
    dead = await one.create_conversation("dead")
    await start(one, alive.id, "renewed")
    await start(one, dead.id, "abandoned")
    for _ in range(4):  # past the lease, renewing only one of them
        await asyncio.sleep(0.4)
        await one.renew(["renewed"], [])
    reaped = await two.reap_expired()  # other tests' abandoned turns in this Redis go too
    assert "abandoned" in reaped and "renewed" not in reaped
    assert await two.message_status("renewed") == (alive.id, "running")
    assert [t.status for t in await two.turns(dead.id)] == ["failed"] and await two.turns(alive.id) == []
    await one.aclose()
    await two.aclose()


async def test_slots_expire_with_their_lease_unless_renewed(memory):
    memory.lease_s = 0.3
    assert await memory.acquire_slot("slot-owner", "kept", 2)
    assert await memory.acquire_slot("slot-owner", "lost", 2)
    assert not await memory.acquire_slot("slot-owner", "third", 2)
    for _ in range(3):
        await asyncio.sleep(0.15)
        await memory.renew([], [("slot-owner", "kept")])
    assert await memory.acquire_slot("slot-owner", "third", 2)  # "lost" expired, "kept" did not
    assert not await memory.acquire_slot("slot-owner", "fourth", 2)


async def test_a_stop_request_reaches_the_other_replica(store_url):
    one, two = RedisMemory(store_url), RedisMemory(store_url)
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


def test_event_ids_are_checked_and_generated_in_order():
    assert event_id_key("1700000000000-3") == (1700000000000, 3) and event_id_key("2-0") > event_id_key("1-9")
    assert event_id_key(f"{2**64 - 1}-{2**64 - 1}") == (2**64 - 1, 2**64 - 1)
    for bad in ("", "abc", "1-", "-1", "1-2-3", "１-0", f"{2**64}-0", f"0-{2**64}"):
        with pytest.raises(ValueError, match="not an event id"):
            event_id_key(bad)
    ids = EventIds()
    made = [ids.next() for _ in range(1000)]
    assert sorted(made, key=event_id_key) == made and len(set(made)) == 1000


async def test_stored_failed_turns_keep_their_error(memory):
    conv = await memory.create_conversation("q")
    writer = await start(memory, conv.id, "broken")
    failed = turn("broken", "q", "", "failed").model_copy(
        update={"error": ErrorEvent(code="engine_unavailable", message="The model engine is unavailable.")}
    )
    await writer.finish(failed, "failed")
    [stored] = await memory.turns(conv.id)
    assert stored.status == "failed" and stored.error.code == "engine_unavailable"


async def test_a_new_conversation_starts_in_one_step_and_a_refused_start_keeps_nothing(memory):
    conv = Conversation.new("q", "one-step-owner")
    await memory.start_message("s1", MessageStart(conv.id, "one-step-owner", "q"), new=conv, slots=2)
    assert (await memory.get_conversation(conv.id)).title == "q" and await memory.running_message(conv.id) == "s1"
    assert [c.id for c in await memory.list_conversations("one-step-owner")] == [conv.id]
    other = await memory.create_conversation("other", owner="one-step-owner")
    with pytest.raises(ConversationBusy):  # the slot it took is given back
        await memory.start_message("s2", MessageStart(conv.id, "one-step-owner", "again"), slots=2)
    assert await memory.message_status("s2") is None
    await memory.start_message("s3", MessageStart(other.id, "one-step-owner", "q"), slots=2)  # s1, s3: full
    refused = Conversation.new("refused", "one-step-owner")
    with pytest.raises(TooManyTurns, match="2 turns are already running"):
        await memory.start_message("s4", MessageStart(refused.id, "one-step-owner", "refused"), new=refused, slots=2)
    assert await memory.get_conversation(refused.id) is None and await memory.message_status("s4") is None
    assert refused.id not in [c.id for c in await memory.list_conversations("one-step-owner")]
    assert await Writer(memory, "s1").finish(turn("s1", "q"))  # the end frees its slot
    await memory.start_message("s5", MessageStart(conv.id, "one-step-owner", "next"), slots=2)
    assert not await memory.acquire_slot("one-step-owner", "probe", 2)  # s3 and s5


async def test_a_turn_is_one_round_trip_to_start_one_per_batch_and_one_to_end(redis_url, monkeypatch):
    from redis.asyncio.connection import AbstractConnection

    memory = RedisMemory(redis_url)
    sent = []
    send = AbstractConnection.send_packed_command

    async def counted(self, command, check_health=True):
        sent.append(command)
        return await send(self, command, check_health)

    async def one_turn(mid: str) -> None:
        conv = Conversation.new("q", "round-trip-owner")
        await memory.start_message(mid, MessageStart(conv.id, "round-trip-owner", "q"), new=conv, slots=8)
        writer = Writer(memory, mid)
        await writer.events(("token", '{"text": "a"}'), ("token", '{"text": "b"}'))
        await writer.events(("answer", "{}"))
        assert (await writer.finish(turn(mid, "q")))[0]

    await one_turn("warm-up")  # connected, the schema checked, the scripts known to the server
    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    await one_turn("counted")
    assert len(sent) == 4  # start, two batches, end: nothing read first, no health-check PING
    await memory.aclose()


async def test_scripts_a_server_lost_are_sent_again(store_url):
    memory = RedisMemory(store_url)
    conv = await memory.create_conversation("q")
    client = redis_client(store_url)
    await client.script_flush()  # as after a restart or a failover
    writer = await start(memory, conv.id, "after-flush")  # a pipeline of scripts
    await client.script_flush()
    await writer.events(("token", "{}"))  # a script alone
    await client.aclose()
    assert (await writer.finish(turn("after-flush", "q")))[0]
    assert [t.message_id for t in await memory.turns(conv.id)] == ["after-flush"]
    await memory.aclose()


async def test_a_listing_entry_without_its_conversation_is_hidden_and_dropped_once_old(store_url):
    memory, client = RedisMemory(store_url), redis_client(store_url, decode_responses=True)
    listing = schema.owner_keys("stale-owner")[0]
    await client.zadd(listing, {"starting": time.time(), "expired": time.time() - 3600})
    kept = await memory.create_conversation("kept", owner="stale-owner")
    assert [c.id for c in await memory.list_conversations("stale-owner")] == [kept.id]
    assert set(await client.zrange(listing, 0, -1)) == {kept.id, "starting"}  # it may be mid-start: kept a while
    await client.aclose()
    await memory.aclose()


async def test_a_store_of_the_previous_schema_is_moved_once(tmp_path):
    import redis.asyncio as redis

    from scripts.net import RedisServer

    server = RedisServer(tmp_path).start()
    client = redis.from_url(server.url, decode_responses=True)
    memory = RedisMemory(server.url)
    try:
        old = "megrez:conv:old1"
        await client.hset(
            old, mapping={"id": "old1", "title": "Who?", "created": 1.0, "updated": 2.0, "owner": "key-a"}
        )
        await client.rpush(f"{old}:turns", turn("m-old", "Who?").model_dump_json())
        await client.sadd(f"{old}:messages", "m-old")
        await client.hset("megrez:msg:m-old", mapping={"conversation_id": "old1", "status": "done"})
        await client.xadd("megrez:msg:m-old:events", {"type": "done", "data": done_data("done")})
        await client.zadd("megrez:convs:key-a", {"old1": 2.0})
        await client.zadd("megrez:leases", {"m-old": 1.0})
        for key in (old, f"{old}:turns", "megrez:convs:key-a"):
            await client.expire(key, 5000)
        [moved] = await memory.list_conversations("key-a")
        assert moved.id == "old1" and moved.title == "Who?" and moved.owner == "key-a"
        assert [t.message_id for t in await memory.turns("old1")] == ["m-old"]
        for key in (*schema.conversation_keys("old1")[:2], schema.owner_keys("key-a")[0]):
            assert 4000 < await client.ttl(key) <= 5000  # lifetimes kept
        assert await client.keys("megrez:conv:*") == await client.keys("megrez:convs:*") == []
        assert await client.keys("megrez:msg:*") == [] and not await client.exists("megrez:leases")
        assert await client.get(schema.SCHEMA) == schema.SCHEMA_VERSION
        await (await start(memory, "old1", "m-new", owner="key-a")).finish(turn("m-new", "And?"))
        assert [t.message_id for t in await memory.turns("old1")] == ["m-old", "m-new"]
    finally:
        await client.aclose()
        await memory.aclose()
        server.stop()
