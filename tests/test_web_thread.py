"""The page in a conversation, in headless Chromium against the real service (``tests/web_session.py``): the
history panel at phone width, long threads, Copy and Export, Retry, the search states and the progress line,
citation chips and their popovers — each at desktop and phone width, and in Chinese and English where the
words matter.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from scripts.page_harness import LONG_SENTENCE, OUTAGE, SLOW
from tests import web_session
from tests.web_session import (
    EVERY_FORM,
    WIDTHS,
    ask,
    eventually,
    lang_of,
    last_turn,
    open_id,
    shot,
    wait_done,
)

# The module's fixtures (one service and one browser per module).
browser, open_page, service = web_session.browser, web_session.open_page, web_session.service

QUESTION = "Which companies are in the Dow Jones?"
WORDS = {
    "en": {
        "copy": "Copy",
        "retry": "Retry",
        "sources": "Sources",
        "searching": "Searching: {}",
        "searched": "Searched: {}",
        "empty": "No results: {}",
        "failed": "Search failed (local, web): {}",
        "read": r"Read \d+ pages?: \d+ read",
        "note_empty": "The search found nothing for “{}”; answered without sources",
    },
    "zh": {
        "copy": "复制",
        "retry": "重试",
        "sources": "来源",
        "searching": "正在搜索：{}",
        "searched": "已搜索：{}",
        "empty": "没有结果：{}",
        "failed": "搜索失败（local, web）：{}",
        "read": r"已阅读 \d+ 个网页：已读 \d+ 个",
        "note_empty": "搜索“{}”没有结果，回答未引用来源",
    },
}


@pytest.fixture(scope="module")
def answered(service) -> str:
    """A conversation of two searched turns, asked over the API: its id."""
    first = service.ask(QUESTION, mode="auto")
    service.ask("Who leads the Dow Jones?", mode="auto", conversation_id=first["conversation_id"])
    return first["conversation_id"]


def clipboard(page: Page) -> str:
    return page.evaluate("navigator.clipboard.readText()")


def box(locator) -> dict:
    return locator.evaluate("e => e.getBoundingClientRect().toJSON()")


def overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def expected_markdown(answer: dict, heading: str) -> str:
    """What Copy must give for a stored answer: its text, then its cited sources, numbered, as Markdown links."""
    text = answer["answer"].strip()
    by_n = {s["n"]: s for s in answer["sources"]}
    cited = sorted({int(n) for n in re.findall(r"\[(\d+)\]", text)} & set(by_n))
    lines = []
    for n in cited:
        title = re.sub(r"([\\`*_\[\]<>])", r"\\\1", " ".join(by_n[n]["title"].split()))
        url = by_n[n]["url"].replace("(", "%28").replace(")", "%29")
        lines.append(f"- [{n}] [{title}]({url})")
    return f"{text}\n\n**{heading}**\n\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("form", WIDTHS)
def test_the_history_panel_closes_and_gives_focus_back(open_page, service, form):
    cid = service.ask("Who designed the Eiffel Tower?")["conversation_id"]
    page = open_page(form)
    sidebar, toggle, entry = (
        page.locator("#sidebar"),
        page.locator("#toggle-sidebar"),
        f'#history li[data-id="{cid}"] a',
    )
    if form.startswith("desktop"):  # a column of the page: nothing to open, close or trap
        expect(toggle).to_be_hidden()
        expect(page.locator("#close-sidebar")).to_be_hidden()
        page.keyboard.press("Escape")
        expect(sidebar).to_be_in_viewport()
        page.click(entry)
        expect(page.locator(".turn")).to_have_count(1)
        page.click("#new-chat")
        expect(page.locator(".turn")).to_have_count(0)
        expect(sidebar).to_be_in_viewport()
        return

    def opened() -> None:
        toggle.tap()
        expect(sidebar).to_be_in_viewport(ratio=1)
        expect(page.locator("#close-sidebar")).to_be_focused()
        assert page.evaluate("document.querySelector('.main').inert")

    def closed() -> None:
        expect(sidebar).not_to_be_in_viewport()
        expect(page.locator("#scrim")).to_be_hidden()
        assert not page.evaluate("document.querySelector('.main').inert")

    opened()
    for key in ["Tab"] * 8 + ["Shift+Tab"] * 10:  # focus goes round inside the panel, either way
        page.keyboard.press(key)
        assert page.evaluate("document.getElementById('sidebar').contains(document.activeElement)"), key
    page.keyboard.press("Escape")
    closed()
    expect(toggle).to_be_focused()  # back where it was
    opened()
    page.touchscreen.tap(375, 420)  # outside the panel
    closed()
    expect(toggle).to_be_focused()
    opened()
    page.locator("#close-sidebar").tap()
    closed()
    opened()
    page.locator(entry).tap()
    closed()
    expect(page.locator(".turn")).to_have_count(1)
    opened()
    page.locator("#new-chat").tap()
    closed()
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#question")).to_be_focused()


@pytest.mark.parametrize("form", WIDTHS)
def test_a_new_question_comes_to_the_top_and_its_answer_is_followed(open_page, service, form):
    earlier = service.ask("Who designed the Eiffel Tower?")["conversation_id"]
    page = open_page(form, f"/#/c/{earlier}")
    expect(page.locator(".turn")).to_have_count(1)
    service.engine.delay_s = 0.004  # time to scroll away while it streams
    try:
        ask(page, f"Give a long answer, {SLOW}: {QUESTION}")  # the search takes a while: nothing moves meanwhile
        expect(last_turn(page).locator(".step.query.searching")).to_be_visible()
        gap = "(t => t.querySelector('.turn:last-of-type .question').getBoundingClientRect().top"
        gap += " - t.getBoundingClientRect().top)(document.getElementById('thread'))"
        assert 0 <= page.evaluate(gap) <= 40, "the new question is not at the top of the reading area"
        answer = last_turn(page).locator(".answer")
        expect(answer).to_contain_text("Sentence 3 ", timeout=20_000)
        at_end = "() => (t => t.scrollHeight - t.clientHeight - t.scrollTop <= 24)(document.getElementById('thread'))"
        eventually(page, at_end)  # the answer's newest line in view
        expect(page.locator("#jump")).to_be_hidden()
        # The reader scrolls back to the first answer: the page stops following and offers the way back.
        page.evaluate("document.getElementById('thread').scrollTop -= 300")
        expect(page.locator("#jump")).to_be_visible()
        held = page.evaluate("document.getElementById('thread').scrollTop")
        expect(answer).to_contain_text("Sentence 12 ")
        assert page.evaluate("document.getElementById('thread').scrollTop") == held  # left where the reader is
        page.click("#jump")
        eventually(page, at_end)
        expect(page.locator("#jump")).to_be_hidden()
        expect(answer).to_contain_text("Sentence 30 ", timeout=20_000)
        eventually(page, at_end)  # followed again, as the answer grew past the area
        wait_done(page)
    finally:
        service.engine.delay_s = 0.002
    eventually(page, at_end)  # the follow-up questions too
    assert page.evaluate("(t => t.scrollHeight > 1.5 * t.clientHeight)(document.getElementById('thread'))")
    assert answer.inner_text().count(LONG_SENTENCE.format(i=40).strip()) == 1


@pytest.mark.parametrize("form", EVERY_FORM)
def test_copy_keeps_the_citations_and_appends_the_numbered_sources(open_page, service, form):
    words = WORDS[lang_of(form)]
    page = open_page(form)
    ask(page, QUESTION)
    wait_done(page)
    stored = service.conversation(open_id(page))["turns"][0]["answer"]
    expected = expected_markdown(stored, words["sources"])
    assert re.search(r"\[\d+\]", stored["answer"]) and "](http" in expected
    last_turn(page).get_by_role("button", name=words["copy"]).click()
    assert clipboard(page) == expected
    page.reload()  # a reloaded answer copies the same
    page.evaluate("navigator.clipboard.writeText('')")
    last_turn(page).get_by_role("button", name=words["copy"]).click()
    assert clipboard(page) == expected


@pytest.mark.parametrize("form", EVERY_FORM)
def test_export_gives_the_conversation_as_markdown(open_page, service, answered, form):
    words = WORDS[lang_of(form)]
    page = open_page(form, f"/#/c/{answered}")
    turns = service.conversation(answered)
    expect(page.locator(".turn")).to_have_count(2)
    with page.expect_download() as download:
        page.click("#export")
    assert download.value.suggested_filename.endswith(".md")
    text = download.value.path().read_text(encoding="utf-8")
    parts = [f"# {turns['title']}"]
    parts += [
        f"## {t['question']}\n\n{expected_markdown(t['answer'], words['sources']).rstrip()}" for t in turns["turns"]
    ]
    assert text == "\n\n".join(parts) + "\n"
    # Copy gives each answer exactly as the export has it (one function writes both).
    page.locator(".turn").nth(1).get_by_role("button", name=words["copy"]).click()
    assert clipboard(page) in text


@pytest.mark.parametrize("form", WIDTHS)
def test_retry_takes_the_place_of_a_stopped_turn(open_page, service, form):
    words = WORDS[lang_of(form)]
    earlier = service.ask("Who designed the Eiffel Tower?")["conversation_id"]
    page = open_page(form, f"/#/c/{earlier}")
    expect(page.locator(".turn")).to_have_count(1)
    ask(page, f"Give a long answer: {QUESTION}")
    expect(last_turn(page).locator(".answer")).to_contain_text("Sentence 2 ", timeout=20_000)
    page.click("#stop")
    wait_done(page, "stopped")
    last_turn(page).get_by_role("button", name=words["retry"]).click()
    expect(page.locator(".turn")).to_have_count(2)
    wait_done(page)
    expect(last_turn(page).locator(".answer")).to_contain_text("Sentence 40 ")
    stored = service.conversation(open_id(page))["turns"]
    assert [t["status"] for t in stored] == ["done", "stopped", "done"]  # the service keeps every turn
    page.reload()  # and the page shows the retry in the stopped turn's place again
    expect(page.locator(".turn")).to_have_count(2)
    expect(last_turn(page)).to_have_attribute("data-status", "done")


@pytest.mark.parametrize("form", EVERY_FORM)
def test_searching_results_no_results_and_a_failed_search_look_different(open_page, form):
    words = WORDS[lang_of(form)]
    page = open_page(form)
    questions = {
        "searched": f"Tell me {SLOW}: {QUESTION}",
        "empty": "qxzvw blorptangle frumious",
        "failed": f"{OUTAGE}: who designed the Eiffel Tower?",
    }
    for state, question in questions.items():
        ask(page, question)
        line = last_turn(page).locator(".step.query")
        if state == "searched":  # while it searches
            expect(line).to_have_class(re.compile(r"\bsearching\b"))
            expect(line).to_have_text(words["searching"].format(question))
        expect(line).to_have_class(re.compile(rf"\b{state}\b"), timeout=20_000)
        expect(line).to_have_text(words[state].format(question))
        wait_done(page)
    expect(page.locator(".turn").nth(1).locator(".notes li")).to_have_text(
        words["note_empty"].format(questions["empty"])
    )
    page.reload()  # a reloaded conversation tells the three apart the same way
    for i, (state, question) in enumerate(questions.items()):
        line = page.locator(".turn").nth(i).locator(".step.query")
        expect(line).to_have_class(re.compile(rf"\b{state}\b"))
        expect(line).to_have_text(words[state].format(question))


@pytest.mark.parametrize("form", WIDTHS)  # its words in every form: the test above
def test_the_live_progress_line_ends_as_a_reloaded_one_reads(open_page, form):
    words = WORDS[lang_of(form)]
    page = open_page(form)
    ask(page, QUESTION)
    wait_done(page)
    query = last_turn(page).locator(".step.query")
    expect(query).to_have_text(words["searched"].format(QUESTION))
    expect(last_turn(page).locator(".step[data-key^=read]")).to_have_text(re.compile(words["read"]))
    expect(last_turn(page).locator(".step")).to_have_count(2)  # nothing left "in progress"
    live = query.inner_text()
    page.reload()
    expect(last_turn(page).locator(".step.query")).to_have_text(live)
    shot(page, f"thread-{form}")  # thread-phone-zh is the README's Chinese interface


@pytest.mark.parametrize("form", WIDTHS)
def test_citation_chips_are_24_px_targets_and_their_popover_covers_no_chip_nor_the_ask_box(open_page, answered, form):
    page = open_page(form, f"/#/c/{answered}")
    chips = page.locator(".turn").first.locator(".answer .chip")
    expect(chips.first).to_be_visible()
    assert chips.count() >= 3
    for i in range(chips.count()):
        size = box(chips.nth(i))
        assert size["width"] >= 24 and size["height"] >= 24, f"chip {i + 1}: {size}"
    popover = page.locator("#popover")
    for i in (0, chips.count() - 1):  # the first chip (the next one is right below it), and the last
        chip = chips.nth(i)
        if form.startswith("phone"):
            chip.tap()
        else:
            chip.hover()
        expect(popover).to_be_visible()
        shown = box(popover)
        assert not overlap(shown, box(page.locator("#composer"))), f"chip {i + 1}'s popover covers the ask box"
        assert not overlap(shown, box(chip)), f"chip {i + 1}'s popover covers the chip"
        if i + 1 < chips.count():
            assert not overlap(shown, box(chips.nth(i + 1))), f"chip {i + 1}'s popover covers the next chip"
        page.keyboard.press("Escape")
        expect(popover).to_be_hidden()
