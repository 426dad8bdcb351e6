"""Passage selection: cut fetched pages into passages, rank them, drop near-duplicates and pack
the best ones into the model's context budget.

Pipeline (each step is a public function):

1. :func:`chunk` cuts a page on line (paragraph) breaks, then on sentence ends (English ``.?!``,
   Chinese ``。！？；``) into passages of about ``passage_tokens``. A sentence is only cut when it
   alone is longer than a passage. Each passage's text starts with the page title on its own line,
   so it reads standalone.
2. :func:`rank` scores every passage of every page against the question plus the search query —
   BM25, blended with how much of the question's weight (IDF) the passage covers at all — plus small
   priors for the page's search rank, for a title that the question names, for a page whose title
   the best passages name (the second hop of a question), for a page published in the days before
   ``today`` (news questions: real search returns old articles beside this week's), and for the
   lead of a page (news puts its facts first).
3. :func:`dedupe` drops passages whose word shingles mostly repeat a better passage (mirrors,
   syndicated copies, boilerplate shared between pages).
4. :func:`pack` takes passages greedily by score while they fit the budget, cutting the first
   one that does not fit at a sentence end when enough of it fits to be worth having.

Budget accounting: a packed passage costs ``count_tokens(passage.text)`` plus
``count_tokens(CONTEXT_OVERHEAD)``, the citation marker and line breaks the prompt wraps each
context in. ``Passage.tokens`` holds the first part. Rendering several passages of one page as a
single context only saves tokens, so either way the prompt stays within the budget.

Prompt order (:func:`select_passages`): passages are grouped by page, pages in the order of their
best passage's score, and a page's passages in reading order. The prompt can then give a page
one citation number: the reader gets one link per source, not several numbers pointing at the
same URL; and the most relevant source comes first, where a small model is least likely to
overlook it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import bm25s
import numpy as np

from retrieval.tokenize import CJK_CHARS, estimate_tokens, terms
from retrieval.types import Page, Passage

CONTEXT_OVERHEAD = "[[citation:10]]\n\n"
"""What the prompt adds around each context; its token count is charged once per passage."""
CHARS_PER_TOKEN = 3.5
"""Characters per token where a budget is given in characters (``select --budget-chars``, the
equal-characters comparisons of ``bench/selection.py``: B tokens = 3.5·B characters)."""

BRIDGE_FROM = 3
"""How many of the best passages are searched for other pages' titles."""
DUPLICATE_JACCARD = 0.7
"""Shingle overlap above which a passage counts as a copy of a better one."""
MIN_CUT_TOKENS = 24
"""A passage cut to fit the remaining budget must keep at least this much to be worth its marker."""
RECENT_DAYS = 7
"""A page dated within this many days before ``today`` gets the whole recency prior…"""
RECENCY_FADE_DAYS = 30
"""…which fades exponentially over this many days after."""
LEAD_SPAN = 3.0
"""The lead prior of a page's passage ``i`` is ``exp(-i / LEAD_SPAN)``: the first few passages."""


@dataclass(frozen=True)
class Weights:
    """How :func:`rank` scores a passage: relevance (1.0 for the best) plus these priors.

    Fitted on the even-numbered RealTimeQA dev600 questions (``bench/selection.py``), checked on the odd
    ones and on HotpotQA dev. ``Weights(coverage=0, recency=0, lead=0)`` is the ranking before them.

    Example::

        rank(question, passages, weights=Weights(recency=0.0))  # no recency prior
    """

    rank: float = 0.15
    """Prior for the page's search rank: ``rank / (1 + ln rank)``."""
    title: float = 0.2
    """Prior for the share of the page title's terms found in the question."""
    bridge: float = 0.3
    """Prior for a page whose title the best passages of other pages mention."""
    coverage: float = 0.5
    """Share of relevance given to coverage (IDF of the distinct question terms present) rather than
    BM25: BM25 lets one frequent term carry a passage, coverage asks for the question's other terms."""
    recency: float = 0.4
    """Prior for a page published in the days before ``today`` (:func:`recency`)."""
    lead: float = 0.3
    """Prior for a page's first passages, where news states its facts."""


