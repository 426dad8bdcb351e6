"""The HTTP service: ``create_app(settings)`` builds a FastAPI app whose lifespan owns the engine,
the retriever and the memory store (each an async context manager or closable), with one router per
concern (``api/routes/``).

The engine starts in the background: ``/healthz`` answers at once and ``/readyz`` says ``engine
loading`` (503) until it is up, so orchestrators do not kill a replica that is still loading weights.
Tests inject a scripted engine, a retriever on the fixture web and a memory store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent import Agent
from api.access import Access
from api.engine_state import EngineState
from api.errors import (
    OPENAI_PREFIX,
    allowed_methods,
    error_response,
    field_path,
    safe_text,
    sse_event,
    validation_detail,
)
from api.http_guard import BodyGuard
from api.memory import Memory, make_memory
from api.metrics import RequestMetrics
from api.openai_compat import OpenAIError, error_body
from api.routes import chat, conversations, health, metrics, openai, responses, web
from api.schemas import STREAM_ADAPTER
from api.settings import Settings
from api.turns import TurnRunner
from engine.base import Engine
from engine.factory import build_engine
from retrieval.pipeline import Retriever

log = logging.getLogger(__name__)


@dataclass
class Services:
    """What the routes use, built and closed by the app's lifespan."""

    settings: Settings
    engine: Engine
    retriever: Retriever
    memory: Memory
    runner: TurnRunner
    access: Access
    engine_state: EngineState = field(init=False)  # started in the background, probed: api/engine_state.py

    def __post_init__(self) -> None:
        self.engine_state = EngineState(self.engine, self.settings.engine)

    @property
    def engine_ready(self) -> asyncio.Event:
        """Set once the engine has started (it may go down later: ``engine_state`` tells)."""
        return self.engine_state.started


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    retriever: Retriever | None = None,
    memory: Memory | None = None,
) -> FastAPI:
    """The app; any of ``engine``, ``retriever``, ``memory`` may be given (tests, or a host program that shares
    them), else built from settings. The app starts a given engine if needed and closes only what it built."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_memory = memory or make_memory(settings.redis_url, lease_s=settings.api.turn_lease_s)
        if settings.redis_url is None and memory is None:
            log.warning("no MEGREZ_REDIS_URL: conversations live in this process only and are lost on restart")
        the_retriever = retriever or Retriever.from_config(
            settings.search, settings.fetch, settings.select, redis_url=settings.redis_url
        )
        the_engine = engine or build_engine(settings.engine)
        agent = Agent(the_engine, the_retriever, config=settings.agent)
        runner = TurnRunner(
            agent,
            the_memory,
            concurrent_turns=settings.rate.concurrent_turns,
            store_retry_s=settings.api.store_retry_s,
            event_write_s=settings.api.event_write_ms / 1000,
        )
        access = Access(settings.auth, settings.rate, redis_url=settings.redis_url)
        services = Services(settings, the_engine, the_retriever, the_memory, runner, access)
        app.state.services = services
        starting = asyncio.create_task(services.engine_state.run())  # start, retry, then probe
        listening = asyncio.create_task(services.runner.listen())  # stops asked on other replicas
        maintaining = asyncio.create_task(services.runner.maintain())  # leases, and dead replicas' turns
        try:
            yield
        finally:
            await services.runner.aclose()
            for task in (starting, listening, maintaining):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Close what this app built; what the caller handed in is the caller's to close.
            if engine is None:
                await the_engine.shutdown()
            if retriever is None:
                await the_retriever.aclose()
            if memory is None:
                await the_memory.aclose()

    app = FastAPI(title="megrez-search", version="0.1.0", lifespan=lifespan)
    for routes in (health, chat, conversations, openai, responses, metrics, web):
        app.include_router(routes.router)
    web.mount_assets(app)
    _openai_errors(app)
    services_of = lambda: getattr(app.state, "services", None)  # noqa: E731 (set by the lifespan)
    app.add_middleware(BodyGuard, max_bytes=settings.api.max_body_bytes, stall_s=settings.api.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=lambda: (s := services_of()) and s.runner.metrics)  # outermost
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openai_errors(app: FastAPI) -> None:
    """Errors under ``/v1`` in OpenAI's shape (so OpenAI clients raise their own exceptions); elsewhere FastAPI's.
    Starlette's ``HTTPException`` (404 and 405 of the router, a body FastAPI cannot parse) is included, and
    no error echoes what it rejected (``api/errors.py``)."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(app.router.routes, request.scope)
        if isinstance(exc.detail, str) and not request.url.path.startswith(OPENAI_PREFIX):
            # FastAPI's own handler, which knows the statuses that carry no body.
            safe = StarletteHTTPException(exc.status_code, safe_text(exc.detail), headers)
            return await http_exception_handler(request, safe)
        return error_response(request.url.path, exc.status_code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = validation_detail(exc.errors())
        if not request.url.path.startswith(OPENAI_PREFIX):
            return JSONResponse({"detail": detail}, status_code=422)
        first = detail[0] if detail else {"loc": [], "msg": "invalid request", "type": ""}
        if first["type"] == "json_invalid":
            why = first.get("ctx", {}).get("error", first["msg"])
            return error_response(request.url.path, 400, f"the request body is not valid JSON: {why}")
        where = field_path(first["loc"])
        body = error_body(400, f"{where}: {first['msg']}" if where else first["msg"])
        body["error"]["param"] = where or None
        return JSONResponse(body, status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        # A bug: logged with its traceback by Starlette; the client gets the route's shape, not the details.
        return error_response(request.url.path, 500, "internal error; the service's log has the details")


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus what it cannot infer: the stream's event models (so clients can be generated
    for the SSE events too), OpenAI's streamed chunks, 400 instead of 422 under ``/v1`` (see
    ``_openai_errors``), and the bearer key marked optional when no keys are configured. The error statuses
    each operation answers are declared by its route (``api/errors.py: error_responses``)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    events = STREAM_ADAPTER.json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(events.pop("$defs", {}))
    components["StreamEvent"] = events
    event_data = {"contentMediaType": "application/json", "contentSchema": {"$ref": "#/components/schemas/StreamEvent"}}
    stream = {"schema": sse_event(event_data)}
    for path, method in (("/chat", "post"), ("/chat/{message_id}/events", "get")):
        schema["paths"][path][method]["responses"]["200"].setdefault("content", {})["text/event-stream"] = stream
    chunks = sse_event({"description": "a chat.completion.chunk as JSON; the last event's data is [DONE]"})
    completions = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    completions.setdefault("content", {})["text/event-stream"] = {"schema": chunks}
    services = getattr(app.state, "services", None)  # set by the lifespan; until then, assume keys are needed
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path.startswith(OPENAI_PREFIX):
                operation["responses"].pop("422", None)
            if services is not None and not services.access.keys_required and "security" in operation:
                operation["security"].append({})  # an empty requirement: calls without a key are accepted too
    if services is not None:
        app.openapi_schema = schema
    return schema
