"""``POST /chat`` (SSE or JSON), ``GET /chat/{message_id}/events`` (resume), ``POST /chat/{message_id}/stop``.

Every response reads the message's event stream in memory (see ``api/turns.py``): the live stream, a
resumed one (``Last-Event-ID`` header or ``last_event_id`` query) and the JSON answer are the same
events. SSE: ``event:`` is the event's type, ``data:`` its JSON, ``id:`` the stream id; ``meta`` comes
first, ``done`` last, a comment every 15 s keeps idle proxies from closing the connection. A stored event's
frame is encoded once and the same bytes go to each of its followers (``api/sse.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from agent.state import MediaItem
from api.config import ApiConfig
from api.engine_state import EngineNotReady
from api.errors import error_responses
from api.media import MediaRejected, check_media, decode_base64
from api.memory import DONE, StoredEvent, event_id_key
from api.routes.deps import caller, owned_conversation, services, store_errors
from api.schemas import ChatRequest, ChatResponse, MetaEvent
from api.sse import FrameStream, frame
from engine.base import Engine

router = APIRouter(tags=["chat"])

STOP_WAIT_S = 10.0  # how long a stop asked here waits for the replica that runs the turn
_MODES = {"off": "off", "auto": "auto", "always": "always", "true": "auto", "false": "off"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def _mode(websearch: str) -> str:
    """The search mode ``websearch`` names (any case, spaces around); a 422 like FastAPI's own otherwise."""
    mode = _MODES.get(websearch.strip().lower())
    if mode is None:
        error = {"type": "enum", "loc": ("query", "websearch"), "msg": "websearch must be one of " + ", ".join(_MODES)}
        raise RequestValidationError([error])
    return mode


async def _sse(svc, cid: str, mid: str, after: str | None) -> AsyncIterator[bytes]:
    """The message's events as SSE frames, ``meta`` first unless resuming; always ends with ``done``
    (:meth:`api.turns.TurnRunner.follow`). A frame without ``id`` (made up here) leaves the client's
    ``Last-Event-ID`` at the last real event. Each stored event's frame is encoded once, for every follower."""
    streams = svc.runner.metrics.streams
    streams.inc()
    try:
        if after is None:
            yield frame("meta", MetaEvent(conversation_id=cid, message_id=mid).model_dump_json(), "0-0")
        key_holder = svc.access.keys_required
        async for event in svc.runner.follow(mid, after):
            data = _shown(event, key_holder)
            yield event.frame if data is event.data else frame(event.type, data, event.id)
    finally:
        streams.dec()


def _shown(event: StoredEvent, key_holder: bool) -> str:
    """An event's JSON as this caller may see it (``event.data`` itself when unchanged): an error's ``detail``
    (library text, internal addresses) only for key holders; visitors of a keyless service get the plain
    message (the detail is in the log)."""
    if key_holder or event.type != "error" or '"detail"' not in event.data:
        return event.data
    error = json.loads(event.data)
    error.pop("detail", None)
    return json.dumps(error, ensure_ascii=False)


async def _read_request(request: Request, limits: ApiConfig, engine: Engine) -> tuple[ChatRequest, list[MediaItem]]:
    """The request from a JSON body or a multipart form, with its media checked against the limits and
    what the loaded model reads (clear 4xx otherwise). The body's size and read time are bounded while it is
    read (``api/http_guard.py``); a validation error is FastAPI's 422, without the input it rejected."""
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=limits.max_images + limits.max_audio + 1)
            fields = {k: form[k] for k in ("message", "conversation_id", "language") if isinstance(form.get(k), str)}
            body = ChatRequest.model_validate(fields)
            images = [await _form_media(v, f"images[{i}]") for i, v in enumerate(form.getlist("images"))]
            audio = [await _form_media(v, f"audio[{i}]") for i, v in enumerate(form.getlist("audio"))]
        else:
            body = ChatRequest.model_validate_json(await request.body())
            images = [decode_base64(v, f"images[{i}]") for i, v in enumerate(body.images)]
            audio = [decode_base64(v, f"audio[{i}]") for i, v in enumerate(body.audio)]
        if len(body.message) > limits.max_message_chars:
            raise HTTPException(
                413, f"the message has {len(body.message)} characters; at most {limits.max_message_chars}"
            )
        return body, check_media(images, audio, limits, engine)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None
    except MediaRejected as exc:
        raise HTTPException(400, str(exc)) from None


