"""The ``megrez-search`` command: search, extract and select from the shell (and for benchmarks)."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from retrieval.search.factory import BACKEND_NAMES
from retrieval.types import Page


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


async def cmd_search(args: argparse.Namespace) -> None:
    from api.settings import Settings
    from retrieval.pipeline import Retriever

    settings = Settings()
    search = settings.search.model_copy(update={k: v for k, v in (("backends", args.backend), ("k", args.k)) if v})
    try:
        retriever = Retriever.from_config(search, settings.fetch, settings.select, redis_url=settings.redis_url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def progress(kind: str, payload: dict) -> None:
        if kind == "search":
            for failure in payload["failures"]:
                print(f"· {failure['backend']}: {failure['reason']}", file=sys.stderr)
            print(f"· {payload['results']} results from {payload['backend'] or 'no backend'}", file=sys.stderr)
        elif kind == "page":
            note = f" ({payload['error']})" if payload["error"] else ""
            print(f"· {payload['source']}: {payload['url']}{note}", file=sys.stderr)

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


def _read_questions(lines: Iterator[str]) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {lineno}: not JSON ({exc.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("pages"), list)):
            raise UsageError(f'line {lineno}: expected {{"id", "question", "pages": [{{"url", "title", "text"}}]}}')
        for page in row["pages"]:
            if not isinstance(page, dict) or not isinstance(page.get("url"), str) or not isinstance(page.get("text"), str):
                raise UsageError(f'line {lineno}: each page needs "url" and "text" strings')
        yield lineno, row


def cmd_select(args: argparse.Namespace) -> None:
    from retrieval.passages import select_passages

    for _, row in _read_questions(sys.stdin):
        pages = [
            Page(url=p["url"], title=p.get("title") or "", text=p["text"], rank=i)
            for i, p in enumerate(row["pages"], 1)
        ]
        passages = select_passages(row["question"], pages, budget_tokens=args.budget, query=row.get("query"))
        _emit({"id": row.get("id"), "passages": [{"url": p.url, "text": p.text} for p in passages]})


def build_parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser("select", help="pack the best passages of given pages into a token budget (JSONL in/out)")
    p.add_argument("--budget", type=int, default=3000, help="tokens of context per question")
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
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
