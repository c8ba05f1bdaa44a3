"""The agent job template: what it renders (golden file), that Nomad knows every key, and that values
can never change its structure."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.egress import ALLOW_ENV, EgressPolicy
from agent.protocol import PROVIDER_KEY_ENV, ModelConfig
from agent.wire import DEFAULT_SPIN_US
from agent.worker import WorkerConfig
from control.jobspec import MODEL_KEY_META, agent_job, model_key_secret, task_secrets
from control.models import Agent
from control.settings import Settings
from jobs import SECOND_NS, AgentJobVariables, TemplateError, render, render_agent_job, template_placeholders
from tests.jobs.nomad_schema import unknown_fields

GOLDEN = Path(__file__).parent / "golden" / "agent.json"


def golden_variables() -> AgentJobVariables:
    return AgentJobVariables(
        job_id="caravan-ag-0123456789ab",
        namespace="caravan-cu-0123456789ab",
        datacenters=["dc1"],
        count=2,
        cpu=300,
        memory_mb=512,
        driver="raw_exec",
        driver_config={"command": "/opt/caravan/bin/python", "args": ["-m", "agent"]},
        env={
            "CARAVAN_AGENT_ID": "ag-0123456789ab",
            "CARAVAN_CUSTOMER_ID": "cu-0123456789ab",
            "NATS_URL": "nats://nats.service.consul:4222",
            "CARAVAN_HEALTH_PORT": "${NOMAD_PORT_health}",
        },
        meta={"caravan_owner": "caravan", "caravan_agent": "ag-0123456789ab", "caravan_customer": "cu-0123456789ab"},
        service_name="caravan-agent-ag-0123456789ab",
        restart_attempts=3,
        kill_timeout_ns=5 * SECOND_NS,
    )


def test_agent_job_matches_golden_file() -> None:
    rendered = render_agent_job(golden_variables())
    if os.environ.get("CARAVAN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(rendered, indent=2, sort_keys=True) + "\n")
    assert rendered == json.loads(GOLDEN.read_text())


def test_every_key_is_a_nomad_api_field() -> None:
    assert unknown_fields(render_agent_job(golden_variables())) == []


def test_rendered_job_carries_resources_restart_policy_service_check_and_ownership() -> None:
    job = render_agent_job(golden_variables())
    group = job["TaskGroups"][0]
    task = group["Tasks"][0]
    assert (job["ID"], job["Namespace"]) == ("caravan-ag-0123456789ab", "caravan-cu-0123456789ab")
    assert job["Type"] == "service"
    assert group["Count"] == 2
    assert task["Resources"] == {"CPU": 300, "MemoryMB": 512}
    assert group["RestartPolicy"]["Attempts"] == 3 and group["RestartPolicy"]["Mode"] == "fail"
    assert task["KillTimeout"] == 5 * SECOND_NS
    check = group["Services"][0]["Checks"][0]
    assert (check["Type"], check["Path"], group["Services"][0]["PortLabel"]) == ("http", "/health", "health")
    assert group["Networks"][0]["DynamicPorts"] == [{"Label": "health", "To": 0}]
    for meta in (job["Meta"], group["Meta"], task["Meta"], group["Services"][0]["Meta"]):
        assert meta["caravan_owner"] == "caravan" and meta["caravan_agent"] == "ag-0123456789ab"
    assert task["Env"]["CARAVAN_HEALTH_PORT"] == "${NOMAD_PORT_health}"  # Nomad's interpolation passes through


def test_every_placeholder_has_a_typed_variable() -> None:
    typed = set(AgentJobVariables.model_fields) | set(AgentJobVariables.model_computed_fields)
    assert template_placeholders("agent") <= typed


def _fields() -> dict[str, Any]:
    """The golden variables as constructor arguments (computed fields are derived, not given)."""
    return golden_variables().model_dump(exclude=set(AgentJobVariables.model_computed_fields))


def test_the_golden_variables_round_trip() -> None:
    assert AgentJobVariables(**_fields()) == golden_variables()


def test_secrets_come_from_the_jobs_own_nomad_variable_never_from_env() -> None:
    task = render_agent_job(golden_variables())["TaskGroups"][0]["Tasks"][0]
    (template,) = task["Templates"]
    assert template["Envvars"] is True and template["DestPath"] == "${NOMAD_SECRETS_DIR}/caravan.env"
    assert template["EmbeddedTmpl"].startswith('{{ with nomadVar "nomad/jobs/caravan-ag-0123456789ab" }}')
    assert not any(name.endswith("_API_KEY") for name in task["Env"])


def test_update_deadlines_must_nest() -> None:
    with pytest.raises(ValidationError, match="min_healthy_time"):
        AgentJobVariables(**{**_fields(), "min_healthy_time_ns": 200 * SECOND_NS})
    with pytest.raises(ValidationError, match="progress_deadline"):
        AgentJobVariables(**{**_fields(), "progress_deadline_ns": 60 * SECOND_NS})


@pytest.mark.parametrize(
    ("changes", "named"),
    [  # what Nomad's RestartPolicy.Validate and ServiceCheck validation refuse (nomad/structs)
        ({"restart_interval_ns": 4 * SECOND_NS}, "restart_interval_ns"),  # at least 5 s
        ({"restart_attempts": 100, "restart_delay_ns": 5 * SECOND_NS}, "fit in restart_interval"),  # 500 s > 300 s
        ({"restart_attempts": 0, "restart_mode": "delay"}, "needs restart_attempts"),
        ({"check_timeout_ns": SECOND_NS // 2}, "check_timeout_ns"),  # at least 1 s
        ({"check_interval_ns": SECOND_NS // 2}, "check_interval_ns"),  # at least 1 s
    ],
)
def test_what_nomad_refuses_in_a_restart_policy_or_a_check_is_refused_here(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        AgentJobVariables(**{**_fields(), **changes})
    AgentJobVariables(**{**_fields(), "restart_attempts": 60, "restart_delay_ns": 5 * SECOND_NS})  # 300 s: fits


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_id", 'x", "Type": "batch'),
        ("job_id", "job ${NOMAD_META_x}"),
        ("namespace", "ns\nnewline"),
        ("service_name", '{{ key "secret" }}'),
        ("cpu", -5),
        ("cpu", 10**9),
        ("memory_mb", 0),
        ("count", 1000),
        ("driver", "qemu"),
    ],
)
def test_hostile_variables_are_refused(field: str, value: Any) -> None:
    data = _fields()
    data[field] = value
    with pytest.raises(ValidationError):
        AgentJobVariables(**data)


def test_hostile_env_and_meta_values_are_refused() -> None:
    data = _fields()
    with pytest.raises(ValidationError):
        AgentJobVariables(**{**data, "env": {"NATS_URL": 'x" , "Privileged": true'}})
    with pytest.raises(ValidationError):
        AgentJobVariables(**{**data, "meta": {"caravan_owner": "[[ job_id ]]"}})


def test_a_template_with_an_undefined_variable_fails_loudly() -> None:
    with pytest.raises(TemplateError, match="undefined variables"):
        render("agent", ModelConfig(provider="replay", name="x", responses=["a"]))


HOSTILE_TEXT = 'quote " brace ${NOMAD_TOKEN} {{ key "x" }} [[ job_id ]] \n newline \\ backslash'


def _agent(**changes: Any) -> Agent:
    base: dict[str, Any] = {
        "id": "ag-0123456789ab",
        "customer_id": "cu-0123456789ab",
        "name": "helper",
        "system_message": "You help.",
        "model": ModelConfig(provider="replay", name="scripted", responses=["ok"]),
        "job_id": "caravan-ag-0123456789ab",
        "namespace": "caravan-cu-0123456789ab",
    }
    base.update(changes)
    return Agent(**base)


def test_user_text_never_reaches_the_job() -> None:
    settings = Settings(nats_url="nats://127.0.0.1:4222")
    plain = agent_job(_agent(), settings)
    hostile = agent_job(
        _agent(
            system_message=HOSTILE_TEXT,
            model=ModelConfig(provider="replay", name="scripted", responses=[HOSTILE_TEXT]),
        ),
        settings,
    )
    assert hostile == plain
    text = json.dumps(hostile)
    for fragment in ("NOMAD_TOKEN", "{{ key", "[[", "newline", "You help."):
        assert fragment not in text
    assert unknown_fields(hostile) == []


@pytest.mark.parametrize(("flags", "provider"), [("natskv", "nomad"), ("consul", "consul")])
def test_the_agents_service_registers_where_the_platform_discovers_agents(flags: str, provider: str) -> None:
    settings = Settings(nats_url="nats://127.0.0.1:4222", flags=flags, consul_http_addr="http://127.0.0.1:8500")
    (service,) = agent_job(_agent(), settings)["TaskGroups"][0]["Services"]
    assert service["Provider"] == provider


@pytest.mark.parametrize("spin_us", [0.0, 250.0, DEFAULT_SPIN_US])
def test_the_platforms_polling_window_reaches_its_agents(spin_us: float) -> None:
    settings = Settings(nats_url="nats://127.0.0.1:4222", spin_us=spin_us)
    env = agent_job(_agent(), settings)["TaskGroups"][0]["Tasks"][0]["Env"]
    assert WorkerConfig.from_env({**env, "CARAVAN_HEALTH_PORT": "0"}).spin_s == spin_us / 1e6  # Nomad fills the port


def test_the_operators_allowed_model_hosts_reach_its_agents_and_a_bad_entry_stops_the_start() -> None:
    settings = Settings(nats_url="nats://127.0.0.1:4222", model_url_allow="ollama.internal,10.20.0.0/16")
    env = agent_job(_agent(), settings)["TaskGroups"][0]["Tasks"][0]["Env"]
    assert EgressPolicy.parse(env[ALLOW_ENV]) == EgressPolicy.parse("10.20.0.0/16, ollama.internal")
    assert (
        ALLOW_ENV
        not in agent_job(_agent(), Settings(nats_url="nats://127.0.0.1:4222"))["TaskGroups"][0]["Tasks"][0]["Env"]
    )
    for bad in ("10.0.0.0/33", "ollama internal"):
        with pytest.raises(ValidationError, match=f"{ALLOW_ENV}: '{bad}' is n"):
            Settings(nats_url="nats://127.0.0.1:4222", model_url_allow=bad)


@pytest.mark.parametrize(
    ("model", "key"),
    [
        (ModelConfig(provider="openai", name="gpt-4o-mini"), "OPENAI_API_KEY"),
        (ModelConfig(provider="anthropic", name="claude-3-5-haiku-latest"), "ANTHROPIC_API_KEY"),
        (ModelConfig(provider="ollama", name="llama3"), "OLLAMA_API_KEY"),
        (ModelConfig(provider="ollama", name="llama3", base_url="https://them.example/v1"), None),
        (ModelConfig(provider="replay", name="scripted", responses=["ok"]), None),
    ],
)
def test_the_job_names_the_one_platform_key_its_model_may_have(model: ModelConfig, key: str | None) -> None:
    job = agent_job(_agent(model=model), Settings(nats_url="nats://127.0.0.1:4222"))
    assert job["Meta"].get(MODEL_KEY_META) == key
    platform = {name: f"secret-of-{name}" for name in PROVIDER_KEY_ENV.values()}
    assert model_key_secret(job["Meta"], platform) == ({key: platform[key]} if key else {})
    assert "secret-of" not in json.dumps(job)


def test_a_model_key_meta_can_name_no_other_secret() -> None:
    environ = {"CONSUL_HTTP_TOKEN": "root", "OPENAI_API_KEY": ""}
    assert model_key_secret({MODEL_KEY_META: "CONSUL_HTTP_TOKEN"}, environ) == {}
    assert model_key_secret({MODEL_KEY_META: "OPENAI_API_KEY"}, environ) == {}  # the platform has none


@pytest.mark.parametrize(
    ("url", "bare", "secrets"),
    [
        (
            "nats://caravan:pa%40ss:word@nats.internal:4222",
            "nats://nats.internal:4222",
            {"CARAVAN_NATS_USER": "caravan", "CARAVAN_NATS_PASSWORD": "pa%40ss:word"},  # as nats-py sends it
        ),
        ("tls://s3cr3t-token@nats.internal:4222", "tls://nats.internal:4222", {"CARAVAN_NATS_TOKEN": "s3cr3t-token"}),
        (
            "caravan:pw-0123456789@10.0.0.5:4222",
            "nats://10.0.0.5:4222",
            {"CARAVAN_NATS_USER": "caravan", "CARAVAN_NATS_PASSWORD": "pw-0123456789"},
        ),
        ("nats://nats.internal:4222", "nats://nats.internal:4222", {}),
    ],
)
def test_nats_credentials_in_the_agents_url_reach_them_as_secrets_never_in_the_job(
    url: str, bare: str, secrets: dict[str, str]
) -> None:
    """An operator's NATS with users of its own: the credentials written in the agents' URL, which the job's task
    environment showed (``GET /v1/agents/{id}/job``, ``nomad job inspect``), go by the secret channel instead."""
    settings = Settings(nats_url="nats://127.0.0.1:4222", agent_nats_url=url)
    job = agent_job(_agent(), settings)
    env = job["TaskGroups"][0]["Tasks"][0]["Env"]
    assert env["NATS_URL"] == bare
    given = task_secrets(settings, {})
    assert {name: value for name, value in given.items() if name.startswith("CARAVAN_NATS_")} == secrets
    for name in ("CARAVAN_NATS_PASSWORD", "CARAVAN_NATS_TOKEN"):
        assert given.get(name, "@") not in json.dumps(job)
    worker = WorkerConfig.from_env({**env, **given, "CARAVAN_HEALTH_PORT": "0"})  # as the task starts
    assert (worker.nats_url, worker.nats_user, worker.nats_password, worker.nats_token) == (
        bare,
        given.get("CARAVAN_NATS_USER"),
        given.get("CARAVAN_NATS_PASSWORD"),
        given.get("CARAVAN_NATS_TOKEN"),
    )


@pytest.mark.parametrize(
    ("setting", "where", "written"),
    [
        ({"datacenters": ["DC1", "us-east-1.a"]}, ("Datacenters",), ["DC1", "us-east-1.a"]),
        ({"region": "EU_West"}, ("Region",), "EU_West"),
        ({"agent_nats_url": "nats://[fd00::4]:4222"}, ("Env", "NATS_URL"), "nats://[fd00::4]:4222"),
        ({"model_url_allow": "ollama.internal, 10.20.0.0/16"}, ("Env", ALLOW_ENV), "ollama.internal,10.20.0.0/16"),
    ],
)
def test_a_setting_the_platform_takes_reaches_every_job(
    setting: dict[str, Any], where: tuple[str, ...], written: Any
) -> None:
    """Names Nomad gives clusters (any but NUL), an IPv6 NATS, a list of allowed hosts written with spaces: each
    passed as a setting, and every agent's create was then a 500 (its job would not render)."""
    job = agent_job(_agent(), Settings(nats_url="nats://127.0.0.1:4222", **setting))
    found: Any = job if where[0] != "Env" else job["TaskGroups"][0]["Tasks"][0]
    for key in where:
        found = found[key]
    assert found == written
    assert unknown_fields(job) == []


@pytest.mark.parametrize("setting", [{"datacenters": ["dc 1"]}, {"datacenters": []}, {"region": "eu\nwest"}])
def test_a_datacenter_or_region_no_job_can_carry_stops_the_start(setting: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(setting))):
        Settings(nats_url="nats://127.0.0.1:4222", **setting)
