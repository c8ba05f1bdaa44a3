"""The group-chat managers of team tasks, in the control plane.

Team tasks wait on a durable JetStream work queue (consumer ``caravan-teams`` on ``caravan.tasks.*.team.*``)
that every control-plane replica pulls from, so replicas share the runs, and a run whose replica died is
delivered again (after ``ack_wait``) to one that lives. For each run the runner enlists one replica of every
member (:mod:`agent.teamhost`), builds AgentChat's own team around a :class:`~agent.runtime.NatsAgentRuntime`
in the run's namespace and forwards every item of ``run_stream`` to the task's subject.

Between every two turns the run's state is checkpointed in JetStream KV (:mod:`control.teams.checkpoints`).
A run that stops to ask the human saves AgentChat's team state there too and acknowledges its work; the answer
queues the next run, which loads that state. A run that loses a member (its heartbeats stop) or its manager
goes on from the last checkpoint as a new attempt: the transcript up to the checkpoint is published again
under the new attempt, which replaces the old one in the task record, and the run continues after the
checkpoint's last message with no member asked again for what it already said. A member that cannot come back
(stopped, deleted, failed, or halted by the killswitch) ends the task at once instead, saying which and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from autogen_agentchat.base import TaskResult
from autogen_agentchat.messages import BaseChatMessage, HandoffMessage, TextMessage
from autogen_core import CancellationToken
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError

from agent.aio import HAND_BACK_DELAY_S, cancel_and_wait, keep_in_progress
from agent.backends.base import Flag
from agent.egress import error_text, failure_text
from agent.protocol import (
    REPLAYED,
    TASK_ATTEMPTS,
    TASKS_STREAM,
    AgentDefinition,
    Event,
    EventKind,
    task_events_subject,
)
from agent.runtime import NatsAgentRuntime
from agent.teamprotocol import (
    TEAM_CONSUMER,
    TEAM_QUEUE_FILTER,
    MemberJoin,
    MemberJoined,
    MemberRefused,
    TeamTaskRequest,
    join_answer,
    join_subject,
    run_namespace,
)
from agent.transcript import event_fields, final_text
from agent.wire import STORE_TIMEOUT_S, Storing, Wire
from control.errors import NotFound
from control.ids import new_id
from control.models import TERMINAL_TASK_STATUSES, Agent, AgentStatus, Task, TaskStatus
from control.natsio import Jet
from control.services.agents import AgentService, Killswitches, failure
from control.services.killswitch import first_covering
from control.services.tasks import publish_event, task_key
from control.store import Repo
from control.teams.build import build_team, restore_termination
from control.teams.checkpoints import Record, TurnCheckpoints
from control.teams.models import USER, Checkpoint, Team
from control.teams.selectors import SelectorClients
from control.teams.service import TeamService

__all__ = ["RunnerConfig", "TeamRunner"]

log = logging.getLogger("caravan.teams")

JOIN_ASKED_S = 5.0
"""How long a run waits for a member's answer to its request to join, before it asks again (and looks at the
member's record, saying why it waits)."""
RETRY_FIRST_S = 0.5
"""How long a run whose runner failed waits before it comes back, the first time; twice that each time after."""
RETRY_MAX_S = 30.0


@dataclass(frozen=True)
class RunnerConfig:
    max_runs: int = 32
    join_timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    member_lost_after_s: float = 5.0
    max_attempts: int = TASK_ATTEMPTS  # as a single agent's task
    ack_wait_s: float = 30.0
    local_model_url: str | None = None  # where selectors on `local` call it (the settings': not in our environment)


class _Failed(Exception):
    """The run cannot go on; the task ends ``status`` (`failed` unless said) with this reason."""

    def __init__(self, reason: str, status: TaskStatus = TaskStatus.FAILED) -> None:
        super().__init__(reason)
        self.status = status


class _Retry(Exception):
    """The run broke off (a member or the manager was lost); start again from the last checkpoint."""


class _Cancelled(Exception):
    """Cancelled before the team ran: it never does."""


@dataclass
class _Active:
    token: CancellationToken = field(default_factory=CancellationToken)
    cancelled: bool = False
    handover: bool = False
    lost: str | None = None

    def stop(self, **why: Any) -> None:
        for key, value in why.items():
            setattr(self, key, value)
        self.token.cancel()


