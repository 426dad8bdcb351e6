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

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from agent import Agent
from api.access import Access
from api.memory import Memory, make_memory
from api.metrics import RequestMetrics
from api.openai_compat import OpenAIError, error_body
from api.routes import chat, conversations, health, metrics, openai, web
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
    engine_ready: asyncio.Event = field(default_factory=asyncio.Event)
    engine_error: str | None = None

    async def _start_engine(self) -> None:
        try:
            await self.engine.start()
        except Exception as exc:  # reported by /readyz and every /chat until fixed
            log.exception("the model engine did not start")
            self.engine_error = f"{type(exc).__name__}: {exc}"
            return
        self.engine_ready.set()


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
        the_memory = memory or make_memory(settings.redis_url)
        if settings.redis_url is None and memory is None:
            log.warning("no MEGREZ_REDIS_URL: conversations live in this process only and are lost on restart")
        the_retriever = retriever or Retriever.from_config(
            settings.search, settings.fetch, settings.select, redis_url=settings.redis_url
        )
        the_engine = engine or build_engine(settings.engine)
        agent = Agent(the_engine, the_retriever, config=settings.agent)
        runner = TurnRunner(agent, the_memory, concurrent_turns=settings.rate.concurrent_turns)
        access = Access(settings.auth, settings.rate, redis_url=settings.redis_url)
        services = Services(settings, the_engine, the_retriever, the_memory, runner, access)
        app.state.services = services
        starting = asyncio.create_task(services._start_engine())
        listening = asyncio.create_task(services.runner.listen())  # stops asked on other replicas
        try:
            yield
        finally:
            await services.runner.aclose()
            for task in (starting, listening):
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
    for router in (health.router, chat.router, conversations.router, openai.router, metrics.router, web.router):
        app.include_router(router)
    web.mount_assets(app)
    _openai_errors(app)
    services_of = lambda: getattr(app.state, "services", None)  # noqa: E731 (set by the lifespan)
    app.add_middleware(RequestMetrics, metrics=lambda: (s := services_of()) and s.runner.metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openai_errors(app: FastAPI) -> None:
    """Errors under ``/v1`` in OpenAI's shape (so OpenAI clients raise their own exceptions); elsewhere FastAPI's."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if not request.url.path.startswith("/v1/"):
            return await http_exception_handler(request, exc)
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/v1/"):
            return await request_validation_exception_handler(request, exc)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        body = error_body(400, f"{where}: {first.get('msg', 'invalid request')}")
        body["error"]["param"] = where or None
        return JSONResponse(body, status_code=400)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the stream's event models, so clients can be generated for the SSE events too."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        events = STREAM_ADAPTER.json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(events.pop("$defs", {}))
        components["StreamEvent"] = events
        stream = {"schema": {"$ref": "#/components/schemas/StreamEvent"}}
        for path, method in (("/chat", "post"), ("/chat/{message_id}/events", "get")):
            schema["paths"][path][method]["responses"]["200"].setdefault("content", {})["text/event-stream"] = stream
        app.openapi_schema = schema
    return app.openapi_schema
