"""Session-wide test services: a private Redis server and the fixture web, on free ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from tests.net import free_port

# The session's one embedded vLLM engine (tiny_engine) and tiny checkpoints; the agent tests' corpus and tokenizer.
pytest_plugins = ["tests.tiny_models", "tests.agent_fixtures"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A redis-server of our own (never the machine's shared one on 6379)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; the test command installs it (make test)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def fixture_web():
    """The fixture web (``scripts.fixture_web``) on a free port, shared by the session.

    ``fixture_web.fetch_config(**overrides)`` routes every origin to it and allows its address;
    ``fixture_web.search_backend()`` is a local search over its pages (index built on first use).
    """
    from scripts.fixture_web import FixtureWeb

    web = FixtureWeb().start()
    yield web
    web.stop()


@pytest.fixture(scope="session")
def fixture_search(fixture_web):
    """``LocalCorpusBackend`` over every page of the fixture web (built once per session)."""
    return fixture_web.search_backend()
