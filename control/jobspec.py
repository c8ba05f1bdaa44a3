"""From an agent record and the settings to the variables of the agent job template."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent.egress import ALLOW_ENV
from agent.protocol import LOCAL_MODEL_URL_ENV, PROVIDER_KEY_ENV, model_key_env
from agent.wire import SPIN_ENV
from control.models import Agent
from control.settings import Settings
from jobs import SECOND_NS, AgentJobVariables, render_agent_job

__all__ = [
    "MODEL_KEY_META",
    "agent_job",
    "job_id_for",
    "model_key_secret",
    "namespace_for",
    "task_secrets",
]

MODEL_KEY_META = "caravan_model_key"
"""Job meta naming the one model key (an environment variable's name, never its value) the agent's task gets."""


def job_id_for(agent_id: str) -> str:
    return f"caravan-{agent_id}"


def namespace_for(customer_id: str) -> str:
    return f"caravan-{customer_id}"


def model_key_secret(meta: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """The platform's model key a job's task gets by the scheduler's secret channel: the one its meta names, if the
    platform has it. No other provider's key, whatever the platform holds."""
    name = meta.get(MODEL_KEY_META, "")
    value = environ.get(name) if name in PROVIDER_KEY_ENV.values() else None
    return {name: value} if value else {}


def flag_store_secrets(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What a job's task gets by the scheduler's secret channel for the flag store: with Consul, the token and TLS
    settings of the control plane's environment (``CONSUL_HTTP_TOKEN``, ``CONSUL_CACERT``...: the address is in the
    job). The paths of TLS files must hold on the client nodes too."""
    if settings.flags != "consul":
        return {}
    from agent.backends.consul import client_env  # py-consul is only imported where Consul is used

    return client_env(environ)


def nats_address(url: str) -> tuple[str, dict[str, str]]:
    """A NATS URL as a job carries it, without the user name and password (or token) written in it, and those as
    the secrets that carry them to the agent instead (``CARAVAN_NATS_USER`` and ``CARAVAN_NATS_PASSWORD``, or
    ``CARAVAN_NATS_TOKEN`` for a user name alone), as nats-py reads them from the URL: as written, not unquoted."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if "@" not in parts.netloc:
        return url, {}
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    user, password = parts.username or "", parts.password
    if password is None:
        return bare, {"CARAVAN_NATS_TOKEN": user} if user else {}
    return bare, {"CARAVAN_NATS_USER": user, "CARAVAN_NATS_PASSWORD": password}


def task_secrets(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What every agent's task gets by the scheduler's secret channel: the credentials written in the agents' NATS
    URL (:func:`nats_address`; an agent's own NATS user, when Caravan runs NATS's users, is given over them) and the
    flag store's (:func:`flag_store_secrets`)."""
    return {**nats_address(settings.agents_nats_url)[1], **flag_store_secrets(settings, environ)}


def _driver_config(settings: Settings) -> dict[str, str | list[str]]:
    if settings.agent_driver == "docker":
        return {"image": settings.agent_image, "command": "python", "args": ["-m", "agent"], "ports": ["health"]}
    return {"command": settings.agent_python, "args": ["-m", "agent"]}


def agent_job(agent: Agent, settings: Settings) -> dict[str, Any]:
    """The Nomad ``Job`` for an agent: IDs, resources and wiring only; the agent loads its text at start."""
    meta = {
        "caravan_owner": settings.install_id,
        "caravan_customer": agent.customer_id,
        "caravan_agent": agent.id,
        "caravan_version": str(agent.version),
    }
    key_env = model_key_env(agent.model)
    if key_env is not None:
        meta[MODEL_KEY_META] = key_env
    env = {
        "CARAVAN_AGENT_ID": agent.id,
        "CARAVAN_CUSTOMER_ID": agent.customer_id,
        "NATS_URL": nats_address(settings.agents_nats_url)[0],  # its credentials are secrets (task_secrets)
        "CARAVAN_HEALTH_PORT": "${NOMAD_PORT_health}",
        # inside a container the host's address cannot be bound; the port is mapped to it instead
        "CARAVAN_HEALTH_HOST": "0.0.0.0" if settings.agent_driver == "docker" else "${NOMAD_IP_health}",
        "CARAVAN_FLAGS": settings.flags,
        "CARAVAN_FLAGS_GRACE_S": f"{settings.flags_grace_s:g}",
        "CARAVAN_FLAGS_HEARTBEAT_S": f"{settings.flags_heartbeat_s:g}",
        SPIN_ENV: f"{settings.spin_us:g}",
    }
    if settings.flags == "consul" and settings.consul_http_addr:
        env["CONSUL_HTTP_ADDR"] = settings.consul_http_addr  # the token reaches the task as a secret, not here
    if settings.local_model_url:
        env[LOCAL_MODEL_URL_ENV] = settings.local_model_url
    if settings.model_url_allow:
        env[ALLOW_ENV] = settings.model_url_allow  # the operator's, not a customer's: checked as a setting
    variables = AgentJobVariables(
        job_id=agent.job_id,
        namespace=agent.namespace,
        region=settings.region,
        datacenters=settings.datacenters,
        count=agent.replicas,
        cpu=agent.resources.cpu,
        memory_mb=agent.resources.memory_mb,
        driver=settings.agent_driver,
        driver_config=_driver_config(settings),
        env=env,
        meta=meta,
        service_name=f"caravan-agent-{agent.id}",
        # with Consul as the registry, agents register in its catalog (which the killswitch reads for instances)
        service_provider="consul" if settings.flags == "consul" else "nomad",
        restart_attempts=settings.agent_restart_attempts,
        restart_delay_ns=int(settings.agent_restart_delay_s * SECOND_NS),
        restart_interval_ns=int(settings.agent_restart_interval_s * SECOND_NS),
        kill_timeout_ns=int(settings.agent_kill_timeout_s * SECOND_NS),
    )
    return render_agent_job(variables)
