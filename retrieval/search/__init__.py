"""Search backends behind one interface, the fallback chain and the result cache."""

from retrieval.search.base import (
    BackendMisconfigured,
    BackendUnavailable,
    RateLimited,
    SearchBackend,
    SearchError,
    TimeRange,
)
from retrieval.search.chain import SearchChain, SearchOutcome
from retrieval.search.factory import BACKEND_NAMES, build_search

__all__ = [
    "BACKEND_NAMES",
    "BackendMisconfigured",
    "BackendUnavailable",
    "RateLimited",
    "SearchBackend",
    "SearchChain",
    "SearchError",
    "SearchOutcome",
    "TimeRange",
    "build_search",
]
