"""The real service on a scripted model and the fixture web, for driving the web page in Chromium.

The browser tests (``tests/test_web.py``) and the page benchmark (``bench/web.py``) both need the whole
service — app, memory, retriever reading real pages from the fixture web — with a model whose output is
known. This builds it and serves it from a background thread (uvicorn with its own event loop, so a
synchronous Playwright can drive the page from the main thread).

The scripted model (:func:`page_model`) behaves as Megrez does where the page relies on it: with the
search tool on it first calls ``googleWebSearch`` with the question, then answers from the observation
citing ``[[citation:1]]`` and ``[[citation:2]]``; with search off it answers at once; the follow-up
generation gets three numbered questions. A question may ask for a longer answer (``long``, for stop
and reconnect) or for hostile output (``hostile``, for the XSS checks). The search backends answer as
the question asks too (:class:`MoodySearch`): ``offline`` makes every backend fail, ``slowly`` makes the
search take a while (so a test can see it in progress).

The browser is opened at one of two sizes (:data:`FORMS`: desktop, phone) in one of the page's two
languages (:data:`LOCALES`), the way the browser tests combine them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

import httpx

from agent.config import AgentConfig
from api.app import create_app
from api.settings import Settings
from engine.base import MEDIA_KINDS
from engine.protocol import FORCED_SEARCH_ARGS_PREFIX
from retrieval.config import SelectConfig
from retrieval.fetch import Fetcher
from retrieval.pipeline import Retriever
from retrieval.search.base import BackendUnavailable
from retrieval.search.chain import SearchChain
from retrieval.search.local import LocalCorpusBackend
from scripts.fixture_web import FixtureWeb, WebSearch
from scripts.net import free_port
from scripts.scripted_engine import Request, ScriptedEngine

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright never downloads a browser here
HOSTILE_ANSWER = (
    "Hostile output follows <img src=x onerror=\"document.body.dataset.pwned='answer'\"> and a "
    "[link](javascript:document.body.dataset.pwned='link') but the sources say it is safe [[citation:1]]."
)
LONG_SENTENCE = "Sentence {i} of the long answer adds one more numbered fact for the reader. "
OUTAGE = "offline"  # a question with this word: every search backend fails
SLOW = "slowly"  # a question with this word: each backend takes SLOW_S before it answers
SLOW_S = 0.5  # per backend: a search of two takes twice as long
# The page's sizes in the browser tests: a desktop window and a phone (touch, mobile viewport).
FORMS = {
    "desktop": {"viewport": {"width": 1280, "height": 800}},
    "phone": {"viewport": {"width": 390, "height": 844}, "has_touch": True, "is_mobile": True},
}
LOCALES = {"en": "en-US", "zh": "zh-CN"}  # the browser's language, which the page's language follows


class MoodySearch:
    """A search backend that fails or dawdles when the query asks it to (``OUTAGE``, ``SLOW``), and is
    ``inner`` otherwise (its index, documents and loading included).

    Example::

        chain = SearchChain([MoodySearch(WebSearch(web.search_backend()))])
    """

    def __init__(self, inner) -> None:
        self._inner = inner
        self.name = inner.name

    async def search(self, query: str, **options):
        if SLOW in query:
            await asyncio.sleep(SLOW_S)
        if OUTAGE in query:
            raise BackendUnavailable(self.name, "unreachable (the test's outage)")
        return await self._inner.search(query, **options)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def answer_for(question: str, contexts: dict[int, str]) -> str:
    """The scripted answer to ``question`` from the observation's ``contexts`` (number → text): one
    sentence taken from each of the first two, cited, plus one claim no context makes (the support
    check marks its citation unsupported) and a code span whose ``[1]`` must stay text."""
    if "hostile" in question:
        return HOSTILE_ANSWER
    first, second = (list(contexts) + [1, 2])[:2] if contexts else (1, 2)

    def sentence(n: int) -> str:
        body = contexts.get(n, "").partition("\n")[2]  # a context starts with its page's title line
        sentences = re.split(r"(?<=[.!?。！？])\s+", " ".join(body.split()))
        return next((x[:220] for x in sentences if len(x) >= 40), "The sources agree").rstrip(".")

    body = (
        f"Here is what the sources say about **{question.rstrip('?？')}**.\n\n"
        f"- {sentence(first)} [[citation:{first}]].\n"
        f"- {sentence(second)} [[citation:{second}]].\n\n"
        f"One claim no source makes: it was all decided on the far side of the Moon [[citation:{second}]]. "
        "A code span stays as written: `see [1]`.\n"
    )
    if "long" in question:
        body += "\n" + "".join(LONG_SENTENCE.format(i=i) for i in range(1, 41))
    return body


def contexts_of(observation: str) -> dict[int, str]:
    """Context number → text, from an observation message (``[[citation:N]]`` headed blocks)."""
    parts = re.split(r"\[\[citation:(\d+)\]\]", observation)
    return {int(n): text.strip() for n, text in zip(parts[1::2], parts[2::2], strict=True)}


def page_model(engine: ScriptedEngine):
    """The scripted model's output for one request (see the module docstring)."""

    def respond(request: Request) -> str:
        if request.sampling.regex:  # the follow-up questions
            return "1. What happened next?\n2. Who else was involved?\n3. 接下来会怎样？<|turn_end|>"
        messages = engine.messages(request)
        if messages[-1][0] == "assistant":  # the generation prompt (prefilled when the search is forced)
            messages.pop()
        asked = next(content for role, content in reversed(messages) if role == "user")
        question = re.sub(r"<\|[a-z_]+\|>\n?", "", asked).strip()  # media placeholders
        if request.text.endswith(FORCED_SEARCH_ARGS_PREFIX):  # search "always": the call is begun for it
            return json.dumps(question, ensure_ascii=False)[1:] + "}}<|function_end|>"
        search_on = "googleWebSearch" in messages[0][1]
        if messages[-1][0] == "user" and search_on:
            call = json.dumps({"name": "googleWebSearch", "arguments": {"query": question}}, ensure_ascii=False)
            return f"<|function_start|>{call}<|function_end|>"
        observations = [content for role, content in messages if role == "observation"]
        return answer_for(question, contexts_of(observations[-1]) if observations else {}) + "<|turn_end|>"

    return respond


