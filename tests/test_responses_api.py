"""``POST /v1/responses`` through the official ``openai`` package, against the app on uvicorn.

Every response body and every stream event is also validated, strictly, against the package's own pydantic
types (the client itself builds its objects without validation, so a wrong shape would pass unseen there).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from api.memory import LocalMemory
from api.responses_compat import ResponseRequest, search_mode
from engine.base import EngineUnavailable
from tests.agent_fixtures import app_with, call, client_for, png
from tests.test_openai_api import ANSWER, openai_client, settings

QUESTION = "Who designed the Eiffel Tower?"
SEARCH = [{"type": "web_search"}]
EVENTS: TypeAdapter = TypeAdapter(ResponseStreamEvent)


async def create(client: openai.AsyncOpenAI, **request) -> Response:
    """A response as the server sent it, validated against the package's type (not just constructed)."""
    raw = await client.responses.with_raw_response.create(model="megrez-search", **request)
    response = Response.model_validate(raw.http_response.json())
    assert raw.parse().output_text == response.output_text  # and the client reads the same
    return response


async def raw_events(client: openai.AsyncOpenAI, **request) -> list[dict]:
    """A streamed response's events as the server sent them, each validated against the package's event types
    and named by its SSE event name."""
    events = []
    async with client.responses.with_streaming_response.create(model="megrez-search", stream=True, **request) as raw:
        name = None
        async for line in raw.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                event = json.loads(line[5:])
                assert event["type"] == name
                EVENTS.validate_python(event)
                events.append(event)
    return events


def cited(text: str, annotations) -> list[str]:
    return [text[a.start_index : a.end_index] for a in annotations]


async def test_an_answer_with_a_search_and_url_citations(tokenizer_dir, corpus_backend):
    app, engine = app_with(
        tokenizer_dir, corpus_backend, LocalMemory(), call("Eiffel Tower"), ANSWER, settings=settings()
    )
    async with openai_client(app) as client:
        response = await create(client, input=QUESTION, tools=SEARCH)
    assert response.object == "response" and response.status == "completed"
    search, message = response.output
    assert search.type == "web_search_call" and search.status == "completed"
    assert search.action.query == "Eiffel Tower" and search.action.sources[0].url.startswith("https://")
    assert message.type == "message" and message.phase == "final_answer"
    (text,) = message.content
    assert response.output_text == text.text and text.text.startswith("Gustave Eiffel's company designed it [1].")
    assert cited(text.text, text.annotations) == re.findall(r"\[\d+\]", text.text) == ["[1]", "[3]"]
    assert {a.url for a in text.annotations} <= {s.url for s in search.action.sources}
    assert all(a.type == "url_citation" and a.title for a in text.annotations)
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.tools[0].type == "web_search" and response.tool_choice == "auto"
    assert len(engine.requests) == 2  # the model searched (auto), then answered


async def test_streamed_events_build_the_same_response(tokenizer_dir, corpus_backend):
    script = [call("Eiffel Tower"), ANSWER] * 3
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), *script, settings=settings())
    async with openai_client(app) as client:
        whole = await create(client, input=QUESTION, tools=SEARCH)
        events = await raw_events(client, input=QUESTION, tools=SEARCH)
        async with client.responses.stream(model="megrez-search", input=QUESTION, tools=SEARCH) as stream:
            async for _ in stream:
                pass
            helper = await stream.get_final_response()  # the package's own accumulation agrees
    types = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    search_events = ["added", "in_progress", "searching", "completed", "done"]
    assert [t.rsplit(".", 1)[-1] for t in types[2:7]] == search_events
    assert types[7:9] == ["response.output_item.added", "response.content_part.added"]
    tail = ["output_text.done", "content_part.done", "output_item.done", "completed"]
    assert types[-6:] == ["response.output_text.annotation.added"] * 2 + [f"response.{t}" for t in tail]
    final = Response.model_validate(events[-1]["response"])
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == final.output_text == whole.output_text == helper.output_text
    added = [e["annotation"] for e in events if e["type"] == "response.output_text.annotation.added"]
    assert added == [a.model_dump(mode="json", exclude_unset=True) for a in final.output[1].content[0].annotations]
    assert cited(text, final.output[1].content[0].annotations) == ["[1]", "[3]"]
    # Usage once: in response.completed only (and never the token counts of another response).
    assert [e["type"] for e in events if (e.get("response") or {}).get("usage")] == ["response.completed"]
    assert final.usage.output_tokens == whole.usage.output_tokens > 0
    assert (
        [item.type for item in final.output] == [item.type for item in whole.output] == ["web_search_call", "message"]
    )


