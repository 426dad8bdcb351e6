"""One model generation, streamed: engine deltas → protocol parser → citation processor → events.

Every generation of a turn goes through :func:`stream_generation`. Text is sent on as ``token``
events the moment the parser and the citation processor can vouch for it (neither half a special
token nor half a citation marker ever reaches the caller). A tool call ends the generation; text
before it is then announced as a ``preamble`` (the UI moves it out of the answer) and stays in the
transcript, as the model wrote it. A forced search is different: the assistant turn was prefilled
with the call's opening, so the continuation is only the query and is parsed with
:func:`engine.parser.parse_forced_call`.

:func:`related_questions` is the short extra generation for follow-up questions, constrained by a
regex (three numbered lines) so a 3B model cannot break the format. It is not parsed by the stream
parser, so its lines are made plain text on their own (:func:`retrieval.search.base.plain_line`: no
special-token spelling, no word joiner copied from a defanged page, one line).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.citations import CitationProcessor
from agent.context import TurnContext
from agent.events import CitationEvent, PreambleEvent, Source, StatusEvent, TokenEvent, Usage
from agent.state import Generation
from engine.base import Delta, MultiModalData, Prompt, Sampling
from engine.parser import (
    FunctionCallError,
    FunctionCallEvent,
    FunctionCallStarted,
    StreamParser,
    TextEvent,
    parse_forced_call,
)
from engine.protocol import Message
from prompts.agent import (
    MALFORMED_CALL,
    RELATED_COUNT,
    RELATED_INSTRUCTION,
    RELATED_MAX_CHARS,
    RELATED_REGEX,
    UNKNOWN_FUNCTION,
    in_language,
)
from retrieval.search.base import plain_line

_PARTIAL_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?$")  # a JSON escape cut in the middle
_NUMBERED_LINE = re.compile(r"^\s*\d+[.)、]\s*(.+?)\s*$")


@dataclass(slots=True)
class Streamed:
    """What one generation produced."""

    generation: Generation
    message: Message | None  # the assistant message to keep in the transcript (None: nothing to keep)
    usage: Usage
    finish_reason: str | None


class _UsageMeter:
    """One generation's tokens: completion tokens as the server counts them where it says (a remote server that
    returns no token ids still reports its usage), else the token ids received."""

    def __init__(self) -> None:
        self.prompt = self.counted = self.cached = 0
        self.reported: int | None = None

    def add(self, delta: Delta) -> None:
        self.counted += len(delta.token_ids)
        self.reported = delta.completion_tokens if delta.completion_tokens is not None else self.reported
        self.prompt = delta.prompt_tokens or self.prompt
        self.cached = delta.num_cached_tokens if delta.num_cached_tokens is not None else self.cached

    def usage(self) -> Usage:
        completion = self.reported if self.reported is not None else self.counted
        return Usage(prompt_tokens=self.prompt, completion_tokens=completion, cached_tokens=self.cached)


async def _deltas(
    ctx: TurnContext, prompt: Prompt, sampling: Sampling, purpose: str, multimodal: MultiModalData | None
):
    # aclosing: when the turn is cancelled, the engine's stream is closed at once, which aborts the request.
    stream = ctx.engine.stream(prompt, sampling, request_id=ctx.next_request_id(purpose), multimodal=multimodal)
    async with contextlib.aclosing(stream) as deltas:
        async for delta in deltas:
            yield delta


async def stream_generation(
    ctx: TurnContext,
    prompt: Prompt,
    sampling: Sampling,
    *,
    resolve: Mapping[int, int],
    sources: Mapping[int, Source],
    multimodal: MultiModalData | None = None,
    forced: bool = False,
    on_first_token: Callable[[], None] = lambda: None,
) -> Streamed:
    """Run one generation and stream its events through ``ctx.emit``.

    ``resolve`` maps the model's context numbers to source numbers, ``sources`` the source numbers
    to sources (for ``citation`` events). ``forced``: the prompt ends with the forced-search prefix.
    Engine errors propagate (the caller turns them into an ``error`` event).
    """
    meter, emit = _UsageMeter(), ctx.emit
    finish: str | None = None
    if forced:
        text = ""
        async for delta in _deltas(ctx, prompt, sampling, "query", multimodal):
            meter.add(delta)
            text += delta.text
            finish = delta.finish_reason or finish
        call = parse_forced_call(text)
        if isinstance(call, FunctionCallError) and finish == "length":
            # The query ran past its token limit: keep what was written (closing the JSON string).
            call = parse_forced_call(_PARTIAL_ESCAPE.sub("", text) + '"}}')
        if isinstance(call, FunctionCallError):
            return Streamed(Generation("call_error", error=call.message), None, meter.usage(), finish)
        return Streamed(
            Generation("call", query=call.arguments["query"]), Message("assistant", "", call.raw), meter.usage(), finish
        )

    parser = StreamParser()
    citations = CitationProcessor(resolve)
    call: FunctionCallEvent | FunctionCallError | None = None
    first = True

    def emit_text(text: str) -> None:
        nonlocal first
        processed = citations.feed(text)
        if processed.text:
            if first:
                first = False
                on_first_token()
            emit(TokenEvent(text=processed.text))
        for n in processed.new_sources:
            emit(CitationEvent(n=n, url=sources[n].url, title=sources[n].title))

    def handle(events: Sequence[object]) -> None:
        nonlocal call
        for event in events:
            if isinstance(event, TextEvent):
                emit_text(event.text)
            elif isinstance(event, FunctionCallStarted):
                emit(StatusEvent(stage="searching", code="search_call", message="Searching…"))
            elif isinstance(event, FunctionCallEvent | FunctionCallError):
                call = event

    async for delta in _deltas(ctx, prompt, sampling, "answer", multimodal):
        meter.add(delta)
        handle(parser.feed(delta.text))
        finish = delta.finish_reason or finish
    handle(parser.close(finish))
    tail = citations.flush()
    if tail.text:
        emit(TokenEvent(text=tail.text))
    for n in tail.new_sources:
        emit(CitationEvent(n=n, url=sources[n].url, title=sources[n].title))

    message = parser.message()
    if call is None:
        generation = Generation("answer", citations.text, tuple(citations.spans), tuple(citations.cited))
        return Streamed(generation, message, meter.usage(), finish)
    if citations.text:
        emit(PreambleEvent(text=citations.text))
    if isinstance(call, FunctionCallEvent):
        return Streamed(
            Generation("call", citations.text, query=call.arguments["query"]), message, meter.usage(), finish
        )
    if call.kind == "unknown_function":
        error = UNKNOWN_FUNCTION.format(name=_called_name(call.raw))
    else:
        error = MALFORMED_CALL.format(error=call.message)
    return Streamed(Generation("call_error", citations.text, error=error), message, meter.usage(), finish)


def _called_name(raw: str) -> str:
    match = re.search(r'"name"\s*:\s*"([^"]*)"', raw)
    return match.group(1) if match else "?"


async def related_questions(
    ctx: TurnContext,
    messages: Sequence[Message],
    language: str,
    *,
    question: str,
    multimodal: MultiModalData | None,
    extra_prompt_tokens: int = 0,
) -> tuple[list[str], Usage]:
    """Up to three follow-up questions from one regex-constrained generation after ``messages``.

    ``messages`` end with the answer. Returns ``[]`` (and no usage) when the prompt does not fit.
    """
    config = ctx.config
    asked = [*messages, Message("user", in_language(RELATED_INSTRUCTION, language))]
    tokens = await ctx.codec.count(asked, add_generation_prompt=True) + extra_prompt_tokens
    if tokens + config.related_tokens > ctx.engine.max_model_len:
        return [], Usage()
    ban = {ctx.codec.function_start_id: -100.0} if ctx.codec.function_start_id is not None else {}
    sampling = Sampling(max_tokens=config.related_tokens, temperature=0.0, regex=RELATED_REGEX, logit_bias=ban)
    meter = _UsageMeter()
    text = ""
    finish: str | None = None
    async for delta in _deltas(ctx, ctx.codec.prompt(asked), sampling, "related", multimodal):
        meter.add(delta)
        text += delta.text
        finish = delta.finish_reason or finish
    lines = text.splitlines()
    if finish == "length" and lines:
        lines.pop()  # cut off mid-question
    questions: list[str] = []
    for line in lines:
        match = _NUMBERED_LINE.match(line)
        candidate = plain_line(match.group(1), RELATED_MAX_CHARS) if match else ""
        if candidate and candidate != question.strip() and candidate not in questions:
            questions.append(candidate)
    return questions[:RELATED_COUNT], meter.usage()