class TeamRunner:
    """``start()`` pulls team tasks and runs their managers; ``stop()`` hands unfinished runs back to the queue."""

    def __init__(
        self,
        jet: Jet,
        tasks: Repo[Task],
        checkpoints: Repo[Checkpoint],
        teams: TeamService,
        agents: AgentService,
        config: RunnerConfig | None = None,
        killswitches: Killswitches | None = None,
    ) -> None:
        """``killswitches``: where the runner finds out that a member it lost is halted (its task ends `killed`)."""
        self._jet = jet
        self._tasks = tasks
        self._checkpoints = checkpoints
        self._teams = teams
        self._agents = agents
        self._killswitches = killswitches
        self.config = config or RunnerConfig()
        self._active: dict[str, _Active] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._subs: list[Any] = []
        self._storing: dict[str, Storing] = {}  # per task: its events published without waiting
        self._wire = Wire.of(jet.nc)
        # the selector's model is called from here: on `local`, at the platform's local model (its proxy queues
        # the calls under the team)
        self._selectors = SelectorClients(self.config.local_model_url)
        self._started = False
        self._stopping = False

    async def __aenter__(self) -> TeamRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("team runner already started")
        self._started = True
        await self._wire.ready()
        js = self._jet.js
        consumer = ConsumerConfig(
            durable_name=TEAM_CONSUMER,
            filter_subject=TEAM_QUEUE_FILTER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.ack_wait_s,
            max_deliver=-1,  # however often a run comes back, it ends after max_attempts (never stuck undelivered)
            max_ack_pending=10_000,
        )
        await js.add_consumer(TASKS_STREAM, consumer)
        psub = await js.pull_subscribe_bind(TEAM_CONSUMER, stream=TASKS_STREAM)
        self._subs.append(psub)
        self._subs.append(await self._jet.nc.subscribe("caravan.ctl.*.teamcancel.*", cb=self._on_cancel))
        self._loop = asyncio.create_task(self._serve(psub), name="team-runner")

    async def stop(self) -> None:
        if not self._started or self._stopping:
            return
        self._stopping = True
        if self._loop is not None:
            await cancel_and_wait(self._loop)
        # Drop the pull subscription before handing runs back: the server would deliver a run handed back to a pull
        # request of ours still waiting, where nobody reads it, and another replica would get it only after ack_wait.
        with contextlib.suppress(Exception):
            await self._subs[0].unsubscribe()
        for active in self._active.values():
            active.stop(handover=True)
        if self._runs:
            await asyncio.wait(self._runs, timeout=10)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._selectors.close()

    @property
    def running(self) -> int:
        return len(self._active)

    async def _serve(self, psub: Any) -> None:
        slots = asyncio.Semaphore(self.config.max_runs)
        while True:
            await slots.acquire()
            try:
                msgs = await psub.fetch(1, timeout=5)
            except TimeoutError:
                slots.release()
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
                slots.release()
                return
            except Exception:  # JetStream unavailable for a while (a server restart): this replica keeps serving
                slots.release()
                log.exception("fetching team tasks failed; trying again")
                await asyncio.sleep(1)
                continue
            run = asyncio.create_task(self._handle(msgs[0]))
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)
            run.add_done_callback(lambda _t: slots.release())

    async def _on_cancel(self, msg: Msg) -> None:
        active = self._active.get(msg.subject.rsplit(".", 1)[-1])
        if active is not None:
            active.stop(cancelled=True)

    async def _handle(self, msg: Msg) -> None:
        try:
            request = TeamTaskRequest.model_validate_json(msg.data)
        except ValueError:
            log.error("dropping a malformed team task message")
            await msg.term()
            return
        active = self._active[request.task_id] = _Active()
        keepalive = asyncio.create_task(keep_in_progress(msg, self.config.ack_wait_s / 3))
        delivered = msg.metadata.num_delivered or 1
        retry_in: float | None = None
        try:
            await self._serve_task(request, delivered, active)
        except _Retry:
            retry_in = HAND_BACK_DELAY_S  # handed back: another replica takes it at once
        except Exception:  # reading the task or its checkpoint, or publishing its end, failed (NATS briefly away)
            retry_in = min(RETRY_FIRST_S * 2 ** (delivered - 1), RETRY_MAX_S)
            log.exception("team task %s: the runner failed; its run comes back in %g s", request.task_id, retry_in)
        finally:
            keepalive.cancel()
            self._active.pop(request.task_id, None)
        # A run that failed comes back, as an attempt after a crash does (max_attempts bounds it): acknowledged,
        # its task would stay `queued` or `running` for good, and a cancel, which tells the run, could not end it.
        with contextlib.suppress(Exception):
            await (msg.ack() if retry_in is None else msg.nak(delay=retry_in))

    async def _serve_task(self, request: TeamTaskRequest, delivered: int, active: _Active) -> None:
        key = task_key(request.customer_id, request.task_id)
        task = await self._tasks.get(key)
        if task is None or task.status in TERMINAL_TASK_STATUSES:
            return
        if task.cancel_requested:  # before this manager was handed the run (a cancel after it reaches `active`)
            await self._cancelled(task, task.attempt)
            return
        checkpoint = await self._checkpoints.get(key) or Checkpoint()
        if request.kind == "input" and request.segment != checkpoint.segment:
            return  # an answer that was already used
        attempt = task.attempt + (1 if delivered > 1 else 0)
        if attempt > self.config.max_attempts:  # each before it broke off (a member or a control plane lost, or
            reason = (  # handed back by a control plane that stopped): the last one's transcript stays the task's
                f"its run broke off during each of its {task.attempt} attempts (a member lost, or a control plane "
                "that stopped or crashed): not tried again"
            )
            log.warning("team task %s: %s", task.id, reason)
            await self._ended(task, task.attempt, TaskStatus.FAILED, reason)
            return
        while True:
            if attempt > task.attempt:
                await self._replay(task, checkpoint, attempt)
            try:
                await self._segment(request, task, checkpoint, attempt, active)
                return
            except _Retry as retry:
                if active.handover:
                    raise
                if attempt >= self.config.max_attempts:
                    await self._ended(task, attempt, TaskStatus.FAILED, f"{retry} (gave up after {attempt} attempts)")
                    return
                if active.cancelled:  # asked for while the run broke off: the next attempt must not start
                    await self._cancelled(task, attempt)
                    return
                log.warning("team task %s: %s; going on from the last checkpoint", task.id, retry)
                attempt += 1
                active.token, active.lost = CancellationToken(), None
                checkpoint = await self._checkpoints.get(key) or checkpoint  # the run's newest
                continue
            except _Failed as failure:
                reason, status = str(failure), failure.status
            except Exception as exc:  # AgentChat refused the team or its state, or a bug of ours: never left running
                log.exception("team task %s failed", task.id)
                reason, status = failure_text(exc), TaskStatus.FAILED
            await self._ended(task, attempt, status, reason)
            return

    async def _segment(
        self, request: TeamTaskRequest, task: Task, checkpoint: Checkpoint, attempt: int, active: _Active
    ) -> None:
        try:
            team = await self._teams.get(task.customer_id, request.team_id)
        except NotFound as exc:  # as a task queued while its team was deleted ends (TaskService._unless_team_went)
            raise _Failed(f"team {request.team_id} was deleted", TaskStatus.CANCELLED) from exc
        members: dict[str, AgentDefinition] = {}
        for agent_id in team.members:
            definition = await self._agents.definition(task.customer_id, agent_id)
            if definition is None:
                raise _Failed(f"team member {agent_id} no longer exists")
            members[agent_id] = definition
        by_name = {d.name: agent_id for agent_id, d in members.items()}
        run_id = new_id("rn")
        runtime = NatsAgentRuntime(self._jet.nc, run_namespace(task.customer_id, run_id))
        selector = self._selectors.get(team)
        if selector is not None and checkpoint.selector_position is not None and hasattr(selector, "seek"):
            selector.seek(checkpoint.selector_position)
        record = self._recorder(task, attempt, by_name)
        turns = TurnCheckpoints(
            self._checkpoints, task_key(task.customer_id, task.id), checkpoint, list(by_name), record, selector
        )
        presence = _Presence(self.config, set(team.members), active)
        beats: list[asyncio.Task[None]] = []
        alive_sub: Subscription | None = None
        state_sub: Subscription | None = None
        try:  # from here on, the `finally` undoes what was done, however far it got (AgentChat refusing the team,
            # the connection failing while subscribing)
            chat = build_team(team, members, runtime, run_id, selector, on_turn=turns.on_turn)
            alive_sub = await self._jet.nc.subscribe(f"{runtime.namespace}.x.alive", cb=presence.on_beat)
            # a member's state comes with its answer: read in the read loop, as answers are
            state_sub = await self._wire.subscribe(f"{runtime.namespace}.x.state", turns.on_state)
            await runtime.start()
            beats.append(asyncio.create_task(self._beat(runtime.namespace)))
            try:
                joined = await self._join(task, attempt, team, members, run_id, runtime, active)
            except _Cancelled:  # while the members joined (or started)
                await self._cancelled(task, attempt)
                return
            turns.enabled = all(j.checkpoints for j in joined.values())
            presence.reset()
            beats.append(asyncio.create_task(presence.watch()))
            if checkpoint.state is not None:
                await chat.load_state(checkpoint.state)
            if checkpoint.between_turns and checkpoint.termination and chat._termination_condition:
                restore_termination(chat._termination_condition, checkpoint.termination)
            names = {members[a].name: j.instance_id for a, j in joined.items()}
            await self._status(task, attempt, "running", data={"run_id": run_id, "members": names})
            try:
                task_input = _task_input(request, team, checkpoint)
                result = await self._stream(chat, task_input, task, attempt, by_name, active)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                await self._stored(task)
                if (active.lost is not None or active.handover) and not active.cancelled:  # a cancel wins
                    if not active.handover and (gone := await self._member_gone(task.customer_id, members)):
                        raise gone from None
                    await turns.flush()
                    raise _Retry(active.lost or "the control plane is stopping") from None
                await turns.close()
                await self._cancelled(task, attempt)
                return
            except (RuntimeError, ValueError) as exc:
                await self._stored(task)
                if gone := await self._member_gone(task.customer_id, members):  # what a member's error came of
                    raise gone from exc
                if active.lost is not None:
                    await turns.flush()
                    raise _Retry(active.lost) from exc
                raise _Failed(error_text(exc) or type(exc).__name__) from exc
            unstored = await self._stored(task)
            if unstored is not None:
                raise _Failed(f"an event of the task was not stored: {unstored}")
            await turns.close()
            await self._finish(task, attempt, team, chat, selector, checkpoint, record, result)
        finally:
            self._storing.pop(task.id, None)
            for beat in beats:
                beat.cancel()
            end = f"{runtime.namespace}.x.end"
            ending: list[Callable[[], Awaitable[Any]]] = [
                turns.close,
                runtime.cancel_all,
                lambda: self._jet.nc.publish(end, b""),
            ]
            if alive_sub is not None:
                ending.append(alive_sub.unsubscribe)
            if state_sub is not None:
                ending.append(functools.partial(self._wire.unsubscribe, state_sub))
            if selector is not None:
                ending.append(functools.partial(self._selectors.release, team, selector))
            for step in ending:  # each on its own: one that fails must not leave the others undone
                with contextlib.suppress(Exception):
                    await step()
            await runtime.stop()

    async def _stream(
        self,
        chat: Any,
        task_input: Any,
        task: Task,
        attempt: int,
        by_name: dict[str, str],
        active: _Active,
    ) -> TaskResult | None:
        """Run the team, publishing every item as the task's events."""
        result: TaskResult | None = None
        async for item in chat.run_stream(task=task_input, cancellation_token=active.token):
            if isinstance(item, TaskResult):
                result = item
                continue
            for kind, fields in event_fields(item):
                agent_id = by_name.get(fields.get("source") or "")
                event = self._event(task, attempt, kind, agent_id=agent_id, **fields)
                await self._publish(event, wait=False)
        return result

    async def _finish(
        self,
        task: Task,
        attempt: int,
        team: Team,
        chat: Any,
        selector: Any,
        checkpoint: Checkpoint,
        record: Record,
        result: TaskResult | None,
    ) -> None:
        messages = result.messages if result is not None else []
        last = messages[-1] if messages else None
        # the human is asked when the team stops for it; a handoff to the user that comes as another condition
        # holds (the last of `max_messages`) ends the task as that condition says
        if team.termination.handoff_to_user and isinstance(last, HandoffMessage) and last.target == USER:
            question = _question(result, last)
            saved = Checkpoint(
                segment=checkpoint.segment + 1,
                state=dict(await chat.save_state()),
                selector_position=getattr(selector, "position", None),
                # the run's items but its chunks, in order: what the stream published and the task record keeps
                transcript=[*checkpoint.transcript, *record(messages)],
                asked_by=last.source,
            )
            request_event = self._event(
                task,
                attempt,
                EventKind.INPUT_REQUEST,
                source=last.source,
                content=question,
                data={"to": USER, "segment": saved.segment},
            )
            saved.transcript.append(request_event.model_dump(mode="json", exclude={"attempt", "at"}))
            await self._checkpoints.put(task_key(task.customer_id, task.id), saved)
            await self._publish(request_event)
            await self._status(
                task, attempt, "awaiting_input", f"{last.source} asks the user", {"segment": saved.segment}
            )
            return
        stop_reason = result.stop_reason if result else None
        await self._emit(task, attempt, EventKind.RESULT, content=final_text(result), data={"stop_reason": stop_reason})
        await self._checkpoints_delete(task)
        await self._status(task, attempt, "completed", stop_reason)

    async def _join(
        self,
        task: Task,
        attempt: int,
        team: Team,
        members: dict[str, AgentDefinition],
        run_id: str,
        runtime: NatsAgentRuntime,
        active: _Active,
    ) -> dict[str, MemberJoined]:
        """Enlist a replica of every member; :class:`_Cancelled` if the task is cancelled meanwhile. A member that
        does not answer at once is waited for up to ``join_timeout_s`` (the task's status says so) while it may
        come (starting, restarting), and not at all once it cannot (:meth:`_member_gone`)."""
        handoffs = {a: [t if t == USER else members[t].name for t in team.handoffs.get(a, [])] for a in members}
        waiting = "running" if attempt > task.attempt else "queued"  # (a new attempt said `running`)

        async def join(agent_id: str) -> tuple[str, MemberJoined]:
            request = MemberJoin(
                run_id=run_id,
                task_id=task.id,
                customer_id=task.customer_id,
                agent_id=agent_id,
                team_key=run_id,
                handoffs=handoffs[agent_id],
                heartbeat_s=self.config.heartbeat_s,
                state_deltas=True,
                output_implied=True,
            )
            name, timeout = members[agent_id].name, self.config.join_timeout_s
            deadline = time.monotonic() + timeout
            told, next_look = False, 0.0
            while True:
                if active.cancelled:
                    raise _Cancelled
                try:
                    subject, payload = join_subject(task.customer_id, agent_id), request.model_dump_json().encode()
                    # (answered in the run's subjects)
                    reply = await runtime.ask(subject, payload, timeout=JOIN_ASKED_S, poll=False)
                    answer = join_answer(reply.data)
                    if isinstance(answer, MemberRefused):
                        raise _Failed(f"team member {name} ({agent_id}) could not join: {answer.refused}")
                    return agent_id, answer
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                    if time.monotonic() >= next_look:  # (at most once a second: a join is retried every 0.25 s)
                        next_look = time.monotonic() + 1.0
                        agent, gone = await self._look(task.customer_id, agent_id, members[agent_id])
                        if gone is not None:
                            raise gone from exc
                        if not told and agent is not None:  # it may come: said once
                            told = True
                            why = f"waiting up to {timeout:g} s for team member {name} ({agent_id}) to join: it is "
                            state = agent.status.value
                            if agent.status is AgentStatus.RUNNING:  # (its process is up; its worker not yet)
                                state += " but not listening yet"
                            await self._status(task, attempt, waiting, why + state)
                    if time.monotonic() > deadline:
                        raise _Failed(
                            f"team member {name} ({agent_id}) did not join within {timeout:g}s: is it running?"
                        ) from exc
                    await asyncio.sleep(0.25)

        joins = [asyncio.ensure_future(join(a)) for a in team.members]
        try:
            joined = dict(await asyncio.gather(*joins))
        finally:  # one that failed leaves the others waiting for nothing
            for waiting_join in joins:
                waiting_join.cancel()
        if active.cancelled:
            raise _Cancelled
        return joined

    async def _member_gone(self, customer_id: str, members: dict[str, AgentDefinition]) -> _Failed | None:
        """Why one of ``members`` cannot take part in the run again (:meth:`_look`); None while each may."""
        engaged = await self._engaged()
        for agent_id, definition in members.items():
            if (gone := (await self._look(customer_id, agent_id, definition, engaged))[1]) is not None:
                return gone
        return None

    async def _engaged(self) -> list[Flag]:
        return await self._killswitches.engaged() if self._killswitches is not None else []

    async def _look(
        self, customer_id: str, agent_id: str, definition: AgentDefinition, engaged: list[Flag] | None = None
    ) -> tuple[Agent | None, _Failed | None]:
        """The member's agent as it is now (None: deleted), and why it cannot take part in the run again: it was
        deleted, stopped or halted by the killswitch, or has failed; None while it runs or may run again soon
        (starting, restarting). ``engaged``: the killswitch flags, if already read."""
        try:
            agent = await self._agents.get(customer_id, agent_id)
        except NotFound:  # (the delete ended the task already, so)
            return None, _Failed(f"a member of its team: agent {agent_id} was deleted", TaskStatus.CANCELLED)
        engaged = await self._engaged() if engaged is None else engaged
        member = f"a member of its team: agent {agent_id} ({definition.name})"
        flag = first_covering(engaged, agent)
        if flag is not None:
            return agent, _Failed(
                f"{member} was halted by the killswitch: {flag.reason or 'no reason given'}", TaskStatus.KILLED
            )
        if agent.status is AgentStatus.FAILED:
            return agent, _Failed(f"{member} {failure(agent)}; start it again and give the team the task again")
        if agent.desired != "running":
            if agent.status is AgentStatus.KILLED:
                return agent, _Failed(f"{member} was killed ({agent.status_reason})", TaskStatus.KILLED)
            return agent, _Failed(f"{member} was stopped")
        return agent, None

    async def _beat(self, namespace: str) -> None:
        while True:
            await self._jet.nc.publish(f"{namespace}.x.alive", b"manager")
            await asyncio.sleep(self.config.heartbeat_s)

    def _recorder(self, task: Task, attempt: int, by_name: dict[str, str]) -> Record:
        """The transcript entries of messages, as :meth:`_stream` publishes them but chunks (a checkpoint's
        transcript)."""

        def record(items: Sequence[Any]) -> list[dict[str, Any]]:
            entries = []
            for item in items:
                for kind, fields in event_fields(item):
                    if kind != "chunk":
                        agent_id = by_name.get(fields.get("source") or "")
                        event = self._event(task, attempt, kind, agent_id=agent_id, **fields)
                        entries.append(event.model_dump(mode="json", exclude={"attempt", "at"}))
            return entries

        return record

    async def _replay(self, task: Task, checkpoint: Checkpoint, attempt: int) -> None:
        """A new attempt replaces the transcript in the record: publish what the checkpoint already holds."""
        await self._status(task, attempt, "running", "starting again from the last checkpoint")
        for stored in checkpoint.transcript:
            event = Event.model_validate({**stored, "attempt": attempt})
            if event.kind == EventKind.USAGE:  # metered when it first happened: the record counts it, the quota not
                event.data = {**event.data, REPLAYED: True}
            await self._publish(event, wait=False)
        await self._stored(task)

    async def _ended(self, task: Task, attempt: int, status: TaskStatus, reason: str) -> None:
        """End the task ``status`` for ``reason`` (an error event first if it failed), its checkpoints gone."""
        if status is TaskStatus.FAILED:
            await self._emit(task, attempt, EventKind.ERROR, content=reason)
        await self._checkpoints_delete(task)
        await self._status(task, attempt, status.value, reason)

    async def _cancelled(self, task: Task, attempt: int) -> None:
        await self._ended(task, attempt, TaskStatus.CANCELLED, "cancelled on request")

    async def _checkpoints_delete(self, task: Task) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self._checkpoints.delete(task_key(task.customer_id, task.id))

    def _event(self, task: Task, attempt: int, kind: str, **fields: Any) -> Event:
        return Event(kind=kind, task_id=task.id, customer_id=task.customer_id, attempt=attempt, **fields)

    async def _emit(self, task: Task, attempt: int, kind: str, **fields: Any) -> None:
        await self._publish(self._event(task, attempt, kind, **fields))

    async def _status(
        self, task: Task, attempt: int, status: str, reason: str | None = None, data: dict[str, Any] | None = None
    ) -> None:
        await self._emit(task, attempt, EventKind.STATUS, content=status, data={**(data or {}), "reason": reason})

    async def _publish(self, event: Event, wait: bool = True) -> None:
        """Store ``event`` (:func:`publish_event`: a final status under the id of every ending of its attempt, so
        that it ends once, the control plane perhaps ending it too); without ``wait``, see :meth:`_stored`."""
        assert event.task_id is not None
        if wait:
            await publish_event(self._jet.js, event)
        else:
            storing = self._storing.setdefault(event.task_id, Storing())
            subject = task_events_subject(event.customer_id, event.task_id)
            storing.add(await self._wire.store(subject, event.model_dump_json().encode(), STORE_TIMEOUT_S))

    async def _stored(self, task: Task) -> BaseException | None:
        """Wait until the task's events published without waiting are stored; the first error if one was not
        (logged)."""
        storing = self._storing.pop(task.id, None)
        unstored = await storing.stored() if storing is not None else None
        if unstored is not None:
            log.warning("task %s: an event was not stored: %s", task.id, unstored)
        return unstored


