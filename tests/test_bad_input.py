"""Bad input never becomes a 5xx, a hang or unbounded memory: every route × every framing, through the app on
uvicorn, on raw sockets where a client's misbehaviour cannot be written with an HTTP library.

Classes: bodies that are not JSON; JSON of the wrong shape; bodies over the limit (declared, chunked, or
longer than declared); bodies and request heads that stall; malformed stream ids; images that lie about
themselves; wrong keys sent over and over; ``X-Forwarded-For`` from whoever sends it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
from collections.abc import Iterator

import pytest
import uvicorn

from agent.config import AgentConfig
from api.config import ApiConfig, AuthConfig, RateConfig
from api.http_guard import BodyGuard, server_config
from api.memory import LocalMemory
from api.settings import Settings
from scripts.net import free_port
from tests.agent_fixtures import app_with, client_for, png

LIMIT = 4096
KEY = "the-right-key"
OPENAI = "/v1/chat/completions"


def settings(**changes) -> Settings:
    api = ApiConfig(max_body_bytes=LIMIT, body_timeout_s=1.0, header_timeout_s=1.0)
    base = Settings(agent=AgentConfig(related=False), api=api)
    return base.model_copy(update=changes)


@contextlib.asynccontextmanager
async def served(tokenizer_dir, corpus_backend, *script, config: Settings | None = None, **engine_kw):
    """The app (``client_for``: its lifespan and a plain uvicorn) plus a second uvicorn on the same app configured
    as ``megrez-search serve`` configures it; yields (client, that server's port)."""
    config = config or settings()
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), *script, settings=config, **engine_kw)
    async with client_for(app) as client:

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # leave the signals to pytest
                yield

        port = free_port()
        server = Server(server_config(app, config, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "the guarded server did not start"
            await asyncio.sleep(0.02)
        try:
            yield client, port
        finally:
            server.should_exit = True
            await task


async def exchange(port: int, *pieces: bytes, pause_s: float = 0.0, bound_s: float = 15.0) -> bytes:
    """Send ``pieces`` on a fresh connection (``pause_s`` apart, stopping when the server closes) and return all
    it answered until it closed the connection; a server that never closes fails the test at ``bound_s`` (a
    hang, not a slow answer). Read as it arrives, so an answer is kept even if the server resets afterwards."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def read_all() -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                received.extend(data)

    reading = asyncio.create_task(read_all())
    try:
        for piece in pieces:
            if reading.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(piece)
                await writer.drain()
            await asyncio.sleep(pause_s)
        await asyncio.wait_for(reading, bound_s)
    finally:
        reading.cancel()
        writer.close()
    return bytes(received)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> dict:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: test", *headers, "", ""]).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


MULTIPART = "multipart/form-data; boundary=b0undary"
# Every route that takes or may be sent a body: (method, path, content type, whether the app reads the body).
ROUTES = [
    ("POST", "/chat", "application/json", True),
    ("POST", "/chat", MULTIPART, True),
    ("POST", OPENAI, "application/json", True),
    ("POST", "/v1/responses", "application/json", True),
    ("GET", "/v1/models", "application/json", False),
    ("GET", "/conversations", "application/json", False),
    ("DELETE", "/conversations/nope", "application/json", False),
    ("POST", "/chat/nope/stop", "application/json", False),
    ("GET", "/healthz", "application/json", False),
]
ROUTE_IDS = [f"{m} {p} {c.split(';')[0]}" for m, p, c, _ in ROUTES]


def opening(kind: str) -> bytes:
    """A body's valid beginning, so what follows is refused for its size or pace, not its syntax."""
    if kind == MULTIPART:
        return b'--b0undary\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
    return b'{"message": "'


def error_message(path: str, response: bytes) -> str:
    body = json_of(response)
    return body["error"]["message"] if path.startswith("/v1/") else body["detail"]


# --- bodies over the limit, stalled, or longer than declared ------------------------------------------------


async def test_every_route_and_framing_is_bounded(tokenizer_dir, corpus_backend):
    async with served(tokenizer_dir, corpus_backend) as (client, port):
        for method, path, kind, reads in ROUTES:
            where = f"{method} {path} {kind}"
            # Declared over the limit: refused before one byte of the body is sent.
            declared = await exchange(port, head(method, path, f"Content-Type: {kind}", "Content-Length: 999999999"))
            assert status_of(declared) == 413, where
            assert "at most 4096 bytes" in error_message(path, declared), where
            # Chunked past the limit: refused once the count passes it (never buffered whole).
            chunked = head(method, path, f"Content-Type: {kind}", "Transfer-Encoding: chunked", "Connection: close")
            over = await exchange(port, chunked + chunk(opening(kind)) + chunk(b"x" * 1500) * 4 + b"0\r\n\r\n")
            assert (status_of(over) == 413) if reads else (status_of(over) < 500), where
            if reads:
                assert "longer than the 4096 bytes" in error_message(path, over), where
            else:  # the body is never read: the answer ends the connection so it never is
                assert b"connection: close" in over.lower(), where
            # Stalled: a body that stops arriving is a 408 where it is read; elsewhere it is never waited for.
            for framing, first in (
                ("Content-Length: 1000", opening(kind)),
                ("Transfer-Encoding: chunked", chunk(opening(kind))),
            ):
                stalled = await exchange(port, head(method, path, f"Content-Type: {kind}", framing) + first)
                assert (status_of(stalled) == 408) if reads else (status_of(stalled) < 500), (where, framing)
                if reads:
                    assert "stalled" in error_message(path, stalled), (where, framing)
            # Longer than declared: the extra bytes are not this request's body (uvicorn frames by Content-Length).
            lying = await exchange(port, head(method, path, f"Content-Type: {kind}", "Content-Length: 5") + b"x" * 6000)
            assert status_of(lying) < 500, where
        assert (await client.get("/healthz")).status_code == 200  # and the service is fine


async def guard_app(scope, receive, send):
    """A bare ASGI app that reads its whole body, for :class:`BodyGuard` on its own."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


async def drive(headers: list[tuple[bytes, bytes]], pieces: list[bytes], path: str = "/chat") -> tuple[int, dict, int]:
    """Run the guard (4096 bytes, 0.2 s) over ``guard_app``; ``pieces`` arrive as body messages, then nothing.
    Returns the status, the JSON body, and how many pieces were read."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    read, sent = 0, []

    async def receive():
        nonlocal read
        if read == len(pieces):
            await asyncio.Event().wait()  # the client stalls
        read += 1
        return {"type": "http.request", "body": pieces[read - 1], "more_body": True}

    async def send(message):
        sent.append(message)

    await BodyGuard(guard_app, max_bytes=LIMIT, stall_s=0.2)(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), read


async def test_the_guard_counts_what_arrives_not_what_was_declared():
    declared = [(b"content-length", b"10")]  # a body longer than it claims (a server that does not frame by it)
    status, body, read = await drive(declared, [b"x" * 1000] * 10)
    assert status == 413 and "longer than the 4096 bytes" in body["detail"]
    assert read == 5  # refused at the piece that passed the limit, not after the rest
    status, body, read = await drive([(b"content-length", b"99999")], [b"x"] * 3)
    assert status == 413 and read == 0  # over the limit as declared: nothing read
    status, body, _ = await drive([(b"transfer-encoding", b"chunked")], [b"x" * 10], path=OPENAI)
    assert status == 408 and body["error"]["type"] == "invalid_request_error"  # OpenAI's shape under /v1


# --- slow request heads (the server `megrez-search serve` runs) ----------------------------------------------


async def test_request_heads_that_stall_are_cut(tokenizer_dir, corpus_backend):
    slow_turn = "Slow. " * 300 + "<|turn_end|>"  # takes longer than the 1 s head timeout to answer
    async with served(tokenizer_dir, corpus_backend, slow_turn, delay_s=0.005) as (_, port):
        nothing = await exchange(port)
        partial = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        trickled = await exchange(port, *(bytes([c]) for c in b"GET /healthz HTTP/1.1\r\nX-Slow: yes"), pause_s=0.15)
        keep_alive = await exchange(port, head("GET", "/healthz"), b"GET /healthz HT", pause_s=0.3)
        answered = await exchange(
            port, head("POST", "/chat?websearch=off", "Content-Length: 17", "Connection: close") + b'{"message": "q"}\n'
        )
    for response in (nothing, partial, trickled):
        assert status_of(response) == 408 and b"connection: close" in response.lower()
    assert keep_alive.count(b"HTTP/1.1 200") == 1 and b"HTTP/1.1 408" in keep_alive  # the next head is timed too
    assert status_of(answered) == 200 and json_of(answered)["status"] == "done"  # a slow answer is not cut


# --- bodies that are not JSON, JSON of the wrong shape -------------------------------------------------------

NOT_JSON = {
    "empty": (b"", "application/json"),
    "truncated": (b'{"message": "q"', "application/json"),
    "trailing garbage": (b'{"message": "q"} tail', "application/json"),
    "NaN": (b'{"message": NaN, "model": NaN, "messages": NaN}', "application/json"),
    "invalid UTF-8": (b'{"message": "\xff\xfe"}', "application/json"),
    "NUL": (b'{"message": "q\x00"}', "application/json"),
    "UTF-16 with BOM": ('{"message": "q"}'.encode("utf-16"), "application/json"),
    "lone surrogate": (
        b'{"message": "\\ud800", "model": "\\ud800", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "application/json",
    ),
    "nesting 1000": (b"[" * 1000 + b"]" * 1000, "application/json"),
    "nesting 100000": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "form-urlencoded": (b"message=q", "application/x-www-form-urlencoded"),
    "no content type": (b'{"message": 1}', ""),
}


@pytest.mark.parametrize("name", list(NOT_JSON))
async def test_a_body_that_is_not_json_is_a_clear_4xx(tokenizer_dir, corpus_backend, name):
    body, kind = NOT_JSON[name]
    headers = {"Content-Type": kind} if kind else {}
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings(api=ApiConfig()))
    async with client_for(app) as client:
        chat = await client.post("/chat", content=body, headers=headers)
        openai = await client.post(OPENAI, content=body, headers=headers)
    assert chat.status_code == 422, chat.text
    assert all({"loc", "msg", "type"} <= set(item) and "input" not in item for item in chat.json()["detail"])
    assert openai.status_code == 400, openai.text
    assert openai.json()["error"]["type"] == "invalid_request_error" and openai.json()["error"]["message"]
    assert engine.requests == []


WRONG_SHAPES = {
    "image_url a string": ([{"type": "image_url", "image_url": "data:image/png;base64,AA=="}], "image_url"),
    "url a number": ([{"type": "image_url", "image_url": {"url": 5}}], "image_url.url"),
    "input_audio a string": ([{"type": "input_audio", "input_audio": "AAAA"}], "input_audio"),
    "audio data a number": ([{"type": "input_audio", "input_audio": {"data": 5, "format": "wav"}}], "input_audio.data"),
    "text a number": ([{"type": "text", "text": 5}], "text"),
    "part a number": ([5], "content.parts[0]"),
    "part without type": ([{"text": "q"}], "content.parts[0]"),
    "unknown part type": ([{"type": "file", "file": {}}], "content.parts[0]"),
    "content a number": (5, "messages[0].content"),
}


@pytest.mark.parametrize("name", list(WRONG_SHAPES))
async def test_openai_content_of_the_wrong_shape_is_a_400_naming_the_field(tokenizer_dir, corpus_backend, name):
    content, field = WRONG_SHAPES[name]
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings())
    history = [{"role": "user", "content": content}, {"role": "assistant", "content": "a"}]
    async with client_for(app) as client:
        for messages in ([{"role": "user", "content": content}], [*history, {"role": "user", "content": "q"}]):
            response = await client.post(OPENAI, json={"model": "megrez-search", "messages": messages})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert field in error["param"] and field in error["message"], error
    assert engine.requests == []


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": 5, "content": "q"}], "messages[0].role"),
        ([{"role": "tool", "content": "q"}], "messages[0].role"),
        ([{"content": "q"}], "messages[0].role"),
        ("q", "messages"),
        ([], "messages"),
    ],
)
async def test_openai_messages_of_the_wrong_shape_are_a_400(tokenizer_dir, corpus_backend, messages, field):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings())
    async with client_for(app) as client:
        response = await client.post(OPENAI, json={"model": "megrez-search", "messages": messages})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


