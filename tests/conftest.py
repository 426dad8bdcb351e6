"""Session-wide test services: a private Redis server and the fixture web, on free ports."""

from __future__ import annotations

import pytest

from scripts.net import RedisServer

# The session's one embedded vLLM engine (tiny_engine) and tiny checkpoints; the agent tests' corpus and tokenizer.
pytest_plugins = ["tests.tiny_models", "tests.agent_fixtures"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A redis-server of our own (never the machine's shared one on 6379)."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server.url
    server.stop()


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
