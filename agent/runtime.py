"""An ``autogen_core.AgentRuntime`` over NATS: agents of one namespace talk across processes.

Every process that takes part in a namespace (a team run: ``caravan.rt.<customer>.<run>``) runs one
:class:`NatsAgentRuntime`. Agents registered in a process are served there; any other agent type is looked up
over NATS. Semantics follow autogen_core's in-process runtime, so AgentChat's group chats run unchanged:

- ``publish_message`` reaches every subscribed agent in every process, never its sender; handlers start in
  arrival order (spawned, never awaited inside the NATS callback) and may run concurrently.
- ``send_message`` to an agent in another process is a NATS request; the handler's return value or exception
  comes back (an answer too big for a NATS message comes back as that error). No process serving the type
  raises ``LookupError`` at once; the RPC timeout must allow for model calls.
- Cancellation crosses processes: a cancellation token travels as a *scope* id with every message sent with
  one, and cancelling it anywhere cancels the handlers it reached everywhere. :meth:`cancel_all` cancels every
  handler in the namespace (a cancelled run must leave nothing behind).
- ``agent_save_state`` / ``agent_load_state`` / ``agent_metadata`` work on remote agents.
- A message may stand for a second one as well, derived from it (:meth:`NatsAgentRuntime.derive`): published
  with ``implied=<topic>``, it goes out once, and each process that receives it delivers the derived message to
  its agents subscribed to that topic, first. A team member's answer is such a message: AgentChat publishes the
  chat message for the team's output and then the answer, which holds the same chat message, for the group; only
  the manager's process listens to both, and it derives the first from the second.

Subjects under the namespace ``ns``: ``ns.t.<topic type>`` (publish; a topic type ``a:b`` is ``ns.t.a.b``, so that
an agent's direct-message subscription, the prefix ``a:``, listens on ``ns.t.a.*`` rather than on every topic),
``ns.a.<agent type>`` (requests, a queue group per type), ``ns.x.cancel`` (cancellation). Frames are one JSON line
of envelope, then the payload.

Every message of a team run crosses this module in three or four processes, so the hot path is kept lean: ids
are a random prefix and a counter, types and routes are looked up once, scopes live as long as their tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import json
import logging
import re
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import nats.errors
import pydantic_core
from autogen_core import (
    Agent,
    AgentId,
    AgentInstantiationContext,
    AgentMetadata,
    AgentType,
    CancellationToken,
    MessageContext,
    MessageSerializer,
    Subscription,
    TopicId,
    TypePrefixSubscription,
    TypeSubscription,
)
from autogen_core._message_handler_context import MessageHandlerContext
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from agent.serialization import MessageCodec
from agent.wire import Wire

__all__ = ["NatsAgentRuntime", "RemoteHandlerError", "subject_token"]

log = logging.getLogger("caravan.runtime")
T = TypeVar("T", bound=Agent)
_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")
_ALL = "*"
_CANCELLED_KEPT = 1024
_ROUTES_KEPT = 4096


def subject_token(name: str) -> str:
    """A topic or agent type as one NATS subject token (types may hold dots; uuids and names pass as they are)."""
    return name if _SAFE.match(name) else "~" + name.encode().hex()


def _from_token(token: str) -> str:
    return bytes.fromhex(token[1:]).decode() if token.startswith("~") else token


@functools.lru_cache(maxsize=4096)
def _topic_tokens(topic_type: str) -> str:
    """``a:b`` as ``a.b`` (``b`` may hold more colons), anything else as one token."""
    head, colon, tail = topic_type.partition(":")
    return f"{subject_token(head)}.{subject_token(tail)}" if colon else subject_token(topic_type)


@functools.lru_cache(maxsize=4096)
def _agent_subject(namespace: str, agent_type: str) -> str:
    return f"{namespace}.a.{subject_token(agent_type)}"


@functools.lru_cache(maxsize=4096)
def _topic_type(tokens: str) -> str:
    return ":".join(_from_token(token) for token in tokens.split("."))


@functools.lru_cache(maxsize=4096)
def _topic_id(topic_type: str, source: str) -> TopicId:
    return TopicId(topic_type, source)


@functools.lru_cache(maxsize=4096)
def _agent_id(agent_type: str, key: str) -> AgentId:
    """AgentId (and TopicId) check their type against a pattern each time one is made: make each one once."""
    return AgentId(agent_type, key)


@functools.lru_cache(maxsize=4096)
def _sender(name: str) -> AgentId:
    return AgentId.from_str(name)


class RemoteHandlerError(RuntimeError):
    """A handler in another process raised; the message names its type and text."""


def _frame(meta: dict[str, Any], payload: bytes) -> bytes:
    return pydantic_core.to_json(meta) + b"\n" + payload


def _unframe(data: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, payload = data.partition(b"\n")
    meta: dict[str, Any] = pydantic_core.from_json(head)
    return meta, payload


class NatsAgentRuntime:
    """``async with NatsAgentRuntime(nc, "caravan.rt.cu-….rn-…") as runtime:`` — see the module docstring."""

    def __init__(
        self,
        nc: NATS,
        namespace: str,
        *,
        codec: MessageCodec | None = None,
        rpc_timeout: float = 900.0,
        instance_id: str | None = None,
    ) -> None:
        self._nc = nc
        self._wire = Wire.of(nc)
        self._ns = namespace
        self._codec = codec or MessageCodec()
        self._rpc_timeout = rpc_timeout
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._factories: dict[str, Callable[[], Awaitable[Agent]]] = {}
        self._remote: set[str] = set()
        self._agents: dict[AgentId, asyncio.Future[Agent]] = {}
        self._subscriptions: list[Subscription] = []
        self._nats_subs: dict[str, NatsSubscription] = {}
        self._routes: dict[tuple[TopicId, str | None], list[AgentId]] = {}
        # Tokens are held by the handlers and callers that use them; a scope lives as long as its token does.
        self._scopes: weakref.WeakValueDictionary[str, CancellationToken] = weakref.WeakValueDictionary()
        self._scope_of: weakref.WeakKeyDictionary[CancellationToken, str] = weakref.WeakKeyDictionary()
        self._cancelled: dict[str, None] = {}  # recent cancelled scopes: a late message starts cancelled
        self._id_prefix = uuid.uuid4().hex[:16]
        self._replies = f"{namespace}.r.{self._id_prefix}."  # this runtime's answers: see ask()
        self._ids = itertools.count()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._unscoped: weakref.WeakSet[CancellationToken] = weakref.WeakSet()  # tokens of no scope
        self._derivers: dict[type, Callable[[Any], Any]] = {}
        self._last_implying: str | None = None  # the id of the last message received that implied another
        self._ahead: list[str] = []  # subjects to listen on from start() (listen_ahead)
        self._started = False
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def __aenter__(self) -> NatsAgentRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def namespace(self) -> str:
        return self._ns

    @property
    def wire(self) -> Wire:
        """The hot path of this runtime's connection (shared by every runtime on it)."""
        return self._wire

    @property
    def busy(self) -> int:
        """Handlers running now in this process."""
        return len(self._handlers)

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("runtime already started")
        self._started = True
        await self._wire.ready()
        await self._listen(self._replies + "*", self._wire.answer)
        await self._listen(f"{self._ns}.x.cancel", self._on_cancel)
        for agent_type in self._factories:
            await self._serve_type(agent_type)
        for subscription in self._subscriptions:
            await self._listen_topic(subscription)
        for subject in self._ahead:
            await self._listen_on(subject)
        await self._wire.flush()

    async def stop(self) -> None:
        """Unsubscribe, cancel what still runs here and close local agents; idempotent."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        for sub in self._nats_subs.values():
            with contextlib.suppress(nats.errors.Error):
                await self._wire.unsubscribe(sub)
        self._nats_subs.clear()
        for token in list(self._scopes.values()):
            token.cancel()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        for future in self._agents.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                with contextlib.suppress(Exception):
                    await future.result().close()

    async def cancel_all(self) -> None:
        """Cancel every handler of this namespace, in every process."""
        self._cancel_scope(_ALL)
        if not self._nc.is_closed:
            await self._wire.publish(f"{self._ns}.x.cancel", _ALL.encode())

    def ask(self, subject: str, payload: bytes, timeout: float, *, poll: bool = True) -> asyncio.Future[Msg]:
        """A request (:meth:`Wire.ask`) whose answer comes back inside this run's namespace
        (``<namespace>.r.<runtime>.<n>``), not to the connection's inbox: an agent may publish on its own
        customer's ``caravan.rt`` subjects and nowhere else, answers included (NATS's ``allow_responses`` would
        let it publish anywhere: a request it sends itself names the reply subject). Once started."""
        return self._wire.ask(subject, payload, timeout, poll=poll, inbox=self._replies)

    def listen_ahead(self, topic_types: Sequence[str], direct_to: Sequence[str] = ()) -> None:
        """Listen from :meth:`start` on the subjects of these topic types, and of the direct messages (topic type
        prefix ``<agent type>:``) to these agent types, for subscriptions added later: once the runtime is
        started, each ``add_subscription`` that needs a new NATS subscription waits a round trip to the server,
        and AgentChat adds a team's subscriptions one at a time when the team first runs. A message that comes
        before a subscription that wants it reaches nobody, as it would without this."""
        if self._started:
            raise RuntimeError("listen_ahead() is for a runtime not yet started")
        self._ahead.extend(f"{self._ns}.t.{_topic_tokens(topic_type)}" for topic_type in topic_types)
        self._ahead.extend(f"{self._ns}.t.{subject_token(agent_type)}.*" for agent_type in direct_to)

    def derive(self, message_type: type, derive: Callable[[Any], Any]) -> None:
        """How a message of ``message_type`` published with ``implied=<topic>`` gives the message that it stands
        for on that topic (see the module docstring); the sending process and the receiving ones need it."""
        self._derivers[message_type] = derive

    def mark_remote(self, agent_type: str) -> None:
        """Agents of ``agent_type`` live in other processes even if registered here (a team's participants,
        registered by AgentChat in the process that runs the manager)."""
        self._remote.add(agent_type)
        self._routes.clear()

    # -- AgentRuntime: registration ------------------------------------------------------------------------

    async def register_factory(
        self,
        type: str | AgentType,
        agent_factory: Callable[[], T | Awaitable[T]],
        *,
        expected_class: type[T] | None = None,
    ) -> AgentType:
        agent_type = type.type if isinstance(type, AgentType) else type
        if agent_type in self._factories:
            raise ValueError(f"agent type {agent_type!r} is already registered")
        if agent_type in self._remote:
            return AgentType(agent_type)

        async def make() -> Agent:
            made = agent_factory()
            agent = await made if inspect.isawaitable(made) else made
            if expected_class is not None and not isinstance(agent, expected_class):
                raise ValueError(f"factory of {agent_type!r} made a {agent.__class__.__name__}")
            return agent

        self._factories[agent_type] = make
        self._routes.clear()
        if self._started:
            await self._serve_type(agent_type)
        return AgentType(agent_type)

    async def register_agent_instance(self, agent_instance: Agent, agent_id: AgentId) -> AgentId:
        if agent_id in self._agents:
            raise ValueError(f"agent {agent_id} already exists")
        if agent_id.type not in self._factories:

            async def refuse() -> Agent:
                raise LookupError(f"no factory for {agent_id.type}: only registered instances")

            self._factories[agent_id.type] = refuse
            self._routes.clear()
            if self._started:
                await self._serve_type(agent_id.type)
        await agent_instance.bind_id_and_runtime(id=agent_id, runtime=self)
        future: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
        future.set_result(agent_instance)
        self._agents[agent_id] = future
        return agent_id

    async def add_subscription(self, subscription: Subscription) -> None:
        self._subscriptions.append(subscription)
        self._routes.clear()
        if self._started and await self._listen_topic(subscription):
            await self._wire.flush()  # a round trip: only when there is a new NATS subscription to wait for

    async def remove_subscription(self, id: str) -> None:
        kept = [s for s in self._subscriptions if s.id != id]
        if len(kept) == len(self._subscriptions):
            raise LookupError(f"no subscription {id}")
        self._subscriptions = kept
        self._routes.clear()

    def add_message_serializer(self, serializer: MessageSerializer[Any] | Sequence[MessageSerializer[Any]]) -> None:
        for item in serializer if isinstance(serializer, Sequence) else [serializer]:
            self._codec.add_serializer(item)

    # -- AgentRuntime: agents --------------------------------------------------------------------------------

    def _is_local(self, agent_type: str) -> bool:
        return agent_type in self._factories and agent_type not in self._remote

    async def get(
        self, id_or_type: AgentId | AgentType | str, /, key: str = "default", *, lazy: bool = True
    ) -> AgentId:
        if isinstance(id_or_type, AgentId):
            agent_id = id_or_type
        else:
            agent_id = AgentId(id_or_type.type if isinstance(id_or_type, AgentType) else id_or_type, key)
        if not lazy and self._is_local(agent_id.type):
            await self._agent(agent_id)
        return agent_id

    async def try_get_underlying_agent_instance(self, id: AgentId, type: type[T] = Agent) -> T:  # type: ignore[assignment]
        if not self._is_local(id.type):
            raise LookupError(f"agent {id} is not in this process")
        agent = await self._agent(id)
        if not isinstance(agent, type):
            raise TypeError(f"agent {id} is a {agent.__class__.__name__}, not a {type.__name__}")
        return agent

    async def _agent(self, agent_id: AgentId) -> Agent:
        future = self._agents.get(agent_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._agents[agent_id] = future
            try:
                with AgentInstantiationContext.populate_context((self, agent_id)):
                    future.set_result(await self._factories[agent_id.type]())
            except BaseException as exc:
                del self._agents[agent_id]
                future.set_exception(exc)
                future.exception()  # retrieved: waiters get it, nobody else logs it
                raise
        return await future

    async def agent_metadata(self, agent: AgentId) -> AgentMetadata:
        if self._is_local(agent.type):
            return (await self._agent(agent)).metadata
        _, reply = await self._request(agent, "meta", b"")
        return AgentMetadata(**json.loads(reply))  # type: ignore[typeddict-item]

    async def agent_save_state(self, agent: AgentId) -> Mapping[str, Any]:
        if self._is_local(agent.type):
            return await (await self._agent(agent)).save_state()
        _, body = await self._request(agent, "save", b"")
        state: Mapping[str, Any] = self._codec.loads_state(body)
        return state

    async def agent_load_state(self, agent: AgentId, state: Mapping[str, Any]) -> None:
        if self._is_local(agent.type):
            await (await self._agent(agent)).load_state(state)
            return
        await self._request(agent, "load", self._codec.dumps_state(state))

    async def save_state(self) -> Mapping[str, Any]:
        """State of the agents in this process (others save their own)."""
        state: dict[str, Any] = {}
        for agent_id, future in self._agents.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                state[str(agent_id)] = dict(await future.result().save_state())
        return state

    async def load_state(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            agent_id = AgentId.from_str(key)
            if self._is_local(agent_id.type):
                await (await self._agent(agent_id)).load_state(value)

    # -- AgentRuntime: messages ------------------------------------------------------------------------------

    async def send_message(
        self,
        message: Any,
        recipient: AgentId,
        *,
        sender: AgentId | None = None,
        cancellation_token: CancellationToken | None = None,
        message_id: str | None = None,
    ) -> Any:
        token = cancellation_token or self._fresh_token()
        message_id = message_id or self._new_id()
        if self._is_local(recipient.type):
            context = MessageContext(sender, None, True, token, message_id)
            future = asyncio.ensure_future(self._invoke(recipient, message, context))
            token.link_future(future)
            return await future
        name, payload = self._codec.encode(message)
        meta = {"ty": name, "k": recipient.key, "sn": str(sender) if sender else None, "id": message_id}
        meta["sc"] = None if cancellation_token is None else self._scope(token)
        head, body = await self._request(recipient, "msg", payload, meta, token)
        return self._codec.decode(head["ty"], body)

    async def publish_message(
        self,
        message: Any,
        topic_id: TopicId,
        *,
        sender: AgentId | None = None,
        cancellation_token: CancellationToken | None = None,
        message_id: str | None = None,
        implied: TopicId | None = None,
    ) -> None:
        """``implied``: the message also stands for the one :meth:`derive` makes of it, published to that topic
        before it (with no cancellation token), in every process it reaches."""
        derive = None if implied is None else self._deriver(type(message))  # refused before it goes out
        token = cancellation_token or self._fresh_token()
        message_id = message_id or self._new_id()
        name, payload = self._codec.encode(message)
        meta = {
            "from": self.instance_id,
            "ty": name,
            "src": topic_id.source,
            "sn": str(sender) if sender else None,
            "id": message_id,
            "sc": None if cancellation_token is None else self._scope(token),
        }
        if implied is not None:
            meta["im"], meta["ims"] = implied.type, implied.source
        if not self._nc.is_closed:
            await self._wire.publish(f"{self._ns}.t.{_topic_tokens(topic_id.type)}", _frame(meta, payload))
        if implied is not None and derive is not None and (implied_recipients := self._recipients(implied, None)):
            self._deliver(implied_recipients, derive(message), implied, sender, self._fresh_token(), self._new_id())
        self._deliver(self._recipients(topic_id, None), message, topic_id, sender, token, message_id)

    def _deriver(self, message_type: type) -> Callable[[Any], Any]:
        derive = self._derivers.get(message_type)
        if derive is None:
            raise LookupError(f"no message is derived from a {message_type.__name__} here: see derive()")
        return derive

    def _new_id(self) -> str:
        """Unique in the namespace: a random prefix per runtime and a counter (a uuid4 costs a system call)."""
        return f"{self._id_prefix}{next(self._ids):x}"

    # -- delivery --------------------------------------------------------------------------------------------

    def _deliver(
        self,
        recipients: list[AgentId],
        message: Any,
        topic_id: TopicId,
        sender: AgentId | None,
        token: CancellationToken,
        message_id: str,
    ) -> None:
        """Start the handlers of ``recipients`` (see :meth:`_recipients`), in order, without waiting for them."""
        for recipient in recipients:
            if recipient == sender:
                continue
            context = MessageContext(sender, topic_id, False, token, message_id)
            self._spawn(self._invoke(recipient, message, context, publish=True))

    def _recipients(self, topic_id: TopicId, via: str | None) -> list[AgentId]:
        """The local agents a topic reaches, in subscription order, worked out once per topic and subject. ``via``
        is the NATS subject a message came in on (None: published here): it is for the subscriptions that listen
        there (one subscription may match a message that also arrives on another subject, and must get it
        once)."""
        key = (topic_id, via)
        routes = self._routes.get(key)
        if routes is None:
            matching = [
                subscription.map_to_agent(topic_id)
                for subscription in self._subscriptions
                if (via is None or self._listen_subject(subscription) == via) and subscription.is_match(topic_id)
            ]
            routes = [recipient for recipient in matching if self._is_local(recipient.type)]
            if len(self._routes) >= _ROUTES_KEPT:
                self._routes.clear()
            self._routes[key] = routes
        return routes

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        return task

    async def _invoke(self, recipient: AgentId, message: Any, context: MessageContext, publish: bool = False) -> Any:
        made = self._agents.get(recipient)  # once made, an agent is at hand: no coroutine to await for it
        agent = made.result() if made is not None and made.done() else await self._agent(recipient)
        with MessageHandlerContext.populate_context(recipient):
            try:
                return await agent.on_message(message, ctx=context)
            except asyncio.CancelledError:
                if publish:
                    return None
                raise
            except Exception:
                if publish:  # nobody awaits a published message's handler: say what happened
                    log.exception("handler of %s failed on a %s", recipient, type(message).__name__)
                    return None
                raise

    async def _request(
        self,
        agent: AgentId,
        op: str,
        payload: bytes,
        meta: dict[str, Any] | None = None,
        token: CancellationToken | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        meta = {"op": op, "k": agent.key, **(meta or {})}
        subject = _agent_subject(self._ns, agent.type)
        future = self.ask(subject, _frame(meta, payload), self._rpc_timeout)
        if token is not None:
            token.link_future(future)
        try:
            reply = await future
        except nats.errors.NoRespondersError as exc:
            raise LookupError(f"no process serves agent type {agent.type!r} in {self._ns}") from exc
        head, body = _unframe(reply.data)
        if not head.get("ok"):
            raise RemoteHandlerError(f"{agent}: {head.get('error')}")
        return head, body

    # -- NATS side -------------------------------------------------------------------------------------------

    async def _listen(self, subject: str, cb: Callable[[Msg], None], queue: str = "") -> bool:
        """Subscribe once per subject (``cb`` is called in the read loop: it must not block); whether this
        call did."""
        if subject in self._nats_subs:
            return False
        self._nats_subs[subject] = await self._wire.subscribe(subject, cb, queue=queue)
        return True

    async def _serve_type(self, agent_type: str) -> None:
        if agent_type not in self._remote:
            await self._listen(_agent_subject(self._ns, agent_type), self._on_request, queue="a")

    def _listen_subject(self, subscription: Subscription) -> str | None:
        """Where a subscription listens: its topic's own subject, an agent's direct-message prefix ``a:`` on
        ``ns.t.a.*``, anything else on the namespace's wildcard; None when its agent lives in another process."""
        if isinstance(subscription, TypeSubscription):
            if subscription.agent_type in self._remote:
                return None
            return f"{self._ns}.t.{_topic_tokens(subscription.topic_type)}"
        if not self._is_local(getattr(subscription, "agent_type", "")):
            return None  # the remote process listens
        if isinstance(subscription, TypePrefixSubscription):
            prefix = subscription.topic_type_prefix
            if prefix.endswith(":") and ":" not in prefix[:-1]:
                return f"{self._ns}.t.{subject_token(prefix[:-1])}.*"
        return f"{self._ns}.t.>"

    async def _listen_topic(self, subscription: Subscription) -> bool:
        subject = self._listen_subject(subscription)
        return False if subject is None else await self._listen_on(subject)

    async def _listen_on(self, subject: str) -> bool:
        """Listen for published messages on ``subject`` (see :meth:`_listen`)."""

        def on_publish(msg: Msg) -> None:
            self._on_publish(msg, subject)

        return await self._listen(subject, on_publish)

    def _on_publish(self, msg: Msg, via: str) -> None:
        meta, payload = _unframe(msg.data)
        if meta.get("from") == self.instance_id:
            return  # delivered locally when it was published
        topic_id = _topic_id(_topic_type(msg.subject[len(self._ns) + 3 :]), meta["src"])
        recipients = self._recipients(topic_id, via)
        implied, implied_recipients = None, []
        if "im" in meta and meta["id"] != self._last_implying:  # (a message heard on two subjects: derived once)
            self._last_implying = meta["id"]
            implied = _topic_id(meta["im"], meta["ims"])
            # the implied topic's subscribers hear it only this way, whichever subject they listen on
            implied_recipients = self._recipients(implied, None)
        if not recipients and not implied_recipients:
            return
        try:
            message = self._codec.decode(meta["ty"], payload)
        except (LookupError, ValueError):
            log.exception("dropping a message on %s that this process cannot read", msg.subject)
            return
        sender = _sender(meta["sn"]) if meta.get("sn") else None
        if implied is not None and implied_recipients:
            try:
                derived = self._deriver(type(message))(message)
            except (LookupError, ValueError):
                log.exception("cannot derive the message for %s that a message on %s implies", meta["im"], msg.subject)
            else:
                self._deliver(implied_recipients, derived, implied, sender, self._fresh_token(), self._new_id())
        self._deliver(recipients, message, topic_id, sender, self._token(meta.get("sc")), meta["id"])

    def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("dropping a request on %s with nowhere to answer", msg.subject)
            return
        meta, payload = _unframe(msg.data)
        agent_id = _agent_id(_from_token(msg.subject[len(self._ns) + 3 :]), meta["k"])
        if meta["op"] == "msg":
            try:
                message = self._codec.decode(meta["ty"], payload)
            except (LookupError, ValueError) as exc:
                self._wire.send_soon(msg.reply, _frame({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, b""))
                return
            sender = _sender(meta["sn"]) if meta.get("sn") else None
            context = MessageContext(sender, None, True, self._token(meta.get("sc")), meta["id"])
            self._spawn(self._answer(msg, self._invoke(agent_id, message, context)))
        else:
            self._spawn(self._answer(msg, self._operate(agent_id, meta["op"], payload), raw=True))

    async def _operate(self, agent_id: AgentId, op: str, payload: bytes) -> bytes:
        agent = await self._agent(agent_id)
        if op == "save":
            return self._codec.dumps_state(await agent.save_state())
        if op == "load":
            await agent.load_state(self._codec.loads_state(payload))
            return b""
        if op == "meta":
            return json.dumps(dict(agent.metadata)).encode()
        raise ValueError(f"unknown operation {op!r}")

    async def _answer(self, msg: Msg, work: Awaitable[Any], raw: bool = False) -> None:
        try:
            result = await work
            if raw:
                frame = _frame({"ok": True}, result)
            else:
                name, body = self._codec.encode(result)
                frame = _frame({"ok": True, "ty": name}, body)
        except asyncio.CancelledError:
            frame = _frame({"ok": False, "error": "CancelledError: the handler was cancelled"}, b"")
        except Exception as exc:
            frame = _frame({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, b"")
        if self._nc.is_closed:
            return
        try:
            await self._wire.publish(msg.reply, frame)
        except nats.errors.MaxPayloadError:  # the caller must hear of it, or it waits for its whole timeout
            limit = self._nc.max_payload
            log.warning("the answer to %s is too big to send: %d bytes, over %d", msg.subject, len(frame), limit)
            error = f"MaxPayloadError: the answer is {len(frame)} bytes, over the server's max_payload of {limit}"
            with contextlib.suppress(nats.errors.Error):
                await self._wire.publish(msg.reply, _frame({"ok": False, "error": error}, b""))
        except nats.errors.Error:
            pass  # the connection closed under it: nobody is left to answer

    # -- cancellation scopes ---------------------------------------------------------------------------------

    def _scope(self, token: CancellationToken) -> str:
        scope = self._scope_of.get(token)
        if scope is None:
            scope = self._new_id()
            self._bind(scope, token)
        return scope

    def _fresh_token(self) -> CancellationToken:
        """A token for a message sent without one: only :meth:`cancel_all` can cancel it, so it travels with no
        scope (binding one was a fifth of the runtime's work on a small request)."""
        token = CancellationToken()
        self._unscoped.add(token)
        return token

    def _token(self, scope: str | None) -> CancellationToken:
        if scope is None:
            return self._fresh_token()
        token = self._scopes.get(scope)
        if token is None:
            token = CancellationToken()
            self._bind(scope, token)
            if scope in self._cancelled:
                token.cancel()
        return token

    def _bind(self, scope: str, token: CancellationToken) -> None:
        self._scopes[scope] = token
        self._scope_of[token] = scope
        token.add_callback(lambda: self._broadcast_cancel(scope))

    def _broadcast_cancel(self, scope: str) -> None:
        # a scope cancelled by a broadcast (or by cancel_all, which sends its own) is not announced again
        if self._stopped or self._nc.is_closed or scope in self._cancelled:
            return
        self._wire.send_soon(f"{self._ns}.x.cancel", scope.encode())

    def _cancel_scope(self, scope: str) -> None:
        scopes = list(self._scopes) if scope == _ALL else [scope]
        for name in scopes:
            self._cancelled[name] = None
            token = self._scopes.get(name)
            if token is not None and not token.is_cancelled():
                token.cancel()
        if scope == _ALL:
            for token in list(self._unscoped):
                token.cancel()
        while len(self._cancelled) > _CANCELLED_KEPT:
            del self._cancelled[next(iter(self._cancelled))]

    def _on_cancel(self, msg: Msg) -> None:
        self._cancel_scope(msg.data.decode())
