"""Job templates, their typed variables and the renderer."""

from __future__ import annotations

from typing import Any

from jobs.render import TemplateError, render, template_placeholders
from jobs.variables import (
    SECOND_NS,
    AgentJobVariables,
    Datacenter,
    Datacenters,
    DriverName,
    Region,
    secrets_variable_path,
)

__all__ = [
    "SECOND_NS",
    "AgentJobVariables",
    "Datacenter",
    "Datacenters",
    "DriverName",
    "Region",
    "TemplateError",
    "render",
    "render_agent_job",
    "secrets_variable_path",
    "template_placeholders",
]


def render_agent_job(variables: AgentJobVariables) -> dict[str, Any]:
    return render("agent", variables)
