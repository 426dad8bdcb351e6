"""Rendering of the Megrez chat/search protocol: system prompts, observations, prompts as text or token ids.

Chat format (no BOS): every message is ``<|role_start|>{role}<|role_end|>{content}<|turn_end|>`` and
generation starts after ``<|role_start|>assistant<|role_end|>``. An assistant message that called a
tool carries its raw call body, rendered as ``{content}<|function_start|>{body}<|function_end|>``.

Two renderings of the same prompt:

* ``render_prompt`` gives the string. It is what the conformance tests compare with the vendor and
  what a text-only completions backend receives — but then the *server* tokenises it and will turn
  any ``<|turn_end|>`` written inside a page or a question into the real special token. Use it
  remotely only with a server that does not parse special tokens in prompt text.
* ``PromptEncoder.encode`` gives token ids: chat tokens inserted by id, every text segment (role names,
  questions, pages, model output) encoded with special-token parsing off, so hostile text stays text.
  The OpenAI completions API (and vLLM's server) accept a list of token ids as ``prompt``, so the
  remote backend should send these ids too; the in-process engine passes them as ``prompt_token_ids``.

Prefix caching and the clock: the system prompt is the first block of every prompt and holds the
time. vLLM caches prompt KV in blocks of ``block_size`` tokens (128 on the CPU backend, 16 on GPU);
only *full* blocks are cached, and a block is reused only if it and every block before it are
identical. A time line that changes every second therefore defeats the cache for every request.
``system_prompt`` floors the time to a granularity (default: the hour, shown with ``:00:00`` so the
format stays ``YYYY-MM-DD HH:MM:SS``): all requests within the same clock hour share the system-prompt
blocks (the search-on system prompt is ~250–300 tokens, i.e. two full 128-token blocks), and a
conversation's follow-up calls within the hour reuse its whole history. The price is a clock that is up
to an hour behind; the date is never wrong. Compute ``now`` once per request and reuse it for the
request's second call (after the observation) so the two calls always share their prefix.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from prompts.search import (
    CONTEXT_TEMPLATE,
    DEFAULT_ANSWER_LANGUAGE,
    FUNCTIONS_INTRO,
    GOOGLE_WEB_SEARCH,
    OBSERVATION_TEMPLATE,
    ROLE_LINE,
    SEARCH_FUNCTION_NAME,
    TIME_LINE_TEMPLATE,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLE_START: Final = "<|role_start|>"
ROLE_END: Final = "<|role_end|>"
TURN_END: Final = "<|turn_end|>"
FUNCTION_START: Final = "<|function_start|>"
FUNCTION_END: Final = "<|function_end|>"
EOS: Final = "<|eos|>"
# A typo token in the real vocabulary that the model sometimes emits instead of <|turn_end|>.
TURN_END_TYPO: Final = "<|turn_end>"
# Every Megrez special token a prompt or a stream may contain; none may come out of encoding text.
SPECIAL_TOKENS: Final = (
    ROLE_START,
    ROLE_END,
    TURN_END,
    FUNCTION_START,
    FUNCTION_END,
    EOS,
    TURN_END_TYPO,
    "<|unk|>",
    "<|pad|>",
)

# Defanged in text sent as text: the chat tokens, and the Omni media markers (special tokens in MegrezO's
# vocabulary: a page saying "<image>" must not become an image slot without an image).
_DEFANGED: Final = (*SPECIAL_TOKENS, "<image>", "</image>", "<audio>", "</audio>")
_SPECIAL_SPELLING_RE: Final = re.compile("|".join(re.escape(t) for t in sorted(_DEFANGED, key=len, reverse=True)))

Role = Literal["system", "user", "assistant", "observation"]
MediaKind = Literal["image", "audio"]
# What stands for one image or audio clip in a prompt; the Omni processor expands it on token ids
# (MiniCPM-V's convention, which MegrezO follows). Encoded on its own, never as part of user text.
MEDIA_PLACEHOLDERS: Final[dict[str, str]] = {"image": "(<image>./</image>)", "audio": "(<audio>./</audio>)"}
TimeGranularity = Literal["second", "minute", "hour"]
DEFAULT_TIME_GRANULARITY: Final[TimeGranularity] = "hour"

# Fixed English names: strftime("%A") would follow the process locale.
_WEEKDAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# Forced search: the assistant turn is prefilled with this, and the model only writes the query.
FORCED_SEARCH_ARGS_PREFIX: Final = f'{{"name": "{SEARCH_FUNCTION_NAME}", "arguments": {{"query": "'
FORCED_SEARCH_PREFIX: Final = FUNCTION_START + FORCED_SEARCH_ARGS_PREFIX
# Structured-output regex for the continuation after the prefix: a non-empty JSON string body (no raw
# control characters, no unescaped quote or backslash; escapes as JSON allows them), then the closing
# ``"}}``. ``<|function_end|>`` is deliberately NOT in the regex: grammar backends (xgrammar, outlines)
# match regex text against ordinary tokens, so a literal in the regex would make the model spell the
# marker out of plain characters instead of emitting the special token. Once the regex is complete the
# backend only allows stop tokens, so the turn ends with EOS (``<|turn_end|>``) or a stop token id
# (pass ``<|function_end|>``'s id in ``stop_token_ids``); ``engine.parser.parse_forced_call`` accepts
# the continuation with or without the end marker, and history is rendered with the canonical one.
FORCED_SEARCH_REGEX: Final = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})+"\}\}'


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. ``function_call`` is the raw JSON body of an assistant's tool call, kept
    byte for byte as generated (the model sees its own history exactly as it wrote it). ``media`` lists
    the images and audio clips of a user message, in order (Megrez-3B-Omni); each becomes a placeholder
    line before the text."""

    role: Role
    content: str
    function_call: str | None = None
    media: tuple[MediaKind, ...] = ()

    def __post_init__(self) -> None:
        if self.function_call is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry a function call")
        if self.media and self.role != "user":
            raise ValueError("only user messages carry images or audio")


