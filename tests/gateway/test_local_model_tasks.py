"""Tasks on the bundled local model, end to end: REST → agent process → OpenAI client → proxy → SmolLM2.

One local model server serves the whole session (the ``local_model`` fixture). SmolLM2-135M is small, so
these tests check the shape of what happens (text, usage, a tool call run by AutoGen, a stream of chunks),
never the wording.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest

from agent.runtime import NatsAgentRuntime
from control.cli import _demo_credentials, _demo_model
from control.localmodel import FairQueue, LocalModel, ModelProxy
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from tests.conftest import Api, make_settings, serve_api
from tests.control.test_cli import PROVIDER_KEYS
from tests.control.test_localmodel_proxy import FakeServer
from tests.gateway.teams_support import agents, script, start, task_status, team
from tests.gateway.test_agents_api import wait_status
from tests.gateway.test_tasks_api import finished, start_task
from tests.support.helpers import chat_completions_server, sse_events


async def _api_with_model(nats_server: EmbeddedNats, tmp_path: Path, model_url: str) -> AsyncIterator[Api]:
    settings = make_settings(nats_server.url, tmp_path / "data", local_model_url=model_url)
    async with ControlPlane(settings) as control, serve_api(control) as api:
        yield api


@pytest.fixture
async def local_api(nats_server: EmbeddedNats, tmp_path: Path, local_model: LocalModel) -> AsyncIterator[Api]:
    async for api in _api_with_model(nats_server, tmp_path, local_model.url):
        yield api


async def local_agent(api: Api, headers: dict[str, str], **model: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "smol",
        "system_message": "You are a helpful assistant.",
        "model": {"provider": "local", "temperature": 0, "max_tokens": 48, **model.pop("model", {})},
        **model,
    }
    response = await api.client.post("/v1/agents", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return await wait_status(api, headers, response.json()["id"], "running")


async def test_an_agent_answers_with_the_local_model(local_api: Api) -> None:
    _, headers = await local_api.new_customer()
    agent = await local_agent(local_api, headers)
    assert agent["model"]["name"] == "SmolLM2-135M-Instruct"
    task = await finished(local_api, headers, await start_task(local_api, headers, agent["id"], "Say hello."))
    assert task["status"] == "completed", task
    assert [(m["source"], m["type"]) for m in task["messages"]] == [("user", "TextMessage"), ("smol", "TextMessage")]
    assert isinstance(task["result"], str) and task["result"].strip()
    assert task["usage"]["prompt_tokens"] > 0 and task["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_the_local_model_calls_a_tool_that_autogen_runs(local_api: Api, stream: bool) -> None:
    _, headers = await local_api.new_customer()
    agent = await local_agent(
        local_api,
        headers,
        system_message="You are a helpful assistant. Use the calculator for arithmetic.",
        tools=["calculator"],
        model={"stream": stream},
    )
    task_id = await start_task(local_api, headers, agent["id"], "What is 6 times 7?")
    task = await finished(local_api, headers, task_id)
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    kinds = [(m["source"], m["type"]) for m in task["messages"]]
    assert kinds == [("user", "TextMessage"), ("smol", "tool_call"), ("smol", "tool_result"), ("smol", "TextMessage")]
    (call,) = task["messages"][1]["content"]
    (result,) = task["messages"][2]["content"]
    assert call["name"] == "calculator" and "expression" in call["arguments"]
    assert result["call_id"] == call["id"] and result["content"]  # run by AutoGen's tool machinery
    assert task["usage"]["completion_tokens"] > 0


async def test_a_streamed_answer_arrives_in_chunks(local_api: Api) -> None:
    _, headers = await local_api.new_customer()
    agent = await local_agent(local_api, headers, model={"stream": True})
    task_id = await start_task(local_api, headers, agent["id"], "Tell me about camels.")
    events = await sse_events(local_api.client, f"/v1/tasks/{task_id}/events", headers)
    chunks = [e["data"]["content"] for e in events if e["event"] == "chunk"]
    assert len(chunks) > 1
    (answer,) = [e["data"] for e in events if e["event"] == "message" and e["data"]["source"] == "smol"]
    assert "".join(chunks) == answer["content"]
    kinds = [(e["event"], e["data"]["source"]) for e in events]
    assert kinds.index(("chunk", "smol")) < kinds.index(("message", "smol"))  # the pieces come first
    task = await finished(local_api, headers, task_id)
    assert task["status"] == "completed" and task["usage"]["completion_tokens"] > 0  # counted by the proxy


async def test_a_request_that_waits_too_long_fails_the_task_with_a_clear_reason(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    nowhere = FakeServer(base_url="http://127.0.0.1:9")  # never reached: the one slot stays taken
    async with ModelProxy(nowhere, FairQueue(wait_timeout=0.5)) as proxy:
        await proxy.queue.acquire("someone-else")
        async for api in _api_with_model(nats_server, tmp_path, proxy.url):
            _, headers = await api.new_customer()
            agent = await local_agent(api, headers)
            task = await finished(api, headers, await start_task(api, headers, agent["id"], "Hi"))
            assert task["status"] == "failed"
            assert "local model is busy" in task["status_reason"] and "503" in task["status_reason"]
        proxy.queue.release()


async def test_concurrent_agents_are_all_answered(local_api: Api, local_model: LocalModel) -> None:
    _, headers = await local_api.new_customer()
    agents = [await local_agent(local_api, headers, name=f"smol{i}", model={"max_tokens": 16}) for i in range(3)]
    task_ids = [await start_task(local_api, headers, a["id"], "Name a color.") for a in agents]
    for task_id in task_ids:
        task = await finished(local_api, headers, task_id)
        assert task["status"] == "completed" and task["result"], task
    assert local_model.proxy is not None
    assert local_model.proxy.queue.busy == 0 and local_model.proxy.queue.waiting == 0


async def test_the_demo_team_answers_with_the_local_model(local_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    for env in PROVIDER_KEYS:
        monkeypatch.delenv(env, raising=False)
    control = local_api.control
    demo = _demo_model(control.settings)
    assert demo.model.provider == "local"
    creds = await _demo_credentials(control.settings, control, demo)
    headers = await local_api.token(creds["customer_api_key"])
    body = {"team_id": creds["demo_team_id"], "task": creds["demo_team_task"]}
    response = await local_api.client.post("/v1/tasks", json=body, headers=headers)
    assert response.status_code == 202, response.text
    task = await task_status(local_api, headers, response.json()["id"], within=180)
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    said = [(m["source"], m["type"], m["content"]) for m in task["messages"]]
    assert [(source, kind) for source, kind, _ in said] == [
        ("user", "TextMessage"), ("writer", "TextMessage"), ("critic", "TextMessage"), ("writer", "TextMessage")
    ]  # fmt: skip
    assert all(isinstance(text, str) and text.strip() for _, _, text in said[1:])  # the model's own words
    assert task["usage"]["completion_tokens"] > 0


async def _selector_team(api: Api, headers: dict[str, str], model: dict[str, Any]) -> dict[str, Any]:
    """A writer and a critic on scripted models, of three messages, whose next speaker ``model`` picks."""
    members = await agents(
        api,
        headers,
        {"writer": {"model": script("A line.", "Another line.")}, "critic": {"model": script("Good.", "Better.")}},
    )
    return await team(
        api,
        headers,
        members=[m["id"] for m in members.values()],
        mode="selector",
        selector={"model": model, "allow_repeated_speaker": True},
        termination={"max_messages": 3},
    )


async def test_a_selector_on_the_local_model_picks_speakers_under_caravan_up(
    local_api: Api, local_model: LocalModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The selector's model is called from the control plane, which `caravan up` tells the local model's address
    through its settings only (its own environment has no CARAVAN_LOCAL_MODEL_URL, unlike the agents')."""
    monkeypatch.delenv("CARAVAN_LOCAL_MODEL_URL", raising=False)
    assert local_model.proxy is not None
    callers: list[str] = []
    turn = local_model.proxy._turn

    async def counted(request: Any, client: str) -> bool:
        callers.append(client)
        return await turn(request, client)

    monkeypatch.setattr(local_model.proxy, "_turn", counted)  # the proxy's queue: whom it served
    _, headers = await local_api.new_customer()
    created = await _selector_team(local_api, headers, {"provider": "local", "temperature": 0, "max_tokens": 16})
    task = await task_status(local_api, headers, await start(local_api, headers, created["id"], "Write a line."))
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    speakers = [m["source"] for m in task["messages"]]
    assert speakers[0] == "user" and len(speakers) == 3 and set(speakers[1:]) <= {"writer", "critic"}
    assert callers and set(callers) == {f"selector-{created['id']}"}  # the members are scripted: only it asks


