"""The agent process: AutoGen AgentChat served over NATS.

It loads its definition from the control plane, pulls tasks from its JetStream work queue (replicas
share the durable consumer), runs each task in its own ``AssistantAgent`` with its own conversation
state, and publishes every event of the run on the task's subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import nats
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult
from autogen_core import CancellationToken
from autogen_core.models import ChatCompletionClient
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from agent.aio import HAND_BACK_DELAY_S, cancel_and_wait, keep_in_progress, nats_error_logger
from agent.backends import create_flag_store
from agent.backends.base import FlagStore
from agent.health import HealthServer
from agent.killswitch import Halt, KillswitchWatch
from agent.logsafe import printable
from agent.models import ModelClients, check_credentials
from agent.protocol import (
    BROADCAST_SUBJECT,
    TASK_ATTEMPTS,
    TASKS_STREAM,
    AgentDefinition,
    AgentEventKind,
    Event,
    EventKind,
    TaskRequest,
    agent_events_subject,
    cancel_subject,
    consumer_name,
    definition_subject,
    ending_msg_id,
    task_events_subject,
)
from agent.teamhost import TeamHost
from agent.tools import build_tools
from agent.transcript import event_fields, final_text
from agent.wire import DEFAULT_SPIN_US, STORE_TIMEOUT_S, Storing, Wire, spin_s_from

__all__ = ["AgentWorker", "DefinitionUnavailable", "WorkerConfig"]

log = logging.getLogger("caravan.agent")

CANCELS_KEPT = 1024
"""Cancels of tasks a process does not run that it keeps, in case their request is handed to it next."""

Ack = Literal["wait", "later", "none"]
"""How :meth:`AgentWorker.publish` treats JetStream's acknowledgement of an event."""


@dataclass(frozen=True)
class WorkerConfig:
    agent_id: str
    customer_id: str
    nats_url: str
    health_port: int = 0
    health_host: str = "127.0.0.1"
    alloc_id: str = ""
    definition_timeout: float = 30.0
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    flags: str = "natskv"
    flags_grace: float = 30.0
    flags_heartbeat: float = 5.0
    spin_s: float = DEFAULT_SPIN_US / 1e6

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WorkerConfig:
        env = dict(os.environ if env is None else env)
        missing = [k for k in ("CARAVAN_AGENT_ID", "CARAVAN_CUSTOMER_ID", "NATS_URL") if not env.get(k)]
        if missing:
            raise ValueError(f"missing environment: {', '.join(missing)}")
        port = env.get("CARAVAN_HEALTH_PORT") or env.get("NOMAD_PORT_health") or "0"
        return cls(
            agent_id=env["CARAVAN_AGENT_ID"],
            customer_id=env["CARAVAN_CUSTOMER_ID"],
            nats_url=env["NATS_URL"],
            health_port=int(port),
            health_host=env.get("CARAVAN_HEALTH_HOST", "127.0.0.1"),
            alloc_id=env.get("NOMAD_ALLOC_ID", ""),
            nats_user=env.get("CARAVAN_NATS_USER") or None,
            nats_password=env.get("CARAVAN_NATS_PASSWORD") or None,
            nats_token=env.get("CARAVAN_NATS_TOKEN") or None,
            flags=env.get("CARAVAN_FLAGS", "natskv"),
            flags_grace=float(env.get("CARAVAN_FLAGS_GRACE_S", "30")),
            flags_heartbeat=float(env.get("CARAVAN_FLAGS_HEARTBEAT_S", "5")),
            spin_s=spin_s_from(env),
        )


class DefinitionUnavailable(RuntimeError):
    """The control plane did not hand out this agent's definition."""


class AgentWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.definition: AgentDefinition | None = None
        self._nc: NATS | None = None
        self._team_nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._wire: Wire | None = None
        self._health = HealthServer(self._probe, config.health_host, config.health_port)
        self._runs: dict[str, CancellationToken] = {}
        self._cancels: dict[str, bool] = {}  # cancelled tasks it was not running (yet), oldest first
        self._giving_back: set[str] = set()  # tasks whose runs its stop ended: back to the queue, to run again
        self._run_tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._psub: JetStreamContext.PullSubscription | None = None
        self._started = False
        self._stopping = False
        self._ready = False
        self._started_at = time.monotonic()
        self._may_serve = asyncio.Event()
        self._may_serve.set()
        self._flags: FlagStore | None = None
        self._killswitch: KillswitchWatch | None = None
        self._models: ModelClients | None = None
        self._teams: TeamHost | None = None

    @property
    def models(self) -> ModelClients:
        """The clients of this agent's conversations: its tasks' and its team runs'."""
        assert self.definition is not None
        if self._models is None:
            self._models = ModelClients(self.definition.model)
        return self._models

    @property
    def halt(self) -> Halt | None:
        return self._killswitch.halt if self._killswitch else None

    async def __aenter__(self) -> AgentWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def health_port(self) -> int:
        return self._health.port

    def _probe(self) -> dict[str, Any]:
        """Healthy while both connections are up (the team connection once it is made: until then the worker is
        still starting), the definition is loaded and the worker is not stopping."""
        connected = bool(self._nc and self._nc.is_connected)
        team_nc = self._team_nc
        team_connected = team_nc is not None and team_nc.is_connected
        ready = self.definition is not None and not self._stopping
        halt = self.halt
        return {
            "healthy": connected and (team_connected or team_nc is None) and ready,
            "agent_id": self.config.agent_id,
            "nats": "connected" if connected else "disconnected",
            "team_nats": None if team_nc is None else "connected" if team_connected else "disconnected",
            "halted": halt.reason if halt else None,
            "running_tasks": len(self._runs),
            "team_runs": self._teams.runs if self._teams else 0,
            "team_handlers": self._teams.busy if self._teams else 0,
            "uptime_s": round(time.monotonic() - self._started_at, 1),
        }

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("agent worker already started")
        self._started = True
        cfg = self.config
        self._nc = await self._connect("")
        self._js = self._nc.jetstream()
        self._wire = Wire.of(self._nc)
        await self._wire.ready()
        self.definition = await self._load_definition()
        # a model it cannot call: it says so and never says it is ready, rather than fail every task it is given
        check_credentials(self.definition.model)
        await self._health.start()
        self._flags = create_flag_store(cfg.flags, **({"nc": self._nc} if cfg.flags == "natskv" else {}))
        await self._flags.start()
        self._killswitch = KillswitchWatch(
            self._flags, cfg.customer_id, cfg.agent_id, self._on_killswitch, cfg.flags_grace, cfg.flags_heartbeat
        )
        await self._killswitch.start()  # an agent under an engaged flag starts halted
        await self._nc.subscribe(cancel_subject(cfg.customer_id, cfg.agent_id), cb=self._on_cancel)
        await self._nc.subscribe(BROADCAST_SUBJECT, cb=self._on_broadcast)
        self._team_nc = await self._connect("-teams", no_echo=True)
        self._teams = TeamHost(self._team_nc, self.definition, cfg.alloc_id or f"pid{os.getpid()}", self.models)
        await self._teams.start()
        await self._teams.halt(self.halt is not None)
        self._psub = await self._js.pull_subscribe_bind(consumer_name(cfg.agent_id), stream=TASKS_STREAM)
        self._loop_task = asyncio.create_task(self._serve(self._psub), name="serve-tasks")
        await self._publish_agent_event(AgentEventKind.READY, {"health_port": self._health.port, **self._halt_data()})
        self._ready = True
        log.info("agent %s ready (health on %s)", cfg.agent_id, self._health.port)
        gc.freeze()  # AutoGen, pydantic and the definition live as long as the process: out of the collector's way

    async def _connect(self, suffix: str, no_echo: bool = False) -> NATS:
        """Team runs have a connection of their own without echo: a member subscribes to the group topic it
        publishes to, and would otherwise get each of its messages back from the server, only to drop it."""
        cfg = self.config
        nc = await nats.connect(
            cfg.nats_url,
            name=f"caravan-agent-{cfg.agent_id}{suffix}",
            user=cfg.nats_user,
            password=cfg.nats_password,
            token=cfg.nats_token,
            inbox_prefix=f"_INBOX_{cfg.agent_id}",  # NATS permissions let an agent read only its own inbox
            max_reconnect_attempts=-1,
            drain_timeout=5,
            error_cb=_log_nats_error,
            no_echo=no_echo,
        )
        Wire.of(nc).spin_s = cfg.spin_s
        return nc

    def _halt_data(self) -> dict[str, Any]:
        halt = self.halt
        if halt is None:
            return {"halted": False, "flag_ids": [], "reason": None, "fail_safe": False}
        return {"halted": True, "flag_ids": list(halt.flag_ids), "reason": halt.reason, "fail_safe": halt.fail_safe}

    async def _on_killswitch(self, halt: Halt | None) -> None:
        if halt is None:
            self._may_serve.set()
        else:
            self._may_serve.clear()
            for token in list(self._runs.values()):
                token.cancel()  # model calls and tool runs in flight end here; the runs report `killed`
        if self._teams is not None:
            await self._teams.halt(halt is not None)
        if self._ready:  # the acknowledgement: sent at once, its storage confirmed in the background
            await self._publish_agent_event(AgentEventKind.KILLSWITCH, self._halt_data(), ack="later")

    async def stop(self) -> None:
        if not self._started or self._stopping:
            return
        self._stopping = True
        if self._loop_task is not None:
            await cancel_and_wait(self._loop_task)
        if self._psub is not None:
            await self._psub.unsubscribe()
        if self._killswitch is not None:
            if self._runs or (self._teams is not None and self._teams.runs):  # halted, its runs end killed
                await self._killswitch.look_again()
            await self._killswitch.stop()
        if self._flags is not None:
            await self._flags.stop()
        for task_id, token in self._runs.items():
            if not token.is_cancelled():  # (one cancelled on request, or halted, ends as such)
                self._giving_back.add(task_id)
            token.cancel()
        if self._teams is not None:
            await self._teams.stop()
        if self._team_nc is not None and self._team_nc.is_connected:
            with contextlib.suppress(Exception):
                await self._team_nc.drain()
        if self._run_tasks:
            await asyncio.wait(self._run_tasks, timeout=5)
        if self._models is not None:
            await self._models.close()
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._publish_agent_event(AgentEventKind.STOPPING, {})
            await self._nc.drain()
        await self._health.stop()

    async def _load_definition(self) -> AgentDefinition:
        assert self._nc is not None
        cfg = self.config
        deadline = time.monotonic() + cfg.definition_timeout
        subject = definition_subject(cfg.customer_id, cfg.agent_id)
        while True:
            try:
                reply = await self._nc.request(subject, b"{}", timeout=2)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                if time.monotonic() > deadline:
                    raise DefinitionUnavailable(
                        f"no definition for {cfg.agent_id} within {cfg.definition_timeout}s"
                    ) from exc
                await asyncio.sleep(0.2)
                continue
            body = reply.data.decode()
            if reply.headers and reply.headers.get("Caravan-Error"):
                raise DefinitionUnavailable(f"control plane refused the definition: {reply.headers['Caravan-Error']}")
            return AgentDefinition.model_validate_json(body)

    async def _serve(self, psub: JetStreamContext.PullSubscription) -> None:
        assert self.definition is not None
        slots = asyncio.Semaphore(self.definition.max_concurrent_tasks)
        while True:
            await self._may_serve.wait()
            await slots.acquire()
            if not self._may_serve.is_set():  # halted while its slots were busy: the runs ending free them
                slots.release()
                continue
            try:
                msgs = await psub.fetch(1, timeout=5)
            except TimeoutError:  # nats-py's, and the bare one it raises when a fetch runs late
                slots.release()
                continue
            except Exception:
                slots.release()
                log.exception("fetching tasks failed; retrying")
                await asyncio.sleep(1)
                continue
            if not self._may_serve.is_set():  # halted while fetching: leave the task queued
                await msgs[0].nak(delay=1)
                slots.release()
                continue
            task = asyncio.create_task(self._run_one(msgs[0]))
            self._run_tasks.add(task)
            task.add_done_callback(self._run_tasks.discard)
            task.add_done_callback(lambda _t: slots.release())

    async def _on_broadcast(self, msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            message, by = str(body["message"])[:2000], str(body.get("by", ""))[:200]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed broadcast")
            return
        log.warning("broadcast from %s: %s", printable(by), printable(message))
        await self._publish_agent_event(AgentEventKind.BROADCAST, {"message": message, "by": by}, ack="later")

    async def _on_cancel(self, msg: Msg) -> None:
        """Cancel the task's run; a task it does not run is remembered: its request may be on its way here (the
        control plane tells the agent before it looks whether the request was handed out)."""
        task_id = msg.data.decode()
        token = self._runs.get(task_id)
        if token is not None:
            token.cancel()
            return
        self._cancels[task_id] = True
        if len(self._cancels) > CANCELS_KEPT:
            del self._cancels[next(iter(self._cancels))]

    async def _run_one(self, msg: Msg) -> None:
        try:
            request = TaskRequest.model_validate_json(msg.data)
        except ValueError:
            log.error("dropping a malformed task message")
            await msg.term()
            return
        run = _TaskRun(self, request, msg.metadata.num_delivered or 1)
        if run.attempt > TASK_ATTEMPTS and not (self._stopping or self.halt or request.task_id in self._cancels):
            await run.spent()  # (one cancelled, or halted, ends as such below; one this agent stops for comes again)
            await msg.term()
            return
        self._runs[request.task_id] = run.token
        if self._cancels.pop(request.task_id, False) or self.halt is not None:
            run.token.cancel()  # cancelled or halted since it was fetched: it ends before it starts
        elif self._stopping:
            self._giving_back.add(request.task_id)
            run.token.cancel()
        heartbeat = asyncio.create_task(keep_in_progress(msg, every=10.0))
        try:
            await run.execute()
        finally:
            heartbeat.cancel()
            self._runs.pop(request.task_id, None)
            with contextlib.suppress(Exception):
                if request.task_id in self._giving_back:  # to the next of its replicas, or itself once back
                    await msg.nak(delay=HAND_BACK_DELAY_S)
                else:
                    await msg.ack()

    async def publish(self, event: Event, msg_id: str | None = None, ack: Ack = "wait") -> asyncio.Future[Any] | None:
        """Store ``event`` in JetStream. ``ack`` says what to do about the server's acknowledgement:

        - ``"wait"``: hold the caller until the event is stored (statuses, messages, results);
        - ``"later"``: do not hold it up; returns a future of JetStream's acknowledgement (:meth:`Wire.store`),
          which fails if the event was not stored (that is logged too; the connection keeps the order);
        - ``"none"``: do not ask for one (pieces of a streamed answer). JetStream stores the event all the same;
          an acknowledgement per token would be one more message from the server to read and match to a future
          for every token (about a third of the agent's CPU per token), and the whole answer follows as a
          message event whose storage is confirmed.
        """
        assert self._js is not None and self._nc is not None
        if event.task_id is not None:
            subject = task_events_subject(event.customer_id, event.task_id)
        else:
            subject = agent_events_subject(event.customer_id, self.config.agent_id)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        payload = event.model_dump_json().encode()
        if ack == "wait":
            await self._js.publish(subject, payload, headers=headers)
        elif ack == "later":
            assert self._wire is not None
            acked = await self._wire.store(subject, payload, STORE_TIMEOUT_S, headers)
            acked.add_done_callback(_log_unstored)
            return acked
        else:
            await self._nc.publish(subject, payload, headers=headers)
        return None

    async def _publish_agent_event(self, kind: AgentEventKind, data: dict[str, Any], ack: Ack = "wait") -> None:
        cfg = self.config
        data = {**data, "alloc_id": cfg.alloc_id, "pid": os.getpid()}
        event = Event(kind=kind, agent_id=cfg.agent_id, customer_id=cfg.customer_id, data=data)
        await self.publish(event, ack=ack)


_log_nats_error = nats_error_logger(log)


def _log_unstored(acked: asyncio.Future[Any]) -> None:
    if not acked.cancelled() and acked.exception() is not None:
        log.warning("an event was not stored: %s", acked.exception())


GIVEN_BACK = "its agent stopped (restarted, changed or stopped): back in its queue, to start over when the agent runs"

_CONFIRMED = frozenset({EventKind.STATUS, EventKind.RESULT, EventKind.ERROR})
"""Events the agent waits on JetStream to store (and everything before them)."""


class _TaskRun:
    """One task on one AssistantAgent: runs it and turns AgentChat's stream into Caravan events."""

    def __init__(self, worker: AgentWorker, request: TaskRequest, attempt: int) -> None:
        assert worker.definition is not None
        self.worker = worker
        self.definition = worker.definition
        self.request = request
        self.attempt = attempt
        self.token = CancellationToken()
        self._seq = 0
        self._storing = Storing()

    async def spent(self) -> None:
        """Delivered once more after its last attempt: the task fails, as that attempt's ending (its record keeps
        that attempt's transcript), rather than run again."""
        self.attempt = TASK_ATTEMPTS
        reason = (
            f"its agent went away during each of its {TASK_ATTEMPTS} attempts (it crashed, or stopped and gave the "
            "task back): not tried again"
        )
        log.warning("task %s: %s", self.request.task_id, reason)
        await self.emit(EventKind.STATUS, content="failed", data={"reason": reason})

    async def emit(self, kind: str, **fields: Any) -> None:
        """Publish one event of the run, under a message id of its own (JetStream drops a second event under one
        id): the run's number for it, or for a final status that of every ending of the attempt (the control plane
        may have ended the task already, as when its agent is deleted): an attempt ends once
        (:func:`ending_msg_id`)."""
        self._seq += 1
        event = Event(
            kind=kind,
            task_id=self.request.task_id,
            agent_id=self.definition.agent_id,
            customer_id=self.request.customer_id,
            attempt=self.attempt,
            **fields,
        )
        msg_id = ending_msg_id(event) or f"{self.request.task_id}:{self.attempt}:{self._seq}"
        if kind == "chunk":
            await self.worker.publish(event, msg_id=msg_id, ack="none")
        elif kind in _CONFIRMED:
            await self._storing.stored()  # what came before is stored before this is
            await self.worker.publish(event, msg_id=msg_id, ack="wait")
        else:  # the conversation's events: the agent goes on (to its model call) while JetStream stores them
            acked = await self.worker.publish(event, msg_id=msg_id, ack="later")
            assert acked is not None
            self._storing.add(acked)

    async def status(self, status: str, reason: str | None = None, **data: Any) -> None:
        await self.emit(EventKind.STATUS, content=status, data={**data, "reason": reason} if reason else data)

    async def execute(self) -> None:
        if self.token.is_cancelled():
            await self._stopped()
            return
        await self.status("running")
        model_client: ChatCompletionClient | None = None
        try:
            model_client = self.worker.models.get()
            agent = AssistantAgent(
                name=self.definition.name,
                model_client=model_client,
                tools=list(build_tools(self.definition.tools)) or None,
                system_message=self.definition.system_message or None,
                reflect_on_tool_use=bool(self.definition.tools),
                model_client_stream=self.definition.model.stream,
            )
            result: TaskResult | None = None
            async for item in agent.run_stream(task=self.request.task, cancellation_token=self.token):
                if isinstance(item, TaskResult):
                    result = item
                else:
                    await self._forward(item)
            if self.token.is_cancelled():
                raise asyncio.CancelledError
            unstored = await self._storing.stored()
            if unstored is not None:
                raise RuntimeError(f"an event of the task was not stored: {unstored}")
        except asyncio.CancelledError:
            await self._stopped()
            return
        except Exception as exc:
            log.exception("task %s failed", self.request.task_id)
            from agent.egress import failure_text  # (only here: it loads the HTTP client the model clients use)

            reason = failure_text(exc)
            await self.emit(EventKind.ERROR, content=reason)
            await self.status("failed", reason)
            return
        finally:
            if model_client is not None:
                await self.worker.models.release(model_client)
        final = final_text(result)
        await self.emit(EventKind.RESULT, content=final, data={"stop_reason": result.stop_reason if result else None})
        await self.status("completed")

    async def _stopped(self) -> None:
        """The run was stopped: the status says by what. One the agent's stop ended (a restart, a new version
        rolled out, a stop) goes back to its queue, as after a crash: its next attempt starts over."""
        halt = self.worker.halt
        if halt is not None:
            await self.status("killed", halt.reason)
        elif self.request.task_id in self.worker._giving_back:
            await self.status("queued", GIVEN_BACK, given_back=True)
        else:
            await self.status("cancelled", "cancelled on request")

    async def _forward(self, item: Any) -> None:
        for kind, fields in event_fields(item):
            await self.emit(kind, **fields)
