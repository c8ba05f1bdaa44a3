"""The killswitch: engage or release a flag at scope all / customer / agent, then wait (bounded) for the
covered agents to acknowledge; with ``hard``, stop their jobs too. Every change is audited and published."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Annotated

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, model_validator

from agent.backends.base import Flag, FlagKey, FlagStore, Scope, keys_for_agent
from agent.protocol import AgentEventKind, Event, event_on_its_subject
from control.backends.base import Registry
from control.errors import CaravanError, Conflict, Invalid, NotFound
from control.models import Agent, AgentRef, AgentStatus, Role, Visible
from control.services.agents import AgentService, KillswitchEngaged
from control.services.audit import AuditLog, AuditRecord, describe_error
from control.services.auth import AuthService, Principal

__all__ = [
    "MAX_WAIT_MS",
    "FlagHeld",
    "JobsNotStopped",
    "KillswitchRequest",
    "KillswitchResult",
    "KillswitchService",
    "covers",
    "first_covering",
]

log = logging.getLogger("caravan.killswitch")

MAX_WAIT_MS = 30_000
"""The longest a killswitch request may wait for acknowledgements."""
_STOPS_AT_ONCE = 8
"""Jobs a hard killswitch stops at once (each may take the job's kill timeout)."""

Reason = Annotated[
    str,
    StringConstraints(max_length=500),
    Visible,
    Field(description="Shown on one line (status, audit): no control, format or line-break characters."),
]


class KillswitchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: Scope
    customer_id: str | None = Field(default=None, max_length=64)
    agent_id: str | None = Field(default=None, max_length=64)
    engaged: StrictBool = True  # JSON's true or false: "yes" or "false" is refused, not taken for a flag
    reason: Reason = ""
    hard: StrictBool = Field(default=False, description="Also stop the covered agents' jobs.")
    wait_ms: StrictInt = Field(default=2000, ge=0, le=MAX_WAIT_MS, description="How long to wait for acknowledgements.")

    @model_validator(mode="after")
    def _target(self) -> KillswitchRequest:
        if self.scope is Scope.ALL and (self.customer_id or self.agent_id):
            raise ValueError("scope 'all' takes neither customer_id nor agent_id")
        if self.scope is Scope.CUSTOMER and (not self.customer_id or self.agent_id):
            raise ValueError("scope 'customer' needs customer_id (and no agent_id)")
        if self.scope is Scope.AGENT and not self.agent_id:
            raise ValueError("scope 'agent' needs agent_id")
        if self.hard and not self.engaged:
            raise ValueError("hard applies to engaging only")
        if self.engaged and not self.reason.strip():  # (what an engagement with no field but its scope did)
            raise ValueError("an engagement needs a reason: it is shown to agents, in status and in the audit log")
        return self

    @property
    def key(self) -> FlagKey:
        target = {Scope.ALL: None, Scope.CUSTOMER: self.customer_id, Scope.AGENT: self.agent_id}[self.scope]
        return FlagKey(self.scope, target)


class KillswitchResult(BaseModel):
    engaged: bool
    scope: Scope
    target: str | None
    flag_id: str | None
    covered: int = Field(description="Agents the flag covers that were running.")
    acknowledged: int
    unacknowledged: list[str]
    stopped: list[str] = Field(default_factory=list, description="Agents whose jobs were stopped (hard).")
    not_stopped: dict[str, str] = Field(
        default_factory=dict, description="Agents whose jobs could not be stopped (hard), with why."
    )
    elapsed_ms: float = Field(description="From writing the flag to the last acknowledgement (or the deadline).")
    nothing_to_release: bool = Field(
        default=False,
        description="A release that found no flag engaged at its scope: it changed nothing and waited for no agent.",
    )


_AGENT_DELETED = Principal(Role.ADMIN, None, "system:agent-deleted")
"""Who releases the flag of an agent that was deleted (:meth:`KillswitchService.release_deleted`)."""

_RECORDED = {"flag_id", "covered", "acknowledged", "unacknowledged", "stopped", "not_stopped", "nothing_to_release"}


class FlagHeld(Conflict):
    """A conditional engage or release found another engagement in its place (:meth:`KillswitchService.apply`)."""


class JobsNotStopped(CaravanError):
    """A hard engagement is in force, but some of the covered agents' jobs could not be stopped: ``details`` is
    the :class:`KillswitchResult`, ``not_stopped`` naming them with why."""

    status = 502
    code = "jobs_not_stopped"


def covers(key: FlagKey, agent: Agent | AgentRef) -> bool:
    if key.scope is Scope.ALL:
        return True
    if key.scope is Scope.CUSTOMER:
        return agent.customer_id == key.target
    return agent.id == key.target


def first_covering(engaged: Iterable[Flag], agent: Agent | AgentRef) -> Flag | None:
    """The first of the ``engaged`` flags that halts ``agent``, if any."""
    return next((f for f in engaged if covers(f.key, agent)), None)


class KillswitchService:
    def __init__(
        self,
        flags: FlagStore,
        registry: Registry,
        agents: AgentService,
        auth: AuthService,
        audit: AuditLog,
        nc: NATS,
    ) -> None:
        self._flags = flags
        self._registry = registry
        self._agents = agents
        self._auth = auth
        self._audit = audit
        self._nc = nc

    async def engaged(self) -> list[Flag]:
        return sorted((f for f in await self._flags.list() if f.engaged), key=lambda f: f.key)

    async def engaged_on(self, agent: Agent) -> list[Flag]:
        """The engaged flags that halt ``agent``, in :meth:`engaged`'s order: its three keys read, not every flag."""
        flags = await self._flags.read(keys_for_agent(agent.customer_id, agent.id))
        return sorted((f for f in flags if f.engaged), key=lambda f: f.key)

    async def covering(self, agent: Agent) -> Flag | None:
        """The engaged flag that halts ``agent``, if any."""
        return first_covering(await self.engaged_on(agent), agent)

    async def ensure_not_halted(self, agent: Agent) -> None:
        """Refuse work for ``agent`` while a killswitch halts it: :class:`KillswitchEngaged` (409
        ``killswitch_engaged``, with the flag's scope, target and reason), as an agent that cannot start is refused."""
        flag = await self.covering(agent)
        if flag is not None:
            raise KillswitchEngaged(flag, f"agent {agent.id} ({agent.name}) takes no task")

    async def apply(
        self,
        principal: Principal,
        request: KillswitchRequest,
        *,
        unless_engaged: bool = False,
        only: str | None = None,
    ) -> KillswitchResult:
        """Engage or release, wait for the acknowledgements, and with ``hard`` stop the covered agents' jobs. A
        release that finds nothing engaged at its scope changes nothing and answers at once (``nothing_to_release``).

        Audited whatever happens, a failure with its error. A job that cannot be stopped does not keep the others
        from being stopped: the engagement is recorded and published all the same, then :class:`JobsNotStopped`
        says which jobs still run. ``unless_engaged``: engage only where no flag is engaged; ``only``: release only
        that engagement (what the token budget does, which must not replace nor lift an operator's); otherwise
        :class:`FlagHeld`, with nothing written."""
        key = request.key
        action = "killswitch.engage" if request.engaged else "killswitch.release"
        async with self._audit.admin_action(principal, action, request.customer_id, key.target or "all") as record:
            record.details.update(scope=key.scope.value, target=key.target, reason=request.reason, hard=request.hard)
            record.customer_id = await self._validated_customer(request)
            result = await self._switch(principal, request, record, unless_engaged, only)
            record.details.update(result.model_dump(mode="json", include=_RECORDED))
            failure = _not_stopped(result) if result.not_stopped else None
            if failure is not None:
                record.result = "failed"
                record.details["error"] = describe_error(failure)
            event = Event(
                kind="killswitch",
                customer_id=record.customer_id or "platform",
                data={**record.details, "by": principal.subject, "engaged": request.engaged},
            )
            await self._nc.jetstream().publish("caravan.events.platform.killswitch", event.model_dump_json().encode())
        if failure is not None:
            raise failure
        return result

    async def _switch(
        self,
        principal: Principal,
        request: KillswitchRequest,
        record: AuditRecord,
        unless_engaged: bool = False,
        only: str | None = None,
    ) -> KillswitchResult:
        key = request.key
        if request.engaged and not request.hard and not unless_engaged:
            held = next((f for f in await self.engaged() if f.key == key and f.hard), None)
            if held is not None:  # owners could start its agents again: an engagement never weakens another
                raise FlagHeld(
                    f"the killswitch on {key.label} is hard ({held.reason}, by {held.by}): a soft one in its place "
                    "would let owners start its agents again; engage it with hard, or release it first"
                )
        if request.engaged:
            flag_id: str | None = uuid.uuid4().hex
        elif only is not None:
            flag_id = only
        else:  # acknowledgements of a release name what is still engaged: the released flag must not be there
            previous = next((f for f in await self.engaged() if f.key == key), None)
            if previous is None:  # no agent has anything to acknowledge: waiting for them would only time out
                return KillswitchResult(
                    engaged=False,
                    scope=key.scope,
                    target=key.target,
                    flag_id=None,
                    covered=0,
                    acknowledged=0,
                    unacknowledged=[],
                    elapsed_ms=0.0,
                    nothing_to_release=True,
                )
            flag_id = previous.id
        acked: dict[str, set[str]] = defaultdict(set)  # agent id -> instances that acknowledged
        expected: dict[str, set[str]] | None = None  # covered agent id -> instances discovery knows
        done = asyncio.Event()

        def complete() -> bool:
            return expected is not None and all(
                acked[a] >= instances if instances else bool(acked[a]) for a, instances in expected.items()
            )

        async def on_event(msg: Msg) -> None:
            event = Event.model_validate_json(msg.data)
            if event.kind != AgentEventKind.KILLSWITCH or event.agent_id is None:
                return
            if not event_on_its_subject(msg.subject, event):  # another customer's agent's, said by a forger
                return
            ids = event.data.get("flag_ids") or []
            if (flag_id in ids) if request.engaged else (flag_id not in ids):
                acked[event.agent_id].add(str(event.data.get("alloc_id") or ""))
                if complete():
                    done.set()

        # Listen first, then write the flag, and only then find out whom it covers: the agents' answers
        # arrive while the control plane is still looking that up, instead of after.
        sub = await self._nc.subscribe("caravan.events.*.agent.*", cb=on_event)
        try:
            if request.engaged:
                flag = Flag(
                    scope=key.scope,
                    target=key.target,
                    reason=request.reason,
                    by=principal.subject,
                    id=flag_id or "",
                    hard=request.hard,
                )
                started = time.perf_counter()
                if not unless_engaged:
                    await self._flags.put(flag)
                elif not await self._flags.put_unless_engaged(flag):
                    raise FlagHeld(f"{key.label} is halted by another engagement: left as it is")
            else:
                started = time.perf_counter()
                if only is None:
                    await self._flags.delete(key)
                elif not await self._flags.delete_if(key, only):
                    raise FlagHeld(f"{key.label} is halted by another engagement than {only}: left as it is")
            record.details["flag_id"] = flag_id  # written: a failure from here on leaves it so, and says which
            covered = [a for a in await self._agents.live() if covers(key, a)]
            expected = await self._expected_instances(covered)
            if covered and not complete():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout=request.wait_ms / 1000)
        finally:
            await sub.unsubscribe()
        assert expected is not None
        missing = sorted(
            a for a, instances in expected.items() if not (acked[a] >= instances if instances else acked[a])
        )
        stopped: list[str] = []
        not_stopped: dict[str, str] = {}
        if request.engaged and request.hard:
            stopping = asyncio.Semaphore(_STOPS_AT_ONCE)

            async def stop(agent: AgentRef) -> None:
                async with stopping:
                    try:  # a change of the agent under way does not hold this back (force)
                        await self._agents.stop(
                            None,
                            agent.id,
                            status=AgentStatus.KILLED,
                            reason=f"killswitch: {request.reason}",
                            force=True,
                        )
                    except Exception as exc:  # the others are stopped all the same; the answer names this one
                        error = describe_error(exc)
                        if error["code"] == "internal":
                            log.exception("killswitch: the job of agent %s could not be stopped", agent.id)
                        not_stopped[agent.id] = error["message"]
                        return
                    stopped.append(agent.id)

            await asyncio.gather(*(stop(agent) for agent in covered))
            stopped.sort()
        return KillswitchResult(
            engaged=request.engaged,
            scope=key.scope,
            target=key.target,
            flag_id=flag_id,
            covered=len(covered),
            acknowledged=len(covered) - len(missing),
            unacknowledged=missing,
            stopped=stopped,
            not_stopped=not_stopped,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def release_deleted(self, agent: Agent) -> None:
        """Release the flag engaged on ``agent`` alone, now that it is deleted (it halts nothing, yet would stay
        listed, counted and held): audited as a release by ``system:agent-deleted``, as any other."""
        key = FlagKey(Scope.AGENT, agent.id)
        flag = next((f for f in await self.engaged() if f.key == key), None)
        if flag is None:
            return
        request = KillswitchRequest(
            scope=Scope.AGENT, customer_id=agent.customer_id, agent_id=agent.id, engaged=False, reason="agent deleted"
        )
        with contextlib.suppress(FlagHeld):  # engaged again meanwhile, by one who will release it
            await self.apply(_AGENT_DELETED, request, only=flag.id)

    async def _validated_customer(self, request: KillswitchRequest) -> str | None:
        """The customer whose agents the request covers (None for all), once the target is known to exist; a
        release of an agent's flag stored after the agent was deleted also goes (nothing else would release it)."""
        if request.scope is Scope.CUSTOMER:
            assert request.customer_id is not None
            return (await self._auth.get_customer(request.customer_id)).id
        if request.scope is Scope.AGENT:
            assert request.agent_id is not None
            try:
                agent = await self._agents.get(None, request.agent_id)
            except NotFound:
                if request.engaged or not any(f.key == request.key for f in await self._flags.list()):
                    raise
                return request.customer_id
            if request.customer_id and request.customer_id != agent.customer_id:
                raise Invalid(f"agent {agent.id} does not belong to customer {request.customer_id}")
            return agent.customer_id
        return None

    async def _expected_instances(self, covered: list[AgentRef]) -> dict[str, set[str]]:
        """Each covered agent's instances that discovery knows as passing: all of them must acknowledge."""
        expected: dict[str, set[str]] = {a.id: set() for a in covered}
        if covered:
            for instance in await self._registry.instances(passing_only=True):
                agent_id = instance.meta.get("caravan_agent")
                if agent_id in expected:
                    expected[agent_id].add(instance.id)
        return expected


def _not_stopped(result: KillswitchResult) -> JobsNotStopped:
    named = "; ".join(f"{agent}: {why}" for agent, why in list(result.not_stopped.items())[:5])
    more = f" (and {len(result.not_stopped) - 5} more)" if len(result.not_stopped) > 5 else ""
    where = FlagKey(result.scope, result.target).label
    message = (
        f"killswitch engaged ({where}), but {len(result.not_stopped)} of {result.covered} jobs could not be "
        f"stopped: {named}{more}"
    )
    return JobsNotStopped(message, result.model_dump(mode="json"))
