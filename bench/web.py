"""The web page: its weight, and how soon a click shows sources and answer text, against the wire.

Weight: the built bundle (``api/web/dist``, ``make web``) as a browser downloads it, gzip level 9 —
JS, CSS and HTML. Goal: under 100 KB.

Time: the real service on the scripted model and the fixture web (``scripts/page_harness.py``: the
model calls the search tool, the fixture web's real pages are fetched and read, then the answer streams
at 3 characters per ``--delay-ms``), driven in headless Debian Chromium. For each question, from the
click (``performance.mark("megrez:ask")``) to the first source card painted and to the first answer
text painted (marks set in the frame that paints them, ``api/web/src/turn.js``), and from each one's
arrival in the page (its event read off the stream) to that paint: the page's own cost. The baseline, in the
same run and on the same questions: a plain HTTP client (httpx) posting the same question and reading
the SSE stream, timed from the request to the ``sources`` event and to the first ``token`` event. The
difference is what the page adds (building the request, reading the stream, rendering, painting).

    .venv/bin/python -m bench.web [--questions 20] [--delay-ms 4]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from api.routes.web import WEB_DIST
from scripts.fixture_web import FixtureWeb
from scripts.megrez_tokenizer import build_megrez_tokenizer
from scripts.page_harness import PageServer, launch_chromium, page_app

QUESTIONS = [
    "Which companies are in the Dow Jones?",
    "What are the best celebrity beauty brands?",
    "How do I change the language in Word?",
    "What is the Dow Jones Industrial Average?",
    "Which beauty brand did Selena Gomez start?",
]


def weight() -> dict[str, int]:
    """Bytes (raw, gzip -9) of each file the page loads."""
    files = {
        "js": WEB_DIST / "assets" / "app.js",
        "css": WEB_DIST / "assets" / "app.css",
        "html": WEB_DIST / "index.html",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"the page is not built ({', '.join(missing)}): run make web")
    out = {}
    for kind, path in files.items():
        raw = path.read_bytes()
        out[kind] = len(raw)
        out[f"{kind}_gzip"] = len(gzip.compress(raw, 9))
    return out


def wire(url: str, question: str) -> tuple[float, float]:
    """ms from the request to the ``sources`` event and to the first ``token`` event, read with httpx."""
    start = time.perf_counter()
    sources = token = None
    with httpx.stream(
        "POST", f"{url}/chat?websearch=auto&stream=true", json={"message": question}, timeout=60
    ) as response:
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                now = (time.perf_counter() - start) * 1000
                if event == "sources" and sources is None:
                    sources = now
                elif event == "token" and token is None:
                    token = now
    return sources, token


def in_page(page, question: str) -> tuple[float, float, float, float]:
    """ms from the click to the first painted source card and the first painted answer text, and from each
    one's arrival in the page (its event read from the stream) to its paint."""
    page.click("#new-chat")
    page.evaluate("performance.clearMarks()")
    page.fill("#question", question)
    page.click("#send")
    page.wait_for_selector(".turn[data-status]", timeout=60_000)
    marks = page.evaluate("Object.fromEntries(performance.getEntriesByType('mark').map(m => [m.name, m.startTime]))")
    ask = marks["megrez:ask"]
    return (
        marks["megrez:sources"] - ask,
        marks["megrez:first-token"] - ask,
        marks["megrez:sources"] - marks["megrez:sources-arrived"],
        marks["megrez:first-token"] - marks["megrez:first-token-arrived"],
    )


def summary(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"{statistics.median(values):7.1f} / {p95:7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--delay-ms", type=float, default=4.0)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    sizes = weight()
    total = sizes["js_gzip"] + sizes["css_gzip"] + sizes["html_gzip"]
    print(
        f"page weight, gzip -9: JS {sizes['js_gzip'] / 1024:.1f} KiB ({sizes['js'] / 1024:.1f} raw), "
        f"CSS {sizes['css_gzip'] / 1024:.1f} KiB, HTML {sizes['html_gzip'] / 1024:.1f} KiB; "
        f"total {total / 1024:.1f} KiB (goal < 100 KB)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_megrez_tokenizer(Path(tmp) / "tokenizer")
        web = FixtureWeb().start()
        app, _ = page_app(Path(tmp) / "tokenizer", web, corpus_dir=Path(tmp), delay_s=args.delay_ms / 1000)
        page_times: list[tuple[float, float, float, float]] = []
        wire_times: list[tuple[float, float]] = []
        try:
            with PageServer(app) as server, sync_playwright() as p:
                browser = launch_chromium(p)
                page = browser.new_page()
                page.goto(server.url)
                page.wait_for_selector("#question")
                wire(server.url, QUESTIONS[0])  # warm both paths (imports, first index use)
                in_page(page, QUESTIONS[0])
                for i in range(args.questions):
                    question = f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"
                    # Alternate which goes first, so neither always meets a warmer cache.
                    if i % 2:
                        page_times.append(in_page(page, question))
                        wire_times.append(wire(server.url, question))
                    else:
                        wire_times.append(wire(server.url, question))
                        page_times.append(in_page(page, question))
                browser.close()
        finally:
            web.stop()
    print(f"\n{args.questions} questions, answer at 3 chars / {args.delay_ms:g} ms; ms p50 / p95")
    print(f"{'':34} {'first source':>17} {'first answer text':>19}")
    print(
        f"{'page: click → painted':34} {summary([p[0] for p in page_times]):>17} "
        f"{summary([p[1] for p in page_times]):>19}"
    )
    print(
        f"{'wire: request → SSE event (httpx)':34} {summary([s for s, _ in wire_times]):>17} "
        f"{summary([t for _, t in wire_times]):>19}"
    )
    added = [p[0] - w[0] for p, w in zip(page_times, wire_times, strict=True)]
    added_token = [p[1] - w[1] for p, w in zip(page_times, wire_times, strict=True)]
    print(f"{'page minus wire, same question':34} {summary(added):>17} {summary(added_token):>19}")
    print(
        f"{'page: event arrived → painted':34} {summary([p[2] for p in page_times]):>17} "
        f"{summary([p[3] for p in page_times]):>19}"
    )


if __name__ == "__main__":
    main()
