"""The local model's front: fair queueing, bounded waits, request repairs, streamed usage, clear errors.

The upstream here is a stand-in OpenAI-compatible server that records what it gets and can hold requests,
so these tests need no model and check exactly what reaches the server. It streams as the bundled server
with Caravan's chat format does: its usage in a last chunk, an error as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from autogen_core.models import UserMessage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent.models import create_model_client
from agent.protocol import ModelConfig
from control.localmodel import FairQueue, ModelProxy, QueueFull, QueueTimeout, repair_request
from tests.support.helpers import assert_eventually, now, serve_app

TEXT: list[dict[str, Any]] = [{"role": "assistant"}, {"content": "a"}, {"content": "b"}, {"content": "c"}]


@dataclass
class FakeServer:
    """An OpenAI-compatible stand-in: streams ``deltas`` (then ``usage``, unless None); ``gate`` holds answers;
    the answer to a prompt in ``slow`` is generated (its first chunk sent) until ``resume`` is set. ``ended`` says
    how each answer ended: finished, or closed by its client before."""

    base_url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    deltas: list[dict[str, Any]] = field(default_factory=lambda: list(TEXT))
    finish_reason: str = "stop"
    usage: dict[str, int] | None = field(
        default_factory=lambda: {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    )
    error: dict[str, Any] | None = None  # an error event instead of the answer
    refuse: tuple[int, dict[str, Any]] | None = None  # a status and body instead of any answer
    slow: set[str] = field(default_factory=set)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    generating: list[str] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gate.set()

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append(body)
        await self.gate.wait()
        if self.refuse is not None:
            return JSONResponse(self.refuse[1], status_code=self.refuse[0])
        assert body.get("stream") is True, body  # the proxy asks the model server for a stream, always
        return StreamingResponse(self._tokens(body["messages"][-1]["content"]), media_type="text/event-stream")

    async def _tokens(self, prompt: str) -> AsyncIterator[str]:
        base = {"id": "c2", "object": "chat.completion.chunk", "created": 1, "model": "fake"}
        finished = False
        try:
            if self.error is not None:
                yield f"data: {json.dumps(self.error)}\n\n"
            else:
                for n, delta in enumerate(self.deltas):
                    yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': delta}]})}\n\n"
                    if n == 0 and prompt in self.slow:
                        self.generating.append(prompt)
                        await self.resume.wait()
                yield ": ping\n\n"
                end = {"index": 0, "delta": {}, "finish_reason": self.finish_reason}
                yield f"data: {json.dumps({**base, 'choices': [end]})}\n\n"
                if self.usage is not None:
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': self.usage})}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            self.ended.append((prompt, "finished" if finished else "closed"))

    async def count(self, request: Request) -> Response:
        return JSONResponse({"count": 11})


@pytest.fixture
async def upstream() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", fake.chat, methods=["POST"]),
            Route("/extras/tokenize/count", fake.count, methods=["POST"]),
        ]
    )
    async with serve_app(app) as base:
        fake.base_url = base
        yield fake


@contextlib.asynccontextmanager
async def proxy_for(upstream: FakeServer, queue: FairQueue | None = None) -> AsyncIterator[ModelProxy]:
    async with ModelProxy(upstream, queue or FairQueue(), default_max_tokens=64) as proxy:
        yield proxy


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


# -- the queue ---------------------------------------------------------------------------------------------


async def test_waiting_requests_are_served_round_robin_across_clients() -> None:
    queue = FairQueue(slots=1)
    await queue.acquire("holder")
    served: list[str] = []

    async def request(client: str, label: str) -> None:
        async with queue.slot(client):
            served.append(label)

    tasks = []
    for client, label in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        tasks.append(asyncio.create_task(request(client, label)))
        await waiting(queue, len(tasks))
    assert queue.waiting_by_client() == {"a": 3, "b": 2, "c": 1}
    queue.release()
    await asyncio.gather(*tasks)
    assert served == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert queue.busy == 0 and queue.waiting == 0


async def test_a_wait_is_bounded_and_leaves_the_queue_clean() -> None:
    queue = FairQueue(slots=1, wait_timeout=0.1)
    await queue.acquire("holder")
    with pytest.raises(QueueTimeout, match="without getting a turn"):
        await queue.acquire("late")
    assert queue.waiting == 0 and queue.waiting_by_client() == {}
    queue.release()
    await queue.acquire("next")  # the slot is free again, nothing phantom holds it
    assert queue.busy == 1


async def test_a_full_queue_refuses_at_once_and_a_cancelled_waiter_is_forgotten() -> None:
    queue = FairQueue(slots=1, max_waiting=1)
    await queue.acquire("holder")
    waiter = asyncio.create_task(queue.acquire("a"))
    await waiting(queue, 1)
    with pytest.raises(QueueFull):
        await queue.acquire("b")
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert queue.waiting == 0
    queue.release()
    assert queue.busy == 0


async def test_a_full_queue_refuses_the_flooding_clients_newest_not_a_quiet_newcomer() -> None:
    queue = FairQueue(slots=1, max_waiting=3)
    await queue.acquire("holder")
    flood = [asyncio.create_task(queue.acquire("a")) for _ in range(3)]
    await waiting(queue, 3)
    quiet = asyncio.create_task(queue.acquire("b"))  # the bound is full, of a's requests only
    await assert_eventually(now(queue.waiting_by_client), lambda w: w == {"a": 2, "b": 1})
    with pytest.raises(QueueFull, match="gave its place"):
        await flood[2]  # a's newest gave its place; a's first two and b keep theirs
    with pytest.raises(QueueFull):
        await queue.acquire("a")  # a, holding the most, is refused at once
    with pytest.raises(QueueFull):
        await queue.acquire("b")  # as is b, which would hold as many as a then
    assert queue.waiting_by_client() == {"a": 2, "b": 1}
    queue.release()
    await flood[0]
    queue.release()
    await quiet  # b's turn comes before a's second
    assert not flood[1].done()
    queue.release()
    await flood[1]
    queue.release()
    assert queue.busy == 0 and queue.waiting == 0


async def waiting(queue: FairQueue, count: int) -> None:
    await assert_eventually(now(lambda: queue.waiting), lambda n: n == count, what=f"{count} waiting")


# -- the proxy -----------------------------------------------------------------------------------------------


def test_null_assistant_content_is_repaired_and_answers_are_capped() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "6*7?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
            {"role": "tool", "tool_call_id": "1", "content": "42"},
        ],
        "stream_options": {"include_usage": True},
    }
    repaired = repair_request(body, 512)
    calls = body["messages"][1]["tool_calls"]
    assert repaired["messages"][1] == {"role": "assistant", "content": "", "tool_calls": calls}
    assert repaired["messages"][0] is body["messages"][0] and repaired["messages"][2] is body["messages"][2]
    assert repaired["max_tokens"] == 512 and "stream_options" not in repaired
    assert repair_request({**body, "max_tokens": 7}, 512)["max_tokens"] == 7


async def test_requests_reach_the_server_repaired_one_at_a_time_in_turn(upstream: FakeServer) -> None:
    async with proxy_for(upstream) as proxy, httpx.AsyncClient(base_url=proxy.url) as client:
        upstream.gate.clear()
        history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": []}]
        first = asyncio.create_task(client.post("/chat/completions", json={"messages": history}))
        await assert_eventually(now(lambda: len(upstream.seen)), lambda n: n == 1)
        later = []
        for agent, text in [("ag-a", "a1"), ("ag-a", "a2"), ("ag-b", "b1")]:
            later.append(
                asyncio.create_task(
                    client.post("/chat/completions", json=chat(text), headers={"X-Caravan-Agent": agent})
                )
            )
            await waiting(proxy.queue, len(later))
        assert len(upstream.seen) == 1  # the server has one request at a time
        upstream.gate.set()
        responses = await asyncio.gather(first, *later)
    assert [r.status_code for r in responses] == [200] * 4
    assert upstream.seen[0]["messages"][1]["content"] == ""
    assert upstream.seen[0]["max_tokens"] == 64
    assert [s["messages"][0]["content"] for s in upstream.seen[1:]] == ["a1", "b1", "a2"]


async def test_a_request_that_waits_too_long_fails_clearly_for_the_agent(
    upstream: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_for(upstream, FairQueue(wait_timeout=0.2)) as proxy:
        upstream.gate.clear()
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            hog = asyncio.create_task(client.post("/chat/completions", json=chat()))
            await assert_eventually(now(lambda: len(upstream.seen)), lambda n: n == 1)
            raw = await client.post("/chat/completions", json=chat(), headers={"X-Caravan-Agent": "ag-x"})
            assert raw.status_code == 503 and raw.headers["x-should-retry"] == "false"
            assert raw.json()["error"]["code"] == "local_model_busy"
            assert "busy" in raw.json()["error"]["message"]

            monkeypatch.setenv("CARAVAN_LOCAL_MODEL_URL", proxy.url)
            model = create_model_client(ModelConfig(provider="local"))
            with pytest.raises(openai.InternalServerError, match="local model is busy"):
                await model.create([UserMessage(content="hi", source="user")])
            assert len(upstream.seen) == 1  # refused, not retried behind the proxy's back
            upstream.gate.set()
            assert (await hog).status_code == 200


async def test_an_agent_flooding_the_queue_cannot_keep_a_quiet_agent_out(upstream: FakeServer) -> None:
    async with proxy_for(upstream, FairQueue(max_waiting=2)) as proxy:
        await proxy.queue.acquire("holder")
        async with httpx.AsyncClient(base_url=proxy.url) as client:

            def post(agent: str) -> asyncio.Task[httpx.Response]:
                headers = {"X-Caravan-Agent": agent}
                return asyncio.create_task(client.post("/chat/completions", json=chat(agent), headers=headers))

            flood = []
            for n in (1, 2):  # one after the other: the second is the newest
                flood.append(post("ag-flood"))
                await waiting(proxy.queue, n)
            quiet = post("ag-quiet")
            done, _ = await asyncio.wait({flood[1], quiet}, return_when=asyncio.FIRST_COMPLETED)
            assert done == {flood[1]}, "the quiet agent was refused, not the flooding one"
            refused = flood[1].result()
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "local_model_busy"
            assert refused.json()["error"]["details"] == {"agent": "ag-flood"}
            assert proxy.queue.waiting_by_client() == {"ag-flood": 1, "ag-quiet": 1}
            proxy.queue.release()
            assert [(await r).status_code for r in (flood[0], quiet)] == [200, 200]
    assert [s["messages"][0]["content"] for s in upstream.seen] == ["ag-flood", "ag-quiet"]


async def test_a_stream_passes_through_with_the_servers_usage_if_asked(upstream: FakeServer) -> None:
    async with proxy_for(upstream) as proxy, httpx.AsyncClient(base_url=proxy.url) as client:

        async def events(body: dict[str, Any]) -> list[str]:
            async with client.stream("POST", "/chat/completions", json=body) as response:
                assert response.status_code == 200
                return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]

        streamed = await events(chat(stream=True, stream_options={"include_usage": True}))
        assert streamed[-1] == "[DONE]"
        chunks = [json.loads(e) for e in streamed[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "abc"
        assert [c["usage"] for c in chunks if "usage" in c] == [upstream.usage]  # once, the server's
        assert "stream_options" not in upstream.seen[-1]
        assert proxy.queue.busy == 0

        plain = await events(chat(stream=True))  # not asked for: the server's usage chunk is left out
        assert not any("usage" in json.loads(e) for e in plain[:-1]) and plain[-1] == "[DONE]"

        upstream.usage = None  # a server that counts nothing in a stream: the proxy counts
        counted = await events(chat(stream=True, stream_options={"include_usage": True}))
        usage = json.loads(counted[-2])["usage"]
        assert usage == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


async def test_an_answer_not_streamed_is_the_servers_stream_put_together(
    upstream: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_for(upstream) as proxy, httpx.AsyncClient(base_url=proxy.url) as client:
        monkeypatch.setenv("CARAVAN_LOCAL_MODEL_URL", proxy.url)
        model = create_model_client(ModelConfig(provider="local"))
        result = await model.create([UserMessage(content="hi", source="user")])
        assert result.content == "abc" and result.finish_reason == "stop"
        assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 4)  # the server's count
        assert upstream.seen[-1]["stream"] is True

        upstream.finish_reason = "tool_calls"
        upstream.deltas = [
            {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                  "function": {"name": "add", "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]},
            {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                             "function": {"name": "neg", "arguments": "{}"}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": "2}"}}]},
        ]  # fmt: skip
        answer = (await client.post("/chat/completions", json=chat())).json()
        assert answer == {
            "id": "c2",
            "object": "chat.completion",
            "created": 1,
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}},
                            {"id": "call_2", "type": "function", "function": {"name": "neg", "arguments": "{}"}},
                        ],
                    },
                    "logprobs": None,
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": upstream.usage,
        }
        calls = await model.create([UserMessage(content="add", source="user")])
        assert [(c.name, c.arguments) for c in calls.content] == [("add", '{"a": 2}'), ("neg", "{}")]  # type: ignore[union-attr]

        upstream.usage = None  # a server that counts nothing in a stream: the proxy counts, as for a stream
        assert (await client.post("/chat/completions", json=chat())).json()["usage"]["prompt_tokens"] == 11
        assert proxy.queue.busy == 0


async def test_a_client_that_leaves_stops_the_answer_it_did_not_stream_and_frees_the_model(
    upstream: FakeServer,
) -> None:
    """A cancelled task's model call: the server stops only an answer it streams (the proxy asks for every answer
    streamed), and the next agent's request is served, not queued until the abandoned answer has run its course."""
    upstream.slow.add("long story")
    async with proxy_for(upstream) as proxy, httpx.AsyncClient(base_url=proxy.url) as client:
        try:
            abandoned = asyncio.create_task(
                client.post("/chat/completions", json=chat("long story"), headers={"X-Caravan-Agent": "ag-a"})
            )
            await assert_eventually(now(lambda: upstream.generating), lambda g: g == ["long story"])
            quick = asyncio.create_task(
                client.post("/chat/completions", json=chat("quick"), headers={"X-Caravan-Agent": "ag-b"})
            )
            await waiting(proxy.queue, 1)
            abandoned.cancel()  # as the OpenAI client does when its task is cancelled: it closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await abandoned
            await assert_eventually(
                now(lambda: upstream.ended),
                lambda e: ("long story", "closed") in e,
                what="the abandoned answer stopped",
            )
            served = await quick
            assert served.status_code == 200 and served.json()["choices"][0]["message"]["content"] == "abc"
            assert upstream.ended == [("long story", "closed"), ("quick", "finished")]  # never resumed: never finished
            assert proxy.queue.busy == 0 and proxy.queue.waiting == 0
        finally:
            upstream.resume.set()


