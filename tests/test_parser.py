"""Streaming parser: chunk boundaries anywhere, calls, errors, end tokens."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.parser import (
    CITATION_RE,
    Event,
    FunctionCallError,
    FunctionCallEvent,
    FunctionCallStarted,
    StreamParser,
    TextEvent,
    TurnEnd,
    parse_function_call,
)
from engine.protocol import EOS, FUNCTION_END, FUNCTION_START, ROLE_START, TURN_END, TURN_END_TYPO, render_prompt

END_TOKENS = (TURN_END, EOS, TURN_END_TYPO, ROLE_START)
DROPPED_TOKENS = ("<|role_end|>", "<|pad|>", "<|unk|>", FUNCTION_END)
STREAM_TOKENS = (*END_TOKENS, *DROPPED_TOKENS, FUNCTION_START)
TOKEN_RE = re.compile("|".join(re.escape(t) for t in STREAM_TOKENS))
CALL = '{"name": "googleWebSearch", "arguments": {"query": "北京 天气"}}'

FAST = settings(
    max_examples=150, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def run(chunks: list[str], finish_reason: str | None = None) -> tuple[StreamParser, list[Event]]:
    parser = StreamParser()
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return parser, events + parser.close(finish_reason)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def texts(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, TextEvent)]


def others(events: list[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, TextEvent)]


def assert_text_events_clean(events: list[Event]) -> None:
    """No empty text event, no special token (whole or the start of one left dangling) inside one."""
    for text in texts(events):
        assert text
        assert not any(t in text for t in STREAM_TOKENS)


def assert_markers_whole(runs: list[str], events: list[Event]) -> None:
    """Every citation marker inside a run of stream text sits in a single text event."""
    boundaries, offset = set(), 0
    for text in texts(events):
        offset += len(text)
        boundaries.add(offset)
    run_start = 0
    for run_text in runs:
        for marker in CITATION_RE.finditer(run_text):
            start, end = run_start + marker.start(), run_start + marker.end()
            assert not any(start < b < end for b in boundaries), (run_text, marker.group())
        run_start += len(run_text)


def reference_runs(stream: str) -> tuple[list[str], str]:
    """Text runs between stream tokens up to the first end token, and the end reason (no calls here)."""
    runs, position = [], 0
    for match in TOKEN_RE.finditer(stream):
        runs.append(stream[position : match.start()])
        if match.group() in END_TOKENS:
            return [r for r in runs if r], match.group()
        position = match.end()
    runs.append(stream[position:])
    return [r for r in runs if r], "stop"


# Characters that build near-misses of tokens and markers: "<|", "[citation:", digits, "]".
NEAR_MISS = st.text(alphabet="<|>[] :_citaonrdupeks12北京 ", max_size=12)
PIECES = st.one_of(
    NEAR_MISS,
    st.text(max_size=8),
    st.sampled_from(["[citation:1]", "[citation:23]", "[ citation:4]", "[[citation:7]]", "[citation:1234]"]),
    st.sampled_from(["<|turn_e", "[citati", "<", "[", "<image>", "</audio>"]),
    st.sampled_from(DROPPED_TOKENS),
)


@FAST
@given(
    pieces=st.lists(PIECES, max_size=12), end=st.sampled_from([*END_TOKENS, ""]), cuts=st.lists(st.integers(0, 10_000))
)
def test_text_stream_any_chunking(pieces, end, cuts):
    stream = "".join(pieces) + end
    assume(FUNCTION_START not in stream)  # calls are covered below; keep the reference simple
    runs, reason = reference_runs(stream)
    parser, events = run(split(stream, cuts))
    assert "".join(texts(events)) == "".join(runs)
    assert others(events) == [TurnEnd(reason)]
    assert parser.transcript == "".join(runs)
    assert_text_events_clean(events)
    assert_markers_whole(runs, events)


@FAST
@given(
    before=st.lists(PIECES.filter(lambda p: "<" not in p), max_size=6).map("".join),
    body=st.sampled_from(
        [CALL, " " + CALL + "\n", '{"name": "googleWebSearch", "arguments": {"query": "a<|b [citation:1]"}}']
    ),
    ending=st.sampled_from([FUNCTION_END + "trailing text" + TURN_END, FUNCTION_END, TURN_END, EOS, ""]),
    cuts=st.lists(st.integers(0, 10_000)),
)
def test_call_stream_any_chunking(before, body, ending, cuts):
    stream = before + FUNCTION_START + body + ending
    parser, events = run(split(stream, cuts))
    assert "".join(texts(events)) == before
    assert_text_events_clean(events)
    assert_markers_whole([before] if before else [], events)
    calls = others(events)
    assert calls == [
        FunctionCallStarted(),
        FunctionCallEvent("googleWebSearch", json.loads(body)["arguments"], body),
        TurnEnd("function_call"),
    ]
    assert parser.transcript == before + FUNCTION_START + body + FUNCTION_END


def test_text_streams_as_it_comes():
    parser = StreamParser()
    assert parser.feed("Hello ") == [TextEvent("Hello ")]
    assert parser.feed("world [cita") == [TextEvent("world ")]
    assert parser.feed("tion:1") == []
    assert parser.feed("2] and <|tu") == [TextEvent("[citation:12] and ")]
    assert parser.feed("rn_end|>") == [TurnEnd(TURN_END)]
    assert parser.done


def test_held_tail_is_released_when_it_cannot_complete():
    parser = StreamParser()
    assert parser.feed("a <|") == [TextEvent("a ")]
    assert parser.feed("x") == [TextEvent("<|x")]
    assert parser.feed("[citation:") == []
    assert parser.feed("one]") == [TextEvent("[citation:one]")]
    assert parser.feed("[citation:1234") == [TextEvent("[citation:1234")]  # too many digits for a marker


def test_partial_token_at_stream_end_is_text():
    _, events = run(["answer <|turn_"], "length")
    assert events == [TextEvent("answer "), TextEvent("<|turn_"), TurnEnd("length")]


@pytest.mark.parametrize("token", [TURN_END, EOS, TURN_END_TYPO, ROLE_START])
def test_end_tokens(token):
    parser, events = run(["Done.", token, "ignored"])
    assert events == [TextEvent("Done."), TurnEnd(token)]
    assert parser.discarded == "ignored"


def test_finish_reason_without_end_token():
    assert run(["cut"], "length")[1] == [TextEvent("cut"), TurnEnd("length")]
    assert run([])[1] == [TurnEnd("stop")]


def test_word_joiners_go_after_tokens_are_matched():
    # What a model writes when it copies a defanged page: the spelling comes out as characters, not as the token.
    stream = "See <\u2060|turn_end|> and [cit\u2060ation:1].\u2060" + TURN_END
    for chunks in ([stream], list(stream)):
        parser, events = run(chunks)
        assert "".join(texts(events)) == parser.transcript == "See <|turn_end|> and [citation:1]."
        assert others(events) == [TurnEnd(TURN_END)]
        assert_markers_whole(["See <|turn_end|> and [citation:1]."], events)
    assert run(["\u2060", "\u2060"])[1] == [TurnEnd("stop")]  # nothing left to show: no empty text event
    body = '{"name": "googleWebSearch", "arguments": {"query": "<\u2060|eos|> \\u2060meaning"}}'
    _, events = run([FUNCTION_START + body + FUNCTION_END])
    assert FunctionCallEvent("googleWebSearch", {"query": "<|eos|> meaning"}, body) in events  # raw as generated


def test_dropped_tokens_and_media_tags():
    _, events = run(["a<|pad|>b<|function_end|>c<|role_end|>d <image> </audio>", TURN_END])
    assert "".join(texts(events)) == "abcd <image> </audio>"


def test_close_is_idempotent_and_feed_after_end_is_discarded():
    parser, _ = run(["x", TURN_END])
    assert parser.close() == []
    assert parser.feed("more") == []
    assert parser.discarded == "more"


def test_text_before_call_is_kept_and_call_rendered_back():
    parser, events = run(["我来搜索一下。", FUNCTION_START, CALL, FUNCTION_END])
    assert events[0] == TextEvent("我来搜索一下。")
    message = parser.message()
    assert message.content == "我来搜索一下。" and message.function_call == CALL
    assert render_prompt([message], add_generation_prompt=False) == (
        "<|role_start|>assistant<|role_end|>" + parser.transcript + TURN_END
    )


def test_call_with_stripped_end_marker_is_parsed_on_close():
    # vLLM removes a stop string from the output, so <|function_end|> may never arrive.
    _, events = run([FUNCTION_START, CALL], "stop")
    assert isinstance(events[1], FunctionCallEvent) and events[-1] == TurnEnd("function_call")


def test_truncated_call_is_an_error():
    _, events = run([FUNCTION_START, CALL[:20]], "length")
    assert isinstance(events[1], FunctionCallError) and events[1].kind == "malformed_json"
    assert events[1].raw == CALL[:20]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("not json", "malformed_json"),
        ('{"name": "googleWebSearch", "arguments": {"query": "x"}', "malformed_json"),
        ('["googleWebSearch"]', "not_an_object"),
        ('{"arguments": {"query": "x"}}', "not_an_object"),
        ('{"name": "googleWebSearch", "arguments": ["x"]}', "not_an_object"),
        ('{"name": "python", "arguments": {"code": "1+1"}}', "unknown_function"),
        ('{"name": "googleWebSearch", "arguments": {}}', "missing_argument"),
        ('{"name": "googleWebSearch"}', "missing_argument"),
        ('{"name": "googleWebSearch", "arguments": {"query": "  "}}', "missing_argument"),
        ('{"name": "googleWebSearch", "arguments": {"query": 42}}', "invalid_argument"),
        ('{"name": "googleWebSearch", "arguments": {"query": "\\ud800"}}', "invalid_argument"),
        ('{"name": "googleWebSearch", "arguments": "{\\"query\\": \\"x\\"}"}', None),  # arguments as a JSON string
    ],
)
def test_call_errors(body, kind):
    result = parse_function_call(body)
    if kind is None:
        assert result == FunctionCallEvent("googleWebSearch", {"query": "x"}, body)
    else:
        assert isinstance(result, FunctionCallError) and result.kind == kind and result.raw == body and result.message
    _, events = run([FUNCTION_START + body + FUNCTION_END])
    assert events[1] == result


def test_unknown_function_names_the_known_ones():
    error = parse_function_call('{"name": "x", "arguments": {}}')
    assert isinstance(error, FunctionCallError) and "googleWebSearch" in error.message


def test_custom_function_table():
    parser = StreamParser({"calculator": ("expression",)})
    events = parser.feed(FUNCTION_START + '{"name": "calculator", "arguments": {"expression": "1+1"}}' + FUNCTION_END)
    assert events[1] == FunctionCallEvent("calculator", {"expression": "1+1"}, events[1].raw)
