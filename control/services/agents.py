"""Agents: definitions, their jobs on the scheduler, and their status."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import TypeAdapter, ValidationError

from agent.backends.base import Flag, keys_for_agent
from agent.egress import EgressRefused
from agent.protocol import (
    AGENT_STATE_EVENTS,
    TASKS_STREAM,
    AgentDefinition,
    AgentEventKind,
    Event,
    ModelConfig,
    agent_events_subject,
    consumer_name,
    required_model_key,
    task_subject,
    utcnow,
)
from control.backends.base import (
    AllocState,
    JobNotOwned,
    Scheduler,
    SchedulerError,
    SchedulerUnreachable,
    StatusUpdate,
)
from control.errors import Conflict, NotFound, Unavailable, invalid_input
from control.ids import new_id, quoted_id
from control.jobspec import agent_job, job_id_for, namespace_for
from control.models import Agent, AgentCreate, AgentRef, AgentStatus, AgentUpdate, ChangeLease
from control.natsauth import AgentLogins
from control.services.quotas import QuotaService, Reservation
from control.settings import Settings
from control.store import Conflict as StoreConflict
from control.store import Repo

__all__ = [
    "AgentHook",
    "AgentService",
    "KillswitchEngaged",
    "Killswitches",
    "SchedulerUnavailable",
    "failure",
    "why_not_serving",
]

log = logging.getLogger("caravan.agents")

LEASE_S = 120.0
"""How long one lifecycle change of an agent may take: a lease older than that is a dead control plane's, and the
next change takes it over."""
LEASE_WAIT_S = 30.0
"""How long a change waits for the one under way on the same agent before it answers busy (503, retry)."""


def _key(customer_id: str, agent_id: str) -> str:
    return f"{customer_id}.{agent_id}"


def _reservation(agent: Agent) -> Reservation:
    return Reservation.of(agent.resources, agent.replicas)


class SchedulerUnavailable(Unavailable):
    """The scheduler could not do what was asked: the agent is left meant to run, as it was (a delete has ended its
    tasks already), and the same request may be tried again."""

    code = "scheduler_unavailable"


CREATION = "no agent can be created"  # what a hard killswitch refuses a creation (naming no agent: none was stored)


class KillswitchEngaged(Conflict):
    code = "killswitch_engaged"

    def __init__(self, flag: Flag, what: str) -> None:
        """``what``: what the flag refuses (``agent ag-1 cannot run``)."""
        self.flag = flag
        super().__init__(
            f"a {'hard ' if flag.hard else ''}killswitch is engaged on {flag.key.label} "
            f"({flag.reason or 'no reason given'}): {what} until an operator releases it",
            details={"scope": flag.scope.value, "target": flag.target, "reason": flag.reason},
        )

    def creating(self) -> KillswitchEngaged:
        """The same refusal of a creation, which names no agent (none was stored)."""
        return KillswitchEngaged(self.flag, CREATION)


class Killswitches(Protocol):
    """Where the agents learn which killswitch flags are engaged (the killswitch service)."""

    async def engaged(self) -> builtins.list[Flag]:
        """Every engaged flag."""
        ...

    async def engaged_on(self, agent: Agent) -> builtins.list[Flag]:
        """The engaged flags that halt ``agent`` (its three keys read)."""
        ...


AgentHook = Callable[[Agent], Awaitable[None]]
"""Called with an agent's record when it is being deleted, has been, or has failed (:meth:`AgentService.on_delete`,
:meth:`~AgentService.on_deleted`, :meth:`~AgentService.on_failed`)."""


def failure(agent: Agent) -> str:
    """The word "failed", with the reason the agent's status gives in brackets if it gives one (follows "agent
    <id>")."""
    return f"failed ({agent.status_reason})" if agent.status_reason else "failed"


def why_not_serving(agent: Agent) -> str | None:
    """What ``agent`` is, that it cannot be given a task now, and what to do (None: it can be): it is meant to stop,
    is stopped or killed, or has failed (its job gave up, or the scheduler refused it) and runs again only once it
    is started. Follows "agent <id> is"."""
    if agent.status is AgentStatus.FAILED:
        return f"{failure(agent)}; start it again (POST /v1/agents/{agent.id}/start) to give it tasks"
    if agent.status in (AgentStatus.STOPPED, AgentStatus.KILLED):
        return f"{agent.status.value}; start it before giving it tasks"
    if agent.desired != "running":  # (its status is still the one it had: `running`, say)
        return "being stopped or deleted; start it once it has stopped to give it tasks"
    return None


