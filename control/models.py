"""Caravan's domain model: customers, API keys, agents and tasks, and the inputs that create them.

Input models (``XCreate``) carry all validation of user input, so that the REST API, the CLI and any
other entry point refuse the same things with the same messages.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from agent.protocol import TASK_ENDINGS, ModelConfig, utcnow
from agent.tools import TOOL_NAMES

__all__ = [
    "TERMINAL_TASK_STATUSES",
    "USER",
    "Agent",
    "AgentCreate",
    "AgentStatus",
    "AgentUpdate",
    "ApiKey",
    "ChangeLease",
    "Customer",
    "CustomerCreate",
    "DisplayName",
    "NotBlank",
    "Resources",
    "Role",
    "Task",
    "TaskCreate",
    "TaskMessage",
    "TaskStatus",
    "Usage",
    "Visible",
]


class Role(StrEnum):
    ADMIN = "admin"
    CUSTOMER = "customer"


class AgentStatus(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    KILLED = "killed"


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_INPUT = "awaiting_input"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    KILLED = "killed"


TERMINAL_TASK_STATUSES = frozenset(TaskStatus(status) for status in TASK_ENDINGS)

USER = "user"
"""The human, in AgentChat: the source of a task's message and the target of a handoff that asks the human."""


def _not_the_human(value: str) -> str:
    if value == USER:
        raise ValueError(f"{USER!r} is the human's name in a team (its task's source, its handoff target)")
    return value


AgentName = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$",
    ),
    AfterValidator(_not_the_human),
]
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})  # controls, format and bidi controls, line breaks
_JOINERS = frozenset("\u200c\u200d")  # zero-width non-joiner and joiner


def _visible(value: str) -> str:
    for i, char in enumerate(value):
        if unicodedata.category(char) in _INVISIBLE and not _joining(value, i):
            raise ValueError(f"must not hold control, format or line-break characters (U+{ord(char):04X})")
    return value


def _joining(value: str, i: int) -> bool:
    """A joiner between two visible characters beyond ASCII: how emoji sequences (👩‍💻) and the words of
    scripts such as Persian or Devanagari are written. Between ASCII letters it would only hide itself."""
    if value[i] not in _JOINERS or i == 0 or i == len(value) - 1:
        return False
    return all(
        ord(near) > 0x7F and unicodedata.category(near) not in _INVISIBLE for near in (value[i - 1], value[i + 1])
    )


Visible = AfterValidator(_visible)
"""Text people read, as one line: no control, format (zero-width, bidi) or line-break characters, but for a
zero-width joiner or non-joiner between two characters beyond ASCII."""


_FILLERS = frozenset("\u034f\u115f\u1160\u2800\u3164\uffa0")
"""Characters that show as nothing, though Unicode does not call them spaces: Hangul fillers, the braille blank,
the combining grapheme joiner."""


def _not_blank(value: str) -> str:
    if all(c.isspace() or c in _FILLERS or unicodedata.category(c) in _INVISIBLE for c in value):
        raise ValueError("must hold something to read, not only spaces")
    return value


NotBlank = AfterValidator(_not_blank)
"""Text with something to read: not empty, nor only spaces, fillers, controls and zero-width characters."""

DisplayName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100),
    Visible,
    NotBlank,
    Field(
        description="Any letters; no control, format (zero-width, bidi) or line-break characters, but for a "
        "zero-width joiner or non-joiner between two characters beyond ASCII (emoji sequences, joined scripts)."
    ),
]
"""A name people read (a customer's, a team's): nothing in it may be invisible, reorder the text or break it."""
SystemMessage = Annotated[str, StringConstraints(max_length=32_000)]
ToolName = Literal[TOOL_NAMES]  # type: ignore[valid-type]


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    cpu: int = Field(default=200, ge=50, le=16_000, description="CPU in MHz (Nomad `resources.cpu`).")
    memory_mb: int = Field(default=256, ge=128, le=65_536, description="Memory limit in MB.")


