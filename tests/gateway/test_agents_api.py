"""Agent lifecycle through the REST API, against the real local scheduler and agent processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.aio.msg
import nats.errors
import pytest

from agent.protocol import EVENTS_STREAM, TASKS_STREAM, AgentEventKind, Event
from control.backends.base import JobNotOwned, SchedulerError
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from gateway.app import MAX_BODY_BYTES
from tests.conftest import Api, make_settings, serve_api
from tests.support.helpers import assert_eventually, hold_first_call, now

REPLAY = {"provider": "replay", "name": "scripted", "responses": ["Hello from the scripted model."]}


def nested(depth: int) -> dict[str, Any]:
    """Tool-call arguments that nest ``depth`` levels deep."""
    value: dict[str, Any] = {"a": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def agent_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "helper", "system_message": "You help.", "model": REPLAY}
    body.update(changes)
    return body


async def created_running(api: Api, headers: dict[str, str], **changes: Any) -> dict[str, Any]:
    """An agent of ``agent_body(**changes)``, once it runs."""
    created = await api.client.post("/v1/agents", json=agent_body(**changes), headers=headers)
    assert created.status_code == 201, created.text
    return await wait_status(api, headers, created.json()["id"], "running")


async def wait_status(
    api: Api, headers: dict[str, str], agent_id: str, status: str, within: float = 20.0
) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        return (await api.client.get(f"/v1/agents/{agent_id}", headers=headers)).json()

    return await assert_eventually(probe, lambda a: a.get("status") == status, within=within, what=f"agent {status}")


async def test_agent_lifecycle_create_run_stop_start_update_delete(api: Api) -> None:
    _, headers = await api.new_customer()
    created = await api.client.post(
        "/v1/agents", json=agent_body(resources={"cpu": 300, "memory_mb": 384}), headers=headers
    )
    assert created.status_code == 201, created.text
    agent = created.json()
    assert agent["status"] in ("pending", "starting", "running")
    assert agent["job_id"] == f"caravan-{agent['id']}"
    running = await wait_status(api, headers, agent["id"], "running")
    assert running["scheduler"]["alloc_ids"]

    job = (await api.client.get(f"/v1/agents/{agent['id']}/job", headers=headers)).json()["Job"]
    assert job["ID"] == agent["job_id"] and job["Namespace"] == agent["namespace"]
    assert job["TaskGroups"][0]["Tasks"][0]["Resources"] == {"CPU": 300, "MemoryMB": 384}

    stopped = await api.client.post(f"/v1/agents/{agent['id']}/stop", headers=headers)
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    status = await api.control.scheduler.job_status(agent["namespace"], agent["job_id"])
    assert status is not None and all(s == "stopped" for s in status.allocs.values())

    started = await api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers)
    assert started.status_code == 200
    await wait_status(api, headers, agent["id"], "running")

    patched = await api.client.patch(f"/v1/agents/{agent['id']}", json={"replicas": 2}, headers=headers)
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == 2
    job = (await api.client.get(f"/v1/agents/{agent['id']}/job", headers=headers)).json()["Job"]
    assert job["TaskGroups"][0]["Count"] == 2 and job["Meta"]["caravan_version"] == "2"
    await assert_eventually(
        lambda: api.control.scheduler.job_status(agent["namespace"], agent["job_id"]),
        lambda s: s is not None and len(s.allocs) == 2,
    )

    listed = (await api.client.get("/v1/agents", headers=headers)).json()
    assert [a["id"] for a in listed] == [agent["id"]]
    assert (await api.client.delete(f"/v1/agents/{agent['id']}", headers=headers)).status_code == 204
    assert (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).status_code == 404


@pytest.mark.parametrize(
    ("model", "missing"),
    [
        ({"provider": "openai", "name": "gpt-4o-mini"}, "OPENAI_API_KEY"),
        ({"provider": "anthropic", "name": "claude-3-5-haiku-latest"}, "ANTHROPIC_API_KEY"),
        ({"provider": "groq", "name": "llama-3.1-8b-instant"}, "GROQ_API_KEY"),
        ({"provider": "local"}, "CARAVAN_LOCAL_MODEL_URL"),
    ],
)
async def test_a_model_the_platform_has_no_key_for_is_refused_naming_what_is_missing(
    api: Api, monkeypatch: pytest.MonkeyPatch, model: dict[str, Any], missing: str
) -> None:
    """Not an agent that says `running` and fails every task it is given: the customer hears at once, and nothing
    is stored. A PATCH to such a model is refused the same way, the agent left as it was."""
    monkeypatch.delenv(missing, raising=False)
    _, headers = await api.new_customer()
    refused = await api.client.post("/v1/agents", json=agent_body(model=model), headers=headers)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["details"][0]["field"] == "model.provider" and missing in error["message"], error
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    assert api.control.scheduler._jobs == {}  # type: ignore[attr-defined]
    agent = await created_running(api, headers)
    patched = await api.client.patch(f"/v1/agents/{agent['id']}", json={"model": model}, headers=headers)
    assert patched.status_code == 422, patched.text
    assert missing in patched.json()["error"]["message"]
    kept = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
    assert (kept["model"], kept["version"]) == (agent["model"], agent["version"])


async def test_an_agent_that_starts_without_its_models_key_fails_naming_it(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key was there when the agent was made, and is gone when it starts again (an operator took it away): the
    agent does not come up `running` to fail every task, it ends `failed` saying which variable it lacks. Each
    status the control plane gives it is an event on NATS (`nats sub 'caravan.events.>'`), and stored."""
    monkeypatch.setenv("GROQ_API_KEY", "gsk-" + "t" * 20)
    settings = make_settings(nats_server.url, tmp_path / "data", agent_restart_attempts=0)
    async with ControlPlane(settings) as control, serve_api(control) as api:
        customer_id, headers = await api.new_customer()
        heard: list[Event] = []

        async def hear(msg: nats.aio.msg.Msg) -> None:
            if (event := Event.model_validate_json(msg.data)).kind == AgentEventKind.STATUS:
                heard.append(event)

        sub = await control.jet.nc.subscribe(f"caravan.events.{customer_id}.agent.*", cb=hear)
        agent = await created_running(api, headers, model={"provider": "groq", "name": "llama-3.1-8b-instant"})
        # `running` comes from the agent's `ready`, stored before it is published: heard before the stop's, then
        await assert_eventually(now(lambda: [e.content for e in heard]), lambda said: "running" in said)
        assert (await api.client.post(f"/v1/agents/{agent['id']}/stop", headers=headers)).status_code == 200
        monkeypatch.delenv("GROQ_API_KEY")
        assert (await api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers)).status_code == 200
        failed = await wait_status(api, headers, agent["id"], "failed")
        assert "GROQ_API_KEY" in (failed["status_reason"] or ""), failed
        task = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "hi"}, headers=headers)
        assert task.status_code == 409, task.text

        await assert_eventually(now(lambda: heard), lambda h: bool(h) and h[-1].content == "failed")
        await sub.unsubscribe()
        said = [(e.agent_id, e.data["was"], e.content) for e in heard]
        lifecycle = ["pending", "starting", "running", "stopped", "pending", "starting", "failed"]
        assert said == [(agent["id"], was, status) for was, status in itertools.pairwise(lifecycle)], said
        assert heard[-1].data["reason"] == failed["status_reason"]
        stored = await control.jet.js.get_last_msg(EVENTS_STREAM, f"caravan.events.{customer_id}.agent.{agent['id']}")
        assert Event.model_validate_json(stored.data or b"") == heard[-1]


