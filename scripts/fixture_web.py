"""The fixture web: real pages served under their original URLs from one local HTTP server.

Requests are routed by ``Host`` header and path, so a fetcher configured with
``route_map={"*": web.base_url}`` (and ``allow_private=["127.0.0.1/32"]``) sees
``https://en.wikipedia.org/wiki/...`` as if it were the real site. Served:

- the pooled HotpotQA dev paragraphs as Wikipedia-like pages (``scripts.corpora``);
- the CRAG search-result pages (raw HTML at ``page_url``; the first copy of a duplicated URL);
- the AEB news pages (raw bytes, charset left to the page itself);
- under ``http://fixture.test/`` (and any ``*.fixture.test`` host) pages for the error paths:
  ``/page``, ``/echo`` (shows the Host and User-Agent it saw), ``/slow?s=SECONDS``, ``/hang``
  (never answers), ``/redirect?to=URL``, ``/chain/N`` (N redirects, then a page), ``/loop/a`` and
  ``/loop/b`` (a redirect loop), ``/moved`` (relative redirect to ``/page``), ``/big?mb=N`` and
  ``/big.pdf?mb=N`` (streamed, no length), ``/gbk-header``, ``/gbk-meta``, ``/mislabelled`` (GBK
  bytes declared UTF-8), ``/doc.pdf``, ``/untyped`` and ``/untyped.pdf`` (no Content-Type),
  ``/plain.txt``, ``/image.png``, ``/empty``, ``/status/CODE``; anything else is a 404.

Latency can be injected per URL (``latency``: a function of the logical URL giving seconds);
:func:`bench_latency` gives most pages 50–300 ms, deterministic from the URL, and named
stragglers 10 s. The server logs every request with its time in flight (``stats``).

``python -m scripts.fixture_web --port N`` serves until Ctrl-C and prints the settings to use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import lxml.html

from retrieval.config import FetchConfig
from retrieval.decode import decode_body
from scripts.corpora import aeb_pages, crag_questions, hotpot_documents, wiki_page_html

if TYPE_CHECKING:
    from retrieval.search.local import LocalCorpusBackend

Latency = Callable[[str], float]
TEST_HOST = "fixture.test"

# Written for these fixtures (not third-party text): a known phrase for the charset tests.
GBK_TEXT = (
    "长城是中国古代修建的军事防御工程，东起山海关，西至嘉峪关，全长超过两万公里。"
    "历代王朝不断修筑和加固城墙，用来抵御北方游牧民族的侵扰。"
    "今天，长城已经成为世界文化遗产，每年吸引大量游客前来参观。"
    "人们常说：不到长城非好汉。这句话出自毛泽东的词作，后来成为家喻户晓的名言。"
)
PDF_LINES = ("Megrez fixture PDF document.", "The quick brown fox jumps over the lazy dog.", "Page text is known.")


def bench_latency(stragglers: Iterable[str] = (), *, straggler_s: float = 10.0) -> Latency:
    """Most pages 50-300 ms (fixed per URL), the given URLs ``straggler_s``."""
    slow = frozenset(_target(u) for u in stragglers)

    def latency(url: str) -> float:
        if _target(url) in slow:  # the server sees http:// and a decoded path
            return straggler_s
        return 0.05 + (zlib.crc32(url.encode()) % 251) / 1000

    return latency


def make_pdf(lines: Iterable[str], title: str = "Megrez fixture") -> bytes:
    """A minimal valid one-page PDF showing ``lines`` in Helvetica (ASCII text)."""

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"] + [f"({esc(line)}) Tj T*" for line in lines] + ["ET"]
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Title (%s) >>" % esc(title).encode("latin-1"),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")
    )


def _html(title: str, paragraphs: Iterable[str], head: str = "") -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return f"<!DOCTYPE html><html><head>{head}<title>{title}</title></head><body><article><h1>{title}</h1>{body}</article></body></html>"


_PARAGRAPH = (
    "This fixture page exists to exercise the fetcher. It carries a few sentences of ordinary "
    "English prose so that the extractor finds a main text worth keeping, as it would on a real "
    "article page served by a real web server somewhere on the internet."
)


@dataclass(slots=True)
class Response:
    status: int = 200
    content_type: str | None = "text/html; charset=utf-8"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Visit:
    url: str  # logical: http://{Host}{path}
    start: float
    end: float = math.inf  # still in flight


@dataclass(slots=True)
class Stats:
    """Every request the server saw, with its time in flight (monotonic clock)."""

    visits: list[Visit] = field(default_factory=list)

    def requests(self, url: str) -> int:
        return sum(v.url == url for v in self.visits)

    def max_concurrent(self, urls: Iterable[str]) -> int:
        """The most of these URLs' requests that were in flight at one time."""
        wanted = set(urls)
        # At equal times -1 sorts first: a request ending as another starts is no overlap.
        edges = sorted((t, step) for v in self.visits if v.url in wanted for t, step in ((v.start, 1), (v.end, -1)))
        now = peak = 0
        for _t, step in edges:
            now += step
            peak = max(peak, now)
        return peak


