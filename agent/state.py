"""The state of one turn, as LangGraph sees it: input, output and what the nodes share.

Input (:class:`TurnInput`) and output (:class:`TurnOutput`) are kept apart from the working state
(:class:`TurnState`), as in LangGraph's templates: callers give a question and get an answer and the
turn record; everything else lives only while the turn runs. Nodes return partial updates; fields
that accumulate over the rounds of a turn (messages, sources, contexts, queries, notes, usage) have
reducers, so a node returns only what it adds.

Dependencies (engine, retriever, support checker, prompt codec) are not state: they come through
LangGraph's runtime context (:class:`agent.context.TurnContext`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypedDict

from agent.config import SearchMode
from agent.events import Answer, MediaRef, Note, Source, TurnRecord, Usage
from engine.protocol import MediaKind, Message


@dataclass(frozen=True, slots=True)
class MediaItem:
    """An image or audio clip sent with the question: encoded bytes (PNG/JPEG/…, WAV/FLAC/OGG/MP3)."""

    kind: MediaKind
    data: bytes


@dataclass(frozen=True, slots=True)
class Context:
    """One context shown to the model: its number in the observation and the source it stands for."""

    number: int  # [[citation:number]] in the observation (consecutive across the turn's rounds)
    n: int  # the source number shown to the user
    url: str
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class Generation:
    """How the last generation ended: an answer, a tool call (valid or not), or a failure."""

    kind: Literal["answer", "call", "call_error", "failed"]
    text: str = ""  # the answer text, citations resolved (kind "answer"; the preamble otherwise)
    spans: tuple[Any, ...] = ()  # citation spans in ``text`` (agent.citations.CitationSpan)
    cited: tuple[int, ...] = ()  # source numbers in first-citation order
    query: str = ""  # kind "call": the search query
    error: str = ""  # kind "call_error": what was wrong (shown to the model once)


def add_usage(left: Usage | None, right: Usage | None) -> Usage:
    """Reducer: token counts add up over the generations of a turn."""
    if left is None or right is None:
        return left or right or Usage()
    return Usage(
        prompt_tokens=left.prompt_tokens + right.prompt_tokens,
        completion_tokens=left.completion_tokens + right.completion_tokens,
        cached_tokens=left.cached_tokens + right.cached_tokens,
    )


class TurnInput(TypedDict, total=False):
    question: str  # required
    history: Sequence[TurnRecord]  # earlier turns, oldest first
    media: Sequence[MediaItem]
    mode: SearchMode  # default: the config's
    language: str | None  # answer language ("zh", "en", or a name); default: the question's


class TurnOutput(TypedDict, total=False):
    answer: Answer
    record: TurnRecord


class TurnState(TurnInput, TurnOutput, total=False):
    answer_language: str
    system: Message
    history_messages: list[Message]  # the earlier turns that fit, trimmed
    user: Message
    turn: Annotated[list[Message], operator.add]  # this turn's assistant and observation messages
    multimodal: dict[str, list] | None  # vLLM multi_modal_data for the user message's media
    media_tokens: int  # prompt tokens the media add beyond their placeholders
    media_refs: list[MediaRef]
    search_room: int  # tokens a search round needs beyond the answer (call, observation, least context)
    rounds: int  # searches run
    repaired: bool  # the one repair observation was used
    fallback: bool  # next generation is a forced search (after a failed repair)
    tools_off: bool  # no further tool call this turn (every search backend failed, or the forced call did)
    failed: bool  # an error event ended the turn
    generation: Generation
    sources: Annotated[list[Source], operator.add]
    contexts: Annotated[list[Context], operator.add]
    queries: Annotated[list[str], operator.add]
    notes: Annotated[list[Note], operator.add]
    usage: Annotated[Usage, add_usage]
    search_ms: Annotated[float, operator.add]
    read_ms: Annotated[float, operator.add]
    first_token_ms: float | None
