"""Caravan's wire protocol: NATS subject names and the JSON messages both sides exchange.

The control plane and the agent process import this module and nothing else of each other, so it
stays small and depends only on pydantic. Subjects are namespaced per customer so that NATS
permissions can confine a customer's agents to their own subjects.

Subjects (``{c}`` customer id, ``{a}`` agent id, ``{t}`` task id):

- ``caravan.tasks.{c}.{a}``            work queue (JetStream ``CARAVAN_TASKS``) of :class:`TaskRequest`
- ``caravan.events.{c}.task.{t}``      every event of a task (JetStream ``CARAVAN_EVENTS``)
- ``caravan.events.{c}.agent.{a}``     agent lifecycle events (ready, stopping)
- ``caravan.ctl.{c}.definition.{a}``   request/reply: the agent's :class:`AgentDefinition`
- ``caravan.ctl.{c}.cancel.{a}``       broadcast to an agent's replicas: cancel a task
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

__all__ = [
    "AGENT_STATE_EVENTS",
    "BROADCAST_SUBJECT",
    "EVENTS_STREAM",
    "ID_PATTERN",
    "LOCAL_MODEL_DEFAULT",
    "LOCAL_MODEL_URL_ENV",
    "PROVIDERS",
    "PROVIDER_KEY_ENV",
    "REPLAYED",
    "TASKS_STREAM",
    "TASK_ATTEMPTS",
    "TASK_ENDINGS",
    "AgentDefinition",
    "AgentEventKind",
    "Event",
    "EventKind",
    "ModelConfig",
    "ScriptedToolCall",
    "TaskRequest",
    "agent_events_subject",
    "cancel_subject",
    "consumer_name",
    "definition_subject",
    "ending_msg_id",
    "event_on_its_subject",
    "http_url_problem",
    "model_key_env",
    "required_model_key",
    "task_events_subject",
    "task_subject",
    "utcnow",
]

TASKS_STREAM = "CARAVAN_TASKS"
TASK_ATTEMPTS = 3
"""Runs of one task an agent makes: each that its agent's process did not see through (it crashed, or stopped and
gave the task back) is one. A request delivered after the last ends the task `failed`, saying so."""
BROADCAST_SUBJECT = "caravan.broadcast"
"""Operators' messages to every agent: ``{"message", "by", "at"}``."""
EVENTS_STREAM = "CARAVAN_EVENTS"

ID_PATTERN = r"^[a-z]{2}-[0-9a-f]{12}$"
"""Every Caravan id: a two-letter kind, a dash and 12 hex digits (``ag-3f2a9c1b7d4e``). Safe in subjects,
Nomad job IDs and namespaces."""
_ID = re.compile(ID_PATTERN)

PROVIDERS = ("openai", "openrouter", "groq", "deepseek", "anthropic", "ollama", "local", "replay")
PROVIDER_KEY_ENV = {
    "openai": "OPENAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "groq": "GROQ_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "ollama": "OLLAMA_API_KEY",
}
"""Where each provider's API key is read from in the agent's environment (never from the job spec). An agent's
environment holds at most one of them: :func:`model_key_env` of its model."""

LOCAL_MODEL_URL_ENV = "CARAVAN_LOCAL_MODEL_URL"
"""Where the ``local`` provider's OpenAI-compatible endpoint is, in the agent's environment (wiring, no secret)."""
LOCAL_MODEL_DEFAULT = "SmolLM2-135M-Instruct"
"""The model the ``local`` provider serves when the definition names none: bundled, offline."""


def _check_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"not a Caravan id: {value!r}")
    return value


def task_subject(customer_id: str, agent_id: str) -> str:
    return f"caravan.tasks.{_check_id(customer_id)}.{_check_id(agent_id)}"


def task_events_subject(customer_id: str, task_id: str) -> str:
    return f"caravan.events.{_check_id(customer_id)}.task.{_check_id(task_id)}"


def agent_events_subject(customer_id: str, agent_id: str) -> str:
    return f"caravan.events.{_check_id(customer_id)}.agent.{_check_id(agent_id)}"


def definition_subject(customer_id: str, agent_id: str) -> str:
    return f"caravan.ctl.{_check_id(customer_id)}.definition.{_check_id(agent_id)}"


def cancel_subject(customer_id: str, agent_id: str) -> str:
    return f"caravan.ctl.{_check_id(customer_id)}.cancel.{_check_id(agent_id)}"


def consumer_name(agent_id: str) -> str:
    """The durable JetStream consumer on the task queue that an agent's replicas share."""
    return f"agent-{_check_id(agent_id)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


