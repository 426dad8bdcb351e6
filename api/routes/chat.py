"""``POST /chat`` (SSE or JSON), ``GET /chat/{message_id}/events`` (resume), ``POST /chat/{message_id}/stop``.

Every response reads the message's event stream in memory (see ``api/turns.py``): the live stream, a
resumed one (``Last-Event-ID`` header or ``last_event_id`` query) and the JSON answer are the same
events. SSE: ``event:`` is the event's type, ``data:`` its JSON, ``id:`` the stream id; ``meta`` comes
first, ``done`` last, a comment every 15 s keeps idle proxies from closing the connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from prometheus_client import Gauge
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from agent.state import MediaItem
from api.config import ApiConfig
from api.media import MediaRejected, check_media, decode_base64
from api.memory import DONE, Memory, event_id_key
from api.routes.deps import caller, owned_conversation, services, store_errors
from api.schemas import ChatRequest, ChatResponse, MetaEvent
from engine.base import Engine

router = APIRouter(tags=["chat"])

STOP_WAIT_S = 10.0  # how long a stop asked here waits for the replica that runs the turn
_MODES = {"off": "off", "auto": "auto", "always": "always", "true": "auto", "false": "off"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def _mode(websearch: str) -> str:
    mode = _MODES.get(websearch.strip().lower())
    if mode is None:
        raise HTTPException(422, f"websearch must be one of off, auto, always, true, false (got {websearch!r})")
    return mode


async def _sse(memory: Memory, cid: str, mid: str, after: str | None, streams: Gauge) -> AsyncIterator[dict]:
    streams.inc()
    try:
        if after is None:
            meta = MetaEvent(conversation_id=cid, message_id=mid).model_dump_json()
            yield {"event": "meta", "id": "0-0", "data": meta}
        async for event in memory.events(mid, after):
            yield {"event": event.type, "id": event.id, "data": event.data}
    finally:
        streams.dec()


async def _read_request(request: Request, limits: ApiConfig, engine: Engine) -> tuple[ChatRequest, list[MediaItem]]:
    """The request from a JSON body or a multipart form, with its media checked against the limits and
    what the loaded model reads (clear 4xx otherwise)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_body_bytes:
        raise HTTPException(413, f"the request is {length} bytes; at most {limits.max_body_bytes} are accepted")
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=limits.max_images + limits.max_audio + 1)
            fields = {k: form[k] for k in ("message", "conversation_id", "language") if isinstance(form.get(k), str)}
            body = ChatRequest.model_validate(fields)
            images = [await f.read() for f in form.getlist("images") if not isinstance(f, str)]
            audio = [await f.read() for f in form.getlist("audio") if not isinstance(f, str)]
        else:
            raw = await request.body()
            if len(raw) > limits.max_body_bytes:
                raise HTTPException(
                    413, f"the request is {len(raw)} bytes; at most {limits.max_body_bytes} are accepted"
                )
            body = ChatRequest.model_validate_json(raw)
            images = [decode_base64(v, f"images[{i}]") for i, v in enumerate(body.images)]
            audio = [decode_base64(v, f"audio[{i}]") for i, v in enumerate(body.audio)]
        if len(body.message) > limits.max_message_chars:
            raise HTTPException(
                413, f"the message has {len(body.message)} characters; at most {limits.max_message_chars}"
            )
        return body, check_media(images, audio, limits, engine)
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False, include_context=False)) from None
    except MediaRejected as exc:
        raise HTTPException(400, str(exc)) from None


