"""One replica of the real service in a process of its own, on a scripted model (tests and benchmarks only).

Fault tests and the soak benchmark need what an app inside the test process cannot give: a replica that
can be SIGKILLed mid-turn, beside others on the same Redis. This runs ``create_app`` under uvicorn with
Redis memory, a retriever over a local corpus (JSONL; optionally a SearXNG-style backend tried first,
which the soak benchmark kills to make a backend fail) and one of two models:

* the scripted engine in this process (``--tokenizer``): ``--answer TEXT`` for a fixed answer, else the
  page harness's model, which searches with the question and answers citing two contexts
  (``scripts/page_harness.py``); ``--delay-s`` per ``--chunk-chars`` chunk;
* a remote model server (``--engine-url``, e.g. ``scripts/scripted_server.py``): the OpenAI engine, as
  a real deployment with a GPU host.

::

    python -m scripts.scripted_service --port 8100 --redis-url redis://127.0.0.1:6390/0 --tokenizer DIR \\
        --corpus corpus.jsonl [--answer TEXT] [--delay-s 0.01] [--lease-s 2] [--store-retry-s 5] [--event-write-ms 100] [--workers 2]

``--workers N`` serves the port with N processes as ``megrez-search serve --workers N`` does
(``api/workers.py``), each building its own app: its own scripted engine or OpenAI engine, Redis pools
and retriever. A worker that dies stops them all; so does SIGTERM to this process, and workers whose
parent was SIGKILLed stop by themselves (gracefully: their turns end as stopped, not by lease).

:func:`service_process` builds the :class:`scripts.net.ChildServer` that starts it.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from scripts.net import ChildServer


def service_process(redis_url: str, *args: str, port: int | None = None, log: Path | None = None) -> ChildServer:
    """The command for one replica (``args``: the options besides ``--port`` and ``--redis-url``), not started;
    ``log``: where its standard error goes."""
    command = [sys.executable, "-m", "scripts.scripted_service", "--port", "{port}", "--redis-url", redis_url]
    return ChildServer([*command, *args], port=port, log=log)


def build_app(args: argparse.Namespace):
    from agent.config import AgentConfig
    from api.app import create_app
    from api.config import ApiConfig, RateConfig
    from api.redis_memory import RedisMemory
    from api.settings import Settings
    from engine.config import EngineConfig
    from retrieval.config import FetchConfig, SelectConfig
    from retrieval.fetch import Fetcher
    from retrieval.pipeline import Retriever
    from retrieval.search.chain import SearchChain

    backends = []
    if args.searxng_url:
        import httpx

        from retrieval.search.searxng import SearxngBackend

        backends.append(SearxngBackend(args.searxng_url, httpx.AsyncClient(timeout=2.0)))
    if args.corpus:
        from retrieval.search.local import LocalCorpusBackend

        corpus = LocalCorpusBackend(Path(args.corpus), Path(args.corpus).with_suffix(".index"))
        corpus.load()
        backends.append(corpus)
    retriever = Retriever(SearchChain(backends, timeout_s=2.0), Fetcher(FetchConfig()), SelectConfig())
    settings = Settings(
        agent=AgentConfig(related=args.related, answer_tokens=args.answer_tokens),
        api=ApiConfig(turn_lease_s=args.lease_s, store_retry_s=args.store_retry_s, event_write_ms=args.event_write_ms),
        rate=RateConfig(requests="", concurrent_turns=args.concurrent_turns),
        engine=EngineConfig(backend="openai", openai_base_url=args.engine_url or "http://127.0.0.1:1", retries=1),
    )
    memory = RedisMemory(args.redis_url, lease_s=args.lease_s)
    if args.engine_url:
        return create_app(settings, retriever=retriever, memory=memory)
    from scripts.page_harness import page_model
    from scripts.scripted_engine import ScriptedEngine

    engine = ScriptedEngine(Path(args.tokenizer), delay_s=args.delay_s, chunk_chars=args.chunk_chars, max_len=16384)
    engine.default = args.answer if args.answer else page_model(engine)  # type: ignore[assignment]
    engine.requests = _Discard()  # a long run must not keep every request
    return create_app(settings, engine=engine, retriever=retriever, memory=memory)


def server_config(args: argparse.Namespace):
    """One worker's server: its own app (:func:`build_app`) under uvicorn (called in each worker)."""
    import uvicorn

    return uvicorn.Config(build_app(args), host="127.0.0.1", port=args.port, log_level="warning", backlog=4096)


class _Discard(list):
    def append(self, item) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--tokenizer", help="the tiny Megrez tokenizer's folder (scripted engine in process)")
    parser.add_argument("--engine-url", help="a remote model server instead (OpenAI engine)")
    parser.add_argument("--answer", help="a fixed answer (raw model text, e.g. 'Hi.<|turn_end|>')")
    parser.add_argument("--delay-s", type=float, default=0.004, help="per chunk of model output")
    parser.add_argument("--chunk-chars", type=int, default=3, help="characters per chunk of model output")
    parser.add_argument("--corpus", help="a JSONL corpus for the local search backend")
    parser.add_argument("--searxng-url", help="a SearXNG-style backend tried before the corpus")
    parser.add_argument("--lease-s", type=float, default=15.0)
    parser.add_argument("--store-retry-s", type=float, default=30.0)
    parser.add_argument("--event-write-ms", type=float, default=100.0, help="as MEGREZ_API__EVENT_WRITE_MS")
    parser.add_argument("--concurrent-turns", type=int, default=1000)
    parser.add_argument("--answer-tokens", type=int, default=3000)
    parser.add_argument("--related", action="store_true", help="generate follow-up questions")
    parser.add_argument("--workers", type=int, default=1, help="processes serving the port, each with its own app")
    args = parser.parse_args(argv)
    if not (args.tokenizer or args.engine_url):
        parser.error("give --tokenizer (scripted engine here) or --engine-url (a model server)")
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    from api.workers import ServeFailed, serve_workers

    try:
        serve_workers(partial(server_config, args), host="127.0.0.1", port=args.port, workers=args.workers)
    except ServeFailed as exc:
        sys.exit(f"scripted_service: {exc}")


if __name__ == "__main__":
    main()
