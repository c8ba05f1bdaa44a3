"""The operators' overview: agents and tasks by status, tokens per customer today, allocations' CPU and memory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from agent.aio import cancel_and_wait
from agent.protocol import utcnow
from control.backends.base import Scheduler
from control.models import TERMINAL_TASK_STATUSES, Agent, AgentStatus, Task, TaskStatus
from control.services.quotas import Everyone, QuotaService
from control.services.tasks import unfinished_tasks
from control.store import Repo

__all__ = ["AllocationStats", "Counts", "Stats", "StatsService"]

log = logging.getLogger("caravan.stats")


class AllocationStats(BaseModel):
    agent_id: str
    customer_id: str
    alloc_id: str
    cpu_percent: float
    memory_rss_mb: float


class Counts(BaseModel):
    customers: int
    agents_by_status: dict[str, int]
    tasks_by_status: dict[str, int] = Field(
        description="Tasks in flight (queued, running, awaiting_input) as they are now; ended tasks as counted "
        "at `ended_counted_at`."
    )
    ended_counted_at: datetime = Field(
        description="When the ended tasks were last counted (every record is read for it, at most once every "
        "`CARAVAN_TASK_COUNT_INTERVAL_S`)."
    )


class Stats(Counts):
    tokens_today: dict[str, int] = Field(description="Model tokens metered today, per customer.")
    allocations: list[AllocationStats] = Field(description="Running allocations (where the scheduler reports them).")


class _TaskStatus(BaseModel):
    """The one field of a task record that the overview counts (its transcript and the rest are not validated)."""

    status: TaskStatus = TaskStatus.QUEUED


class _Ended:
    """Ended tasks by status, as of one read of every task record: made when first asked, then again in the
    background when asked after ``max_age_s`` (the askers meanwhile get the last count at once)."""

    def __init__(self, read: Callable[[], Awaitable[list[_TaskStatus]]], max_age_s: float) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._counted: tuple[float, datetime, dict[str, int]] | None = None  # (monotonic, wall clock, counts)
        self._counting: asyncio.Task[None] | None = None

    async def counts(self) -> tuple[datetime, dict[str, int]]:
        if self._counted is None or time.monotonic() - self._counted[0] >= self._max_age_s:
            if self._counting is None or self._counting.done():
                self._counting = asyncio.create_task(self._count())
                self._counting.add_done_callback(_log_failure)
            if self._counted is None or self._max_age_s == 0:
                await asyncio.shield(self._counting)  # a failed read raises to every asker, and is retried next time
        assert self._counted is not None
        return self._counted[1], self._counted[2]

    async def _count(self) -> None:
        started, at = time.monotonic(), utcnow()
        tasks = await self._read()
        ended = Counter(t.status.value for t in tasks if t.status in TERMINAL_TASK_STATUSES)
        self._counted = (started, at, dict(ended))

    async def stop(self) -> None:
        if self._counting is not None:
            await cancel_and_wait(self._counting)


def _log_failure(counting: asyncio.Task[None]) -> None:
    if not counting.cancelled() and (exc := counting.exception()) is not None:  # the last count stays served
        log.warning("could not count the ended tasks: %s", exc)


class StatsService:
    def __init__(
        self,
        agents: Repo[Agent],
        tasks: Repo[Task],
        quotas: QuotaService,
        scheduler: Scheduler,
        customers: Repo[Any],
        ended_max_age_s: float,
    ) -> None:
        self._agents = agents
        self._tasks = tasks
        self._quotas = quotas
        self._scheduler = scheduler
        self._customers = customers
        self._ended = _Ended(lambda: tasks.list_as(_TaskStatus), ended_max_age_s)

    async def stop(self) -> None:
        await self._ended.stop()

    async def _in_flight(self, everyone: Everyone) -> dict[str, int]:
        """Tasks in flight by status: the records of the tasks that hold a quota slot, however many have ended."""
        return dict(Counter(t.status.value for t in await unfinished_tasks(self._tasks, everyone.in_flight)))

    async def _count(self) -> tuple[list[Agent], list[str], Counts, Everyone]:
        """What both the overview and a scrape read; the quota records once."""
        everyone = await self._quotas.everyone()
        agents, customer_ids, in_flight, (ended_at, ended) = await asyncio.gather(
            self._agents.list(), self._customers.keys(), self._in_flight(everyone), self._ended.counts()
        )
        counts = Counts(
            customers=len(customer_ids),
            agents_by_status=dict(Counter(a.status.value for a in agents)),
            tasks_by_status={**ended, **in_flight},
            ended_counted_at=ended_at,
        )
        return agents, customer_ids, counts, everyone

    async def counts(self) -> Counts:
        """Customers, agents by status and tasks by status, without the rest of :meth:`overview` (what a
        metrics scrape reads)."""
        return (await self._count())[2]

    async def overview(self) -> Stats:
        agents, customer_ids, counts, everyone = await self._count()
        tokens = everyone.tokens_today
        allocations: list[AllocationStats] = []
        if self._scheduler.supports_stats:
            running = [a for a in agents if a.status in (AgentStatus.RUNNING, AgentStatus.STARTING, AgentStatus.KILLED)]
            per_agent = await asyncio.gather(*(self._scheduler.alloc_stats(a.namespace, a.job_id) for a in running))
            for agent, stats in zip(running, per_agent, strict=True):
                allocations += [AllocationStats(agent_id=agent.id, customer_id=agent.customer_id, **s) for s in stats]
        return Stats(
            **counts.model_dump(),
            tokens_today={c: tokens.get(c, 0) for c in customer_ids},
            allocations=allocations,
        )
