"""Polling with a deadline instead of sleeps, and a real HTTP server for the app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar

import httpx
import nats
import pytest
import uvicorn
from fastapi import FastAPI
from nats.js.kv import KeyValue

from agent.protocol import EVENTS_STREAM, LOCAL_MODEL_DEFAULT, Event, task_events_subject
from agent.teamprotocol import MemberJoin, join_subject
from agent.wire import Wire

__all__ = [
    "FlushCounter",
    "ManualClock",
    "assert_eventually",
    "chat_completion",
    "free_port",
    "hold_first_call",
    "join_members",
    "now",
    "serve_app",
    "small_events",
    "sse_events",
    "stored_events",
]

T = TypeVar("T")


async def assert_eventually(
    probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], within: float = 20.0, what: str = "condition"
) -> T:
    """Poll ``probe`` until ``check`` holds for its value; fail with the last value after ``within`` seconds."""
    deadline = time.monotonic() + within
    value = await probe()
    while not check(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s; last value: {value!r}")
        await asyncio.sleep(0.05)
        value = await probe()
    return value


class ManualClock:
    """A clock (control.services.budget.Clock) that moves only when a test sets it: no sleeps, no waiting days."""

    def __init__(self, at: datetime) -> None:
        self._now = at
        self._moved = asyncio.Condition()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        async with self._moved:
            await self._moved.wait_for(lambda: self._now >= when)

    async def set(self, at: datetime) -> None:
        async with self._moved:
            self._now = at
            self._moved.notify_all()


def hold_first_call(
    monkeypatch: pytest.MonkeyPatch, step: tuple[object, str], until: tuple[object, str]
) -> asyncio.Event:
    """A race made certain: the first call of the async method ``step`` (object, name) waits until a call of
    ``until`` returns after it (another request got as far); returns the event set once that first call waits."""
    waiting, resume = asyncio.Event(), asyncio.Event()
    held, after = getattr(*step), getattr(*until)

    async def held_call(*args: Any, **kwargs: Any) -> Any:
        if not waiting.is_set():
            waiting.set()
            await resume.wait()
        return await held(*args, **kwargs)

    async def then_resume(*args: Any, **kwargs: Any) -> Any:
        result = await after(*args, **kwargs)
        if waiting.is_set():
            resume.set()
        return result

    monkeypatch.setattr(*step, held_call)
    monkeypatch.setattr(*until, then_resume)
    return waiting


def now(read: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    """A probe for :func:`assert_eventually` that reads a value at hand."""

    async def probe() -> T:
        return read()

    return probe


def chat_completion(content: str, model: str = "m") -> bytes:
    """An OpenAI chat completion answering ``content``, as a model server sends it (JSON)."""
    message = {"role": "assistant", "content": content}
    return json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
    ).encode()


@contextlib.asynccontextmanager
async def chat_completions_server(answer: str) -> AsyncIterator[tuple[int, list[int]]]:
    """An OpenAI-compatible model server on loopback that answers every chat completion with ``answer`` (as the
    model ``provider: local`` names) and keeps its connections open (closed as it stops); its port, and how many
    requests each connection it accepted carried."""
    body = chat_completion(answer, LOCAL_MODEL_DEFAULT)
    served: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(0)
        writers.append(writer)
        connection = len(served) - 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length")), 0)
                await reader.readexactly(length)
                served[connection] += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        try:
            yield server.sockets[0].getsockname()[1], served
        finally:
            for writer in writers:  # (a client's kept-alive connection would hold up the server's close)
                writer.close()


def free_port() -> int:
    """A loopback port nothing listens on (until something takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_app(app: FastAPI) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free loopback port; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def sse_events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], limit: int | None = None
) -> list[dict[str, Any]]:
    """Read server-sent events (id, event, data) until the stream ends or ``limit`` events arrived."""
    import json

    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line == "":
                if "data" in current:
                    events.append(current)
                    if limit is not None and len(events) >= limit:
                        break
                current = {}
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


async def stored_events(js: Any, customer_id: str, task_id: str) -> list[Event]:
    """Every event of the task in JetStream, in order: also any after its terminal status (the API's streams end
    there)."""
    subject = task_events_subject(customer_id, task_id)
    last = (await js.get_last_msg(EVENTS_STREAM, subject)).seq
    sub = await js.subscribe(subject, ordered_consumer=True, stream=EVENTS_STREAM)
    events: list[Event] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            events.append(Event.model_validate_json(msg.data))
            if msg.metadata.sequence.stream >= last:
                return events
    finally:
        await sub.unsubscribe()


async def nats_connect(url: str) -> nats.NATS:
    """A plain NATS connection for a test, whose ``flush()`` after a ``subscribe()`` returns only once the server has
    the subscription: nats-py's own writes its PING ahead of the SUB it still holds (a Wire mends that on the
    connection, see :mod:`agent.wire`), and a message sent right after could find nobody listening."""
    nc = await nats.connect(url)
    Wire.of(nc)
    return nc


