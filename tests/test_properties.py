"""Properties, checked with Hypothesis, of the code that reads untrusted text as it streams or arrives.

* the stream parser (``engine.parser``): feeding a stream whole, cut anywhere or a character at a time gives
  the same events; chat text is exactly the text between the tokens (no fragment of a token leaks in), without
  the word joiner that defangs special-token spellings; a call is recognised however it is cut;
* a special-token spelling the model copied from a defanged page is harmless in the next turn's prompt, on
  both prompt paths (token ids, and defanged text parsed by the server);
* the citation processor (``agent.citations``): unknown context numbers are dropped and never turned into a
  source, sources are cited in order of first mention whatever the cuts, code is left alone;
* search results shown as sources (``retrieval.search.base.dedupe``, ``agent.sources.number_sources``): only
  http(s) URLs and corpus names, titles and snippets plain bounded single lines;
* SSE event ids (``api.memory.event_id_key``): exactly ``<digits>-<digits>`` ids Redis accepts are accepted,
  anything else is a ``ValueError`` with an operator's message, and the order is Redis's own (checked against
  a real ``redis-server`` with ``XREAD``, which is how resuming reads after an id).

Cuts of the fragment alphabets of ``tests/test_parser.py`` and ``tests/test_citations.py`` are tested there.
Every property runs a bounded number of examples, derandomised: CI sees the same examples on every run.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
import uuid
from urllib.parse import urlsplit

import pytest
import redis
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from agent.citations import CitationProcessor
from agent.events import Source
from agent.sources import number_sources
from api.memory import event_id_key
from engine.parser import (
    WORD_JOINER,
    Event,
    FunctionCallEvent,
    FunctionCallStarted,
    StreamParser,
    TextEvent,
    TurnEnd,
    parse_function_call,
)
from engine.protocol import (
    EOS,
    FUNCTION_END,
    FUNCTION_START,
    ROLE_END,
    ROLE_START,
    SPECIAL_TOKENS,
    TURN_END,
    TURN_END_TYPO,
    Message,
    PromptEncoder,
    defang_special_tokens,
    render_prompt,
)
from retrieval.search.base import MAX_SNIPPET_CHARS, MAX_TITLE_CHARS, MAX_URL_CHARS, dedupe
from retrieval.types import SearchResult

PROPERTY = settings(
    max_examples=100, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
SLOW_PROPERTY = settings(PROPERTY, max_examples=40)  # each example encodes prompts or talks to Redis

END_TOKENS = (TURN_END, EOS, TURN_END_TYPO, ROLE_START)
STREAM_TOKENS = (*END_TOKENS, ROLE_END, "<|pad|>", "<|unk|>", FUNCTION_END, FUNCTION_START)
TOKEN_RE = re.compile("|".join(re.escape(t) for t in sorted(STREAM_TOKENS, key=len, reverse=True)))
CALL_STOP_RE = re.compile("|".join(re.escape(t) for t in (FUNCTION_END, *END_TOKENS)))
DEFANGED = [defang_special_tokens(t) for t in SPECIAL_TOKENS]  # what a model copying a defanged page writes

# Text the model may write: anything printable (no lone surrogates, which no engine streams), and near misses
# of tokens and markers, word joiners and defanged spellings, so that cuts fall in the interesting places.
TEXT = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=6),
    st.sampled_from(["<", "<|", "|>", "<|turn_e", "<|function_", "[", "[citation:", "[citation:1]", "]", "\n"]),
    st.sampled_from([WORD_JOINER, *DEFANGED, "<image>"]),
)
STREAM_PIECE = st.one_of(TEXT, TEXT, st.sampled_from(STREAM_TOKENS))
CUTS = st.lists(st.integers(0, 10_000), max_size=12)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def parse(chunks: list[str]) -> tuple[StreamParser, list[Event]]:
    parser = StreamParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return parser, events + parser.close()


def merged(events: list[Event]) -> list[Event]:
    """Consecutive text events as one: where text is cut is the parser's choice, what it says is not."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, TextEvent) and out and isinstance(out[-1], TextEvent):
            out[-1] = TextEvent(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def reference(stream: str) -> list[Event]:
    """What the stream means, read with regular expressions in one go (the parser's rules, not its code)."""
    text, position = "", 0
    for match in TOKEN_RE.finditer(stream):
        text += stream[position : match.start()]
        position = match.end()
        token = match.group()
        if token == FUNCTION_START:
            stop = CALL_STOP_RE.search(stream, position)
            body = stream[position : stop.start() if stop else len(stream)]
            ending = [FunctionCallStarted(), parse_function_call(body), TurnEnd("function_call")]
            break
        if token in END_TOKENS:
            ending = [TurnEnd(token)]
            break
    else:
        text += stream[position:]
        ending = [TurnEnd("stop")]
    text = text.replace(WORD_JOINER, "")
    return merged(([TextEvent(text)] if text else []) + ending)


@PROPERTY
@given(st.lists(STREAM_PIECE, max_size=16).map("".join), CUTS)
def test_parser_events_do_not_depend_on_the_cuts(stream: str, cuts: list[int]) -> None:
    whole_parser, whole = parse([stream])
    cut_parser, cut = parse(split(stream, cuts))
    char_parser, by_char = parse(list(stream))
    assert merged(whole) == merged(cut) == merged(by_char) == reference(stream)
    assert whole_parser.message() == cut_parser.message() == char_parser.message()
    assert whole_parser.discarded == cut_parser.discarded == char_parser.discarded
    for event in cut + by_char:
        if isinstance(event, TextEvent):
            assert event.text and WORD_JOINER not in event.text


QUERY = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30) | st.sampled_from(DEFANGED)


