"""Tasks end to end: REST → work queue → agent process → AutoGen → events on NATS → SSE/WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import nats
import nats.js.errors
import pytest
import websockets
from nats.js.kv import KeyValue

from agent.backends.natskv import kv_entries, kv_keys
from agent.protocol import (
    EVENTS_STREAM,
    ID_PATTERN,
    TASKS_STREAM,
    Event,
    EventKind,
    TaskRequest,
    cancel_subject,
    consumer_name,
    task_events_subject,
    task_subject,
    utcnow,
)
from agent.worker import GIVEN_BACK
from control.models import Task, TaskMessage
from control.natsio import PACED_BATCH, Jet, connect
from control.platform import ControlPlane
from control.services.task_index import Indexed, created_us
from control.services.tasks import TRACKER, TaskService, task_key
from control.settings import Settings
from control.store import Repo
from tests.conftest import Api, serve_api
from tests.gateway.teams_support import TERMINAL, agent_ready, health, team
from tests.gateway.teams_support import start as start_on_team
from tests.gateway.test_agents_api import wait_status
from tests.support.helpers import (
    ManualClock,
    Stalling,
    assert_eventually,
    hold_first_call,
    named_reads,
    now,
    small_events,
    small_messages,
    sse_events,
    stored_events,
)

TOOL_SCRIPT = {
    "provider": "replay",
    "name": "scripted",
    "responses": [{"tool": "calculator", "arguments": {"expression": "(2 + 3) * 4"}}, "The result is 20."],
}


async def running_agent(api: Api, headers: dict[str, str], **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "calc", "model": TOOL_SCRIPT, "tools": ["calculator"]}
    body.update(changes)
    response = await api.client.post("/v1/agents", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return await wait_status(api, headers, response.json()["id"], "running")


async def start_task(api: Api, headers: dict[str, str], agent_id: str, text: str = "What is (2+3)*4?") -> str:
    response = await api.client.post("/v1/tasks", json={"agent_id": agent_id, "task": text}, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return str(response.json()["id"])


async def finished(api: Api, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    response = await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
        lambda r: r.json()["status"] in ("completed", "failed", "cancelled"),
        what="task finished",
    )
    return dict(response.json())


async def test_a_task_runs_end_to_end_with_a_tool_call(api: Api) -> None:
    _customer_id, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    task_id = await start_task(api, headers, agent["id"])
    task = await finished(api, headers, task_id)
    assert task["status"] == "completed", task
    assert task["result"] == "The result is 20."
    kinds = [(m["source"], m["type"]) for m in task["messages"]]
    assert kinds == [("user", "TextMessage"), ("calc", "tool_call"), ("calc", "tool_result"), ("calc", "TextMessage")]
    assert task["messages"][1]["content"][0]["name"] == "calculator"
    assert task["messages"][2]["content"][0]["content"] == "20"
    assert task["usage"]["completion_tokens"] > 0
    listed = (await api.client.get("/v1/tasks", headers=headers)).json()
    assert [t["id"] for t in listed] == [task_id]
    assert listed[0]["messages"] == task["messages"]


async def test_a_task_record_stays_small_and_the_newest_tasks_are_listed_with_their_transcripts(api: Api) -> None:
    """The transcript lives beside the record, one key per message: a record's size does not grow with its
    conversation, so listing the newest tasks reads small records, and the transcripts of those listed only."""
    customer_id, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    ids = [await start_task(api, headers, agent["id"], f"What is (2+3)*4? ({n})") for n in range(3)]
    tasks = [await finished(api, headers, task_id) for task_id in ids]
    records = Repo(api.control.jet.kv["tasks"], Task)
    for task in tasks:
        assert len(task["messages"]) == 4 and task["messages"][0]["content"] == task["task"]
        record = await records.get(task_key(customer_id, task["id"]))
        assert record is not None and record.messages == []
    newest = (await api.client.get("/v1/tasks?limit=2", headers=headers)).json()
    assert [t["id"] for t in newest] == ids[:0:-1]
    assert [t["messages"] for t in newest] == [tasks[2]["messages"], tasks[1]["messages"]]
    older = (await api.client.get(f"/v1/tasks?limit=2&before={ids[1]}", headers=headers)).json()
    assert [t["id"] for t in older] == ids[:1] and older[0]["messages"] == tasks[0]["messages"]
    assert (await api.client.get(f"/v1/tasks?before={ids[0]}", headers=headers)).json() == []

    _, stranger = await api.new_customer("stranger")  # another customer's task names no page of theirs
    assert (await api.client.get(f"/v1/tasks?before={ids[1]}", headers=stranger)).status_code == 404
    for hostile in ("tk-000000000000", "../" + ids[1], "x" * 65):
        response = await api.client.get("/v1/tasks", params={"before": hostile}, headers=headers)
        assert response.status_code in (404, 422) and "error" in response.json(), hostile


async def listed(api: Api, headers: dict[str, str], **params: Any) -> list[str]:
    """The ids ``GET /v1/tasks`` lists with ``params``, newest first."""
    response = await api.client.get("/v1/tasks", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()]


async def test_one_agents_tasks_are_listed_by_status_a_page_at_a_time_and_no_other_customer_sees_them(
    api: Api,
) -> None:
    _, headers = await api.new_customer()
    first = await running_agent(api, headers, name="first", model=SLOW, tools=[])
    second = await running_agent(api, headers, name="second", model=SLOW, tools=[])
    # interleaved, so that a page of one agent's tasks has the other's between them
    a1, b1, a2, b2, a3 = [
        await start_task(api, headers, agent["id"], text)
        for agent, text in [(first, "a1"), (second, "b1"), (first, "a2"), (second, "b2"), (first, "a3")]
    ]
    for task_id in (a2, b1):
        assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
        assert (await finished(api, headers, task_id))["status"] == "cancelled"
    await assert_eventually(
        lambda: listed(api, headers, status="running"), lambda ids: set(ids) == {a1, b2, a3}, what="three running"
    )

    assert await listed(api, headers, agent_id=first["id"]) == [a3, a2, a1]
    assert await listed(api, headers, agent_id=second["id"]) == [b2, b1]
    assert await listed(api, headers, agent_id=first["id"], status="running") == [a3, a1]
    assert await listed(api, headers, agent_id=first["id"], status="cancelled") == [a2]
    assert await listed(api, headers, agent_id=second["id"], status="completed") == []
    # a page is filled with the agent's tasks, and the next one starts after its last
    assert await listed(api, headers, agent_id=first["id"], limit=2) == [a3, a2]
    assert await listed(api, headers, agent_id=first["id"], limit=2, before=a2) == [a1]
    assert await listed(api, headers, agent_id=first["id"], status="running", limit=1) == [a3]
    assert await listed(api, headers, agent_id=first["id"], status="running", limit=1, before=a3) == [a1]
    assert await listed(api, headers, agent_id=first["id"], status="running", before=a1) == []
    assert await listed(api, headers, agent_id=second["id"], before=a3) == [b2, b1]  # any task of theirs marks a page
    assert await listed(api, headers, agent_id="ag-000000000000") == []  # no such agent: nothing, as for a stranger

    _, stranger = await api.new_customer("stranger")  # another customer's agent: none of its tasks, nor a 404
    assert await listed(api, stranger, agent_id=first["id"]) == []
    assert await listed(api, stranger, agent_id=first["id"], status="running") == []
    admin = await api.admin()
    assert await listed(api, admin, agent_id=first["id"]) == [a3, a2, a1]


async def test_one_teams_tasks_are_listed_not_its_members_own_nor_another_teams(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers, model=SLOW, tools=[])
    crew = await team(api, headers, members=[agent["id"]], termination={"max_messages": 2})
    other = await team(api, headers, name="other", members=[agent["id"]], termination={"max_messages": 2})
    t1 = await start_on_team(api, headers, crew["id"], "t1")
    own = await start_task(api, headers, agent["id"], "its own")
    elsewhere = await start_on_team(api, headers, other["id"], "elsewhere")
    t2 = await start_on_team(api, headers, crew["id"], "t2")

    assert await listed(api, headers, team_id=crew["id"]) == [t2, t1]
    assert await listed(api, headers, team_id=other["id"]) == [elsewhere]
    assert await listed(api, headers, agent_id=agent["id"]) == [own]  # its teams' tasks are the teams'
    assert await listed(api, headers, team_id=crew["id"], limit=1) == [t2]
    assert await listed(api, headers, team_id=crew["id"], limit=1, before=t2) == [t1]
    assert await listed(api, headers, team_id=crew["id"], before=t1) == []
    assert await listed(api, headers, team_id=crew["id"], status="completed") == []
    _, stranger = await api.new_customer("stranger")
    assert await listed(api, stranger, team_id=crew["id"]) == []


async def test_a_malformed_agent_or_team_id_or_both_at_once_is_refused_422(api: Api) -> None:
    _, headers = await api.new_customer()
    for name in ("agent_id", "team_id"):
        for bad in ("", "ag-123", "AG-000000000000", "ag-00000000000g", "*", ">", "../tk-000000000000", "x" * 65):
            response = await api.client.get("/v1/tasks", params={name: bad}, headers=headers)
            assert response.status_code == 422, (name, bad, response.text)
            (detail,) = response.json()["error"]["details"]
            assert (detail["field"], detail["type"]) == (name, "string_pattern_mismatch"), (name, bad, detail)
    both = await api.client.get(
        "/v1/tasks", params={"agent_id": "ag-000000000000", "team_id": "tm-000000000000"}, headers=headers
    )
    assert both.status_code == 422, both.text
    assert both.json()["error"]["message"] == "?agent_id= and ?team_id= exclude each other: give one of them"
    # the schema clients are made from says so too
    operation = (await api.client.get("/openapi.json")).json()["paths"]["/v1/tasks"]["get"]
    documented = {p["name"]: p for p in operation["parameters"]}
    for name in ("agent_id", "team_id"):
        assert documented[name]["in"] == "query" and not documented[name]["required"]
        assert documented[name]["description"] and ID_PATTERN in json.dumps(documented[name]["schema"]), name


async def test_a_record_that_holds_its_own_transcript_is_read_as_it_is_and_goes_on(api: Api) -> None:
    """A task record written before transcripts had their own bucket keeps its messages in the record; the
    messages that come after (a task in flight across the upgrade) follow them."""
    customer_id, headers = await api.new_customer()
    message = TaskMessage(source="user", type="TextMessage", content="hello", at=utcnow())
    old = Task(id="tk-0123456789ab", customer_id=customer_id, agent_id=None, task="hello", messages=[message])
    await Repo(api.control.jet.kv["tasks"], Task).create(task_key(customer_id, old.id), old)
    task = (await api.client.get(f"/v1/tasks/{old.id}", headers=headers)).json()
    assert [(m["source"], m["content"]) for m in task["messages"]] == [("user", "hello")]
    reply = Event(kind=EventKind.MESSAGE, task_id=old.id, customer_id=customer_id, source="calc", content="world")
    await api.control.tasks.publish(reply)
    await tracker_caught_up(api)
    task = (await api.client.get(f"/v1/tasks/{old.id}", headers=headers)).json()
    assert [(m["source"], m["content"]) for m in task["messages"]] == [("user", "hello"), ("calc", "world")]


async def test_a_message_the_transcript_cannot_hold_does_not_hold_up_the_record(api: Api) -> None:
    """A message too big to store in the transcript is left out of it (it stays in the event stream); the
    events that came with it still reach the record."""
    customer_id, headers, task_id = await running_slow_task(api)
    await tracker_caught_up(api)
    event = functools.partial(task_event, customer_id, task_id)
    await publish_while_away(
        api,
        event(EventKind.MESSAGE, "x" * 8000, type="TextMessage"),
        event(EventKind.MESSAGE, "small", type="TextMessage"),
        event(EventKind.USAGE, prompt_tokens=2, completion_tokens=1),
    )
    async with small_messages(api.control.settings.nats_url, "KV_caravan_transcripts", 4096):
        await restart_tracker(api)
        await tracker_caught_up(api)
    task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    # (the agent's own first message may be stored after these: it stores its events while it goes on)
    assert [m["content"] for m in task["messages"] if m["source"] == "tester"] == ["small"]
    assert task["usage"] == {"prompt_tokens": 2, "completion_tokens": 1}
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    assert (await finished(api, headers, task_id))["status"] == "cancelled"


async def test_events_of_a_task_that_does_not_exist_leave_nothing_behind(api: Api) -> None:
    """An agent that publishes messages for a task id its customer never had (a bug, or a hostile agent) does
    not fill the store: the tracker keeps nothing of them."""
    customer_id, _ = await api.new_customer()
    ghost = Event(kind=EventKind.MESSAGE, task_id="tk-00000000dead", customer_id=customer_id, content="boo")
    await api.control.tasks.publish(ghost)
    await tracker_caught_up(api)
    assert await kv_entries(api.control.jet.kv["transcripts"], f"{customer_id}.>") == []
    assert await Repo(api.control.jet.kv["tasks"], Task).get(task_key(customer_id, "tk-00000000dead")) is None


async def test_events_are_published_on_nats_for_external_subscribers(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    nc = await nats.connect(api.control.settings.nats_url)
    seen: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        seen.append(json.loads(msg.data))

    sub = await nc.subscribe("caravan.events.>", cb=collect)
    try:
        task_id = await start_task(api, headers, agent["id"])
        await finished(api, headers, task_id)
        await assert_eventually(
            now(lambda: seen), lambda s: any(e.get("content") == "completed" for e in s), what="completed on NATS"
        )
    finally:
        await sub.unsubscribe()
        await nc.close()
    mine = [e for e in seen if e.get("task_id") == task_id]
    assert {e["kind"] for e in mine} >= {"status", "message", "tool_call", "tool_result", "usage", "result"}
    assert all(e["customer_id"] == customer_id for e in mine)


async def test_sse_resumes_after_a_disconnect_with_no_gap_and_no_duplicate(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    task_id = await start_task(api, headers, agent["id"])
    url = f"/v1/tasks/{task_id}/events"
    first = await sse_events(api.client, url, headers, limit=3)
    assert [e["data"]["content"] for e in first[:2]] == ["queued", "running"]
    resumed = await sse_events(api.client, url, {**headers, "Last-Event-ID": first[-1]["id"]})
    whole = await sse_events(api.client, url, headers)
    ids = [e["id"] for e in first + resumed]
    assert ids == [e["id"] for e in whole]  # the same event has the same id on every stream of it
    assert len(set(ids)) == len(ids)
    assert whole[-1]["event"] == "status" and whole[-1]["data"]["content"] == "completed"
    via_query = await sse_events(api.client, f"{url}?after={first[0]['id']}", headers)
    assert [e["id"] for e in via_query] == [e["id"] for e in whole[1:]]


async def test_an_event_source_opened_with_after_resumes_where_it_was_when_it_reconnects(api: Api) -> None:
    """An `EventSource` reconnects to the URL it was opened with, ``?after=`` and all, sending the last id it saw as
    `Last-Event-ID`: the stream resumes after the later of the two, rather than replay from ``?after=`` what the
    client had already (duplicates on the customer's page), whichever of them is the later."""
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    task_id = await start_task(api, headers, agent["id"])
    url = f"/v1/tasks/{task_id}/events"
    whole = await sse_events(api.client, url, headers)
    assert len(whole) >= 5 and whole[-1]["data"]["content"] == "completed"
    opened_at, seen_up_to = whole[0]["id"], whole[-3]["id"]
    reconnected = await sse_events(api.client, f"{url}?after={opened_at}", {**headers, "Last-Event-ID": seen_up_to})
    assert [e["id"] for e in reconnected] == [e["id"] for e in whole[-2:]]
    older_header = await sse_events(api.client, f"{url}?after={seen_up_to}", {**headers, "Last-Event-ID": opened_at})
    assert [e["id"] for e in older_header] == [e["id"] for e in whole[-2:]]
    # it saw the final status: told at once there is no more (an EventSource stops at a 204)
    again = await api.client.get(f"{url}?after={opened_at}", headers={**headers, "Last-Event-ID": whole[-1]["id"]})
    assert (again.status_code, again.content) == (204, b"")


async def test_a_client_that_saw_a_finished_tasks_whole_stream_is_told_at_once_there_is_no_more(api: Api) -> None:
    """An EventSource reconnects whenever a stream closes, with the last id it saw: for a task that ended, the SSE
    route answers 204 (which stops it) instead of holding an empty stream open; the WebSocket closes at once."""
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    task_id = await start_task(api, headers, agent["id"])
    url = f"/v1/tasks/{task_id}/events"
    whole = await sse_events(api.client, url, headers)
    assert whole[-1]["data"]["content"] == "completed"
    again = await api.client.get(url, headers={**headers, "Last-Event-ID": whole[-1]["id"]}, timeout=5)
    assert (again.status_code, again.content) == (204, b"")
    again = await api.client.get(url, params={"after": whole[-1]["id"]}, headers=headers, timeout=5)
    assert (again.status_code, again.content) == (204, b"")
    before_the_end = await api.client.get(url, headers={**headers, "Last-Event-ID": whole[-2]["id"]}, timeout=5)
    assert before_the_end.status_code == 200 and f"id: {whole[-1]['id']}" in before_the_end.text
    token = headers["Authorization"].split()[1]
    ws_url = api.base.replace("http", "ws") + f"/v1/tasks/{task_id}/ws?token={token}&after={whole[-1]['id']}"
    async with asyncio.timeout(5), websockets.connect(ws_url) as ws:  # at once: not after the 15 s idle wait
        assert [frame async for frame in ws] == []
        assert ws.close_code == 1000


async def test_a_client_that_saw_the_final_status_is_told_there_is_no_more_though_the_run_spoke_after_it(
    api: Api,
) -> None:
    """A run that went on after its task ended (cancelled, it answered all the same) publishes its last words after
    the final status: a stream ends with that status, and a client that reconnects after it (an `EventSource` does,
    whenever a stream closes) is answered 204 at once, the WebSocket closed at once, rather than given the words
    after the end (which the transcript leaves out) and held open until the idle check."""
    customer_id, headers, task_id = await running_slow_task(api)
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    assert (await finished(api, headers, task_id))["status"] == "cancelled"
    late = functools.partial(task_event, customer_id, task_id)
    await api.control.tasks.publish(late(EventKind.MESSAGE, "too late"))
    await api.control.tasks.publish(late(EventKind.RESULT, "too late"))
    url = f"/v1/tasks/{task_id}/events"
    whole = await sse_events(api.client, url, headers)
    assert [e["event"] for e in whole][-1:] == ["status"] and whole[-1]["data"]["content"] == "cancelled"
    assert all(e["data"]["content"] != "too late" for e in whole)

    async with api.client.stream("GET", url, headers={**headers, "Last-Event-ID": whole[-1]["id"]}) as again:
        assert again.status_code == 204  # (a stream that opened would say 200 here, the late words to come)
        assert await again.aread() == b""
    token = headers["Authorization"].split()[1]
    ws_url = api.base.replace("http", "ws") + f"/v1/tasks/{task_id}/ws?token={token}&after={whole[-1]['id']}"
    async with asyncio.timeout(5), websockets.connect(ws_url) as ws:  # at once: not after the 15 s idle wait
        with pytest.raises(websockets.ConnectionClosedOK):  # no frame (a late word would be one)
            await ws.recv()
        assert ws.close_code == 1000
    before_the_end = await sse_events(api.client, url, {**headers, "Last-Event-ID": whole[-2]["id"]})
    assert before_the_end == whole[-1:]


async def test_an_event_id_resumes_its_own_tasks_stream_only_and_after_a_restart(settings: Settings) -> None:
    """Event ids are the platform's secret's work (no customer reads another's event count from them): one of
    another task is refused, not taken for a place in this one; and the secret stays the platform's, so an id
    resumes its stream on a control plane started since (as on another replica)."""
    async with ControlPlane(settings) as control, serve_api(control) as api:
        _, headers = await api.new_customer()
        agent = await running_agent(api, headers)
        first, second = [await start_task(api, headers, agent["id"], f"What is {n}*7?") for n in (6, 7)]
        whole = await sse_events(api.client, f"/v1/tasks/{first}/events", headers)
        assert whole[-1]["data"]["content"] == "completed"
        url = f"/v1/tasks/{second}/events"
        for refused in (
            await api.client.get(url, headers={**headers, "Last-Event-ID": whole[0]["id"]}),
            await api.client.get(url, params={"after": whole[0]["id"]}, headers=headers),
        ):
            assert refused.status_code == 422, refused.text
            assert "must be the id of an event of this task" in refused.json()["error"]["message"]
    async with ControlPlane(settings) as control, serve_api(control) as api:
        rest = await sse_events(api.client, f"/v1/tasks/{first}/events", {**headers, "Last-Event-ID": whole[-3]["id"]})
        assert rest == whole[-2:]


async def test_the_websocket_carries_the_same_stream_and_resumes(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    task_id = await start_task(api, headers, agent["id"])
    whole = await sse_events(api.client, f"/v1/tasks/{task_id}/events", headers)
    token = headers["Authorization"].split()[1]
    ws_url = api.base.replace("http", "ws") + f"/v1/tasks/{task_id}/ws"
    async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        frames = [json.loads(f) async for f in ws]
    assert [f["id"] for f in frames] == [e["id"] for e in whole]
    async with websockets.connect(f"{ws_url}?token={token}&after={frames[2]['id']}") as ws:
        rest = [json.loads(f) async for f in ws]
    assert [f["id"] for f in rest] == [f["id"] for f in frames[3:]]


async def assert_ws_refused(url: str, status: int, code: str) -> str:
    """The WebSocket handshake itself is refused (a stream that opened and then closed would not do), as an HTTP
    route would answer: ``status``, with the error body; its message is returned."""
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with websockets.connect(url):
            pass
    response = refused.value.response
    assert response.status_code == status, response.body
    error = json.loads(response.body)["error"]
    assert error["code"] == code
    return str(error["message"])


async def test_a_websocket_to_a_path_with_none_is_not_found(api: Api) -> None:
    _, headers = await api.new_customer()
    token = headers["Authorization"].split()[1]
    base = api.base.replace("http", "ws")
    for path in ("/v1/tasks/tk-000000000000/events", "/v1/nowhere", "/", "/v1/tasks/tk-000000000000/ws/more"):
        await assert_ws_refused(f"{base}{path}?token={token}", 404, "not_found")


async def test_bad_resume_points_and_tokens_are_refused(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    task_id = await start_task(api, headers, agent["id"])
    for last in (b"abc", b"-1", b"\xb2", b"1\xb3\xb9", str(2**63).encode(), b"0" * 32):  # Latin-1 superscripts
        bad = await api.client.get(f"/v1/tasks/{task_id}/events", headers={**headers, "Last-Event-ID": last})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid", (last, bad.text)
    ws_url = api.base.replace("http", "ws") + f"/v1/tasks/{task_id}/ws"
    await assert_ws_refused(f"{ws_url}?token=forged", 401, "unauthorized")
    token = headers["Authorization"].split()[1]
    for after in ("-1", "abc", str(2**63), "0" * 32, "A" * 32):  # no id, or one the platform did not make
        sse = await api.client.get(f"/v1/tasks/{task_id}/events", params={"after": after}, headers=headers)
        assert sse.status_code == 422 and sse.json()["error"]["code"] == "invalid", sse.text
        await assert_ws_refused(f"{ws_url}?token={token}&after={after}", 422, "invalid")
    # a typo of ?after= replayed the whole stream; the token is looked at first, as for every refusal
    await assert_ws_refused(f"{ws_url}?token={token}&afer=1000000", 422, "invalid")
    await assert_ws_refused(f"{ws_url}?token=forged&afer=1000000", 401, "unauthorized")
    # two resume points: the last one counted, said nowhere
    await assert_ws_refused(f"{ws_url}?token={token}&after=0&after=1000000", 422, "invalid")
    sse = await api.client.get(f"/v1/tasks/{task_id}/events", params=[("after", "0"), ("after", "9")], headers=headers)
    assert sse.status_code == 422 and "after: given 2 times" in sse.json()["error"]["message"], sse.text


async def running_slow_task(api: Api) -> tuple[str, dict[str, str], str]:
    """A task whose model call takes a minute, once it runs and its record holds the task's message (the agent
    says `running` before it says the task): (customer id, headers, task id)."""
    customer_id, headers = await api.new_customer()
    slow = {"provider": "replay", "name": "slow", "responses": ["too late"], "delay_ms": 60_000}
    agent = await running_agent(api, headers, model=slow, tools=[])
    task_id = await start_task(api, headers, agent["id"])
    await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
        lambda r: r.json()["status"] == "running" and bool(r.json()["messages"]),
    )
    return customer_id, headers, task_id


async def event_readers(api: Api, subject: str) -> int:
    """How many consumers of the events stream read ``subject`` (a task's events)."""
    return sum(c.config.filter_subject == subject for c in await api.control.jet.js.consumers_info(EVENTS_STREAM))


async def test_head_on_a_running_tasks_events_answers_the_streams_headers_and_opens_no_stream(api: Api) -> None:
    """A GET of a running task's events stays open for what comes next; a HEAD gets the stream's headers and ends
    there, without opening the stream: JetStream makes no consumer for it. JetStream announces each consumer it
    makes, in order; a GET after the HEAD is the barrier: once its consumer is announced, one made for the HEAD
    would have been announced before it."""
    customer_id, headers, task_id = await running_slow_task(api)
    url, subject, nc = f"/v1/tasks/{task_id}/events", task_events_subject(customer_id, task_id), api.control.jet.nc
    created: list[str] = []

    async def on_created(msg: nats.aio.msg.Msg) -> None:
        created.append(msg.subject)

    async def announced() -> int:
        return len(created)

    async def readers() -> int:
        return await event_readers(api, subject)

    async def open_stream() -> None:
        before = len(created)
        async with api.client.stream("GET", url, headers=headers) as streaming:
            assert streaming.status_code == 200
            await assert_eventually(readers, lambda n: n >= 1, what="the GET's consumer")
            await assert_eventually(announced, lambda n: n > before, what="the GET's consumer announced")
            assert await readers() == 1  # the GET's alone
        await assert_eventually(readers, lambda n: n == 0, what="the GET's consumer gone")

    advisories = await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{EVENTS_STREAM}.*", cb=on_created)
    try:
        await nc.flush()
        await open_stream()  # what a stream opened looks like
        opened = len(created)
        async with asyncio.timeout(10):  # not the minute the model call takes
            head = await api.client.head(url, headers=headers)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"].startswith("text/event-stream")
        assert head.headers["cache-control"] == "no-cache"
        await open_stream()
        assert created[opened:] == created[-1:], created[opened:]  # the second GET's alone
    finally:
        await advisories.unsubscribe()
    assert (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()["status"] == "running"


async def test_a_stream_of_events_deletes_its_jetstream_consumer_as_it_ends_however_it_ends(api: Api) -> None:
    """Each stream of a task's events (SSE or WebSocket) reads through a consumer of its own, gone as the stream ends:
    left to JetStream, one nobody reads stays 5 s more, fed the task's events and counted against the stream's
    consumers, for each stream a client closed (and an `EventSource` reconnects whenever one closes)."""
    customer_id, headers, task_id = await running_slow_task(api)
    task, subject = await api.control.tasks.get(customer_id, task_id), task_events_subject(customer_id, task_id)

    left = api.control.tasks.events(task)  # the client leaves mid-stream
    assert (await anext(left)) is not None
    assert await event_readers(api, subject) == 1
    await left.aclose()
    assert await event_readers(api, subject) == 0

    read_through = api.control.tasks.events(task)  # the stream ends with the task
    assert (await anext(read_through)) is not None
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    items = [item async for item in read_through if item is not None]
    assert items[-1].terminal and items[-1].event.content == "cancelled"
    assert await event_readers(api, subject) == 0


async def test_a_stream_whose_client_stops_reading_is_given_a_batch_of_events_at_most_and_goes_on_whole(
    api: Api,
) -> None:
    """A stream reads its task's events from JetStream at its client's pace: one whose client reads nothing (the
    route waits to send) is given no more than a batch, however many the task has. Through an ordered push
    consumer, JetStream fed it every event while nothing was read, held in the gateway's memory (once for each
    such stream a customer opened). Read on, the stream goes on with no gap, even from a consumer JetStream
    dropped meanwhile (as it drops one unused for a while)."""
    customer_id, _, task_id = await running_slow_task(api)
    task, subject = await api.control.tasks.get(customer_id, task_id), task_events_subject(customer_id, task_id)
    late = functools.partial(task_event, customer_id, task_id)
    for n in range(300):
        await api.control.tasks.publish(late(EventKind.MESSAGE, f"{n} " + "x" * 20_000))  # 6 MB of events

    stream = api.control.tasks.events(task, idle=1)
    seen = [await anext(stream) for _ in range(5)]  # ... and then nothing is read
    js = api.control.jet.js
    [consumer] = [c for c in await js.consumers_info(EVENTS_STREAM) if c.config.filter_subject == subject]
    assert consumer.delivered.consumer_seq <= 1 + PACED_BATCH, consumer.delivered

    await js.delete_consumer(EVENTS_STREAM, consumer.name)
    while (item := await anext(stream)) is None or item.event.content != "299 " + "x" * 20_000:
        seen.append(item)
    seen.append(item)
    await stream.aclose()
    said = [item.event.content.split()[0] for item in seen if item is not None and item.event.source == "tester"]
    assert said == [str(n) for n in range(300)]
    assert await event_readers(api, subject) == 0


async def test_cancel_stops_a_slow_model_call(api: Api) -> None:
    _, headers, task_id = await running_slow_task(api)
    before = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    response = await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)
    assert response.status_code == 202
    assert response.json()["messages"] == before["messages"]  # the task as the cancel found it: its transcript too
    task = await finished(api, headers, task_id)
    assert task["status"] == "cancelled" and task["result"] is None
    again = await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)
    assert again.status_code == 409


async def test_a_running_task_ends_cancelled_when_its_agent_stops_the_run_and_holds_its_slot_until_then(
    api: Api,
) -> None:
    """The agent that runs a task hears its cancel and stops the run, which says `cancelled` as its last word:
    until then the task is not `cancelled`, and its quota slot is not given to another task."""
    from tests.gateway.test_quotas import set_quota  # (which imports this module)

    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, max_concurrent_tasks=1)
    agent, ready, task_id = await running_on_slow_agent(api, customer_id, headers)
    os.kill(ready["pid"], signal.SIGSTOP)  # the agent holds the run, but cannot stop it yet
    try:
        assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
        assert (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()["status"] == "running"
        more = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "more"}, headers=headers)
        assert more.status_code == 409 and "concurrent task" in more.json()["error"]["message"]
    finally:
        os.kill(ready["pid"], signal.SIGCONT)
    task = await finished(api, headers, task_id)
    assert (task["status"], task["result"]) == ("cancelled", None)
    await assert_eventually(lambda: health(ready["health_port"]), lambda h: h["running_tasks"] == 0, what="run over")
    last = (await stored_events(api.control.jet.js, customer_id, task_id))[-1]
    assert (last.kind, last.content, last.agent_id) == ("status", "cancelled", agent["id"])  # the run's own last word
    await assert_eventually(lambda: usage(api, headers), lambda u: u["concurrent_tasks"] == 0, what="slot back")
    assert (await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "x"}, headers=headers)).is_success


