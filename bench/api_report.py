"""``bench.api``'s figures: one row per level, route, server and worker count, and the tables printed from them.

Percentiles are nearest-rank over every piece of the level (:func:`percentile`); the fixed and per-piece
parts of the server's CPU per turn are a least-squares line through (pieces per turn, CPU per turn) of the
fit levels (:func:`fit_line`; with two levels, the line through both). Ratios are ours ÷ floor at the same
level, route and worker count, in the same run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from bench.api_client import ClientReport


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``ordered`` (sorted): the smallest value with at least a
    ``q`` share of the values at or below it; NaN for none."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(len(ordered) * q - 1e-9) - 1)]


def fit_line(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through ``points`` (x, y); NaNs with fewer than two xs."""
    points = list(points)
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if len(set(xs)) < 2:
        return math.nan, math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


@dataclass
class Row:
    """The figures of one level on one route of one server (ms per turn unless named otherwise)."""

    level: str
    tokens: int
    streams: int
    route: str
    server: str
    workers: int
    pieces_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    redis_ms: float  # NaN for a server without Redis
    client_ms: float
    client_busiest: float  # the busiest client process's CPU over its span, in cores
    client_lag_ms: tuple[float, float]  # p99 and max of the client processes' event-loop lag
    cores_busy: float  # server + Redis + client CPU over the level's span, in cores
    kib_per_stream: float
    bad: list[str]  # one entry per stream that was not whole and in order: what went wrong
    wall_s: float
    profile: dict[str, float] = field(default_factory=dict)  # component → share of the server's samples

    @classmethod
    def of(
        cls, reports: list[ClientReport], *, streams: int, server_cpu_s: float, redis_cpu_s: float | None, **labels
    ) -> Row:
        """The row of a level from its client processes' reports and the server's and Redis's CPU seconds (None:
        a server without Redis); ``labels``: the fields that are not computed (level, tokens, route, …)."""
        delays = sorted(d for r in reports for d in r.delays)
        lags = sorted(lag for r in reports for lag in r.lags)
        wall = max(r.ended for r in reports) - min(r.began for r in reports)
        client_s = sum(r.cpu_s for r in reports)
        return cls(
            streams=streams,
            pieces_per_s=len(delays) / wall if wall > 0 else math.nan,
            p50_ms=1000 * percentile(delays, 0.5),
            p99_ms=1000 * percentile(delays, 0.99),
            cpu_ms=1000 * server_cpu_s / streams,
            redis_ms=1000 * redis_cpu_s / streams if redis_cpu_s is not None else math.nan,
            client_ms=1000 * client_s / streams,
            client_busiest=max((r.cpu_s / (r.ended - r.began) for r in reports if r.ended > r.began), default=0.0),
            client_lag_ms=(1000 * percentile(lags, 0.99), 1000 * max(lags, default=math.nan)),
            cores_busy=(server_cpu_s + (redis_cpu_s or 0.0) + client_s) / wall if wall > 0 else math.nan,
            bad=[v for r in reports for v in r.verdicts if v],
            wall_s=wall,
            **labels,
        )

    def key(self) -> tuple[int, str, str]:
        return self.workers, self.level, self.route

    def progress(self) -> str:
        return (
            f"{self.workers} worker(s) · {self.level} · {self.route} · {self.server}: {self.pieces_per_s:.0f} pieces/s, "
            f"p99 {self.p99_ms:.0f} ms, {self.cpu_ms:.1f} ms CPU per turn, {len(self.bad)} bad"
        )


