"""The service on a real Redis Cluster (three masters on loopback ports, the session's own): two replicas
sharing it answer, resume, stop, rename and delete; the one-turn rule, turn slots, rate limits and caches
hold; ``MEGREZ_REDIS_CLUSTER=true`` is what picks the cluster client. The store's own operations run on
the cluster too in tests/test_memory.py (its ``store_url`` and ``memory`` fixtures)."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.config import AgentConfig
from api import redis_schema as schema
from api.config import RateConfig
from api.memory import MessageStart, StoreUnavailable
from api.redis_memory import RedisMemory
from api.settings import Settings
from retrieval.cache import RedisCache, make_cache, redis_client
from scripts.net import free_port
from tests.agent_fixtures import app_with, client_for, parse_sse

SLOW = "Still going. " * 300 + "<|turn_end|>"
SSE = {"Accept": "text/event-stream"}


def node_url(cluster_url: str) -> str:
    """One node's plain address, as an operator writes ``MEGREZ_REDIS_URL``."""
    return cluster_url.replace("redis+cluster://", "redis://") + "/0"


def cluster_settings(cluster_url: str, **rate) -> Settings:
    return Settings(
        redis_url=node_url(cluster_url),
        redis_cluster=True,
        agent=AgentConfig(related=False),
        rate=RateConfig(**{"requests": "", **rate}),
    )


def test_the_cluster_setting_makes_every_client_a_cluster_client(redis_cluster_url, monkeypatch):
    from redis.asyncio.cluster import RedisCluster

    monkeypatch.setenv("MEGREZ_REDIS_URL", node_url(redis_cluster_url))
    monkeypatch.setenv("MEGREZ_REDIS_CLUSTER", "true")
    settings = Settings()
    assert settings.redis_url.startswith("redis+cluster://127.0.0.1:") and settings.redis_cluster
    assert isinstance(redis_client(settings.redis_url), RedisCluster)
    assert RedisMemory(settings.redis_url).cluster
    monkeypatch.delenv("MEGREZ_REDIS_CLUSTER")
    assert Settings().redis_url == node_url(redis_cluster_url)  # off: the URL is left as it is


async def test_two_replicas_answer_resume_stop_rename_and_delete_on_a_cluster(
    tokenizer_dir, corpus_backend, redis_cluster_url
):
    settings = cluster_settings(redis_cluster_url)
    memory = RedisMemory(settings.redis_url)
    first, _ = app_with(
        tokenizer_dir, corpus_backend, memory, "Paris.<|turn_end|>", SLOW, settings=settings, delay_s=0.005
    )
    second, _ = app_with(tokenizer_dir, corpus_backend, RedisMemory(settings.redis_url), settings=settings)
    async with client_for(first) as a, client_for(second) as b:
        answered = (await a.post("/chat?websearch=off", json={"message": "Capital of France?"})).json()
        cid = answered["conversation_id"]
        assert answered["status"] == "done" and answered["answer"]["answer"] == "Paris."
        assert (await b.get("/conversations")).json()[0]["id"] == cid  # listed, newest first
        async with a.stream(
            "POST", "/chat?websearch=off", json={"message": "More?", "conversation_id": cid}, headers=SSE
        ) as response:
            seen = ""
            async for chunk in response.aiter_text():
                seen += chunk
                if sum(f.get("event") == "token" for f in parse_sse(seen)) >= 2:
                    break
        meta = json.loads(parse_sse(seen)[0]["data"])
        busy = await b.post("/chat?websearch=off", json={"message": "again", "conversation_id": cid})
        assert busy.status_code == 409  # one running turn per conversation, across replicas
        stopped = await b.post(f"/chat/{meta['message_id']}/stop")  # asked where it does not run
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        resumed = parse_sse((await b.get(f"/chat/{meta['message_id']}/events")).text)
        assert resumed[-1]["event"] == "done" and json.loads(resumed[-1]["data"])["status"] == "stopped"
        text = "".join(json.loads(f["data"])["text"] for f in resumed if f["event"] == "token")
        turns = (await b.get(f"/conversations/{cid}")).json()["turns"]
        assert [t["status"] for t in turns] == ["done", "stopped"] and turns[1]["answer"]["answer"] == text
        renamed = await b.patch(f"/conversations/{cid}", json={"title": "France"})
        assert renamed.status_code == 200 and (await a.get(f"/conversations/{cid}")).json()["title"] == "France"
        assert (await a.delete(f"/conversations/{cid}")).status_code == 204
        assert (await b.get(f"/chat/{meta['message_id']}/events")).status_code == 404
        assert cid not in [c["id"] for c in (await b.get("/conversations")).json()]
        for app in (first, second):
            assert app.state.services.runner.slots_held == 0
    store = redis_client(redis_cluster_url, decode_responses=True)
    assert await store.keys(f"{schema.conversation(cid)}*") == []
    assert await store.zcard(schema.owner_keys("anonymous")[1]) == 0  # every turn slot free
    await store.aclose()


async def test_turn_slots_and_rate_limits_are_shared_on_a_cluster(tokenizer_dir, corpus_backend, redis_cluster_url):
    settings = cluster_settings(redis_cluster_url, requests="4/minute", concurrent_turns=1)
    memory = RedisMemory(settings.redis_url)
    app, _ = app_with(tokenizer_dir, corpus_backend, memory, SLOW, settings=settings, delay_s=0.005)
    async with client_for(app) as client:
        async with client.stream("POST", "/chat?websearch=off", json={"message": "q"}, headers=SSE) as response:
            async for chunk in response.aiter_text():
                mid = json.loads(parse_sse(chunk)[0]["data"])["message_id"]
                break
            second = await client.post("/chat?websearch=off", json={"message": "another"})
            assert second.status_code == 429 and "already running" in second.json()["detail"]
            assert (await client.post(f"/chat/{mid}/stop")).status_code == 200
        codes = [(await client.get("/conversations")).status_code for _ in range(3)]
        assert codes == [200, 429, 429] and 1 <= int((await client.get("/conversations")).headers["retry-after"]) <= 60


async def test_caches_work_on_a_cluster_and_a_cluster_that_is_down_is_a_miss_or_a_clear_error(redis_cluster_url):
    cache = make_cache(redis_cluster_url, "cluster-test")
    assert isinstance(cache, RedisCache)
    for i in range(20):  # keys spread over the three nodes
        await cache.set(f"q{i}", {"n": i}, ttl_s=60)
    assert [(await cache.get(f"q{i}"))["n"] for i in range(20)] == list(range(20))
    nowhere = f"redis+cluster://127.0.0.1:{free_port()}"
    assert await RedisCache(nowhere, "cluster-test").get("q1") is None
    memory = RedisMemory(nowhere)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(memory.ping(), 10)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(memory.start_message("m", MessageStart("c", "anonymous", "q")), 10)
    await memory.aclose()
