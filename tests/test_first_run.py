"""The first run, as a newcomer meets it: a service that cannot work yet says why, once, and what to do.

No weights and no hub: one log line naming the two ways forward (a local weights folder, a remote engine),
no traceback, and ``/info.setup`` carries ``engine_weights_missing`` for the page — found before vLLM starts,
not after its retries. A remote engine that does not answer, or another start failure, gets its own code;
so does search with no backend that can work (offline, no corpus), found by a probe in the background.
Nothing here reaches the internet: the hub is off (``HF_HUB_OFFLINE``, or an endpoint on a closed local
port), and every probed address is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import get_args

import httpx
import pytest
from starlette.applications import Starlette

from api.app import create_app
from api.config import AuthConfig
from api.engine_state import SetupCode
from api.memory import LocalMemory
from api.settings import Settings
from engine.vllm_engine import WeightsMissing, check_weights
from retrieval.config import SearchConfig
from retrieval.search.chain import SearchChain
from retrieval.types import SearchResult
from scripts.net import free_port
from scripts.scripted_engine import ScriptedEngine
from scripts.tiny_models import serve_in_process
from tests.agent_fixtures import DOCUMENTS, client_for, make_retriever
from tests.test_engine_faults import BOUND_S, eventually, serve, settings_for

PROJECT = Path(__file__).resolve().parents[1]
WAYS_FORWARD = ("MEGREZ_ENGINE__MODEL=/path/to/weights", "MEGREZ_ENGINE__BACKEND=openai")


async def test_serve_without_weights_or_hub_says_what_to_do_in_one_line(tmp_path: Path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS), encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGREZ_")} | {
        "PYTHONPATH": str(PROJECT),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache: the model is nowhere on this machine
        "MEGREZ_ENGINE__MODEL": "megrez-tests/no-such-model",
        "MEGREZ_SEARCH__BACKENDS": '["local"]',  # search works: only the engine is missing
        "MEGREZ_SEARCH__CORPUS_PATH": str(corpus),
        "MEGREZ_SEARCH__INDEX_DIR": str(tmp_path / "index"),
    }
    command = (sys.executable, "-m", "api.cli", "serve", "--port", str(port))
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=BOUND_S) as client:

            async def hinted() -> bool:
                try:
                    return bool((await client.get("/info")).json()["setup"])
                except httpx.TransportError:  # not listening yet
                    return False

            await eventually(hinted, "/info names what to set up")
            info = (await client.get("/info")).json()
            assert info["engine"] == "unavailable" and not info["ready"]
            assert info["setup"] == [
                {"code": "engine_weights_missing", "params": {"model": "megrez-tests/no-such-model"}}
            ]
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and all(way in ready.json()["problems"][0] for way in WAYS_FORWARD)
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    log = [line for line in err.decode().splitlines() if "uvicorn.access" not in line]
    assert "Traceback" not in err.decode() and "Retrying" not in err.decode()
    (said,) = [line for line in log if all(way in line for way in WAYS_FORWARD)]
    assert "megrez-tests/no-such-model" in said and "HF_HUB_OFFLINE" in said
    assert [line for line in log if " ERROR " in line] == [said]
    assert len(log) <= 15, "\n".join(log)  # uvicorn's start and shutdown, the in-process memory, the one line


def test_weights_are_found_here_or_through_a_hub_that_answers(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    check_weights(str(tmp_path))  # a local folder: vLLM reads it
    with pytest.raises(WeightsMissing, match="HF_HUB_OFFLINE") as missing:
        check_weights("megrez-tests/no-such-model")  # the tests run with the hub off
    assert missing.value.model == "megrez-tests/no-such-model" and all(w in str(missing.value) for w in WAYS_FORWARD)
    with pytest.raises(WeightsMissing, match="neither a folder on this machine nor a Hugging Face hub id"):
        check_weights(str(tmp_path / "not" / "there"))
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "true")
    check_weights("megrez-tests/no-such-model")  # vLLM fetches from ModelScope then, whose cache is not ours to judge
    monkeypatch.delenv("VLLM_USE_MODELSCOPE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # a hub nobody answers for
    with pytest.raises(WeightsMissing, match="the hub .* cannot be reached .*ConnectError"):
        check_weights("megrez-tests/no-such-model")


async def test_a_hub_that_answers_leaves_the_download_to_vllm(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    async with serve_in_process(Starlette()) as url:  # answers 404 to everything: the hub is there
        monkeypatch.setattr(constants, "ENDPOINT", url)
        await asyncio.to_thread(check_weights, "megrez-tests/no-such-model")


async def test_a_remote_engine_that_does_not_answer_is_named_to_key_holders_only(corpus_backend):
    dead = f"http://127.0.0.1:{free_port()}"
    async with serve(settings_for(dead), corpus_backend) as client:
        await eventually(lambda: _setup(client), "/info names the unreachable server")
        assert await _setup(client) == [{"code": "engine_server_unreachable", "params": {}}]  # visitors: no address
    settings = settings_for(dead).model_copy(update={"auth": AuthConfig(api_keys=["k"])})
    async with serve(settings, corpus_backend) as client:
        client.headers["Authorization"] = "Bearer k"
        await eventually(lambda: _setup(client), "/info names the unreachable server")
        assert await _setup(client) == [{"code": "engine_server_unreachable", "params": {"url": dead}}]


async def test_another_start_failure_is_engine_failed_and_a_start_clears_the_hint(tokenizer_dir, corpus_backend):
    class Broken(ScriptedEngine):
        async def start(self) -> None:
            raise OSError("CUDA out of memory")

    app = create_app(
        Settings(), engine=Broken(tokenizer_dir), memory=LocalMemory(), retriever=make_retriever(corpus_backend)
    )
    async with (
        app.router.lifespan_context(app),
        serve_in_process(app) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        await eventually(lambda: _setup(client), "/info says the engine failed")
        assert await _setup(client) == [{"code": "engine_failed", "params": {}}]  # the detail: log and /readyz
    app = create_app(
        Settings(), engine=ScriptedEngine(tokenizer_dir), memory=LocalMemory(), retriever=make_retriever(corpus_backend)
    )
    async with client_for(app) as client:
        assert await _setup(client) == []


async def test_no_search_backend_that_can_work_is_said_once(tokenizer_dir, caplog):
    dead = f"http://127.0.0.1:{free_port()}"  # a SearXNG that is not there, and no corpus
    settings = Settings(search=SearchConfig(backends=["searxng", "local"], searxng_url=dead))
    app = create_app(settings, engine=ScriptedEngine(tokenizer_dir), memory=LocalMemory())
    with caplog.at_level(logging.WARNING, logger="retrieval.search.chain"):
        async with client_for(app) as client:
            await eventually(lambda: _setup(client), "/info says search cannot work")
            assert await _setup(client) == [{"code": "search_no_backend", "params": {"backends": "searxng, local"}}]
    (said,) = [r.getMessage() for r in caplog.records if r.name == "retrieval.search.chain"]
    assert f"cannot reach {dead}" in said and "corpus_path is not set" in said and "MEGREZ_SEARCH__CORPUS_PATH" in said


class _Answers:
    name = "web"

    async def search(self, query, *, k, language=None, time_range=None):
        return [
            SearchResult(title="Otters", url="https://o.example/", snippet="Otters hold hands.", rank=1, engine="web")
        ]

    async def aclose(self) -> None:
        pass


async def test_the_search_probe_asks_each_backends_service_and_a_search_that_works_clears_it():
    dead = f"http://127.0.0.1:{free_port()}"
    chain = SearchChain([_Answers()], probes={"web": dead}, skipped=[("local", "search.corpus_path is not set")])
    assert chain.probe() is chain.probe()  # once
    await chain.probe()
    assert [name for name, _ in chain.unreachable] == ["web", "local"] and "ConnectError" in chain.unreachable[0][1]
    assert (await chain.search("otters")).results and chain.unreachable is None
    async with serve_in_process(Starlette()) as url:  # any answer, a 404 included: the service is there
        reachable = SearchChain([_Answers()], probes={"web": url})
        await reachable.probe()
        assert reachable.unreachable is None
    unprobed = SearchChain([_Answers()])  # a backend without an address (a corpus, a test's) counts as working
    await unprobed.probe()
    assert unprobed.unreachable is None


def test_setup_codes_are_documented():
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    assert [code for code in get_args(SetupCode) if f"`{code}`" not in readme] == []


async def _setup(client: httpx.AsyncClient) -> list[dict]:
    return (await client.get("/info")).json()["setup"]
