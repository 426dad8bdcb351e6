"""``POST /v1/chat/completions`` (stream and not) and ``GET /v1/models``: the agent behind OpenAI's API.

The shapes and what is honoured are in ``api/openai_compat.py``. A request is one stateless turn
(the client sends the whole conversation each time, as OpenAI clients do): nothing is stored, and a
client that goes away closes the turn, which aborts the engine request. Errors use OpenAI's shape,
so the official ``openai`` package raises its own exceptions (``BadRequestError``, …).

Streaming: the first chunk carries ``role``, then one chunk per ``token`` event; the final chunk
carries ``finish_reason`` and the ``annotations`` in its delta. Usage comes once, as OpenAI sends it:
with ``stream_options.include_usage``, in a last, choice-less chunk (every other chunk says ``"usage":
null``); without it, not at all. Text the model wrote before deciding to search (a ``preamble``) has
already been streamed and cannot be taken back: a blank line separates it from the answer, and the
annotations' indices count it.

The steps every ``/v1`` turn shares — the model and engine checks (:func:`checked_services`), a turn slot
and the turn itself (:func:`start_turn`), the slot given back when the response ends (:class:`SlotStream`),
the turn closed shielded (:func:`close_turn`), a turn run to its answer (:func:`answer_of`) — are here
for ``api/routes/responses.py`` too; a failed turn's error is ``api/openai_compat.py``'s ``error_of``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from agent import TurnStream
from agent.events import Answer, AnswerEvent, ErrorEvent, Event, PreambleEvent, TokenEvent
from api.engine_state import EngineNotReady
from api.errors import error_responses
from api.logs import MESSAGE_ID
from api.memory import new_id
from api.metrics import Metrics
from api.openai_compat import (
    ChatCompletionRequest,
    OpenAIError,
    TurnRequest,
    annotations,
    chunk,
    completion,
    error_of,
    read_request,
    usage,
)
from api.routes.deps import caller, services, store_errors
from api.sse import FrameStream, data_frame

router = APIRouter(prefix="/v1", tags=["openai"])

SERVICE_MODEL = "megrez-search"
CLOSE_TIMEOUT_S = 5.0  # closing a turn whose client left: the graph cancels its node, the engine aborts


def _models(request: Request) -> list[str]:
    return [SERVICE_MODEL, services(request).engine.model]


@router.get("/models", dependencies=[Depends(caller)], responses=error_responses(401, 429, openai=True))
async def models(request: Request) -> dict:
    """The model names this service answers to (the service itself and the engine's model)."""
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "megrez-search"}
            for m in dict.fromkeys(_models(request))
        ],
    }


def checked_services(request: Request, model: str):
    """The app's services, once ``model`` is one this service answers to (404 otherwise) and the engine is not
    known to be loading or down (503 at once, not a turn that can only fail)."""
    svc = services(request)
    if model not in _models(request):
        raise OpenAIError(
            404, f"the model {model!r} does not exist; see GET /v1/models", param="model", code="model_not_found"
        )
    try:
        svc.engine_state.check()
    except EngineNotReady as exc:
        raise OpenAIError(503, exc.message, type_="server_error", code=exc.code, headers=exc.headers) from None
    return svc


async def start_turn(svc, owner: str, turn_request: TurnRequest, request_id: str) -> tuple[TurnStream, str]:
    """A turn slot of ``owner`` (429 when none is free) and the turn, not started yet; returns (turn, slot).
    The caller gives the slot back (``svc.runner.release_slot``) and closes the turn (:func:`close_turn`)."""
    with store_errors():
        slot = await svc.runner.take_slot(owner)
    MESSAGE_ID.set(request_id)  # this request's logs carry its id
    turn = svc.runner.agent.run(
        turn_request.question,
        history=turn_request.history,
        media=turn_request.media,
        mode=turn_request.mode,
        # OpenAI's shapes have no place for follow-up questions: not generated (nobody would wait for them).
        config=turn_request.config.model_copy(update={"related": False}),
        request_id=request_id,
    )
    return turn, slot