async def test_a_cancel_the_agent_never_carries_out_is_told_again_then_ends_the_task_at_the_deadline(
    settings: Settings,
) -> None:
    """An agent that cannot stop a cancelled run (hung: here stopped by SIGSTOP) is told again, and at the
    deadline the task ends `cancelled` all the same, saying so, and gives back its quota slot; what the agent
    says once it wakes changes nothing, and its own ending of the run is not stored as a second one."""
    from tests.gateway.test_quotas import set_quota  # (which imports this module)

    async with (
        ControlPlane(settings.model_copy(update={"task_cancel_deadline_s": 1.5})) as control,
        serve_api(control) as api,
    ):
        customer_id, headers = await api.new_customer()
        await set_quota(api, customer_id, max_concurrent_tasks=1)
        agent, ready, task_id = await running_on_slow_agent(api, customer_id, headers)
        told: list[bytes] = []
        listener = await nats.connect(settings.nats_url)

        async def heard(msg: nats.aio.msg.Msg) -> None:
            told.append(msg.data)

        await listener.subscribe(cancel_subject(customer_id, agent["id"]), cb=heard)
        await listener.flush()
        os.kill(ready["pid"], signal.SIGSTOP)  # hung: it cannot stop the run
        try:
            assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
            task = await finished(api, headers, task_id)
            assert task["status"] == "cancelled"
            assert task["status_reason"] == "cancelled on request (its agent did not stop it within 1.5 s)"
            assert told.count(task_id.encode()) >= 2  # told when cancelled, and again while it did not stop
            assert (await usage(api, headers))["concurrent_tasks"] == 0
            other = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "x"}, headers=headers)
            assert other.status_code == 202, other.text  # the slot is free
        finally:
            os.kill(ready["pid"], signal.SIGCONT)
        queued_at = (await control.tasks.get(customer_id, task_id, transcript=False)).queue_seq
        assert queued_at is not None
        await assert_eventually(  # the agent woke, heard the cancel and ended the run: it took its request off
            lambda: control.jet.js.consumer_info(TASKS_STREAM, consumer_name(agent["id"])),
            lambda info: (info.ack_floor.stream_seq or 0) >= queued_at,
            what="the agent's run of it over",
        )
        stored = await stored_events(control.jet.js, customer_id, task_id)
        assert [(e.agent_id, e.content) for e in stored if e.kind == "status" and e.content in TERMINAL] == [
            (None, "cancelled")
        ]
        await tracker_caught_up(api)
        task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
        assert (task["status"], task["status_reason"]) == (
            "cancelled",
            "cancelled on request (its agent did not stop it within 1.5 s)",
        )
        await listener.close()


