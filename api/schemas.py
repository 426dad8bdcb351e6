"""The HTTP API's own request and response models; the stream's events are the agent's (``agent/events.py``).

Two events exist only on the wire: ``meta`` first (the ids a client needs to resume or stop) and
``done`` last (how the message ended); between them come the agent's events unchanged.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, Field, TypeAdapter

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
