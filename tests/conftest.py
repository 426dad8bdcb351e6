"""Session-wide test services: a private Redis server and the fixture web, on free ports; and the test
session's environment.

The environment is set here, not in the helpers under ``scripts/``, because the benchmarks share those
helpers and must be free to download a hub model: tests never reach the hub (set before any test module
imports transformers or huggingface_hub, which read it once at import), and vLLM on the CPU gets a 1 GiB
KV cache (its default takes a share of RAM). Child processes the tests start inherit both.

Every test sees only the settings it sets itself (:func:`isolated_settings`): a developer's ``.env`` or
``MEGREZ_*`` shell variables could otherwise break tests or point them at a real Redis. The tests that
start ``megrez-search`` in a child process give it an environment of their own and a ``tmp_path``
working directory, so a ``.env`` in the checkout does not reach it either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from api.settings import Settings
from scripts.net import RedisCluster, RedisServer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Property tests are reproducible: the same examples on every run and machine (no example database),
# so a CI failure is a failure of the code, not of the draw.
settings.register_profile("megrez", derandomize=True, database=None, print_blob=True)
settings.load_profile("megrez")

# What the service reads by default, before isolated_settings turns it off.
PRODUCT_ENV_FILE = Settings.model_config["env_file"]
# Knobs of the test harness itself, not service settings: where the shared data lives, where screenshots go.
HARNESS_VARIABLES = frozenset({"MEGREZ_SHARED_DATA", "MEGREZ_SCREENSHOTS"})

# The session's one embedded vLLM engine (tiny_engine) and tiny checkpoints; the agent tests' corpus and tokenizer;
# pytester, for a test session inside a test (test_settings).
pytest_plugins = ["tests.tiny_models", "tests.agent_fixtures", "pytester"]


@pytest.fixture(scope="session", autouse=True)
def isolated_settings() -> Iterator[None]:
    """No ``MEGREZ_*`` variable from outside the session, and ``Settings()`` reads no ``.env``.

    Session-wide and autouse, so it is in place before every other fixture, module- and session-scoped
    ones included. Passing ``_env_file=`` explicitly still reads that file; tests may set variables.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("MEGREZ_") and name not in HARNESS_VARIABLES]:
            patch.delenv(name)
        patch.setitem(Settings.model_config, "env_file", None)
        yield


@pytest.fixture
def product_dotenv(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Settings()`` reads ``.env`` in the working directory again, as the product does (chdir to one you wrote)."""
    monkeypatch.setitem(Settings.model_config, "env_file", PRODUCT_ENV_FILE)


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
def redis_cluster_url(tmp_path_factory):
    """A Redis Cluster of our own (three masters on loopback ports), as a ``redis+cluster://`` URL."""
    try:
        cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield cluster.url
    cluster.stop()


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
