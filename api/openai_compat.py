"""OpenAI's chat-completions shapes on top of the agent: the request read into a turn, the answer written back.
What the Responses API (``api/responses_compat.py``) shares with it lives here too: the error shape, the
rules for parameters it cannot honour, the history, the checks every question goes through
(:func:`turn_request`), the ``url_citation`` annotations and usage.

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

import json
import re
import reprlib
import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from agent.config import AgentConfig, SearchMode
from agent.events import Answer, ErrorEvent, TranscriptMessage, TurnRecord
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
_ERROR_STATUS = {"invalid_request": 400, "too_long": 400, "invalid_media": 400, "engine_unavailable": 503}
_MARKER = re.compile(r"\[(\d+)\]")
_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.DOTALL)


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
        headers: dict[str, str] | None = None,
    ) -> None:
        """``headers``: sent with the error (e.g. ``Retry-After`` with a 503)."""
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_of(event: ErrorEvent) -> OpenAIError:
    """A failed turn's ``error`` event as the error it answers with (a 400 for what the request asked)."""
    status = _ERROR_STATUS.get(event.code, 500)
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIError(status, event.message, type_=type_, code=event.code)


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error shape for an HTTP status (used for errors raised outside this module too)."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
    type_ = kind.get(status, "invalid_request_error" if status < 500 else "server_error")
    return OpenAIError(status, message, type_=type_, code=code).body()


class OpenShape(BaseModel):
    """A request shape whose unknown fields are accepted and ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")


# What a content part carries, for :func:`question_content` and :func:`text_of`, in both APIs' shapes.
PartKind = Literal["text", "answer", "image", "audio", "refusal"]


class TextPart(OpenShape):
    type: Literal["text"]
    text: str

    def payload(self) -> tuple[PartKind, str]:
        return "text", self.text


class RefusalPart(OpenShape):
    """An assistant's refusal in the history (its text is not part of the answer the history keeps)."""

    type: Literal["refusal"]
    refusal: str

    def payload(self) -> tuple[PartKind, str]:
        return "refusal", self.refusal


class ImageURL(OpenShape):
    url: str = Field(description="A data URL (data:image/png;base64,...); other URLs are refused.")


class ImagePart(OpenShape):
    type: Literal["image_url"]
    image_url: ImageURL

    def payload(self) -> tuple[PartKind, str]:
        return "image", self.image_url.url


class InputAudio(OpenShape):
    data: str = Field(description="The clip, base64 (WAV, FLAC, OGG, MP3).")
    format: str | None = None


class AudioPart(OpenShape):
    type: Literal["input_audio"]
    input_audio: InputAudio

    def payload(self) -> tuple[PartKind, str]:
        return "audio", self.input_audio.data


ContentPart = Annotated[TextPart | ImagePart | AudioPart | RefusalPart, Field(discriminator="type")]


def text_or_list(item: Any, message: str, min_length: int = 0, list_tag: str = "parts") -> Any:
    """The type "a string or a list of ``item``", told apart by type, so that an error names the one that applies
    (not both); ``message`` is the error for anything else, ``min_length`` the list's. ``list_tag`` stands in
    the path of an error inside the list (``content.parts[1]``; the field's own name drops out: ``input[1]``)."""

    def kind(value: Any) -> str | None:
        return "text" if isinstance(value, str) else list_tag if isinstance(value, list) else None

    items = Annotated[list[item], Tag(list_tag), Field(min_length=min_length)] if min_length else list[item]
    return Annotated[
        Annotated[str, Tag("text")] | Annotated[items, Tag(list_tag)],
        Discriminator(kind, custom_error_type="content_type", custom_error_message=message),
    ]


Content = text_or_list(ContentPart, "content must be a string, a list of content parts or null")


class ChatMessage(OpenShape):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Tool roles are not supported.")
    content: Content | None = None


class OpenRequest(OpenShape):
    """A request body under ``/v1``: unknown fields accepted, text that is not valid Unicode refused."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may escape a lone surrogate (\ud800), which Python's parser accepts but no UTF-8 store, tokenizer
        # or response can carry: refused here, once for the whole request.
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"the request holds text that is not valid Unicode ({exc.reason})") from None
        except (TypeError, ValueError, RecursionError):
            pass  # not JSON-shaped, or too deep: the field validators say what is wrong with it
        return data


class ChatCompletionRequest(OpenRequest):
    """The fields this service reads; the rest are checked against :data:`UNSUPPORTED` or ignored."""

    model: str = Field(description="megrez-search, or the engine's model (GET /v1/models).", examples=["megrez-search"])
    messages: list[ChatMessage] = Field(
        min_length=1,
        description="The conversation; the last message, the question, must come from the user.",
        examples=[[{"role": "user", "content": "Who designed the Eiffel Tower?"}]],
    )
    # Strict: a number is not a boolean, nor a boolean a number, as the document says (pydantic would convert).
    stream: bool = Field(default=False, strict=True)
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    seed: int | None = Field(default=None, strict=True)
    stop: str | list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    megrez_websearch: Literal["off", "auto", "always"] | None = None


class TurnRequest(BaseModel):
    """What the agent gets from one request under ``/v1``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    question: str
    history: list[TurnRecord]
    media: list[MediaItem]
    mode: SearchMode
    config: AgentConfig


