"""Soak: conversations against two API replicas while Redis, the model server and a replica are killed.

Everything runs on 127.0.0.1 in processes of its own: a ``redis-server`` with its append-only file on
(as in docker-compose.yml), the scripted model server (``scripts/scripted_server.py``, the page
harness's model: it searches with the question, then answers citing two contexts), two replicas of the
real service (``scripts/scripted_service.py``) on that Redis and that model server, with a search
chain of SearXNG (unreachable; a black hole during one window) before a local corpus.

N conversations run at once for ``--duration-s``, several turns each, every turn one of: ``/chat`` as
SSE (a fifth of the clients leave after the first token — the turn goes on — and a stream broken by a
dead replica resumes on the other one with ``Last-Event-ID``, as the page does), ``/chat`` as JSON,
``/v1/chat/completions`` streaming and not. Meanwhile the fault schedule: Redis SIGKILLed and restarted
from its AOF 3 s later, the model server SIGKILLed and restarted, one replica SIGKILLed and restarted,
SearXNG a black hole (its timeout each search) for a while.

Reported: turns started / finished by status / failed by error code, refused (the service answered a
clear 429/503 before starting), **turns lost** — a turn the client knows started (it got its message id)
that is not in its stored conversation at the end, done, stopped or failed: must be 0 —, streams that
did not end with ``done`` (0), time to first token and to ``done`` (p50 / p99), peak RSS per process
(``VmHWM``, the largest of each role's incarnations), and turn slots, leases and conversation locks
still held at the end (0). ``/v1`` requests are stateless: a stream cut by the replica kill cannot be
resumed and is counted as such, not as lost.

    .venv/bin/python -m bench.soak [--conversations 16] [--duration-s 90] [--lease-s 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scripts.net import ChildServer, RedisServer, free_port, sse_frames
from scripts.scripted_service import service_process

FOLLOW_LIMIT_S = 60.0  # a turn here takes well under a second; a stream still open after this never ends
DOCUMENTS = [
    {
        "url": f"https://soak.example.org/{i}",
        "title": f"Soak page {i}",
        "text": f"Topic {i} is explained here at length. " * 6 + f"Fact {i}: the answer to topic {i} is {i * 7}.",
    }
    for i in range(40)
]


@dataclass
class Tally:
    """What the clients saw; ``known`` maps every /chat message id the client learned to its conversation."""

    started: int = 0
    ended: Counter = field(default_factory=Counter)  # /chat turns by done status
    errors: Counter = field(default_factory=Counter)  # error events by code
    refused: Counter = field(default_factory=Counter)  # HTTP status before a turn started
    left_early: int = 0
    resumed: int = 0
    no_done: int = 0  # SSE streams that never reached done, even resumed
    unknown: list[str] = field(default_factory=list)  # questions of /chat requests cut before the id came back
    v1: Counter = field(default_factory=Counter)
    first_token_s: list[float] = field(default_factory=list)
    done_s: list[float] = field(default_factory=list)
    known: dict[str, str] = field(default_factory=dict)


class Clients:
    """The load: conversations on the replicas, following the page's habits."""

    def __init__(self, urls: list[str], tally: Tally, seed: int) -> None:
        self.urls, self.tally, self.rng = urls, tally, random.Random(seed)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=2), limits=httpx.Limits(max_connections=None))

    async def follow(self, mid: str, began: float, leave: bool) -> None:
        """Read a /chat stream to ``done`` within ``FOLLOW_LIMIT_S`` (heartbeats keep a stuck stream open
        forever), resuming on any replica after a broken connection."""
        try:
            async with asyncio.timeout(FOLLOW_LIMIT_S):
                await self._follow(mid, began, leave)
        except TimeoutError:
            self.tally.no_done += 1

    async def _follow(self, mid: str, began: float, leave: bool) -> None:
        last, seen_token, response = None, False, None
        while True:
            try:
                if response is None:
                    url = self.rng.choice(self.urls)
                    headers = {"Accept": "text/event-stream"} | ({"Last-Event-ID": last} if last else {})
                    request = self.http.build_request("GET", f"{url}/chat/{mid}/events", headers=headers)
                    response = await self.http.send(request, stream=True)
                    if response.status_code != 200:
                        await response.aclose()
                        response = None
                        await asyncio.sleep(0.5)
                        continue
                    self.tally.resumed += 1
                buffer = ""
                async for chunk in response.aiter_text():
                    buffer += chunk
                    frames, buffer = sse_frames(buffer)
                    for frame in frames:
                        data = json.loads(frame["data"])
                        last = frame.get("id") or last
                        if frame["event"] == "token" and not seen_token:
                            seen_token = True
                            self.tally.first_token_s.append(time.monotonic() - began)
                            if leave:
                                self.tally.left_early += 1
                                return
                        elif frame["event"] == "error":
                            self.tally.errors[data["code"]] += 1
                        elif frame["event"] == "done":
                            self.tally.ended[data["status"]] += 1
                            self.tally.done_s.append(time.monotonic() - began)
                            return
            except httpx.HTTPError:
                pass  # the replica died, or the connection broke: resume
            finally:
                if response is not None:
                    await response.aclose()
                response = None
            await asyncio.sleep(0.2)

    async def chat_sse(self, url: str, cid: str | None, question: str) -> str | None:
        began = time.monotonic()
        body = {"message": question} | ({"conversation_id": cid} if cid else {})
        request = self.http.build_request(
            "POST", f"{url}/chat?websearch=auto", json=body, headers={"Accept": "text/event-stream"}
        )
        try:
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError:
            self.tally.refused["unreachable"] += 1
            return cid
        if response.status_code != 200:
            self.tally.refused[response.status_code] += 1
            await response.aclose()
            return cid
        buffer = ""
        try:
            async for chunk in response.aiter_text():
                buffer += chunk
                frames, buffer = sse_frames(buffer)
                if frames and frames[0]["event"] == "meta":
                    meta = json.loads(frames[0]["data"])
                    break
            else:
                raise httpx.ReadError("the stream ended before its meta event")
        except httpx.HTTPError:
            await response.aclose()
            self.tally.unknown.append(question)
            return cid
        self.tally.started += 1
        self.tally.known[meta["message_id"]] = meta["conversation_id"]
        await response.aclose()  # follow() reads the stream again from the start, on any replica
        await self.follow(meta["message_id"], began, leave=self.rng.random() < 0.2)
        return meta["conversation_id"]

    async def chat_json(self, url: str, cid: str, question: str) -> str:
        began = time.monotonic()
        try:
            response = await self.http.post(
                f"{url}/chat?websearch=auto", json={"message": question, "conversation_id": cid}
            )
        except httpx.HTTPError:
            self.tally.unknown.append(question)
            return cid
        if response.status_code != 200:
            self.tally.refused[response.status_code] += 1
            return cid
        body = response.json()
        self.tally.started += 1
        self.tally.known[body["message_id"]] = cid
        self.tally.ended[body["status"]] += 1
        if body.get("error"):
            self.tally.errors[body["error"]["code"]] += 1
        self.tally.done_s.append(time.monotonic() - began)
        return cid

    async def v1(self, url: str, question: str, stream: bool) -> None:
        body = {"model": "megrez-search", "stream": stream, "messages": [{"role": "user", "content": question}]}
        kind = "stream" if stream else "json"
        try:
            if not stream:
                response = await self.http.post(f"{url}/v1/chat/completions", json=body)
                self.tally.v1[f"{kind} {response.status_code}"] += 1
                return
            async with self.http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                text = "".join([chunk async for chunk in response.aiter_text()])
            if response.status_code != 200:
                outcome = str(response.status_code)
            elif '"error"' in text:
                outcome = "200, an error chunk"
            else:
                outcome = "200" if "data: [DONE]" in text else "200, cut"
            self.tally.v1[f"{kind} {outcome}"] += 1
        except httpx.HTTPError as exc:
            self.tally.v1[f"{kind} {type(exc).__name__} (replica died)"] += 1

    async def conversation(self, n: int, until: float) -> None:
        cid, turn = None, 0
        while time.monotonic() < until:
            turn += 1
            url, question = self.rng.choice(self.urls), f"Tell me about topic {self.rng.randrange(40)} ({n}-{turn})"
            kind = self.rng.random()
            if cid is None or kind < 0.45:
                cid = await self.chat_sse(url, cid, question)
            elif kind < 0.65:
                cid = await self.chat_json(url, cid, question)
            else:
                await self.v1(url, question, stream=kind < 0.85)
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))


