"""A whole turn on the real vLLM engine (the session's tiny random model) and the fixture web.

The tiny model writes nonsense; what is tested is that every mode ends cleanly with one well-formed
answer (or a defined error), through the real engine, parser, retriever and support check — and
that `megrez-search ask` does the same against a remote OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import get_args

import pytest
import pytest_asyncio

from agent.events import AnswerEvent, ErrorCode, NoteCode, StatusCode, TokenEvent
from retrieval.search.chain import SearchChain
from scripts.fixture_web import WebSearch
from scripts.tiny_models import serve_in_process
from tests.agent_fixtures import DOCUMENTS, collect, final, make_agent

PROJECT = Path(__file__).resolve().parents[1]


async def run_cli(argv: list[str], env: dict[str, str], *, cwd: Path) -> tuple[int, str, str]:
    """``megrez-search ARGV`` in a child process (the test's event loop keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "api.cli", *argv),
        cwd=cwd,
        env=env | {"PYTHONPATH": str(PROJECT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode, out.decode(), err.decode()


def web_retriever(fixture_web, fixture_search):
    from retrieval.config import SelectConfig
    from retrieval.fetch import Fetcher
    from retrieval.pipeline import Retriever

    return Retriever(SearchChain([WebSearch(fixture_search)]), Fetcher(fixture_web.fetch_config()), SelectConfig())


@pytest.mark.parametrize("mode", ["auto", "always"])
async def test_turn_on_the_tiny_vllm_engine_ends_with_a_well_formed_answer(
    tiny_engine, fixture_web, fixture_search, mode
):
    agent = make_agent(tiny_engine, web_retriever(fixture_web, fixture_search), answer_tokens=48, related_tokens=48)
    turn = agent.run("Which city is the Eiffel Tower in?", mode=mode)
    events = await collect(turn)
    end = final(events)
    assert isinstance(end, AnswerEvent), end
    answer = end.answer
    assert answer.answer.strip() and answer.mode == mode
    assert "<|" not in answer.answer  # no special token (or its spelling from the tokenizer) leaks
    if mode == "always":
        assert answer.searched and answer.queries and answer.sources
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert answer.answer in streamed or answer.notes  # streamed, or the fallback after a preamble
    assert {c.n for c in answer.citations} <= {s.n for s in answer.sources}
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert turn.record.answer == answer
    assert tiny_engine.llm.get_num_unfinished_requests() == 0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def remote_url(tiny_engine):
    app = await tiny_engine.openai_app("megrez-tiny", [])
    async with serve_in_process(app) as url:
        yield url


async def test_ask_command_against_a_remote_engine_with_a_local_corpus(remote_url, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCUMENTS), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGREZ_")} | {
        "MEGREZ_ENGINE__BACKEND": "openai",
        "MEGREZ_ENGINE__OPENAI_BASE_URL": remote_url,
        "MEGREZ_ENGINE__MODEL": "/nonexistent",  # no local tokenizer: prompts go as text, counted by the server
        "MEGREZ_SEARCH__BACKENDS": '["local"]',
        "MEGREZ_SEARCH__CORPUS_PATH": str(corpus),
        "MEGREZ_SEARCH__INDEX_DIR": str(tmp_path / "index"),
        "MEGREZ_AGENT__ANSWER_TOKENS": "32",
        "MEGREZ_AGENT__RELATED_TOKENS": "32",
        "MEGREZ_AGENT__SEARCH_TEMPERATURE": "0",
    }
    args = ["ask", "Who designed the Eiffel Tower?", "--websearch", "always"]
    code, out, err = await run_cli([*args, "--json"], env, cwd=tmp_path)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["mode"] == "always" and answer["searched"] and answer["sources"]
    assert answer["sources"][0]["url"] in {d["url"] for d in DOCUMENTS}
    # Without --json: the answer on stdout, progress on stderr.
    code, out, err = await run_cli(args, env, cwd=tmp_path)
    assert code == 0, err
    assert "Searching: " in err and "[1] " in err and out.strip()


async def test_ask_command_reports_an_unreachable_engine(tmp_path):
    from scripts.net import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGREZ_")} | {
        "MEGREZ_ENGINE__BACKEND": "openai",
        "MEGREZ_ENGINE__OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "MEGREZ_ENGINE__RETRIES": "0",
    }
    code, out, err = await run_cli(["ask", "hello"], env, cwd=tmp_path)
    assert code == 1 and out == ""
    assert "did not start" in err and "127.0.0.1" in err and "Traceback" not in err


@pytest.mark.parametrize("codes", [ErrorCode, NoteCode, StatusCode], ids=["error", "note", "status"])
def test_event_codes_are_documented(codes):
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    assert [code for code in get_args(codes) if f"`{code}`" not in readme] == []


async def test_two_api_processes_share_one_redis_and_one_remote_engine(remote_url, redis_url, tmp_path):
    """Scale-out: a turn started on one server process resumes, from the middle, on the other."""
    import httpx

    from scripts.net import free_port
    from tests.agent_fixtures import parse_sse

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCUMENTS), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGREZ_")} | {
        "PYTHONPATH": str(PROJECT),
        "MEGREZ_REDIS_URL": redis_url,
        "MEGREZ_ENGINE__BACKEND": "openai",
        "MEGREZ_ENGINE__OPENAI_BASE_URL": remote_url,
        "MEGREZ_ENGINE__MODEL": "/nonexistent",
        "MEGREZ_SEARCH__BACKENDS": '["local"]',
        "MEGREZ_SEARCH__CORPUS_PATH": str(corpus),
        "MEGREZ_SEARCH__INDEX_DIR": str(tmp_path / "index"),
        "MEGREZ_AGENT__ANSWER_TOKENS": "64",
        "MEGREZ_AGENT__RELATED": "false",
    }
    ports = [free_port(), free_port()]
    servers = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "api.cli", "serve", "--port", str(port)),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for port in ports
    ]
    try:
        one, two = (httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) for port in ports)
        async with one, two:
            for client in (one, two):
                for _ in range(300):
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("a server did not become ready")
            seen = ""
            async with one.stream(
                "POST",
                "/chat?websearch=always",
                json={"message": "Who designed the Eiffel Tower?"},
                headers={"Accept": "text/event-stream"},
            ) as response:
                assert response.status_code == 200
                async for text in response.aiter_text():
                    seen += text.replace("\r\n", "\n")
                    if sum(f.get("event") == "sources" for f in parse_sse(seen)) >= 1:
                        break  # the connection drops after the sources
            complete = parse_sse(seen[: seen.rfind("\n\n") + 2])
            meta, last = json.loads(complete[0]["data"]), complete[-1]["id"]
            rest = parse_sse(
                (await two.get(f"/chat/{meta['message_id']}/events", headers={"Last-Event-ID": last})).text
            )
            ids = [tuple(map(int, f["id"].split("-"))) for f in complete[1:] + rest]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)  # nothing twice, nothing out of order
            assert rest[-1]["event"] == "done" and json.loads(rest[-1]["data"])["status"] == "done"
            answer = next(json.loads(f["data"]) for f in rest if f["event"] == "answer")["answer"]
            streamed = "".join(json.loads(f["data"])["text"] for f in complete + rest if f.get("event") == "token")
            assert answer["answer"] in streamed or answer["notes"]
            stored = (await two.get(f"/conversations/{meta['conversation_id']}")).json()
            assert stored["turns"][0]["answer"]["answer"] == answer["answer"]
    finally:
        for server in servers:
            server.terminate()
            await server.wait()
