"""Local search and passage selection on this machine: the CPU work of one search turn outside the model.

Kept out of the tests on purpose: a timed assertion fails on a busy CI machine without a bug (and lets
a regression through on a fast one). Here each figure is measured and printed beside the goal it should
stay under; the exit status is 1 when one is over.

- Local index (``retrieval/search/local.py``): a seeded synthetic JSONL corpus of ``--docs``
  documents (120 words each from a 5000-word vocabulary, one document holding a rare phrase), indexed
  from scratch (read, tokenise, BM25, save); then opened again from the saved index, as after a
  restart with an unchanged corpus.
- Search latency: ``--queries`` searches (k=8) of 1–3 vocabulary words plus the rare phrase, p50/p95.
- Passage selection (``select_passages``: chunk → rank → de-duplicate → pack into the default
  budget) for one search's reading: 20 pages of 25 sentences (≈100 passages), distinct seeded text,
  p50/p95 over ``--runs``.

    .venv/bin/python -m bench.timings [--docs 3000] [--queries 200] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from retrieval.config import SelectConfig
from retrieval.passages import select_passages
from retrieval.search.local import LocalCorpusBackend
from retrieval.types import Page

VOCABULARY = [f"w{i}" for i in range(5000)]
NEEDLE = "Unmistakable zeppelin hangar."
# Goals, in seconds: the index of a few thousand documents builds within a service start, a restart
# does not re-index, and a search or a selection stays far below the fetch deadline (4 s).
GOALS = {"index build": 5.0, "index reload": 1.0, "search p95": 0.05, "select p95": 0.5}


def corpus(path: Path, docs: int, rng: random.Random) -> Path:
    rows = [
        {"url": f"https://bulk.example/{i}", "title": f"doc {i}", "text": " ".join(rng.choices(VOCABULARY, k=120))}
        for i in range(docs)
    ]
    rows[docs // 2]["text"] += " " + NEEDLE
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def p50_p95(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), statistics.quantiles(times, n=20)[18]


def bench_local(docs: int, queries: int, rng: random.Random) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = corpus(Path(tmp) / "bulk.jsonl", docs, rng)
        backend = LocalCorpusBackend(path, Path(tmp) / "index")
        build = timed(backend.load)
        reload = timed(LocalCorpusBackend(path, Path(tmp) / "index").load)
        texts = [" ".join(rng.choices(VOCABULARY, k=rng.randint(1, 3))) for _ in range(queries - 1)] + [NEEDLE]
        latencies = [timed(lambda q=q: backend.search_sync(q, k=8)) for q in texts]
    p50, p95 = p50_p95(latencies)
    print(f"Local index, {docs} documents of 120 words; {queries} searches, k=8")
    print(f"  build {build:.2f} s   reload {reload:.3f} s   search p50 {p50 * 1000:.1f} ms  p95 {p95 * 1000:.1f} ms")
    return {"index build": build, "index reload": reload, "search p95": p95}


def bench_select(runs: int, rng: random.Random) -> dict[str, float]:
    def sentence() -> str:
        return " ".join(rng.choices(VOCABULARY[:800], k=rng.randint(6, 20))).capitalize() + "."

    pages = [
        Page(
            url=f"https://p{i}.example/", title=f"Result {i}", text=" ".join(sentence() for _ in range(25)), rank=i + 1
        )
        for i in range(20)
    ]
    question = " ".join(rng.choices(VOCABULARY[:800], k=6))
    budget = SelectConfig().budget_tokens
    times = [timed(lambda: select_passages(question, pages, budget_tokens=budget)) for _ in range(runs)]
    p50, p95 = p50_p95(times)
    print(f"Passage selection, 20 pages of 25 sentences, budget {budget} tokens; {runs} runs")
    print(f"  p50 {p50 * 1000:.1f} ms  p95 {p95 * 1000:.1f} ms")
    return {"select p95": p95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="documents in the synthetic local corpus")
    parser.add_argument("--queries", type=int, default=200, help="timed searches")
    parser.add_argument("--runs", type=int, default=50, help="timed passage selections")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if min(args.queries, args.runs) < 2:
        parser.error("--queries and --runs need at least 2 (for a p95)")
    rng = random.Random(args.seed)
    figures = bench_local(args.docs, args.queries, rng) | bench_select(args.runs, rng)
    print("\nGoals")
    over = [name for name, goal in GOALS.items() if figures[name] > goal]
    for name, goal in GOALS.items():
        verdict = "OVER" if name in over else "ok"
        print(f"  {name:13} {figures[name] * 1000:9.1f} ms  goal {goal * 1000:7.0f} ms  {verdict}")
    raise SystemExit(1 if over else 0)


if __name__ == "__main__":
    main()
