"""``/healthz``: the process answers. ``/readyz``: the engine is up and the memory store reachable.

Both answer without an API key (orchestrators and container health checks probe them); when keys are
configured, ``/readyz`` tells the problems only to a caller with a valid key.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
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
    if svc.access.keys_required:
        try:
            svc.access.owner(request)
        except HTTPException:
            body = {"ready": not problems}
    return JSONResponse(body, status_code=200 if not problems else 503)
