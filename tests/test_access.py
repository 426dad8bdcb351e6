"""API keys, owners, rate limits, concurrent turns and metrics, through the app on uvicorn."""

from __future__ import annotations

import hashlib
import json

import openai
import pytest

from agent.config import AgentConfig
from api.config import AuthConfig, RateConfig
from api.memory import LocalMemory
from api.redis_memory import RedisMemory
from api.settings import Settings
from tests.agent_fixtures import app_with, call, client_for, parse_sse

ALICE, BOB = "alice-key-123", "bob-key-456"


def keyed(**rate) -> Settings:
    hashed = "sha256:" + hashlib.sha256(BOB.encode()).hexdigest()  # a key given by its hash
    return Settings(
        agent=AgentConfig(related=False), auth=AuthConfig(api_keys=[ALICE, hashed]), rate=RateConfig(**rate)
    )


def as_(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_are_required_everywhere_but_healthz(tokenizer_dir, corpus_backend):
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=keyed())
    async with client_for(app) as client:
        assert (await client.get("/healthz")).status_code == 200
        for method, path in [
            ("GET", "/conversations"),
            ("POST", "/chat"),
            ("GET", "/chat/x/events"),
            ("GET", "/metrics"),
            ("GET", "/v1/models"),
        ]:
            response = await client.request(method, path, json={"message": "q"})
            assert response.status_code == 401, path
        wrong = await client.get("/conversations", headers=as_("guess"))
        assert wrong.status_code == 401 and "not valid" in wrong.json()["detail"]
        assert (await client.get("/conversations", headers=as_(ALICE))).status_code == 200
        assert (await client.get("/conversations", headers=as_(BOB))).status_code == 200  # the hashed entry
        ready = await client.get("/readyz")
        assert ready.json() == {"ready": True}  # no details without a key
        assert "problems" in (await client.get("/readyz", headers=as_(ALICE))).json()
        async with openai.AsyncOpenAI(base_url=str(client.base_url) + "/v1", api_key="guess", max_retries=0) as oa:
            with pytest.raises(openai.AuthenticationError):
                await oa.models.list()
    assert engine.requests == []


