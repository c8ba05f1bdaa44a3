"""Every error leaves the API as ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import email.message
import logging
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control.errors import CaravanError, StoreUnavailable, invalid_input
from control.natsio import NATS_UNAVAILABLE
from control.services.auth import redact_json, redact_keys, shown_prefix
from gateway.jsonbody import DuplicateKey, NotUtf8, NumberTooLong
from gateway.wslog import denial_sent

if TYPE_CHECKING:
    from gateway.cors import CorsPolicy

__all__ = ["caravan_error_response", "error_response", "install_error_handlers", "refuse_websocket", "shown_path"]

log = logging.getLogger("caravan.gateway")
_KEY_ROUTE = "/v1/admin/keys/"

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
}


def shown_path(path: str) -> str:
    """A request's path as it may be logged or audited: any API key pasted into it cut to its prefix; on the key
    route, what :func:`shown_prefix` shows of the key's prefix (a whole key, even one chosen outside, may be given in
    its place)."""
    if path.startswith(_KEY_ROUTE):
        path = _KEY_ROUTE + shown_prefix(path[len(_KEY_ROUTE) :])
    return redact_keys(path)


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error body. An error may repeat what the request said (an id not found, a value refused): an API key
    pasted there (a path, a query, a field) is answered by its prefix only, as it is logged and audited."""
    body = {"error": {"code": code, "message": redact_keys(message), "details": redact_json(details)}}
    return JSONResponse(body, status_code=status, headers=headers)


