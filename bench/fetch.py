"""From search results to packed context (fetch → extract → select), on the fixture web with
injected latency: most pages answer in 50–300 ms (fixed per URL), one page takes 10 s.

Queries: the CRAG questions with their own real search results, and HotpotQA dev questions with
the fixture web's local search results. Each query is timed three ways in the same run:

- ``deadline``: :meth:`Fetcher.fetch_pages` with the default settings (deadline, page timeout);
- ``wait-all``: the same concurrent fetch, but waiting for every page (no deadline to speak of);
- ``sequential``: a naive loop fetching one page after another, no deadline.

    .venv/bin/python -m bench.fetch [--hotpot 10] [--deadline 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from retrieval.config import FetchConfig, SelectConfig
from retrieval.fetch import Fetcher, FetchError
from retrieval.passages import select_passages
from retrieval.types import Page, SearchResult
from scripts.corpora import crag_questions, hotpot_questions
from scripts.fixture_web import FixtureWeb, bench_latency

STRAGGLER_S = 10.0
SLACK_S = 0.5  # event-loop and extraction overhead allowed past the deadline


@dataclass(frozen=True, slots=True)
class Query:
    question: str
    results: list[SearchResult]


@dataclass(frozen=True, slots=True)
class Run:
    ok: int
    fallback: int
    fetch_s: float
    total_s: float  # fetch + extract + select
    passages: int


def crag_queries() -> list[Query]:
    return [
        Query(
            q.query,
            [
                SearchResult(title=r["page_name"], url=r["page_url"], snippet=r["page_snippet"], rank=i, engine="crag")
                for i, r in enumerate(q.results, 1)
            ],
        )
        for q in crag_questions()
    ]


async def hotpot_queries(web: FixtureWeb, n: int, k: int) -> list[Query]:
    search = web.search_backend()
    return [Query(q.question, await search.search(q.question, k=k)) for q in hotpot_questions("dev")[:n]]


async def timed(question: str, fetch: Callable[[], Awaitable[list[Page]]], budget: int) -> Run:
    started = time.monotonic()
    pages = await fetch()
    fetched = time.monotonic()
    passages = select_passages(question, pages, budget_tokens=budget)
    done = time.monotonic()
    ok = sum(p.source == "page" for p in pages)
    return Run(ok, len(pages) - ok, fetched - started, done - started, len(passages))


async def sequential(fetcher: Fetcher, results: list[SearchResult]) -> list[Page]:
    """The naive baseline: one page after another, each waited for, snippet on error."""
    pages = []
    for r in results:
        try:
            f = await fetcher.fetch(r.url)
            pages.append(Page(url=r.url, title=f.title or r.title, text=f.text, rank=r.rank))
        except FetchError as exc:
            pages.append(Page(url=r.url, title=r.title, text=r.snippet, source="snippet", rank=r.rank, error=str(exc)))
    return pages


def _stats(values: list[float]) -> str:
    return f"p50 {statistics.median(values):6.2f} s  max {max(values):6.2f} s  total {sum(values):7.2f} s"


async def main_async(args: argparse.Namespace) -> int:
    queries = crag_queries()
    # The straggler: a mid-ranked result of the first query, as a slow site would be.
    straggler = queries[0].results[1].url
    web = FixtureWeb(latency=bench_latency([straggler], straggler_s=STRAGGLER_S)).start()
    try:
        queries += await hotpot_queries(web, args.hotpot, args.k)
        budget = SelectConfig().budget_tokens
        deadline_cfg = web.fetch_config(deadline_s=args.deadline)
        patient_cfg = web.fetch_config(deadline_s=120, page_timeout_s=60)
        rows: list[tuple[Query, Run, Run, Run]] = []
        async with Fetcher(deadline_cfg) as fast, Fetcher(patient_cfg) as patient:
            for q in queries:
                d = await timed(q.question, lambda q=q: fast.fetch_pages(q.results), budget)
                w = await timed(q.question, lambda q=q: patient.fetch_pages(q.results), budget)
                s = await timed(q.question, lambda q=q: sequential(patient, q.results), budget)
                rows.append((q, d, w, s))
    finally:
        web.stop()

    print(
        f"fetch → extract → select on the fixture web; latency 50–300 ms per page, one {STRAGGLER_S:g} s straggler; "
        f"deadline {args.deadline:g} s, page timeout {deadline_cfg.page_timeout_s:g} s, budget {budget} tokens\n"
    )
    print(f"{'query':44} {'pages':>5} {'ok':>3} {'fb':>3} {'deadline':>9} {'wait-all':>9} {'sequent.':>9}")
    for q, d, w, s in rows:
        mark = " *" if any(r.url == straggler for r in q.results) else ""
        name = (q.question[:41] + "…") if len(q.question) > 42 else q.question
        print(
            f"{name + mark:44} {len(q.results):5d} {d.ok:3d} {d.fallback:3d} "
            f"{d.total_s:8.2f}s {w.total_s:8.2f}s {s.total_s:8.2f}s"
        )
    deadline_t = [d.total_s for _, d, _, _ in rows]
    print("\n* has the straggler.  ok/fb: pages fetched / fell back to the snippet under the deadline.")
    print(f"deadline    {_stats(deadline_t)}")
    print(f"wait-all    {_stats([w.total_s for _, _, w, _ in rows])}")
    print(f"sequential  {_stats([s.total_s for _, _, _, s in rows])}")
    total_d = sum(deadline_t)
    print(
        f"speed-up in total time: {sum(w.total_s for _, _, w, _ in rows) / total_d:.1f}x vs wait-all, "
        f"{sum(s.total_s for _, _, _, s in rows) / total_d:.1f}x vs sequential"
    )
    worst_fetch = max(d.fetch_s for _, d, _, _ in rows)
    within = worst_fetch <= args.deadline + SLACK_S
    print(
        f"slowest fetch phase under the deadline: {worst_fetch:.2f} s ({'within' if within else 'OVER'} the deadline)"
    )
    return 0 if within else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hotpot", type=int, default=10, help="HotpotQA questions to add to the CRAG ones")
    parser.add_argument("--k", type=int, default=8, help="search results per HotpotQA question")
    parser.add_argument("--deadline", type=float, default=FetchConfig().deadline_s)
    raise SystemExit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
