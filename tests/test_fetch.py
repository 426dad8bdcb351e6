"""The fetcher against the fixture web: real pages, every error path, deadline, limits, cache."""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import quote

import pytest

from retrieval.cache import MemoryCache
from retrieval.config import FetchConfig
from retrieval.fetch import (
    Blocked,
    ExtractionError,
    Fetcher,
    FetchTimeout,
    HTTPStatusError,
    TooLarge,
    TooManyRedirects,
    UnsupportedContent,
)
from retrieval.types import Page, SearchResult
from scripts.corpora import DATA, aeb_pages, crag_questions, hotpot_documents, hotpot_questions
from scripts.fixture_web import GBK_TEXT, PDF_LINES

T = "http://fixture.test"


async def no_dns(host: str) -> list[str]:
    raise AssertionError(f"no DNS lookups expected, got {host}")


@pytest.fixture
async def fetcher(fixture_web):
    async with Fetcher(fixture_web.fetch_config(page_timeout_s=2.0), resolver=no_dns) as f:
        yield f


def result(url: str, rank: int = 1, snippet: str = "the snippet") -> SearchResult:
    return SearchResult(title=f"title {rank}", url=url, snippet=snippet, rank=rank, engine="test")


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


# --- real pages -------------------------------------------------------------------------------


async def test_hotpot_page_under_its_wikipedia_url(fetcher: Fetcher) -> None:
    doc = next(d for d in hotpot_documents() if "(" in d["title"] and len(d["text"]) > 300)
    page = await fetcher.fetch(doc["url"])
    assert page.final_url == doc["url"]
    assert doc["title"] in page.title
    assert doc["text"][:200] in page.text
    assert "Creative Commons" not in page.text  # boilerplate left behind


async def test_crag_pages_are_fetched_and_extracted(fetcher: Fetcher) -> None:
    urls = list(
        dict.fromkeys(r["page_url"] for q in crag_questions() for r in q.results if (r["page_result"] or "").strip())
    )
    urls = urls[::2]  # half of them: extraction of big real pages dominates the test's time
    outcomes = await asyncio.gather(*(fetcher.fetch(u) for u in urls), return_exceptions=True)
    pages = [p for p in outcomes if not isinstance(p, BaseException)]
    # Real pages include a few that extract to nothing; most must give real text.
    assert len(pages) >= 0.8 * len(urls), [str(e) for e in outcomes if isinstance(e, BaseException)]
    assert sum(len(p.text) > 200 for p in pages) >= 0.7 * len(urls)
    assert all(p.url == p.final_url for p in pages)  # no redirects inside the fixture web


async def test_aeb_pages_extract_their_article(fetcher: Fetcher) -> None:
    gold = json.loads((DATA / "extraction" / "aeb" / "ground-truth.json").read_text(encoding="utf-8"))
    sample = [(pid, url) for pid, url, _raw in aeb_pages()][:12]
    pages = await asyncio.gather(*(fetcher.fetch(url) for _pid, url in sample))
    recalls = []
    for (pid, _url), page in zip(sample, pages):
        expected = words(gold[pid]["articleBody"])
        recalls.append(len(expected & words(page.text)) / max(1, len(expected)))
    assert sum(r > 0.7 for r in recalls) >= 10, recalls


async def test_route_map_keeps_host_and_user_agent(fixture_web) -> None:
    config = fixture_web.fetch_config(user_agent="MegrezTest/1.0 (fixture)")
    async with Fetcher(config, resolver=no_dns) as f:
        page = await f.fetch("https://sub.fixture.test/echo")
    assert "Host header seen: sub.fixture.test." in page.text
    assert "User agent seen: MegrezTest/1.0 (fixture)." in page.text
    assert page.url == page.final_url == "https://sub.fixture.test/echo"


# --- content types and charsets ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/gbk-header", "/gbk-meta", "/mislabelled"])
async def test_gbk_pages_decode(fetcher: Fetcher, path: str) -> None:
    page = await fetcher.fetch(T + path)
    assert "不到长城非好汉" in page.text
    assert GBK_TEXT[:20] in page.text
    assert page.title == "长城"


