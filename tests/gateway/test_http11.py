"""The API's HTTP/1.1 protocol: a request's headers and its body have deadlines (slow clients cannot hold
connections for ever); streamed answers and WebSockets do not, nor the server's own waits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
import websockets

from control.cli import _server_config
from control.platform import ControlPlane
from control.settings import Settings
from gateway import http11
from gateway.http11 import BODY_TIMEOUT, HEADERS_TIMEOUT, LINGER_S, with_request_deadlines
from tests.conftest import Api
from tests.gateway.test_agents_api import agent_body

DEADLINE_S = 0.4
LONGER_S = 1.2  # three deadlines: what came in this time would have been cut off without the protocol's care
BODY_DEADLINE_S = 3 * LONGER_S  # the body's, where a test needs a body late by LONGER_S to be read
ENOUGH_S = 30.0  # to wait for what must come (none of this is timed: only bounded, so that a failure ends)
ORIGIN = "https://app.example.com"  # a page allowed to call the API, where CORS is on
OTHER = "https://evil.example.com"


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


async def sink(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads a request's body and drops it, then answers 200."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def small_server(app: Any = small_app, body_s: float = BODY_DEADLINE_S) -> uvicorn.Config:
    deadlines = with_request_deadlines(DEADLINE_S, body_s)
    return uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", http=deadlines)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), ENOUGH_S)  # until the server closes the connection


async def trickle(port: int, at_once: bytes, slowly: bytes) -> tuple[bytes, int]:
    """Send ``at_once``, then ``slowly`` a byte every eighth of a deadline until the server answers and closes:
    what it answered, and how many bytes of ``slowly`` were sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(at_once)
    reading = asyncio.ensure_future(read_all(reader))
    sent = 0
    for byte in slowly:
        await asyncio.sleep(DEADLINE_S / 8)
        if reading.done():  # answered and closed
            break
        writer.write(bytes([byte]))
        await writer.drain()
        sent += 1
    answered = await reading
    writer.close()
    return answered, sent


