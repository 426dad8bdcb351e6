"""Records that flow through the retrieval stack: search hits, fetched pages, passages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One hit from a search backend, in the backend's rank order (1-based)."""

    title: str
    url: str
    snippet: str
    rank: int
    engine: str
    published: str | None = None


@dataclass(slots=True)
class Page:
    """A search hit after fetching and extraction.

    ``source`` says where ``text`` came from: the fetched page (``page``) or, when the
    fetch failed or missed the deadline, the search snippet (``snippet``). ``error`` keeps
    the reason a fetch failed so callers can report it.
    """

    url: str
    title: str
    text: str
    source: Literal["page", "snippet"] = "page"
    rank: int = 0
    date: str | None = None
    language: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Passage:
    """A piece of a page chosen for the prompt; ``url`` lets citations point back at it."""

    url: str
    title: str
    text: str
    score: float = 0.0
    tokens: int = 0
    meta: dict = field(default_factory=dict, compare=False, hash=False)
