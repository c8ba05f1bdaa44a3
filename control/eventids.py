"""The ids a task's events go by on the API (SSE's ``id:``, a WebSocket frame's ``id``, ``Last-Event-ID`` and
``?after=``): each event's sequence in ``CARAVAN_EVENTS``, enciphered for its task.

That stream holds every customer's events: its sequences, shown as they are, would tell a customer how many
events all the others made between two of theirs, and when. Enciphered, an id says nothing to its reader; the
platform reads the sequence back from it to resume after that event. An id of another task, or a made-up one,
reads as none (but for a 1 in 2**64 chance). The same event has the same id on every stream of it, so a client
may drop by id what it has seen already.

The cipher is a 4-round Feistel network (Luby-Rackoff: a pseudorandom permutation when its round function is a
pseudorandom function) over the 128-bit block (sequence, 0), written as 32 hex digits. Its round function is
HMAC-SHA256 keyed by a key derived from the platform's secret, over the task's id and the round; the 0 half
checks the id on the way back."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["ID_LENGTH", "ID_PATTERN", "EventIds"]

ID_LENGTH = 32  # hex digits
ID_PATTERN = f"^[0-9a-f]{{{ID_LENGTH}}}$"
_ROUNDS = 4
_HALF = 2**64 - 1


class EventIds:
    def __init__(self, key: bytes) -> None:
        """``key``: at least 32 bytes kept secret and shared by every replica of the gateway (an id made by one
        is read by another)."""
        if len(key) < 32:
            raise ValueError("an event id key needs at least 32 bytes")
        self._key = key

    def encode(self, task_id: str, sequence: int) -> str:
        """The id of the event at ``sequence`` (``CARAVAN_EVENTS``; 1 to 2**64 - 1) of task ``task_id``."""
        if not 0 < sequence <= _HALF:
            raise ValueError(f"not a stream sequence: {sequence}")
        keyed = self._keyed(task_id)
        left, right = sequence, 0
        for n in range(_ROUNDS):
            left, right = right, left ^ _round(keyed, n, right)
        return f"{left:016x}{right:016x}"

    def decode(self, task_id: str, event_id: str) -> int | None:
        """The sequence of the event of task ``task_id`` that ``event_id`` names; None if it names none."""
        if len(event_id) != ID_LENGTH or not all(c in "0123456789abcdef" for c in event_id):
            return None
        left, right = int(event_id[:16], 16), int(event_id[16:], 16)
        keyed = self._keyed(task_id)
        for n in reversed(range(_ROUNDS)):
            left, right = right ^ _round(keyed, n, left), left
        return left if right == 0 and left > 0 else None

    def _keyed(self, task_id: str) -> hmac.HMAC:
        return hmac.new(self._key, task_id.encode() + b"\0", hashlib.sha256)


def _round(keyed: hmac.HMAC, n: int, half: int) -> int:
    """Round ``n``'s function of one half: 64 bits of HMAC-SHA256 over the task's id (in ``keyed``), n and it."""
    h = keyed.copy()
    h.update(bytes((n,)) + half.to_bytes(8, "big"))
    return int.from_bytes(h.digest()[:8], "big")
