"""The floor for ``bench.api``: the same streams from a bare FastAPI + sse-starlette server.

No agent, no store, no engine: each request streams ``--tokens`` answer pieces (``ANSWER_PIECE``), one
every ``--pace-ms``, in the same SSE shapes as the service, so the same client reads both and counts the
same pieces:

* ``POST /chat``: ``meta`` first (id ``0-0``), one ``event: token`` with an ``id:`` and ``{"type":
  "token", "text": …}`` per step, ``done`` last — as ``api/routes/chat.py`` frames a turn;
* ``POST /v1/chat/completions``: OpenAI's chunks (the role first, one content delta per step, the final
  chunk with ``finish_reason`` and empty annotations), then ``[DONE]``.

The pace follows the scripted engine's rule (``scripts/scripted_engine.py``): piece *i* is due at
``began + (i+1) · pace``, and a stream that fell behind gets every piece due in one step. uvicorn runs it
as ``scripts/scripted_service.py`` runs the service (127.0.0.1, backlog 4096, warnings only, uvicorn's
default loop and HTTP parser), and ``--workers`` N > 1 share the port the service's way
(``api.workers.serve_workers``: one ``SO_REUSEPORT`` socket per worker, which only sets up sockets and
processes), so ours ÷ floor is what the agent, the store and our API cost on top of serving the same
bytes.

::

    python -m bench.floor --port 8200 --tokens 40 --pace-ms 20 [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

from bench.api_client import ANSWER_PIECE

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # what the service sends with a stream


async def paced(tokens: int, pace_s: float) -> AsyncIterator[int]:
    """How many pieces each step carries, ``tokens`` in all: piece *i* due ``(i+1) · pace_s`` after the
    start, every piece due so far in one step when the consumer fell behind."""
    loop = asyncio.get_running_loop()
    began, sent = loop.time(), 0
    while sent < tokens:
        wait = began + (sent + 1) * pace_s - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        due = max(sent + 1, min(tokens, int((loop.time() - began) / pace_s + 1e-9)))
        yield due - sent
        sent = due


async def _chat_events(tokens: int, pace_s: float) -> AsyncIterator[dict]:
    meta = {"type": "meta", "conversation_id": uuid.uuid4().hex, "message_id": uuid.uuid4().hex}
    yield {"event": "meta", "id": "0-0", "data": json.dumps(meta)}
    ms, seq = int(time.time() * 1000), 0
    async for count in paced(tokens, pace_s):
        yield {
            "event": "token",
            "id": f"{ms}-{seq}",
            "data": json.dumps({"type": "token", "text": ANSWER_PIECE * count}),
        }
        seq += 1
    yield {"event": "done", "id": f"{ms}-{seq}", "data": json.dumps({"type": "done", "status": "done"})}


async def _completion_chunks(model: str, tokens: int, pace_s: float) -> AsyncIterator[dict]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
        return {"data": json.dumps(body, ensure_ascii=False)}

    yield chunk({"role": "assistant", "content": ""})
    async for count in paced(tokens, pace_s):
        yield chunk({"content": ANSWER_PIECE * count})
    yield chunk({"annotations": []}, "stop")
    yield {"data": "[DONE]"}


def create_app(tokens: int, pace_s: float) -> FastAPI:
    """The floor app: ``tokens`` pieces a stream, one every ``pace_s`` seconds.

    Example::

        uvicorn.run(create_app(40, 0.02), host="127.0.0.1", port=8200)
    """
    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/chat")
    async def chat(request: Request) -> EventSourceResponse:
        await request.json()
        return EventSourceResponse(_chat_events(tokens, pace_s), ping=15, headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> EventSourceResponse:
        body = await request.json()
        return EventSourceResponse(_completion_chunks(body.get("model", ""), tokens, pace_s), ping=15)

    return app


def server_config(tokens: int, pace_s: float, port: int):
    """One worker's uvicorn server: the settings ``scripts/scripted_service.py`` gives the service's."""
    import uvicorn

    return uvicorn.Config(create_app(tokens, pace_s), host="127.0.0.1", port=port, log_level="warning", backlog=4096)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--pace-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    factory = functools.partial(server_config, args.tokens, args.pace_ms / 1000, args.port)
    if args.workers == 1:
        import uvicorn

        uvicorn.Server(factory()).run()
    else:  # the service's own way of sharing the port (SO_REUSEPORT, one socket per worker)
        from api.workers import serve_workers

        serve_workers(factory, host="127.0.0.1", port=args.port, workers=args.workers)


if __name__ == "__main__":
    main()
