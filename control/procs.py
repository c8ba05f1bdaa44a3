"""What the processes Caravan starts on one machine (nats-server, the local model, agents) share."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[[int, int], int] | None:
    """libc's ``prctl``, looked up once here: loading a library in the child, between fork and exec, is what a
    ``preexec_fn`` must not do (in a process with threads it can hang on a lock another thread held)."""
    with contextlib.suppress(OSError, AttributeError):
        prctl: Callable[[int, int], int] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        return prctl
    return None  # not Linux: nothing to ask for


_PRCTL = _find_prctl()


def die_with_parent() -> None:
    """A ``preexec_fn``: runs in the child before exec, so that it gets SIGTERM if the process that started it
    dies (Linux), killed outright included: nothing is left behind holding a port, a store or memory."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def private_dir(path: Path) -> Path:
    """``path``, made with its parents if need be, readable by this user alone (0700, set again if it was
    wider): what lies below holds what customers gave (an agent's log at debug quotes prompts), stores and keys."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def private_log(path: Path) -> BinaryIO:
    """``path`` opened to append a process's output, made readable by this user alone (0600) if it is new, in a
    :func:`private_dir`."""
    private_dir(path.parent)
    return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
