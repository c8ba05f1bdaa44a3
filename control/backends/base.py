"""Backend contracts. Each implementation lives in its own module beside this one; only that module
imports its client library. Backends are chosen by name through :data:`control.backends.SCHEDULERS`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from agent.protocol import utcnow

__all__ = [
    "AllocState",
    "EventFeed",
    "FollowsEvents",
    "JobNotOwned",
    "JobRejected",
    "JobStatus",
    "Registry",
    "Scheduler",
    "SchedulerError",
    "SchedulerUnreachable",
    "ServiceInstance",
    "StatusCallback",
    "StatusUpdate",
    "SubmitResult",
    "event_feed",
]


class SchedulerError(Exception):
    """The scheduler could not do what was asked; the message says why, in the scheduler's words."""


class SchedulerUnreachable(SchedulerError):
    """The scheduler gave no answer, or only that it cannot serve now (it has no leader; a proxy in front of it
    cannot reach it), even after the backend's retries: the failure is the scheduler's as a whole, not the job's."""


class JobRejected(SchedulerError):
    """The scheduler refused the job itself (invalid spec, unsupported driver)."""


class JobNotOwned(SchedulerError):
    """A job with this ID exists but does not carry this Caravan's ownership meta: it is left alone."""


class AllocState(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    namespace: str
    version: int
    eval_id: str | None = None
    alloc_ids: list[str] = field(default_factory=list)

    def handles(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "eval_id": self.eval_id, "alloc_ids": self.alloc_ids, "version": self.version}


@dataclass(frozen=True)
class StatusUpdate:
    """A change of one allocation of a job, as the scheduler sees it."""

    namespace: str
    job_id: str
    alloc_id: str
    state: AllocState
    reason: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    namespace: str
    version: int
    allocs: dict[str, AllocState]
    reasons: dict[str, str] = field(default_factory=dict)


StatusCallback = Callable[[StatusUpdate], Awaitable[None]]


@dataclass(frozen=True)
class EventFeed:
    """The state of the feed a cluster scheduler learns its jobs' changes from (Nomad's event stream): while it is
    not connected, the statuses it reports are stale."""

    connected: bool
    since: datetime
    """When it connected, or when it was lost (when the scheduler started, if it never connected)."""
    last_error: str | None = None
    """Why the last attempt failed, on one short line without credentials (for the log: it may name an address or
    quote the server); None while connected."""
    last_error_kind: str | None = None
    """What kind of failure that was, in a few fixed words that are safe to show anyone (an unauthenticated probe):
    never the server's or the network's own text; None while connected."""
    failures: int = 0
    """Attempts that failed since it was last connected."""


@runtime_checkable
class Scheduler(Protocol):
    """Places rendered Nomad jobs (the API ``Job`` object) and reports on their allocations.

    Implementations must refuse to modify or stop a job that does not carry the ``caravan_owner`` meta
    of this installation (:class:`JobNotOwned`).
    """

    name: str
    supports_stats: bool

    async def start(self) -> None:
        """Connect and begin delivering status updates. Raises if already started."""

    async def stop(self) -> None:
        """Stop delivering updates and release resources. Idempotent. The local scheduler also stops
        every task it runs; a cluster scheduler leaves jobs running."""

    def on_status(self, callback: StatusCallback) -> None:
        """Register a coroutine called for every allocation state change."""

    async def submit(self, job: dict[str, Any], secrets: Mapping[str, str] | None = None) -> SubmitResult:
        """Register ``job`` (create or update, a new version). ``secrets`` reach the task's environment by the
        scheduler's own secret channel (a Nomad Variable; the local process environment), never the job spec.
        Raises :class:`JobRejected` for a job the scheduler refuses and :class:`JobNotOwned` for a job ID held
        by someone else."""

    async def stop_job(self, namespace: str, job_id: str) -> None:
        """Stop every allocation of the job: SIGTERM, then kill after the task's kill timeout. A job
        that does not exist is already stopped. Raises :class:`JobNotOwned` for foreign jobs."""

    async def job_status(self, namespace: str, job_id: str) -> JobStatus | None:
        """The job's allocations and their states, or None if the job is unknown."""

    async def alloc_stats(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        """Resource use of each running allocation of the job: ``{"alloc_id", "cpu_percent", "memory_rss_mb"}``.

        Only meaningful when ``supports_stats`` is true; a scheduler without statistics raises
        :class:`SchedulerError`. A job that does not exist has no running allocations (an empty list)."""


@runtime_checkable
class FollowsEvents(Protocol):
    """An optional capability of a scheduler: its statuses come from a feed of the cluster's changes that can be
    lost (Nomad's event stream), and it says how that feed is. The local scheduler has none: it watches its own
    processes, so nothing between it and them can go stale."""

    def event_feed(self) -> EventFeed:
        """The feed's state now; cheap, and callable from the event loop at any time (a probe, a scrape)."""


def event_feed(scheduler: Scheduler) -> EventFeed | None:
    """The scheduler's event feed, or None for a scheduler without one (:class:`FollowsEvents`)."""
    return scheduler.event_feed() if isinstance(scheduler, FollowsEvents) else None


class ServiceInstance(BaseModel):
    """One registered instance of a service (an agent allocation) and the state of its health check."""

    id: str = Field(description="Instance id: the allocation id.")
    name: str = Field(description="Service name from the job's service block.")
    address: str
    port: int
    status: Literal["passing", "warning", "critical"] = "critical"
    output: str = ""
    meta: dict[str, str] = Field(default_factory=dict)
    checked_at: datetime = Field(default_factory=utcnow)
    ttl_s: float = Field(default=30.0, description="After this long without a check result the instance is critical.")


@runtime_checkable
class Registry(Protocol):
    """Service discovery: where agent instances are and whether their health checks pass.

    On Nomad the job's ``service`` block registers instances (provider ``consul`` or ``nomad``); the local
    scheduler registers them itself and runs the job's check, so the control plane reads both the same way.
    """

    name: str

    async def start(self) -> None:
        """Connect. Raises if already started."""

    async def stop(self) -> None:
        """Release connections. Idempotent."""

    async def register(self, instance: ServiceInstance) -> None:
        """Add or replace an instance."""

    async def set_status(self, instance: ServiceInstance) -> None:
        """Record the latest check result of a registered instance (``status``, ``output``); one the registry no
        longer has (a Consul agent restarted without its state) is registered again."""

    async def deregister(self, name: str, instance_id: str) -> None:
        """Remove an instance; removing an unknown one is not an error."""

    async def instances(self, passing_only: bool = True) -> list[ServiceInstance]:
        """Registered instances of Caravan agents, only those whose check passes unless asked otherwise."""