@PROPERTY
@given(
    before=st.lists(TEXT, max_size=5).map("".join),
    query=QUERY,
    ascii_only=st.booleans(),
    ending=st.sampled_from([FUNCTION_END, FUNCTION_END + "after the call" + TURN_END, TURN_END, EOS, ""]),
    cuts=CUTS,
)
def test_a_call_is_recognised_however_it_is_cut(
    before: str, query: str, ascii_only: bool, ending: str, cuts: list[int]
) -> None:
    body = json.dumps({"name": "googleWebSearch", "arguments": {"query": query}}, ensure_ascii=ascii_only)
    stream = before + FUNCTION_START + body + ending
    first = TOKEN_RE.search(stream)
    assume(first is not None and first.start() == len(before))  # ``before`` ends no turn, the call is whole
    assume(CALL_STOP_RE.search(body) is None and query.replace(WORD_JOINER, "").strip())
    parser, events = parse(split(stream, cuts))
    text = before.replace(WORD_JOINER, "")
    assert merged(events) == [
        *([TextEvent(text)] if text else []),
        FunctionCallStarted(),
        FunctionCallEvent("googleWebSearch", {"query": query.replace(WORD_JOINER, "")}, body),
        TurnEnd("function_call"),
    ]
    assert parser.message().function_call == body


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@SLOW_PROPERTY
@given(st.lists(st.one_of(TEXT, st.sampled_from(SPECIAL_TOKENS)), max_size=10).map("".join), CUTS)
def test_a_copied_special_token_spelling_stays_text_in_the_next_turn(tokenizer, page: str, cuts: list[int]) -> None:
    # The page reaches the model defanged; the model copies it; the answer is stored and is history next turn.
    parser, _ = parse(split(defang_special_tokens(page), cuts))
    answer = parser.message().content
    assert answer == page.replace(WORD_JOINER, "")
    history = [Message("user", "q"), Message("assistant", answer), Message("user", "next question")]
    template = [Message("user", "q"), Message("assistant", "a"), Message("user", "next question")]
    encoder = PromptEncoder(tokenizer)
    special = set(encoder.special_ids.values())

    def specials(ids: list[int]) -> list[int]:
        return [i for i in ids if i in special]

    expected = specials(encoder.encode(template))
    assert specials(encoder.encode(history)) == expected  # token ids: text never encodes to a special token
    # Text prompts are parsed by the server, which turns spellings into tokens unless they are defanged again.
    assert specials(tokenizer.encode(render_prompt(history, defang=True))) == expected


# Citation markers with the numbers they carry; prose with neither digits, brackets nor code characters.
MARKER = st.lists(st.integers(1, 12), min_size=1, max_size=3).flatmap(
    lambda numbers: st.sampled_from(
        [
            "[citation:{}]".format(",".join(map(str, numbers))),
            "[ citation: {}]".format(", ".join(map(str, numbers))),
            "[[citation:{}]]".format(",".join(map(str, numbers))),
            "【citation:{}】".format("，".join(map(str, numbers))),
        ]
    ).map(lambda marker: (marker, numbers))
)
PROSE = st.text(st.characters(codec="utf-8", exclude_characters="[]【】`~:0123456789"), max_size=8).map(
    lambda text: (text, [])
)
RESOLVE = st.dictionaries(st.integers(1, 12), st.integers(1, 30), max_size=8)


