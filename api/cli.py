"""The ``megrez-search`` command: ask, search, extract, select and support from the shell (and for benchmarks)."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from retrieval.events import PageEvent, RetrievalEvent, SearchEvent
from retrieval.types import Page


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class CommandFailed(Exception):
    """The command could not do its job (engine down, engine error): printed as one line, exit status 1."""


def _settings():
    """The settings from the environment / ``.env``; a bad value is a one-line usage error naming it."""
    from pydantic import ValidationError

    from api.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"MEGREZ_{'__'.join(str(p) for p in error['loc']).upper()}: {error['msg']}" for error in exc.errors()
        )
        raise UsageError(f"invalid settings: {problems}") from None


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


async def cmd_search(args: argparse.Namespace) -> None:
    from retrieval.pipeline import Retriever

    settings = _settings()
    search = settings.search.model_copy(update={k: v for k, v in (("backends", args.backend), ("k", args.k)) if v})
    try:
        retriever = Retriever.from_config(search, settings.fetch, settings.select, redis_url=settings.redis_url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def progress(event: RetrievalEvent) -> None:
        if isinstance(event, SearchEvent):
            for failure in event.failures:
                print(f"· {failure.backend}: {failure.reason}", file=sys.stderr)
            print(f"· {len(event.results)} results from {event.backend or 'no backend'}", file=sys.stderr)
        elif isinstance(event, PageEvent):
            note = f" ({event.error})" if event.error else ""
            print(f"· {event.source}: {event.url}{note}", file=sys.stderr)

    async with retriever:
        found = await retriever.retrieve(
            args.query,
            language=args.language,
            time_range=args.time_range,
            fetch=args.fetch,
            budget_tokens=args.budget,
            on_event=None if args.json else progress,
        )
    if not found.outcome.results:
        reasons = "; ".join(f"{b}: {r}" for b, r in found.outcome.failures) or "empty query"
        raise UsageError(f"no results ({reasons})")
    if args.json:
        _emit(
            {
                "query": found.query,
                "backend": found.outcome.backend,
                "failures": [list(f) for f in found.outcome.failures],
                "results": [asdict(r) for r in found.outcome.results],
                **({"passages": [asdict(p) for p in found.passages]} if args.fetch else {}),
            }
        )
        return
    if not args.fetch:
        for r in found.outcome.results:
            date = f" · {r.published}" if r.published else ""
            print(f"[{r.rank}] {r.title}\n    {r.url}{date}\n    {r.snippet}\n")
        return
    numbers = {url: n for n, url in enumerate(dict.fromkeys(p.url for p in found.passages), 1)}
    for passage in found.passages:
        print(f"[{numbers[passage.url]}] {passage.text}\n")
    for url, n in numbers.items():
        title = next(p.title for p in found.passages if p.url == url)
        print(f"[{n}] {title} — {url}")


def cmd_extract(args: argparse.Namespace) -> None:
    from retrieval.extract import extract

    if args.batch is None:
        doc = extract(sys.stdin.buffer.read(), url=args.url)
        if args.json:
            _emit({"title": doc.title, "date": doc.date, "language": doc.language, "text": doc.text})
        else:
            sys.stdout.write((f"{doc.title}\n\n" if doc.title else "") + doc.text + "\n")
        return
    folder = Path(args.batch)
    if not folder.is_dir():
        raise UsageError(f"--batch {folder}: not a directory")
    for path in sorted([*folder.glob("*.html"), *folder.glob("*.html.gz")]):
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        doc = extract(raw)
        _emit({"id": path.name.removesuffix(".gz").removesuffix(".html"), "title": doc.title, "text": doc.text})


def _jsonl(lines: Iterator[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank JSON line; a line that is not JSON is a usage error."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {lineno}: not JSON ({exc.msg})") from None


def _read_questions(lines: Iterator[str]) -> Iterator[tuple[int, dict]]:
    for lineno, row in _jsonl(lines):
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("pages"), list)):
            raise UsageError(f'line {lineno}: expected {{"id", "question", "pages": [{{"url", "title", "text"}}]}}')
        for page in row["pages"]:
            if (
                not isinstance(page, dict)
                or not isinstance(page.get("url"), str)
                or not isinstance(page.get("text"), str)
            ):
                raise UsageError(f'line {lineno}: each page needs "url" and "text" strings')
            if not isinstance(page.get("date") or "", str):
                raise UsageError(f'line {lineno}: a page\'s "date" must be a string (YYYY-MM-DD)')
        yield lineno, row


def cmd_select(args: argparse.Namespace) -> None:
    import datetime as dt

    from retrieval.config import SelectConfig
    from retrieval.passages import CHARS_PER_TOKEN, select_passages

    passage_tokens = SelectConfig().passage_tokens
    if args.budget_chars is not None:
        # Characters of passage text only (no citation markers), passages of the same size in characters.
        budget = {"budget_tokens": args.budget_chars, "count_tokens": len, "context_overhead": ""}
        budget["passage_tokens"] = round(CHARS_PER_TOKEN * passage_tokens)
    else:
        budget = {"budget_tokens": args.budget, "passage_tokens": passage_tokens}
    for lineno, row in _read_questions(sys.stdin):
        try:
            today = dt.date.fromisoformat(row["date"].replace("/", "-")[:10]) if row.get("date") else None
        except (AttributeError, ValueError):
            raise UsageError(f'line {lineno}: "date" must be YYYY-MM-DD, got {row["date"]!r}') from None
        pages = [
            Page(url=p["url"], title=p.get("title") or "", text=p["text"], rank=i, date=p.get("date"))
            for i, p in enumerate(row["pages"], 1)
        ]
        passages = select_passages(row["question"], pages, query=row.get("query"), today=today, **budget)
        _emit({"id": row.get("id"), "passages": [{"url": p.url, "text": p.text} for p in passages]})


async def cmd_ask(args: argparse.Namespace) -> None:
    # vLLM logs to stdout by default; stdout is the answer here.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from agent import Agent
    from agent.events import AnswerEvent, ErrorEvent, PreambleEvent, QueryEvent, SourcesEvent, StatusEvent, TokenEvent
    from agent.state import MediaItem
    from engine.base import EngineError
    from engine.factory import build_engine
    from retrieval.events import PageEvent
    from retrieval.pipeline import Retriever

    media = [MediaItem("image", _read_file(path, "--image")) for path in args.image or ()]
    media += [MediaItem("audio", _read_file(path, "--audio")) for path in args.audio or ()]
    settings = _settings()
    try:
        retriever = Retriever.from_config(
            settings.search, settings.fetch, settings.select, redis_url=settings.redis_url
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def note(line: str) -> None:
        if not args.json:
            print(f"· {line}", file=sys.stderr, flush=True)

    error: ErrorEvent | None = None
    answer = None
    engine = build_engine(settings.engine)
    try:
        await engine.start()
    except (EngineError, OSError, RuntimeError, ValueError) as exc:  # no weights, no hub access, no server
        await retriever.aclose()
        raise CommandFailed(
            f"the model engine ({settings.engine.backend}, {settings.engine.model}) did not start: {exc}"
        ) from None
    async with engine, retriever:
        turn = Agent(engine, retriever, config=settings.agent).run(
            args.question, media=media, mode=args.websearch, language=args.language
        )
        async for event in turn:
            if isinstance(event, TokenEvent) and not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, PreambleEvent) and not args.json:
                sys.stdout.write("\n")
                note("(the text above was said before searching)")
            elif isinstance(event, StatusEvent):
                note(event.message)
            elif isinstance(event, QueryEvent):
                note(f"query: {event.query}")
            elif isinstance(event, SourcesEvent):
                for failure in event.failures:
                    note(f"{failure.backend}: {failure.reason}")
                for source in event.sources:
                    note(f"[{source.n}] {source.title} — {source.domain}")
            elif isinstance(event, PageEvent):
                note(f"{event.source}: {event.url}" + (f" ({event.error})" if event.error else ""))
            elif isinstance(event, AnswerEvent):
                answer = event.answer
            elif isinstance(event, ErrorEvent):
                error = event
    if error is not None:
        message = f"{error.code}: {error.message}"
        raise (
            UsageError(message)
            if error.code in ("invalid_request", "too_long", "invalid_media")
            else CommandFailed(message)
        )
    assert answer is not None
    if args.json:
        sys.stdout.write(answer.model_dump_json() + "\n")
        return
    print()
    for citation in answer.citations:
        mark = "" if citation.supported is not False else f"  (weakly supported: {citation.score:.2f})"
        print(f"[{citation.n}] {citation.title} — {citation.url}{mark}")
    for question in answer.related:
        print(f"→ {question}")
    for line in answer.notes:
        note(line)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from api.app import create_app
    from api.http_guard import server_config
    from api.logs import configure

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    settings = _settings()
    configure(args.log_format)
    print(
        f"megrez-search: serving on http://{args.host}:{args.port} (engine: {settings.engine.backend}, "
        f"{settings.engine.model}; GET /readyz says when it is loaded)",
        file=sys.stderr,
        flush=True,
    )
    # Request heads and bodies bounded in time, X-Forwarded-For trusted only from MEGREZ_API__TRUSTED_PROXIES.
    config = server_config(
        create_app(settings), settings, host=args.host, port=args.port, log_level="info", log_config=None
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise CommandFailed(f"the server did not start on {args.host}:{args.port} (see the log above)")


def _positive(value: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {number}")
    return number


def _read_file(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}") from None


def cmd_support(args: argparse.Namespace) -> None:
    from agent.support import SupportChecker

    checker = SupportChecker() if args.threshold is None else SupportChecker(args.threshold)
    for lineno, row in _jsonl(sys.stdin):
        if not (isinstance(row, dict) and isinstance(row.get("claim"), str) and isinstance(row.get("passage"), str)):
            raise UsageError(f'line {lineno}: expected {{"id", "claim", "passage"}} with string claim and passage')
        question = row.get("question") if isinstance(row.get("question"), str) else None
        result = checker.check(row["claim"], [row["passage"]], question=question)
        _emit({"id": row.get("id"), "score": round(result.score, 4), "supported": result.supported})


def build_parser() -> argparse.ArgumentParser:
    # Not at module level: this module is the __main__ that vLLM's spawned workers import again, and the
    # search backends bring in bm25s → numba → llvmlite, whose objects break the worker's start-up scan
    # of sys.modules (vllm/triton_utils/dispatcher.py: "'_lib_fn_wrapper' object has no attribute 'get'").
    from retrieval.search.factory import BACKEND_NAMES

    parser = argparse.ArgumentParser(prog="megrez-search", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", help="search the web (or the local corpus) and optionally read the pages")
    p.add_argument("query")
    p.add_argument("--backend", action="append", choices=BACKEND_NAMES, help="backend(s) to try in order (repeat)")
    p.add_argument("--k", type=int, help="number of results")
    p.add_argument("--language", help="region/language, e.g. zh-cn, en-us")
    p.add_argument("--time-range", choices=("day", "week", "month", "year"))
    p.add_argument("--fetch", action="store_true", help="fetch the pages and print the selected passages")
    p.add_argument("--budget", type=int, help="tokens of context to select (with --fetch)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("extract", help="main text of an HTML page (stdin) or of every page in a folder")
    p.add_argument("--url", help="the page's URL (helps date and link handling)")
    p.add_argument("--batch", metavar="DIR", help="extract every *.html / *.html.gz in DIR to JSONL")
    p.add_argument("--json", action="store_true", help="print title, date, language and text as JSON")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("ask", help="answer a question: search when needed, stream a cited answer")
    p.add_argument("question")
    p.add_argument("--websearch", choices=("off", "auto", "always"), help="search mode (default: settings, auto)")
    p.add_argument("--image", action="append", metavar="PATH", help="an image for the Omni model (repeat)")
    p.add_argument("--audio", action="append", metavar="PATH", help="a speech clip for the Omni model (repeat)")
    p.add_argument("--language", help="answer language, e.g. zh, en (default: the question's)")
    p.add_argument("--json", action="store_true", help="print the structured answer as one JSON object")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("serve", help="run the HTTP API (POST /chat with SSE, conversations, health)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("support", help="score claim/passage pairs with the citation support check (JSONL in/out)")
    p.add_argument("--threshold", type=float, help="score below which a claim is unsupported (default: calibrated)")
    p.set_defaults(func=cmd_support)

    p = sub.add_parser("select", help="pack the best passages of given pages into a budget (JSONL in/out)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, default=3000, help="tokens of context per question (estimated)")
    size.add_argument(
        "--budget-chars", type=_positive, default=None, help="characters of passage text per question instead"
    )
    p.set_defaults(func=cmd_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    except UsageError as exc:
        print(f"megrez-search {args.command}: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"megrez-search {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
