"""Conversation memory and event streams on Redis (redis-py asyncio): what is kept, where, how long.

Every key is under ``megrez:``:

=================================  ======  ===============================================================
key                                type    what
=================================  ======  ===============================================================
``megrez:conv:{cid}``              hash    ``id``, ``title`` (first question), ``created``, ``updated``, ``owner``
``megrez:conv:{cid}:turns``        list    one JSON :class:`StoredTurn` per turn, oldest first
``megrez:conv:{cid}:running``      string  the message id of the conversation's running turn (its lock)
``megrez:convs:{owner}``           zset    the owner's conversation ids scored by last update (newest first)
``megrez:slots:{owner}``           zset    the owner's running turns scored by when their slot expires
``megrez:msg:{mid}``               hash    ``conversation_id``, ``status`` (running/done/stopped/failed)
``megrez:msg:{mid}:events``        stream  the message's events, in order: fields ``type`` and ``data`` (JSON)
``megrez:media:{sha256}``          string  an uploaded image or clip, stored once by content hash
``megrez:stop``                    pubsub  message ids to stop, heard by the replica that runs them
``megrez:rate*``                   (many)  rate-limit windows, kept by the ``limits`` package (api/access.py)
=================================  ======  ===============================================================

Lifetimes: conversations (hash, turns, media) live ``conversation_ttl_s`` (default 30 days) from
their last write; a message's event stream and status ``stream_ttl_s`` (default 1 hour), long enough
to resume, not to archive (the turn itself is in the conversation). A conversation's lock lives
``LOCK_TTL_S`` and is renewed by every write of its turn's events, so a replica that dies mid-turn
frees the conversation a few minutes later instead of never.

A turn is written **atomically** (one MULTI/EXEC): the turn, the conversation's ``updated``, its place
in the listing and the renewed TTLs land together or not at all, so a crash never leaves half a
turn. Events are appended with one pipeline per batch of ``XADD`` s. Followers on this replica read
the message's :class:`api.memory.LiveStream`; elsewhere they resume after the id they last saw and
follow with blocking ``XREAD`` until ``done``.

Failures: a Redis error raises :class:`StoreUnavailable` (the API answers 503 at once); the client
reconnects by itself on the next call, so the service works again without a restart when Redis is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence

from api.memory import (
    ANONYMOUS,
    DONE,
    SLOT_TTL_S,
    Conversation,
    ConversationBusy,
    LiveStream,
    MessageStatus,
    StoredEvent,
    StoredTurn,
    StoreUnavailable,
    done_data,
    new_id,
    title_of,
)

log = logging.getLogger(__name__)

FOLLOW_BLOCK_MS = 15_000  # one blocking read; the follower loops (and the SSE layer sends heartbeats)
LOCK_TTL_S = 300
STOP_CHANNEL = "megrez:stop"
# Release the conversation's lock only if it is still this message's (a lock that expired and was
# taken by a newer turn must stay).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Take one of an owner's turn slots if fewer than the limit are live (expired ones are dropped first).
_ACQUIRE = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('zadd', KEYS[1], ARGV[2], ARGV[4])
redis.call('expire', KEYS[1], ARGV[5])
return 1
"""


