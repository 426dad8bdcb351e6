"""The streaming path's CPU, in one process: fixed cost per turn and cost per answer piece.

A scripted engine streams an answer of N pieces (``word `` each) with no delay but one event-loop turn
between pieces, as a real engine's output queue gives them; search is off, so the turn is prompt, one
generation, cite, check, finish — what ``bench.api`` streams, without sockets or a client. Paths, each
measured as process CPU time per turn, one turn at a time:

- ``engine``: the scripted engine's stream consumed bare (its own cost, included in every path below);
- ``agent``: ``Agent.run`` consumed as an iterator (what ``/v1`` does);
- ``chat``: ``POST /chat`` as SSE through the real app (ASGI called in process; ``LocalMemory``, so the
  store is a list): agent, turn runner, event writer, follower, SSE frames;
- ``v1``: ``POST /v1/chat/completions`` streaming through the real app; ``responses``: ``POST /v1/responses``;
- ``floor``: a bare FastAPI + sse-starlette route streaming the same pieces, one event-loop turn apart.

Each path runs at two answer lengths (``--pieces``), interleaved over ``--rounds`` (the machine is shared:
medians of many short runs, paths alternating, are what can be compared), and the two are fitted to
fixed + per-piece. ``--before DIR`` measures another checkout (e.g. ``git archive HEAD | tar -x -C DIR``)
in child processes alternating with this one. ``--profile`` prints where the CPU of ``chat`` turns goes,
by component (cProfile's own time per function, summed by the file it lives in). ``--langgraph`` measures
LangGraph alone, per way of running a graph: events through its ``custom`` stream mode (how turns ran
before), or handed to a plain callable with ``astream``/``ainvoke`` (how they run now).

    .venv/bin/python -m bench.agent_path [--pieces 10 200] [--turns 20] [--rounds 7] [--before DIR]
        [--profile] [--langgraph]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

PIECE = "word "
PATHS = ("engine", "agent", "chat", "v1", "responses", "floor")
# Where a function's own time is charged: the first of these found in its file's path.
COMPONENTS = (
    ("langgraph", "/langgraph/"),
    ("langchain_core", "/langchain_core/"),
    ("pydantic", "/pydantic"),
    ("web stack", "/starlette/"),
    ("web stack", "/fastapi/"),
    ("web stack", "/sse_starlette/"),
    ("web stack", "/anyio/"),
    ("prometheus", "/prometheus"),
    ("ours: agent", "/agent/"),
    ("ours: api", "/api/"),
    ("ours: engine", "/engine/"),
    ("scripted engine", "/scripts/"),
    ("asyncio", "/asyncio/"),
    ("json", "/json/"),
)


def _engine_class():
    from scripts.scripted_engine import ScriptedEngine

    class YieldingEngine(ScriptedEngine):
        """The scripted engine with one event-loop turn before each delta (no timer: nothing to wait for)."""

        async def stream(self, prompt, sampling, *, request_id, multimodal=None):
            async with contextlib.aclosing(
                super().stream(prompt, sampling, request_id=request_id, multimodal=multimodal)
            ) as deltas:
                async for delta in deltas:
                    await asyncio.sleep(0)
                    yield delta

    return YieldingEngine


def floor_app():
    """The floor: FastAPI + sse-starlette streaming ``pieces`` token events, one event-loop turn apart."""
    from fastapi import FastAPI
    from sse_starlette.sse import EventSourceResponse

    app = FastAPI()

    @app.post("/chat")
    async def chat(pieces: int):
        async def events():
            for i in range(pieces):
                await asyncio.sleep(0)
                yield {"event": "token", "id": f"1-{i}", "data": json.dumps({"type": "token", "text": PIECE})}

        return EventSourceResponse(events(), ping=15)

    return app


async def call(app, path: str, query: str, body: bytes) -> bytes:
    """One request through ``app`` called as ASGI in this process; the response body (the client never leaves)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"), (b"accept", b"text/event-stream")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    chunks: list[bytes] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    never = asyncio.Event()

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
        elif message["status"] != 200:
            raise RuntimeError(f"{path}: status {message['status']}")

    await app(scope, receive, send)
    return b"".join(chunks)


def _answer_text(path: str, body: bytes) -> str:
    from scripts.net import sse_frames

    frames, _ = sse_frames(body.decode())
    if path == "v1":
        pieces = [json.loads(f["data"]) for f in frames if f.get("data", "").startswith("{")]
        return "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p.get("choices"))
    if path == "responses":
        return "".join(json.loads(f["data"])["delta"] for f in frames if f["event"] == "response.output_text.delta")
    return "".join(json.loads(f["data"])["text"] for f in frames if f.get("event") == "token")


