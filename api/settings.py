"""All service settings in one place: environment variables prefixed ``MEGREZ_`` or a ``.env`` file.

Nested sections use ``__``: ``MEGREZ_FETCH__DEADLINE_S=3`` sets ``settings.fetch.deadline_s``.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.config import AgentConfig
from api.config import ApiConfig, AuthConfig, RateConfig
from engine.config import EngineConfig
from retrieval.cache import CLUSTER_SUFFIX, is_cluster
from retrieval.config import FetchConfig, SearchConfig, SelectConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEGREZ_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis for caches and memory, e.g. redis://localhost:6379/0; unset = in-process."
    )
    redis_cluster: bool = Field(
        default=False,
        description="Redis Cluster (or a managed cluster-mode service): redis_url then names any node, and becomes "
        "redis+cluster://… (rediss+cluster://… with TLS), the form every Redis client of the service reads.",
    )
    search: SearchConfig = SearchConfig()
    fetch: FetchConfig = FetchConfig()
    select: SelectConfig = SelectConfig()
    engine: EngineConfig = EngineConfig()
    agent: AgentConfig = AgentConfig()
    api: ApiConfig = ApiConfig()
    auth: AuthConfig = AuthConfig()
    rate: RateConfig = RateConfig()

    @model_validator(mode="after")
    def _cluster_url(self) -> Settings:
        # The URL carries the mode, so the caches, the memory store and the rate limiter, each handed only the URL,
        # all pick the cluster client (retrieval/cache.py: redis_client).
        if self.redis_url is not None and is_cluster(self.redis_url):
            self.redis_cluster = True
        elif self.redis_url is not None and self.redis_cluster:
            scheme, _, rest = self.redis_url.partition("://")
            self.redis_url = f"{scheme}{CLUSTER_SUFFIX}://{rest}"
        return self
