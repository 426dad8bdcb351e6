"""Running a turn for the service: detached from the client, recorded event by event, saved atomically.

A chat request starts a turn as a task of the app (:class:`TurnRunner`), not of the request: a client
that disconnects does not stop it. Every agent event is appended to the message's event stream in
memory (``api/memory.py``) as it happens, and responses — the live SSE stream, a resumed one, the
JSON answer — all read that stream, so they see the same events with the same ids, on any replica.
When the turn ends, its record is written in one transaction and the stream gets its ``done`` event.

Stopping (:meth:`TurnRunner.stop`) cancels the task: the agent closes the engine stream, which
aborts the engine request, and the partial answer (the text streamed so far) is saved marked
``stopped``. One turn at a time per conversation: a second one is refused while the first runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from agent import Agent
from agent.events import Answer, AnswerEvent, ErrorEvent, TokenEvent, TranscriptMessage, TurnRecord
from agent.state import MediaItem
from api.memory import Memory, MessageStatus, StoredTurn, new_id

log = logging.getLogger(__name__)


class ConversationBusy(RuntimeError):
    """A turn of this conversation is still running."""


@dataclass
class _Running:
    conversation_id: str
    task: asyncio.Task | None = None
    text: list[str] = field(default_factory=list)  # token text so far (the partial answer if stopped)


class TurnRunner:
    """Starts, tracks and stops the turns of this process.

    Example::

        runner = TurnRunner(agent, memory)
        mid = await runner.start(conversation_id, "Who designed the Eiffel Tower?", history=[], media=[])
        async for event in memory.events(mid): ...
    """

    def __init__(self, agent: Agent, memory: Memory) -> None:
        self.agent = agent
        self.memory = memory
        self._running: dict[str, _Running] = {}  # message id → turn

    def busy(self, conversation_id: str) -> bool:
        return any(r.conversation_id == conversation_id for r in self._running.values())

    async def start(
        self,
        conversation_id: str,
        question: str,
        *,
        history: list[TurnRecord],
        media: list[MediaItem],
        mode: str | None = None,
        language: str | None = None,
    ) -> str:
        """Start a turn and return its message id once its stream exists (events follow in memory)."""
        if self.busy(conversation_id):
            raise ConversationBusy(f"conversation {conversation_id} is answering another question")
        mid = new_id()
        # Registered before the first await, so a second request for the conversation sees it busy.
        running = self._running[mid] = _Running(conversation_id)
        try:
            await self.memory.start_message(conversation_id, mid)
        except BaseException:
            del self._running[mid]
            raise
        turn = self.agent.run(question, history=history, media=media, mode=mode, language=language, request_id=mid)
        running.task = asyncio.create_task(self._run(mid, conversation_id, question, turn, running), name=f"turn-{mid}")
        return mid

    async def _run(self, mid: str, cid: str, question: str, turn, running: _Running) -> None:
        status: MessageStatus = "failed"
        try:
            async for event in turn:
                if isinstance(event, TokenEvent):
                    running.text.append(event.text)
                await self.memory.append_event(mid, event.type, event.model_dump_json())
                if isinstance(event, AnswerEvent):
                    status = "done"
                elif isinstance(event, ErrorEvent):
                    status = "failed"
            if turn.record is not None:
                await self.memory.add_turn(cid, StoredTurn(message_id=mid, record=turn.record))
        except asyncio.CancelledError:
            await turn.aclose()  # closes the engine stream: the request is aborted
            status = "stopped"
            partial = "".join(running.text)
            record = TurnRecord(
                question=question,
                transcript=[TranscriptMessage(role="assistant", content=partial)],
                answer=Answer(answer=partial, notes=["stopped by the user"]),
            )
            await self.memory.add_turn(cid, StoredTurn(message_id=mid, record=record, status="stopped"))
        except Exception:  # the store failed mid-turn: the stream still ends
            log.exception("turn %s could not be recorded", mid)
        finally:
            # Free the conversation before ``done`` is visible: a client that saw it may ask again at once.
            self._running.pop(mid, None)
            with contextlib.suppress(Exception):
                await self.memory.end_message(mid, status)

    async def stop(self, mid: str) -> bool:
        """Stop a running turn of this process; ``False`` if it is not running here."""
        running = self._running.get(mid)
        if running is None or running.task is None:
            return False
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.task
        return True

    async def aclose(self) -> None:
        """Stop every turn (shutdown): each is saved as stopped."""
        for mid in list(self._running):
            await self.stop(mid)
