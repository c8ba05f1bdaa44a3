"""Typed variables of the job templates (the role of nomad-pack's ``variables.hcl``).

Every value that reaches a job spec passes through these models: identifiers are pattern-checked,
numbers are bounded, and the renderer writes each value as a JSON literal. User text (names, prompts,
system messages) has no field here and so cannot reach a job.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, computed_field, model_validator

__all__ = ["SECOND_NS", "AgentJobVariables", "Datacenter", "DriverName", "Region", "secrets_variable_path"]

SECOND_NS = 1_000_000_000

Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,127}$")]
MetaValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:/@-]{0,200}$")]
EnvValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:/@,${}=+%\[\]-]{0,500}$")]
"""An operator's address or list (an IPv6 host is bracketed, a URL may be percent-encoded); a JSON string in the job."""
# Nomad takes any region or datacenter name without a NUL ('*' in a job's datacenters is a glob): these are the
# names a cluster is given, upper case and dots included.
Region = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Datacenter = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9*][A-Za-z0-9*._-]{0,127}$")]
Datacenters = Annotated[list[Datacenter], Field(min_length=1, max_length=32)]
"""Where a job may run (``["*"]``: every datacenter)."""
DriverName = Literal["raw_exec", "exec", "docker"]


def secrets_variable_path(job_id: str) -> str:
    """The Nomad Variable holding a job's secrets. Tasks of the job may read ``nomad/jobs/<job id>`` by their
    workload identity, with no ACL policy of their own."""
    return f"nomad/jobs/{job_id}"


class AgentJobVariables(BaseModel):
    """Variables of ``templates/agent.json.tmpl``: one Nomad service job running one Caravan agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: Identifier = Field(description="Nomad job ID, e.g. `caravan-ag-3f2a9c1b7d4e`.")
    namespace: Identifier = Field(description="Nomad namespace of the customer, e.g. `caravan-cu-0123456789ab`.")
    region: Region = Field(default="global", description="Nomad region.")
    datacenters: Datacenters = Field(default_factory=lambda: ["*"])
    priority: int = Field(default=50, ge=1, le=100)
    count: int = Field(default=1, ge=0, le=100, description="Replicas of the agent (task group count).")
    cpu: int = Field(ge=20, le=64_000, description="CPU in MHz.")
    memory_mb: int = Field(ge=32, le=262_144, description="Memory in MB; the task is killed above it.")
    driver: DriverName = Field(default="raw_exec", description="Task driver.")
    driver_config: dict[str, str | list[str]] = Field(description="Driver `config` block, computed by the caller.")
    env: dict[Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")], EnvValue] = Field(
        description="Task environment: wiring only (ids, addresses), never secrets or user text."
    )
    meta: dict[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")], MetaValue] = Field(
        description="Ownership and identity meta, on the job, group, service and task."
    )
    service_name: Identifier
    service_provider: Literal["nomad", "consul"] = Field(
        default="nomad", description="Where the service registers: Nomad's own catalog, or Consul's."
    )
    service_tags: list[Identifier] = Field(default_factory=lambda: ["caravan", "agent"])
    restart_attempts: int = Field(default=3, ge=0, le=100)
    restart_interval_ns: int = Field(default=300 * SECOND_NS, ge=5 * SECOND_NS)
    restart_delay_ns: int = Field(default=2 * SECOND_NS, ge=0)
    restart_mode: Literal["fail", "delay"] = "fail"
    kill_timeout_ns: int = Field(default=5 * SECOND_NS, ge=0, le=600 * SECOND_NS)
    check_interval_ns: int = Field(default=10 * SECOND_NS, ge=SECOND_NS)
    check_timeout_ns: int = Field(default=2 * SECOND_NS, ge=SECOND_NS)
    min_healthy_time_ns: int = Field(default=5 * SECOND_NS, ge=0)
    healthy_deadline_ns: int = Field(default=120 * SECOND_NS, ge=SECOND_NS)
    progress_deadline_ns: int = Field(default=300 * SECOND_NS, ge=0)

    @model_validator(mode="after")
    def _restarts_fit(self) -> AgentJobVariables:
        # Nomad's RestartPolicy.Validate (nomad/structs): its own minimums are on the fields above
        if self.restart_attempts * self.restart_delay_ns > self.restart_interval_ns:
            raise ValueError("restart_attempts times restart_delay must fit in restart_interval")
        if self.restart_attempts == 0 and self.restart_mode == "delay":
            raise ValueError("restart_mode 'delay' needs restart_attempts")
        return self

    @model_validator(mode="after")
    def _deployment_deadlines_fit(self) -> AgentJobVariables:
        # Nomad refuses an update block whose deadlines do not nest; say so before it does.
        if self.min_healthy_time_ns >= self.healthy_deadline_ns:
            raise ValueError("min_healthy_time must be shorter than healthy_deadline")
        if self.progress_deadline_ns and self.progress_deadline_ns <= self.healthy_deadline_ns:
            raise ValueError("progress_deadline must be longer than healthy_deadline")
        return self

    @computed_field(description="The task's `template`: every item of the job's Nomad Variable as an env var.")
    def secrets_template(self) -> str:
        path = secrets_variable_path(self.job_id)
        return '{{ with nomadVar "' + path + '" }}{{ range .Tuples }}{{ .K }}={{ .V | toJSON }}\n{{ end }}{{ end }}'
