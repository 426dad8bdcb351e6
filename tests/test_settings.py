"""Settings come from MEGREZ_* variables and .env, and the README documents every one; the tests see
neither a developer's .env nor their MEGREZ_* variables (``isolated_settings`` in conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from api.settings import Settings
from retrieval.config import SelectConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STRAY_DOTENV = "MEGREZ_REDIS_URL=redis://nowhere:6379/0\nMEGREZ_SELECT__BUDGET_TOKENS=1234\n"


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


def test_dotenv_file_is_read(product_dotenv, monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("MEGREZ_SELECT__BUDGET_TOKENS=1234\nMEGREZ_REDIS_URL=redis://r:1/0\n")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.select.budget_tokens == 1234
    assert settings.redis_url == "redis://r:1/0"


def test_tests_do_not_read_a_dotenv_in_the_working_directory(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text(STRAY_DOTENV)
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.redis_url is None
    assert settings.select.budget_tokens == SelectConfig().budget_tokens
    # The file is valid and an explicit _env_file (as test_compose passes) still reads it.
    explicit = Settings(_env_file=".env")
    assert explicit.redis_url == "redis://nowhere:6379/0" and explicit.select.budget_tokens == 1234


def test_a_developers_dotenv_and_shell_variables_reach_no_test(pytester, monkeypatch):
    """The whole chain as a developer meets it: pytest started in a folder with a ``.env``, from a shell with
    ``MEGREZ_*`` variables. A module-scoped fixture (set up before any function-scoped one) and the test
    both get the defaults."""
    (pytester.path / ".env").write_text(STRAY_DOTENV)
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]')
    pytester.makepyfile(
        test_isolated="""
            import os

            import pytest

            from api.settings import Settings
            from retrieval.config import FetchConfig, SelectConfig


            @pytest.fixture(scope="module")
            def early():
                return Settings()


            def test_defaults(early):
                assert "MEGREZ_REDIS_URL" not in os.environ and "MEGREZ_FETCH__DEADLINE_S" not in os.environ
                for settings in (early, Settings()):
                    assert settings.redis_url is None
                    assert settings.select.budget_tokens == SelectConfig().budget_tokens
                    assert settings.fetch.deadline_s == FetchConfig().deadline_s
            """
    )
    monkeypatch.setenv("MEGREZ_REDIS_URL", "redis://nowhere:6379/1")
    monkeypatch.setenv("MEGREZ_FETCH__DEADLINE_S", "0.01")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_invalid_values_are_rejected_with_the_field_named(monkeypatch):
    monkeypatch.setenv("MEGREZ_FETCH__DEADLINE_S", "-1")
    with pytest.raises(ValidationError, match="deadline_s"):
        Settings()


def test_readme_documents_every_setting():
    readme = README.read_text(encoding="utf-8")
    missing = [name for name in env_names() if f"`{name}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"