async def close_turn(turn: TurnStream) -> None:
    """Close a turn, also from a request that was cancelled because its client left: without the shield, the
    await would be cancelled at once and the engine request would run on, unseen."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
        await turn.aclose()


async def answer_of(turn: TurnStream, metrics: Metrics, on_event: Callable[[Event], object] = lambda e: None) -> Answer:
    """Run a turn to its answer (the non-streaming responses): each event observed and handed to ``on_event``,
    an ``error`` event raised as :class:`OpenAIError`; the turn is closed whatever happens."""
    try:
        async for event in turn:
            metrics.observe(event)
            on_event(event)
            if isinstance(event, ErrorEvent):
                raise error_of(event)
            if isinstance(event, AnswerEvent):
                return event.answer
    finally:
        await close_turn(turn)
    raise OpenAIError(500, "the turn ended without an answer", type_="server_error")


@router.post("/chat/completions", responses=error_responses(400, 401, 404, 408, 413, 429, 503, openai=True))
async def chat_completions(request: Request, body: ChatCompletionRequest, owner: str = Depends(caller)):
    """An answer with web search and citations, in OpenAI's chat-completions shape."""
    svc = checked_services(request, body.model)
    turn_request = read_request(body, svc.settings.agent, svc.settings.api, svc.engine)
    cid = f"chatcmpl-{new_id()}"
    turn, slot = await start_turn(svc, owner, turn_request, cid)
    release = functools.partial(svc.runner.release_slot, slot)  # synchronous and idempotent
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = _stream(turn, cid, body.model, include_usage, svc.runner.metrics)
        return SlotStream(events, release=release, ping=15)
    try:
        return JSONResponse(completion(cid, body.model, await answer_of(turn, svc.runner.metrics)))
    finally:
        release()


class SlotStream(FrameStream):
    """An SSE response that gives its turn slot back when the response ends — finished, failed, or cancelled
    because the client left — even if the body never started (``release`` is synchronous and idempotent)."""

    def __init__(self, content, *, release: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _stream(turn, cid: str, model: str, include_usage: bool, metrics: Metrics) -> AsyncIterator[bytes]:
    created = int(time.time())
    streamed = ""

    def data(payload: dict) -> bytes:
        return data_frame(json.dumps(payload, ensure_ascii=False))

    def piece(delta: dict, finish: str | None = None) -> dict:
        out = chunk(cid, model, created, delta, finish)
        if include_usage:
            out["usage"] = None  # as OpenAI: null on every chunk but the usage-only one
        return out

    # A text chunk differs from the next only by its text: its JSON is written once, around a placeholder,
    # and each token's chunk is that JSON with the token's text (JSON-encoded) put in.
    hole = "\x00"
    before, after = json.dumps(piece({"content": hole}), ensure_ascii=False).split(json.dumps(hole))

    def text(content: str) -> bytes:
        return data_frame(before + json.dumps(content, ensure_ascii=False) + after)

    metrics.streams.inc()
    try:
        yield data(piece({"role": "assistant", "content": ""}))
        async for event in turn:
            metrics.observe(event)
            if isinstance(event, TokenEvent) and event.text:
                streamed += event.text
                yield text(event.text)
            elif isinstance(event, PreambleEvent) and streamed:
                streamed += "\n\n"
                yield text("\n\n")
            elif isinstance(event, ErrorEvent):
                yield data(error_of(event).body())
                return
            elif isinstance(event, AnswerEvent):
                answer = event.answer
                # The answer is what was streamed after the last preamble: its markers' indices start there.
                offset = len(streamed) - len(answer.answer) if streamed.endswith(answer.answer) else None
                marks = (
                    annotations(answer.answer, answer, offset) if offset is not None else annotations(streamed, answer)
                )
                yield data(piece({"annotations": marks}, "stop"))
                if include_usage:
                    usage_only = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
                    yield data(usage_only | {"choices": [], "usage": usage(answer)})
        yield data_frame("[DONE]")
    finally:
        metrics.streams.dec()
        await close_turn(turn)