async def test_unknown_routes_and_methods_answer_in_the_routes_shape(tokenizer_dir, corpus_backend):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings())
    async with client_for(app) as client:
        missing, wrong_method = await client.get("/v1/nope"), await client.get(OPENAI)
        plain_missing = await client.get("/nope")
        mode = await client.post("/chat?websearch=maybe", json={"message": "q"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
    assert plain_missing.json() == {"detail": "Not Found"}
    assert mode.status_code == 422 and mode.json()["detail"][0]["loc"] == ["query", "websearch"]


# --- stream ids, images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("last_id", ["18446744073709551616-0", "0-18446744073709551616", "99999999999999999999999-1"])
async def test_a_last_event_id_beyond_redis_ids_is_a_400(tokenizer_dir, corpus_backend, last_id):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), "Hi.<|turn_end|>", settings=settings())
    async with client_for(app) as client:
        mid = (await client.post("/chat?websearch=off", json={"message": "q"})).json()["message_id"]
        by_header = await client.get(f"/chat/{mid}/events", headers={"Last-Event-ID": last_id})
        by_query = await client.get(f"/chat/{mid}/events", params={"last_event_id": last_id})
    assert by_header.status_code == 400 and by_query.status_code == 400, (by_header.text, by_query.text)
    assert "Last-Event-ID" in by_header.json()["detail"]


