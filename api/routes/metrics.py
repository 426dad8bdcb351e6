"""``GET /metrics``: Prometheus text format (what is counted: ``api/metrics.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.errors import error_responses
from api.routes.deps import caller, services

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    dependencies=[Depends(caller)],
    response_class=Response,  # no JSON: the 200 is Prometheus's text format (its errors are JSON, as elsewhere)
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}} | error_responses(401, 429),
)
async def metrics(request: Request) -> Response:
    return Response(services(request).runner.metrics.render(), media_type=CONTENT_TYPE_LATEST)
