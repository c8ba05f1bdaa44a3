"""Caravan's settings: the environment with the prefix ``CARAVAN_``, plus the tools' own variables."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CARAVAN_", extra="ignore")

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    data_dir: Path = Path("var")
    nats_url: str = Field(
        default="nats://127.0.0.1:4222", validation_alias=AliasChoices("CARAVAN_NATS_URL", "NATS_URL")
    )
    agent_nats_url: str | None = Field(
        default=None, description="NATS address as agents see it (defaults to nats_url)."
    )
    scheduler: Literal["local", "nomad"] = "local"
    flags: Literal["natskv", "consul"] = "natskv"
    install_id: str = Field(default="caravan", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    admin_key: str | None = Field(default=None, description="Seeds the first admin API key (automated setups).")
    jwt_secret: str | None = Field(default=None, description="HS256 secret; generated once, kept in KV.")
    jwt_ttl_seconds: int = Field(default=3600, ge=60, le=86_400)

    agent_python: str = Field(default=sys.executable, description="Python that runs `-m agent` (raw_exec/exec).")
    agent_driver: Literal["raw_exec", "exec", "docker"] = "raw_exec"
    agent_image: str = "caravan/agent:latest"
    agent_kill_timeout_s: float = Field(default=5.0, ge=0, le=600)
    agent_restart_attempts: int = Field(default=3, ge=0, le=100)
    agent_restart_delay_s: float = Field(default=2.0, ge=0, le=600)
    agent_restart_interval_s: float = Field(default=300.0, ge=1)
    datacenters: list[str] = Field(default_factory=lambda: ["*"])
    region: str = "global"

    local_model: bool = Field(default=True, description="`caravan up` runs the bundled local model (if installed).")
    local_model_url: str | None = Field(
        default=None, description="OpenAI-compatible URL of the local model as agents see it (set by `caravan up`)."
    )
    local_model_path: Path | None = Field(default=None, description="A GGUF file instead of the bundled SmolLM2.")
    local_model_threads: int | None = Field(default=None, ge=1, le=256, description="Default: every core but one.")
    local_model_queue_timeout_s: float = Field(default=120.0, gt=0, le=3600)

    max_agents_per_customer: int = Field(default=50, ge=1)
    task_ack_wait_s: float = Field(default=60.0, ge=1)

    @property
    def agents_nats_url(self) -> str:
        return self.agent_nats_url or self.nats_url
