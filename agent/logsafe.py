"""Secrets kept out of log lines. A process knows the secrets it was given (a NATS password, a model provider's key,
a Consul token; the control plane its admin key and Nomad tokens), and those have no shape to be found by: a
:class:`Redacting` filter on the handlers that write every logger's lines (:func:`install_on_handlers`) replaces
each of them with ``<redacted>`` wherever a record quotes it, in its message, its arguments or its traceback. The
gateway's filter (``gateway.logredact``) builds on it for what has a shape: tokens, JWTs, API keys."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from agent.protocol import PROVIDER_KEY_ENV

__all__ = [
    "CONTENT_LOGGERS",
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "SECRET_ENV",
    "Redacting",
    "hide_in_logs",
    "install_on_handlers",
    "keep_content_out",
    "printable",
    "secrets_in_env",
]

REDACTED = "<redacted>"
MIN_SECRET_LENGTH = 8
"""Shorter values given as secrets are not looked for (every word of that length in a line would be hidden)."""
SECRET_ENV = (
    "CARAVAN_NATS_PASSWORD",
    "CARAVAN_NATS_TOKEN",
    "CONSUL_HTTP_TOKEN",
    "NOMAD_TOKEN",
    *PROVIDER_KEY_ENV.values(),
)
"""The environment variables whose values are secrets, in any Caravan process."""

CONTENT_LOGGERS = ("autogen_core.events", "autogen_agentchat.events")
"""AutoGen's event loggers: at INFO they write each model call whole (a customer's prompt and its answer) and each
message of a team; the customer's content, not the operator's."""

_TRACEBACKS = logging.Formatter()  # formats a traceback as every handler's formatter does (formatException)


def printable(text: str) -> str:
    """``text`` as one line a terminal or a log shows as it is: each character that is not printable (controls,
    escapes, bidi and zero-width marks, line breaks) written as its Python escape (``\\x1b``, ``\\n``,
    ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def secrets_in_env(env: Mapping[str, str]) -> list[str]:
    """The secrets a process's environment gives it (:data:`SECRET_ENV`)."""
    return [env[name] for name in SECRET_ENV if env.get(name)]


class Redacting(logging.Filter):
    """Rewrites each record it sees with :meth:`redact`: ``secrets`` (of at least :data:`MIN_SECRET_LENGTH`
    characters) become ``<redacted>``."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self._values: set[str] = set()
        self._secrets: re.Pattern[str] | None = None
        self.hide(secrets)

    def hide(self, secrets: Iterable[str | None]) -> None:
        """Hide these too, from the next record on (a secret the process made after its logging was set up)."""
        self._values |= {v for v in secrets if v and len(v) >= MIN_SECRET_LENGTH}
        # the longest first: a secret that holds another is hidden whole
        values = sorted(self._values, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, values))) if values else None

    def redact(self, text: str) -> str:
        return text if self._secrets is None else self._secrets.sub(REDACTED, text)

    def _shown(self, value: Any) -> Any:
        return self.redact(value) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        """Each argument on its own, so that a formatter that reads them (uvicorn's access formatter) gets them
        redacted; then the whole message, if a secret is still in it (one split over two arguments, or one in an
        argument that is no string); then the traceback, formatted here once (a formatter writes ``exc_text`` when
        it is set rather than format it)."""
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if isinstance(record.args, Mapping):
            record.args = {key: self._shown(value) for key, value in record.args.items()}
        elif record.args:
            record.args = tuple(self._shown(value) for value in record.args)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the message: the handler reports it
            return True
        if (shown := self.redact(message)) != message:
            record.msg, record.args = shown, ()
        return True


def keep_content_out(level: int) -> None:
    """Leave :data:`CONTENT_LOGGERS` at WARNING, unless the process logs at DEBUG (an operator who asks for
    everything gets it)."""
    for name in CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)


def hide_in_logs(*secrets: str | None) -> None:
    """Have every :class:`Redacting` filter on the root logger's handlers hide ``secrets`` too."""
    for handler in logging.getLogger().handlers:
        for redacting in handler.filters:
            if isinstance(redacting, Redacting):
                redacting.hide(secrets)


def install_on_handlers(redacting: logging.Filter) -> None:
    """Put ``redacting`` on the root logger's handlers (``logging.basicConfig``'s), which write the lines of every
    logger that propagates to it: Caravan's own, nats-py's, asyncio's."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