def read_request(body: ChatCompletionRequest, base: AgentConfig, limits: ApiConfig, engine: Engine) -> TurnRequest:
    """The turn a request asks for; :class:`OpenAIError` (400, naming the field) when it cannot be served
    (``engine``: the loaded model, for the media it reads)."""
    refuse_unsupported(body.model_extra or {}, UNSUPPORTED)
    *earlier, last = body.messages
    if last.role != "user":
        raise OpenAIError(400, "the last message must come from the user", param="messages")
    where = f"messages[{len(earlier)}]"
    question, images, audio = question_content(last.content, where, "messages")
    mode: SearchMode = body.megrez_websearch or ("always" if body.web_search_options is not None else "auto")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > 4:
        raise OpenAIError(400, "stop: at most 4 sequences", param="stop")
    update: dict[str, Any] = {"seed": body.seed} if body.seed is not None else {}
    if stops:
        update["stop"] = stops
    return turn_request(
        question,
        images,
        audio,
        history=history_of((m.role, text_of(m.content)) for m in earlier),
        mode=mode,
        answer_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        update=update,
        where=where,
        param="messages",
        base=base,
        limits=limits,
        engine=engine,
    )


def refuse_unsupported(extra: Mapping[str, Any], accepted: Mapping[str, tuple[Any, ...]]) -> None:
    """:class:`OpenAIError` (400, ``unsupported_parameter``) for the first field of ``extra`` (a request's fields)
    whose value is not among those ``accepted`` for it (the values that mean "not used")."""
    for name, values in accepted.items():
        if name in extra and extra[name] not in values:
            shown = reprlib.repr(extra[name])  # a hint of the value, not the value (it may be megabytes)
            raise OpenAIError(
                400, f"{name}={shown} is not supported by this service", param=name, code="unsupported_parameter"
            )


def history_of(messages: Iterable[tuple[str, str]]) -> list[TurnRecord]:
    """The turn's history from the conversation before the question, as ``(role, text)``: each user message
    answered by an assistant message is one earlier turn (assistant text only; earlier media are not sent
    again). ``system``/``developer`` messages are skipped: the system prompt is the model's protocol."""
    history, pending = [], None
    for role, text in messages:
        if role == "user":
            pending = text
        elif role == "assistant":
            if pending is not None:
                transcript = [TranscriptMessage(role="assistant", content=text)]
                history.append(TurnRecord(question=pending, transcript=transcript, answer=Answer(answer=text)))
            pending = None
    return history


def turn_request(
    question: str,
    images: list[bytes],
    audio: list[bytes],
    *,
    history: list[TurnRecord],
    mode: SearchMode,
    answer_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    update: Mapping[str, Any],
    where: str,
    param: str,
    base: AgentConfig,
    limits: ApiConfig,
    engine: Engine,
) -> TurnRequest:
    """The checks every question goes through, and the turn's config.

    :param question: the question's text; ``images``, ``audio``: its media, as uploaded bytes.
    :param answer_tokens: ``temperature``, ``top_p``: the request's sampling (None: the service's).
    :param update: more :class:`AgentConfig` fields for this turn.
    :param where: the question's place in the request, and ``param`` its field, for errors.
    :param base: the service's agent config; ``limits`` its input limits; ``engine`` the loaded model.
    """
    if len(question) > limits.max_message_chars:
        raise OpenAIError(
            400,
            f"the question has {len(question)} characters; at most {limits.max_message_chars}",
            param=param,
            code="string_above_max_length",
        )
    try:
        media = check_media(images, audio, limits, engine)
    except MediaRejected as exc:  # it names the item among the question's images or clips
        raise OpenAIError(400, f"{where}: {exc}", param=param) from None
    fields: dict[str, Any] = {"mode": mode, **update}
    if answer_tokens is not None:
        fields["answer_tokens"] = answer_tokens
    if temperature is not None:
        fields["chat_temperature"] = fields["search_temperature"] = temperature
    if top_p is not None:
        fields["top_p"] = top_p
    config = AgentConfig.model_validate(base.model_dump() | fields)
    return TurnRequest(question=question, history=history, media=media, mode=mode, config=config)


def text_of(content: str | list | None) -> str:
    """A history message's text: its text parts joined (earlier media are not sent again)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(text for kind, text in (part.payload() for part in content) if kind in ("text", "answer"))


def question_content(content: str | list | None, where: str, param: str) -> tuple[str, list[bytes], list[bytes]]:
    """The question's text, images and audio from its content (parts with a ``payload()``); ``where``: the
    message's place, ``param`` its field, for errors."""
    if content is None or isinstance(content, str):
        return content or "", [], []
    texts, images, audio = [], [], []
    try:
        for j, part in enumerate(content):
            here, (kind, value) = f"{where}.content[{j}]", part.payload()
            if kind == "text":
                texts.append(value)
            elif kind == "image":
                if not value.startswith("data:"):
                    raise OpenAIError(400, f"{here}: only data URLs are accepted for images", param=param)
                images.append(decode_base64(value, here))
            elif kind == "audio":
                audio.append(decode_base64(value, here))
            else:
                raise OpenAIError(400, f"{here}: a {part.type} part cannot be part of a question", param=param)
    except MediaRejected as exc:
        raise OpenAIError(400, str(exc), param=param) from None
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
