"""Many concurrent SSE streams through the real app, against the floor: a bare server streaming the same pieces.

**What runs.** Ours: the real app under uvicorn in processes of its own (``scripts/scripted_service.py``:
a scripted engine producing answer pieces at one every ``pace``, search off so the stream is all tokens,
a ``redis-server`` of the bench's own for memory, ``--workers`` processes on the port). The floor:
``bench/floor.py``, FastAPI + sse-starlette with the same uvicorn settings and worker count, streaming
the same pieces at the same pace in the same SSE shapes, with no agent and no store. Both are driven by
the same client (``bench/api_client.py``: one connection per stream, several client processes) in the
same run, scenario by scenario, ours then the floor, each after a warm-up that is not measured.

**What is measured**, per level (N streams opened at once or over ``ramp``) and route (``/chat`` SSE,
``/v1`` streaming):

* the added delay per answer piece (p50, p99): how much later than the engine's pace a piece came,
  against its stream's most punctual piece (see ``bench/api_client.py``);
* answer pieces per second: all pieces over the span from the first stream's start to the last one's end;
* server CPU per turn: the CPU time of every thread of every process of the server under test (its
  workers included; the scheduler's count in ``/proc/<pid>/task/*/schedstat``) over the level, ÷ N —
  accepting the stream's connection included, for ours and the floor alike; Redis's CPU apart (the floor
  has none);
* the client's own CPU per turn, its busiest process's share of a core and its event loops' lag (p99 and
  max: while a loop is late, pieces wait unread and count as the server's delay), and how many cores the
  whole machine kept busy (server + Redis + client over the span): where a client process nears a full
  core or its lag nears the delays measured, the client is the limit, and ``--client-procs`` should rise;
* memory per stream (the server's peak RSS during the level minus before, ÷ N) and bad streams (lost,
  reordered or failed pieces, transport errors: every stream's text must equal the scripted answer, its
  ids strictly increasing, its end event present).

**Fixed and per-piece cost.** The ``fit`` scenario runs 20 streams (opened over 2 s: light load, no
merging of late pieces) of 40 and of 200 pieces; server CPU per turn = fixed + pieces × per piece, fitted
by least squares (:func:`fit_line`) per server and route. Ours ÷ floor is printed for CPU per turn,
pieces/s and p99 at every level, and for the fixed and per-piece parts.

**Where the CPU goes** (``--profile``): py-spy samples the server under test during each level, summed by
component (rules in ``bench/api_profile.py``), as shares and ms per turn; with both fit levels profiled,
each component's fixed and per-piece part too.

**Clean-up.** Every child process (Redis, the servers and all their workers, client processes, py-spy) is
stopped in a ``finally``, whatever phase fails; SIGTERM and SIGHUP unwind like Ctrl-C.

    .venv/bin/python -m bench.api [--scenarios fit 100 500 1000 ramp] [--workers 1 2] [--routes chat v1]
        [--servers ours floor] [--client-procs 2] [--profile]
    .venv/bin/python -m bench.api --streams 20 --workers 1      # a custom level: --tokens, --pace-ms, --ramp-s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import resource
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from bench.api_client import ANSWER_PIECE, ROUTES, ClientReport, Job, client_process, run_job
from bench.api_profile import Profiler
from bench.api_report import Row, print_report
from scripts.net import ChildServer


@dataclass(frozen=True)
class Level:
    """``streams`` turns of ``tokens`` pieces, one every ``pace_s``, opened evenly over ``ramp_s``."""

    name: str
    streams: int
    tokens: int
    pace_s: float
    ramp_s: float


SCENARIOS: dict[str, tuple[Level, ...]] = {
    "fit": (Level("fit 40", 20, 40, 0.02, 2.0), Level("fit 200", 20, 200, 0.02, 2.0)),
    "100": (Level("100", 100, 40, 0.02, 0.0),),
    "500": (Level("500", 500, 40, 0.02, 0.0),),
    "1000": (Level("1000", 1000, 40, 0.02, 0.0),),
    "ramp": (Level("1000 ramp 5 s", 1000, 200, 0.05, 5.0),),
}
STREAM_GRACE_S = 120.0  # a stream still open this long after its last piece was due has failed
# Client processes are forked from a clean server process: quick to start, and nothing of this process's
# threads (the tokenizer's) or locks copied into them.
CLIENT_START = "forkserver"


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds of one process's threads so far (0 for none): the scheduler's own count in ns, where
    ``/proc/<pid>/stat`` counts 10 ms ticks, too coarse for a light level's few hundred ms."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat") if pid else ():
        with contextlib.suppress(OSError):
            total += int(task.read_text().split()[0])
    return total / 1e9


class Server:
    """The server under test in processes of its own — ours (``scripts/scripted_service.py``) or the floor
    (``bench/floor.py``) — measured over its whole process tree (uvicorn's workers too) and stopped with
    every process of that tree, also one a crashed parent would have left behind.

    Example::

        with Server("floor", tokens=40, pace_s=0.02, workers=1) as server:
            server.cpu_s(), server.rss_kib()
    """

    def __init__(
        self,
        target: str,
        tokens: int,
        pace_s: float,
        workers: int,
        redis_url: str | None = None,
        tokenizer: Path | None = None,
    ) -> None:
        """``target``: ``ours`` (needs ``redis_url`` and the tiny Megrez ``tokenizer``'s folder) or ``floor``;
        ``tokens`` answer pieces per turn, one every ``pace_s``, on ``workers`` processes."""
        self.target, self.workers = target, workers
        self.seen: dict[int, int] = {}  # pid → start time of every process of the tree seen
        if target == "floor":
            command = [sys.executable, "-m", "bench.floor", "--port", "{port}", "--tokens", str(tokens)]
            self.child = ChildServer([*command, "--pace-ms", str(pace_s * 1000), "--workers", str(workers)])
            return
        from scripts.scripted_service import service_process

        self.child = service_process(
            redis_url,
            *("--tokenizer", str(tokenizer), "--answer", ANSWER_PIECE * tokens + "<|turn_end|>"),
            *("--chunk-chars", str(len(ANSWER_PIECE)), "--delay-s", str(pace_s)),
            *("--answer-tokens", str(max(64, tokens * 4)), "--concurrent-turns", "1000000"),
            # No rate limit or turn cap: the benchmark is one client opening every stream. --workers only when
            # more than one, so the bench also runs against the service before it had the option.
            *(("--workers", str(workers)) if workers > 1 else ()),
        )

    @property
    def port(self) -> int:
        return self.child.port

    @property
    def pid(self) -> int:
        return self.child.pid

    def __enter__(self) -> Self:
        try:
            self.child.start(timeout_s=120)
            deadline = time.monotonic() + 120
            while not self._ready():
                if time.monotonic() > deadline or self.child.proc.poll() is not None:
                    raise RuntimeError(f"{self.target}: not ready within 120 s (or it exited)")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def tree(self) -> dict[int, list[str]]:
        """Every process of the server now: pid → the fields of its ``/proc/<pid>/stat`` after the name."""
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        children: dict[int, list[int]] = {}
        for pid, fields in stats.items():
            children.setdefault(int(fields[1]), []).append(pid)
        tree, todo = {}, [self.pid] if self.pid in stats else []
        while todo:
            pid = todo.pop()
            tree[pid] = stats[pid]
            self.seen[pid] = int(stats[pid][19])
            todo += children.get(pid, [])
        return tree

    def cpu_s(self) -> float:
        """CPU seconds of the server's processes so far."""
        return sum(map(process_cpu_s, self.tree()))

    def rss_kib(self) -> int:
        return sum(int(f[21]) for f in self.tree().values()) * os.sysconf("SC_PAGE_SIZE") // 1024

    def stop(self) -> None:
        """SIGTERM to the server (SIGKILL after 10 s), then SIGKILL to any process of its tree still there —
        also when a second Ctrl-C cuts the wait short."""
        try:
            if self.child.proc is not None:
                self.tree()
            self.child.stop()
        finally:
            for pid, started in self.seen.items():
                with contextlib.suppress(OSError, IndexError):
                    if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) == started:
                        os.kill(pid, signal.SIGKILL)


def run_level(server: Server, redis_pid: int | None, level: Level, route: str, procs: int, profile: Path | None) -> Row:
    """One level on one route: ``procs`` client processes, the server's CPU and memory around them."""
    began = time.time() + 1.0  # the client processes are forked and waiting by then
    starts = [began + level.ramp_s * i / level.streams for i in range(level.streams)]
    jobs = [
        Job(
            server.port,
            route,
            level.tokens,
            level.pace_s,
            starts[k::procs],
            level.tokens * level.pace_s + STREAM_GRACE_S,
        )
        for k in range(procs)
    ]
    context = multiprocessing.get_context(CLIENT_START)
    pipes = [context.Pipe(duplex=False) for _ in jobs]
    children = [
        context.Process(target=client_process, args=(job, send.send), daemon=True)
        for job, (_, send) in zip(jobs, pipes, strict=True)
    ]
    profiler = Profiler(profile) if profile else None
    rss_before, cpu_before = server.rss_kib(), server.cpu_s()
    redis_before = process_cpu_s(redis_pid)
    try:
        if profiler:
            profiler.start(server.pid)
        for child in children:
            child.start()
        for _, send in pipes:
            send.close()  # the child holds it now: a child that dies shows as EOF here
        receivers = [receive for receive, _ in pipes]
        reports, peak = _collect(receivers, server, deadline=starts[-1] + jobs[0].timeout_s + 30)
        server_cpu = server.cpu_s() - cpu_before
        redis_cpu = process_cpu_s(redis_pid) - redis_before if redis_pid else None
    except BaseException:
        for child in children:
            if child.pid is not None:
                child.kill()  # its streams are cut: nothing left to wait for
        raise
    finally:
        shares = profiler.stop() if profiler else {}
        for child in children:
            if child.pid is not None:
                child.join(timeout=5)
                if child.is_alive():
                    child.kill()
                    child.join()
    return Row.of(
        reports,
        level=level.name,
        tokens=level.tokens,
        streams=level.streams,
        route=ROUTES[route],
        server=server.target,
        workers=server.workers,
        server_cpu_s=server_cpu,
        redis_cpu_s=redis_cpu,
        kib_per_stream=(peak - rss_before) / level.streams,
        profile=shares,
    )


def _collect(receivers, server: Server, deadline: float) -> tuple[list[ClientReport], int]:
    """Every client process's report, sampling the server's RSS meanwhile; (reports, peak RSS in KiB)."""
    reports, pending, peak = [], list(receivers), server.rss_kib()
    while pending:
        if time.time() > deadline:
            raise RuntimeError(f"{len(pending)} client processes sent no report in time")
        for receiver in multiprocessing.connection.wait(pending, timeout=0.5):
            try:
                reports.append(receiver.recv())
            except EOFError:
                raise RuntimeError("a client process died without a report (see its traceback above)") from None
            pending.remove(receiver)
        peak = max(peak, server.rss_kib())
    return reports, peak


def warm_up(server: Server, level: Level, routes: list[str]) -> None:
    """A few unmeasured turns on each route (first-request imports and caches, every worker reached);
    ``RuntimeError`` if any goes wrong — the server is broken, no level would mean anything."""
    for route in routes:
        count = 4 * server.workers
        now = time.time()
        job = Job(server.port, route, level.tokens, level.pace_s, [now + 0.01 * i for i in range(count)], 60.0)
        verdicts = [v for v in asyncio.run(run_job(job)).verdicts if v]
        if verdicts:
            raise RuntimeError(f"{server.target}: warm-up turns on {ROUTES[route]} failed: {sorted(set(verdicts))}")


def levels_of(args: argparse.Namespace) -> list[Level]:
    if args.streams:
        return [Level(str(n), n, args.tokens, args.pace_ms / 1000, args.ramp_s) for n in args.streams]
    return [level for name in args.scenarios for level in SCENARIOS[name]]


def server_groups(levels: list[Level]) -> list[list[Level]]:
    """The levels grouped by what the server is started with (pieces and pace), in order of first use."""
    groups: dict[tuple[int, float], list[Level]] = {}
    for level in levels:
        groups.setdefault((level.tokens, level.pace_s), []).append(level)
    return list(groups.values())


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Row]:
    """Every level × route × server × worker count; the children it starts are stopped by ``stack``."""
    multiprocessing.forkserver.ensure_running()  # now, not inside the first level's start margin
    redis_url, redis_pid, tokenizer = None, None, None
    if "ours" in args.servers:
        from scripts.megrez_tokenizer import build_megrez_tokenizer
        from scripts.net import RedisServer

        redis = RedisServer(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        stack.callback(redis.stop)
        redis.start()
        redis_url, redis_pid = redis.url, redis.pid
        tokenizer = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        build_megrez_tokenizer(tokenizer)
    profiles = Path(stack.enter_context(tempfile.TemporaryDirectory())) if args.profile else None
    rows: list[Row] = []
    for workers in args.workers:
        for group in server_groups(levels_of(args)):
            for target in args.servers:
                with Server(target, group[0].tokens, group[0].pace_s, workers, redis_url, tokenizer) as server:
                    warm_up(server, group[0], args.routes)
                    for level in group:
                        for route in args.routes:
                            profile = profiles / f"{len(rows)}.txt" if profiles else None
                            uses_redis = redis_pid if target == "ours" else None
                            rows.append(run_level(server, uses_redis, level, route, args.client_procs, profile))
                            print(rows[-1].progress(), file=sys.stderr, flush=True)
    return rows


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--streams", type=int, nargs="+", help="custom levels instead of the scenarios")
    parser.add_argument("--tokens", type=int, default=40, help="pieces per turn (custom levels)")
    parser.add_argument("--pace-ms", type=float, default=20.0, help="one piece every … ms (custom levels)")
    parser.add_argument("--ramp-s", type=float, default=0.0, help="open the streams evenly over … s (custom levels)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server processes (ours and the floor)")
    parser.add_argument("--routes", nargs="+", choices=list(ROUTES), default=list(ROUTES))
    parser.add_argument("--servers", nargs="+", choices=["ours", "floor"], default=["ours", "floor"])
    parser.add_argument("--client-procs", type=int, default=2, help="client processes (streams spread over them)")
    parser.add_argument("--profile", action="store_true", help="py-spy the server during each level")
    args = parser.parse_args(argv)
    if args.client_procs < 1 or min(args.workers) < 1:
        parser.error("--client-procs and --workers must be 1 or more")
    for signum in (signal.SIGTERM, signal.SIGHUP):  # unwind like Ctrl-C, so every child is stopped
        signal.signal(signum, _interrupt)
    # 1000 streams are 1000 sockets in the server and in the client: lift a 1024 soft limit (children inherit it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 65536:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (65536 if hard == resource.RLIM_INFINITY else min(hard, 65536), hard)
        )
    try:
        with contextlib.ExitStack() as stack:
            rows = run(args, stack)
    except KeyboardInterrupt:
        sys.exit("bench.api: interrupted; every process it started is stopped")
    print(
        f"{args.client_procs} client processes, one connection per stream; {os.cpu_count()} cores shared by the "
        "server, Redis and the client"
    )
    print_report(rows, fit_levels=[level.name for level in SCENARIOS["fit"]])


if __name__ == "__main__":
    main()
