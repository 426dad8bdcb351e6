"""``GET /conversations`` (newest first), ``GET /conversations/{id}`` (its turns), ``DELETE /conversations/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from api.routes.deps import caller, owned_conversation, services, store_errors
from api.schemas import ConversationOut, ConversationSummary

router = APIRouter(tags=["conversations"])


@router.get("/conversations", response_model=list[ConversationSummary])
async def list_conversations(request: Request, limit: int = Query(50, ge=1, le=500), owner: str = Depends(caller)):
    with store_errors():
        return [c.model_dump() for c in await services(request).memory.list_conversations(owner, limit)]


@router.get("/conversations/{conversation_id}", response_model=ConversationOut)
async def get_conversation(conversation_id: str, request: Request, owner: str = Depends(caller)):
    memory = services(request).memory
    with store_errors():
        conversation = await owned_conversation(request, conversation_id, owner)
        turns = [ConversationOut.turn(t.message_id, t.status, t.record) for t in await memory.turns(conversation_id)]
    return ConversationOut(**conversation.model_dump(), turns=turns)


@router.delete("/conversations/{conversation_id}", status_code=204)
async def delete_conversation(conversation_id: str, request: Request, owner: str = Depends(caller)) -> None:
    with store_errors():
        await owned_conversation(request, conversation_id, owner)
        if not await services(request).memory.delete_conversation(conversation_id):
            raise HTTPException(404, f"unknown conversation {conversation_id}")
