"""Search results → numbered sources; selected passages → the numbered contexts of an observation.

Two numberings meet here (see ``agent/events.py``):

* **sources** ``n``: every search result, numbered from 1 in arrival order across the turn's
  rounds; a URL found again keeps its first number. These are what the user sees and what the
  answer cites.
* **contexts** ``c``: what the model sees, ``[[citation:c]]``, consecutive from 1 across the rounds
  (round 2 continues after round 1), one per page, since the packer groups a page's passages.

A source shows the user only what :func:`retrieval.search.base.clean_result` lets through: an http(s) URL
(or a local corpus's ``corpus:`` name) and a plain single-line title and snippet. The search chain already
cleans every result; numbering cleans again because this is where results become what the user sees,
whatever retriever produced them (and results cached before a cleaning rule existed come back uncleaned).

Page and user text never change the numbering: citation-like markers inside them
(``[[citation:7]]``, ``[citation:2]``, ``【citation:3】``) are rewritten to ``(citation 7)`` before they
go into an observation, so a hostile page cannot fake a context boundary or a reference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from agent.events import Source
from agent.state import Context
from engine.protocol import render_observation
from prompts.agent import NO_RESULTS
from retrieval.passages import page_contexts
from retrieval.search.base import clean_result
from retrieval.types import Passage, SearchResult

_MARKER_LIKE = re.compile(r"[\[【]+\s*citation\s*[:：]\s*([\d,，\s]*)[\]】]+", re.IGNORECASE)


def domain(url: str) -> str:
    """``https://www.example.org/a`` → ``example.org``."""
    host = urlsplit(url).hostname or ""
    return host.removeprefix("www.")


def defang_markers(text: str) -> str:
    """Citation-like markers in untrusted text, rewritten so they cannot be taken for real ones."""
    return _MARKER_LIKE.sub(lambda m: f"(citation {m.group(1).strip()})", text) if "itation" in text else text


def number_sources(results: Sequence[SearchResult], known: Sequence[Source], *, round: int) -> list[Source]:
    """The results not yet among ``known`` (by URL), numbered after them; a result whose URL may not be
    shown is left out (:func:`retrieval.search.base.clean_result`)."""
    seen = {s.url for s in known}
    new: list[Source] = []
    for found in results:
        result = clean_result(found)
        if result is None or result.url in seen:
            continue
        seen.add(result.url)
        new.append(
            Source(
                n=len(known) + len(new) + 1,
                url=result.url,
                title=result.title,
                domain=domain(result.url),
                snippet=result.snippet,
                round=round,
            )
        )
    return new


def build_contexts(passages: list[Passage], sources: Sequence[Source], *, start: int) -> list[Context]:
    """One context per page of ``passages`` (prompt order), numbered from ``start``.

    A page without a source (not among the search results) is skipped: nothing may be cited that
    the user cannot see.
    """
    by_url = {s.url: s for s in sources}
    contexts: list[Context] = []
    for url, title, text in page_contexts(passages):
        source = by_url.get(url)
        if source is not None:
            contexts.append(Context(start + len(contexts), source.n, url, title or source.title, defang_markers(text)))
    return contexts


def observation_text(question: str, query: str, contexts: Sequence[Context], *, language: str) -> str:
    """The observation for one search: the vendor's template, or the no-results note."""
    if not contexts:
        return NO_RESULTS
    return render_observation(
        defang_markers(question),
        defang_markers(query),
        [c.text for c in contexts],
        language=language,
        start=contexts[0].number,
    )


def passages_by_source(contexts: Sequence[Context]) -> dict[int, str]:
    """The text the model saw for each source (a page found in two rounds: both contexts)."""
    texts: dict[int, list[str]] = {}
    for c in contexts:
        texts.setdefault(c.n, []).append(c.text)
    return {n: "\n\n".join(parts) for n, parts in texts.items()}
