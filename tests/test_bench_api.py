"""bench.api's own logic, where it could be wrong without any timing showing it: the per-piece delay, the
percentile, the fixed/per-piece fit, the client's HTTP/SSE reading and verdicts, the floor's streams, and the
profile's attribution rules. No timings are asserted."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from bench.api import Level, server_groups
from bench.api_client import ANSWER_PIECE, ClientReport, Job, Pieces, _Stream, added_delays, run_job
from bench.api_profile import EVENT_LOOP, OTHER, REPO, component_of, summarize
from bench.api_report import Row, fit_line, percentile, print_report
from bench.floor import create_app
from scripts.tiny_models import serve_in_process

SITE = "/venv/lib/python3.11/site-packages"


def test_added_delay_is_per_piece_against_the_most_punctual_piece():
    assert added_delays([10.0, 10.02, 10.04], 0.02) == pytest.approx([0, 0, 0], abs=1e-9)
    # Pieces 2 and 3 came merged in one late event: each is late by its own due time.
    assert added_delays([0.0, 0.02, 0.1, 0.1], 0.02) == pytest.approx([0, 0, 0.06, 0.04])
    # A late first piece: the stream's punctual pieces set the baseline, not the first one.
    assert added_delays([0.05, 0.06, 0.08], 0.02) == pytest.approx([0.01, 0, 0])
    assert added_delays([], 0.02) == []


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.99) == 99
    assert percentile(values, 0.5) == 50
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2
    assert percentile([7.0], 0.99) == 7
    assert math.isnan(percentile([], 0.5))


def test_fit_line_splits_fixed_and_per_piece():
    assert fit_line([(40, 10 + 40 * 0.2), (200, 10 + 200 * 0.2)]) == pytest.approx((10, 0.2))
    assert fit_line([(40, 18.0), (100, 30.0), (200, 50.0)]) == pytest.approx((10, 0.2))
    fixed, per_piece = fit_line([(40, 18.0), (40, 19.0)])
    assert math.isnan(fixed) and math.isnan(per_piece)  # one piece count: no line


class _Transport:
    def __init__(self) -> None:
        self.written, self.closed = b"", False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def _chunked(body: str) -> bytes:
    """An SSE response as uvicorn sends it: chunked, one chunk per frame (sse-starlette's CRLF separators)."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    frames = [f + "\r\n\r\n" for f in body.split("\n\n") if f]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(f.encode()), f.encode()) for f in frames)
    return head + chunks + b"0\r\n\r\n"


def _feed(route: str, response: bytes, *, step: int = 7, close: bool = False) -> tuple[Pieces, str | None]:
    """Feed ``response`` to the client's protocol in ``step``-byte pieces, a little later each time."""

    async def go() -> tuple[Pieces, str | None]:
        pieces, done = Pieces(route), asyncio.get_running_loop().create_future()
        stream, transport = _Stream(b"request", pieces, done), _Transport()
        stream.connection_made(transport)
        assert transport.written == b"request"
        for i in range(0, len(response), step):
            stream.data_received(response[i : i + step])
        if close:
            stream.connection_lost(None)
        return pieces, await done

    return asyncio.run(go())


def _chat_body(ids: list[str], *, done: bool = True) -> str:
    token = json.dumps({"type": "token", "text": ANSWER_PIECE * 2})
    frames = ['event: meta\nid: 0-0\ndata: {"type": "meta"}'] + [f"event: token\nid: {i}\ndata: {token}" for i in ids]
    frames += ['event: done\nid: 9-0\ndata: {"type": "done", "status": "done"}'] if done else []
    return "\n\n".join(frames) + "\n\n"


def test_the_client_reads_chunked_sse_split_anywhere():
    pieces, error = _feed("chat", _chunked(_chat_body(["1-0", "1-1", "2-0"])))
    assert error is None
    assert pieces.text == ANSWER_PIECE * 6
    assert len(pieces.arrivals) == 6  # two pieces per token event, each timed
    assert pieces.verdict(ANSWER_PIECE * 6) is None
    assert pieces.verdict(ANSWER_PIECE * 7) == "text differs"


def test_the_client_finds_reordered_ids_and_missing_ends():
    pieces, _ = _feed("chat", _chunked(_chat_body(["1-0", "2-0", "1-5"])))
    assert pieces.verdict(ANSWER_PIECE * 6) == "ids out of order"
    pieces, _ = _feed("chat", _chunked(_chat_body(["1-0", "1-0", "2-0"])))
    assert pieces.verdict(ANSWER_PIECE * 6) == "ids out of order"  # a duplicate
    head = _chunked(_chat_body(["1-0"], done=False))[: -len(b"0\r\n\r\n")]  # cut before the last chunk
    pieces, error = _feed("chat", head, close=True)
    assert error == "closed before the end"
    assert pieces.verdict(ANSWER_PIECE * 2) == "no end event"


def test_the_client_reads_openai_chunks_and_refuses_an_error_status():
    chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"delta": {"content": ANSWER_PIECE}}]}] * 3 + [{"choices": [], "usage": {}}]
    body = "\n\n".join(f"data: {json.dumps(c)}" for c in chunks) + "\n\ndata: [DONE]\n\n"
    pieces, error = _feed("v1", _chunked(body), step=5)
    assert (error, pieces.verdict(ANSWER_PIECE * 3), len(pieces.arrivals)) == (None, None, 3)
    refused = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}"
    assert _feed("v1", refused)[1] == "HTTP 503"


