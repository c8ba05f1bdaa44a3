"""Identifiers: a two-letter kind, a dash and 12 hex digits (see ``agent.protocol.ID_PATTERN``)."""

from __future__ import annotations

import secrets

__all__ = ["QUOTED_ID_MAX", "is_digits", "is_plain_id", "new_id", "quoted_id"]

QUOTED_ID_MAX = 100
"""An id a caller gave is quoted back (a 404's message) up to this many characters."""


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


def quoted_id(value: str) -> str:
    """An id a caller gave, as a message quotes it back: its ``repr`` (every character that is not printable
    escaped), cut to :data:`QUOTED_ID_MAX` characters with its length said. A path's id may be anything up to the
    server's line limit: a 404 for 60 KB of id is not 60 KB of answer."""
    if len(value) <= QUOTED_ID_MAX:
        return repr(value)
    return f"{value[:QUOTED_ID_MAX]!r}... ({len(value)} characters)"