async def test_the_servers_errors_are_passed_on_not_to_be_retried(
    upstream: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers a request it cannot serve the same way each time (a ``tool_choice`` naming a tool not
    offered: 500): the OpenAI client must not send it twice more. A server that cannot be reached may be back."""
    async with proxy_for(upstream) as proxy, httpx.AsyncClient(base_url=proxy.url) as client:
        monkeypatch.setenv("CARAVAN_LOCAL_MODEL_URL", proxy.url)
        model = create_model_client(ModelConfig(provider="local"))
        refusal = {"error": {"message": "tool_choice names 'x', which is not among the tools", "type": "server"}}
        upstream.refuse = (500, refusal)
        with pytest.raises(openai.InternalServerError, match="which is not among the tools"):
            await model.create([UserMessage(content="hi", source="user")])
        assert len(upstream.seen) == 1
        upstream.refuse = None

        upstream.error = {**refusal, "status": 500}  # the same error, as Caravan's chat format streams it
        raw = await client.post("/chat/completions", json=chat())
        assert (raw.status_code, raw.headers["x-should-retry"], raw.json()) == (500, "false", refusal)
        with pytest.raises(openai.InternalServerError, match="which is not among the tools"):
            await model.create([UserMessage(content="hi", source="user")])
        assert len(upstream.seen) == 3
        too_long = {"error": {"message": "This model's maximum context length is 4096 tokens.", "type": "invalid"}}
        upstream.error = {**too_long, "status": 400}
        raw = await client.post("/chat/completions", json=chat())
        assert (raw.status_code, raw.headers["x-should-retry"], raw.json()) == (400, "false", too_long)
        assert proxy.queue.busy == 0

        upstream.base_url = "http://127.0.0.1:9"  # nothing listens there: restarting, perhaps
        down = await client.post("/chat/completions", json=chat())
        assert (down.status_code, down.headers["x-should-retry"]) == (502, "true")


async def test_the_agent_model_client_streams_through_the_proxy_with_usage(
    upstream: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_for(upstream) as proxy:
        monkeypatch.setenv("CARAVAN_LOCAL_MODEL_URL", proxy.url)
        monkeypatch.setenv("CARAVAN_AGENT_ID", "ag-0123456789ab")
        model = create_model_client(ModelConfig(provider="local", stream=True))
        items = [item async for item in model.create_stream([UserMessage(content="hi", source="user")])]
    assert items[:-1] == ["a", "b", "c"]
    assert items[-1].content == "abc" and items[-1].usage.completion_tokens == 4  # the server's count
    assert upstream.seen[-1]["model"] == "SmolLM2-135M-Instruct"


async def test_bad_requests_get_clear_4xx_and_a_dead_server_a_502(upstream: FakeServer) -> None:
    async with proxy_for(upstream) as proxy, httpx.AsyncClient(base_url=proxy.url) as client:
        cases = [
            (b"{not json", 400, "invalid_json"),
            (b"[1, 2]", 400, "invalid_request"),
            (b'{"messages": []}', 400, "invalid_request"),
            (b'{"messages": ["hi"]}', 400, "invalid_request"),
            (b'{"messages": [{"role": "user", "content": "x"}], "stream_options": 3}', 400, "invalid_request"),
            (b"x" * (5 * 2**20), 413, "too_large"),
        ]
        for raw, status, code in cases:
            response = await client.post("/chat/completions", content=raw)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), raw[:40]
        missing = await client.get("/nowhere")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert (await client.get("/chat/completions")).status_code == 405
        assert upstream.seen == [] and proxy.queue.busy == 0

        upstream.base_url = "http://127.0.0.1:9"  # nothing listens there
        down = await client.post("/chat/completions", json=chat())
        assert down.status_code == 502 and down.json()["error"]["code"] == "local_model_unavailable"
        assert proxy.queue.busy == 0


async def test_a_client_that_gives_up_while_waiting_leaves_the_queue(upstream: FakeServer) -> None:
    async with proxy_for(upstream) as proxy:
        await proxy.queue.acquire("holder")
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            waiting_request = asyncio.create_task(client.post("/chat/completions", json=chat()))
            await waiting(proxy.queue, 1)
            waiting_request.cancel()  # as the OpenAI client does when its task is cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await waiting_request
        await waiting(proxy.queue, 0)
        proxy.queue.release()
        assert proxy.queue.busy == 0 and upstream.seen == []