HOSTILE_NAMES = ['a"b', "x${NOMAD_TOKEN}", "{{ key }}", "[[ job_id ]]", "line\nbreak", "n" * 65, "", "1abc", "a b"]
INVISIBLE_NAMES = [
    "\u202eevil",  # right-to-left override: shows as "live"
    "a\u200bb",  # zero-width space
    "ad\u200dmin",  # a joiner between ASCII letters joins nothing: it only hides itself
    "\u200d\U0001f4bb",  # nor at the edge
    "\u2066isolated\u2069",  # bidi isolate
    "\ufeffbom",
    "line\u2028separator",
    "para\u2029separator",
    "next\u0085line",
    "tab\tbed",
    "nul\x00",
]
"""Display names that hide or reorder what an admin reads: control, format (zero-width, bidi) and line breaks."""
READABLE_NAMES = [
    "Café Müller",
    "日本の会社",
    "Ørsted & Søn",
    "\U0001f469\u200d\U0001f4bb Team",  # an emoji sequence: woman, joiner, laptop
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with a zero-width non-joiner
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_names_are_refused_and_nothing_is_stored(api: Api, name: str) -> None:
    _, headers = await api.new_customer()
    response = await api.client.post("/v1/agents", json=agent_body(name=name), headers=headers)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid" and "name" in error["message"]
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"system_message": "x" * 1_000_000}, "system_message"),
        ({"model": {"provider": "skynet", "name": "x"}}, "model.provider"),
        ({"model": {"provider": "openai", "name": "gpt-4o", "base_url": "http://evil.example/v1"}}, "model"),
        ({"model": {"provider": "replay", "name": "scripted"}}, "model"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://127.1:4646/v1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://169.254.169.254/"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://localhost:8080/v1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://[64:ff9b::a9fe:a9fe]/"}}, "model.base_url"),
        (
            {"model": {"provider": "ollama", "name": "m", "base_url": "http://127\u30020\u30020\u30021/"}},
            "model.base_url",
        ),
        (
            {"model": {"provider": "ollama", "name": "m", "base_url": "http://\uff11\uff12\uff17.0.0.1/"}},
            "model.base_url",
        ),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://a..b/v1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://-x-.com/v1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": f"http://{'a' * 64}.com/v1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://[zz/v1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://[::1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://example.com:abc/v1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://example.com:99999/v1"}}, "model.base_url"),
        ({"model": {"provider": "ollama", "name": "m", "base_url": "http://:8080/v1"}}, "model.base_url"),
        ({"model": {**REPLAY, "responses": [{"tool": "calculator", "arguments": nested(33)}]}}, "model.responses.0"),
        ({"resources": {"cpu": -1, "memory_mb": 256}}, "resources.cpu"),
        ({"resources": {"cpu": 200, "memory_mb": 10**9}}, "resources.memory_mb"),
        ({"replicas": 0}, "replicas"),
        ({"tools": ["rm_rf"]}, "tools.0"),
        ({"tools": ["calculator", "calculator"]}, "tools"),
        ({"unexpected": True}, "unexpected"),
    ],
)
async def test_bad_definitions_get_a_clear_422_and_no_job(api: Api, changes: dict[str, Any], field: str) -> None:
    _, headers = await api.new_customer()
    response = await api.client.post("/v1/agents", json=agent_body(**changes), headers=headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(d["field"].startswith(field) for d in error["details"]), error
    assert len(response.content) < 10_000  # the offending input is not echoed back
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    assert api.control.scheduler._jobs == {}  # type: ignore[attr-defined]


async def test_tool_call_arguments_nested_too_deep_to_read_back_are_refused_and_the_agent_stays_readable(
    api: Api,
) -> None:
    """Python's JSON reader takes a body nested hundreds deep, pydantic's refuses past 200: arguments that deep
    were stored and the record could not be read again (the agent, its customer's listing, the admin's, the
    killswitch's count and the platform's start all failed with it). Arguments nest at most 32 levels."""
    _, headers = await api.new_customer()
    script = {**REPLAY, "responses": [{"tool": "calculator", "arguments": nested(32)}]}
    created = await api.client.post("/v1/agents", json=agent_body(model=script), headers=headers)
    assert created.status_code == 201, created.text
    agent_id = created.json()["id"]
    for depth in (33, 220, 260):
        deep = {**REPLAY, "responses": [{"tool": "calculator", "arguments": nested(depth)}]}
        refused = await api.client.patch(f"/v1/agents/{agent_id}", json={"model": deep}, headers=headers)
        assert refused.status_code == 422, (depth, refused.text)
        assert "32 levels" in refused.json()["error"]["message"]
        made = await api.client.post("/v1/agents", json=agent_body(name=f"deep{depth}", model=deep), headers=headers)
        assert made.status_code == 422, (depth, made.text)
    got = await api.client.get(f"/v1/agents/{agent_id}", headers=headers)
    assert got.status_code == 200 and got.json()["model"]["responses"] == script["responses"], got.text
    assert [a["id"] for a in (await api.client.get("/v1/agents", headers=headers)).json()] == [agent_id]
    assert (await api.client.get("/v1/admin/agents", headers=await api.admin())).status_code == 200


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as JSON, padded with trailing spaces (still valid JSON) to ``size`` bytes."""
    raw = json.dumps(body).encode()
    return raw + b" " * (size - len(raw))


async def in_chunks(raw: bytes) -> AsyncIterator[bytes]:
    """``raw`` as a streamed body, which httpx sends chunked, without a Content-Length."""
    for start in range(0, len(raw), 2**16):
        yield raw[start : start + 2**16]


async def test_a_body_that_is_not_json_says_where_it_broke_and_names_no_field(api: Api) -> None:
    _, headers = await api.new_customer()
    broken = await api.client.post(
        "/v1/agents", content=b'{"name": "x",, }', headers={**headers, "Content-Type": "application/json"}
    )
    assert broken.status_code == 422, broken.text
    error = broken.json()["error"]
    assert [d["field"] for d in error["details"]] == ["body"], error  # not "1", the character's offset
    assert error["message"] == "invalid request: body: JSON decode error at character 13"
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []


async def test_a_rule_of_the_body_as_a_whole_is_said_of_the_body_in_its_own_words(api: Api) -> None:
    """A missing body, or a rule over several fields, said "request: Field required" and "request: Value error,
    ...": as though a field called `request` were wrong."""
    _, headers = await api.new_customer()
    empty = await api.client.post("/v1/agents", headers={**headers, "Content-Type": "application/json"})
    assert empty.status_code == 422, empty.text
    assert empty.json()["error"]["message"] == "invalid request: body: a JSON object is required"
    both = await api.client.post("/v1/tasks", json={"task": "x"}, headers=headers)
    assert both.status_code == 422, both.text
    error = both.json()["error"]
    assert error["message"] == "invalid request: body: give exactly one of agent_id and team_id", error
    assert [d["field"] for d in error["details"]] == ["body"]


UNREADABLE = {
    "broken": (b'{"name": "x",, }', "JSON decode error at character 13"),
    "not-utf8": (b'{"name": "\xff\xfe"}', "not UTF-8 (byte 0xff at offset 10)"),
    "nested": (b"[" * 100_000, "JSON nested too deeply"),
    "duplicate-key": (b'{"name": "x", "name": "y"}', 'duplicate key "name" in the JSON object at body'),
    "long-number": (b'{"name": "x", "replicas": -1' + b"0" * 4300 + b"}", "a number of 4301 digits (at most 4300)"),
}


@pytest.mark.parametrize("kind", UNREADABLE)
async def test_a_body_that_is_not_json_is_answered_only_once_the_caller_is_known(api: Api, kind: str) -> None:
    """FastAPI reads a JSON body before a route's dependencies: a caller who is not allowed is told so (401, 403),
    not where the body broke, as for any other body; one who is gets a 422 saying where (bytes that are no UTF-8,
    nesting too deep for the parser, a key named twice and an integer Python will not read too, which FastAPI
    answers with a bare 400); the token
    exchange, which asks nobody, says where it broke. Nothing is made."""
    _, headers = await api.new_customer()
    customers = (await api.client.get("/v1/admin/customers", headers=await api.admin())).json()
    (body, why), as_json = UNREADABLE[kind], {"Content-Type": "application/json"}
    for sent in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic eDp5"}):
        refused = await api.client.post("/v1/agents", content=body, headers={**as_json, **sent})
        assert refused.status_code == 401, (sent, refused.text)
        assert refused.json()["error"]["code"] == "unauthorized" and refused.headers["www-authenticate"] == "Bearer"
    customer_on_admin = await api.client.post("/v1/admin/customers", content=body, headers={**headers, **as_json})
    assert customer_on_admin.status_code == 403, customer_on_admin.text
    for path, sent in (("/v1/agents", headers), ("/v1/admin/customers", await api.admin()), ("/v1/auth/token", {})):
        refused = await api.client.post(path, content=body, headers={**sent, **as_json})
        assert refused.status_code == 422, (path, refused.text)
        error = refused.json()["error"]
        assert error["message"] == f"invalid request: body: {why}" and error["details"][0]["field"] == "body"
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    assert (await api.client.get("/v1/admin/customers", headers=await api.admin())).json() == customers


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain; charset=utf-8", "multipart/form-data; boundary=x", "json", None],
)
async def test_a_json_body_sent_as_another_content_type_is_415_saying_what_to_send(
    api: Api, content_type: str | None
) -> None:
    """`curl -d '{...}'` without `-H 'content-type: application/json'` sends a form, and Python's requests with
    `data=` no content type at all: 415 says so, where the body was refused as "no valid dictionary"."""
    _, headers = await api.new_customer()
    body = json.dumps(agent_body()).encode()
    said = "this request has none" if content_type is None else f"this request's is {content_type!r}"
    for path, method in (("/v1/agents", "POST"), ("/v1/tasks", "POST"), ("/v1/agents/ag-000000000000", "PATCH")):
        sent_as = headers if content_type is None else {**headers, "Content-Type": content_type}
        refused = await api.client.request(method, path, content=body, headers=sent_as)
        assert refused.status_code == 415, (path, refused.text)
        assert "content-type" not in refused.request.headers or content_type is not None
        error = refused.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert error["message"] == f"the body must be JSON, sent with content-type: application/json ({said})"
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    for json_type in ("application/json; charset=utf-8", "application/merge-patch+json", "Application/JSON"):
        made = await api.client.post("/v1/agents", content=body, headers={**headers, "Content-Type": json_type})
        assert made.status_code == 201, (json_type, made.text)
        await api.client.delete(f"/v1/agents/{made.json()['id']}", headers=headers)
    anonymous = await api.client.post("/v1/agents", content=body, headers={"Content-Type": "text/plain"})
    assert anonymous.status_code == 401  # authentication comes first


