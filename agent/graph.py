"""The turn as a LangGraph ``StateGraph``: question in, a cited and checked answer out.

::

    prepare ─► generate ─┬─► search ─► generate …   (a valid call, while rounds remain)
                         ├─► repair ─► generate     (a malformed call / unknown function: once)
                         ├─► generate               (after a failed repair: a forced search)
                         ├─► finish                 (an answer: cite, check, follow-ups, the answer event)
                         └─► END                    (engine error: an ``error`` event was sent)

* **prepare** builds the prompt: system prompt for the mode (the clock taken once per turn), the
  earlier turns trimmed to fit (``agent/history.py``), the new user message with its media fitted
  by ``prepare_omni_request``. Tokens are counted with the engine's tokenizer. A question that
  cannot fit even alone is refused with an ``error`` event and nothing is sent.
* **generate** streams one generation (``agent/generation.py``). ``auto`` leaves the tool to the
  model; ``always`` prefills the call and constrains the query with a regex on the first round;
  once ``max_rounds`` searches are done (or with ``off``) the ``<|function_start|>`` token is banned
  through ``logit_bias`` — the system prompt stays the same, so the prefix cache still hits — and
  so **every turn ends with an answer**. Where the ban cannot hold (a remote server whose
  ``/tokenize`` does not give the token's id, or one that ignores ``logit_bias``) text before a call
  is the answer; a call with nothing before it is asked once more with the function left out of the
  system prompt (that request misses the prefix cache).
* **search** runs the retriever with the model's query, streams ``query``/``sources``/``page``
  events, and appends the observation (contexts numbered on from earlier rounds).
* **finish** resolves the final answer's citations (already normalised while streaming), scores each
  cited sentence against its passages, asks for follow-up questions (only after a search), and emits
  the ``answer`` event and the turn record. These four steps are one node: they always run in this
  order, and each step of the graph costs LangGraph ≈0.2 ms of CPU, more than most of them.

Nodes are small functions returning state updates; the engine, retriever, support checker and
prompt codec come from the runtime context (:class:`agent.context.TurnContext`), and so does ``emit``,
where they send the turn's events (not LangGraph's stream writer: ``agent/turn.py`` says why).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from agent.citations import cited_claims
from agent.context import Sink, TurnContext
from agent.events import (
    Answer,
    AnswerEvent,
    CitationRef,
    ErrorCode,
    ErrorEvent,
    Note,
    QueryEvent,
    RelatedEvent,
    SourcesEvent,
    StatusEvent,
    Timings,
    TokenEvent,
    TranscriptMessage,
    TurnRecord,
    Usage,
)
from agent.generation import related_questions, stream_generation
from agent.history import trim_history
from agent.prompting import answer_language, media_request, search_reserve
from agent.sources import build_contexts, number_sources, observation_text, passages_by_source
from agent.state import Generation, TurnInput, TurnOutput, TurnState, add_usage
from engine.base import EngineError, EngineUnavailable, Sampling
from engine.omni.errors import MediaError
from engine.protocol import FORCED_SEARCH_REGEX, Message, render_observation, system_prompt
from prompts.agent import EMPTY_ANSWER, in_language
from prompts.search import FUNCTIONS_INTRO
from retrieval.events import PageEvent, RetrievalEvent, SearchEvent, SelectedEvent

log = logging.getLogger(__name__)

BAN = -100.0  # vLLM clamps logit_bias to ±100: enough to make a token impossible in practice
ENGINE_UNAVAILABLE = "The model engine is unavailable right now; try again in a moment."
ENGINE_FAILED = "The model engine could not answer this question."
_THINKING = StatusEvent(stage="thinking", code="thinking", message="Thinking")
_ANSWERING = StatusEvent(stage="answering", code="answering", message="Writing the answer")
_CALLED_ANYWAY = "the model tried to call the search tool when it could not"


def _fail(runtime: Runtime[TurnContext], code: ErrorCode, message: str) -> dict[str, Any]:
    runtime.context.emit(ErrorEvent(code=code, message=message))
    return {"failed": True}


def engine_failure(exc: EngineError) -> ErrorEvent:
    """The error event for an engine that cannot be reached or failed the request: a plain message for
    anyone, the engine's own words (server addresses, library errors) as the operator's ``detail``, logged
    here (the log line carries the turn's message id)."""
    unavailable = isinstance(exc, EngineUnavailable)
    event = ErrorEvent(
        code="engine_unavailable" if unavailable else "engine_error",
        message=ENGINE_UNAVAILABLE if unavailable else ENGINE_FAILED,
        detail=str(exc) or type(exc).__name__,
    )
    log.warning("turn failed (%s): %s", event.code, event.detail)
    return event


def _without_tool(system: Message) -> Message:
    """The system message with the function description left out: ``system_prompt(now, search=False)``
    for the same ``now``."""
    return Message("system", system.content.partition("\n" + FUNCTIONS_INTRO)[0])


def _messages(state: TurnState) -> list[Message]:
    return [state["system"], *state.get("history_messages", []), state["user"], *state.get("turn", [])]


async def prepare(state: TurnState, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """Build the prompt and refuse what cannot fit (see the module docstring)."""
    ctx, config = runtime.context, runtime.context.config
    question, media = state.get("question", ""), list(state.get("media", ()))
    mode = state.get("mode") or config.mode
    if not question.strip() and not media:
        return _fail(runtime, "invalid_request", "the question is empty")
    try:
        language = answer_language(state.get("language"), question)
    except ValueError as exc:
        return _fail(runtime, "invalid_request", str(exc))
    now = ctx.clock()
    system = Message("system", system_prompt(now, search=mode != "off", granularity=config.time_granularity))
    user = Message("user", question, media=tuple(m.kind for m in media))
    max_len, reserve = ctx.engine.max_model_len, config.answer_tokens
    room_for_search = 0 if mode == "off" else await search_reserve(ctx, question, language)
    update: dict[str, Any] = {
        "mode": mode,
        "answer_language": language,
        "system": system,
        "user": user,
        "search_room": room_for_search,
    }
    try:
        request = media_request(ctx, [system, user], media, reserve_tokens=reserve + room_for_search)
    except MediaError as exc:
        return _fail(runtime, "invalid_media", str(exc))
    notes: list[Note] = []
    if request is not None:
        notes += request.pop("notes")
        update |= request
    fixed = await ctx.codec.count([system, user], add_generation_prompt=True) + update.get("media_tokens", 0)
    if fixed + reserve > max_len:
        return _fail(
            runtime,
            "too_long",
            f"the question needs {fixed} prompt tokens plus {reserve} for the answer, but the model's context "
            f"holds {max_len}; shorten the question",
        )
    trimmed = await trim_history(
        state.get("history", ()), max(0, max_len - fixed - reserve - room_for_search), ctx.codec.count
    )
    update["history_messages"] = trimmed.messages
    if trimmed.dropped:
        message = f"history trimmed: {trimmed.dropped} earlier turn(s) left out to fit the context"
        notes.append(Note(code="history_trimmed", message=message, params={"dropped": trimmed.dropped}))
    return update | {"notes": notes}


async def generate(state: TurnState, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """One generation: a forced query, or text that may end in a tool call (see the module docstring)."""
    ctx, config, emit = runtime.context, runtime.context.config, runtime.context.emit
    codec, mode, rounds = ctx.codec, state["mode"], state.get("rounds", 0)
    messages = _messages(state)
    prompt_tokens = await codec.count(messages, add_generation_prompt=True) + state.get("media_tokens", 0)
    room = ctx.engine.max_model_len - prompt_tokens
    if room < 1:
        return _fail(runtime, "too_long", f"the prompt has grown to {prompt_tokens} tokens, the model's context limit")
    # Another search only while rounds remain and its call, observation and the answer still fit.
    tools = (
        mode != "off"
        and not state.get("tools_off")
        and rounds < config.max_rounds
        and room >= config.answer_tokens + state.get("search_room", 0)
    )
    force = tools and (state.get("fallback", False) or (mode == "always" and rounds == 0))
    temperature = config.chat_temperature if mode == "off" else config.search_temperature
    if force:
        stop_ids = (codec.function_end_id,) if codec.function_end_id is not None else ()
        sampling = Sampling(
            max_tokens=max(1, min(config.query_tokens, room)),
            temperature=temperature,
            regex=FORCED_SEARCH_REGEX,
            stop_token_ids=stop_ids,
        )
        emit(StatusEvent(stage="searching", code="writing_query", message="Writing a search query"))
    else:
        ban = {} if tools or codec.function_start_id is None else {codec.function_start_id: BAN}
        sampling = Sampling(
            max_tokens=max(1, min(config.answer_tokens, room)),
            temperature=temperature,
            top_p=config.top_p,
            repetition_penalty=config.repetition_penalty,
            seed=config.seed,
            stop=tuple(config.stop),
            logit_bias=ban,
        )
        emit(_THINKING if rounds == 0 else _ANSWERING)
    first_token: list[float] = []

    def run(prompt_messages: list[Message]):
        return stream_generation(
            ctx,
            codec.prompt(prompt_messages, force_search=force),
            sampling,
            resolve={c.number: c.n for c in state.get("contexts", [])},
            sources={s.n: s for s in state.get("sources", [])},
            multimodal=state.get("multimodal"),
            forced=force,
            on_first_token=lambda: first_token.append(ctx.elapsed_ms()),
        )

    def called(generation: Generation) -> bool:
        # The tool could not be called, yet the model did: the ban did not hold (a remote server that could
        # not tell us the token's id, or one that ignores logit_bias).
        return generation.kind in ("call", "call_error") and not tools and not force

    notes: list[Note] = []
    try:
        out = await run(messages)
        usage = out.usage
        if called(out.generation) and not out.generation.text.strip():
            # Nothing to answer with: ask once more with the function left out of the system prompt. The
            # changed first message costs the prefix cache this once (a working ban keeps it).
            notes.append(Note(code="tool_call_retried", message=f"{_CALLED_ANYWAY}: asked again without the tool"))
            emit(_ANSWERING)
            out = await run([_without_tool(messages[0]), *messages[1:]])
            usage = add_usage(usage, out.usage)
    except EngineError as exc:
        runtime.context.emit(engine_failure(exc))
        return {"failed": True}
    generation = out.generation
    update: dict[str, Any] = {"usage": usage, "fallback": False, "notes": notes}
    if first_token and state.get("first_token_ms") is None:
        update["first_token_ms"] = first_token[0]
    message = out.message
    if called(generation):
        # What came before the call is the answer, and the call is not kept.
        generation = Generation("answer", generation.text)
        message = Message("assistant", generation.text)
        notes.append(Note(code="tool_call_ignored", message=f"{_CALLED_ANYWAY}: its call was ignored"))
    elif generation.kind == "call_error" and (force or state.get("repaired")):
        # Forced query unusable → answer without search; second bad call → force the search.
        update["tools_off" if force else "fallback"] = True
        if force:
            why = f"the search query could not be used ({generation.error}): answered without searching"
            notes.append(Note(code="query_unusable", message=why, params={"error": generation.error}))
        update["generation"] = generation
        return update
    elif generation.kind == "answer" and out.finish_reason == "length":
        cut = sampling.max_tokens
        notes.append(Note(code="answer_cut", message=f"the answer was cut at {cut} tokens", params={"tokens": cut}))
    update["generation"] = generation
    if message is not None:
        update["turn"] = [message]
    return update


async def repair(state: TurnState, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """Tell the model, once, what was wrong with its call (an observation, as the vendor does)."""
    runtime.context.emit(
        StatusEvent(stage="thinking", code="repairing_call", message="The search call was malformed; retrying")
    )
    return {"turn": [Message("observation", state["generation"].error)], "repaired": True}


async def search(state: TurnState, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """Search with the model's query, read and select, then append the observation."""
    ctx, config, emit = runtime.context, runtime.context.config, runtime.context.emit
    query, round_ = state["generation"].query.strip(), state.get("rounds", 0) + 1
    question, language = state["question"], state["answer_language"]
    known = list(state.get("sources", []))
    start = len(state.get("contexts", [])) + 1
    emit(QueryEvent(query=query, round=round_))
    emit(StatusEvent(stage="searching", code="searching", message=f"Searching: {query}", params={"query": query}))
    # The template without contexts: what the observation costs before any passage is added.
    empty = Message("observation", render_observation(question, query, [], language=language))
    used = await ctx.codec.count([*_messages(state), empty], add_generation_prompt=True)
    # While another round is allowed, leave it room for its call, its observation and a least context;
    # otherwise this round's passages would fill the context and the model could never search again.
    next_round = state["search_room"] if round_ < config.max_rounds else 0
    budget = min(
        ctx.retriever.select.budget_tokens,
        ctx.engine.max_model_len - used - state.get("media_tokens", 0) - config.answer_tokens - next_round,
    )
    began, searched_at = time.monotonic(), [time.monotonic()]
    new_sources: list = []

    async def on_event(event: RetrievalEvent) -> None:
        if isinstance(event, SearchEvent):
            searched_at[0] = time.monotonic()
            new_sources.extend(number_sources(event.results, known, round=round_))
            emit(
                SourcesEvent(
                    round=round_,
                    sources=new_sources,
                    backend=event.backend,
                    cached=event.cached,
                    failures=event.failures,
                )
            )
            if pages := len(event.results):
                reading = f"Reading {pages} pages"
                emit(StatusEvent(stage="reading", code="reading", message=reading, params={"pages": pages}))
        elif isinstance(event, PageEvent):
            emit(event)
        elif isinstance(event, SelectedEvent):
            emit(
                StatusEvent(
                    stage="reading",
                    code="selected",
                    message=f"Using {event.passages} passages from {event.pages} pages",
                    params={"passages": event.passages, "pages": event.pages},
                )
            )

    notes: list[Note] = []
    update: dict[str, Any] = {"rounds": round_, "queries": [query]}
    try:
        found = await ctx.retriever.retrieve(
            question or query,
            query=query,
            budget_tokens=max(1, budget),
            count_tokens=ctx.codec.count_text(),
            on_event=on_event,
            today=ctx.clock().date(),
        )
    except Exception:  # retrieval reports expected failures as data; anything else must not kill the turn
        log.exception("retrieval failed for %r", query)
        found = None  # the detail is in the log
        notes.append(Note(code="search_failed", message="search failed: answered without sources"))
        update["tools_off"] = True
    ended = time.monotonic()
    contexts = build_contexts(found.passages, known + new_sources, start=start) if found is not None else []
    if found is not None and not found.outcome.results:
        reasons = "; ".join(f"{b}: {r}" for b, r in found.outcome.failures)
        message = (
            f"search found nothing for {query!r}" + (f" ({reasons})" if reasons else "") + ": answered without sources"
        )
        notes.append(Note(code="search_empty", message=message, params={"query": query, "reasons": reasons}))
        if found.outcome.backend is None and found.outcome.failures:
            update["tools_off"] = True  # every backend is down: do not let the model try again
    elif found is not None and not contexts:
        message = "no usable text in the search results (or no room left for it): answered without sources"
        notes.append(Note(code="no_usable_text", message=message))
    elif found is not None and found.pages and all(p.source == "snippet" for p in found.pages):
        notes.append(Note(code="pages_failed", message="all pages failed: answered from snippets"))
    update |= {
        "turn": [Message("observation", observation_text(question, query, contexts, language=language))],
        "contexts": contexts,
        "sources": new_sources,
        "notes": notes,
        "search_ms": round((searched_at[0] - began) * 1000, 1),
        "read_ms": round((ended - searched_at[0]) * 1000, 1),
    }
    return update


def _cited(state: TurnState, emit: Sink) -> tuple[str, list[CitationRef], list[Note]]:
    """The answer text and the sources it cites (first-citation order), with the passages shown; a fixed apology
    (streamed) when the model wrote nothing."""
    generation = state["generation"]
    if not generation.text.strip():
        text = in_language(EMPTY_ANSWER, state["answer_language"])
        emit(TokenEvent(text=text))
        return text, [], [Note(code="empty_answer", message="the model wrote no answer")]
    by_n = {s.n: s for s in state.get("sources", [])}
    passages = passages_by_source(state.get("contexts", []))
    citations = [
        CitationRef(n=n, url=by_n[n].url, title=by_n[n].title, passage=passages.get(n, by_n[n].snippet))
        for n in generation.cited
    ]
    return generation.text, citations, []


def _checked(state: TurnState, ctx: TurnContext, text: str, citations: list[CitationRef]) -> list[CitationRef]:
    """Score every cited sentence against its cited passages; a citation keeps its weakest score."""
    if not citations:
        return citations
    ctx.emit(StatusEvent(stage="checking", code="checking", message="Checking citations"))
    passages = {c.n: c.passage for c in citations}
    worst: dict[int, tuple[bool, float]] = {}
    for claim in cited_claims(text, state["generation"].spans):
        cited = [passages[n] for n in claim.sources if n in passages]
        if not claim.text or not cited:
            continue
        result = ctx.support.check(claim.text, cited, question=state["question"])
        for n in claim.sources:
            if n not in worst or result.score < worst[n][1]:
                worst[n] = (result.supported, result.score)
    return [
        c.model_copy(update={"supported": worst[c.n][0], "score": round(worst[c.n][1], 4)}) if c.n in worst else c
        for c in citations
    ]


async def _related(state: TurnState, ctx: TurnContext) -> tuple[list[str], Usage | None, list[Note]]:
    """Follow-up questions after an answer that searched (not for small talk or plain chat), with their usage."""
    if not (ctx.config.related and state.get("rounds", 0) and state["generation"].text.strip()):
        return [], None, []
    ctx.emit(StatusEvent(stage="related", code="related", message="Suggesting follow-up questions"))
    try:
        questions, usage = await related_questions(
            ctx,
            _messages(state),
            state["answer_language"],
            question=state["question"],
            multimodal=state.get("multimodal"),
            extra_prompt_tokens=state.get("media_tokens", 0),
        )
    except EngineError as exc:  # notes reach every visitor: the engine's own text (addresses) goes to the log
        log.warning("no follow-up questions: %s", exc)
        return [], None, [Note(code="no_related", message="no follow-up questions: the model engine failed")]
    if questions:
        ctx.emit(RelatedEvent(questions=questions))
    return questions, usage, []


async def finish(state: TurnState, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """Cite, check, ask for follow-ups, then the structured answer (streamed as the last event) and the record
    memory keeps (one node, not four: the module docstring says why)."""
    ctx = runtime.context
    text, citations, notes = _cited(state, ctx.emit)
    citations = _checked(state, ctx, text, citations)
    questions, usage, related_notes = await _related(state, ctx)
    answer = Answer(
        answer=text,
        citations=citations,
        sources=state.get("sources", []),
        queries=state.get("queries", []),
        searched=state.get("rounds", 0) > 0,
        rounds=state.get("rounds", 0),
        mode=state["mode"],
        language=state["answer_language"],
        related=questions,
        usage=add_usage(state.get("usage"), usage),
        timings=Timings(
            search_ms=state.get("search_ms") if state.get("rounds") else None,
            read_ms=state.get("read_ms") if state.get("rounds") else None,
            first_token_ms=state.get("first_token_ms"),
            total_ms=ctx.elapsed_ms(),
        ),
        notes=[*state.get("notes", []), *notes, *related_notes],
    )
    record = TurnRecord(
        question=state["question"],
        media=state.get("media_refs", []),
        transcript=[
            TranscriptMessage(role=m.role, content=m.content, function_call=m.function_call)  # type: ignore[arg-type]
            for m in state.get("turn", [])
        ],
        answer=answer,
    )
    ctx.emit(AnswerEvent(answer=answer))
    return {"answer": answer, "record": record}


async def after_prepare(state: TurnState) -> Literal["generate", "__end__"]:
    return END if state.get("failed") else "generate"


async def after_generate(state: TurnState) -> Literal["search", "repair", "generate", "finish", "__end__"]:
    if state.get("failed"):
        return END
    kind = state["generation"].kind
    if kind == "call":
        return "search"
    if kind == "call_error":
        return "generate" if state.get("fallback") or state.get("tools_off") else "repair"
    return "finish"


def build_graph() -> CompiledStateGraph:
    """The whole turn, wired in one place."""
    graph = StateGraph(TurnState, context_schema=TurnContext, input_schema=TurnInput, output_schema=TurnOutput)
    for node in (prepare, generate, repair, search, finish):
        graph.add_node(node.__name__, node)
    graph.add_edge(START, "prepare")
    graph.add_conditional_edges("prepare", after_prepare)
    graph.add_conditional_edges("generate", after_generate)
    graph.add_edge("repair", "generate")
    graph.add_edge("search", "generate")
    graph.add_edge("finish", END)
    return graph.compile()