async def test_a_cancel_a_stopped_control_plane_left_unfinished_is_seen_through_by_the_next(
    settings: Settings,
) -> None:
    first = settings.model_copy(update={"agent_kill_timeout_s": 0.5})
    async with ControlPlane(first) as control, serve_api(control) as api:
        customer_id, headers = await api.new_customer()
        _, ready, task_id = await running_on_slow_agent(api, customer_id, headers)
        os.kill(ready["pid"], signal.SIGSTOP)  # it cannot stop the run before this control plane stops
        assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    # stopped with the task still running (its agent killed with it, unheard): the next control plane takes it up
    async with (
        ControlPlane(settings.model_copy(update={"task_cancel_deadline_s": 1.5})) as control,
        serve_api(control) as api,
    ):
        task = await finished(api, headers, task_id)
        assert (task["status"], task["status_reason"]) == (
            "cancelled",
            "cancelled on request (its agent did not stop it within 1.5 s)",
        )
        assert (await usage(api, headers))["concurrent_tasks"] == 0


async def test_replicas_that_reach_a_cancels_deadline_together_end_the_task_once(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every replica that sees a cancel through (the one asked, and those started since) ends the task at its
    deadline if its record does not say it ended: two that get there before the record does store one ending."""
    customer_id, headers = await api.new_customer()
    _, ready, task_id = await running_on_slow_agent(api, customer_id, headers)
    os.kill(ready["pid"], signal.SIGSTOP)  # hung: it cannot stop the run
    folded = held_folding(monkeypatch, api.control.tasks)  # the record says nothing of the ending until both ended it
    try:
        assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
        async with (
            replica_tracker(api, "replica-a", cancel_deadline_s=1.0),
            replica_tracker(api, "replica-b", cancel_deadline_s=1.0),
        ):
            await asyncio.sleep(2.0)  # both replicas past their deadline
            folded.set()
            task = await finished(api, headers, task_id)
        assert (task["status"], task["status_reason"]) == (
            "cancelled",
            "cancelled on request (its agent did not stop it within 1 s)",
        )
        events = await stored_events(api.control.jet.js, customer_id, task_id)
        assert [e.content for e in events if e.kind == EventKind.STATUS and e.agent_id is None] == [
            "queued",
            "cancelled",
        ]
    finally:
        os.kill(ready["pid"], signal.SIGCONT)


async def test_tasks_that_ended_before_the_retention_time_are_forgotten_records_and_transcripts(
    settings: Settings,
) -> None:
    clock = ManualClock(utcnow())
    async with (
        ControlPlane(settings.model_copy(update={"task_retention_days": 1}), clock=clock) as control,
        serve_api(control) as api,
    ):
        customer_id, headers = await api.new_customer()
        old = await finished(api, headers, await start_task(api, headers, (await running_agent(api, headers))["id"]))
        assert old["status"] == "completed" and old["messages"]
        slow = await running_agent(api, headers, name="slow", model=SLOW, tools=[])
        running = await start_task(api, headers, slow["id"])
        transcripts = control.jet.kv["transcripts"]
        assert await kv_entries(transcripts, f"{customer_id}.{old['id']}.*")

        ended = datetime.fromisoformat(old["finished_at"])
        assert await control.tasks.sweep_finished(ended) == 0  # ended at that time, not before: kept
        # index keys whose records were never written (a task taken back): the sweep purges those made before
        # the retention time, and keeps a newer one (its record may be on its way)
        index = control.jet.kv["task_index"]
        stale = Indexed(created_us(ended), "tk-0000000000e1", customer_id, "agent", slow["id"])
        fresh = Indexed(created_us(ended + timedelta(days=1, hours=12)), "tk-0000000000e2", customer_id, "agent", "-")
        for orphan in (stale, fresh):
            await index.put(orphan.key, b"1")
        ended_index = control.jet.kv["task_ended"]
        completed = await api.client.get("/v1/tasks", params={"status": "completed"}, headers=headers)
        assert [t["id"] for t in completed.json()] == [old["id"]]
        assert await kv_keys(ended_index, f"{customer_id}.>") == [f"{customer_id}.{old['id']}.completed"]

        await clock.set(ended + timedelta(days=2))  # the hourly sweep runs, and the task ended over a day ago
        await assert_eventually(
            lambda: api.client.get(f"/v1/tasks/{old['id']}", headers=headers),
            lambda r: r.status_code == 404,
            what="the old task forgotten",
        )
        assert await kv_entries(transcripts, f"{customer_id}.{old['id']}.*") == []
        listed = (await api.client.get("/v1/tasks", headers=headers)).json()
        assert [t["id"] for t in listed] == [running]  # a task still running is kept, however old
        assert (await api.client.get(f"/v1/tasks/{running}", headers=headers)).status_code == 200
        await assert_eventually(
            lambda: kv_keys(index, f"{customer_id}.>"),
            lambda keys: sorted(Indexed.parse(k).task_id for k in keys) == sorted([running, fresh.task_id]),
            what="the index keys of the old task and of the stale orphan purged",
        )
        await assert_eventually(
            lambda: kv_keys(ended_index, f"{customer_id}.>"),
            lambda keys: keys == [],
            what="the old task's end forgotten",
        )


async def test_a_result_that_comes_after_the_task_ended_changes_nothing(api: Api) -> None:
    """A run's last words published after its task ended (a cancelled run that answered all the same) neither
    turn it back into `completed` nor give it a result, nor join its transcript: the record keeps what the event
    stream showed up to the end, whether the words come in the same batch of events as the end or after it."""
    customer_id, headers, task_id = await running_slow_task(api)
    said = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()["messages"]
    late = functools.partial(task_event, customer_id, task_id)
    end = late(EventKind.STATUS, "cancelled")
    batch = [late(EventKind.MESSAGE, "before the end"), end, late(EventKind.MESSAGE, "1")]
    await publish_while_away(api, *batch)
    await api.control.tasks.start_tracker(api.control.agents.on_agent_event)
    assert (await finished(api, headers, task_id))["status"] == "cancelled"
    await api.control.tasks.publish(late(EventKind.MESSAGE, "2"))
    await api.control.tasks.publish(late(EventKind.TOOL_CALL, calls=[{"name": "calculator"}]))
    await api.control.tasks.publish(late(EventKind.ERROR, "too late"))
    await api.control.tasks.publish(late(EventKind.RESULT, "too late"))
    await api.control.tasks.publish(late(EventKind.STATUS, "completed"))
    await tracker_caught_up(api)
    task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert (task["status"], task["status_reason"], task["result"]) == ("cancelled", None, None)
    assert [m["content"] for m in task["messages"]] == [*(m["content"] for m in said), "before the end"]


async def test_an_impossible_event_does_not_stop_the_records_from_following(api: Api) -> None:
    """An event that parses but names no status (an agent's bug, or a hostile one) is skipped, and the events
    after it still reach the task's record."""
    customer_id, headers, task_id = await running_slow_task(api)
    bogus = Event(kind=EventKind.STATUS, task_id=task_id, customer_id=customer_id, content="exploded")
    await api.control.tasks.publish(bogus)
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    task = await finished(api, headers, task_id)
    assert task["status"] == "cancelled"


async def tracker_caught_up(api: Api) -> None:
    """Wait until the tracker has folded and acknowledged every event in the stream."""

    async def info() -> Any:
        try:
            return await api.control.jet.js.consumer_info(EVENTS_STREAM, TRACKER)
        except nats.js.errors.NotFoundError:  # a tracker that took over rewinds its consumer: made again at once
            return None

    await assert_eventually(
        info, lambda i: i is not None and i.num_pending == 0 and i.num_ack_pending == 0, what="tracker caught up"
    )


def task_event(customer_id: str, task_id: str, kind: EventKind, content: str | None = None, **data: Any) -> Event:
    """An event of the task as a test publishes it (its messages' source: ``tester``)."""
    return Event(kind=kind, task_id=task_id, customer_id=customer_id, source="tester", content=content, data=data)


async def publish_while_away(api: Api, *events: Event) -> None:
    """Stop the tracker and publish ``events``: they are all there for it to fold together when it is back."""
    await api.control.tasks.stop_tracker()
    for event in events:
        await api.control.tasks.publish(event)


async def restart_tracker(api: Api, *, forget: bool = False) -> None:
    """Stop the control plane's tracker and start it again; ``forget`` deletes its durable consumer in between, so
    that every event in the stream is delivered to it again (as after a crash before it acknowledged them)."""
    await api.control.tasks.stop_tracker()
    if forget:
        await api.control.jet.js.delete_consumer(EVENTS_STREAM, TRACKER)
    await api.control.tasks.start_tracker(api.control.agents.on_agent_event)


async def test_events_delivered_again_neither_duplicate_the_transcript_nor_meter_tokens_twice(api: Api) -> None:
    """The tracker acknowledges events after it folds them: a control plane that dies in between gets them again
    after its restart. The record and the customer's tokens must come out as they were."""
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    task_id = await start_task(api, headers, agent["id"])
    await finished(api, headers, task_id)
    await tracker_caught_up(api)
    before = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    tokens = (await api.client.get("/v1/usage", headers=headers)).json()["tokens_today"]
    assert tokens > 0 and len(before["messages"]) == 4

    await restart_tracker(api, forget=True)
    await tracker_caught_up(api)
    after = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert after["messages"] == before["messages"] and after["usage"] == before["usage"]
    assert (await api.client.get("/v1/usage", headers=headers)).json()["tokens_today"] == tokens


async def test_a_burst_of_events_is_folded_in_order_around_an_impossible_one(api: Api) -> None:
    """Events that pile up while the tracker is away are folded together when it comes back: in their order, the
    tokens of them all metered, and one that says something impossible skipped without losing the others."""
    customer_id, headers, task_id = await running_slow_task(api)
    await tracker_caught_up(api)
    tokens = (await api.client.get("/v1/usage", headers=headers)).json()["tokens_today"]
    event = functools.partial(task_event, customer_id, task_id)
    await publish_while_away(
        api,
        event(EventKind.MESSAGE, "first", type="TextMessage"),
        event(EventKind.USAGE, prompt_tokens=7, completion_tokens=3),
        event(EventKind.STATUS, "exploded"),
        event(EventKind.MESSAGE, "second", type="TextMessage"),
        event(EventKind.USAGE, prompt_tokens=5, completion_tokens=0),
    )
    await restart_tracker(api)
    await tracker_caught_up(api)
    task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert [m["content"] for m in task["messages"] if m["source"] == "tester"] == ["first", "second"]
    assert task["status"] == "running" and task["usage"] == {"prompt_tokens": 12, "completion_tokens": 3}
    assert (await api.client.get("/v1/usage", headers=headers)).json()["tokens_today"] == tokens + 15
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    assert (await finished(api, headers, task_id))["status"] == "cancelled"


async def test_a_queued_status_stored_after_the_run_started_leaves_the_task_running(api: Api) -> None:
    """The human's answer is queued before its ``queued`` status is published, so a manager quick to take it up can
    say ``running`` first: the late ``queued`` must not put a running task back in the queue (it would show
    ``queued`` until its next status, and a cancel would look for its request in the queue)."""
    customer_id, headers, task_id = await running_slow_task(api)
    await api.control.tasks.publish(task_event(customer_id, task_id, EventKind.STATUS, "queued", reason="resuming"))
    await tracker_caught_up(api)
    task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert task["status"] == "running", task["status_reason"]
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    assert (await finished(api, headers, task_id))["status"] == "cancelled"


async def test_events_the_tracker_had_in_hand_when_it_stopped_are_folded_at_once_and_in_order(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracker stopped while it folds an event (a control plane shut down, or restarted) hands back to the stream
    the events it fetched, and those delivered to it that it never fetched: the next tracker folds them first, not
    after the ack wait (30 s) behind later events of their task that would make them look folded already (and lost
    to the record), and folds each once."""
    customer_id, headers, task_id = await running_slow_task(api)
    await tracker_caught_up(api)
    tasks = api.control.tasks
    folding = stuck_folding(monkeypatch, tasks)
    event = functools.partial(task_event, customer_id, task_id)
    await tasks.publish(event(EventKind.MESSAGE, "in hand", type="TextMessage"))
    await tasks.publish(event(EventKind.USAGE, prompt_tokens=7, completion_tokens=3))
    await asyncio.wait_for(folding.wait(), 10)
    # a fetch still open for the tracker's subscription (as one cancelled while it waited leaves at the server)
    # takes the next event: it is delivered to the tracker, which never fetches it
    sub = tasks._tracker_sub
    assert sub is not None
    next_events = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{TRACKER}"
    await api.control.jet.nc.publish(next_events, json.dumps({"batch": 8, "expires": 5 * 10**9}).encode(), sub._deliver)
    await tasks.publish(event(EventKind.MESSAGE, "delivered", type="TextMessage"))
    await assert_eventually(
        lambda: api.control.jet.js.consumer_info(EVENTS_STREAM, TRACKER),
        lambda i: i.num_pending == 0,
        what="every event delivered to the tracker",
    )
    await tasks.stop_tracker()
    monkeypatch.undo()  # its folds as they are again
    await tasks.publish(event(EventKind.MESSAGE, "after", type="TextMessage"))
    await tasks.start_tracker(api.control.agents.on_agent_event)

    await tracker_caught_up(api)  # within 20 s: the ack wait is 30
    task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert said_by_tester(task) == ["in hand", "delivered", "after"]
    assert task["usage"] == {"prompt_tokens": 7, "completion_tokens": 3}


@contextlib.asynccontextmanager
async def replica_tracker(
    api: Api, name: str, lease_s: float = 1.0, leases: KeyValue | None = None, cancel_deadline_s: float = 60.0
) -> AsyncIterator[tuple[TaskService, Jet]]:
    """Another control-plane replica's tracker, on its own NATS connection (its lease lapses after ``lease_s``;
    ``leases``: the bucket it keeps it in, if not the platform's), stopped at the end. It sees through the
    unfinished cancels."""
    control = api.control
    jet = await connect(control.settings.nats_url, name=name)
    tasks = TaskService(
        Repo(jet.kv["tasks"], Task),
        jet.kv["transcripts"],
        jet.kv["task_index"],
        jet.kv["task_ended"],
        jet.js,
        control.agents,
        control._killswitch,
        control._quotas,
        control._budget_exceeded,
        leases or jet.kv["system"],
        tracker_lease_s=lease_s,
        cancel_deadline_s=cancel_deadline_s,
    )
    await tasks.start_tracker(control.agents.on_agent_event)
    try:
        yield tasks, jet
    finally:
        await tasks.stop_tracker()
        await jet.close()


@contextlib.asynccontextmanager
async def only_replicas_fold(api: Api) -> AsyncIterator[None]:
    """The platform's own tracker stopped meanwhile: the replicas a test starts are the only ones that fold."""
    await api.control.tasks.stop_tracker()
    try:
        yield
    finally:
        await api.control.tasks.start_tracker(api.control.agents.on_agent_event)


def held_folding(monkeypatch: pytest.MonkeyPatch, tasks: TaskService) -> asyncio.Event:
    """Every fold of ``tasks`` waits from now until the event returned is set, then goes on."""
    release, fold = asyncio.Event(), tasks._fold

    async def held(*args: Any) -> None:
        await release.wait()
        await fold(*args)

    monkeypatch.setattr(tasks, "_fold", held)
    return release


def stuck_folding(monkeypatch: pytest.MonkeyPatch, tasks: TaskService) -> asyncio.Event:
    """Every fold of ``tasks`` hangs from now until its tracker stops (or its process dies); the event is set
    once one has begun."""
    folding = asyncio.Event()

    async def stuck(*args: Any) -> None:
        folding.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(tasks, "_fold", stuck)
    return folding


def said_by_tester(task: dict[str, Any]) -> list[str]:
    return [m["content"] for m in task["messages"] if m["source"] == "tester"]


async def test_with_two_control_plane_replicas_every_event_of_a_task_is_folded_in_order(api: Api) -> None:
    """Two replicas' trackers sharing the consumer would each fold some of a task's events, and a record that
    took a later event first made an earlier one look folded already (its tokens were lost: 38 of 60 once). One
    replica at a time folds them."""
    customer_id, headers, task_id = await running_slow_task(api)
    await tracker_caught_up(api)
    event = functools.partial(task_event, customer_id, task_id)
    async with replica_tracker(api, "replica-b") as (other, _):
        for i in range(60):
            await api.control.tasks.publish(event(EventKind.MESSAGE, f"m{i}", type="TextMessage"))
            await other.publish(event(EventKind.USAGE, prompt_tokens=1, completion_tokens=0))
        await api.control.tasks.publish(event(EventKind.STATUS, "completed"))
        await tracker_caught_up(api)
    task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert said_by_tester(task) == [f"m{i}" for i in range(60)]
    assert (task["status"], task["usage"]) == ("completed", {"prompt_tokens": 60, "completion_tokens": 0})


async def test_a_replica_takes_over_from_one_that_crashed_with_events_in_hand_and_folds_them_first(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica that folds the events crashes in the middle of a fold: another takes its lease over once it
    has been silent for the lease's time, and folds the events it had in hand before those after them, without
    waiting for the ack wait (30 s)."""
    customer_id, headers, task_id = await running_slow_task(api)
    await tracker_caught_up(api)
    event = functools.partial(task_event, customer_id, task_id)
    async with (
        only_replicas_fold(api),
        replica_tracker(api, "replica-a") as (crashing, crashing_jet),
        replica_tracker(api, "replica-b") as (standby, _),
    ):
        folding = stuck_folding(monkeypatch, crashing)
        await standby.publish(event(EventKind.MESSAGE, "in hand", type="TextMessage"))
        await standby.publish(event(EventKind.USAGE, prompt_tokens=7, completion_tokens=3))
        await asyncio.wait_for(folding.wait(), 10)
        await crashing_jet.nc.close()  # nothing it had is acknowledged or handed back, nor its lease given up
        await crashing.stop_tracker()
        await standby.publish(event(EventKind.MESSAGE, "after", type="TextMessage"))
        await tracker_caught_up(api)  # within 20 s: the ack wait is 30
    task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert said_by_tester(task) == ["in hand", "after"]
    assert task["usage"] == {"prompt_tokens": 7, "completion_tokens": 3}


async def test_a_replica_that_cannot_renew_its_lease_folds_nothing_until_another_has_taken_over(api: Api) -> None:
    """A replica whose lease renewals do not get through (a pause, a partition) stops folding before another can
    take the lease over: the events it fetches meanwhile go back to the stream, and the other folds them."""
    customer_id, headers, task_id = await running_slow_task(api)
    await tracker_caught_up(api)
    stalling = Stalling(api.control.jet.kv["system"])
    folded_by_stalled: list[str] = []
    async with (
        only_replicas_fold(api),
        replica_tracker(api, "replica-a", leases=stalling) as (stalled, _),  # type: ignore[arg-type]
        replica_tracker(api, "replica-b") as (standby, _),
    ):
        fold = stalled._fold

        async def watched(key: str, events: list[tuple[Any, Event]]) -> None:
            folded_by_stalled.extend(str(event.content) for _, event in events)
            await fold(key, events)

        stalled._fold = watched  # type: ignore[method-assign]
        stalling.flowing.clear()
        await asyncio.sleep(0.6)  # past half the lease's time: no longer sure to hold it
        await standby.publish(task_event(customer_id, task_id, EventKind.MESSAGE, "meanwhile", type="TextMessage"))
        await tracker_caught_up(api)
        task = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
        assert said_by_tester(task) == ["meanwhile"] and folded_by_stalled == []

        stalling.flowing.set()  # its next renewal finds the lease taken: it stops for good
        await assert_eventually(now(lambda: stalled._tracker), lambda tracker: tracker is None, what="stopped")
        await standby.publish(task_event(customer_id, task_id, EventKind.MESSAGE, "later", type="TextMessage"))
        await tracker_caught_up(api)
    assert folded_by_stalled == []


async def test_a_fold_that_fails_for_a_moment_is_tried_again_in_place(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATS away for a moment (a timeout, JetStream unavailable or not serving a bucket) as the tracker writes a
    record or gives back a quota slot: the write is tried again, the events after it waiting, rather than the
    record missing the event for good (a task that ended would stay running, holding its slot). A write whose
    answer timed out may have been made: the slot is given back and the tokens metered once all the same."""
    customer_id, headers, task_id = await running_slow_task(api)
    await tracker_caught_up(api)
    tokens = (await usage(api, headers))["tokens_today"]
    tasks, failures = api.control.tasks, []
    update_known, release_task, record_tokens = (
        tasks._repo.update_known,
        tasks._quotas.release_task,
        tasks._quotas.record_tokens,
    )

    async def flaky_update(*args: Any) -> Any:
        failures.append("update")
        if len(failures) == 1:
            raise nats.errors.TimeoutError  # not written
        if len(failures) == 2:
            await update_known(*args)
            raise nats.errors.TimeoutError  # written, and its answer lost
        return await update_known(*args)

    async def flaky_release(*args: Any) -> None:
        failures.append("release")
        if failures.count("release") == 1:
            raise nats.js.errors.ServiceUnavailableError
        if failures.count("release") == 2:
            raise nats.js.errors.NoStreamResponseError  # a KV write while nothing serves the bucket's stream
        await release_task(*args)

    async def flaky_metering(*args: Any) -> Any:
        failures.append("meter")
        metered = await record_tokens(*args)
        if failures.count("meter") == 1:
            raise nats.errors.TimeoutError  # written, and its answer lost
        return metered

    monkeypatch.setattr(tasks._repo, "update_known", flaky_update)
    monkeypatch.setattr(tasks._quotas, "release_task", flaky_release)
    monkeypatch.setattr(tasks._quotas, "record_tokens", flaky_metering)
    event = functools.partial(task_event, customer_id, task_id)
    await publish_while_away(  # folded together: one record write
        api,
        event(EventKind.USAGE, prompt_tokens=5, completion_tokens=1),
        event(EventKind.MESSAGE, "done", type="TextMessage"),
        event(EventKind.STATUS, "completed"),
    )
    await restart_tracker(api)
    task = await finished(api, headers, task_id)
    await tracker_caught_up(api)
    assert failures == ["update", "update", "update", "meter", "meter", "release", "release", "release"]
    assert (task["status"], task["usage"]) == ("completed", {"prompt_tokens": 5, "completion_tokens": 1})
    assert said_by_tester(task) == ["done"]
    now_used = await usage(api, headers)
    assert (now_used["concurrent_tasks"], now_used["tokens_today"]) == (0, tokens + 6)


async def test_the_tracker_keeps_what_another_writer_changed_in_a_record_between_two_events(api: Api) -> None:
    """The tracker folds a task's next event into the record it stored last, without reading it back: a record
    another writer changed meanwhile (as the team dispatcher sets the queue's sequence) is read again, and both
    changes are kept."""
    customer_id, headers, task_id = await running_slow_task(api)
    await tracker_caught_up(api)
    records = Repo(api.control.jet.kv["tasks"], Task)
    key = task_key(customer_id, task_id)
    marked = {"status_reason": "changed by another writer"}
    assert await records.update(key, lambda t: t.model_copy(update=marked))

    async def usage(tokens: int) -> Task:
        data = {"prompt_tokens": tokens, "completion_tokens": 0}
        event = Event(kind=EventKind.USAGE, task_id=task_id, customer_id=customer_id, data=data)
        await api.control.tasks.publish(event)
        await tracker_caught_up(api)
        record = await records.get(key)
        assert record is not None
        return record

    record = await usage(3)
    assert record.status_reason == marked["status_reason"] and record.usage.prompt_tokens == 3
    record = await usage(4)  # folded into the record at hand, as the tracker stored it
    assert record.status_reason == marked["status_reason"] and record.usage.prompt_tokens == 7
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    assert (await finished(api, headers, task_id))["status"] == "cancelled"


async def test_a_task_whose_model_endpoint_cannot_be_reached_fails_naming_it(api: Api) -> None:
    """It used to say ``gaierror: [Errno -2] Name or service not known``, naming neither the model nor the host."""
    _, headers = await api.new_customer()
    unreachable = {"provider": "ollama", "name": "llama3", "base_url": "http://models.invalid:11434/v1"}
    agent = await running_agent(api, headers, model=unreachable, tools=[])
    task = await finished(api, headers, await start_task(api, headers, agent["id"]))
    assert task["status"] == "failed", task
    said = "cannot reach the model endpoint (POST http://models.invalid:11434/v1/chat/completions): cannot look up"
    assert said in task["status_reason"], task["status_reason"]


async def test_an_event_jetstream_will_not_store_fails_the_task_with_the_reason(api: Api) -> None:
    """The agent goes on to its model while JetStream stores the conversation's events, but it reports no
    result before they are stored: one that is refused fails the task, saying why."""
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    async with small_events(api.control.settings.nats_url):
        task_id = await start_task(api, headers, agent["id"], "What is (2+3)*4? " + "Please. " * 1000)
        task = await finished(api, headers, task_id)
    assert task["status"] == "failed", task
    assert "not stored" in task["status_reason"] and "maximum" in task["status_reason"], task["status_reason"]
    assert task["result"] is None


async def test_tasks_on_a_stopped_agent_are_refused(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    await api.client.post(f"/v1/agents/{agent['id']}/stop", headers=headers)
    response = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "hi"}, headers=headers)
    assert response.status_code == 409 and "stopped" in response.json()["error"]["message"]


@contextlib.contextmanager
def queueing_fails(
    api: Api, error: Exception, stored: bool = False, then: Callable[[bytes], Awaitable[None]] | None = None
) -> Iterator[list[bytes]]:
    """JetStream takes no task request for a while: each publish on a task queue's subject fails with ``error``
    (once it is stored, with ``stored``: an answer that never came; after ``then`` returns, given the request,
    if given). Yields the requests tried."""
    js = api.control.jet.js
    publish, tried = js.publish, []

    async def failing(subject: str, payload: bytes = b"", *args: Any, **kwargs: Any) -> Any:
        if not subject.startswith("caravan.tasks."):
            return await publish(subject, payload, *args, **kwargs)
        tried.append(payload)
        if stored:
            await publish(subject, payload, *args, **kwargs)
        if then is not None:
            await then(payload)
        raise error

    js.publish = failing  # type: ignore[method-assign]
    try:
        yield tried
    finally:
        del js.publish  # the method again


async def test_a_task_that_cannot_be_queued_is_refused_503_and_leaves_nothing_behind(api: Api) -> None:
    """A task whose request JetStream does not take (nothing serves the stream for a moment) is refused with a
    503 to try again, and nothing of it is left: no record listed, no quota slot held. Once JetStream takes
    requests again, the client's second try is made and runs."""
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    with queueing_fails(api, nats.js.errors.NoStreamResponseError()) as tried:
        response = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "hi"}, headers=headers)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable" and response.headers["retry-after"] == "1"
    task_id = TaskRequest.model_validate_json(tried[0]).task_id
    assert (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).status_code == 404
    assert (await api.client.get("/v1/tasks", headers=headers)).json() == []
    assert (await usage(api, headers))["concurrent_tasks"] == 0
    assert (await finished(api, headers, await start_task(api, headers, agent["id"])))["status"] == "completed"


@pytest.mark.parametrize("running_first", [False, True], ids=["runs-later", "running-first"])
async def test_a_task_request_stored_though_its_answer_never_came_is_stopped_once_it_runs(
    api: Api, running_first: bool
) -> None:
    """A request whose publishing timed out may be in the queue all the same: the client is told 503 and the
    task's record is taken back, so that when the agent runs the request, the tracker finds no record for its
    run and tells the agent to stop it (here in its model call): no run goes on that nobody can see or cancel.
    So too when the answer is so late that the agent has the run going, and the record says so, by then."""
    customer_id, headers = await api.new_customer()
    slow = {"provider": "replay", "name": "slow", "responses": ["too late"], "delay_ms": 60_000}
    agent = await running_agent(api, headers, model=slow, tools=[])

    async def running(request: bytes) -> None:
        path = f"/v1/tasks/{TaskRequest.model_validate_json(request).task_id}"

        async def status() -> Any:
            return (await api.client.get(path, headers=headers)).json().get("status")

        await assert_eventually(status, lambda s: s == "running", what="the record running")

    then = running if running_first else None
    with queueing_fails(api, nats.errors.TimeoutError(), stored=True, then=then) as tried:
        response = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "hi"}, headers=headers)
    assert response.status_code == 503, response.text
    task_id = TaskRequest.model_validate_json(tried[0]).task_id
    assert (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).status_code == 404

    async def last_word() -> tuple[str | None, str | None]:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            last = (await stored_events(api.control.jet.js, customer_id, task_id))[-1]
            return last.content, last.agent_id
        return None, None

    await assert_eventually(last_word, lambda w: w == ("cancelled", agent["id"]), what="the run stopped by its agent")
    assert (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).status_code == 404
    assert (await usage(api, headers))["concurrent_tasks"] == 0


