"""Several API processes on one port (``api/workers.py``), run as an operator runs them: real processes.

What each test shows: the port is served by every worker (a turn sent on a new connection lands on
either; ``megrez_worker_turns{pid}`` says which, and ``/metrics`` from any worker counts the host's
turns); the embedded engine runs one engine core for both frontends (one process, one model load) on
the tiny Megrez-3B-Omni, which only loads where our plugin did — the parent, both frontends and the core;
a worker killed stops the whole service with status 1 and a SIGTERM with status 0, leaving no process
behind, engine core included; workers whose parent is SIGKILLed stop by themselves; and what is refused
(several workers without Redis, a port in use) is refused before anything starts.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from api.settings import Settings
from api.workers import ServeFailed, listen_sockets, refusal
from scripts.net import free_port
from scripts.scripted_server import ScriptedServerProcess
from tests.agent_fixtures import DOCUMENTS

PROJECT = Path(__file__).resolve().parents[1]
ANSWER = "Two workers, one port.<|turn_end|>"


def child_env(**settings: str) -> dict[str, str]:
    """This environment without the developer's ``MEGREZ_*`` settings and vLLM's logging switches (an in-process
    ``megrez-search ask`` of an earlier test sets them for good), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGREZ_", "VLLM_LOGGING_"))}
    return env | {"PYTHONPATH": str(PROJECT)} | settings


def local_search(folder: Path) -> dict[str, str]:
    """Settings for the local corpus backend (the tests never search the internet)."""
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCUMENTS), encoding="utf-8")
    return {
        "MEGREZ_SEARCH__BACKENDS": '["local"]',
        "MEGREZ_SEARCH__CORPUS_PATH": str(corpus),
        "MEGREZ_SEARCH__INDEX_DIR": str(folder / "index"),
    }


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as stderr:
        return subprocess.Popen(command, cwd=log.parent, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def serve(port: int, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    return start([sys.executable, "-m", "api.cli", "serve", "--port", str(port), *args], env, log)


def metric(base_url: str, name: str) -> dict[str, float]:
    """The samples of ``name`` on ``/metrics``, by their labels as written."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {labels: float(value) for labels, value in re.findall(rf"^{name}(\S*) (\S+)$", text, re.MULTILINE)}


def worker_turns(base_url: str) -> dict[int, float]:
    """The turns each worker has finished, by pid (those that have finished any)."""
    samples = metric(base_url, "megrez_worker_turns").items()
    return {int(re.search(r"\d+", labels)[0]): n for labels, n in samples if n > 0}


def turn(base_url: str) -> bool:
    """One turn on a connection of its own (the kernel picks its worker): answered, or not yet possible
    (nothing listening yet, the engine still loading: 503)."""
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            response = client.post(
                "/chat?websearch=off", json={"message": "hi"}, headers={"Accept": "application/json"}
            )
    except httpx.TransportError:
        return False
    if response.status_code == 503 and "engine loading" in response.text:
        return False
    assert response.status_code == 200 and response.json()["status"] == "done", response.text
    return True


def until_every_worker_answered(base_url: str, server: subprocess.Popen, workers: int, log: Path) -> dict[int, float]:
    """Rounds of four turns at once until every worker has answered one; then the turns each answered, by pid."""
    deadline = time.monotonic() + 300
    with ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            if not all(pool.map(turn, [base_url] * 4)):
                time.sleep(0.5)
            elif len(turns := worker_turns(base_url)) == workers:
                return turns
    raise AssertionError(f"not every worker answered a turn within 300 s: {worker_turns(base_url)}")


def until(condition, timeout_s: float = 30.0) -> bool:
    """Whether ``condition()`` comes true within ``timeout_s``, asking every 0.2 s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def assert_all_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=30)
    left = [(p.pid, " ".join(p.cmdline())[:80]) for p in alive]
    for process in alive:
        process.kill()
    assert not left, f"left behind: {left}"


def stop_tree(server: subprocess.Popen) -> None:
    """Whatever a failed test left: every process of the tree killed."""
    if server.poll() is None:
        for process in reversed(tree(server.pid)):
            process.kill()
        server.wait(timeout=30)


def kill_a_worker_and_check_the_service_stopped(server, turns, log: Path) -> None:
    everything = tree(server.pid)
    assert set(turns) <= {p.pid for p in psutil.Process(server.pid).children()}  # the workers are its children
    victim = min(turns)
    os.kill(victim, signal.SIGKILL)
    assert server.wait(timeout=120) == 1
    assert f"(pid {victim}) died (killed by SIGKILL); the other processes were stopped" in log.read_text()
    assert_all_gone(everything)


# --- refused before anything starts ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["option", "setting"])
def test_several_workers_without_redis_are_refused(tmp_path, how):
    env = child_env(MEGREZ_ENGINE__BACKEND="openai", MEGREZ_ENGINE__OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}")
    args = ["--workers", "2"] if how == "option" else []
    if how == "setting":
        env["MEGREZ_API__WORKERS"] = "2"
    server = serve(free_port(), env, tmp_path / "serve.log", *args)
    try:
        assert server.wait(timeout=120) == 2
    finally:
        stop_tree(server)
    said = (tmp_path / "serve.log").read_text()
    assert "2 workers need MEGREZ_REDIS_URL" in said and "Traceback" not in said


def test_refusal_names_what_is_missing():
    assert refusal(Settings(), 1) is None
    assert refusal(Settings(redis_url="redis://127.0.0.1:1/0"), 4) is None
    assert "MEGREZ_REDIS_URL" in refusal(Settings(), 2)


def test_a_port_something_listens_on_is_refused_even_with_reuseport():
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # would let our sockets join it silently
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ServeFailed, match=f"cannot listen on 127.0.0.1:{port}"):
            listen_sockets("127.0.0.1", port, 2)


