"""Tasks: dispatch to an agent's work queue, the record folded from the task's events, and its event stream.

Every event of a task lives in the ``CARAVAN_EVENTS`` stream; the stream sequence is the event's ID here (the
API shows it enciphered: :mod:`control.eventids`), so a client resumes after the last ID it saw with no gap and
no duplicate.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import nats
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from agent.aio import cancel_and_wait
from agent.backends.natskv import kv_entries_of
from agent.protocol import (
    AGENT_STATE_EVENTS,
    EVENTS_STREAM,
    REPLAYED,
    TASKS_STREAM,
    AgentEventKind,
    Event,
    EventKind,
    TaskRequest,
    cancel_subject,
    consumer_name,
    ending_msg_id,
    event_on_its_subject,
    task_events_subject,
    task_subject,
    utcnow,
)
from agent.teamprotocol import team_cancel_subject
from control.errors import Conflict, Invalid, NotFound
from control.ids import new_id, quoted_id
from control.lease import Lease
from control.models import (
    TERMINAL_TASK_STATUSES,
    Agent,
    AgentStatus,
    Task,
    TaskCreate,
    TaskMessage,
    TaskStatus,
    TranscriptEntry,
    Usage,
)
from control.natsio import NATS_UNAVAILABLE, PacedReader
from control.services.agents import AgentService, failure, why_not_serving
from control.services.killswitch import KillswitchService
from control.services.quotas import QuotaService
from control.services.task_index import TaskIndex, created_us
from control.store import Conflict as StoreConflict
from control.store import Repo, purge_keys

if TYPE_CHECKING:
    from control.teams.dispatch import TeamTasks

__all__ = [
    "StreamedEvent",
    "TaskService",
    "customer_unfinished_tasks",
    "handed_out",
    "publish_event",
    "unfinished_tasks",
]

KILLSWITCH_QUIET_S = 0.05
KILLSWITCH_STATE_DELAY_S = 1.0
"""Agents' killswitch acknowledgements reach their records after a pause in their burst, or this at most."""

_STATUS_READ = 200
_READ_MOST = 8000
"""Records a listing of one status reads first while it fills its page (a page's worth without a status), twice as
many each time after, up to ``_READ_MOST`` (read in parallel batches of 1,000)."""

FOLDED_KEPT = 1024
"""Task records the tracker keeps at hand (:meth:`TaskService._fold`): tasks in flight at once, beyond which the
one that went longest without an event is read again at its next."""

CANCEL_RETELL_S = 5.0
"""How often an agent that has not stopped a cancelled task yet is told again (a cancel is a plain NATS message:
an agent reconnecting at that moment never heard it); at least three times within the deadline."""

log = logging.getLogger("caravan.tasks")
T = TypeVar("T")
TRACKER = "caravan-tracker"
TRACKER_LEASE_KEY = "lease.tracker"
TRACKER_LEASE_S = 10.0
"""A tracker that has not renewed its lease for this long is taken over by another control-plane replica."""
FETCH_BATCH = 256
"""Events the tracker fetches at most at once."""


@dataclass(frozen=True)
class StreamedEvent:
    id: int
    event: Event

    @property
    def terminal(self) -> bool:
        return self.event.ends_attempt


def _final(stored: RawStreamMsg) -> bool:
    """Whether a stored task event is its task's final status (an event that does not parse is none)."""
    try:
        return StreamedEvent(stored.seq or 0, Event.model_validate_json(stored.data or b"")).terminal
    except ValueError:
        return False


async def publish_event(js: JetStreamContext, event: Event) -> None:
    """Store a task's ``event`` in its task's events. A final status goes under the message id of every ending of
    its attempt (:func:`agent.protocol.ending_msg_id`): another stored within the stream's duplicate window (two
    minutes), by the run or another replica, is dropped as the same event."""
    assert event.task_id is not None
    msg_id = ending_msg_id(event)
    headers = {"Nats-Msg-Id": msg_id} if msg_id is not None else None
    await js.publish(
        task_events_subject(event.customer_id, event.task_id), event.model_dump_json().encode(), headers=headers
    )


def task_key(customer_id: str, task_id: str) -> str:
    """A task record's key (and its team checkpoint's): the customer's records share a prefix."""
    return f"{customer_id}.{task_id}"


async def unfinished_tasks(records: Repo[Task], in_flight: Mapping[str, Iterable[str]]) -> list[Task]:
    """The records of the tasks in flight (``{customer id: task ids}``, as the quota slots hold them) that have not
    ended: a read of those records alone, however many tasks the customers have kept (a slot is held from just
    before a task's record is made until its end is folded in, so a record may be missing or already ended)."""
    keys = [task_key(customer_id, task_id) for customer_id, ids in in_flight.items() for task_id in ids]
    return [task for task in await records.named_as(Task, keys) if task.status not in TERMINAL_TASK_STATUSES]


async def customer_unfinished_tasks(records: Repo[Task], quotas: QuotaService, customer_id: str) -> list[Task]:
    """A customer's unfinished tasks: :func:`unfinished_tasks` of the slots their quota holds."""
    return await unfinished_tasks(records, {customer_id: await quotas.tasks_in_flight(customer_id)})


async def handed_out(js: JetStreamContext, consumer: str, seq: int) -> bool:
    """Whether the work queue's ``consumer`` has handed out request ``seq``, to a runner that may still hold it
    (a consumer hands out its requests in stream order). False if there is no such consumer: none can."""
    try:
        info = await js.consumer_info(TASKS_STREAM, consumer)
    except NotFoundError:
        return False
    return info.delivered is not None and info.delivered.stream_seq >= seq


def _may_run(agent: Agent) -> bool:
    """Whether a process of ``agent`` may be running tasks: not when its job is stopped or failed (a soft
    killswitch's `killed` agent still runs, halted)."""
    if agent.status in (AgentStatus.STOPPED, AgentStatus.FAILED):
        return False
    return not (agent.status == AgentStatus.KILLED and agent.desired == "stopped")