def _table(header: list[str], lines: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print()


def _ratio(ours: float, floor: float, unit: str = "", digits: int = 1) -> str:
    times = f" ({ours / floor:.1f}×)" if floor and not math.isnan(floor) else ""
    return f"{ours:.{digits}f} / {floor:.{digits}f}{unit}{times}"


def _bad(row: Row) -> str:
    kinds = sorted(set(row.bad))
    return f"{len(row.bad)}" + (f" ({', '.join(kinds)})" if kinds else "")


def print_report(rows: list[Row], fit_levels: Iterable[str] = ()) -> None:
    """Every table: the rows, ours ÷ floor, the fixed and per-piece fit (``fit_levels``: the levels it uses),
    and the profiles where there are some."""
    header = ["workers", "level", "route", "server", "answer pieces/s", "added delay p50 / p99", "server CPU per turn"]
    header += ["Redis CPU per turn", "client CPU per turn (busiest process), loop lag p99 / max", "cores busy"]
    header += ["memory per stream", "lost, reordered or failed", "wall"]
    _table(
        header,
        [
            [str(r.workers), r.level, r.route, r.server, f"{r.pieces_per_s:.0f}", f"{r.p50_ms:.1f} / {r.p99_ms:.1f} ms"]
            + [
                f"{r.cpu_ms:.1f} ms",
                f"{r.redis_ms:.1f} ms" if not math.isnan(r.redis_ms) else "–",
                f"{r.client_ms:.1f} ms ({r.client_busiest:.0%}), {r.client_lag_ms[0]:.0f} / {r.client_lag_ms[1]:.0f} ms",
            ]
            + [f"{r.cores_busy:.2f}", f"{r.kib_per_stream:.0f} KiB", _bad(r), f"{r.wall_s:.1f} s"]
            for r in rows
        ],
    )
    pairs = _pairs(rows)
    if pairs:
        header = ["workers", "level", "route", "server CPU per turn: ours / floor", "answer pieces/s: ours / floor"]
        _table(
            [*header, "p99 added delay: ours / floor"],
            [
                [str(o.workers), o.level, o.route, _ratio(o.cpu_ms, f.cpu_ms, " ms")]
                + [_ratio(o.pieces_per_s, f.pieces_per_s, digits=0), _ratio(o.p99_ms, f.p99_ms, " ms", 0)]
                for o, f in pairs
            ],
        )
    fit_levels = set(fit_levels)
    fits = _fits([r for r in rows if r.level in fit_levels], lambda r: r.cpu_ms)
    if fits:
        lines = []
        for (workers, route, server), (fixed, per_piece) in fits.items():
            per_core = f"{1e3 / per_piece:,.0f}" if per_piece > 0 else "–"
            lines.append([str(workers), route, server, f"{fixed:.2f} ms", f"{per_piece * 1000:.0f} µs", per_core])
        print("Server CPU per turn = fixed + pieces × per piece (fit levels):\n")
        _table(["workers", "route", "server", "fixed", "per piece", "pieces per core-second (marginal)"], lines)
    _print_profiles(rows, fit_levels)


def _pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    floors = {r.key(): r for r in rows if r.server == "floor"}
    return [(r, floors[r.key()]) for r in rows if r.server == "ours" and r.key() in floors]


def _fits(rows: list[Row], value) -> dict[tuple[int, str, str], tuple[float, float]]:
    """(workers, route, server) → (fixed, per piece) of ``value(row)`` against the row's pieces per turn."""
    points: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
    for r in rows:
        points.setdefault((r.workers, r.route, r.server), []).append((r.tokens, value(r)))
    return {k: fit_line(v) for k, v in points.items() if len({x for x, _ in v}) >= 2}


def _print_profiles(rows: list[Row], fit_levels: set[str]) -> None:
    profiled = [r for r in rows if r.profile]
    for r in profiled:
        print(f"Where the server's CPU goes: {r.server}, {r.workers} worker(s), {r.level}, {r.route}\n")
        _table(
            ["component", "share of samples", "ms per turn"],
            [[name, f"{share:.0%}", f"{share * r.cpu_ms:.2f}"] for name, share in r.profile.items()],
        )
    fit_rows = [r for r in profiled if r.level in fit_levels]
    components = sorted({name for r in fit_rows for name in r.profile})
    lines = []
    for name in components:
        for key, (fixed, per_piece) in _fits(fit_rows, lambda r, n=name: r.profile.get(n, 0.0) * r.cpu_ms).items():
            lines.append([name, *map(str, key), f"{fixed:.2f} ms", f"{per_piece * 1000:.1f} µs"])
    if lines:
        print("Each component's fixed and per-piece CPU (profiled fit levels):\n")
        _table(["component", "workers", "route", "server", "fixed per turn", "per piece"], lines)
