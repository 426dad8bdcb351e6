"""OpenAI's chat-completions shapes on top of the agent: the request read into a turn, the answer written back.

The request's ``messages`` are the conversation: the last one must come from the user and is the
question; the ``user``/``assistant`` pairs before it become the turn's history (assistant text only —
earlier media are not sent again); ``system``/``developer`` messages are ignored, because the system
prompt is the model's trained protocol (it switches search on and off) and must stay byte-exact.
Images come as ``image_url`` parts with data URLs, audio as ``input_audio`` parts (base64 and a
format), as OpenAI's clients send them.

Search: ``auto`` (the model decides) by default; OpenAI's ``web_search_options`` asks for a search
(``always``); the extension field ``megrez_websearch`` (``off``/``auto``/``always``) wins over both.

Sampling fields the agent honours: ``max_tokens``/``max_completion_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop``. Fields it cannot honour are accepted when they carry the value clients
send by default (``n: 1``, ``presence_penalty: 0``, ``tools: []``, …) and refused with a 400 naming
the field otherwise (:data:`UNSUPPORTED`). Unknown fields are ignored, as OpenAI-compatible servers do.

Citations come back as OpenAI's search models return them: ``message.annotations`` =
``[{"type": "url_citation", "url_citation": {start_index, end_index, url, title}}]``, the indices
pointing at each ``[n]`` marker inside ``message.content`` (Python string indices).
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.config import AgentConfig, SearchMode
from agent.events import Answer, TranscriptMessage, TurnRecord
from agent.state import MediaItem
from api.config import ApiConfig
from api.media import MediaRejected, check_media, decode_base64
from engine.base import Engine

# Field → the values that mean "not used" (accepted and ignored); anything else is a 400.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}
_MARKER = re.compile(r"\[(\d+)\]")
_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.S)


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error shape for an HTTP status (used for errors raised outside this module too)."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
    type_ = kind.get(status, "invalid_request_error" if status < 500 else "server_error")
    return OpenAIError(status, message, type_=type_, code=code).body()


class ChatCompletionRequest(BaseModel):
    """The fields this service reads; the rest are checked against :data:`UNSUPPORTED` or ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    megrez_websearch: Literal["off", "auto", "always"] | None = None


class TurnRequest(BaseModel):
    """What the agent gets from one chat-completions request."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    question: str
    history: list[TurnRecord]
    media: list[MediaItem]
    mode: SearchMode
    config: AgentConfig


def read_request(body: ChatCompletionRequest, base: AgentConfig, limits: ApiConfig, engine: Engine) -> TurnRequest:
    """The turn a request asks for; :class:`OpenAIError` (400, naming the field) when it cannot be served
    (``engine``: the loaded model, for the media it reads)."""
    extra = body.model_extra or {}
    for name, accepted in UNSUPPORTED.items():
        if name in extra and extra[name] not in accepted:
            raise OpenAIError(
                400,
                f"{name}={extra[name]!r} is not supported by this service",
                param=name,
                code="unsupported_parameter",
            )
    *earlier, last = body.messages
    if last.get("role") != "user":
        raise OpenAIError(400, "the last message must come from the user", param="messages")
    history, pending = [], None
    for i, message in enumerate(earlier):
        role = message.get("role")
        if role in ("system", "developer"):
            continue  # the system prompt is the model's protocol (see the module docstring)
        if role == "user":
            pending = _text(message, f"messages[{i}]")
        elif role == "assistant":
            if pending is not None:
                answer = _text(message, f"messages[{i}]")
                transcript = [TranscriptMessage(role="assistant", content=answer)]
                history.append(TurnRecord(question=pending, transcript=transcript, answer=Answer(answer=answer)))
            pending = None
        else:
            raise OpenAIError(400, f"messages[{i}]: role {role!r} is not supported (tools are not)", param="messages")
    question, images, audio = _user_content(last, f"messages[{len(earlier)}]")
    if len(question) > limits.max_message_chars:
        raise OpenAIError(
            400,
            f"the question has {len(question)} characters; at most {limits.max_message_chars}",
            param="messages",
            code="string_above_max_length",
        )
    try:
        media = check_media(images, audio, limits, engine)
    except MediaRejected as exc:
        raise OpenAIError(400, str(exc), param="messages") from None
    mode: SearchMode = body.megrez_websearch or ("always" if body.web_search_options is not None else "auto")
    update: dict[str, Any] = {"mode": mode}
    if (tokens := body.max_completion_tokens or body.max_tokens) is not None:
        update["answer_tokens"] = tokens
    if body.temperature is not None:
        update["chat_temperature"] = update["search_temperature"] = body.temperature
    if body.top_p is not None:
        update["top_p"] = body.top_p
    if body.seed is not None:
        update["seed"] = body.seed
    if body.stop:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        if len(stops) > 4:
            raise OpenAIError(400, "stop: at most 4 sequences", param="stop")
        update["stop"] = stops
    config = AgentConfig.model_validate(base.model_dump() | update)
    return TurnRequest(question=question, history=history, media=media, mode=mode, config=config)


def _text(message: dict, name: str) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise OpenAIError(400, f"{name}.content must be a string or a list of parts", param="messages")


def _user_content(message: dict, name: str) -> tuple[str, list[bytes], list[bytes]]:
    content = message.get("content")
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list):
        raise OpenAIError(400, f"{name}.content must be a string or a list of parts", param="messages")
    texts, images, audio = [], [], []
    try:
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"{name}.content[{j}]"
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not url.startswith("data:"):
                    raise OpenAIError(400, f"{where}: only data URLs are accepted for images", param="messages")
                images.append(decode_base64(url, where))
            elif kind == "input_audio":
                audio.append(decode_base64((part.get("input_audio") or {}).get("data", ""), where))
            else:
                raise OpenAIError(400, f"{where}: part type {kind!r} is not supported", param="messages")
    except MediaRejected as exc:
        raise OpenAIError(400, str(exc), param="messages") from None
    return "".join(texts), images, audio


def annotations(content: str, answer: Answer, offset: int = 0) -> list[dict]:
    """``url_citation`` annotations for the ``[n]`` markers of ``content`` that cite one of the answer's
    sources (markers inside code are text); indices shifted by ``offset``."""
    cited = {c.n: c for c in answer.citations}
    code = [m.span() for m in _CODE.finditer(content)]
    out = []
    for match in _MARKER.finditer(content):
        ref = cited.get(int(match.group(1)))
        if ref is None or any(a <= match.start() < b for a, b in code):
            continue
        span = {"start_index": match.start() + offset, "end_index": match.end() + offset}
        out.append({"type": "url_citation", "url_citation": span | {"url": ref.url, "title": ref.title}})
    return out


def usage(answer: Answer | None) -> dict:
    prompt = answer.usage.prompt_tokens if answer else 0
    completion = answer.usage.completion_tokens if answer else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(cid: str, model: str, answer: Answer) -> dict:
    """The non-streaming response (``chat.completion``)."""
    message = {"role": "assistant", "content": answer.answer, "annotations": annotations(answer.answer, answer)}
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(answer),
    }


def chunk(cid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    """One streaming chunk (``chat.completion.chunk``)."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