@pytest.mark.parametrize("path", ["/doc.pdf", "/untyped.pdf"])
async def test_pdf_text(fetcher: Fetcher, path: str) -> None:
    page = await fetcher.fetch(T + path)
    assert page.content_type == "application/pdf"
    for line in PDF_LINES:
        assert line in page.text
    assert page.title == "Megrez fixture"


async def test_untyped_html_and_plain_text(fetcher: Fetcher) -> None:
    html = await fetcher.fetch(T + "/untyped")
    assert (html.content_type, html.title) == ("text/html", "Untyped page")
    text = await fetcher.fetch(T + "/plain.txt")
    assert text.content_type == "text/plain"
    assert text.text.startswith("Plain text file.")


async def test_unsupported_type_is_refused(fetcher: Fetcher) -> None:
    with pytest.raises(UnsupportedContent, match="image/png"):
        await fetcher.fetch(T + "/image.png")


async def test_empty_page_is_an_error(fetcher: Fetcher) -> None:
    with pytest.raises(ExtractionError):
        await fetcher.fetch(T + "/empty")


@pytest.mark.parametrize("status", [404, 410, 500, 503])
async def test_http_errors(fetcher: Fetcher, status: int) -> None:
    with pytest.raises(HTTPStatusError) as info:
        await fetcher.fetch(f"{T}/status/{status}")
    assert info.value.status == status


async def test_unknown_path_is_404(fetcher: Fetcher) -> None:
    with pytest.raises(HTTPStatusError, match="404"):
        await fetcher.fetch("https://en.wikipedia.org/wiki/No_such_page_in_the_fixture")


# --- size and time limits ---------------------------------------------------------------------


async def test_oversized_html_keeps_a_truncated_prefix(fixture_web) -> None:
    async with Fetcher(fixture_web.fetch_config(max_bytes=50_000), resolver=no_dns) as f:
        started = time.monotonic()
        page = await f.fetch(T + "/big?mb=50")
        assert time.monotonic() - started < 2  # stopped reading; did not download 50 MB
        assert page.truncated
        assert "fixture page exists to exercise the fetcher" in page.text
        assert 1_000 < len(page.text.encode()) <= 50_000
        [listed] = await f.fetch_pages([result(T + "/big?mb=50&again")])
        assert listed.source == "page"
        assert listed.error and listed.error.startswith("truncated")


async def test_oversized_pdf_is_an_error(fixture_web) -> None:
    async with Fetcher(fixture_web.fetch_config(max_bytes=50_000), resolver=no_dns) as f:
        with pytest.raises(TooLarge):
            await f.fetch(T + "/big.pdf?mb=5")


async def test_page_timeout(fixture_web) -> None:
    async with Fetcher(fixture_web.fetch_config(page_timeout_s=0.5), resolver=no_dns) as f:
        started = time.monotonic()
        with pytest.raises(FetchTimeout):
            await f.fetch(T + "/hang")
        with pytest.raises(FetchTimeout):
            await f.fetch(T + "/slow?s=3")
        assert time.monotonic() - started < 2.5


async def test_deadline_falls_back_to_snippets_without_waiting(fixture_web) -> None:
    results = [
        result(T + "/page?deadline", 1),
        result(T + "/hang?deadline", 2, "snippet of the page that never answers"),
        result(T + "/slow?s=8&deadline", 3, "snippet of the slow page"),
        result(T + "/status/404?deadline", 4, "snippet of the missing page"),
        result(T + "/slow?s=0.2&deadline", 5),
    ]
    seen: list[Page] = []
    async with Fetcher(fixture_web.fetch_config(page_timeout_s=30), resolver=no_dns) as f:
        started = time.monotonic()
        pages = await f.fetch_pages(results, deadline_s=1.0, on_page=seen.append)
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 0.5, elapsed
    assert [p.rank for p in pages] == [1, 2, 3, 4, 5]
    assert [p.source for p in pages] == ["page", "snippet", "snippet", "snippet", "page"]
    assert pages[1].text == "snippet of the page that never answers"
    assert pages[1].error.startswith("deadline")
    assert pages[2].error.startswith("deadline")
    assert pages[3].error.startswith("http: 404")
    assert pages[0].error is None and "fixture page" in pages[0].text
    # Progress: every page reported once; the fallbacks last, after the deadline.
    assert sorted(p.rank for p in seen) == [1, 2, 3, 4, 5]
    assert {p.rank for p in seen[-2:]} == {2, 3}