def truncated_png() -> bytes:
    return png(256, 256)[:-40]  # the header and size are intact; the data and the end are not


def bomb() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (30_000, 30_000)).save(buffer, "PNG")  # 900 M pixels in about 100 kB
    return buffer.getvalue()


@pytest.mark.parametrize("image", [truncated_png, bomb])
@pytest.mark.parametrize("max_pixels", [40_000_000, 10**10])  # the service's limit, or one above PIL's own
async def test_images_that_lie_are_a_400_naming_them(tokenizer_dir, corpus_backend, image, max_pixels):
    url = "data:image/png;base64," + base64.b64encode(image()).decode()
    config = settings(api=ApiConfig(max_image_pixels=max_pixels))
    app, engine = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=config)
    parts = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}]
    async with client_for(app) as client:
        chat = await client.post("/chat", json={"message": "what is it?", "images": [url]})
        upload = await client.post("/chat", data={"message": "q"}, files=[("images", ("a.png", image(), "image/png"))])
        openai = await client.post(
            OPENAI, json={"model": "megrez-search", "messages": [{"role": "user", "content": parts}]}
        )
    for response in (chat, upload):
        assert response.status_code == 400 and "images[0]" in response.json()["detail"], response.text
    message = openai.json()["error"]["message"]
    assert openai.status_code == 400 and "messages[0]" in message and "images[0]" in message, openai.text
    assert engine.requests == []


