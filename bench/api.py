"""Many concurrent SSE streams through the real app: the delay the service adds to each piece of the answer.

The server runs in its own process (uvicorn on 127.0.0.1, the real app, a scripted engine producing
``--tokens`` answer pieces at one every ``--pace-ms``, search off so the stream is all tokens, a real
``redis-server`` of its own for memory). This process opens N streams (all at once, or evenly over
``--ramp-s``) with httpx and records when each piece arrives. Like vLLM's output collector, the
scripted engine hands a consumer that fell behind everything due in one delta, and the service merges
adjacent token events when its store writes lag, so under load one event carries several pieces; the
delay is therefore per piece: for piece i of a stream, how much later than the engine's own pace it
came, against the stream's most punctual piece: ``(t_i - i · pace) - min_j (t_j - j · pace)``. Also:
pieces per second, server CPU per turn (where the time goes), server memory per open stream (RSS
during the run minus before, over N), and lost or reordered events (every stream's text must equal
the scripted answer, its ids strictly increasing). The JSON route (no stream) runs the same N turns
in the same run, for comparison.

    .venv/bin/python -m bench.api [--streams 100 500 1000] [--tokens 40] [--pace-ms 20] [--ramp-s 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from scripts.megrez_tokenizer import build_megrez_tokenizer
from scripts.net import RedisServer
from scripts.scripted_service import service_process

ANSWER_PIECE = "word "  # counted by its word: the citation processor may hold a trailing space back
ERRORS: list[str] = []  # transport errors of the client's streams


async def one_stream(
    client: httpx.AsyncClient, route: str, expected: str, pace_s: float, delays: list[float], wait_s: float = 0.0
) -> bool:
    """One streamed turn on ``route`` (``chat``: /chat SSE; ``openai``: /v1/chat/completions); appends each
    answer piece's added delay; True when nothing was lost or reordered.

    Under load the engine (like vLLM's collector) and the service merge pieces into fewer token events,
    so the delay is measured per piece of the answer, not per event: piece j arrives with the event
    that carries it, and is due ``j · pace`` after the stream's first piece."""
    await asyncio.sleep(wait_s)
    try:
        text, ids, arrivals = await (_read_chat(client) if route == "chat" else _read_openai(client))
    except httpx.TransportError as exc:  # counted as a bad stream, with its kind
        ERRORS.append(type(exc).__name__)
        return False
    # Each piece's time less the engine's pace, against the stream's most punctual piece: how late it came.
    offsets = [t - i * pace_s for i, t in enumerate(arrivals)]
    delays += [o - min(offsets) for o in offsets]
    ordered = [tuple(map(int, i.split("-"))) for i in ids[1:]]  # after meta's 0-0 (OpenAI chunks have none)
    return text == expected and ordered == sorted(ordered) and len(set(ordered)) == len(ordered)


async def _read_chat(client: httpx.AsyncClient) -> tuple[str, list[str], list[float]]:
    """The token text, the event ids and each answer piece's arrival time of one /chat SSE turn."""
    text, ids, arrivals = "", [], []
    async with client.stream(
        "POST", "/chat?websearch=off", json={"message": "q"}, headers={"Accept": "text/event-stream"}
    ) as response:
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("id:"):
                ids.append(line[3:].strip())
            elif line.startswith("data:") and event == "token":
                now = time.perf_counter()
                piece = json.loads(line[5:])["text"]
                arrivals += [now] * piece.count(ANSWER_PIECE.strip())
                text += piece
    return text, ids, arrivals


async def _read_openai(client: httpx.AsyncClient) -> tuple[str, list[str], list[float]]:
    """The same for one streamed /v1/chat/completions turn (content deltas)."""
    text, arrivals = "", []
    body = {"model": "megrez-search", "stream": True, "messages": [{"role": "user", "content": "q"}]}
    async with client.stream("POST", "/v1/chat/completions", json=body | {"megrez_websearch": "off"}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                now = time.perf_counter()
                choices = json.loads(line[5:])["choices"]
                piece = (choices[0]["delta"].get("content") or "") if choices else ""
                arrivals += [now] * piece.count(ANSWER_PIECE.strip())
                text += piece
    return text, [], arrivals


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def run_level(url: str, pid: int, streams: int, tokens: int, pace_s: float, ramp_s: float) -> list[dict]:
    """N concurrent streams on /chat, then on the OpenAI route, then N JSON /chat turns: one row per route."""
    expected = ANSWER_PIECE * tokens
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for route in ("chat", "openai"):
            ERRORS.clear()
            before = rss_kib(pid)
            delays: list[float] = []
            peak = [before]

            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], rss_kib(pid))
                    await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample())
            began, cpu_before = time.perf_counter(), cpu_s(pid)
            ok = await asyncio.gather(
                *(one_stream(client, route, expected, pace_s, delays, ramp_s * i / streams) for i in range(streams))
            )
            elapsed, server_cpu = time.perf_counter() - began, cpu_s(pid) - cpu_before
            sampler.cancel()
            delays.sort()
            rows.append(
                {
                    "streams": streams,
                    "route": "/chat SSE" if route == "chat" else "/v1/chat/completions",
                    "pieces_per_s": len(delays) / elapsed,
                    "cpu_ms_per_turn": 1000 * server_cpu / streams,
                    "p50_ms": 1000 * delays[len(delays) // 2] if delays else float("nan"),
                    "p99_ms": 1000 * delays[int(len(delays) * 0.99)] if delays else float("nan"),
                    "kib_per_stream": (peak[0] - before) / streams,
                    "bad_streams": ok.count(False),
                    "errors": sorted(set(ERRORS)),
                    "wall_s": elapsed,
                }
            )
        began = time.perf_counter()
        answers = await asyncio.gather(
            *(client.post("/chat?websearch=off", json={"message": "q"}) for _ in range(streams))
        )
        rows[0]["json_wall_s"] = time.perf_counter() - began
        rows[0]["json_ok"] = sum(r.status_code == 200 and r.json()["answer"]["answer"] == expected for r in answers)
    return rows


async def main_async(args: argparse.Namespace) -> None:
    redis = RedisServer(Path(tempfile.mkdtemp())).start()
    tokenizer = Path(tempfile.mkdtemp())
    build_megrez_tokenizer(tokenizer)
    # The app with the scripted engine and Redis memory; no rate limit or turn cap: the benchmark is one client
    # opening every stream.
    server = service_process(
        redis.url,
        "--tokenizer",
        str(tokenizer),
        "--answer",
        ANSWER_PIECE * args.tokens + "<|turn_end|>",
        "--chunk-chars",
        str(len(ANSWER_PIECE)),
        "--delay-s",
        str(args.pace_ms / 1000),
        "--answer-tokens",
        str(max(64, args.tokens * 4)),
        "--concurrent-turns",
        "1000000",
    ).start()
    port = server.port
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url) as probe:
            for _ in range(600):
                try:
                    if (await probe.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        rows = [
            row
            for n in args.streams
            for row in await run_level(url, server.pid, n, args.tokens, args.pace_ms / 1000, args.ramp_s)
        ]
    finally:
        server.stop()
        redis.stop()
    print(
        f"scripted engine: {args.tokens} pieces per turn, one every {args.pace_ms:g} ms; streams opened over "
        f"{args.ramp_s:g} s; Redis memory; {os.cpu_count()} cores (server and this client share them)"
    )
    header = (
        "streams",
        "route",
        "answer pieces/s",
        "added delay per piece p50 / p99",
        "server CPU per turn",
        "server memory per stream",
        "lost, reordered or failed",
        "wall",
        "JSON /chat, same turns (all correct)",
    )
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for r in rows:
        print(
            f"| {r['streams']} | {r['route']} | {r['pieces_per_s']:.0f} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms "
            f"| {r['cpu_ms_per_turn']:.1f} ms | {r['kib_per_stream']:.0f} KiB "
            f"| {r['bad_streams']}{' (' + ', '.join(r['errors']) + ')' if r['errors'] else ''} | {r['wall_s']:.1f} s "
            + (f"| {r['json_wall_s']:.1f} s ({r['json_ok']}/{r['streams']}) |" if "json_wall_s" in r else "| |")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--pace-ms", type=float, default=20.0)
    parser.add_argument("--ramp-s", type=float, default=0.0, help="open the streams evenly over this many seconds")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
