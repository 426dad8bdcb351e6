"""The agent's front door: :class:`Agent` (one per service) and :func:`run_turn` (one call, one turn).

A turn is the stream of :data:`agent.events.Event` its nodes emit, ending with one ``answer`` or one
``error`` event. Once it has ended, :attr:`TurnStream.answer` and :attr:`TurnStream.record` hold the
structured answer and the record to store.

**The graph decides, events go straight to the caller.** The graph runs with ``ainvoke``: LangGraph
moves the state from node to node, and with one node per step it runs that node inline, in the caller's
task. Events do not cross LangGraph at all: the nodes hand each one to :attr:`TurnContext.emit
<agent.context.TurnContext>`, a plain callable. (LangGraph's ``custom`` stream mode, the earlier way, puts
every event through ``call_soon_threadsafe`` — a write to the loop's wake-up pipe — and its stream queue,
and runs each node as a task of its own: most of a turn's CPU per answer piece, ``bench/agent_path.py``.)
So a turn is consumed in one of two ways:

* :meth:`TurnStream.run` ``(sink)``: the turn runs in the caller's task, each event handed to ``sink`` the
  moment it exists (the service's turn runner). Cancelling the caller cancels the running node, which
  closes the engine stream and so aborts the engine request.
* ``async for event in turn``: the turn runs as a task of its own, its events queued for the iterator,
  which takes all that are waiting before it waits again (the ``/v1`` routes, the CLI, tests).
  :meth:`TurnStream.aclose` (a client that went away) cancels that task and waits for it: the engine
  request is aborted before it returns.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from agent.config import AgentConfig, SearchMode
from agent.context import PromptCodec, Sink, TurnContext
from agent.events import Answer, ErrorEvent, Event, TurnRecord
from agent.graph import build_graph, engine_failure
from agent.state import MediaItem, TurnInput
from agent.support import SupportChecker
from engine.base import Engine, EngineError
from retrieval.pipeline import Retriever

log = logging.getLogger(__name__)

INTERNAL_ERROR = "Something went wrong on our side while answering; it has been logged. Please try again."


class TurnStream:
    """The events of one turn, then its answer and record; run it once, either way (module docstring).

    Example::

        turn = agent.run("Who designed the Eiffel Tower?")
        async for event in turn:
            print(event.type)
        print(turn.answer.answer if turn.answer else "failed")
    """

    def __init__(self, body: Callable[[TurnStream, Sink], Awaitable[None]]) -> None:
        self.answer: Answer | None = None
        self.record: TurnRecord | None = None
        self._body = body
        self._task: asyncio.Task | None = None
        self._queue: deque[Event] = deque()
        self._waiting: asyncio.Future | None = None

    async def run(self, sink: Sink) -> None:
        """Run the turn here, handing each event to ``sink`` as it is emitted (``sink`` must not block)."""
        await self._body(self, sink)

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> Event:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._body(self, self._put))
            self._task.add_done_callback(self._wake)
        while not self._queue:
            if self._task.done():
                if not self._task.cancelled():
                    self._task.result()  # a failure of the turn's own error handling surfaces here
                raise StopAsyncIteration
            self._waiting = asyncio.get_running_loop().create_future()
            await self._waiting
        return self._queue.popleft()

    def _put(self, event: Event) -> None:
        self._queue.append(event)
        self._wake()

    def _wake(self, *_: object) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    async def aclose(self) -> None:
        """Stop a turn being iterated and wait until it has stopped (its engine request aborted)."""
        self._queue.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])


class Agent:
    """Runs turns on one engine and retriever (both started by the caller, e.g. the app's lifespan).

    Example::

        async with build_engine(settings.engine) as engine, Retriever.from_config(...) as retriever:
            agent = Agent(engine, retriever, config=settings.agent)
            async for event in agent.run("北京今天天气怎么样?", mode="always"):
                ...
    """

    def __init__(
        self,
        engine: Engine,
        retriever: Retriever,
        *,
        config: AgentConfig | None = None,
        support: SupportChecker | None = None,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.engine = engine
        self.retriever = retriever
        self.config = config or AgentConfig()
        self.support = support
        self.clock = clock
        self.graph = build_graph()
        self._codec: PromptCodec | None = None

    def run(
        self,
        question: str,
        *,
        history: Sequence[TurnRecord] = (),
        media: Sequence[MediaItem] = (),
        mode: SearchMode | None = None,
        language: str | None = None,
        config: AgentConfig | None = None,
        request_id: str | None = None,
    ) -> TurnStream:
        """One turn. ``config`` overrides the agent's for this turn; ``mode`` overrides ``config.mode``;
        ``language`` is the answer language (a code such as ``zh`` or a name), default: the question's."""
        config = config or self.config
        inputs: TurnInput = {"question": question, "history": list(history), "media": list(media)}
        inputs["mode"] = mode or config.mode
        inputs["language"] = language
        request_id = request_id or uuid.uuid4().hex

        async def body(turn: TurnStream, emit: Sink) -> None:
            try:
                if self._codec is None:
                    self._codec = await PromptCodec.for_engine(self.engine)
                threshold = config.support_threshold
                support = self.support or (SupportChecker() if threshold is None else SupportChecker(threshold))
                context = TurnContext(
                    engine=self.engine,
                    retriever=self.retriever,
                    codec=self._codec,
                    config=config,
                    support=support,
                    request_id=request_id,
                    emit=emit,
                    clock=self.clock,
                )
                output = await self.graph.ainvoke(inputs, context=context) or {}
                turn.answer, turn.record = output.get("answer"), output.get("record")
            except EngineError as exc:  # looking the function-call tokens up (a remote server that is down)
                emit(engine_failure(exc))
            except Exception as exc:  # a bug: the caller still gets a well-formed end of stream
                log.exception("turn %s failed", request_id)  # the detail, with its traceback
                emit(ErrorEvent(code="internal", message=INTERNAL_ERROR, detail=f"{type(exc).__name__}: {exc}"))

        return TurnStream(body)


def run_turn(
    question: str,
    *,
    engine: Engine,
    retriever: Retriever,
    history: Sequence[TurnRecord] = (),
    media: Sequence[MediaItem] = (),
    mode: SearchMode | None = None,
    language: str | None = None,
    config: AgentConfig | None = None,
) -> TurnStream:
    """One turn with a throwaway :class:`Agent` (services keep one ``Agent`` instead)."""
    return Agent(engine, retriever, config=config).run(
        question, history=history, media=media, mode=mode, language=language
    )
