"""The agent's side of the killswitch: watch the flags that cover this agent and halt or resume the worker.

Fail safe: an agent that cannot hear from its flag store for ``grace`` seconds halts as if a flag were
engaged, and says so; it resumes once the store answers again with nothing engaged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.aio import cancel_and_wait
from agent.backends.base import FlagSnapshot, FlagStore, keys_for_agent

__all__ = ["Halt", "KillswitchWatch"]

log = logging.getLogger("caravan.agent.killswitch")


_LOOK_AGAIN_S = 1.0
"""How long a stopping agent waits to read its flags once more (it is on its way out: not longer)."""


@dataclass(frozen=True)
class Halt:
    """Why the agent is halted: the engaged flags (by engagement id), or the flag store being unreachable."""

    reason: str
    flag_ids: tuple[str, ...] = ()
    fail_safe: bool = False
    scopes: tuple[str, ...] = field(default=())


def _halt_for(snapshot: FlagSnapshot) -> Halt | None:
    engaged = snapshot.engaged()
    if not engaged:
        return None
    reasons = "; ".join(f"{f.scope.value}: {f.reason}" if f.reason else f.scope.value for f in engaged)
    return Halt(
        reason=f"killswitch engaged ({reasons})",
        flag_ids=tuple(f.id for f in engaged),
        scopes=tuple(f.scope.value for f in engaged),
    )


class KillswitchWatch:
    """Calls ``on_change(halt or None)`` whenever the agent must halt or may resume."""

    def __init__(
        self,
        store: FlagStore,
        customer_id: str,
        agent_id: str,
        on_change: Callable[[Halt | None], Awaitable[None]],
        grace: float = 30.0,
        heartbeat: float = 5.0,
    ) -> None:
        self._store = store
        self._keys = keys_for_agent(customer_id, agent_id)
        self._on_change = on_change
        self._grace = grace
        self._heartbeat = min(heartbeat, max(grace / 3, 0.2))
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self.halt: Halt | None = None

    async def start(self) -> None:
        """Start watching; returns once the flags were read (or, after ``grace``, halted fail-safe)."""
        if self._task is not None:
            raise RuntimeError("killswitch watch already started")
        self._task = asyncio.create_task(self._run(), name="killswitch-watch")
        try:
            await asyncio.wait_for(self._first.wait(), timeout=self._grace)
        except TimeoutError:
            await self._set(
                Halt(reason=f"flag store not reachable within {self._grace:g}s: halted (fail safe)", fail_safe=True)
            )

    async def look_again(self) -> None:
        """Read the flags once, now, and halt if one is engaged that the watch has not heard of yet (it resumes
        only on the watch's word). An agent told to stop asks before it gives its tasks back: a hard killswitch
        writes the flag, then stops the job, and its SIGTERM may come before the watch hears the write. A store
        that does not answer within a second changes nothing."""
        try:
            async with asyncio.timeout(_LOOK_AGAIN_S):
                flags = await self._store.read(self._keys)
        except Exception as exc:  # (timeouts included) the watch's word stands
            log.warning("flags not read again before stopping: %s", exc or type(exc).__name__)
            return
        halt = _halt_for(FlagSnapshot({f.key: f for f in flags}))
        if halt is not None and (self.halt is None or self.halt.fail_safe):
            await self._set(halt)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _set(self, halt: Halt | None) -> None:
        if halt == self.halt:
            return
        self.halt = halt
        log.warning("halted: %s", halt.reason) if halt else log.info("resumed: no killswitch covers this agent")
        await self._on_change(halt)

    async def _run(self) -> None:
        last_heard = time.monotonic()
        while True:
            try:
                async for snapshot in self._store.watch(self._keys, heartbeat=self._heartbeat):
                    now = time.monotonic()
                    if snapshot.reachable:
                        last_heard = now
                        await self._set(_halt_for(snapshot))
                        self._first.set()
                    elif now - last_heard >= self._grace:
                        why = snapshot.error or "no answer"
                        silent = f"{now - last_heard:.0f}s"
                        reason = f"flag store unreachable for {silent} ({why}): halted (fail safe)"
                        await self._set(Halt(reason=reason, fail_safe=True))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("flag watch failed; watching again")
                await asyncio.sleep(min(1.0, self._heartbeat))
