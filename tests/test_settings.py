"""Settings come from MEGREZ_* variables and .env, and the README documents every one."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from api.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def env_names() -> list[str]:
    names = []
    for name, field in Settings.model_fields.items():
        if isinstance(field.default, BaseModel):
            names += [f"MEGREZ_{name}__{sub}".upper() for sub in type(field.default).model_fields]
        else:
            names.append(f"MEGREZ_{name}".upper())
    return names


def test_nested_environment_variables_and_json_lists(monkeypatch):
    monkeypatch.setenv("MEGREZ_FETCH__DEADLINE_S", "2.5")
    monkeypatch.setenv("MEGREZ_SEARCH__BACKENDS", '["searxng", "local"]')
    monkeypatch.setenv("MEGREZ_FETCH__ROUTE_MAP", '{"*": "http://127.0.0.1:9"}')
    settings = Settings()
    assert settings.fetch.deadline_s == 2.5
    assert settings.search.backends == ["searxng", "local"]
    assert settings.fetch.route_map == {"*": "http://127.0.0.1:9"}


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("MEGREZ_SELECT__BUDGET_TOKENS=1234\nMEGREZ_REDIS_URL=redis://r:1/0\n")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.select.budget_tokens == 1234
    assert settings.redis_url == "redis://r:1/0"


def test_invalid_values_are_rejected_with_the_field_named(monkeypatch):
    monkeypatch.setenv("MEGREZ_FETCH__DEADLINE_S", "-1")
    with pytest.raises(ValidationError, match="deadline_s"):
        Settings()


def test_readme_documents_every_setting():
    readme = README.read_text(encoding="utf-8")
    missing = [name for name in env_names() if f"`{name}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"