# --- keys and client addresses ----------------------------------------------------------------------------------


async def test_wrong_keys_are_rate_limited_per_address(tokenizer_dir, corpus_backend):
    keyed = settings(
        auth=AuthConfig(api_keys=[KEY], wrong_keys="3/minute"),
        api=ApiConfig(trusted_proxies=["127.0.0.1"]),  # so each test client can be its own address
    )
    async with served(tokenizer_dir, corpus_backend, config=keyed) as (client, port):
        base = f"http://127.0.0.1:{port}"

        async def get(key: str | None, address: str):
            headers = {"X-Forwarded-For": address} | ({"Authorization": f"Bearer {key}"} if key else {})
            return await client.get(base + "/conversations", headers=headers)

        missing = [await get(None, "10.0.0.1") for _ in range(4)]  # no key is not a guess
        assert {r.status_code for r in missing} == {401}
        assert missing[0].headers["www-authenticate"] == 'Bearer realm="megrez-search"'
        assert (await get(KEY, "10.0.0.1")).status_code == 200
        wrong = [await get("guess", "10.0.0.1") for _ in range(3)]
        assert {r.status_code for r in wrong} == {401}
        assert 'error="invalid_token"' in wrong[0].headers["www-authenticate"]
        blocked = [await get("guess", "10.0.0.1"), await get(KEY, "10.0.0.1")]  # even the right key: no oracle
        for response in blocked:
            assert response.status_code == 429 and 1 <= int(response.headers["retry-after"]) <= 60
            assert "wrong API key" in response.json()["detail"]
        assert (await get(KEY, "10.0.0.2")).status_code == 200  # another address is not blocked
        openai = await client.get(base + "/v1/models", headers={"X-Forwarded-For": "10.0.0.1"})
        assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("trusted", [[], ["127.0.0.1"]])
async def test_x_forwarded_for_picks_the_bucket_only_from_a_trusted_proxy(tokenizer_dir, corpus_backend, trusted):
    config = settings(rate=RateConfig(requests="2/minute"), api=ApiConfig(trusted_proxies=trusted))
    async with served(tokenizer_dir, corpus_backend, config=config) as (client, port):
        codes = [
            (
                await client.get(f"http://127.0.0.1:{port}/conversations", headers={"X-Forwarded-For": f"10.0.0.{i}"})
            ).status_code
            for i in range(4)
        ]
    assert codes == ([200] * 4 if trusted else [200, 200, 429, 429])


async def test_the_api_description_is_public_and_declares_the_key(tokenizer_dir, corpus_backend):
    app, _ = app_with(tokenizer_dir, corpus_backend, LocalMemory(), settings=settings(auth=AuthConfig(api_keys=[KEY])))
    async with client_for(app) as client:
        pages = [await client.get(path) for path in ("/openapi.json", "/docs", "/redoc")]
        unauthorized = await client.get("/conversations")
    assert [p.status_code for p in pages] == [200, 200, 200]
    document = pages[0].json()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    chat = document["paths"]["/chat"]["post"]
    assert chat["security"] == [{"HTTPBearer": []}]
    assert {"400", "401", "404", "408", "409", "413", "422", "429", "503"} <= set(chat["responses"])
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert unauthorized.headers["www-authenticate"].startswith("Bearer")