async def test_a_task_queued_whole_is_answered_202_though_a_read_after_it_fails(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a task is queued whole, NATS failing the read that follows (whether its agent went meanwhile) does
    not turn the answer into a 503: a client told so would make the task again, and both would run."""
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    agents, reads = api.control.tasks._agents, []
    get = agents.get

    async def failing_after_queueing(*args: Any) -> Any:
        reads.append(args)
        if len(reads) == 2:  # the read after the task is queued
            raise nats.errors.TimeoutError
        return await get(*args)

    monkeypatch.setattr(agents, "get", failing_after_queueing)
    response = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "hi"}, headers=headers)
    assert response.status_code == 202, response.text
    assert len(reads) == 2
    monkeypatch.undo()
    assert (await finished(api, headers, response.json()["id"]))["status"] == "completed"
    assert [t["id"] for t in (await api.client.get("/v1/tasks", headers=headers)).json()] == [response.json()["id"]]


async def test_customers_never_see_each_others_tasks(api: Api) -> None:
    _, alice = await api.new_customer("alice")
    _, bob = await api.new_customer("bob")
    agent = await running_agent(api, alice)
    task_id = await start_task(api, alice, agent["id"])
    await finished(api, alice, task_id)
    on_alices_agent = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "x"}, headers=bob)
    assert on_alices_agent.status_code == 404
    for method, path in [
        ("GET", f"/v1/tasks/{task_id}"),
        ("GET", f"/v1/tasks/{task_id}/events"),
        ("POST", f"/v1/tasks/{task_id}/cancel"),
    ]:
        assert (await api.client.request(method, path, headers=bob)).status_code == 404, path
    assert (await api.client.get("/v1/tasks", headers=bob)).json() == []
    token = bob["Authorization"].split()[1]
    await assert_ws_refused(api.base.replace("http", "ws") + f"/v1/tasks/{task_id}/ws?token={token}", 404, "not_found")


async def test_task_input_validation(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    for body in (
        {"task": "no target"},
        {"agent_id": agent["id"], "team_id": "tm-000000000000", "task": "both"},
        {"agent_id": agent["id"], "task": ""},
        {"agent_id": agent["id"], "task": " \n\t "},  # nothing to ask: it ran, a model call on no question
        {"agent_id": agent["id"], "task": "\x00\u200b"},  # nor in a NUL and a zero-width space
        {"agent_id": agent["id"], "task": "\u3164 \u2800"},  # a Hangul filler and a braille blank
        {"agent_id": agent["id"], "task": "x" * 100_001},
        {"agent_id": "../../etc", "task": "x"},
    ):
        response = await api.client.post("/v1/tasks", json=body, headers=headers)
        assert response.status_code in (404, 422), (body, response.text)
    assert (await api.client.get("/v1/tasks", headers=headers)).json() == []
    blank = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "   "}, headers=headers)
    assert blank.json()["error"]["message"] == "invalid request: task: must hold something to read, not only spaces"
    # an empty page marker is no task: a clear 422, not "task '' not found"
    empty = await api.client.get("/v1/tasks", params={"before": ""}, headers=headers)
    assert empty.status_code == 422 and empty.json()["error"]["details"][0]["field"] == "before", empty.text


SLOW = {"provider": "replay", "name": "slow", "responses": ["never said"], "delay_ms": 120_000}


async def running_on_slow_agent(
    api: Api, customer_id: str, headers: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """An agent on the SLOW model, what its process said when ready (``pid``, ``health_port``), and a task it
    runs."""
    agent = await running_agent(api, headers, model=SLOW, tools=[])
    ready = (await agent_ready(api, customer_id, agent["id"]))["data"]
    task_id = await start_task(api, headers, agent["id"])
    await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers), lambda r: r.json()["status"] == "running"
    )
    return agent, ready, task_id


async def usage(api: Api, headers: dict[str, str]) -> dict[str, Any]:
    return dict((await api.client.get("/v1/usage", headers=headers)).json())


async def test_deleting_an_agent_cancels_its_unfinished_tasks_and_gives_back_their_slots(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers, model=SLOW, tools=[])
    bystander = await running_agent(api, headers, name="bystander", model=SLOW, tools=[])
    # an agent runs four tasks at a time: the fifth waits in its queue
    tasks = [await start_task(api, headers, agent["id"], f"task {i}") for i in range(5)]
    other = await start_task(api, headers, bystander["id"])
    await assert_eventually(
        lambda: api.client.get("/v1/tasks?status=running", headers=headers),
        lambda r: len(r.json()) == 5,
        what="four tasks running on the agent and one on the bystander",
    )
    assert (await usage(api, headers))["concurrent_tasks"] == 6

    assert (await api.client.delete(f"/v1/agents/{agent['id']}", headers=headers)).status_code == 204
    assert (await usage(api, headers))["concurrent_tasks"] == 1  # given back at once
    for task_id in tasks:
        task = await finished(api, headers, task_id)
        assert (task["status"], task["status_reason"]) == ("cancelled", f"agent {agent['id']} was deleted")
    # nothing of the agent is left in its work queue, and the other agent's task runs on
    with pytest.raises(nats.js.errors.NotFoundError):
        await api.control.jet.js.get_last_msg(TASKS_STREAM, task_subject(agent["customer_id"], agent["id"]))
    assert (await api.client.get(f"/v1/tasks/{other}", headers=headers)).json()["status"] == "running"
    again = await api.client.post(f"/v1/tasks/{tasks[0]}/cancel", headers=headers)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]
    assert (await usage(api, headers))["concurrent_tasks"] == 1


async def test_deleting_an_agent_ends_its_running_task_once(api: Api) -> None:
    """The delete ends the agent's running tasks (`cancelled`, "agent <id> was deleted") and tells its process to
    stop them, which it does by ending them too: each ended twice on the events stream (and on `nats sub`), the
    second time "cancelled on request", which nobody asked for, and which the record showed had it come first."""
    customer_id, headers = await api.new_customer()
    agent = await running_agent(api, headers, model=SLOW, tools=[])
    task_id = await start_task(api, headers, agent["id"])
    await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers), lambda r: r.json()["status"] == "running"
    )
    assert (await api.client.delete(f"/v1/agents/{agent['id']}", headers=headers)).status_code == 204
    # its job stopped: all its process said is stored
    stored = await stored_events(api.control.jet.js, customer_id, task_id)
    endings = [(e.content, e.data.get("reason")) for e in stored if e.kind == "status" and e.content in TERMINAL]
    assert endings == [("cancelled", f"agent {agent['id']} was deleted")]
    task = await finished(api, headers, task_id)
    assert (task["status"], task["status_reason"]) == ("cancelled", f"agent {agent['id']} was deleted")


async def test_deleting_an_agent_reads_the_tasks_in_flight_not_the_customers_history(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tasks to end are those holding a slot of the customer's quota: a customer's finished tasks, however
    many, are not read again each time one of their agents is deleted or fails."""
    _, headers = await api.new_customer()
    fast = await running_agent(api, headers, name="fast")
    done = [await finished(api, headers, await start_task(api, headers, fast["id"])) for _ in range(3)]
    assert {task["status"] for task in done} == {"completed"}
    slow = await running_agent(api, headers, name="slow", model=SLOW, tools=[])
    in_flight = await start_task(api, headers, slow["id"])
    read = named_reads(monkeypatch, api.control.tasks._repo)
    assert (await api.client.delete(f"/v1/agents/{slow['id']}", headers=headers)).status_code == 204
    monkeypatch.undo()
    assert read[:1] == [in_flight] and not {task["id"] for task in done} & set(read)
    task = await finished(api, headers, in_flight)
    assert (task["status"], task["status_reason"]) == ("cancelled", f"agent {slow['id']} was deleted")


async def test_a_task_whose_agent_is_gone_can_still_be_cancelled(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    # left over by a delete that did not end its agent's tasks: queued for good, holding a slot in the quota
    task = Task(id="tk-000000000001", customer_id=customer_id, agent_id="ag-000000000000", task="stuck")
    await api.control.quotas.reserve_task(customer_id, task.id)
    await Repo(api.control.jet.kv["tasks"], Task).create(task_key(customer_id, task.id), task)
    assert (await usage(api, headers))["concurrent_tasks"] == 1

    cancelled = await api.client.post(f"/v1/tasks/{task.id}/cancel", headers=headers)
    assert cancelled.status_code == 202, cancelled.text
    ended = await finished(api, headers, task.id)
    assert (ended["status"], ended["status_reason"]) == ("cancelled", "cancelled on request")
    assert (await usage(api, headers))["concurrent_tasks"] == 0


async def test_a_task_given_as_its_agent_is_deleted_ends_and_gives_back_its_slot(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers, model=SLOW, tools=[])
    # the task has read its agent (running) and waits until the agent's delete, which ends its tasks, is done
    create_waits = hold_first_call(
        monkeypatch, (api.control.killswitch, "ensure_not_halted"), until=(api.control.agents, "delete")
    )
    create = asyncio.create_task(
        api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "too late"}, headers=headers)
    )
    await create_waits.wait()
    assert (await api.client.delete(f"/v1/agents/{agent['id']}", headers=headers)).status_code == 204
    created = await create
    assert created.status_code == 202, created.text
    task = await finished(api, headers, created.json()["id"])
    assert (task["status"], task["status_reason"]) == ("cancelled", f"agent {agent['id']} was deleted")
    assert (await usage(api, headers))["concurrent_tasks"] == 0