async def _form_media(value: UploadFile | str, name: str) -> bytes:
    """A form's media item: a file part, or a text part holding base64 or a data URL (as in a JSON body)."""
    return decode_base64(value, name) if isinstance(value, str) else await value.read()


@router.post(
    "/chat",
    response_model=ChatResponse,
    responses=error_responses(400, 401, 404, 408, 409, 413, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ChatRequest.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["message"],
                        "properties": {
                            "message": {"type": "string", "minLength": 1},
                            "conversation_id": {"type": "string"},
                            "language": {"type": "string"},
                            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "audio": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        },
                    }
                },
            },
        },
    },
)
async def chat(
    request: Request,
    websearch: str = Query(
        "auto",
        description="off, auto (the model decides), always; true = auto, false = off",
        json_schema_extra={"enum": list(_MODES)},  # read in any case; these are the values
    ),
    stream: bool | None = Query(None, description="SSE instead of JSON (also chosen by Accept: text/event-stream)"),
    owner: str = Depends(caller),
):
    """Ask a question: streams the agent's events as SSE, or waits and returns the structured answer."""
    mode = _mode(websearch)
    svc = services(request)
    try:
        svc.engine_state.check()  # loading or known down: 503 at once, not a turn that can only fail
    except EngineNotReady as exc:
        raise HTTPException(503, exc.message, headers=exc.headers) from None
    body, media = await _read_request(request, svc.settings.api, svc.engine)
    with store_errors():
        conversation, history = None, []
        if body.conversation_id:
            conversation = await owned_conversation(request, body.conversation_id, owner)
            history = [t.record for t in await svc.memory.turns(conversation.id) if t.status == "done"]
        for item in media:
            await svc.memory.put_media(item.data)  # stored once by content hash; the record keeps the hash
        conversation, mid = await svc.runner.start(
            conversation,
            body.message,
            history=history,
            media=media,
            mode=mode,
            language=body.language,
            owner=owner,
        )
    if stream or (stream is None and "text/event-stream" in request.headers.get("accept", "")):
        return FrameStream(_sse(svc, conversation.id, mid, None), ping=15, headers=SSE_HEADERS)
    answer = error = None
    status = "running"
    async for event in svc.runner.follow(mid):
        if event.type == "answer":
            answer = json.loads(event.data)["answer"]
        elif event.type == "error":
            error = json.loads(_shown(event, svc.access.keys_required))
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


@router.get("/chat/{message_id}/events", responses=error_responses(400, 401, 404, 429, 503))
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
    return FrameStream(_sse(svc, known[0], message_id, after), ping=15, headers=SSE_HEADERS)


@router.post("/chat/{message_id}/stop", responses=error_responses(401, 404, 429, 503, 504))
async def stop(message_id: str, request: Request, owner: str = Depends(caller)) -> dict[str, str]:
    """Stop a running turn (the engine request is aborted; the partial answer is saved as stopped), on
    whichever replica runs it."""
    svc = services(request)
    with store_errors():
        known = await _owned_message(request, message_id, owner)
        status = known[1]
        if status == "running":
            status = await svc.runner.stop_anywhere(message_id, STOP_WAIT_S) or "failed"
    if status == "running":
        raise HTTPException(504, f"the turn did not stop within {STOP_WAIT_S:g} s; the replica running it is busy")
    return {"message_id": message_id, "status": status}
