"""``/healthz``: the process answers. ``/readyz``: the engine is up and the memory store reachable.

Both answer without an API key (orchestrators and container health checks probe them); when keys are
configured, ``/readyz`` tells the problems only to a caller with a valid key. The engine's part is the
cached result of its last start attempt or health probe (``api/engine_state.py``), so ``/readyz`` is
cheap and never waits on a model server that does not answer; it turns 503 within one probe interval
of the engine going down (``MEGREZ_ENGINE__HEALTH_INTERVAL_S``) and back to 200 when it returns.
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


@router.get(
    "/readyz",
    responses={503: {"description": "Not ready: the engine is loading or down, or the memory store is unreachable."}},
)
async def readyz(request: Request) -> JSONResponse:
    svc = services(request)
    problems = svc.engine_state.problems()
    try:
        await svc.memory.ping()
    except StoreUnavailable as exc:
        problems.append(str(exc))
    body = {"ready": not problems, "problems": problems, "engine": svc.engine.backend}
    if svc.access.keys_required:
        try:
            await svc.access.check(request)  # wrong keys count here too (no free key oracle)
        except HTTPException:
            body = {"ready": not problems}
    return JSONResponse(body, status_code=200 if not problems else 503)