class Segment(NamedTuple):
    """A piece of a rendered prompt: plain text, or (``special``) a special token or a media placeholder."""

    text: str
    special: bool


def function_schema() -> dict[str, Any]:
    """A fresh copy of the ``googleWebSearch`` schema (callers may mutate it)."""
    return json.loads(json.dumps(GOOGLE_WEB_SEARCH))


def floor_time(now: datetime, granularity: TimeGranularity = DEFAULT_TIME_GRANULARITY) -> datetime:
    """``now`` with everything below ``granularity`` zeroed (see the module docstring for why)."""
    if granularity == "second":
        return now.replace(microsecond=0)
    if granularity == "minute":
        return now.replace(second=0, microsecond=0)
    if granularity == "hour":
        return now.replace(minute=0, second=0, microsecond=0)
    raise ValueError(f"unknown time granularity: {granularity!r}")


def time_line(now: datetime, granularity: TimeGranularity = DEFAULT_TIME_GRANULARITY) -> str:
    """``The current time is YYYY-MM-DD HH:MM:SS, Weekday.`` for ``now`` floored to ``granularity``."""
    floored = floor_time(now, granularity)
    return TIME_LINE_TEMPLATE.format(time=floored.strftime("%Y-%m-%d %H:%M:%S"), weekday=_WEEKDAYS[floored.weekday()])


def system_prompt(
    now: datetime | None = None, *, search: bool, granularity: TimeGranularity = DEFAULT_TIME_GRANULARITY
) -> str:
    """The system message content, with or without the search function. ``now`` defaults to local time."""
    lines = [ROLE_LINE, time_line(now if now is not None else datetime.now(), granularity)]
    if search:
        lines += [FUNCTIONS_INTRO, json.dumps(GOOGLE_WEB_SEARCH, ensure_ascii=False, indent=4)]
    return "\n".join(lines)