async def test_a_task_queued_while_its_deleted_agents_job_stops_ends_and_gives_back_its_slot(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task read its agent (running) before the delete; the delete ended the agent's tasks before the task was
    stored, and the task, stored then, read its agent again while its job was stopping: still there. It waited
    `queued` for good (its agent's work queue gone with the agent), holding its quota slot."""
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers, model=SLOW, tools=[])
    stopping, created = asyncio.Event(), asyncio.Event()
    stop_job, ensure_not_halted = api.control.scheduler.stop_job, api.control.killswitch.ensure_not_halted

    async def stop_once_created(*args: Any) -> None:  # the delete has ended the tasks it found: its job stops
        stopping.set()
        await created.wait()
        await stop_job(*args)

    async def read_then_wait(*args: Any) -> None:  # the task has read its agent: it waits for the job to stop
        await ensure_not_halted(*args)
        await stopping.wait()

    monkeypatch.setattr(api.control.scheduler, "stop_job", stop_once_created)
    monkeypatch.setattr(api.control.killswitch, "ensure_not_halted", read_then_wait)
    create = asyncio.create_task(
        api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "too late"}, headers=headers)
    )
    delete = asyncio.create_task(api.client.delete(f"/v1/agents/{agent['id']}", headers=headers))
    response = await create
    created.set()
    assert response.status_code == 202, response.text
    assert (await delete).status_code == 204
    task = await finished(api, headers, response.json()["id"])
    assert (task["status"], task["status_reason"]) == ("cancelled", f"agent {agent['id']} was deleted")
    assert (await usage(api, headers))["concurrent_tasks"] == 0


