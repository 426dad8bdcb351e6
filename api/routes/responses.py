"""``POST /v1/responses`` (stream and not): the agent behind OpenAI's Responses API.

What is read from the request is in ``api/responses_compat.py``, how a turn becomes the response in
``api/responses_stream.py``. As with chat completions (``api/routes/openai.py``, whose steps this route
shares): one stateless turn per request (nothing is stored), no follow-up questions, a turn slot given back
on every path, a turn closed shielded when its client leaves, errors in OpenAI's shape — an HTTP error before
the turn, or when not streaming; ``error`` and ``response.failed`` events once a stream has begun.

Streaming: server-sent events named after their ``type``, each one's data that event as JSON; the stream
ends after ``response.completed`` (or ``response.failed``), with no ``[DONE]``, as OpenAI's does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from agent import TurnStream
from agent.events import AnswerEvent, ErrorEvent
from api.errors import error_responses, sse_event
from api.memory import new_id
from api.metrics import Metrics
from api.responses_compat import ResponseRequest, echoed_tools, read_response_request
from api.responses_stream import ResponseWriter
from api.routes.deps import caller
from api.routes.openai import SlotStream, answer_of, checked_services, close_turn, start_turn
from api.sse import frame

router = APIRouter(prefix="/v1", tags=["openai"])

_STREAM = {
    "text/event-stream": {
        "schema": sse_event(
            {"contentMediaType": "application/json", "description": "a Responses API event (type, sequence_number, …)"}
        )
    }
}


@router.post(
    "/responses",
    responses={200: {"content": _STREAM}} | error_responses(400, 401, 404, 408, 413, 429, 503, openai=True),
)
async def responses(request: Request, body: ResponseRequest, owner: str = Depends(caller)):
    """An answer with web search and citations, in OpenAI's Responses shape (``client.responses.create``)."""
    svc = checked_services(request, body.model)
    turn_request = read_response_request(body, svc.settings.agent, svc.settings.api, svc.engine)
    rid = f"resp_{new_id()}"
    turn, slot = await start_turn(svc, owner, turn_request, rid)
    release = functools.partial(svc.runner.release_slot, slot)  # synchronous and idempotent
    tools, tool_choice = echoed_tools(body)
    echo = {
        "tools": tools,
        "tool_choice": tool_choice,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
    }
    writer = ResponseWriter(rid, body.model, echo)
    if body.stream:
        return SlotStream(_stream(turn, writer, svc.runner.metrics), release=release, ping=15)
    try:
        await answer_of(turn, svc.runner.metrics, on_event=writer.feed)
    finally:
        release()
    return JSONResponse(writer.response)


async def _stream(turn: TurnStream, writer: ResponseWriter, metrics: Metrics) -> AsyncIterator[bytes]:
    def frames(events: list[dict]) -> list[bytes]:
        return [frame(e["type"], json.dumps(e, ensure_ascii=False)) for e in events]

    metrics.streams.inc()
    try:
        for start in frames(writer.start()):
            yield start
        async for event in turn:
            metrics.observe(event)
            for out in frames(writer.feed(event)):
                yield out
            if isinstance(event, AnswerEvent | ErrorEvent):
                return
    finally:
        metrics.streams.dec()
        await close_turn(turn)
