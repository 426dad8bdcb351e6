"""Running a turn for the service: detached from the client, recorded event by event, saved atomically.

A chat request starts a turn as a task of the app (:class:`TurnRunner`), not of the request: a client
that disconnects does not stop it. Every agent event is appended to the message's event stream in
memory (``api/memory.py``) as it happens, and responses — the live SSE stream, a resumed one, the
JSON answer — all read that stream, so they see the same events with the same ids, on any replica.
When the turn ends, its record is written in one transaction and the stream gets its ``done`` event.

Writes are batched (:class:`_EventWriter`): the turn never waits for the store; while one write is in
flight the next events pile up and go in the next one, and adjacent ``token`` events in a batch are
merged into one (same text, fewer events). An idle service writes each token as it comes; a loaded one
writes fewer, larger events instead of falling behind — like vLLM's own output collector.

Stopping (:meth:`TurnRunner.stop`) cancels the task: the agent closes the engine stream, which
aborts the engine request, and the partial answer (the text streamed so far) is saved marked
``stopped``. A stop asked on another replica arrives through the store (:meth:`TurnRunner.listen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agent import Agent
from agent.events import Answer, AnswerEvent, ErrorEvent, Event, TokenEvent, TranscriptMessage, TurnRecord
from agent.state import MediaItem
from api.logs import MESSAGE_ID
from api.memory import ANONYMOUS, Memory, MessageStatus, StoredTurn, TooManyTurns, new_id
from api.metrics import Metrics

log = logging.getLogger(__name__)


class _EventWriter:
    """Appends a turn's events to its stream in batches, never making the turn wait for the store."""

    def __init__(self, memory: Memory, mid: str) -> None:
        self.memory, self.mid = memory, mid
        self._pending: list[Event] = []
        self._task: asyncio.Task | None = None
        self.error: Exception | None = None  # the store failed: later events are dropped, the turn goes on

    def put(self, event: Event) -> None:
        if self.error is not None:
            return
        self._pending.append(event)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = _merge_tokens(self._pending), []
                await self.memory.append_events(self.mid, [(e.type, e.model_dump_json()) for e in batch])
        except Exception as exc:
            self.error = exc
            log.error("turn %s: its events could not be stored: %s", self.mid, exc)
        finally:
            self._task = None

    async def flush(self) -> None:
        """Wait until everything put so far is written (or the store failed)."""
        while self._task is not None:
            await asyncio.shield(self._task)


def _merge_tokens(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        if isinstance(event, TokenEvent) and out and isinstance(out[-1], TokenEvent):
            out[-1] = TokenEvent(text=out[-1].text + event.text)
        else:
            out.append(event)
    return out


@dataclass
class _Running:
    conversation_id: str
    owner: str = ANONYMOUS
    task: asyncio.Task | None = None
    text: list[str] = field(default_factory=list)  # token text so far (the partial answer if stopped)


class TurnRunner:
    """Starts, tracks and stops the turns of this process.

    Example::

        runner = TurnRunner(agent, memory)
        mid = await runner.start(conversation_id, "Who designed the Eiffel Tower?", history=[], media=[])
        async for event in memory.events(mid): ...
    """

    def __init__(
        self, agent: Agent, memory: Memory, *, concurrent_turns: int = 8, metrics: Metrics | None = None
    ) -> None:
        self.agent = agent
        self.memory = memory
        self.metrics = metrics or Metrics(running=lambda: len(self._running) + self.outside)
        self.concurrent_turns = concurrent_turns  # per owner, across replicas (the store counts)
        self._running: dict[str, _Running] = {}  # message id → turn
        self.outside = 0  # turns run outside start() (the OpenAI route), for the running-turns gauge

    async def take_slot(self, owner: str, slot: str) -> None:
        """One of the owner's concurrent-turn slots; :class:`api.memory.TooManyTurns` when none is free."""
        if not await self.memory.acquire_slot(owner, slot, self.concurrent_turns):
            raise TooManyTurns(f"{self.concurrent_turns} turns are already running for this caller; wait for one")

    @contextlib.asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[None]:
        """Hold a turn slot for a turn run outside :meth:`start` (the OpenAI route)."""
        slot = new_id()
        await self.take_slot(owner, slot)
        self.outside += 1
        try:
            yield
        finally:
            self.outside -= 1
            with contextlib.suppress(Exception):
                await self.memory.release_slot(owner, slot)

    async def start(
        self,
        conversation_id: str,
        question: str,
        *,
        history: list[TurnRecord],
        media: list[MediaItem],
        mode: str | None = None,
        language: str | None = None,
        owner: str = ANONYMOUS,
    ) -> str:
        """Start a turn and return its message id once its stream exists (events follow in memory).
        Raises :class:`api.memory.ConversationBusy` while another turn of the conversation runs,
        :class:`api.memory.TooManyTurns` when the owner has no free turn slot."""
        mid = new_id()
        await self.take_slot(owner, mid)
        try:
            await self.memory.start_message(conversation_id, mid)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.memory.release_slot(owner, mid)
            raise
        running = self._running[mid] = _Running(conversation_id, owner)
        turn = self.agent.run(question, history=history, media=media, mode=mode, language=language, request_id=mid)
        running.task = asyncio.create_task(self._run(mid, conversation_id, question, turn, running), name=f"turn-{mid}")
        return mid

    async def _run(self, mid: str, cid: str, question: str, turn, running: _Running) -> None:
        MESSAGE_ID.set(mid)  # this task's logs (and its children's) carry the message id
        status: MessageStatus = "failed"
        writer = _EventWriter(self.memory, mid)
        saved = False
        try:
            async for event in turn:
                if isinstance(event, TokenEvent):
                    running.text.append(event.text)
                writer.put(event)
                self.metrics.observe(event)
                if isinstance(event, AnswerEvent):
                    status = "done"
                elif isinstance(event, ErrorEvent):
                    status = "failed"
            await writer.flush()
            if turn.record is not None:
                await self.memory.add_turn(cid, StoredTurn(message_id=mid, record=turn.record))
                saved = True
        except asyncio.CancelledError:
            if saved:  # stopped after the whole turn was saved: it stays as it is
                return
            await turn.aclose()  # closes the engine stream: the request is aborted
            status = "stopped"
            self.metrics.turns.labels("stopped").inc()
            partial = "".join(running.text)
            record = TurnRecord(
                question=question,
                transcript=[TranscriptMessage(role="assistant", content=partial)],
                answer=Answer(answer=partial, notes=["stopped by the user"]),
            )
            await writer.flush()
            await self.memory.add_turn(cid, StoredTurn(message_id=mid, record=record, status="stopped"))
        except Exception:  # the store failed mid-turn: the stream still ends
            log.exception("turn %s could not be recorded", mid)
        finally:
            # Free the conversation before ``done`` is visible: a client that saw it may ask again at once.
            self._running.pop(mid, None)
            with contextlib.suppress(Exception):
                await self.memory.end_message(mid, status)
            with contextlib.suppress(Exception):
                await self.memory.release_slot(running.owner, mid)

    async def stop(self, mid: str) -> bool:
        """Stop a running turn of this process; ``False`` if it is not running here."""
        running = self._running.get(mid)
        if running is None or running.task is None:
            return False
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.task
        return True

    async def listen(self) -> None:
        """Stop the turns other replicas were asked to stop (runs for the app's lifetime)."""
        async for mid in self.memory.stop_requests():
            if mid in self._running:
                await self.stop(mid)

    async def aclose(self) -> None:
        """Stop every turn (shutdown): each is saved as stopped."""
        for mid in list(self._running):
            await self.stop(mid)
