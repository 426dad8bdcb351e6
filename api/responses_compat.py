"""OpenAI's Responses API shapes on top of the agent: the request read into a turn, the turn written back.

This is the API the current OpenAI SDKs and agent frameworks use for web search (``langchain-openai`` keeps
citations only through it). What it shares with chat completions comes from ``api/openai_compat.py``: the
error shape, the refusal of parameters that cannot be honoured, the history, the question's checks, the
``url_citation`` annotations.

Request: ``input`` is the question as a string, or the conversation as items — messages (``role`` and
``content``: a string, or ``input_text`` / ``input_image`` (a data URL) / ``input_audio`` parts; earlier
answers as ``output_text`` parts); the last message must come from the user. Items of an earlier response
sent back (``web_search_call``, ``reasoning``) are accepted and skipped. ``instructions`` are ignored, like
``system`` messages: the system prompt is the model's trained protocol. Nothing is stored, so
``previous_response_id`` and ``conversation`` are refused (send the conversation in ``input``).

Search, as OpenAI decides it: no tool, ``off``; a ``web_search`` / ``web_search_preview`` tool (dated
versions too), ``auto`` (the model decides); ``tool_choice`` ``"required"`` or naming the tool, ``always``;
``tool_choice: "none"``, ``off``. ``max_tool_calls`` caps the searches (0: none). The extension field
``megrez_websearch`` wins over all of them. Other tools are refused by name, so are the tool's domain
``filters``; ``user_location`` and ``search_context_size`` are hints, accepted and ignored.

Honoured: ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``. Accepted at the values that mean
"not used", a 400 naming the field otherwise: :data:`UNSUPPORTED`, ``text.format`` (text only) and
``include`` (:data:`INCLUDES`). Unknown fields are ignored; ``store``, ``metadata``, ``user`` and
``parallel_tool_calls`` too (nothing is stored, no function is called).

The answer as items (``api/responses_stream.py`` writes them): a ``web_search_call`` per search, then a
``message`` whose ``output_text`` carries ``url_citation`` annotations, one per ``[n]`` marker.
"""

from __future__ import annotations

import reprlib
from typing import Annotated, Any, Literal, get_args

from pydantic import Discriminator, Field, Tag

from agent.config import AgentConfig, SearchMode
from api.config import ApiConfig
from api.openai_compat import (
    AudioPart,
    OpenAIError,
    OpenRequest,
    OpenShape,
    PartKind,
    RefusalPart,
    TurnRequest,
    history_of,
    question_content,
    refuse_unsupported,
    text_of,
    text_or_list,
    turn_request,
)
from engine.base import Engine

# Field → the values that mean "not used" (accepted and ignored); anything else is a 400.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "previous_response_id": (None,),  # nothing is stored: the conversation comes in `input`
    "conversation": (None,),
    "background": (None, False),
    "prompt": (None,),
    "reasoning": (None, {}),
    "top_logprobs": (None, 0),
    "truncation": (None, "disabled"),
    "service_tier": (None, "auto", "default"),
}
# What `include` may ask for: sources are always in a web search's action; no reasoning is ever returned.
INCLUDES = frozenset({"web_search_call.action.sources", "reasoning.encrypted_content"})
WEB_SEARCH = frozenset({"web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11"})
EarlierType = Literal["web_search_call", "reasoning"]  # items of an earlier response a client may send back


class InputText(OpenShape):
    type: Literal["input_text"]
    text: str

    def payload(self) -> tuple[PartKind, str]:
        return "text", self.text


class InputImage(OpenShape):
    type: Literal["input_image"]
    image_url: str | None = Field(default=None, description="A data URL; other URLs and file_id are refused.")

    def payload(self) -> tuple[PartKind, str]:
        return "image", self.image_url or ""


class OutputText(OpenShape):
    """An earlier answer sent back in the history (its annotations are not read)."""

    type: Literal["output_text"]
    text: str

    def payload(self) -> tuple[PartKind, str]:
        return "answer", self.text


InputPart = Annotated[InputText | InputImage | AudioPart | OutputText | RefusalPart, Field(discriminator="type")]
InputContent = text_or_list(InputPart, "content must be a string or a list of content parts")


class InputMessage(OpenShape):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: InputContent


class EarlierItem(OpenShape):
    """An item of an earlier response sent back with the conversation: accepted, not read."""

    type: EarlierType


def _item_kind(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return "message" if kind == "message" else "earlier" if kind in get_args(EarlierType) else None


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[EarlierItem, Tag("earlier")],
    Discriminator(
        _item_kind,
        custom_error_type="input_item",
        custom_error_message="an input item must be a message (role and content), or a web_search_call or "
        "reasoning item of an earlier response (skipped); other items are not supported",
    ),
]


Input = text_or_list(InputItem, "input must be a string or a list of input items", min_length=1, list_tag="input")


class Tool(OpenShape):
    type: str = Field(description="web_search or web_search_preview (or a dated version); other tools are refused.")


