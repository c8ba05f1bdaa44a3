"""Request and response models of the REST API (the ``XCreate`` inputs live in ``control.models``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent.protocol import ModelConfig
from control.models import AgentStatus, Resources, TaskMessage, TaskStatus, Usage
from control.teams.models import SelectorSpec, TeamMode, Termination

__all__ = [
    "AgentPublic",
    "CustomerCreated",
    "CustomerPublic",
    "ErrorBody",
    "ErrorResponse",
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
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


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
