"""Streaming citation processor: marker forms, hold-back, code, unknown numbers, modes, claims, chunking."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.citations import (
    CitationMode,
    CitationProcessor,
    CitationSpan,
    Claim,
    cited_claims,
    strip_citations,
)

# Context numbers differ from source numbers on purpose, so a test sees whether the mapping was applied.
SOURCES = {1: 11, 2: 12, 3: 13, 5: 15}
FAST = settings(
    max_examples=200, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def run(
    chunks: str | list[str], mode: CitationMode = "numbers", resolve: object = None
) -> tuple[CitationProcessor, list[str], list[int]]:
    """Feed ``chunks`` and flush; returns the processor, every piece returned and all new sources."""
    processor = CitationProcessor(SOURCES if resolve is None else resolve, mode=mode)  # type: ignore[arg-type]
    pieces, new = [], []
    for chunk in [chunks] if isinstance(chunks, str) else chunks:
        processed = processor.feed(chunk)
        pieces.append(processed.text)
        new += processed.new_sources
    processed = processor.flush()
    pieces.append(processed.text)
    new += processed.new_sources
    return processor, pieces, new


def output(chunks: str | list[str], mode: CitationMode = "numbers") -> str:
    return run(chunks, mode)[0].text


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


# ---------------------------------------------------------------------------------------------- forms


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Paris[citation:3].", "Paris[13]."),
        ("Paris [citation:3].", "Paris [13]."),
        ("Paris [citation: 3].", "Paris [13]."),
        ("Paris [ citation:3].", "Paris [13]."),
        ("Paris [citation:3 ].", "Paris [13]."),
        ("Paris [citation:3,5].", "Paris [13][15]."),
        ("Paris [citation:3, 5].", "Paris [13][15]."),
        ("Paris [citation:3，5].", "Paris [13][15]."),
        ("Paris [citation:3][citation:5].", "Paris [13][15]."),
        ("Paris [[citation:3]].", "Paris [13]."),
        ("Paris 【citation:3】。", "Paris [13]。"),
        ("Paris [Citation:3].", "Paris [13]."),
        ("Paris [CITATION:3].", "Paris [13]."),
        ("Paris [citation:3] [citation:5].", "Paris [13] [15]."),
    ],
)
def test_marker_forms(raw: str, expected: str) -> None:
    assert output(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "see [1] and [2]",
        "[citation:1234]",
        "[citation:]",
        "[cite:1]",
        "[citation 1]",
        "【citation:3]",
        "[citation:3】",
        "[citation:3,]",
        "citation:3",
    ],
)
def test_non_markers_are_plain_text(raw: str) -> None:
    processor, _, new = run(raw)
    assert processor.text == raw
    assert processor.cited == [] and processor.spans == [] and new == []


def test_adjacent_markers_form_one_group_with_one_span() -> None:
    processor, _, _ = run("A [citation:3][citation:5][citation:3].")
    assert processor.text == "A [13][15]."
    assert processor.spans == [CitationSpan(2, 10, (13, 15))]


def test_unbalanced_double_bracket_keeps_the_extra_bracket() -> None:
    assert output("A [[citation:3] b") == "A [[13] b"
    assert output("A [citation:3]] b") == "A [13]] b"


# ------------------------------------------------------------------------------------------ hold-back


def test_every_split_of_a_marker_gives_the_same_output() -> None:
    text = "Paris is the capital [citation:3]. Lyon【citation:1, 5】。"
    expected = output(text)
    assert expected == "Paris is the capital [13]. Lyon[11][15]。"
    for cut in range(len(text) + 1):
        assert output([text[:cut], text[cut:]]) == expected


@pytest.mark.parametrize("mode", ["numbers", "remove"])
def test_every_split_before_a_vanishing_group_still_takes_its_space(mode: CitationMode) -> None:
    text = "Paris [citation:9]. Lyon [citation:1] is old."
    expected = {"numbers": "Paris. Lyon [11] is old.", "remove": "Paris. Lyon is old."}[mode]
    for cut in range(len(text) + 1):
        assert output([text[:cut], text[cut:]], mode) == expected


def test_partial_marker_never_reaches_the_caller() -> None:
    processor, pieces, _ = run(list("Paris [citation:3] and [[citation:1]]."))
    assert processor.text == "Paris [13] and [11]."
    for piece in pieces:
        assert "citation" not in piece
        assert piece.count("[") == piece.count("]")


def test_held_partial_released_when_it_cannot_become_a_marker() -> None:
    processor = CitationProcessor(SOURCES)
    assert processor.feed("see [cit").text == "see"
    assert processor.feed("e this]").text == " [cite this]"
    assert processor.feed(" [citation:12").text == ""
    assert processor.feed("34]").text == " [citation:1234]"


def test_flush_releases_partial_marker_as_text() -> None:
    processor = CitationProcessor(SOURCES)
    assert processor.feed("Paris [citation:1").text == "Paris"
    flushed = processor.flush()
    assert flushed == type(flushed)(" [citation:1", ())
    assert processor.text == "Paris [citation:1"
    assert processor.cited == []


def test_complete_group_at_end_of_delta_waits_for_a_possible_neighbour() -> None:
    processor = CitationProcessor(SOURCES)
    assert processor.feed("Paris [citation:1]").text == "Paris"
    second = processor.feed("[citation:2].")
    assert second.text == " [11][12]." and second.new_sources == (11, 12)
    assert processor.spans == [CitationSpan(6, 14, (11, 12))]


def test_plain_text_streams_with_at_most_a_short_tail_held() -> None:
    text = "The quick brown fox jumps over the lazy dog, twice; 3 > 2 and [x] too.\n" * 5
    processor = CitationProcessor(SOURCES)
    emitted = 0
    for fed, char in enumerate(text, 1):
        emitted += len(processor.feed(char).text)
        assert emitted >= fed - 2  # "[x" held until "]" shows it is no marker
    emitted += len(processor.flush().text)
    assert emitted == len(text) and processor.text == text


# ------------------------------------------------------------------------------------- unknown numbers


def test_unknown_number_dropped_and_logged_with_its_space(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="agent.citations"):
        processor, _, new = run("Paris [citation:9]. Lyon [citation:9] is big.")
    assert processor.text == "Paris. Lyon is big."
    assert processor.dropped == [9, 9]
    assert processor.cited == [] and processor.spans == [] and new == []
    assert any("9" in r.getMessage() and r.name == "agent.citations" for r in caplog.records)


def test_unknown_number_never_clamped_to_a_nearby_source() -> None:
    processor, _, _ = run("A [citation:4]. B [citation:6]. C [citation:7,2].", resolve={1: 1, 2: 2})
    assert processor.text == "A. B. C [2]."
    assert processor.cited == [2]
    assert processor.dropped == [4, 6, 7]


def test_callable_resolver() -> None:
    processor, _, _ = run("A [citation:1,8]. B [citation:2].", resolve=lambda c: c + 100 if c < 5 else None)
    assert processor.text == "A [101]. B [102]."
    assert processor.cited == [101, 102] and processor.dropped == [8]


def test_unknown_first_in_group_keeps_the_known_rest() -> None:
    processor, _, _ = run("A [citation:9][citation:1].")
    assert processor.text == "A [11]."
    assert processor.spans == [CitationSpan(2, 6, (11,))]


# --------------------------------------------------------------------------------- order and duplicates


def test_first_citation_order_and_new_sources_per_delta() -> None:
    processor = CitationProcessor(SOURCES)
    pieces = ["A [citation:2]. ", "B [citation:1,2]. ", "C [citation:3]. ", "D [citation:1]."]
    news = [processor.feed(p).new_sources for p in pieces] + [processor.flush().new_sources]
    assert processor.cited == [12, 11, 13]
    assert news == [(12,), (11,), (13,), (), ()]


def test_duplicates_within_a_group_removed_order_kept() -> None:
    assert output("A [citation:5,2,5].") == "A [15][12]."
    assert output("A [citation:2][citation:2].") == "A [12]."
    assert output("A [citation:2]. B [citation:2].") == "A [12]. B [12]."


def test_two_contexts_of_one_source_render_once() -> None:
    processor, _, _ = run("A [citation:1,2].", resolve={1: 4, 2: 4})
    assert processor.text == "A [4]."
    assert processor.spans == [CitationSpan(2, 5, (4,))]


def test_spans_point_at_rendered_groups() -> None:
    processor, _, _ = run("巴黎是首都[citation:1]。A [citation:2,3]. B")
    text = processor.text
    assert [text[s.start : s.end] for s in processor.spans] == ["[11]", "[12][13]"]
    assert [s.sources for s in processor.spans] == [(11,), (12, 13)]


# ----------------------------------------------------------------------------------------------- code


@pytest.mark.parametrize(
    "raw",
    [
        "use `[citation:1]` here",
        "use ``a ` [citation:1]`` here",
        "use ``a```b [citation:1]`` here",
        "```\n[citation:1]\n`````",
        "```\n[citation:1]\n```",
        "~~~md\n[citation:1]\n~~~",
        "  ```python\nx = '[citation:1]'\n  ```",
        "````\n```\n[citation:1]\n````",
        "```\n``` not a close\n[citation:1]\n```",
        "~~~\n```\n[citation:1]\n~~~",
    ],
)
def test_markers_in_code_left_alone(raw: str) -> None:
    processor, _, _ = run(raw + "\nafter [citation:1].")
    assert processor.text == raw + "\nafter [11]."
    assert processor.spans == [CitationSpan(len(raw) + 7, len(raw) + 11, (11,))]


def test_code_split_across_deltas() -> None:
    chunks = ["Run `", "[citation:1]", "` then [citation:2]\n`", "``\n[citation:3]\n`", "`", "`\nok [citation:5]"]
    processor, _, _ = run(chunks)
    assert processor.text == "Run `[citation:1]` then [12]\n```\n[citation:3]\n```\nok [15]"
    assert processor.cited == [12, 15]


def test_backtick_run_split_decides_its_length() -> None:
    # "``" + "`" at line start opens a fence; a single backtick would only open an inline span.
    assert output(["``", "`\n[citation:1]\n``", "`\n[citation:1]"]) == "```\n[citation:1]\n```\n[11]"
    assert output(["x ``a`", "` [citation:1]"]) == "x ``a`` [11]"


def test_stray_backtick_only_affects_its_line() -> None:
    assert output("a `b [citation:1]\nc [citation:1]") == "a `b [citation:1]\nc [11]"


def test_tilde_in_prose_is_text() -> None:
    assert output("about ~5 km [citation:1] ~~gone~~ [citation:2]") == "about ~5 km [11] ~~gone~~ [12]"


# ---------------------------------------------------------------------------------------------- modes


def test_remove_mode() -> None:
    processor, _, new = run("Paris is the capital [citation:1]. Lyon[citation:9] too [citation:2,3].", "remove")
    assert processor.text == "Paris is the capital. Lyon too."
    assert processor.cited == [11, 12, 13] and new == [11, 12, 13]
    assert processor.spans == [CitationSpan(20, 20, (11,)), CitationSpan(30, 30, (12, 13))]
    assert processor.dropped == [9]


def test_keep_mode() -> None:
    raw = "Paris [citation:1]. Lyon [citation:9] too [[citation:2]]."
    processor, _, new = run(raw, "keep")
    assert processor.text == raw
    assert processor.cited == [11, 12] and new == [11, 12]
    assert [raw[s.start : s.end] for s in processor.spans] == ["[citation:1]", "[[citation:2]]"]
    assert processor.dropped == [9]


def test_unknown_mode_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        CitationProcessor(SOURCES, mode="links")  # type: ignore[arg-type]


def test_chinese_text() -> None:
    raw = "巴黎是法国的首都【citation:1】。伦敦是英国的首都[citation:2，3]！"
    assert output(raw) == "巴黎是法国的首都[11]。伦敦是英国的首都[12][13]！"
    assert output(list(raw), "remove") == "巴黎是法国的首都。伦敦是英国的首都！"


def test_strip_citations() -> None:
    assert strip_citations("Paris [citation:1]. See `[citation:2]` and [citation:404].") == (
        "Paris. See `[citation:2]` and."
    )


# --------------------------------------------------------------------------------------------- claims


def claims_of(raw: str, mode: CitationMode = "numbers") -> list[Claim]:
    processor, _, _ = run(raw, mode)
    return processor.claims()


def test_claims_marker_before_and_after_punctuation() -> None:
    processor, _, _ = run("Paris is the capital [citation:1]. Lyon is big.[citation:2] Nice is warm.")
    text = processor.text
    claims = cited_claims(text, processor.spans)
    assert [(c.text, c.sources) for c in claims] == [("Paris is the capital.", (11,)), ("Lyon is big.", (12,))]
    assert [text[c.start : c.end] for c in claims] == ["Paris is the capital [11].", "Lyon is big.[12]"]


def test_claims_several_groups_one_sentence_union() -> None:
    processor, _, _ = run("Paris [citation:1] is the capital [citation:2]. [citation:3][citation:1] Lyon is not.")
    claims = processor.claims()
    assert claims == [Claim("Paris is the capital.", (11, 12, 13), 0, 40)]
    assert processor.text[claims[0].start : claims[0].end] == "Paris [11] is the capital [12]. [13][11]"


def test_claims_same_in_every_mode() -> None:
    raw = "Paris is the capital [citation:1]. Lyon is big.[citation:2,3]\n- Nice [citation:5]"
    expected = [("Paris is the capital.", (11,)), ("Lyon is big.", (12, 13)), ("Nice", (15,))]
    for mode in ("numbers", "remove", "keep"):
        assert [(c.text, c.sources) for c in claims_of(raw, mode)] == expected


def test_claims_lists() -> None:
    raw = "Cities:\n- Paris is large [citation:1]\n* Lyon.[citation:2]\n1. Nice is warm. It is sunny [citation:3].\n"
    assert [(c.text, c.sources) for c in claims_of(raw)] == [
        ("Paris is large", (11,)),
        ("Lyon.", (12,)),
        ("It is sunny.", (13,)),
    ]


def test_claims_chinese_marker_before_and_after_stop() -> None:
    claims = claims_of("巴黎是首都。[citation:1]伦敦是英国的首都[citation:2]；柏林很大！[citation:3]")
    assert [(c.text, c.sources) for c in claims] == [
        ("巴黎是首都。", (11,)),
        ("伦敦是英国的首都；", (12,)),
        ("柏林很大！", (13,)),
    ]


def test_claims_marker_at_line_start_belongs_to_that_line() -> None:
    claims = claims_of("Paris is big.\n\n[citation:1] Lyon is old.")
    assert [(c.text, c.sources) for c in claims] == [("Lyon is old.", (11,))]


def test_claims_without_spans() -> None:
    assert cited_claims("Paris is big.", []) == []
    assert cited_claims("", [CitationSpan(0, 0, (1,))]) == []


# ------------------------------------------------------------------------------------------- chunking

FRAGMENTS = st.sampled_from(
    [
        "Paris is the capital",
        " ",
        ".",
        "。",
        "\n",
        "\n- ",
        "巴黎是首都",
        "[citation:1]",
        "[citation: 2]",
        "[ citation:3]",
        "[citation:3,5]",
        "[citation:1, 9]",
        "[citation:2，3]",
        "[[citation:5]]",
        "【citation:1】",
        "[Citation:2]",
        "[citation:9]",
        "[citation:1234]",
        "[citation:",
        "[cit",
        "【citation:1,",
        "[[citation:2]",
        "[",
        "]",
        "`",
        "``",
        "```\n",
        "~~~\n",
        "~",
        "citation:3]",
    ]
)


@FAST
@given(st.lists(st.tuples(FRAGMENTS, st.booleans()), max_size=40), st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_gives_the_same_result(fragments: list[tuple[str, bool]], cuts: list[int]) -> None:
    text = "".join(f for f, _ in fragments)
    # Random cuts, plus cuts at chosen fragment boundaries (where the interesting decisions are).
    cuts = cuts + [end for end, (_, cut) in zip(itertools.accumulate(len(f) for f, _ in fragments), fragments) if cut]
    for mode in ("numbers", "remove", "keep"):
        whole, _, whole_new = run(text, mode)
        chunked, pieces, chunked_new = run(split(text, cuts), mode)
        assert "".join(pieces) == chunked.text == whole.text
        assert (chunked.cited, chunked.spans, chunked.dropped) == (whole.cited, whole.spans, whole.dropped)
        assert chunked_new == whole_new == whole.cited
        if mode == "keep":
            assert whole.text == text
        for span in whole.spans:
            assert 0 <= span.start <= span.end <= len(whole.text)
        assert cited_claims(chunked.text, chunked.spans) == cited_claims(whole.text, whole.spans)


@FAST
@given(st.lists(FRAGMENTS, max_size=30))
def test_char_by_char_equals_whole(fragments: list[str]) -> None:
    text = "".join(fragments)
    whole, _, _ = run(text)
    chunked, _, _ = run(list(text))
    assert (chunked.text, chunked.cited, chunked.spans, chunked.dropped) == (
        whole.text,
        whole.cited,
        whole.spans,
        whole.dropped,
    )