async def test_a_connection_that_sends_nothing_is_answered_408_and_closed(
    control: ControlPlane, settings: Settings
) -> None:
    """As the API is served (`caravan serve`, `./dev/up`): a connection opened and left silent is cut off."""
    chosen = settings.model_copy(update={"http_port": 0, "http_header_timeout_s": DEADLINE_S})
    async with serving(_server_config(chosen, control)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answered = await read_all(reader)
        writer.close()
    assert answered == HEADERS_TIMEOUT
    head, _, body = answered.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_timeout"


async def test_a_request_http_does_not_allow_is_answered_in_the_apis_error_shape(
    control: ControlPlane, settings: Settings
) -> None:
    """A path with a raw byte over 0x7f (a client that did not percent-encode it), a header name with a space, a
    request line that is none: h11 cannot read them, and the client gets the API's error body, not plain text."""
    chosen = settings.model_copy(update={"http_port": 0})
    async with serving(_server_config(chosen, control)) as port:
        for request in (
            "GET /v1/agents/ag-é HTTP/1.1\r\nhost: x\r\n\r\n".encode(),
            b"GET /v1/agents HTTP/1.1\r\nhost: x\r\nbad name: 1\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            answered = await read_all(reader)
            writer.close()
            head, _, body = answered.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head, request
            error = json.loads(body)["error"]
            assert error["code"] == "bad_request" and "percent-encoded" in error["message"], request


async def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline_though_bytes_keep_coming() -> None:
    request = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 200 + b"\r\n\r\n"
    async with serving(small_server()) as port:
        answered, sent = await trickle(port, b"", request)
    assert answered == HEADERS_TIMEOUT
    assert sent < len(request)  # closed before the headers were all sent


async def test_a_late_body_a_long_answer_and_the_next_request_on_the_connection_are_not_cut_off() -> None:
    """A body that comes later than the headers' deadline, but within its own, is read; the answer streams for
    longer than either deadline, and the connection, kept alive, serves the next request."""
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
    assert answered.startswith(b"HTTP/1.1 200 ") and answered.endswith(HEADERS_TIMEOUT)


async def test_a_stream_to_a_client_that_takes_nothing_ends_once_tcp_gives_up_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that stops taking what a stream sends (vanished without a word, or stuck: its window stays shut)
    is given up on by TCP after ``UNACKED_S`` (here a second), and the route hears it gone: the stream ends and its
    place among the customer's streams is free, where Linux kept such a connection for a quarter of an hour (a
    client gone for good) or for ever (one that stays but reads nothing)."""
    monkeypatch.setattr(http11, "UNACKED_S", 1)
    gone = asyncio.Event()

    async def endless(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        listening = asyncio.ensure_future(receive())  # the body's end, then http.disconnect once the client is gone
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        while not gone.is_set():
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            if listening.done() and listening.result()["type"] == "http.disconnect":
                gone.set()
            elif listening.done():
                listening = asyncio.ensure_future(receive())
            await asyncio.sleep(0)

    async with serving(small_server(endless)) as port:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, soon shut
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")  # ... and nothing read from here on
        try:
            await asyncio.wait_for(gone.wait(), ENOUGH_S)
        finally:
            client.close()


async def test_a_websocket_stays_open_past_the_deadline() -> None:
    async with serving(small_server()) as port, websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        for said in ("one", "two"):
            await asyncio.sleep(LONGER_S)
            await ws.send(said)
            assert await asyncio.wait_for(ws.recv(), ENOUGH_S) == said


async def flood(port: int) -> tuple[asyncio.Future[bytes], asyncio.StreamWriter]:
    """A request whose body is sent as fast as the connection takes it, far more than the body's deadline lets come,
    until the server answers and closes its half: the answer (being read to the connection's end), and the writer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % 2**40)
    reading = asyncio.ensure_future(read_all(reader))
    while not reading.done():
        writer.write(b"z" * 2**16)
        await writer.drain()
        await asyncio.sleep(0)
    return reading, writer


async def test_a_body_still_coming_when_its_deadline_ends_gets_the_408_not_a_reset() -> None:
    """A client still sending its body when the deadline comes reads the 408. Closed with bytes unread, or meeting
    more, a socket answers with a reset, and the client's kernel drops the 408 it had not read yet: the server shuts
    its half instead, and reads and drops what still comes until the client closes."""
    async with serving(small_server(sink, body_s=DEADLINE_S)) as port:
        for _ in range(3):
            reading, writer = await flood(port)
            answered = await reading
            writer.close()
            assert answered == BODY_TIMEOUT


async def test_a_client_that_keeps_sending_after_its_408_is_cut_off_all_the_same() -> None:
    """The server drops what comes after a 408 for a while only (``LINGER_S``): a client that reads its answer and
    goes on sending is then disconnected, so a 408 still frees the connection."""
    async with serving(small_server(sink, body_s=DEADLINE_S)) as port:
        reading, writer = await flood(port)
        assert await reading == BODY_TIMEOUT

        async def send_until_cut_off() -> None:
            while not writer.is_closing():
                writer.write(b"z" * 1024)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                await asyncio.sleep(LINGER_S / 20)

        await asyncio.wait_for(send_until_cut_off(), ENOUGH_S)
        writer.close()


async def test_a_client_holding_its_408_open_holds_neither_the_route_nor_the_servers_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The route waiting for the body hears ``http.disconnect`` when the 408 goes, not when the connection ends: a
    client that holds it open after its answer holds neither the route nor the server's shutdown."""
    monkeypatch.setattr("gateway.http11.LINGER_S", 10 * ENOUGH_S)
    heard = asyncio.Event()

    async def waits_for_the_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive())["type"] == "http.request":
            pass
        heard.set()

    async def served_then_stopped() -> asyncio.StreamWriter:
        async with serving(small_server(waits_for_the_body, body_s=DEADLINE_S)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhalf")
            assert await read_all(reader) == BODY_TIMEOUT
            await asyncio.wait_for(heard.wait(), ENOUGH_S)  # the client has not closed, the server lingers
        return writer

    writer = await asyncio.wait_for(served_then_stopped(), 2 * ENOUGH_S)  # stopping does not wait for the client
    writer.close()


def post_agent(headers: dict[str, str]) -> tuple[bytes, bytes]:
    """The head of a request that creates an agent, and its body."""
    body = json.dumps(agent_body()).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request_head = (
        f"POST /v1/agents HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{head}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return request_head, body


def header_fields(answered: bytes) -> dict[str, str]:
    """The header fields of a raw answer, by lower-case name."""
    lines = answered.partition(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}


async def test_a_body_sent_a_byte_at_a_time_is_cut_off_at_its_deadline_and_nothing_is_made(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """As the API is served: an agent's definition trickled in is answered 408 when the body's deadline comes,
    though bytes keep coming, and no agent is made; the log says whom and why."""
    caplog.set_level(logging.INFO, "caravan.gateway")
    _, headers = await api.new_customer()
    chosen = api.control.settings.model_copy(update={"http_port": 0, "http_body_timeout_s": DEADLINE_S})
    request_head, body = post_agent(headers)
    async with serving(_server_config(chosen, api.control)) as port:
        answered, sent = await trickle(port, request_head, body)
    assert answered == BODY_TIMEOUT
    assert json.loads(answered.partition(b"\r\n\r\n")[2])["error"]["message"] == (
        "the request's body did not come in time"
    )
    assert sent < len(body)
    said = [r.getMessage() for r in caplog.records if r.name == "caravan.gateway"]
    assert any(m.startswith("408 to 127.0.0.1:") and m.endswith("body did not come within 0.4 s") for m in said), said
    listed = await api.client.get("/v1/agents", headers=headers)
    assert listed.status_code == 200 and listed.json() == []


async def test_a_bodys_408_is_readable_by_a_page_on_an_allowed_origin_and_only_by_it(api: Api) -> None:
    """As the API is served with CORS (CARAVAN_CORS_ORIGINS): the body's 408 to a page on an allowed origin carries
    the CORS headers the API's other answers carry, so the browser hands it the error, not a network error; to any
    other origin, or with CORS off, it carries none."""
    _, headers = await api.new_customer()
    answers: dict[tuple[bool, str], bytes] = {}
    for cors in (True, False):
        chosen = api.control.settings.model_copy(
            update={"http_port": 0, "http_body_timeout_s": DEADLINE_S, "cors_origins": (ORIGIN,) if cors else ()}
        )
        async with serving(_server_config(chosen, api.control)) as port:
            for origin in (ORIGIN, OTHER):
                answers[cors, origin], _ = await trickle(port, *post_agent({"Origin": origin, **headers}))
    for answered in answers.values():
        assert answered.startswith(b"HTTP/1.1 408 "), answered
        assert json.loads(answered.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    readable = header_fields(answers[True, ORIGIN])
    assert readable["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in readable["access-control-expose-headers"].lower()
    assert readable["vary"] == "Origin" and readable["connection"] == "close"
    for unread in (answers[True, OTHER], answers[False, ORIGIN], answers[False, OTHER]):
        assert not [name for name in header_fields(unread) if name.startswith("access-control-")], unread


SLOW_BODY_S = 1.0  # the body's deadline where the server is slow to read
ROUTE_READS_AT_S = 2.5  # its route first reads this long after the headers: half-way between two deadlines' ends
CLIENT_LAG_S = 0.75  # and the client sends what it was made to wait with this long after that: past the deadline
# counted on from the headers (3.0 s), within the whole deadline counted from the route's reading (3.5 s)


async def slow_reader(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads a request's body only ``ROUTE_READS_AT_S`` after its headers, and answers its size."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(ROUTE_READS_AT_S)
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    said = b"%d" % size
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(said))]})
    await send({"type": "http.response.body", "body": said})


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ENOUGH_S)
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), ENOUGH_S)