def peak_rss_kib(pid: int | None) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


class Fleet:
    """The processes, their peak memory across restarts, and the fault schedule."""

    def __init__(self, workdir: Path, lease_s: float, store_retry_s: float) -> None:
        from scripts.megrez_tokenizer import build_megrez_tokenizer

        tokenizer = workdir / "tokenizer"
        build_megrez_tokenizer(tokenizer)
        corpus = workdir / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS), encoding="utf-8")
        self.redis = RedisServer(workdir / "redis", persist=True)
        (workdir / "redis").mkdir()
        model_args = ["--tokenizer", str(tokenizer), "--page-model", "--delay-s", "0.005", "--max-model-len", "16384"]
        model = [sys.executable, "-m", "scripts.scripted_server", "--port", "{port}", *model_args]
        self.model = ChildServer(model, log=workdir / "model-server.log")
        self.searxng_port = free_port()
        self.black_hole = ChildServer(
            [sys.executable, "-m", "scripts.scripted_server", "--port", "{port}", "--black-hole"],
            port=self.searxng_port,
        )
        replica_args = ["--engine-url", f"http://127.0.0.1:{self.model.port}", "--corpus", str(corpus)]
        replica_args += ["--searxng-url", f"http://127.0.0.1:{self.searxng_port}", "--lease-s", str(lease_s)]
        replica_args += ["--store-retry-s", str(store_retry_s), "--related"]
        self.replicas = [
            service_process(self.redis.url, *replica_args, log=workdir / f"replica-{i + 1}.log") for i in range(2)
        ]
        self.peak: Counter = Counter()

    def note_peaks(self) -> None:
        for role, server in [("redis", self.redis), ("model server", self.model), *self.roles()]:
            self.peak[role] = max(self.peak[role], peak_rss_kib(server.pid))

    def roles(self) -> list[tuple[str, ChildServer]]:
        return [(f"replica {i + 1}", r) for i, r in enumerate(self.replicas)]

    def start(self) -> None:
        self.redis.start()
        self.model.start()
        for replica in self.replicas:
            replica.start()

    def stop(self) -> None:
        self.note_peaks()
        for server in [*self.replicas, self.model, self.black_hole, self.redis]:
            server.stop()

    async def kill_and_restart(self, server: ChildServer, down_s: float) -> None:
        self.note_peaks()  # this incarnation's peak, before it goes
        server.kill()
        await asyncio.sleep(down_s)
        await asyncio.to_thread(server.start)

    async def schedule(self, duration_s: float, log: list[str]) -> None:
        """Redis, the model server, replica 1 killed in turn (3 s down each); SearXNG a black hole meanwhile."""
        began = time.monotonic()
        steps = [
            (0.15, "Redis", self.redis),
            (0.35, "the model server", self.model),
            (0.55, "replica 1", self.replicas[0]),
        ]
        for at, name, server in steps:
            await asyncio.sleep(max(0.0, began + at * duration_s - time.monotonic()))
            log.append(f"{time.monotonic() - began:.0f} s: SIGKILL {name}, restarted 3 s later")
            await self.kill_and_restart(server, 3.0)
        await asyncio.sleep(max(0.0, began + 0.7 * duration_s - time.monotonic()))
        log.append(f"{time.monotonic() - began:.0f} s: SearXNG a black hole (2 s timeouts) until 85 %")
        await asyncio.to_thread(self.black_hole.start)
        await asyncio.sleep(max(0.0, began + 0.85 * duration_s - time.monotonic()))
        self.black_hole.stop()