# Script-based language detection. Each script maps to the language we ask the model to answer in.
# Latin script cannot tell English from French or German, so it maps to English; callers that know
# the user's language pass it explicitly.
_SCRIPT_RANGES: Final[tuple[tuple[str, tuple[tuple[int, int], ...]], ...]] = (
    ("han", ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))),
    ("kana", ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))),
    ("hangul", ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF))),
    ("thai", ((0x0E00, 0x0E7F),)),
    ("cyrillic", ((0x0400, 0x04FF),)),
    ("greek", ((0x0370, 0x03FF),)),
    ("hebrew", ((0x0590, 0x05FF),)),
    ("arabic", ((0x0600, 0x06FF), (0x0750, 0x077F))),
    ("devanagari", ((0x0900, 0x097F),)),
    ("latin", ((0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F))),
)
_SCRIPT_LANGUAGE: Final = {
    "han": "Chinese",
    "kana": "Japanese",
    "hangul": "Korean",
    "thai": "Thai",
    "cyrillic": "Russian",
    "greek": "Greek",
    "hebrew": "Hebrew",
    "arabic": "Arabic",
    "devanagari": "Hindi",
    "latin": "English",
}
# Scripts written without spaces are counted per character, at half weight (about two characters a
# word); the others per word, so "What does 你好 mean?" is English and "Python的GIL是什么" Chinese.
_CHARACTER_SCRIPTS: Final = frozenset({"han", "kana", "thai"})


def _script(char: str) -> str | None:
    code = ord(char)
    for script, ranges in _SCRIPT_RANGES:
        if any(low <= code <= high for low, high in ranges):
            return script
    return None


def detect_language(text: str, default: str = DEFAULT_ANSWER_LANGUAGE) -> str:
    """The language to answer ``text`` in, judged by script: the script with the most weight wins
    (ties go to the earlier script in ``_SCRIPT_RANGES``, i.e. to the non-Latin one); any kana makes
    Han characters count as Japanese; text with no letters gets ``default`` (Chinese, the model's own)."""
    weights: dict[str, float] = dict.fromkeys(_SCRIPT_LANGUAGE, 0.0)
    previous: str | None = None
    for char in text:
        script = _script(char)
        if script in _CHARACTER_SCRIPTS:
            weights[script] += 0.5
        elif script is not None and script != previous:
            weights[script] += 1.0  # a new word in a spaced script
        previous = script
    if weights["kana"] > 0:
        weights["kana"] += weights.pop("han")
    best = max(weights, key=lambda script: weights[script])  # max keeps the first of equal weights
    return _SCRIPT_LANGUAGE[best] if weights[best] > 0 else default


def render_contexts(contexts: Sequence[str], *, start: int = 1) -> str:
    """Contexts numbered from ``start``, each under its own ``[[citation:N]]`` line."""
    return "\n".join(CONTEXT_TEMPLATE.format(number=i, text=text) for i, text in enumerate(contexts, start=start))


def render_observation(
    question: str, keywords: str, contexts: Sequence[str], *, language: str | None = None, start: int = 1
) -> str:
    """The observation message content. ``language`` overrides ``detect_language(question)``; ``start``
    is the first context number (a second search in the same turn continues after the first's)."""
    return OBSERVATION_TEMPLATE.format(
        language=language if language is not None else detect_language(question),
        question=question,
        keywords=keywords,
        contexts=render_contexts(contexts, start=start),
    )


def prompt_segments(
    messages: Sequence[Message], *, add_generation_prompt: bool = True, force_search: bool = False
) -> Iterator[Segment]:
    """The prompt as alternating special-token and text segments (the single source for both renderings)."""
    if force_search and not add_generation_prompt:
        raise ValueError("force_search prefills the assistant turn, so it needs add_generation_prompt")
    for message in messages:
        yield Segment(ROLE_START, True)
        yield Segment(message.role, False)
        yield Segment(ROLE_END, True)
        for kind in message.media:
            yield Segment(MEDIA_PLACEHOLDERS[kind], True)
            yield Segment("\n", False)
        if message.content:
            yield Segment(message.content, False)
        if message.function_call is not None:
            yield Segment(FUNCTION_START, True)
            yield Segment(message.function_call, False)
            yield Segment(FUNCTION_END, True)
        yield Segment(TURN_END, True)
    if add_generation_prompt:
        yield Segment(ROLE_START, True)
        yield Segment("assistant", False)
        yield Segment(ROLE_END, True)
        if force_search:
            yield Segment(FUNCTION_START, True)
            yield Segment(FORCED_SEARCH_ARGS_PREFIX, False)


