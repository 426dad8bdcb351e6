"""bench.api's client: many SSE streams at little CPU of its own, spread over several processes.

One ``httpx.AsyncClient`` for every stream cost a full core at 500+ streams: httpcore's pool scans every
connection on each request and each close, so the old figures partly measured the client. Here:

* **one connection per stream**, as distinct users have, opened with ``loop.create_connection`` and read
  by an ``asyncio.Protocol`` that hands each chunk to httptools' C response parser (the one uvicorn
  uses) and splits the body into SSE frames (``scripts.net.sse_frames``). No pool, no per-line task
  switch: the client's work per piece is one JSON decode. ``Connection: close``, so no connection is
  ever reused — which also rules out the keep-alive race that ended ``--streams 300`` in
  ``httpx.ReadError`` (an idle keep-alive connection reused just as uvicorn's 5 s ``timeout_keep_alive``
  closes it: the request goes out on a socket the server has closed, and the read gets a reset);
* **several processes** (``--client-procs``), each with its own event loop (uvloop where installed, as
  uvicorn picks), stream *i* in process *i* mod K, each stream opened at its own wall-clock time
  (``ramp_s · i / N`` after a common start), so the load has the same shape whatever K is; each process
  reports its streams' results and its own CPU (``getrusage``) over them.

The same client reads ours and the floor (``bench/floor.py``). A piece's arrival time is when its chunk
was handed to the protocol; the added delay of piece *j* is ``(t_j - j · pace) - min_k (t_k - k · pace)``
(:func:`added_delays`): how much later than the engine's own pace it came, against its stream's most
punctual piece — per piece, not per event, since under load several pieces share one event.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import itertools
import json
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from scripts.net import sse_frames

ANSWER_PIECE = "word "  # counted by its word: the citation processor may hold a trailing space back
WORD = ANSWER_PIECE.strip()
ROUTES = {"chat": "/chat SSE", "v1": "/v1/chat/completions"}
_PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass
class Job:
    """One client process's share of a level: its streams' wall-clock start times (``time.time()``) on
    ``route`` (``chat`` or ``v1``) of the server at 127.0.0.1:``port``."""

    port: int
    route: str
    tokens: int
    pace_s: float
    starts: list[float]
    timeout_s: float


@dataclass
class ClientReport:
    """What one client process sends back: every piece's added delay (seconds), one verdict per stream
    (None when the stream was whole and in order, else what went wrong), how late its event loop woke a
    5 ms sleeper each time (seconds: while it is late, pieces wait unread in their sockets and count as the
    server's delay), its CPU seconds over the streams, and the wall-clock span from its first start to its
    last stream's end."""

    delays: list[float] = field(default_factory=list)
    verdicts: list[str | None] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    began: float = 0.0
    ended: float = 0.0


def added_delays(arrivals: list[float], pace_s: float) -> list[float]:
    """Each piece's delay beyond the engine's pace, against the stream's most punctual piece (seconds)."""
    offsets = [t - i * pace_s for i, t in enumerate(arrivals)]
    least = min(offsets, default=0.0)
    return [o - least for o in offsets]


class Pieces:
    """One stream's SSE frames read as the answer: its text, event ids and each answer piece's arrival.

    Example::

        pieces = Pieces("chat")
        pieces.frame({"event": "token", "id": "1-0", "data": '{"text": "word "}'}, now=0.5)
        pieces.verdict("word ")  # None: whole, ordered, ended
    """

    def __init__(self, route: str) -> None:
        """``route``: ``chat`` (``event: token`` frames with ``id``, ``done`` last) or ``v1`` (OpenAI chunks,
        ``[DONE]`` last)."""
        self.route = route
        self.text = ""
        self.ids: list[str] = []
        self.arrivals: list[float] = []
        self.ended = False

    def frame(self, frame: dict[str, str], now: float) -> None:
        """Take one frame that arrived at ``now`` (``time.perf_counter()``)."""
        data = frame.get("data", "")
        if self.route == "chat":
            if "id" in frame:
                self.ids.append(frame["id"])
            self.ended = self.ended or frame.get("event") == "done"
            piece = json.loads(data)["text"] if frame.get("event") == "token" else ""
        elif data == "[DONE]":
            self.ended, piece = True, ""
        else:
            choices = json.loads(data).get("choices") if data else None
            piece = (choices[0]["delta"].get("content") or "") if choices else ""
        self.arrivals += [now] * piece.count(WORD)
        self.text += piece

    def verdict(self, expected: str) -> str | None:
        """None when the stream ended, carried exactly ``expected`` and its ids rose strictly; else why not."""
        if not self.ended:
            return "no end event"
        if self.text != expected:
            return "text differs"
        keys = [tuple(map(int, i.split("-"))) for i in self.ids]
        if any(a >= b for a, b in itertools.pairwise(keys)):
            return "ids out of order"
        return None


class _Stream(asyncio.Protocol):
    """One request on a connection of its own; ``done`` resolves to an error string or None."""

    def __init__(self, request: bytes, pieces: Pieces, done: asyncio.Future) -> None:
        self.request, self.pieces, self.done = request, pieces, done
        self.parser = httptools.HttpResponseParser(self)
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buffer, self.now = "", 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # bad HTTP, or bad JSON raised in on_body (then its context)
            self._finish(f"bad response: {type(exc.__context__ or exc).__name__}")

    def on_body(self, body: bytes) -> None:  # httptools' callback
        frames, self.buffer = sse_frames(self.buffer + self.decoder.decode(body))
        for frame in frames:
            self.pieces.frame(frame, self.now)

    def on_message_complete(self) -> None:  # httptools' callback
        status = self.parser.get_status_code()
        self._finish(None if status == 200 else f"HTTP {status}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(type(exc).__name__ if exc else "closed before the end")

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result(error)
        if self.transport is not None:
            self.transport.close()


def request_bytes(route: str, port: int) -> bytes:
    """The HTTP/1.1 request of one streamed turn on ``route``, search off, connection not kept."""
    if route == "chat":
        target, body = "/chat?websearch=off", {"message": "q"}
    else:
        target = "/v1/chat/completions"
        body = {"model": "megrez-search", "stream": True, "messages": [{"role": "user", "content": "q"}]}
        body["megrez_websearch"] = "off"
    payload = json.dumps(body).encode()
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


async def one_stream(job: Job, start: float, report: ClientReport) -> None:
    """One streamed turn opened at wall-clock ``start``; its delays and verdict go into ``report``."""
    await asyncio.sleep(max(0.0, start - time.time()))
    loop = asyncio.get_running_loop()
    pieces, done = Pieces(job.route), loop.create_future()
    try:
        transport, _ = await loop.create_connection(
            lambda: _Stream(request_bytes(job.route, job.port), pieces, done), "127.0.0.1", job.port
        )
    except OSError as exc:
        report.verdicts.append(type(exc).__name__)
        return
    try:
        error = await asyncio.wait_for(done, job.timeout_s)
    except TimeoutError:
        error = "timed out"
    finally:
        transport.close()
    report.ended = max(report.ended, time.time())
    report.verdicts.append(error or pieces.verdict(ANSWER_PIECE * job.tokens))
    report.delays += added_delays(pieces.arrivals, job.pace_s)


async def run_job(job: Job) -> ClientReport:
    """Every stream of ``job``, concurrently; the report of this process."""
    report = ClientReport(began=min(job.starts, default=time.time()))
    cpu = _cpu_s()
    probe = asyncio.create_task(_probe_lag(report.began, report.lags))
    await asyncio.gather(*(one_stream(job, start, report) for start in job.starts))
    probe.cancel()
    report.cpu_s = _cpu_s() - cpu
    return report


async def _probe_lag(start: float, lags: list[float], every_s: float = 0.005) -> None:
    """From wall-clock ``start`` on, how late the loop wakes a sleeper of ``every_s``, into ``lags``."""
    await asyncio.sleep(max(0.0, start - time.time()))
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every_s
        await asyncio.sleep(every_s)
        lags.append(loop.time() - due)


def client_process(job: Job, send: Callable[[ClientReport], None]) -> None:
    """A client process's body: run ``job`` on a fresh event loop and ``send`` the report. Ctrl-C is left
    to the parent, which stops its client processes itself (Linux: the process dies with its parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # and ends with it, even a SIGKILLed one
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        send(runner.run(run_job(job)))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # asyncio's own loop: slower, the same for ours and the floor
        return None
    return uvloop.new_event_loop


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
