"""The web backends against fakes: ddgs monkeypatched, SearXNG and Serper over httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

from retrieval.search import duckduckgo
from retrieval.search.base import (
    BackendMisconfigured,
    BackendUnavailable,
    RateLimited,
    dedupe,
    normalize_query,
    normalize_url,
    split_language,
)
from retrieval.search.duckduckgo import DuckDuckGoBackend, ddgs_region
from retrieval.search.searxng import SearxngBackend
from retrieval.search.serper import SerperBackend
from retrieval.types import SearchResult


def fake_ddgs(monkeypatch, behaviour: Callable[[str, dict], list[dict]]) -> list[dict]:
    """Replace ddgs.DDGS; every text() call's kwargs are recorded in the returned list."""
    calls: list[dict] = []

    class FakeDDGS:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def text(self, query: str, **kwargs) -> list[dict]:
            calls.append({"query": query, **kwargs})
            return behaviour(query, kwargs)

    monkeypatch.setattr(duckduckgo, "DDGS", FakeDDGS)
    return calls


def raiser(exc: Exception) -> Callable[[str, dict], list[dict]]:
    def behaviour(query: str, kwargs: dict) -> list[dict]:
        raise exc

    return behaviour


async def test_ddgs_maps_results_and_parameters(monkeypatch):
    rows = [
        {"title": "Great Wall", "href": "https://example.org/wall", "body": "A wall in China."},
        {"title": "no link", "href": "", "body": "dropped"},
        {"title": "Beijing", "href": "https://example.org/beijing", "body": "Capital."},
    ]
    calls = fake_ddgs(monkeypatch, lambda q, kw: rows)
    results = await DuckDuckGoBackend(backend="duckduckgo").search("长城", k=5, language="zh-CN", time_range="week")
    assert calls == [
        {
            "query": "长城",
            "region": "cn-zh",
            "safesearch": "moderate",
            "timelimit": "w",
            "max_results": 5,
            "backend": "duckduckgo",
        }
    ]
    assert [(r.title, r.url, r.snippet, r.rank, r.engine) for r in results] == [
        ("Great Wall", "https://example.org/wall", "A wall in China.", 1, "ddgs"),
        ("Beijing", "https://example.org/beijing", "Capital.", 2, "ddgs"),
    ]


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (RatelimitException("https://duckduckgo.com 202 Ratelimit"), RateLimited),
        (DDGSException("https://lite.duckduckgo.com/lite/ 202 Ratelimit"), RateLimited),
        (TimeoutException("read timed out"), BackendUnavailable),
        (DDGSException("HTTP 500 from every engine"), BackendUnavailable),
    ],
)
async def test_ddgs_errors_are_classified(monkeypatch, exc, error):
    fake_ddgs(monkeypatch, raiser(exc))
    with pytest.raises(error) as info:
        await DuckDuckGoBackend().search("q", k=3)
    assert type(info.value) is error
    assert info.value.backend == "ddgs"


async def test_ddgs_no_results_is_an_empty_answer(monkeypatch):
    fake_ddgs(monkeypatch, raiser(DDGSException("No results found.")))
    assert await DuckDuckGoBackend().search("q", k=3) == []


@pytest.mark.parametrize(
    ("language", "region"),
    [(None, "wt-wt"), ("en", "us-en"), ("zh-cn", "cn-zh"), ("cn-zh", "cn-zh"), ("de-DE", "de-de"), ("ja", "jp-jp")],
)
def test_ddgs_region(language, region):
    assert ddgs_region(language) == region


def test_split_language():
    assert split_language("zh_TW") == ("zh", "tw")
    assert split_language("us-en") == ("en", "us")
    assert split_language("all") == (None, None)


# --- SearXNG ---------------------------------------------------------------------------------


def mock_client(handler: Callable[[httpx.Request], httpx.Response], seen: list[httpx.Request]) -> httpx.AsyncClient:
    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return httpx.AsyncClient(transport=httpx.MockTransport(record))


