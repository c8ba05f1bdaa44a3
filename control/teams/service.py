"""Teams of a customer: definitions in JetStream KV, checked against the customer's own agents."""

from __future__ import annotations

from datetime import timedelta

from agent.protocol import utcnow
from control.errors import Conflict, Invalid, NotFound
from control.ids import new_id, quoted_id
from control.models import USER, Agent, Task
from control.services.agents import AgentService
from control.services.quotas import QuotaService
from control.services.tasks import customer_unfinished_tasks
from control.store import Repo
from control.teams.models import Team, TeamCreate

__all__ = ["DELETING_S", "TeamService"]

DELETING_S = 30
"""How long a delete's mark holds a team (:attr:`Team.deleting_until`) if its control plane dies before it ends."""


def _key(customer_id: str, team_id: str) -> str:
    return f"{customer_id}.{team_id}"


class TeamService:
    def __init__(self, repo: Repo[Team], agents: AgentService, tasks: Repo[Task], quotas: QuotaService) -> None:
        self._repo = repo
        self._agents = agents
        self._tasks = tasks
        self._quotas = quotas

    async def create(self, customer_id: str, spec: TeamCreate) -> Team:
        if spec.selector is not None:  # its model is called from the control plane: checked before any read
            self._agents.admit_model(spec.selector.model, "selector", "model")
        members: dict[str, Agent] = {}
        for agent_id in spec.members:  # another customer's agent is simply not found: 404, nothing stored
            agent = await self._agents.get(customer_id, agent_id)
            if agent.name == USER:  # named so before the name was refused: AgentChat would take it for the human
                raise Invalid(
                    f"member {agent_id} is named {USER!r}, the human's name in a team: make it anew under another name"
                )
            other = next((each.id for each in members.values() if each.name == agent.name), None)
            if other is not None:
                raise Invalid(
                    f"members need distinct names (AgentChat tells them apart by name): {other} and {agent_id} "
                    f"are both named {agent.name!r}"
                )
            members[agent_id] = agent
        for source, targets in spec.handoffs.items():  # AgentChat refuses such a member when a run starts
            tools = set(members[source].tools)
            clash = next((members[t].name for t in targets if t in members and members[t].name in tools), None)
            if clash is not None:
                raise Invalid(
                    f"handoffs: {source} ({members[source].name}) may hand off to {clash}, the name of one of its own "
                    f"tools too (AgentChat cannot tell them apart): make that agent anew under another name, or take "
                    f"the tool from {source}"
                )
        team = Team(id=new_id("tm"), customer_id=customer_id, **spec.model_dump())
        await self._repo.create(_key(customer_id, team.id), team)
        return team

    async def get(self, customer_id: str | None, team_id: str) -> Team:
        team = await self._repo.owned(customer_id, team_id)
        if team is None:
            raise NotFound(f"team {quoted_id(team_id)} not found")
        return team

    async def list(self, customer_id: str | None) -> list[Team]:
        teams = await self._repo.list(f"{customer_id}.*" if customer_id else ">")
        return sorted(teams, key=lambda t: t.created_at)

    async def delete(self, customer_id: str | None, team_id: str) -> Team:
        """Delete a team with no unfinished task; returns it as it was. The team is marked first, then its tasks
        looked for: a task made at the same time is either found (409) or sees the mark when it reads the team
        again once queued, and ends (:meth:`TeamTasks.went`)."""
        team = await self.get(customer_id, team_id)
        key = _key(team.customer_id, team.id)
        until = utcnow() + timedelta(seconds=DELETING_S)
        if await self._repo.update(key, lambda t: t.model_copy(update={"deleting_until": until})) is None:
            raise NotFound(f"team {quoted_id(team_id)} not found")
        try:
            unfinished = await customer_unfinished_tasks(self._tasks, self._quotas, team.customer_id)
            active = [t.id for t in unfinished if t.team_id == team.id]
            if active:
                raise Conflict(f"team {team.id} has unfinished tasks: {', '.join(active[:5])}; cancel them first")
        except BaseException:
            await self._repo.update(key, lambda t: t.model_copy(update={"deleting_until": None}))
            raise
        await self._repo.delete(key)
        return team
