"""Prometheus metrics (``GET /metrics``): requests, turn stages, tokens, search outcomes, streams, load.

One :class:`Metrics` per app, on its own registry (no process-global state: two apps in one process,
as in the tests, count separately). What is counted:

- ``megrez_requests_total{route,method,status}`` — every HTTP request, by route template;
- ``megrez_turn_stage_seconds{stage}`` — per turn: ``search``, ``read``, ``first_token``, ``total``;
- ``megrez_tokens_total{direction}`` — prompt (``in``) and generated (``out``) tokens;
- ``megrez_turns_total{outcome}`` — turns answered, failed (by error code) or stopped;
- ``megrez_search_total{backend,outcome}`` — per search round: ``answered`` by a backend, ``empty``,
  and every backend passed over, ``failed`` with its reason's kind (``timed out``, ``rate limited``…);
- ``megrez_search_cache_hits_total`` — rounds answered from the search cache;
- ``megrez_active_streams`` — SSE streams open now (``/chat``, resumes, OpenAI);
- ``megrez_turns_running`` — turns running in this service (the engine's queue, seen from here).

With several workers (``api/workers.py``) the metrics are the host's: prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set by the parent before the workers start) keeps each worker's
values in files there, and :meth:`Metrics.render` in whichever worker answers ``/metrics`` adds them up:
counters and histograms summed, the gauges as ``livesum``. A gauge cannot call into the other workers
at scrape time, so each worker writes its ``megrez_turns_running`` once a second. One series is then
per worker: ``megrez_worker_turns{pid}``, the turns each has finished (answered or failed), which shows
how evenly the port spreads the load. vLLM's frontends write their ``vllm:*`` metrics to the same
directory; they are left out, so ``/metrics`` says the same with one worker or several.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.events import AnswerEvent, ErrorEvent, Event, SourcesEvent
from api.workers import METRICS_DIR

_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
RUNNING_REFRESH_S = 1.0


class Metrics:
    """The service's metrics on one registry.

    Example::

        metrics = Metrics(running=lambda: len(runner.running))
        metrics.observe(event)  # each agent event of a turn
        body = metrics.render()
    """

    def __init__(self, running: Callable[[], int] = lambda: 0) -> None:
        """``running``: the number of turns this process runs now."""
        self.registry = CollectorRegistry()
        r = self.registry
        # prometheus_client read the variable when it was imported; the workers inherit it from the parent.
        self._host: CollectorRegistry | None = None
        if METRICS_DIR in os.environ:
            self._host = CollectorRegistry()
            self._host.register(_HostCollector())
        self.requests = Counter("megrez_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.stages = Histogram(
            "megrez_turn_stage_seconds", "Time per turn stage", ["stage"], buckets=_STAGE_BUCKETS, registry=r
        )
        self.tokens = Counter("megrez_tokens", "Tokens in prompts (in) and generated (out)", ["direction"], registry=r)
        self.turns = Counter("megrez_turns", "Turns by outcome", ["outcome"], registry=r)
        self.search = Counter("megrez_search", "Search rounds and backend failures", ["backend", "outcome"], registry=r)
        self.cache_hits = Counter("megrez_search_cache_hits", "Search rounds answered from the cache", registry=r)
        self.streams = Gauge("megrez_active_streams", "SSE streams open", multiprocess_mode="livesum", registry=r)
        self._running = running
        self._running_gauge = Gauge("megrez_turns_running", "Turns running", multiprocess_mode="livesum", registry=r)
        self.worker_turns: Gauge | None = None
        if self._host is None:
            self._running_gauge.set_function(running)
        else:
            self.worker_turns = Gauge(
                "megrez_worker_turns", "Turns finished by each worker", multiprocess_mode="liveall", registry=r
            )
            with contextlib.suppress(RuntimeError):  # no event loop: render() writes it
                asyncio.get_running_loop().call_soon(self._write_running)

    def _write_running(self) -> None:
        """Multiprocess mode: this worker's running turns into its file, now and every second."""
        self._running_gauge.set(self._running())
        asyncio.get_running_loop().call_later(RUNNING_REFRESH_S, self._write_running)

    def observe(self, event: Event) -> None:
        """Count what one agent event says (search outcomes, and the finished turn's timings and usage)."""
        if isinstance(event, SourcesEvent):
            for failure in event.failures:
                self.search.labels(failure.backend, "failed: " + _reason_kind(failure.reason)).inc()
            self.search.labels(event.backend or "none", "answered" if event.sources else "empty").inc()
            if event.cached:
                self.cache_hits.inc()
        elif isinstance(event, AnswerEvent):
            answer = event.answer
            self.turns.labels("answered").inc()
            timings = answer.timings
            for stage, ms in (
                ("search", timings.search_ms),
                ("read", timings.read_ms),
                ("first_token", timings.first_token_ms),
                ("total", timings.total_ms),
            ):
                if ms is not None:
                    self.stages.labels(stage).observe(ms / 1000)
            self.tokens.labels("in").inc(answer.usage.prompt_tokens)
            self.tokens.labels("out").inc(answer.usage.completion_tokens)
            if self.worker_turns is not None:
                self.worker_turns.inc()
        elif isinstance(event, ErrorEvent):
            self.turns.labels("failed: " + event.code).inc()
            if self.worker_turns is not None:
                self.worker_turns.inc()

    def render(self) -> bytes:
        """The Prometheus text: this process's metrics, or the host's with several workers."""
        if self._host is None:
            return generate_latest(self.registry)
        self._running_gauge.set(self._running())
        return generate_latest(self._host)


class _HostCollector:
    """Our metrics of every worker on the host, from the multiprocess directory (``vllm:*`` left out)."""

    def collect(self) -> Iterator[Metric]:
        return (m for m in MultiProcessCollector(None).collect() if m.name.startswith("megrez_"))


def _reason_kind(reason: str) -> str:
    """A failure reason without its details (labels must stay few): ``timed out``, ``rate limited``…"""
    return reason.split(":", 1)[0].strip()[:40] or "unknown"


class RequestMetrics:
    """ASGI middleware counting requests by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics | None]) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                route = getattr(scope.get("route"), "path", "unmatched")
                metrics.requests.labels(route, scope["method"], str(status[0])).inc()
