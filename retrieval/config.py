"""Settings sections of the retrieval stack (composed into ``api.settings.Settings``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class SearchConfig(BaseModel):
    backends: list[str] = Field(
        default=["ddgs", "local"],
        description="Fallback chain, tried in order: ddgs, searxng, serper, local.",
    )
    k: int = Field(default=8, ge=1, le=50, description="Results per query.")
    timeout_s: float = Field(default=6.0, gt=0, description="Per-backend time limit.")
    cache_ttl_s: int = Field(default=3600, ge=0, description="Result cache lifetime; 0 disables it.")
    language: str | None = Field(default=None, description="Default region/language, e.g. 'zh-cn'.")
    searxng_url: str | None = Field(default=None, description="Base URL of a SearXNG instance.")
    serper_api_key: str | None = Field(default=None, description="Key for serper.dev (Google results).")
    corpus_path: Path | None = Field(
        default=None, description="Local corpus: a folder of HTML/Markdown/text files or a JSONL of documents."
    )
    index_dir: Path = Field(default=Path(".megrez/index"), description="Where the local BM25 index is kept.")


class FetchConfig(BaseModel):
    deadline_s: float = Field(default=4.0, gt=0, description="Whole fetch phase; late pages fall back to snippets.")
    page_timeout_s: float = Field(default=3.0, gt=0, description="One page, connect to last byte.")
    max_bytes: int = Field(default=3_000_000, gt=0, description="Stop reading a body past this size.")
    max_redirects: int = Field(default=5, ge=0)
    concurrency: int = Field(default=16, ge=1, description="Pages in flight at once.")
    per_host_concurrency: int = Field(default=4, ge=1, description="Pages in flight per host.")
    user_agent: str = Field(
        default=(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
        )
    )
    cache_ttl_s: int = Field(default=900, ge=0, description="Page cache lifetime; 0 disables it.")
    allow_private: list[str] = Field(
        default=[],
        description="Hosts or CIDR ranges exempt from the SSRF guard (e.g. '127.0.0.1/32').",
    )
    route_map: dict[str, str] = Field(
        default={},
        description=(
            "Send requests for an origin ('https://example.org', or '*' for all) to another base URL "
            "(a mirror or the fixture web), keeping the original Host header."
        ),
    )


class SelectConfig(BaseModel):
    budget_tokens: int = Field(default=3000, ge=100, description="Tokens of context given to the model.")
    passage_tokens: int = Field(default=120, ge=32, description="Target passage size when chunking pages.")