SEARX_ANSWER = {
    "query": "q",
    "results": [
        {
            "title": "Moon landing",
            "url": "https://example.org/moon",
            "content": "Apollo 11 landed in 1969.",
            "publishedDate": "2024-07-20T20:17:00",
            "engine": "bing",
        },
        {"title": "No date", "url": "https://example.org/nodate", "content": "", "publishedDate": None},
        {"title": "Third", "url": "https://example.org/third", "content": "x"},
    ],
    "unresponsive_engines": [],
}


async def test_searxng_happy_path():
    seen: list[httpx.Request] = []
    async with mock_client(lambda r: httpx.Response(200, json=SEARX_ANSWER), seen) as client:
        backend = SearxngBackend("http://searx.local:8888/", client)
        results = await backend.search("moon landing", k=2, language="en-US", time_range="month")
    (request,) = seen
    assert request.method == "GET"
    assert request.url.path == "/search"
    assert dict(request.url.params) == {
        "q": "moon landing",
        "format": "json",
        "pageno": "1",
        "language": "en-US",
        "time_range": "month",
    }
    assert [(r.url, r.rank, r.engine, r.published) for r in results] == [
        ("https://example.org/moon", 1, "searxng", "2024-07-20T20:17:00"),
        ("https://example.org/nodate", 2, "searxng", None),
    ]
    assert results[0].snippet == "Apollo 11 landed in 1969."


async def test_searxng_without_language_or_time_range_sends_neither():
    seen: list[httpx.Request] = []
    async with mock_client(lambda r: httpx.Response(200, json=SEARX_ANSWER), seen) as client:
        await SearxngBackend("http://searx.local", client).search("q", k=5)
    assert "language" not in seen[0].url.params and "time_range" not in seen[0].url.params


async def test_searxng_json_disabled_is_a_misconfiguration():
    seen: list[httpx.Request] = []
    forbidden = lambda r: httpx.Response(403, text="<html>403 Forbidden</html>")  # noqa: E731
    async with mock_client(forbidden, seen) as client:
        with pytest.raises(BackendMisconfigured) as info:
            await SearxngBackend("http://searx.local", client).search("q", k=5)
    message = info.value.message
    assert "search.formats" in message and "settings.yml" in message and "json" in message
    assert "403" in message


@pytest.mark.parametrize(
    ("response", "error", "words"),
    [
        (httpx.Response(429, text="Too Many Requests"), RateLimited, "429"),
        (httpx.Response(502, text="Bad Gateway"), BackendUnavailable, "502"),
        (httpx.Response(404, text="Not Found"), BackendMisconfigured, "base URL"),
        (httpx.Response(200, text="<html>not json</html>"), BackendUnavailable, "JSON"),
        (
            httpx.Response(200, json={"results": [], "unresponsive_engines": [["google", "CAPTCHA"]]}),
            BackendUnavailable,
            "google CAPTCHA",
        ),
    ],
)
async def test_searxng_error_statuses(response, error, words):
    async with mock_client(lambda r: response, []) as client:
        with pytest.raises(error) as info:
            await SearxngBackend("http://searx.local", client).search("q", k=5)
    assert type(info.value) is error and words in info.value.message


async def test_searxng_unreachable():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with mock_client(refuse, []) as client:
        with pytest.raises(BackendUnavailable, match="cannot reach SearXNG at http://searx.local"):
            await SearxngBackend("http://searx.local", client).search("q", k=5)


async def test_searxng_genuinely_empty_answer():
    async with mock_client(lambda r: httpx.Response(200, json={"results": []}), []) as client:
        assert await SearxngBackend("http://searx.local", client).search("q", k=5) == []


# --- Serper ----------------------------------------------------------------------------------

