"""The control plane as one long-lived component: NATS, stores, the scheduler and the services."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Coroutine, Mapping
from datetime import timedelta
from typing import Any

from nats.aio.msg import Msg

from agent.aio import cancel_and_wait
from agent.backends.base import FlagStore
from agent.protocol import BROADCAST_SUBJECT, utcnow
from agent.wire import Wire
from control.backends import create_flags, create_registry, create_scheduler
from control.backends.base import Registry, Scheduler
from control.eventids import EventIds
from control.models import Agent, ApiKey, Customer, Role, Task
from control.natsauth import AgentLogins, NatsAuth, NatsCredentials
from control.natscallout import NatsCallout
from control.natsio import NATS_UNAVAILABLE, Jet, connect
from control.services.agents import AgentService
from control.services.audit import AuditLog
from control.services.auth import AuthService, IssuedKey
from control.services.budget import BudgetHold, BudgetHolds, Clock, SystemClock
from control.services.killswitch import KillswitchService
from control.services.quotas import Quota, QuotaRecord, QuotaService, UsagePublic, within_budget
from control.services.stats import StatsService
from control.services.tasks import TaskService
from control.settings import Settings
from control.store import LargeRepo, Repo
from control.teams.dispatch import TeamTasks
from control.teams.models import Checkpoint, Team
from control.teams.runner import RunnerConfig, TeamRunner
from control.teams.service import TeamService

__all__ = ["ControlPlane"]

log = logging.getLogger("caravan.control")
TASK_SWEEP_EVERY = timedelta(hours=1)
"""How often tasks past the retention time (``task_retention_days``) are looked for."""
_DEFINITION = re.compile(r"^caravan\.ctl\.([a-z]{2}-[0-9a-f]{12})\.definition\.([a-z]{2}-[0-9a-f]{12})$")


def control_login(settings: Settings, embedded: NatsCredentials | None) -> tuple[str | None, str | None]:
    """The control plane's NATS user: its own on the embedded NATS with auth (``embedded``), else the configured
    one (if any)."""
    if embedded is not None:
        return embedded.user, embedded.password
    return settings.nats_user, settings.nats_password.get_secret_value() if settings.nats_password else None


class ControlPlane:
    """``async with ControlPlane(settings) as cp:`` connects, bootstraps and reconciles; stop() undoes it."""

    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler | None = None,
        nats_auth: NatsAuth | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``scheduler`` replaces the one the settings name (tests hand in one pointed at an API double).
        ``nats_auth`` is given when Caravan runs the NATS server itself: agents then get their own users.
        ``clock`` tells when a token budget's day ends (tests hand in one they move by hand)."""
        self.settings = settings
        self._clock: Clock = clock or SystemClock()
        self._budget: BudgetHolds | None = None
        self.nats_auth = nats_auth
        self._scheduler: Scheduler | None = scheduler
        self._flags: FlagStore | None = None
        self._registry: Registry | None = None
        self._killswitch: KillswitchService | None = None
        self._audit: AuditLog | None = None
        self._quotas: QuotaService | None = None
        self._stats: StatsService | None = None
        self._background: set[asyncio.Task[object]] = set()
        self._jet: Jet | None = None
        self._agents: AgentService | None = None
        self._tasks: TaskService | None = None
        self._auth: AuthService | None = None
        self._event_ids: EventIds | None = None
        self._teams: TeamService | None = None
        self._team_runner: TeamRunner | None = None
        self._callout: NatsCallout | None = None
        self._started = False
        self._stopped = False
        self.bootstrap_admin_key: IssuedKey | None = None

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def jet(self) -> Jet:
        if self._jet is None:
            raise RuntimeError("control plane is not started")
        return self._jet

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("control plane is not started")
        return self._scheduler

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("control plane is not started")
        return self._registry

    @property
    def killswitch(self) -> KillswitchService:
        if self._killswitch is None:
            raise RuntimeError("control plane is not started")
        return self._killswitch

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            raise RuntimeError("control plane is not started")
        return self._audit

    @property
    def stats(self) -> StatsService:
        if self._stats is None:
            raise RuntimeError("control plane is not started")
        return self._stats

    async def broadcast(self, message: str, by: str) -> None:
        """A message to every agent (``caravan.broadcast``); agents log it and acknowledge it as an event."""
        payload = json.dumps({"message": message, "by": by, "at": utcnow().isoformat()})
        await self.jet.nc.publish(BROADCAST_SUBJECT, payload.encode())
        await Wire.of(self.jet.nc).flush()  # (not nats-py's: see agent.wire)

    @property
    def quotas(self) -> QuotaService:
        if self._quotas is None:
            raise RuntimeError("control plane is not started")
        return self._quotas

    @property
    def agents(self) -> AgentService:
        if self._agents is None:
            raise RuntimeError("control plane is not started")
        return self._agents

    @property
    def tasks(self) -> TaskService:
        if self._tasks is None:
            raise RuntimeError("control plane is not started")
        return self._tasks

    @property
    def teams(self) -> TeamService:
        if self._teams is None:
            raise RuntimeError("control plane is not started")
        return self._teams

    @property
    def team_runner(self) -> TeamRunner:
        if self._team_runner is None:
            raise RuntimeError("control plane is not started")
        return self._team_runner

    @property
    def event_ids(self) -> EventIds:
        """The ids a task's events go by on the API (:mod:`control.eventids`)."""
        if self._event_ids is None:
            raise RuntimeError("control plane is not started")
        return self._event_ids

    @property
    def auth(self) -> AuthService:
        if self._auth is None:
            raise RuntimeError("control plane is not started")
        return self._auth

    @property
    def nats_callout(self) -> NatsCallout | None:
        """The answerer of NATS's auth callout, when ``nats_callout_seed`` is set (and Caravan does not run NATS)."""
        return self._callout

    @property
    def ready(self) -> bool:
        return self._started and not self._stopped and self._jet is not None and self._jet.nc.is_connected

    async def answering(self, within_s: float = 1.0) -> bool:
        """Whether the control plane is :attr:`ready` and NATS answers a round trip within ``within_s``: a server
        that stalls (paused, overloaded) keeps the connection up and answers nothing."""
        if not self.ready:
            return False
        assert self._jet is not None
        try:  # JetStream's account info: the server, and the JetStream the platform keeps its state in, answer
            # (not a flush: nats-py leaves a timed-out flush's PONG waiter behind, and the late PONG then fails
            # the connection's read loop)
            await self._jet.nc.request("$JS.API.INFO", b"", timeout=within_s)
        except NATS_UNAVAILABLE:
            return False
        return True

    async def start(self) -> None:
        """Connect, bootstrap and reconcile. A start that fails part-way stops what it started (connections,
        watchers, the scheduler's processes, leases) before it raises: ``async with`` runs no ``stop()`` for it."""
        if self._started:
            raise RuntimeError("control plane already started")
        self._started = True
        try:
            await self._start()
        except BaseException:
            try:
                await self.stop()
            except Exception:  # the start's own error is the one to raise
                log.exception("could not stop what the failed start of the control plane started")
            raise

    async def _start(self) -> None:
        user, password = control_login(self.settings, self.nats_auth.control() if self.nats_auth is not None else None)
        self._jet = jet = await connect(self.settings.nats_url, user=user, password=password)
        Wire.of(jet.nc).spin_s = self.settings.spin_us / 1e6  # the platform's setting, as its agents get it
        self._audit = AuditLog(jet.js)
        await self._audit.ensure_stream()
        self._auth = AuthService(
            Repo(jet.kv["keys"], ApiKey),
            Repo(jet.kv["customers"], Customer),
            jet.kv["system"],
            self.settings.jwt_ttl_seconds,
        )
        await self._auth.load_secret(self.settings.jwt_secret)
        self._event_ids = EventIds(self._auth.derived_key("event ids"))
        if self.settings.admin_key:
            await self._auth.issue_key(Role.ADMIN, None, api_key=self.settings.admin_key)
        elif not await self._auth.has_admin():
            self.bootstrap_admin_key = await self._auth.issue_key(Role.ADMIN, None)
        self._flags = create_flags(self.settings, jet.nc)
        await self._flags.start()
        self._registry = create_registry(self.settings, jet.nc)
        await self._registry.start()
        if self._scheduler is None:
            self._scheduler = create_scheduler(self.settings, self._registry)
        await self._scheduler.start()
        self._quotas = QuotaService(
            Repo(jet.kv["quotas"], QuotaRecord), Quota(max_agents=self.settings.max_agents_per_customer)
        )
        agents = Repo(jet.kv["agents"], Agent)
        logins: AgentLogins | None = self.nats_auth
        if logins is None and self.settings.nats_callout_seed is not None:
            # agents log in through the callout, which this control plane answers once it can read their records

            async def customer_of(agent_id: str, customer_id: str | None) -> str | None:
                agent = await agents.owned(customer_id, agent_id)  # by its key, or found among all customers'
                return agent.customer_id if agent is not None else None

            self._callout = NatsCallout(jet.nc, self.settings.nats_callout_seed.get_secret_value(), customer_of)
            logins = self._callout.logins
            await self._callout.start()
        self._agents = AgentService(agents, jet.js, self._scheduler, self.settings, self._quotas, logins)
        self._killswitch = KillswitchService(self._flags, self._registry, self._agents, self._auth, self._audit, jet.nc)
        self._budget = BudgetHolds(Repo(jet.kv["system"], BudgetHold), self._killswitch, self._clock)
        await self._budget.start()
        self._tasks = TaskService(
            Repo(jet.kv["tasks"], Task),
            jet.kv["transcripts"],
            jet.kv["task_index"],
            jet.kv["task_ended"],
            jet.js,
            self._agents,
            self._killswitch,
            self._quotas,
            self._budget_exceeded,
            jet.kv["system"],
            cancel_deadline_s=self.settings.task_cancel_deadline_s,
        )
        # the agents service is made before the killswitch and task services (which need it), so it is joined to
        # them here: no agent starts under a hard killswitch, and a deleted or failed agent's tasks end
        self._agents.attach_killswitch(self._killswitch)
        self._agents.on_delete(self._tasks.end_tasks_of_deleted)
        # and once it is gone: a task that read it before the delete and was stored after that first pass, while
        # its job stopped, found it still there (TaskService._unless_agent_went); nothing else would end that one
        self._agents.on_deleted(self._tasks.end_tasks_of_deleted)
        self._agents.on_deleted(self._killswitch.release_deleted)
        self._agents.on_failed(self._tasks.end_tasks_of_failed)
        self._stats = StatsService(
            Repo(jet.kv["agents"], Agent),
            Repo(jet.kv["tasks"], Task),
            self._quotas,
            self._scheduler,
            Repo(jet.kv["customers"], Customer),
            self.settings.task_count_interval_s,
        )
        await jet.nc.subscribe("caravan.ctl.*.definition.*", queue="caravan-control", cb=self._serve_definition)
        await self._tasks.start_tracker(self._agents.on_agent_event)
        if self.settings.task_retention_days > 0:
            self._in_background(self._sweep_tasks(timedelta(days=self.settings.task_retention_days)))
        await self._start_teams(jet)
        await self._agents.reconcile()

    async def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        if self._team_runner is not None:
            await self._team_runner.stop()
        if self._tasks is not None:
            await self._tasks.stop_tracker()
        if self._callout is not None:
            await self._callout.stop()
        for task in list(self._background):
            await cancel_and_wait(task)
        if self._stats is not None:
            await self._stats.stop()
        if self._budget is not None:
            await self._budget.stop()
        if self._scheduler is not None:
            await self._scheduler.stop()
        for backend in (self._registry, self._flags):
            if backend is not None:
                await backend.stop()
        if self._jet is not None:
            await self._jet.close()

    async def set_quota(self, customer_id: str, quota: Quota) -> UsagePublic:
        """Replace the customer's quota; if it leaves them tokens today (or has no daily budget), the budget's own
        halt on them is lifted now (audited as at the day's end), not at midnight. An operator's halt stays."""
        return await self.change_quota(customer_id, quota.model_dump())  # every field: the quota replaced

    async def change_quota(self, customer_id: str, changes: Mapping[str, Any]) -> UsagePublic:
        """Change only the quota's fields ``changes`` names (:meth:`QuotaService.change_quota`), then as
        :meth:`set_quota`."""
        usage = await self.quotas.change_quota(customer_id, changes)
        if within_budget(usage):
            assert self._budget is not None
            budget = usage.quota.tokens_per_day
            why = "no daily token budget" if budget is None else f"daily token budget set to {budget} tokens"
            await self._budget.release(customer_id, f"{why} ({usage.tokens_today} used today)")
        return usage

    async def _budget_exceeded(self, customer_id: str, total: int, budget: int) -> None:
        """A customer went over their daily token budget: engage their killswitch until the day ends (in the
        background, so that the tracker is not held while agents acknowledge) and say why and until when."""
        assert self._budget is not None
        self._in_background(self._budget.engage(customer_id, total, budget))

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sweep_tasks(self, keep: timedelta) -> None:
        """Every ``TASK_SWEEP_EVERY`` (by the clock), forget the tasks that ended longer than ``keep`` ago. Every
        replica sweeps: forgetting a task twice is forgetting it once."""
        while True:
            await self._clock.sleep_until(self._clock.now() + TASK_SWEEP_EVERY)
            try:
                forgotten = await self.tasks.sweep_finished(self._clock.now() - keep)
            except Exception:  # NATS away for a moment: swept next time
                log.exception("could not forget the tasks that ended before the retention time")
                continue
            if forgotten:
                log.info("forgot %d task(s) that ended over %s ago", forgotten, keep)

    async def _start_teams(self, jet: Jet) -> None:
        tasks, checkpoints = Repo(jet.kv["tasks"], Task), LargeRepo(jet.kv["team_state"], Checkpoint)
        self._teams = TeamService(Repo(jet.kv["teams"], Team), self.agents, tasks, self.quotas)
        self.tasks.attach_teams(TeamTasks(tasks, checkpoints, jet.js, self._teams, self.agents, self.killswitch))
        config = RunnerConfig(ack_wait_s=self.settings.team_ack_wait_s, local_model_url=self.settings.local_model_url)
        self._team_runner = TeamRunner(jet, tasks, checkpoints, self._teams, self.agents, config, self.killswitch)
        await self._team_runner.start()

    async def _serve_definition(self, msg: Msg) -> None:
        match = _DEFINITION.match(msg.subject)
        definition = await self.agents.definition(match.group(1), match.group(2)) if match else None
        if not msg.reply:
            return
        if definition is None:
            await self.jet.nc.publish(msg.reply, b"", headers={"Caravan-Error": "unknown agent"})
            return
        await self.jet.nc.publish(msg.reply, definition.model_dump_json().encode())
