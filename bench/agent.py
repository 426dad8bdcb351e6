"""The agent's own cost per turn: latency to each stage and CPU time, with a scripted engine.

The engine is the scripted stand-in (``scripts/scripted_engine.py``) streaming Megrez-style output
at a fixed rate (4 characters every 10 ms), so what is measured is the agent: prompt building and
token counting with a real (tiny) tokenizer, the LangGraph turn, search, reading, selection,
citation processing, the support check, follow-ups. Scenarios, each over the same HotpotQA dev
questions (the fixture web's pages):

- ``0 rounds``: a direct answer (small talk);
- ``1 round · local`` / ``2 rounds · local``: local-corpus hits (read from the BM25 index);
- ``1 round · 5 fetched`` / ``2 rounds · 5 fetched``: 5 web results fetched from the fixture web
  (a separate process, so its CPU is not counted) and extracted.

Per turn: time to the first status event, to the sources, to the first answer token, total; and the
**agent CPU time** = process CPU time of the turn − page extraction (measured in the worker threads,
reported apart) − streaming the same deltas without the agent (the turn's engine requests replayed
right after it and consumed bare: the stand-in's chunking and the event loop's wake-ups at its pace,
≈80 µs a delta here, reported apart). Goal: under 50 ms agent CPU per turn.

    .venv/bin/python -m bench.agent [--turns 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import retrieval.fetch
from agent import Agent
from agent.config import AgentConfig
from agent.events import SourcesEvent, StatusEvent, TokenEvent
from retrieval.config import SelectConfig
from retrieval.fetch import Fetcher
from retrieval.pipeline import Retriever
from retrieval.search.chain import SearchChain
from scripts.corpora import hotpot_questions
from scripts.fixture_web import FixtureWeb, WebSearch
from scripts.megrez_tokenizer import build_megrez_tokenizer
from scripts.scripted_engine import ScriptedEngine, contexts_of

ANSWER_SENTENCES = 6


class ExtractionClock:
    """Adds up the CPU time of page extraction, which runs in worker threads."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = retrieval.fetch._extract

        def timed(*args, **kwargs):
            began = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.cpu_s += time.thread_time() - began

        retrieval.fetch._extract = timed
        try:
            yield
        finally:
            retrieval.fetch._extract = original


def answer(request) -> str:
    numbers = contexts_of(request.text) or ["1"]
    sentences = [
        f"The sources describe this part of the question in some detail [citation:{numbers[i % len(numbers)]}]."
        for i in range(ANSWER_SENTENCES)
    ]
    return " ".join(sentences) + "<|turn_end|>"


def script(question: str, rounds: int) -> list:
    calls = [
        "<|function_start|>"
        + json.dumps({"name": "googleWebSearch", "arguments": {"query": question[: 60 + 10 * i]}}, ensure_ascii=False)
        + "<|function_end|>"
        for i in range(rounds)
    ]
    if not rounds:
        return ["Hello! I am Megrez, happy to help with any question you have today.<|turn_end|>"]
    return [*calls, answer, "1. What else happened?\n2. Who was involved?\n3. When did it start?<|turn_end|>"]


@dataclass
class Figures:
    status_ms: list[float] = field(default_factory=list)
    sources_ms: list[float] = field(default_factory=list)
    token_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    agent_cpu_ms: list[float] = field(default_factory=list)
    extraction_cpu_ms: list[float] = field(default_factory=list)
    streaming_cpu_ms: list[float] = field(default_factory=list)


async def streaming_cpu(engine: ScriptedEngine, requests: list) -> float:
    """CPU seconds of consuming the same generations bare (no agent), at the same pace."""
    began = time.process_time()
    for request in requests:
        engine.script = [request.output]
        async for _ in engine.stream(request.prompt, request.sampling, request_id="replay"):
            pass
    engine.requests[len(engine.requests) - len(requests) :] = []
    return time.process_time() - began


async def run_scenario(engine, retriever, questions, rounds: int, clock: ExtractionClock) -> Figures:
    agent = Agent(engine, retriever, config=AgentConfig(max_rounds=max(1, rounds)))
    figures = Figures()
    for question in questions:
        engine.script = script(question, rounds)
        cpu0, extract0, first_request = time.process_time(), clock.cpu_s, len(engine.requests)
        began = time.perf_counter()
        marks: dict[str, float] = {}
        async for event in agent.run(question):
            now = (time.perf_counter() - began) * 1000
            kind = {StatusEvent: "status", SourcesEvent: "sources", TokenEvent: "token"}.get(type(event))
            if kind:
                marks.setdefault(kind, now)
        figures.total_ms.append((time.perf_counter() - began) * 1000)
        turn_cpu = time.process_time() - cpu0
        extraction = clock.cpu_s - extract0
        streaming = await streaming_cpu(engine, engine.requests[first_request:])
        figures.extraction_cpu_ms.append(extraction * 1000)
        figures.streaming_cpu_ms.append(streaming * 1000)
        figures.agent_cpu_ms.append((turn_cpu - extraction - streaming) * 1000)
        figures.status_ms.append(marks["status"])
        figures.token_ms.append(marks["token"])
        if rounds:
            figures.sources_ms.append(marks["sources"])
    return figures


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "–"


async def main_async(turns: int) -> None:
    questions = [q.question for q in hotpot_questions("dev")[:turns]]
    web = FixtureWeb()  # the pages and their search index, in this process; the server runs apart
    local = web.search_backend()
    server = subprocess.Popen(
        [sys.executable, "-m", "scripts.fixture_web", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = server.stdout.readline()  # "fixture web: N pages at http://127.0.0.1:PORT ..."
        web.port = int(line.split("127.0.0.1:")[1].split()[0])
        with tempfile.TemporaryDirectory() as tmp:
            build_megrez_tokenizer(Path(tmp))
            engine = ScriptedEngine(Path(tmp), chunk_chars=4, delay_s=0.01)
            clock = ExtractionClock()
            rows = []
            with clock.installed():
                for name, backend, rounds, k in (
                    ("0 rounds", local, 0, 8),
                    ("1 round · local", local, 1, 8),
                    ("1 round · 5 fetched", WebSearch(local), 1, 5),
                    ("2 rounds · local", local, 2, 8),
                    ("2 rounds · 5 fetched", WebSearch(local), 2, 5),
                ):
                    retriever = Retriever(SearchChain([backend], k=k), Fetcher(web.fetch_config()), SelectConfig())
                    async with retriever:
                        await run_scenario(engine, retriever, questions[:2], rounds, clock)  # warm-up
                        figures = await run_scenario(engine, retriever, questions, rounds, clock)
                    rows.append((name, figures))
    finally:
        server.terminate()
        server.wait(10)
    print(f"HotpotQA dev, first {turns} questions; scripted engine at 4 chars / 10 ms; medians in ms")
    print(
        "| scenario | first status | sources | first token | total | agent CPU (mean / max) "
        "| extraction CPU | bare streaming CPU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, f in rows:
        print(
            f"| {name} | {median(f.status_ms)} | {median(f.sources_ms)} | {median(f.token_ms)} | {median(f.total_ms)} "
            f"| {statistics.fmean(f.agent_cpu_ms):.1f} / {max(f.agent_cpu_ms):.1f} "
            f"| {statistics.fmean(f.extraction_cpu_ms):.1f} | {statistics.fmean(f.streaming_cpu_ms):.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10, help="questions per scenario")
    args = parser.parse_args()
    asyncio.run(main_async(args.turns))


if __name__ == "__main__":
    main()
