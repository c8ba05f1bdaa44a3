"""The operators' overview: agents and tasks by status, tokens per customer today, allocations' CPU and memory."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from pydantic import BaseModel, Field

from control.backends.base import Scheduler
from control.models import Agent, AgentStatus, Task, TaskStatus
from control.services.quotas import QuotaService
from control.store import Repo

__all__ = ["AllocationStats", "Counts", "Stats", "StatsService"]


class AllocationStats(BaseModel):
    agent_id: str
    customer_id: str
    alloc_id: str
    cpu_percent: float
    memory_rss_mb: float


class Counts(BaseModel):
    customers: int
    agents_by_status: dict[str, int]
    tasks_by_status: dict[str, int]


class Stats(Counts):
    tokens_today: dict[str, int] = Field(description="Model tokens metered today, per customer.")
    allocations: list[AllocationStats] = Field(description="Running allocations (where the scheduler reports them).")


class _TaskStatus(BaseModel):
    """The one field of a task record that the overview counts (its transcript and the rest are not validated)."""

    status: TaskStatus = TaskStatus.QUEUED


def _count(agents: list[Agent], tasks: list[_TaskStatus], customer_ids: list[str]) -> Counts:
    return Counts(
        customers=len(customer_ids),
        agents_by_status=dict(Counter(a.status.value for a in agents)),
        tasks_by_status=dict(Counter(t.status.value for t in tasks)),
    )


class StatsService:
    def __init__(
        self, agents: Repo[Agent], tasks: Repo[Task], quotas: QuotaService, scheduler: Scheduler, customers: Repo[Any]
    ) -> None:
        self._agents = agents
        self._tasks = tasks
        self._quotas = quotas
        self._scheduler = scheduler
        self._customers = customers

    async def _records(self) -> tuple[list[Agent], list[_TaskStatus], list[str]]:
        return await asyncio.gather(self._agents.list(), self._tasks.list_as(_TaskStatus), self._customers.keys())

    async def counts(self) -> Counts:
        """Customers, agents by status and tasks by status, without the rest of :meth:`overview` (what a
        metrics scrape reads)."""
        return _count(*await self._records())

    async def overview(self) -> Stats:
        (agents, tasks, customer_ids), tokens = await asyncio.gather(self._records(), self._quotas.tokens_today())
        allocations: list[AllocationStats] = []
        if self._scheduler.supports_stats:
            running = [a for a in agents if a.status in (AgentStatus.RUNNING, AgentStatus.STARTING, AgentStatus.KILLED)]
            per_agent = await asyncio.gather(*(self._scheduler.alloc_stats(a.namespace, a.job_id) for a in running))
            for agent, stats in zip(running, per_agent, strict=True):
                allocations += [AllocationStats(agent_id=agent.id, customer_id=agent.customer_id, **s) for s in stats]
        return Stats(
            **_count(agents, tasks, customer_ids).model_dump(),
            tokens_today={c: tokens.get(c, 0) for c in customer_ids},
            allocations=allocations,
        )