def page_app(
    tokenizer_dir: Path,
    web: FixtureWeb,
    *,
    settings: Settings | None = None,
    extra_documents: Sequence[dict] = (),
    corpus_dir: Path,
    delay_s: float = 0.004,
    media: frozenset[str] = MEDIA_KINDS,
):
    """The app and its engine: search = ``extra_documents`` (a local corpus, tried first) then the fixture
    web's pages, fetched from the fixture web; ``delay_s`` per 3-character chunk of model output. The
    tiny tokenizer spends about a token per character, so ``settings`` should allow long answers."""
    # The tiny tokenizer spends about a token per character: a long context keeps several pages in view.
    engine = ScriptedEngine(tokenizer_dir, delay_s=delay_s, media=media, max_len=16384)
    engine.default = page_model(engine)  # type: ignore[assignment]  # a function of each request
    backends = []
    if extra_documents:
        corpus = corpus_dir / "extra.jsonl"
        corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in extra_documents), "utf-8")
        extra = LocalCorpusBackend(corpus, corpus_dir / "extra-index")
        extra.load()
        backends.append(extra)
    backends.append(WebSearch(web.search_backend()))
    chain = SearchChain([MoodySearch(b) for b in backends], timeout_s=5.0)
    retriever = Retriever(chain, Fetcher(web.fetch_config()), SelectConfig())
    settings = settings or Settings(agent=AgentConfig(related=True, answer_tokens=3000))
    return create_app(settings, engine=engine, retriever=retriever), engine


class PageServer:
    """``app`` served by uvicorn on 127.0.0.1 from a background thread; ``url`` once started.

    Example::

        with PageServer(app) as server:
            page.goto(server.url)
    """

    def __init__(self, app, *, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # signals belong to the main thread's program
                yield

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = Server(config)
        self._thread = threading.Thread(target=self._server.run, name="page-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the page server exited before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the page server at {self.url} was not ready within 60 s")

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)


def new_page(browser, url: str, form: str = "desktop", lang: str = "en", *, errors: list[str] | None = None, **options):
    """A page in a fresh context (empty storage) at ``form`` (:data:`FORMS`) in language ``lang``, its clipboard
    allowed; what it throws or logs as a warning or error is appended to ``errors``. Not navigated yet.

    :param browser: a Playwright browser (:func:`launch_chromium`)
    :param url: the service's address (the clipboard is allowed for it)
    :param options: more ``browser.new_context`` options (``color_scheme``, …)
    """
    context = browser.new_context(**FORMS[form], locale=LOCALES[lang], **options)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = context.new_page()
    if errors is not None:
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda m: m.type in ("warning", "error") and errors.append(f"console {m.type}: {m.text}"))
    return page


def launch_chromium(playwright):
    """Headless Debian Chromium through Playwright (``--no-sandbox``: CI runs as root)."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
