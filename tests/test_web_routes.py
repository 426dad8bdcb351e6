"""The page's routes (``/``, ``/assets``, ``/info``, ``/opensearch.xml``) and what a text-only model says to media,
over HTTP."""

from __future__ import annotations

import base64
from xml.etree import ElementTree

import openai
import pytest

from agent.config import AgentConfig
from api.config import AuthConfig
from api.memory import LocalMemory
from api.routes import web
from api.settings import Settings
from tests.agent_fixtures import app_with, client_for, collect, final, make_agent, make_retriever, png, wav


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(tokenizer_dir, corpus_backend):
    assert (web.WEB_DIST / "index.html").is_file(), "the page is not built: make web"
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory())
    async with client_for(app) as client:
        page = await client.get("/")
        assert page.status_code == 200 and '<script type="module" src="/assets/app.js">' in page.text
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
        assert page.headers["referrer-policy"] == "no-referrer"
        script = await client.get("/assets/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert script.headers["content-security-policy"] == policy
        assert (await client.get("/assets/nope.js")).status_code == 404


async def test_an_unbuilt_page_says_how_to_build_it(tokenizer_dir, corpus_backend, tmp_path, monkeypatch):
    monkeypatch.setattr(web, "WEB_DIST", tmp_path)
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory())
    async with client_for(app) as client:
        page = await client.get("/")
        assert page.status_code == 503 and "make run" in page.text
        assert (await client.get("/healthz")).status_code == 200  # the API works without it


async def test_the_opensearch_description_lets_a_browser_search_with_the_page(tokenizer_dir, corpus_backend):
    settings = Settings(auth=AuthConfig(api_keys=["s3cret"]))  # it holds no data: no key needed
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings)
    async with client_for(app) as client:
        page = await client.get("/")
        assert '<link rel="search" type="application/opensearchdescription+xml" title="megrez-search" ' in page.text
        description = await client.get("/opensearch.xml")
        base = str(client.base_url).rstrip("/")
    assert description.status_code == 200
    assert description.headers["content-type"] == "application/opensearchdescription+xml"
    assert description.headers["x-content-type-options"] == "nosniff"
    ns = {"os": "http://a9.com/-/spec/opensearch/1.1/", "moz": "http://www.mozilla.org/2006/browser/search/"}
    root = ElementTree.fromstring(description.content)
    assert root.tag == "{http://a9.com/-/spec/opensearch/1.1/}OpenSearchDescription"
    assert root.findtext("os:ShortName", namespaces=ns) == "megrez-search"
    assert root.findtext("os:InputEncoding", namespaces=ns) == "UTF-8"
    search = root.find("os:Url[@type='text/html']", ns)
    assert search.get("method") == "get" and search.get("template") == f"{base}/?q={{searchTerms}}"
    assert root.find("os:Url[@rel='self']", ns).get("template") == f"{base}/opensearch.xml"
    assert root.findtext("moz:SearchForm", namespaces=ns) == f"{base}/"


async def test_info_tells_the_page_what_the_service_takes(tokenizer_dir, corpus_backend):
    settings = Settings(agent=AgentConfig(mode="always"))
    settings.api.max_images = 3
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings, media=frozenset({"image"}))
    async with client_for(app) as client:
        info = (await client.get("/info")).json()
    assert info["keys_required"] is False and info["ready"] is True and info["model"] == "scripted"
    assert info["media"] == ["image"] and info["default_mode"] == "always"
    assert info["limits"]["max_images"] == 3 and info["limits"]["max_message_chars"] == 8000


async def test_info_without_a_valid_key_tells_only_that_one_is_needed(tokenizer_dir, corpus_backend):
    settings = Settings(auth=AuthConfig(api_keys=["s3cret"]))
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings)
    async with client_for(app) as client:
        assert (await client.get("/info")).json() == {"keys_required": True}
        wrong = await client.get("/info", headers={"Authorization": "Bearer nope"})
        assert wrong.json() == {"keys_required": True}
        right = (await client.get("/info", headers={"Authorization": "Bearer s3cret"})).json()
        assert right["keys_required"] is True and right["model"] == "scripted"
        assert (await client.get("/")).status_code == 200  # the page holds no data: no key needed


async def test_a_text_only_model_refuses_media_with_a_clear_400(tokenizer_dir, corpus_backend):
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), media=frozenset())
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    async with client_for(app) as client:
        refused = await client.post("/chat", json={"message": "What colour?", "images": [image]})
        assert refused.status_code == 400
        assert refused.json()["detail"] == (
            "images: the loaded model (scripted) does not read image; media need Megrez-3B-Omni"
        )
        clip = await client.post("/chat", data={"message": "q"}, files=[("audio", ("a.wav", wav(1), "audio/wav"))])
        assert clip.status_code == 400 and clip.json()["detail"].startswith("audio: the loaded model (scripted)")
        api = openai.AsyncOpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="does not read image"):
            await api.chat.completions.create(
                model="megrez-search",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
            )
        assert (await client.get("/conversations")).json() == []  # nothing was started or stored
    assert engine.requests == []


async def test_the_agent_refuses_media_a_text_only_model_cannot_read(tokenizer_dir, corpus_backend):
    from agent.state import MediaItem
    from scripts.scripted_engine import ScriptedEngine

    engine = ScriptedEngine(tokenizer_dir, media=frozenset({"image"}))
    agent = make_agent(engine, make_retriever(corpus_backend))
    events = await collect(agent.run("What is said?", media=[MediaItem("audio", wav(1))], mode="off"))
    error = final(events)
    assert error.type == "error" and error.code == "invalid_media"
    assert error.message == "the loaded model (scripted) does not read audio; media need Megrez-3B-Omni"
    assert engine.requests == []
