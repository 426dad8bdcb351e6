"""Error answers of the HTTP API: one shape per audience, always serialisable, declared in the OpenAPI document.

Shapes: under ``/v1/`` OpenAI's (``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients
raise their own exceptions); elsewhere FastAPI's (``{"detail": "..."}``, or for a 422 ``{"detail":
[{"type", "loc", "msg", "ctx"?}]}``). :func:`error_response` picks by path; the app's exception handlers
(``api/app.py``) and the body guard (``api/http_guard.py``) use it.

Serialisable: a client's input must never break the answer about it. :func:`validation_detail` leaves
out the rejected ``input`` (it can be raw bytes, NaN or a lone surrogate, none of which JSON in UTF-8
can carry, and echoing a 25 MB body back helps no one) and :func:`safe_text` makes any text encodable.

Declared: :func:`error_responses` is what a route's decorator passes as ``responses=``, so the
document lists every status an operation can answer, with its body and headers (``WWW-Authenticate``
on 401, ``Retry-After`` on 429).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.routing import Match
from starlette.types import Scope

from api.openai_compat import error_body

OPENAI_PREFIX = "/v1/"

_MEANING = {
    400: "A request the service cannot serve (bad media, a malformed Last-Event-ID, …); the message says why.",
    401: "No API key, or a wrong one.",
    404: "No such conversation, message or model (another key's look the same).",
    408: "The request body stopped arriving (MEGREZ_API__BODY_TIMEOUT_S).",
    409: "The conversation is busy with another turn.",
    413: "The body or the question is over its limit (MEGREZ_API__MAX_BODY_BYTES, MEGREZ_API__MAX_MESSAGE_CHARS).",
    422: "A parameter or field of the wrong type or value.",
    429: "Over the rate limit, the concurrent turns, or the wrong keys of this address.",
    503: "The engine is loading or failed to start, or the conversation memory is unreachable.",
    504: "The replica running the turn did not confirm the stop in time.",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": 'Bearer realm="megrez-search"', "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}},
}


class ErrorDetail(BaseModel):
    """FastAPI's error body."""

    detail: str


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error body."""

    error: OpenAIErrorInfo


def error_responses(*codes: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """A route decorator's ``responses=`` for the error statuses it may answer.

    :param codes: the statuses (keys of the table above; 422 keeps FastAPI's own validation schema).
    :param openai: the route answers in OpenAI's shape (a ``/v1/`` route).
    """
    declared: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        spec: dict[str, Any] = {"description": _MEANING[code]}
        if code != 422 or openai:
            spec["model"] = OpenAIErrorBody if openai else ErrorDetail
        if code in _HEADERS:
            spec["headers"] = _HEADERS[code]
        declared[code] = spec
    return declared


def error_response(path: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in the shape the route's clients expect: OpenAI's under ``/v1/``, FastAPI's elsewhere."""
    message = safe_text(message)
    body = error_body(status, message) if path.startswith(OPENAI_PREFIX) else {"detail": message}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def allowed_methods(routes: Iterable[Any], scope: Scope) -> str:
    """The ``Allow`` header of a 405: the methods of *every* route at the request's path (Starlette names only
    the first route's, and FastAPI makes one route per method).

    :param routes: the app's routes; ``scope``: the refused request's.
    """
    methods: set[str] = set()
    for route in routes:
        if getattr(route, "methods", None) and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def safe_text(value: object) -> str:
    """``value`` as text that JSON in UTF-8 can carry (a lone surrogate from a ``\\ud800`` escape becomes ``?``)."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def validation_detail(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic or FastAPI validation errors as FastAPI's ``detail`` items, always JSON-serialisable.

    :param errors: ``ValidationError.errors()`` or ``RequestValidationError.errors()``.
    """
    detail = []
    for error in errors:
        item: dict[str, Any] = {
            "type": safe_text(error.get("type", "value_error")),
            "loc": [part if isinstance(part, int) else safe_text(part) for part in error.get("loc", ())],
            "msg": safe_text(error.get("msg", "invalid value")),
        }
        if ctx := error.get("ctx"):
            item["ctx"] = {safe_text(k): _plain(v) for k, v in ctx.items()}
        detail.append(item)
    return detail


def field_path(loc: Iterable[str | int]) -> str:
    """A validation error's ``loc`` as one field path (``messages[0].content.parts[1].image_url.url``): the
    leading ``body`` dropped, and a discriminated union's tag, which repeats the field it selects, once."""
    path, previous = "", None
    for i, part in enumerate(loc):
        if (i == 0 and part == "body") or (isinstance(part, str) and part == previous):
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
        previous = part
    return path


def _plain(value: object) -> object:
    if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return safe_text(value)


def sse_event(data: dict) -> dict:
    """The schema of one server-sent event (what OpenAPI 3.2 calls its ``itemSchema``), ``data`` as described."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {"type": "string", **data},
        },
    }
