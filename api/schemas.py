"""The HTTP API's own request and response models; the stream's events are the agent's (``agent/events.py``).

Two events exist only on the wire: ``meta`` first (the ids a client needs to resume or stop) and
``done`` last (how the message ended); between them come the agent's events unchanged.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, Field, TypeAdapter

from agent.events import Answer, ErrorEvent, Event, MediaRef
from api.memory import StoredTurn


class ChatRequest(BaseModel):
    """The JSON body of ``POST /chat`` (a multipart form has the same fields, media as file parts)."""

    conversation_id: str | None = Field(default=None, description="Continue this conversation; omit to start one.")
    message: str = Field(min_length=1, description="The question (at most MEGREZ_API__MAX_MESSAGE_CHARS).")
    language: str | None = Field(default=None, description="Answer language, e.g. zh, en; default: the question's.")
    images: list[str] = Field(default=[], description="Images as base64 or data URLs (Megrez-3B-Omni).")
    audio: list[str] = Field(default=[], description="Audio clips (WAV, FLAC, OGG, MP3) as base64 or data URLs.")


class MetaEvent(BaseModel):
    type: Literal["meta"] = "meta"
    conversation_id: str
    message_id: str


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"
    status: Literal["done", "stopped", "failed", "running"]


# Everything an SSE stream carries: ``meta``, the agent's events, ``done`` (for the OpenAPI schema and clients).
StreamEvent = Union[MetaEvent, Event, DoneEvent]  # noqa: UP007 - Event is an Annotated union
STREAM_ADAPTER: TypeAdapter[StreamEvent] = TypeAdapter(StreamEvent)


class ChatResponse(BaseModel):
    conversation_id: str
    message_id: str
    status: str
    answer: Answer | None = None
    error: dict | None = None  # the error event, when the turn failed


class ConversationSummary(BaseModel):
    id: str
    title: str
    created: float
    updated: float


TITLE_MAX_CHARS = 200
_LINE_BREAKS = frozenset("\t\n\r")
_TITLE_PATTERN = (
    r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"
)


def _title(value: str) -> str:
    """A conversation title as one line: whitespace runs (line breaks included) become one space; other control
    characters, and lone surrogates (text no store can encode), are refused."""
    if bad := next((c for c in value if unicodedata.category(c) in ("Cc", "Cs") and c not in _LINE_BREAKS), None):
        raise ValueError(f"the title holds a control character or a lone surrogate (U+{ord(bad):04X})")
    line = " ".join(value.split())
    if not 1 <= len(line) <= TITLE_MAX_CHARS:
        raise ValueError(f"the title must be 1 to {TITLE_MAX_CHARS} characters on one line (it has {len(line)})")
    return line


class ConversationRename(BaseModel):
    """The JSON body of ``PATCH /conversations/{id}``."""

    title: Annotated[str, AfterValidator(_title)] = Field(
        description=f"The new title: 1 to {TITLE_MAX_CHARS} characters once whitespace is collapsed to one line; "
        "control characters are refused.",
        examples=["Eiffel Tower: who built it"],
        # What a client can check before sending (a title this describes is always taken): the validator above is
        # the rule, and also takes a longer title whose whitespace collapses to TITLE_MAX_CHARS or fewer.
        json_schema_extra={"minLength": 1, "maxLength": TITLE_MAX_CHARS, "pattern": _TITLE_PATTERN},
    )


class TurnOut(BaseModel):
    """A stored turn: ``done``, or ``stopped``/``failed`` with what the user saw before the end (its sources,
    queries and partial answer) and, when failed, the error."""

    message_id: str
    status: Literal["done", "stopped", "failed"]
    question: str
    media: list[MediaRef] = []  # the question's attachments, by content hash
    answer: Answer
    error: ErrorEvent | None = None


class ConversationOut(ConversationSummary):
    turns: list[TurnOut]

    @staticmethod
    def turn(stored: StoredTurn) -> TurnOut:
        record = stored.record
        return TurnOut(
            message_id=stored.message_id,
            status=stored.status,
            question=record.question,
            media=record.media,
            answer=record.answer,
            error=stored.error,
        )
