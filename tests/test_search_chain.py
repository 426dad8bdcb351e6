"""The fallback chain, per-backend time limits, the result cache and the factory."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import httpx
import pytest
from ddgs.exceptions import DDGSException, RatelimitException

from retrieval.cache import MemoryCache, RedisCache
from retrieval.config import SearchConfig
from retrieval.search import duckduckgo
from retrieval.search.base import BackendMisconfigured, RateLimited
from retrieval.search.chain import SearchChain, SearchOutcome, cache_key
from retrieval.search.duckduckgo import DuckDuckGoBackend
from retrieval.search.factory import BACKEND_NAMES, build_search
from retrieval.search.local import LocalCorpusBackend
from retrieval.search.searxng import SearxngBackend
from retrieval.search.serper import SerperBackend
from retrieval.types import SearchResult


def hit(url: str, rank: int = 1, engine: str = "fake") -> SearchResult:
    return SearchResult(title=f"title {url}", url=url, snippet="snippet", rank=rank, engine=engine, published=None)


class FakeBackend:
    """Answers from a script: a list of results, an exception to raise, or a delay first."""

    def __init__(self, name: str, answer: list[SearchResult] | Exception = (), delay_s: float = 0.0) -> None:
        self.name = name
        self.answer = answer
        self.delay_s = delay_s
        self.calls: list[dict] = []
        self.closed = False

    async def search(self, query, *, k, language=None, time_range=None) -> list[SearchResult]:
        self.calls.append({"query": query, "k": k, "language": language, "time_range": time_range})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)

    async def aclose(self) -> None:
        self.closed = True


def patch_ddgs(monkeypatch, exc: Exception) -> None:
    class FakeDDGS:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def text(self, query: str, **kwargs) -> list[dict]:
            raise exc

    monkeypatch.setattr(duckduckgo, "DDGS", FakeDDGS)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (RatelimitException("https://html.duckduckgo.com/html 202 Ratelimit"), "rate limited"),
        (DDGSException("No results found."), "no results"),
    ],
)
async def test_ddgs_rate_limit_or_empty_falls_back_and_says_why(monkeypatch, exc, reason):
    patch_ddgs(monkeypatch, exc)
    backup = FakeBackend("local", [hit("https://a.example/"), hit("https://b.example/", 2)])
    chain = SearchChain([DuckDuckGoBackend(), backup], timeout_s=5)
    outcome = await chain.search("tides", k=5, language="en", time_range="year")
    assert outcome.backend == "local"
    assert [r.url for r in outcome.results] == ["https://a.example/", "https://b.example/"]
    assert len(outcome.failures) == 1
    name, why = outcome.failures[0]
    assert name == "ddgs" and why.startswith(reason)
    assert backup.calls == [{"query": "tides", "k": 5, "language": "en", "time_range": "year"}]


async def test_every_kind_of_failure_is_reported_in_order():
    backends = [
        FakeBackend("a", RateLimited("a", "HTTP 429")),
        FakeBackend("b", BackendMisconfigured("b", "no API key")),
        FakeBackend("c", RuntimeError("boom")),
        FakeBackend("d", []),
        FakeBackend("e", [hit("https://e.example/")]),
    ]
    outcome = await SearchChain(backends).search("q")
    assert outcome.backend == "e"
    assert outcome.failures == [
        ("a", "rate limited: HTTP 429"),
        ("b", "misconfigured: no API key"),
        ("c", "failed: RuntimeError: boom"),
        ("d", "no results"),
    ]


async def test_nothing_answers():
    backends = [FakeBackend("a", []), FakeBackend("b", RateLimited("b", "slow down"))]
    outcome = await SearchChain(backends).search("q")
    expected = SearchOutcome(results=[], backend=None, failures=[("a", "no results"), ("b", "rate limited: slow down")])
    assert outcome == expected


async def test_first_backend_answering_stops_the_chain():
    first, second = FakeBackend("a", [hit("https://a.example/")]), FakeBackend("b", [hit("https://b.example/")])
    outcome = await SearchChain([first, second]).search("q")
    assert outcome.backend == "a" and outcome.failures == []
    assert second.calls == []


async def test_slow_backend_times_out_and_falls_back():
    slow = FakeBackend("slow", [hit("https://slow.example/")], delay_s=10)
    fast = FakeBackend("fast", [hit("https://fast.example/")])
    started = time.perf_counter()
    outcome = await SearchChain([slow, fast], timeout_s=0.2).search("q")
    assert time.perf_counter() - started < 1.5
    assert outcome.backend == "fast"
    assert outcome.failures == [("slow", "timed out after 0.2s")]


async def test_hanging_searxng_server_times_out(tmp_path: Path):
    """A real socket on 127.0.0.1 that accepts and never answers."""
    connections: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    docs = tmp_path / "c.jsonl"
    docs.write_text(json.dumps({"url": "https://l.example/", "title": "t", "text": "harbour seals"}) + "\n")
    config = SearchConfig(
        backends=["searxng", "local"],
        searxng_url=f"http://127.0.0.1:{port}",
        timeout_s=0.3,
        corpus_path=docs,
        index_dir=tmp_path / "index",
    )
    chain = build_search(config)
    try:
        await chain.warm()
        started = time.perf_counter()
        outcome = await chain.search("harbour seals")
        assert time.perf_counter() - started < 2
    finally:
        await chain.aclose()
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
    assert outcome.backend == "local" and outcome.results[0].url == "https://l.example/"
    assert outcome.failures[0][0] == "searxng" and "timed out" in outcome.failures[0][1]


async def test_results_are_deduplicated_and_cut_to_k():
    answer = [
        hit("https://a.example/x", 1),
        hit("http://www.a.example/x/", 2),
        hit("https://b.example/", 3),
        hit("https://c.example/", 4),
        hit("https://d.example/", 5),
    ]
    outcome = await SearchChain([FakeBackend("a", answer)]).search("q", k=3)
    assert [(r.url, r.rank) for r in outcome.results] == [
        ("https://a.example/x", 1),
        ("https://b.example/", 2),
        ("https://c.example/", 3),
    ]


async def test_defaults_come_from_the_chain():
    backend = FakeBackend("a", [hit("https://a.example/")])
    await SearchChain([backend], k=4, language="zh-cn").search("q")
    assert backend.calls[0] == {"query": "q", "k": 4, "language": "zh-cn", "time_range": None}


async def test_blank_query_asks_nobody():
    backend = FakeBackend("a", [hit("https://a.example/")])
    outcome = await SearchChain([backend]).search(" \t ")
    assert outcome.results == [] and backend.calls == []


async def test_bad_time_range_is_rejected():
    with pytest.raises(ValueError, match="time_range"):
        await SearchChain([FakeBackend("a")]).search("q", time_range="fortnight")


# --- cache -----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def cache(request):
    if request.param == "memory":
        return MemoryCache()
    return RedisCache(request.getfixturevalue("redis_url"), namespace=f"test-{uuid.uuid4().hex}")


async def test_cache_hit_skips_the_backends(cache):
    backend = FakeBackend("a", [hit("https://a.example/"), hit("https://b.example/", 2)])
    chain = SearchChain([backend], cache=cache, cache_ttl_s=60)
    first = await chain.search("Hello  World", k=5, language="en", time_range="week")
    again = await chain.search("  ＨＥＬＬＯ\u3000world\n", k=5, language="en", time_range="week")
    assert len(backend.calls) == 1
    assert not first.cached and again.cached
    assert again.results == first.results and again.backend == "a"


async def test_cache_key_separates_parameters(cache):
    backend = FakeBackend("a", [hit("https://a.example/")])
    chain = SearchChain([backend], cache=cache, cache_ttl_s=60)
    await chain.search("q", k=5)
    await chain.search("q", k=6)
    await chain.search("q", k=5, language="de")
    await chain.search("q", k=5, time_range="day")
    assert len(backend.calls) == 4
    await SearchChain([FakeBackend("b", [hit("https://b.example/")]), backend], cache=cache).search("q", k=5)
    assert len(backend.calls) == 4  # "b" answered; a different backend list is a different key


def test_cache_key_normalises_the_query():
    key = lambda q: cache_key(q, k=8, language=None, time_range=None, backends=["ddgs"])  # noqa: E731
    assert key("Straße  Café") == key("STRASSE café") == key("ｓｔｒａｓｓｅ\tcafé ")
    assert key("a b") != key("ab")
    assert cache_key("q", k=8, language=None, time_range=None, backends=["ddgs", "local"]) != key("q")


async def test_failures_and_empty_answers_are_not_cached(cache):
    flaky = FakeBackend("a", RateLimited("a", "later"))
    chain = SearchChain([flaky], cache=cache, cache_ttl_s=60)
    assert (await chain.search("q")).results == []
    flaky.answer = []
    assert (await chain.search("q")).results == []
    flaky.answer = [hit("https://a.example/")]
    outcome = await chain.search("q")
    assert outcome.backend == "a" and not outcome.cached
    assert len(flaky.calls) == 3


async def test_zero_ttl_disables_the_cache():
    backend = FakeBackend("a", [hit("https://a.example/")])
    chain = SearchChain([backend], cache=MemoryCache(), cache_ttl_s=0)
    await chain.search("q")
    await chain.search("q")
    assert len(backend.calls) == 2


# --- factory ---------------------------------------------------------------------------------


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError) as info:
        build_search(SearchConfig(backends=["ddgs", "bing"]))
    assert "bing" in str(info.value)
    assert all(name in str(info.value) for name in BACKEND_NAMES)


async def test_factory_builds_in_order_and_skips_unconfigured(tmp_path: Path, caplog):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"url": "https://l.example/", "text": "otters"}) + "\n")
    config = SearchConfig(
        backends=["local", "searxng", "serper", "ddgs"], corpus_path=corpus, index_dir=tmp_path / "index"
    )
    with caplog.at_level(logging.WARNING):
        chain = build_search(config)
    assert chain.names == ["local", "ddgs"]
    assert chain.skipped == [
        ("searxng", "search.searxng_url is not set"),
        ("serper", "search.serper_api_key is not set"),
    ]
    assert "searxng skipped" in caplog.text and "serper skipped" in caplog.text
    assert isinstance(chain.backends[0], LocalCorpusBackend)
    await chain.aclose()


def test_factory_refuses_a_chain_with_nothing_usable(tmp_path: Path):
    with pytest.raises(ValueError, match="no usable search backend.*corpus_path is not set"):
        build_search(SearchConfig(backends=["local"]))
    with pytest.raises(ValueError, match="does not exist"):
        build_search(SearchConfig(backends=["local"], corpus_path=tmp_path / "nope"))


async def test_factory_shares_the_injected_client_and_leaves_it_open():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "searx.local":
            return httpx.Response(403)
        return httpx.Response(200, json={"organic": [{"title": "G", "link": "https://g.example/"}]})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    config = SearchConfig(backends=["searxng", "serper"], searxng_url="http://searx.local", serper_api_key="key")
    chain = build_search(config, MemoryCache(), client=client)
    assert [type(b) for b in chain.backends] == [SearxngBackend, SerperBackend]
    outcome = await chain.search("q")
    assert outcome.backend == "serper" and outcome.results[0].url == "https://g.example/"
    assert outcome.failures[0][0] == "searxng" and "search.formats" in outcome.failures[0][1]
    assert [r.url.host for r in seen] == ["searx.local", "google.serper.dev"]
    again = await chain.search("Q")
    assert again.cached and len(seen) == 2
    await chain.aclose()
    assert not client.is_closed
    await client.aclose()


async def test_chain_closes_its_own_client():
    chain = build_search(SearchConfig(backends=["searxng"], searxng_url="http://searx.local"))
    client = chain.backends[0]._client
    await chain.aclose()
    assert client.is_closed


async def test_chain_document_and_close_reach_the_backends(tmp_path: Path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"url": "https://l.example/p", "title": "P", "text": "penguins"}) + "\n")
    fake = FakeBackend("fake")
    local = LocalCorpusBackend(corpus, tmp_path / "index")
    chain = SearchChain([fake, local])
    web_hit = SearchResult(title="P", url="https://l.example/p", snippet="", rank=1, engine="fake")
    assert chain.document(web_hit) is None
    assert local._index is None  # a corpus that did not answer is not loaded
    local_hit = SearchResult(title="P", url="https://l.example/p", snippet="", rank=1, engine="local")
    assert chain.document(local_hit) == {
        "url": "https://l.example/p",
        "title": "P",
        "text": "penguins",
        "published": None,
    }
    assert chain.document(SearchResult("x", "https://elsewhere.example/", "", 1, "local")) is None
    await chain.aclose()
    assert fake.closed
