"""Self-hosting files without a Docker engine: the compose file against the Compose specification's
JSON schema (as shipped by the check-jsonschema package), the services the API's settings name,
SearXNG's settings, the Dockerfile's base and user, and ``.env.example`` read by the real settings."""

from __future__ import annotations

import importlib.resources
import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from api.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_compose_file_follows_the_compose_specification(compose):
    schema = json.loads(
        (importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    )
    jsonschema.validators.validator_for(schema)(schema).validate(compose)
    broken = dict(compose, services={"api": {"image": "x", "ports": {"not": "a list"}}})
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject a bad file
        jsonschema.validators.validator_for(schema)(schema).validate(broken)


def test_every_service_the_api_settings_name_exists(compose, monkeypatch):
    services = compose["services"]
    assert {"api", "redis", "searxng"} <= set(services)
    environment = services["api"]["environment"]
    for name, value in environment.items():
        monkeypatch.setenv(name, re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value)))  # compose's ${X:-default}
    settings = Settings(_env_file=None)
    assert settings.search.backends[:2] == ["searxng", "ddgs"]  # SearXNG first, DuckDuckGo behind it
    assert urlsplit(settings.redis_url).hostname in services
    assert urlsplit(settings.search.searxng_url).hostname in services
    assert set(services["api"]["depends_on"]) == {"redis", "searxng"}
    gpu = services["api"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert "/models" in " ".join(services["api"]["volumes"]) and settings.engine.model


def test_redis_persists_and_reports_health(compose):
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "redis-cli" in redis["healthcheck"]["test"]


def test_searxng_settings_enable_json_without_the_limiter(compose):
    mount = next(v for v in compose["services"]["searxng"]["volumes"] if v.endswith("/etc/searxng/settings.yml:ro"))
    settings = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    assert "json" in settings["search"]["formats"]
    assert settings["server"]["limiter"] is False
    assert "duckduckgo" in settings["use_default_settings"]["engines"]["keep_only"]


def test_the_dockerfile_uses_the_pinned_vllm_image_a_user_readyz_and_the_built_page():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    version = next(p for p in pins if p.startswith("vllm==")).split("==")[1]
    assert re.search(rf"^FROM vllm/vllm-openai:v{re.escape(version)}$", dockerfile, re.M)
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "/readyz" in re.search(r"^HEALTHCHECK.*(?:\n .*)*", dockerfile, re.M).group(0)
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        *sources, _ = line.split()
        if sources[0].startswith("--from="):
            continue
        for copied in sources:
            assert (ROOT / copied).exists(), copied
    # The web page is built from the lock file in a Node stage; the final image takes only its output.
    assert re.search(r"^RUN npm ci\b", dockerfile, re.M)
    assert re.search(r"^COPY --from=web /web/dist \./api/web/dist$", dockerfile, re.M)


def test_env_example_is_read_by_the_real_settings():
    settings = Settings(_env_file=ROOT / ".env.example")
    assert settings.auth.api_keys == [] and settings.rate.requests == "300/minute"
    assert settings.rate.concurrent_turns == 8