async def test_one_replica_that_fails_for_good_leaves_the_agent_serving_on_the_others(settings: Settings) -> None:
    async with (
        ControlPlane(settings.model_copy(update={"agent_restart_attempts": 0})) as control,
        serve_api(control) as api,
    ):
        _, headers = await api.new_customer()
        agent = await running_agent(api, headers, replicas=2)
        job = control.scheduler._jobs[(agent["namespace"], agent["job_id"])]  # type: ignore[attr-defined]
        pids = [alloc.process.pid for alloc in job.allocs if alloc.process is not None]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)  # no restart left: that replica is failed for good
        await assert_eventually(
            lambda: control.scheduler.job_status(agent["namespace"], agent["job_id"]),
            lambda status: status is not None and "failed" in status.allocs.values(),
        )
        task = await finished(api, headers, await start_task(api, headers, agent["id"], "still there?"))
        assert task["status"] == "completed", task
        assert (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()["status"] == "running"


async def test_a_failed_agent_refuses_tasks_ends_those_it_had_and_takes_new_ones_once_started(
    settings: Settings,
) -> None:
    async with (
        ControlPlane(settings.model_copy(update={"agent_restart_attempts": 0})) as control,
        serve_api(control) as api,
    ):
        customer_id, headers = await api.new_customer()
        agent = await running_agent(api, headers, model=SLOW, tools=[])
        crew = await team(api, headers, members=[agent["id"]], termination={"max_messages": 2})
        # an agent runs four tasks at a time: the fifth waits in its queue
        tasks = [await start_task(api, headers, agent["id"], f"task {i}") for i in range(5)]
        await assert_eventually(
            lambda: api.client.get("/v1/tasks?status=running", headers=headers), lambda r: len(r.json()) == 4
        )
        teamed = await api.client.post("/v1/tasks", json={"team_id": crew["id"], "task": "slowly"}, headers=headers)
        await assert_eventually(  # its member is in a model call
            lambda: api.client.get(f"/v1/tasks/{teamed.json()['id']}", headers=headers),
            lambda r: r.json()["status"] == "running",
        )
        os.kill((await agent_ready(api, customer_id, agent["id"]))["data"]["pid"], signal.SIGKILL)
        failed = await wait_status(api, headers, agent["id"], "failed")  # no restart left

        refused = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "hi"}, headers=headers)
        assert refused.status_code == 409, refused.text
        message = refused.json()["error"]["message"]
        assert f"agent {agent['id']} is failed ({failed['status_reason']})" in message and "start it again" in message
        on_team = await api.client.post("/v1/tasks", json={"team_id": crew["id"], "task": "hi"}, headers=headers)
        assert on_team.status_code == 409 and f"team member {agent['id']} (calc) is failed" in on_team.text
        for task_id in tasks:  # what it had ends, saying why, and gives back its slot
            task = await finished(api, headers, task_id)
            assert task["status"] == "failed" and f"agent {agent['id']} failed" in task["status_reason"], task
        task = await finished(api, headers, teamed.json()["id"])  # and its team's
        assert task["status"] == "failed", task
        assert task["status_reason"].startswith(f"a member of its team: agent {agent['id']} failed"), task
        assert (await usage(api, headers))["concurrent_tasks"] == 0

        assert (await api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers)).status_code == 200
        await wait_status(api, headers, agent["id"], "running")
        again = await start_task(api, headers, agent["id"], "once more")
        await assert_eventually(
            lambda: api.client.get(f"/v1/tasks/{again}", headers=headers), lambda r: r.json()["status"] == "running"
        )
        # its work queue held nothing more of what it had: only the new task is given to it
        queue = await api.control.jet.js.consumer_info(TASKS_STREAM, consumer_name(agent["id"]))
        assert (queue.num_ack_pending, queue.num_pending) == (1, 0)