class RedisMemory:
    """The :class:`api.memory.Memory` interface on Redis; see the module docstring for the keys.

    Example::

        memory = RedisMemory("redis://localhost:6379/0")
        await memory.ping()  # raises StoreUnavailable when Redis is down
    """

    def __init__(
        self,
        url: str,
        *,
        conversation_ttl_s: int = 30 * 86400,
        stream_ttl_s: int = 3600,
        max_connections: int = 8192,
    ) -> None:
        import redis.asyncio as redis

        # Followers of other replicas' turns each hold a connection during a blocking XREAD: redis-py's
        # default pool of 100 would refuse the 101st (Redis itself allows 10,000 clients by default).
        self._redis = redis.from_url(
            url, decode_responses=True, health_check_interval=15, max_connections=max_connections
        )
        self._media_redis = redis.from_url(url, decode_responses=False)
        self.conversation_ttl_s = conversation_ttl_s
        self.stream_ttl_s = stream_ttl_s
        self._live: dict[str, LiveStream] = {}  # messages this process started, until they end

    async def _call(self, operation):
        import redis.exceptions

        try:
            return await operation
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def create_conversation(self, question: str, owner: str = ANONYMOUS) -> Conversation:
        now = time.time()
        conv = Conversation(id=new_id(), title=title_of(question), created=now, updated=now, owner=owner)
        key = f"megrez:conv:{conv.id}"
        async with self._redis.pipeline(transaction=True) as tx:
            tx.hset(key, mapping=conv.model_dump())
            tx.expire(key, self.conversation_ttl_s)
            tx.zadd(f"megrez:convs:{owner}", {conv.id: now})
            tx.expire(f"megrez:convs:{owner}", self.conversation_ttl_s)
            await self._call(tx.execute())
        return conv

    async def get_conversation(self, cid: str) -> Conversation | None:
        data = await self._call(self._redis.hgetall(f"megrez:conv:{cid}"))
        return Conversation.model_validate(data) if data else None

    async def list_conversations(self, owner: str = ANONYMOUS, limit: int = 50) -> list[Conversation]:
        listing = f"megrez:convs:{owner}"
        ids = await self._call(self._redis.zrevrange(listing, 0, max(0, limit - 1)))
        found = [await self.get_conversation(cid) for cid in ids]
        stale = [cid for cid, conv in zip(ids, found, strict=True) if conv is None]  # expired by TTL
        if stale:
            await self._call(self._redis.zrem(listing, *stale))
        return [conv for conv in found if conv is not None]

    async def delete_conversation(self, cid: str) -> bool:
        owner = await self._call(self._redis.hget(f"megrez:conv:{cid}", "owner"))
        async with self._redis.pipeline(transaction=True) as tx:
            tx.delete(f"megrez:conv:{cid}", f"megrez:conv:{cid}:turns")
            tx.zrem(f"megrez:convs:{owner or ANONYMOUS}", cid)
            deleted, _ = await self._call(tx.execute())
        return bool(deleted)

    async def acquire_slot(self, owner: str, slot: str, limit: int) -> bool:
        now = time.time()
        args = (now, now + SLOT_TTL_S, limit, slot, SLOT_TTL_S)
        return bool(await self._call(self._redis.eval(_ACQUIRE, 1, f"megrez:slots:{owner}", *args)))

    async def release_slot(self, owner: str, slot: str) -> None:
        await self._call(self._redis.zrem(f"megrez:slots:{owner}", slot))

    async def turns(self, cid: str) -> list[StoredTurn]:
        rows = await self._call(self._redis.lrange(f"megrez:conv:{cid}:turns", 0, -1))
        return [StoredTurn.model_validate_json(row) for row in rows]

    async def add_turn(self, cid: str, turn: StoredTurn) -> None:
        now = time.time()
        key, turns = f"megrez:conv:{cid}", f"megrez:conv:{cid}:turns"
        owner = await self._call(self._redis.hget(key, "owner")) or ANONYMOUS
        async with self._redis.pipeline(transaction=True) as tx:
            tx.rpush(turns, turn.model_dump_json())
            tx.hset(key, "updated", now)
            tx.zadd(f"megrez:convs:{owner}", {cid: now})
            tx.expire(key, self.conversation_ttl_s)
            tx.expire(turns, self.conversation_ttl_s)
            await self._call(tx.execute())

    async def start_message(self, cid: str, mid: str) -> None:
        if not await self._call(self._redis.set(f"megrez:conv:{cid}:running", mid, nx=True, ex=LOCK_TTL_S)):
            raise ConversationBusy(f"conversation {cid} is answering another question")
        self._live[mid] = LiveStream(cid)  # before the first await below: followers may come at once
        key = f"megrez:msg:{mid}"
        try:
            async with self._redis.pipeline(transaction=True) as tx:
                tx.hset(key, mapping={"conversation_id": cid, "status": "running"})
                tx.expire(key, self.stream_ttl_s)
                await self._call(tx.execute())
        except BaseException:
            self._live.pop(mid, None)
            await self._call(self._redis.eval(_RELEASE, 1, f"megrez:conv:{cid}:running", mid))
            raise

    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None:
        live = self._live.get(mid)
        if live is not None:
            return live.conversation_id, live.status
        data = await self._call(self._redis.hgetall(f"megrez:msg:{mid}"))
        return (data["conversation_id"], data["status"]) if data else None

    async def append_events(self, mid: str, events: Sequence[tuple[str, str]]) -> list[str]:
        key = f"megrez:msg:{mid}:events"
        live = self._live.get(mid)
        async with self._redis.pipeline(transaction=False) as pipe:
            for type_, data in events:
                pipe.xadd(key, {"type": type_, "data": data})
            pipe.expire(key, self.stream_ttl_s)
            if live is not None:
                pipe.expire(f"megrez:conv:{live.conversation_id}:running", LOCK_TTL_S)
            ids = (await self._call(pipe.execute()))[: len(events)]
        if live is not None:
            live.add([StoredEvent(i, t, d) for i, (t, d) in zip(ids, events, strict=True)])
        return ids

    async def end_message(self, mid: str, status: MessageStatus) -> str:
        key, live = f"megrez:msg:{mid}", self._live.get(mid)
        async with self._redis.pipeline(transaction=True) as tx:
            # The lock goes in the same transaction: a client that saw ``done`` may ask again at once.
            if live is not None:
                tx.eval(_RELEASE, 1, f"megrez:conv:{live.conversation_id}:running", mid)
            tx.xadd(f"{key}:events", {"type": DONE, "data": done_data(status)})
            tx.hset(key, "status", status)
            event_id = (await self._call(tx.execute()))[-2]
        if live is not None:
            del self._live[mid]
            live.end(StoredEvent(event_id, DONE, done_data(status)), status)
        return event_id

    async def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]:
        live = self._live.get(mid)
        if live is not None:  # this replica runs the turn: its events are here, no round trip per event
            async for event in live.follow(after):
                yield event
            return
        key, position = f"megrez:msg:{mid}:events", after or "0-0"
        status = await self.message_status(mid)
        while status is not None:  # None: unknown or expired
            block = FOLLOW_BLOCK_MS if status[1] == "running" else None
            reply = await self._call(self._redis.xread({key: position}, block=block))
            for _, entries in reply or ():
                for event_id, fields in entries:
                    position = event_id
                    yield StoredEvent(event_id, fields["type"], fields["data"])
                    if fields["type"] == DONE:
                        return
            if not reply:
                if status[1] != "running":
                    return  # ended without its done event (a crashed writer): everything was read
                status = await self.message_status(mid)  # only after a quiet spell: has it expired or ended?

    async def request_stop(self, mid: str) -> None:
        await self._call(self._redis.publish(STOP_CHANNEL, mid))

    async def stop_requests(self) -> AsyncIterator[str]:
        """Message ids other replicas were asked to stop; survives Redis restarts (resubscribes)."""
        import redis.exceptions

        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(STOP_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield message["data"]
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                log.warning("stop requests: Redis unavailable (%s); retrying in 1 s", exc)
                await asyncio.sleep(1)
            finally:
                await pubsub.aclose()

    async def put_media(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        await self._call(self._media_redis.set(f"megrez:media:{digest}", data, ex=self.conversation_ttl_s, nx=True))
        return digest

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._media_redis.aclose()