@PROPERTY
@given(st.lists(st.one_of(MARKER, PROSE), max_size=12), RESOLVE, CUTS)
def test_citations_drop_unknown_numbers_and_keep_first_mention_order(
    pieces: list[tuple[str, list[int]]], resolve: dict[int, int], cuts: list[int]
) -> None:
    text = "".join(piece for piece, _ in pieces)
    numbers = [n for _, ns in pieces for n in ns]
    processor, released, new = CitationProcessor(resolve), [], []
    for chunk in [*split(text, cuts), None]:
        processed = processor.feed(chunk) if chunk is not None else processor.flush()
        released.append(processed.text)
        new += processed.new_sources
    whole = CitationProcessor(resolve)
    whole.feed(text)
    whole.flush()
    assert "".join(released) == processor.text == whole.text
    assert processor.cited == new == list(dict.fromkeys(resolve[n] for n in numbers if n in resolve))
    assert set(processor.dropped) == {n for n in numbers if n not in resolve}
    shown = [int(n) for n in re.findall(r"\[(\d+)\]", processor.text)]
    assert set(shown) <= set(resolve.values()) and "citation:" not in processor.text.casefold()
    assert all(set(span.sources) <= set(resolve.values()) for span in processor.spans)


# Code text: markers and prose on one line, never empty (two backticks in a row would open a longer span).
CODE = (
    st.lists(st.one_of(MARKER, PROSE), min_size=1, max_size=6)
    .map(lambda pieces: "".join(piece for piece, _ in pieces).replace("\n", " "))
    .filter(bool)
)


@PROPERTY
@given(st.one_of(MARKER, PROSE), CODE, st.lists(CODE, max_size=3), st.one_of(MARKER, PROSE), CUTS)
def test_citations_leave_code_alone(
    before: tuple[str, list[int]], inline: str, block: list[str], after: tuple[str, list[int]], cuts: list[int]
) -> None:
    fenced = "```\n" + "".join(line + "\n" for line in block) + "```\n"
    text = f"{before[0]} `{inline}` text\n{fenced}{after[0]}"
    resolve = {n: 100 + n for n in range(1, 13)}
    processor = CitationProcessor(resolve)
    for chunk in split(text, cuts):
        processor.feed(chunk)
    processor.flush()
    assert f" `{inline}` text\n{fenced}" in processor.text
    assert processor.cited == list(dict.fromkeys(resolve[n] for n in before[1] + after[1]))


URL = st.one_of(
    st.sampled_from(
        [
            "https://example.org/a?b=1#c",
            "http://例子.测试/路径",
            "HTTPS://Example.org",
            "corpus:notes/a.md",
            "javascript:alert(1)",
            "JaVaScRiPt:alert(1)",
            " javascript:alert(1)",
            "java\tscript:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "vbscript:msgbox",
            "file:///etc/passwd",
            "//example.org/protocol-relative",
            "https://",
            "https:///path",
            "http://example.org:99999/",
            "http://[::1",
            "https://example.org/a b",
            "https://example.org/\u202egnp.exe",
            "https://example.org/\n",
            "corpus:",
            "https://example.org/" + "a" * MAX_URL_CHARS,
        ]
    ),
    st.text(max_size=20),
    st.builds(lambda scheme, rest: f"{scheme}:{rest}", st.sampled_from(["http", "https", "corpus", "x"]), st.text()),
)
DISPLAY_TEXT = st.lists(
    st.one_of(st.text(max_size=20), st.sampled_from([*SPECIAL_TOKENS, *DEFANGED, "\u202e", "\u2066", "\x1b[2J", "\n"])),
    max_size=8,
).map("".join) | st.text(min_size=MAX_SNIPPET_CHARS, max_size=MAX_SNIPPET_CHARS + 50)
RESULT = st.builds(
    SearchResult, title=DISPLAY_TEXT, url=URL, snippet=DISPLAY_TEXT, rank=st.just(1), engine=st.just("x")
)
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def shown_url(url: str) -> bool:
    """A URL a user may be shown, judged independently of the code under test."""
    if any(unicodedata.category(c)[0] in "CZ" for c in url) or len(url) > MAX_URL_CHARS:
        return False
    if url.startswith("corpus:"):
        return len(url) > len("corpus:")
    try:
        parts = urlsplit(url)
        return parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        return False


