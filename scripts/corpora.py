"""Documents and questions built from the third-party data in ``../shared/data`` (read in place).

- HotpotQA: every question's ten Wikipedia paragraphs, pooled over a split into one corpus;
  each paragraph is a page at its Wikipedia URL.
- CRAG: real search-result pages (raw HTML) under their original URLs, with the snippets the
  search engine returned.
- AEB extraction pages: raw news HTML under their original URLs.
- RealTimeQA dev600: weekly news-quiz questions with the real search results' full text.
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import html
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

DATA = Path(os.environ.get("MEGREZ_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def wiki_url(title: str) -> str:
    return "https://en.wikipedia.org/wiki/" + quote(title.replace(" ", "_"), safe="_()',-.")


@dataclass(frozen=True, slots=True)
class HotpotQuestion:
    id: str
    question: str
    answer: str
    type: str
    supporting_titles: tuple[str, ...]


@lru_cache(maxsize=4)
def _hotpot_rows(split: str) -> tuple[dict, ...]:
    with open(DATA / "qa" / "hotpotqa" / f"{split}.jsonl", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def hotpot_questions(split: str = "dev") -> list[HotpotQuestion]:
    return [
        HotpotQuestion(
            id=row["id"],
            question=row["question"],
            answer=row["answer"],
            type=row["type"],
            supporting_titles=tuple(dict.fromkeys(row["supporting_facts"]["title"])),
        )
        for row in _hotpot_rows(split)
    ]


def hotpot_documents(split: str = "dev") -> list[dict]:
    """The pooled corpus: one ``{"url", "title", "text"}`` per distinct paragraph title."""
    docs: dict[str, dict] = {}
    for row in _hotpot_rows(split):
        for title, sentences in zip(row["context"]["title"], row["context"]["sentences"]):
            docs.setdefault(title, {"url": wiki_url(title), "title": title, "text": "".join(sentences).strip()})
    return list(docs.values())


def wiki_page_html(doc: dict) -> str:
    """A Wikipedia-like page around a paragraph, with the navigation boilerplate real pages have."""
    title = html.escape(doc["title"])
    return (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{title} - Wikipedia</title></head>"
        f"<body><nav><a href='/wiki/Main_Page'>Main page</a> <a href='/wiki/Special:Random'>Random article</a></nav>"
        f"<main><h1>{title}</h1><div id=mw-content-text><p>{html.escape(doc['text'])}</p></div></main>"
        f"<footer>Text is available under the Creative Commons Attribution-ShareAlike License.</footer>"
        f"</body></html>"
    )


@dataclass(frozen=True, slots=True)
class CragQuestion:
    id: str
    query: str
    answer: str
    query_time: str
    results: tuple[dict, ...]  # page_url, page_name, page_snippet, page_result (raw HTML)


def crag_questions() -> list[CragQuestion]:
    out = []
    with bz2.open(DATA / "e2e" / "crag" / "dev_data.jsonl.bz2", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out.append(
                CragQuestion(
                    id=row["interaction_id"],
                    query=row["query"],
                    answer=row["answer"],
                    query_time=row["query_time"],
                    results=tuple(row["search_results"]),
                )
            )
    return out


@dataclass(frozen=True)
class RealtimeQuestion:
    """A RealTimeQA question (a weekly news quiz) with up to 10 real search results and their full text."""

    id: str
    question: str
    answer: str
    date: dt.date  # when it was asked
    results: tuple[dict, ...]  # {url, title, text}, in the search engine's order


def realtimeqa_questions() -> list[RealtimeQuestion]:
    """``qa/realtimeqa/dev600.jsonl.bz2`` (evaluation only: its authors state no licence)."""
    with bz2.open(DATA / "qa" / "realtimeqa" / "dev600.jsonl.bz2", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        RealtimeQuestion(
            id=r["id"],
            question=r["question"],
            answer=r["answer"],
            date=dt.date.fromisoformat(r["question_date"].replace("/", "-")),
            results=tuple(r["results"]),
        )
        for r in rows
    ]


def aeb_pages() -> Iterator[tuple[str, str, bytes]]:
    """``(id, url, raw html bytes)`` for the AEB article pages."""
    root = DATA / "extraction" / "aeb"
    gold = json.loads((root / "ground-truth.json").read_text(encoding="utf-8"))
    for page_id, item in gold.items():
        path = root / "html" / f"{page_id}.html.gz"
        if path.exists() and item.get("url"):
            yield page_id, item["url"], gzip.decompress(path.read_bytes())
