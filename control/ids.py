"""Identifiers: a two-letter kind, a dash and 12 hex digits (see ``agent.protocol.ID_PATTERN``)."""

from __future__ import annotations

import secrets

from agent.logsafe import printable

__all__ = ["SHOWN_ID_MAX", "is_digits", "is_plain_id", "new_id", "quoted_id", "shown_id"]

SHOWN_ID_MAX = 100
"""An id a caller gave is shown (in the audit log, in a 404's message) up to this many characters."""


def new_id(kind: str) -> str:
    if len(kind) != 2 or not kind.isalpha() or not kind.islower():
        raise ValueError(f"id kind must be two lowercase letters, not {kind!r}")
    return f"{kind}-{secrets.token_hex(6)}"


def is_plain_id(value: str) -> bool:
    """Whether ``value`` can be part of a store key (letters, digits and dashes only)."""
    return 0 < len(value) <= 64 and value.replace("-", "").isalnum() and value.isascii()


def is_digits(text: str) -> bool:
    """Whether ``text`` is ASCII digits only: what ``int()`` reads as a plain number (``str.isdigit`` also takes
    ``²`` and other digits, which ``int()`` refuses)."""
    return text.isascii() and text.isdigit()


def shown_id(value: str | None) -> str | None:
    """An id as the audit log keeps it: as given if it is printable and short (every id Caravan makes is);
    otherwise with control, format and line-break characters escaped (``\\n``, ``\\u202e``) and cut to
    :data:`SHOWN_ID_MAX` characters, its length said. A path's id is recorded as the admin sent it, which may be
    anything: one line of the log, read as text, must not pass for two, nor bury the rest."""
    if value is None or (value.isprintable() and len(value) <= SHOWN_ID_MAX):
        return value
    shown = printable(value)
    return shown if len(shown) <= SHOWN_ID_MAX else f"{shown[:SHOWN_ID_MAX]}... ({len(value)} characters)"


def quoted_id(value: str) -> str:
    """An id a caller gave, as a message quotes it back: its ``repr`` (every character that is not printable
    escaped), cut to :data:`SHOWN_ID_MAX` characters with its length said, as :func:`shown_id` cuts. A path's id
    may be anything up to the server's line limit: a 404 for 60 KB of id is not 60 KB of answer."""
    if len(value) <= SHOWN_ID_MAX:
        return repr(value)
    return f"{value[:SHOWN_ID_MAX]!r}... ({len(value)} characters)"
