"""A scripted model server: vLLM's OpenAI-compatible API as :class:`engine.openai_engine.OpenAIEngine`
uses it, replaying :class:`scripts.scripted_engine.ScriptedEngine` (tests and benchmarks only).

It runs as its own process, so a test or a benchmark can do to it what happens to a real model server:
SIGKILL it mid-stream, start it again on the same port, or put a server there that never answers::

    python -m scripts.scripted_server --port 8011 --tokenizer /tmp/tok [--delay-s 0.01] [--answer TEXT]
    python -m scripts.scripted_server --port 8011 --tokenizer /tmp/tok --stall-after 2   # stalls mid-stream
    python -m scripts.scripted_server --port 8011 --black-hole                           # accepts, never answers
    python -m scripts.scripted_server --port 8011 --tokenizer /tmp/tok --no-token-ids    # usage, but no token ids

What it serves, in vLLM's shapes: ``GET /v1/models`` (with ``max_model_len``), ``POST /v1/completions``
(streaming only: one chunk per delta with ``token_ids`` and running ``usage``, the finishing chunk, a
usage-only chunk with ``prompt_tokens_details``, ``[DONE]``; a 400 for a prompt that does not fit, a 404
for another model name), ``POST /tokenize`` (special-token text becomes its id, as vLLM's does) and
``GET /health``. ``--no-token-ids`` leaves ``token_ids`` out of the chunks, as OpenAI-compatible servers other
than vLLM do (only ``usage`` counts the tokens then). Every generation is the scripted engine's: its
``default`` answer (``--answer``), its stop-token handling, its ``logit_bias`` ban of ``<|function_start|>``,
its streaming rate (``--delay-s``);
``--page-model`` answers as the page harness's model does (``scripts/page_harness.py``: a search with the
question, then an answer citing two contexts), for runs that exercise the whole turn.
The Megrez stop ids the client sends are left to the engine's own stop handling; any other
``stop_token_ids`` tell it to stop at ``<|function_end|>``, as the forced search asks.

:class:`ScriptedServerProcess` starts and kills it from a test or a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.base import STOP_TOKENS, Delta, EngineError, Sampling
from scripts.net import ChildServer
from scripts.scripted_engine import ScriptedEngine

REPO = Path(__file__).resolve().parents[1]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}, status
    )


def sampling_of(body: dict[str, Any], megrez_stop_ids: frozenset[int]) -> Sampling:
    """A completions request body as the scripted engine's :class:`Sampling`."""
    return Sampling(
        max_tokens=int(body.get("max_tokens") or 16),
        min_tokens=int(body.get("min_tokens") or 0),
        temperature=float(body.get("temperature") or 0.0),
        seed=body.get("seed"),
        stop=tuple(body.get("stop") or ()),
        stop_token_ids=tuple(int(i) for i in body.get("stop_token_ids") or () if int(i) not in megrez_stop_ids),
        include_stop_str_in_output=bool(body.get("include_stop_str_in_output")),
        regex=(body.get("structured_outputs") or {}).get("regex"),
        logit_bias={int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()},
    )


def build_app(
    engine: ScriptedEngine, *, served_name: str = "scripted", stall_after: int | None = None, token_ids: bool = True
) -> Starlette:
    """The server's app on ``engine``; ``stall_after``: chunks of each completion sent before it stalls for good
    (the connection stays open, nothing more comes); ``token_ids``: whether chunks carry them."""
    vocab = engine.tokenizer.get_vocab()
    megrez_stop_ids = frozenset(vocab[t] for t in STOP_TOKENS if t in vocab)

    def wrong_model(body: dict[str, Any]) -> JSONResponse | None:
        if body.get("model") not in (None, served_name):
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        return None

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> JSONResponse:
        card = {"id": served_name, "object": "model", "created": 0, "owned_by": "scripted"}
        return JSONResponse({"object": "list", "data": [card | {"max_model_len": engine.max_model_len}]})

    async def tokenize(request: Request) -> JSONResponse:
        body = await request.json()
        if refused := wrong_model(body):
            return refused
        tokens = await engine.tokenize(body["prompt"])
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})

    async def completions(request: Request) -> Response:
        body = await request.json()
        if refused := wrong_model(body):
            return refused
        if not body.get("stream"):
            return _error(400, "the scripted server streams only (set stream: true)")
        rid = f"cmpl-{body.get('request_id') or len(engine.requests)}"
        del engine.requests[:-100]  # keep the last requests for debugging, not every one of a long soak
        deltas = engine.stream(body["prompt"], sampling_of(body, megrez_stop_ids), request_id=rid)
        try:
            first = await anext(deltas)
        except EngineError as exc:
            return _error(400, str(exc))
        events = _events(rid, served_name, first, deltas, stall_after, token_ids)
        return StreamingResponse(events, media_type="text/event-stream")

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


