"""asyncio helpers shared by the agent and the control plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop
from nats.aio.msg import Msg

__all__ = [
    "HAND_BACK_DELAY_S",
    "cancel_and_wait",
    "exit_reason",
    "keep_in_progress",
    "nats_error_logger",
    "new_event_loop",
    "run",
]

T = TypeVar("T")

HAND_BACK_DELAY_S = 0.001
"""The delay of the nak that hands a message back to JetStream to be delivered again at once (a task or a team
run that a stopping agent or control plane gives back). A plain nak only queues the message in the server's
memory: a server that stops before delivering it again (a restart of the platform stops NATS just after the
agents and the control plane) forgets it, and the message came back only after the consumer's ack wait (60 s
for a task, 30 for a team run). A nak with a delay is stored with the consumer's state, and a server that
starts again delivers it at once; a server that runs on delivers it as soon as the delay is over."""


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop of every Caravan process: uvloop's, or asyncio's own with ``CARAVAN_EVENT_LOOP=asyncio``.
    Every message of a team run turns the event loops of three or four processes several times, and a turn of
    uvloop's costs a fraction of one of asyncio's (issue 5's benchmark runs on both)."""
    if os.environ.get("CARAVAN_EVENT_LOOP", "uvloop") == "asyncio":
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def exit_reason(returncode: int) -> str:
    """How a child process ended, for logs and failure reasons: ``exited with code 3``, ``killed by SIGKILL``."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


async def cancel_and_wait(task: asyncio.Task[Any], nudge_s: float = 1.0) -> None:
    """Cancel ``task`` and wait until it has ended, asking again while it runs on.

    On Python 3.11 a cancellation can be lost: ``asyncio.wait_for`` (which nats-py's requests use) swallows one
    that arrives just as its inner future completes (CPython gh-86296, fixed in 3.12). A task that lost it runs
    on, and whoever awaited it after a single ``cancel()`` waited forever (seen: a local scheduler shutdown hung
    on a health-check loop)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=nudge_s)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def keep_in_progress(msg: Msg, every: float) -> None:
    """Tell JetStream every ``every`` seconds that ``msg`` is still being worked on (until cancelled), so that a
    long task or team run is not redelivered while it runs."""
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(Exception):
            await msg.in_progress()


def nats_error_logger(log: logging.Logger) -> Callable[[Exception], Awaitable[None]]:
    """A NATS connection's ``error_cb`` writing one line per problem to ``log``: nats-py's own logs a traceback
    at each attempt to reconnect (every 2 s)."""

    async def log_error(error: Exception) -> None:
        log.warning("NATS: %s", error or type(error).__name__)

    return log_error
