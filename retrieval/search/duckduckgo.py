"""DuckDuckGo and the other engines the ``ddgs`` package scrapes; no key, but rate limited."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from ddgs import DDGS
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

from retrieval.search.base import (
    BackendUnavailable,
    RateLimited,
    TimeRange,
    check_time_range,
    split_language,
)
from retrieval.types import SearchResult

# ddgs regions are country-first; these languages' usual country differs from the code.
_DEFAULT_REGION = {"en": "us-en", "zh": "cn-zh", "ja": "jp-jp", "ko": "kr-kr", "sv": "se-sv", "da": "dk-da"}


def ddgs_region(language: str | None) -> str:
    lang, country = split_language(language)
    if lang is None:
        return "wt-wt"
    if country is None:
        return _DEFAULT_REGION.get(lang, f"{lang}-{lang}")
    return f"{country}-{lang}"


class DuckDuckGoBackend:
    name = "ddgs"

    def __init__(self, *, backend: str = "auto", safesearch: str = "moderate", timeout_s: float = 5.0) -> None:
        """``backend`` is ddgs's own engine list ("auto", "duckduckgo", "bing,brave", ...)."""
        self._backend = backend
        self._safesearch = safesearch
        self._timeout = max(1, math.ceil(timeout_s))

    async def search(
        self, query: str, *, k: int, language: str | None = None, time_range: TimeRange | None = None
    ) -> list[SearchResult]:
        check_time_range(time_range)
        # ddgs is synchronous (its own thread pool and HTTP client), so keep it off the event loop.
        timelimit = time_range[0] if time_range else None  # d / w / m / y
        rows = await asyncio.to_thread(self._text, query, k, ddgs_region(language), timelimit)
        return [
            SearchResult(
                title=str(row.get("title") or ""),
                url=str(row["href"]),
                snippet=str(row.get("body") or ""),
                rank=i,
                engine=self.name,
            )
            for i, row in enumerate((r for r in rows if r.get("href")), start=1)
        ]

    def _text(self, query: str, k: int, region: str, timelimit: str | None) -> list[dict[str, Any]]:
        try:
            return DDGS(timeout=self._timeout).text(
                query,
                region=region,
                safesearch=self._safesearch,
                timelimit=timelimit,
                max_results=k,
                backend=self._backend,
            )
        except RatelimitException as exc:
            raise RateLimited(self.name, f"rate limited by the search engine ({exc})") from exc
        except TimeoutException as exc:
            raise BackendUnavailable(self.name, f"timed out ({exc})") from exc
        except DDGSException as exc:
            message = str(exc)
            # ddgs wraps engine failures in a plain DDGSException; older releases and some
            # engines report DuckDuckGo's throttling only as "202 Ratelimit" in the text.
            if "ratelimit" in message.lower() or "202" in message:
                raise RateLimited(self.name, f"rate limited by the search engine ({message})") from exc
            if "no results" in message.lower():
                return []
            raise BackendUnavailable(self.name, message or type(exc).__name__) from exc

    async def aclose(self) -> None:
        """Nothing to release: each search makes its own short-lived ddgs client."""
