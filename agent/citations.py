"""Streaming citation processor: the model's ``[citation:c]`` markers in, ``[n]`` source numbers out.

The model answers from search contexts numbered ``[[citation:1]]``, ``[[citation:2]]``… and cites them at the
end of sentences. ``CitationProcessor`` sits between the engine's ``TextEvent``\\ s and the caller: it rewrites
markers, tracks which sources were cited first, and records where each citation sits in the output.

Accepted markers (``citation`` in any case, numbers of 1 to ``CITATION_MAX_DIGITS`` digits):
``[citation:3]``, ``[citation: 3]``, ``[ citation:3]``, ``[citation:3 ]``, ``[citation:3,5]`` (also ``, ``
and full-width ``，``), ``[[citation:3]]`` and full-width ``【citation:3】``; the closing bracket must match the
opening one. Markers written back to back (``[citation:3][citation:5]``) form one *group*: one span, one
rendering, duplicates removed. Anything else (``[1]``, ``[citation:1234]``, ``[cite:1]``) is plain text.

Hold-back rule: text is released as soon as its meaning is certain. A tail that may still become a marker
(``[citati``, ``【citation:1,``) is held, and so is a complete group at the very end of a delta (the next
character tells whether another marker joins it), a space before either (a group that disappears takes
one space with it: "Paris [citation:9]." becomes "Paris.") and a trailing run of backticks or tildes (its
length decides what it opens). ``flush`` releases what is held as plain text. The result therefore does
not depend on where the stream was split, and each ``feed`` costs O(delta + held tail).

Code: markers inside inline code (```...```, closed by a run of the same length) and fenced blocks (a line
starting with three or more backticks or tildes, closed by a line of at least as many of the same
character and nothing else) are left alone and not tracked. The state survives delta boundaries. An inline
span still open at the end of its line is taken as a stray backtick and closed there, so one stray
backtick cannot switch citation processing off for the rest of the answer.

Unknown numbers: the resolver maps the model's context number to the source number shown to the user. A
number it does not know is *dropped* and logged; a group left with no source disappears. The vendor clamps
such numbers to the nearest existing source instead, which yields a citation that looks right and points
at a page that never said it; a missing citation is the lesser harm.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from engine.parser import CITATION_MAX_DIGITS

_log = logging.getLogger(__name__)

CitationMode = Literal["numbers", "remove", "keep"]

_NUM: Final = rf"[0-9]{{1,{CITATION_MAX_DIGITS}}}"
_SEP: Final = " ?[,，] ?"
_NUMS: Final = rf"{_NUM}(?:{_SEP}{_NUM})*"
_BODY: Final = rf" ?citation: ?({_NUMS}) ?"
# A complete marker; the double-bracket form is tried first so "[[citation:3]]" is not read as "[" + marker.
MARKER_RE: Final = re.compile(rf"\[\[{_BODY}\]\]|\[{_BODY}\]|【{_BODY}】", re.IGNORECASE)
_SPLIT_RE: Final = re.compile(_SEP)


def _prefixes(word: str, rest: str) -> str:
    """A pattern for every prefix of ``word`` followed, once it is whole, by an optional ``rest``."""
    pattern = f"(?:{rest})?"
    for char in reversed(word):
        pattern = f"(?:{re.escape(char)}{pattern})?"
    return pattern


# Every proper prefix of a marker (a complete marker has its closing bracket and matches MARKER_RE).
_PARTIAL_RE: Final = re.compile(
    rf"(?:\[\[?|【) ?{_prefixes('citation', rf': ?(?:{_NUMS}(?: ?[,，]? ?)?)?')}|\[\[ ?citation: ?{_NUMS} ?\]",
    re.IGNORECASE,
)
_TEXT_STOP: Final = re.compile(r"[\[【`~\n]")  # what can start a marker, a code span or fence, or a line
_CODE_STOP: Final = re.compile(r"[`\n]")


@dataclass(frozen=True, slots=True)
class CitationSpan:
    """Where one marker group sits in the processed text (``start == end`` where it was removed)."""

    start: int
    end: int
    sources: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Processed:
    """What one ``feed``/``flush`` call releases, and the sources cited for the first time in it."""

    text: str
    new_sources: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Claim:
    """A cited sentence without markers; ``text[start:end]`` of the processed text covers it and its markers."""

    text: str
    sources: tuple[int, ...]
    start: int
    end: int


class CitationProcessor:
    """Rewrites the markers of one streamed answer; see the module docstring for the rules.

    ``resolve`` maps a context number to a source number (a mapping, or a function returning ``None`` for
    an unknown number). ``mode``: ``"numbers"`` renders each group as ``[n][m]``, ``"remove"`` deletes
    groups, ``"keep"`` leaves the text as written; all three track ``cited``, ``spans`` and ``dropped``.

    >>> p = CitationProcessor({1: 4, 2: 7})
    >>> [p.feed("Paris is the capital [cita").text, p.feed("tion:2,9].").text, p.flush().text]
    ['Paris is the capital', ' [7].', '']
    >>> p.cited, p.dropped, p.spans
    ([7], [9], [CitationSpan(start=21, end=24, sources=(7,))])
    """

    def __init__(
        self, resolve: Mapping[int, int] | Callable[[int], int | None], *, mode: CitationMode = "numbers"
    ) -> None:
        if mode not in get_args(CitationMode):
            raise ValueError(f"unknown citation mode: {mode!r}")
        self.mode: CitationMode = mode
        self._resolve: Callable[[int], int | None] = resolve.get if isinstance(resolve, Mapping) else resolve
        self.cited: list[int] = []  # source numbers in the order first cited
        self.spans: list[CitationSpan] = []
        self.dropped: list[int] = []  # context numbers that resolved to nothing, once per group
        self._parts: list[str] = []  # emitted text, joined lazily by ``text``
        self._length = 0
        self._held = ""
        self._out: list[str] = []  # this call's text
        self._new: list[int] = []  # this call's first citations
        self._line_blank = True  # nothing but spaces/tabs so far on the current line (a fence may open)
        self._ticks = 0  # length of the backtick run that opened the current inline code span, 0 outside
        self._fence = ""  # the run that opened the current fenced block, "" outside
        self._fence_closing = False  # on a line that closes the fence if nothing but spaces follows

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def feed(self, delta: str) -> Processed:
        """Process the next piece of model text; returns what can be shown now."""
        buffer = self._held + delta
        self._held = buffer[self._scan(buffer, final=False) :]
        return self._take()

    def flush(self) -> Processed:
        """End of the stream: release what is held (a partial marker is plain text by now)."""
        buffer, self._held = self._held, ""
        self._scan(buffer, final=True)
        return self._take()

    def claims(self) -> list[Claim]:
        """``cited_claims`` of everything emitted so far."""
        return cited_claims(self.text, self.spans)

    def _take(self) -> Processed:
        processed = Processed("".join(self._out), tuple(self._new))
        self._out.clear()
        self._new.clear()
        return processed

    def _emit(self, text: str) -> None:
        if text:
            self._out.append(text)
            self._parts.append(text)
            self._length += len(text)

    def _emit_plain(self, text: str) -> None:
        """Emit text outside code that holds no line break."""
        self._emit(text)
        if text.strip(" \t"):
            self._line_blank = False

    def _scan(self, buffer: str, *, final: bool) -> int:
        """Emit what is certain; return where the held tail starts (``len(buffer)`` once ``final``)."""
        pos = 0
        while pos < len(buffer):
            if self._fence:
                pos, hold = self._scan_fence(buffer, pos, final)
            elif self._ticks:
                pos, hold = self._scan_inline(buffer, pos, final)
            else:
                pos, hold = self._scan_text(buffer, pos, final)
            if hold:
                break
        return pos

    def _scan_text(self, buffer: str, pos: int, final: bool) -> tuple[int, bool]:
        stop = _TEXT_STOP.search(buffer, pos)
        if stop is None:
            end = len(buffer)
            if not final and buffer.endswith(" "):
                end -= 1  # a disappearing group may follow and take this space with it
            self._emit_plain(buffer[pos:end])
            return end, end < len(buffer)
        at = stop.start()
        char = buffer[at]
        if char == "\n":
            self._emit_plain(buffer[pos:at])
            self._emit("\n")
            self._line_blank = True
            return at + 1, False
        if char in "`~":
            end = _run_end(buffer, at)
            self._emit_plain(buffer[pos:at])
            if end == len(buffer) and not final:
                return at, True  # the run may grow, and its length decides what it opens
            if self._line_blank and end - at >= 3:
                self._fence, self._fence_closing = buffer[at:end], False
            elif char == "`":
                self._ticks = end - at
            self._emit(buffer[at:end])
            self._line_blank = False
            return end, False
        end, numbers = self._match_group(buffer, at, final)
        plain = buffer[pos:at]
        if end < 0:  # may still become a marker: hold it, with the space a disappearing group would take
            if plain.endswith(" "):
                plain, at = plain[:-1], at - 1
            self._emit_plain(plain)
            return at, True
        if not numbers:
            self._emit_plain(buffer[pos : at + 1])
            return at + 1, False
        self._group(plain, buffer[at:end], numbers)
        return end, False

    def _match_group(self, buffer: str, at: int, final: bool) -> tuple[int, list[int]]:
        """The markers written back to back from ``at``: (end, context numbers); end -1 if undecided yet."""
        numbers: list[int] = []
        end = at
        while (match := MARKER_RE.match(buffer, end)) is not None:
            numbers += [int(n) for n in _SPLIT_RE.split(match.group(match.lastindex or 0))]
            end = match.end()
        if not final and (end == len(buffer) or _PARTIAL_RE.fullmatch(buffer, end)):
            return -1, numbers
        return end, numbers

    def _group(self, plain: str, raw: str, numbers: list[int]) -> None:
        sources: list[int] = []
        for number in dict.fromkeys(numbers):
            source = self._resolve(number)
            if source is None:
                self.dropped.append(number)
                _log.warning("citation %d points to no search context; dropped", number)
            elif source not in sources:
                sources.append(source)
        if self.mode == "keep":
            rendered = raw
        elif self.mode == "numbers" and sources:
            rendered = "".join(f"[{n}]" for n in sources)
        else:
            rendered = ""
            if plain.endswith(" "):
                plain = plain[:-1]
        self._emit_plain(plain)
        start = self._length
        self._emit(rendered)
        self._line_blank = False
        if sources:
            self.spans.append(CitationSpan(start, self._length, tuple(sources)))
            for source in sources:
                if source not in self.cited:  # a handful of sources per answer: a list is fine
                    self.cited.append(source)
                    self._new.append(source)

    def _scan_inline(self, buffer: str, pos: int, final: bool) -> tuple[int, bool]:
        stop = _CODE_STOP.search(buffer, pos)
        if stop is None:
            self._emit(buffer[pos:])
            return len(buffer), False
        at = stop.start()
        self._emit(buffer[pos:at])
        if buffer[at] == "\n":  # an inline span left open at the end of its line was a stray backtick
            self._ticks = 0
            self._emit("\n")
            self._line_blank = True
            return at + 1, False
        end = _run_end(buffer, at)
        if end == len(buffer) and not final:
            return at, True
        if end - at == self._ticks:
            self._ticks = 0
        self._emit(buffer[at:end])
        return end, False

    def _scan_fence(self, buffer: str, pos: int, final: bool) -> tuple[int, bool]:
        if self._line_blank or self._fence_closing:
            start = pos
            while pos < len(buffer) and buffer[pos] in " \t":
                pos += 1
            if pos == len(buffer):
                self._emit(buffer[start:])
                return pos, False
            if self._line_blank and buffer[pos] == self._fence[0]:
                end = _run_end(buffer, pos)
                if end == len(buffer) and not final:
                    self._emit(buffer[start:pos])
                    return pos, True
                self._fence_closing = end - pos >= len(self._fence)
                self._line_blank = False
                self._emit(buffer[start:end])
                return end, False
            self._emit(buffer[start:pos])
            if self._fence_closing and buffer[pos] == "\n":
                self._fence, self._fence_closing = "", False
                self._emit("\n")
                self._line_blank = True
                return pos + 1, False
            self._fence_closing = False
        newline = buffer.find("\n", pos)
        end = len(buffer) if newline < 0 else newline + 1
        self._emit(buffer[pos:end])
        self._line_blank = newline >= 0
        return end, False


def _run_end(text: str, at: int) -> int:
    """End of the run of ``text[at]`` characters starting at ``at``."""
    end = at + 1
    while end < len(text) and text[end] == text[at]:
        end += 1
    return end


def strip_citations(text: str) -> str:
    """``text`` with every marker group outside code removed (and one space before it), e.g. for history."""
    processor = CitationProcessor(lambda number: number, mode="remove")
    processor.feed(text)
    processor.flush()
    return processor.text


_BULLET_RE: Final = re.compile(r"[ \t]*(?:[-*+•]|[0-9]{1,3}[.)])[ \t]+")
_SENTENCE_END_RE: Final = re.compile(r"[.?!]+[\"'”’)\]]*(?=\s|\Z)|[。！？；]+[\"'”’）」』]*")


def cited_claims(text: str, spans: Sequence[CitationSpan]) -> list[Claim]:
    """The sentence each marker group belongs to, without markers, one ``Claim`` per cited sentence.

    ``text``: processed output (any mode); ``spans``: its marker groups (``CitationProcessor.spans``).
    Sentences end at ``.?!`` before whitespace or the end, after ``。！？；``, and at line breaks; a list
    marker (``- ``, ``1. ``) opens a line's first sentence and is not part of it. A group right after a
    sentence's end (only spaces between) belongs to that sentence, one inside a sentence or at the start of
    a line to the sentence it is in or that follows. A sentence cited by several groups gets the union of
    their sources, in order of appearance. Claims come in text order.
    """
    ordered = sorted(spans, key=lambda s: (s.start, s.end))
    # Cut the groups (and the spaces before them) out of the text; remember how clean offsets map back.
    pieces: list[str] = []
    piece_starts: list[int] = []  # clean offset where each piece starts
    piece_origins: list[int] = []  # its offset in text
    anchors: list[int] = []  # clean offset of each group
    used: list[CitationSpan] = []
    clean_length = pos = 0

    def keep(chunk: str, at: int) -> None:
        nonlocal clean_length
        if chunk:  # no empty pieces: they would make the offset map ambiguous
            pieces.append(chunk)
            piece_starts.append(clean_length)
            piece_origins.append(at)
            clean_length += len(chunk)

    for span in ordered:
        if span.start < pos:  # overlapping spans are not ours; ignore rather than guess
            continue
        keep(text[pos : span.start].rstrip(" \t"), pos)
        anchors.append(clean_length)
        used.append(span)
        pos = span.end
    keep(text[pos:], pos)
    clean = "".join(pieces)

    def origin(offset: int) -> int:
        index = bisect_right(piece_starts, offset) - 1
        return piece_origins[index] + offset - piece_starts[index]

    sentences: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:
        while start < end and clean[start].isspace():
            start += 1
        while end > start and clean[end - 1].isspace():
            end -= 1
        if start < end:
            sentences.append((start, end))

    for line in re.finditer(r"[^\n]+", clean):
        start, line_end = line.span()
        if bullet := _BULLET_RE.match(clean, start, line_end):
            start = bullet.end()
        for stop in _SENTENCE_END_RE.finditer(clean, start, line_end):
            add(start, stop.end())
            start = stop.end()
        add(start, line_end)
    if not sentences:
        return []

    ends = [end for _, end in sentences]
    members: dict[int, list[CitationSpan]] = {}
    for anchor, span in zip(anchors, used, strict=True):
        before = bisect_right(ends, anchor) - 1  # the last sentence ending at or before the group
        if before >= 0 and ends[before] == anchor:  # right after its end (the spaces between were cut)
            index = before
        else:
            index = min(before + 1, len(sentences) - 1)
        members.setdefault(index, []).append(span)

    claims: list[Claim] = []
    for index in sorted(members):
        start, end = sentences[index]
        group = members[index]
        sources = tuple(dict.fromkeys(n for span in group for n in span.sources))
        extent_start = min(origin(start), group[0].start)
        extent_end = max(origin(end - 1) + 1, max(span.end for span in group))
        claims.append(Claim(clean[start:end], sources, extent_start, extent_end))
    return claims
