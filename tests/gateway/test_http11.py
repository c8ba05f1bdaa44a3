"""The API's HTTP/1.1 protocol: a request's headers have a deadline (slow clients cannot hold connections for ever);
bodies, streamed answers and WebSockets do not."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
import websockets

from control.cli import _server_config
from control.platform import ControlPlane
from control.settings import Settings
from gateway.http11 import REQUEST_TIMEOUT, with_header_deadline

DEADLINE_S = 0.4
LONGER_S = 1.2  # three deadlines: what came in this time would have been cut off without the protocol's care
ENOUGH_S = 30.0  # to wait for what must come (none of this is timed: only bounded, so that a failure ends)


@contextlib.asynccontextmanager
async def serving(config: uvicorn.Config) -> AsyncIterator[int]:
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def small_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes a request's body after streaming two parts ``LONGER_S`` apart; a WebSocket echoes each message."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message["text"]})
        return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"first;", "more_body": True})
    await asyncio.sleep(LONGER_S)
    await send({"type": "http.response.body", "body": b"then:" + body})


def small_server() -> uvicorn.Config:
    return uvicorn.Config(
        small_app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", http=with_header_deadline(DEADLINE_S)
    )


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), ENOUGH_S)  # until the server closes the connection


async def test_a_connection_that_sends_nothing_is_answered_408_and_closed(
    control: ControlPlane, settings: Settings
) -> None:
    """As the API is served (`caravan serve`, `./dev/up`): a connection opened and left silent is cut off."""
    chosen = settings.model_copy(update={"http_port": 0, "http_header_timeout_s": DEADLINE_S})
    async with serving(_server_config(chosen, control)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answered = await read_all(reader)
        writer.close()
    assert answered == REQUEST_TIMEOUT
    head, _, body = answered.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_timeout"


async def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline_though_bytes_keep_coming() -> None:
    request = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 200 + b"\r\n\r\n"
    async with serving(small_server()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        reading = asyncio.ensure_future(read_all(reader))
        sent = 0
        for byte in request:
            await asyncio.sleep(DEADLINE_S / 8)
            if reading.done():  # answered and closed
                break
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
        answered = await reading
        writer.close()
    assert answered == REQUEST_TIMEOUT
    assert sent < len(request)  # closed before the headers were all sent


async def test_a_slow_body_a_long_answer_and_the_next_request_on_the_connection_are_not_cut_off() -> None:
    """The deadline is the headers': the body that follows them late is read, the answer streams for longer than
    the deadline, and the connection, kept alive, serves the next request."""
    async with serving(small_server()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for body in (b"late body", b"again"):
            writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body))
            await writer.drain()
            await asyncio.sleep(LONGER_S)
            writer.write(body)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ENOUGH_S)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"transfer-encoding: chunked" in head.lower()
            chunks = b""
            while not chunks.endswith(b"0\r\n\r\n"):
                chunks += await asyncio.wait_for(reader.read(1024), ENOUGH_S)
            assert b"first;" in chunks and b"then:" + body in chunks
        writer.close()


async def test_an_idle_kept_alive_connection_gets_the_deadline_again_after_each_answer() -> None:
    async with serving(small_server()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
        await writer.drain()
        answered = await read_all(reader)  # the answer, then the 408 once nothing more came
        writer.close()
    assert answered.startswith(b"HTTP/1.1 200 ") and answered.endswith(REQUEST_TIMEOUT)


async def test_a_websocket_stays_open_past_the_deadline() -> None:
    async with serving(small_server()) as port, websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        for said in ("one", "two"):
            await asyncio.sleep(LONGER_S)
            await ws.send(said)
            assert await asyncio.wait_for(ws.recv(), ENOUGH_S) == said