def with_duplicate(body: dict[str, Any], marker: str, key: str, values: tuple[str, str]) -> bytes:
    """``body`` as JSON where the string ``marker`` stands for an object naming ``key`` twice."""
    twice = ", ".join(f"{json.dumps(key)}: {json.dumps(value)}" for value in values)
    return json.dumps(body).replace(json.dumps(marker), "{" + twice + "}").encode()


DUPLICATED = {
    "top-level": (
        json.dumps(agent_body()).replace('"name": "helper"', '"name": "helper", "name": "other"').encode(),
        'duplicate key "name" in the JSON object at body',
    ),
    "in-a-list-of-objects": (
        with_duplicate(agent_body(model={**REPLAY, "responses": ["fine", "DUP"]}), "DUP", "tool", ("calculator", "x")),
        'duplicate key "tool" in the JSON object at body.model.responses[1]',
    ),
    "deeper": (
        with_duplicate(
            agent_body(model={**REPLAY, "responses": [{"tool": "calculator", "arguments": {"a b": "DUP"}}]}),
            "DUP",
            "x",
            ("1", "2"),
        ),
        'duplicate key "x" in the JSON object at body.model.responses[0].arguments["a b"]',
    ),
    "huge-key": (
        with_duplicate(agent_body(tools=["DUP"]), "DUP", "k" * 100_000, ("1", "2")),
        f'duplicate key "{"k" * 100}..." in the JSON object at body.tools[0]',
    ),
}


