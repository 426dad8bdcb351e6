"""The web page in headless Chromium (Debian's, driven by Playwright) against the real service: scripted
model, fixture web, Redis memory (``scripts/page_harness.py``).

One flow per test, each in a fresh browser context (empty storage). Screenshots of the main states go
to ``$MEGREZ_SCREENSHOTS`` (default ``build/screenshots``); two of them are in the README.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from agent.config import AgentConfig
from api.config import AuthConfig
from api.settings import Settings
from scripts.page_harness import LONG_SENTENCE, PageServer, launch_chromium, page_app
from tests.agent_fixtures import png

SHOTS = Path(os.environ.get("MEGREZ_SCREENSHOTS", "build/screenshots"))
QUESTION = "Which companies are in the Dow Jones?"
HOSTILE = "<img src=x onerror=\"document.body.dataset.pwned='title'\">"
HOSTILE_DOCUMENTS = [
    {
        "url": "https://hostile.example.org/tower",
        "title": f"Hostile tower {HOSTILE}",
        "text": f"Hostile tower facts {HOSTILE} and a javascript:alert(1) link; the hostile tower is tall.",
    },
    {"url": "javascript:document.body.dataset.pwned='url'", "title": "Hostile tower link", "text": "hostile tower"},
]


class Dropper:
    """Wraps the app: when armed, the next ``POST /chat`` stream is cut (the connection closes without
    the end of the response) after ``after`` token events, as a proxy or a flaky network would; resume
    requests are recorded."""

    def __init__(self, app) -> None:
        self.app = app
        self.after: int | None = None
        self.resumes: list[str | None] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].endswith("/events"):
            self.resumes.append(dict(scope["headers"]).get(b"last-event-id", b"").decode() or None)
        if self.after is None or scope["path"] != "/chat":
            return await self.app(scope, receive, send)
        budget, self.after = self.after, None
        tokens = 0

        async def cut(message):
            nonlocal tokens
            if message["type"] == "http.response.body":
                tokens += message.get("body", b"").count(b"event: token")
                if tokens > budget:
                    raise ConnectionAbortedError("dropped by the test")
            await send(message)

        try:
            await self.app(scope, receive, cut)
        except ConnectionAbortedError:
            pass  # returning without finishing the response makes uvicorn close the connection


@pytest.fixture(scope="module")
def service(tokenizer_dir, fixture_web, redis_url, tmp_path_factory):
    # A Redis database of its own: the page lists every conversation, and other tests write to database 0.
    settings = Settings(
        redis_url=redis_url.rsplit("/", 1)[0] + "/7", agent=AgentConfig(related=True, answer_tokens=3000)
    )
    app, engine = page_app(
        tokenizer_dir,
        fixture_web,
        settings=settings,
        extra_documents=HOSTILE_DOCUMENTS,
        corpus_dir=tmp_path_factory.mktemp("page-corpus"),
    )
    dropper = Dropper(app)
    with PageServer(dropper) as server:
        server.engine, server.dropper = engine, dropper
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def console_errors() -> list[str]:
    """What the page threw or logged as a warning or error; the test fails unless it is empty at the end."""
    return []


@pytest.fixture
def page(browser, service, console_errors):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=service.url)
    page = context.new_page()
    errors = console_errors
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: m.type in ("warning", "error") and errors.append(f"console {m.type}: {m.text}"))
    page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
    page.goto(service.url)
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=False)


def ask(page: Page, question: str) -> None:
    page.fill("#question", question)
    page.press("#question", "Enter")


def last_turn(page: Page):
    return page.locator(".turn").last


def wait_done(page: Page, status: str = "done", timeout: float = 30_000) -> None:
    expect(last_turn(page)).to_have_attribute("data-status", status, timeout=timeout)


def conversation(service, page: Page) -> dict:
    cid = re.fullmatch(r".*#/c/(.+)", page.url).group(1)
    response = httpx.get(f"{service.url}/conversations/{cid}", timeout=10)
    response.raise_for_status()
    return response.json()


def squash(text: str) -> str:
    return " ".join(text.split())


def test_ask_follow_up_reload_and_delete(page: Page, service):
    ask(page, QUESTION)
    expect(page.locator(".card").first).to_be_visible(timeout=20_000)
    wait_done(page)
    marks = page.evaluate(
        "() => Object.fromEntries(performance.getEntriesByType('mark').map(m => [m.name, m.startTime]))"
    )
    assert marks["megrez:sources"] <= marks["megrez:first-token"], marks  # sources painted before the answer
    stored = conversation(service, page)["turns"][0]["answer"]
    cards = page.locator(".turn .card")
    assert cards.count() == len(stored["sources"]) >= 2
    first = stored["sources"][0]
    expect(cards.first.locator(".card-title")).to_have_text(first["title"])
    expect(cards.first.locator("a")).to_have_attribute("href", first["url"])
    # The answer: Markdown rendered, citations as chips linking to their source, code spans left alone.
    answer = last_turn(page).locator(".answer")
    expect(answer.locator("strong")).to_have_text(QUESTION.rstrip("?"))
    expect(answer.locator("code")).to_have_text("see [1]")
    chips = answer.locator(".chip")
    cited = {c["n"]: c for c in stored["citations"]}
    assert chips.count() == len(re.findall(r"\[\d+\]", stored["answer"])) - 1  # all but the one in code
    for i in range(chips.count()):
        n = int(chips.nth(i).inner_text())
        expect(chips.nth(i)).to_have_attribute("href", cited[n]["url"])
    # The support check's verdict shows: the Moon claim's citation is unsupported, the others are not.
    unsupported = [n for n, c in cited.items() if c["supported"] is False]
    assert unsupported and len(unsupported) < len(cited)
    assert answer.locator(".chip.unsupported").count() >= 1
    assert answer.locator(".chip:not(.unsupported)").count() >= 1
    # Hovering a chip shows the passage the model was given for it.
    supported_chip = answer.locator(".chip:not(.unsupported)").first
    supported_chip.hover()
    popover = page.locator("#popover")
    expect(popover).to_be_visible()
    n = int(supported_chip.inner_text())
    assert squash(popover.locator(".popover-passage").inner_text()) == squash(cited[n]["passage"])
    shot(page, "answer")
    # Copy puts the answer's text on the clipboard.
    last_turn(page).get_by_role("button", name="Copy").click()
    assert "the far side of the Moon" in page.evaluate("navigator.clipboard.readText()")
    # A follow-up question continues the same conversation.
    follow_up = last_turn(page).locator(".follow-up").first
    follow_text = follow_up.inner_text()
    follow_up.click()
    expect(page.locator(".turn")).to_have_count(2)
    wait_done(page)
    turns = conversation(service, page)["turns"]
    assert [t["question"] for t in turns] == [QUESTION, follow_text]
    history = page.locator("#history li")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("Which companies")
    # A reload shows the same conversation from memory.
    page.reload()
    expect(page.locator(".turn")).to_have_count(2)
    expect(page.locator(".turn .question").first).to_have_text(QUESTION)
    assert page.locator(".turn").first.locator(".answer .chip").count() == chips.count()
    # Delete: gone from the sidebar, the page and the service.
    cid = conversation(service, page)["id"]
    page.locator("#history .history-delete").first.click()
    expect(page.locator("#history li")).to_have_count(0)
    expect(page.locator(".turn")).to_have_count(0)
    assert httpx.get(f"{service.url}/conversations/{cid}").status_code == 404


def test_stop_mid_stream_keeps_the_partial_answer_and_retry_asks_again(page: Page, service):
    ask(page, f"Give a long answer: {QUESTION}")
    expect(last_turn(page).locator(".answer")).to_contain_text("Sentence 2 ", timeout=20_000)
    page.click("#stop")
    wait_done(page, "stopped")
    expect(last_turn(page).locator(".turn-status")).to_have_text("Stopped")
    shown = squash(last_turn(page).locator(".answer").inner_text())
    assert "Sentence 40 " not in shown
    turn = conversation(service, page)["turns"][0]
    assert turn["status"] == "stopped" and "Sentence 2 " in turn["answer"]["answer"]
    expect(page.locator("#send")).to_be_visible()
    last_turn(page).get_by_role("button", name="Retry").click()
    expect(last_turn(page)).to_have_attribute("aria-busy", "true")
    expect(page.locator(".turn")).to_have_count(1)  # the retry takes the stopped turn's place
    expect(last_turn(page).locator(".question")).to_have_text(f"Give a long answer: {QUESTION}")
    page.click("#stop")
    wait_done(page, "stopped")


def test_a_dropped_connection_resumes_with_the_full_text_exactly_once(page: Page, service, console_errors):
    service.dropper.after = 4
    before = len(service.dropper.resumes)
    ask(page, f"Tell me a long story: {QUESTION}")
    answer = last_turn(page).locator(".answer")
    # While it still streams (before the final answer event could redraw it), each piece is there once.
    expect(answer).to_contain_text("Sentence 12 of", timeout=30_000)
    assert last_turn(page).get_attribute("aria-busy") == "true"
    streamed = answer.inner_text()
    for i in range(1, 12):
        assert streamed.count(LONG_SENTENCE.format(i=i).strip()) == 1, f"sentence {i} while streaming"
    wait_done(page, timeout=60_000)
    resumes = service.dropper.resumes[before:]
    assert resumes and re.fullmatch(r"\d+-\d+", resumes[0]), f"no resume with a Last-Event-ID: {resumes}"
    text = answer.inner_text()
    for i in range(1, 41):
        assert text.count(LONG_SENTENCE.format(i=i).strip()) == 1, f"sentence {i}"
    # The browser reports the cut response; nothing else may be on the console (the page warns there, failing
    # this test, when the streamed text differs from the stored answer).
    assert any("ERR_INCOMPLETE_CHUNKED_ENCODING" in e for e in console_errors)
    console_errors[:] = [e for e in console_errors if "ERR_INCOMPLETE_CHUNKED_ENCODING" not in e]
    expect(last_turn(page).locator(".step[data-key=connection]")).to_have_count(0)


def test_images_by_button_drop_and_paste_reach_the_omni_path(page: Page, service):
    image = png(48, 32)
    page.set_input_files("#image-input", files=[{"name": "blue.png", "mimeType": "image/png", "buffer": image}])
    expect(page.locator(".attachment img")).to_have_count(1)
    for event in ("drop", "paste"):  # a file dropped on the page, an image pasted into the box
        page.evaluate(
            """([event, bytes]) => {
                const data = new DataTransfer();
                data.items.add(new File([new Uint8Array(bytes)], `${event}.png`, {type: "image/png"}));
                const target = event === "drop" ? document : document.getElementById("question");
                target.dispatchEvent(event === "drop"
                    ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
                    : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
            }""",
            [event, list(image)],
        )
    expect(page.locator(".attachment img")).to_have_count(3)
    page.locator(".attachment .remove").last.click()
    expect(page.locator(".attachment img")).to_have_count(2)
    requests_before = len(service.engine.requests)
    ask(page, "What colour is this picture?")
    wait_done(page)
    expect(last_turn(page).locator(".question-thumb")).to_have_count(2)
    expect(page.locator(".attachment")).to_have_count(0)  # sent: the box is empty again
    sent = [r.multimodal for r in service.engine.requests[requests_before:] if r.multimodal]
    assert sent and len(sent[0]["image"]) == 2
    turn = conversation(service, page)["turns"][0]
    assert [m["kind"] for m in turn["media"]] == ["image", "image"]


def test_hostile_titles_snippets_urls_and_model_output_render_inert(page: Page, service):
    alerts: list[str] = []
    page.on("dialog", lambda dialog: alerts.append(dialog.message))
    ask(page, "hostile tower facts")
    wait_done(page)
    turn = last_turn(page)
    expect(turn.locator(".card-title").first).to_contain_text("<img src=x onerror=")  # shown as text
    expect(turn.locator(".answer")).to_contain_text("<img src=x onerror=")
    expect(turn.locator(".answer a[href]", has_text="link")).to_have_count(0)  # the javascript: href is dropped
    assert page.locator("img[src='x'], [onerror]").count() == 0
    assert page.locator("a[href^='javascript:' i]").count() == 0
    turn.locator(".chip").first.hover()
    expect(page.locator("#popover")).to_be_visible()
    assert page.evaluate("document.body.dataset.pwned") is None
    assert not alerts


def test_keyboard_enter_shift_enter_ime_and_chinese(page: Page, service):
    box = page.locator("#question")
    box.focus()
    page.keyboard.type("北京今天")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("天气怎么样？")
    assert box.input_value() == "北京今天\n天气怎么样？"
    # Enter that accepts an IME candidate is composing: it must not send.
    page.evaluate(
        """() => document.getElementById("question").dispatchEvent(
            new KeyboardEvent("keydown", {key: "Enter", isComposing: true, bubbles: true, cancelable: true}))"""
    )
    expect(page.locator(".turn")).to_have_count(0)
    page.keyboard.press("Enter")
    expect(page.locator(".turn")).to_have_count(1)
    assert page.locator(".turn .question p").inner_text() == "北京今天\n天气怎么样？"
    wait_done(page)
    expect(last_turn(page).locator(".follow-up").last).to_have_text("接下来会怎样？")
    # Keyboard only: Tab reaches the controls, and focus is visible.
    page.keyboard.press("Shift+Tab")
    focused = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert focused != "none"


def test_phone_width_dark_theme(browser, service):
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, color_scheme="dark", has_touch=True, is_mobile=True
    )
    page = context.new_page()
    page.goto(service.url)
    ask(page, QUESTION)
    wait_done(page)
    # Nothing wider than the phone: neither the page nor the scrolling thread scrolls sideways.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.evaluate("(t => t.scrollWidth <= t.clientWidth)(document.getElementById('thread'))")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(22, 23, 22)"  # the dark theme followed the system
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    # A tap on a chip shows its passage (no hover on a touch screen) instead of leaving the page.
    chip = last_turn(page).locator(".answer .chip").first
    chip.tap()
    expect(page.locator("#popover")).to_be_visible()
    assert len(context.pages) == 1  # no new tab opened
    shot(page, "phone-dark")
    page.click("#toggle-sidebar")
    expect(page.locator("#sidebar")).to_be_in_viewport()
    context.close()


@pytest.fixture(scope="module")
def locked_service(tokenizer_dir, fixture_web, tmp_path_factory):
    """Keys required, and a text-only model."""
    settings = Settings(auth=AuthConfig(api_keys=["s3cret"]), agent=AgentConfig(related=False))
    app, _ = page_app(
        tokenizer_dir, fixture_web, settings=settings, corpus_dir=tmp_path_factory.mktemp("c"), media=frozenset()
    )
    with PageServer(app) as server:
        yield server


def test_api_key_is_asked_once_and_kept_and_a_text_only_model_says_so(browser, locked_service):
    context = browser.new_context()
    page = context.new_page()
    page.goto(locked_service.url)
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    page.fill("#key-input", "wrong")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_have_text("That key was not accepted.")
    page.fill("#key-input", "s3cret")
    page.click("#key-form button[type=submit]")
    expect(dialog).to_be_hidden()
    expect(page.locator("#attach-image")).to_have_attribute("aria-disabled", "true")
    page.click("#attach-image", force=True)  # a click on the disabled button says why
    expect(page.locator("#composer-note")).to_contain_text("reads text only")
    ask(page, QUESTION)
    wait_done(page)
    page.reload()
    expect(page.locator("#history li")).to_have_count(1)  # the key was kept: no dialog, history loads
    expect(dialog).to_be_hidden()
    context.close()
