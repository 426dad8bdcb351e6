"""The agent's events and its structured answer: the protocol every front end speaks.

A turn (:func:`agent.run_turn`) yields these, in this order: ``status`` lines throughout; per search
round ``query`` (the query the model wrote), ``sources`` (the numbered results, as soon as the
search returns, before any page is read), one ``page`` per result as it is read or falls back to
its snippet; then the answer: ``token`` events (text with citations already resolved to ``[n]``),
a ``citation`` event the first time each source is cited, ``preamble`` if the text streamed so far
turned out to be the model's words before a tool call (the UI moves it out of the answer); at the
end ``related`` (follow-up questions) and exactly one ``answer`` carrying :class:`Answer`. A turn
that cannot be answered ends with one ``error`` instead.

What a turn says about itself comes as codes with their values: a ``status`` has a :data:`StatusCode`
and ``params`` (the query, page counts), each of ``Answer.notes`` a :data:`NoteCode` and ``params``, an
``error`` an :data:`ErrorCode`. Each also carries its English ``message``, so a client that does not
translate shows that, and one that does (the web page, in Chinese or English) words it itself.

Every event is a pydantic model with a ``type`` literal, so :data:`Event` is a discriminated union:
``EVENT_ADAPTER.validate_json(...)`` reads any of them back, ``event.model_dump_json()`` writes it.
The SSE stream of the API is exactly these (``event:`` = ``type``, ``data:`` = the JSON), and the
CLI prints them. :class:`retrieval.events.PageEvent` is reused as is: retrieval and agent share it.

Numbering: sources are numbered from 1 in the order search results arrive, across the rounds of a
turn (a URL found again keeps its number). The model sees consecutive context numbers
``[[citation:c]]``; ``Answer.answer`` cites the *source* numbers ``[n]`` shown in ``sources``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter, model_validator

from agent.config import SearchMode
from retrieval.events import PageEvent, SearchFailure

StatusStage = Literal["prepare", "thinking", "searching", "reading", "answering", "checking", "related"]
# What a ``status`` event says, for clients that show it in their own words (``params`` in brackets).
StatusCode = Literal[
    "thinking",  # the first generation
    "writing_query",  # a forced search: the query is being written
    "search_call",  # the model started a tool call
    "repairing_call",  # the call was malformed; the model is asked again
    "searching",  # {query}
    "reading",  # {pages}: the results' pages are being read
    "selected",  # {passages, pages}: the passages given to the model
    "answering",  # a later generation: writing the answer
    "checking",  # checking citations
    "related",  # suggesting follow-up questions
]
# What went wrong on the way to an answer (``Answer.notes``), in the same spirit.
NoteCode = Literal[
    "history_trimmed",  # {dropped}: earlier turns left out to fit the context
    "media_adjusted",  # {kind: image|audio, index (1-based), adjustment}: downscaled or cut to fit
    "tool_call_retried",  # the model called the tool when it could not; asked again without the tool
    "tool_call_ignored",  # the model called the tool when it could not; its call was ignored
    "query_unusable",  # {error}: the forced query could not be used; answered without searching
    "answer_cut",  # {tokens}: the answer reached its token limit
    "search_failed",  # retrieval crashed (the detail is in the log); answered without sources
    "search_empty",  # {query, reasons}: no results; answered without sources
    "no_usable_text",  # no usable text in the results (or no room left for it); answered without sources
    "pages_failed",  # every page failed: answered from the search snippets
    "empty_answer",  # the model wrote no answer (a fixed apology stands in)
    "no_related",  # no follow-up questions: the engine failed
    "stopped",  # stopped by the user
    "failed",  # {code: an ErrorCode}: the turn ended with an error
    "interrupted",  # the server answering it stopped
    "other",  # a note stored before codes existed: only ``message`` is meaningful
]
ErrorCode = Literal[
    "invalid_request",  # empty question, bad option
    "too_long",  # the question (with its media) cannot fit the model's context
    "invalid_media",  # an image or audio clip that cannot be decoded or used
    "engine_unavailable",  # the engine is not running or cannot be reached
    "engine_error",  # the engine failed this request
    "internal",  # a bug: logged with its traceback
    # Sent by the service around a turn, not by the agent (api/turns.py, api/redis_memory.py):
    "store_unavailable",  # the conversation store could not be reached: the turn could not be saved or followed
    "interrupted",  # the server running the turn stopped before it finished (another replica ended its stream)
]


class Source(BaseModel):
    """A search result shown to the user; ``n`` is the number citations use."""

    n: int
    url: str
    title: str
    domain: str
    snippet: str
    round: int = 1  # the search round that found it


class CitationRef(BaseModel):
    """A source the answer cites, with the text the model saw and the support check's verdict."""

    n: int
    url: str
    title: str
    passage: str  # the context the model was given for this source
    supported: bool | None = None  # None: no sentence could be checked (e.g. the marker stood alone)
    score: float | None = None  # the lowest support score among the sentences citing it


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Timings(BaseModel):
    """Milliseconds since the turn started (``first_token_ms``) or spent in a stage (the others)."""

    search_ms: float | None = None
    read_ms: float | None = None
    first_token_ms: float | None = None
    total_ms: float = 0.0


