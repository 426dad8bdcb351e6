"""Conversation memory and per-message event streams: the interface, and the in-process store.

Two stores share one interface (:class:`Memory`): :class:`api.redis_memory.RedisMemory` when
``MEGREZ_REDIS_URL`` is set (a single Redis or a cluster; ``api/redis_schema.py`` holds the key schema and
the scripts), else
:class:`LocalMemory` (one process; nothing survives a restart).

**Streams.** A message's events form a stream whose ids a client sends back as ``Last-Event-ID``.
The turn's writer numbers the events itself (:class:`EventIds`, ``<ms>-<seq>`` as Redis writes them),
shows each to this process's followers at once (``show``) and stores them in batches (``append_events``,
``api/event_writes.py``):
a batch retried after a lost reply carries the same ids, so Redis refuses the copy instead of storing
the events twice. The stream's last event is always
``done`` (``{"type": "done", "status": …}``), written by ``finish_message`` in the same step as the
turn record, the message's status and the release of the conversation's lock.

**A turn's store work** is three kinds of step: ``start_message`` (the owner's turn slot, the conversation
when it is new, the message: refused as a whole — :class:`TooManyTurns`, :class:`ConversationBusy`,
:class:`ConversationGone` — with nothing kept), ``append_events`` per batch, ``finish_message`` (with the
last batch; it frees the slot too). Redis makes each one round trip (``api/redis_memory.py``).

**Leases.** A running message holds a lease that the runner renews (``renew``, every few seconds);
the conversation's lock and the owner's turn slot expire with it. A turn whose process died stops
renewing: when the lease has run out, whoever notices first — a follower of its stream, a stop or a
new question on another replica, the periodic sweep (``reap_expired``) — stores the turn as
``failed`` with what its stream showed, ends the stream with ``error`` and ``done`` and frees the
conversation (``reap``). In one process (:class:`LocalMemory`) nothing can die alone, so it never reaps.

Followers in the process that runs the turn read a :class:`LiveStream` (the events in memory, with
their ids): no store round trip per event per follower, and each event as soon as it is made, before it
is stored. Both stores keep one for every message they started; Redis also has the stream for followers
on other replicas (up to one write interval behind) and for resumes later. The ids being the writer's,
a client that saw an event not stored yet and resumes elsewhere gets what follows it once that is
stored; if the process died first, what follows is the reaper's ``error`` and ``done`` (later ids).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel

from agent.events import ErrorEvent, MediaRef, TurnRecord
from api import sse

MessageStatus = Literal["running", "done", "stopped", "failed"]
DONE = "done"  # the last event of every message stream: {"type": "done", "status": ...}
TITLE_CHARS = 80
ANONYMOUS = "anonymous"  # the owner of everything when the service has no API keys
_ID_PART_MAX = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers
_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


class StoreUnavailable(RuntimeError):
    """The memory store (Redis) cannot be reached; nothing was written."""


class ConversationBusy(RuntimeError):
    """A turn of this conversation is still running."""


class ConversationGone(RuntimeError):
    """The conversation does not exist (any more): deleted, or expired."""


class TooManyTurns(RuntimeError):
    """The owner already has as many turns running as it may."""

    @classmethod
    def at(cls, limit: int) -> TooManyTurns:
        return cls(f"{limit} turns are already running for this caller; wait for one")


class Conversation(BaseModel):
    id: str
    title: str
    created: float
    updated: float
    owner: str = ANONYMOUS  # see api/access.py: other owners never see it

    @classmethod
    def new(cls, question: str, owner: str = ANONYMOUS) -> Conversation:
        """A conversation opened by ``question`` (its title), not stored yet: ``start_message(..., new=it)`` stores
        it with its first message, ``create_conversation`` alone."""
        now = time.time()
        return cls(id=new_id(), title=title_of(question), created=now, updated=now, owner=owner)


class StoredTurn(BaseModel):
    """One turn as a conversation keeps it: finished (``done``), ``stopped`` or ``failed`` — the last two
    with everything the user saw before the end, and a failed one with its error."""

    message_id: str
    record: TurnRecord
    status: MessageStatus = "done"
    error: ErrorEvent | None = None


@dataclass(frozen=True)
class MessageStart:
    """What a message's store entry keeps from its start, so another replica can store the turn as failed
    if this one dies: the conversation, the owner (whose slot it holds), the question and its media."""

    conversation_id: str
    owner: str
    question: str
    media: tuple[MediaRef, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event of a message's stream; ``id`` is what a client sends back as ``Last-Event-ID``
    (empty for an event made up by a reader, which never was in the store).

    Example::

        event = StoredEvent("1700000000000-0", "token", '{"type": "token", "text": "Hi"}')
        event.frame  # b'id: 1700000000000-0\r\nevent: token\r\ndata: {"type": ...}\r\n\r\n'
    """

    id: str
    type: str
    data: str  # the event's JSON
    _frame: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def frame(self) -> bytes:
        """The event as one SSE frame (``api/sse.py``), encoded on first use and shared from then on: every
        follower of a :class:`LiveStream` reads the same event objects."""
        if self._frame is None:
            object.__setattr__(self, "_frame", sse.frame(self.type, self.data, self.id))  # a cache: frozen otherwise
        return self._frame  # type: ignore[return-value]