def _key(host: str, target: str) -> tuple[str, str]:
    """Page key: host without port, percent-decoded path and query (clients differ in escaping)."""
    host = host.lower()
    host = host[: host.find("]") + 1] if host.startswith("[") else host.split(":")[0]
    return host, unquote(target or "/")


def _target(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return _key(parts.netloc, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))


def _plain_text(raw: bytes) -> tuple[str, str]:
    """A page's title and visible text; cheap (no main-text extraction), for the search index."""
    doc = lxml.html.document_fromstring(decode_body(raw, None))
    for el in doc.xpath("//script|//style|//noscript"):
        el.drop_tree()
    title = " ".join((doc.findtext(".//title") or "").split())
    return title, " ".join(doc.text_content().split())


class WebSearch:
    """A search backend that knows only URLs, as a web engine does: its hits must be fetched (wraps the
    fixture web's local search, whose hits would otherwise be read straight from its index)."""

    name = "web"

    def __init__(self, inner: LocalCorpusBackend) -> None:
        self._inner = inner

    async def search(self, query: str, *, k: int, language: str | None = None, time_range: str | None = None):
        return await self._inner.search(query, k=k, language=language, time_range=time_range)

    async def aclose(self) -> None:
        pass


class FixtureWeb:
    """The server. ``start()`` runs it in a background thread (tests); ``serve()`` in the running
    loop (standalone). ``base_url`` is known once it listens."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: Latency | None = None) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.stats = Stats()
        self.pages: dict[tuple[str, str], Response] = {}
        self.documents: list[dict] = []  # {"url", "title", "text"} of every corpus page, for search
        self._aeb_raw: list[tuple[str, bytes]] = []
        self._crag_raw: list[tuple[str, str, bytes]] = []
        self._load()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._handlers: set[asyncio.Task] = set()
        self._search: LocalCorpusBackend | None = None
        self._search_lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fetch_config(self, **overrides: Any) -> FetchConfig:
        """Fetch settings that send every origin here and let the guard allow this server."""
        settings: dict[str, Any] = {"route_map": {"*": self.base_url}, "allow_private": [f"{self.host}/32"]}
        settings.update(overrides)
        return FetchConfig(**settings)

    # --- content ------------------------------------------------------------------------

    def _add(self, url: str, body: bytes, content_type: str | None) -> bool:
        key = _target(url)
        if key in self.pages:
            return False
        self.pages[key] = Response(body=body, content_type=content_type)
        return True

    def _load(self) -> None:
        for doc in hotpot_documents("dev"):
            self._add(doc["url"], wiki_page_html(doc).encode("utf-8"), "text/html; charset=utf-8")
            self.documents.append({"url": doc["url"], "title": doc["title"], "text": doc["text"]})
        for question in crag_questions():
            for result in question.results:
                html = result.get("page_result") or ""
                if html.strip() and self._add(result["page_url"], html.encode("utf-8"), "text/html; charset=utf-8"):
                    self._crag_raw.append((result["page_url"], result.get("page_name") or "", html.encode("utf-8")))
        for _id, url, raw in aeb_pages():
            if self._add(url, raw, "text/html"):
                self._aeb_raw.append((url, raw))

    def _corpus_documents(self) -> list[dict]:
        docs = list(self.documents)
        for url, name, raw in self._crag_raw:
            title, text = _plain_text(raw)
            docs.append({"url": url, "title": name or title, "text": text})
        for url, raw in self._aeb_raw:
            title, text = _plain_text(raw)
            docs.append({"url": url, "title": title, "text": text})
        return docs

    def search_backend(self) -> LocalCorpusBackend:
        """A local BM25 search over every corpus page, built once (on first use)."""
        from retrieval.search.local import LocalCorpusBackend

        with self._search_lock:
            if self._search is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="fixture-web-")
                corpus = Path(self._tmp.name) / "corpus.jsonl"
                with corpus.open("w", encoding="utf-8") as f:
                    for doc in self._corpus_documents():
                        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                self._search = LocalCorpusBackend(corpus, Path(self._tmp.name) / "index")
                self._search.load()
            return self._search

    async def _special(
        self, path: str, query: dict[str, list[str]], headers: dict[str, str], reader: asyncio.StreamReader
    ) -> Response | None:
        """Pages of the test host; ``None`` for a 404. May sleep, or never answer (``/hang``)."""

        def arg(name: str, default: str) -> str:
            return query.get(name, [default])[0]

        html = "text/html; charset=utf-8"
        gbk_page = _html("长城", [GBK_TEXT, GBK_TEXT])
        if path == "/page":
            return Response(body=_html("Fixture page", [_PARAGRAPH] * 3).encode())
        if path == "/echo":
            seen = [
                f"Host header seen: {headers.get('host', '')}.",
                f"User agent seen: {headers.get('user-agent', '')}.",
            ]
            return Response(body=_html("Echo", [*seen, _PARAGRAPH]).encode())
        if path == "/slow":
            await asyncio.sleep(float(arg("s", "1")))
            return Response(body=_html("Slow page", [_PARAGRAPH] * 3).encode())
        if path == "/hang":
            await reader.read()  # no answer, ever; returns only when the client hangs up
            raise ConnectionResetError("client left /hang")
        if path == "/redirect":
            return Response(status=302, headers={"Location": arg("to", "/page")})
        if path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            if n <= 0:
                return Response(body=_html("End of chain", [_PARAGRAPH] * 3).encode())
            return Response(status=301, headers={"Location": f"/chain/{n - 1}"})
        if path in ("/loop/a", "/loop/b"):
            return Response(status=302, headers={"Location": "/loop/b" if path.endswith("a") else "/loop/a"})
        if path == "/moved":
            return Response(status=301, headers={"Location": "page"})
        if path == "/gbk-header":
            return Response(content_type="text/html; charset=GBK", body=gbk_page.encode("gbk"))
        if path == "/gbk-meta":
            page = _html(
                "长城",
                [GBK_TEXT, GBK_TEXT],
                head='<meta http-equiv="Content-Type" content="text/html; charset=gb2312">',
            )
            return Response(content_type="text/html", body=page.encode("gbk"))
        if path == "/mislabelled":
            return Response(content_type=html, body=gbk_page.encode("gbk"))
        if path == "/doc.pdf":
            return Response(content_type="application/pdf", body=make_pdf(PDF_LINES))
        if path == "/untyped.pdf":
            return Response(content_type=None, body=make_pdf(PDF_LINES))
        if path == "/untyped":
            return Response(content_type=None, body=_html("Untyped page", [_PARAGRAPH] * 3).encode())
        if path == "/plain.txt":
            return Response(content_type="text/plain; charset=utf-8", body=("Plain text file.\n" + _PARAGRAPH).encode())
        if path == "/image.png":
            return Response(content_type="image/png", body=_png())
        if path == "/empty":
            return Response(body=b"<html><body></body></html>")
        if path.startswith("/status/"):
            return Response(status=int(path.rsplit("/", 1)[1]), body=b"<html><body>status page</body></html>")
        return None

    async def _respond_big(self, writer: asyncio.StreamWriter, path: str, megabytes: float) -> None:
        """A body far over any sane cap, sent chunked without a length, until the client leaves."""
        pdf = path.endswith(".pdf")
        content_type = "application/pdf" if pdf else "text/html; charset=utf-8"
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        head = (
            make_pdf(PDF_LINES)[:-6]
            if pdf
            else b"<!DOCTYPE html><html><head><title>Big page</title></head><body><article>"
        )
        filler = b"%% padding\n" * 200 if pdf else f"<p>{_PARAGRAPH}</p>".encode() * 20
        for piece in (head, *([filler] * int(megabytes * 1_000_000 // len(filler) + 1))):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    # --- HTTP ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # server shutdown: ending the handler quietly is the point
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):  # shutdown may land here too
                await writer.wait_closed()
            if task is not None:  # only now: shutdown waits for the handlers it knows of
                self._handlers.discard(task)

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; ``False`` when the connection should close."""
        line = await reader.readline()
        if not line.strip():
            return False
        _method, target, version = line.decode("latin-1").split()
        headers: dict[str, str] = {}
        while (raw := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if length := int(headers.get("content-length", "0") or 0):
            await reader.readexactly(length)
        host_key, path_key = _key(headers.get("host", ""), target)
        if host_key in (self.host, "localhost"):
            host_key = TEST_HOST  # direct visits (curl, a browser) see the test pages
        visit = Visit(f"http://{host_key}{path_key}", time.monotonic())
        self.stats.visits.append(visit)
        try:
            if self.latency is not None:
                await asyncio.sleep(self.latency(visit.url))
            parts = urlsplit(path_key)
            if host_key == TEST_HOST or host_key.endswith("." + TEST_HOST):
                if parts.path in ("/big", "/big.pdf"):
                    await self._respond_big(writer, parts.path, float(parse_qs(parts.query).get("mb", ["8"])[0]))
                    return False
                response = await self._special(parts.path, parse_qs(parts.query), headers, reader)
            else:
                response = self.pages.get((host_key, path_key))
        finally:
            visit.end = time.monotonic()
        if response is None:
            response = Response(status=404, body=b"<html><body><h1>Not found</h1></body></html>")
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        head = [f"HTTP/1.1 {response.status} {'OK' if response.status == 200 else 'Fixture'}"]
        if response.content_type:
            head.append(f"Content-Type: {response.content_type}")
        head += [f"{k}: {v}" for k, v in response.headers.items()]
        head += [f"Content-Length: {len(response.body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        await writer.drain()
        return keep_alive

    # --- life cycle ----------------------------------------------------------------------

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Listen in the running loop until cancelled; ``ready`` is called once listening."""
        await self._listen()
        assert self._server is not None
        if ready is not None:
            ready()
        try:
            await self._server.serve_forever()
        finally:
            await self._shutdown()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=1 << 16, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def start(self) -> FixtureWeb:
        """Serve from a background thread with its own event loop; returns once listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="fixture-web", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self._tmp is not None:
            self._tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", action="store_true", help="inject 50-300 ms per page, as the benchmark does")
    args = parser.parse_args(argv)
    web = FixtureWeb(host=args.host, port=args.port, latency=bench_latency() if args.latency else None)

    def ready() -> None:
        example = urlsplit(web.documents[0]["url"])
        print(f"fixture web: {len(web.pages)} pages at {web.base_url} (Ctrl-C stops it)")
        print("Use these settings:")
        print(f"MEGREZ_FETCH__ROUTE_MAP='{json.dumps({'*': web.base_url})}'")
        print(f"MEGREZ_FETCH__ALLOW_PRIVATE='{json.dumps([web.host + '/32'])}'")
        print(
            f"Try: curl -H 'Host: {example.netloc}' '{web.base_url}{example.path}'  or  curl {web.base_url}/page",
            flush=True,
        )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(web.serve(ready))


if __name__ == "__main__":
    main()
