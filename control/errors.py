"""Errors the control plane raises for the API to turn into ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "CaravanError",
    "Conflict",
    "Forbidden",
    "Invalid",
    "NotFound",
    "StoreUnavailable",
    "Unauthorized",
    "Unavailable",
    "invalid_input",
]


class CaravanError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Invalid(CaravanError):
    status = 422
    code = "invalid"


def invalid_input(errors: Iterable[Mapping[str, Any]]) -> Invalid:
    """Input that did not validate (pydantic's ``errors()``, each ``loc`` a path in the input as the client sent it),
    refused as every 422 reads: where and why, per field (only that: echoing the input back could return megabytes
    or secrets), and a summary of the first few."""
    details = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ())) or "body",  # (a rule of the body as a whole)
            "message": _said(e),
            "type": e.get("type", ""),
        }
        for e in errors
    ]
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    return Invalid(f"invalid request: {summary}", details)


def _said(error: Mapping[str, Any]) -> str:
    """pydantic's message, without the "Value error, " it puts before each of Caravan's own rules."""
    if error.get("type") == "missing" and not error.get("loc"):
        return "a JSON object is required"
    return str(error.get("msg", "")).removeprefix("Value error, ")


class NotFound(CaravanError):
    status = 404
    code = "not_found"


class Conflict(CaravanError):
    status = 409
    code = "conflict"


class Unauthorized(CaravanError):
    status = 401
    code = "unauthorized"


class Forbidden(CaravanError):
    status = 403
    code = "forbidden"


class Unavailable(CaravanError):
    status = 503
    code = "unavailable"


class StoreUnavailable(Unavailable):
    """NATS, the platform's store, did not answer in time: a moment later it may."""

    headers = {"Retry-After": "1"}

    def __init__(self) -> None:
        super().__init__("the platform's store (NATS) did not answer in time; try again in a moment")