class AgentCreate(BaseModel):
    """An agent's definition. Strict, as every input of an agent (its resources and its model too): a number is
    a JSON number and a boolean a JSON boolean (``true`` is no replica, ``"2"`` no count), but for a float's field,
    which takes an integer (``"temperature": 1``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: AgentName = Field(description="A Python identifier: letters, digits and `_`, starting with a letter.")
    system_message: SystemMessage = "You are a helpful assistant."
    model: ModelConfig
    tools: Annotated[list[ToolName], Field(max_length=16)] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    replicas: int = Field(default=1, ge=1, le=10)

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("tools must not repeat")
        return value


def _not_nullable(schema: dict[str, Any]) -> None:
    """The JSON schema of a model whose fields may be left out but not sent as null: each field's own type, no
    default."""
    for name, field in schema.get("properties", {}).items():
        field.pop("default", None)
        kinds = [kind for kind in field.get("anyOf", []) if kind != {"type": "null"}]
        if len(kinds) == 1:
            del field["anyOf"]
            schema["properties"][name] = {**kinds[0], **field}


class AgentUpdate(BaseModel):
    """Fields of an agent that PATCH may change; anything given rolls out a new job version. Within `resources`
    only the fields given change; a `model` is replaced whole. Strict, as :class:`AgentCreate`."""

    # a field left out keeps its value, and none may be null: the schema offers no null nor shows a default
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_not_nullable)

    system_message: SystemMessage | None = None
    model: ModelConfig | None = None
    tools: Annotated[list[ToolName], Field(max_length=16)] | None = None
    resources: Resources | None = None
    replicas: int | None = Field(default=None, ge=1, le=10)

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may not be null: leave the field out to keep its value")
        return value

    @field_validator("resources")
    @classmethod
    def _some_resource(cls, value: Resources) -> Resources:
        if not value.model_fields_set:  # what is left out keeps its value: {} changes nothing
            raise ValueError("nothing to update: give cpu, memory_mb or both")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> AgentUpdate:
        if not self.model_fields_set:
            raise ValueError("nothing to update")
        return self


class ChangeLease(BaseModel):
    """An agent's lifecycle change under way (create, PATCH, start, stop, delete): until it ends, or ``until`` passes
    (its control plane died), no other change of the agent begins. Not shown to clients."""

    owner: str
    until: datetime


class Agent(BaseModel):
    id: str
    customer_id: str
    name: str
    system_message: str
    model: ModelConfig
    tools: list[str] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    replicas: int = 1
    status: AgentStatus = AgentStatus.PENDING
    status_reason: str | None = None
    desired: Literal["running", "stopped"] = "running"
    version: int = 1
    job_id: str
    namespace: str
    scheduler: dict[str, Any] = Field(default_factory=dict, description="The scheduler's handles (job, eval, allocs).")
    lease: ChangeLease | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class AgentRef(BaseModel):
    """The fields of an agent record that say whose it is and whether it runs (the rest is not read)."""

    id: str
    customer_id: str
    status: AgentStatus
    desired: Literal["running", "stopped"]


class CustomerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DisplayName


class Customer(BaseModel):
    id: str
    name: str
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(BaseModel):
    """A stored API key: only its hash is kept; the prefix identifies it in lists and logs."""

    prefix: str
    hash: str
    role: Role
    customer_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: str | None = Field(default=None, max_length=64)
    team_id: str | None = Field(default=None, max_length=64)
    task: Annotated[str, StringConstraints(min_length=1, max_length=100_000), NotBlank]

    @model_validator(mode="after")
    def _one_target(self) -> TaskCreate:
        if (self.agent_id is None) == (self.team_id is None):
            raise ValueError("give exactly one of agent_id and team_id")
        return self


class TaskMessage(BaseModel):
    source: str | None
    type: str
    content: Any
    at: datetime


class TranscriptEntry(BaseModel):
    """One message of a task's transcript, under its own key (``<customer>.<task>.<event sequence>``) in the
    ``transcripts`` bucket, so that a task's record stays small whatever the length of its conversation."""

    attempt: int
    message: TaskMessage


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Task(BaseModel):
    id: str
    customer_id: str
    agent_id: str | None = None
    team_id: str | None = None
    task: str
    status: TaskStatus = TaskStatus.QUEUED
    status_reason: str | None = None
    messages: list[TaskMessage] = Field(
        default_factory=list,
        description="Stored only in records written before transcripts had their own bucket; filled in when read.",
    )
    result: str | None = None
    usage: Usage = Field(default_factory=Usage)
    attempt: int = 1
    queue_seq: int | None = Field(default=None, description="Sequence of the request in the task queue.")
    cancel_requested: bool = Field(
        default=False,
        description="A cancel was asked for: whatever starts the task (again) is told at once, and it ends "
        "`cancelled` when its runner confirms, or at once if nothing was handed it.",
    )
    events_seq: int = Field(
        default=0, description="Stream sequence of the last event folded in: one delivered again is not folded twice."
    )
    input_segment: int = Field(
        default=0,
        description="The team run's segment whose question the task waits for (its checkpoint's, as its "
        "`awaiting_input` status says): the `queued` status of an answer to an earlier one, stored late, changes "
        "nothing.",
    )
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
