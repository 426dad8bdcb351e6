"""The OpenAI-compatible endpoint through the official ``openai`` package, against the app on uvicorn."""

from __future__ import annotations

import base64
import contextlib
import re

import openai
import pytest

from agent.config import AgentConfig
from api.memory import LocalMemory
from api.settings import Settings
from tests.agent_fixtures import app_with, call, client_for, png

ANSWER = "Gustave Eiffel's company designed it [citation:1]. It opened in 1889 [citation:2].<|turn_end|>"


@contextlib.asynccontextmanager
async def openai_client(app, **kw):
    async with (
        client_for(app) as http,
        openai.AsyncOpenAI(
            base_url=str(http.base_url).rstrip("/") + "/v1", api_key=kw.pop("key", "none"), **kw
        ) as client,
    ):
        yield client


def settings(**agent) -> Settings:
    return Settings(agent=AgentConfig(related=False, **agent))


async def test_an_answer_with_url_citations_and_usage(tokenizer_dir, corpus_backend):
    app, engine = app_with(
        tokenizer_dir, corpus_backend, LocalMemory(), call("Eiffel Tower"), ANSWER, settings=settings()
    )
    async with openai_client(app) as client:
        models = [m.id async for m in client.models.list()]
        assert "megrez-search" in models
        done = await client.chat.completions.create(
            model="megrez-search", messages=[{"role": "user", "content": "Who designed the Eiffel Tower?"}]
        )
    message = done.choices[0].message
    assert message.role == "assistant" and done.choices[0].finish_reason == "stop"
    assert message.content.startswith("Gustave Eiffel's company designed it [1].")
    marks = message.annotations
    assert [a.type for a in marks] == ["url_citation", "url_citation"]
    cited = [message.content[m.url_citation.start_index : m.url_citation.end_index] for m in marks]
    assert cited == re.findall(r"\[\d+\]", message.content) and cited[0] == "[1]"  # every marker, in order
    assert marks[0].url_citation.url.startswith("https://") and marks[0].url_citation.title
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert len(engine.requests) == 2  # the model searched (auto), then answered


async def test_streaming_chunks_end_with_annotations_and_usage_once(tokenizer_dir, corpus_backend):
    script = [call("Eiffel Tower"), ANSWER] * 2
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), *script, settings=settings())
    question = [{"role": "user", "content": "Who designed the Eiffel Tower?"}]
    async with openai_client(app) as client:
        stream = await client.chat.completions.create(
            model="megrez-search", messages=question, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        unasked = [
            c async for c in await client.chat.completions.create(model="megrez-search", messages=question, stream=True)
        ]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "stop"
    marks = final.choices[0].delta.model_extra["annotations"]
    cited = [text[m["url_citation"]["start_index"] : m["url_citation"]["end_index"]] for m in marks]
    assert cited == re.findall(r"\[\d+\]", text) and len(cited) == 2
    # Usage once, as OpenAI sends it: only in the last, choice-less chunk (null on the others); unasked, never.
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all("usage" in c.model_fields_set for c in chunks)
    assert unasked[-1].choices and not any("usage" in c.model_fields_set for c in unasked)


async def test_history_media_and_sampling_fields_reach_the_engine(tokenizer_dir, corpus_backend):

    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), "Blue.<|turn_end|>", settings=settings())
    image = "data:image/png;base64," + base64.b64encode(png(48, 32)).decode()
    async with openai_client(app) as client:
        done = await client.chat.completions.create(
            model="megrez-search",
            messages=[
                {"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "I am Ada."},
                {"role": "assistant", "content": "Hello Ada."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What colour?"},
                        {"type": "image_url", "image_url": {"url": image}},
                    ],
                },
            ],
            max_completion_tokens=40,
            temperature=0.7,
            top_p=0.9,
            seed=7,
            stop=["END"],
            extra_body={"megrez_websearch": "off"},
        )
    assert done.choices[0].message.content == "Blue."
    request = engine.requests[0]
    assert "I am Ada." in request.text and "Hello Ada." in request.text and "pirate" not in request.text
    assert request.multimodal["image"][0].size == (48, 32)
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (40, 0.7, 0.9, 7)
    assert "END" in sampling.stop


