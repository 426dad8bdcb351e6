"""What the page's browser tests of issue 19 share (``tests/test_web_thread.py``, ``tests/test_web_first_screen.py``):
the real service on the scripted model and the fixture web, one Chromium per module, pages at a form and in
a language, and the few steps every test takes.

Screenshots go to ``$MEGREZ_SCREENSHOTS`` (default ``build/screenshots``), as ``tests/test_web.py``'s do.

A test names its form as ``"<width>-<language>"`` (``desktop-en``, ``phone-zh``, …): :data:`WIDTHS` runs it at
both widths, :data:`EVERY_FORM` also in both languages (for the tests where the words matter). Pages of a
module share one service, so its history fills up as the tests run: a test finds its own conversations by id.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from scripts.page_harness import PageServer, launch_chromium, new_page, page_app

SHOTS = Path(os.environ.get("MEGREZ_SCREENSHOTS", "build/screenshots"))
WIDTHS = ["desktop-en", "phone-zh"]
EVERY_FORM = ["desktop-en", "desktop-zh", "phone-en", "phone-zh"]
# A local corpus besides the fixture web, so a search has two backends to name when both fail.
LOCAL_DOCUMENTS = [
    {
        "url": "corpus:megrez.md",
        "title": "Megrez",
        "text": "Megrez is a star in the Big Dipper, the dimmest of its seven bright stars.",
    }
]


class Service:
    """The served app (``url``, ``engine``) and shortcuts to its API."""

    def __init__(self, server: PageServer, engine) -> None:
        self.url, self.engine = server.url, engine

    def ask(self, question: str, *, mode: str = "off", conversation_id: str | None = None) -> dict:
        """Ask over the JSON API (no page): the finished answer, with its ``conversation_id``."""
        body = {"message": question, "conversation_id": conversation_id}
        response = httpx.post(f"{self.url}/chat?websearch={mode}", json=body, timeout=60)
        response.raise_for_status()
        return response.json()

    def conversation(self, cid: str) -> dict:
        response = httpx.get(f"{self.url}/conversations/{cid}", timeout=10)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def service(tokenizer_dir, fixture_web, tmp_path_factory):
    app, engine = page_app(
        tokenizer_dir,
        fixture_web,
        extra_documents=LOCAL_DOCUMENTS,
        corpus_dir=tmp_path_factory.mktemp("page-corpus"),
        delay_s=0.002,
    )
    with PageServer(app) as server:
        yield Service(server, engine)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, service):
    """``open_page(form, path="/", navigate=True)``: a page of the service in a fresh context; the test fails
    if any page threw or logged a warning or an error."""
    errors: list[str] = []
    pages: list[Page] = []

    def open_(form: str, path: str = "/", *, navigate: bool = True) -> Page:
        width, lang = form.split("-")
        page = new_page(browser, service.url, width, lang, errors=errors, color_scheme="light")
        page.on("dialog", lambda dialog: dialog.accept())
        pages.append(page)
        if navigate:
            page.goto(service.url + path)
        return page

    yield open_
    for page in pages:
        page.context.close()
    assert not errors, f"the page threw: {errors}"


def lang_of(form: str) -> str:
    return form.split("-")[1]


def ask(page: Page, question: str) -> None:
    page.fill("#question", question)
    page.press("#question", "Enter")


def last_turn(page: Page):
    return page.locator(".turn").last


def wait_done(page: Page, status: str = "done", timeout: float = 30_000) -> None:
    expect(last_turn(page)).to_have_attribute("data-status", status, timeout=timeout)


def open_id(page: Page) -> str:
    """The id of the conversation open on the page (from its URL)."""
    return page.url.rsplit("#/c/", 1)[1]


def eventually(page: Page, script: str, timeout_s: float = 10.0) -> None:
    """Wait until ``script`` (a function, run in the page) returns true. Not ``page.wait_for_function``: its
    poller evaluates strings, which the page's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"never true within {timeout_s} s: {script}"
        page.wait_for_timeout(50)


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=False)
