"""The loopback front of the local model: fair queueing across agents, bounded waits, request repairs.

The local model server answers one request at a time. Agents reach it only through this proxy, which
admits their requests round robin per agent (the ``X-Caravan-Agent`` header), fails a request that waited
too long with a clear 503 (``x-should-retry: false``, so OpenAI clients surface it instead of retrying),
repairs what the server refuses (see :func:`repair_request`) and adds token usage to streamed answers.

It asks the server for every answer streamed: the server stops a streamed answer when its connection closes,
and cannot stop one it does not stream, so a client that leaves (a cancelled task) would hold the one slot
until its answer had run to its end. A client that asked for no stream gets the answer the chunks add up to
(:class:`~control.localmodel.completion.Completion`), with the usage the server ends its stream with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from control.ids import is_digits
from control.localmodel.chatformat import render_prompt
from control.localmodel.completion import Completion
from control.localmodel.fairqueue import FairQueue, QueueFull, QueueTimeout

__all__ = ["ModelProxy", "Upstream", "repair_request"]

log = logging.getLogger("caravan.localmodel.proxy")
AGENT_HEADER = "x-caravan-agent"
T = TypeVar("T")


class Upstream(Protocol):
    """The OpenAI-compatible server behind the proxy."""

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the server (no ``/v1``); may change when the server is restarted."""
        ...


