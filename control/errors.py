"""Errors the control plane raises for the API to turn into ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

__all__ = ["CaravanError", "Conflict", "Forbidden", "Invalid", "NotFound", "Unauthorized", "Unavailable"]


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