def test_worker_sockets_share_the_port():
    sockets = listen_sockets("127.0.0.1", port := free_port(), 3)
    try:
        assert {s.getsockname() for s in sockets} == {("127.0.0.1", port)}
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
    finally:
        for s in sockets:
            s.close()


# --- plain workers -------------------------------------------------------------------------------------


@pytest.fixture
def model_server(tokenizer_dir):
    # 8 s a turn (8 pieces of 3 characters): one runs long enough to be seen from the other worker.
    server = ScriptedServerProcess(tokenizer_dir, "--answer", ANSWER, "--delay-s", "1").start()
    yield server
    server.stop()


def test_remote_engine_two_workers_serve_the_port_and_one_killed_stops_all(model_server, redis_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = child_env(
        MEGREZ_REDIS_URL=redis_url,
        MEGREZ_ENGINE__BACKEND="openai",
        MEGREZ_ENGINE__OPENAI_BASE_URL=model_server.url,
        MEGREZ_ENGINE__MODEL="/nonexistent",
        **local_search(tmp_path),
    )
    server = serve(port, env, log, "--workers", "2")
    try:
        turns = until_every_worker_answered(f"http://127.0.0.1:{port}", server, 2, log)
        base_url = f"http://127.0.0.1:{port}"
        answered = metric(base_url, "megrez_turns_total")['{outcome="answered"}']
        assert answered == sum(turns.values())  # /metrics from either worker counts the host
        sse = {"Accept": "text/event-stream"}
        with (
            httpx.Client(base_url=base_url, timeout=60) as client,
            client.stream("POST", "/chat?websearch=off", json={"message": "hi"}, headers=sse) as stream,
        ):
            # One iterator for the whole stream: a dropped one closes the response, and the server its stream.
            lines = stream.iter_lines()
            assert next(lines) == "id: 0-0"  # meta: the turn runs on one worker: /metrics says so from either
            assert metric(base_url, "megrez_active_streams") == {"": 1.0}
            assert until(lambda: metric(base_url, "megrez_turns_running") == {"": 1.0})  # written every second
            assert "event: done" in list(lines)
        assert until(lambda: metric(base_url, "megrez_turns_running") == {"": 0.0})
        kill_a_worker_and_check_the_service_stopped(server, turns, log)
    finally:
        stop_tree(server)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_scripted_service_workers_end_with_their_parent(tokenizer_dir, redis_url, tmp_path, signum):
    """SIGTERM: the parent stops its workers, status 0. SIGKILL: nobody can, and the workers stop by themselves."""
    port, log = free_port(), tmp_path / "service.log"
    command = [sys.executable, "-m", "scripts.scripted_service", "--port", str(port), "--redis-url", redis_url]
    command += ["--tokenizer", str(tokenizer_dir), "--answer", ANSWER, "--workers", "2"]
    server = start(command, child_env(), log)
    try:
        until_every_worker_answered(f"http://127.0.0.1:{port}", server, 2, log)
        everything = tree(server.pid)
        server.send_signal(signum)
        assert server.wait(timeout=60) == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
        assert_all_gone(everything)
    finally:
        stop_tree(server)


# --- the embedded engine: one engine core, two frontends --------------------------------------------


def test_vllm_multi_frontend_machinery_is_what_we_call():
    """The vLLM 0.32 internals api/workers.py and engine/vllm_engine.py use, as they use them."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.utils import CoreEngineLaunch, bind_engine_zmq_listeners, launch_core_engines
    from vllm.v1.utils import APIServerProcessManager, wait_for_completion_or_failure

    def params(function) -> set[str]:
        return set(inspect.signature(function).parameters)

    assert {"vllm_config", "num_api_servers"} <= params(bind_engine_zmq_listeners)
    assert {"vllm_config", "executor_class", "log_stats", "addresses"} <= params(launch_core_engines)
    assert "watched_frontend_processes" in CoreEngineLaunch.__dataclass_fields__
    assert {"listen_address", "sock", "args", "num_servers", "input_listeners", "output_listeners"} <= params(
        APIServerProcessManager
    )
    assert {"target_server_fn", "stats_update_address", "tensor_queue"} <= params(APIServerProcessManager)
    assert {"api_server_manager", "engine_manager", "coordinator"} <= params(wait_for_completion_or_failure)
    assert {"client_addresses", "client_count", "client_index"} <= params(AsyncLLM.from_vllm_config)


@pytest.mark.slow
def test_embedded_engine_two_frontends_one_engine_core(redis_url, tmp_path):
    from scripts.tiny_omni import build_tiny_megrezo

    model, _ = build_tiny_megrezo(tmp_path / "tiny-megrezo")
    port, log = free_port(), tmp_path / "serve.log"
    env = child_env(
        MEGREZ_REDIS_URL=redis_url,
        MEGREZ_ENGINE__MODEL=str(model),
        MEGREZ_ENGINE__DTYPE="float32",
        MEGREZ_ENGINE__MAX_MODEL_LEN="2048",
        MEGREZ_ENGINE__ENFORCE_EAGER="true",
        MEGREZ_ENGINE__LIMIT_MM_PER_PROMPT='{"image": 1, "audio": 1}',
        MEGREZ_AGENT__ANSWER_TOKENS="16",
        MEGREZ_AGENT__RELATED="false",
        **local_search(tmp_path),
    )
    server = serve(port, env, log, "--workers", "2")
    try:
        base_url = f"http://127.0.0.1:{port}"
        # A MegrezO config loads only where our plugin registered it: both frontends answering proves it
        # loaded there, in the parent (which built the core's config) and in the core (which built the model).
        turns = until_every_worker_answered(base_url, server, 2, log)
        assert httpx.get(f"{base_url}/info", timeout=30).json()["media"] == ["audio", "image"]
        cores = [p for p in tree(server.pid) if "EngineCore" in " ".join(p.cmdline())]
        assert len(cores) == 1 and cores[0].ppid() == server.pid
        assert log.read_text().count("Loading weights took") == 1  # the model loaded once, in that core
        kill_a_worker_and_check_the_service_stopped(server, turns, log)
    finally:
        stop_tree(server)
