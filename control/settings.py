"""Caravan's settings: the environment with the prefix ``CARAVAN_``, plus the tools' own variables."""

from __future__ import annotations

import functools
import ipaddress
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agent.egress import EgressPolicy
from agent.wire import DEFAULT_SPIN_US
from control.natscallout import issuer_public_key
from jobs import Datacenters, Region

__all__ = ["Settings"]


_egress_policy = functools.lru_cache(maxsize=8)(EgressPolicy.parse)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def _origin(entry: str) -> str:
    """``entry`` as a browser writes it in its Origin header (``scheme://host[:port]``: lower case, no default
    port), which CORS compares exactly; :class:`ValueError` naming the entry for anything else."""

    def refuse(why: str) -> ValueError:
        return ValueError(f"{entry!r} is not an origin (scheme://host[:port], e.g. https://app.example.com): {why}")

    if "*" in entry:
        raise refuse("wildcards are not allowed, name each origin that may call the API")
    scheme, sep, rest = entry.partition("://")
    if not sep:
        raise refuse("no scheme://")
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise refuse(f"the scheme {scheme!r} is neither http nor https")
    for mark, what in (("@", "a user name or password"), ("/", "a path"), ("?", "a query"), ("#", "a fragment")):
        if mark in rest:
            trailing = rest.endswith("/") and rest.count("/") == 1
            raise refuse(f"it has {what}" + (" (a trailing slash is one: leave it out)" if trailing else ""))
    host, port = rest.lower(), ""
    if (colon := host.rfind(":")) > host.rfind("]"):
        host, port = host[:colon], host[colon + 1 :]
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65_535):
            raise refuse(f"the port {port!r} is not a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise refuse(f"{host} is not an IPv6 address") from None
    elif not host.isascii():
        raise refuse("a host name outside ASCII is written as the browser sends it (xn--...)")
    elif not _HOST_NAME.fullmatch(host):
        raise refuse(f"{host!r} is not a host name")
    elif host.replace(".", "").isdigit():
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            raise refuse(f"{host} is not an IPv4 address") from None
    if port and int(port) != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{int(port)}"
    return f"{scheme}://{host}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CARAVAN_", extra="ignore")

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=1, le=65_535)
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The level of Caravan's own log (the API process and what it starts)."
    )
    access_log: bool = Field(
        default=False,
        description="Log every API request (uvicorn's access log), a line each: method, path and query (a token or "
        "an API key in it redacted: gateway/logredact.py), status.",
    )
    http_header_timeout_s: float = Field(
        default=20.0,
        gt=0,
        le=3600,
        description="How long the API waits for a request's headers, from the connection's opening or the previous "
        "response's end, before it answers 408 and closes the connection (gateway/http11.py).",
    )
    http_body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How long the API waits for a request's body, from its headers' end, before it answers 408 and "
        "closes the connection, unless the response has started (gateway/http11.py).",
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Origins (comma-separated, exactly scheme://host[:port]: `https://app.example.com`) whose web "
        "pages may call the API from a browser (CORS, gateway/app.py). Empty, the default: no CORS headers at all.",
    )
    data_dir: Path = Path("var")
    nats_url: str = Field(
        default="nats://127.0.0.1:4222", validation_alias=AliasChoices("CARAVAN_NATS_URL", "NATS_URL")
    )
    nats_user: str | None = Field(default=None, description="The platform's NATS user (CARAVAN_NATS_USER).")
    nats_password: SecretStr | None = Field(default=None, description="Its password (CARAVAN_NATS_PASSWORD).")
    agent_nats_url: str | None = Field(
        default=None, description="NATS address as agents see it (defaults to nats_url)."
    )
    nats_callout_seed: SecretStr | None = Field(
        default=None,
        description="The issuer account's nkey seed (SA...) of NATS's auth callout: set, the control plane answers "
        "the logins of a NATS configured with auth_callout (its issuer the seed's public key), each agent gets a "
        "user of its own (control/natscallout.py). A secret; `caravan nats-callout-keys` makes one.",
    )
    scheduler: Literal["local", "nomad"] = "local"
    flags: Literal["natskv", "consul"] = Field(
        default="natskv", description="Killswitch flags and service discovery: JetStream KV or Consul."
    )
    flags_grace_s: float = Field(
        default=30.0, ge=0.5, description="Agents halt (fail safe) after this long without hearing from the flag store."
    )
    flags_heartbeat_s: float = Field(default=5.0, ge=0.1, le=60)
    spin_us: float = Field(
        default=DEFAULT_SPIN_US,
        ge=0,
        le=1_000_000,
        description="How long a process polls for the answer to a request before it sleeps, in microseconds "
        "(agent.wire); agents get it too. 0: never.",
    )
    consul_http_addr: str | None = Field(
        default=None, validation_alias=AliasChoices("CARAVAN_CONSUL_HTTP_ADDR", "CONSUL_HTTP_ADDR")
    )
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
    agent_restart_interval_s: float = Field(
        default=300.0, ge=5, description="At least the attempts times the delay (Nomad refuses a job otherwise)."
    )
    datacenters: Datacenters = Field(default_factory=lambda: ["*"])
    region: Region = "global"

    # Nomad (CARAVAN_SCHEDULER=nomad): the nomad CLI's own variables, or CARAVAN_NOMAD_*.
    nomad_addr: str = Field(
        default="http://127.0.0.1:4646", validation_alias=AliasChoices("CARAVAN_NOMAD_ADDR", "NOMAD_ADDR")
    )
    nomad_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CARAVAN_NOMAD_TOKEN", "NOMAD_TOKEN")
    )
    nomad_namespace_token: SecretStr | None = Field(
        default=None, description="Token used only to create customer namespaces (management); else nomad_token."
    )
    nomad_region: str | None = Field(
        default=None, validation_alias=AliasChoices("CARAVAN_NOMAD_REGION", "NOMAD_REGION")
    )
    nomad_cacert: Path | None = Field(
        default=None, validation_alias=AliasChoices("CARAVAN_NOMAD_CACERT", "NOMAD_CACERT")
    )
    nomad_client_cert: Path | None = Field(
        default=None, validation_alias=AliasChoices("CARAVAN_NOMAD_CLIENT_CERT", "NOMAD_CLIENT_CERT")
    )
    nomad_client_key: Path | None = Field(
        default=None, validation_alias=AliasChoices("CARAVAN_NOMAD_CLIENT_KEY", "NOMAD_CLIENT_KEY")
    )
    nomad_skip_verify: bool = Field(
        default=False, validation_alias=AliasChoices("CARAVAN_NOMAD_SKIP_VERIFY", "NOMAD_SKIP_VERIFY")
    )
    nomad_timeout_s: float = Field(default=10.0, gt=0, le=300, description="Timeout of one Nomad API call.")
    local_model: bool = Field(default=True, description="`caravan up` runs the bundled local model (if installed).")
    local_model_url: str | None = Field(
        default=None, description="OpenAI-compatible URL of the local model as agents see it (set by `caravan up`)."
    )
    local_model_path: Path | None = Field(default=None, description="A GGUF file instead of the bundled SmolLM2.")
    local_model_threads: int | None = Field(default=None, ge=1, le=256, description="Default: every core but one.")
    local_model_queue_timeout_s: float = Field(default=120.0, gt=0, le=3600)

    max_agents_per_customer: int = Field(default=50, ge=1, description="Default agent quota of a new customer.")
    rate_limit_scale: float = Field(default=1.0, gt=0, description="Multiplies every tier's request rate.")
    max_streams_per_customer: int = Field(
        default=100,
        ge=1,
        description="Task event streams (SSE and WebSocket together) a customer may hold open at once on each "
        "gateway replica; one more is refused with 429. Admins are not counted.",
    )
    task_ack_wait_s: float = Field(default=60.0, ge=1)
    task_retention_days: float = Field(
        default=30.0,
        ge=0,
        le=36_500,
        description="Tasks that ended longer ago than this are forgotten, records and transcripts (their events "
        "leave the events stream after 30 days); 0: kept for good.",
    )
    task_count_interval_s: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="Ended tasks are counted for /metrics and the admin statistics by reading every task record, "
        "at most once this often (a scrape meanwhile gets the last count at once); tasks in flight are counted "
        "afresh at every scrape. 0: every scrape reads every record.",
    )
    task_cancel_deadline_s: float = Field(
        default=60.0,
        ge=0.5,
        le=86_400,
        description="A cancelled task whose agent has not stopped it after this long ends `cancelled` all the same "
        "(its agent is told again every few seconds until then).",
    )
    team_ack_wait_s: float = Field(
        default=30.0,
        ge=1,
        description="A team run whose control-plane replica stops beating for this long goes to another replica.",
    )
    model_url_allow: str = Field(
        default="",
        max_length=4096,
        description="Internal hosts and networks (comma-separated: `ollama.internal,10.20.0.0/16`) that a "
        "customer's `ollama` base_url may point at; every other internal address is refused (agent/egress.py).",
    )

    @field_validator("agent_restart_interval_s")
    @classmethod
    def _restarts_fit(cls, value: float, info: ValidationInfo) -> float:
        attempts, delay = info.data.get("agent_restart_attempts"), info.data.get("agent_restart_delay_s")
        if attempts is not None and delay is not None and attempts * delay > value:
            raise ValueError(
                f"{attempts} restarts {delay:g} s apart do not fit in {value:g} s: Nomad refuses the job (set "
                "CARAVAN_AGENT_RESTART_INTERVAL_S to at least CARAVAN_AGENT_RESTART_ATTEMPTS times "
                "CARAVAN_AGENT_RESTART_DELAY_S)"
            )
        return value

    @field_validator("nats_callout_seed")
    @classmethod
    def _callout_seed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            issuer_public_key(value.get_secret_value())  # a seed that is no account's stops the start, saying so
        return value

    @field_validator("model_url_allow")
    @classmethod
    def _egress_policy(cls, value: str) -> str:
        EgressPolicy.parse(value)  # a bad entry stops the start, rather than being ignored
        return ",".join(filter(None, (entry.strip() for entry in value.split(","))))  # as a job's env carries it

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _cors_origins(cls, value: object) -> object:
        entries = value.split(",") if isinstance(value, str) else value
        if not isinstance(entries, list | tuple):
            return value  # pydantic refuses it
        entries = [entry.strip() if isinstance(entry, str) else entry for entry in entries]
        return tuple(dict.fromkeys(_origin(entry) if isinstance(entry, str) else entry for entry in entries if entry))

    @property
    def egress(self) -> EgressPolicy:
        """The policy ``model_url_allow`` writes (parsed once per value: each agent create and change checks it)."""
        return _egress_policy(self.model_url_allow)

    @property
    def agents_nats_url(self) -> str:
        return self.agent_nats_url or self.nats_url
