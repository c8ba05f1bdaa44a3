"""CORS (``CARAVAN_CORS_ORIGINS``): the origins whose web pages may call the API from a browser, and the headers
that let such a page read an answer. Every answer carries them, the app's own errors and those written around it
too (a body's 408 in :mod:`gateway.http11`, the last-resort 500 in :mod:`gateway.errors`): without them the
browser hands the page a network error in place of the API's. A refused preflight is the API's error."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Send

from control.settings import Settings
from gateway.errors import error_response

__all__ = ["CORS_EXPOSED_HEADERS", "CORS_METHODS", "CORS_REQUEST_HEADERS", "Cors", "CorsPolicy"]

CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
"""What the routes are declared for, and HEAD, which every GET route answers (``gateway.app``)."""
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID")
"""What the routes read: the bearer token, the JSON body's type, and a task's event stream's resume point."""
CORS_EXPOSED_HEADERS = ("Retry-After", "X-Request-ID")
"""What a script needs to read that CORS hides by default: when to try again after a 429 or a 503, and the id a
500 is logged under."""


@dataclass(frozen=True)
class CorsPolicy:
    """The origins allowed, exactly as a browser sends them (``scheme://host[:port]``)."""

    origins: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings) -> CorsPolicy | None:
        """The policy the settings name; None when they name no origin (no CORS headers at all)."""
        return cls(settings.cors_origins) if settings.cors_origins else None

    def decorate(self, headers: MutableHeaders, request: Headers) -> None:
        """Add to an answer's ``headers`` what the request's ``Origin`` calls for: to an allowed one, its name and
        the headers the page may read; to any, ``Vary: Origin`` (a cache keeps one answer per origin). A request
        without an Origin (not from a browser's page elsewhere) gets nothing."""
        origin = request.get("origin")
        if origin is None:
            return
        headers.add_vary_header("Origin")
        if origin in self.origins:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = ", ".join(CORS_EXPOSED_HEADERS)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware for a :class:`CorsPolicy`: a preflight is answered before any route (and its
    authentication), and every answer is decorated by the policy. A preflight it refuses gets the API's error,
    400 ``cors_refused`` naming what was refused, and no ``Access-Control-Allow-*`` header."""

    def __init__(self, app: ASGIApp, policy: CorsPolicy) -> None:
        super().__init__(
            app,
            allow_origins=policy.origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            allow_credentials=False,  # bearer tokens, no cookies
            max_age=600,  # how long a browser keeps a preflight's answer
        )
        self.policy = policy

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            self.policy.decorate(MutableHeaders(scope=message), request_headers)
        await send(message)

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        refused = self._refused(request_headers)
        reasons = "; ".join(why for _, why in refused.values()) or "it asks for what this API does not allow"
        details = {what: asked for what, (asked, _) in refused.items()}
        headers = {"Vary": self.preflight_headers["Vary"]}  # the answer depends on what was asked
        return error_response(400, "cors_refused", f"CORS preflight refused: {reasons}", details, headers)

    def _refused(self, request: Headers) -> dict[str, tuple[object, str]]:
        """What of a preflight is not allowed (``origin``, ``method``, ``headers``, ``private_network``, which
        Starlette checks): what was asked for, and why it is refused."""
        refused: dict[str, tuple[object, str]] = {}
        origin = request["origin"]
        if not self.is_allowed_origin(origin):
            refused["origin"] = (origin, f"the origin {origin} is not allowed")
        method = request["access-control-request-method"]
        if method not in self.allow_methods:
            refused["method"] = (method, f"the method {method} is not allowed (allowed: {', '.join(CORS_METHODS)})")
        listed = request.get("access-control-request-headers", "")
        asked = [name.strip().lower() for name in listed.split(",") if name.strip()]
        if unknown := [name for name in asked if name not in self.allow_headers]:
            allowed = ", ".join(self.allow_headers)
            refused["headers"] = (unknown, f"these headers are not allowed: {', '.join(unknown)} (allowed: {allowed})")
        if "access-control-request-private-network" in request:
            refused["private_network"] = (True, "a request from a private network is not allowed")
        return refused
