from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request, Response, status

from agent.backends.base import Flag, FlagKey, Scope
from control.errors import Invalid
from control.models import AgentStatus, CustomerCreate, Role
from control.services.audit import AuditQuery, AuditRecord, AuditTime
from control.services.auth import actor_named, shown_prefix
from control.services.killswitch import KillswitchRequest, KillswitchResult, covers
from control.services.quotas import Quota, QuotaChange, UsagePublic
from control.services.stats import Stats
from gateway.deps import AdminDep, ControlDep, ListedQuery, listed_scope
from gateway.ratelimit import Tiers
from gateway.routes import api_router
from gateway.routes.agents import agent_owner
from gateway.schemas import (
    AgentPublic,
    BroadcastRequest,
    BroadcastResult,
    CustomerCreated,
    CustomerDetail,
    CustomerPublic,
    ErrorResponse,
    KeyCreated,
    KeyPublic,
)

router = api_router("/v1/admin", "admin")


@router.post("/customers", response_model=CustomerCreated, status_code=status.HTTP_201_CREATED)
async def create_customer(body: CustomerCreate, control: ControlDep, admin: AdminDep) -> CustomerCreated:
    """Create a tenant and its first API key (shown once)."""
    async with control.audit.admin_action(admin, "customer.create") as record:
        customer, key = await control.auth.create_customer(body.name)
        record.customer_id = record.target = customer.id
        record.details["key"] = key.prefix
    return CustomerCreated(**customer.model_dump(), api_key=key.api_key, api_key_prefix=key.prefix)


@router.get("/customers/{customer_id}", response_model=CustomerDetail)
async def get_customer(customer_id: str, control: ControlDep, _: AdminDep) -> CustomerDetail:
    customer = await control.auth.get_customer(customer_id)
    return CustomerDetail(**customer.model_dump(), usage=await control.quotas.usage(customer.id))


@router.put("/customers/{customer_id}/quota", response_model=UsagePublic)
async def set_quota(
    customer_id: str, body: Quota, request: Request, control: ControlDep, admin: AdminDep
) -> UsagePublic:
    """Replace the customer's quota. A field left out takes a new customer's default (`{}` resets the quota to
    the defaults: `max_agents` from `CARAVAN_MAX_AGENTS_PER_CUSTOMER`, the others unlimited, tier `standard`);
    `null` is unlimited. Admission is checked against it from now on, and its tier rates their next request (within
    seconds on other gateway replicas); what already runs stays. A daily token budget that leaves the customer
    tokens today (or none) lifts the budget's own halt on them at once; an operator's halt stays."""
    quota = control.quotas.completed(body)
    async with control.audit.admin_action(admin, "quota.set", customer_id, customer_id, quota=quota.model_dump()):
        customer = await control.auth.get_customer(customer_id)
        usage = await control.set_quota(customer.id, quota)
    tiers: Tiers = request.app.state.tiers
    tiers.forget(customer.id)
    return usage


@router.patch("/customers/{customer_id}/quota", response_model=UsagePublic)
async def change_quota(
    customer_id: str, body: QuotaChange, request: Request, control: ControlDep, admin: AdminDep
) -> UsagePublic:
    """Change the fields of the customer's quota that the body gives (`null` is unlimited) and keep the others,
    in one atomic change: two changes of different fields made at the same time both hold. Otherwise as `PUT`."""
    changes = body.changes()
    async with control.audit.admin_action(admin, "quota.change", customer_id, customer_id, changes=changes) as record:
        customer = await control.auth.get_customer(customer_id)
        usage = await control.change_quota(customer.id, changes)
        record.details["quota"] = usage.quota.model_dump()
    tiers: Tiers = request.app.state.tiers
    tiers.forget(customer.id)
    return usage


