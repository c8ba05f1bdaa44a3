"""What the processes Caravan starts on one machine (nats-server, the local model, agents) share."""

from __future__ import annotations

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A ``preexec_fn``: runs in the child before exec, so that it gets SIGTERM if the process that started it
    dies (Linux), killed outright included: nothing is left behind holding a port, a store or memory."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