async def test_web_search_options_force_a_search(tokenizer_dir, corpus_backend):
    app, engine = app_with(
        tokenizer_dir, corpus_backend, LocalMemory(), '{"query": "Eiffel"}', ANSWER, settings=settings()
    )
    async with openai_client(app) as client:
        await client.chat.completions.create(
            model="megrez-search", messages=[{"role": "user", "content": "Eiffel?"}], web_search_options={}
        )
    assert engine.requests[0].sampling.regex is not None  # the forced-call generation of `always`


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temperature": 3}, "temperature"),
    ],
)
async def test_what_cannot_be_honoured_is_a_400_naming_the_field(tokenizer_dir, corpus_backend, extra, param):
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings())
    async with openai_client(app, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(
                model="megrez-search", messages=[{"role": "user", "content": "q"}], extra_body=extra
            )
    assert raised.value.status_code == 400 and param in str(raised.value.body)
    assert raised.value.body["type"] == "invalid_request_error"
    assert engine.requests == []


async def test_defaults_clients_send_are_accepted(tokenizer_dir, corpus_backend):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), "Hi.<|turn_end|>", settings=settings())
    async with openai_client(app) as client:
        done = await client.chat.completions.create(
            model="megrez-search",
            messages=[{"role": "user", "content": "hi"}],
            n=1,
            presence_penalty=0,
            frequency_penalty=0,
            user="someone",
            extra_body={"megrez_websearch": "off", "some_future_field": True},
        )
    assert done.choices[0].message.content == "Hi."


async def test_errors_are_the_clients_own_exceptions(tokenizer_dir, corpus_backend):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings())
    async with openai_client(app, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q"}])
        with pytest.raises(openai.BadRequestError, match="last message must come from the user"):
            await client.chat.completions.create(
                model="megrez-search", messages=[{"role": "assistant", "content": "q"}]
            )
        with pytest.raises(openai.BadRequestError, match="only data URLs"):
            await client.chat.completions.create(
                model="megrez-search",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
            )
        with pytest.raises(openai.BadRequestError, match="not an image"):
            bad = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
            await client.chat.completions.create(
                model="megrez-search",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}],
            )
        with pytest.raises(openai.BadRequestError, match="messages"):
            await client.chat.completions.create(model="megrez-search", messages=[])


async def test_a_failed_turn_is_an_openai_error(tokenizer_dir, corpus_backend):
    from engine.base import EngineUnavailable

    down = EngineUnavailable("GPU host down")
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), down, down, settings=settings())
    async with openai_client(app, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as raised:
            await client.chat.completions.create(
                model="megrez-search",
                messages=[{"role": "user", "content": "q"}],
                extra_body={"megrez_websearch": "off"},
            )
        assert raised.value.status_code == 503 and "unavailable" in str(raised.value)
        assert "GPU host down" not in str(raised.value)  # the engine's own words go to the log, not to visitors
        stream = await client.chat.completions.create(
            model="megrez-search",
            messages=[{"role": "user", "content": "q"}],
            stream=True,
            extra_body={"megrez_websearch": "off"},
        )
        with pytest.raises(openai.APIError, match="unavailable"):
            async for _ in stream:
                pass


async def test_a_request_waits_for_no_follow_up_questions_and_closes_its_turn_cleanly(
    tokenizer_dir, corpus_backend, caplog
):
    # Follow-ups are on for the service; OpenAI's shape has no place for them, so /v1 does not generate them.
    app, engine = app_with(
        tokenizer_dir, corpus_backend, LocalMemory(), call("Eiffel Tower"), ANSWER, "1. More?<|turn_end|>"
    )
    with caplog.at_level("ERROR"):
        async with openai_client(app) as client:
            done = await client.chat.completions.create(
                model="megrez-search", messages=[{"role": "user", "content": "Who designed the Eiffel Tower?"}]
            )
    assert done.choices[0].message.content.startswith("Gustave Eiffel's company")
    assert len(engine.requests) == 2 and not any(r.sampling.regex for r in engine.requests)  # search, answer
    # The turn is closed by the route, not by the garbage collector while it is still running.
    assert not [r for r in caplog.records if "aclose" in r.getMessage()]
