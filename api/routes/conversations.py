"""``GET /conversations`` (newest first), ``GET /conversations/{id}`` (its turns), ``PATCH /conversations/{id}``
(rename), ``DELETE /conversations/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from api.errors import error_responses
from api.routes.chat import STOP_WAIT_S
from api.routes.deps import caller, owned_conversation, services, store_errors
from api.schemas import ConversationOut, ConversationRename, ConversationSummary

router = APIRouter(tags=["conversations"])


@router.get("/conversations", response_model=list[ConversationSummary], responses=error_responses(401, 429, 503))
async def list_conversations(request: Request, limit: int = Query(50, ge=1, le=500), owner: str = Depends(caller)):
    with store_errors():
        return [c.model_dump() for c in await services(request).memory.list_conversations(owner, limit)]


@router.get(
    "/conversations/{conversation_id}",
    response_model=ConversationOut,
    responses=error_responses(401, 404, 429, 503),
)
async def get_conversation(conversation_id: str, request: Request, owner: str = Depends(caller)):
    memory = services(request).memory
    with store_errors():
        conversation = await owned_conversation(request, conversation_id, owner)
        turns = [ConversationOut.turn(t) for t in await memory.turns(conversation_id)]
    return ConversationOut(**conversation.model_dump(), turns=turns)


@router.patch(
    "/conversations/{conversation_id}",
    response_model=ConversationSummary,
    responses=error_responses(400, 401, 404, 408, 413, 422, 429, 503),
)
async def rename_conversation(
    conversation_id: str, body: ConversationRename, request: Request, owner: str = Depends(caller)
) -> ConversationSummary:
    """Give a conversation a title of the user's choosing (it starts as its first question). The title is kept
    on one line; its last update, and so its place in the history, stay as they were."""
    with store_errors():
        await owned_conversation(request, conversation_id, owner)
        renamed = await services(request).memory.rename_conversation(conversation_id, body.title)
    if renamed is None:  # deleted while the request was on its way
        raise HTTPException(404, f"unknown conversation {conversation_id}")
    return ConversationSummary.model_validate(renamed.model_dump())


@router.delete("/conversations/{conversation_id}", status_code=204, responses=error_responses(401, 404, 409, 429, 503))
async def delete_conversation(conversation_id: str, request: Request, owner: str = Depends(caller)) -> None:
    """Delete a conversation with its turns, media references and message streams. A turn still running is
    stopped first (on whichever replica runs it); if it cannot be stopped in time, 409 and nothing is deleted."""
    svc = services(request)
    with store_errors():
        await owned_conversation(request, conversation_id, owner)
        if (running := await svc.memory.running_message(conversation_id)) is not None:
            await svc.runner.stop_anywhere(running, STOP_WAIT_S)
        if not await svc.memory.delete_conversation(conversation_id):  # ConversationBusy: 409
            raise HTTPException(404, f"unknown conversation {conversation_id}")