def plain(text: str, limit: int) -> bool:
    return (
        len(text) <= limit
        and text == text.strip()
        and not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in BIDI or c == WORD_JOINER for c in text)
        and not any(token in text for token in SPECIAL_TOKENS)
    )


@PROPERTY
@given(st.lists(RESULT, max_size=6), st.integers(0, 3))
@example([SearchResult("t", "javascript:alert(1)", "s", 1, "x"), SearchResult("t", "data:,x", "s", 2, "x")], 0)
def test_sources_have_web_or_corpus_urls_and_plain_titles(results: list[SearchResult], known_count: int) -> None:
    known = [
        Source(n=n, url=f"https://known.example/{n}", title="", domain="", snippet="")
        for n in range(1, known_count + 1)
    ]
    kept = dedupe(results)
    sources = number_sources(results, known, round=1)
    assert [r.url for r in kept] == [r.url for r in dedupe(r for r in results if shown_url(r.url))]
    assert [s.n for s in sources] == list(range(known_count + 1, known_count + 1 + len(sources)))
    new_urls = (r.url for r in results if shown_url(r.url) and r.url not in {s.url for s in known})
    assert [s.url for s in sources] == list(dict.fromkeys(new_urls))
    for item in [*kept, *sources]:
        assert shown_url(item.url)
        assert plain(item.title, MAX_TITLE_CHARS) and plain(item.snippet, MAX_SNIPPET_CHARS)


U64 = 2**64 - 1
EVENT_ID = st.one_of(
    st.tuples(st.integers(0, U64), st.integers(0, U64)).map(lambda p: f"{p[0]}-{p[1]}"),
    st.tuples(st.integers(0, U64 * 2), st.integers(0, 3), st.integers(0, 25)).map(
        lambda p: "0" * p[2] + f"{p[0]}-{p[1]}"  # leading zeros, and parts past 2**64 - 1
    ),
    st.sampled_from(["", "-", "1-", "-1", "1", "1--2", "1-2-3", " 1-2", "1-2\n", "+1-2", "0x1-2", "１-２", "²-1"]),
    st.text(max_size=12),
)


@PROPERTY
@given(EVENT_ID)
@example("1" * 5000 + "-0")  # past Python's int() digit limit: still our message, not the interpreter's
@example("0" * 130 + "1-0")  # a small number that Redis refuses (ids over 127 characters)
@example(f"{U64}-{U64}")
@example(f"{U64 + 1}-0")
def test_event_id_key_accepts_exactly_redis_ids(event_id: str) -> None:
    match = re.fullmatch(r"([0-9]{1,20})-([0-9]{1,20})", event_id)
    if match and int(match[1]) <= U64 and int(match[2]) <= U64:
        assert event_id_key(event_id) == (int(match[1]), int(match[2]))
    else:
        with pytest.raises(ValueError, match="^not an event id"):
            event_id_key(event_id)


@pytest.fixture(scope="module")
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


ID_PAIR = st.tuples(st.integers(0, U64), st.integers(0, U64)) | st.tuples(st.integers(0, 3), st.integers(0, 3))


@SLOW_PROPERTY
@given(st.sets(ID_PAIR.filter(lambda p: p != (0, 0)), min_size=1, max_size=6), ID_PAIR, st.integers(0, 3))
def test_event_ids_order_as_redis_reads_after_them(
    redis_client, stored: set[tuple[int, int]], probe: tuple[int, int], zeros: int
) -> None:
    """Resuming reads the events after an id with XREAD: Redis must accept every id we accept and return
    exactly the events our order puts after it."""
    key = f"test:properties:{uuid.uuid4().hex}"
    ids = sorted((f"{ms}-{seq}" for ms, seq in stored), key=event_id_key)
    try:
        for event_id in ids:  # XADD refuses an id not above the last one: our order must be Redis's
            redis_client.xadd(key, {"type": "token"}, id=event_id)
        after = "0" * zeros + f"{probe[0]}-{probe[1]}"
        reply = redis_client.xread({key: after})
        read = [event_id for _, entries in reply for event_id, _ in entries]
        assert read == [i for i in ids if event_id_key(i) > event_id_key(after)]
    finally:
        redis_client.delete(key)
