"""The HTTP API through httpx's ASGI transport: /chat (SSE and JSON), resume, stop, conversations, health."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from agent.config import AgentConfig
from agent.events import EVENT_ADAPTER
from api.app import create_app
from api.memory import LocalMemory
from api.redis_memory import RedisMemory
from api.settings import Settings
from scripts.net import free_port
from scripts.scripted_engine import ScriptedEngine
from tests.agent_fixtures import app_with, call, client_for, make_retriever, parse_sse, png, wav

ANSWER = "Gustave Eiffel's company designed it [citation:1].<|turn_end|>"
RELATED = "1. When was it built?\n2. How tall is it?\n3. Who was Koechlin?<|turn_end|>"


@pytest.fixture(params=["local", "redis"])
def memory_factory(request, redis_url):
    return (lambda: LocalMemory()) if request.param == "local" else (lambda: RedisMemory(redis_url))


async def test_chat_streams_sse_with_meta_first_and_done_last(tokenizer_dir, corpus_backend, memory_factory):
    app, _ = app_with(tokenizer_dir, corpus_backend, memory_factory(), call("Eiffel Tower"), ANSWER, RELATED)
    async with client_for(app) as client:
        response = await client.post(
            "/chat", json={"message": "Who designed the Eiffel Tower?"}, headers={"Accept": "text/event-stream"}
        )
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        frames = parse_sse(response.text)
        types = [f["event"] for f in frames]
        assert types[0] == "meta" and types[-1] == "done" and "answer" in types
        assert types.index("sources") < types.index("token")
        ids = [f["id"] for f in frames[1:]]
        assert len(set(ids)) == len(ids)  # every event has its own id
        for frame in frames[1:-1]:  # the agent's events, valid against the protocol
            assert EVENT_ADAPTER.validate_json(frame["data"]).type == frame["event"]
        meta = json.loads(frames[0]["data"])
        assert json.loads(frames[-1]["data"]) == {"type": "done", "status": "done"}
        stored = await client.get(f"/conversations/{meta['conversation_id']}")
        assert stored.status_code == 200
        turn = stored.json()["turns"][0]
        assert turn["message_id"] == meta["message_id"] and turn["answer"]["answer"].endswith("[1].")

        # Resume from the middle: exactly the events after the given id, once.
        middle = frames[len(frames) // 2]["id"]
        resumed = await client.get(f"/chat/{meta['message_id']}/events", headers={"Last-Event-ID": middle})
        rest = parse_sse(resumed.text)
        assert [f["id"] for f in rest] == [f["id"] for f in frames[len(frames) // 2 + 1 :]]
        by_query = await client.get(f"/chat/{meta['message_id']}/events", params={"last_event_id": middle})
        assert [f["id"] for f in parse_sse(by_query.text)] == [f["id"] for f in rest]


async def test_json_chat_and_a_follow_up_sees_the_earlier_turn(tokenizer_dir, corpus_backend, memory_factory):
    app, engine = app_with(
        tokenizer_dir, corpus_backend, memory_factory(), "Hello there!<|turn_end|>", "You said hello.<|turn_end|>"
    )
    async with client_for(app) as client:
        first = (await client.post("/chat?websearch=false", json={"message": "Hi, I am Ada"})).json()
        assert first["status"] == "done" and first["answer"]["answer"] == "Hello there!"
        second = await client.post(
            "/chat?websearch=off", json={"message": "What did I say?", "conversation_id": first["conversation_id"]}
        )
        assert second.status_code == 200 and second.json()["answer"]["answer"] == "You said hello."
        assert "Hi, I am Ada" in engine.requests[1].text and "Hello there!" in engine.requests[1].text
        listed = (await client.get("/conversations")).json()
        assert listed[0]["id"] == first["conversation_id"] and listed[0]["title"] == "Hi, I am Ada"
        assert (await client.delete(f"/conversations/{first['conversation_id']}")).status_code == 204
        assert (await client.get(f"/conversations/{first['conversation_id']}")).status_code == 404


async def test_bad_requests_get_clear_4xx(tokenizer_dir, corpus_backend):
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory())
    async with client_for(app) as client:
        assert (await client.post("/chat?websearch=maybe", json={"message": "q"})).status_code == 422
        assert (await client.post("/chat", json={"message": ""})).status_code == 422
        assert (await client.post("/chat", json={"msg": "q"})).status_code == 422
        unknown = await client.post("/chat", json={"message": "q", "conversation_id": "nope"})
        assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
        assert (await client.get("/chat/nope/events")).status_code == 404
        assert (await client.post("/chat/nope/stop")).status_code == 404
        assert (await client.delete("/conversations/nope")).status_code == 404
    assert engine.requests == []


async def test_stop_mid_stream_aborts_and_saves_the_partial_answer(tokenizer_dir, corpus_backend, memory_factory):
    long = "A very long answer. " * 200 + "<|turn_end|>"
    app, engine = app_with(tokenizer_dir, corpus_backend, memory_factory(), long, delay_s=0.005)
    async with client_for(app) as client:
        async with client.stream(
            "POST",
            "/chat?websearch=off",
            json={"message": "Tell me everything"},
            headers={"Accept": "text/event-stream"},
        ) as response:
            seen = ""
            meta = None
            async for chunk in response.aiter_text():
                seen += chunk
                frames = parse_sse(seen)
                meta = meta or json.loads(frames[0]["data"])
                if sum(f.get("event") == "token" for f in frames) >= 3:
                    break
        stopped = await client.post(f"/chat/{meta['message_id']}/stop")
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        assert engine.requests[0].closed_early  # the engine request was aborted
        turn = (await client.get(f"/conversations/{meta['conversation_id']}")).json()["turns"][0]
        partial = turn["answer"]["answer"]
        assert turn["status"] == "stopped" and partial and long.startswith(partial) and len(partial) < 1000
        assert {"code": "stopped", "message": "stopped by the user", "params": {}} in turn["answer"]["notes"]
        tail = parse_sse((await client.get(f"/chat/{meta['message_id']}/events")).text)
        assert json.loads(tail[-1]["data"])["status"] == "stopped"


async def test_a_client_that_goes_away_does_not_stop_the_turn(tokenizer_dir, corpus_backend):
    memory = LocalMemory()
    app, _ = app_with(tokenizer_dir, corpus_backend, memory, "Still answered. " * 20 + "<|turn_end|>", delay_s=0.002)
    async with client_for(app) as client:
        async with client.stream(
            "POST", "/chat?websearch=off", json={"message": "q"}, headers={"Accept": "text/event-stream"}
        ) as response:
            async for chunk in response.aiter_text():
                meta = json.loads(parse_sse(chunk)[0]["data"])
                break  # the client leaves after the first frame
        for _ in range(200):
            if (await memory.message_status(meta["message_id"]))[1] != "running":
                break
            await asyncio.sleep(0.02)
        turn = (await client.get(f"/conversations/{meta['conversation_id']}")).json()["turns"][0]
        assert turn["status"] == "done" and turn["answer"]["answer"].startswith("Still answered.")


async def test_one_turn_at_a_time_per_conversation(tokenizer_dir, corpus_backend):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), "Hi.<|turn_end|>", "Slow. " * 100, delay_s=0.005)
    async with client_for(app) as client:
        cid = (await client.post("/chat?websearch=off", json={"message": "q"})).json()["conversation_id"]
        async with client.stream(
            "POST",
            "/chat?websearch=off",
            json={"message": "again", "conversation_id": cid},
            headers={"Accept": "text/event-stream"},
        ) as response:
            async for _ in response.aiter_text():
                break
            busy = await client.post("/chat?websearch=off", json={"message": "third", "conversation_id": cid})
            assert busy.status_code == 409 and "another question" in busy.json()["detail"]


async def test_health_ready_and_redis_down(tokenizer_dir, corpus_backend):
    app, _ = app_with(tokenizer_dir, corpus_backend, RedisMemory(f"redis://127.0.0.1:{free_port()}/0"))
    async with client_for(app) as client:
        assert (await client.get("/healthz")).json() == {"ok": True}
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "Redis is unavailable" in " ".join(ready.json()["problems"])
        down = await asyncio.wait_for(client.post("/chat", json={"message": "q"}), 10)
        assert down.status_code == 503 and "memory unavailable" in down.json()["detail"]


async def test_readyz_waits_for_the_engine(tokenizer_dir, corpus_backend):
    class SlowStart(ScriptedEngine):
        async def start(self):
            await asyncio.sleep(30)

    engine = SlowStart(tokenizer_dir, [])
    app = create_app(Settings(), engine=engine, retriever=make_retriever(corpus_backend), memory=LocalMemory())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["problems"] == ["engine loading"]
            busy = await client.post("/chat", json={"message": "q"})
            assert busy.status_code == 503 and busy.json()["detail"] == "engine loading"


async def test_serve_command_answers_health_at_once_and_reports_the_engine(tmp_path):
    """`megrez-search serve` in a child process: /healthz at once; /readyz names what is missing."""
    import os
    import sys
    from pathlib import Path

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGREZ_")} | {
        "MEGREZ_ENGINE__BACKEND": "openai",
        "MEGREZ_ENGINE__OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "MEGREZ_ENGINE__RETRIES": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api.cli",
        "serve",
        "--port",
        str(port),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(300):
                try:
                    health = await client.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert health.json() == {"ok": True}
            for _ in range(100):
                ready = await client.get("/readyz")
                if "engine failed to start" in " ".join(ready.json()["problems"]):
                    break
                await asyncio.sleep(0.1)
            assert ready.status_code == 503 and "cannot reach" in " ".join(ready.json()["problems"])
            chat = await client.post("/chat", json={"message": "q"})
            assert chat.status_code == 503 and "failed to start" in chat.json()["detail"]
    finally:
        proc.terminate()
        await proc.wait()


async def test_a_stream_started_on_one_replica_resumes_on_another(tokenizer_dir, corpus_backend, redis_url):
    slow = "Replica answer. " * 60 + "<|turn_end|>"
    first, _ = app_with(tokenizer_dir, corpus_backend, RedisMemory(redis_url), slow, delay_s=0.003)
    second, _ = app_with(tokenizer_dir, corpus_backend, RedisMemory(redis_url))
    async with client_for(first) as a, client_for(second) as b:
        seen = ""
        async with a.stream(
            "POST", "/chat?websearch=off", json={"message": "q"}, headers={"Accept": "text/event-stream"}
        ) as response:
            async for chunk in response.aiter_text():
                seen += chunk
                if sum(f.get("event") == "token" for f in parse_sse(seen)) >= 2:
                    break  # the connection drops mid-answer
        frames = parse_sse(seen)
        complete = frames[:-1] if not seen.endswith("\n\n") else frames  # a cut frame is not counted
        meta, last = json.loads(complete[0]["data"]), complete[-1]["id"]
        resumed = parse_sse((await b.get(f"/chat/{meta['message_id']}/events", headers={"Last-Event-ID": last})).text)
        assert resumed[-1]["event"] == "done"
        text = "".join(json.loads(f["data"])["text"] for f in complete[1:] + resumed if f["event"] == "token")
        answer = next(json.loads(f["data"]) for f in resumed if f["event"] == "answer")["answer"]["answer"]
        assert text == answer == slow.removesuffix("<|turn_end|>")  # every piece exactly once


async def test_stop_and_the_one_turn_rule_hold_across_replicas(tokenizer_dir, corpus_backend, redis_url):
    slow = "Still going. " * 400 + "<|turn_end|>"
    first, engine = app_with(tokenizer_dir, corpus_backend, RedisMemory(redis_url), slow, delay_s=0.005)
    second, _ = app_with(tokenizer_dir, corpus_backend, RedisMemory(redis_url))
    async with client_for(first) as a, client_for(second) as b:
        async with a.stream(
            "POST", "/chat?websearch=off", json={"message": "q"}, headers={"Accept": "text/event-stream"}
        ) as response:
            async for chunk in response.aiter_text():
                meta = json.loads(parse_sse(chunk)[0]["data"])
                break
        mid, cid = meta["message_id"], meta["conversation_id"]
        busy = await b.post("/chat?websearch=off", json={"message": "again", "conversation_id": cid})
        assert busy.status_code == 409 and "another question" in busy.json()["detail"]
        bad = await b.get(f"/chat/{mid}/events", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 400 and "not an event id" in bad.json()["detail"]
        stopped = await b.post(f"/chat/{mid}/stop")  # asked on the replica that does not run it
        assert stopped.status_code == 200 and stopped.json() == {"message_id": mid, "status": "stopped"}
        assert engine.requests[0].closed_early  # replica one aborted its engine request
        turns = (await b.get(f"/conversations/{cid}")).json()["turns"]
        assert [t["status"] for t in turns] == ["stopped"] and slow.startswith(turns[0]["answer"]["answer"])
        again = await b.post("/chat?websearch=off", json={"message": "again", "conversation_id": cid})
        assert again.status_code == 200 and again.json()["status"] == "done"  # the conversation is free


async def test_images_as_base64_json_and_as_multipart_reach_the_engine(tokenizer_dir, corpus_backend):
    import base64

    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), "Blue.<|turn_end|>", "Blue again.<|turn_end|>")
    async with client_for(app) as client:
        data_url = "data:image/png;base64," + base64.b64encode(png()).decode()
        first = await client.post("/chat?websearch=off", json={"message": "What colour?", "images": [data_url]})
        assert first.status_code == 200 and first.json()["answer"]["answer"] == "Blue."
        second = await client.post(
            "/chat?websearch=off",
            data={"message": "And now?"},
            files=[("images", ("a.png", png(80, 40), "image/png"))],
        )
        assert second.status_code == 200, second.text
        assert [r.multimodal["image"][0].size for r in engine.requests] == [(64, 64), (80, 40)]
        turn = (await client.get(f"/conversations/{first.json()['conversation_id']}")).json()["turns"][0]
        assert turn["answer"]["answer"] == "Blue."
        stored = await app.state.services.memory.turns(first.json()["conversation_id"])
        assert stored[0].record.media[0].kind == "image" and len(stored[0].record.media[0].sha256) == 64


async def test_bad_uploads_are_refused_naming_the_item(tokenizer_dir, corpus_backend):
    import base64

    settings = Settings()
    settings.api.max_images, settings.api.max_audio_seconds, settings.api.max_body_bytes = 1, 2.0, 200_000
    engine = ScriptedEngine(tokenizer_dir, [])
    app = create_app(settings, engine=engine, retriever=make_retriever(corpus_backend), memory=LocalMemory())
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    async with client_for(app) as client:
        cases = [
            ({"message": "q", "images": ["%%%"]}, 400, "images[0]: not valid base64"),
            ({"message": "q", "images": [b64(b"not a png")]}, 400, "images[0]: not an image"),
            ({"message": "q", "images": [b64(png()), b64(png())]}, 400, "at most 1 allowed"),
            ({"message": "q", "audio": [b64(wav(3))]}, 400, "audio[0]: 3.0 s is longer than 2 s"),
            ({"message": "q", "audio": [b64(b"RIFFjunk")]}, 400, "audio[0]: not audio"),
            ({"message": "x" * 9000}, 413, "at most 8000"),
            ({"message": "q", "images": ["A" * 300_000]}, 413, "at most 200000"),
        ]
        for body, status, message in cases:
            response = await client.post("/chat", json=body)
            assert response.status_code == status and message in response.json()["detail"], (body.keys(), response.text)
        bad_file = await client.post(
            "/chat", data={"message": "q"}, files=[("images", ("x.png", b"nope", "image/png"))]
        )
        assert bad_file.status_code == 400 and "images[0]" in bad_file.json()["detail"]
    assert engine.requests == []


async def test_two_simultaneous_questions_in_one_conversation_one_is_refused(tokenizer_dir, corpus_backend):
    app, _ = app_with(
        tokenizer_dir, corpus_backend, LocalMemory(), "Hi.<|turn_end|>", "A. " * 50, "B. " * 50, delay_s=0.005
    )
    async with client_for(app) as client:
        cid = (await client.post("/chat?websearch=off", json={"message": "q"})).json()["conversation_id"]
        body = {"message": "again", "conversation_id": cid}
        responses = await asyncio.gather(*(client.post("/chat?websearch=off", json=body) for _ in range(2)))
        assert sorted(r.status_code for r in responses) == [200, 409]


async def test_openapi_documents_the_stream_events(tokenizer_dir, corpus_backend):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory())
    async with client_for(app) as client:
        schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert {"MetaEvent", "TokenEvent", "SourcesEvent", "AnswerEvent", "DoneEvent", "PageEvent"} <= set(components)
    for path, method in (("/chat", "post"), ("/chat/{message_id}/events", "get")):
        content = schema["paths"][path][method]["responses"]["200"]["content"]
        frame = content["text/event-stream"]["schema"]  # an SSE frame whose data is one of the events
        assert frame["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/StreamEvent"}
    assert "multipart/form-data" in schema["paths"]["/chat"]["post"]["requestBody"]["content"]


async def test_a_turn_through_the_real_tiny_vllm_engine(tiny_engine, fixture_web, fixture_search):
    from retrieval.config import SelectConfig
    from retrieval.fetch import Fetcher
    from retrieval.pipeline import Retriever
    from retrieval.search.chain import SearchChain
    from scripts.fixture_web import WebSearch

    retriever = Retriever(SearchChain([WebSearch(fixture_search)]), Fetcher(fixture_web.fetch_config()), SelectConfig())
    settings = Settings(agent=AgentConfig(answer_tokens=32, related_tokens=32))
    app = create_app(settings, engine=tiny_engine, retriever=retriever, memory=LocalMemory())
    async with client_for(app) as client:
        response = await client.post(
            "/chat?websearch=always",
            json={"message": "Which city is the Eiffel Tower in?"},
            headers={"Accept": "text/event-stream"},
        )
        frames = parse_sse(response.text)
        types = [f["event"] for f in frames]
        assert types[0] == "meta" and types[-1] == "done" and "answer" in types and "sources" in types
        answer = json.loads(next(f["data"] for f in frames if f["event"] == "answer"))["answer"]
        assert answer["searched"] and answer["answer"]
    assert tiny_engine.llm.get_num_unfinished_requests() == 0
    await retriever.aclose()