def _cancel_requested(task: Task) -> Task | None:
    if task.cancel_requested or task.status in TERMINAL_TASK_STATUSES:
        return None
    return task.model_copy(update={"cancel_requested": True})


class _Lifecycle(BaseModel):
    """What the sweep and the cancel watches read of every task record: the rest (a transcript, in records written
    before transcripts had their own bucket) is not validated."""

    id: str
    customer_id: str
    agent_id: str | None = None
    status: TaskStatus
    cancel_requested: bool = False
    finished_at: datetime | None = None
    updated_at: datetime


class TaskService:
    def __init__(
        self,
        repo: Repo[Task],
        transcripts: KeyValue,
        index: KeyValue,
        ended_index: KeyValue,
        js: JetStreamContext,
        agents: AgentService,
        guard: KillswitchService,
        quotas: QuotaService,
        on_budget_exceeded: Callable[[str, int, int], Awaitable[None]],
        leases: KeyValue,
        *,
        cancel_deadline_s: float = 60.0,
        tracker_lease_s: float = TRACKER_LEASE_S,
    ) -> None:
        self._repo = repo
        self._transcripts = transcripts
        self._index = TaskIndex(index, ended_index, repo)
        self._js = js
        self._agents = agents
        self._guard = guard
        self._quotas = quotas
        self._on_budget_exceeded = on_budget_exceeded
        self._leases = leases
        self._tracker_lease_s = tracker_lease_s
        self._lease: Lease | None = None  # while the tracker is started: folding while this replica holds it
        self._on_agent_event: Callable[[Event], Awaitable[None]] | None = None
        self._tracker: asyncio.Task[None] | None = None
        self._tracker_sub: JetStreamContext.PullSubscription | None = None
        self._unfinished: builtins.list[Msg] = []  # the events a stopped tracker had fetched and not acknowledged
        # the records of tasks in flight as the tracker stored them last, with their revisions: the next event
        # of a task is folded into its record without reading it back (read again if another writer changed it)
        self._folded: dict[str, tuple[Task, int]] = {}
        self._teams: TeamTasks | None = None
        self._cancel_deadline_s = cancel_deadline_s
        self._cancelling: dict[str, asyncio.Task[None]] = {}  # task key -> the watch that sees its cancel through

    def attach_teams(self, teams: TeamTasks) -> None:
        """Tasks on teams go to ``teams`` (their runs are coordinated by the team runner)."""
        self._teams = teams

    async def create(self, customer_id: str, spec: TaskCreate) -> Task:
        """Queue a task on an agent or a team, within the customer's quota of concurrent tasks."""
        task_id = new_id("tk")
        await self._quotas.reserve_task(customer_id, task_id)
        try:
            if spec.team_id is not None:
                if self._teams is None:
                    raise Invalid("tasks on teams are not available here; give agent_id")
                task = await self._queue(*await self._teams.prepare(customer_id, spec, task_id))
                await self._unless_team_went(task)
                return task
            return await self._create_on_agent(customer_id, spec, task_id)
        except BaseException:
            await self._quotas.release_task(customer_id, task_id)
            raise

    async def _create_on_agent(self, customer_id: str, spec: TaskCreate, task_id: str) -> Task:
        assert spec.agent_id is not None
        agent = await self._agents.get(customer_id, spec.agent_id)
        await self._guard.ensure_not_halted(agent)
        if (why := why_not_serving(agent)) is not None:
            raise Conflict(f"agent {agent.id} is {why}")
        task = Task(id=task_id, customer_id=customer_id, agent_id=agent.id, task=spec.task)
        request = TaskRequest(task_id=task.id, customer_id=customer_id, agent_id=agent.id, task=spec.task)
        task = await self._queue(task, task_subject(customer_id, agent.id), request.model_dump_json().encode())
        try:
            await self._unless_agent_went(task)
        except NATS_UNAVAILABLE as exc:  # the task is queued whole: the client is told so, not to make it again
            log.warning("task %s is queued; whether its agent went meanwhile could not be read: %r", task.id, exc)
        # the answer is the task as queued: the agent may already have picked it up, which the events will tell
        return task

    async def _queue(self, task: Task, subject: str, request: bytes) -> Task:
        """Store a new task: its record, its ``queued`` event, and its request on ``subject`` in its work queue (the
        task's id as the request's ``Nats-Msg-Id``). Returns the task with the request's ``queue_seq``.

        All of it or none: when a step fails (NATS away, a stream gone), what was stored is taken back (the request
        out of the queue, the record deleted) before the error goes up, so that the caller that is told the task
        was not made finds none, and no quota slot is held by a task nothing will run. A request whose publishing
        timed out may have been stored all the same, and one its runner took already may be running, its start
        folded into the record before it went: its runner is told to stop it (an agent keeps a cancel for a request
        still on its way), and a run that starts later finds no record and stops (the tracker tells it)."""
        key = task_key(task.customer_id, task.id)
        await self._index.add(task)  # first: a record listed has its key (see control.services.task_index)
        try:
            await self._repo.create(key, task)
        except BaseException:
            with contextlib.suppress(Exception):  # (a key left without its record is not listed, and swept)
                await self._index.remove(task)
            raise
        seq: int | None = None
        try:
            await self.publish(
                Event(kind=EventKind.STATUS, task_id=task.id, customer_id=task.customer_id, content="queued")
            )
            seq = (await self._js.publish(subject, request, headers={"Nats-Msg-Id": task.id})).seq
            await self._repo.update(key, lambda t: t.model_copy(update={"queue_seq": seq}))
        except BaseException:
            await self._take_back_queued(task, key, seq)
            raise
        return task.model_copy(update={"queue_seq": seq})

    async def _take_back_queued(self, task: Task, key: str, seq: int | None) -> None:
        """:meth:`_queue`'s undoing: the request out of the queue (``seq``, None if its answer never came), the
        record deleted, and the runner told if the request may be in its hands."""
        running = seq is None  # (stored or not)
        try:
            if seq is not None:
                try:
                    await self._js.delete_msg(TASKS_STREAM, seq)
                except NotFoundError:  # taken by its runner already
                    running = True
            await self._repo.purge(key)  # no marker left: a listing's keys (read without values) are the tasks
            await self._index.remove(task)
        except Exception as exc:  # NATS still away: the record stays `queued`, and a cancel ends it
            log.error("task %s could not be queued, nor its record taken back: %r", key, exc)
            return
        if running:
            try:
                await self._tell_runner(task)
            except Exception as exc:  # (a run that starts later still finds no record)
                log.error("task %s was taken back, but its runner could not be told to stop it: %r", key, exc)

    async def _unless_team_went(self, task: Task) -> None:
        """A task queued as its team was deleted after :meth:`TeamTasks.prepare` read it: the delete did not see
        it (it had no record yet), so it ends here, taken out of the queue (see :meth:`TeamService.delete`)."""
        assert self._teams is not None
        try:
            reason = await self._teams.went(task)
        except NATS_UNAVAILABLE as exc:  # queued whole: the client is told so, not to make it again
            log.warning("task %s is queued; whether its team went meanwhile could not be read: %r", task.id, exc)
            return
        if reason is not None:
            await self._take_back(task, reason, TaskStatus.CANCELLED)

    async def _unless_agent_went(self, task: Task) -> None:
        """A task queued as its agent was deleted, or failed, after it was read above: the delete (or the failure)
        ended the agent's tasks it found, and this one may have come after that; it ends too
        (:meth:`_take_back`)."""
        assert task.agent_id is not None
        try:
            agent = await self._agents.get(task.customer_id, task.agent_id)
        except NotFound:
            reason, status = f"agent {task.agent_id} was deleted", TaskStatus.CANCELLED
        else:
            if agent.status is not AgentStatus.FAILED:
                return
            reason, status = _failed_reason(agent), TaskStatus.FAILED
        await self._take_back(task, reason, status)

    async def _take_back(self, task: Task, reason: str, status: TaskStatus) -> None:
        """End a task just queued, its request taken out of the queue (nothing else would end it, and it would hold
        its quota slot for good)."""
        if task.queue_seq is not None:
            with contextlib.suppress(NotFoundError):
                await self._js.delete_msg(TASKS_STREAM, task.queue_seq)
        await self._end(task, reason, status)

    async def get(self, customer_id: str | None, task_id: str, transcript: bool = True) -> Task:
        """The task, with its transcript in ``messages`` (``transcript=False``: the record alone)."""
        task = await self._repo.owned(customer_id, task_id)
        if task is None:
            raise NotFound(f"task {quoted_id(task_id)} not found")
        return await self._with_transcript(task) if transcript else task

    async def list(
        self,
        customer_id: str | None,
        status: TaskStatus | None = None,
        limit: int = 100,
        before: str | None = None,
        *,
        agent_id: str | None = None,
        team_id: str | None = None,
    ) -> list[Task]:
        """The newest ``limit`` tasks (of a status; given to agent ``agent_id`` or team ``team_id``; created before
        task ``before``), with their transcripts. The page is filled with the tasks that match, whichever tasks lie
        between them. Tasks created at the same time are ordered by id, so that pages follow one another with none
        left out or repeated. An agent's tasks are those given to it, not its teams'; an id that names no agent or
        team of the customer lists none.

        The order, the owners and the times come from the tasks' index keys (:class:`TaskIndex`); records are read
        newest first, a page's worth at a time, until the page is full, and only the listed tasks' transcripts. With
        a status of tasks in flight, only the records of the tasks that hold a quota slot are read; with a status
        of ended tasks, as many as it takes to fill the page, but for those known to have ended with another
        (:meth:`TaskIndex.ended`, told of those read here)."""
        ended = status in TERMINAL_TASK_STATUSES
        listed, known = await asyncio.gather(self._index.listing(customer_id), self._known_ended(customer_id, ended))
        if before is not None:  # any task of the customer's: a page's last task, or one of an unfiltered listing
            anchor = await self._repo.owned(customer_id, before)
            if anchor is None:
                raise NotFound(f"task {quoted_id(before)} not found")
            mark = (created_us(anchor.created_at), anchor.id)
            listed = [entry for entry in listed if (entry.created_us, entry.task_id) < mark]
        listed = [
            entry
            for entry in listed
            if (agent_id is None or entry.agent_id == agent_id) and (team_id is None or entry.team_id == team_id)
        ]
        if ended:  # not those known to have ended with another status
            listed = [entry for entry in listed if known.get(entry.record_key, status) == status]
        elif status is not None:  # only the tasks that hold a quota slot
            in_flight = await self._in_flight(customer_id)
            listed = [entry for entry in listed if entry.task_id in in_flight.get(entry.customer_id, ())]
        page: builtins.list[Task] = []
        start, step = 0, limit if status is None else max(limit, _STATUS_READ)
        while start < len(listed) and len(page) < limit:
            keys = [entry.record_key for entry in listed[start : start + step]]
            read = {task_key(t.customer_id, t.id): t for t in await self._repo.named_as(Task, keys)}
            if ended:
                await self._index.mark_ended(read, known)
            # a record gone since its key was read is left out
            page += [t for key in keys if (t := read.get(key)) is not None and (status is None or t.status == status)]
            start, step = start + step, min(2 * step, _READ_MOST)
        return await self._with_transcripts(page[:limit])

    async def _known_ended(self, customer_id: str | None, wanted: bool) -> dict[str, TaskStatus]:
        return await self._index.ended(customer_id) if wanted else {}

    async def _in_flight(self, customer_id: str | None) -> dict[str, set[str]]:
        """The ids of the tasks that may be in flight, by customer: those that hold a quota slot, which a task does
        from just before its record is made until its end is folded in, or until it is ended on purpose
        (:meth:`_end`: its record may say `running` a moment longer, and it is not listed as such)."""
        if customer_id is None:
            return {owner: set(ids) for owner, ids in (await self._quotas.everyone()).in_flight.items()}
        return {customer_id: set(await self._quotas.tasks_in_flight(customer_id))}

    async def _with_transcript(self, task: Task) -> Task:
        return (await self._with_transcripts([task]))[0]

    async def _with_transcripts(self, tasks: builtins.list[Task]) -> builtins.list[Task]:
        """The tasks with their transcripts (read together): what a record holds (one written before transcripts
        had their own bucket), then the task's messages in the transcripts bucket."""
        keys = [task_key(task.customer_id, task.id) for task in tasks]
        found: dict[str, builtins.list[tuple[int, TranscriptEntry]]] = {key: [] for key in keys}
        for entry in await kv_entries_of(self._transcripts, [f"{key}.*" for key in keys]):
            key, _, seq = entry.key.rpartition(".")
            if entry.value and key in found:
                found[key].append((int(seq), TranscriptEntry.model_validate_json(entry.value)))
        out = []
        for task, key in zip(tasks, keys, strict=True):
            # a new attempt's transcript replaces the one before
            kept = sorted(((s, i.message) for s, i in found[key] if i.attempt == task.attempt), key=lambda p: p[0])
            messages = [*task.messages, *(message for _, message in kept)]
            out.append(task.model_copy(update={"messages": messages}) if kept else task)
        return out

    async def cancel(self, customer_id: str | None, task_id: str) -> Task:
        """Stop the task wherever it is. A request no runner was handed (still in its queue, or its agent's job
        gone) is taken out and the task ends ``cancelled`` at once; otherwise whoever may run it is told, and the
        task ends when it says so (``cancelled``; ``completed`` if it had just finished), giving back its quota
        slot then. An agent that has not said so is told again every ``CANCEL_RETELL_S``, and after
        ``cancel_deadline_s`` the task ends ``cancelled`` without it (:meth:`_see_cancel_through`). The answer is
        the task as the cancel found it, with its transcript."""
        return await self._with_transcript(await self._cancel(customer_id, task_id))

    async def _cancel(self, customer_id: str | None, task_id: str) -> Task:
        task = await self.get(customer_id, task_id, transcript=False)
        # marked first: a runner that takes the task up (again) after this is told at once (see _fold); and what
        # follows goes by the record as marked, not as read (a team's answer queued meanwhile: its run goes on)
        task = await self._repo.update(task_key(task.customer_id, task.id), _cancel_requested) or task
        if task.status in TERMINAL_TASK_STATUSES:
            raise Conflict(f"task {task.id} is already {task.status.value}")
        if task.team_id is not None and self._teams is not None:
            return await self._teams.cancel(task)
        agent = None
        if task.agent_id is not None:
            with contextlib.suppress(NotFound):  # deleted: nothing runs the task, which ends here
                agent = await self._agents.get(task.customer_id, task.agent_id)
        if agent is not None:
            # told before the queue is looked at: an agent handed the request after that hears the cancel first,
            # and never starts it (agent/worker.py)
            await self._tell_runner(task)
        if agent is None or not _may_run(agent) or not await self._handed_out(task):
            if task.queue_seq is not None:
                with contextlib.suppress(NotFoundError):
                    await self._js.delete_msg(TASKS_STREAM, task.queue_seq)
            await self._end(task, "cancelled on request")
        else:
            self._watch_cancel(task)
        return task

    def _watch_cancel(self, task: Task | _Lifecycle) -> None:
        key = task_key(task.customer_id, task.id)
        if key in self._cancelling or self._lease is None:
            return  # watched already; or this control plane is stopping (the next one takes it up at its start)
        watch = asyncio.create_task(self._see_cancel_through(key), name=f"cancel-{task.id}")
        self._cancelling[key] = watch
        watch.add_done_callback(lambda _: self._cancelling.pop(key, None))

    async def _see_cancel_through(self, key: str) -> None:
        """Tell the agent of a cancelled task again until the task has ended; end it ``cancelled`` at the deadline
        if its agent never does (hung, or it never heard: its quota slot would be held for good). A result that
        comes after that changes nothing (:meth:`_fold`)."""
        deadline = time.monotonic() + self._cancel_deadline_s
        every = min(CANCEL_RETELL_S, self._cancel_deadline_s / 3)
        while True:
            await asyncio.sleep(max(min(every, deadline - time.monotonic()), 0))
            try:
                task = await self._repo.get(key)
                if task is None or task.status in TERMINAL_TASK_STATUSES:
                    return
                if time.monotonic() >= deadline:
                    log.warning(
                        "task %s: its agent did not stop it within %g s of its cancel", task.id, self._cancel_deadline_s
                    )
                    await self._end(
                        task, f"cancelled on request (its agent did not stop it within {self._cancel_deadline_s:g} s)"
                    )
                    return
                await self._tell_runner(task)
            except Exception:  # NATS away for a moment: looked at again a turn later (not at once, past the deadline)
                log.exception("could not see the cancel of %s through", key)
                await asyncio.sleep(every)

    async def sweep_finished(self, before: datetime) -> int:
        """Forget the tasks that ended before ``before``: their transcripts, then their records (a record outlives
        its transcript only until the next sweep, which finds it again). Their events leave the events stream by
        its own age limit. Returns how many were forgotten."""
        forgotten = 0
        for task in await self._repo.list_as(_Lifecycle, ">"):
            ended = task.finished_at or task.updated_at
            if task.status not in TERMINAL_TASK_STATUSES or ended >= before:
                continue
            key = task_key(task.customer_id, task.id)
            await purge_keys(self._transcripts, f"{key}.*")
            await self._repo.purge(key)
            self._folded.pop(key, None)
            forgotten += 1
        await self._index.forget_orphans(before)  # the keys of the tasks forgotten, and of any taken back
        return forgotten

    async def _handed_out(self, task: Task) -> bool:
        """Whether the agent's work queue may have handed the task's request to one of its processes."""
        if task.queue_seq is None or task.agent_id is None:
            return True  # not queued yet, as far as the record tells
        return await handed_out(self._js, consumer_name(task.agent_id), task.queue_seq)

    async def _tell_runner(self, task: Task) -> None:
        """Tell whoever may run ``task`` to stop it: its agent's processes, or the team's manager."""
        await self._tell_runner_of(task.customer_id, task.id, None if task.team_id is not None else task.agent_id)

    async def _tell_runner_of(self, customer_id: str, task_id: str, agent_id: str | None) -> None:
        """Tell agent ``agent_id``'s processes to stop the task's run, or (None) the manager of its team run."""
        nc = self._js._nc
        if agent_id is None:
            await nc.publish(team_cancel_subject(customer_id, task_id), b"")
        else:
            await nc.publish(cancel_subject(customer_id, agent_id), task_id.encode())

    async def _end(self, task: Task, reason: str, status: TaskStatus = TaskStatus.CANCELLED) -> None:
        """End a task nothing runs any more (``cancelled``, or ``status``, for ``reason``), and give back its quota
        slot at once (the tracker gives it back too when it folds the status in: the release is keyed by the task)."""
        event = Event(
            kind=EventKind.STATUS,
            task_id=task.id,
            customer_id=task.customer_id,
            content=status.value,
            data={"reason": reason},
            attempt=task.attempt,
        )
        # one ending of a run: replicas that end it at once (each seeing a cancel through to its deadline) store one
        await self.publish(event)
        await self._quotas.release_task(task.customer_id, task.id)

    async def end_tasks_of_deleted(self, agent: Agent) -> None:
        """An agent is being deleted (it is given no new task; its job is stopped next), or has been: its unfinished
        tasks end ``cancelled`` (:meth:`_end_tasks_of`). A run in flight is told first, in case its job is not
        stopped. Called again once the agent is gone, for a task stored meanwhile that found it still there."""
        await self._end_tasks_of(agent, f"agent {agent.id} was deleted", TaskStatus.CANCELLED)

    async def end_tasks_of_failed(self, agent: Agent) -> None:
        """An agent failed (its job gave up, or the scheduler refused it): nothing runs its work until it is started
        again, so its unfinished tasks end ``failed`` (:meth:`_end_tasks_of`). Tasks given to it once it is
        started again run."""
        await self._end_tasks_of(agent, _failed_reason(agent), TaskStatus.FAILED)

    async def _end_tasks_of(self, agent: Agent, reason: str, status: TaskStatus) -> None:
        """Purge the agent's queued requests from its work queue, and end each of its unfinished tasks, and those of
        the teams it is a member of (no run of theirs can go on without it: one waiting for the human would wait
        for good, as its answer is refused), each runner told (a record may say queued of a task picked up a
        moment ago), saying why and giving back the quota slot. The team runner drops a queued request of a task
        that has ended."""
        await self._js.purge_stream(TASKS_STREAM, subject=task_subject(agent.customer_id, agent.id))
        teams = await self._teams.teams_of(agent) if self._teams is not None else set()
        for task in await customer_unfinished_tasks(self._repo, self._quotas, agent.customer_id):  # not their history
            if task.agent_id == agent.id:
                why = reason
            elif task.team_id in teams:
                why = f"a member of its team: {reason}"
            else:
                continue
            await self._tell_runner(task)
            await self._end(task, why, status)
            if task.team_id is not None and self._teams is not None:
                await self._teams.drop_checkpoint(task)  # (a run's manager drops it too, once it has stopped)

    async def input(self, customer_id: str | None, task_id: str, content: str, segment: int | None = None) -> Task:
        """The human's answer to a task that asked (team tasks); ``segment``: the question it answers. The answer:
        the task as queued to go on, with its transcript. An agent alone has nobody to hand off to, so it never
        asks: it asks in a team of one, as AgentChat has it ask (said in the 409)."""
        task = await self.get(customer_id, task_id, transcript=False)
        if task.team_id is None or self._teams is None:
            raise Conflict(
                f"task {task.id} runs on a single agent, which never asks for input; for an agent that asks, run "
                "the task on a team of that one agent with a handoff to 'user' and termination.handoff_to_user"
            )
        return await self._with_transcript(await self._teams.input(task, content, segment))

    async def publish(self, event: Event) -> None:
        """Store ``event`` (:func:`publish_event`)."""
        await publish_event(self._js, event)

    async def events(self, task: Task, after: int = 0, idle: float = 15.0) -> AsyncIterator[StreamedEvent | None]:
        """The task's events after stream sequence ``after``, ending after the terminal status.

        Yields None after ``idle`` seconds without an event (a keep-alive for the client). A caller asks
        :meth:`ended_before` first, to answer a client that saw the whole stream at once.
        """
        subject = task_events_subject(task.customer_id, task.id)
        async with PacedReader(self._js, EVENTS_STREAM, subject, after) as reader:  # (what the client reads)
            while True:
                try:
                    msg = await reader.next(idle)
                except nats.errors.TimeoutError:
                    current = await self.get(task.customer_id, task.id, transcript=False)
                    if await self.ended_before(current, reader.after):
                        return
                    yield None
                    continue
                item = StreamedEvent(msg.metadata.sequence.stream, Event.model_validate_json(msg.data))
                yield item
                if item.terminal:
                    return

    async def ended_before(self, task: Task, after: int) -> bool:
        """Whether the task's stream has nothing to give after ``after``: the event there is the final status (a
        stream ends with it; what a run said after its task ended, published all the same, is not streamed), or
        no event comes after it and the last is the final status (or the task ended, as read, its events gone
        with the stream's age limit). What a client that saw the whole stream sends when it reconnects (an SSE
        client reconnects whenever a stream closes), told so even before the tracker folds that status into the
        record."""
        subject = task_events_subject(task.customer_id, task.id)
        try:
            last = await self._js.get_last_msg(EVENTS_STREAM, subject)
        except NotFoundError:
            return task.status in TERMINAL_TASK_STATUSES
        if (last.seq or 0) > after:
            return after > 0 and await self._final_at(subject, after)
        if task.status in TERMINAL_TASK_STATUSES:
            return True
        return _final(last)

    async def _final_at(self, subject: str, seq: int) -> bool:
        """Whether the event at stream sequence ``seq`` is the final status of the task whose events ``subject``
        holds (False once it is gone with the stream's age limit)."""
        try:
            stored = await self._js.get_msg(EVENTS_STREAM, seq)
        except NotFoundError:
            return False
        return stored.subject == subject and _final(stored)

    # -- tracker: folds every event into the records ------------------------------------------------------

    async def start_tracker(self, on_agent_event: Callable[[Event], Awaitable[None]]) -> None:
        """Fold the task events into the records while this control plane holds the tracker's lease: one replica
        at a time folds them, so that each task's events are folded in their order (two replicas sharing the
        consumer would each fold some, and a record that took a later event first makes an earlier one look
        folded already). The others stand by and take over when the holder stops, or goes silent."""
        if self._lease is not None:
            raise RuntimeError("tracker already started")
        self._on_agent_event = on_agent_event
        self._lease = Lease(
            self._leases, TRACKER_LEASE_KEY, self._begin_tracking, self._end_tracking, ttl_s=self._tracker_lease_s
        )
        await self._lease.start()
        for task in await self._repo.list_as(_Lifecycle, ">"):  # cancels a stopped control plane left unfinished
            if task.cancel_requested and task.agent_id is not None and task.status not in TERMINAL_TASK_STATUSES:
                self._watch_cancel(task)

    async def stop_tracker(self) -> None:
        for watch in list(self._cancelling.values()):
            await cancel_and_wait(watch)
        if self._lease is not None:
            await self._lease.stop()  # hands the folding over to another replica
            self._lease = None
        await self._end_tracking()  # (done as the lease was given up, unless stopping cut that short)

    @property
    def folding(self) -> bool:
        """Whether this control plane folds the task events (it holds the tracker's lease)."""
        return self._lease is not None and self._lease.held

    async def backlog(self) -> int:
        """How many task events are stored and not yet folded (or folded and not yet acknowledged)."""
        info = await self._js.consumer_info(EVENTS_STREAM, TRACKER)
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    async def _begin_tracking(self) -> None:
        """This control plane has come to hold the tracker's lease: it folds the events from where the last holder
        left off. Events a holder that is gone (it crashed) had fetched and not acknowledged would come back only
        after the ack wait, behind the events after them: the consumer is rewound to its acknowledgement floor, so
        that they come first (the events after them, folded already, change nothing)."""
        config = ConsumerConfig(
            durable_name=TRACKER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30,
            max_ack_pending=10_000,
        )
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, TRACKER)
        except NotFoundError:
            info = None
        if info is not None and info.num_ack_pending:
            log.info(
                "the last tracker left %d events unacknowledged: folding from after event %d again",
                info.num_ack_pending,
                info.ack_floor.stream_seq,
            )
            await self._js.delete_consumer(EVENTS_STREAM, TRACKER)
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = (info.ack_floor.stream_seq or 0) + 1
        elif info is not None:  # as it was made (a policy to start from cannot change)
            config.deliver_policy, config.opt_start_seq = info.config.deliver_policy, info.config.opt_start_seq
        await self._js.add_consumer(EVENTS_STREAM, config)
        psub = await self._js.pull_subscribe_bind(TRACKER, stream=EVENTS_STREAM)
        self._tracker_sub = psub
        assert self._on_agent_event is not None and self._lease is not None
        self._tracker = asyncio.create_task(self._track(psub, self._on_agent_event, self._lease), name="task-tracker")

    async def _end_tracking(self) -> None:
        if self._tracker is not None:
            await cancel_and_wait(self._tracker)
            self._tracker = None
        self._folded.clear()
        if self._tracker_sub is not None:
            # The events it had in hand, and those delivered for a fetch still open that it never took, go back to
            # the stream at once (nak), so that the next tracker (this control plane's, or another's) folds them
            # before the events that came after them. Left unacknowledged, they would come back only after the ack
            # wait, behind later events of their task that make them look folded already: their messages and tokens
            # would be lost to the record. They go back after the unsubscribe, or a fetch still open would take
            # them again. (One delivered in the instant between the last look and the unsubscribe comes back after
            # the ack wait.)
            unfinished, self._unfinished = self._unfinished, []
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                while self._tracker_sub.pending_msgs:
                    unfinished += await self._tracker_sub.fetch(FETCH_BATCH, timeout=0.1)
            with contextlib.suppress(nats.errors.Error):
                await self._tracker_sub.unsubscribe()
            self._tracker_sub = None
            with contextlib.suppress(nats.errors.Error):  # a connection that closed: they come after the ack wait
                for msg in unfinished:
                    if not msg.is_acked:
                        await msg.nak()

    async def _track(
        self,
        psub: JetStreamContext.PullSubscription,
        on_agent_event: Callable[[Event], Awaitable[None]],
        lease: Lease,
    ) -> None:
        # An agent's state events (ready; halted or resumed) each say all there is to know of it, so the last
        # one is all its record needs. Killswitch acknowledgements come in bursts (fifty agents within a few
        # milliseconds): writing their records then would take the CPU the control plane needs to collect
        # them, so they wait for a pause of KILLSWITCH_QUIET_S in the burst (at most KILLSWITCH_STATE_DELAY_S),
        # superseded by later ones, and are applied then.
        pending: dict[str, tuple[Msg, Event]] = {}
        msgs: builtins.list[Msg] = []
        first = last = 0.0

        def due() -> float:
            return min(last + KILLSWITCH_QUIET_S, first + KILLSWITCH_STATE_DELAY_S)

        async def apply(msg: Msg, event: Event) -> None:
            await self._guarded(msg, _patiently("apply an agent's event", functools.partial(on_agent_event, event)))

        try:
            while True:
                wait = max(due() - time.monotonic(), 0.005) if pending else 1.0
                try:
                    msgs = await psub.fetch(FETCH_BATCH, timeout=wait)
                except TimeoutError:  # nats.errors.TimeoutError, and the bare one nats-py raises when a fetch runs late
                    msgs = []
                except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
                    return
                if msgs and not lease.valid():  # not renewed lately (NATS away, or a pause): another may hold it
                    for msg in msgs:
                        await msg.nak(delay=self._tracker_lease_s / 4)
                    msgs = []
                    await asyncio.sleep(self._tracker_lease_s / 4)  # the lease is renewed meanwhile, or lost
                    continue
                folds: dict[str, list[tuple[Msg, Event]]] = {}  # per task, in order: one record write for them all
                for msg in msgs:
                    event = self._decode(msg)
                    if event is not None and event.agent_id is not None and event.kind in AGENT_STATE_EVENTS:
                        superseded = pending.pop(event.agent_id, None)
                        if superseded is not None:
                            await superseded[0].ack()
                        if event.kind == AgentEventKind.KILLSWITCH:  # a ready agent is shown at once
                            last = time.monotonic()
                            first = first if pending else last
                            pending[event.agent_id] = (msg, event)
                            continue
                    if event is not None and event.task_id is not None and event.kind != "chunk":
                        # a chunk is a piece of a streamed answer, which arrives whole as a message too
                        folds.setdefault(task_key(event.customer_id, event.task_id), []).append((msg, event))
                        continue
                    if event is not None and event.task_id is None and event.agent_id is not None:
                        await apply(msg, event)
                    await msg.ack()
                for key, folding in folds.items():
                    await self._guarded(folding[0][0], self._fold(key, folding))
                    for msg, _ in folding:
                        await msg.ack()
                if pending and time.monotonic() >= due():
                    applying, pending = pending, {}
                    for msg, event in applying.values():
                        await apply(msg, event)
                        await msg.ack()
        except asyncio.CancelledError:
            self._unfinished = [*msgs, *(msg for msg, _ in pending.values())]  # stop_tracker hands them back
            raise

    @staticmethod
    def _decode(msg: Msg) -> Event | None:
        try:
            event = Event.model_validate_json(msg.data)
        except ValueError:
            log.warning("skipping a malformed event on %s", msg.subject)
            return None
        if not event_on_its_subject(msg.subject, event):
            log.warning("skipping an event on %s that names another task, agent or customer", msg.subject)
            return None
        return event

    @staticmethod
    async def _guarded(msg: Msg, folding: Awaitable[None]) -> None:
        try:
            await folding
        except ValueError:  # well-formed JSON that says something impossible (an unknown status, say)
            log.warning("skipping a malformed event on %s", msg.subject)
        except (StoreConflict, nats.errors.Error):
            # the event stays in the stream (and on the SSE feed); only the record missed it
            log.exception("could not fold the event on %s into its record", msg.subject)

    async def _fold(self, key: str, events: builtins.list[tuple[Msg, Event]]) -> None:
        """Fold a task's events (in stream order): its messages into its transcript, each under its own key, and
        the rest into its record with one write. Its tokens are metered, and its quota's slot released when it
        ends, for the events folded in: one delivered again (the tracker stopped before acknowledging it) is at
        or before the record's ``events_seq`` and changes nothing."""
        customer_id = events[0][1].customer_id
        sequenced = [(msg.metadata.sequence.stream, event) for msg, event in events]
        known = self._folded.pop(key, None) or await self._repo.get_known(key)
        if known is None:  # no such task (never queued whole, or forgotten): nothing to keep of its events
            for _, event in sequenced:
                if _starts(event):  # a run of it: stopped (see _queue)
                    await self._tell_runner_of(customer_id, event.task_id or "", event.agent_id)
            return
        # the messages first, each under its own key: a record that says the task ended is never read before its
        # transcript is whole (so one folded into the record already, delivered again, has its entry stored)
        # and none after the task ended: what a run says once it is cancelled is no part of it (the SSE feed
        # ends at the end as well)
        entries: builtins.list[tuple[int, TranscriptEntry]] = []
        ended = known[0].status in TERMINAL_TASK_STATUSES
        for seq, event in sequenced:
            if ended:
                break
            if seq > known[0].events_seq and event.attempt >= known[0].attempt:
                if (message := transcript_message(event)) is not None:
                    entries.append((seq, TranscriptEntry(attempt=event.attempt, message=message)))
                ended = event.kind == EventKind.STATUS and event.content in TERMINAL_TASK_STATUSES
        written = await asyncio.gather(
            *(self._transcripts.put(f"{key}.{seq}", entry.model_dump_json().encode()) for seq, entry in entries),
            return_exceptions=True,
        )
        for (seq, _), result in zip(entries, written, strict=True):
            if isinstance(result, BaseException):  # the event stays in the stream (and on the SSE feed)
                log.error("task %s: the message of event %d is not in its transcript: %r", key, seq, result)
        metered: dict[int, int] = {}  # the tokens of each usage event taken in, by any try (some may not be written)

        def fold(task: Task) -> Task | None:  # may run again on a newer record: it starts over each time
            folded = None
            for seq, event in sequenced:
                if seq <= task.events_seq:
                    continue
                try:
                    after = fold_event(task, event)
                except ValueError:  # well-formed JSON that says something impossible (an unknown status, say)
                    log.warning("skipping a malformed event of task %s: %s", key, event.kind)
                    continue
                metering = event.kind == EventKind.USAGE and not event.data.get(REPLAYED)
                if metering:
                    metered[seq] = int(event.data.get("prompt_tokens", 0)) + int(event.data.get("completion_tokens", 0))
                if after is not None or metering:  # (a late attempt's usage changes no record, but is metered once)
                    task = folded = (after or task).model_copy(update={"events_seq": seq})
            return folded

        was_open = known[0].status not in TERMINAL_TASK_STATUSES
        stored = await _patiently(f"fold the events of {key}", lambda: self._repo.update_known(key, known, fold))
        if stored is None:
            return
        after = stored[0]
        # the usage events the record took in (by the try that wrote it: one that timed out may have written it)
        taken = {seq: n for seq, n in metered.items() if seq <= after.events_seq}
        if after.cancel_requested and any(_starts(event) for _, event in sequenced):
            await self._tell_runner(after)  # a run that started (again) after the cancel: told now
        if after.status not in TERMINAL_TASK_STATUSES:
            if len(self._folded) >= FOLDED_KEPT:
                del self._folded[next(iter(self._folded))]  # the task that went longest without an event
            self._folded[key] = stored
        tokens = sum(taken.values())
        if tokens:  # keyed by the last usage event: a write tried again is never metered twice
            upto = max(taken)
            total, budget, crossed = await _patiently(
                f"meter the tokens of {key}", lambda: self._quotas.record_tokens(customer_id, after.id, upto, tokens)
            )
            if crossed and budget is not None:
                await self._on_budget_exceeded(customer_id, total, budget)
        if after.status in TERMINAL_TASK_STATUSES and was_open:  # after the metering: it drops the task's mark
            await _patiently(f"release the slot of {key}", lambda: self._quotas.release_task(customer_id, after.id))
            await self._index.ended_now(after)  # (after its record: see control.services.task_index)
        if (
            after.cancel_requested
            and after.status == TaskStatus.AWAITING_INPUT
            and self._teams is not None
            and any(_asks(event) for _, event in sequenced)
        ):
            # a team's run asked the human as the cancel came: the cancel read the record as `running` and told the
            # manager, whose run had ended; nobody else ends the task, which would wait for an answer for good
            teams = self._teams
            await _patiently(f"cancel the waiting {key}", lambda: teams.cancel(after))


