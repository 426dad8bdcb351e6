"""Running a turn for the service: detached from the client, recorded event by event, always ended.

A chat request starts a turn as a task of the app (:class:`TurnRunner`), not of the request: a client
that disconnects does not stop it. Every agent event is appended to the message's event stream in
memory (``api/memory.py``) as it happens, and responses — the live SSE stream, a resumed one, the
JSON answer — all read that stream (:meth:`TurnRunner.follow`), so they see the same events with the
same ids, on any replica.

**Every turn ends, and is stored, whatever happens.** A turn ends ``done`` (its record), ``failed``
(an error event: stored with what it showed and the error) or ``stopped`` (stop, delete, shutdown:
stored with the partial answer, its sources and queries). The end — the turn in its conversation,
``done`` on the stream, the status, the conversation's lock — is one store step
(``finish_message``), run shielded from cancellation. When the store fails mid-turn (Redis killed and
restarted), the runner keeps every event, retries with backoff for ``store_retry_s`` and then writes
what piled up (followers here see the answer go on meanwhile); if the store stays away longer, the
stream is ended in this process with an error saying the answer could not be saved (followers here see
it; the turn is lost with the store).

**Leases.** While a turn runs, this process renews its lease (and the conversation lock and turn
slots that live as long) every third of ``lease_s`` (:meth:`TurnRunner.maintain`), and sweeps the
store for turns of dead replicas, which it stores as failed (``api/redis_memory.py``: ``reap``).

**Slots.** Every turn slot this process takes (``/chat`` turns and ``/v1`` requests) is registered
here and released by :meth:`TurnRunner.release_slot`, which never awaits: the store call runs as a
task of the runner, so a request cancelled by its client's departure cannot skip it; a release that
fails expires with the lease, which nobody renews any more.

**Writes** (``api/event_writes.py``): the turn never waits for the store, and neither do the followers
in this process, who get each event as it is made; the store gets every running turn's events together
once per ``event_write_s`` (``MEGREZ_API__EVENT_WRITE_MS``), and a turn's last events with its end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from agent import Agent
from agent.config import SearchMode
from agent.events import ErrorEvent, Event, MediaRef, Note, TurnRecord
from agent.state import MediaItem
from agent.turn import INTERNAL_ERROR
from api.event_writes import StoreRetry, StoreWriter, TurnWriter
from api.logs import MESSAGE_ID
from api.memory import (
    ANONYMOUS,
    DONE,
    Conversation,
    ConversationBusy,
    ConversationGone,
    Memory,
    MessageStart,
    MessageStatus,
    StoredEvent,
    StoredTurn,
    StoreUnavailable,
    TooManyTurns,
    done_data,
    new_id,
)
from api.metrics import Metrics
from api.records import partial_record

log = logging.getLogger(__name__)

STOP_POLL_S = 0.1
UNSAVED = ErrorEvent(
    code="store_unavailable",
    message="This answer could not be saved: the conversation store is unreachable.",
)
UNFOLLOWED = ErrorEvent(
    code="store_unavailable",
    message="Lost the conversation store while following this answer; it may still be running — reload to see it.",
)
VANISHED = ErrorEvent(code="interrupted", message="This answer is no longer available (deleted or expired).")


@dataclass
class _Running:
    start: MessageStart
    mode: SearchMode | None
    task: asyncio.Task | None = None
    events: list[Event] = field(default_factory=list)  # what the turn streamed (a stopped turn's record)
    finishing: bool = False  # past its last event: a stop no longer changes it
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class TurnRunner:
    """Starts, tracks, stops and ends the turns of this process, and holds its turn slots.

    Example::

        runner = TurnRunner(agent, memory)
        conversation, mid = await runner.start(None, "Who designed the Eiffel Tower?", history=[], media=[])
        async for event in runner.follow(mid): ...  # ends with done, always
    """

    def __init__(
        self,
        agent: Agent,
        memory: Memory,
        *,
        concurrent_turns: int = 8,
        store_retry_s: float = 30.0,
        event_write_s: float = 0.1,
        metrics: Metrics | None = None,
    ) -> None:
        """``concurrent_turns``: slots per owner, across replicas (the store counts); ``store_retry_s``: how
        long a turn's writes wait for a store that is down; ``event_write_s``: how long a turn's events wait
        to be stored together (followers here see them at once). Leases are the store's (``memory.lease_s``)."""
        self.agent = agent
        self.memory = memory
        self.concurrent_turns = concurrent_turns
        self.lease_s = memory.lease_s
        self.retry = StoreRetry(store_retry_s)
        self.writes = StoreWriter(memory, self.retry, event_write_s)
        self._running: dict[str, _Running] = {}  # message id → turn
        self._slots: dict[str, str] = {}  # slot id → owner, every slot this process holds
        self._background: set[asyncio.Task] = set()
        self.metrics = metrics or Metrics(running=lambda: len(self._slots))

    @property
    def slots_held(self) -> int:
        """Turn slots this process holds now (its running turns and ``/v1`` requests)."""
        return len(self._slots)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def take_slot(self, owner: str, slot: str | None = None) -> str:
        """One of the owner's concurrent-turn slots (its id); :class:`api.memory.TooManyTurns` when none
        is free. Give it back with :meth:`release_slot`."""
        slot = slot or new_id()
        if not await self.memory.acquire_slot(owner, slot, self.concurrent_turns):
            raise TooManyTurns.at(self.concurrent_turns)
        self._slots[slot] = owner
        return slot

    def release_slot(self, slot: str) -> None:
        """Give a slot back; idempotent, and never awaits (safe in a cancelled request's ``finally``)."""
        owner = self._slots.pop(slot, None)
        if owner is not None:
            self._spawn(self._release(owner, slot))

    async def _release(self, owner: str, slot: str) -> None:
        try:
            await self.memory.release_slot(owner, slot)
        except StoreUnavailable as exc:  # nobody renews it any more: it expires with its lease
            log.warning("turn slot %s not released (%s); it frees itself within %g s", slot, exc, self.lease_s)

    async def start(
        self,
        conversation: Conversation | None,
        question: str,
        *,
        history: list[TurnRecord],
        media: list[MediaItem],
        mode: SearchMode | None = None,
        language: str | None = None,
        owner: str = ANONYMOUS,
    ) -> tuple[Conversation, str]:
        """Start a turn in ``conversation`` (``None``: a new one) and return the conversation and the
        message id once its stream exists (events follow in memory). Raises :class:`api.memory.TooManyTurns`
        when the owner has no free slot, :class:`api.memory.ConversationBusy` while another turn of the
        conversation runs, :class:`api.memory.ConversationGone` if it was deleted meanwhile."""
        mid, created = new_id(), None
        if conversation is None:  # stored by start_message, with the slot and the message: one store step
            conversation = created = Conversation.new(question, owner)
        start = MessageStart(conversation.id, owner, question, tuple(MediaRef.of(m.kind, m.data) for m in media))
        self._slots[mid] = owner  # the turn's slot is its message id: registered first, renewed from now on
        try:
            await self.memory.start_message(mid, start, new=created, slots=self.concurrent_turns)
        except (TooManyTurns, ConversationBusy, ConversationGone):  # refused: the store kept nothing
            del self._slots[mid]
            raise
        except BaseException:  # the store failed, or the request was cancelled: free what it may have kept
            self.release_slot(mid)
            if created is not None:
                self._spawn(self.memory.delete_conversation(created.id))
            raise
        running = self._running[mid] = _Running(start, mode)
        turn = self.agent.run(question, history=history, media=media, mode=mode, language=language, request_id=mid)
        running.task = asyncio.create_task(self._run(mid, turn, running), name=f"turn-{mid}")
        return conversation, mid

    async def _run(self, mid: str, turn, running: _Running) -> None:
        MESSAGE_ID.set(mid)  # this task's logs (and its children's) carry the message id
        writer = self.writes.turn(mid)

        def emit(event: Event) -> None:
            running.events.append(event)
            writer.put(event)
            self.metrics.observe(event)

        try:
            await turn.run(emit)  # in this task: a stop cancels the running node (the engine request aborts)
            running.finishing = True
            if turn.record is not None:
                stored = StoredTurn(message_id=mid, record=turn.record)
            else:
                error = next((e for e in reversed(running.events) if isinstance(e, ErrorEvent)), None)
                stored = self._partial(mid, running, "failed", error or _internal("the turn ended without an answer"))
        except asyncio.CancelledError:  # stopped: by the user, a delete, or the service shutting down
            running.finishing = True
            self.metrics.turns.labels("stopped").inc()
            stored = self._partial(mid, running, "stopped")
        except Exception as exc:  # a bug outside the agent's own error handling: the stream still ends
            running.finishing = True
            log.exception("turn %s failed", mid)
            error = _internal(f"{type(exc).__name__}: {exc}")
            emit(error)
            stored = self._partial(mid, running, "failed", error)
        # The end is written whatever happens next (a second stop, the service shutting down).
        ending = asyncio.get_running_loop().create_task(self._end(mid, running, writer, stored))
        self._background.add(ending)
        ending.add_done_callback(self._background.discard)
        await asyncio.shield(ending)

    def _partial(self, mid: str, running: _Running, status: MessageStatus, error: ErrorEvent | None = None):
        note = (
            Note(code="stopped", message="stopped by the user")
            if status == "stopped"
            else Note(
                code="failed",
                message=f"failed: {error.message if error else ''}",
                params={"code": error.code} if error else {},
            )
        )
        record = partial_record(running.start, running.events, note=note, mode=running.mode)
        return StoredTurn(message_id=mid, record=record, status=status, error=error)

    async def _end(self, mid: str, running: _Running, writer: TurnWriter, stored: StoredTurn) -> None:
        try:
            last = await writer.close()
            done = StoredEvent(writer.ids.next(), DONE, done_data(stored.status))
            if writer.error is None:
                await self.retry(lambda: self.memory.finish_message(mid, stored, done, last), f"storing turn {mid}")
                self._slots.pop(mid, None)  # finish_message freed it
                return
            log.error("turn %s could not be stored: %s", mid, writer.error)
        except StoreUnavailable as exc:
            log.error("turn %s could not be stored: %s", mid, exc)
        except Exception:
            log.exception("turn %s could not be stored", mid)
        finally:
            self._running.pop(mid, None)
            self.release_slot(mid)
            running.ended.set()
        # The store stayed away: end the stream for this process's followers (who saw every event), saying so.
        error = writer.stored(UNSAVED)
        done = StoredEvent(writer.ids.next(), DONE, done_data("failed"))
        self.memory.end_here(mid, [error, done])

    async def stop(self, mid: str) -> bool:
        """Stop a running turn of this process and wait until it is stored; ``False`` if it is not running here."""
        running = self._running.get(mid)
        if running is None or running.task is None:
            return False
        if not running.finishing:
            running.task.cancel()
        await running.ended.wait()
        return True

    async def stop_anywhere(self, mid: str, wait_s: float) -> MessageStatus | None:
        """Stop a turn on whichever replica runs it and return its status once it ended, or ``"running"``
        if it did not end within ``wait_s`` (its replica is alive but did not answer). A turn whose
        replica died (lease ended) is reaped here, as ``failed``."""
        if await self.stop(mid):
            return (await self.memory.message_status(mid) or ("", "stopped"))[1]
        await self.memory.request_stop(mid)  # the replica running it hears this and stops it
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while (known := await self.memory.message_status(mid)) is not None and known[1] == "running":
            if loop.time() > deadline:
                break
            if not await self.memory.reap(mid):  # reaped: its status is read again at once
                await asyncio.sleep(STOP_POLL_S)
        return None if known is None else known[1]

    async def follow(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]:
        """The message's events after ``after`` until ``done`` — always ending with ``done``: a store that
        stays away past the retry window ends it with an error and ``done`` ``running`` (the turn may go
        on; resume later), a message that vanished (deleted) with an error and ``done`` ``failed``.
        Made-up events have no id, so a client resuming after them resumes after the last real one."""
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        while True:
            try:
                async for event in self.memory.events(mid, after):
                    failing_since = None
                    after = event.id or after
                    yield event
                    if event.type == DONE:
                        return
                break
            except StoreUnavailable as exc:
                now = loop.time()
                if failing_since is None:
                    failing_since = now
                    log.warning("following %s: %s; retrying for up to %g s", mid, exc, self.retry.seconds)
                if now - failing_since > self.retry.seconds:
                    yield StoredEvent("", "error", UNFOLLOWED.model_dump_json())
                    yield StoredEvent("", DONE, done_data("running"))
                    return
                await asyncio.sleep(0.5)
        yield StoredEvent("", "error", VANISHED.model_dump_json())
        yield StoredEvent("", DONE, done_data("failed"))

    async def maintain(self) -> None:
        """Renew this process's leases and slots, sweep for dead replicas' turns (for the app's lifetime)."""
        loop = asyncio.get_running_loop()
        swept = loop.time()
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.memory.renew(list(self._running), [(o, s) for s, o in self._slots.items()])
                if loop.time() - swept >= self.lease_s:
                    swept = loop.time()
                    await self.memory.reap_expired(skip=list(self._running))
            except StoreUnavailable as exc:
                log.warning("leases not renewed: %s", exc)
            except Exception:
                log.exception("leases not renewed")

    async def listen(self) -> None:
        """Stop the turns other replicas were asked to stop (runs for the app's lifetime)."""
        async for mid in self.memory.stop_requests():
            if mid in self._running:
                self._spawn(self.stop(mid))

    async def aclose(self) -> None:
        """Stop every turn (shutdown): each is stored as stopped; then wait for the store calls in flight."""
        await asyncio.gather(*(self.stop(mid) for mid in list(self._running)), return_exceptions=True)
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.retry.seconds + 5)


def _internal(detail: str) -> ErrorEvent:
    return ErrorEvent(code="internal", message=INTERNAL_ERROR, detail=detail)
