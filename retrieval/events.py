"""Progress events of one retrieval (search → read → select), as typed, JSON-serialisable models.

:meth:`retrieval.pipeline.Retriever.retrieve` hands these to its ``on_event`` callback as they
happen. They are defined once, here, and used by everyone who shows progress: the ``search`` CLI
prints them, and the agent forwards :class:`PageEvent` unchanged into its own event stream (see
``agent/events.py``) and turns :class:`SearchEvent` into numbered ``sources``.

Each model has a ``type`` literal, so a union of them (and the agent's events) is a pydantic
discriminated union and every event serialises with a stable ``type`` field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from retrieval.types import SearchResult


class SearchFailure(BaseModel):
    """A backend the chain passed over, and why (``rate limited: …``, ``timed out``, ``no results``)."""

    backend: str
    reason: str


class SearchEvent(BaseModel):
    """The search returned (before any page is read): who answered, with what, and who failed."""

    type: Literal["search"] = "search"
    query: str
    backend: str | None  # None when no backend answered
    results: list[SearchResult]
    cached: bool = False
    failures: list[SearchFailure] = []


class PageEvent(BaseModel):
    """One result was read: the page itself (``source="page"``) or, failing that, its snippet."""

    type: Literal["page"] = "page"
    url: str
    title: str
    source: Literal["page", "snippet"]
    error: str | None = None  # why the page could not be used


class SelectedEvent(BaseModel):
    """Passages were chosen for the prompt."""

    type: Literal["selected"] = "selected"
    passages: int
    pages: int
    tokens: int


RetrievalEvent = SearchEvent | PageEvent | SelectedEvent
