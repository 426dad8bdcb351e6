"""Renaming a conversation: ``PATCH /conversations/{id}`` over HTTP, and ``rename_conversation`` on both stores."""

from __future__ import annotations

import json

import pytest

from api.config import AuthConfig
from api.memory import LocalMemory
from api.redis_memory import RedisMemory
from api.settings import Settings
from tests.agent_fixtures import app_with, client_for


@pytest.fixture(params=["local", "redis"])
def memory_factory(request, redis_url):
    return (lambda: LocalMemory()) if request.param == "local" else (lambda: RedisMemory(redis_url))


async def asked(client, question: str) -> str:
    answer = await client.post("/chat?websearch=off", json={"message": question})
    assert answer.status_code == 200, answer.text
    return answer.json()["conversation_id"]


async def test_a_rename_keeps_one_line_and_the_history_order(tokenizer_dir, corpus_backend, memory_factory):
    app, _ = app_with(tokenizer_dir, corpus_backend, memory_factory(), "One.<|turn_end|>", "Two.<|turn_end|>")
    async with client_for(app) as client:
        first = await asked(client, "Who designed the Eiffel Tower?")
        second = await asked(client, "How tall is it?")
        before = {c["id"]: c for c in (await client.get("/conversations")).json()}
        renamed = await client.patch(f"/conversations/{first}", json={"title": "  Eiffel\n\ttower   notes "})
        assert renamed.status_code == 200
        assert renamed.json() == {**before[first], "title": "Eiffel tower notes"}  # updated (the order) unchanged
        listed = (await client.get("/conversations")).json()  # newest first (Redis may hold other tests' too)
        assert [c["id"] for c in listed[:2]] == [second, first]
        assert listed[1]["title"] == "Eiffel tower notes"
        assert (await client.get(f"/conversations/{first}")).json()["title"] == "Eiffel tower notes"
        # Whitespace collapses before the length is counted; Chinese counts by character.
        spaced = "word " * 40 + " " * 100  # 300 characters, 199 once collapsed
        assert (await client.patch(f"/conversations/{first}", json={"title": spaced})).json()["title"] == spaced.strip()
        chinese = await client.patch(f"/conversations/{first}", json={"title": "埃菲尔铁塔" * 40})
        assert chinese.status_code == 200 and len(chinese.json()["title"]) == 200


@pytest.mark.parametrize(
    ("title", "why"),
    [
        ("", "1 to 200 characters"),
        (" \n\t ", "1 to 200 characters"),
        ("x" * 201, "1 to 200 characters"),
        ("bell\x07", "U+0007"),
        ("null\x00byte", "U+0000"),
        ("c1\x85control", "U+0085"),
        ("lone \ud800 surrogate", "U+D800"),
    ],
    ids=["empty", "blank", "too long", "bell", "nul", "c1", "surrogate"],
)
async def test_a_bad_title_is_a_422_that_names_the_field(tokenizer_dir, corpus_backend, title, why):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), "One.<|turn_end|>")
    async with client_for(app) as client:
        cid = await asked(client, "Who designed the Eiffel Tower?")
        body = json.dumps({"title": title})  # ASCII: control characters and a lone surrogate as \u escapes
        refused = await client.patch(
            f"/conversations/{cid}", content=body, headers={"Content-Type": "application/json"}
        )
        assert refused.status_code == 422
        [detail] = refused.json()["detail"]
        assert detail["loc"] == ["body", "title"] and why in detail["msg"]
        assert (await client.get(f"/conversations/{cid}")).json()["title"] == "Who designed the Eiffel Tower?"
        for bad in ({}, {"title": 3}, {"name": "x"}):
            assert (await client.patch(f"/conversations/{cid}", json=bad)).status_code == 422


async def test_an_unknown_or_another_owners_conversation_is_a_404(tokenizer_dir, corpus_backend, memory_factory):
    settings = Settings(auth=AuthConfig(api_keys=["alice-key", "bob-key"]))
    app, _ = app_with(tokenizer_dir, corpus_backend, memory_factory(), "One.<|turn_end|>", settings=settings)
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    async with client_for(app) as client:
        answer = await client.post("/chat?websearch=off", json={"message": "Alice asks"}, headers=alice)
        cid = answer.json()["conversation_id"]
        assert (await client.patch(f"/conversations/{cid}", json={"title": "mine"})).status_code == 401
        assert (await client.patch(f"/conversations/{cid}", json={"title": "mine"}, headers=bob)).status_code == 404
        unknown = await client.patch("/conversations/nope", json={"title": "x"}, headers=alice)
        assert unknown.status_code == 404 and unknown.json() == {"detail": "unknown conversation nope"}
        assert (await client.get(f"/conversations/{cid}", headers=alice)).json()["title"] == "Alice asks"


async def test_the_store_never_recreates_a_deleted_conversation(memory_factory):
    memory = memory_factory()
    try:
        conv = await memory.create_conversation("Who designed the Eiffel Tower?")
        renamed = await memory.rename_conversation(conv.id, "Eiffel")
        assert renamed == conv.model_copy(update={"title": "Eiffel"})
        assert await memory.get_conversation(conv.id) == renamed
        assert await memory.delete_conversation(conv.id)
        assert await memory.rename_conversation(conv.id, "again") is None
        assert await memory.get_conversation(conv.id) is None
        assert conv.id not in {c.id for c in await memory.list_conversations()}
    finally:
        await memory.aclose()