@router.post(
    "/chat",
    response_model=ChatResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ChatRequest.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "description": "message, conversation_id, language; files: images, audio",
                    }
                },
            },
        },
    },
)
async def chat(
    request: Request,
    websearch: str = Query("auto", description="off, auto (the model decides), always; true = auto, false = off"),
    stream: bool | None = Query(None, description="SSE instead of JSON (also chosen by Accept: text/event-stream)"),
    owner: str = Depends(caller),
):
    """Ask a question: streams the agent's events as SSE, or waits and returns the structured answer."""
    mode = _mode(websearch)
    svc = services(request)
    if svc.engine_error:
        raise HTTPException(503, f"the model engine failed to start: {svc.engine_error}")
    if not svc.engine_ready.is_set():
        raise HTTPException(503, "engine loading")
    body, media = await _read_request(request, svc.settings.api, svc.engine)
    with store_errors():
        if body.conversation_id:
            conversation = await owned_conversation(request, body.conversation_id, owner)
            history = [t.record for t in await svc.memory.turns(conversation.id) if t.status == "done"]
        else:
            conversation, history = await svc.memory.create_conversation(body.message, owner), []
        for item in media:
            await svc.memory.put_media(item.data)  # stored once by content hash; the record keeps the hash
        mid = await svc.runner.start(
            conversation.id,
            body.message,
            history=history,
            media=media,
            mode=mode,
            language=body.language,
            owner=owner,
        )
    if stream or (stream is None and "text/event-stream" in request.headers.get("accept", "")):
        return EventSourceResponse(
            _sse(svc.memory, conversation.id, mid, None, svc.runner.metrics.streams), ping=15, headers=SSE_HEADERS
        )
    answer = error = None
    status = "running"
    with store_errors():
        async for event in svc.memory.events(mid):
            if event.type == "answer":
                answer = json.loads(event.data)["answer"]
            elif event.type == "error":
                error = json.loads(event.data)
            elif event.type == DONE:
                status = json.loads(event.data)["status"]
    return ChatResponse(conversation_id=conversation.id, message_id=mid, status=status, answer=answer, error=error)


async def _owned_message(request: Request, message_id: str, owner: str):
    """The message's (conversation id, status) if its conversation is the owner's; 404 otherwise."""
    known = await services(request).memory.message_status(message_id)
    if known is not None:
        conversation = await services(request).memory.get_conversation(known[0])
        if conversation is not None and conversation.owner == owner:
            return known
    raise HTTPException(404, f"unknown or expired message {message_id}")


@router.get("/chat/{message_id}/events")
async def resume(
    message_id: str,
    request: Request,
    last_event_id: str | None = Query(None, description="Replay what came after this id (or the Last-Event-ID header)"),
    last_event_header: str | None = Header(None, alias="Last-Event-ID"),
    owner: str = Depends(caller),
):
    """The message's events after the given id, then live until it ends."""
    svc = services(request)
    with store_errors():
        known = await _owned_message(request, message_id, owner)
    after = last_event_header or last_event_id
    if after is not None:
        try:
            event_id_key(after)
        except ValueError as exc:
            raise HTTPException(400, f"Last-Event-ID: {exc}") from None
    return EventSourceResponse(
        _sse(svc.memory, known[0], message_id, after, svc.runner.metrics.streams), ping=15, headers=SSE_HEADERS
    )


@router.post("/chat/{message_id}/stop")
async def stop(message_id: str, request: Request, owner: str = Depends(caller)) -> dict[str, str]:
    """Stop a running turn (the engine request is aborted; the partial answer is saved as stopped), on
    whichever replica runs it."""
    svc = services(request)
    with store_errors():
        known = await _owned_message(request, message_id, owner)
        if known[1] == "running" and not await svc.runner.stop(message_id):
            await svc.memory.request_stop(message_id)  # another replica runs it: it hears this and stops
            deadline = asyncio.get_running_loop().time() + STOP_WAIT_S
            while (known := await svc.memory.message_status(message_id) or known)[1] == "running":
                if asyncio.get_running_loop().time() > deadline:
                    raise HTTPException(
                        504, f"the turn did not stop within {STOP_WAIT_S:g} s; the replica running it may be down"
                    )
                await asyncio.sleep(0.05)
        status = (await svc.memory.message_status(message_id) or known)[1]
    return {"message_id": message_id, "status": status}
