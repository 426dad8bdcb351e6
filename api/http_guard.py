"""What a client may make the server hold: request heads and bodies bounded in size and time.

Three limits, each enforced while the bytes arrive, never after buffering them:

- **Body size** (``MEGREZ_API__MAX_BODY_BYTES``), on every route and both framings: a ``Content-Length``
  over the limit is a 413 before one byte of the body is read; a chunked body, or one longer than it
  claims, is counted as it is read and refused (413) the moment the count passes the limit.
- **Body stall** (``MEGREZ_API__BODY_TIMEOUT_S``): a body whose next piece takes longer than this to
  arrive is a 408. The clock runs only while the app waits for the body, so a slow turn never trips it.
- **Head stall** (``MEGREZ_API__HEADER_TIMEOUT_S``): uvicorn has no header timeout, so a connection
  that sends part of a request line or headers and stops would be held forever (a slowloris).
  :func:`server_config` gives uvicorn a protocol class that answers 408 and closes such a connection;
  it also times a connection that opens and sends nothing.

:class:`BodyGuard` is ASGI middleware: it wraps ``receive`` and raises :class:`RequestRefused` (a
FastAPI ``HTTPException``) from it. FastAPI re-raises an ``HTTPException`` from body parsing and
Starlette's form parser lets it through, so the app's own handlers answer it in the route's shape
(``api/errors.py``); when it escapes the app before a response has
started, the guard answers itself. Once a response has started nothing can be answered any more: a
limit passed then reads as the client going away (``http.disconnect``). A response sent before its
request body was read whole says ``Connection: close``, so the rest of that body is never read.

The client's address: uvicorn replaces it with ``X-Forwarded-For`` only when the direct peer is one
of ``MEGREZ_API__TRUSTED_PROXIES`` (:func:`server_config`; uvicorn alone would trust 127.0.0.1).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

if TYPE_CHECKING:
    import uvicorn

    from api.settings import Settings

_SETTING = "bytes accepted (MEGREZ_API__MAX_BODY_BYTES)"


class RequestRefused(HTTPException):
    """A request the guard will not read further (413, 408); the connection closes after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, headers={"Connection": "close"})


class BodyGuard:
    """ASGI middleware bounding every request body in size and stall time (see the module docstring).

    Example::

        app.add_middleware(BodyGuard, max_bytes=25_000_000, stall_s=30.0)

    :param max_bytes: the largest body accepted (413 above it).
    :param stall_s: the longest wait for the body's next piece (408 after it).
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, stall_s: float) -> None:
        self.app, self.max_bytes, self.stall_s = app, max_bytes, stall_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > self.max_bytes:
            refused = RequestRefused(413, f"the request body is {length} bytes; at most {self.max_bytes} {_SETTING}")
            await self._answer(scope, refused, receive, send)
            return
        # A request that declares no body has none to read; one that does is read until its last piece.
        body_done = length in ("", "0") and "transfer-encoding" not in headers
        started = False
        received = 0

        async def guarded_receive() -> Message:
            nonlocal body_done, received
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.stall_s)
            except TimeoutError:
                if started:
                    return {"type": "http.disconnect"}
                raise RequestRefused(408, f"the request body stalled: nothing arrived for {self.stall_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if started:
                        return {"type": "http.disconnect"}
                    raise RequestRefused(413, f"the request body is longer than the {self.max_bytes} {_SETTING}")
                body_done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:  # the rest of the body is never read: end the connection with this response
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except RequestRefused as refused:
            if started:  # too late to answer; unreachable while the receive above turns it into a disconnect
                raise
            await self._answer(scope, refused, receive, send)

    @staticmethod
    async def _answer(scope: Scope, refused: RequestRefused, receive: Receive, send: Send) -> None:
        response = error_response(scope.get("path", ""), refused.status_code, str(refused.detail), refused.headers)
        await response(scope, receive, send)


def server_config(app: Any, settings: Settings, *, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's configuration for serving ``app`` as ``megrez-search serve`` does: request heads bounded in
    time, ``X-Forwarded-For`` honoured only from ``settings.api.trusted_proxies``.

    :param kwargs: further ``uvicorn.Config`` arguments (``log_level``, ``lifespan``, ...).
    """
    import uvicorn

    proxies = settings.api.trusted_proxies
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=head_timeout_protocol(settings.api.header_timeout_s),
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or [],
        # A keep-alive connection waits this long for its next request; the head timer starts with its first byte.
        timeout_keep_alive=5,
        **kwargs,
    )


def head_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools, else h11) with a deadline on each request head: a
    connection whose request line and headers are not complete ``seconds`` after they were due (the
    connection opened, or the previous response ended and a byte of the next request came) gets a 408
    and is closed. A request being answered is never cut: the deadline only runs between requests."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request head completed: its answer is the app's business now
                self._disarm()
            if self.cycle is None or self.cycle.response_complete:  # between requests: a head is due
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
                return
            message = f"the request head did not arrive within {seconds:g} s".encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(message), message)
            )
            self.transport.close()

    return HeadTimeoutProtocol