async def test_text_before_a_search_is_commentary_and_the_citations_index_the_answer(tokenizer_dir, corpus_backend):
    script = ["Let me look that up. " + call("Eiffel Tower"), ANSWER]
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), *script, settings=settings())
    async with openai_client(app) as client:
        events = await raw_events(client, input=QUESTION, tools=SEARCH)
    final = Response.model_validate(events[-1]["response"])
    commentary, search, answer = final.output
    assert (commentary.phase, answer.phase, search.type) == ("commentary", "final_answer", "web_search_call")
    assert commentary.content[0].text == "Let me look that up. " and commentary.content[0].annotations == []
    text = answer.content[0].text
    assert text.startswith("Gustave") and cited(text, answer.content[0].annotations) == ["[1]", "[3]"]


@pytest.mark.parametrize(
    ("request_fields", "mode"),
    [
        ({}, "off"),
        ({"tools": SEARCH}, "auto"),
        ({"tools": [{"type": "web_search_preview", "search_context_size": "high"}]}, "auto"),
        ({"tools": SEARCH, "tool_choice": "none"}, "off"),
        ({"tools": SEARCH, "tool_choice": "required"}, "always"),
        ({"tools": [{"type": "web_search_preview"}], "tool_choice": {"type": "web_search_preview"}}, "always"),
        ({"tools": SEARCH, "tool_choice": "required", "megrez_websearch": "off"}, "off"),
        ({"megrez_websearch": "always"}, "always"),
    ],
)
def test_search_is_chosen_as_openai_chooses_it(request_fields, mode):
    assert search_mode(ResponseRequest(model="m", input="q", **request_fields)) == mode


async def test_tool_choice_forces_the_search_and_no_tool_means_none(tokenizer_dir, corpus_backend):
    app, engine = app_with(
        tokenizer_dir,
        corpus_backend,
        LocalMemory(),
        'Eiffel Tower"}}',  # the forced query, after the prefilled call
        ANSWER,
        "Hello.<|turn_end|>",
        settings=settings(),
    )
    async with openai_client(app) as client:
        forced = await create(client, input=QUESTION, tools=SEARCH, tool_choice="required")
        plain = await create(client, input="Hi there")
    assert engine.requests[0].sampling.regex is not None  # the forced-call generation of `always`
    assert forced.output[0].type == "web_search_call" and forced.tool_choice == "required"
    assert forced.output[0].action.query == "Eiffel Tower" and forced.output[0].status == "completed"
    assert [item.type for item in plain.output] == ["message"] and plain.output_text == "Hello."
    assert "googleWebSearch" not in engine.requests[2].text  # off: the model is offered no tool