async def test_a_patch_of_a_failed_agent_runs_its_new_version_unless_a_hard_killswitch_refuses_it(
    settings: Settings,
) -> None:
    """An agent whose job failed for good is still meant to run: a PATCH (a mended definition, say) submits its new
    version, as it would a running agent's, and it runs again, its failure gone. Under a hard killswitch, which
    stopped nothing of it (it was not running), the PATCH is refused as a start would be, and changes nothing: it
    was answered 409 with the new definition stored all the same, and the agent made `killed`."""
    async with (
        ControlPlane(settings.model_copy(update={"agent_restart_attempts": 0})) as control,
        serve_api(control) as api,
    ):
        customer_id, headers = await api.new_customer()
        agent = await running_agent(api, headers)
        os.kill((await agent_ready(api, customer_id, agent["id"]))["data"]["pid"], signal.SIGKILL)
        await wait_status(api, headers, agent["id"], "failed")  # no restart left
        mended = await api.client.patch(f"/v1/agents/{agent['id']}", json={"system_message": "v2"}, headers=headers)
        assert mended.status_code == 200, mended.text
        assert (mended.json()["status"], mended.json()["status_reason"]) == ("starting", None)
        assert (await wait_status(api, headers, agent["id"], "running"))["system_message"] == "v2"

        os.kill((await agent_ready(api, customer_id, agent["id"]))["data"]["pid"], signal.SIGKILL)
        failed = await wait_status(api, headers, agent["id"], "failed")
        engaged = await api.client.post(
            "/v1/admin/killswitch",
            json={"scope": "customer", "customer_id": customer_id, "engaged": True, "reason": "audit", "hard": True},
            headers=await api.admin(),
        )
        assert engaged.status_code == 200, engaged.text
        refused = await api.client.patch(f"/v1/agents/{agent['id']}", json={"system_message": "v3"}, headers=headers)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "killswitch_engaged", refused.text
        kept = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
        assert kept == failed


