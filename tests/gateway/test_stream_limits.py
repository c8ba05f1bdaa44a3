"""A customer's open task event streams, SSE and WebSocket together, are held to CARAVAN_MAX_STREAMS_PER_CUSTOMER:
one more is refused with 429, and every stream gives its place back however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets

from control.services.tasks import StreamedEvent
from control.settings import Settings
from gateway.app import create_app
from gateway.streams import OpenStreams
from tests.conftest import Api
from tests.gateway.test_tasks_api import assert_ws_refused, running_slow_task, start_task
from tests.support.helpers import assert_eventually, now, serve_app


@dataclass
class Capped:
    """A gateway whose customers may hold ``cap`` streams each, beside the ``api`` fixture's own (same control
    plane)."""

    base: str
    client: httpx.AsyncClient
    streams: OpenStreams

    def ws_url(self, task_id: str, headers: dict[str, str], query: str = "") -> str:
        token = headers["Authorization"].removeprefix("Bearer ")
        return self.base.replace("http", "ws") + f"/v1/tasks/{task_id}/ws?token={token}{query}"

    async def until_open(self, customer_id: str, count: int) -> None:
        """Until the customer's count is ``count``: a stream's end reaches the server a moment after the client's."""
        probe = now(lambda: self.streams.open_now(customer_id))
        await assert_eventually(probe, lambda n: n == count, what=f"{count} streams open")


@contextlib.asynccontextmanager
async def capped(api: Api, cap: int) -> AsyncIterator[Capped]:
    settings = api.control.settings.model_copy(update={"max_streams_per_customer": cap})
    app = create_app(settings, api.control)
    async with serve_app(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        yield Capped(base, client, app.state.streams)


@contextlib.asynccontextmanager
async def sse(client: httpx.AsyncClient, task_id: str, headers: dict[str, str]) -> AsyncIterator[httpx.Response]:
    """A task's SSE stream, open (its headers received: its place is taken) until the block ends."""
    async with client.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        yield response


def assert_too_many(response: httpx.Response, cap: int) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_streams"
    assert f"limit of {cap} open event streams per customer" in error["message"]
    assert f"({cap} open" in error["message"]
    assert error["details"] == {"limit": cap, "open": cap, "retry_after_s": 5}
    assert response.headers["Retry-After"] == "5"


def test_the_cap_is_a_setting_of_100_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARAVAN_MAX_STREAMS_PER_CUSTOMER", raising=False)
    assert Settings().max_streams_per_customer == 100
    monkeypatch.setenv("CARAVAN_MAX_STREAMS_PER_CUSTOMER", "2")
    assert Settings().max_streams_per_customer == 2


async def test_a_stream_past_the_cap_is_refused_429_and_another_customer_is_not_held_back(api: Api) -> None:
    mine, headers, task_id = await running_slow_task(api)
    theirs, their_headers, their_task = await running_slow_task(api)
    async with capped(api, 2) as gateway, contextlib.AsyncExitStack() as held:
        first = await held.enter_async_context(sse(gateway.client, task_id, headers))
        ws = await held.enter_async_context(websockets.connect(gateway.ws_url(task_id, headers)))
        assert json.loads(await ws.recv())["content"] == "queued"  # served: the WebSocket counts too
        assert gateway.streams.open_now(mine) == 2

        assert_too_many(await gateway.client.get(f"/v1/tasks/{task_id}/events", headers=headers), 2)
        await assert_ws_refused(gateway.ws_url(task_id, headers), 429, "too_many_streams")
        head = await gateway.client.head(f"/v1/tasks/{task_id}/events", headers=headers)
        assert head.status_code == 200  # a HEAD opens no stream, and is not counted

        async with sse(gateway.client, their_task, their_headers), sse(gateway.client, their_task, their_headers):
            assert gateway.streams.open_now(theirs) == 2
        admin = await api.admin()  # not counted: neither takes a place of the customer's nor is refused at the cap
        async with sse(gateway.client, task_id, admin):
            assert gateway.streams.open_now(mine) == 2

        await first.aclose()  # the client goes away
        await gateway.until_open(mine, 1)
        await held.enter_async_context(sse(gateway.client, task_id, headers))
        await ws.close()
        await gateway.until_open(mine, 1)
        async with websockets.connect(gateway.ws_url(task_id, headers)) as again:
            assert json.loads(await again.recv())["content"] == "queued"
    await gateway.until_open(mine, 0)
    await gateway.until_open(theirs, 0)


async def read_to_the_end(response: httpx.Response) -> list[str]:
    return [line async for line in response.aiter_lines() if line.startswith("id: ")]


async def test_a_stream_gives_its_place_back_when_its_task_ends_and_one_that_ends_at_once_takes_none(
    api: Api,
) -> None:
    customer_id, headers, first_task = await running_slow_task(api)
    agent_id = (await api.client.get(f"/v1/tasks/{first_task}", headers=headers)).json()["agent_id"]
    second_task = await start_task(api, headers, agent_id)
    async with capped(api, 1) as gateway:
        async with sse(gateway.client, first_task, headers) as stream:
            assert (await api.client.post(f"/v1/tasks/{first_task}/cancel", headers=headers)).status_code == 202
            last_id = (await read_to_the_end(stream))[-1].removeprefix("id: ")
        await gateway.until_open(customer_id, 0)

        async with websockets.connect(gateway.ws_url(second_task, headers)) as ws:
            assert json.loads(await ws.recv())["content"] == "queued"
            assert gateway.streams.open_now(customer_id) == 1
            resumed = {**headers, "Last-Event-ID": last_id}  # nothing after it: 204, though the cap is reached
            seen = await gateway.client.get(f"/v1/tasks/{first_task}/events", headers=resumed)
            assert seen.status_code == 204, seen.text
            async with websockets.connect(gateway.ws_url(first_task, headers, f"&after={last_id}")) as done:
                assert [frame async for frame in done] == [] and done.close_code == 1000
            assert_too_many(await gateway.client.get(f"/v1/tasks/{second_task}/events", headers=headers), 1)

            assert (await api.client.post(f"/v1/tasks/{second_task}/cancel", headers=headers)).status_code == 202
            frames = [json.loads(frame) async for frame in ws]
            assert frames[-1]["kind"] == "status" and frames[-1]["content"] == "cancelled"
            assert ws.close_code == 1000
        await gateway.until_open(customer_id, 0)


async def test_a_stream_that_fails_gives_its_place_back(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    customer_id, headers, task_id = await running_slow_task(api)
    events, breaking = api.control.tasks.events, asyncio.Event()

    async def failing(*args: Any, **kwargs: Any) -> AsyncIterator[StreamedEvent | None]:
        async for item in events(*args, **kwargs):
            yield item
            await breaking.wait()
            raise RuntimeError("the stream broke")

    monkeypatch.setattr(api.control.tasks, "events", failing)
    async with capped(api, 1) as gateway:
        with pytest.raises(httpx.RemoteProtocolError):  # the server ends the response it had started
            async with sse(gateway.client, task_id, headers) as stream:
                assert gateway.streams.open_now(customer_id) == 1
                breaking.set()
                await read_to_the_end(stream)
        await gateway.until_open(customer_id, 0)
        breaking.clear()
        async with websockets.connect(gateway.ws_url(task_id, headers)) as ws:
            assert json.loads(await ws.recv())["content"] == "queued"
            assert gateway.streams.open_now(customer_id) == 1
            breaking.set()
            with pytest.raises(websockets.ConnectionClosed):  # the server drops the connection
                await ws.recv()
        await gateway.until_open(customer_id, 0)
