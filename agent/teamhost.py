"""The member side of team runs, inside the agent process.

A manager asks on ``caravan.rt.<customer>.join.<agent>`` (one replica answers: the queue group gives a run
affinity to that replica). The replica builds this agent's ``AssistantAgent`` in AgentChat's own
``ChatAgentContainer``, registers it on a :class:`~agent.runtime.NatsAgentRuntime` in the run's namespace,
and answers once it listens. It beats a heartbeat while the run lasts and drops the container when the
manager says the run ended, or stops beating. A member that leaves a run before its end (the agent stops, or
the killswitch halts it) tells the manager at once, rather than leaving it to miss its heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import nats.errors
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import BaseChatMessage, MessageFactory
from autogen_agentchat.teams._group_chat._chat_agent_container import ChatAgentContainer
from autogen_agentchat.teams._group_chat._events import (
    GroupChatAgentResponse,
    GroupChatError,
    GroupChatMessage,
    GroupChatRequestPublish,
)
from autogen_core import CancellationToken, MessageContext, TopicId, TypeSubscription, event
from autogen_core.model_context import ChatCompletionContext
from autogen_core.models import ChatCompletionClient
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agent.egress import endpoint_failure, failure_text
from agent.logsafe import printable
from agent.models import ModelClients
from agent.protocol import AgentDefinition
from agent.runtime import NatsAgentRuntime
from agent.serialization import MessageCodec
from agent.teamprotocol import (
    ADDED_CONTEXT,
    MODEL_POSITION,
    STATE_AFTER_HEADER,
    STATE_BASE_HEADER,
    STATE_MEMBER_HEADER,
    MemberJoin,
    MemberJoined,
    MemberRefused,
    answer_output,
    join_subject,
    run_namespace,
)
from agent.tools import build_tools
from agent.wire import Wire

__all__ = ["TeamHost", "member_agent"]

log = logging.getLogger("caravan.teamhost")
FULL_STATE_EVERY = 16
"""A member sends its whole state at least once in this many turns, even when a delta would do: a manager that
missed a state (it keeps no checkpoint until it has one whole again) is not left without one for long."""
Publish = Callable[[bytes, dict[str, str]], Awaitable[bool]]
"""Sends a state on ``x.state`` with its headers; False when it could not be sent."""


def member_agent(
    definition: AgentDefinition, handoffs: list[str], model_client: ChatCompletionClient
) -> AssistantAgent:
    """The agent as a team member: its definition, plus the handoffs the team gives it."""
    return AssistantAgent(
        name=definition.name,
        model_client=model_client,
        tools=list(build_tools(definition.tools)) or None,
        system_message=definition.system_message or None,
        reflect_on_tool_use=bool(definition.tools),
        model_client_stream=definition.model.stream,
        handoffs=list(handoffs) or None,
    )


class _StateSender:
    """What a member last sent the manager, so that its next state can go as a delta to it (the model context's
    new messages, :func:`agent.teamprotocol.apply_state_delta`) rather than the whole conversation again.

    A delta is sent only when it is exact: the agent's and the context's states are AgentChat's own dumps of
    the context's messages, and the messages sent last are still the context's first ones (the same objects:
    a reset or a context that dropped messages has a new list or other messages, and gets a whole state)."""

    def __init__(self, member: str, publish: Publish, deltas: Callable[[], bool]) -> None:
        """``deltas``: whether the run's manager takes deltas now (``MemberJoin.state_deltas`` of its join: a new
        attempt's may not)."""
        self._member = member
        self._publish = publish
        self._deltas = deltas
        self._after: str | None = None  # the answer the last state sent came with; None: the next one goes whole
        self._context: list[Any] = []  # the context's messages then
        self._since_whole = 0
        self._resets = 0

    def reset(self) -> None:
        """The manager may not have the last state sent (a new attempt of the run): send the next one whole."""
        self._after = None
        self._resets += 1  # a send under way when this came must not make its state the base again

    async def send(self, container: _Container, after: str) -> None:
        live = container.context_messages()
        context = list(live) if live is not None else None  # as it is in the state sent, whatever comes after
        resets = self._resets
        headers = {STATE_MEMBER_HEADER: self._member, STATE_AFTER_HEADER: after}
        if self._after is not None and context is not None and self._extends(context):
            body = container.dumps_delta(context[len(self._context) :])
            headers[STATE_BASE_HEADER] = self._after
            self._since_whole += 1
        else:
            body = MessageCodec.dumps_state(await container.save_state())
            self._since_whole = 0
        sent = await self._publish(body, headers)
        whole_next = (
            not sent
            or context is None
            or not self._deltas()
            or resets != self._resets
            or self._since_whole >= FULL_STATE_EVERY - 1
        )
        self._after = None if whole_next else after
        self._context = [] if whole_next or context is None else context

    def _extends(self, context: list[Any]) -> bool:
        sent = self._context
        return len(context) >= len(sent) and all(a is b for a, b in zip(context, sent, strict=False))