async def audit(redis_url: str, tally: Tally, settle_s: float) -> dict:
    """After the run: is every known turn stored, and is nothing held?"""
    import redis.asyncio as redis

    from api import redis_schema as schema

    await asyncio.sleep(settle_s)  # leases of turns on the killed replica run out; a sweep reaps them
    store = redis.from_url(redis_url, decode_responses=True)
    stored: dict[str, str] = {}
    questions: set[str] = set()
    rows = 0
    for cid in set(tally.known.values()):
        for row in await store.lrange(schema.conversation_keys(cid)[1], 0, -1):
            rows += 1
            turn = json.loads(row)
            stored[turn["message_id"]] = turn["status"]
            questions.add(turn["record"]["question"])
    slots = sum([await store.zcard(key) async for key in store.scan_iter(schema.owner_keys("*")[1])])
    locks = len([key async for key in store.scan_iter(schema.conversation_keys("*")[3])])
    leases = await store.zcard(schema.LEASES)
    await store.aclose()
    lost = [mid for mid in tally.known if mid not in stored]
    unknown_stored = sum(q in questions for q in tally.unknown)  # started after all, and kept
    return {
        "lost": lost,
        "stored": Counter(stored.values()),
        "unknown_stored": unknown_stored,
        "duplicates": rows - len(stored),  # a turn stored twice (a retried write, a reaped live turn)
        "slots": slots,
        "locks": locks,
        "leases": leases,
    }