@pytest.mark.parametrize("where", DUPLICATED)
async def test_a_body_naming_a_key_twice_is_422_saying_which_key_and_where_and_nothing_is_made(
    api: Api, where: str
) -> None:
    """`json.loads` kept the last of a key's values, where a proxy or a firewall in front may read the first: an
    object naming a key twice, at any depth, is refused, naming the key (its first 100 characters) and the object's
    path, before the route runs. The same key in different objects is fine."""
    _, headers = await api.new_customer()
    body, why = DUPLICATED[where]
    refused = await api.client.post("/v1/agents", content=body, headers={**headers, "Content-Type": "application/json"})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid" and error["message"] == f"invalid request: body: {why}"
    assert error["details"] == [{"field": "body", "message": why, "type": "json_invalid"}]
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    anonymous = await api.client.post("/v1/agents", content=body, headers={"Content-Type": "application/json"})
    assert anonymous.status_code == 401, anonymous.text  # who asks comes first, as for any other body
    same_key_elsewhere = agent_body(model={**REPLAY, "responses": [{"tool": "calculator", "arguments": {"name": 1}}]})
    assert '"name"' in json.dumps(same_key_elsewhere["model"])  # "name" at the top, in "model" and deeper
    made = await api.client.post("/v1/agents", json=same_key_elsewhere, headers=headers)
    assert made.status_code == 201, made.text
    assert [a["name"] for a in (await api.client.get("/v1/agents", headers=headers)).json()] == ["helper"]


