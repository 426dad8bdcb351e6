"""The citation support check (agent/support.py): verdicts on hand-made English and Chinese pairs,
markers, several passages, empty inputs, and the dev-data claim that it beats the simple baseline."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import support
from agent.support import DEFAULT_THRESHOLD, SupportChecker, SupportResult, strip_markers
from bench import support as bench

EIFFEL = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower. "
    "It was constructed from 1887 to 1889 as the centerpiece of the 1889 World's Fair."
)
HAMLET = "Hamlet is a tragedy written by William Shakespeare sometime between 1599 and 1601."
PKU = "北京大学创建于1898年，初名京师大学堂，是中国近代第一所国立综合性大学。"


@pytest.fixture(scope="module")
def checker() -> SupportChecker:
    return SupportChecker()


def test_sentence_copied_from_the_passage_is_supported(checker):
    copied = "It is named after the engineer Gustave Eiffel, whose company designed and built the tower."
    result = checker.check(copied, [EIFFEL])
    assert result.supported
    assert result.score > 0.9


def test_close_paraphrase_is_supported(checker):
    assert checker.check("The Eiffel Tower was built between 1887 and 1889 for the World's Fair.", [EIFFEL]).supported


def test_wrong_number_is_not_supported(checker):
    right = checker.check("The Eiffel Tower was built between 1887 and 1889 for the World's Fair.", [EIFFEL])
    wrong = checker.check("The Eiffel Tower was built between 1887 and 1895 for the World's Fair.", [EIFFEL])
    assert not wrong.supported
    assert wrong.score < right.score


def test_wrong_name_is_not_supported(checker):
    right = checker.check("Hamlet is a tragedy written by William Shakespeare.", [HAMLET])
    wrong = checker.check("Hamlet is a tragedy written by Christopher Marlowe.", [HAMLET])
    assert right.supported
    assert not wrong.supported


def test_unrelated_passage_is_not_supported(checker):
    result = checker.check("Photosynthesis converts light energy into chemical energy stored in glucose.", [EIFFEL])
    assert not result.supported
    assert result.score < 0.3


@pytest.mark.parametrize(
    ("claim", "supported"),
    [
        ("北京大学创建于1898年。", True),
        ("北京大学初名京师大学堂。", True),
        ("北京大学创建于1905年。", False),  # wrong year
        ("上海的地铁系统是世界上最长的。", False),  # unrelated
    ],
)
def test_chinese_claims(checker, claim, supported):
    assert checker.check(claim, [PKU]).supported is supported


def test_chinese_characters_are_tokens():
    assert support.tokens("北京大学 runs") == ["北", "京", "大", "学", "run"]


MARKED = [
    "Hamlet is a tragedy [1].",
    "Hamlet is [1, 2] a tragedy.",
    "Hamlet is a tragedy [3-5].",
    "Hamlet is a tragedy [citation:2].",
    "Hamlet is a tragedy [[citation:3]].",
    "Hamlet is a tragedy【1】.",
    "Hamlet is a tragedy【citation:4】.",
]


@pytest.mark.parametrize("marked", MARKED)
def test_citation_markers_are_ignored(checker, marked):
    assert checker.score(marked, HAMLET) == pytest.approx(checker.score("Hamlet is a tragedy.", HAMLET))
    assert "[" not in strip_markers(marked) and "【" not in strip_markers(marked)


def test_numbers_inside_markers_do_not_count_as_claimed_numbers(checker):
    # The digit inside "[2]" must not count as a number the claim asserts (and finds missing).
    marked = checker.check("Hamlet was written in 1601 [2].", [HAMLET])
    assert marked.supported
    assert marked.score == checker.score("Hamlet was written in 1601.", HAMLET)


def test_several_passages_are_judged_together(checker):
    born = "Marie Curie was born in Warsaw in 1867."
    prizes = "She won the Nobel Prize in Physics in 1903 and in Chemistry in 1911."
    claim = "Marie Curie, born in Warsaw in 1867, won the Nobel Prize in Physics in 1903 and in Chemistry in 1911."
    assert not checker.check(claim, [born]).supported
    assert not checker.check(claim, [prizes]).supported
    together = checker.check(claim, [born, prizes])
    assert together.supported
    assert together.score > max(checker.score(claim, born), checker.score(claim, prizes))


def test_an_extra_unrelated_passage_does_not_hurt(checker):
    claim = "Hamlet is a tragedy written by William Shakespeare."
    assert checker.check(claim, [HAMLET, EIFFEL]).score >= checker.score(claim, HAMLET)


def test_bare_short_answer_is_read_with_the_question(checker):
    question = "who sold out jesus for 30 pieces of silver"
    passage = (
        "Title: Thirty pieces of silver\n\nAccording to the Gospel of Matthew, Judas Iscariot was a disciple of Jesus. "
        "Before the Last Supper, Judas agreed to hand over Jesus in exchange for 30 silver coins."
    )
    assert checker.check("Judas Iscariot", [passage], question=question).supported
    assert not checker.check("Pontius Pilate", [passage], question=question).supported
    # The question only matters for short claims.
    long_claim = "Judas Iscariot, a disciple of Jesus, agreed to hand over Jesus for 30 silver coins."
    assert checker.score(long_claim, passage, question=question) == checker.score(long_claim, passage)


@pytest.mark.parametrize(
    ("claim", "passages"),
    [
        ("", [HAMLET]),
        ("   ", [HAMLET]),
        ("[1]", [HAMLET]),  # a marker standing alone asserts nothing
        ("Hamlet is a tragedy.", []),
        ("Hamlet is a tragedy.", [""]),
        ("Hamlet is a tragedy.", ["  \n "]),
    ],
)
def test_empty_claim_or_passages_score_zero_and_are_unsupported(checker, claim, passages):
    assert checker.check(claim, passages) == SupportResult(supported=False, score=0.0)


def test_blank_passages_are_dropped_next_to_real_ones(checker):
    claim = "Hamlet is a tragedy written by William Shakespeare."
    assert checker.check(claim, ["", HAMLET, " "]).score == checker.score(claim, HAMLET)


def test_threshold_decides_the_verdict():
    claim = "Hamlet is a tragedy written by William Shakespeare."
    score = SupportChecker().score(claim, HAMLET)
    assert SupportChecker(threshold=min(1.0, score + 0.01)).check(claim, [HAMLET]).supported is False
    assert SupportChecker(threshold=score).check(claim, [HAMLET]).supported is True
    with pytest.raises(ValueError):
        SupportChecker(threshold=1.5)


@settings(max_examples=200, deadline=None)
@given(claim=st.text(max_size=80), passages=st.lists(st.text(max_size=200), max_size=3))
def test_score_is_a_probability_consistent_with_the_verdict(claim, passages):
    result = SupportChecker().check(claim, passages)
    assert 0.0 <= result.score <= 1.0
    assert result.supported == (result.score >= DEFAULT_THRESHOLD)


# --- the real dev data (must be present: a missing file fails, it never skips) -------------------


@pytest.fixture(scope="module")
def attributionbench() -> list[dict]:
    return bench.load("attributionbench")


def test_out_of_fold_auroc_beats_content_word_recall(attributionbench):
    """Ours out-of-fold (5-fold CV grouped by question, refitted per fold) against baseline (a),
    both on AttributionBench dev in this run."""
    positive = bench.not_supported(attributionbench)
    oof, _ = bench.out_of_fold(attributionbench, bench.feature_matrix(attributionbench))
    ours = bench.auroc(oof, positive)
    baseline = bench.auroc([bench.baseline_recall(r["claim"], r["passage"]) for r in attributionbench], positive)
    assert ours > baseline + 0.03, (ours, baseline)


def test_stored_constants_are_the_fit_on_attributionbench_dev(attributionbench):
    """The weights in agent/support.py are what `python -m bench.support --fit` prints today."""
    x = bench.feature_matrix(attributionbench)
    weights, bias = bench.fit(x, ~bench.not_supported(attributionbench))
    assert np.allclose(weights, support.WEIGHTS, atol=2e-3)
    assert bias == pytest.approx(support.BIAS, abs=2e-3)
    assert len(support.WEIGHTS) == len(support.FEATURES) == x.shape[1]


def test_missing_data_is_an_error_naming_the_place(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ATTRIBUTION", tmp_path / "attribution")
    with pytest.raises(FileNotFoundError, match="attribution"):
        bench.load("wice")
