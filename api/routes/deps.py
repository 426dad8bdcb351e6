"""What every route needs: the app's services, and the errors that become clear HTTP answers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.memory import Conversation, ConversationBusy, ConversationGone, StoreUnavailable, TooManyTurns


def services(request: Request):
    return request.app.state.services


# Declares the bearer scheme in the OpenAPI document; the key itself is checked by ``Access`` (keys are optional).
_BEARER = HTTPBearer(auto_error=False, description="An API key from MEGREZ_AUTH__API_KEYS, when any are configured.")


async def caller(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> str:
    """The caller's owner id after its key and rate limit (401 / 429); see ``api/access.py``."""
    return await services(request).access.check(request)


async def owned_conversation(request: Request, cid: str, owner: str) -> Conversation:
    """The conversation if this owner has it; 404 otherwise (another owner's looks like none)."""
    conversation = await services(request).memory.get_conversation(cid)
    if conversation is None or conversation.owner != owner:
        raise HTTPException(404, f"unknown conversation {cid}")
    return conversation


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """A memory store that is down answers 503 at once (never a 500, never a hang); a busy conversation 409, a
    deleted one 404; no free turn slot 429."""
    try:
        yield
    except StoreUnavailable as exc:
        raise HTTPException(503, f"conversation memory unavailable: {exc}") from exc
    except ConversationBusy as exc:
        raise HTTPException(409, str(exc)) from exc
    except ConversationGone as exc:  # deleted while the request was on its way
        raise HTTPException(404, str(exc)) from exc
    except TooManyTurns as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "5"}) from exc