@pytest.mark.parametrize("route", ["chat", "v1"])
async def test_the_floor_streams_what_the_client_expects(route):
    async with serve_in_process(create_app(tokens=5, pace_s=0.001)) as url:
        port = int(url.rsplit(":", 1)[1])
        report = await run_job(Job(port, route, 5, 0.001, [time.time()] * 3, timeout_s=30))
    assert report.verdicts == [None, None, None]
    assert len(report.delays) == 15 and min(report.delays) == 0
    assert report.cpu_s > 0 and report.ended >= report.began


def _frames(*frames: tuple[str, str]) -> list[str]:
    return [f"{name} ({file}:1)" for name, file in frames]


@pytest.fixture
def stdlib():
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def test_attribution_charges_neutral_code_to_its_caller(stdlib):
    agent_json = _frames(
        ("Runner.run", f"{stdlib}/asyncio/runners.py"),
        ("CitationProcessor.feed", f"{REPO}/agent/citations.py"),
        ("dumps", f"{stdlib}/json/__init__.py"),
    )
    assert component_of(agent_json) == "our agent"
    callbacks = _frames(
        ("generate", f"{REPO}/agent/generation.py"),
        ("Pregel.astream", f"{SITE}/langgraph/pregel/main.py"),
        ("AsyncCallbackManager.on_event", f"{SITE}/langchain_core/callbacks/manager.py"),
        ("Future.set_result", f"{stdlib}/asyncio/futures.py"),
    )
    assert component_of(callbacks) == "LangGraph/langchain_core"
    redis = _frames(("Pipeline.execute", f"{SITE}/redis/asyncio/client.py"), ("wait_for", f"{stdlib}/asyncio/tasks.py"))
    assert component_of(redis) == "redis-py"
    validated = _frames(
        ("chat", f"{REPO}/api/routes/chat.py"), ("BaseModel.model_dump_json", f"{SITE}/pydantic/main.py")
    )
    assert component_of(validated) == "our API"
    assert component_of(_frames(("Server.run", f"{SITE}/uvicorn/server.py"), ("x", f"{SITE}/numpy/core.py"))) == OTHER


def test_attribution_stops_at_the_event_loop(stdlib):
    # uvloop's own work in C: the sample ends in Runner.run; what runs the loop (uvicorn, our workers) is not charged.
    loop = _frames(("Server.run", f"{SITE}/uvicorn/server.py"), ("Runner.run", f"{stdlib}/asyncio/runners.py"))
    assert component_of(loop) == EVENT_LOOP
    assert component_of(['process 12:"python -m x"', *_frames(("select", f"{stdlib}/selectors.py"))]) == EVENT_LOOP
    served = _frames(
        ("_serve", f"{REPO}/api/workers.py"),
        ("Runner.run", f"{stdlib}/asyncio/runners.py"),
        ("RequestResponseCycle.run_asgi", f"{SITE}/uvicorn/protocols/http/httptools_impl.py"),
    )
    assert component_of(served) == "web stack"