WEIGHTS = Weights()

_CLOSE = "\"'”’」』）)\\]"
# A sentence ends at CJK end punctuation (no space follows in Chinese), or at Latin end
# punctuation followed by space and a character that does not continue the sentence in lower case.
_SENTENCE_END = re.compile(rf"[。！？；]+[{_CLOSE}]*\s*|[.?!]+[{_CLOSE}]*\s+(?=[^\sa-z])")
# The word right before a period, if short enough to be an initial or an abbreviation.
_SHORT_LAST_WORD = re.compile(r"(?<!\w)\w{1,6}$")
# fmt: off
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "no", "nos", "vol", "pp",
    "inc", "ltd", "co", "corp", "mt", "ft", "gen", "col", "lt", "sgt", "rev", "fig", "approx", "est",
})
# fmt: on
_WORD_SPAN = re.compile(r"\S+\s*")
# What a title carries besides the name of its subject: "(band)", " - Wikipedia", " | Site".
# Copies are compared word by word (each CJK character a word); unstemmed is fast and exact enough.
_SHINGLE_WORD = re.compile(rf"[{CJK_CHARS}]|[^\W_]+")
_TITLE_DECORATION = re.compile(r"\s*\([^()]*\)$|\s+[-|–—]\s.*$")
# A date in a URL path, as news sites write them: /2026/02/04/, /2026-02-04/, /20260204/.
_URL_DATE = re.compile(r"/(20\d\d|19\d\d)([-/]?)(0[1-9]|1[0-2])\2(0[1-9]|[12]\d|3[01])(?=[/_.-]|$)")


def page_date(page: Page) -> dt.date | None:
    """When ``page`` was published: its declared date (meta tags, the search result), else a date in
    its URL; ``None`` when neither says."""
    if page.date:
        try:
            return dt.date.fromisoformat(page.date[:10])
        except ValueError:
            pass
    m = _URL_DATE.search(page.url)
    if m is None:
        return None
    try:
        return dt.date(int(m[1]), int(m[3]), int(m[4]))
    except ValueError:
        return None


def recency(published: dt.date | None, today: dt.date | None) -> float:
    """1 for a page published in the RECENT_DAYS before ``today`` (a day or two ahead allowed: time
    zones, dates that are the event's), fading exponentially over RECENCY_FADE_DAYS after; 0 when
    either date is unknown or the page claims a later date."""
    if published is None or today is None:
        return 0.0
    age = (today - published).days
    if age < -2:
        return 0.0
    if age <= RECENT_DAYS:
        return 1.0
    return math.exp(-(age - RECENT_DAYS) / RECENCY_FADE_DAYS)


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph, trailing whitespace kept so that joining them gives ``text``."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() >= len(text):
            break
        if m.group()[0] == "." and _is_abbreviation(text[max(start, m.start() - 8) : m.start()]):
            continue
        out.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def _is_abbreviation(before: str) -> bool:
    """True when a period right after ``before`` (the few characters preceding it) ends an
    initial or an abbreviation ('J. K.', 'Dr.') rather than a sentence."""
    m = _SHORT_LAST_WORD.search(before)
    if m is None:
        return False
    word = m.group()
    return (len(word) == 1 and word.isalpha()) or word.lower() in _ABBREVIATIONS