def caravan_error_response(exc: CaravanError) -> JSONResponse:
    """The answer to a refusal of Caravan's own (a 401 says how to authenticate)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else getattr(exc, "headers", None)
    return error_response(exc.status, exc.code, exc.message, exc.details, headers)


async def refuse_websocket(websocket: WebSocket, response: JSONResponse) -> None:
    """Refuse a WebSocket handshake with ``response``, as an HTTP route would answer (401, 404, 422, 429 with
    the error body), where the server can send one (the ASGI denial-response extension: uvicorn); elsewhere it
    is closed before it opens, with code 4000 + the status."""
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # the server has no denial responses
        await websocket.close(code=4000 + response.status_code)
    else:
        denial_sent()  # (which uvicorn reports at ERROR as a handshake never completed)


def _invalid(
    exc: RequestValidationError | WebSocketRequestValidationError, request: Request | None = None
) -> JSONResponse:
    """A request FastAPI could not validate, refused as the control plane refuses input (``loc`` starts with where
    in the request: the body, the query...; the field's path follows). A field the body's object does not take (a
    typo, or a field of another request) is said with the fields it does take."""
    errors = [_with_fields(e, request) for e in exc.errors()] if request is not None else exc.errors()
    return caravan_error_response(invalid_input([_located(e) for e in errors]))


def _with_fields(error: dict[str, Any], request: Request) -> dict[str, Any]:
    loc = tuple(error.get("loc", ()))
    if error.get("type") != "extra_forbidden" or loc[:1] != ("body",):
        return error
    body = getattr(request.scope.get("route"), "body_field", None)
    model: Any = body.field_info.annotation if body is not None else None
    for part in loc[1:-1]:  # (the last is the field refused)
        model = _inside(model, part)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return error
    fields = ", ".join(sorted(field.alias or name for name, field in model.model_fields.items()))
    return {**error, "msg": f"unknown field (this object takes {fields})"}


def _inside(annotation: Any, part: str | int) -> Any:
    """What a model's field or a list's item holds, where that is one type (``X | None`` is X); else None."""
    if isinstance(part, str) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(part)
        return _one(field.annotation) if field is not None else None
    origin = typing.get_origin(annotation)
    if isinstance(part, int) and isinstance(origin, type) and issubclass(origin, Sequence):
        items = typing.get_args(annotation)
        return _one(items[0]) if items else None
    return None


def _one(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [each for each in typing.get_args(annotation) if each is not type(None)]
        return _one(kinds[0]) if len(kinds) == 1 else None
    return annotation


def _not_json(request: Request, exc: RequestValidationError) -> JSONResponse | None:
    """415 for a body FastAPI did not read as JSON because its content type says it is something else (``curl -d``
    sends ``application/x-www-form-urlencoded`` unless told otherwise) or is missing, rather than a 422 saying the
    body is no object; None when that is not why it was refused."""
    content_type = request.headers.get("content-type")
    if content_type is not None and _is_json(content_type):
        return None
    if not any(tuple(error.get("loc", ()))[:1] == ("body",) for error in exc.errors()):
        return None
    if content_type is None:  # a JSON body posted as bytes (Python's requests with data=) was "no object"
        sent = "this request has none"
    else:
        shown = content_type if len(content_type) <= 100 else f"{content_type[:100]}..."
        sent = f"this request's is {shown!r}"
    message = f"the body must be JSON, sent with content-type: application/json ({sent})"
    return error_response(415, _CODES[415], message)


def _is_json(content_type: str) -> bool:
    """What FastAPI reads as JSON: ``application/json`` or ``application/<anything>+json``, with parameters."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _unreadable(exc: HTTPException) -> JSONResponse | None:
    """The answer to a JSON body FastAPI could not parse for a reason other than its syntax (its 400 "There was an
    error parsing the body", raised from what ``json.loads`` or :class:`gateway.jsonbody.StrictJsonRequest`
    raised): 422 for bytes that are no UTF-8, arrays or objects nested deeper than the parser goes, an object
    naming a key twice, or an integer of more digits than Python reads; 415 for a charset other than UTF-8
    (declared, or UTF-16/32 by its bytes). None for any other error."""
    cause = exc.__cause__
    if exc.status_code != 400:
        return None
    if isinstance(cause, NotUtf8):
        shown = cause.charset if len(cause.charset) <= 100 else f"{cause.charset[:100]}..."
        this = f"this request's declares charset {shown!r}" if cause.declared else f"this request's body is {shown}"
        message = (
            "the body must be UTF-8 JSON, sent with content-type: application/json and no charset or charset=utf-8"
            f" ({this})"
        )
        return error_response(415, _CODES[415], message)
    if isinstance(cause, UnicodeDecodeError):
        why = f"not UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    elif isinstance(cause, RecursionError):
        why = "JSON nested too deeply"
    elif isinstance(cause, DuplicateKey | NumberTooLong):
        why = str(cause)
    else:
        return None
    return caravan_error_response(invalid_input([{"loc": ("body",), "msg": why, "type": "json_invalid"}]))


def _located(error: dict[str, Any]) -> dict[str, Any]:
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":  # its loc is ("body", <the character's offset>): not a field
        position = f" at character {loc[1]}" if len(loc) > 1 else ""
        return {**error, "loc": ("body",), "msg": f"{error.get('msg', 'JSON decode error')}{position}"}
    return {**error, "loc": loc[1:]}


def install_error_handlers(
    app: FastAPI,
    authenticate: Callable[[Request], Awaitable[None]] | None = None,
    cors: CorsPolicy | None = None,
) -> None:
    """Caravan's answers to errors. ``authenticate`` asks who the caller of a request is before its body is
    refused as no JSON (FastAPI reads the body before a route's dependencies). ``cors`` decorates the last-resort
    500, which Starlette sends around every middleware (the CORS middleware decorates the rest)."""
    app.add_middleware(_Unexpected)

    async def _last_resort(request: Request, exc: Exception) -> Response:
        """An error raised outside :class:`_Unexpected` (in a middleware around it): the same 500, which Starlette
        sends if no response has started, then raises the error on to the server, which logs its traceback."""
        response = _internal(request.scope, exc, traceback=False)
        if cors is not None:
            cors.decorate(response.headers, request.headers)
        return response

    app.add_exception_handler(Exception, _last_resort)

    @app.exception_handler(CaravanError)
    async def _caravan(_: Request, exc: CaravanError) -> JSONResponse:
        return caravan_error_response(exc)

    async def caller_first(request: Request, refusal: JSONResponse) -> JSONResponse:
        """``refusal`` of a body FastAPI could not read, which it reads before a route's dependencies run: the
        caller's own refusal (401, 403, 429) if the route would refuse it, as for any other body."""
        if authenticate is not None:
            try:
                await authenticate(request)
            except CaravanError as refused:
                return caravan_error_response(refused)
        return refusal

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(error.get("type") == "json_invalid" for error in exc.errors()):
            return await caller_first(request, _invalid(exc))
        return _not_json(request, exc) or _invalid(exc, request)

    @app.exception_handler(WebSocketRequestValidationError)
    async def _invalid_websocket(websocket: WebSocket, exc: WebSocketRequestValidationError) -> None:
        await refuse_websocket(websocket, _invalid(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if (unreadable := _unreadable(exc)) is not None:
            return await caller_first(request, unreadable)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 404 and (served := _without_slash(request)) is not None:
            if request.method in ("GET", "HEAD") and not served.startswith("/v1/"):  # a page typed with a slash
                query = request.url.query
                return RedirectResponse(served + (f"?{query}" if query else ""), status_code=307)
            message = f"no such path: {request.url.path} (without the trailing slash: {served})"
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed(request))
        return error_response(exc.status_code, _CODES.get(exc.status_code, "error"), message, None, headers or None)


def _without_slash(request: Request) -> str | None:
    """The path of ``request`` without its trailing slashes if a route serves that (any method), else None."""
    path = request.url.path
    served = path.rstrip("/")
    if not served or served == path:
        return None
    scope = {**request.scope, "path": served}  # (a route for another method matches PARTIAL)
    return served if any(r.matches(scope)[0] is not Match.NONE for r in request.app.router.routes) else None


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
"""The methods Caravan's routes are declared for (HEAD is served for every GET: ``gateway.app``)."""


def _allowed(request: Request) -> list[str]:
    """Every method the path of ``request`` is served for: Starlette's 405 names only those of the first route that
    matched the path (``/v1/agents`` said ``POST``, where GET and HEAD are served too). A GET route answers HEAD."""
    routes = request.app.router.routes
    methods = {
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    }
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class _Unexpected:
    """Answers an error no handler knows with 500 in the error shape: a generic message and a request id, which the
    traceback logged beside it carries too (what failed inside stays in the log). Once a response has started
    (a stream), the error goes on to the server, which ends the response."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, send_tracked)
        except NATS_UNAVAILABLE as exc:
            if started:
                raise
            log.warning("NATS did not answer %s %s: %r", scope["method"], shown_path(scope["path"]), exc)
            await caravan_error_response(StoreUnavailable())(scope, receive, send)
        except Exception as exc:
            if started:
                raise
            await _internal(scope, exc, traceback=True)(scope, receive, send)


def _internal(scope: Scope, exc: Exception, traceback: bool) -> JSONResponse:
    """500 in the error shape for an error no handler knows: a generic message and a request id, which the line
    logged for it carries too, with the error's traceback (unless ``traceback`` is false: the server logs it)."""
    request_id = uuid.uuid4().hex[:16]
    method, path = scope["method"], shown_path(scope["path"])
    log.error("unexpected error answering %s %s (request %s)", method, path, request_id, exc_info=traceback and exc)
    message = f"internal error: the operator can find it in the log by request id {request_id}"
    return error_response(500, "internal", message, {"request_id": request_id}, {"X-Request-ID": request_id})