async def test_a_body_the_route_is_slow_to_take_gets_a_whole_deadline_once_taken() -> None:
    """The server's own wait is not the client's: a body's first part, more than uvicorn buffers, waits (reading
    paused) past two deadlines for the route to read it; its last part, sent a while after, is still read."""
    first, last = b"x" * 2**18, b"y" * 10  # uvicorn stops reading past 64 KiB that the route has not taken
    async with serving(small_server(slow_reader, body_s=SLOW_BODY_S)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (len(first) + len(last)) + first)
        await asyncio.sleep(ROUTE_READS_AT_S + CLIENT_LAG_S)
        writer.write(last)
        _, answered = await read_answer(reader)
        writer.close()
    assert answered == b"%d" % (len(first) + len(last))


async def test_a_body_that_waits_for_100_continue_gets_a_whole_deadline_once_told_to_come() -> None:
    """A client asking ``Expect: 100-continue`` sends its body once told to, which is when the route first reads;
    a body sent a while after that is still read."""
    body = b"a small body"
    async with serving(small_server(slow_reader, body_s=SLOW_BODY_S)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
        told = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ENOUGH_S)
        assert told.startswith(b"HTTP/1.1 100 "), told
        await asyncio.sleep(CLIENT_LAG_S)
        writer.write(body)
        _, answered = await read_answer(reader)
        writer.close()
    assert answered == b"%d" % len(body)
