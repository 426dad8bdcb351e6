"""The interface every search backend implements, its errors, and the helpers they share.

Search results are untrusted: a hostile or broken page, index or backend decides their URL, title and
snippet, and all three are shown to the user. :func:`dedupe`, which every result passes through on its
way out of the fallback chain, therefore keeps only results whose URL a user can be shown
(:func:`is_source_url`: an absolute http(s) URL, or a local corpus's ``corpus:`` name) and makes their
title and snippet plain single-line text (:func:`plain_line`). A ``javascript:``, ``data:`` or ``file:``
result is dropped there, so it is neither fetched nor numbered as a source.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import replace
from typing import Literal, Protocol, get_args
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx

from engine.protocol import SPECIAL_TOKENS
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


# Where a local corpus document without a web address lives: ``corpus:<path in the corpus>``. Not a link
# and never fetched, and unlike a ``file:`` URL it does not tell visitors where the server keeps its files.
CORPUS_SCHEME = "corpus"
# Bounds on what one result may put into every sources event and stored turn.
MAX_URL_CHARS = 4096
MAX_TITLE_CHARS = 300
MAX_SNIPPET_CHARS = 1000

# Invisible characters that reorder or hide text (bidi embeddings, overrides, isolates and marks; U+2060,
# the word joiner that defangs special tokens; U+FEFF) and lone surrogates, which no UTF-8 output accepts.
_HIDDEN = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff\ud800-\udfff]")
_CONTROL_OR_SPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")
_SPECIAL_SPELLING = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def plain_line(text: str, limit: int) -> str:
    """``text`` as one line of plain text of at most ``limit`` characters, for showing to a user.

    Control characters and line breaks become spaces, runs of spaces one space; bidi controls, word
    joiners and lone surrogates go; Megrez special-token spellings (``<|turn_end|>``) become a space, which
    cannot join what is left into another one. A longer text is cut and ends with ``…``.
    """
    text = _HIDDEN.sub("", text)
    if "<|" in text:
        text = _SPECIAL_SPELLING.sub(" ", text)
    text = _CONTROL_OR_SPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _printable(text: str) -> bool:
    return text.isprintable() and not any(char.isspace() for char in text)


def is_web_url(url: str) -> bool:
    """An absolute http(s) URL with a host, without spaces, control or bidi characters, of bounded length."""
    if len(url) > MAX_URL_CHARS or not _printable(url):
        return False
    try:
        parts = urlsplit(url)
        # ``port`` raises ValueError for a port that is not a number in range; 0 is no port either.
        return parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        return False


def corpus_url(name: str) -> str:
    """The source URL of a corpus document that has no web address: ``corpus:`` and its ``name`` (a path
    in the corpus), with what would end the name or the line percent-encoded."""
    return f"{CORPUS_SCHEME}:" + "".join(
        quote(char, safe="", errors="surrogatepass") if char in "%#?" or not _printable(char) else char for char in name
    )


def is_source_url(url: str) -> bool:
    """Whether a result with this URL may be shown as a source: a web URL, or a corpus name."""
    if url.startswith(f"{CORPUS_SCHEME}:"):
        return len(url) > len(CORPUS_SCHEME) + 1 and len(url) <= MAX_URL_CHARS and _printable(url)
    return is_web_url(url)


def clean_result(result: SearchResult) -> SearchResult | None:
    """``result`` with a plain title and snippet, or None when its URL may not be shown (see the module
    docstring). The URL itself is never rewritten: it is the page's identity downstream."""
    if not is_source_url(result.url):
        return None
    return replace(
        result, title=plain_line(result.title, MAX_TITLE_CHARS), snippet=plain_line(result.snippet, MAX_SNIPPET_CHARS)
    )


def dedupe(results: Iterable[SearchResult], limit: int | None = None) -> list[SearchResult]:
    """Keep the first hit per normalised URL, re-ranked 1..n, at most ``limit``; results whose URL may
    not be shown are dropped and the others cleaned (:func:`clean_result`)."""
    seen: set[str] = set()
    out: list[SearchResult] = []
    for result in results:
        cleaned = clean_result(result)
        if cleaned is None:
            continue
        key = normalize_url(cleaned.url)
        if key in seen:
            continue
        seen.add(key)
        out.append(replace(cleaned, rank=len(out) + 1))
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