def _error(status: int, code: str, message: str, retry: bool = True, **details: Any) -> JSONResponse:
    body = {"error": {"code": code, "type": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers={"x-should-retry": "true" if retry else "false"})


def _refused(status: int, content: bytes) -> Response:
    """An error the server answered, as it answered it. Not to be tried again: the server is up and gives the
    same request the same error (a ``tool_choice`` naming a tool not offered, a prompt over the context)."""
    if status >= 500:
        log.warning("local model server answered %s: %s", status, content[:500].decode("utf-8", "replace"))
    return Response(content, status, media_type="application/json", headers={"x-should-retry": "false"})


def repair_request(body: dict[str, Any], default_max_tokens: int | None) -> dict[str, Any]:
    """The request as the local server takes it.

    - an assistant message with ``"content": null`` (tool calls only), as OpenAI clients send it, fails the
      server's validation with a 500: it gets ``""``;
    - ``stream_options`` is the proxy's to honour (the server takes none; see :mod:`.chatformat` for its usage);
    - an answer without ``max_tokens`` is capped at ``default_max_tokens``: a small model may not stop.
    """
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out["messages"] = [
        {**m, "content": ""} if m.get("role") == "assistant" and m.get("content") is None else m
        for m in body["messages"]
    ]
    if default_max_tokens and not body.get("max_tokens") and not body.get("max_completion_tokens"):
        out["max_tokens"] = default_max_tokens
    return out


class ModelProxy:
    """``async with ModelProxy(upstream, FairQueue()) as proxy: proxy.url`` — an OpenAI ``base_url``."""

    def __init__(
        self,
        upstream: Upstream,
        queue: FairQueue,
        host: str = "127.0.0.1",
        port: int = 0,
        default_max_tokens: int | None = 512,
        max_body_bytes: int = 4 * 2**20,
        request_timeout: float = 600.0,
    ) -> None:
        self.upstream = upstream
        self.queue = queue
        self.host = host
        self.port = port
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self._http: httpx.AsyncClient | None = None
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._started = False

    async def __aenter__(self) -> ModelProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL agents are given (``.../v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
        ]
        app = Starlette(routes=routes)
        app.add_exception_handler(404, self._not_found)
        app.add_exception_handler(405, self._not_allowed)
        return app

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("model proxy already started")
        self._started = True
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout, connect=5.0))
        config = uvicorn.Config(self.app(), host=self.host, port=self.port, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._server = server
        self._serving = asyncio.create_task(server.serve(), name="local-model-proxy")
        while not server.started:
            if self._serving.done():
                self._serving.result()
                raise RuntimeError("the local model proxy stopped before it started")
            await asyncio.sleep(0.01)
        self.port = int(server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._serving is not None:
            await self._serving
        if self._http is not None:
            await self._http.aclose()

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(404, "not_found", f"no such endpoint: {request.method} {request.url.path}", retry=False)

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error(405, "method_not_allowed", f"{request.method} is not allowed here", retry=False)

    async def _health(self, request: Request) -> Response:
        return JSONResponse(
            {"busy": self.queue.busy, "waiting": self.queue.waiting, "by_agent": self.queue.waiting_by_client()}
        )

    async def _models(self, request: Request) -> Response:
        assert self._http is not None
        try:
            response = await self._http.get(f"{self.upstream.base_url}/v1/models")
        except httpx.HTTPError as exc:
            return _unavailable(exc)
        return Response(response.content, response.status_code, media_type="application/json")

    async def _chat(self, request: Request) -> Response:
        body = await self._read_json(request)
        if isinstance(body, Response):
            return body
        client = request.headers.get(AGENT_HEADER) or (request.client.host if request.client else "unknown")
        try:
            if not await self._turn(request, client):
                return Response(status_code=499)  # the client went away while it waited: it takes no turn
        except (QueueTimeout, QueueFull) as exc:
            log.warning("local model request from %s refused: %s", client, exc)
            return _error(503, "local_model_busy", f"the local model is busy: {exc}", retry=False, agent=client)
        release = True
        try:
            want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            repaired = repair_request(body, self.default_max_tokens)
            if body.get("stream"):
                response = await self._stream(repaired, want_usage)
                release = not isinstance(response, _Relay)  # the stream releases when it ends
                return response
            try:
                return await _while_there(request, self._whole(repaired))
            except _Gone:  # its answer's stream closed: the server stops generating it, the next request's turn
                log.info("local model request from %s abandoned by its client: its answer stopped", client)
                return Response(status_code=499)
        finally:
            if release:
                self.queue.release()

    async def _turn(self, request: Request, client: str) -> bool:
        """Wait in the queue for a turn; False if the client disconnects first (a cancelled task)."""
        if self.queue.try_acquire():  # the model is free: no waiting, so nothing to watch (two tasks less)
            return True
        try:
            await _while_there(request, self.queue.acquire(client))
        except _Gone:
            return False
        return True

    async def _read_json(self, request: Request) -> dict[str, Any] | Response:
        declared = request.headers.get("content-length")
        if declared and is_digits(declared) and int(declared) > self.max_body_bytes:
            return _error(413, "too_large", f"request body over {self.max_body_bytes} bytes", retry=False)
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            return _error(413, "too_large", f"request body over {self.max_body_bytes} bytes", retry=False)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return _error(400, "invalid_json", f"request body is not JSON: {exc}", retry=False)
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "request body must be a JSON object", retry=False)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "invalid_request", "`messages` must be a non-empty list of objects", retry=False)
        if not isinstance(body.get("stream_options") or {}, dict):
            return _error(400, "invalid_request", "`stream_options` must be an object", retry=False)
        return body

    async def _open(self, body: dict[str, Any]) -> httpx.Response | Response:
        """The server's answer as a stream; or, if it has none, what the client gets instead."""
        assert self._http is not None
        url = f"{self.upstream.base_url}/v1/chat/completions"
        request = self._http.build_request("POST", url, json={**body, "stream": True})
        try:
            upstream = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            return _unavailable(exc)
        if upstream.status_code == 200:
            return upstream
        try:
            return _refused(upstream.status_code, await upstream.aread())
        except httpx.HTTPError as exc:
            return _unavailable(exc)
        finally:
            await upstream.aclose()

    async def _whole(self, body: dict[str, Any]) -> Response:
        """The answer not streamed, made of the server's stream (closed if this is cancelled)."""
        upstream = await self._open(body)
        if isinstance(upstream, Response):
            return upstream
        answer = Completion()
        try:
            async for line in upstream.aiter_lines():
                payload = _payload(line)
                if payload == "[DONE]":
                    break
                if payload is not None:
                    chunk = json.loads(payload)
                    if not isinstance(chunk, dict):
                        raise ValueError(f"not a chunk: {payload[:200]}")
                    if "error" in chunk:
                        return _failed(chunk)
                    answer.add(chunk)
        except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
            return _unavailable(exc, "the answer broke off")
        finally:
            await upstream.aclose()
        if not answer.finished:
            return _unavailable("it ended before its finish", "the answer broke off")
        return JSONResponse(answer.result(answer.usage or await self._usage(body, answer.pieces)))

    async def _stream(self, body: dict[str, Any], want_usage: bool) -> Response:
        upstream = await self._open(body)
        if isinstance(upstream, Response):
            return upstream
        closed = False

        async def close() -> None:  # once, whether the stream ran to its end, broke off or never started
            nonlocal closed
            if not closed:
                closed = True
                await upstream.aclose()
                self.queue.release()

        return _Relay(self._relay(upstream, body, want_usage, close), close)

    async def _relay(
        self, upstream: httpx.Response, body: dict[str, Any], want_usage: bool, close: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[str]:
        """Pass the server's events through as they come, its usage chunk only if asked for (counted here if the
        server sends none)."""
        answer = Completion()
        try:
            async for line in upstream.aiter_lines():
                payload = _payload(line)
                if payload is None:
                    continue
                if payload == "[DONE]":
                    if want_usage and answer.usage is None:
                        usage = await self._usage(body, answer.pieces)
                        chunk = {**answer.result(usage), "object": "chat.completion.chunk", "choices": []}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                    continue
                usage_chunk = False
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    chunk = json.loads(payload)
                    answer.add(chunk)
                    usage_chunk = chunk.get("usage") is not None and not chunk.get("choices")
                if usage_chunk and not want_usage:
                    continue
                yield f"data: {payload}\n\n"
        except httpx.HTTPError as exc:
            log.warning("local model stream broke off: %s", exc)
            error = {"error": {"code": "local_model_unavailable", "message": f"the stream broke off: {exc}"}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            await close()

    async def _usage(self, body: dict[str, Any], tokens: int) -> dict[str, int]:
        """Usage counted here, for a server whose stream ends without it (Caravan's chat format counts it): the
        prompt's tokens as the server counts the prompt's text, and a token a chunk."""
        assert self._http is not None
        prompt = 0
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            prompt_text = render_prompt(body["messages"], body.get("tools") or [])
            url = f"{self.upstream.base_url}/extras/tokenize/count"
            counted = await self._http.post(url, json={"input": prompt_text})
            prompt = int(counted.json()["count"])
        return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}


class _Relay(StreamingResponse):
    """A server-sent event stream that always runs ``close`` when the response is over, even unstarted."""

    def __init__(self, content: AsyncIterator[str], close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


class _Gone(Exception):
    """The client disconnected."""


async def _while_there(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client disconnects first: ``work`` is then cancelled and :class:`_Gone` raised."""
    done = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await done
    if done.cancelled():
        raise _Gone
    return done.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the request body is already read, so only a disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _payload(line: str) -> str | None:
    """The data of one line of a server-sent event stream; None for blank separators and keep-alive comments."""
    return line[5:].strip() if line.startswith("data:") else None


def _failed(event: dict[str, Any]) -> Response:
    """The error the server ended its stream with, answered as it answers the request not streamed."""
    status = event.get("status")
    status = status if isinstance(status, int) and 400 <= status < 600 else 500
    return _refused(status, json.dumps({"error": event["error"]}).encode())


def _unavailable(exc: Exception | str, what: str = "the local model server did not answer") -> JSONResponse:
    """The server cannot be reached, or its answer broke off (it died): worth trying again once it is restarted."""
    return _error(502, "local_model_unavailable", f"{what}: {exc}")
