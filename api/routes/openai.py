"""``POST /v1/chat/completions`` (stream and not) and ``GET /v1/models``: the agent behind OpenAI's API.

The shapes and what is honoured are in ``api/openai_compat.py``. A request is one stateless turn
(the client sends the whole conversation each time, as OpenAI clients do): nothing is stored, and a
client that goes away closes the turn, which aborts the engine request. Errors use OpenAI's shape,
so the official ``openai`` package raises its own exceptions (``BadRequestError``, …).

Streaming: the first chunk carries ``role``, then one chunk per ``token`` event; the final chunk
carries ``finish_reason``, the ``annotations`` in its delta and ``usage`` (also in a separate
usage-only chunk when ``stream_options.include_usage`` is set, as OpenAI does). Text the model wrote
before deciding to search (a ``preamble``) has already been streamed and cannot be taken back: a blank
line separates it from the answer, and the annotations' indices count it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from agent.events import AnswerEvent, ErrorEvent, PreambleEvent, TokenEvent
from api.engine_state import EngineNotReady
from api.errors import error_responses
from api.logs import MESSAGE_ID
from api.memory import new_id
from api.metrics import Metrics
from api.openai_compat import (
    ChatCompletionRequest,
    OpenAIError,
    annotations,
    chunk,
    completion,
    read_request,
    usage,
)
from api.routes.deps import caller, services, store_errors

router = APIRouter(prefix="/v1", tags=["openai"])

_ERROR_STATUS = {"invalid_request": 400, "too_long": 400, "invalid_media": 400, "engine_unavailable": 503}
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


def _error_of(event: ErrorEvent) -> OpenAIError:
    status = _ERROR_STATUS.get(event.code, 500)
    return OpenAIError(
        status, event.message, type_="invalid_request_error" if status < 500 else "server_error", code=event.code
    )


@router.post("/chat/completions", responses=error_responses(400, 401, 404, 408, 413, 429, 503, openai=True))
async def chat_completions(request: Request, body: ChatCompletionRequest, owner: str = Depends(caller)):
    """An answer with web search and citations, in OpenAI's chat-completions shape."""
    svc = services(request)
    if body.model not in _models(request):
        raise OpenAIError(
            404, f"the model {body.model!r} does not exist; see GET /v1/models", param="model", code="model_not_found"
        )
    try:
        svc.engine_state.check()  # loading or known down: 503 at once, not a turn that can only fail
    except EngineNotReady as exc:
        raise OpenAIError(503, exc.message, type_="server_error", code=exc.code, headers=exc.headers) from None
    turn_request = read_request(body, svc.settings.agent, svc.settings.api, svc.engine)
    with store_errors():  # no free turn slot: 429
        slot = await svc.runner.take_slot(owner)
    cid, metrics = f"chatcmpl-{new_id()}", svc.runner.metrics
    MESSAGE_ID.set(cid)  # this request's logs carry the completion id
    turn = svc.runner.agent.run(
        turn_request.question,
        history=turn_request.history,
        media=turn_request.media,
        mode=turn_request.mode,
        # OpenAI's shape has no place for follow-up questions: not generated (nobody would wait for them).
        config=turn_request.config.model_copy(update={"related": False}),
        request_id=cid,
    )
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = _stream(turn, cid, body.model, include_usage, metrics)
        return _SlotStream(events, release=lambda: svc.runner.release_slot(slot), ping=15)
    try:
        async with contextlib.aclosing(turn):  # closed here, not by the garbage collector mid-iteration
            async for event in turn:
                metrics.observe(event)
                if isinstance(event, ErrorEvent):
                    raise _error_of(event)
                if isinstance(event, AnswerEvent):
                    return JSONResponse(completion(cid, body.model, event.answer))
    finally:
        svc.runner.release_slot(slot)
    raise OpenAIError(500, "the turn ended without an answer", type_="server_error")


class _SlotStream(EventSourceResponse):
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


async def _stream(turn, cid: str, model: str, include_usage: bool, metrics: Metrics) -> AsyncIterator[dict]:
    created = int(time.time())
    streamed = ""

    def data(payload: dict) -> dict:
        return {"data": json.dumps(payload, ensure_ascii=False)}

    metrics.streams.inc()
    try:
        yield data(chunk(cid, model, created, {"role": "assistant", "content": ""}))
        async for event in turn:
            metrics.observe(event)
            if isinstance(event, TokenEvent) and event.text:
                streamed += event.text
                yield data(chunk(cid, model, created, {"content": event.text}))
            elif isinstance(event, PreambleEvent) and streamed:
                streamed += "\n\n"
                yield data(chunk(cid, model, created, {"content": "\n\n"}))
            elif isinstance(event, ErrorEvent):
                yield data(_error_of(event).body())
                return
            elif isinstance(event, AnswerEvent):
                answer = event.answer
                # The answer is what was streamed after the last preamble: its markers' indices start there.
                offset = len(streamed) - len(answer.answer) if streamed.endswith(answer.answer) else None
                marks = (
                    annotations(answer.answer, answer, offset) if offset is not None else annotations(streamed, answer)
                )
                final = chunk(cid, model, created, {"annotations": marks}, "stop")
                final["usage"] = usage(answer)
                yield data(final)
                if include_usage:
                    usage_only = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
                    yield data(usage_only | {"choices": [], "usage": usage(answer)})
        yield {"data": "[DONE]"}
    finally:
        metrics.streams.dec()
        # A client that went away cancelled this generator: without the shield, the await below would be
        # cancelled at once and the engine request would run on, unseen.
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
            await turn.aclose()
