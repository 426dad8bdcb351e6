"""SSE frames encoded once (``api/sse.py``): the same bytes sse-starlette writes, shared by every follower, and a
response that still sends heartbeats and still stops its body when the client leaves."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from sse_starlette.event import ServerSentEvent

from api.memory import StoredEvent
from api.sse import FrameStream, frame
from scripts.tiny_models import serve_in_process


@pytest.mark.parametrize(
    ("event", "data", "id_"),
    [
        ("token", '{"type": "token", "text": "Hi 你好"}', "1700000000000-3"),
        ("error", '{"type": "error", "code": "interrupted"}', ""),  # made up by a reader: no id
        ("odd", "two\nlines\r\nthree\rfour", "1-0"),
    ],
)
def test_a_frame_is_what_sse_starlette_writes(event, data, id_):
    assert frame(event, data, id_) == ServerSentEvent(data, event=event, id=id_ or None).encode()


def test_a_stored_event_is_encoded_once_for_all_its_followers():
    event = StoredEvent("1-0", "token", '{"type": "token", "text": "Hi"}')
    assert event.frame is event.frame  # built on first use, then the same bytes object
    assert event.frame == frame("token", event.data, "1-0")
    assert event == StoredEvent("1-0", "token", '{"type": "token", "text": "Hi"}')  # the cache is not compared


async def test_frame_stream_sends_heartbeats_and_stops_its_body_when_the_client_leaves():
    app, ended = FastAPI(), asyncio.Event()

    @app.get("/stream")
    async def stream():
        async def body():
            try:
                yield frame("token", '{"text": "first"}', "1-0")
                await asyncio.Event().wait()  # nothing more: only heartbeats keep the connection alive
            finally:
                ended.set()

        return FrameStream(body(), ping=0.1)

    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        seen = ""
        async with client.stream("GET", "/stream") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for text in response.aiter_text():
                seen += text
                if ": ping" in seen:
                    break
        assert seen.startswith("id: 1-0\r\nevent: token\r\ndata: {") and "\r\n\r\n: ping" in seen
        await asyncio.wait_for(ended.wait(), 5)  # the client left: the body was closed, not left waiting