class AgentService:
    def __init__(
        self,
        repo: Repo[Agent],
        js: JetStreamContext,
        scheduler: Scheduler,
        settings: Settings,
        quotas: QuotaService,
        nats_auth: AgentLogins | None = None,
    ) -> None:
        self._nats_auth = nats_auth
        self._repo = repo
        self._js = js
        self._scheduler = scheduler
        self._settings = settings
        self._quotas = quotas
        self._killswitches: Killswitches | None = None
        self._delete_hooks: builtins.list[AgentHook] = []
        self._deleted_hooks: builtins.list[AgentHook] = []
        self._fail_hooks: builtins.list[AgentHook] = []
        scheduler.on_status(self._on_scheduler_status)

    def attach_killswitch(self, killswitches: Killswitches) -> None:
        """Refuse to create or start an agent while an engaged hard killswitch covers it (see :meth:`start`)."""
        self._killswitches = killswitches

    def on_delete(self, hook: AgentHook) -> None:
        """Call ``hook`` for every agent being deleted: once it is given no more work, before its job is stopped
        and its record goes. A hook that raises fails the delete (the agent is left meant to run, as it was),
        which a retry then does again in full."""
        self._delete_hooks.append(hook)

    def on_deleted(self, hook: AgentHook) -> None:
        """Call ``hook`` for every agent deleted, once its job is stopped and its record gone (what is kept about it
        elsewhere, for which nothing of it is left to answer). A hook that raises is logged: the delete stands."""
        self._deleted_hooks.append(hook)

    def on_failed(self, hook: AgentHook) -> None:
        """Call ``hook`` with an agent's record once it has become ``failed`` (its job gave up, or the scheduler
        refused it): nothing serves its work until it is started again. Called by the writer of that status only."""
        self._fail_hooks.append(hook)

    def admit_model(self, model: ModelConfig, *where: str) -> None:
        """Refuse (422) a model that the platform cannot call: its provider's key (or, for ``local``, the local
        model) is not here, so every task would fail; the agent also checks at its start, in case the key went
        since. And one whose ``base_url`` points into the platform's own network (agent/egress.py), as it is
        written: the agent's connections are checked again as they are made. ``where``: the model's path in the
        request (``model`` by default)."""
        where = where or ("model",)
        if (missing := self._unavailable(model)) is not None:
            raise invalid_input([{"loc": (*where, "provider"), "msg": missing, "type": "model_unavailable"}])
        if model.base_url is not None:
            try:
                self._settings.egress.check_url(model.base_url)
            except EgressRefused as refused:
                loc = (*where, "base_url")
                raise invalid_input([{"loc": loc, "msg": str(refused), "type": "egress_refused"}]) from None

    def _unavailable(self, model: ModelConfig) -> str | None:
        """Why the platform cannot call ``model`` (None: it can, as far as it knows)."""
        if model.provider == "local" and not self._settings.local_model_url:
            return (
                "provider 'local' is not available here: this platform runs no local model "
                "(CARAVAN_LOCAL_MODEL_URL is not set; `caravan up` sets it when it runs one)"
            )
        key = required_model_key(model)
        if key is not None and not os.environ.get(key):  # (where the schedulers read the key each agent gets)
            return (
                f"provider {model.provider!r} is not available here: this platform has no {key} (its operator sets "
                "it where the control plane runs); choose another provider"
            )
        return None

    async def create(self, customer_id: str, spec: AgentCreate) -> Agent:
        """Admit, store and submit a new agent. If it cannot be stored, everything done for it is undone: its work
        queue's consumer, its record and its quota reservation. Its record holds the change lease (see
        :meth:`_changing`) until its job is submitted, so a PATCH at once is not overtaken by this submission."""
        agent_id = new_id("ag")
        owner = secrets.token_hex(8)
        agent = Agent(
            id=agent_id,
            customer_id=customer_id,
            job_id=job_id_for(agent_id),
            namespace=namespace_for(customer_id),
            lease=_lease(owner),
            **spec.model_dump(),
        )
        self.admit_model(agent.model)
        job = self.render(agent)  # a definition that cannot render is refused before anything is stored
        await self._refuse_under_hard_killswitch(agent, refusing=CREATION)
        await self._quotas.reserve_agent(customer_id, agent_id, _reservation(agent))
        try:
            await self._ensure_consumer(agent)
            await self._repo.create(_key(customer_id, agent_id), agent)
        except BaseException:  # nothing of it is left: its consumer, its record (if stored), its reservation
            await self._forget(agent)
            raise
        try:
            agent = await self._submit(agent, job)
        except KillswitchEngaged as exc:  # a hard killswitch engaged since the check above: refused, nothing is left
            await self._forget(agent)
            raise exc.creating() from None
        finally:
            released = await self._release_lease(agent, owner)
        return released or agent

    async def get(self, customer_id: str | None, agent_id: str) -> Agent:
        """A customer's agent (another tenant's IDs are simply not found), or any agent for admins (None)."""
        agent = await self._repo.owned(customer_id, agent_id)
        if agent is None:
            raise NotFound(f"agent {quoted_id(agent_id)} not found")
        return agent

    async def list(self, customer_id: str | None) -> list[Agent]:
        agents = await self._repo.list(f"{customer_id}.*" if customer_id else ">")
        return sorted(agents, key=lambda a: a.created_at)

    def render(self, agent: Agent) -> dict[str, Any]:
        return agent_job(agent, self._settings)

    async def update(self, customer_id: str | None, agent_id: str, change: AgentUpdate) -> Agent:
        """Apply the fields the client sent (and only those, within ``resources`` too) to the agent as it is, under
        the change lease: a PATCH never undoes another one's fields, and a start or stop cannot come between its
        quota check and its submission. An agent meant to run gets its new version submitted: a ``failed`` one runs
        again, with its new definition (as :meth:`start` would), unless a hard killswitch covers it, which refuses
        the change before anything is stored."""
        sent = change.model_dump(exclude_unset=True)
        async with self._changing(customer_id, agent_id) as current:
            stored = current.model_dump(include=set(AgentCreate.model_fields))
            merged = {**stored, **sent}
            # within resources only the fields sent; a model is replaced whole (its fields depend on its provider: a
            # base_url only for ollama, responses only for replay)
            if "resources" in sent:
                merged["resources"] = {**stored["resources"], **sent["resources"]}
            try:
                spec = AgentCreate.model_validate(merged)
            except ValidationError as exc:  # what only the whole definition refuses: as the request's own fields are
                raise invalid_input(exc.errors()) from exc
            fields = {name: getattr(spec, name) for name in sent}
            if "model" in fields:
                self.admit_model(spec.model)
            self.render(current.model_copy(update=fields))  # refuse before storing if it cannot render
            # a running agent holds its new resources and replicas before its new definition is stored: a change
            # the quota refuses stores nothing, and one that cannot be stored gives back what it reserved
            reserved = Reservation.of(spec.resources, spec.replicas)
            running = current.desired == "running"
            previous = None
            if running:  # (a failed agent, which no killswitch stopped: its job would run again)
                await self._refuse_under_hard_killswitch(current)
                previous = await self._quotas.reserve_running(current.customer_id, current.id, reserved)

            def apply(agent: Agent) -> Agent:
                return agent.model_copy(update={**fields, "version": agent.version + 1, "updated_at": utcnow()})

            try:
                updated = await self._repo.update(_key(current.customer_id, current.id), apply)
                if updated is None:
                    raise NotFound(f"agent {quoted_id(agent_id)} not found")
            except BaseException:
                if running:
                    await self._quotas.restore_running(current.customer_id, current.id, previous, reserved)
                raise
            if updated.desired == "running":
                updated = await self._submit(updated, self.render(updated))
        return updated

    async def stop(
        self,
        customer_id: str | None,
        agent_id: str,
        status: AgentStatus = AgentStatus.STOPPED,
        reason: str = "stopped on request",
        force: bool = False,
    ) -> Agent:
        """Stop the agent's job and give back what it held. If the scheduler cannot stop the job, the agent is left
        meant to run, holding its quota, and :class:`SchedulerUnavailable` says why: a retry stops it again.
        ``force`` (a hard killswitch) does not wait for a change of the agent under way (see :meth:`_changing`)."""
        async with self._changing(customer_id, agent_id, force) as agent:
            return await self._stop(agent, status, reason)

    async def start(self, customer_id: str | None, agent_id: str) -> Agent:
        """Run a stopped (or failed) agent's job again. Refused (:class:`KillswitchEngaged`) while a hard killswitch
        covers the agent: it stopped the job, and only its release lets the job run again. A soft killswitch does
        not stop jobs, nor refuse this: the agent starts halted, as every agent under an engaged flag does.
        Under the change lease: what it reserves is what it submits (a PATCH waits its turn, and then reserves
        its own change)."""
        async with self._changing(customer_id, agent_id) as agent:
            if agent.desired == "running" and agent.status in (AgentStatus.STARTING, AgentStatus.RUNNING):
                return agent
            await self._refuse_under_hard_killswitch(agent)
            await self._quotas.reserve_running(agent.customer_id, agent.id, _reservation(agent))
            agent = await self._set(agent, desired="running", status=AgentStatus.PENDING, status_reason=None)
            await self._ensure_consumer(agent)
            return await self._submit(agent, self.render(agent))

    async def delete(self, customer_id: str | None, agent_id: str) -> Agent:
        """Stop the agent, ending what it was given (the delete hooks: its unfinished tasks end, saying why), then
        forget it; returns it as it was last. If the scheduler cannot stop its job, nothing more is done
        (:class:`SchedulerUnavailable`)."""
        async with self._changing(customer_id, agent_id) as agent:
            agent = await self._stop(agent, AgentStatus.STOPPED, "stopped to be deleted", self._delete_hooks)
            await self._forget(agent)
        for hook in self._deleted_hooks:
            try:
                await hook(agent)
            except Exception:
                log.exception("agent %s was deleted, and a hook on its deletion did not complete", agent.id)
        return agent

    async def definition(self, customer_id: str, agent_id: str) -> AgentDefinition | None:
        agent = await self._repo.get(_key(customer_id, agent_id))
        if agent is None:
            return None
        return AgentDefinition(
            agent_id=agent.id,
            customer_id=agent.customer_id,
            name=agent.name,
            system_message=agent.system_message,
            model=agent.model,
            tools=agent.tools,
        )

    async def reconcile(self) -> None:
        """After a restart: put back every agent that should run and that the scheduler does not know, but one that
        failed (given up on: only a start runs it again). Each agent on its own: one that cannot be put back is
        logged and left ``failed``, saying why, and the others are put back all the same. A scheduler that cannot
        be reached when asked for an agent's job (:class:`SchedulerUnreachable`) stops it there and is raised (the
        start fails): that agent and those not yet put back are left as they were, meant to run, for the next
        start to put back."""
        agents = await self.list(None)
        if self._nats_auth is not None:
            self._nats_auth.set_agents({a.id: a.customer_id for a in agents})
        held: dict[str, dict[str, tuple[Reservation, Reservation]]] = {}
        for agent in agents:
            if agent.desired == "running" and agent.replicas > 1:
                share = Reservation.of(agent.resources, 1)
                held.setdefault(agent.customer_id, {})[agent.id] = (_reservation(agent), share)
        for customer_id, reservations in held.items():  # reservations made before they counted every replica
            await self._quotas.correct_running(customer_id, reservations)
        engaged = await self._killswitches.engaged() if self._killswitches is not None else []
        for agent in agents:
            if agent.desired != "running" or agent.status is AgentStatus.FAILED:
                continue
            try:
                await self._ensure_consumer(agent)  # as this version sets it, also for one whose job runs on
                if await self._scheduler.job_status(agent.namespace, agent.job_id) is not None:
                    continue
                with contextlib.suppress(KillswitchEngaged):  # (the agent is left killed, saying so)
                    await self._submit(agent, self.render(agent), engaged)
            except SchedulerUnreachable as exc:
                log.error(
                    "the scheduler cannot be reached to put agent %s back (%s); the agents not yet put back "
                    "are left meant to run, for the next start",
                    agent.id,
                    exc,
                )
                raise
            except Exception as exc:
                log.error(
                    "agent %s could not be put back: %s", agent.id, exc, exc_info=not isinstance(exc, SchedulerError)
                )
                with contextlib.suppress(NotFound):  # (deleted meanwhile: nothing is left to fail)
                    await self._fail(agent, f"could not be put back after the control plane restarted: {exc}")

    async def on_agent_event(self, event: Event) -> None:
        """An agent said it is ready, or that the killswitch halted or resumed it."""
        if event.agent_id is None or event.kind not in AGENT_STATE_EVENTS:
            return
        halted = bool(event.data.get("halted"))
        status, reason = (AgentStatus.KILLED, event.data.get("reason")) if halted else (AgentStatus.RUNNING, None)
        reason = None if reason is None else str(reason)
        was: builtins.list[str] = []

        # a patch of the stored JSON: every agent acknowledges each killswitch change, fifty at once
        def apply(agent: dict[str, Any]) -> dict[str, Any] | None:
            was[:] = []
            if agent.get("desired") != "running" or (agent.get("status"), agent.get("status_reason")) == (
                status.value,
                reason,
            ):
                return None
            was[:] = [agent["status"]]
            return {**agent, "status": status.value, "status_reason": reason, "updated_at": _json_now()}

        if await self._repo.patch(_key(event.customer_id, event.agent_id), apply):  # changed: ``was`` is set
            await self._publish_status(event.customer_id, event.agent_id, status, reason, AgentStatus(was[0]))

    async def live(self) -> builtins.list[AgentRef]:
        """Agents meant to run and not given up on: who a killswitch engagement covers."""
        refs = await self._repo.list_as(AgentRef)
        return [a for a in refs if a.desired == "running" and a.status in _LIVE]

    async def _on_scheduler_status(self, update: StatusUpdate) -> None:
        customer_id, agent_id = update.meta.get("caravan_customer"), update.meta.get("caravan_agent")
        if not customer_id or not agent_id:
            return
        if update.state is AllocState.FAILED and await self._other_replicas_serve(update):
            log.warning("agent %s: replica %s failed (%s); the others serve", agent_id, update.alloc_id, update.reason)
            return  # the agent has not failed: its tasks go on, on the replicas that run

        def apply(agent: Agent) -> Agent | None:
            if agent.job_id != update.job_id:
                return None
            status = _status_for(agent, update.state)
            if status is None:
                return None
            return agent.model_copy(update={"status": status, "status_reason": update.reason, "updated_at": utcnow()})

        changed = await self._repo.change(_key(customer_id, agent_id), apply)
        if changed is None:
            return
        before, updated = changed
        await self._announce(before, updated)
        if updated.status is AgentStatus.FAILED and before.status is not AgentStatus.FAILED:
            await self._failed(updated)

    async def _other_replicas_serve(self, update: StatusUpdate) -> bool:
        """Whether another allocation of the job of ``update`` runs or is on its way (an agent with replicas)."""
        try:
            status = await self._scheduler.job_status(update.namespace, update.job_id)
        except SchedulerError:
            return False  # unknown: the failure is the agent's, as it was reported
        return status is not None and any(
            alloc_id != update.alloc_id and state not in (AllocState.FAILED, AllocState.STOPPED)
            for alloc_id, state in status.allocs.items()
        )

    async def _submit(self, agent: Agent, job: dict[str, Any], engaged: builtins.list[Flag] | None = None) -> Agent:
        """Submit the agent's job, unless a hard killswitch covers it: looked at again (the engaged flags, read
        now unless given), as one engaged since the caller looked stopped what ran then, not this."""
        try:
            await self._refuse_under_hard_killswitch(agent, engaged)
        except KillswitchEngaged as exc:
            await self._quotas.release_running(agent.customer_id, agent.id)
            await self._set(agent, desired="stopped", status=AgentStatus.KILLED, status_reason=exc.message)
            raise
        if agent.status in (AgentStatus.FAILED, AgentStatus.STOPPED, AgentStatus.PENDING):
            # before the scheduler reports: a status it reports while submitting (a placement that failed,
            # a task that already exited) must not be overwritten afterwards
            agent = await self._set(agent, status=AgentStatus.STARTING, status_reason=None)
        try:
            result = await self._scheduler.submit(job, self._secrets(agent))
        except SchedulerError as exc:  # JobNotOwned included
            return await self._fail(
                agent, str(exc) if isinstance(exc, JobNotOwned) else f"scheduler refused the job: {exc}"
            )

        def submitted(current: Agent) -> Agent:
            return current.model_copy(update={"scheduler": result.handles(), "updated_at": utcnow()})

        updated = await self._repo.update(_key(agent.customer_id, agent.id), submitted)
        return updated or agent

    async def _stop(
        self, agent: Agent, status: AgentStatus, reason: str, before: builtins.list[AgentHook] | None = None
    ) -> Agent:
        # meant to stop first: it is given no new task, and what the scheduler reports while it stops reads so
        await self._set(agent, desired="stopped")
        try:
            for hook in before or ():  # while the job still runs: an agent still hears its tasks cancelled
                await hook(agent)
            await self._scheduler.stop_job(agent.namespace, agent.job_id)
        except BaseException as exc:
            await self._undo_stopping(agent)
            if isinstance(exc, JobNotOwned):
                raise Conflict(str(exc)) from exc
            if isinstance(exc, SchedulerError):
                raise SchedulerUnavailable(
                    f"the scheduler could not stop agent {agent.id}'s job: {exc}; the agent is still meant to run "
                    "and holds its quota (retry)"
                ) from exc
            raise
        await self._quotas.release_running(agent.customer_id, agent.id)
        return await self._set(agent, status=status, status_reason=reason)

    async def _fail(self, agent: Agent, reason: str) -> Agent:
        """Leave the agent ``failed``, saying why (``reason``): what it held is given back, and its work ends."""
        await self._quotas.release_running(agent.customer_id, agent.id)
        failed = await self._set(agent, status=AgentStatus.FAILED, status_reason=reason)
        await self._failed(failed)
        return failed

    async def _failed(self, agent: Agent) -> None:
        for hook in self._fail_hooks:
            try:
                await hook(agent)
            except Exception:  # the agent is failed all the same; its work waits for it to be started again
                log.exception("agent %s failed, and a hook on its failure did not complete", agent.id)

    async def _forget(self, agent: Agent) -> None:
        """Remove all there is of the agent but its job: its work queue's consumer, its record, its quota."""
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(TASKS_STREAM, consumer_name(agent.id))
        await self._repo.delete(_key(agent.customer_id, agent.id))
        await self._quotas.release_agent(agent.customer_id, agent.id)
        if self._nats_auth is not None:
            self._nats_auth.remove_agent(agent.id)

    @contextlib.asynccontextmanager
    async def _changing(self, customer_id: str | None, agent_id: str, force: bool = False) -> AsyncIterator[Agent]:
        """One lifecycle change of an agent at a time, whichever control-plane replica makes it: the change takes the
        lease on the agent's record (waiting for the one under way, up to ``LEASE_WAIT_S``, then busy: 503, retry)
        and works from the record as it is then. Only a change holds the lease, so no other change's write to the
        definition, the desired state or the quota reservation of the agent comes between its reading, its quota
        check and its submission (status reports do, and change none of these). The lease goes when the change
        ends, however it ends; one left by a control plane that died goes after ``LEASE_S``. With ``force`` (a hard
        killswitch) the lease is taken over at once: a change under way that then submits the job finds the hard
        flag in :meth:`_submit`."""
        agent = await self.get(customer_id, agent_id)
        key, owner = _key(agent.customer_id, agent.id), secrets.token_hex(8)

        def take(current: Agent) -> Agent | None:
            if not force and current.lease is not None and current.lease.until > utcnow():
                return None
            return current.model_copy(update={"lease": _lease(owner)})

        deadline, attempt = time.monotonic() + LEASE_WAIT_S, 0
        while True:
            stored = await self._repo.update(key, take)
            if stored is None:
                raise NotFound(f"agent {quoted_id(agent_id)} not found")
            if stored.lease is not None and stored.lease.owner == owner:
                break
            if time.monotonic() >= deadline:
                raise StoreConflict(f"agent {agent.id} is being changed by another request; retry")
            attempt += 1
            await asyncio.sleep(random.uniform(0.005, min(0.01 * attempt, 0.2)))
        try:
            yield stored
        finally:
            await asyncio.shield(self._release_lease(stored, owner))

    async def _release_lease(self, agent: Agent, owner: str) -> Agent | None:
        def release(current: Agent) -> Agent | None:
            if current.lease is None or current.lease.owner != owner:
                return None
            return current.model_copy(update={"lease": None})

        return await self._repo.update(_key(agent.customer_id, agent.id), release)

    async def _undo_stopping(self, agent: Agent) -> None:
        """A stop that did not happen: the agent is meant to be as it was before it (unless changed meanwhile)."""
        if agent.desired == "stopped":
            return

        def undo(current: Agent) -> Agent | None:
            if current.desired != "stopped":
                return None
            return current.model_copy(update={"desired": agent.desired, "updated_at": utcnow()})

        await self._repo.update(_key(agent.customer_id, agent.id), undo)

    async def _refuse_under_hard_killswitch(
        self, agent: Agent, engaged: builtins.list[Flag] | None = None, *, refusing: str = ""
    ) -> None:
        """Raise :class:`KillswitchEngaged` while a hard flag covers ``agent``; ``refusing``: what is refused
        (default: that the agent runs)."""
        if self._killswitches is None:
            return
        if engaged is None:
            engaged = await self._killswitches.engaged_on(agent)
        keys = keys_for_agent(agent.customer_id, agent.id)
        flag = next((f for f in engaged if f.hard and f.key in keys), None)
        if flag is None:
            return
        raise KillswitchEngaged(flag, refusing or f"agent {agent.id} cannot run")

    def _secrets(self, agent: Agent) -> dict[str, str]:
        """What the agent's task gets by the scheduler's secret channel: its own NATS credentials, if any."""
        if self._nats_auth is None:
            return {}
        self._nats_auth.add_agent(agent.customer_id, agent.id)
        return self._nats_auth.agent(agent.id).env()

    async def _set(self, agent: Agent, **fields: Any) -> Agent:
        changed = await self._repo.change(
            _key(agent.customer_id, agent.id), lambda a: a.model_copy(update={**fields, "updated_at": utcnow()})
        )
        if changed is None:
            raise NotFound(f"agent {agent.id!r} not found")
        await self._announce(*changed)
        return changed[1]

    async def _announce(self, before: Agent, after: Agent) -> None:
        """Publish the agent's new status, if it or its reason changed, as its event ``status`` (on ``caravan.events.
        <customer>.agent.<agent>``, stored in the events' stream), shaped as a task's: ``content`` the status,
        ``data`` = {reason, was}. The status is stored already: a publish that fails is logged, not raised."""
        if (before.status, before.status_reason) != (after.status, after.status_reason):
            await self._publish_status(after.customer_id, after.id, after.status, after.status_reason, before.status)

    async def _publish_status(
        self, customer_id: str, agent_id: str, status: AgentStatus, reason: str | None, was: AgentStatus
    ) -> None:
        event = Event(
            kind=AgentEventKind.STATUS,
            customer_id=customer_id,
            agent_id=agent_id,
            content=status.value,
            data={"reason": reason, "was": was.value},
        )
        try:
            await self._js.publish(agent_events_subject(customer_id, agent_id), event.model_dump_json().encode())
        except Exception as exc:
            log.warning("agent %s is %s; its status event was not published: %s", agent_id, status.value, exc)

    async def _ensure_consumer(self, agent: Agent) -> None:
        config = ConsumerConfig(
            durable_name=consumer_name(agent.id),
            filter_subject=task_subject(agent.customer_id, agent.id),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._settings.task_ack_wait_s,
            max_deliver=-1,  # however often it comes back, an agent ends it after TASK_ATTEMPTS runs (never stuck)
            max_ack_pending=1000,
        )
        await self._js.add_consumer(TASKS_STREAM, config)


def _lease(owner: str) -> ChangeLease:
    return ChangeLease(owner=owner, until=utcnow() + timedelta(seconds=LEASE_S))


_LIVE = (AgentStatus.STARTING, AgentStatus.RUNNING, AgentStatus.KILLED)
_DATETIME = TypeAdapter(datetime)


def _json_now() -> Any:
    return _DATETIME.dump_python(utcnow(), mode="json")  # as the model writes it


def _status_for(agent: Agent, state: AllocState) -> AgentStatus | None:
    if state in (AllocState.PENDING, AllocState.STARTING, AllocState.RESTARTING):
        return AgentStatus.STARTING if agent.desired == "running" else None
    if state is AllocState.RUNNING:
        return None  # the process is up; the agent itself says when it is ready
    if state is AllocState.FAILED:
        return AgentStatus.FAILED
    if state is AllocState.STOPPED:
        return AgentStatus.STOPPED if agent.desired == "stopped" and agent.status != AgentStatus.KILLED else None
    return None