class Note(BaseModel):
    """Something that went wrong on the way to an answer: a code a client can translate, the English
    sentence for those that do not, and the values the sentence names.

    Example::

        Note(code="history_trimmed", message="history trimmed: 2 earlier turn(s) left out to fit the context",
             params={"dropped": 2})
        Note.model_validate("a note stored as a plain string")  # code "other"
    """

    code: NoteCode
    message: str
    params: dict[str, str | int] = {}

    @model_validator(mode="before")
    @classmethod
    def _stored_as_text(cls, value: object) -> object:
        # Records stored before notes had codes hold plain sentences; they stay readable.
        return {"code": "other", "message": value} if isinstance(value, str) else value


class Answer(BaseModel):
    """The structured answer of one turn."""

    answer: str  # markdown; citation markers normalised to [n]
    citations: list[CitationRef] = []  # in first-citation order
    sources: list[Source] = []
    queries: list[str] = []
    searched: bool = False
    rounds: int = 0  # searches run
    mode: SearchMode = "auto"
    language: str = "English"
    related: list[str] = []
    usage: Usage = Usage()
    timings: Timings = Timings()
    notes: list[Note] = []  # what went wrong on the way, e.g. code "pages_failed"


class StatusEvent(BaseModel):
    """Where the turn is: ``stage`` groups the steps, ``code`` and ``params`` say which one for a client that
    words it itself, ``message`` is the English line."""

    type: Literal["status"] = "status"
    stage: StatusStage
    code: StatusCode
    message: str
    params: dict[str, str | int] = {}


class QueryEvent(BaseModel):
    type: Literal["query"] = "query"
    query: str
    round: int


class SourcesEvent(BaseModel):
    """The results of one search round (``sources`` are this round's new ones; numbering continues)."""

    type: Literal["sources"] = "sources"
    round: int
    sources: list[Source]
    backend: str | None = None
    cached: bool = False  # the results came from the search cache
    failures: list[SearchFailure] = []


class TokenEvent(BaseModel):
    type: Literal["token"] = "token"
    text: str


class PreambleEvent(BaseModel):
    """The text streamed since the last ``preamble`` (or the start) was said before a tool call."""

    type: Literal["preamble"] = "preamble"
    text: str


class CitationEvent(BaseModel):
    """A source is cited for the first time."""

    type: Literal["citation"] = "citation"
    n: int
    url: str
    title: str


class RelatedEvent(BaseModel):
    type: Literal["related"] = "related"
    questions: list[str]


class AnswerEvent(BaseModel):
    type: Literal["answer"] = "answer"
    answer: Answer


class ErrorEvent(BaseModel):
    """Why the turn ended without an answer. ``message`` is a plain sentence anyone may read; ``detail``
    holds the specifics for operators (server addresses, library errors): logged, and sent only to key
    holders."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    detail: str | None = None


Event = Annotated[
    StatusEvent
    | QueryEvent
    | SourcesEvent
    | PageEvent
    | TokenEvent
    | PreambleEvent
    | CitationEvent
    | RelatedEvent
    | AnswerEvent
    | ErrorEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


class TranscriptMessage(BaseModel):
    """One message of a turn as the model saw or wrote it (``function_call``: the raw call body)."""

    role: Literal["user", "assistant", "observation"]
    content: str
    function_call: str | None = None


class MediaRef(BaseModel):
    """An image or audio clip of the user message, by content hash (the service stores the bytes)."""

    kind: Literal["image", "audio"]
    sha256: str
    bytes: int

    @classmethod
    def of(cls, kind: Literal["image", "audio"], data: bytes) -> MediaRef:
        return cls(kind=kind, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


class TurnRecord(BaseModel):
    """What memory keeps of a turn, and what later turns rebuild their history from."""

    question: str
    media: list[MediaRef] = []
    transcript: list[TranscriptMessage] = []  # this turn's assistant and observation messages, in order
    answer: Answer
