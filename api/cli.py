"""The ``megrez-search`` command: ask, search, extract, select and support from the shell (and for benchmarks).

Its streams have one job each: stdout carries the result (the answer, JSON, passages), stderr one line per
step of progress and the one-line message of a failure. Library logs (the agent's own warnings, httpx,
vLLM) would break both, so they reach stderr only with ``-v``; ``serve`` always logs (``--log-format``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from api.cli_batch import CommandFailed, UsageError, cmd_extract, cmd_select, cmd_support, emit
from retrieval.events import PageEvent, RetrievalEvent, SearchEvent

EXIT_STATUS = """exit status:
  0    done (a search that finds nothing too: "no results" on stderr)
  1    the command failed: the engine did not start or failed, no search backend answered
  2    usage error: a bad option, input line, file or setting
  130  interrupted (Ctrl-C)"""


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
            if event.results:
                print(f"· {len(event.results)} results from {event.backend}", file=sys.stderr)
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
    failures = found.outcome.failures
    if not found.outcome.results:
        if not failures:  # the chain searched nothing: the query has no words
            raise UsageError("empty query")
        reasons = "; ".join(f"{b}: {r}" for b, r in failures)
        # A backend that answered with nothing is an answer (exit 0); every backend failing is not.
        if all(reason != "no results" for _, reason in failures):
            raise CommandFailed(f"no search backend answered ({reasons})")
        print(f"megrez-search search: no results ({reasons})", file=sys.stderr)
    if args.json:
        emit(
            {
                "query": found.query,
                "backend": found.outcome.backend,
                "failures": [list(f) for f in failures],
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


async def cmd_ask(args: argparse.Namespace) -> None:
    # vLLM logs to stdout by default; stdout is the answer here. Its engine runs in a process of its own,
    # which the logging switch of main() does not reach: without -v it keeps only what ends the command.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "CRITICAL")
    from agent import Agent
    from agent.events import AnswerEvent, ErrorEvent, PreambleEvent, SourcesEvent, StatusEvent, TokenEvent
    from agent.state import MediaItem
    from engine.base import EngineError
    from engine.factory import build_engine
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

    last = ""

    def note(line: str) -> None:
        nonlocal last
        # A step said twice in a row (the answer asked for again) is one line.
        if not args.json and line != last:
            last = line
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
            elif isinstance(event, StatusEvent) and event.code != "search_call":
                # "search_call" (the model began a call) is followed by "searching", which names the query;
                # the query event says it a third time, and each page's event is one step of "reading".
                note(event.message)
            elif isinstance(event, SourcesEvent):
                for failure in event.failures:
                    note(f"{failure.backend}: {failure.reason}")
                for source in event.sources:
                    note(f"[{source.n}] {source.title} — {source.domain}")
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
    if answer.citations:
        print("\nSources")
    for citation in answer.citations:
        mark = "" if citation.supported is not False else f"  (weakly supported: {citation.score:.2f})"
        print(f"[{citation.n}] {citation.title} — {citation.url}{mark}")
    if answer.related:
        print("\nRelated")
    for question in answer.related:
        print(f"- {question}")
    sys.stdout.flush()
    for item in answer.notes:
        note(item.message)


def cmd_serve(args: argparse.Namespace) -> None:
    from functools import partial

    from api.logs import configure
    from api.workers import ServeFailed, refusal, serve_embedded, serve_workers, service_config

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    settings = _settings()
    workers = args.workers or settings.api.workers
    if (problem := refusal(settings, workers)) is not None:
        raise UsageError(problem)
    configure(args.log_format)
    print(
        f"megrez-search: serving on http://{args.host}:{args.port} with {workers} worker{'s' * (workers > 1)} "
        f"(engine: {settings.engine.backend}, {settings.engine.model}; GET /readyz says when it is loaded)",
        file=sys.stderr,
        flush=True,
    )
    try:
        if workers > 1 and settings.engine.backend == "vllm":  # N frontends of one engine core
            serve_embedded(settings, host=args.host, port=args.port, workers=workers, log_format=args.log_format)
        else:
            factory = partial(service_config, settings, host=args.host, port=args.port, log_format=args.log_format)
            serve_workers(factory, host=args.host, port=args.port, workers=workers)
    except ServeFailed as exc:
        raise CommandFailed(str(exc)) from None


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


def build_parser() -> argparse.ArgumentParser:
    # Not at module level: this module is the __main__ that vLLM's spawned workers import again, and the
    # search backends bring in bm25s → numba → llvmlite, whose objects break the worker's start-up scan
    # of sys.modules (vllm/triton_utils/dispatcher.py: "'_lib_fn_wrapper' object has no attribute 'get'").
    from retrieval.search.factory import BACKEND_NAMES

    parser = argparse.ArgumentParser(
        prog="megrez-search",
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", help="library logs (vLLM's too) on stderr")

    def command(name: str, summary: str, *, logs: bool = True) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=EXIT_STATUS,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[verbose] if logs else [],
        )

    p = command("search", "search the web (or the local corpus) and optionally read the pages")
    p.add_argument("query")
    p.add_argument("--backend", action="append", choices=BACKEND_NAMES, help="backend(s) to try in order (repeat)")
    p.add_argument("--k", type=int, help="number of results")
    p.add_argument("--language", help="region/language, e.g. zh-cn, en-us")
    p.add_argument("--time-range", choices=("day", "week", "month", "year"))
    p.add_argument("--fetch", action="store_true", help="fetch the pages and print the selected passages")
    p.add_argument("--budget", type=int, help="tokens of context to select (with --fetch)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_search)

    p = command("extract", "main text of an HTML page (stdin) or of every page in a folder")
    p.add_argument("--url", help="the page's URL (helps date and link handling)")
    p.add_argument("--batch", metavar="DIR", help="extract every *.html / *.html.gz in DIR to JSONL")
    p.add_argument("--json", action="store_true", help="print title, date, language and text as JSON")
    p.set_defaults(func=cmd_extract)

    p = command("ask", "answer a question: search when needed, stream a cited answer")
    p.add_argument("question")
    p.add_argument("--websearch", choices=("off", "auto", "always"), help="search mode (default: settings, auto)")
    p.add_argument("--image", action="append", metavar="PATH", help="an image for the Omni model (repeat)")
    p.add_argument("--audio", action="append", metavar="PATH", help="a speech clip for the Omni model (repeat)")
    p.add_argument("--language", help="answer language, e.g. zh, en (default: the question's)")
    p.add_argument("--json", action="store_true", help="print the structured answer as one JSON object")
    p.set_defaults(func=cmd_ask)

    p = command("serve", "run the HTTP API (POST /chat with SSE, conversations, health)", logs=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON")
    p.add_argument(
        "--workers",
        type=_positive,
        help="API processes sharing the port (default: MEGREZ_API__WORKERS, 1); more need MEGREZ_REDIS_URL",
    )
    p.set_defaults(func=cmd_serve)

    p = command("support", "score claim/passage pairs with the citation support check (JSONL in/out)")
    p.add_argument("--threshold", type=float, help="score below which a claim is unsupported (default: calibrated)")
    p.set_defaults(func=cmd_support)

    p = command("select", "pack the best passages of given pages into a budget (JSONL in/out)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, default=3000, help="tokens of context per question (estimated)")
    size.add_argument(
        "--budget-chars", type=_positive, default=None, help="characters of passage text per question instead"
    )
    p.set_defaults(func=cmd_select)
    return parser


@contextlib.contextmanager
def _library_logs(verbose: bool) -> Iterator[None]:
    """Logs and Python warnings on stderr with ``verbose``, none at all without; as before afterwards.

    ``logging.disable`` rather than a level on the root logger: libraries that bring their own handler
    (transformers, vLLM) are silenced too.
    """
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO)  # some libraries set DEBUG on their own loggers (bm25s)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = root.level
    with warnings.catch_warnings():
        if verbose:
            root.addHandler(handler)
            root.setLevel(logging.INFO)
            logging.captureWarnings(True)
        else:
            logging.disable(logging.CRITICAL)
            warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            logging.captureWarnings(False)
            root.removeHandler(handler)
            root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run one command (``argv`` defaults to ``sys.argv[1:]``); the exit status is in :data:`EXIT_STATUS`."""
    args = build_parser().parse_args(argv)
    # serve configures its own logs (--log-format).
    logs = _library_logs(args.verbose) if "verbose" in args else contextlib.nullcontext()
    try:
        with logs:
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
