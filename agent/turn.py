"""The agent's front door: :class:`Agent` (one per service) and :func:`run_turn` (one call, one turn).

A turn is an async iterator of :data:`agent.events.Event` — the graph's custom stream, produced by
the nodes through LangGraph's stream writer — that ends with one ``answer`` or one ``error``
event. Once it has ended, :attr:`TurnStream.answer` and :attr:`TurnStream.record` hold the
structured answer and the record to store. Closing the iterator early (a client that went away)
cancels the running node, which closes the engine stream and so aborts the engine request.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime

from agent.config import AgentConfig, SearchMode
from agent.context import PromptCodec, TurnContext
from agent.events import Answer, ErrorEvent, Event, TurnRecord
from agent.graph import build_graph, engine_failure
from agent.state import MediaItem, TurnInput
from agent.support import SupportChecker
from engine.base import Engine, EngineError
from retrieval.pipeline import Retriever

log = logging.getLogger(__name__)

INTERNAL_ERROR = "Something went wrong on our side while answering; it has been logged. Please try again."


class TurnStream:
    """The events of one turn, then its answer and record.

    Example::

        turn = agent.run("Who designed the Eiffel Tower?")
        async for event in turn:
            print(event.type)
        print(turn.answer.answer if turn.answer else "failed")
    """

    def __init__(self, events: Callable[[TurnStream], AsyncIterator[Event]]) -> None:
        self.answer: Answer | None = None
        self.record: TurnRecord | None = None
        self._events = events(self)

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()


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

        async def events(turn: TurnStream) -> AsyncIterator[Event]:
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
                    clock=self.clock,
                )
                # aclosing: a consumer that stops early closes the graph's stream, which cancels the running
                # node and so closes the engine stream (aborting the request) before aclose() returns.
                stream = self.graph.astream(inputs, context=context, stream_mode=["custom", "updates"])
                async with contextlib.aclosing(stream) as chunks:
                    async for kind, chunk in chunks:
                        if kind == "custom":
                            yield chunk
                        elif "finish" in chunk:
                            turn.answer, turn.record = chunk["finish"]["answer"], chunk["finish"]["record"]
            except EngineError as exc:  # looking the function-call tokens up (a remote server that is down)
                yield engine_failure(exc)
            except Exception as exc:  # a bug: the caller still gets a well-formed end of stream
                log.exception("turn %s failed", request_id)  # the detail, with its traceback
                yield ErrorEvent(code="internal", message=INTERNAL_ERROR, detail=f"{type(exc).__name__}: {exc}")

        return TurnStream(events)


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
