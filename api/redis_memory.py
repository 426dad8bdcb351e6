"""Conversation memory and event streams on Redis — one server or a Redis Cluster (redis-py asyncio).

The keys, the Lua scripts, which step touches what in which order, how steps run (pipelines, scripts a
server lost, connections) and the upgrade from the previous schema are in ``api/redis_schema.py``. A
cluster is named by a ``redis+cluster://`` URL (what ``MEGREZ_REDIS_CLUSTER=true`` makes of
``MEGREZ_REDIS_URL``); every step keeps to the hash slots of its keys, so the same code serves both.

**Round trips.** A turn costs its store a handful: its start is one pipeline (the owner's slot, the
conversation — created in the same script when it is new —, the message, the lease index, the message's
``mid`` key), each batch of events one script call (``append``: the batch's ``XADD`` s and the stream's
lifetime in one command), its end one pipeline (turn, ``done``, status and lock; the listing's order and
the slot; the lease index). Nothing is read first: what the end needs (conversation, owner) is kept here
from the start.

Followers on this replica read the message's :class:`api.memory.LiveStream`; elsewhere they resume after
the id they last saw and follow with blocking ``XREAD`` (shorter than the socket timeout) until ``done``,
reaping the message if its lease ran out meanwhile. Stop requests go over plain pub/sub, which a cluster
forwards to every node, so a listener on any node hears them.

Failures: a Redis error raises :class:`StoreUnavailable` within about two seconds (few, quick retries:
the API answers 503 and the turn runner retries on its own schedule); the client reconnects by itself
on the next call, so the service works again without a restart when Redis is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.events import ErrorEvent, MediaRef, Note
from api import redis_schema as schema
from api.memory import (
    ANONYMOUS,
    DONE,
    Conversation,
    ConversationBusy,
    ConversationGone,
    LiveStream,
    MessageStart,
    MessageStatus,
    StoredEvent,
    StoredTurn,
    StoreUnavailable,
    TooManyTurns,
    done_data,
)

log = logging.getLogger(__name__)

FOLLOW_BLOCK_MS = 5_000  # one blocking read: well under the socket timeout (redis-py would cut it off)
STALE_LISTING_S = 60.0  # a listing entry without its conversation is dropped once older: it may be mid-start
REAPED = ErrorEvent(
    code="interrupted",
    message="The server answering this question stopped before it finished; please ask again.",
)


@dataclass(slots=True)
class _Here:
    """A message this process started, until it ends: its events in memory, and what its keys are made of."""

    stream: LiveStream
    start: MessageStart


class RedisMemory:
    """The :class:`api.memory.Memory` interface on Redis; see ``api/redis_schema.py`` for the keys.

    Example::

        memory = RedisMemory("redis://localhost:6379/0")  # or "redis+cluster://any-node:6379"
        await memory.ping()  # raises StoreUnavailable when Redis is down
    """

    def __init__(
        self,
        url: str,
        *,
        conversation_ttl_s: int = 30 * 86400,
        stream_ttl_s: int = 3600,
        lease_s: float = 15.0,
        max_connections: int = 8192,
    ) -> None:
        """``url``: ``redis://…`` (``rediss://`` with TLS) or ``redis+cluster://…``; ``max_connections``: per
        server (followers of other replicas' turns hold one each)."""
        self._steps = schema.RedisSteps(url, max_connections=max_connections)
        self._redis, self.cluster = self._steps.redis, self._steps.cluster
        self._call, self._pipeline, self._script = self._steps.call, self._steps.pipeline, self._steps.script
        self.conversation_ttl_s = conversation_ttl_s
        self.stream_ttl_s = stream_ttl_s
        self.lease_s = lease_s
        self._live: dict[str, _Here] = {}  # messages this process started, until they end

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def create_conversation(self, question: str, owner: str = ANONYMOUS) -> Conversation:
        conv = Conversation.new(question, owner)
        listing = schema.owner_keys(owner)[0]

        def build(pipe) -> None:
            pipe.hset(schema.conversation(conv.id), mapping=conv.model_dump())
            pipe.expire(schema.conversation(conv.id), self.conversation_ttl_s)
            pipe.zadd(listing, {conv.id: conv.created})
            pipe.expire(listing, self.conversation_ttl_s)

        await self._pipeline(build)
        return conv

    async def get_conversation(self, cid: str) -> Conversation | None:
        data = await self._call(self._redis.hgetall(schema.conversation(cid)))
        return Conversation.model_validate(data) if data else None

    async def list_conversations(self, owner: str = ANONYMOUS, limit: int = 50) -> list[Conversation]:
        listing = schema.owner_keys(owner)[0]
        rows = await self._call(self._redis.zrevrange(listing, 0, max(0, limit - 1), withscores=True))
        if not rows:
            return []
        found = await self._pipeline(lambda pipe: [pipe.hgetall(schema.conversation(cid)) for cid, _ in rows])
        cutoff = time.time() - STALE_LISTING_S
        stale = [cid for (cid, score), data in zip(rows, found, strict=True) if not data and score < cutoff]
        if stale:  # expired by TTL, or deleted while the listing's step failed
            await self._call(self._redis.zrem(listing, *stale))
        return [Conversation.model_validate(data) for data in found if data]

    async def rename_conversation(self, cid: str, title: str) -> Conversation | None:
        """Give conversation ``cid`` the title ``title`` (already checked: one line); ``None`` if it does not exist.

        One script checks and writes, so a conversation deleted (or expired) meanwhile is never recreated as a
        bare hash; ``updated``, the listing's order and the lifetime stay as they were.
        """
        fields = await self._script("rename", [schema.conversation(cid)], [title])
        return Conversation.model_validate(dict(zip(fields[::2], fields[1::2], strict=True))) if fields else None

    async def running_message(self, cid: str) -> str | None:
        return await self._call(self._redis.get(schema.conversation_keys(cid)[3]))

    async def delete_conversation(self, cid: str) -> bool:
        result = await self._script("delete", schema.conversation_keys(cid), [f"{schema.conversation(cid)}:msg:"])
        if result[0] == -1:
            raise ConversationBusy(f"conversation {cid} is answering a question")
        existed, owner, mids = result[0], result[1], result[2:]

        def cleanup(pipe) -> None:
            if owner:
                pipe.zrem(schema.owner_keys(owner)[0], cid)
            for mid in mids:
                pipe.zrem(schema.LEASES, schema.lease_member(cid, mid))
                pipe.delete(schema.message_index(mid))

        if owner or mids:
            try:
                await self._pipeline(cleanup)
            except StoreUnavailable as exc:  # it heals (api/redis_schema.py): the conversation is gone already
                log.warning("conversation %s deleted; its listing entry and message index not yet (%s)", cid, exc)
        return bool(existed)

    async def acquire_slot(self, owner: str, slot: str, limit: int) -> bool:
        args = [self._lease_ms, limit, slot, "", self.conversation_ttl_s]
        return bool(await self._script("acquire", schema.owner_keys(owner), args))

    async def release_slot(self, owner: str, slot: str) -> None:
        await self._call(self._redis.zrem(schema.owner_keys(owner)[1], slot))

    async def renew(self, messages: Iterable[str], slots: Iterable[tuple[str, str]]) -> None:
        live = [(mid, here.start.conversation_id) for mid in messages if (here := self._live.get(mid)) is not None]
        by_owner: dict[str, list[str]] = {}
        for owner, slot in slots:
            by_owner.setdefault(owner, []).append(slot)

        def build(pipe) -> None:
            for mid, cid in live:
                keys = [schema.conversation_keys(cid)[3], schema.message(cid, mid)]
                schema.queue(pipe, "renew", keys, [mid, self._lease_ms])
            if live:
                members = [schema.lease_member(cid, mid) for mid, cid in live]
                schema.queue(pipe, "index", [schema.LEASES], [self._lease_ms, "XX", *members])
            for owner, owned in by_owner.items():
                schema.queue(pipe, "renew_slots", [schema.owner_keys(owner)[1]], [self._lease_ms, *owned])

        if live or by_owner:
            await self._pipeline(build)

    async def turns(self, cid: str) -> list[StoredTurn]:
        rows = await self._call(self._redis.lrange(schema.conversation_keys(cid)[1], 0, -1))
        return [StoredTurn.model_validate_json(row) for row in rows]

    async def start_message(
        self, mid: str, start: MessageStart, *, new: Conversation | None = None, slots: int | None = None
    ) -> None:
        cid, owner = start.conversation_id, start.owner
        member = schema.lease_member(cid, mid)
        media = json.dumps([m.model_dump() for m in start.media])
        created = ["1", new.title, new.created] if new is not None else ["0", "", ""]
        self._live[mid] = _Here(LiveStream(cid), start)  # before the first await: followers may come at once

        def build(pipe) -> None:
            if slots is not None:
                args = [self._lease_ms, slots, mid, cid if new is not None else "", self.conversation_ttl_s]
                schema.queue(pipe, "acquire", schema.owner_keys(owner), args)
            args = [mid, self._lease_ms, self.stream_ttl_s, self.conversation_ttl_s, cid, owner, start.question]
            keys = [*schema.conversation_keys(cid), schema.message(cid, mid)]
            schema.queue(pipe, "start", keys, [*args, media, *created])
            schema.queue(pipe, "index", [schema.LEASES], [self._lease_ms, "", member])
            pipe.set(schema.message_index(mid), cid, ex=self.stream_ttl_s)

        try:
            results = await self._pipeline(build)
        except BaseException:
            self._live.pop(mid, None)
            raise
        taken, started = results[:2] if slots is not None else (1, results[0])
        if taken and started == "ok":
            return
        self._live.pop(mid, None)

        def undo(pipe) -> None:  # a refusal leaves nothing behind
            if started == "ok":
                keys = [*schema.conversation_keys(cid), schema.message(cid, mid)]
                schema.queue(pipe, "undo", keys, [mid, "1" if new is not None else "0"])
            if taken and slots is not None:
                pipe.zrem(schema.owner_keys(owner)[1], mid)
            if new is not None:
                pipe.zrem(schema.owner_keys(owner)[0], cid)
            pipe.zrem(schema.LEASES, member)
            pipe.delete(schema.message_index(mid))

        await self._pipeline(undo)
        if not taken:
            raise TooManyTurns.at(slots or 0)
        if started == "gone":
            raise ConversationGone(f"unknown conversation {cid}")
        raise ConversationBusy(f"conversation {cid} is answering another question")

    async def _find(self, mid: str) -> tuple[str, dict[str, str]] | None:
        """A message's conversation id and hash, by its id alone; ``None`` if unknown, expired or deleted."""
        cid = await self._call(self._redis.get(schema.message_index(mid)))
        data = await self._call(self._redis.hgetall(schema.message(cid, mid))) if cid is not None else {}
        return (cid, data) if "status" in data else None

    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None:
        here = self._live.get(mid)
        if here is not None:
            return here.stream.conversation_id, here.stream.status
        found = await self._find(mid)
        return (found[0], found[1]["status"]) if found is not None else None  # type: ignore[return-value]

    def show(self, mid: str, events: Sequence[StoredEvent]) -> None:
        here = self._live.get(mid)
        if here is not None:
            here.stream.add(events)

    async def append_events(self, batches: Mapping[str, Sequence[StoredEvent]]) -> None:
        cids = {}
        for mid in batches:
            here = self._live.get(mid)
            cids[mid] = here.start.conversation_id if here is not None else (await self._find(mid) or ("",))[0]
        known = {mid: cid for mid, cid in cids.items() if cid}  # else deleted or expired: nothing to append to

        def build(pipe) -> None:
            for mid, cid in known.items():
                self._queue_append(pipe, cid, mid, batches[mid])

        if known:
            await self._pipeline(build)

    def _queue_append(self, pipe, cid: str, mid: str, events: Sequence[StoredEvent]) -> None:
        """Queue the ``append`` script for ``events`` of message ``mid`` (conversation ``cid``) in ``pipe``."""
        args: list[Any] = [self.stream_ttl_s]
        for event in events:
            args += [event.id, event.type, event.data]
        schema.queue(pipe, "append", [schema.message(cid, mid), schema.events(cid, mid)], args)

    async def finish_message(
        self, mid: str, turn: StoredTurn | None, done: StoredEvent, last: Sequence[StoredEvent] = ()
    ) -> bool:
        here = self._live.get(mid)
        if here is not None:
            cid, owner = here.start.conversation_id, here.start.owner
        elif (found := await self._find(mid)) is not None:
            cid, owner = found[0], found[1].get("owner", ANONYMOUS)
        else:
            return False  # unknown, or deleted with its conversation
        status = json.loads(done.data)["status"]
        turn_json = turn.model_dump_json() if turn is not None else ""

        def build(pipe) -> None:
            if last:  # first: the append refuses once the message is no longer running
                self._queue_append(pipe, cid, mid, last)
            keys = [*schema.conversation_keys(cid), schema.message(cid, mid), schema.events(cid, mid)]
            args = [mid, done.id, done.data, status, turn_json, self.conversation_ttl_s, self.stream_ttl_s]
            schema.queue(pipe, "finish", keys, args)
            moved = cid if turn is not None else ""
            schema.queue(pipe, "owner_end", schema.owner_keys(owner), [moved, mid, self.conversation_ttl_s])
            pipe.zrem(schema.LEASES, schema.lease_member(cid, mid))
            pipe.expire(schema.message_index(mid), self.stream_ttl_s)

        finished = bool((await self._pipeline(build))[1 if last else 0])
        self.end_here(mid, [done])
        return finished

    def end_here(self, mid: str, events: Sequence[StoredEvent]) -> None:
        here = self._live.pop(mid, None)
        if here is not None:
            here.stream.end(events)

    async def reap(self, mid: str) -> bool:
        """Store ``mid`` as failed and end its stream if its lease has ended (its replica died); ``False``
        if it is alive, already ended or unknown."""
        found = await self._find(mid)
        return found is not None and await self._reap(found[0], mid, found[1])

    async def _reap(self, cid: str, mid: str, data: dict[str, str]) -> bool:
        from api.records import agent_events, partial_record

        member = schema.lease_member(cid, mid)
        if data.get("status") != "running":  # ended, deleted or never started: only its index entry is left
            await self._call(self._redis.zrem(schema.LEASES, member))
            return False
        if float(data.get("lease", 0)) > time.time() + 1:
            return False  # alive by this replica's clock (with a second of slack: the script decides)
        owner = data.get("owner", ANONYMOUS)
        media = tuple(MediaRef.model_validate(m) for m in json.loads(data.get("media") or "[]"))
        start = MessageStart(cid, owner, data.get("question", ""), media)
        rows = await self._call(self._redis.xrange(schema.events(cid, mid)))
        events = agent_events(StoredEvent(i, f.get("type", ""), f.get("data", "")) for i, f in rows)
        note = Note(code="interrupted", message="interrupted: the server answering it stopped")
        record = partial_record(start, events, note=note)
        turn = StoredTurn(message_id=mid, record=record, status="failed", error=REAPED)
        keys = [*schema.conversation_keys(cid), schema.message(cid, mid), schema.events(cid, mid)]
        args = [mid, turn.model_dump_json(), self.conversation_ttl_s, self.stream_ttl_s]
        reaped = await self._script("reap", keys, [*args, REAPED.model_dump_json(), done_data("failed")])
        if reaped == -1:
            return False

        def cleanup(pipe) -> None:
            pipe.zrem(schema.LEASES, member)
            if reaped == 1:  # a /chat turn's slot is its message id
                schema.queue(pipe, "owner_end", schema.owner_keys(owner), [cid, mid, self.conversation_ttl_s])
                pipe.expire(schema.message_index(mid), self.stream_ttl_s)

        await self._pipeline(cleanup)
        if reaped == 1:
            log.warning("turn %s: its lease ran out (the replica running it stopped); stored as failed", mid)
        return reaped == 1

    async def reap_expired(self, skip: Iterable[str] = ()) -> list[str]:
        """Reap every running message whose lease has ended, except ``skip`` (this replica's own)."""
        mine = set(skip) | set(self._live)
        reaped = []
        for member in await self._script("expired", [schema.LEASES], []):
            cid, _, mid = member.partition(":")
            if mid not in mine:
                data = await self._call(self._redis.hgetall(schema.message(cid, mid)))
                if await self._reap(cid, mid, data):
                    reaped.append(mid)
        return reaped

    async def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]:
        here = self._live.get(mid)
        if here is not None:  # this replica runs the turn: its events are here, no round trip per event
            async for event in here.stream.follow(after):
                yield event
            return
        found = await self._find(mid)
        if found is None:
            return  # unknown, expired or deleted
        cid, data = found
        key, position = schema.events(cid, mid), after or "0-0"
        while "status" in data:  # else expired or deleted meanwhile
            running = data["status"] == "running"
            block = FOLLOW_BLOCK_MS if running else None  # a blocking read holds its connection: not a step's
            reply = await self._call(self._steps.follow_redis.xread({key: position}, block=block))
            for _, entries in reply or ():
                for event_id, fields in entries:
                    position = event_id
                    yield StoredEvent(event_id, fields["type"], fields["data"])
                    if fields["type"] == DONE:
                        return
            if not reply:
                if not running:
                    return  # ended without its done event (deleted meanwhile): everything was read
                if float(data.get("lease", 0)) < time.time():
                    await self._reap(cid, mid, data)  # its replica died: the reap writes error and done, read next
                data = await self._call(self._redis.hgetall(schema.message(cid, mid)))  # ended, expired, or died?

    async def request_stop(self, mid: str) -> None:
        await self._call(self._redis.publish(schema.STOP_CHANNEL, mid))

    async def stop_requests(self) -> AsyncIterator[str]:
        """Message ids other replicas were asked to stop; survives Redis restarts (resubscribes)."""
        import redis.exceptions as errors

        while True:
            pubsub = self._steps.follow_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(schema.STOP_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield message["data"]
            except (errors.ConnectionError, errors.TimeoutError, errors.RedisClusterException, OSError) as exc:
                log.warning("stop requests: Redis unavailable (%s); retrying in 1 s", exc)
                await asyncio.sleep(1)
            finally:
                await pubsub.aclose()

    async def put_media(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        await self._call(self._steps.media_redis.set(schema.media(digest), data, ex=self.conversation_ttl_s, nx=True))
        return digest

    async def aclose(self) -> None:
        await self._steps.aclose()