def _state_publisher(wire: Wire, subject: str, run_id: str, agent_type: str) -> Publish:
    """Sends a member's states on ``subject``. A state too big for a message goes as an empty one, so that the
    manager knows it has none (no checkpoint) rather than the turn failing; one that cannot be sent for another
    reason (the connection closed) is only logged."""

    async def send_state(state: bytes, headers: dict[str, str]) -> bool:
        try:
            await wire.publish(subject, state, headers=headers)
            return True
        except nats.errors.MaxPayloadError:
            log.warning("run %s: the state of %s is too big to send (%d bytes)", run_id, agent_type, len(state))
        except nats.errors.Error as exc:
            log.warning("run %s: the state of %s could not be sent: %s", run_id, agent_type, exc)
            return False
        headers.pop(STATE_BASE_HEADER, None)
        await wire.publish(subject, b"", headers=headers)
        return False

    return send_state


class _Container(ChatAgentContainer):
    """AgentChat's container; its state also carries the scripted model's place (the `replay` provider), and it
    sends that state to the manager after each of its turns, with its answer (the manager checkpoints the run
    between turns without asking every member for its state)."""

    def __init__(
        self,
        team_key: str,
        agent: AssistantAgent,
        model_client: ChatCompletionClient,
        sender: _StateSender,
        terms: Callable[[], MemberJoin] | None = None,
    ) -> None:
        """``terms``: the join of the run's manager now (a new attempt's manager may ask otherwise); None: an
        older manager's (both messages of an answer sent, states sent)."""
        super().__init__(f"group_topic_{team_key}", f"output_topic_{team_key}", agent, MessageFactory())
        self._model_client = model_client
        self._sender = sender
        self._terms = terms
        self._output: tuple[GroupChatMessage, TopicId] | None = None  # kept for the answer to imply

    async def publish_message(
        self, message: Any, topic_id: TopicId, *, cancellation_token: CancellationToken | None = None
    ) -> None:
        terms = self._terms() if self._terms is not None else None
        if isinstance(message, GroupChatError):
            # The task's reason says which member failed ("member painter: ValueError: ..."), and names the model
            # endpoint that failed, as a single agent's does (the SDK's own text is "Connection error."): AgentChat
            # publishes this from the handler of the exception, which is at hand.
            handled = sys.exc_info()[1]
            error = message.error
            changes = {"error_type": f"member {self._agent.name}: {error.error_type}"}
            described = endpoint_failure(handled) if handled is not None else None
            if described is not None:
                changes["error_message"] = described
            message = GroupChatError(error=error.model_copy(update=changes))
        if isinstance(message, GroupChatMessage) and isinstance(message.message, BaseChatMessage):
            # The turn's answer for the output topic: the same answer for the group follows at once (AgentChat
            # clears the buffer in between), then this member's state. All go to the manager's process; sent as
            # one, they cost it (and the server) one wake-up rather than three.
            self._runtime_wire().hold()
            if terms is not None and terms.output_implied and topic_id.type == self._output_topic_type:
                await self._publish_output()  # (one kept before: nothing implied it)
                self._output = (message, topic_id)  # the answer for the group implies it, if it holds the same
                return
        output = self._output
        answer = message.response.chat_message if isinstance(message, GroupChatAgentResponse) else None
        if output is not None and answer is output[0].message:
            # The manager's process derives the output's message from this one (answer_output): it goes once.
            self._output = None
            await self._nats_runtime().publish_message(
                message, topic_id, sender=self.id, cancellation_token=cancellation_token, implied=output[1]
            )
        else:
            await self._publish_output()
            await super().publish_message(message, topic_id, cancellation_token=cancellation_token)
        if isinstance(message, GroupChatAgentResponse):
            # The answer's buffer is cleared and the turn is over: the state now is the one to resume from
            # (nothing else reaches this container before its turn's handler returns). It goes with the answer:
            # the manager checkpoints the turn before it asks the next speaker, so it waits for this state
            # anyway. Sent after the answer instead, it cost the manager a second wake-up while it waited (the
            # team task bench: 1.60 against 1.77 ms a message through the platform, medians of 4 runs each).
            # None to a manager that keeps no checkpoints.
            try:
                if terms is None or terms.states:
                    await self._sender.send(self, message.response.chat_message.id)
            finally:
                self._runtime_wire().release()
        elif isinstance(message, GroupChatError):
            self._runtime_wire().release()

    @event
    async def handle_request(self, message: GroupChatRequestPublish, ctx: MessageContext) -> None:  # type: ignore[override]
        """AgentChat's turn; an output's message kept for the answer goes out as it is if the turn ends without
        one (failed or cancelled in between)."""
        try:
            # (AgentChat's handler is typed as unbound; reached through super() it is bound)
            await super().handle_request(message, ctx)  # type: ignore[call-arg]
        finally:
            await self._publish_output()

    async def _publish_output(self) -> None:
        """Publish the output's message kept for an answer that did not come, or did not hold it."""
        output, self._output = self._output, None
        if output is not None:
            await super().publish_message(*output)

    def _nats_runtime(self) -> NatsAgentRuntime:
        runtime = self.runtime
        assert isinstance(runtime, NatsAgentRuntime), "a member container runs on the NATS runtime"
        return runtime

    def _runtime_wire(self) -> Wire:
        return self._nats_runtime().wire

    def context_messages(self) -> list[Any] | None:
        """The model context's messages, when the agent's state is AgentChat's dump of them and nothing else
        (an ``AssistantAgent`` with a context that saves all its messages); None otherwise."""
        agent = self._agent
        if type(agent).save_state is not AssistantAgent.save_state:
            return None
        context = getattr(agent, "_model_context", None)
        if context is None or type(context).save_state is not ChatCompletionContext.save_state:
            return None
        messages = getattr(context, "_messages", None)
        return messages if isinstance(messages, list) else None

    def dumps_delta(self, added: list[Any]) -> bytes:
        """What changed since the last state sent: the context's new messages, dumped as AgentChat dumps the
        whole context, and the rest of the container's state, which is small."""
        delta: dict[str, Any] = {
            ADDED_CONTEXT: added,  # written as AgentChat's dump of the context writes each of them
            "message_buffer": [message.dump() for message in self._message_buffer],
            **self._position(),
        }
        return MessageCodec.dumps_state(delta)

    async def save_state(self) -> Mapping[str, Any]:
        return {**(await super().save_state()), **self._position()}

    def _position(self) -> dict[str, Any]:
        """The scripted (``replay``) model's place in its script, kept with the container's state."""
        position = getattr(self._model_client, "position", None)
        return {} if position is None else {MODEL_POSITION: position}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        position = state.pop(MODEL_POSITION, None)
        await super().load_state(state)
        if position is not None and hasattr(self._model_client, "seek"):
            self._model_client.seek(int(position))
        self._sender.reset()


