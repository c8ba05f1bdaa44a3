"""Tasks on teams: queue a run for the managers, hand them the human's answer, cancel wherever the run is."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from agent.protocol import TASKS_STREAM, Event, EventKind, utcnow
from agent.teamprotocol import TEAM_CONSUMER, TeamTaskRequest, team_cancel_subject, team_task_subject
from control.errors import Conflict, NotFound
from control.models import TERMINAL_TASK_STATUSES, Agent, Task, TaskCreate, TaskStatus
from control.services.agents import AgentService, why_not_serving
from control.services.killswitch import KillswitchService
from control.services.tasks import handed_out, publish_event, task_key
from control.store import Repo
from control.teams.models import Checkpoint, Team
from control.teams.service import TeamService

__all__ = ["TeamTasks"]


def _answer(task: Task, content: str, checkpoint: Checkpoint) -> TeamTaskRequest:
    """The request that resumes ``task`` from ``checkpoint`` with the human's answer."""
    assert task.team_id is not None
    return TeamTaskRequest(
        task_id=task.id,
        customer_id=task.customer_id,
        team_id=task.team_id,
        kind="input",
        content=content,
        segment=checkpoint.segment,
    )


def _asked(task: Task, checkpoint: Checkpoint | None) -> bool:
    """Whether the run of ``task`` has asked the human a question its record does not know of yet (it still says
    ``running``: the `awaiting_input` status, which a client may have seen on the event stream already, is folded
    into it a moment later). A run saves the question's checkpoint before it publishes the question."""
    return (
        task.status == TaskStatus.RUNNING
        and checkpoint is not None
        and checkpoint.asked_by is not None
        and not checkpoint.between_turns
        and checkpoint.segment > task.input_segment
    )