@router.post("/customers/{customer_id}/keys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED)
async def create_key(customer_id: str, control: ControlDep, admin: AdminDep) -> KeyCreated:
    """Another API key for the customer (shown once)."""
    async with control.audit.admin_action(admin, "key.create", customer_id) as record:
        customer = await control.auth.get_customer(customer_id)
        key = await control.auth.issue_key(Role.CUSTOMER, customer.id)
        record.target = key.prefix
    return KeyCreated(api_key=key.api_key, api_key_prefix=key.prefix)


@router.get("/keys", response_model=list[KeyPublic])
async def list_keys(control: ControlDep, admin: AdminDep, customer_id: ListedQuery = None) -> list[KeyPublic]:
    return [KeyPublic(**k.model_dump()) for k in await control.auth.list_keys(listed_scope(admin, customer_id))]


@router.delete("/keys/{prefix}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_key(prefix: str, control: ControlDep, admin: AdminDep) -> Response:
    """Revoke an API key: it gets no more tokens, and tokens it already got stop working within seconds. The last
    active admin key is not revoked (409 `last_admin_key`): start the control plane with a new `CARAVAN_ADMIN_KEY`
    first."""
    async with control.audit.admin_action(admin, "key.revoke", target=shown_prefix(prefix)) as record:
        key = await control.auth.revoke(prefix)
        record.customer_id = key.customer_id
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/agents", response_model=list[AgentPublic])
async def list_all_agents(
    control: ControlDep,
    admin: AdminDep,
    customer_id: ListedQuery = None,
) -> list[AgentPublic]:
    """Every customer's agents (or one customer's)."""
    return [AgentPublic(**a.model_dump()) for a in await control.agents.list(listed_scope(admin, customer_id))]


@router.post("/agents/{agent_id}/stop", response_model=AgentPublic)
async def force_stop_agent(agent_id: str, control: ControlDep, admin: AdminDep) -> AgentPublic:
    """Stop any customer's agent (its job is stopped; the customer can start it again)."""
    async with control.audit.admin_action(
        admin, "agent.force_stop", target=agent_id, owner=agent_owner(control, agent_id)
    ):
        agent = await control.agents.stop(None, agent_id, reason=f"stopped by an administrator ({admin.subject})")
    return AgentPublic(**agent.model_dump())


@router.get("/stats", response_model=Stats)
async def stats(control: ControlDep, _: AdminDep) -> Stats:
    """Agents by status, tasks by status, tokens per customer today, and each allocation's CPU and memory."""
    return await control.stats.overview()


@router.post("/broadcast", response_model=BroadcastResult, status_code=status.HTTP_202_ACCEPTED)
async def broadcast(body: BroadcastRequest, control: ControlDep, admin: AdminDep) -> BroadcastResult:
    """Send a message to every agent (NATS `caravan.broadcast`); each agent acknowledges with a `broadcast` event."""
    async with control.audit.admin_action(admin, "broadcast", None, "all", message=body.message) as record:
        await control.broadcast(body.message, admin.subject)
        running = [a for a in await control.agents.live() if a.status == AgentStatus.RUNNING]
        record.details["agents"] = len(running)
    return BroadcastResult(agents_running=len(running))


@router.get("/customers", response_model=list[CustomerPublic])
async def list_customers(control: ControlDep, _: AdminDep) -> list[CustomerPublic]:
    return [CustomerPublic(**c.model_dump()) for c in await control.auth.list_customers()]


_NOT_STOPPED = "Engaged, but some jobs could not be stopped (`hard`): `details` is the result, `not_stopped` names them"


@router.post(
    "/killswitch",
    response_model=KillswitchResult,
    responses={502: {"model": ErrorResponse, "description": _NOT_STOPPED}},
)
async def set_killswitch(body: KillswitchRequest, control: ControlDep, admin: AdminDep) -> KillswitchResult:
    """Engage or release the killswitch for every agent, one customer's agents, or one agent.

    Waits up to `wait_ms` for the covered agents to acknowledge and says which did not; with `hard`, also
    stops their jobs (a job that cannot be stopped: 502, the flag engaged all the same). A release where nothing is
    engaged at that scope answers at once with `nothing_to_release` true (audited all the same). Flags are durable:
    an agent that starts under an engaged flag starts halted."""
    return await control.killswitch.apply(admin, body)  # audited by the killswitch itself, failures too


@router.get("/killswitch", response_model=list[Flag])
async def get_killswitch(
    control: ControlDep,
    _: AdminDep,
    customer_id: Annotated[
        str | None, Query(max_length=64, description="Only the flags that halt this customer's agents.")
    ] = None,
    agent_id: Annotated[str | None, Query(max_length=64, description="Only the flags that halt this agent.")] = None,
) -> list[Flag]:
    """What is engaged, by whom, when and why. With `customer_id`, only what halts that customer's agents: the
    flag over every agent, the customer's own and its agents' own; with `agent_id`, what halts that agent (either
    one names a customer or an agent that exists, else 404)."""
    if customer_id is not None and agent_id is not None:
        raise Invalid("give ?customer_id= or ?agent_id=, not both")
    engaged = await control.killswitch.engaged()
    if agent_id is not None:
        agent = await control.agents.get(None, agent_id)
        return [f for f in engaged if covers(f.key, agent)]
    if customer_id is not None:
        customer = await control.auth.get_customer(customer_id)
        theirs = {FlagKey(Scope.ALL), FlagKey(Scope.CUSTOMER, customer.id)}
        theirs |= {FlagKey(Scope.AGENT, a.id) for a in await control.agents.list(customer.id)}
        return [f for f in engaged if f.key in theirs]
    return engaged


@router.get("/audit", response_model=list[AuditRecord])
async def get_audit(
    control: ControlDep,
    admin: AdminDep,
    actor: Annotated[
        str | None,
        Query(
            max_length=200,
            description="Who: an admin by its key's prefix (`cvn_1a2b3c4d` or `admin:cvn_1a2b3c4d`), "
            "`system:token-budget`, `system:agent-deleted`.",
        ),
    ] = None,
    action: Annotated[str | None, Query(max_length=100, pattern=r"^[a-z_]+(\.[a-z_]+)*$")] = None,
    customer_id: ListedQuery = None,
    since: Annotated[AuditTime | None, Query(description="With a timezone: 2024-01-01T00:00:00Z")] = None,
    until: Annotated[AuditTime | None, Query(description="With a timezone: 2024-01-31T23:59:59Z")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditRecord]:
    """The audit log, oldest first (the newest `limit` matches). Append-only: nothing deletes records."""
    if since is not None and until is not None and since > until:
        raise Invalid(f"since ({since.isoformat()}) is after until ({until.isoformat()}): no record is both")
    customer_id = listed_scope(admin, customer_id)
    named = None if actor is None else actor_named(actor)
    query = AuditQuery(actor=named, action=action, customer_id=customer_id, since=since, until=until, limit=limit)
    return await control.audit.query(query)
