"""All service settings in one place: environment variables prefixed ``MEGREZ_`` or a ``.env`` file.

Nested sections use ``__``: ``MEGREZ_FETCH__DEADLINE_S=3`` sets ``settings.fetch.deadline_s``.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.config import AgentConfig
from api.config import ApiConfig, AuthConfig, RateConfig
from engine.config import EngineConfig
from retrieval.config import FetchConfig, SearchConfig, SelectConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEGREZ_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis for caches and memory, e.g. redis://localhost:6379/0; unset = in-process."
    )
    search: SearchConfig = SearchConfig()
    fetch: FetchConfig = FetchConfig()
    select: SelectConfig = SelectConfig()
    engine: EngineConfig = EngineConfig()
    agent: AgentConfig = AgentConfig()
    api: ApiConfig = ApiConfig()
    auth: AuthConfig = AuthConfig()
    rate: RateConfig = RateConfig()
