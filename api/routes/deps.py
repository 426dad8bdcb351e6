"""What every route needs: the app's services, and the errors that become clear HTTP answers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi import HTTPException, Request

from api.memory import StoreUnavailable


def services(request: Request):
    return request.app.state.services


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """A memory store that is down answers 503 at once (never a 500, never a hang)."""
    try:
        yield
    except StoreUnavailable as exc:
        raise HTTPException(503, f"conversation memory unavailable: {exc}") from exc
