"""Conversation memory and per-message event streams: Redis when configured, else in-process.

What is kept, and where (Redis; every key under ``megrez:``):

=================================  ======  ===============================================================
key                                type    what
=================================  ======  ===============================================================
``megrez:conv:{cid}``              hash    ``id``, ``title`` (first question, trimmed), ``created``, ``updated``
``megrez:conv:{cid}:turns``        list    one JSON :class:`StoredTurn` per turn, oldest first
``megrez:convs``                   zset    conversation ids scored by last update (newest first listing)
``megrez:msg:{mid}``               hash    ``conversation_id``, ``status`` (running/done/stopped/failed)
``megrez:msg:{mid}:events``        stream  the message's events, in order: fields ``type`` and ``data`` (JSON)
``megrez:media:{sha256}``          string  an uploaded image or clip, stored once by content hash
=================================  ======  ===============================================================

Lifetimes: conversations (hash, turns, media) live ``conversation_ttl_s`` (default 30 days) from
their last write; a message's event stream and status ``stream_ttl_s`` (default 1 hour), long enough
to resume, not to archive (the turn itself is in the conversation).

A turn is written **atomically** (one MULTI/EXEC): the turn, the conversation's ``updated`` and
title, its place in the listing and the renewed TTLs land together or not at all, so a crash never
leaves half a turn. Events are appended with ``XADD``, the last one always ``done`` (``{"type": "done", "status": …}``,
written by :meth:`end_message`); a reader resumes after the id it last saw (the SSE ``Last-Event-ID``)
and follows live with blocking ``XREAD`` until ``done`` — from any replica sharing the Redis.

Failures: a Redis error raises :class:`StoreUnavailable` (the API answers 503 at once); the client
reconnects by itself on the next call, so the service works again without a restart when Redis is back.

:class:`LocalMemory` keeps the same data in process (one process only; nothing survives a restart).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel

from agent.events import TurnRecord

MessageStatus = Literal["running", "done", "stopped", "failed"]
DONE = "done"  # the last event of every message stream: {"type": "done", "status": ...}
TITLE_CHARS = 80
FOLLOW_BLOCK_MS = 15_000  # one blocking read; the follower loops (and the SSE layer sends heartbeats)


class StoreUnavailable(RuntimeError):
    """The memory store (Redis) cannot be reached; nothing was written."""


class Conversation(BaseModel):
    id: str
    title: str
    created: float
    updated: float


class StoredTurn(BaseModel):
    message_id: str
    record: TurnRecord
    status: MessageStatus = "done"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event of a message's stream; ``id`` is what a client sends back as ``Last-Event-ID``."""

    id: str
    type: str
    data: str  # the event's JSON


def title_of(question: str) -> str:
    """The conversation title: its first question on one line, cut at a word near ``TITLE_CHARS``."""
    line = " ".join(question.split())
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0] or line[:TITLE_CHARS]
    return cut + "…"


def new_id() -> str:
    return uuid.uuid4().hex


class Memory(Protocol):
    """What the service needs from a store (see the module docstring for the data)."""

    async def ping(self) -> None: ...
    async def create_conversation(self, question: str) -> Conversation: ...
    async def get_conversation(self, cid: str) -> Conversation | None: ...
    async def list_conversations(self, limit: int = 50) -> list[Conversation]: ...
    async def delete_conversation(self, cid: str) -> bool: ...
    async def turns(self, cid: str) -> list[StoredTurn]: ...
    async def add_turn(self, cid: str, turn: StoredTurn) -> None: ...
    async def start_message(self, cid: str, mid: str) -> None: ...
    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None: ...
    async def append_event(self, mid: str, type_: str, data: str) -> str: ...
    async def end_message(self, mid: str, status: MessageStatus) -> str: ...
    def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]: ...
    async def put_media(self, data: bytes) -> str: ...
    async def aclose(self) -> None: ...


