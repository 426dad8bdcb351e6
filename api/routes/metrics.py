"""``GET /metrics``: Prometheus text format (what is counted: ``api/metrics.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.routes.deps import caller, services

router = APIRouter(tags=["metrics"])


@router.get("/metrics", dependencies=[Depends(caller)])
async def metrics(request: Request) -> Response:
    return Response(services(request).runner.metrics.render(), media_type=CONTENT_TYPE_LATEST)
