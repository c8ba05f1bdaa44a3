"""Build the FastAPI app from settings: ``create_app(settings)``; nothing is created at import time."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, WebSocket
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control.ids import is_digits
from control.metrics import Metrics
from control.platform import ControlPlane
from control.settings import Settings
from gateway import apidocs, dashboard, logredact, wslog
from gateway.cors import Cors, CorsPolicy
from gateway.deps import HEAD_SCOPE_KEY, authenticate_first, known_query_only
from gateway.errors import error_response, install_error_handlers, refuse_websocket
from gateway.ratelimit import RateLimiter, Tiers
from gateway.routes import admin, agents, auth, health, tasks, teams, usage
from gateway.streams import OpenStreams

__all__ = ["MAX_BODY_BYTES", "create_app"]

MAX_BODY_BYTES = 2 * 2**20


def create_app(settings: Settings, control: ControlPlane | None = None) -> FastAPI:
    """The API. Without ``control`` the app starts and stops its own control plane with its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if control is not None:
            app.state.control = control
            yield
            return
        async with ControlPlane(settings) as owned:
            app.state.control = owned
            yield

    app = FastAPI(
        title="Caravan",
        version="0.1.0",
        summary="Run AutoGen agent teams on HashiCorp Nomad",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load a CDN's scripts: gateway.apidocs serves its own
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        redirect_slashes=False,  # Starlette's redirect names the Host header's host: gateway.errors answers instead
    )
    if control is not None:
        app.state.control = control
    app.state.limiter = RateLimiter(scale=settings.rate_limit_scale)
    app.state.tiers = Tiers()
    app.state.streams = OpenStreams(settings.max_streams_per_customer)
    cors = CorsPolicy.of(settings)
    install_error_handlers(app, authenticate_first, cors)
    logredact.install()  # a token in a URL (the WebSocket's ?token=) kept out of the server's log lines
    wslog.install()  # a WebSocket refused with an HTTP answer is not a server error
    app.add_middleware(_LimitedBody, limit=MAX_BODY_BYTES)
    app.add_middleware(_HeadAsGet)  # inside _Counted, which counts a HEAD as one
    if cors is not None:  # outside every answer but Starlette's last-resort 500 (which gateway.errors decorates),
        # inside _Counted: a preflight is answered here, before any route's authentication, and every error the app
        # answers carries the headers
        app.add_middleware(Cors, policy=cors)
    app.state.metrics = Metrics()
    app.add_middleware(_Counted, metrics=app.state.metrics)  # outermost but for Starlette's own error handler
    app.include_router(health.router)  # probes may add what they like
    for module in (auth, agents, teams, tasks, usage, admin):
        app.include_router(module.router, dependencies=[Depends(known_query_only)])
    app.include_router(dashboard.build_router())  # left out of the OpenAPI schema
    app.include_router(apidocs.build_router(app.title, app.openapi_url or "/openapi.json"))  # so is this

    @app.websocket("/{path:path}")  # last: any route above matches first
    async def no_websocket_here(websocket: WebSocket, path: str) -> None:
        """A WebSocket to a path that has none is refused as an HTTP request there is: 404 in the error shape
        (Starlette refused it with a bare 403, as though the caller lacked a right)."""
        message = "Not Found: the WebSocket route is a task's events, /v1/tasks/{task_id}/ws"
        await refuse_websocket(websocket, error_response(404, "not_found", message))

    return app


class _TooLarge(HTTPException):
    """Raised where a route reads a body past the limit: an HTTPException, which FastAPI passes on to its handler
    (:mod:`gateway.errors` answers 413 in the error shape) rather than calling it a body it could not parse."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class _LimitedBody:
    """Refuses a request body over ``limit`` bytes with 413 when a route reads it: at once when its Content-Length
    says so (nothing of it is read), else as soon as the bytes received pass it (a chunked body has no length),
    leaving the rest unread. Refused from the route, the request is counted under the route's template."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        declared_over = length is not None and (not is_digits(length) or int(length) > self._limit)
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            if declared_over:
                raise _TooLarge(self._limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._limit:
                    raise _TooLarge(self._limit)
            return message

        await self._app(scope, receive_counted, send)


class _HeadAsGet:
    """HEAD on every GET route (RFC 9110: a general-purpose server supports GET and HEAD; FastAPI routes only the
    methods they declare): the app answers it as the GET, and the response ends with its headers, which are the
    GET's. The server sends no body for a HEAD. A task's event stream is not opened for one (the route asks
    ``deps.answering_head``); any other body a route starts is dropped here, and once the response is complete
    the app hears that the client is gone."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self._app(scope, receive, send)
            return
        # a copy: the server frames its answer by the request's own method; marked, so that a route can leave out
        # a body that costs something to open (deps.answering_head)
        as_get = {**scope, "method": "GET", HEAD_SCOPE_KEY: True}
        ended = False

        async def send_head(message: Message) -> None:
            nonlocal ended
            if ended:
                return
            if message["type"] != "http.response.start":
                await send(message)
                return
            scope["route"] = as_get.get("route")  # the route that served it, which _Counted labels it with
            ended = True
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self._app(as_get, receive, send_head)


def _template(scope: Scope) -> Route | None:
    """The route of Starlette's own that served a request (``/openapi.json``): FastAPI's routes name themselves
    (``scope["route"]``), and a request nothing routes has none."""
    for route in getattr(getattr(scope.get("app"), "router", None), "routes", ()):
        if isinstance(route, Route) and route.matches(scope)[0] is Match.FULL:
            return route
    return None


class _Counted:
    """Counts every HTTP request in ``metrics`` when its response starts (a stream, such as SSE, counts when its
    headers go), by the route template that served it: plain ASGI, so a streamed body passes untouched."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            counted = True
            route = scope.get("route") or _template(scope)  # a template, never the raw path
            self._metrics.request(scope["method"], getattr(route, "path", None), status, time.perf_counter() - started)

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start" and not counted:
                count(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_counted)
        finally:
            if not counted:  # no response started: Starlette's error handler answers 500
                count(500)