class _HostedRun:
    def __init__(
        self, runtime: NatsAgentRuntime, join: MemberJoin, sender: _StateSender, model_client: ChatCompletionClient
    ) -> None:
        self.runtime = runtime
        self.join = join
        self.sender = sender
        self.model_client = model_client  # a scripted model's is the run's own (it keeps its place per run)
        self.manager_seen = time.monotonic()
        self.beat: asyncio.Task[None] | None = None
        self.subs: list[Subscription] = []


class TeamHost:
    """Serves this agent's part in team runs. ``start()`` once, ``stop()`` is idempotent."""

    def __init__(
        self, nc: NATS, definition: AgentDefinition, instance_id: str, models: ModelClients | None = None
    ) -> None:
        """``models``: the agent's model clients, shared with its tasks (default: the host's own)."""
        self._nc = nc
        self._definition = definition
        self.instance_id = instance_id
        self._models = models or ModelClients(definition.model)
        self._own_models = models is None
        self._runs: dict[str, _HostedRun] = {}
        self._sub: Subscription | None = None
        self._halted = False
        self._pending: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopped = False

    @property
    def runs(self) -> int:
        return len(self._runs)

    @property
    def busy(self) -> int:
        """Message handlers (model calls among them) running now, across runs."""
        return sum(run.runtime.busy for run in self._runs.values())

    async def __aenter__(self) -> TeamHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("team host already started")
        self._started = True
        subject = join_subject(self._definition.customer_id, self._definition.agent_id)
        self._sub = await self._nc.subscribe(subject, queue="join", cb=self._on_join)
        # the server has the subscription when this returns: the agent's READY goes on another connection, and a
        # join sent on it before the subscription arrived would find no responder
        await self._nc.flush()

    async def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for run_id in list(self._runs):
            await self._drop(run_id, leaving=True)
        if self._own_models:
            await self._models.close()

    async def halt(self, halted: bool) -> None:
        """The killswitch: while halted, refuse runs and cancel what runs."""
        self._halted = halted
        if halted:
            for run_id in list(self._runs):
                await self._drop(run_id, leaving=True)

    async def _on_join(self, msg: Msg) -> None:
        if self._halted or self._stopped:
            return  # a replica that may not serve stays silent; another one (or the deadline) answers
        try:
            join = MemberJoin.model_validate_json(msg.data)
        except ValueError:
            log.warning("ignoring a malformed join request")
            return
        if join.agent_id != self._definition.agent_id or join.customer_id != self._definition.customer_id:
            return
        hosted = self._runs.get(join.run_id)
        if hosted is None:
            try:
                await self._host(join)
            except Exception as exc:  # said to the manager, which ends the run with it rather than wait for us
                log.exception("run %s: cannot take part", join.run_id)
                refused = MemberRefused(agent_id=join.agent_id, refused=printable(failure_text(exc)))
                await msg.respond(refused.model_dump_json().encode())
                return
        else:  # a new attempt: its manager has none of the states sent before, and may ask otherwise
            hosted.join = join
            hosted.sender.reset()
        answer = MemberJoined(agent_id=self._definition.agent_id, instance_id=self.instance_id, checkpoints=join.states)
        await msg.respond(answer.model_dump_json().encode())

    async def _host(self, join: MemberJoin) -> None:
        namespace = run_namespace(join.customer_id, join.run_id)
        runtime = NatsAgentRuntime(self._nc, namespace, instance_id=f"{self.instance_id}-{join.run_id}")
        model_client = self._models.get()
        agent_type = f"{self._definition.name}_{join.team_key}"
        send_state = _state_publisher(runtime.wire, f"{namespace}.x.state", join.run_id, agent_type)
        sender = _StateSender(self._definition.name, send_state, lambda: hosted.join.state_deltas)
        hosted = _HostedRun(runtime, join, sender, model_client)
        try:
            agent = member_agent(self._definition, join.handoffs, model_client)
            runtime.derive(GroupChatAgentResponse, answer_output)
            await runtime.register_factory(
                agent_type, lambda: _Container(join.team_key, agent, model_client, sender, lambda: hosted.join)
            )
            await runtime.add_subscription(TypeSubscription(topic_type=agent_type, agent_type=agent_type))
            group_topic = f"group_topic_{join.team_key}"
            await runtime.add_subscription(TypeSubscription(topic_type=group_topic, agent_type=agent_type))
            await runtime.start()
            hosted.subs.append(await self._nc.subscribe(f"{namespace}.x.end", cb=self._on_end))
            hosted.subs.append(await self._nc.subscribe(f"{namespace}.x.alive", cb=self._on_alive))
        except BaseException:  # nothing of the run stays: a join that comes again starts afresh
            for sub in hosted.subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await runtime.stop()
            await self._models.release(model_client)
            raise
        self._runs[join.run_id] = hosted
        hosted.beat = asyncio.create_task(self._beat(hosted), name=f"team-beat-{join.run_id}")

    @staticmethod
    def _run_of(subject: str) -> str:
        return subject.split(".")[3]  # caravan.rt.<customer>.<run>.x.<what>

    async def _on_end(self, msg: Msg) -> None:
        run_id = self._run_of(msg.subject)
        if run_id in self._runs:
            self._later(self._drop(run_id))

    async def _on_alive(self, msg: Msg) -> None:
        hosted = self._runs.get(self._run_of(msg.subject))
        if hosted is not None and msg.data == b"manager":
            hosted.manager_seen = time.monotonic()

    def _alive(self) -> bytes:
        return f"member {self._definition.agent_id} {self.instance_id}".encode()

    async def _beat(self, hosted: _HostedRun) -> None:
        subject = f"{hosted.runtime.namespace}.x.alive"
        payload = self._alive()
        while True:
            if time.monotonic() - hosted.manager_seen > hosted.join.manager_lost_after_s:
                log.warning("run %s: the manager is gone; dropping the member", hosted.join.run_id)
                self._later(self._drop(hosted.join.run_id))
                return
            with contextlib.suppress(Exception):
                await self._nc.publish(subject, payload)
            await asyncio.sleep(hosted.join.heartbeat_s)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _drop(self, run_id: str, leaving: bool = False) -> None:
        """Drop this member's part of a run; ``leaving``: before the run's end, which the manager is told."""
        hosted = self._runs.pop(run_id, None)
        if hosted is None:
            return
        if hosted.beat is not None and hosted.beat is not asyncio.current_task():
            hosted.beat.cancel()
        if leaving:
            with contextlib.suppress(Exception):  # (a connection that closed: the manager misses the beats)
                await self._nc.publish(f"{hosted.runtime.namespace}.x.alive", self._alive() + b" left")
        for sub in hosted.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await hosted.runtime.stop()
        await self._models.release(hosted.model_client)