class NamedTool(OpenShape):
    type: str = Field(description="The web search tool's type: forces a search.")


class ResponseRequest(OpenRequest):
    """The fields this service reads; the rest are checked against :data:`UNSUPPORTED` or ignored."""

    model: str = Field(description="megrez-search, or the engine's model (GET /v1/models).", examples=["megrez-search"])
    input: Input = Field(
        description="The question, or the conversation as items; the last message, the question, from the user.",
        examples=["Who designed the Eiffel Tower?"],
    )
    instructions: str | list[dict[str, Any]] | None = Field(
        default=None, description="Ignored, like system messages: the system prompt is the model's protocol."
    )
    # Strict: a number is not a boolean, nor a boolean a number (pydantic would convert).
    stream: bool = Field(default=False, strict=True)
    max_output_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    tools: list[Tool] | None = Field(
        default=None, description="At most a web search tool: search as the model decides."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = Field(
        default=None, description='"required" or the web search tool: always search; "none": never.'
    )
    max_tool_calls: int | None = Field(default=None, ge=0, strict=True, description="Most searches (0: none).")
    include: list[str] | None = None
    text: dict[str, Any] | None = Field(default=None, description="Only the text format: {'format': {'type': 'text'}}.")
    megrez_websearch: Literal["off", "auto", "always"] | None = None


def read_response_request(body: ResponseRequest, base: AgentConfig, limits: ApiConfig, engine: Engine) -> TurnRequest:
    """The turn a request asks for; :class:`OpenAIError` (400, naming the field) when it cannot be served
    (``base``: the service's agent config, ``limits`` its input limits, ``engine`` the loaded model)."""
    refuse_unsupported(body.model_extra or {}, UNSUPPORTED)
    if body.text and body.text.get("format") not in (None, {"type": "text"}):
        raise OpenAIError(400, "text.format: only text is supported", param="text.format", code="unsupported_parameter")
    if asked := sorted(set(body.include or ()) - INCLUDES):
        raise OpenAIError(
            400, f"include: {reprlib.repr(asked[0])} is not supported", param="include", code="unsupported_parameter"
        )
    mode = search_mode(body)
    update: dict[str, Any] = {}
    if body.max_tool_calls == 0:
        mode = "off"
    elif body.max_tool_calls is not None:
        update["max_rounds"] = min(base.max_rounds, body.max_tool_calls)
    if isinstance(body.input, str):
        question, images, audio, history, where = body.input, [], [], [], "input"
    else:
        messages = [(i, item) for i, item in enumerate(body.input) if isinstance(item, InputMessage)]
        if not messages or messages[-1][1].role != "user":
            raise OpenAIError(400, "the last message of input must come from the user", param="input")
        *earlier, (i, last) = messages
        where = f"input[{i}]"
        question, images, audio = question_content(last.content, where, "input")
        history = history_of((m.role, text_of(m.content)) for _, m in earlier)
    return turn_request(
        question,
        images,
        audio,
        history=history,
        mode=mode,
        answer_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        update=update,
        where=where,
        param="input",
        base=base,
        limits=limits,
        engine=engine,
    )


def search_mode(body: ResponseRequest) -> SearchMode:
    """The search mode the tools and ``tool_choice`` ask for, as OpenAI reads them (``megrez_websearch`` wins)."""
    for i, tool in enumerate(body.tools or ()):
        if tool.type not in WEB_SEARCH:
            raise OpenAIError(
                400,
                f"tools[{i}]: a {reprlib.repr(tool.type)} tool is not supported; only web_search (or web_search_preview)",
                param=f"tools[{i}].type",
                code="unsupported_parameter",
            )
        if (tool.model_extra or {}).get("filters"):
            raise OpenAIError(400, f"tools[{i}].filters: search filters are not supported", param=f"tools[{i}].filters")
    choice, searchable = body.tool_choice, bool(body.tools)
    if isinstance(choice, NamedTool) and choice.type not in WEB_SEARCH:
        raise OpenAIError(
            400, f"tool_choice: {reprlib.repr(choice.type)} is not a tool of this service", param="tool_choice"
        )
    forced = choice == "required" or isinstance(choice, NamedTool)
    if forced and not searchable:
        raise OpenAIError(400, "tool_choice: asks for a tool, but tools has no web_search tool", param="tool_choice")
    mode: SearchMode = "always" if forced else "auto" if searchable and choice != "none" else "off"
    return body.megrez_websearch or mode


def echoed_tools(body: ResponseRequest) -> tuple[list[dict], str]:
    """``tools`` and ``tool_choice`` as the response repeats them: the web search tools by type, and the choice
    as one of OpenAI's words (naming the only tool there is means ``required``)."""
    choice = body.tool_choice
    word = "required" if isinstance(choice, NamedTool) else choice or "auto"
    return [{"type": tool.type} for tool in body.tools or ()], word
