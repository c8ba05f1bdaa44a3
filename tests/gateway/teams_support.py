"""Helpers for team tests: agents on scripted models, teams through the API, and the same team in-process."""

from __future__ import annotations

import asyncio
from typing import Any

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult, TerminationCondition
from autogen_agentchat.conditions import (
    HandoffTermination,
    MaxMessageTermination,
    TextMentionTermination,
    TokenUsageTermination,
)
from autogen_agentchat.teams import BaseGroupChat, RoundRobinGroupChat, SelectorGroupChat, Swarm

from agent.models import create_model_client
from agent.protocol import ModelConfig
from agent.transcript import event_fields
from tests.conftest import Api
from tests.gateway.test_agents_api import wait_status
from tests.support.helpers import assert_eventually

TERMINAL = ("completed", "failed", "cancelled", "killed")


def script(*responses: Any, delay_ms: int = 0) -> dict[str, Any]:
    return {"provider": "replay", "name": "scripted", "responses": list(responses), "delay_ms": delay_ms}


async def agents(api: Api, headers: dict[str, str], specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Create agents {name: {"model": ..., ...}} at once and wait until all run; {name: agent}."""
    created = {}
    for name, spec in specs.items():
        body = {"name": name, "system_message": f"You are {name}.", **spec}
        response = await api.client.post("/v1/agents", json=body, headers=headers)
        assert response.status_code == 201, response.text
        created[name] = response.json()
    running = await asyncio.gather(*(wait_status(api, headers, a["id"], "running", 40) for a in created.values()))
    return dict(zip(created, running, strict=True))


async def team(api: Api, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await api.client.post("/v1/teams", json={"name": "team", **body}, headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def start(api: Api, headers: dict[str, str], team_id: str, text: str) -> str:
    response = await api.client.post("/v1/tasks", json={"team_id": team_id, "task": text}, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return str(response.json()["id"])


async def task_status(
    api: Api, headers: dict[str, str], task_id: str, statuses: tuple[str, ...] = TERMINAL, within: float = 60
) -> dict[str, Any]:
    response = await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
        lambda r: r.json()["status"] in statuses,
        within=within,
        what=f"task {statuses}",
    )
    return dict(response.json())


def _norm(content: Any) -> Any:
    """Tool call ids are random per run: compare calls and results without them."""
    if isinstance(content, list):
        return [{k: v for k, v in c.items() if k not in ("id", "call_id")} for c in content]
    return content


def api_transcript(task: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(m["source"], m["type"], _norm(m["content"])) for m in task["messages"] if m["type"] != "input_request"]


def local_transcript(items: list[Any]) -> list[tuple[Any, ...]]:
    out = []
    for item in items:
        for kind, fields in event_fields(item):
            if kind == "message":
                out.append((fields["source"], fields["data"]["type"], fields["content"]))
            elif kind in ("tool_call", "tool_result"):
                data = fields["data"].get("calls") or fields["data"].get("results")
                out.append((fields["source"], kind, _norm(data)))
    return out


def local_team(
    specs: dict[str, dict[str, Any]],
    mode: str,
    termination: TerminationCondition,
    handoffs: dict[str, list[str]] | None = None,
    selector_model: dict[str, Any] | None = None,
) -> BaseGroupChat:
    """The same team with AgentChat's own classes in this process."""
    members = [
        AssistantAgent(
            name,
            model_client=create_model_client(ModelConfig.model_validate(spec["model"])),
            system_message=f"You are {name}.",
            handoffs=list((handoffs or {}).get(name, [])) or None,
        )
        for name, spec in specs.items()
    ]
    if mode == "round_robin":
        return RoundRobinGroupChat(list(members), termination_condition=termination)
    if mode == "selector":
        assert selector_model is not None
        client = create_model_client(ModelConfig.model_validate(selector_model))
        return SelectorGroupChat(list(members), model_client=client, termination_condition=termination)
    return Swarm(list(members), termination_condition=termination)


async def run_local(chat: BaseGroupChat, task: Any) -> tuple[list[Any], str | None]:
    items: list[Any] = []
    result: TaskResult | None = None
    async for item in chat.run_stream(task=task):
        if isinstance(item, TaskResult):
            result = item
        else:
            items.append(item)
    assert result is not None
    return items, result.stop_reason


__all__ = [
    "HandoffTermination",
    "MaxMessageTermination",
    "TextMentionTermination",
    "TokenUsageTermination",
    "agent_ready",
    "agents",
    "api_transcript",
    "attempt_messages",
    "checkpointed_messages",
    "health",
    "local_team",
    "local_transcript",
    "local_usage",
    "ready_instances",
    "run_local",
    "running_event",
    "script",
    "start",
    "stop_reason",
    "task_status",
    "team",
]


async def stop_reason(api: Api, headers: dict[str, str], task_id: str) -> str | None:
    """The stop reason AgentChat gave, from the task's `result` event."""
    from tests.support.helpers import sse_events

    events = await sse_events(api.client, f"/v1/tasks/{task_id}/events", headers)
    results = [e["data"] for e in events if e["event"] == "result"]
    return results[-1]["data"]["stop_reason"] if results else None


async def running_event(api: Api, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    """The data of the task's last `running` status: run id and which replica hosts each member."""
    from tests.support.helpers import sse_events

    events = await sse_events(api.client, f"/v1/tasks/{task_id}/events", headers)
    running = [e["data"]["data"] for e in events if e["event"] == "status" and e["data"]["content"] == "running"]
    return dict(running[-1])


async def agent_ready(api: Api, customer_id: str, agent_id: str) -> dict[str, Any]:
    """The agent's last `ready` event (it carries its pid and health port), among its lifecycle events stored so
    far (the control plane's `status` events come after it)."""
    import json

    from agent.protocol import EVENTS_STREAM, agent_events_subject

    sub = await api.control.jet.js.subscribe(
        agent_events_subject(customer_id, agent_id), ordered_consumer=True, stream=EVENTS_STREAM
    )
    ready: dict[str, Any] = {}
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            if (event := json.loads(msg.data))["kind"] == "ready":
                ready = event
            if msg.metadata.num_pending == 0:
                return ready
    finally:
        await sub.unsubscribe()


async def health(port: int) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient() as client:
        return dict((await client.get(f"http://127.0.0.1:{port}/health")).json())


async def ready_instances(api: Api, customer_id: str, agent_id: str) -> set[str]:
    """Allocations of the agent that said `ready` (one per replica that came up)."""
    import json

    from agent.protocol import EVENTS_STREAM, agent_events_subject

    sub = await api.control.jet.js.subscribe(
        agent_events_subject(customer_id, agent_id), ordered_consumer=True, stream=EVENTS_STREAM
    )
    seen: set[str] = set()
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return seen
            event = json.loads(msg.data)
            if event["kind"] == "ready":
                seen.add(event["data"]["alloc_id"])
    finally:
        await sub.unsubscribe()


async def attempt_messages(
    api: Api, headers: dict[str, str], task_id: str, attempt: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(source, content) of the messages of one attempt: those it published again from its checkpoint, and
    those its run produced (after the `running` status that names the run)."""
    from tests.support.helpers import sse_events

    events = await sse_events(api.client, f"/v1/tasks/{task_id}/events", headers)
    replayed: list[tuple[str, str]] = []
    produced: list[tuple[str, str]] = []
    into = replayed
    for event in events:
        data = event["data"]
        if data["attempt"] != attempt:
            continue
        if event["event"] == "status" and data["content"] == "running" and "run_id" in data["data"]:
            into = produced
        elif event["event"] == "message":
            into.append((data["source"], data["content"]))
    return replayed, produced


async def checkpointed_messages(api: Api, customer_id: str, task_id: str) -> list[tuple[str, str]]:
    """(source, content) of the messages in the task's checkpoint in JetStream KV (none without one)."""
    from nats.js.errors import KeyNotFoundError

    from control.services.tasks import task_key
    from control.teams.models import Checkpoint

    try:
        entry = await api.control.jet.kv["team_state"].get(task_key(customer_id, task_id))
    except KeyNotFoundError:  # no checkpoint (yet, or any more)
        return []
    checkpoint = Checkpoint.model_validate_json(entry.value or b"{}")
    return [(e["source"], e["content"]) for e in checkpoint.transcript if e["kind"] == "message"]


def local_usage(items: list[Any]) -> dict[str, int]:
    """Token usage of an in-process run: the `replay` model counts the words of every prompt, so equal usage means
    the members' model contexts held the same messages."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for item in items:
        if getattr(item, "models_usage", None) is not None:
            usage["prompt_tokens"] += item.models_usage.prompt_tokens
            usage["completion_tokens"] += item.models_usage.completion_tokens
    return usage
