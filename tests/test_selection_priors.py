"""The ranking's coverage blend and its recency and lead priors, and ``select --budget-chars``."""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys

import pytest

from retrieval.passages import (
    CONTEXT_OVERHEAD,
    LEAD_SPAN,
    RECENT_DAYS,
    Weights,
    chunk,
    page_date,
    rank,
    recency,
    select_passages,
)
from retrieval.types import Page

TODAY = dt.date(2025, 12, 18)
NEWS = "Brown University, the Ivy League school, is in Providence, Rhode Island."


@pytest.mark.parametrize(
    ("url", "declared", "expected"),
    [
        ("https://www.usatoday.com/story/news/2026/02/04/guthrie/88506157007/", None, dt.date(2026, 2, 4)),
        ("https://example.com/2025-12-15/brown-shooting", None, dt.date(2025, 12, 15)),
        ("https://example.com/news/20251215/brown", None, dt.date(2025, 12, 15)),
        ("https://example.com/2025/13/45/not-a-date", None, None),
        ("https://example.com/about", None, None),
        ("https://example.com/2019/01/01/old", "2025-12-16T08:00:00Z", dt.date(2025, 12, 16)),  # declared wins
        ("https://example.com/2019/01/01/old", "yesterday", dt.date(2019, 1, 1)),  # unreadable: the URL's
    ],
)
def test_page_date_from_the_page_then_its_url(url, declared, expected):
    assert page_date(Page(url=url, title="t", text="x", date=declared)) == expected


def test_recency_is_full_for_the_last_days_and_fades_after():
    assert recency(TODAY, TODAY) == recency(TODAY - dt.timedelta(days=RECENT_DAYS), TODAY) == 1.0
    assert recency(TODAY + dt.timedelta(days=1), TODAY) == 1.0  # time zones, an event's own date
    assert recency(TODAY + dt.timedelta(days=30), TODAY) == 0.0  # claims to come from the future
    month, year = recency(TODAY - dt.timedelta(days=40), TODAY), recency(TODAY - dt.timedelta(days=400), TODAY)
    assert 0.0 < year < month < 1.0
    assert recency(None, TODAY) == recency(TODAY, None) == 0.0


def _pages(*urls: str) -> list[Page]:
    return [Page(url=u, title="", text=NEWS, rank=i) for i, u in enumerate(urls, 1)]


def test_a_page_from_this_week_outranks_the_same_text_from_years_ago():
    old, new = "https://a.example/2019/03/01/brown", "https://b.example/2025/12/16/brown"
    passages = [p for page in _pages(old, new) for p in chunk(page)]  # the old one ranks first in search
    ranked = rank("Where is Brown University located?", passages, today=TODAY)
    assert [p.url for p in ranked] == [new, old]
    # Without a date for the question, or with the prior off, search rank decides again.
    assert rank("Where is Brown University located?", passages)[0].url == old
    assert rank("Where is Brown University located?", passages, today=TODAY, weights=Weights(recency=0))[0].url == old


def test_coverage_prefers_the_passage_with_more_of_the_question():
    texts = {
        "https://a.example/": "Coins in circulation: circulation of coins, circulation numbers, circulation data, "
        "circulation again.",
        "https://b.example/": "About 114 billion pennies are in circulation.",
        "https://c.example/": "The weather was sunny in the capital on Tuesday.",
        "https://d.example/": "Pennies and nickels cost more to make than they are worth, pennies especially.",
        "https://e.example/": "Another page about the mint and its pennies.",
    }
    pages = [Page(url=u, title="", text=t, rank=i) for i, (u, t) in enumerate(texts.items(), 1)]
    passages = [p for page in pages for p in chunk(page)]
    question = "How many pennies are in circulation?"
    # BM25 alone lets the repeated "circulation" carry a page that never names pennies; coverage does not.
    assert rank(question, passages, weights=Weights(coverage=0.0))[0].url == "https://a.example/"
    assert rank(question, passages)[0].url == "https://b.example/"


def test_the_lead_prior_favours_a_page_s_first_passages():
    paragraph = "The Dodgers parade was held in downtown Los Angeles on Friday."
    passages = chunk(
        Page(url="https://a.example/", title="", text="\n".join([paragraph] * 6), rank=1), passage_tokens=20
    )
    assert len(passages) == 6  # the same words in each: only the prior tells them apart
    question = "Which city held the Dodgers parade?"
    scores = {p.meta["chunk"]: p.score for p in rank(question, passages, weights=Weights(lead=0.3))}
    flat = {p.meta["chunk"]: p.score for p in rank(question, passages, weights=Weights(lead=0.0))}
    assert len(set(flat.values())) == 1
    for i in range(6):
        assert scores[i] - flat[i] == pytest.approx(0.3 * math.exp(-i / LEAD_SPAN))
    assert [p.meta["chunk"] for p in rank(question, passages)] == list(range(6))


def test_a_character_budget_counts_passage_text_only():
    pages = [Page(url=f"https://{i}.example/", title="", text=NEWS * 3, rank=i) for i in range(1, 4)]
    chosen = select_passages(
        "Where is Brown?", pages, budget_tokens=200, count_tokens=len, passage_tokens=100, context_overhead=""
    )
    assert chosen and sum(len(p.text) for p in chosen) <= 200
    charged = select_passages("Where is Brown?", pages, budget_tokens=200, count_tokens=len, passage_tokens=100)
    marker = len(CONTEXT_OVERHEAD)  # by default each passage also pays for its citation marker
    assert charged and sum(len(p.text) + marker for p in charged) <= 200
    assert sum(len(p.text) for p in chosen) >= sum(len(p.text) for p in charged)


def _select(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "select", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_select_budget_chars_and_the_question_date():
    row = {
        "id": "q1",
        "question": "Where is Brown University located?",
        "date": "2025-12-18",
        "pages": [
            {"url": "https://a.example/2019/03/01/brown", "text": NEWS},
            {"url": "https://b.example/2025/12/16/brown", "text": NEWS},
        ],
    }
    out = _select(json.dumps(row) + "\n", "--budget-chars", str(len(NEWS)))
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["id"] == "q1"
    assert [p["url"] for p in answer["passages"]] == ["https://b.example/2025/12/16/brown"]  # this week's, alone
    assert sum(len(p["text"]) for p in answer["passages"]) <= len(NEWS)
    undated = _select(json.dumps({**row, "date": None}) + "\n", "--budget-chars", str(len(NEWS)))
    assert [p["url"] for p in json.loads(undated.stdout)["passages"]] == ["https://a.example/2019/03/01/brown"]


@pytest.mark.parametrize(
    ("stdin", "args", "message"),
    [
        ('{"question": "q", "date": "tomorrow", "pages": []}\n', ["--budget-chars", "50"], '"date" must be YYYY-MM-DD'),
        (
            '{"question": "q", "pages": [{"url": "u", "text": "t", "date": 5}]}\n',
            ["--budget-chars", "50"],
            '"date" must be a string',
        ),
        ("", ["--budget-chars", "0"], "must be above 0"),
        ("", ["--budget-chars", "many"], "expected a whole number"),
        ("", ["--budget", "10", "--budget-chars", "50"], "not allowed with argument"),
    ],
)
def test_select_refuses_bad_input_clearly(stdin, args, message):
    out = _select(stdin, *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
