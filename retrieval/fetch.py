"""Fetch search-result pages concurrently, safely and within a deadline.

:meth:`Fetcher.fetch_pages` turns ranked search results into :class:`~retrieval.types.Page`
records. Every result gets a page: the fetched, extracted text when the fetch succeeds in time,
otherwise the search snippet with ``error`` saying why. The whole phase is bounded by a deadline;
pages still in flight then are cancelled, so one slow server never holds up the answer.

One fetch (:meth:`Fetcher.fetch`):

- the SSRF guard (:mod:`retrieval.ssrf`) vets each hop; the request goes to the vetted IP with the
  original ``Host`` header (and SNI for https), so DNS rebinding cannot redirect it;
- ``route_map`` can send an origin to another server (a mirror, the fixture web); the page keeps
  its original URL and redirects resolve against it;
- redirects are followed by hand, up to ``max_redirects``; a malformed URL, requested or in a
  ``Location``, is :class:`Blocked` with the URL named;
- the body is streamed and reading stops at ``max_bytes``: HTML and text keep the prefix
  (``truncated``), a cut PDF is useless and raises :class:`TooLarge`;
- HTML, XHTML, plain text and PDF are accepted (sniffed when the server gives no type);
- extraction runs in a worker thread so it does not stall the event loop (and the deadline);
- successful extractions are cached by URL; errors never are.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Self
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from retrieval.cache import Cache
from retrieval.config import FetchConfig
from retrieval.decode import decode_body
from retrieval.extract import extract
from retrieval.ssrf import Blocked, FetchError, Guard, ResolveError, Resolver
from retrieval.types import Page, SearchResult

__all__ = [
    "Blocked",
    "DeadlineExceeded",
    "ExtractionError",
    "FetchError",
    "FetchTimeout",
    "Fetched",
    "Fetcher",
    "HTTPStatusError",
    "NetworkError",
    "ResolveError",
    "TooLarge",
    "TooManyRedirects",
    "UnsupportedContent",
]

log = logging.getLogger(__name__)


class FetchTimeout(FetchError):
    reason = "timeout"


class DeadlineExceeded(FetchError):
    reason = "deadline"


class TooManyRedirects(FetchError):
    reason = "redirects"


class HTTPStatusError(FetchError):
    reason = "http"

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"{status} for {url}")
        self.status = status


class UnsupportedContent(FetchError):
    reason = "unsupported"


class TooLarge(FetchError):
    reason = "too-large"


class NetworkError(FetchError):
    reason = "network"


class ExtractionError(FetchError):
    reason = "extraction"


@dataclass(slots=True)
class Fetched:
    """One fetched and extracted page. ``url`` is the requested URL, ``final_url`` the one the
    redirects ended at; ``truncated`` means only the first ``max_bytes`` were read."""

    url: str
    final_url: str
    title: str
    text: str
    date: str | None = None
    language: str | None = None
    content_type: str = "text/html"
    truncated: bool = False
    from_cache: bool = False


OnPage = Callable[[Page], Awaitable[None] | None]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HTML = frozenset({"text/html", "application/xhtml+xml"})
_TEXT = frozenset({"text/plain"})
_PDF = frozenset({"application/pdf", "application/x-pdf"})
_UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/unknown"})
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--", b"<meta", b"<title", b"<div", b"<p")
_ACCEPT = "text/html,application/xhtml+xml,application/pdf;q=0.9,text/plain;q=0.8,*/*;q=0.1"


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def sniff(prefix: bytes) -> str | None:
    """The media type of an untyped body from its first bytes, ``None`` for anything else."""
    head = prefix[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%pdf-"):
        return "application/pdf"
    if head.startswith(_HTML_STARTS):
        return "text/html"
    if b"\x00" not in prefix[:1024] and not head.startswith((b"\x89png", b"gif8", b"\xff\xd8", b"pk\x03\x04")):
        return "text/plain"
    return None


def _origin(parts: tuple[str, str, int | None]) -> str:
    scheme, host, port = parts
    default = {"http": 80, "https": 443}[scheme]
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


def _route_key(origin: str) -> str:
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    return _origin((parts.scheme.lower(), parts.hostname or "", parts.port))


def _strip_fragment(url: str) -> str:
    try:
        return urlunsplit(urlsplit(url)._replace(fragment=""))
    except ValueError:  # e.g. a bracketed host that is no IP address: Guard.check_url refuses it by name
        return url


def _extract_pdf(body: bytes) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(body))
        text = "\n\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
        title = str((reader.metadata or {}).get("/Title") or "")
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        raise ExtractionError(f"unreadable PDF: {exc}") from None
    return title, text


def _extract(
    body: bytes, media_type: str, content_type: str | None, url: str
) -> tuple[str, str, str | None, str | None]:
    """Title, text, date and language of a body; runs in a worker thread."""
    if media_type in _PDF:
        title, text = _extract_pdf(body)
        return title, text, None, None
    html_or_text = decode_body(body, content_type)
    if media_type in _TEXT:
        return "", html_or_text.strip(), None, None
    doc = extract(html_or_text, url)
    return doc.title, doc.text, doc.date, doc.language


class Fetcher:
    """Fetches pages over one shared connection pool; use as an async context manager or call
    :meth:`aclose`. ``resolver`` replaces DNS for the SSRF guard (tests)."""

    def __init__(self, config: FetchConfig, *, cache: Cache | None = None, resolver: Resolver | None = None) -> None:
        self.config = config
        self.cache = cache if config.cache_ttl_s > 0 else None
        self.guard = Guard(config.allow_private, resolver)
        self._routes = {_route_key(k): v.rstrip("/") for k, v in config.route_map.items()}
        self._slots = asyncio.Semaphore(config.concurrency)
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._host_users: dict[str, int] = {}
        self._stragglers: set[asyncio.Task] = set()
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            # Proxies from the environment would be contacted instead of the vetted address.
            trust_env=False,
            timeout=httpx.Timeout(config.page_timeout_s),
            limits=httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency),
            headers={"User-Agent": config.user_agent, "Accept": _ACCEPT, "Accept-Language": "en,zh;q=0.8,*;q=0.5"},
            # Never keep cookies: the pool is shared by every search of every user.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for task in list(self._stragglers):
            task.cancel()
        if self._stragglers:
            await asyncio.gather(*self._stragglers, return_exceptions=True)
        await self._client.aclose()

    # --- one page -------------------------------------------------------------------------

    async def fetch(self, url: str) -> Fetched:
        """Fetch and extract one page; raises a :class:`FetchError` subclass on failure."""
        url = _strip_fragment(url)
        if self.cache is not None and (hit := await self.cache.get(url)) is not None:
            return Fetched(**{**hit, "from_cache": True})
        _, host = self.guard.check_url(url)
        async with self._slots, self._host_slot(host):
            try:
                async with asyncio.timeout(self.config.page_timeout_s):
                    final_url, content_type, body, truncated = await self._download(url)
            except TimeoutError:
                raise FetchTimeout(f"no complete answer within {self.config.page_timeout_s:g} s") from None
        media = _media_type(content_type)
        if media in _UNTYPED:
            media = sniff(body) or media
        title, text, date, language = await asyncio.to_thread(_extract, body, media, content_type, final_url)
        if not text.strip():
            raise ExtractionError(f"no text extracted from {final_url}")
        page = Fetched(url, final_url, title.strip(), text, date, language, media, truncated)
        if self.cache is not None:
            record = asdict(page)
            del record["from_cache"]
            await self.cache.set(url, record, self.config.cache_ttl_s)
        return page

    @contextlib.asynccontextmanager
    async def _host_slot(self, host: str):
        sem = self._host_slots.get(host)
        if sem is None:
            sem = self._host_slots[host] = asyncio.Semaphore(self.config.per_host_concurrency)
        self._host_users[host] = self._host_users.get(host, 0) + 1
        try:
            async with sem:
                yield
        finally:
            self._host_users[host] -= 1
            if not self._host_users[host]:  # keep the map from growing with every host ever seen
                del self._host_users[host], self._host_slots[host]

    async def _download(self, url: str) -> tuple[str, str | None, bytes, bool]:
        """Follow redirects from ``url``; return the final URL, content type, body, truncated."""
        start, seen = url, {url}
        for _hop in range(self.config.max_redirects + 1):
            request = await self._request_for(url)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                raise FetchTimeout(f"{type(exc).__name__} for {url}") from None
            except httpx.HTTPError as exc:
                raise NetworkError(f"{type(exc).__name__} for {url}: {exc}") from None
            except (httpx.InvalidURL, ValueError) as exc:
                # httpx reads a redirect's Location even when not following it, and some malformed
                # ones (``http:127.0.0.1/``, a bad IDNA label) fail there outside its HTTPError family.
                raise Blocked(f"redirect from {url} to a malformed URL: {exc}") from None
            try:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    location = response.headers["location"].strip()
                    try:
                        target = _strip_fragment(urljoin(url, location))
                    except ValueError as exc:  # what httpx let through, e.g. an unclosed ``[``
                        raise Blocked(f"redirect from {url} to a malformed URL {location!r}: {exc}") from None
                    if target in seen:
                        raise TooManyRedirects(f"redirect loop at {target}")
                    seen.add(target)
                    url = target
                    continue
                if not 200 <= response.status_code < 300:
                    raise HTTPStatusError(response.status_code, url)
                content_type = response.headers.get("content-type")
                body, truncated = await self._read_body(response, _media_type(content_type), url)
                return url, content_type, body, truncated
            finally:
                await response.aclose()
        raise TooManyRedirects(f"more than {self.config.max_redirects} redirects from {start}")

    async def _request_for(self, url: str) -> httpx.Request:
        """A request for logical ``url`` addressed to the vetted IP of the server to contact."""
        parts, host = self.guard.check_url(url)
        origin = _origin((parts.scheme, host, parts.port))
        base = self._routes.get(origin) or self._routes.get("*")
        if base is not None:
            # The logical host is not contacted, so only what needs no DNS is checked for it.
            self.guard.check_literal(url)
            base_parts = urlsplit(base)
            path = base_parts.path + (parts.path or "/")
            physical = urlunsplit((base_parts.scheme, base_parts.netloc, path, parts.query, ""))
        else:
            physical = url
        target = await self.guard.vet(physical)
        try:
            host_header = httpx.URL(url).netloc.decode("ascii")  # IDNA-encoded, port kept
            request_url = httpx.URL(physical).copy_with(host=target.ip)
        except httpx.InvalidURL as exc:
            raise Blocked(f"invalid URL {url!r}: {exc}") from None
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        return self._client.build_request("GET", request_url, headers={"Host": host_header}, extensions=extensions)

    async def _read_body(self, response: httpx.Response, media: str, url: str) -> tuple[bytes, bool]:
        accepted = _HTML | _TEXT | _PDF | _UNTYPED
        if media not in accepted:
            raise UnsupportedContent(f"content type {media!r} at {url}")
        cap = self.config.max_bytes
        declared = response.headers.get("content-length", "")
        if media in _PDF and declared.isdigit() and int(declared) > cap:
            raise TooLarge(f"PDF of {int(declared)} bytes exceeds {cap}")
        chunks: list[bytes] = []
        size = 0
        # Decoded bytes are counted, so a compressed bomb is cut at the cap too.
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                break
        body = b"".join(chunks)
        if media in _UNTYPED:
            sniffed = sniff(body)
            if sniffed is None:
                raise UnsupportedContent(f"untyped binary body at {url}")
            media = sniffed
        if size <= cap:
            return body, False
        if media in _PDF:
            raise TooLarge(f"PDF larger than {cap} bytes")
        return body[:cap], True

    # --- a result list --------------------------------------------------------------------

    async def fetch_pages(
        self, results: list[SearchResult], *, deadline_s: float | None = None, on_page: OnPage | None = None
    ) -> list[Page]:
        """One page per result, in rank order, within ``deadline_s`` (default: config).

        ``on_page`` is called with each page as it completes (sync or async); pages that fell
        back at the deadline are reported last.
        """
        deadline_s = self.config.deadline_s if deadline_s is None else deadline_s
        stop = time.monotonic() + deadline_s
        by_url: dict[str, list[int]] = {}
        for i, result in enumerate(results):
            by_url.setdefault(_strip_fragment(result.url), []).append(i)
        tasks = {asyncio.create_task(self._fetch_quietly(url)): url for url in by_url}
        pages: list[Page | None] = [None] * len(results)

        async def settle(url: str, outcome: Fetched | FetchError) -> None:
            for i in by_url[url]:
                pages[i] = self._page(results[i], outcome)
                if on_page is not None and inspect.isawaitable(ret := on_page(pages[i])):
                    await ret

        pending = set(tasks)
        try:
            while pending and (left := stop - time.monotonic()) > 0:
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    await settle(tasks[task], task.result())
        finally:
            for task in pending:
                task.cancel()
                # Not awaited: the caller must not wait for a straggler to unwind. aclose() does.
                self._stragglers.add(task)
                task.add_done_callback(self._stragglers.discard)
        late = DeadlineExceeded(f"not fetched within {deadline_s:g} s")
        for task in pending:
            await settle(tasks[task], late)
        return [p for p in pages if p is not None]

    async def _fetch_quietly(self, url: str) -> Fetched | FetchError:
        try:
            return await self.fetch(url)
        except FetchError as exc:
            log.info("fetch %s: %s", url, exc)
            return exc
        except Exception as exc:  # one bad page must not sink the others
            log.warning("fetch %s failed unexpectedly", url, exc_info=True)
            return FetchError(f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _page(result: SearchResult, outcome: Fetched | FetchError) -> Page:
        if isinstance(outcome, Fetched):
            return Page(
                url=result.url,
                title=outcome.title or result.title,
                text=outcome.text,
                source="page",
                rank=result.rank,
                date=outcome.date or result.published,
                language=outcome.language,
                # Not a failure: the page is used, but the caller may want to know it is partial.
                error="truncated: body cut at max_bytes" if outcome.truncated else None,
            )
        return Page(
            url=result.url,
            title=result.title,
            text=result.snippet,
            source="snippet",
            rank=result.rank,
            date=result.published,
            error=str(outcome),
        )