async def test_another_key_cannot_see_read_resume_stop_or_delete(tokenizer_dir, corpus_backend, redis_url):
    app, _ = app_with(tokenizer_dir, corpus_backend, RedisMemory(redis_url), "Mine.<|turn_end|>", settings=keyed())
    async with client_for(app) as client:
        mine = (await client.post("/chat?websearch=off", json={"message": "secret"}, headers=as_(ALICE))).json()
        cid, mid = mine["conversation_id"], mine["message_id"]
        for method, path in [
            ("GET", f"/conversations/{cid}"),
            ("GET", f"/chat/{mid}/events"),
            ("POST", f"/chat/{mid}/stop"),
            ("DELETE", f"/conversations/{cid}"),
        ]:
            assert (await client.request(method, path, headers=as_(BOB))).status_code == 404, path
        follow = await client.post("/chat", json={"message": "x", "conversation_id": cid}, headers=as_(BOB))
        assert follow.status_code == 404
        assert cid not in [c["id"] for c in (await client.get("/conversations", headers=as_(BOB))).json()]
        assert cid in [c["id"] for c in (await client.get("/conversations", headers=as_(ALICE))).json()]
        replay = await client.get(f"/chat/{mid}/events", headers=as_(ALICE))
        assert parse_sse(replay.text)[-1]["event"] == "done"
        assert (await client.delete(f"/conversations/{cid}", headers=as_(ALICE))).status_code == 204


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_rate_limit_is_a_429_with_retry_after(tokenizer_dir, corpus_backend, redis_url, store):
    settings = keyed(requests="3/minute")
    if store == "redis":
        settings = settings.model_copy(update={"redis_url": redis_url})
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings)
    async with client_for(app) as client:
        codes = [(await client.get("/conversations", headers=as_(ALICE))).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        over = await client.get("/conversations", headers=as_(ALICE))
        assert over.status_code == 429 and 1 <= int(over.headers["retry-after"]) <= 60
        assert "rate limit" in over.json()["detail"]
        assert (await client.get("/conversations", headers=as_(BOB))).status_code == 200  # per key
        oa_over = await client.get("/v1/models", headers=as_(ALICE))
        assert oa_over.status_code == 429 and oa_over.json()["error"]["type"] == "rate_limit_error"


async def test_concurrent_turns_per_key_are_capped(tokenizer_dir, corpus_backend):
    slow = "Slow. " * 300 + "<|turn_end|>"
    app, _ = app_with(
        tokenizer_dir, corpus_backend, LocalMemory(), slow, settings=keyed(concurrent_turns=1), delay_s=0.005
    )
    async with client_for(app) as client:
        async with client.stream(
            "POST", "/chat?websearch=off", json={"message": "q"}, headers=as_(ALICE) | {"Accept": "text/event-stream"}
        ) as response:
            async for chunk in response.aiter_text():
                mid = json.loads(parse_sse(chunk)[0]["data"])["message_id"]
                break
            second = await client.post("/chat?websearch=off", json={"message": "another"}, headers=as_(ALICE))
            assert second.status_code == 429 and "already running" in second.json()["detail"]
            openai_too = await client.post(
                "/v1/chat/completions",
                json={"model": "megrez-search", "messages": [{"role": "user", "content": "q"}]},
                headers=as_(ALICE),
            )
            assert openai_too.status_code == 429 and openai_too.json()["error"]["type"] == "rate_limit_error"
            other = await client.post("/chat?websearch=off", json={"message": "mine"}, headers=as_(BOB))
            assert other.status_code == 200  # another key has its own slots
            await client.post(f"/chat/{mid}/stop", headers=as_(ALICE))
        again = await client.post("/chat?websearch=off", json={"message": "now"}, headers=as_(ALICE))
        assert again.status_code == 200  # the stopped turn gave its slot back


async def test_metrics_count_requests_turns_tokens_and_searches(tokenizer_dir, corpus_backend):
    answer = "Eiffel's company [citation:1].<|turn_end|>"
    settings = Settings(agent=AgentConfig(related=False))
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), call("Eiffel Tower"), answer, settings=settings)
    async with client_for(app) as client:
        assert (await client.post("/chat", json={"message": "Who built it?"})).status_code == 200
        assert (await client.get("/conversations/nope")).status_code == 404
        text = (await client.get("/metrics")).text
    assert 'megrez_requests_total{method="POST",route="/chat",status="200"} 1.0' in text
    assert 'megrez_requests_total{method="GET",route="/conversations/{conversation_id}",status="404"} 1.0' in text
    assert 'megrez_turns_total{outcome="answered"} 1.0' in text
    assert 'megrez_search_total{backend="local",outcome="answered"} 1.0' in text
    for stage in ("search", "read", "first_token", "total"):
        assert f'megrez_turn_stage_seconds_count{{stage="{stage}"}} 1.0' in text
    tokens_in = next(line for line in text.splitlines() if line.startswith('megrez_tokens_total{direction="in"}'))
    assert float(tokens_in.split()[-1]) > 0
    assert "megrez_active_streams 0.0" in text and "megrez_turns_running 0.0" in text


async def test_log_lines_carry_the_message_id(tokenizer_dir, corpus_backend):
    import io
    import logging

    from api.logs import configure

    buffer, root = io.StringIO(), logging.getLogger()
    saved = root.handlers[:], root.level
    configure("json", stream=buffer)
    try:
        bad = "It was Eiffel [citation:9].<|turn_end|>"  # a number that points nowhere: dropped and logged
        settings = Settings(agent=AgentConfig(related=False))
        app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), call("Eiffel Tower"), bad, settings=settings)
        async with client_for(app) as client:
            mid = (await client.post("/chat", json={"message": "Who?"})).json()["message_id"]
    finally:
        root.handlers[:], root.level = saved
    records = [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]
    dropped = [r for r in records if r["logger"] == "agent.citations"]
    assert dropped and all(r["message_id"] == mid for r in dropped)
    assert {"time", "level", "message"} <= set(dropped[0])


@pytest.mark.parametrize("keys", [False, True])
async def test_engine_error_details_reach_key_holders_only(tokenizer_dir, corpus_backend, keys):
    from engine.base import EngineUnavailable

    down = EngineUnavailable("cannot reach http://10.0.0.5:8000 (ConnectError)")
    settings = keyed() if keys else Settings(agent=AgentConfig(related=False))
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), down, down, settings=settings)
    headers = as_(ALICE) if keys else {}
    async with client_for(app) as client:
        streamed = await client.post(
            "/chat?websearch=off", json={"message": "q"}, headers=headers | {"Accept": "text/event-stream"}
        )
        [error] = [json.loads(f["data"]) for f in parse_sse(streamed.text) if f["event"] == "error"]
        answered = (await client.post("/chat?websearch=off", json={"message": "q"}, headers=headers)).json()
    for event in (error, answered["error"]):
        assert event["code"] == "engine_unavailable" and "10.0.0.5" not in event["message"]
        assert ("10.0.0.5" in (event.get("detail") or "")) is keys  # a visitor of a keyless service sees none