async def test_async_progress_callback_and_default_deadline(fixture_web) -> None:
    seen: list[int] = []

    async def on_page(page: Page) -> None:
        await asyncio.sleep(0)
        seen.append(page.rank)

    config = fixture_web.fetch_config(deadline_s=0.6, page_timeout_s=30)
    async with Fetcher(config, resolver=no_dns) as f:
        started = time.monotonic()
        pages = await f.fetch_pages([result(T + "/slow?s=0.1&cb", 1), result(T + "/hang?cb", 2)], on_page=on_page)
        assert time.monotonic() - started < 0.6 + 0.5
    assert seen == [1, 2]
    assert [p.source for p in pages] == ["page", "snippet"]


async def test_stragglers_are_cancelled_and_their_connections_closed(fixture_web) -> None:
    url = T + "/hang?aclose"
    f = Fetcher(fixture_web.fetch_config(page_timeout_s=30), resolver=no_dns)
    await f.fetch_pages([result(url)], deadline_s=0.2)
    await asyncio.wait_for(f.aclose(), 2)
    for _ in range(100):  # the server notices the hang-up on its own thread
        if all(v.end < float("inf") for v in fixture_web.stats.visits if v.url == url):
            break
        await asyncio.sleep(0.02)
    visits = [v for v in fixture_web.stats.visits if v.url == url]
    assert len(visits) == 1 and visits[0].end < float("inf")


# --- redirects --------------------------------------------------------------------------------


async def test_redirects_followed_up_to_the_limit(fixture_web) -> None:
    async with Fetcher(fixture_web.fetch_config(max_redirects=3), resolver=no_dns) as f:
        page = await f.fetch(T + "/chain/3")
        assert page.final_url == T + "/chain/0"
        with pytest.raises(TooManyRedirects):
            await f.fetch(T + "/chain/4")
    async with Fetcher(fixture_web.fetch_config(max_redirects=0), resolver=no_dns) as f:
        with pytest.raises(TooManyRedirects):
            await f.fetch(T + "/chain/1")


async def test_redirect_loop(fetcher: Fetcher) -> None:
    with pytest.raises(TooManyRedirects, match="loop"):
        await fetcher.fetch(T + "/loop/a")


async def test_relative_redirect_resolves_against_the_original_url(fetcher: Fetcher) -> None:
    page = await fetcher.fetch(T + "/moved")
    assert page.final_url == T + "/page"


# --- SSRF -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://10.0.0.1/",
        "http://2130706434/",  # 127.0.0.2: outside the fixture's allow-list (127.0.0.1/32)
        "http://0x7f.0.0.2:9/",
        "file:///etc/passwd",
        "http://user:pw@fixture.test/page",
    ],
)
async def test_redirects_to_private_targets_are_blocked(fixture_web, fetcher: Fetcher, target: str) -> None:
    before = len(fixture_web.stats.visits)
    with pytest.raises(Blocked):
        await fetcher.fetch(f"{T}/redirect?to={quote(target, safe='')}")
    assert len(fixture_web.stats.visits) == before + 1  # the redirect itself, nothing after it


async def test_direct_private_urls_are_blocked_before_any_request(fixture_web) -> None:
    before = len(fixture_web.stats.visits)
    async with Fetcher(FetchConfig(), resolver=no_dns) as f:
        for url in (
            f"{fixture_web.base_url}/page",
            f"http://2130706433:{fixture_web.port}/page",
            f"http://0x7f.1:{fixture_web.port}/page",
            f"http://[::ffff:127.0.0.1]:{fixture_web.port}/page",
            f"http://localhost:{fixture_web.port}/page",
        ):
            with pytest.raises(Blocked):
                await f.fetch(url)
        [page] = await f.fetch_pages([result(f"{fixture_web.base_url}/page", snippet="fallback")])
    assert (page.source, page.text) == ("snippet", "fallback")
    assert page.error.startswith("blocked")
    assert len(fixture_web.stats.visits) == before