@contextlib.asynccontextmanager
async def paths(tokenizer: Path) -> AsyncIterator[dict[str, Callable[[int], Awaitable[str | bytes]]]]:
    """One turn of each path for an answer of ``n`` pieces; each returns the text it streamed (the routes: the
    response body)."""
    from agent import Agent
    from agent.config import AgentConfig
    from api.app import create_app
    from api.config import RateConfig
    from api.memory import LocalMemory
    from api.settings import Settings
    from engine.base import Sampling
    from retrieval.config import FetchConfig, SelectConfig
    from retrieval.fetch import Fetcher
    from retrieval.pipeline import Retriever
    from retrieval.search.chain import SearchChain

    engine = _engine_class()(tokenizer, chunk_chars=len(PIECE), max_len=16384)
    engine.requests = _Discard()
    retriever = Retriever(SearchChain([], timeout_s=1.0), Fetcher(FetchConfig()), SelectConfig())
    agent = Agent(engine, retriever, config=AgentConfig(related=False, answer_tokens=4000))
    settings = Settings(agent=AgentConfig(related=False, answer_tokens=4000), rate=RateConfig(requests=""))
    app = create_app(settings, engine=engine, retriever=retriever, memory=LocalMemory())
    floor = floor_app()

    def script(n: int) -> None:
        engine.default = PIECE * n + "<|turn_end|>"

    async def bare(n: int) -> str:
        script(n)
        out = [d.text async for d in engine.stream([1, 2, 3], Sampling(max_tokens=4000), request_id="bare")]
        return "".join(out)

    async def agent_turn(n: int) -> str:
        script(n)
        return "".join([e.text async for e in agent.run("hello?", mode="off") if e.type == "token"])

    async def route(name: str, n: int) -> bytes:
        script(n)
        if name == "chat":
            return await call(app, "/chat", "stream=true&websearch=off", b'{"message": "hello?"}')
        if name == "responses":
            request = {"model": "megrez-search", "stream": True, "input": "hello?", "tool_choice": "none"}
            return await call(app, "/v1/responses", "", json.dumps(request).encode())
        request = {"model": "megrez-search", "stream": True, "messages": [{"role": "user", "content": "hello?"}]}
        return await call(app, "/v1/chat/completions", "", json.dumps(request).encode())

    async def floor_turn(n: int) -> bytes:
        return await call(floor, "/chat", f"pieces={n}", b"")

    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.services.engine_ready.wait(), 10)
        yield {
            "engine": bare,
            "agent": agent_turn,
            "chat": lambda n: route("chat", n),
            "v1": lambda n: route("v1", n),
            "responses": lambda n: route("responses", n),
            "floor": floor_turn,
        }


class _Discard(list):
    def append(self, item) -> None:
        pass


async def measure(tokenizer: Path, pieces: list[int], turns: int, rounds: int, only: list[str]) -> dict:
    """``{path: {n: [CPU ms per turn, one per round]}}``, paths and lengths interleaved in every round."""
    out: dict[str, dict[int, list[float]]] = {p: {n: [] for n in pieces} for p in only}
    async with paths(tokenizer) as run:
        for name in only:  # warm-up, and the check that every path streams the whole answer
            for n in pieces:
                got = await run[name](n)
                got = _answer_text(name, got) if isinstance(got, bytes) else got  # parsed here, not when timed
                if got.strip() != (PIECE * n).strip():
                    raise RuntimeError(f"{name}: streamed {len(got)} characters, expected {len(PIECE * n)}")
        for _ in range(rounds):
            for n in pieces:
                for name in only:
                    began = time.process_time()
                    for _ in range(turns):
                        await run[name](n)
                    out[name][n].append((time.process_time() - began) * 1000 / turns)
    return out


async def langgraph_ways(pieces: list[int], turns: int, rounds: int) -> dict:
    """LangGraph's own cost per way of running a graph: the turn's state schema, three nodes doing nothing but
    emit ``n`` events from the middle one (``{way: {n: [ms per run, one per round]}}``)."""
    from langgraph.config import get_stream_writer
    from langgraph.graph import END, START, StateGraph

    from agent.state import TurnInput, TurnOutput, TurnState

    count, sink = [0], []

    def build(through_langgraph: bool):
        async def quiet(state: TurnState) -> dict:
            return {}

        async def emitting(state: TurnState) -> dict:
            emit = get_stream_writer() if through_langgraph else sink.append
            for i in range(count[0]):
                emit(i)
                await asyncio.sleep(0)
            return {}

        graph = StateGraph(TurnState, input_schema=TurnInput, output_schema=TurnOutput)
        for name, node in (("a", quiet), ("b", emitting), ("c", quiet)):
            graph.add_node(name, node)
        graph.add_edge(START, "a")
        graph.add_edge("a", "b")
        graph.add_edge("b", "c")
        graph.add_edge("c", END)
        return graph.compile()

    custom, direct = build(True), build(False)

    async def custom_stream() -> None:  # the turn before this path: events through LangGraph's custom stream
        async for _ in custom.astream({"question": "q"}, stream_mode=["custom", "updates"]):
            pass

    async def updates() -> None:
        async for _ in direct.astream({"question": "q"}, stream_mode="updates"):
            pass

    ways = {
        "custom stream": custom_stream,
        "astream updates": updates,
        "ainvoke": lambda: direct.ainvoke({"question": "q"}),
        "ainvoke, no callbacks": lambda: direct.ainvoke({"question": "q"}, config={"callbacks": None}),
    }
    out: dict[str, dict[int, list[float]]] = {way: {n: [] for n in pieces} for way in ways}
    for _ in range(rounds):
        for n in pieces:
            count[0] = n
            for way, run in ways.items():
                began = time.process_time()
                for _ in range(turns):
                    await run()
                    sink.clear()
                out[way][n].append((time.process_time() - began) * 1000 / turns)
    return out


