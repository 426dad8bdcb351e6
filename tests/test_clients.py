"""The OpenAI endpoints through the clients people call them with: ``langchain-openai`` (Chat Completions, and
the Responses API with ``use_responses_api=True``) and ``litellm`` (both APIs), stream and not. Each must get
the text, the citations (where the client keeps them) and the usage exactly once — the usage equal to what the
service counted, which a client that adds up the chunks would double if it came twice.

Against the app on uvicorn on 127.0.0.1, with the network shut: any other address a client tries to reach
(litellm's model-cost map, telemetry) is refused and fails the test. The clients are imported inside it.
"""

from __future__ import annotations

import contextlib
import os
import socket

import openai
import pytest

from api.memory import LocalMemory
from tests.agent_fixtures import app_with, call, client_for
from tests.test_openai_api import ANSWER, settings

# litellm reads this when imported: its bundled model-cost map, not the one on the internet.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

QUESTION = "Who designed the Eiffel Tower?"
TEXT = "Gustave Eiffel's company designed it [1]. It opened in 1889 [3]."  # ANSWER, as the service writes it
URLS = ["https://en.wikipedia.org/wiki/Eiffel_Tower", "https://example.org/koechlin"]
LOCAL = {"127.0.0.1", "::1", "localhost", None}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch):
    """Every connection and name lookup beyond this machine refused, and recorded: none may be tried."""
    tried: list[object] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def local_connect(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
            tried.append(address)
            raise OSError(f"the test shut the network: no connection to {address}")
        return connect(sock, address)

    def local_getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL:
            tried.append(host)
            raise socket.gaierror(f"the test shut the network: no lookup of {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", local_connect)
    monkeypatch.setattr(socket, "getaddrinfo", local_getaddrinfo)
    yield
    assert tried == [], f"a client tried to reach the network: {tried}"


@contextlib.asynccontextmanager
async def service(tokenizer_dir, corpus_backend):
    """The app's ``/v1`` base URL, the usage the service reports for the question (every turn here is the same
    search and answer, so the same counts) and the scripted engine."""
    app, engine = app_with(
        tokenizer_dir, corpus_backend, LocalMemory(), *[call("Eiffel Tower"), ANSWER] * 4, settings=settings()
    )
    async with client_for(app) as http:
        base = str(http.base_url).rstrip("/") + "/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="none") as client:
            usage = (
                await client.chat.completions.create(
                    model="megrez-search", messages=[{"role": "user", "content": QUESTION}]
                )
            ).usage
        yield base, (usage.prompt_tokens, usage.completion_tokens), engine


def marked(text: str, annotations: list[dict]) -> list[tuple[str, str]]:
    """(the text an annotation points at, its URL) for each ``url_citation``."""
    return [(text[a["start_index"] : a["end_index"]], a["url"]) for a in annotations if a["type"] == "url_citation"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_langchain_chat_completions(tokenizer_dir, corpus_backend, stream):
    from langchain_openai import ChatOpenAI

    async with service(tokenizer_dir, corpus_backend) as (base, usage, _):
        llm = ChatOpenAI(model="megrez-search", base_url=base, api_key="none", stream_usage=True, max_retries=0)
        message = await _invoke(llm, QUESTION, stream)
    # langchain-openai keeps no annotations from Chat Completions: citations reach it through the Responses API.
    assert message.content == TEXT
    assert (message.usage_metadata["input_tokens"], message.usage_metadata["output_tokens"]) == usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_langchain_responses_api_keeps_the_citations(tokenizer_dir, corpus_backend, stream):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    async with service(tokenizer_dir, corpus_backend) as (base, usage, engine):
        llm = ChatOpenAI(model="megrez-search", base_url=base, api_key="none", use_responses_api=True, max_retries=0)
        search = [{"type": "web_search"}]
        message = await _invoke(llm, QUESTION, stream, tools=search)
        # The answer goes back as history (with its search item) in the next request, as an agent does.
        follow_up = await llm.ainvoke([HumanMessage(QUESTION), message, HumanMessage("When?")], tools=search)
    searched, text = message.content
    assert searched["type"] == "web_search_call" and searched["action"]["query"] == "Eiffel Tower"
    assert text["type"] == "text" and text["text"] == TEXT == message.text
    assert marked(text["text"], text["annotations"]) == [("[1]", URLS[0]), ("[3]", URLS[1])]
    assert (message.usage_metadata["input_tokens"], message.usage_metadata["output_tokens"]) == usage
    assert follow_up.text.startswith("Gustave Eiffel's company")
    assert f"{QUESTION}<|turn_end|>" in engine.requests[-2].text and TEXT in engine.requests[-2].text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_litellm_chat_completions(tokenizer_dir, corpus_backend, stream):
    import litellm

    async with service(tokenizer_dir, corpus_backend) as (base, usage, _):
        request = {"model": "openai/megrez-search", "api_base": base, "api_key": "none", "num_retries": 0}
        messages = [{"role": "user", "content": QUESTION}]
        if stream:
            chunks = [
                c
                async for c in await litellm.acompletion(
                    **request, messages=messages, stream=True, stream_options={"include_usage": True}
                )
            ]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            annotations = [
                a for c in chunks if c.choices for a in getattr(c.choices[0].delta, "annotations", None) or ()
            ]
            counted = [c.usage for c in chunks if getattr(c, "usage", None)]
        else:
            done = await litellm.acompletion(**request, messages=messages)
            text, annotations, counted = (
                done.choices[0].message.content,
                done.choices[0].message.annotations,
                [done.usage],
            )
    assert text == TEXT
    assert marked(text, [a["url_citation"] | {"type": a["type"]} for a in annotations]) == [
        ("[1]", URLS[0]),
        ("[3]", URLS[1]),
    ]
    assert [(u.prompt_tokens, u.completion_tokens) for u in counted] == [usage]  # once


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_litellm_responses_api(tokenizer_dir, corpus_backend, stream):
    import litellm

    async with service(tokenizer_dir, corpus_backend) as (base, usage, _):
        request = {"model": "openai/megrez-search", "api_base": base, "api_key": "none", "input": QUESTION}
        request["tools"] = [{"type": "web_search"}]
        if stream:
            events = [e async for e in await litellm.aresponses(**request, stream=True)]
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            response = next(e.response for e in events if e.type == "response.completed")
            assert deltas == TEXT
        else:
            response = await litellm.aresponses(**request)
    message = response.output[-1]
    text = message.content[0]
    assert text.text == TEXT
    assert marked(text.text, [a.model_dump() for a in text.annotations]) == [("[1]", URLS[0]), ("[3]", URLS[1])]
    assert (response.usage.input_tokens, response.usage.output_tokens) == usage


async def _invoke(llm, question: str, stream: bool, **kwargs):
    """The whole message, from ``ainvoke`` or by adding up what ``astream`` yields (as langchain does)."""
    if not stream:
        return await llm.ainvoke(question, **kwargs)
    whole = None
    async for piece in llm.astream(question, **kwargs):
        whole = piece if whole is None else whole + piece
    return whole