class _Presence:
    """Heartbeats of the members of one run, once :meth:`watch` runs: a member that falls silent, or says it left,
    breaks the run off."""

    def __init__(self, config: RunnerConfig, members: set[str], active: _Active) -> None:
        self._config = config
        self._active = active
        self._seen = dict.fromkeys(members, time.monotonic())
        self._left: str | None = None
        self._watching = False

    def reset(self) -> None:
        now = time.monotonic()
        self._seen = dict.fromkeys(self._seen, now)

    async def on_beat(self, msg: Msg) -> None:
        parts = msg.data.decode().split()
        if len(parts) in (3, 4) and parts[0] == "member" and parts[1] in self._seen:
            if len(parts) == 3:
                self._seen[parts[1]] = time.monotonic()
            elif parts[3] == "left" and self._left is None:
                self._left = parts[1]
                if self._watching:
                    self._lost_left()

    def _lost_left(self) -> None:
        self._active.stop(lost=f"team member {self._left} left the run")

    async def watch(self) -> None:
        self._watching = True
        if self._left is not None:  # while the others joined
            self._lost_left()
            return
        while True:
            await asyncio.sleep(self._config.heartbeat_s)
            now = time.monotonic()
            for agent_id, seen in self._seen.items():
                if now - seen > self._config.member_lost_after_s:
                    self._active.stop(lost=f"team member {agent_id} stopped answering (its process is gone)")
                    return


def _task_input(request: TeamTaskRequest, team: Team, checkpoint: Checkpoint) -> Any:
    if checkpoint.between_turns:
        return None  # the request's input is in the checkpoint's state already: go on from there
    if request.kind == "start":
        return request.content if checkpoint.state is None else None
    if team.mode == "swarm" and checkpoint.asked_by:
        return HandoffMessage(source=USER, target=checkpoint.asked_by, content=request.content)
    return TextMessage(source=USER, content=request.content)


def _question(result: TaskResult | None, handoff: HandoffMessage) -> str:
    """What the member asks: its last words before handing off to the user, else the handoff's own text."""
    for message in reversed(list(result.messages[:-1] if result else [])):
        if isinstance(message, BaseChatMessage) and message.source == handoff.source:
            if isinstance(message, TextMessage):
                return message.content
            break
    return handoff.content
