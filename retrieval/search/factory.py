"""Build the configured fallback chain from ``SearchConfig``.

A backend whose settings are missing is left out, with a warning — except one of the default chain
that was never set up (``local`` without ``search.corpus_path``: most installations have no corpus),
which is no news and goes to the info log.
"""

from __future__ import annotations

import logging

import httpx

from retrieval.cache import Cache
from retrieval.config import SearchConfig
from retrieval.search.base import SearchBackend
from retrieval.search.chain import SearchChain
from retrieval.search.duckduckgo import DuckDuckGoBackend
from retrieval.search.local import LocalCorpusBackend
from retrieval.search.searxng import SearxngBackend
from retrieval.search.serper import SERPER_URL, SerperBackend

log = logging.getLogger(__name__)

BACKEND_NAMES = ("ddgs", "searxng", "serper", "local")
DUCKDUCKGO_URL = "https://duckduckgo.com"  # ddgs scrapes several engines; DuckDuckGo answering means the web is there


def build_search(
    config: SearchConfig, cache: Cache | None = None, *, client: httpx.AsyncClient | None = None
) -> SearchChain:
    """The chain of ``config.backends`` in order, leaving out those that lack their settings.

    HTTP backends share ``client`` (the caller keeps ownership), or one client made here that
    the chain closes. ``cache=None`` turns result caching off.
    """
    unknown = [name for name in config.backends if name not in BACKEND_NAMES]
    if unknown:
        raise ValueError(f"unknown search backend(s) {', '.join(unknown)}; valid: {', '.join(BACKEND_NAMES)}")

    usable: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in dict.fromkeys(config.backends):
        if missing := _missing_setting(name, config):
            unset, reason = missing
            default = unset and "backends" not in config.model_fields_set
            log.log(logging.INFO if default else logging.WARNING, "search backend %s skipped: %s", name, reason)
            skipped.append((name, reason))
        else:
            usable.append(name)
    if not usable:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped) or "search.backends is empty"
        raise ValueError(f"no usable search backend ({reasons})")

    own_client = None
    if client is None and {"searxng", "serper"} & set(usable):
        client = own_client = httpx.AsyncClient(
            timeout=config.timeout_s, follow_redirects=True, headers={"User-Agent": "megrez-search"}
        )
    backends: list[SearchBackend] = []
    for name in usable:
        if name == "ddgs":
            backends.append(DuckDuckGoBackend(timeout_s=config.timeout_s))
        elif name == "searxng":
            backends.append(SearxngBackend(config.searxng_url, client))
        elif name == "serper":
            backends.append(SerperBackend(config.serper_api_key, client))
        else:
            backends.append(LocalCorpusBackend(config.corpus_path, config.index_dir))

    return SearchChain(
        backends,
        cache=cache,
        timeout_s=config.timeout_s,
        cache_ttl_s=config.cache_ttl_s,
        k=config.k,
        language=config.language,
        client=own_client,
        skipped=skipped,
        probes={"ddgs": DUCKDUCKGO_URL, "serper": SERPER_URL, "searxng": config.searxng_url or ""},
    )


def _missing_setting(name: str, config: SearchConfig) -> tuple[bool, str] | None:
    """Why backend ``name`` cannot be built, and whether that is because its setting is unset (not wrong)."""
    if name == "searxng" and not config.searxng_url:
        return True, "search.searxng_url is not set"
    if name == "serper" and not config.serper_api_key:
        return True, "search.serper_api_key is not set"
    if name == "local":
        if config.corpus_path is None:
            return True, "search.corpus_path is not set"
        if not config.corpus_path.exists():
            return False, f"corpus {config.corpus_path} does not exist"
    return None