TRANSCRIPT_KINDS = (EventKind.MESSAGE, EventKind.TOOL_CALL, EventKind.TOOL_RESULT, EventKind.INPUT_REQUEST)


MAY_PASS: tuple[type[Exception], ...] = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,  # what a KV write raises when nothing serves its stream (nats-py)
    nats.js.errors.ServiceUnavailableError,
    nats.errors.TimeoutError,
    StoreConflict,
)
"""Failures of a KV write that may pass: JetStream away for a moment, a record many write at once. (A write whose
answer timed out may have been made: each write the tracker tries again changes nothing the second time.)"""
PATIENCE_S = 60.0
"""How long the tracker tries a write again (the events after it waiting) before it gives it up."""


async def _patiently(what: str, write: Callable[[], Awaitable[T]]) -> T:
    """``write()``, tried again while it fails with one of :data:`MAY_PASS`, for up to :data:`PATIENCE_S`; then its
    failure is raised. The tracker waits meanwhile, so that the record takes the events after it in order, and
    does not miss it for good (a task that ended would stay running, holding its slot)."""
    delay, give_up = 0.05, time.monotonic() + PATIENCE_S
    while True:
        try:
            return await write()
        except MAY_PASS as exc:
            if time.monotonic() + delay > give_up:
                raise
            log.warning("could not %s (%r): trying again in %g s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _failed_reason(agent: Agent) -> str:
    return f"agent {agent.id} {failure(agent)}; start it again and give it the task again"


def _starts(event: Event) -> bool:
    return event.kind == EventKind.STATUS and event.content == TaskStatus.RUNNING


def _asks(event: Event) -> bool:
    return event.kind == EventKind.STATUS and event.content == TaskStatus.AWAITING_INPUT


def transcript_message(event: Event) -> TaskMessage | None:
    """What the task's transcript shows of ``event``; None for an event that is not part of it."""
    if event.kind not in TRANSCRIPT_KINDS:
        return None
    if event.kind == EventKind.MESSAGE:
        kind, content = str(event.data.get("type", "text")), event.content
    else:
        kind, content = event.kind, event.data.get("calls") or event.data.get("results") or event.content
    return TaskMessage(source=event.source, type=kind, content=content, at=event.at)


def _late_answer(task: Task, segment: Any) -> bool:
    """Whether a ``queued`` status of the same attempt is the human's answer's, stored after the run it resumed
    had started (the answer is queued before its status is published, and a manager may be quick to take it up):
    the task is running, or already waits for the answer to a later question (``segment``: the one the answer
    was for). Nothing goes back to the queue for it: the task would show ``queued`` until its next status, a
    cancel would look for its request in the queue, and a task waiting for the human could not be answered."""
    if task.status == TaskStatus.RUNNING:
        return True
    return task.status == TaskStatus.AWAITING_INPUT and isinstance(segment, int) and segment < task.input_segment


def fold_event(task: Task, event: Event) -> Task | None:
    """The task record after ``event``; None when the event changes nothing (late or stale)."""
    if event.attempt < task.attempt:
        return None
    changes: dict[str, Any] = {"updated_at": utcnow()}
    if event.attempt > task.attempt:  # a redelivery after a crash: the new attempt's transcript replaces the old
        if task.status in TERMINAL_TASK_STATUSES:
            return None
        changes.update(
            attempt=event.attempt,
            messages=[],
            result=None,
            usage=Usage(),
        )
        task = task.model_copy(update=changes)
    if event.kind == EventKind.STATUS:
        if task.status in TERMINAL_TASK_STATUSES:
            return None
        status = TaskStatus(event.content or "")
        segment = event.data.get("segment")
        given_back = bool(event.data.get("given_back"))  # by an agent that stopped: its next attempt runs it
        if status == TaskStatus.QUEUED and "attempt" not in changes and not given_back and _late_answer(task, segment):
            return None
        changes.update(status=status, status_reason=event.data.get("reason"))
        if status == TaskStatus.AWAITING_INPUT and isinstance(segment, int):
            changes["input_segment"] = segment
        if status in TERMINAL_TASK_STATUSES:
            changes["finished_at"] = event.at
    elif event.kind in TRANSCRIPT_KINDS:  # kept in the transcripts bucket; the record changes only for an attempt
        return task if "attempt" in changes else None
    elif event.kind == EventKind.USAGE:
        changes["usage"] = task.usage.model_copy(
            update={
                "prompt_tokens": task.usage.prompt_tokens + int(event.data.get("prompt_tokens", 0)),
                "completion_tokens": task.usage.completion_tokens + int(event.data.get("completion_tokens", 0)),
            }
        )
    elif event.kind in (EventKind.RESULT, EventKind.ERROR) and task.status in TERMINAL_TASK_STATUSES:
        return None  # a run's last words after the task ended (cancelled meanwhile): they change nothing
    elif event.kind == EventKind.RESULT:
        changes["result"] = event.content
    elif event.kind == EventKind.ERROR:
        changes["status_reason"] = event.content
    else:
        return None
    return task.model_copy(update=changes)