def defang_special_tokens(text: str) -> str:
    """``text`` with every special-token spelling broken by a word joiner (U+2060) after ``<``.

    For prompts that must go to a server as *text*, which parses special tokens in it: a page or a
    question that contains ``<|turn_end|>`` then stays characters (one invisible character more)
    instead of ending the turn. Token-id prompts (:class:`PromptEncoder`) need none of this.
    """
    return _SPECIAL_SPELLING_RE.sub(lambda m: "<\u2060" + m.group()[1:], text) if "<" in text else text


def render_prompt(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    force_search: bool = False,
    defang: bool = False,
) -> str:
    """The prompt as a string (see the module docstring before sending it to a server as text).

    ``defang``: pass every text segment (messages, model output, pages) through
    :func:`defang_special_tokens`, so that only the template's own markers are special tokens.
    """
    return "".join(
        s.text if s.special or not defang else defang_special_tokens(s.text)
        for s in prompt_segments(messages, add_generation_prompt=add_generation_prompt, force_search=force_search)
    )


class PromptEncoder:
    """Renders prompts to token ids so that no text can become a special token.

    Special tokens go in by id; text is encoded with ``split_special_tokens=True``, which (verified with
    transformers 5.19 fast tokenizers, see tests/test_protocol.py) encodes ``<|turn_end|>`` inside text
    as ordinary pieces. As a fail-closed guard every encoded segment is checked for special ids, so a
    tokenizer that ignores the flag raises instead of silently letting page text forge a turn.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special_ids: dict[str, int] = {}
        for token in SPECIAL_TOKENS:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if not isinstance(token_id, int) or (token != tokenizer.unk_token and token_id == tokenizer.unk_token_id):
                raise ValueError(f"tokenizer has no {token} token")
            self.special_ids[token] = token_id
        self._forbidden = frozenset(self.special_ids.values()) | frozenset(tokenizer.all_special_ids)
        # A fast tokenizer's own backend, set to encode special-token strings as text, gives the ids that
        # ``split_special_tokens=True`` gives (tested) at half the cost: prompts are encoded on every call.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._counter = None
        if backend is not None and hasattr(backend, "encode_special_tokens"):
            self._counter = copy.deepcopy(backend)  # a copy: the flag must not change the tokenizer vLLM uses
            self._counter.encode_special_tokens = True

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: special-token strings inside it stay characters."""
        if self._counter is not None:  # the same ids, without transformers' per-call overhead
            ids: list[int] = self._counter.encode(text, add_special_tokens=False).ids
        else:
            ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if self._forbidden.intersection(ids):
            raise RuntimeError("tokenizer produced special-token ids from plain text (split_special_tokens ignored?)")
        return ids

    def count_text(self, text: str) -> int:
        """``len(encode_text(text))`` (it runs for every sentence of every page: no special-id check)."""
        if self._counter is None:
            return len(self.encode_text(text))
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def placeholder_ids(self, placeholder: str) -> list[int]:
        """A media placeholder's ids, encoded on its own so the Omni processor finds exactly these ids."""
        ids: list[int] = self.tokenizer(placeholder, add_special_tokens=False)["input_ids"]
        if set(self.special_ids.values()).intersection(ids):
            raise RuntimeError(f"the media placeholder {placeholder!r} encodes to a Megrez control token")
        return ids

    def encode(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, force_search: bool = False
    ) -> list[int]:
        """The prompt as token ids, ready for ``prompt_token_ids`` or a completions ``prompt`` list."""
        ids: list[int] = []
        for segment in prompt_segments(
            messages, add_generation_prompt=add_generation_prompt, force_search=force_search
        ):
            if segment.special and segment.text in self.special_ids:
                ids.append(self.special_ids[segment.text])
            elif segment.special:
                ids.extend(self.placeholder_ids(segment.text))
            else:
                ids.extend(self.encode_text(segment.text))
        return ids