async def test_a_task_its_agent_goes_away_from_on_every_attempt_fails_saying_so_and_gives_back_its_slot(
    api: Api,
) -> None:
    """Each attempt at a task that its agent does not see through (here stopped and started again mid-run; a crash
    is the same) is one of its 3: the request that comes back after the third ends it `failed`, saying why, with
    the third attempt's transcript, and its quota slot comes back. It used to wait `queued` for good, its slot held:
    JetStream had given up delivering it, and nothing noticed."""
    _, headers = await api.new_customer()
    model = {"provider": "replay", "name": "steady", "responses": ["never heard"], "delay_ms": 60_000}
    agent = await running_agent(api, headers, model=model, tools=[])
    task_id = await start_task(api, headers, agent["id"], "take your time")
    path = f"/v1/agents/{agent['id']}"
    for attempt in (1, 2, 3):
        await assert_eventually(
            lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
            lambda r, n=attempt: (r.json()["status"], r.json()["attempt"]) == ("running", n),
            what=f"attempt {attempt} running",
        )
        assert (await api.client.post(f"{path}/stop", headers=headers)).status_code == 200
        await wait_status(api, headers, agent["id"], "stopped")
        assert (await api.client.post(f"{path}/start", headers=headers)).status_code == 200

    task = await finished(api, headers, task_id)
    assert (task["status"], task["attempt"], task["result"]) == ("failed", 3, None), task
    assert task["status_reason"] == (
        "its agent went away during each of its 3 attempts (it crashed, or stopped and gave the task back): "
        "not tried again"
    )
    assert [m["content"] for m in task["messages"]] == ["take your time"]  # the third attempt's
    used = await assert_eventually(
        lambda: api.client.get("/v1/usage", headers=headers), lambda r: r.json()["concurrent_tasks"] == 0
    )
    assert used.status_code == 200
    again = await start_task(api, headers, agent["id"], "and now?")  # the agent serves its queue as before
    await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{again}", headers=headers),
        lambda r: (r.json()["status"], r.json()["attempt"]) == ("running", 1),
    )


@pytest.mark.parametrize("change", ["patch", "stop and start"])
async def test_a_task_running_when_its_agent_is_changed_or_stopped_runs_again_once_it_is_back(
    api: Api, change: str
) -> None:
    """An agent stopped on purpose (a PATCH rolls out its new version, a stop, a restart of the platform) gives
    its tasks in flight back to its queue, saying so, as a crash would leave them: the agent that comes back runs
    them again from the start (their next attempt), rather than their ending `failed`."""
    customer_id, headers = await api.new_customer()
    model = {"provider": "replay", "name": "steady", "responses": ["done at last"], "delay_ms": 1_500}
    agent = await running_agent(api, headers, model=model, tools=[])
    task_id = await start_task(api, headers, agent["id"], "take your time")
    await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers), lambda r: r.json()["status"] == "running"
    )
    path = f"/v1/agents/{agent['id']}"
    if change == "patch":
        patched = await api.client.patch(path, json={"system_message": "Be brief."}, headers=headers)
        assert patched.status_code == 200, patched.text
    else:
        assert (await api.client.post(f"{path}/stop", headers=headers)).status_code == 200
        await wait_status(api, headers, agent["id"], "stopped")
        waiting = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
        assert (waiting["status"], waiting["status_reason"]) == ("queued", GIVEN_BACK), waiting
        assert (await api.client.post(f"{path}/start", headers=headers)).status_code == 200
    task = await finished(api, headers, task_id)
    assert (task["status"], task["result"], task["attempt"]) == ("completed", "done at last", 2), task
    assert [m["content"] for m in task["messages"]] == ["take your time", "done at last"]  # the new attempt's only
    statuses = [
        (e.attempt, e.content, e.data.get("reason"))
        for e in await stored_events(api.control.jet.js, customer_id, task_id)
        if e.kind == "status"
    ]
    assert statuses == [
        (1, "queued", None),
        (1, "running", None),
        (1, "queued", GIVEN_BACK),
        (2, "running", None),
        (2, "completed", None),
    ], statuses


async def test_a_task_for_an_agent_being_stopped_is_refused_saying_so(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While its job stops, an agent's record still says `running`: the refusal said it "is running; start it"."""
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    stopping, release = asyncio.Event(), asyncio.Event()
    stop_job = api.control.scheduler.stop_job

    async def held(*args: Any) -> None:
        stopping.set()
        await release.wait()
        await stop_job(*args)

    monkeypatch.setattr(api.control.scheduler, "stop_job", held)
    stop = asyncio.create_task(api.client.post(f"/v1/agents/{agent['id']}/stop", headers=headers))
    await asyncio.wait_for(stopping.wait(), 10)
    refused = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "x"}, headers=headers)
    release.set()
    assert (await stop).status_code == 200
    assert refused.status_code == 409, refused.text
    said = f"agent {agent['id']} is being stopped or deleted; start it once it has stopped to give it tasks"
    assert refused.json()["error"]["message"] == said
