"""Secrets in a request's URL kept out of the server's log lines. Browsers cannot give a WebSocket a header, so they
authenticate with ``?token=<JWT>``, and any client may put a token or paste an API key into a URL; uvicorn logs each
request's path and query: in its access log (``uvicorn.access``, written when its level is INFO, as an operator who
raises the log level gets it) and in its WebSocket lines (``uvicorn.error`` at INFO: ``"WebSocket /path?query"
[accepted]``, or the status it was refused with). :func:`install` adds a filter to both, and to the gateway's own
logger (``caravan.gateway``: an unexpected error's traceback, whose exception may quote what it was given), that
rewrites each record, its arguments (which uvicorn's access formatter reads one by one), its message and its
traceback: a ``token`` parameter's value becomes ``<redacted>``, as does anything else shaped as a JWT, and an API
key is cut to its prefix as in the audit log (:func:`gateway.errors.shown_path`). The ``caravan`` command puts
one that also hides the secrets it was given on the handlers of every other logger (:mod:`agent.logsafe`)."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

from agent.logsafe import REDACTED, Redacting
from control.services.auth import redact_keys
from gateway.errors import shown_path

__all__ = ["LOGGERS", "RedactUrls", "install", "shown_url"]

LOGGERS = ("uvicorn.access", "uvicorn.error", "caravan.gateway")

_SECRET_PARAMS = frozenset({"token"})  # the query parameter a WebSocket's bearer token may come in
_URL = re.compile(r"(/[^\s\"?#]*)(\?[^\s\"#]*)?")  # a path, and its query if it has one
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")  # base64url of '{"', two dots


def _query(query: str) -> str:
    params = []
    for param in query.split("&"):
        name, eq, _ = param.partition("=")
        params.append(f"{name}={REDACTED}" if eq and unquote_plus(name) in _SECRET_PARAMS else param)
    return "&".join(params)


def _url(match: re.Match[str]) -> str:
    path, query = match.group(1), match.group(2)
    return shown_path(path) + (f"?{_query(query[1:])}" if query else "")


def shown_url(text: str) -> str:
    """``text`` (a log line, a part of one, a traceback) with its secrets redacted: a URL's ``token`` parameter's
    value, whatever its name's spelling (``%74oken``: the same parameter to the server), any JWT, and any API key,
    in a URL or not, cut to its prefix (on the key route, as :func:`gateway.errors.shown_path` shows it)."""
    return redact_keys(_JWT.sub(REDACTED, _URL.sub(_url, text)))


class RedactUrls(Redacting):
    """Secrets in URLs (:func:`shown_url`), and the exact ``secrets`` it is given (:class:`agent.logsafe.Redacting`)."""

    def redact(self, text: str) -> str:
        return shown_url(super().redact(text))


_FILTER = RedactUrls()


def install() -> None:
    """Filter uvicorn's loggers (again: no harm), where they log a request's URL, and the gateway's. Their filters
    stay when uvicorn configures its logging (a dictConfig replaces handlers and levels, not filters)."""
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