async def test_allow_list_permits_the_listed_address(fixture_web) -> None:
    async with Fetcher(FetchConfig(allow_private=["127.0.0.0/8"]), resolver=no_dns) as f:
        page = await f.fetch(f"{fixture_web.base_url}/page")
    assert page.title == "Fixture page"


async def test_names_are_pinned_to_the_vetted_address(fixture_web) -> None:
    """The mirror is reached by a name no real DNS knows: the request can only succeed if it goes
    to the address the guard resolved (with the Host header kept). A private address elsewhere on
    the same machine stays blocked: the allow-list names the host, not its address."""
    calls: list[str] = []

    async def resolver(host: str) -> list[str]:
        calls.append(host)
        return {"mirror.internal": [fixture_web.host], "rebind.example": ["10.0.0.7"]}[host]

    config = fixture_web.fetch_config(
        route_map={T: f"http://mirror.internal:{fixture_web.port}"}, allow_private=["mirror.internal"]
    )
    async with Fetcher(config, resolver=resolver) as f:
        page = await f.fetch(T + "/echo")
        assert "Host header seen: fixture.test." in page.text
        assert calls == ["mirror.internal"]
        for target in (f"http://127.0.0.1:{fixture_web.port}/page", "http://rebind.example/page"):
            with pytest.raises(Blocked):
                await f.fetch(f"{T}/redirect?to={quote(target, safe='')}&{len(calls)}")
    assert calls[-1] == "rebind.example"


async def test_dns_name_resolving_to_private_address_is_blocked(fixture_web) -> None:
    async def resolver(host: str) -> list[str]:
        return ["192.168.10.10"]

    async with Fetcher(FetchConfig(), resolver=resolver) as f:
        with pytest.raises(Blocked, match="192.168.10.10"):
            await f.fetch("https://intranet.example.com/")


# --- malformed URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        # IPv6 literals of full-width digits and ideographic full stops: urlsplit raises ValueError.
        ("http://[::①⑥⑨。②⑤④。①⑥⑨。②⑤④]/", "'http://[::①⑥⑨。②⑤④。①⑥⑨。②⑤④]/'"),
        ("http://[::１２７.0.0.1]/page", "'http://[::１２７.0.0.1]/page'"),
        ("http://[1:2]/", "'http://[1:2]/'"),
        ("http://[/", "'http://[/'"),
        ("http:127.0.0.1/", "127.0.0.1"),
        ("jar:http://127.0.0.1!/", "'jar'"),
    ],
)
async def test_a_malformed_url_is_blocked_before_any_request(fixture_web, fetcher: Fetcher, url, named) -> None:
    before = len(fixture_web.stats.visits)
    with pytest.raises(Blocked, match=re.escape(named)):
        await fetcher.fetch(url)
    # Among search results, it falls back to its snippet without sinking the others.
    pages = await fetcher.fetch_pages([result(url, 1, "fallback"), result(T + "/page", 2)])
    assert [(p.source, p.text) for p in pages][0] == ("snippet", "fallback") and pages[1].source == "page"
    assert pages[0].error.startswith("blocked: ") and named in pages[0].error
    assert len(fixture_web.stats.visits) == before + 1  # /page only


@pytest.mark.parametrize(
    "location",
    [
        "http:127.0.0.1/",  # httpx raises InvalidURL reading the Location, though it does not follow it
        "jar:http://127.0.0.1!/",
        "https:[::1]/",
        "http://xn--/",  # httpx raises idna's IDNAError, a ValueError
        "http://[/",  # past httpx; urljoin raises ValueError
        "http://a]/",
    ],
)
async def test_a_redirect_to_a_malformed_url_is_blocked_naming_the_page(fixture_web, fetcher, location) -> None:
    url = f"{T}/redirect?to={quote(location, safe='')}"
    before = len(fixture_web.stats.visits)
    with pytest.raises(Blocked, match=f"redirect from {re.escape(url)} to a malformed URL"):
        await fetcher.fetch(url)
    assert len(fixture_web.stats.visits) == before + 1  # the redirect itself, nothing after it
    [page] = await fetcher.fetch_pages([result(url, snippet="fallback")])
    assert (page.source, page.text) == ("snippet", "fallback") and page.error.startswith("blocked: redirect from")