ModelName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/@+-]+$")]


MAX_ARGUMENT_DEPTH = 32
"""How deeply a scripted tool call's arguments may nest. A record holding them must read back: pydantic's JSON
reader refuses values nested 200 deep, and Python's reader takes them."""


def json_depth(value: Any) -> int:
    """How many lists and dicts deep ``value`` nests (0 for a scalar), counted without recursion."""
    depth, level = 0, [(value, 0)]
    while level:
        item, at = level.pop()
        if isinstance(item, dict | list):
            depth = max(depth, at + 1)
            level.extend((child, at + 1) for child in (item.values() if isinstance(item, dict) else item))
    return depth


def _shallow(arguments: dict[str, Any]) -> dict[str, Any]:
    if json_depth(arguments) > MAX_ARGUMENT_DEPTH:
        raise ValueError(f"arguments may nest at most {MAX_ARGUMENT_DEPTH} levels deep")
    return arguments


def http_url_problem(url: str) -> str | None:
    """Why an HTTP client cannot connect to ``url``, said of it ("is not a URL: ..."); None if it can, as far as
    its shape goes: http or https, a host, and a port if any in 1-65535 (``urlsplit`` refuses an unclosed IPv6
    bracket; its port, one that is not a number or out of range)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return "is not an http(s) URL"
    if not parts.hostname:
        return "names no host"
    if port == 0:
        return "has port 0: a port is 1-65535"
    try:
        host = ascii_host(parts.hostname)
    except ValueError as exc:
        return f"names a host an HTTP client cannot look up: {exc}"
    if ":" not in host and not all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split(".")):
        return (
            f"names a host an HTTP client cannot look up: {host!r} is not a host name (labels of 1-63 letters, "
            "digits, '-' or '_', none starting or ending with '-')"
        )
    return None


_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def ascii_host(host: str) -> str:
    """``host`` (lower case, as ``urlsplit`` gives it) as an HTTP client sends it: a name in other scripts as its
    IDNA (``bücher.example`` is ``xn--bcher-kva.example``; ``127。0。0。1`` is 127.0.0.1); :class:`ValueError` if it
    has none (full-width digits, a soft hyphen)."""
    if host.isascii():
        return host
    import idna  # (only here: most hosts are ASCII)

    try:
        return str(idna.encode(host).decode("ascii"))
    except idna.IDNAError as exc:
        raise ValueError(f"{host!r}: {exc}") from None


class ScriptedToolCall(BaseModel):
    """A tool call the ``replay`` model makes instead of answering with text."""

    model_config = ConfigDict(extra="forbid")

    tool: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    arguments: Annotated[dict[str, Any], AfterValidator(_shallow)] = Field(default_factory=dict)


class ModelConfig(BaseModel):
    """Which model an agent talks to. API keys are never part of it: they come from the agent's environment.
    Strict: numbers and booleans are JSON's own (an integer is taken for a float)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # NaN and Infinity are no JSON

    provider: Literal["openai", "openrouter", "groq", "deepseek", "anthropic", "ollama", "local", "replay"] = Field(
        description="Model provider. `local` is the small model Caravan runs on its own machine; `replay` plays "
        "back `responses`. Neither needs a key or the network."
    )
    name: ModelName = Field(description="Model name as the provider spells it, e.g. `gpt-4o-mini`.")
    base_url: Annotated[str, StringConstraints(max_length=500, pattern=r"^https?://[^\s]+$")] | None = Field(
        default=None, description="OpenAI-compatible endpoint; only for `ollama` (any OpenAI-compatible server)."
    )
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=200_000)] | None = None
    responses: Annotated[
        list[Annotated[str, StringConstraints(max_length=100_000)] | ScriptedToolCall], Field(max_length=1000)
    ] = Field(default_factory=list, description="Scripted answers for the `replay` provider, in order.")
    delay_ms: Annotated[int, Field(ge=0, le=600_000)] = Field(
        default=0, description="`replay` only: how long each scripted answer takes (for demos and tests)."
    )
    stream: bool = Field(default=False, description="Stream answers token by token (`chunk` events).")

    @model_validator(mode="before")
    @classmethod
    def _local_default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("provider") == "local" and not data.get("name"):
            return {**data, "name": LOCAL_MODEL_DEFAULT}
        return data

    @field_validator("base_url")
    @classmethod
    def _parsed_url(cls, value: str | None) -> str | None:
        if value is not None and (problem := http_url_problem(value)) is not None:
            raise ValueError(f"base_url {problem}")
        return value

    @model_validator(mode="after")
    def _provider_rules(self) -> ModelConfig:
        if self.base_url is not None and self.provider != "ollama":
            raise ValueError("base_url may only be set for provider 'ollama' (hosted providers keep their own)")
        if self.provider == "replay" and not self.responses:
            raise ValueError("provider 'replay' needs at least one entry in responses")
        if self.provider != "replay" and (self.responses or self.delay_ms):
            raise ValueError("responses and delay_ms are only for provider 'replay'")
        return self


