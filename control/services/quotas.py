"""Per-customer quotas and their atomic admission.

A customer's usage is a set of reservations (agents defined, agents running with the CPU and memory of all their
replicas, tasks in flight, tokens today) held in one KV record and changed only by compare-and-set: fifty
concurrent agent creations against a limit of ten admit exactly ten. Reservations are keyed by the agent
or task they are for, so releasing one twice (a retry, a restart) changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from control.errors import CaravanError
from control.models import Resources
from control.store import AlreadyExists, Repo

__all__ = [
    "Quota",
    "QuotaChange",
    "QuotaExceeded",
    "QuotaRecord",
    "QuotaService",
    "Reservation",
    "Tier",
    "UsagePublic",
    "within_budget",
]

Tier = Literal["free", "standard", "enterprise"]


class QuotaExceeded(CaravanError):
    status = 409
    code = "quota_exceeded"


class Quota(BaseModel):
    """Limits of one customer; None is unlimited. A number must be a JSON number (``"3"`` or ``true`` is refused):
    stored records hold numbers, so they are read as they were written."""

    model_config = ConfigDict(extra="forbid")

    tier: Tier = Field(default="standard", description="Rate-limit tier of the API.")
    max_agents: int | None = Field(default=None, strict=True, ge=0, le=100_000)
    max_cpu: int | None = Field(
        default=None,
        strict=True,
        ge=0,
        le=10_000_000,
        description="MHz over running agents, each `resources.cpu` times `replicas`.",
    )
    max_memory_mb: int | None = Field(
        default=None,
        strict=True,
        ge=0,
        le=100_000_000,
        description="MB over running agents, each `resources.memory_mb` times `replicas`.",
    )
    max_concurrent_tasks: int | None = Field(default=None, strict=True, ge=0, le=1_000_000)
    tokens_per_day: int | None = Field(
        default=None, strict=True, ge=0, le=10**12, description="Model tokens per UTC day."
    )


def _no_defaults(schema: dict[str, Any]) -> None:
    """A field left out of a change keeps its value: the schema a client is generated from shows no default."""
    for field in schema.get("properties", {}).values():
        field.pop("default", None)


class QuotaChange(Quota):
    """The fields of a customer's quota to change (``PATCH``): those left out keep their value, ``null`` is
    unlimited; at least one."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_no_defaults)

    @model_validator(mode="after")
    def _not_empty(self) -> QuotaChange:
        if not self.model_fields_set:
            raise ValueError("nothing to change: give at least one field (null is unlimited)")
        return self

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in sorted(self.model_fields_set)}


class Reservation(BaseModel):
    """What a running agent holds: the CPU and memory of all its replicas (Nomad places ``replicas`` allocations,
    each with the agent's ``resources``)."""

    cpu: int
    memory_mb: int
    replicas: int = 1

    @classmethod
    def of(cls, resources: Resources, replicas: int) -> Reservation:
        return cls(cpu=resources.cpu * replicas, memory_mb=resources.memory_mb * replicas, replicas=replicas)

    def explained(self, total: int, unit: str) -> str:
        """``total`` (this reservation's CPU or memory) and, over several replicas, what each holds."""
        each = "" if self.replicas == 1 else f" ({self.replicas} replicas of {total // self.replicas} {unit})"
        return f"{total} {unit}{each}"


class MeterMark(BaseModel):
    """The last metering write of a task in flight: the stream sequence of the last usage event it counted, and
    whether it crossed the budget. A write tried again after its answer was lost finds itself here."""

    seq: int
    crossed: bool = False


class QuotaRecord(BaseModel):
    quota: Quota = Field(default_factory=Quota)
    agents: list[str] = Field(default_factory=list)
    running: dict[str, Reservation] = Field(default_factory=dict)
    tasks: list[str] = Field(default_factory=list)
    token_day: str = ""
    tokens: int = 0
    budget_exceeded: bool = False
    metered: dict[str, MeterMark] = Field(default_factory=dict)  # per task in flight (and the one metered last)


