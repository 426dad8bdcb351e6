"""Server-sent events as bytes: each frame encoded once, and the response that sends them as they are.

A stored event's frame is built the first time a follower needs it and kept on the event
(:attr:`api.memory.StoredEvent.frame`), so every follower of a message in this process writes the same
bytes — no per-follower dict, no per-follower encoding. :func:`frame` writes exactly what sse-starlette
would for ``{"event", "id", "data"}`` (``id:``, ``event:``, ``data:`` lines ending ``\\r\\n``, then a blank
line), so clients see the same stream as before.

:class:`FrameStream` is sse-starlette's ``EventSourceResponse`` — the heartbeat comment every 15 s, the
client's disconnect cancelling the body, the server's shutdown ending open streams — for a body that
yields ready frames. It sends each one without the per-send cancel scope that sse-starlette opens for its
optional send timeout (none is set here): with the frames pre-encoded that scope was half of the response's
CPU per event (``bench/agent_path.py``).
"""

from __future__ import annotations

import re

from sse_starlette.sse import EventSourceResponse

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
SEP = "\r\n"


def frame(event: str, data: str, id: str = "") -> bytes:
    """One SSE frame: ``id`` (left out when empty: an event made up by a reader keeps the client's
    ``Last-Event-ID`` at the last real one), the event's type and its data (split into ``data:`` lines if it
    has line breaks; JSON never does)."""
    head = f"id: {id}{SEP}event: {event}{SEP}" if id else f"event: {event}{SEP}"
    if "\n" in data or "\r" in data:
        return (head + "".join(f"data: {line}{SEP}" for line in _LINE_BREAK.split(data)) + SEP).encode()
    return f"{head}data: {data}{SEP}{SEP}".encode()


def data_frame(data: str) -> bytes:
    """A frame with only ``data`` (OpenAI's chunks and its ``[DONE]``)."""
    return f"data: {data}{SEP}{SEP}".encode()


class FrameStream(EventSourceResponse):
    """An SSE response whose body yields ready frames (bytes from :func:`frame`).

    Example::

        async def body():
            yield frame("token", '{"type": "token", "text": "Hi"}', "1-0")

        return FrameStream(body(), ping=15, headers={"Cache-Control": "no-cache"})
    """

    async def _send_with_timeout(self, send, message) -> None:
        if self.send_timeout is not None:
            return await super()._send_with_timeout(send, message)
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True  # as sse-starlette's: no closing send on a transport in doubt
            raise
