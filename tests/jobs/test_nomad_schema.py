"""Tests for the Nomad job JSON field-name checker in ``nomad_schema``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.jobs.nomad_schema import unknown_fields


def _job() -> dict[str, Any]:
    """A small but realistic job in the ``POST /v1/jobs`` JSON form, using only real field names."""
    return {
        "ID": "caravan-team",
        "Name": "caravan-team",
        "Namespace": "default",
        "Type": "service",
        "Datacenters": ["dc1"],
        "Meta": {"caravan.team": "alpha"},
        "Update": {"MaxParallel": 1, "HealthCheck": "checks", "AutoRevert": True},
        "Constraints": [{"LTarget": "${attr.kernel.name}", "RTarget": "linux", "Operand": "="}],
        "TaskGroups": [
            {
                "Name": "agents",
                "Count": 2,
                "RestartPolicy": {"Attempts": 3, "Interval": 600_000_000_000, "Delay": 15_000_000_000, "Mode": "fail"},
                "ReschedulePolicy": {"Unlimited": True, "DelayFunction": "exponential"},
                "EphemeralDisk": {"SizeMB": 300},
                "Volumes": {"data": {"Type": "host", "Source": "caravan-data", "ReadOnly": False}},
                "Networks": [{"Mode": "bridge", "DynamicPorts": [{"Label": "http", "To": 8080}]}],
                "Services": [
                    {
                        "Name": "caravan-agent",
                        "PortLabel": "http",
                        "Provider": "consul",
                        "Tags": ["agent"],
                        "Meta": {"free-form": "yes"},
                        "Checks": [
                            {
                                "Type": "http",
                                "Path": "/healthz",
                                "Interval": 10_000_000_000,
                                "Timeout": 2_000_000_000,
                                "CheckRestart": {"Limit": 3, "Grace": 5_000_000_000},
                            }
                        ],
                    }
                ],
                "Tasks": [
                    {
                        "Name": "agent",
                        "Driver": "docker",
                        "Config": {"image": "caravan/agent:latest", "ports": ["http"], "mount": [{"type": "bind"}]},
                        "Env": {"NATS_URL": "nats://127.0.0.1:4222"},
                        "Resources": {"CPU": 500, "MemoryMB": 256, "MemoryMaxMB": 512},
                        "Templates": [{"EmbeddedTmpl": 'x={{ env "X" }}', "DestPath": "local/x.env", "Envvars": True}],
                        "LogConfig": {"MaxFiles": 5, "MaxFileSizeMB": 10},
                        "KillTimeout": 30_000_000_000,
                        "Vault": {"Policies": ["caravan"], "ChangeMode": "restart"},
                        "Meta": {"role": "worker"},
                    }
                ],
            }
        ],
    }


def _task(job: dict[str, Any]) -> dict[str, Any]:
    task: dict[str, Any] = job["TaskGroups"][0]["Tasks"][0]
    return task


def test_correct_job_passes() -> None:
    assert unknown_fields(_job()) == []


def test_misspelt_memory_is_reported_with_path() -> None:
    job = _job()
    _task(job)["Resources"]["MemoryMb"] = _task(job)["Resources"].pop("MemoryMB")
    assert unknown_fields(job) == ["Job.TaskGroups[0].Tasks[0].Resources.MemoryMb"]


def test_hcl_block_names_are_not_json_names() -> None:
    job = _job()
    _task(job)["Resources"] = {"cpu": 500, "memory": 256}
    _task(job)["Logs"] = {"MaxFiles": 5}
    assert unknown_fields(job) == [
        "Job.TaskGroups[0].Tasks[0].Resources.cpu",
        "Job.TaskGroups[0].Tasks[0].Resources.memory",
        "Job.TaskGroups[0].Tasks[0].Logs",
    ]


def test_unknown_keys_inside_nested_service_check_are_reported() -> None:
    job = _job()
    check = job["TaskGroups"][0]["Services"][0]["Checks"][0]
    check["Port"] = "http"
    check["CheckRestart"]["Graze"] = 1
    assert unknown_fields(job) == [
        "Job.TaskGroups[0].Services[0].Checks[0].CheckRestart.Graze",
        "Job.TaskGroups[0].Services[0].Checks[0].Port",
    ]


def test_free_form_maps_are_not_checked() -> None:
    job = _job()
    task = _task(job)
    task["Config"]["MemoryMb"] = 1
    task["Config"]["nested"] = {"AnyKey": {"Deeper": [1, 2]}}
    task["Env"]["MemoryMb"] = "1"
    task["Meta"]["NotAField"] = "x"
    job["Meta"]["NotAField"] = "x"
    job["TaskGroups"][0]["Services"][0]["Meta"]["NotAField"] = "x"
    assert unknown_fields(job) == []


def test_map_of_structs_and_request_wrapper() -> None:
    job = _job()
    job["TaskGroups"][0]["Volumes"]["data"]["Readonly"] = True
    job["Namspace"] = "default"
    assert unknown_fields({"Job": job, "PolicyOverride": False}, root="JobRegisterRequest") == [
        'JobRegisterRequest.Job.TaskGroups[0].Volumes["data"].Readonly',
        "JobRegisterRequest.Job.Namspace",
    ]


def test_unknown_root_is_rejected() -> None:
    with pytest.raises(ValueError, match="NoSuchStruct"):
        unknown_fields({}, root="NoSuchStruct")


def test_field_table_is_self_consistent() -> None:
    data = json.loads((Path(__file__).parent / "nomad_api_fields.json").read_text(encoding="utf-8"))
    assert re.search(r"\b[0-9a-f]{40}\b", data["_source"])
    structs: dict[str, dict[str, str]] = data["structs"]
    for name, fields in structs.items():
        for field, kind in fields.items():
            match = re.fullmatch(r"(?:\[\]|map\[string\])?(\w+)", kind)
            assert match, f"{name}.{field}: {kind}"
            assert match.group(1) == "leaf" or match.group(1) in structs, f"{name}.{field}: {kind}"