@dataclass(frozen=True)
class Everyone:
    """What every customer holds: the ids of their tasks in flight (:meth:`QuotaService.tasks_in_flight`; customers
    with none left out) and their tokens metered today (customers with a quota record)."""

    in_flight: dict[str, list[str]]
    tokens_today: dict[str, int]


class UsagePublic(BaseModel):
    quota: Quota
    agents: int
    cpu: int = Field(description="MHz held by running agents: each one's `resources.cpu` times `replicas`.")
    memory_mb: int = Field(description="MB held by running agents: each one's `resources.memory_mb` times `replicas`.")
    concurrent_tasks: int
    tokens_today: int


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


class QuotaService:
    def __init__(self, repo: Repo[QuotaRecord], default: Quota) -> None:
        self._repo = repo
        self._default = default

    async def _record(self, customer_id: str) -> QuotaRecord:
        """The customer's record; a customer who has none yet has the default quota and uses nothing (a read
        writes nothing: the record is made by the first change)."""
        return await self._repo.get(customer_id) or QuotaRecord(quota=self._default)

    async def _change(self, customer_id: str, change: Callable[[QuotaRecord], QuotaRecord | None]) -> QuotaRecord:
        updated = await self._repo.update(customer_id, change)
        if updated is None:  # no record yet: the one with the default quota, then the change
            with contextlib.suppress(AlreadyExists):  # made meanwhile by another change: it is changed below
                await self._repo.create(customer_id, QuotaRecord(quota=self._default))
            updated = await self._repo.update(customer_id, change)
        assert updated is not None
        return updated

    def completed(self, quota: Quota) -> Quota:
        """``quota`` with the fields it leaves out (not given, as against given null: unlimited) at a new customer's
        default."""
        return self._default.model_copy(update={name: getattr(quota, name) for name in quota.model_fields_set})

    async def change_quota(self, customer_id: str, changes: Mapping[str, Any]) -> UsagePublic:
        """Change the fields ``changes`` names (``None``: unlimited; all of them: the quota replaced) of the
        customer's quota as it is stored, and keep the others, in one compare-and-set, so that two changes of
        different fields made at once both hold; returns their usage under it. A budget that leaves them tokens
        today (or none) is crossed afresh: going over it halts them again."""

        def replace(record: QuotaRecord) -> QuotaRecord:
            quota = record.quota.model_copy(update=changes)
            exceeded = record.budget_exceeded and not _within_budget(_usage(record), quota)
            return record.model_copy(update={"quota": quota, "budget_exceeded": exceeded})

        return _usage(await self._change(customer_id, replace))

    async def usage(self, customer_id: str) -> UsagePublic:
        return _usage(await self._record(customer_id))

    async def everyone(self) -> Everyone:
        """Every customer's tasks in flight and tokens today, in one pass over the quota records (the operators'
        overview and the metrics)."""
        records = await self._repo.items()
        return Everyone(
            in_flight={customer_id: record.tasks for customer_id, record in records if record.tasks},
            tokens_today={customer_id: _usage(record).tokens_today for customer_id, record in records},
        )

    async def tasks_in_flight(self, customer_id: str) -> list[str]:
        """The ids of the customer's tasks that hold a slot: every task from just before its record is made until
        its end is folded in (or it was ended on purpose)."""
        return list((await self._record(customer_id)).tasks)

    async def tier(self, customer_id: str) -> Tier:
        return (await self._record(customer_id)).quota.tier

    async def reserve_agent(self, customer_id: str, agent_id: str, reservation: Reservation) -> None:
        """Admit a new agent that will run holding ``reservation``; raises :class:`QuotaExceeded`."""

        def admit(record: QuotaRecord) -> QuotaRecord | None:
            if agent_id in record.agents:
                return None
            quota = record.quota
            if quota.max_agents is not None and len(record.agents) + 1 > quota.max_agents:
                raise QuotaExceeded(
                    f"quota exceeded: at most {_count(quota.max_agents, 'agent')} and the customer has "
                    f"{len(record.agents)}: delete one, or ask an operator for a higher max_agents"
                )
            _check_resources(record, agent_id, reservation)
            running = {**record.running, agent_id: reservation}
            return record.model_copy(update={"agents": [*record.agents, agent_id], "running": running})

        await self._change(customer_id, admit)

    async def reserve_running(self, customer_id: str, agent_id: str, reservation: Reservation) -> Reservation | None:
        """An existing agent starts, or changes its resources or replicas: it holds ``reservation`` from now on.
        Raises :class:`QuotaExceeded`, changing nothing. Only what it grows is checked: a change that holds less
        CPU, or less memory, than the agent held is not refused that for a quota lowered below what the customer
        holds (they are coming back under it). Returns what the agent held before (None: nothing), for
        :meth:`restore_running` to put back if the change it was made for does not happen."""
        previous: Reservation | None = None

        def admit(record: QuotaRecord) -> QuotaRecord | None:
            nonlocal previous
            previous = record.running.get(agent_id)
            if previous == reservation:
                return None
            _check_resources(record, agent_id, reservation, previous)
            return record.model_copy(update={"running": {**record.running, agent_id: reservation}})

        await self._change(customer_id, admit)
        return previous

    async def restore_running(
        self, customer_id: str, agent_id: str, previous: Reservation | None, reserved: Reservation
    ) -> None:
        """Undo :meth:`reserve_running`: the agent holds ``previous`` again (None: nothing), if it still holds what
        was ``reserved`` (a stop meanwhile released it: that stays). No admission check: it held that before."""

        def restore(record: QuotaRecord) -> QuotaRecord | None:
            if record.running.get(agent_id) != reserved or previous == reserved:
                return None
            running = {k: v for k, v in record.running.items() if k != agent_id}
            if previous is not None:
                running[agent_id] = previous
            return record.model_copy(update={"running": running})

        await self._change(customer_id, restore)

    async def correct_running(self, customer_id: str, held: dict[str, tuple[Reservation, Reservation]]) -> None:
        """Set a reservation written before reservations counted every replica to what its running agent holds:
        ``held`` maps an agent to (what it holds, one replica's share); only a reservation of one replica's share
        is set (any other was written since, by a change that may be newer than the records read for ``held``).
        No admission check (the agents run already) and no new reservation; a customer without a record has
        nothing to correct."""

        def correct(record: QuotaRecord) -> QuotaRecord | None:
            wrong = {a: r for a, (r, share) in held.items() if record.running.get(a) == share and share != r}
            return record.model_copy(update={"running": {**record.running, **wrong}}) if wrong else None

        await self._repo.update(customer_id, correct)

    async def release_running(self, customer_id: str, agent_id: str) -> None:
        def release(record: QuotaRecord) -> QuotaRecord | None:
            if agent_id not in record.running:
                return None
            return record.model_copy(update={"running": {k: v for k, v in record.running.items() if k != agent_id}})

        await self._change(customer_id, release)

    async def release_agent(self, customer_id: str, agent_id: str) -> None:
        def release(record: QuotaRecord) -> QuotaRecord | None:
            if agent_id not in record.agents and agent_id not in record.running:
                return None
            return record.model_copy(
                update={
                    "agents": [a for a in record.agents if a != agent_id],
                    "running": {k: v for k, v in record.running.items() if k != agent_id},
                }
            )

        await self._change(customer_id, release)

    async def reserve_task(self, customer_id: str, task_id: str) -> None:
        def admit(record: QuotaRecord) -> QuotaRecord | None:
            if task_id in record.tasks:
                return None
            limit = record.quota.max_concurrent_tasks
            if limit is not None and len(record.tasks) + 1 > limit:
                raise QuotaExceeded(
                    f"quota exceeded: at most {_count(limit, 'concurrent task')} and {len(record.tasks)} "
                    f"{'is' if len(record.tasks) == 1 else 'are'} in flight: wait for one to end, or cancel one"
                )
            _check_budget(record)
            return record.model_copy(update={"tasks": [*record.tasks, task_id]})

        await self._change(customer_id, admit)

    async def release_task(self, customer_id: str, task_id: str) -> None:
        def release(record: QuotaRecord) -> QuotaRecord | None:
            if task_id not in record.tasks and task_id not in record.metered:
                return None
            return record.model_copy(
                update={
                    "tasks": [t for t in record.tasks if t != task_id],
                    "metered": {t: m for t, m in record.metered.items() if t != task_id},
                }
            )

        await self._change(customer_id, release)

    async def record_tokens(
        self, customer_id: str, task_id: str, seq: int, tokens: int
    ) -> tuple[int, int | None, bool]:
        """Add the tokens of a task's usage events up to stream sequence ``seq``; returns (tokens today, daily
        budget, whether this write crossed the budget). Idempotent: the same write again (tried again after its
        answer was lost) adds nothing and says whether it crossed the budget, as the lost answer would have."""
        crossed = False

        def add(record: QuotaRecord) -> QuotaRecord | None:
            nonlocal crossed
            mark = record.metered.get(task_id)
            if mark is not None and mark.seq >= seq:
                crossed = mark.crossed and record.budget_exceeded  # (unless a quota change lifted it since)
                return None
            today = _today()
            total = (record.tokens if record.token_day == today else 0) + tokens
            exceeded = record.budget_exceeded if record.token_day == today else False
            budget = record.quota.tokens_per_day
            crossed = budget is not None and total > budget and not exceeded
            # the marks of tasks that ended go (a late attempt's usage may come after its task's slot was given
            # back): this write's own is kept until the next one, which is its retry if it needs one
            marks = {t: m for t, m in record.metered.items() if t in record.tasks}
            marks[task_id] = MeterMark(seq=seq, crossed=crossed)
            return record.model_copy(
                update={"token_day": today, "tokens": total, "budget_exceeded": exceeded or crossed, "metered": marks}
            )

        record = await self._change(customer_id, add)
        return record.tokens, record.quota.tokens_per_day, crossed


