from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Response, status

from control.models import Agent, AgentCreate, AgentUpdate
from control.platform import ControlPlane
from gateway.deps import ControlDep, ListedQuery, OwnerQuery, PrincipalDep, listed_scope, owner_scope, target_customer
from gateway.routes import api_router
from gateway.schemas import AgentPublic

router = api_router("/v1/agents", "agents")
AgentId = Annotated[str, "agent id"]


def _public(agent: Agent) -> AgentPublic:
    return AgentPublic(**agent.model_dump())


def agent_owner(control: ControlPlane, agent_id: str) -> Callable[[], Awaitable[Agent]]:
    """Reads the agent an admin acts on, for the audit record to name its customer (``admin_action(owner=)``)."""
    return lambda: control.agents.get(None, agent_id)


@router.post("", response_model=AgentPublic, status_code=status.HTTP_201_CREATED)
async def create_agent(
    body: AgentCreate,
    control: ControlDep,
    principal: PrincipalDep,
    customer_id: OwnerQuery = None,
) -> AgentPublic:
    """Define an agent and deploy its job. The agent becomes `running` once its process reports ready."""
    owner = target_customer(principal, customer_id)
    async with control.audit.admin_action(principal, "agent.create", owner, name=body.name) as record:
        await control.auth.get_customer(owner)
        agent = await control.agents.create(owner, body)
        record.target = agent.id
    return _public(agent)


@router.get("", response_model=list[AgentPublic])
async def list_agents(
    control: ControlDep,
    principal: PrincipalDep,
    customer_id: ListedQuery = None,
) -> list[AgentPublic]:
    return [_public(a) for a in await control.agents.list(listed_scope(principal, customer_id))]


@router.get("/{agent_id}", response_model=AgentPublic)
async def get_agent(agent_id: str, control: ControlDep, principal: PrincipalDep) -> AgentPublic:
    return _public(await control.agents.get(owner_scope(principal), agent_id))


@router.patch("/{agent_id}", response_model=AgentPublic)
async def update_agent(agent_id: str, body: AgentUpdate, control: ControlDep, principal: PrincipalDep) -> AgentPublic:
    """Change the definition; rolls out a new job version."""
    fields = sorted(body.model_fields_set)  # names only: a model's settings may carry its API key
    async with control.audit.admin_action(
        principal, "agent.update", target=agent_id, owner=agent_owner(control, agent_id), fields=fields
    ):
        agent = await control.agents.update(owner_scope(principal), agent_id, body)
    return _public(agent)


@router.delete("/{agent_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_agent(agent_id: str, control: ControlDep, principal: PrincipalDep) -> Response:
    async with control.audit.admin_action(
        principal, "agent.delete", target=agent_id, owner=agent_owner(control, agent_id)
    ):
        await control.agents.delete(owner_scope(principal), agent_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{agent_id}/stop", response_model=AgentPublic)
async def stop_agent(agent_id: str, control: ControlDep, principal: PrincipalDep) -> AgentPublic:
    async with control.audit.admin_action(
        principal, "agent.stop", target=agent_id, owner=agent_owner(control, agent_id)
    ):
        agent = await control.agents.stop(owner_scope(principal), agent_id)
    return _public(agent)


@router.post("/{agent_id}/start", response_model=AgentPublic)
async def start_agent(agent_id: str, control: ControlDep, principal: PrincipalDep) -> AgentPublic:
    async with control.audit.admin_action(
        principal, "agent.start", target=agent_id, owner=agent_owner(control, agent_id)
    ):
        agent = await control.agents.start(owner_scope(principal), agent_id)
    return _public(agent)


@router.get("/{agent_id}/job")
async def get_agent_job(agent_id: str, control: ControlDep, principal: PrincipalDep) -> dict[str, Any]:
    """The rendered Nomad job (API JSON) this agent runs as."""
    agent = await control.agents.get(owner_scope(principal), agent_id)
    return {"Job": control.agents.render(agent)}