def required_model_key(model: ModelConfig) -> str | None:
    """The variable without which ``model`` cannot be called (:func:`model_key_env`, but for the platform's
    ``ollama``, whose key is optional)."""
    return None if model.provider == "ollama" else model_key_env(model)


def model_key_env(model: ModelConfig) -> str | None:
    """The variable holding the platform's key that ``model`` may use: its provider's. None for a provider that
    needs no key, and for ``ollama`` at a customer's own ``base_url``: a platform key never goes there."""
    if model.provider == "ollama" and model.base_url is not None:
        return None
    return PROVIDER_KEY_ENV.get(model.provider)


class AgentDefinition(BaseModel):
    """What an agent process loads at start. User text lives here, never in the job spec."""

    agent_id: str
    customer_id: str
    name: str
    system_message: str
    model: ModelConfig
    tools: list[str] = Field(default_factory=list)
    max_concurrent_tasks: int = 4


class TaskRequest(BaseModel):
    task_id: str
    customer_id: str
    agent_id: str
    task: str
    submitted_at: datetime = Field(default_factory=utcnow)

    @field_validator("task_id", "customer_id", "agent_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _check_id(value)


class EventKind(StrEnum):
    STATUS = "status"
    MESSAGE = "message"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    USAGE = "usage"
    INPUT_REQUEST = "input_request"
    RESULT = "result"
    ERROR = "error"


TASK_ENDINGS = frozenset({"completed", "failed", "cancelled", "killed"})
"""A task's final statuses."""


REPLAYED = "replayed"
"""In a ``usage`` event's data: a team run's new attempt publishing again what its checkpoint holds (the tokens
were metered when they were used)."""


class AgentEventKind(StrEnum):
    STATUS = "status"
    """The control plane changed the agent's status: ``content`` the status, ``data`` = {reason, was}."""
    READY = "ready"
    STOPPING = "stopping"
    BROADCAST = "broadcast"
    """The agent received an operator's broadcast: ``data`` = {message, by}."""
    KILLSWITCH = "killswitch"
    """The agent halted or resumed: ``data`` = {halted, flag_ids, reason, fail_safe}; the acknowledgement."""


AGENT_STATE_EVENTS = frozenset({AgentEventKind.READY, AgentEventKind.KILLSWITCH})
"""Agent events that carry the agent's whole state (up, halted or not): the last one says it all."""


class Event(BaseModel):
    """One event of a task or an agent, as published on NATS and streamed to clients."""

    kind: str
    task_id: str | None = None
    agent_id: str | None = None
    customer_id: str
    source: str | None = None
    content: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    at: datetime = Field(default_factory=utcnow)
    attempt: int = 1

    @property
    def ends_attempt(self) -> bool:
        """Whether this is a final status of its task's attempt (one of :data:`TASK_ENDINGS`)."""
        return self.kind == EventKind.STATUS and self.content in TASK_ENDINGS


def ending_msg_id(event: Event) -> str | None:
    """The message id (``Nats-Msg-Id``) of a final status of a task's attempt, whoever publishes it: its run (an
    agent's, a team runner's) or the control plane ending it (a cancel, its agent deleted or failed); None for any
    other event. The events stream stores the first and drops the others for two minutes (its duplicate window), so
    that an attempt ends once: a run told to stop by a control plane that ended its task at once would end it a
    second time."""
    return f"{event.task_id}:{event.attempt}:ended" if event.ends_attempt else None


def event_on_its_subject(subject: str, event: Event) -> bool:
    """Whether ``event`` came on the subject its own ids name (a task's event on its task's, an agent's on its
    agent's): NATS lets an agent publish on its own customer's event subjects only, and an event there naming
    another customer's task or agent in its body is forged."""
    if event.task_id is not None:
        return subject.split(".") == ["caravan", "events", event.customer_id, "task", event.task_id]
    if event.agent_id is not None:
        return subject.split(".") == ["caravan", "events", event.customer_id, "agent", event.agent_id]
    return True