@contextlib.contextmanager
def stalled(pid: int | None) -> Iterator[None]:
    """While inside, the process (a NATS server) is stopped (SIGSTOP) and answers nothing, its connections open;
    waits until it has stopped (a signal is delivered a moment after ``kill`` returns, while the server may still
    answer what it has read)."""
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while _state(pid) != "T":
            assert time.monotonic() < deadline, f"process {pid} did not stop"
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]  # (after the name, which may hold spaces)


@contextlib.contextmanager
def log_records(*names: str, level: int | None = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """The records these loggers pass on while inside (their filters applied), from ``level`` (None: at the levels
    they have). For uvicorn's loggers, entered once the server runs: its logging configuration replaces the
    loggers' handlers and levels."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [(logging.getLogger(name), logging.getLogger(name).level) for name in names]
    for logger, _ in loggers:
        if level is not None:
            logger.setLevel(level)
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger, was in loggers:
            logger.removeHandler(handler)
            logger.setLevel(was)


class FlushCounter:
    """Counts the flushes made on a connection from now on, nats-py's ``flush()`` and ``Wire.flush()``: each waits
    a round trip to the server (a PING that someone waits on; nats-py's own pings to keep the connection alive are
    not counted)."""

    def __init__(self, nc: nats.NATS) -> None:
        self.count = 0
        send_ping = nc._send_ping

        async def counted(future: asyncio.Future[Any] | None = None) -> None:
            if future is not None:
                self.count += 1
            await send_ping(future)

        nc._send_ping = counted  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def small_events(nats_url: str, max_msg_size: int = 4096) -> AsyncIterator[None]:
    """While inside, JetStream refuses task events over ``max_msg_size`` bytes (statuses fit; a long task's
    messages do not)."""
    async with small_messages(nats_url, EVENTS_STREAM, max_msg_size):
        yield


@contextlib.asynccontextmanager
async def small_messages(nats_url: str, stream: str, max_msg_size: int) -> AsyncIterator[None]:
    """While inside, JetStream refuses messages over ``max_msg_size`` bytes in ``stream`` (a KV bucket's values
    too: its stream is ``KV_<bucket>``), as a NATS server refuses any over its ``max_payload``."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    config = (await js.stream_info(stream)).config
    limit = config.max_msg_size
    config.max_msg_size = max_msg_size
    await js.update_stream(config)
    try:
        yield
    finally:
        config.max_msg_size = limit
        await js.update_stream(config)
        await nc.close()


class Stalling:
    """A KV bucket whose updates can be held up (``flowing.clear()``), as by a pause of the process or a network
    partition."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def update(self, *args: Any, **kwargs: Any) -> int:
        await self.flowing.wait()
        return await self._kv.update(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


async def join_members(
    nc: nats.NATS,
    customer_id: str,
    run_id: str,
    agent_ids: Iterable[str],
    output_implied: bool = True,
    states: bool = True,
    state_deltas: bool = True,
    handoffs: Mapping[str, list[str]] | None = None,
) -> None:
    """Enlist one replica of each agent for run ``run_id``, as the team runner does (states sent after each turn,
    unless ``states`` is False, as a manager that keeps no checkpoints asks; as deltas, unless ``state_deltas``
    is False, and the output's messages implied by the answers, unless ``output_implied`` is False, as an older
    manager asks). ``handoffs``: the names each agent may hand off to, by agent id (a swarm's)."""
    for agent_id in agent_ids:
        join = MemberJoin(
            run_id=run_id,
            task_id="tk-000000000000",
            customer_id=customer_id,
            agent_id=agent_id,
            team_key=run_id,
            handoffs=(handoffs or {}).get(agent_id, []),
            state_deltas=state_deltas,
            output_implied=output_implied,
            states=states,
        )
        await nc.request(join_subject(customer_id, agent_id), join.model_dump_json().encode(), timeout=10)


def named_reads(monkeypatch: pytest.MonkeyPatch, repo: Any) -> list[str]:
    """Make ``repo`` (a :class:`control.store.Repo`) refuse every listing (``list``, ``list_as``, ``items``) and
    record the ids (a key's last part) of the records read by name (``get``, ``named_as``); the list it fills."""
    read: list[str] = []
    get, named_as = repo.get, repo.named_as

    async def reading(key: str) -> Any:
        read.append(key.rsplit(".", 1)[-1])
        return await get(key)

    async def reading_named(model: Any, keys: Any) -> Any:
        read.extend(key.rsplit(".", 1)[-1] for key in keys)
        return await named_as(model, keys)

    async def listing(*args: Any) -> Any:
        raise AssertionError("the records listed, not read by name")

    monkeypatch.setattr(repo, "get", reading)
    monkeypatch.setattr(repo, "named_as", reading_named)
    for name in ("list", "list_as", "items"):
        monkeypatch.setattr(repo, name, listing)
    return read
