"""The record of a turn that did not finish: what the user saw of it, rebuilt from its events.

A finished turn comes with the record the agent built (``TurnStream.record``). A stopped one, a failed
one, and one whose replica died have only the events that were streamed: :func:`partial_record` turns
those into a :class:`agent.events.TurnRecord`, so the stored conversation shows the sources, queries,
cited sources and partial answer the live stream showed — nothing the user saw is lost, and nothing
is made up (a citation keeps the source's snippet as its passage: the passage the model saw was not
streamed).

The turn runner passes the events it produced; the reaper on another replica parses them back from the
message's stream (:func:`agent_events`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from pydantic import ValidationError

from agent.config import SearchMode
from agent.events import (
    EVENT_ADAPTER,
    Answer,
    AnswerEvent,
    CitationEvent,
    CitationRef,
    Event,
    Note,
    PreambleEvent,
    QueryEvent,
    RelatedEvent,
    SourcesEvent,
    TokenEvent,
    TranscriptMessage,
    TurnRecord,
)
from api.memory import DONE, MessageStart, StoredEvent

log = logging.getLogger(__name__)


def agent_events(stored: Iterable[StoredEvent]) -> list[Event]:
    """The agent's events of a stored stream (``done`` and anything unreadable left out)."""
    events: list[Event] = []
    for event in stored:
        if event.type == DONE:
            continue
        try:
            events.append(EVENT_ADAPTER.validate_json(event.data))
        except ValidationError:
            log.warning("stream event %s (%s) is not an agent event; left out of the record", event.id, event.type)
    return events


def partial_record(
    start: MessageStart, events: Sequence[Event], *, note: Note, mode: SearchMode | None = None
) -> TurnRecord:
    """The record of an unfinished turn from the events it streamed; ``note`` says how it ended (code
    ``stopped``, ``failed`` or ``interrupted``); ``mode`` is the search mode, when known."""
    for event in events:
        if isinstance(event, AnswerEvent):  # the answer was complete: keep it whole
            answer = event.answer.model_copy(update={"notes": [*event.answer.notes, note]})
            return _record(start, answer)
    sources = [s for e in events if isinstance(e, SourcesEvent) for s in e.sources]
    by_n = {s.n: s for s in sources}
    queries = [e.query for e in events if isinstance(e, QueryEvent)]
    text: list[str] = []
    for event in events:
        if isinstance(event, TokenEvent):
            text.append(event.text)
        elif isinstance(event, PreambleEvent):
            text.clear()  # what came before was said before a search, not the answer
    citations = [
        CitationRef(n=e.n, url=e.url, title=e.title, passage=by_n[e.n].snippet if e.n in by_n else "")
        for e in events
        if isinstance(e, CitationEvent)
    ]
    related = next((e.questions for e in reversed(events) if isinstance(e, RelatedEvent)), [])
    fields = {"mode": mode} if mode is not None else {}
    answer = Answer(
        answer="".join(text),
        citations=citations,
        sources=sources,
        queries=queries,
        searched=bool(queries),
        rounds=len(queries),
        related=related,
        notes=[note],
        **fields,
    )
    return _record(start, answer)


def _record(start: MessageStart, answer: Answer) -> TurnRecord:
    return TurnRecord(
        question=start.question,
        media=list(start.media),
        transcript=[TranscriptMessage(role="assistant", content=answer.answer)],
        answer=answer,
    )
