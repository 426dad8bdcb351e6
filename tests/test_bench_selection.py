"""The RealTimeQA benchmark's on-topic count: an answer only counts as findable when it sits in a
passage that shares the question's terms, not when its words turn up on a page about something else."""

from __future__ import annotations

import datetime as dt

from bench.selection import on_topic
from scripts.corpora import RealtimeQuestion

FILLER = " ".join(f"Harbour pilots logged {n} calm crossings on the northern route that season." for n in range(12))


def _question(*texts: str) -> RealtimeQuestion:
    results = tuple({"url": f"https://news.example/{i}", "title": "", "text": t} for i, t in enumerate(texts))
    return RealtimeQuestion(
        id="q", question="Which city hosted the robotics championship final?", answer="Lisbon",
        date=dt.date(2026, 2, 12), results=results,
    )  # fmt: skip


def test_answer_beside_the_question_terms_is_on_topic() -> None:
    page = FILLER + "\n\nThe robotics championship final was hosted in Lisbon, the city said on Sunday."
    assert on_topic(_question(page, FILLER))


def test_answer_only_on_an_unrelated_page_is_not() -> None:
    unrelated = FILLER + "\n\nA ferry from Lisbon docked late after fog delayed the harbour pilots."
    about = FILLER + "\n\nThe robotics championship final drew record crowds, the city said on Sunday."
    assert not on_topic(_question(about, unrelated))
    assert on_topic(_question(about, unrelated), share=0.0)  # what the share rules out: a coincidence
