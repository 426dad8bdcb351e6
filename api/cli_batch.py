"""What ``megrez-search`` commands share — their two errors and JSON output — and the batch commands the
benchmarks drive: ``extract`` (a page, or a folder of pages), ``select`` and ``support`` (JSONL in, JSONL
out). A bad input line is a usage error naming its line number, so a benchmark run stops at the row to fix.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrieval.types import Page


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class CommandFailed(Exception):
    """The command could not do its job (engine down, engine error): printed as one line, exit status 1."""


def emit(obj: dict) -> None:
    """``obj`` as one line of JSON on stdout (Chinese and other text as is, not escaped)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def cmd_extract(args: argparse.Namespace) -> None:
    from retrieval.extract import extract

    if args.batch is None:
        doc = extract(sys.stdin.buffer.read(), url=args.url)
        if args.json:
            emit({"title": doc.title, "date": doc.date, "language": doc.language, "text": doc.text})
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
        emit({"id": path.name.removesuffix(".gz").removesuffix(".html"), "title": doc.title, "text": doc.text})


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
        emit({"id": row.get("id"), "passages": [{"url": p.url, "text": p.text} for p in passages]})


def cmd_support(args: argparse.Namespace) -> None:
    from agent.support import SupportChecker

    checker = SupportChecker() if args.threshold is None else SupportChecker(args.threshold)
    for lineno, row in _jsonl(sys.stdin):
        if not (isinstance(row, dict) and isinstance(row.get("claim"), str) and isinstance(row.get("passage"), str)):
            raise UsageError(f'line {lineno}: expected {{"id", "claim", "passage"}} with string claim and passage')
        question = row.get("question") if isinstance(row.get("question"), str) else None
        result = checker.check(row["claim"], [row["passage"]], question=question)
        emit({"id": row.get("id"), "score": round(result.score, 4), "supported": result.supported})
