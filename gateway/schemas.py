"""Request and response models of the REST API (the ``XCreate`` inputs live in ``control.models``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from agent.protocol import ModelConfig
from control.models import AgentStatus, NotBlank, Resources, Task, TaskMessage, TaskStatus, Usage, Visible
from control.services.quotas import UsagePublic
from control.teams.models import SelectorSpec, TeamMode, Termination

__all__ = [
    "ERROR_RESPONSES",
    "AgentPublic",
    "BroadcastRequest",
    "BroadcastResult",
    "CustomerCreated",
    "CustomerDetail",
    "CustomerPublic",
    "ErrorBody",
    "ErrorResponse",
    "KeyCreated",
    "KeyPublic",
    "TaskPublic",
    "TeamPublic",
    "TokenRequest",
    "TokenResponse",
]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERROR_MEANINGS = {
    400: "Bad request",
    401: "Missing, invalid or expired credentials",
    403: "Not allowed for this role",
    404: "Not found (including another customer's resources)",
    409: "Conflicts with the current state (a stopped agent, a quota, an engaged killswitch)",
    413: "Request body too large",
    415: "The body is not JSON (send it with content-type: application/json)",
    422: "Invalid input",
    429: "Rate limit reached, or too many open event streams (see Retry-After)",
    500: "Unexpected error: the gateway's log has it under the answer's request id (X-Request-ID)",
    502: "The scheduler did not do all that was asked (a killswitch engaged with jobs it could not stop)",
    503: "A backend (NATS, the scheduler) is unavailable; nothing was changed: retry later",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": meaning} for code, meaning in _ERROR_MEANINGS.items()
}
"""Every route may answer these, always as ``{"error": {"code", "message", "details"}}``."""


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1, max_length=512)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    role: str


class CustomerPublic(BaseModel):
    id: str
    name: str
    created_at: datetime


class CustomerCreated(CustomerPublic):
    api_key: str = Field(description="Shown once; only its hash is stored.")
    api_key_prefix: str


class CustomerDetail(CustomerPublic):
    usage: UsagePublic


class KeyCreated(BaseModel):
    api_key: str = Field(description="Shown once; only its hash is stored.")
    api_key_prefix: str


class KeyPublic(BaseModel):
    prefix: str
    role: str
    customer_id: str | None
    created_at: datetime
    revoked_at: datetime | None


class BroadcastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: Annotated[
        str,
        StringConstraints(min_length=1, max_length=2000),
        Visible,
        NotBlank,
        Field(description="One line every agent writes to its log: no control, format or line-break characters."),
    ]


class BroadcastResult(BaseModel):
    agents_running: int


class AgentPublic(BaseModel):
    id: str
    customer_id: str
    name: str
    status: AgentStatus
    status_reason: str | None
    desired: str
    system_message: str
    model: ModelConfig
    tools: list[str]
    resources: Resources
    replicas: int
    version: int
    job_id: str
    namespace: str
    scheduler: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class TaskPublic(BaseModel):
    id: str
    customer_id: str
    agent_id: str | None
    team_id: str | None
    task: str
    status: TaskStatus
    status_reason: str | None
    messages: list[TaskMessage]
    result: str | None
    usage: Usage
    attempt: int
    segment: int | None = Field(
        description="While `awaiting_input`: the question waiting for its answer (give it with the answer)."
    )
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, task: Task) -> TaskPublic:
        waiting = task.status is TaskStatus.AWAITING_INPUT
        return cls(**task.model_dump(), segment=task.input_segment if waiting else None)


class TeamPublic(BaseModel):
    id: str
    customer_id: str
    name: str
    members: list[str]
    mode: TeamMode
    selector: SelectorSpec | None
    handoffs: dict[str, list[str]]
    termination: Termination
    created_at: datetime