def _p(values: list[float], q: float) -> str:
    if not values:
        return "–"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.2f}"


async def run(conversations: int, duration_s: float, lease_s: float, store_retry_s: float, seed: int = 7) -> dict:
    """The whole soak; returns the figures (``bench`` prints them, the test asserts on them)."""
    workdir = Path(tempfile.mkdtemp(prefix="megrez-soak-"))
    fleet = Fleet(workdir, lease_s, store_retry_s)
    await asyncio.to_thread(fleet.start)
    urls = [f"http://127.0.0.1:{r.port}" for r in fleet.replicas]
    tally, log = Tally(), []
    clients = Clients(urls, tally, seed)
    try:
        async with httpx.AsyncClient() as probe:
            for url in urls:
                for _ in range(600):
                    try:
                        if (await probe.get(f"{url}/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
        until = time.monotonic() + duration_s
        faults = asyncio.create_task(fleet.schedule(duration_s, log))
        await asyncio.gather(*(clients.conversation(n, until) for n in range(conversations)))
        await faults
        result = await audit(fleet.redis.url, tally, settle_s=2 * lease_s + 2)
    finally:
        await clients.http.aclose()
        await asyncio.to_thread(fleet.stop)
    return {"tally": tally, "audit": result, "faults": log, "peak_kib": dict(fleet.peak)}


def report(figures: dict, args: argparse.Namespace) -> None:
    t, a = figures["tally"], figures["audit"]
    print(f"soak: {args.conversations} conversations, {args.duration_s:g} s, lease {args.lease_s:g} s; faults:")
    for line in figures["faults"]:
        print(f"- {line}")
    rows = [
        ("/chat turns started (message id known)", t.started),
        ("  ended, by done status", dict(t.ended)),
        ("  error events, by code", dict(t.errors)),
        ("  stored at the end, by status", dict(a["stored"])),
        ("  **lost** (started, not stored) / stored twice", f"{len(a['lost'])} / {a['duplicates']}"),
        ("  SSE streams that never reached done", t.no_done),
        ("  clients that left after the first token", t.left_early),
        ("  streams resumed (reconnects, incl. after leaving the POST)", t.resumed),
        ("  requests cut before the id came back / of them found stored", f"{len(t.unknown)} / {a['unknown_stored']}"),
        ("refused before starting, by status", dict(t.refused)),
        ("/v1 requests, by outcome", dict(t.v1)),
        ("first token p50 / p99 (s)", f"{_p(t.first_token_s, 0.5)} / {_p(t.first_token_s, 0.99)}"),
        ("done p50 / p99 (s)", f"{_p(t.done_s, 0.5)} / {_p(t.done_s, 0.99)}"),
        ("peak RSS per process (MiB)", {k: round(v / 1024) for k, v in figures["peak_kib"].items()}),
        ("held at the end: slots / leases / locks", f"{a['slots']} / {a['leases']} / {a['locks']}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if a["lost"]:
        print("lost:", ", ".join(a["lost"][:20]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=90.0)
    parser.add_argument("--lease-s", type=float, default=3.0)
    parser.add_argument("--store-retry-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    figures = asyncio.run(run(args.conversations, args.duration_s, args.lease_s, args.store_retry_s, args.seed))
    report(figures, args)


if __name__ == "__main__":
    main()