def test_summarize_weighs_stacks_by_their_counts(stdlib):
    floor = ";".join(_frames(("paced", "bench/floor.py")))  # a relative file is the repository's
    loop = ";".join(_frames(("Runner.run", f"{stdlib}/asyncio/runners.py")))
    shares = summarize(f"{floor} 3\n{loop} 1\nnot a stack line\n")
    assert shares == {"floor": 0.75, EVENT_LOOP: 0.25}


def _report(delays: list[float], verdicts: list[str | None], cpu_s: float, span: tuple[float, float]) -> ClientReport:
    return ClientReport(delays=delays, verdicts=verdicts, lags=[cpu_s / 100], cpu_s=cpu_s, began=span[0], ended=span[1])


def test_a_row_sums_the_client_processes():
    reports = [
        _report([0.0, 0.01], [None], 0.1, (100.0, 101.0)),
        _report([0.0, 0.5], [None, "timed out"], 0.3, (100.5, 102.0)),
    ]
    labels = {"level": "x", "tokens": 2, "route": "r", "server": "ours", "workers": 1, "kib_per_stream": 0.0}
    row = Row.of(reports, streams=3, server_cpu_s=0.6, redis_cpu_s=0.3, **labels)
    assert row.pieces_per_s == pytest.approx(4 / 2.0)  # 4 pieces from the first start (100) to the last end (102)
    assert row.cpu_ms == pytest.approx(200) and row.client_ms == pytest.approx(400 / 3)
    assert row.client_busiest == pytest.approx(0.2)  # 0.3 s over 1.5 s
    assert row.redis_ms == pytest.approx(100) and row.cores_busy == pytest.approx(1.3 / 2.0)
    assert row.p99_ms == pytest.approx(500) and row.bad == ["timed out"]
    assert row.client_lag_ms == pytest.approx((3, 3))  # the worse of the two processes' lags
    floor = Row.of(reports, streams=3, server_cpu_s=0.6, redis_cpu_s=None, **labels)  # a server without Redis
    assert math.isnan(floor.redis_ms) and floor.cores_busy == pytest.approx(0.5)


def test_the_report_fits_fixed_and_per_piece_cost(capsys):
    def row(server: str, tokens: int, cpu_ms: float) -> Row:
        figures = dict.fromkeys(["pieces_per_s", "p50_ms", "p99_ms", "redis_ms", "client_ms", "client_busiest"], 1.0)
        figures |= dict.fromkeys(["cores_busy", "kib_per_stream", "wall_s"], 1.0) | {"client_lag_ms": (1.0, 1.0)}
        return Row(f"fit {tokens}", tokens, 20, "/chat SSE", server, 1, cpu_ms=cpu_ms, bad=[], **figures)

    rows = [row("ours", 40, 10 + 40 * 0.2), row("ours", 200, 10 + 200 * 0.2), row("floor", 40, 1.5 + 40 * 0.036)]
    rows.append(row("floor", 200, 1.5 + 200 * 0.036))
    print_report(rows, fit_levels=["fit 40", "fit 200"])
    out = capsys.readouterr().out
    assert "| 1 | /chat SSE | ours | 10.00 ms | 200 µs | 5,000 |" in out
    assert "| 1 | /chat SSE | floor | 1.50 ms | 36 µs | 27,778 |" in out
    assert "| 1 | fit 40 | /chat SSE | 18.0 / 2.9 ms (6.1×) |" in out  # ours ÷ floor at the same level


def test_levels_sharing_a_server_start_together():
    a, b, c = Level("a", 20, 40, 0.02, 2), Level("b", 100, 40, 0.02, 0), Level("c", 20, 200, 0.02, 2)
    assert server_groups([a, c, b]) == [[a, b], [c]]
