"""Streaming parser for Megrez output: text deltas in, chat/function-call/end-of-turn events out.

The engine streams with ``skip_special_tokens=False``, so ``<|function_start|>``, ``<|turn_end|>`` etc.
arrive as text, split across deltas at arbitrary characters. ``StreamParser.feed`` returns the events
that are certain so far; ``close`` flushes at the end of the stream.

Hold-back rules (text is streamed as soon as it cannot change meaning):

* a tail that is a proper prefix of a stream special token (``<|turn_e``) is held until it completes or
  cannot complete; such a tail always starts at the last ``<``, since the tokens contain only one;
* a tail that is a prefix of a citation marker ``[citation:N]`` (also the ``[ citation:N]`` variant the
  model emits; N of at most ``CITATION_MAX_DIGITS`` digits) is held likewise, so a marker is never split
  between two ``TextEvent``\\ s and the UI can link it in one go;
* ``close`` releases whatever is held as text: at the end of the stream it is literal text.

Special tokens: ``<|turn_end|>``, ``<|eos|>``, the typo ``<|turn_end>`` and ``<|role_start|>`` (the model
starting another message) end the turn; ``<|role_end|>``, ``<|pad|>``, ``<|unk|>`` and a stray
``<|function_end|>`` are dropped, never shown. ``<image>``/``<audio>`` are left as text: in chat output they
are far more likely HTML talk than modality markers. In a text stream a special token and the same
characters spelt with ordinary tokens look alike; both are treated as the token.

The word joiner (U+2060) that :func:`engine.protocol.defang_special_tokens` puts into special-token
spellings of prompt text is taken out of everything the parser passes on (chat text, the transcript, the
string arguments of a call): a model that copies a defanged page copies the invisible character too, and
it must not reach the user, the stored answer or a search query. This happens after tokens are matched, so
a copied spelling (``<``, U+2060, ``|turn_end|>``) comes out as the characters ``<|turn_end|>`` and never as
the token. Those characters are safe in later prompts: token-id prompts encode text with special-token
parsing off, and text prompts are defanged again, which puts the same joiner back in the same place.

Function calls: text before ``<|function_start|>`` is emitted first, then ``FunctionCallStarted``; the
body is collected up to ``<|function_end|>`` and parsed into ``FunctionCallEvent`` or ``FunctionCallError``.
If the stream ends inside the body (``<|function_end|>`` used as a stop string and stripped, or an end
token instead of it), the body is parsed as if terminated. A call ends the assistant's turn: the caller
must run the tool and send an observation, so ``TurnEnd("function_call")`` follows at once and anything
the model writes after ``<|function_end|>`` is discarded (kept in ``StreamParser.discarded`` for logs).
``StreamParser.transcript`` is the assistant message to keep in history (text, then the call block with
the canonical ``<|function_end|>``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from engine.protocol import (
    EOS,
    FORCED_SEARCH_PREFIX,
    FUNCTION_END,
    FUNCTION_START,
    ROLE_END,
    ROLE_START,
    TURN_END,
    TURN_END_TYPO,
    Message,
)
from prompts.search import SEARCH_FUNCTION_NAME

CITATION_MAX_DIGITS: Final = 3
# What the UI should link; the parser never splits a match of this between two text events.
CITATION_RE: Final = re.compile(rf"\[ ?citation:(\d{{1,{CITATION_MAX_DIGITS}}})\]")
# Any prefix of a citation marker that reaches the end of the buffer (closing "]" excluded: a marker
# that has it is complete).
_PARTIAL_CITATION_RE: Final = re.compile(
    rf"\[ ?(?:c(?:i(?:t(?:a(?:t(?:i(?:o(?:n(?::\d{{0,{CITATION_MAX_DIGITS}}})?)?)?)?)?)?)?)?)?\Z"
)

_END_TOKENS: Final = frozenset({TURN_END, EOS, TURN_END_TYPO, ROLE_START})
_DROPPED_TOKENS: Final = frozenset({ROLE_END, "<|pad|>", "<|unk|>", FUNCTION_END})
_STREAM_TOKENS: Final = (*_END_TOKENS, *_DROPPED_TOKENS, FUNCTION_START)
_STREAM_TOKEN_RE: Final = re.compile("|".join(re.escape(t) for t in sorted(_STREAM_TOKENS, key=len, reverse=True)))
_TOKEN_PREFIXES: Final = frozenset(t[:i] for t in _STREAM_TOKENS for i in range(1, len(t)))
_CALL_STOP_RE: Final = re.compile("|".join(re.escape(t) for t in (FUNCTION_END, *_END_TOKENS)))
# What defang_special_tokens inserts after the "<" of a special-token spelling in prompt text.
WORD_JOINER: Final = "\u2060"

# Required arguments of the functions the model may call; anything else is an "unknown_function".
DEFAULT_FUNCTIONS: Final[Mapping[str, tuple[str, ...]]] = {SEARCH_FUNCTION_NAME: ("query",)}

ErrorKind = Literal["malformed_json", "not_an_object", "unknown_function", "missing_argument", "invalid_argument"]


@dataclass(frozen=True, slots=True)
class TextEvent:
    """Chat text to show: never a token the model emitted or part of one, nor part of a citation marker, nor
    a word joiner (a special-token spelling the model copied from a page is text, see the module docstring)."""

    text: str


@dataclass(frozen=True, slots=True)
class FunctionCallStarted:
    """``<|function_start|>`` arrived: the UI can show "searching…" before the query is complete."""


@dataclass(frozen=True, slots=True)
class FunctionCallEvent:
    """A well-formed call. ``raw`` is the body between the function tokens, exactly as generated."""

    name: str
    arguments: dict[str, Any]
    raw: str


@dataclass(frozen=True, slots=True)
class FunctionCallError:
    """A call that cannot be run; ``message`` is meant for logs and for an error observation."""

    kind: ErrorKind
    message: str
    raw: str


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """End of the assistant turn. ``reason``: the end token that arrived (``<|turn_end|>``, ``<|eos|>``,
    ``<|turn_end>``, ``<|role_start|>``), ``"function_call"``, or the finish reason given to ``close``
    (``"stop"``, ``"length"``, ``"abort"``…)."""

    reason: str


Event = TextEvent | FunctionCallStarted | FunctionCallEvent | FunctionCallError | TurnEnd


def parse_function_call(
    raw: str, functions: Mapping[str, Sequence[str]] = DEFAULT_FUNCTIONS
) -> FunctionCallEvent | FunctionCallError:
    """Parse a call body ``{"name": ..., "arguments": {...}}``; ``arguments`` may also be a JSON string.

    String arguments come without word joiners (``raw`` keeps them: it is the call as generated).
    """
    try:
        call = json.loads(raw)
    except json.JSONDecodeError as exc:
        return FunctionCallError("malformed_json", f"function call is not valid JSON: {exc}", raw)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return FunctionCallError("not_an_object", 'function call must be an object with a string "name"', raw)
    name: str = call["name"]
    if name not in functions:
        known = ", ".join(sorted(functions))
        return FunctionCallError("unknown_function", f"unknown function {name!r} (known: {known})", raw)
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return FunctionCallError("malformed_json", f"arguments of {name} are not valid JSON: {exc}", raw)
    if not isinstance(arguments, dict):
        return FunctionCallError("not_an_object", f"arguments of {name} must be an object", raw)
    arguments = {key: v.replace(WORD_JOINER, "") if isinstance(v, str) else v for key, v in arguments.items()}
    for param in functions[name]:
        value = arguments.get(param)
        if value is None or (isinstance(value, str) and not value.strip()):
            return FunctionCallError("missing_argument", f"{name} needs a non-empty {param!r} argument", raw)
        if not isinstance(value, str):
            return FunctionCallError("invalid_argument", f"{param!r} of {name} must be a string", raw)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape cannot be sent anywhere
            return FunctionCallError("invalid_argument", f"{param!r} of {name} is not valid Unicode", raw)
    return FunctionCallEvent(name, arguments, raw)


def _token_tail(buffer: str) -> int:
    """Where the tail that might still become a special token starts (``len(buffer)`` if none)."""
    lt = buffer.rfind("<")
    return lt if lt >= 0 and buffer[lt:] in _TOKEN_PREFIXES else len(buffer)


def _held_tail(buffer: str) -> int:
    """Where the tail that might still become a special token or a citation marker starts."""
    start = _token_tail(buffer)
    bracket = buffer.rfind("[")
    # Judged without word joiners, as the text will be emitted: a joiner inside a marker does not split it.
    if 0 <= bracket < start and _PARTIAL_CITATION_RE.match(buffer[bracket:].replace(WORD_JOINER, "")):
        start = bracket
    return start


class StreamParser:
    """Incremental parser for one assistant turn; see the module docstring for the rules."""

    def __init__(self, functions: Mapping[str, Sequence[str]] = DEFAULT_FUNCTIONS) -> None:
        self.functions = functions
        self.discarded = ""  # what came after the end of the turn, for logs
        self._buffer = ""  # received but not yet certain
        self._text: list[str] = []  # emitted chat text
        self._call_body: str | None = None  # set once <|function_start|> arrived
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def transcript(self) -> str:
        """The assistant message as the history should hold it (string form)."""
        text = "".join(self._text)
        if self._call_body is None:
            return text
        return f"{text}{FUNCTION_START}{self._call_body}{FUNCTION_END}"

    def message(self) -> Message:
        """The assistant message for history, with the call body kept apart for token-safe rendering."""
        return Message("assistant", "".join(self._text), self._call_body)

    def feed(self, delta: str) -> list[Event]:
        if self._done:
            self.discarded += delta
            return []
        self._buffer += delta
        return self._drain()

    def close(self, finish_reason: str | None = None) -> list[Event]:
        """End of stream: flush held text, finish an open call, end the turn (once)."""
        if self._done:
            return []
        events: list[Event] = []
        if self._call_body is not None:
            self._call_body += self._buffer
            self._buffer = ""
            return self._finish_call()
        self._emit_text(events, self._buffer)
        self._buffer = ""
        self._done = True
        events.append(TurnEnd(finish_reason or "stop"))
        return events

    def _emit_text(self, events: list[Event], text: str) -> None:
        text = text.replace(WORD_JOINER, "")
        if text:
            self._text.append(text)
            events.append(TextEvent(text))

    def _finish_call(self) -> list[Event]:
        assert self._call_body is not None
        self._done = True
        self.discarded += self._buffer
        self._buffer = ""
        return [parse_function_call(self._call_body, self.functions), TurnEnd("function_call")]

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        while not self._done:
            if self._call_body is not None:
                return events + self._drain_call()
            match = _STREAM_TOKEN_RE.search(self._buffer)
            if match is None:
                keep = _held_tail(self._buffer)
                self._emit_text(events, self._buffer[:keep])
                self._buffer = self._buffer[keep:]
                return events
            self._emit_text(events, self._buffer[: match.start()])
            token = match.group()
            self._buffer = self._buffer[match.end() :]
            if token == FUNCTION_START:
                self._call_body = ""
                events.append(FunctionCallStarted())
            elif token in _END_TOKENS:
                self._done = True
                self.discarded += self._buffer
                self._buffer = ""
                events.append(TurnEnd(token))
        return events

    def _drain_call(self) -> list[Event]:
        """Inside a call only its end matters (``<|function_end|>`` or an end of turn); the rest is body."""
        assert self._call_body is not None
        match = _CALL_STOP_RE.search(self._buffer)
        if match is None:
            keep = _token_tail(self._buffer)
            self._call_body += self._buffer[:keep]
            self._buffer = self._buffer[keep:]
            return []
        self._call_body += self._buffer[: match.start()]
        self._buffer = self._buffer[match.end() :]
        return self._finish_call()


def parse_forced_call(
    continuation: str, functions: Mapping[str, Sequence[str]] = DEFAULT_FUNCTIONS
) -> FunctionCallEvent | FunctionCallError:
    """The call from a forced search: ``FORCED_SEARCH_PREFIX`` (prefilled) plus what the model generated
    under ``FORCED_SEARCH_REGEX``, with or without a trailing ``<|function_end|>`` or end token."""
    parser = StreamParser(functions)
    events = parser.feed(FORCED_SEARCH_PREFIX + continuation) + parser.close()
    return next(e for e in events if isinstance(e, FunctionCallEvent | FunctionCallError))
