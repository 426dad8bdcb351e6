"""Passage selection on HotpotQA: is the answer, and are the supporting pages, inside the packed
context? Ours (:func:`retrieval.passages.select_passages` over the top ``k`` results) against the
vendor's approach (top 5 pages, each cut from its start to an equal share of the budget), over the
same local search results in one run. A third row packs our passages in search order without
ranking them, to show how much of the gain is packing and how much is ranking.

    .venv/bin/python -m bench.selection [--split dev] [--limit N] [--k 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.passages import CONTEXT_OVERHEAD, chunk, pack, select_passages
from retrieval.search.local import LocalCorpusBackend
from retrieval.tokenize import estimate_tokens
from retrieval.types import Page
from scripts.corpora import HotpotQuestion, hotpot_documents, hotpot_questions, wiki_url

BUDGETS = (1000, 2000, 3000)
VENDOR_PAGES = 5
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def contains_answer(context: str, answer: str) -> bool:
    """Whole-word match of the normalised answer inside the normalised context."""
    return f" {normalize(answer)} " in f" {normalize(context)} "


def vendor_contexts(pages: list[Page], budget: int, count_tokens: Callable[[str], int]) -> list[tuple[str, str]]:
    """``(url, text)`` per page: the top pages' text cut from its start to an equal share of the
    budget, charged the same per-context overhead as ours."""
    share = budget // VENDOR_PAGES - count_tokens(CONTEXT_OVERHEAD)
    return [(page.url, _prefix(page.text, share, count_tokens)) for page in pages[:VENDOR_PAGES]]


def _prefix(text: str, limit: int, count_tokens: Callable[[str], int]) -> str:
    """Longest prefix of ``text`` within ``limit`` tokens (binary search on its length)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


@dataclass
class Tally:
    answer: list[bool] = field(default_factory=list)
    answer_span: list[bool] = field(default_factory=list)  # questions whose answer is not yes/no
    each_page: list[float] = field(default_factory=list)
    all_pages: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)

    def add(self, q: HotpotQuestion, contexts: list[tuple[str, str]], count_tokens: Callable[[str], int]) -> None:
        found = contains_answer("\n".join(text for _, text in contexts), q.answer)
        self.answer.append(found)
        if normalize(q.answer) not in ("yes", "no"):
            self.answer_span.append(found)
        urls = {url for url, text in contexts if text}
        inside = [wiki_url(title) in urls for title in q.supporting_titles]
        self.each_page.append(sum(inside) / len(inside))
        self.all_pages.append(all(inside))
        self.tokens.append(sum(count_tokens(text) + count_tokens(CONTEXT_OVERHEAD) for _, text in contexts))
        self.contexts.append(len(contexts))

    def row(self) -> list[str]:
        def pct(xs: list) -> str:
            return f"{100 * statistics.fmean(xs):.1f}" if xs else "-"

        return [
            pct(self.answer),
            pct(self.answer_span),
            pct(self.each_page),
            pct(self.all_pages),
            f"{statistics.fmean(self.tokens):.0f}",
            f"{statistics.fmean(self.contexts):.1f}",
        ]


async def search_pages(backend: LocalCorpusBackend, question: str, k: int) -> list[Page]:
    pages = []
    for hit in await backend.search(question, k=k):
        doc = backend.document(hit.url)
        text = doc["text"] if doc else hit.snippet
        pages.append(Page(url=hit.url, title=hit.title, text=text, rank=hit.rank, source="page" if doc else "snippet"))
    return pages


async def run(split: str, limit: int | None, k: int) -> None:
    questions = hotpot_questions(split)[:limit]
    count_tokens = estimate_tokens
    ours = {b: Tally() for b in BUDGETS}
    unranked = {b: Tally() for b in BUDGETS}
    vendor = {b: Tally() for b in BUDGETS}
    seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "hotpot.jsonl"
        with corpus.open("w", encoding="utf-8") as f:
            for doc in hotpot_documents(split):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        backend = LocalCorpusBackend(corpus, Path(tmp) / "index")
        try:
            for q in questions:
                pages = await search_pages(backend, q.question, max(k, VENDOR_PAGES))
                for budget in BUDGETS:
                    start = time.perf_counter()
                    chosen = select_passages(q.question, pages[:k], budget_tokens=budget, count_tokens=count_tokens)
                    seconds.append(time.perf_counter() - start)
                    ours[budget].add(q, [(p.url, p.text) for p in chosen], count_tokens)
                    in_search_order = pack([c for page in pages[:k] for c in chunk(page)], budget)
                    unranked[budget].add(q, [(p.url, p.text) for p in in_search_order], count_tokens)
                    vendor[budget].add(q, vendor_contexts(pages, budget, count_tokens), count_tokens)
        finally:
            await backend.aclose()

    n_span = sum(normalize(q.answer) not in ("yes", "no") for q in questions)
    header = ["budget", "method", "answer %", f"answer % (non-yes/no, n={n_span})", "each sup. page %",
              "all sup. pages %", "tokens used", "contexts"]  # fmt: skip
    rows = []
    for budget in BUDGETS:
        rows.append([str(budget), f"ours (k={k})", *ours[budget].row()])
        rows.append([str(budget), f"search order, packed (k={k})", *unranked[budget].row()])
        rows.append([str(budget), f"vendor (top {VENDOR_PAGES}, equal cut)", *vendor[budget].row()])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"HotpotQA {split}: {len(questions)} questions, local BM25 search over {len(hotpot_documents(split))} "
          f"pooled pages, token estimate = retrieval.tokenize.estimate_tokens")  # fmt: skip
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    ms = sorted(1000 * s for s in seconds)
    print(f"select_passages time per call ({k} pages): mean {statistics.fmean(ms):.1f} ms, "
          f"p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="dev", choices=["dev", "train"])
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--k", type=int, default=20, help="search results our selection chooses from")
    args = parser.parse_args()
    asyncio.run(run(args.split, args.limit, args.k))


if __name__ == "__main__":
    main()
