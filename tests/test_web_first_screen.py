"""The page before and around a conversation, in headless Chromium against the real service
(``tests/web_session.py``): the history (dates, filter, rename), the example questions, a search started from
the URL and the OpenSearch description, the interface in Chinese and English (service notes, statuses and
errors worded by their codes), and the engine's state — each at desktop and phone width, and in both
languages where the words matter.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from datetime import datetime
from xml.etree import ElementTree

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests import web_session
from tests.web_session import (
    EVERY_FORM,
    WIDTHS,
    ask,
    lang_of,
    last_turn,
    open_id,
    wait_done,
)

# The module's fixtures (one service and one browser per module).
browser, open_page, service = web_session.browser, web_session.open_page, web_session.service

WORDS = {
    "en": {
        "html": "en",
        "new_chat": "New chat",
        "placeholder": "Ask anything…",
        "no_match": "No conversation matches.",
        "example": "Who designed the Eiffel Tower, and why was it built?",
        "status": "Writing the answer…",
        "notes": ["No page could be read; answered from the search snippets", "a note stored before codes"],
        "error": "The model engine is unavailable right now; try again shortly.",
        "state": "Model unavailable",
    },
    "zh": {
        "html": "zh-CN",
        "new_chat": "新对话",
        "placeholder": "有什么想知道的…",
        "no_match": "没有匹配的对话。",
        "example": "埃菲尔铁塔是谁设计的？为什么要建它？",
        "status": "正在撰写回答…",
        "notes": ["所有网页都无法读取，根据搜索摘要回答", "a note stored before codes"],
        "error": "模型引擎暂时不可用，请稍后再试。",
        "state": "模型不可用",
    },
}
OTHER = {"en": "zh", "zh": "en"}
# What a service that cannot start its engine tells (the contract of /info's `setup`), with the operator's
# detail the page must not show.
UNAVAILABLE = {
    "keys_required": False,
    "ready": False,
    "engine": "unavailable",
    "engine_detail": "HfHubHTTPError: 'https://huggingface.co/api/models/x' (internal 10.0.0.7)",
    "setup": [{"code": "engine_weights_missing", "params": {"model": "Infinigence/Megrez-3B-Omni"}}],
    "model": "Infinigence/Megrez-3B-Omni",
    "media": [],
    "default_mode": "auto",
    "limits": {"max_message_chars": 8000, "max_body_bytes": 1, "max_images": 4, "max_audio": 2, "max_audio_seconds": 1},
}


def sse(*events: dict) -> str:
    """An SSE body of ``events``, as the service writes them."""
    return "".join(f"event: {e['type']}\nid: 1-{i}\ndata: {json.dumps(e)}\n\n" for i, e in enumerate(events))


def canned_turn(page: Page, *events: dict) -> None:
    """The next question is answered with ``events`` (after ``meta``) instead of by the service."""
    meta = {"type": "meta", "conversation_id": "canned", "message_id": "m1"}
    body = sse(meta, *events)
    page.route(
        lambda url: "/chat?" in url, lambda route: route.fulfill(body=body, content_type="text/event-stream"), times=1
    )


def history_panel(page: Page, form: str) -> None:
    if form.startswith("phone"):
        page.locator("#toggle-sidebar").tap()
        expect(page.locator("#sidebar")).to_be_in_viewport(ratio=1)


@pytest.mark.parametrize("form", EVERY_FORM)
def test_history_shows_dates_filters_and_renames(open_page, service, form):
    words = WORDS[lang_of(form)]
    twins = [service.ask("What is the tallest tower?")["conversation_id"] for _ in range(2)]
    page = open_page(form)
    history_panel(page, form)
    items = [page.locator(f'#history li[data-id="{cid}"]') for cid in twins]
    listed = {c["id"]: c for c in httpx.get(f"{service.url}/conversations?limit=500", timeout=10).json()}
    for item, cid in zip(items, twins, strict=True):  # same title: the date (here: the time today) tells them apart
        stamp = item.locator("time")
        expect(stamp).to_have_text(re.compile(r"\d\d:\d\d"))
        shown = datetime.fromisoformat(stamp.get_attribute("datetime")).timestamp()
        assert abs(shown - listed[cid]["updated"]) < 1
    page.fill("#history-filter", "TALLEST")  # as typed, any case
    for item in items:
        expect(item).to_be_visible()
    expect(page.locator("#history li:not(:has-text('tallest'))")).to_have_count(0)
    page.fill("#history-filter", "no such conversation")
    expect(page.locator("#history li")).to_have_count(0)
    expect(page.locator("#history-empty")).to_have_text(words["no_match"])
    page.fill("#history-filter", "")
    # Rename: Enter saves (on the service too), Escape keeps the old title.
    items[0].locator(".history-rename").click()
    items[0].locator("input").fill("  埃菲尔 tower\tnotes ")
    page.keyboard.press("Enter")
    expect(items[0].locator(".history-title")).to_have_text("埃菲尔 tower notes")
    assert service.conversation(twins[0])["title"] == "埃菲尔 tower notes"
    expect(items[0].locator(".history-rename")).to_be_focused()
    items[1].locator(".history-rename").click()
    page.keyboard.type("discarded")
    page.keyboard.press("Escape")
    expect(items[1].locator(".history-title")).to_have_text("What is the tallest tower?")
    expect(page.locator("#sidebar")).to_be_in_viewport()  # Escape ended the rename, not the panel
    assert service.conversation(twins[1])["title"] == "What is the tallest tower?"


@pytest.mark.parametrize("form", EVERY_FORM)
def test_the_first_screen_offers_example_questions_in_both_languages(open_page, form):
    words = WORDS[lang_of(form)]
    page = open_page(form)
    examples = page.locator("#examples button")
    expect(examples).to_have_count(4)
    expect(examples.first).to_have_text(words["example"])
    texts = examples.all_inner_texts()
    assert any(re.search(r"[\u4e00-\u9fff]", q) for q in texts) and any(re.fullmatch(r"[ -~]+", q) for q in texts)
    examples.first.click()
    expect(last_turn(page).locator(".question")).to_have_text(words["example"])
    wait_done(page)
    expect(page.locator("#welcome")).to_be_hidden()


@pytest.mark.parametrize("form", WIDTHS)
def test_a_search_starts_from_the_url_and_a_reload_does_not_repeat_it(open_page, service, form):
    question = "Who designed the Eiffel Tower?"
    page = open_page(form, f"/?q={urllib.parse.quote(question)}&mode=off")
    expect(last_turn(page).locator(".question")).to_have_text(question)
    wait_done(page)
    assert "q=" not in page.url and page.url.endswith(f"/#/c/{open_id(page)}")
    turn = service.conversation(open_id(page))["turns"][0]
    assert turn["question"] == question and turn["answer"]["mode"] == "off"
    expect(page.locator("#mode")).to_have_value("off")
    page.reload()
    expect(page.locator(".turn")).to_have_count(1)
    assert len(service.conversation(open_id(page))["turns"]) == 1


@pytest.mark.parametrize("form", WIDTHS)
def test_the_opensearch_description_adds_the_page_as_a_search_engine(open_page, service, form):
    page = open_page(form, navigate=False)
    page.add_init_script(
        "window.violations = []; document.addEventListener('securitypolicyviolation',"
        " (e) => violations.push(e.violatedDirective))"
    )
    page.goto(service.url)
    link = page.locator('link[rel="search"]')
    expect(link).to_have_attribute("type", "application/opensearchdescription+xml")
    description = page.request.get(service.url + link.get_attribute("href"))
    assert description.ok and description.headers["content-type"] == "application/opensearchdescription+xml"
    namespace = {"os": "http://a9.com/-/spec/opensearch/1.1/"}
    root = ElementTree.fromstring(description.body())
    template = root.find("os:Url[@type='text/html']", namespace).get("template")
    assert template == f"{service.url}/?q={{searchTerms}}"
    expect(page.locator("#question")).to_be_enabled()
    assert page.evaluate("violations") == []  # the page's policy allows all it loads
    page.goto(template.replace("{searchTerms}", urllib.parse.quote_plus("Who built the Eiffel Tower?")))
    expect(last_turn(page).locator(".question")).to_have_text("Who built the Eiffel Tower?")
    wait_done(page)


@pytest.mark.parametrize("form", EVERY_FORM)
def test_the_interface_speaks_the_browsers_language_and_switches_for_good(open_page, form):
    lang = lang_of(form)
    page = open_page(form)
    words, other = WORDS[lang], WORDS[OTHER[lang]]
    expect(page.locator("html")).to_have_attribute("lang", words["html"])
    expect(page.locator("#new-chat")).to_have_text(words["new_chat"])
    expect(page.locator("#question")).to_have_attribute("placeholder", words["placeholder"])
    expect(page.locator("#lang")).to_have_value(lang)
    # What the service says arrives as codes: worded here; a note without one keeps its own text.
    status = {"type": "status", "stage": "answering", "code": "answering", "message": "Writing the answer"}
    pause = {"type": "status", "stage": "thinking", "code": "thinking", "message": "Thinking"}
    notes = [
        {"code": "pages_failed", "message": "all pages failed: answered from snippets", "params": {}},
        {"code": "other", "message": "a note stored before codes", "params": {}},
    ]
    answer = {"answer": "Done.", "citations": [], "sources": [], "queries": [], "related": [], "notes": notes}
    canned_turn(
        page,
        status,
        {"type": "token", "text": "Done."},
        {"type": "answer", "answer": answer},
        {"type": "done", "status": "done"},
    )
    ask(page, "How is it said?")
    wait_done(page)
    expect(last_turn(page).locator(".notes li")).to_have_text(words["notes"])
    error = {"type": "error", "code": "engine_unavailable", "message": "the engine is down: http://10.0.0.7:8000"}
    canned_turn(page, status, pause, error, {"type": "done", "status": "failed"})
    ask(page, "And now?")
    wait_done(page, "failed")
    expect(last_turn(page).locator(".turn-error")).to_have_text(words["error"])
    # The switch words the page again in place, the thread included, and is remembered.
    page.select_option("#lang", OTHER[lang])
    expect(page.locator("html")).to_have_attribute("lang", other["html"])
    expect(page.locator("#new-chat")).to_have_text(other["new_chat"])
    expect(page.locator(".turn").first.locator(".notes li")).to_have_text(other["notes"])
    expect(last_turn(page).locator(".turn-error")).to_have_text(other["error"])
    expect(page.locator("#examples button").first).to_have_text(other["example"])
    page.goto(page.url.split("#")[0])
    expect(page.locator("html")).to_have_attribute("lang", other["html"])
    expect(page.locator("#question")).to_have_attribute("placeholder", other["placeholder"])


@pytest.mark.parametrize("form", EVERY_FORM)
def test_until_the_engine_is_ready_the_ask_box_says_why_and_waits(open_page, service, form):
    words = WORDS[lang_of(form)]
    page = open_page(form, navigate=False)
    page.clock.install()
    page.route("**/info", lambda route: route.fulfill(json=UNAVAILABLE), times=1)
    page.goto(service.url)
    expect(page.locator("#service-state")).to_have_text(words["state"])
    note = page.locator("#engine-note")
    expect(note).to_contain_text("MEGREZ_ENGINE__MODEL")
    expect(note).to_contain_text("MEGREZ_ENGINE__BACKEND=openai MEGREZ_ENGINE__OPENAI_BASE_URL=")
    expect(note).to_contain_text("Infinigence/Megrez-3B-Omni")
    expect(page.locator("#question")).to_be_disabled()
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#examples button").first).to_be_disabled()
    assert "HfHubHTTPError" not in page.locator("body").inner_text()  # operators read it in the log and /readyz
    page.clock.run_for(3500)  # the page asks again: this time the real service, which is ready
    expect(page.locator("#question")).to_be_enabled()
    expect(note).to_be_hidden()
    expect(page.locator("#service-state")).to_have_text("")