class TeamTasks:
    def __init__(
        self,
        tasks: Repo[Task],
        checkpoints: Repo[Checkpoint],
        js: JetStreamContext,
        teams: TeamService,
        agents: AgentService,
        guard: KillswitchService,
    ) -> None:
        self._tasks = tasks
        self._checkpoints = checkpoints
        self._js = js
        self._teams = teams
        self._agents = agents
        self._guard = guard

    async def prepare(self, customer_id: str, spec: TaskCreate, task_id: str) -> tuple[Task, str, bytes]:
        """A new task on a team whose members can all serve: its record, and its request for the team runners
        with the subject to queue it on (the task service queues them)."""
        assert spec.team_id is not None
        team = await self._teams.get(customer_id, spec.team_id)
        if team.deleting():
            raise Conflict(f"team {team.id} is being deleted")
        await self.ensure_members_can_serve(team)
        task = Task(id=task_id, customer_id=customer_id, team_id=team.id, task=spec.task)
        request = TeamTaskRequest(task_id=task.id, customer_id=customer_id, team_id=team.id, content=spec.task)
        return task, team_task_subject(customer_id, team.id), request.model_dump_json().encode()

    async def went(self, task: Task) -> str | None:
        """Why the team of a task just queued can no longer run it (deleted since :meth:`prepare` read it), or
        None. A delete under way is waited for: refused (another unfinished task, or this one, found), it leaves
        the team to run this task, which it used to end all the same."""
        assert task.team_id is not None
        pause = 0.02
        while True:
            try:
                team = await self._teams.get(task.customer_id, task.team_id)
            except NotFound:
                return f"team {task.team_id} was deleted"
            if not team.deleting():  # (a mark whose control plane died holds for DELETING_S at most)
                return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def teams_of(self, agent: Agent) -> set[str]:
        """The ids of the teams ``agent`` is a member of."""
        return {team.id for team in await self._teams.list(agent.customer_id) if agent.id in team.members}

    async def ensure_members_can_serve(self, team: Team) -> None:
        for agent_id in team.members:
            try:
                agent = await self._agents.get(team.customer_id, agent_id)
            except NotFound as exc:  # deleted after the team was made
                raise Conflict(f"team member {agent_id} no longer exists") from exc
            await self._guard.ensure_not_halted(agent)
            if (why := why_not_serving(agent)) is not None:
                raise Conflict(f"team member {agent.id} ({agent.name}) is {why}")

    async def input(self, task: Task, content: str, segment: int | None = None) -> Task:
        """The human's answer: the team runs again from its checkpoint with it. The same answer sent again while
        it waits in the queue (its client never got the 202) is taken as the one queued. ``segment``: the question
        it answers (else the one waiting now); an answer to another is refused."""
        if task.team_id is None:
            raise Conflict(f"task {task.id} is not a team's: nobody asks for input")
        if task.cancel_requested and task.status not in TERMINAL_TASK_STATUSES:  # (it may say `awaiting_input` yet)
            raise Conflict(f"task {task.id} is being cancelled: it takes no answer")
        if task.status == TaskStatus.QUEUED and task.queue_seq is not None:
            checkpoint = await self._checkpoints.get(task_key(task.customer_id, task.id))
            if (
                checkpoint is not None
                and segment in (None, checkpoint.segment)
                and await self._queued_as(task.queue_seq, _answer(task, content, checkpoint))
            ):
                return task
        checkpoint = await self._checkpoints.get(task_key(task.customer_id, task.id))
        if segment is not None and checkpoint is not None and checkpoint.segment != segment:
            last = checkpoint.segment  # (a client's retry of an answer used already must not answer the next one)
            why = "was answered already" if segment < last else "was never asked"
            raise Conflict(
                f"task {task.id} is {task.status.value}: its question {segment} {why} (its last is {last})",
                details={"segment": last},
            )
        if task.status != TaskStatus.AWAITING_INPUT and not _asked(task, checkpoint):
            raise Conflict(f"task {task.id} is {task.status.value}, not awaiting input")
        if checkpoint is None:
            raise Conflict(f"task {task.id} has no saved state to resume from")
        team = await self._teams.get(task.customer_id, task.team_id)
        await self.ensure_members_can_serve(team)
        request = _answer(task, content, checkpoint)
        ack = await self._js.publish(
            team_task_subject(task.customer_id, task.team_id),
            request.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{task.id}:input:{checkpoint.segment}"},
        )
        if ack.duplicate and not await self._queued_as(ack.seq, request):
            raise Conflict(f"task {task.id} already has its answer")
        resuming = "resuming with the human's answer"

        def queued(current: Task) -> Task:
            # a record that still waits on this question says `queued` at once, as the status published next makes
            # it once folded (a client that reads it right after the 202 is not asked the question again); one
            # the tracker took further (its run started, or asked again) is not taken back
            if current.status == TaskStatus.AWAITING_INPUT and current.input_segment == checkpoint.segment:
                status = {"status": TaskStatus.QUEUED, "status_reason": resuming, "updated_at": utcnow()}
                return current.model_copy(update={"queue_seq": ack.seq, **status})
            return current.model_copy(update={"queue_seq": ack.seq})

        await self._tasks.update(task_key(task.customer_id, task.id), queued)
        await self._publish_status(task, "queued", resuming, segment=checkpoint.segment)
        return task.model_copy(update={"status": TaskStatus.QUEUED, "status_reason": resuming, "queue_seq": ack.seq})

    async def _queued_as(self, seq: int, request: TeamTaskRequest) -> bool:
        """Whether the answer queued at ``seq`` (the first, which a duplicate's acknowledgement names) is this very
        one: the client's second try of an answer stored although the first try's acknowledgement never came (it
        got a 503), or although what follows the queueing failed. The same answer is taken again, to finish what
        the first try left undone; another is refused. One its runner has taken already is gone from the queue."""
        try:
            queued = TeamTaskRequest.model_validate_json((await self._js.get_msg(TASKS_STREAM, seq)).data or b"")
        except NotFoundError:
            return False
        return queued.model_dump(exclude={"submitted_at"}) == request.model_dump(exclude={"submitted_at"})

    async def cancel(self, task: Task) -> Task:
        """Cancel a team task whose record says a cancel was asked for (a manager that takes it up after this
        reads that and ends it unrun). A run no manager was handed, or one waiting for the human, ends here;
        otherwise the manager that holds it stops it everywhere, and reports ``cancelled``."""
        seq = task.queue_seq if task.status == TaskStatus.QUEUED else await self._answer_queued(task)
        if seq is not None and not await handed_out(self._js, TEAM_CONSUMER, seq):
            with contextlib.suppress(NotFoundError):
                await self._js.delete_msg(TASKS_STREAM, seq)
        elif task.status != TaskStatus.AWAITING_INPUT:
            await self._js._nc.publish(team_cancel_subject(task.customer_id, task.id), b"")
            return task
        await self.drop_checkpoint(task)
        await self._publish_status(task, "cancelled", "cancelled on request")
        return task

    async def _answer_queued(self, task: Task) -> int | None:
        """The stream sequence of the human's answer to the question ``task`` waits on, queued or in a manager's
        hands, though its record still says ``awaiting_input`` (the answer's `queued` status is folded into it a
        moment later); None if no answer to that question is queued (the request its last run was handed may
        still be in the stream for a moment after the run asked: it is not taken for one)."""
        if task.status != TaskStatus.AWAITING_INPUT or task.queue_seq is None:
            return None
        try:
            stored = await self._js.get_msg(TASKS_STREAM, task.queue_seq)
            request = TeamTaskRequest.model_validate_json(stored.data or b"")
        except (NotFoundError, ValueError):
            return None
        if request.task_id != task.id or request.kind != "input":
            return None
        checkpoint = await self._checkpoints.get(task_key(task.customer_id, task.id))
        return task.queue_seq if checkpoint is not None and request.segment == checkpoint.segment else None

    async def drop_checkpoint(self, task: Task) -> None:
        """Forget where the task's run stopped (it ended, and no run of it goes on)."""
        with contextlib.suppress(KeyNotFoundError):
            await self._checkpoints.delete(task_key(task.customer_id, task.id))

    async def _publish_status(self, task: Task, status: str, reason: str | None = None, **data: Any) -> None:
        """``data``: the event's besides its ``reason`` (an answer's ``segment``: the question it answers)."""
        event = Event(
            kind=EventKind.STATUS,
            task_id=task.id,
            customer_id=task.customer_id,
            content=status,
            data={**data, "reason": reason} if reason else data,
            attempt=task.attempt,
        )
        await publish_event(self._js, event)