async def _events(
    rid: str, model: str, first: Delta, rest: AsyncIterator[Delta], stall_after: int | None, token_ids: bool
) -> AsyncIterator[str]:
    """vLLM's SSE chunks for the deltas (``continuous_usage_stats``: usage on every chunk)."""
    created, completion = int(time.time()), 0

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any]) -> str:
        payload = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
        return f"data: {json.dumps(payload | {'usage': usage}, ensure_ascii=False)}\n\n"

    sent = 0
    async with contextlib.aclosing(rest):
        delta: Delta | None = first
        while delta is not None:
            if stall_after is not None and sent >= stall_after:
                await asyncio.Event().wait()  # a server that hangs mid-stream: the client's read timeout decides
            completion += len(delta.token_ids)
            prompt = delta.prompt_tokens or 0
            choice = {
                "index": 0,
                "text": delta.text,
                "logprobs": None,
                "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason,
            }
            if token_ids:
                choice["token_ids"] = list(delta.token_ids)
            yield chunk([choice], {"prompt_tokens": prompt, "completion_tokens": completion})
            sent += 1
            delta = await anext(rest, None)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    yield chunk([], usage)
    yield "data: [DONE]\n\n"


async def black_hole(host: str, port: int) -> None:
    """Accept every connection and never answer (a hung server, or a firewall that drops replies)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(hold, host, port)
    async with server:
        await server.serve_forever()


class ScriptedServerProcess(ChildServer):
    """The scripted server in a child process on 127.0.0.1, on a port of its own that survives restarts.

    Example::

        server = ScriptedServerProcess(tokenizer_dir, "--delay-s", "0.01").start()
        ...  # point MEGREZ_ENGINE__OPENAI_BASE_URL at server.url
        server.kill()  # SIGKILL, as a crash does
        server.start()  # the same port again
        server.stop()
    """

    def __init__(self, tokenizer_dir: Path | None, *args: str, port: int | None = None) -> None:
        """``args``: the command line's options besides ``--port`` and ``--tokenizer`` (``--black-hole`` needs
        no tokenizer)."""
        self.tokenizer_dir, self.args = tokenizer_dir, args
        super().__init__(self._command(args), port=port)

    def _command(self, args: Sequence[str]) -> list[str]:
        tokenizer = ["--tokenizer", str(self.tokenizer_dir)] if self.tokenizer_dir is not None else []
        return [sys.executable, "-m", "scripts.scripted_server", "--port", "{port}", *args, *tokenizer]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *args: str, timeout_s: float = 60.0) -> ScriptedServerProcess:
        """Start it (``args`` replace the constructor's, e.g. ``"--black-hole"``) and wait until it accepts
        connections."""
        self.command = [part.replace("{port}", str(self.port)) for part in self._command(args or self.args)]
        super().start(timeout_s=timeout_s)
        return self


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (scripts.megrez_tokenizer builds one)")
    parser.add_argument("--model", default="scripted", help="the served model name")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--answer", help="what every generation says (default: the scripted engine's)")
    parser.add_argument(
        "--page-model", action="store_true", help="the page harness's model: search with the question, then cite"
    )
    parser.add_argument("--delay-s", type=float, default=0.0, help="per streamed chunk")
    parser.add_argument("--chunk-chars", type=int, default=3)
    parser.add_argument("--stall-after", type=int, help="send this many chunks of each completion, then stall")
    parser.add_argument("--black-hole", action="store_true", help="accept connections, never answer")
    parser.add_argument("--no-token-ids", action="store_true", help="chunks without token_ids (usage only)")
    args = parser.parse_args(argv)
    if args.black_hole:
        asyncio.run(black_hole(args.host, args.port))
        return
    if args.tokenizer is None:
        parser.error("--tokenizer is required (except with --black-hole)")
    import uvicorn

    answer = {} if args.answer is None else {"default": args.answer}
    engine = ScriptedEngine(
        args.tokenizer, max_len=args.max_model_len, chunk_chars=args.chunk_chars, delay_s=args.delay_s, **answer
    )
    if args.page_model:
        from scripts.page_harness import page_model

        engine.default = page_model(engine)  # type: ignore[assignment]  # a function of each request
    app = build_app(engine, served_name=args.model, stall_after=args.stall_after, token_ids=not args.no_token_ids)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