async def test_a_change_naming_a_key_twice_is_422_and_changes_nothing(api: Api) -> None:
    """PATCH of an agent, PUT and PATCH of a quota, and the token exchange (whose key a proxy may read as the first
    `api_key` given): a key named twice is refused, and nothing changes."""
    customer_id, headers = await api.new_customer()
    admin = await api.admin()
    as_json = {"Content-Type": "application/json"}
    agent = (await api.client.post("/v1/agents", json=agent_body(), headers=headers)).json()
    quota = f"/v1/admin/customers/{customer_id}/quota"
    assert (await api.client.put(quota, json={"max_agents": 3}, headers=admin)).status_code == 200
    before = (await api.client.get(f"/v1/admin/customers/{customer_id}", headers=admin)).json()["usage"]["quota"]
    for method, path, sent, body, key in (
        ("PATCH", f"/v1/agents/{agent['id']}", headers, b'{"replicas": 2, "replicas": 3}', "replicas"),
        ("PUT", quota, admin, b'{"max_agents": 1, "max_agents": 100}', "max_agents"),
        ("PATCH", quota, admin, b'{"max_agents": 1, "max_agents": 100}', "max_agents"),
        ("POST", "/v1/auth/token", {}, b'{"api_key": "cvn_x", "api_key": "cvn_y"}', "api_key"),
    ):
        refused = await api.client.request(method, path, content=body, headers={**sent, **as_json})
        assert refused.status_code == 422, (method, path, refused.text)
        error = refused.json()["error"]
        assert error["message"] == f'invalid request: body: duplicate key "{key}" in the JSON object at body'
    assert (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()["replicas"] == agent["replicas"]
    after = (await api.client.get(f"/v1/admin/customers/{customer_id}", headers=admin)).json()["usage"]["quota"]
    assert after == before and after["max_agents"] == 3
    changed = await api.client.patch(f"/v1/agents/{agent['id']}", json={"replicas": 2}, headers=headers)
    assert changed.status_code == 200 and changed.json()["replicas"] == 2, changed.text


NOT_UTF8 = {  # the charset a content type declares, and the body sent with it (in that charset)
    "latin-1": ("application/json; charset=latin-1", "latin-1"),
    "ISO-8859-1 quoted": ('application/json; charset="ISO-8859-1"', "latin-1"),
    "utf-16": ("application/json; charset=utf-16", "utf-16"),
    "windows-1252 then utf-8": ("application/json; charset=windows-1252; charset=utf-8", "utf-8"),
    "empty": ("application/json; charset=", "utf-8"),
}


async def assert_refused_as_not_utf8(
    api: Api, headers: dict[str, str], body: bytes, content_type: str, said: str
) -> None:
    """``body`` sent as ``content_type`` is 415 on every route that reads one, its message ending in what this
    request's charset ``said``; nothing is made, and a caller not known is told 401 first."""
    for method, path in (("POST", "/v1/agents"), ("PATCH", "/v1/agents/ag-000000000000"), ("POST", "/v1/tasks")):
        refused = await api.client.request(
            method, path, content=body, headers={**headers, "Content-Type": content_type}
        )
        assert refused.status_code == 415, (method, path, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert error["message"] == (
            "the body must be UTF-8 JSON, sent with content-type: application/json and no charset or charset=utf-8"
            f" (this request's {said})"
        )
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    anonymous = await api.client.post("/v1/agents", content=body, headers={"Content-Type": content_type})
    assert anonymous.status_code == 401, anonymous.text  # authentication comes first


@pytest.mark.parametrize("sent", NOT_UTF8)
async def test_a_json_body_declaring_a_charset_other_than_utf8_is_415_and_nothing_is_made(api: Api, sent: str) -> None:
    """JSON between systems is UTF-8 (RFC 8259 8.1): a body declared in another charset was read as UTF-8 anyway
    (or as what its bytes looked like), meaning other than what its sender meant; it is refused with 415 saying what
    to send, once the caller is known. UTF-8 declared, in any spelling, or no charset, is read."""
    _, headers = await api.new_customer()
    content_type, encoding = NOT_UTF8[sent]
    body = json.dumps(agent_body(system_message="Vous êtes utile."), ensure_ascii=False).encode(encoding)
    declared = content_type.split("charset=", 1)[1].split(";")[0].strip('"').lower()
    await assert_refused_as_not_utf8(api, headers, body, content_type, f"declares charset {declared!r}")
    utf8 = json.dumps(agent_body(system_message="Vous êtes utile."), ensure_ascii=False).encode()
    for charset in ("application/json", "application/json; charset=utf-8", 'application/json; Charset="UTF-8"'):
        made = await api.client.post("/v1/agents", content=utf8, headers={**headers, "Content-Type": charset})
        assert made.status_code == 201, (charset, made.text)
        assert made.json()["system_message"] == "Vous êtes utile."
        await api.client.delete(f"/v1/agents/{made.json()['id']}", headers=headers)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
async def test_a_json_body_in_utf16_or_utf32_declaring_no_charset_is_415_and_nothing_is_made(
    api: Api, encoding: str
) -> None:
    """`json.loads` reads UTF-16 and UTF-32 by their bytes, where a proxy or a firewall in front that reads UTF-8 sees
    no JSON: such a body is refused as one that declares its charset is, naming what its bytes show. A UTF-8 byte
    order mark is skipped (RFC 8259 8.1 allows it)."""
    _, headers = await api.new_customer()
    document = agent_body(system_message="Vous êtes utile.")
    body = json.dumps(document, ensure_ascii=False).encode(encoding)
    await assert_refused_as_not_utf8(api, headers, body, "application/json", f"body is {encoding.upper()}")
    as_json = {**headers, "Content-Type": "application/json"}
    with_bom = json.dumps(document, ensure_ascii=False).encode("utf-8-sig")
    made = await api.client.post("/v1/agents", content=with_bom, headers=as_json)
    assert made.status_code == 201, made.text
    assert made.json()["system_message"] == "Vous êtes utile."


async def test_every_route_that_reads_a_json_body_refuses_a_key_named_twice(api: Api) -> None:
    """The refusal is made by the route class of the API's routers: every operation the API documents with a JSON
    body makes it (a route added without that class would read the body as `json.loads` does)."""
    admin = {**await api.admin(), "Content-Type": "application/json"}
    paths = (await api.client.get("/openapi.json")).json()["paths"]
    operations = [
        (method.upper(), re.sub(r"\{[^}]+\}", "x-1", path))
        for path, item in paths.items()
        for method, operation in item.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    ]
    assert len(operations) >= 10, operations
    for method, path in operations:
        refused = await api.client.request(method, path, content=b'{"a": 1, "a": 2}', headers=admin)
        assert refused.status_code == 422, (method, path, refused.text)
        assert (
            refused.json()["error"]["message"] == 'invalid request: body: duplicate key "a" in the JSON object at body'
        )


async def test_a_body_over_the_limit_is_refused_with_413_chunked_or_not_and_nothing_is_stored(api: Api) -> None:
    _, headers = await api.new_customer()
    headers = {**headers, "Content-Type": "application/json"}
    under = await api.client.post(
        "/v1/agents", content=in_chunks(padded(agent_body(name="under"), MAX_BODY_BYTES)), headers=headers
    )
    assert under.status_code == 201, under.text
    over = padded(agent_body(name="over"), MAX_BODY_BYTES + 1)
    for refused in (
        await api.client.post("/v1/agents", content=in_chunks(over), headers=headers),
        await api.client.post("/v1/agents", content=over, headers=headers),
    ):
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"]["code"] == "too_large"
    agents = (await api.client.get("/v1/agents", headers=headers)).json()
    assert [a["name"] for a in agents] == ["under"]


async def test_hostile_prompt_text_is_stored_as_data_and_never_reaches_the_job(api: Api) -> None:
    _, headers = await api.new_customer()
    text = 'Say "hi" ${NOMAD_TOKEN} {{ key "secret" }} [[ job_id ]]\nsecond line'
    created = await api.client.post("/v1/agents", json=agent_body(system_message=text), headers=headers)
    assert created.status_code == 201
    agent = created.json()
    assert agent["system_message"] == text
    job = (await api.client.get(f"/v1/agents/{agent['id']}/job", headers=headers)).text
    for fragment in ("NOMAD_TOKEN", "secret", "[[", "second line", "You help"):
        assert fragment not in job


async def test_bad_patch_leaves_the_agent_as_it_was(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = (await api.client.post("/v1/agents", json=agent_body(), headers=headers)).json()
    bodies = ({"resources": {"cpu": 0, "memory_mb": 1}}, {}, {"resources": {}}, {"name": "renamed"}, {"model": {}})
    for body in bodies:
        response = await api.client.patch(f"/v1/agents/{agent['id']}", json=body, headers=headers)
        assert response.status_code == 422, (body, response.text)
    after = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
    assert after["version"] == 1 and after["resources"] == agent["resources"]
    empty = await api.client.patch(f"/v1/agents/{agent['id']}", json={"resources": {}}, headers=headers)
    assert [d["field"] for d in empty.json()["error"]["details"]] == ["resources"], empty.text
    assert "nothing to update" in empty.json()["error"]["message"], empty.text


@pytest.mark.parametrize("field", ["system_message", "model", "tools", "resources", "replicas"])
async def test_a_patch_that_sends_null_gets_the_422_of_any_bad_field_and_changes_nothing(api: Api, field: str) -> None:
    _, headers = await api.new_customer()
    agent = (await api.client.post("/v1/agents", json=agent_body(), headers=headers)).json()
    response = await api.client.patch(f"/v1/agents/{agent['id']}", json={field: None}, headers=headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["message"].startswith(f"invalid request: {field}: "), error
    assert [d["field"] for d in error["details"]] == [field], error
    assert "pydantic" not in response.text and "may not be null" in error["message"]
    after = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
    assert {k: after[k] for k in DEFINITION} == {k: agent[k] for k in DEFINITION}
    # and the schema a client is generated from does not offer null either
    schema = (await api.client.get("/openapi.json")).json()
    body = schema["paths"]["/v1/agents/{agent_id}"]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    offered = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"][field]
    assert "null" not in json.dumps(offered) and "default" not in offered, offered


async def test_a_patch_cannot_point_a_model_into_the_platforms_network(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = (await api.client.post("/v1/agents", json=agent_body(), headers=headers)).json()
    inside = {"provider": "ollama", "name": "m", "base_url": "http://0x7f.1:4646/v1"}
    response = await api.client.patch(f"/v1/agents/{agent['id']}", json={"model": inside}, headers=headers)
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == ["model.base_url"]
    after = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
    assert {k: after[k] for k in DEFINITION} == {k: agent[k] for k in DEFINITION}


async def test_a_patch_of_some_resources_keeps_the_others(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await created_running(api, headers, resources={"cpu": 300, "memory_mb": 384})
    path = f"/v1/agents/{agent['id']}"
    patched = await api.client.patch(path, json={"resources": {"memory_mb": 512}}, headers=headers)
    assert patched.status_code == 200, patched.text
    assert patched.json()["resources"] == {"cpu": 300, "memory_mb": 512}
    assert (await api.client.get(path, headers=headers)).json()["resources"] == {"cpu": 300, "memory_mb": 512}
    job = (await api.client.get(f"{path}/job", headers=headers)).json()["Job"]
    assert job["TaskGroups"][0]["Tasks"][0]["Resources"] == {"CPU": 300, "MemoryMB": 512}
    usage = (await api.client.get("/v1/usage", headers=headers)).json()
    assert (usage["cpu"], usage["memory_mb"]) == (300, 512), usage


DEFINITION = ("version", "system_message", "model", "tools", "resources", "replicas")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"replicas": True}, "replicas"),
        ({"replicas": "2"}, "replicas"),
        ({"resources": {"cpu": "300"}}, "resources.cpu"),
        ({"resources": {"memory_mb": 512.0}}, "resources.memory_mb"),
        ({"model": {**REPLAY, "temperature": "0.5"}}, "model.temperature"),
        ({"model": {**REPLAY, "max_tokens": True}}, "model.max_tokens"),
        ({"model": {**REPLAY, "stream": 1}}, "model.stream"),
    ],
)
async def test_numbers_and_booleans_of_an_agent_must_be_json_numbers_and_booleans(
    api: Api, changes: dict[str, Any], field: str
) -> None:
    _, headers = await api.new_customer()
    created = await api.client.post("/v1/agents", json=agent_body(**changes), headers=headers)
    assert created.status_code == 422, created.text
    assert [d["field"] for d in created.json()["error"]["details"]] == [field], created.text
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []

    agent = (await api.client.post("/v1/agents", json=agent_body(), headers=headers)).json()
    patched = await api.client.patch(f"/v1/agents/{agent['id']}", json=changes, headers=headers)
    assert patched.status_code == 422, patched.text
    assert [d["field"] for d in patched.json()["error"]["details"]] == [field], patched.text
    after = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
    assert {k: after[k] for k in DEFINITION} == {k: agent[k] for k in DEFINITION}


async def test_a_temperature_may_be_a_json_integer(api: Api) -> None:
    _, headers = await api.new_customer()
    created = await api.client.post("/v1/agents", json=agent_body(model={**REPLAY, "temperature": 1}), headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["model"]["temperature"] == 1.0
    path = f"/v1/agents/{created.json()['id']}"
    patched = await api.client.patch(path, json={"model": {**REPLAY, "temperature": 2}}, headers=headers)
    assert patched.status_code == 200, patched.text
    assert (await api.client.get(path, headers=headers)).json()["model"]["temperature"] == 2.0


async def test_customers_never_see_each_others_agents(api: Api) -> None:
    _, alice = await api.new_customer("alice")
    _, bob = await api.new_customer("bob")
    agent = (await api.client.post("/v1/agents", json=agent_body(), headers=alice)).json()
    for method, path in [
        ("GET", f"/v1/agents/{agent['id']}"),
        ("GET", f"/v1/agents/{agent['id']}/job"),
        ("PATCH", f"/v1/agents/{agent['id']}"),
        ("POST", f"/v1/agents/{agent['id']}/stop"),
        ("POST", f"/v1/agents/{agent['id']}/start"),
        ("DELETE", f"/v1/agents/{agent['id']}"),
    ]:
        body = {"replicas": 2} if method == "PATCH" else None
        response = await api.client.request(method, path, headers=bob, json=body)
        assert response.status_code == 404, (method, path, response.text)
    assert (await api.client.get("/v1/agents", headers=bob)).json() == []
    assert (await api.client.get(f"/v1/agents/{agent['id']}", headers=alice)).json()["version"] == 1


async def test_a_stop_the_scheduler_cannot_carry_out_leaves_the_agent_as_it_was_and_says_why(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = await api.new_customer()
    agent = await created_running(api, headers)
    admin = await api.admin()

    async def unreachable(namespace: str, job_id: str) -> None:
        raise SchedulerError("stop job: no answer (connection refused)")

    async def foreign(namespace: str, job_id: str) -> None:
        raise JobNotOwned(f"job {job_id!r} is not owned by this Caravan")

    attempts = [
        (unreachable, "post", f"/v1/admin/agents/{agent['id']}/stop", admin, 503, "scheduler_unavailable"),
        (unreachable, "post", f"/v1/agents/{agent['id']}/stop", headers, 503, "scheduler_unavailable"),
        (unreachable, "delete", f"/v1/agents/{agent['id']}", headers, 503, "scheduler_unavailable"),
        (foreign, "post", f"/v1/agents/{agent['id']}/stop", headers, 409, "conflict"),
    ]
    for stop_job, method, path, who, status, code in attempts:
        monkeypatch.setattr(api.control.scheduler, "stop_job", stop_job)
        response = await api.client.request(method, path, headers=who)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and ("connection refused" in error["message"] or "not owned" in error["message"])
        current = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
        assert (current["desired"], current["status"]) == ("running", "running"), current
        used = (await api.client.get("/v1/usage", headers=headers)).json()
        assert (used["agents"], used["cpu"], used["memory_mb"]) == (1, 200, 256)

    monkeypatch.undo()  # the scheduler answers again: the same request does it all
    stopped = await api.client.post(f"/v1/admin/agents/{agent['id']}/stop", headers=admin)
    assert stopped.status_code == 200, stopped.text
    assert (stopped.json()["desired"], stopped.json()["status"]) == ("stopped", "stopped")
    used = (await api.client.get("/v1/usage", headers=headers)).json()
    assert (used["cpu"], used["memory_mb"]) == (0, 0)


async def test_a_creation_that_cannot_be_stored_leaves_nothing_behind(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = await api.new_customer()

    async def too_big(key: str, record: object) -> int:  # as a definition over the server's max_payload is
        raise nats.errors.MaxPayloadError

    monkeypatch.setattr(api.control.agents._repo, "create", too_big)
    response = await api.client.post("/v1/agents", json=agent_body(), headers=headers)
    assert response.status_code == 500, response.text
    consumers = await api.control.jet.js.consumers_info(TASKS_STREAM)
    assert [c.name for c in consumers if c.name.startswith("agent-")] == []  # no durable consumer left over
    used = (await api.client.get("/v1/usage", headers=headers)).json()
    assert (used["agents"], used["cpu"], used["memory_mb"]) == (0, 0, 0)
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    assert api.control.scheduler._jobs == {}  # type: ignore[attr-defined]

    monkeypatch.undo()
    assert (await api.client.post("/v1/agents", json=agent_body(), headers=headers)).status_code == 201


async def test_concurrent_patches_of_different_fields_both_take_effect(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = await api.new_customer()
    agent = await created_running(api, headers)
    # the first PATCH has read the agent and waits in its quota check until the second one has read it too
    first_waits = hold_first_call(
        monkeypatch, (api.control.quotas, "reserve_running"), until=(api.control.agents, "get")
    )
    path = f"/v1/agents/{agent['id']}"
    first = asyncio.create_task(api.client.patch(path, json={"system_message": "Be brief."}, headers=headers))
    await first_waits.wait()
    second = await api.client.patch(path, json={"tools": ["calculator"]}, headers=headers)
    assert second.status_code == 200 and (await first).status_code == 200, (second.text, first.result().text)
    after = (await api.client.get(path, headers=headers)).json()
    assert (after["system_message"], after["tools"], after["version"]) == ("Be brief.", ["calculator"], 3)


async def test_a_404_quotes_a_long_id_cut_and_its_length_said(api: Api) -> None:
    """A path's id may be anything up to the server's line limit: the answer quoted it whole (60 KB of 404)."""
    _, headers = await api.new_customer()
    long = "a" * 60_000
    asked = [
        (headers, f"/v1/agents/{long}"),
        (headers, f"/v1/tasks/{long}"),
        (headers, f"/v1/teams/{long}"),
        (await api.admin(), f"/v1/admin/customers/{long}"),
    ]
    for caller, path in asked:
        response = await api.client.get(path, headers=caller)
        message = response.json()["error"]["message"]
        assert response.status_code == 404, (path[:40], response.text[:200])
        assert f"'{'a' * 100}'... (60000 characters) not found" in message and len(response.content) < 1_000
    short = await api.client.get("/v1/agents/ag-\u202e0", headers=headers)  # as it was: quoted, escaped
    assert short.json()["error"]["message"] == "agent 'ag-\\u202e0' not found"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_refused_as_no_numbers_and_nothing_is_stored(api: Api, value: str) -> None:
    """No JSON, though Python's parser reads them: refused for what they are ("less than or equal to 2" was said of
    NaN, and a team's timeout of -Infinity was "greater than 0")."""
    _, headers = await api.new_customer()
    sent = {**headers, "content-type": "application/json"}
    model = json.dumps(REPLAY)[:-1] + f', "temperature": {value}}}'
    created = await api.client.post("/v1/agents", content=f'{{"name": "a", "model": {model}}}', headers=sent)
    assert created.status_code == 422, created.text
    assert created.json()["error"]["message"] == "invalid request: model.temperature: Input should be a finite number"
    agent = (await api.client.post("/v1/agents", json=agent_body(), headers=headers)).json()
    team = f'{{"name": "t", "members": ["{agent["id"]}"], "termination": {{"timeout_s": {value}}}}}'
    refused = await api.client.post("/v1/teams", content=team, headers=sent)
    assert refused.status_code == 422, refused.text
    assert (
        refused.json()["error"]["message"] == "invalid request: termination.timeout_s: Input should be a finite number"
    )
    assert [a["id"] for a in (await api.client.get("/v1/agents", headers=headers)).json()] == [agent["id"]]
    assert (await api.client.get("/v1/teams", headers=headers)).json() == []


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/agents", "GET, HEAD, POST"),
        ("PUT", "/v1/agents/ag-000000000000", "DELETE, GET, HEAD, PATCH"),
        ("DELETE", "/v1/admin/customers/cu-000000000000/quota", "PATCH, PUT"),
        ("GET", "/v1/auth/token", "POST"),
    ],
)
async def test_a_405_allows_every_method_the_path_is_served_for(api: Api, method: str, path: str, allowed: str) -> None:
    """Starlette named those of the first route that matched the path alone (``/v1/agents`` said ``POST``)."""
    refused = await api.client.request(method, path)
    assert refused.status_code == 405 and refused.json()["error"]["code"] == "method_not_allowed", refused.text
    assert refused.headers["allow"] == allowed


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/agents/", "/v1/agents/ag-000000000000//", "/v1/teams/"])
async def test_an_api_path_with_a_trailing_slash_is_a_404_naming_the_path_without_it(
    api: Api, method: str, path: str
) -> None:
    """Starlette redirected it (307) to the host the request's Host header named, before any login."""
    refused = await api.client.request(method, path, headers={"Host": "evil.example"})
    assert refused.status_code == 404, refused.text
    assert "location" not in refused.headers
    error = refused.json()["error"]
    assert error == {
        "code": "not_found",
        "message": f"no such path: {path} (without the trailing slash: {path.rstrip('/')})",
        "details": None,
    }


async def test_a_page_with_a_trailing_slash_redirects_to_its_path_on_the_same_host(api: Api) -> None:
    for path, served in (("/dashboard/", "/dashboard"), ("/docs/?x=1", "/docs?x=1")):
        redirected = await api.client.get(path, headers={"Host": "evil.example"})
        assert (redirected.status_code, redirected.headers["location"]) == (307, served)
    assert (await api.client.get("/nowhere/")).status_code == 404
