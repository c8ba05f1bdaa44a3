"""One APIRouter per resource, each made by :func:`api_router` (health's probes aside)."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.jsonbody import StrictJsonRoute
from gateway.schemas import ERROR_RESPONSES

__all__ = ["api_router"]


def api_router(prefix: str, tag: str) -> APIRouter:
    """A router of the ``/v1`` API: its error answers documented, its JSON bodies read by :class:`StrictJsonRoute`."""
    return APIRouter(prefix=prefix, tags=[tag], responses=ERROR_RESPONSES, route_class=StrictJsonRoute)