class EventIds:
    """Stream ids for one message, strictly increasing: ``<ms>-<seq>`` from the wall clock, as Redis
    would choose them, so ids are comparable with the ones Redis writes itself (a reaper's).

    Example::

        ids = EventIds()
        ids.next(), ids.next()  # ('1700000000000-0', '1700000000000-1')
    """

    def __init__(self) -> None:
        self._ms, self._seq = 0, -1

    def next(self) -> str:
        now = int(time.time() * 1000)
        if now > self._ms:
            self._ms, self._seq = now, 0
        else:  # the same millisecond, or the clock went back: keep counting on the last one
            self._seq += 1
        return f"{self._ms}-{self._seq}"


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
    # At most 20 digits a part: Redis refuses longer ids (even zero-padded ones), and int() of thousands of
    # digits raises an error of its own.
    match = _EVENT_ID.fullmatch(event_id)
    if match is None:
        raise ValueError(f"not an event id: {event_id[:40]!r} (ids look like 1700000000000-0)")
    key = int(match[1]), int(match[2])
    if max(key) > _ID_PART_MAX:
        raise ValueError(f"not an event id: {event_id[:40]!r} (each part is at most {_ID_PART_MAX})")
    return key


def done_data(status: MessageStatus) -> str:
    return json.dumps({"type": DONE, "status": status})


