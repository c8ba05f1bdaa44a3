"""Identifiers: a two-letter kind, a dash and 12 hex digits (see ``agent.protocol.ID_PATTERN``)."""

from __future__ import annotations

import secrets

__all__ = ["is_digits", "is_plain_id", "new_id"]


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