def fit(results: dict, pieces: list[int]) -> dict[str, dict[str, float]]:
    """Median CPU per turn at each length → fixed ms per turn and µs per piece (a line through the two)."""
    lo, hi = min(pieces), max(pieces)
    table = {}
    for name, by_n in results.items():
        a, b = statistics.median(by_n[lo]), statistics.median(by_n[hi])
        per_piece = (b - a) / (hi - lo)
        table[name] = {"fixed_ms": a - lo * per_piece, "per_piece_us": per_piece * 1000, f"ms@{lo}": a, f"ms@{hi}": b}
    return table


def profile(tokenizer: Path, n: int, turns: int) -> list[tuple[str, float]]:
    """Own CPU time of ``turns`` chat turns of ``n`` pieces by component, as shares of the total."""

    async def run() -> None:
        async with paths(tokenizer) as run_path:
            await run_path["chat"](n)
            profiler.enable()
            for _ in range(turns):
                await run_path["chat"](n)
            profiler.disable()

    profiler = cProfile.Profile()
    asyncio.run(run())
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def component(filename: str) -> str:
        return next((name for name, part in COMPONENTS if part in filename), "other")

    shares: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, callers) in stats.items():
        if filename != "~":
            shares[component(filename)] = shares.get(component(filename), 0.0) + own
            continue
        # A builtin (str.join, list.append, json's C encoder…) is charged to whoever called it.
        for (caller_file, _, _), (_, _, spent, _) in callers.items():
            shares[component(caller_file)] = shares.get(component(caller_file), 0.0) + spent
    total = sum(shares.values()) or 1.0
    return sorted(((k, v / total) for k, v in shares.items()), key=lambda kv: -kv[1])


def _child(tree: Path, args: argparse.Namespace, tokenizer: Path) -> dict:
    # This file runs with ``tree``'s packages (an older checkout need not have it); run_path leaves sys.path be.
    run = f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"
    command = [sys.executable, "-c", run, "--child", "--tokenizer", str(tokenizer)]
    command += ["--pieces", *map(str, args.pieces), "--turns", str(args.turns), "--rounds", "1"]
    command += ["--paths", *args.paths]
    env = os.environ | {"PYTHONPATH": str(tree)}
    done = subprocess.run(command, check=False, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measuring {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print(label: str, table: dict) -> None:
    print(f"\n{label}")
    width = max(map(len, table))
    for name, row in table.items():
        cells = "  ".join(f"{k} {v:8.3f}" for k, v in row.items())
        print(f"  {name:{width}s} {cells}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pieces", type=int, nargs=2, default=[10, 200], help="two answer lengths, in pieces")
    parser.add_argument("--turns", type=int, default=20, help="turns per path per length per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--before", type=Path, help="another checkout to measure, alternating with this one")
    parser.add_argument("--profile", action="store_true", help="where the CPU of chat turns goes, by component")
    parser.add_argument("--langgraph", action="store_true", help="LangGraph's own cost per way of running a graph")
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from scripts.megrez_tokenizer import build_megrez_tokenizer

            tokenizer = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            build_megrez_tokenizer(tokenizer)
        if args.child:
            print(json.dumps(asyncio.run(measure(tokenizer, args.pieces, args.turns, 1, args.paths))))
            return
        if args.langgraph:
            ways = asyncio.run(langgraph_ways(args.pieces, args.turns, args.rounds))
            _print(
                f"LangGraph alone, per run of a 3-node graph (median of {args.rounds} rounds)", fit(ways, args.pieces)
            )
            return
        if args.profile:
            print(f"\nown CPU time of {args.turns} chat turns of {max(args.pieces)} pieces, by component")
            for name, share in profile(tokenizer, max(args.pieces), args.turns):
                print(f"  {name:16s} {share:6.1%}")
            return
        trees = {"this tree": Path.cwd()} | ({"before": args.before.resolve()} if args.before else {})
        results: dict[str, dict] = {label: {} for label in trees}
        for _ in range(args.rounds):
            for label, tree in trees.items():
                for name, by_n in _child(tree, args, tokenizer).items():
                    for n, values in by_n.items():
                        results[label].setdefault(name, {}).setdefault(int(n), []).extend(values)
        for label in trees:
            _print(
                f"{label}: CPU per turn (median of {args.rounds} rounds × {args.turns} turns)",
                fit(results[label], args.pieces),
            )


if __name__ == "__main__":
    main()
