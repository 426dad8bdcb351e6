"""The interface every search backend implements, its errors, and the helpers they share."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import replace
from typing import Literal, Protocol, get_args
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from retrieval.types import SearchResult

TimeRange = Literal["day", "week", "month", "year"]
TIME_RANGES: tuple[str, ...] = get_args(TimeRange)


class SearchError(Exception):
    """A backend could not answer; ``message`` is written for the operator."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.message = message


class RateLimited(SearchError):
    """The service refused for now (HTTP 429, DuckDuckGo's 202 Ratelimit); try another backend."""


class BackendMisconfigured(SearchError):
    """Our settings are wrong (missing key, bad key, SearXNG without JSON); retrying will not help."""


class BackendUnavailable(SearchError):
    """Network failure, timeout or server error."""


class SearchBackend(Protocol):
    name: str

    async def search(
        self, query: str, *, k: int, language: str | None = None, time_range: TimeRange | None = None
    ) -> list[SearchResult]: ...

    async def aclose(self) -> None: ...


def check_time_range(time_range: str | None) -> None:
    if time_range is not None and time_range not in TIME_RANGES:
        raise ValueError(f"time_range must be one of {', '.join(TIME_RANGES)} or None, not {time_range!r}")


_SPACE = re.compile(r"\s+")


def normalize_query(query: str) -> str:
    """Cache key form: NFKC folds full-width forms, casefold handles ß and friends."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", query).casefold()).strip()


_TRACKING = re.compile(r"^(utm_\w+|gclid|fbclid|msclkid|mc_cid|mc_eid)$", re.IGNORECASE)


def normalize_url(url: str) -> str:
    """Identity of a page for de-duplication: the same page reached by http/https, with or
    without ``www.``, a trailing slash, a fragment or tracking parameters counts once."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower().removeprefix("www.")
    port = parts.port if parts.port not in (None, 80, 443) else None
    netloc = f"{host}:{port}" if port else host
    path = parts.path.rstrip("/") or "/"
    params = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode(sorted((k, v) for k, v in params if not _TRACKING.match(k)))
    scheme = "http" if parts.scheme in ("http", "https") else parts.scheme.lower()
    return urlunsplit((scheme, netloc, path, query, ""))


def dedupe(results: Iterable[SearchResult], limit: int | None = None) -> list[SearchResult]:
    """Keep the first hit per normalised URL, re-ranked 1..n, at most ``limit``."""
    seen: set[str] = set()
    out: list[SearchResult] = []
    for result in results:
        key = normalize_url(result.url)
        if not result.url or key in seen:
            continue
        seen.add(key)
        out.append(replace(result, rank=len(out) + 1))
        if limit is not None and len(out) >= limit:
            break
    return out


# Languages that appear as the second half of DuckDuckGo regions such as ``us-en``, ``cn-zh``.
_LANGS = frozenset(
    "en zh ja ko de fr es it pt ru nl sv pl tr ar he fa hi th vi id ms uk cs da fi el hu no ro sk".split()
)


def split_language(language: str | None) -> tuple[str | None, str | None]:
    """``'zh-CN'`` / ``'zh_cn'`` / ``'cn-zh'`` -> (``'zh'``, ``'cn'``); ``'en'`` -> (``'en'``, None).

    DuckDuckGo writes regions country-first (``cn-zh``); everyone else language-first.
    Two-letter codes are ambiguous in general, so only the common DuckDuckGo country-first
    forms are recognised by their known language halves.
    """
    if not language or language.lower() in ("all", "auto", "wt-wt"):
        return None, None
    pieces = re.split(r"[-_]", language.strip().lower())
    if len(pieces) == 1:
        return pieces[0], None
    first, second = pieces[0], pieces[-1]
    if second in _LANGS and first not in _LANGS:
        return second, first
    return first, second


def transport_error(backend: str, exc: httpx.HTTPError, where: str) -> BackendUnavailable:
    """The operator-facing error for a request that got no HTTP answer at all."""
    if isinstance(exc, httpx.TimeoutException):
        return BackendUnavailable(backend, f"timed out waiting for {where}")
    return BackendUnavailable(backend, f"cannot reach {where}: {type(exc).__name__}: {exc}")


def status_error(backend: str, status: int, where: str, detail: str = "") -> SearchError:
    """Errors shared by the HTTP backends; the backends handle their own special statuses first."""
    suffix = f": {detail}" if detail else ""
    if status == 429:
        return RateLimited(backend, f"{where} is rate limiting us (HTTP 429){suffix}")
    if status >= 500:
        return BackendUnavailable(backend, f"{where} failed with HTTP {status}{suffix}")
    return BackendMisconfigured(backend, f"{where} rejected the request with HTTP {status}{suffix}")
