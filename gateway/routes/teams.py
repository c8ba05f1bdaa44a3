from __future__ import annotations

from fastapi import Response, status

from control.teams.models import Team, TeamCreate
from gateway.deps import ControlDep, ListedQuery, OwnerQuery, PrincipalDep, listed_scope, owner_scope, target_customer
from gateway.routes import api_router
from gateway.schemas import TeamPublic

router = api_router("/v1/teams", "teams")


def _public(team: Team) -> TeamPublic:
    return TeamPublic(**team.model_dump())


@router.post("", response_model=TeamPublic, status_code=status.HTTP_201_CREATED)
async def create_team(
    body: TeamCreate,
    control: ControlDep,
    principal: PrincipalDep,
    customer_id: OwnerQuery = None,
) -> TeamPublic:
    """Define a team of your agents. Start tasks on it with `POST /v1/tasks` and `team_id`."""
    owner = target_customer(principal, customer_id)
    async with control.audit.admin_action(principal, "team.create", owner, name=body.name) as record:
        await control.auth.get_customer(owner)
        team = await control.teams.create(owner, body)
        record.target = team.id
    return _public(team)


@router.get("", response_model=list[TeamPublic])
async def list_teams(
    control: ControlDep,
    principal: PrincipalDep,
    customer_id: ListedQuery = None,
) -> list[TeamPublic]:
    return [_public(t) for t in await control.teams.list(listed_scope(principal, customer_id))]


@router.get("/{team_id}", response_model=TeamPublic)
async def get_team(team_id: str, control: ControlDep, principal: PrincipalDep) -> TeamPublic:
    return _public(await control.teams.get(owner_scope(principal), team_id))


@router.delete("/{team_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_team(team_id: str, control: ControlDep, principal: PrincipalDep) -> Response:
    """Delete a team with no unfinished tasks (its agents stay)."""
    async with control.audit.admin_action(
        principal, "team.delete", target=team_id, owner=lambda: control.teams.get(None, team_id)
    ):
        await control.teams.delete(owner_scope(principal), team_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