class Memory(Protocol):
    """What the service needs from a store (see the module docstring, and ``api/redis_schema.py`` for the keys)."""

    lease_s: float  # a running message's lease (and its lock's and slot's lifetime) unless renewed

    async def ping(self) -> None: ...
    async def create_conversation(self, question: str, owner: str = ANONYMOUS) -> Conversation: ...
    async def get_conversation(self, cid: str) -> Conversation | None: ...
    async def list_conversations(self, owner: str = ANONYMOUS, limit: int = 50) -> list[Conversation]: ...
    async def rename_conversation(self, cid: str, title: str) -> Conversation | None: ...
    async def running_message(self, cid: str) -> str | None: ...
    async def delete_conversation(self, cid: str) -> bool: ...
    async def acquire_slot(self, owner: str, slot: str, limit: int) -> bool: ...
    async def release_slot(self, owner: str, slot: str) -> None: ...
    async def renew(self, messages: Iterable[str], slots: Iterable[tuple[str, str]]) -> None: ...
    async def turns(self, cid: str) -> list[StoredTurn]: ...
    async def start_message(
        self, mid: str, start: MessageStart, *, new: Conversation | None = None, slots: int | None = None
    ) -> None:
        """Start message ``mid`` in ``start.conversation_id``, storing the conversation ``new`` first when given
        (:meth:`Conversation.new`) and taking the owner's turn slot ``mid`` when ``slots`` (the owner's limit) is
        given; ``finish_message`` frees it."""
        ...

    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None: ...
    def show(self, mid: str, events: Sequence[StoredEvent]) -> None:
        """Hand numbered events of ``mid`` to this process's followers now, before they are stored."""
        ...

    async def append_events(self, batches: Mapping[str, Sequence[StoredEvent]]) -> None:
        """Store events already shown (``show``), message id → its events, in one step: for followers on other
        replicas and later resumes. A message that is no longer running takes none."""
        ...

    async def finish_message(
        self, mid: str, turn: StoredTurn | None, done: StoredEvent, last: Sequence[StoredEvent] = ()
    ) -> bool:
        """End ``mid``: its ``last`` events not stored yet and ``done`` on its stream, ``turn`` into its conversation
        (if it still exists), its status, its conversation's lock and its turn slot, in one step; ``False`` if it had
        already ended (reaped, deleted)."""
        ...

    def end_here(self, mid: str, events: Sequence[StoredEvent]) -> None: ...
    def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]: ...
    async def reap(self, mid: str) -> bool: ...
    async def reap_expired(self, skip: Iterable[str] = ()) -> list[str]: ...
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

    def end(self, events: Sequence[StoredEvent]) -> None:
        """Add the last events, ``done`` last (its status becomes the stream's)."""
        self.status, self.ended = json.loads(events[-1].data)["status"], time.monotonic()
        self.add(events)

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

    def __init__(self, *, stream_ttl_s: int = 3600, lease_s: float = 15.0) -> None:
        self.stream_ttl_s = stream_ttl_s  # ended messages' streams are dropped after this, as in Redis
        self.lease_s = lease_s  # a slot not renewed for this long frees itself
        self._conversations: dict[str, Conversation] = {}
        self._turns: dict[str, list[StoredTurn]] = {}
        self._messages: dict[str, LiveStream] = {}
        self._of_conversation: dict[str, set[str]] = {}  # conversation id → its messages (deleted with it)
        self._running: dict[str, str] = {}  # conversation id → its running message
        self._slots: dict[str, dict[str, float]] = {}  # owner → slot → expiry (time.monotonic())
        self._owners: dict[str, str] = {}  # running message → its owner (whose slot it may hold)
        self._media: dict[str, bytes] = {}

    async def ping(self) -> None:
        return None

    async def create_conversation(self, question: str, owner: str = ANONYMOUS) -> Conversation:
        conv = Conversation.new(question, owner)
        self._conversations[conv.id] = conv
        self._turns[conv.id] = []
        return conv

    async def get_conversation(self, cid: str) -> Conversation | None:
        return self._conversations.get(cid)

    async def list_conversations(self, owner: str = ANONYMOUS, limit: int = 50) -> list[Conversation]:
        mine = [c for c in self._conversations.values() if c.owner == owner]
        return sorted(mine, key=lambda c: c.updated, reverse=True)[:limit]

    async def rename_conversation(self, cid: str, title: str) -> Conversation | None:
        """Give conversation ``cid`` the title ``title`` (already checked: one line); ``None`` if it does not exist.
        Its ``updated`` time stays: a rename is not a new turn, so the history keeps its order."""
        conv = self._conversations.get(cid)
        if conv is None:
            return None
        self._conversations[cid] = conv = conv.model_copy(update={"title": title})
        return conv

    async def running_message(self, cid: str) -> str | None:
        return self._running.get(cid)

    async def delete_conversation(self, cid: str) -> bool:
        if cid in self._running:
            raise ConversationBusy(f"conversation {cid} is answering a question")
        self._turns.pop(cid, None)
        for mid in self._of_conversation.pop(cid, ()):
            self._messages.pop(mid, None)
        return self._conversations.pop(cid, None) is not None

    async def acquire_slot(self, owner: str, slot: str, limit: int) -> bool:
        now = time.monotonic()
        slots = self._slots.setdefault(owner, {})
        for old in [s for s, expiry in slots.items() if expiry <= now]:
            del slots[old]
        if len(slots) >= limit and slot not in slots:
            return False
        slots[slot] = now + self.lease_s
        return True

    async def release_slot(self, owner: str, slot: str) -> None:
        self._slots.get(owner, {}).pop(slot, None)

    async def renew(self, messages: Iterable[str], slots: Iterable[tuple[str, str]]) -> None:
        until = time.monotonic() + self.lease_s
        for owner, slot in slots:
            if slot in self._slots.get(owner, {}):
                self._slots[owner][slot] = until

    async def turns(self, cid: str) -> list[StoredTurn]:
        return list(self._turns.get(cid, []))

    async def start_message(
        self, mid: str, start: MessageStart, *, new: Conversation | None = None, slots: int | None = None
    ) -> None:
        cid = start.conversation_id
        if new is None and cid not in self._conversations:
            raise ConversationGone(f"unknown conversation {cid}")
        if cid in self._running:
            raise ConversationBusy(f"conversation {cid} is answering another question")
        if slots is not None and not await self.acquire_slot(start.owner, mid, slots):  # last: refused, nothing kept
            raise TooManyTurns.at(slots)
        if new is not None:
            self._conversations[cid], self._turns[cid] = new, []
        self._owners[mid] = start.owner
        cutoff = time.monotonic() - self.stream_ttl_s
        for old in [m for m, msg in self._messages.items() if msg.ended is not None and msg.ended < cutoff]:
            del self._messages[old]
        self._messages[mid] = LiveStream(cid)
        self._of_conversation.setdefault(cid, set()).add(mid)
        self._running[cid] = mid

    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None:
        message = self._messages.get(mid)
        return None if message is None else (message.conversation_id, message.status)

    def show(self, mid: str, events: Sequence[StoredEvent]) -> None:
        message = self._messages.get(mid)
        if message is not None and message.status == "running":
            message.add(events)

    async def append_events(self, batches: Mapping[str, Sequence[StoredEvent]]) -> None:
        return None  # in one process the stream shown is the stream stored

    async def finish_message(
        self, mid: str, turn: StoredTurn | None, done: StoredEvent, last: Sequence[StoredEvent] = ()
    ) -> bool:
        message = self._messages.get(mid)
        if message is None or message.status != "running":
            return False  # deleted with its conversation
        cid = message.conversation_id
        if turn is not None and cid in self._conversations:
            self._turns[cid].append(turn)
            self._conversations[cid] = self._conversations[cid].model_copy(update={"updated": time.time()})
        self.end_here(mid, [done])
        return True

    def end_here(self, mid: str, events: Sequence[StoredEvent]) -> None:
        message = self._messages.get(mid)
        if message is None or message.status != "running":
            return
        self._slots.get(self._owners.pop(mid, ANONYMOUS), {}).pop(mid, None)
        message.end(events)
        if self._running.get(message.conversation_id) == mid:
            del self._running[message.conversation_id]

    async def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]:
        message = self._messages.get(mid)
        if message is not None:
            async for event in message.follow(after):
                yield event

    async def reap(self, mid: str) -> bool:
        return False  # one process: a turn cannot outlive its runner here

    async def reap_expired(self, skip: Iterable[str] = ()) -> list[str]:
        return []

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


def make_memory(redis_url: str | None, *, lease_s: float = 15.0) -> Memory:
    """Redis memory when ``redis_url`` is set, else the in-process store (``lease_s``: see the module docstring)."""
    if not redis_url:
        return LocalMemory(lease_s=lease_s)
    from api.redis_memory import RedisMemory

    return RedisMemory(redis_url, lease_s=lease_s)