async def test_conversation_items_sampling_and_ignored_instructions(tokenizer_dir, corpus_backend):
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), "Blue.<|turn_end|>", settings=settings())
    image = "data:image/png;base64," + base64.b64encode(png(48, 32)).decode()
    async with openai_client(app) as client:
        done = await create(
            client,
            instructions="You are a pirate.",
            input=[
                {"role": "system", "content": "Talk like a parrot."},
                {"role": "user", "content": "I am Ada."},
                {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What colour?"},
                        {"type": "input_image", "image_url": image, "detail": "auto"},
                    ],
                },
            ],
            max_output_tokens=40,
            temperature=0.7,
            top_p=0.9,
            store=False,
            metadata={"who": "test"},
            user="someone",
        )
    assert done.output_text == "Blue." and done.max_output_tokens == 40 and done.temperature == 0.7
    request = engine.requests[0]
    assert "I am Ada." in request.text and "Hello Ada." in request.text and "What colour?" in request.text
    assert "pirate" not in request.text and "parrot" not in request.text
    assert request.multimodal["image"][0].size == (48, 32)
    assert (request.sampling.max_tokens, request.sampling.temperature, request.sampling.top_p) == (40, 0.7, 0.9)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools[0].type"),
        ({"tools": [{"type": "web_search", "filters": {"allowed_domains": ["a.org"]}}]}, "tools[0].filters"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": SEARCH, "tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": [{"role": "assistant", "content": "a"}]}, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "content.parts[0]"),
    ],
)
async def test_what_cannot_be_honoured_is_a_400_naming_the_field(tokenizer_dir, corpus_backend, fields, param):
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings())
    body = {"model": "megrez-search", "input": "q"} | fields
    async with openai_client(app, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.post("/responses", cast_to=Response, body=body)
    error = raised.value.body
    assert raised.value.status_code == 400 and param in error["param"] and error["message"], error
    assert error["type"] == "invalid_request_error"
    assert engine.requests == []


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"model": "megrez-search", "input": ', 400),  # not JSON
        (b'{"model": "megrez-search", "input": "\\ud800"}', 400),  # a lone surrogate
        (b'{"model": "megrez-search", "input": [5]}', 400),
        (b'{"model": "megrez-search", "input": "q", "stream": 1}', 400),  # a number is not a boolean
        (b'{"model": "megrez-search", "input": "' + b"q" * 20_000 + b'"}', 400),  # over max_message_chars
    ],
)
async def test_bad_bodies_are_a_4xx_in_openais_shape(tokenizer_dir, corpus_backend, content, status):
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings())
    async with client_for(app) as http:
        response = await http.post("/v1/responses", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == "invalid_request_error" and response.json()["error"]["message"]
    assert engine.requests == []


async def test_an_unknown_model_is_a_404(tokenizer_dir, corpus_backend):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings())
    async with openai_client(app, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.responses.create(model="gpt-4o", input="q")


async def test_a_failed_turn_is_an_openai_error_and_a_failed_stream(tokenizer_dir, corpus_backend):
    down = EngineUnavailable("GPU host down")
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), down, down, settings=settings())
    async with openai_client(app, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as raised:
            await client.responses.create(model="megrez-search", input="q")
        assert raised.value.status_code == 503 and "unavailable" in str(raised.value)
        assert "GPU host down" not in str(raised.value)  # the engine's own words go to the log, not to visitors
        events = await raw_events(client, input="q")
    types = [e["type"] for e in events]
    assert types == ["response.created", "response.in_progress", "error", "response.failed"]
    assert events[2]["code"] == "engine_unavailable" and "unavailable" in events[2]["message"]
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.usage is None
    assert app.state.services.runner.slots_held == 0


async def test_clients_that_leave_a_stream_early_release_their_slots(tokenizer_dir, corpus_backend):
    app, _ = app_with(
        tokenizer_dir, corpus_backend, LocalMemory(), default="Short answer. " * 20, delay_s=0.01, settings=settings()
    )
    async with openai_client(app) as client:

        async def leave_after_first_delta() -> None:
            stream = await client.responses.create(model="megrez-search", input="q", stream=True)
            async for event in stream:
                if event.type == "response.output_text.delta":
                    break
            await stream.close()

        await asyncio.gather(*(leave_after_first_delta() for _ in range(4)))
        runner = app.state.services.runner
        for _ in range(300):  # bounded: the turns are closed (their engine requests aborted) as the clients leave
            if runner.slots_held == 0:
                break
            await asyncio.sleep(0.05)
        assert runner.slots_held == 0
        again = await client.responses.create(model="megrez-search", input="q")
    assert again.output_text.startswith("Short answer.")