def _split_long(sentence: str, limit: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Cut a sentence longer than a passage into pieces of at most ``limit`` tokens, at spaces,
    and between characters inside a run too long for one piece (CJK text has no spaces)."""
    units: list[tuple[str, int]] = []
    for word in _WORD_SPAN.findall(sentence):
        n = count_tokens(word)
        units += [(word, n)] if n <= limit else [(char, count_tokens(char)) for char in word]
    pieces: list[str] = []
    current, size = "", 0
    for unit, n in units:
        # ``size`` adds up the units' own counts, which in practice is not less than the count of their
        # join (a BPE merge across a boundary saves tokens): the grown piece is counted exactly only when
        # the sum says it may not fit, so the cut stays where it was and the cost linear, not quadratic.
        # Should a tokenizer count a join higher, a piece can exceed ``limit`` a little; packing counts
        # every passage exactly either way.
        if current and size + n > limit:
            exact = count_tokens(current + unit)
            if exact > limit:
                pieces.append(current)
                current, size = "", 0
            else:
                size = exact - n
        current += unit
        size += n
    if current:
        pieces.append(current)
    return pieces


def chunk(
    page: Page, *, passage_tokens: int = 120, count_tokens: Callable[[str], int] = estimate_tokens
) -> list[Passage]:
    """Passages of about ``passage_tokens`` (title line included), in reading order.

    Each passage's ``meta`` holds ``rank`` (the page's search rank), ``source`` (``page`` or
    ``snippet``), ``chunk`` (its position in the page), ``date`` (:func:`page_date`) and ``cuts``:
    offsets in ``text`` where a sentence ends, so :func:`pack` can shorten it without cutting a sentence.
    """
    title = " ".join(page.title.split())
    head = f"{title}\n" if title else ""
    limit = max(1, passage_tokens - count_tokens(head))
    groups: list[list[str]] = []  # sentence pieces per passage; a piece ending in "\n" ends a paragraph
    current: list[str] = []
    size = 0
    for paragraph in page.text.splitlines():
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        sentences = split_sentences(paragraph)
        sentences[-1] = sentences[-1].rstrip() + "\n"
        for sentence in sentences:
            n = count_tokens(sentence)
            pieces = _split_long(sentence, limit, count_tokens) if n > limit else [sentence]
            for piece in pieces:
                n = count_tokens(piece) if len(pieces) > 1 else n
                if current and size + n > limit:
                    groups.append(current)
                    current, size = [], 0
                current.append(piece)
                size += n
    if current:
        groups.append(current)

    passages = []
    published = page_date(page)
    for i, group in enumerate(groups):
        text = head
        cuts = []
        for piece in group:
            text += piece
            cuts.append(len(text.rstrip()))
        text = text.rstrip()
        passages.append(
            Passage(
                url=page.url,
                title=title,
                text=text,
                tokens=count_tokens(text),
                meta={"rank": page.rank, "source": page.source, "chunk": i, "date": published, "cuts": tuple(cuts)},
            )
        )
    return passages


def rank(
    question: str,
    passages: list[Passage],
    *,
    query: str | None = None,
    today: dt.date | None = None,
    weights: Weights = WEIGHTS,
) -> list[Passage]:
    """Passages with their scores, best first.

    Score = relevance + ``weights.rank`` / (1 + ln rank) + ``weights.title`` * share of the title's terms
    in the question + ``weights.bridge`` when the best passages of other pages name this page's title +
    ``weights.recency`` * :func:`recency` (page date against ``today``) + ``weights.lead`` *
    ``exp(-chunk / LEAD_SPAN)``. Relevance blends BM25 / best BM25 with coverage / best coverage
    (``weights.coverage``), both computed over the given passages only, so a term's weight reflects how
    rare it is among these results. Rank 0 (unknown) gets no rank prior; a page without a date no
    recency prior.
    """
    w = weights
    if not passages:
        return []
    wanted = list(dict.fromkeys(terms(question) + terms(query or "")))
    passage_terms = [terms(p.text) for p in passages]
    bm25 = _bm25(wanted, passage_terms)
    top = float(bm25.max())
    if top > 0:
        bm25 /= top
    coverage = _coverage(wanted, passage_terms)
    if (most := float(coverage.max())) > 0:
        coverage /= most
    relevance = (1 - w.coverage) * bm25 + w.coverage * coverage
    wanted_set = set(wanted)
    title_terms = {title: terms(_TITLE_DECORATION.sub("", title)) for title in {p.title for p in passages}}
    title_share = {title: len(set(ts) & wanted_set) / len(set(ts)) if ts else 0.0 for title, ts in title_terms.items()}
    scores = []
    for p, s in zip(passages, relevance):
        page_rank = p.meta.get("rank", 0)
        prior = w.rank / (1 + math.log(page_rank)) if page_rank > 0 else 0.0
        prior += w.recency * recency(p.meta.get("date"), today)
        prior += w.lead * math.exp(-p.meta.get("chunk", 0) / LEAD_SPAN)
        scores.append(float(s) + prior + w.title * title_share[p.title])

    if top > 0:
        # Questions often reach their answer through an entity the best passage names ("the
        # band that released X": X's page names the band); that entity's page is worth a boost.
        best = _best_first(passages, scores)[:BRIDGE_FROM]
        best_urls = {passages[i].url for i in best}
        named = " " + " ".join(" ".join(passage_terms[i]) for i in best) + " "
        for i, p in enumerate(passages):
            core = title_terms[p.title]
            if core and p.url not in best_urls and f" {' '.join(core)} " in named:
                scores[i] += w.bridge
    return [replace(passages[i], score=scores[i]) for i in _best_first(passages, scores)]


def _best_first(passages: list[Passage], scores: list[float]) -> list[int]:
    """Indices by score; ties go to the better search rank, then to reading order."""
    return sorted(range(len(passages)), key=lambda i: (-scores[i], passages[i].meta.get("rank", 0) or math.inf, i))


def _bm25(query: list[str], docs: list[list[str]]) -> np.ndarray:
    """BM25 scores of ``docs`` for ``query`` (both pre-tokenised with :func:`terms`)."""
    wanted = set(query)
    if not wanted:
        return np.zeros(len(docs), dtype=np.float32)
    # Only query terms are ever scored, so every other term becomes one filler term: document
    # lengths (for length normalisation) stay right and bm25s indexes a handful of terms
    # instead of the whole vocabulary, which is most of its indexing time.
    filler = "\x00"
    corpus = [[t if t in wanted else filler for t in doc] or [filler] for doc in docs]
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    present = [t for t in query if t in retriever.vocab_dict]
    if not present:
        return np.zeros(len(docs), dtype=np.float32)
    return np.asarray(retriever.get_scores(present), dtype=np.float32)


def _coverage(query: list[str], docs: list[list[str]]) -> np.ndarray:
    """Per doc, the summed IDF (over ``docs``) of the distinct query terms it contains."""
    present = [set(doc) for doc in docs]
    n = len(docs)
    weights = {}
    for t in set(query):
        df = sum(t in doc for doc in present)
        weights[t] = math.log(1 + (n - df + 0.5) / (df + 0.5)) if df else 0.0
    return np.asarray([sum(w for t, w in weights.items() if t in doc) for doc in present], dtype=np.float32)


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = _SHINGLE_WORD.findall(text.lower())
    if len(words) < 3:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def dedupe(passages: Iterable[Passage], *, threshold: float = DUPLICATE_JACCARD) -> Iterator[Passage]:
    """Passages in the given (best-first) order, skipping any whose body's 3-word shingles have a
    Jaccard similarity above ``threshold`` with a passage already kept. Lazy, so packing stops
    comparing once the budget is full."""
    kept: list[set[tuple[str, ...]]] = []
    postings: dict[tuple[str, ...], list[int]] = {}
    for p in passages:
        body = p.text[len(p.title) + 1 :] if p.title and p.text.startswith(p.title + "\n") else p.text
        shingles = _shingles(body)
        shared: dict[int, int] = {}
        for s in shingles:
            for j in postings.get(s, ()):
                shared[j] = shared.get(j, 0) + 1
        if any(n / (len(shingles) + len(kept[j]) - n) > threshold for j, n in shared.items()):
            continue
        for s in shingles:
            postings.setdefault(s, []).append(len(kept))
        kept.append(shingles)
        yield p


def pack(
    passages: Iterable[Passage],
    budget_tokens: int,
    *,
    count_tokens: Callable[[str], int] = estimate_tokens,
    context_overhead: str = CONTEXT_OVERHEAD,
) -> list[Passage]:
    """Passages taken best first while ``count_tokens(text) + count_tokens(context_overhead)``
    fits what is left of the budget. A passage that does not fit is cut at its last sentence end
    that fits when at least MIN_CUT_TOKENS of it remain; if nothing at all fits, the best passage
    is cut at a word so the answer still gets some context. Returned in the order taken.
    ``context_overhead=""`` counts passage text only (the equal-characters comparisons)."""
    overhead = count_tokens(context_overhead) if context_overhead else 0
    left = budget_tokens
    taken: list[Passage] = []
    best: Passage | None = None
    for p in passages:
        if best is None:
            best = p
        if left < overhead + MIN_CUT_TOKENS:
            break
        tokens = count_tokens(p.text)
        if tokens + overhead <= left:
            taken.append(replace(p, tokens=tokens))
            left -= tokens + overhead
            continue
        cut = _cut(p, left - overhead, count_tokens, p.meta.get("cuts", ()))
        if cut is not None and cut.tokens >= MIN_CUT_TOKENS:
            taken.append(cut)
            left -= cut.tokens + overhead
    if not taken and best is not None and budget_tokens > overhead:
        # a cut inside the title line would leave a context with no page text at all
        head = len(best.title) + 1 if best.title and best.text.startswith(best.title + "\n") else 0
        word_ends = tuple(m.end() for m in re.finditer(r"\S+", best.text) if m.start() >= head)
        cut = _cut(best, budget_tokens - overhead, count_tokens, word_ends)
        if cut is not None:
            taken.append(cut)
    return taken


def _cut(p: Passage, limit: int, count_tokens: Callable[[str], int], ends: Iterable[int]) -> Passage | None:
    """``p`` shortened to its longest prefix ending at one of ``ends`` within ``limit`` tokens."""
    fitting = None
    for end in ends:
        text = p.text[:end].rstrip()
        tokens = count_tokens(text)
        if tokens > limit:
            break
        fitting = (text, tokens, end)
    if fitting is None:
        return None
    text, tokens, end = fitting
    cuts = tuple(c for c in p.meta.get("cuts", ()) if c <= end)
    return replace(p, text=text, tokens=tokens, meta={**p.meta, "cuts": cuts, "cut": True})


def select_passages(
    question: str,
    pages: list[Page],
    *,
    budget_tokens: int,
    query: str | None = None,
    count_tokens: Callable[[str], int] = estimate_tokens,
    passage_tokens: int = 120,
    today: dt.date | None = None,
    context_overhead: str = CONTEXT_OVERHEAD,
    weights: Weights = WEIGHTS,
) -> list[Passage]:
    """The passages to put in the prompt, within ``budget_tokens``, in prompt order: grouped by
    page, pages by their best passage's score, each page's passages in reading order.

    ``query``: the search query, ranked against with the question; ``today``: the question's date (the
    service's clock), for the recency prior; ``count_tokens`` measures the budget (``len``: characters),
    ``context_overhead`` is what each passage costs besides its text (see :func:`pack`); ``weights``
    the ranking's (:class:`Weights`).
    """
    candidates = [p for page in pages for p in chunk(page, passage_tokens=passage_tokens, count_tokens=count_tokens)]
    ranked = rank(question, candidates, query=query, today=today, weights=weights)
    packed = pack(dedupe(ranked), budget_tokens, count_tokens=count_tokens, context_overhead=context_overhead)
    page_order: dict[str, int] = {}
    for p in packed:
        page_order.setdefault(p.url, len(page_order))
    return sorted(packed, key=lambda p: (page_order[p.url], p.meta["chunk"]))


def page_contexts(passages: list[Passage]) -> list[tuple[str, str, str]]:
    """``(url, title, text)`` per page, in prompt order, for passages from :func:`select_passages`.

    A page gets one context (so one citation number): its passages in reading order, separated by
    a blank line, with the title line that :func:`chunk` puts on each passage kept only once.
    """
    grouped: dict[str, list[Passage]] = {}
    for p in passages:
        grouped.setdefault(p.url, []).append(p)
    contexts = []
    for url, group in grouped.items():
        head = f"{group[0].title}\n" if group[0].title else ""
        bodies = [p.text.removeprefix(head) if head and i else p.text for i, p in enumerate(group)]
        contexts.append((url, group[0].title, "\n\n".join(bodies)))
    return contexts
