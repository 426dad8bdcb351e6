"""Question in, cited context out: search, fetch (or read the local corpus), extract, select.

Progress goes to an optional ``on_event(event)`` callback (sync or async) with the typed events of
``retrieval.events``, so the CLI, the agent and the service show the same thing: ``SearchEvent``
(which backend answered with which results, which were passed over and why), ``PageEvent`` (each
page as it is read or falls back to its snippet) and ``SelectedEvent``.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from retrieval.cache import make_cache
from retrieval.config import FetchConfig, SearchConfig, SelectConfig
from retrieval.events import PageEvent, RetrievalEvent, SearchEvent, SearchFailure, SelectedEvent
from retrieval.fetch import Fetcher
from retrieval.passages import select_passages
from retrieval.search.base import MAX_TITLE_CHARS, plain_line
from retrieval.search.chain import SearchChain, SearchOutcome
from retrieval.search.factory import build_search
from retrieval.tokenize import estimate_tokens
from retrieval.types import Page, Passage, SearchResult

OnEvent = Callable[[RetrievalEvent], Awaitable[None] | None]


@dataclass(slots=True)
class Retrieval:
    question: str
    query: str
    outcome: SearchOutcome
    pages: list[Page] = field(default_factory=list)
    passages: list[Passage] = field(default_factory=list)


class Retriever:
    def __init__(self, search: SearchChain, fetcher: Fetcher, select: SelectConfig) -> None:
        self.search = search
        self.fetcher = fetcher
        self.select = select

    @classmethod
    def from_config(
        cls, search: SearchConfig, fetch: FetchConfig, select: SelectConfig, *, redis_url: str | None = None
    ) -> Retriever:
        chain = build_search(search, make_cache(redis_url, "search") if search.cache_ttl_s else None)
        fetcher = Fetcher(fetch, cache=make_cache(redis_url, "page") if fetch.cache_ttl_s else None)
        return cls(chain, fetcher, select)

    async def aclose(self) -> None:
        await self.search.aclose()
        await self.fetcher.aclose()

    async def __aenter__(self) -> Retriever:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def retrieve(
        self,
        question: str,
        *,
        query: str | None = None,
        k: int | None = None,
        language: str | None = None,
        time_range: str | None = None,
        fetch: bool = True,
        budget_tokens: int | None = None,
        count_tokens: Callable[[str], int] = estimate_tokens,
        on_event: OnEvent | None = None,
        today: dt.date | None = None,
    ) -> Retrieval:
        """``query`` is what goes to the search engine (the question itself when omitted);
        passages are ranked against both. ``today``: the date the question is asked, so pages of
        the last days rank above old ones (see :func:`retrieval.passages.recency`)."""
        query = query or question

        async def emit(event: RetrievalEvent) -> None:
            if on_event is not None and inspect.isawaitable(ret := on_event(event)):
                await ret

        outcome = await self.search.search(query, k=k, language=language, time_range=time_range)
        await emit(
            SearchEvent(
                query=query,
                backend=outcome.backend,
                results=outcome.results,
                cached=outcome.cached,
                failures=[SearchFailure(backend=b, reason=r) for b, r in outcome.failures],
            )
        )
        found = Retrieval(question=question, query=query, outcome=outcome)
        if not outcome.results:
            return found

        async def on_page(page: Page) -> None:
            # A fetched page's own title (HTML or PDF) reaches users: one plain line, like search results' titles.
            title = plain_line(page.title, MAX_TITLE_CHARS)
            await emit(PageEvent(url=page.url, title=title, source=page.source, error=page.error))

        found.pages = await self._read(outcome.results, fetch=fetch, on_page=on_page)
        found.passages = select_passages(
            question,
            found.pages,
            query=query if query != question else None,
            budget_tokens=budget_tokens or self.select.budget_tokens,
            count_tokens=count_tokens,
            passage_tokens=self.select.passage_tokens,
            today=today,
        )
        await emit(
            SelectedEvent(
                passages=len(found.passages),
                pages=len({p.url for p in found.passages}),
                tokens=sum(p.tokens for p in found.passages),
            )
        )
        return found

    async def _read(
        self, results: list[SearchResult], *, fetch: bool, on_page: Callable[[Page], Awaitable[None]]
    ) -> list[Page]:
        """Local-corpus hits are read from the index; web hits are fetched (or kept as snippets)."""
        pages: dict[int, Page] = {}
        to_fetch: list[SearchResult] = []
        for i, result in enumerate(results):
            doc = self.search.document(result)
            if doc is not None:
                pages[i] = Page(
                    url=result.url,
                    title=doc["title"] or result.title,
                    text=doc["text"],
                    rank=result.rank,
                    date=doc.get("published") or result.published,
                )
                await on_page(pages[i])
            elif not fetch:
                pages[i] = Page(
                    url=result.url,
                    title=result.title,
                    text=result.snippet,
                    source="snippet",
                    rank=result.rank,
                    date=result.published,
                    error="not fetched",
                )
            else:
                to_fetch.append(result)
        if to_fetch:
            fetched = iter(await self.fetcher.fetch_pages(to_fetch, on_page=on_page))
            for i, result in enumerate(results):
                if i not in pages:
                    pages[i] = next(fetched)
        return [pages[i] for i in range(len(results))]