def _usage(record: QuotaRecord) -> UsagePublic:
    return UsagePublic(
        quota=record.quota,
        agents=len(record.agents),
        cpu=sum(r.cpu for r in record.running.values()),
        memory_mb=sum(r.memory_mb for r in record.running.values()),
        concurrent_tasks=len(record.tasks),
        tokens_today=record.tokens if record.token_day == _today() else 0,
    )


def within_budget(usage: UsagePublic) -> bool:
    """Whether the customer has tokens left today (or no daily budget)."""
    return _within_budget(usage, usage.quota)


def _within_budget(usage: UsagePublic, quota: Quota) -> bool:
    return quota.tokens_per_day is None or usage.tokens_today < quota.tokens_per_day


def _check_resources(record: QuotaRecord, agent_id: str, wanted: Reservation, held: Reservation | None = None) -> None:
    """Refuse ``wanted`` for the agent where it goes over the quota with what the others hold; ``held``: what the
    agent holds now, whose CPU or memory ``wanted`` does not grow is not checked."""
    others = [r for a, r in record.running.items() if a != agent_id]
    quota = record.quota
    cpu, memory = sum(r.cpu for r in others), sum(r.memory_mb for r in others)
    grows_cpu = held is None or wanted.cpu > held.cpu
    grows_memory = held is None or wanted.memory_mb > held.memory_mb
    if grows_cpu and quota.max_cpu is not None and cpu + wanted.cpu > quota.max_cpu:
        raise QuotaExceeded(
            f"quota exceeded: at most {quota.max_cpu} MHz of CPU over running agents; this agent needs "
            f"{wanted.explained(wanted.cpu, 'MHz')} and the others hold {cpu} MHz"
        )
    if grows_memory and quota.max_memory_mb is not None and memory + wanted.memory_mb > quota.max_memory_mb:
        raise QuotaExceeded(
            f"quota exceeded: at most {quota.max_memory_mb} MB of memory over running agents; this agent needs "
            f"{wanted.explained(wanted.memory_mb, 'MB')} and the others hold {memory} MB"
        )


def _check_budget(record: QuotaRecord) -> None:
    budget = record.quota.tokens_per_day
    if budget is not None and record.token_day == _today() and record.tokens >= budget:
        raise QuotaExceeded(f"daily token budget of {budget} used up ({record.tokens} tokens today)")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"
