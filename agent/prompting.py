"""Helpers of the prepare step: the answer language, the room a search needs, the media request."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from agent.context import TurnContext
from agent.events import MediaRef, Note
from agent.state import MediaItem
from engine.base import media_refusal
from engine.omni.errors import MediaError
from engine.protocol import Message, detect_language, render_observation
from prompts.search import SEARCH_FUNCTION_NAME

# Language codes a request may give (``--language zh``), and the names the observation template takes.
LANGUAGE_CODES: Final = {
    "zh": "Chinese",
    "en": "English",
    "ja": "Japanese",
    "ko": "Korean",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "pt": "Portuguese",
    "it": "Italian",
    "ru": "Russian",
    "ar": "Arabic",
    "hi": "Hindi",
    "th": "Thai",
}
_NAMES: Final = {name.lower(): name for name in LANGUAGE_CODES.values()}


def answer_language(requested: str | None, question: str) -> str:
    """The language name for the answer: the request's (a code such as ``zh``/``zh-CN`` or a name such as
    ``Chinese``), else the question's script (``engine.protocol.detect_language``).

    Raises ``ValueError`` naming the accepted codes for anything else.
    """
    if not requested:
        return detect_language(question)
    key = requested.strip().lower()
    name = LANGUAGE_CODES.get(key.split("-")[0].split("_")[0]) or _NAMES.get(key)
    if name is None:
        raise ValueError(f"unknown language {requested!r}; use one of {', '.join(LANGUAGE_CODES)}")
    return name


async def search_reserve(ctx: TurnContext, question: str, language: str) -> int:
    """Tokens a search round needs beyond the answer: the call, an empty observation, and the least
    context worth giving (``min_context_tokens``)."""
    query = question[:200]
    call = Message(
        "assistant", "", json.dumps({"name": SEARCH_FUNCTION_NAME, "arguments": {"query": query}}, ensure_ascii=False)
    )
    empty = Message("observation", render_observation(question, query, [], language=language))
    return await ctx.codec.count([call, empty]) + ctx.config.min_context_tokens


def media_request(
    ctx: TurnContext, messages: Sequence[Message], media: Sequence[MediaItem], *, reserve_tokens: int
) -> dict[str, Any] | None:
    """State updates for the user message's media (``multimodal``, ``media_tokens``, ``media_refs``,
    ``notes`` on anything downscaled or cut), or ``None`` without media. Raises ``MediaError``."""
    if not media:
        return None
    if why := media_refusal(ctx.engine, (m.kind for m in media)):
        raise MediaError(why)
    encoder = ctx.codec.encoder
    if encoder is None:
        raise MediaError("images and audio need the model's tokenizer on this machine (the embedded vLLM engine)")
    from engine.omni.request import prepare_omni_request  # PIL, soundfile: only for media turns

    request = prepare_omni_request(
        encoder,
        messages,
        images=[m.data for m in media if m.kind == "image"],
        audios=[m.data for m in media if m.kind == "audio"],
        max_model_len=ctx.engine.max_model_len,
        reserve_tokens=reserve_tokens,
    )
    return {
        "multimodal": request.multimodal,
        "media_tokens": request.prompt_tokens - len(request.prompt_ids),
        "media_refs": [MediaRef.of(m.kind, m.data) for m in media],
        "notes": [
            Note(
                code="media_adjusted",
                message=f"{r.kind} {r.index + 1}: {r.adjustment}",
                params={"kind": r.kind, "index": r.index + 1, "adjustment": r.adjustment},
            )
            for r in request.media
            if r.adjustment
        ],
    }