SERPER_ANSWER = {
    "searchParameters": {"q": "q"},
    "organic": [
        {"title": "One", "link": "https://one.example/", "snippet": "first", "position": 1, "date": "Mar 5, 2024"},
        {"title": "Two", "link": "https://two.example/", "snippet": "second", "position": 2},
    ],
}


async def test_serper_happy_path():
    seen: list[httpx.Request] = []
    async with mock_client(lambda r: httpx.Response(200, json=SERPER_ANSWER), seen) as client:
        results = await SerperBackend("secret-key", client).search("长城", k=7, language="zh-TW", time_range="day")
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "https://google.serper.dev/search"
    assert request.headers["X-API-KEY"] == "secret-key"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {"q": "长城", "num": 7, "hl": "zh-tw", "gl": "tw", "tbs": "qdr:d"}
    assert [(r.title, r.url, r.snippet, r.rank, r.engine, r.published) for r in results] == [
        ("One", "https://one.example/", "first", 1, "serper", "Mar 5, 2024"),
        ("Two", "https://two.example/", "second", 2, "serper", None),
    ]


async def test_serper_plain_query_body():
    seen: list[httpx.Request] = []
    async with mock_client(lambda r: httpx.Response(200, json=SERPER_ANSWER), seen) as client:
        await SerperBackend("k", client).search("q", k=3)
    assert json.loads(seen[0].content) == {"q": "q", "num": 3}


async def test_serper_missing_key_makes_no_request():
    seen: list[httpx.Request] = []
    async with mock_client(lambda r: httpx.Response(200, json=SERPER_ANSWER), seen) as client:
        with pytest.raises(BackendMisconfigured, match="serper_api_key"):
            await SerperBackend(None, client).search("q", k=3)
    assert seen == []


@pytest.mark.parametrize("status", [401, 403])
async def test_serper_rejected_key(status):
    answer = httpx.Response(status, json={"message": "Unauthorized.", "statusCode": status})
    async with mock_client(lambda r: answer, []) as client:
        with pytest.raises(BackendMisconfigured) as info:
            await SerperBackend("bad", client).search("q", k=3)
    assert "API key" in info.value.message and str(status) in info.value.message
    assert "Unauthorized." in info.value.message


async def test_serper_rate_limited():
    async with mock_client(lambda r: httpx.Response(429, json={"message": "Too many requests"}), []) as client:
        with pytest.raises(RateLimited, match="429"):
            await SerperBackend("k", client).search("q", k=3)


async def test_serper_out_of_credits_says_so():
    async with mock_client(lambda r: httpx.Response(400, json={"message": "Not enough credits"}), []) as client:
        with pytest.raises(BackendMisconfigured, match="Not enough credits"):
            await SerperBackend("k", client).search("q", k=3)


async def test_serper_timeout():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with mock_client(slow, []) as client:
        with pytest.raises(BackendUnavailable, match="timed out waiting for serper.dev"):
            await SerperBackend("k", client).search("q", k=3)


# --- shared helpers --------------------------------------------------------------------------


def test_normalize_query():
    assert normalize_query("  Straße\u3000ＡＢＣ \n  test ") == "strasse abc test"


def test_dedupe_by_normalised_url():
    def hit(url: str, rank: int) -> SearchResult:
        return SearchResult(title=url, url=url, snippet="", rank=rank, engine="x")

    results = dedupe(
        [
            hit("https://www.example.org/a/", 1),
            hit("http://example.org/a#section", 2),
            hit("https://example.org/a?utm_source=feed", 3),
            hit("https://example.org/b?y=2&x=1", 4),
            hit("https://example.org/b?x=1&y=2", 5),
            hit("https://example.org/c", 6),
        ],
        limit=5,
    )
    assert [(r.url, r.rank) for r in results] == [
        ("https://www.example.org/a/", 1),
        ("https://example.org/b?y=2&x=1", 2),
        ("https://example.org/c", 3),
    ]
    assert normalize_url("HTTPS://Example.org:443/x") == normalize_url("http://example.org/x/")