async def test_a_selector_teams_runs_call_its_model_on_one_connection(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane keeps a selector's model client for the team's next run: no ~20 ms of its event loop
    making a client, nor (to a hosted provider) a new connection with its TLS handshake, per task."""
    monkeypatch.delenv("CARAVAN_LOCAL_MODEL_URL", raising=False)
    async with chat_completions_server("writer") as (port, served):
        async for api in _api_with_model(nats_server, tmp_path, f"http://127.0.0.1:{port}/v1"):
            _, headers = await api.new_customer()
            created = await _selector_team(api, headers, {"provider": "local"})
            for _ in range(2):
                task = await task_status(api, headers, await start(api, headers, created["id"], "Write a line."))
                assert task["status"] == "completed", (task["status_reason"], task["messages"])
                assert [m["source"] for m in task["messages"]] == ["user", "writer", "writer"]  # as it chose
    assert served == [4]  # two choices a run, all four on one connection


async def test_a_team_run_that_fails_to_start_undoes_what_it_did(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose agent runtime fails as it starts (the connection lost as it subscribes) fails the task with the
    reason and leaves nothing behind on the control plane: no subscription of the run on its connection, its
    selector's client no longer counted in use (an idle one is closed once many teams' are kept). The next run
    goes on as usual."""
    monkeypatch.delenv("CARAVAN_LOCAL_MODEL_URL", raising=False)
    start_runtime = NatsAgentRuntime.start
    failures = [nats.errors.ConnectionClosedError()]

    async def starting(runtime: NatsAgentRuntime) -> None:
        await start_runtime(runtime)  # subscribed, then lost
        if failures:
            raise failures.pop()

    monkeypatch.setattr(NatsAgentRuntime, "start", starting)
    async with chat_completions_server("writer") as (port, _):
        async for api in _api_with_model(nats_server, tmp_path, f"http://127.0.0.1:{port}/v1"):
            _, headers = await api.new_customer()
            created = await _selector_team(api, headers, {"provider": "local"})
            for status in ("failed", "completed"):
                task = await task_status(api, headers, await start(api, headers, created["id"], "Write a line."))
                assert task["status"] == status, (task["status_reason"], task["messages"])
                if status == "failed":
                    assert "ConnectionClosedError" in task["status_reason"]
                subjects = [sub.subject for sub in api.control.jet.nc._subs.values()]
                assert not [s for s in subjects if s.startswith("caravan.rt.")], subjects
                assert [e.runs for e in api.control.team_runner._selectors._entries.values()] == [0]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_local_model_answers_under_the_name_it_is_asked_by(local_model: LocalModel, stream: bool) -> None:
    """A text answer and a tool call carry the model's name, not the server's file path: AgentChat's client warns
    ("Resolved model mismatch") when the answer names another model than it asked."""
    tool = {"type": "function", "function": {"name": "word_count", "parameters": {"type": "object"}}}
    asks = [
        {"messages": [{"role": "user", "content": "Say hi."}]},
        {"messages": [{"role": "user", "content": "Count words."}], "tools": [tool], "tool_choice": "required"},
    ]
    async with httpx.AsyncClient(timeout=60, headers={"X-Caravan-Agent": "naming-test"}) as client:
        for ask in asks:
            body = {"model": local_model.model_name, "max_tokens": 8, "stream": stream, **ask}
            answer = await client.post(f"{local_model.url}/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            if stream:
                chunks = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
                assert chunks and {c["model"] for c in chunks} == {local_model.model_name}, ask
            else:
                assert answer.json()["model"] == local_model.model_name, ask