# --- concurrency, duplicates, cache -----------------------------------------------------------


async def test_per_host_concurrency_is_honoured(fixture_web) -> None:
    urls = [f"{T}/slow?s=0.2&ph={i}" for i in range(8)]
    async with Fetcher(fixture_web.fetch_config(per_host_concurrency=2, concurrency=16), resolver=no_dns) as f:
        pages = await f.fetch_pages([result(u, i + 1) for i, u in enumerate(urls)], deadline_s=10)
    assert all(p.source == "page" for p in pages)
    assert fixture_web.stats.max_concurrent(urls) == 2


async def test_global_concurrency_is_honoured(fixture_web) -> None:
    urls = [f"http://h{i % 4}.fixture.test/slow?s=0.2&g={i}" for i in range(12)]
    async with Fetcher(fixture_web.fetch_config(per_host_concurrency=4, concurrency=3), resolver=no_dns) as f:
        pages = await f.fetch_pages([result(u, i + 1) for i, u in enumerate(urls)], deadline_s=10)
    assert all(p.source == "page" for p in pages)
    assert fixture_web.stats.max_concurrent(urls) == 3


async def test_duplicate_urls_fetched_once(fixture_web, fetcher: Fetcher) -> None:
    url = T + "/page?dup"
    pages = await fetcher.fetch_pages([result(url, 1), result(T + "/plain.txt?dup", 2), result(url + "#frag", 3)])
    assert [p.rank for p in pages] == [1, 2, 3]
    assert pages[0].text == pages[2].text and pages[0].source == "page"
    assert pages[2].url == url + "#frag"
    assert fixture_web.stats.requests(url) == 1


async def test_cache_hit_avoids_refetch_and_errors_are_not_cached(fixture_web) -> None:
    cache = MemoryCache()
    config = fixture_web.fetch_config(cache_ttl_s=60)
    async with Fetcher(config, cache=cache, resolver=no_dns) as f:
        first = await f.fetch(T + "/page?cached")
        second = await f.fetch(T + "/page?cached")
        for _ in range(2):
            with pytest.raises(HTTPStatusError):
                await f.fetch(T + "/status/404?cached")
    assert (first.from_cache, second.from_cache) == (False, True)
    assert (second.title, second.text) == (first.title, first.text)
    assert fixture_web.stats.requests(T + "/page?cached") == 1
    assert fixture_web.stats.requests(T + "/status/404?cached") == 2
    # A second fetcher sharing the cache does not fetch either.
    async with Fetcher(config, cache=cache, resolver=no_dns) as f:
        [page] = await f.fetch_pages([result(T + "/page?cached")])
    assert page.source == "page" and fixture_web.stats.requests(T + "/page?cached") == 1


async def test_cache_ttl_zero_disables_cache(fixture_web) -> None:
    cache = MemoryCache()
    async with Fetcher(fixture_web.fetch_config(cache_ttl_s=0), cache=cache, resolver=no_dns) as f:
        await f.fetch(T + "/page?nocache")
        await f.fetch(T + "/page?nocache")
    assert fixture_web.stats.requests(T + "/page?nocache") == 2


async def test_fixture_search_finds_fixture_pages(fixture_search, fetcher: Fetcher) -> None:
    question = hotpot_questions()[0]
    hits = await fixture_search.search(question.question, k=5)
    assert {h.title for h in hits} & set(question.supporting_titles)
    pages = await fetcher.fetch_pages(hits, deadline_s=10)
    assert [p.source for p in pages] == ["page"] * len(hits)
    docs = {d["url"]: d for d in hotpot_documents()}
    hotpot_pages = [p for p in pages if p.url in docs]
    assert hotpot_pages and all(docs[p.url]["text"][:80] in p.text for p in hotpot_pages)