@dataclass
class _LocalMessage:
    conversation_id: str
    status: MessageStatus = "running"
    ended: float | None = None  # time.monotonic() at the end, for expiry
    events: list[StoredEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class LocalMemory:
    """In-process store with the :class:`Memory` interface (one process; lost on restart).

    Example::

        memory = LocalMemory()
        conv = await memory.create_conversation("Who designed the Eiffel Tower?")
    """

    def __init__(self, *, stream_ttl_s: int = 3600) -> None:
        self.stream_ttl_s = stream_ttl_s  # ended messages' streams are dropped after this, as in Redis
        self._conversations: dict[str, Conversation] = {}
        self._turns: dict[str, list[StoredTurn]] = {}
        self._messages: dict[str, _LocalMessage] = {}
        self._media: dict[str, bytes] = {}

    async def ping(self) -> None:
        return None

    async def create_conversation(self, question: str) -> Conversation:
        now = time.time()
        conv = Conversation(id=new_id(), title=title_of(question), created=now, updated=now)
        self._conversations[conv.id] = conv
        self._turns[conv.id] = []
        return conv

    async def get_conversation(self, cid: str) -> Conversation | None:
        return self._conversations.get(cid)

    async def list_conversations(self, limit: int = 50) -> list[Conversation]:
        return sorted(self._conversations.values(), key=lambda c: c.updated, reverse=True)[:limit]

    async def delete_conversation(self, cid: str) -> bool:
        self._turns.pop(cid, None)
        return self._conversations.pop(cid, None) is not None

    async def turns(self, cid: str) -> list[StoredTurn]:
        return list(self._turns.get(cid, []))

    async def add_turn(self, cid: str, turn: StoredTurn) -> None:
        conv = self._conversations[cid]
        self._turns[cid].append(turn)
        self._conversations[cid] = conv.model_copy(update={"updated": time.time()})

    async def start_message(self, cid: str, mid: str) -> None:
        cutoff = time.monotonic() - self.stream_ttl_s
        for old in [m for m, msg in self._messages.items() if msg.ended is not None and msg.ended < cutoff]:
            del self._messages[old]
        self._messages[mid] = _LocalMessage(cid)

    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None:
        message = self._messages.get(mid)
        return None if message is None else (message.conversation_id, message.status)

    async def append_event(self, mid: str, type_: str, data: str) -> str:
        message = self._messages[mid]
        event = StoredEvent(f"{len(message.events) + 1}-0", type_, data)
        message.events.append(event)
        message.changed.set()
        message.changed = asyncio.Event()  # followers wait on the next one
        return event.id

    async def end_message(self, mid: str, status: MessageStatus) -> str:
        event_id = await self.append_event(mid, DONE, json.dumps({"type": DONE, "status": status}))
        self._messages[mid].status = status
        self._messages[mid].ended = time.monotonic()
        return event_id

    async def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]:
        message = self._messages.get(mid)
        if message is None:
            return
        position = _local_position(after)
        while True:
            changed = message.changed
            while position < len(message.events):
                event = message.events[position]
                yield event
                position += 1
                if event.type == DONE:
                    return
            if message.status != "running":
                return
            await changed.wait()

    async def put_media(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self._media.setdefault(digest, data)
        return digest

    async def aclose(self) -> None:
        return None


def _local_position(after: str | None) -> int:
    """Events after ``after`` (ids are ``N-0``, N from 1); anything unreadable replays from the start."""
    try:
        return max(0, int((after or "0").split("-")[0]))
    except ValueError:
        return 0


class RedisMemory:
    """The :class:`Memory` interface on Redis (redis-py asyncio); see the module docstring for the keys.

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

        # Every live stream follower holds a connection during its blocking XREAD: redis-py's default pool
        # of 100 would refuse the 101st open stream (Redis itself allows 10,000 clients by default).
        self._redis = redis.from_url(
            url, decode_responses=True, health_check_interval=15, max_connections=max_connections
        )
        self._media_redis = redis.from_url(url, decode_responses=False)
        self.conversation_ttl_s = conversation_ttl_s
        self.stream_ttl_s = stream_ttl_s

    async def _call(self, operation):
        import redis.exceptions

        try:
            return await operation
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def create_conversation(self, question: str) -> Conversation:
        now = time.time()
        conv = Conversation(id=new_id(), title=title_of(question), created=now, updated=now)
        key = f"megrez:conv:{conv.id}"
        async with self._redis.pipeline(transaction=True) as tx:
            tx.hset(key, mapping={"id": conv.id, "title": conv.title, "created": now, "updated": now})
            tx.expire(key, self.conversation_ttl_s)
            tx.zadd("megrez:convs", {conv.id: now})
            await self._call(tx.execute())
        return conv

    async def get_conversation(self, cid: str) -> Conversation | None:
        data = await self._call(self._redis.hgetall(f"megrez:conv:{cid}"))
        return Conversation.model_validate(data) if data else None

    async def list_conversations(self, limit: int = 50) -> list[Conversation]:
        ids = await self._call(self._redis.zrevrange("megrez:convs", 0, max(0, limit - 1)))
        found = [await self.get_conversation(cid) for cid in ids]
        stale = [cid for cid, conv in zip(ids, found, strict=True) if conv is None]  # expired by TTL
        if stale:
            await self._call(self._redis.zrem("megrez:convs", *stale))
        return [conv for conv in found if conv is not None]

    async def delete_conversation(self, cid: str) -> bool:
        async with self._redis.pipeline(transaction=True) as tx:
            tx.delete(f"megrez:conv:{cid}", f"megrez:conv:{cid}:turns")
            tx.zrem("megrez:convs", cid)
            deleted, _ = await self._call(tx.execute())
        return bool(deleted)

    async def turns(self, cid: str) -> list[StoredTurn]:
        rows = await self._call(self._redis.lrange(f"megrez:conv:{cid}:turns", 0, -1))
        return [StoredTurn.model_validate_json(row) for row in rows]

    async def add_turn(self, cid: str, turn: StoredTurn) -> None:
        now = time.time()
        key, turns = f"megrez:conv:{cid}", f"megrez:conv:{cid}:turns"
        async with self._redis.pipeline(transaction=True) as tx:
            tx.rpush(turns, turn.model_dump_json())
            tx.hset(key, "updated", now)
            tx.zadd("megrez:convs", {cid: now})
            tx.expire(key, self.conversation_ttl_s)
            tx.expire(turns, self.conversation_ttl_s)
            await self._call(tx.execute())

    async def start_message(self, cid: str, mid: str) -> None:
        key = f"megrez:msg:{mid}"
        async with self._redis.pipeline(transaction=True) as tx:
            tx.hset(key, mapping={"conversation_id": cid, "status": "running"})
            tx.expire(key, self.stream_ttl_s)
            await self._call(tx.execute())

    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None:
        data = await self._call(self._redis.hgetall(f"megrez:msg:{mid}"))
        return (data["conversation_id"], data["status"]) if data else None

    async def append_event(self, mid: str, type_: str, data: str) -> str:
        key = f"megrez:msg:{mid}:events"
        async with self._redis.pipeline(transaction=True) as tx:
            tx.xadd(key, {"type": type_, "data": data})
            tx.expire(key, self.stream_ttl_s)
            event_id, _ = await self._call(tx.execute())
        return event_id

    async def end_message(self, mid: str, status: MessageStatus) -> str:
        key = f"megrez:msg:{mid}"
        async with self._redis.pipeline(transaction=True) as tx:
            tx.xadd(f"{key}:events", {"type": DONE, "data": json.dumps({"type": DONE, "status": status})})
            tx.hset(key, "status", status)
            event_id, _ = await self._call(tx.execute())
        return event_id

    async def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]:
        key, position = f"megrez:msg:{mid}:events", after or "0-0"
        while True:
            status = await self.message_status(mid)
            if status is None:
                return  # unknown or expired
            block = FOLLOW_BLOCK_MS if status[1] == "running" else None
            reply = await self._call(self._redis.xread({key: position}, block=block))
            for _, entries in reply or ():
                for event_id, fields in entries:
                    position = event_id
                    yield StoredEvent(event_id, fields["type"], fields["data"])
                    if fields["type"] == DONE:
                        return
            if not reply and status[1] != "running":
                return  # ended without its done event (a crashed writer): everything was read

    async def put_media(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        await self._call(self._media_redis.set(f"megrez:media:{digest}", data, ex=self.conversation_ttl_s, nx=True))
        return digest

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._media_redis.aclose()


def make_memory(redis_url: str | None) -> Memory:
    """Redis memory when ``redis_url`` is set, else the in-process store."""
    return RedisMemory(redis_url) if redis_url else LocalMemory()
