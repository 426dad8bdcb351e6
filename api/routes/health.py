"""``/healthz``: the process answers. ``/readyz``: the engine is up and the memory store reachable."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.memory import StoreUnavailable
from api.routes.deps import services

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"ok": True}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    svc = services(request)
    problems = []
    if svc.engine_error:
        problems.append(f"engine failed to start: {svc.engine_error}")
    elif not svc.engine_ready.is_set():
        problems.append("engine loading")
    try:
        await svc.memory.ping()
    except StoreUnavailable as exc:
        problems.append(str(exc))
    body = {"ready": not problems, "problems": problems, "engine": svc.engine.backend}
    return JSONResponse(body, status_code=200 if not problems else 503)
