"""Conversation memory and per-message event streams: the interface, and the in-process store.

Two stores share one interface (:class:`Memory`): :class:`api.redis_memory.RedisMemory` when
``MEGREZ_REDIS_URL`` is set (its module docstring holds the key schema), else :class:`LocalMemory`
(one process; nothing survives a restart).

A message's events form a stream with ids a client sends back as ``Last-Event-ID``. The stream's
last event is always ``done`` (``{"type": "done", "status": …}``, written by ``end_message``).
Events are appended in batches (``append_events``): the turn runner hands over whatever piled up
while the previous write was in flight, so a loaded store sees one write per batch, not per token.

Followers in the process that runs the turn read a :class:`LiveStream` (the events in memory, with
the store's ids): no store round trip per event per follower. Both stores keep one for every message
they started; Redis also has the stream for followers on other replicas and for resumes later.

One turn at a time per conversation: ``start_message`` raises :class:`ConversationBusy` while another
message of the conversation runs (in Redis, across replicas). Stop requests reach the replica that runs
the turn through ``request_stop`` / ``stop_requests``.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel

from agent.events import TurnRecord

MessageStatus = Literal["running", "done", "stopped", "failed"]
DONE = "done"  # the last event of every message stream: {"type": "done", "status": ...}
TITLE_CHARS = 80
ANONYMOUS = "anonymous"  # the owner of everything when the service has no API keys
SLOT_TTL_S = 900  # a turn slot not released (a replica died) frees itself after this


class StoreUnavailable(RuntimeError):
    """The memory store (Redis) cannot be reached; nothing was written."""


class ConversationBusy(RuntimeError):
    """A turn of this conversation is still running."""


class TooManyTurns(RuntimeError):
    """The owner already has as many turns running as it may."""


class Conversation(BaseModel):
    id: str
    title: str
    created: float
    updated: float
    owner: str = ANONYMOUS  # see api/access.py: other owners never see it


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


def event_id_key(event_id: str) -> tuple[int, int]:
    """A stream id (``<ms>-<seq>``, as Redis writes them) as a sortable pair; ``ValueError`` if it is not one."""
    ms, sep, seq = event_id.partition("-")
    if not (sep and ms.isascii() and seq.isascii() and ms.isdigit() and seq.isdigit()):
        raise ValueError(f"not an event id: {event_id!r} (ids look like 1700000000000-0)")
    return int(ms), int(seq)


def done_data(status: MessageStatus) -> str:
    return json.dumps({"type": DONE, "status": status})


class Memory(Protocol):
    """What the service needs from a store (see the module docstring, and ``api/redis_memory.py`` for the keys)."""

    async def ping(self) -> None: ...
    async def create_conversation(self, question: str, owner: str = ANONYMOUS) -> Conversation: ...
    async def get_conversation(self, cid: str) -> Conversation | None: ...
    async def list_conversations(self, owner: str = ANONYMOUS, limit: int = 50) -> list[Conversation]: ...
    async def delete_conversation(self, cid: str) -> bool: ...
    async def acquire_slot(self, owner: str, slot: str, limit: int) -> bool: ...
    async def release_slot(self, owner: str, slot: str) -> None: ...
    async def turns(self, cid: str) -> list[StoredTurn]: ...
    async def add_turn(self, cid: str, turn: StoredTurn) -> None: ...
    async def start_message(self, cid: str, mid: str) -> None: ...
    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None: ...
    async def append_events(self, mid: str, events: Sequence[tuple[str, str]]) -> list[str]: ...
    async def end_message(self, mid: str, status: MessageStatus) -> str: ...
    def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]: ...
    async def request_stop(self, mid: str) -> None: ...
    def stop_requests(self) -> AsyncIterator[str]: ...
    async def put_media(self, data: bytes) -> str: ...
    async def aclose(self) -> None: ...


@dataclass
class LiveStream:
    """A message's events in this process, as the store numbered them; followers wait on ``changed``.

    Example::

        live = LiveStream("c1")
        live.add([StoredEvent("1-0", "token", '{"text": "Hi"}')])
        async for event in live.follow(after=None): ...  # ends after the done event
    """

    conversation_id: str
    status: MessageStatus = "running"
    ended: float | None = None  # time.monotonic() at the end, for expiry
    events: list[StoredEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, events: Sequence[StoredEvent]) -> None:
        self.events.extend(events)
        self.changed.set()
        self.changed = asyncio.Event()  # followers wait on the next one

    def end(self, event: StoredEvent, status: MessageStatus) -> None:
        self.status, self.ended = status, time.monotonic()
        self.add([event])

    async def follow(self, after: str | None) -> AsyncIterator[StoredEvent]:
        """The events after id ``after`` (all if ``None``), then live ones until ``done``."""
        position = (
            0 if after is None else bisect.bisect_right([event_id_key(e.id) for e in self.events], event_id_key(after))
        )
        while True:
            changed = self.changed
            while position < len(self.events):
                event = self.events[position]
                yield event
                position += 1
                if event.type == DONE:
                    return
            if self.status != "running":
                return
            await changed.wait()


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
        self._messages: dict[str, LiveStream] = {}
        self._running: dict[str, str] = {}  # conversation id → its running message
        self._slots: dict[str, dict[str, float]] = {}  # owner → slot → expiry (time.monotonic())
        self._media: dict[str, bytes] = {}

    async def ping(self) -> None:
        return None

    async def create_conversation(self, question: str, owner: str = ANONYMOUS) -> Conversation:
        now = time.time()
        conv = Conversation(id=new_id(), title=title_of(question), created=now, updated=now, owner=owner)
        self._conversations[conv.id] = conv
        self._turns[conv.id] = []
        return conv

    async def get_conversation(self, cid: str) -> Conversation | None:
        return self._conversations.get(cid)

    async def list_conversations(self, owner: str = ANONYMOUS, limit: int = 50) -> list[Conversation]:
        mine = [c for c in self._conversations.values() if c.owner == owner]
        return sorted(mine, key=lambda c: c.updated, reverse=True)[:limit]

    async def acquire_slot(self, owner: str, slot: str, limit: int) -> bool:
        now = time.monotonic()
        slots = self._slots.setdefault(owner, {})
        for old in [s for s, expiry in slots.items() if expiry <= now]:
            del slots[old]
        if len(slots) >= limit:
            return False
        slots[slot] = now + SLOT_TTL_S
        return True

    async def release_slot(self, owner: str, slot: str) -> None:
        self._slots.get(owner, {}).pop(slot, None)

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
        if cid in self._running:
            raise ConversationBusy(f"conversation {cid} is answering another question")
        cutoff = time.monotonic() - self.stream_ttl_s
        for old in [m for m, msg in self._messages.items() if msg.ended is not None and msg.ended < cutoff]:
            del self._messages[old]
        self._messages[mid] = LiveStream(cid)
        self._running[cid] = mid

    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None:
        message = self._messages.get(mid)
        return None if message is None else (message.conversation_id, message.status)

    async def append_events(self, mid: str, events: Sequence[tuple[str, str]]) -> list[str]:
        message = self._messages[mid]
        first = len(message.events) + 1
        stored = [StoredEvent(f"{first + i}-0", type_, data) for i, (type_, data) in enumerate(events)]
        message.add(stored)
        return [e.id for e in stored]

    async def end_message(self, mid: str, status: MessageStatus) -> str:
        message = self._messages[mid]
        event = StoredEvent(f"{len(message.events) + 1}-0", DONE, done_data(status))
        message.end(event, status)
        if self._running.get(message.conversation_id) == mid:
            del self._running[message.conversation_id]
        return event.id

    async def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]:
        message = self._messages.get(mid)
        if message is not None:
            async for event in message.follow(after):
                yield event

    async def request_stop(self, mid: str) -> None:
        return None  # one process: the runner that owns the turn is the one that was asked

    async def stop_requests(self) -> AsyncIterator[str]:
        await asyncio.Event().wait()  # none ever come from elsewhere
        yield ""  # pragma: no cover (makes this an async generator)

    async def put_media(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self._media.setdefault(digest, data)
        return digest

    async def aclose(self) -> None:
        return None


def make_memory(redis_url: str | None) -> Memory:
    """Redis memory when ``redis_url`` is set, else the in-process store."""
    if not redis_url:
        return LocalMemory()
    from api.redis_memory import RedisMemory

    return RedisMemory(redis_url)
