"""The fallback chain: try each backend in turn under a time limit, cache what answered.

Whether search can work at all is found out once, in the background, when the service first asks
(:meth:`SearchChain.probe`): one request per backend to the service behind it (DuckDuckGo, the SearXNG
instance, serper.dev), bounded by the chain's time limit, so a start is never slower for it and no
search quota is spent. When none answers — the first run on a machine without internet, with no
local corpus — one log line says so and what to do, and :attr:`SearchChain.unreachable` tells the
service's ``/info``. A backend without such an address (a local corpus, a test's) counts as working,
and the first search a backend answers clears the verdict.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import httpx

from retrieval.cache import Cache
from retrieval.search.base import (
    BackendMisconfigured,
    BackendUnavailable,
    RateLimited,
    SearchBackend,
    SearchError,
    TimeRange,
    check_time_range,
    dedupe,
    normalize_query,
)
from retrieval.types import SearchResult

log = logging.getLogger(__name__)

_KIND = {RateLimited: "rate limited", BackendMisconfigured: "misconfigured", BackendUnavailable: "unavailable"}
OFFLINE_SEARCH = "MEGREZ_SEARCH__BACKENDS='[\"local\"]' MEGREZ_SEARCH__CORPUS_PATH=/path/to/docs"


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    """What one search produced and how.

    ``backend`` names the backend whose results these are (None when none answered);
    ``failures`` lists, in order, each backend tried before it and why it was passed over.
    """

    results: list[SearchResult]
    backend: str | None
    failures: list[tuple[str, str]] = field(default_factory=list)
    cached: bool = False


def cache_key(query: str, *, k: int, language: str | None, time_range: str | None, backends: Sequence[str]) -> str:
    spec = json.dumps([normalize_query(query), k, language, time_range, list(backends)], ensure_ascii=False)
    return "search:" + hashlib.sha256(spec.encode()).hexdigest()


class SearchChain:
    def __init__(
        self,
        backends: Sequence[SearchBackend],
        *,
        cache: Cache | None = None,
        timeout_s: float = 6.0,
        cache_ttl_s: int = 3600,
        k: int = 8,
        language: str | None = None,
        client: httpx.AsyncClient | None = None,
        skipped: Sequence[tuple[str, str]] = (),
        probes: Mapping[str, str] | None = None,
    ) -> None:
        """``client`` is an HTTP client the chain owns and closes in ``aclose``; ``skipped`` records
        configured backends left out (name, reason) so the service can show them; ``probes`` maps a backend's
        name to an address that answers whenever the backend's service can be reached (:meth:`probe`)."""
        self.backends = list(backends)
        self.skipped = list(skipped)
        self.unreachable: list[tuple[str, str]] | None = None  # every backend and why it cannot work, once probed
        self._probes = dict(probes or {})
        self._probing: asyncio.Task[None] | None = None
        self._cache = cache
        self._timeout_s = timeout_s
        self._ttl = cache_ttl_s
        self._k = k
        self._language = language
        self._client = client

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    async def search(
        self,
        query: str,
        *,
        k: int | None = None,
        language: str | None = None,
        time_range: TimeRange | None = None,
    ) -> SearchOutcome:
        """Results from the first backend that answers; an outcome with no results and the
        reasons when none does (a search miss is not an exception for the caller)."""
        check_time_range(time_range)
        k = k or self._k
        language = language or self._language
        if not normalize_query(query):
            return SearchOutcome(results=[], backend=None)
        key = cache_key(query, k=k, language=language, time_range=time_range, backends=self.names)
        if self._cache is not None and self._ttl > 0:
            hit = await self._cache.get(key)
            if hit is not None:
                return SearchOutcome(
                    results=dedupe(SearchResult(**r) for r in hit["results"]), backend=hit["backend"], cached=True
                )

        failures: list[tuple[str, str]] = []
        for backend in self.backends:
            reason = None
            try:
                async with asyncio.timeout(self._timeout_s):
                    raw = await backend.search(query, k=k, language=language, time_range=time_range)
            except TimeoutError:
                reason = f"timed out after {self._timeout_s:g}s"
            except SearchError as exc:
                reason = f"{_KIND.get(type(exc), 'failed')}: {exc.message}"
            except Exception as exc:  # noqa: BLE001 - one broken backend must not end the search
                log.exception("search backend %s crashed", backend.name)
                reason = f"failed: {type(exc).__name__}: {exc}"
            else:
                if self.unreachable is not None:
                    log.warning("search works again: %s answered", backend.name)
                    self.unreachable = None
                results = dedupe(raw, limit=k)
                if results:
                    if self._cache is not None and self._ttl > 0:
                        value = {"backend": backend.name, "results": [asdict(r) for r in results]}
                        await self._cache.set(key, value, self._ttl)
                    return SearchOutcome(results=results, backend=backend.name, failures=failures)
                reason = "no results"
            log.info("search backend %s passed over for %r: %s", backend.name, query, reason)
            failures.append((backend.name, reason))
        return SearchOutcome(results=[], backend=None, failures=failures)

    def document(self, result: SearchResult) -> dict | None:
        """The stored text behind a hit from a corpus backend (no fetch needed), else None.

        Only the backend that produced the hit is asked, so a corpus that did not answer is
        never loaded (its first load builds an index) on the way.
        """
        for backend in self.backends:
            if backend.name == result.engine and (lookup := getattr(backend, "document", None)) is not None:
                return lookup(result.url)
        return None

    async def warm(self) -> None:
        """Load local indexes up front so the first query does not pay for building them."""
        for backend in self.backends:
            load = getattr(backend, "load", None)
            if load is not None:
                try:
                    await asyncio.to_thread(load)
                except Exception:  # noqa: BLE001 - a bad corpus disables that backend, not search
                    log.exception("could not load search backend %s", backend.name)

    def probe(self) -> asyncio.Task[None]:
        """Find out, once and in the background, whether any backend can work (see the module docstring); the
        verdict lands in :attr:`unreachable`. Call it with the event loop running; later calls return the same
        task (await it to wait for the verdict)."""
        if self._probing is None:
            self._probing = asyncio.get_running_loop().create_task(self._probe())
        return self._probing

    async def _probe(self) -> None:
        if not self.backends or any(b.name not in self._probes for b in self.backends):
            return
        async with httpx.AsyncClient(timeout=self._timeout_s) as client:
            reasons = await asyncio.gather(*(_unreachable(client, self._probes[b.name]) for b in self.backends))
        if all(reasons) and self.unreachable is None:
            self.unreachable = [*zip(self.names, reasons, strict=True), *self.skipped]
            why = "; ".join(f"{name}: {reason}" for name, reason in self.unreachable)
            log.warning(
                "no search backend can work (%s): answers come without sources; to search offline: %s",
                why,
                OFFLINE_SEARCH,
            )

    async def aclose(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
        for backend in self.backends:
            await backend.aclose()
        if self._client is not None:
            await self._client.aclose()


async def _unreachable(client: httpx.AsyncClient, url: str) -> str | None:
    """Why ``url`` cannot be reached, or ``None`` if it answered at all (any status: the service is there)."""
    try:
        await client.head(url)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return f"cannot reach {url} ({type(exc).__name__}: {str(exc) or 'no answer'})"
    return None
