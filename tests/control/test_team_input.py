"""Human in the loop: a member hands off to the user, the task waits with the question, and the answer resumes
the team from its state in JetStream KV, across a restart of the control plane and the gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from autogen_agentchat.conditions import HandoffTermination, MaxMessageTermination, TextMentionTermination
from autogen_agentchat.messages import TextMessage
from nats.js.errors import KeyNotFoundError

from agent.protocol import TASKS_STREAM, Event, task_events_subject
from control.models import Task, TaskStatus
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.services.tasks import task_key
from control.store import Repo
from control.teams.models import Checkpoint
from tests.conftest import Api, make_settings, serve_api
from tests.control.test_team_takeover import replica_serving
from tests.gateway.teams_support import (
    TERMINAL,
    agents,
    api_transcript,
    local_team,
    local_transcript,
    run_local,
    script,
    start,
    stop_reason,
    task_status,
    team,
)
from tests.gateway.test_agents_api import wait_status
from tests.gateway.test_tasks_api import held_folding, queueing_fails, tracker_caught_up
from tests.support.helpers import assert_eventually, now, small_messages, stored_events

SPECS = {
    "asker": {"model": script("What colour should it be?", {"tool": "transfer_to_user", "arguments": {}}, "a3", "a4")},
    "maker": {"model": script("m1", "m2", "m3")},
}
ASKING = {"handoff_to_user": True, "max_messages": 5}
"""The termination of the teams below: the asker's handoff to the user, or five messages."""


async def asking_task(api: Api, headers: dict[str, str], specs: dict[str, dict[str, Any]]) -> str:
    """A task on a team of ``specs``' asker and maker, the asker handing off to the user, once it waits for the
    human's answer to its first question."""
    made = await agents(api, headers, specs)
    asker, maker = made["asker"]["id"], made["maker"]["id"]
    created = await team(api, headers, members=[asker, maker], handoffs={asker: ["user"]}, termination=ASKING)
    task_id = await start(api, headers, created["id"], "Paint the fence.")
    waiting = await task_status(api, headers, task_id, ("awaiting_input", "completed", "failed"))
    assert waiting["status"] == "awaiting_input", waiting["status_reason"]
    return task_id


async def running_unfolded(api: Api, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, str], str, asyncio.Event]:
    """A new customer's team task that will ask the human, `running`, its events no longer folded into its record
    (the record stays `running`) until the event returned is set: customer, headers, task id and that event."""
    customer_id, headers = await api.new_customer()
    made = await agents(api, headers, {**SPECS, "maker": {"model": script("m1", "m2", "m3", delay_ms=300)}})
    asker, maker = made["asker"]["id"], made["maker"]["id"]
    created = await team(api, headers, members=[asker, maker], handoffs={asker: ["user"]}, termination=ASKING)
    task_id = await start(api, headers, created["id"], "Paint the fence.")
    assert (await task_status(api, headers, task_id, ("running", *TERMINAL)))["status"] == "running"
    return customer_id, headers, task_id, held_folding(monkeypatch, api.control.tasks)


async def asked_and_answered(specs: dict[str, dict[str, Any]], *answers: str) -> list[tuple[Any, ...]]:
    """The transcript of :func:`asking_task`'s team run by AgentChat in this process, given ``answers`` in turn."""
    local = local_team(specs, "round_robin", HandoffTermination("user") | MaxMessageTermination(5), {"asker": ["user"]})
    items, _ = await run_local(local, "Paint the fence.")
    for answer in answers:
        more, _ = await run_local(local, TextMessage(source="user", content=answer))
        items += more
    return local_transcript(items)


async def test_a_team_asks_the_human_and_resumes_after_a_control_plane_restart(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "nats") as nats_server:
        settings = make_settings(nats_server.url, tmp_path / "data")
        control = ControlPlane(settings)
        async with control, serve_api(control) as api:
            _, headers = await api.new_customer()
            made = await agents(api, headers, SPECS)
            asker, maker = made["asker"]["id"], made["maker"]["id"]
            created = await team(
                api,
                headers,
                members=[asker, maker],
                handoffs={asker: ["user"]},
                termination={"handoff_to_user": True, "max_messages": 5},
            )
            task_id = await start(api, headers, created["id"], "Paint the fence.")
            waiting = await task_status(api, headers, task_id, ("awaiting_input", "completed", "failed"))
            assert waiting["status"] == "awaiting_input", waiting
            assert waiting["messages"][-1]["type"] == "input_request"
            assert waiting["messages"][-1]["content"] == "What colour should it be?"
            for empty in ("", "  \n "):
                early = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": empty}, headers=headers)
                assert early.status_code == 422, early.text

        control = ControlPlane(settings)  # a new control plane and gateway; the agents are started again too
        async with control, serve_api(control) as api:
            for agent_id in (asker, maker):
                await wait_status(api, headers, agent_id, "running", 40)
            answer = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Green."}, headers=headers)
            assert answer.status_code == 202, answer.text
            resumed = answer.json()  # not the question's reason under the new status
            assert (resumed["status"], resumed["status_reason"]) == ("queued", "resuming with the human's answer")
            again = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Red."}, headers=headers)
            assert again.status_code == 409
            done = await task_status(api, headers, task_id, within=60)
            assert done["status"] == "completed", (done["status_reason"], done["messages"])
            final_stop = await stop_reason(api, headers, task_id)

    local = local_team(SPECS, "round_robin", HandoffTermination("user") | MaxMessageTermination(5), {"asker": ["user"]})
    first, _ = await run_local(local, "Paint the fence.")
    second, local_stop = await run_local(local, TextMessage(source="user", content="Green."))
    assert api_transcript(done) == local_transcript(first + second)
    assert [m["type"] for m in done["messages"]].count("input_request") == 1
    assert final_stop == local_stop


async def test_a_team_whose_state_outgrows_a_stored_value_asks_the_human_and_resumes(api: Api) -> None:
    """A team's saved state holds every member's conversation, so it outgrows a stored value (a NATS server's
    max_payload: 1 MB unless configured) long before its run ends. Saved in parts, it still waits for the human
    and resumes from that state, as AgentChat's own team does (it used to fail the task when it asked)."""
    _, headers = await api.new_customer()
    long = " " + "x" * 3000
    specs = {
        "asker": {
            "model": script(
                "What colour should it be?" + long, {"tool": "transfer_to_user", "arguments": {}}, "a3", "a4"
            )
        },
        "maker": {"model": script("m1" + long, "m2" + long, "m3")},
    }
    async with small_messages(api.control.settings.nats_url, "KV_caravan_team_state", 4096):
        task_id = await asking_task(api, headers, specs)
        answer = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Green."}, headers=headers)
        assert answer.status_code == 202, answer.text
        done = await task_status(api, headers, task_id)
    assert done["status"] == "completed", done["status_reason"]
    assert api_transcript(done) == await asked_and_answered(specs, "Green.")


async def test_the_checkpoint_of_a_waiting_team_holds_what_its_run_published_but_chunks_and_statuses(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    streaming = {name: {"model": {**spec["model"], "stream": True}} for name, spec in SPECS.items()}
    made = await agents(api, headers, streaming)
    asker, maker = made["asker"]["id"], made["maker"]["id"]
    created = await team(
        api, headers, members=[asker, maker], handoffs={asker: ["user"]}, termination={"handoff_to_user": True}
    )
    task_id = await start(api, headers, created["id"], "Paint the fence.")
    waiting = await task_status(api, headers, task_id, ("awaiting_input", "completed", "failed"))
    assert waiting["status"] == "awaiting_input", waiting

    published: list[Event] = []  # every event of the task so far, as JetStream stored them
    sub = await api.control.jet.js.subscribe(task_events_subject(customer_id, task_id), ordered_consumer=True)
    while True:
        msg = await sub.next_msg(timeout=10)
        published.append(Event.model_validate_json(msg.data))
        if not msg.metadata.num_pending:
            break
    await sub.unsubscribe()
    entry = await api.control.jet.kv["team_state"].get(task_key(customer_id, task_id))
    checkpoint = Checkpoint.model_validate_json(entry.value or b"")

    def kept(event: Event) -> dict[str, Any]:
        return event.model_dump(mode="json", exclude={"attempt", "at"})

    assert {"chunk", "message", "usage", "tool_call", "input_request"} <= {e.kind for e in published}
    assert checkpoint.transcript == [kept(e) for e in published if e.kind not in ("chunk", "status")]


async def test_deleting_a_member_ends_the_unfinished_tasks_of_its_teams(api: Api) -> None:
    """A team task waiting for the human whose member is deleted would wait for good, holding its quota slot (its
    answer is refused: the member no longer exists); a running one would end only once its run lost the member.
    Both end ``cancelled`` at the delete, saying why, and the waiting one's checkpoint goes; a task of another agent
    runs on."""
    customer_id, headers = await api.new_customer()
    slow = {"model": script("zz", delay_ms=600_000)}
    made = await agents(api, headers, {**SPECS, "slow": slow, "bystander": slow})
    asker, maker = made["asker"]["id"], made["maker"]["id"]
    asking = await team(
        api,
        headers,
        name="asking",
        members=[asker, maker],
        handoffs={asker: ["user"]},
        termination={"handoff_to_user": True},
    )
    busy = await team(api, headers, name="busy", members=[made["slow"]["id"], maker], termination={"max_messages": 3})
    waiting = await start(api, headers, asking["id"], "Paint the fence.")
    assert (await task_status(api, headers, waiting, ("awaiting_input", *TERMINAL)))["status"] == "awaiting_input"
    running = await start(api, headers, busy["id"], "Take your time.")
    other = await api.client.post(
        "/v1/tasks", json={"agent_id": made["bystander"]["id"], "task": "Wait."}, headers=headers
    )
    for task_id in (running, other.json()["id"]):
        assert (await task_status(api, headers, task_id, ("running", *TERMINAL)))["status"] == "running"

    assert (await api.client.delete(f"/v1/agents/{maker}", headers=headers)).status_code == 204
    for task_id in (waiting, running):
        ended = await task_status(api, headers, task_id)
        assert ended["status"] == "cancelled", ended
        assert ended["status_reason"] == f"a member of its team: agent {maker} was deleted", ended
    # the running one's manager, told to stop it, ends it too: once all the same ("cancelled on request" came after)
    await assert_eventually(now(lambda: api.control.team_runner.running), lambda runs: runs == 0, what="run over")
    stored = await stored_events(api.control.jet.js, customer_id, running)
    endings = [(e.content, e.data.get("reason")) for e in stored if e.kind == "status" and e.content in TERMINAL]
    assert endings == [("cancelled", f"a member of its team: agent {maker} was deleted")]
    with pytest.raises(KeyNotFoundError):  # (a deleted key's error is one)
        await api.control.jet.kv["team_state"].get(task_key(customer_id, waiting))
    assert (await api.client.get(f"/v1/tasks/{other.json()['id']}", headers=headers)).json()["status"] == "running"
    assert (await api.client.get("/v1/usage", headers=headers)).json()["concurrent_tasks"] == 1
    # the team stays as defined, and says why it runs no more
    assert (await api.client.get(f"/v1/teams/{busy['id']}", headers=headers)).json()["members"][1] == maker
    again = await api.client.post("/v1/tasks", json={"team_id": busy["id"], "task": "Again."}, headers=headers)
    assert again.status_code == 409 and again.json()["error"]["message"] == f"team member {maker} no longer exists"


async def test_an_answer_stored_though_its_client_got_a_503_is_taken_when_sent_again_and_no_other_is(api: Api) -> None:
    """The human's answer reached the queue but its acknowledgement never came back (the client got a 503, "try
    again"). Sent again, the same answer is taken (202, the task queued with it, and used once); another answer is
    refused (409: the first one stands). No manager runs teams meanwhile, so the answer waits in the queue."""
    _, headers = await api.new_customer()
    task_id = await asking_task(api, headers, SPECS)
    await api.control.team_runner.stop()  # the answer stays queued until the replica below takes it

    url = f"/v1/tasks/{task_id}/input"
    with queueing_fails(api, nats.errors.TimeoutError(), stored=True) as tried:
        lost = await api.client.post(url, json={"content": "Green."}, headers=headers)
    assert lost.status_code == 503 and len(tried) == 1, lost.text
    assert (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()["status"] == "awaiting_input"
    other = await api.client.post(url, json={"content": "Red."}, headers=headers)
    assert other.status_code == 409 and "already has its answer" in other.json()["error"]["message"], other.text
    again = await api.client.post(url, json={"content": "Green."}, headers=headers)
    assert again.status_code == 202, again.text
    resuming = ("queued", "resuming with the human's answer")
    assert (again.json()["status"], again.json()["status_reason"]) == resuming
    await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
        lambda got: (got.json()["status"], got.json()["status_reason"]) == resuming,
        what="the task's record queued with the answer",
    )
    # once more, the record queued with it (a client whose 202 never came): the same is taken, another is not
    once_more = await api.client.post(url, json={"content": "Green."}, headers=headers)
    assert once_more.status_code == 202 and once_more.json()["status_reason"] == resuming[1], once_more.text
    other = await api.client.post(url, json={"content": "Red."}, headers=headers)
    assert other.status_code == 409 and "not awaiting input" in other.json()["error"]["message"], other.text

    async with replica_serving(api.control, "replica"):
        done = await task_status(api, headers, task_id, within=60)
    assert done["status"] == "completed", (done["status_reason"], done["messages"])
    assert api_transcript(done) == await asked_and_answered(SPECS, "Green.")  # the answer used once, the other never


async def test_an_answers_queued_status_stored_after_the_team_asked_again_leaves_the_task_waiting(api: Api) -> None:
    """The human's answer is queued before its ``queued`` status is published. When that status is stored late
    (the gateway held up), the run it resumed may already have asked the next question: the task must go on
    waiting for that answer, not show ``queued`` with no request left in the queue, where the human could not
    answer it (409) and a cancel would find nothing to cancel."""
    customer_id, headers = await api.new_customer()
    handoff = {"tool": "transfer_to_user", "arguments": {}}
    specs = {
        "asker": {"model": script("What colour should it be?", handoff, "Which green?", handoff, "a5", "a6")},
        "maker": {"model": script("m1", "m2", "m3", "m4", "m5")},
    }
    task_id = await asking_task(api, headers, specs)

    js = api.control.jet.js
    publish, held, release = js.publish, asyncio.Event(), asyncio.Event()

    async def slow_queued_status(subject: str, payload: bytes = b"", *args: Any, **kwargs: Any) -> Any:
        if subject == task_events_subject(customer_id, task_id) and b'"content":"queued"' in payload:
            held.set()
            await release.wait()
        return await publish(subject, payload, *args, **kwargs)

    url, task_url = f"/v1/tasks/{task_id}/input", f"/v1/tasks/{task_id}"
    js.publish = slow_queued_status  # type: ignore[method-assign]
    try:
        answering = asyncio.create_task(api.client.post(url, json={"content": "Green."}, headers=headers))
        await asyncio.wait_for(held.wait(), 10)
        await assert_eventually(  # the answer's run has asked the next question
            lambda: api.client.get(task_url, headers=headers),
            lambda got: [m["type"] for m in got.json()["messages"]].count("input_request") == 2,
            within=60,
            what="the team asking again",
        )
        release.set()
        answered = await answering
    finally:
        release.set()
        del js.publish  # the method again
    assert answered.status_code == 202, answered.text
    await tracker_caught_up(api)
    asked = (await api.client.get(task_url, headers=headers)).json()
    assert (asked["status"], asked["status_reason"]) == ("awaiting_input", "asker asks the user")
    assert asked["messages"][-1]["content"] == "Which green?"
    again = await api.client.post(url, json={"content": "Sage."}, headers=headers)
    assert again.status_code == 202, again.text
    done = await task_status(api, headers, task_id, within=60)
    assert done["status"] == "completed", (done["status_reason"], done["messages"])

    assert api_transcript(done) == await asked_and_answered(specs, "Green.", "Sage.")


@pytest.mark.parametrize("stale", ["read before the answer", "record behind"])
@pytest.mark.parametrize("handed_out", [True, False], ids=["run taken up", "still queued"])
async def test_a_cancel_right_after_an_answer_stops_the_answers_run_and_leaves_no_saved_state(
    api: Api, monkeypatch: pytest.MonkeyPatch, handed_out: bool, stale: str
) -> None:
    """A cancel sent right after an answer may find the task as it was before it: it read the record before the
    answer was queued, or the record says `awaiting_input` with the answer queued (an answer sent as the question
    showed on the event stream, the record still `running`, which the tracker then folded the question into, and
    not yet the answer's `queued` status). It must not take it for a task nobody runs (ending it there while a
    manager runs the answer on, and saves the state again for a task that has ended): the queued answer is taken
    out, or the manager that took it up stops it, and nothing of the task is left saved."""
    customer_id, headers = await api.new_customer()
    slow_maker = {**SPECS, "maker": {"model": script("m1", "m2", "m3", delay_ms=300)}}
    task_id = await asking_task(api, headers, slow_maker)
    await tracker_caught_up(api)
    said = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()["messages"]
    before_the_answer = {shown: await api.control.tasks.get(customer_id, task_id, shown) for shown in (True, False)}
    runner = api.control._team_runner
    assert runner is not None
    if not handed_out:  # no manager takes the answer up before the cancel
        await runner.stop()
    running = asyncio.Event()

    async def heard(msg: Any) -> None:
        event = Event.model_validate_json(msg.data)
        if event.content == "running" and "run_id" in event.data:
            running.set()

    folding = held_folding(monkeypatch, api.control.tasks) if stale == "record behind" else asyncio.Event()
    watch = await api.control.jet.nc.subscribe(task_events_subject(customer_id, task_id), cb=heard)
    answered = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Blue."}, headers=headers)
    assert answered.status_code == 202, answered.text
    if stale == "record behind":  # (an answer to a record that says `awaiting_input` makes it `queued` at once)
        waiting = {"status": TaskStatus.AWAITING_INPUT, "status_reason": before_the_answer[False].status_reason}
        await Repo(api.control.jet.kv["tasks"], Task).update(
            task_key(customer_id, task_id), lambda task: task.model_copy(update=waiting)
        )
    if handed_out:  # its manager runs the answer's segment (the maker's turn takes 300 ms)
        await asyncio.wait_for(running.wait(), 10)
    await watch.unsubscribe()
    read, get = [], api.control.tasks.get

    async def read_before_the_answer(*args: Any, transcript: bool = True) -> Any:
        if read:
            return await get(*args, transcript=transcript)
        read.append(args)
        return before_the_answer[transcript]

    if stale == "read before the answer":
        await tracker_caught_up(api)
        monkeypatch.setattr(api.control.tasks, "get", read_before_the_answer)
    assert (await api.control.tasks.get(customer_id, task_id)).status == "awaiting_input"
    read.clear()
    cancel = await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)
    assert cancel.status_code == 202, cancel.text
    folding.set()
    ended = await task_status(api, headers, task_id)
    assert ended["status"] == "cancelled", ended
    await assert_eventually(now(lambda: task_id not in runner._active), bool, what="no run of it left")
    await asyncio.sleep(0.5)  # (a run left going would have said its next message by now)
    await tracker_caught_up(api)
    with pytest.raises(KeyNotFoundError):
        await api.control.jet.kv["team_state"].get(task_key(customer_id, task_id))
    final = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert final["status"] == "cancelled" and final["finished_at"] == ended["finished_at"]
    members = ("asker", "maker")
    assert [m for m in final["messages"] if m["source"] in members] == [m for m in said if m["source"] in members]
    assert (await api.client.get("/v1/usage", headers=headers)).json()["concurrent_tasks"] == 0
    record = await api.control.tasks.get(customer_id, task_id)
    assert record.queue_seq is not None
    with pytest.raises(nats.js.errors.NotFoundError):  # no manager is left an answer to run
        await api.control.jet.js.get_msg(TASKS_STREAM, record.queue_seq)


async def test_an_answer_sent_as_the_question_shows_on_the_event_stream_is_taken(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that answers as soon as the stream shows `awaiting_input` may come before the record says so (the
    events are folded into it a moment later): the answer is taken, not refused as for a running task."""
    customer_id, headers, task_id, folding = await running_unfolded(api, monkeypatch)
    checkpoints = Repo(api.control.jet.kv["team_state"], Checkpoint)
    await assert_eventually(
        lambda: checkpoints.get(task_key(customer_id, task_id)),
        lambda saved: saved is not None and saved.asked_by == "asker" and not saved.between_turns,
        what="the question asked",
    )
    answered = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Blue."}, headers=headers)
    assert answered.status_code == 202, answered.text
    folding.set()
    done = await task_status(api, headers, task_id)
    assert done["status"] == "completed", done
    assert ("user", "TextMessage", "Blue.") in api_transcript(done)
    assert api_transcript(done) == await asked_and_answered(SPECS, "Blue.")


async def test_a_task_read_right_after_its_answer_says_queued_and_asks_no_more(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer's 202 says `queued`: so does the task read right after it, though the tracker has not folded the
    answer's status yet. It said `awaiting_input`, with the question's segment, and a client that polls showed
    the question again, its second answer refused ("already has its answer")."""
    _, headers = await api.new_customer()
    task_id = await asking_task(api, headers, SPECS)
    folding = held_folding(monkeypatch, api.control.tasks)
    answered = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Blue."}, headers=headers)
    assert answered.status_code == 202, answered.text
    read = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert (read["status"], read["status_reason"], read["segment"]) == (
        "queued",
        "resuming with the human's answer",
        None,
    ), read
    again = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Blue."}, headers=headers)
    assert again.status_code == 202 and again.json()["status"] == "queued", again.text  # the same answer: taken
    other = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Red."}, headers=headers)
    assert other.status_code == 409, other.text
    folding.set()
    done = await task_status(api, headers, task_id)
    assert done["status"] == "completed", done
    assert api_transcript(done) == await asked_and_answered(SPECS, "Blue.")


async def test_readmes_offline_human_in_the_loop_example_runs_as_written(api: Api) -> None:
    """The Teams section's block, pasted into bash whole: the team asks, the README's answer resumes it to the end
    (pasted whole, its answer once came before the members had started, and was refused)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("Offline, with scripted members", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    _, headers = await api.new_customer()
    env = {**os.environ, "BASE": api.base, "AUTH": f"Authorization: {headers['Authorization']}"}
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-euo", "pipefail", "-c", block + 'echo; echo "$TASK"'], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    *said, task_id = done.stdout.decode().strip().splitlines()
    assert '"status":"queued"' in "".join(said)  # the answer's 202: the task as it goes on
    task = await task_status(api, headers, task_id)
    assert (task["status"], task["status_reason"]) == ("completed", "Text 'DONE' mentioned"), task
    (request,) = [m for m in task["messages"] if m["type"] == "input_request"]
    assert (request["source"], request["content"]) == ("asker", "What colour should it be?")
    spoken = [(m["source"], m["content"]) for m in task["messages"] if m["type"] == "TextMessage"]
    assert spoken[-3:] == [("user", "Green."), ("maker", "Fence painted."), ("asker", "Green it is. DONE")]


async def test_an_answer_names_its_question_and_a_retry_never_answers_the_next(api: Api) -> None:
    """A client that sent its answer again after the team had used it and asked anew (its first try's 202 lost)
    answered the second question with the first one's answer. Naming the question (`segment`: the task's, its
    `awaiting_input` status's and its `input_request` event's) makes such a retry a 409."""
    customer_id, headers = await api.new_customer()
    handoff = {"tool": "transfer_to_user", "arguments": {}}
    specs = {
        "asker": {"model": script("Which colour?", handoff, "Anything else?", handoff, "All done. DONE")},
        "maker": {"model": script("m1", "m2", "m3", "m4")},
    }
    made = await agents(api, headers, specs)
    asker, maker = made["asker"]["id"], made["maker"]["id"]
    termination = {"handoff_to_user": True, "text_mention": "DONE", "max_messages": 20}
    created = await team(api, headers, members=[asker, maker], handoffs={asker: ["user"]}, termination=termination)
    task_id = await start(api, headers, created["id"], "Paint the fence.")

    async def asked(segment: int) -> dict[str, Any]:
        waiting = await assert_eventually(
            lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
            lambda r: r.json()["segment"] == segment or r.json()["status"] in ("completed", "failed", "cancelled"),
            what=f"question {segment}",
        )
        return dict(waiting.json())

    def answer(content: str, **body: Any) -> Any:
        return api.client.post(f"/v1/tasks/{task_id}/input", json={"content": content, **body}, headers=headers)

    first = await asked(1)
    assert (first["status"], first["segment"]) == ("awaiting_input", 1), first
    (request,) = [e for e in await stored_events(api.control.jet.js, customer_id, task_id) if e.kind == "input_request"]
    assert (request.content, request.data["segment"]) == ("Which colour?", 1)
    for bad in ("1", 0, 1.0, True):
        assert (await answer("Blue.", segment=bad)).status_code == 422, bad
    answered = await answer("Blue.", segment=1)
    assert answered.status_code == 202, answered.text
    assert answered.json()["messages"] == first["messages"]  # the task as queued to go on: its transcript too
    second = await asked(2)
    assert (second["status"], second["segment"]) == ("awaiting_input", 2), second
    retried = await answer("Blue.", segment=1)  # the client's retry: not taken for the second question
    assert retried.status_code == 409, retried.text
    error = retried.json()["error"]
    assert "its question 1 was answered already (its last is 2)" in error["message"] and error["details"] == {
        "segment": 2
    }, error
    ahead = await answer("Green.", segment=3)
    assert ahead.status_code == 409 and "its question 3 was never asked" in ahead.text, ahead.text
    assert (await answer("No, thanks.", segment=2)).status_code == 202
    done = await task_status(api, headers, task_id)
    assert (done["status"], done["segment"]) == ("completed", None), done
    said = [m["content"] for m in done["messages"] if m["source"] == "user"]
    assert said == ["Paint the fence.", "Blue.", "No, thanks."]  # each answer once, to its own question


async def test_one_agent_asks_the_human_as_a_team_of_one_as_agentchat_has_it_ask(api: Api) -> None:
    """A task on an agent alone never asks (AgentChat's agent has nobody to hand off to), and an answer to one is
    409 saying how to let it ask: a team of that one agent with a handoff to `user`, AgentChat's own way (its
    human-in-the-loop guide runs one assistant in a round robin with a handoff termination). That task waits
    with the agent's question, the answer resumes the same conversation, and the transcript and stop reason are
    AgentChat's own in-process team of one's."""
    _, headers = await api.new_customer()
    handoff = {"tool": "transfer_to_user", "arguments": {}}
    specs = {"painter": {"model": script("Which colour should the fence be?", handoff, "Green it is. DONE")}}
    made = await agents(api, headers, {**specs, "alone": {"model": script("Fence painted.")}})
    painter, alone = made["painter"]["id"], made["alone"]["id"]

    on_agent = await api.client.post("/v1/tasks", json={"agent_id": alone, "task": "Paint."}, headers=headers)
    assert on_agent.status_code == 202, on_agent.text
    refused = await api.client.post(
        f"/v1/tasks/{on_agent.json()['id']}/input", json={"content": "Green."}, headers=headers
    )
    assert refused.status_code == 409, refused.text
    assert "a team of that one agent with a handoff to 'user'" in refused.json()["error"]["message"], refused.text

    termination = {"handoff_to_user": True, "text_mention": "DONE", "max_messages": 10}
    created = await team(api, headers, members=[painter], handoffs={painter: ["user"]}, termination=termination)
    task_id = await start(api, headers, created["id"], "Paint the fence.")
    waiting = await task_status(api, headers, task_id, ("awaiting_input", "completed", "failed"))
    assert waiting["status"] == "awaiting_input", (waiting["status_reason"], waiting["messages"])
    assert (waiting["messages"][-1]["type"], waiting["messages"][-1]["content"]) == (
        "input_request",
        "Which colour should the fence be?",
    )
    answer = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Green."}, headers=headers)
    assert answer.status_code == 202, answer.text
    done = await task_status(api, headers, task_id)
    assert (done["status"], done["status_reason"]) == ("completed", "Text 'DONE' mentioned"), done

    local = local_team(
        specs,
        "round_robin",
        HandoffTermination("user") | TextMentionTermination("DONE") | MaxMessageTermination(10),
        {"painter": ["user"]},
    )
    first, _ = await run_local(local, "Paint the fence.")
    second, local_stop = await run_local(local, TextMessage(source="user", content="Green."))
    assert api_transcript(done) == local_transcript(first + second)
    assert await stop_reason(api, headers, task_id) == local_stop


async def test_a_cancel_as_the_team_asks_the_human_ends_the_task_rather_than_leave_it_waiting(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that comes as the run asks the human finds the record still `running` (the `awaiting_input`
    status is folded into it a moment later), so it tells the team's manager, whose run has ended: nobody was left
    to stop, and the task waited for an answer for good, holding its quota slot, though its cancel was 202. It
    ends `cancelled` once its question is folded in, its saved state gone; an answer, before that or after, is
    refused (it was queued, only for the manager to end the task on it)."""
    customer_id, headers, task_id, folding = await running_unfolded(api, monkeypatch)
    runner = api.control.team_runner
    await assert_eventually(
        lambda: stored_events(api.control.jet.js, customer_id, task_id),
        lambda events: any(e.content == "awaiting_input" for e in events),
        what="the question asked",
    )
    await assert_eventually(now(lambda: task_id not in runner._active), bool, what="its run ended")
    assert (await api.control.tasks.get(customer_id, task_id)).status == "running"
    cancel = await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)
    assert cancel.status_code == 202, cancel.text
    answer = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Blue."}, headers=headers)
    assert answer.status_code == 409, answer.text  # (the record still says `running`, the question asked)
    assert answer.json()["error"]["message"] == f"task {task_id} is being cancelled: it takes no answer"
    folding.set()
    await tracker_caught_up(api)
    ended = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert (ended["status"], ended["status_reason"]) == ("cancelled", "cancelled on request"), ended
    assert (await api.client.get("/v1/usage", headers=headers)).json()["concurrent_tasks"] == 0
    with pytest.raises(KeyNotFoundError):
        await api.control.jet.kv["team_state"].get(task_key(customer_id, task_id))
    late = await api.client.post(f"/v1/tasks/{task_id}/input", json={"content": "Blue."}, headers=headers)
    assert late.status_code == 409, late.text


async def test_a_waiting_team_task_cancelled_twice_at_once_ends_once(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two cancels of a task waiting for the human, the second before the first's end is folded into the record
    (a client's retry): both are 202, and the task's events hold one ending, as a single agent's task's do."""
    customer_id, headers = await api.new_customer()
    task_id = await asking_task(api, headers, SPECS)
    await tracker_caught_up(api)
    folding = held_folding(monkeypatch, api.control.tasks)
    for _ in range(2):
        cancel = await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)
        assert cancel.status_code == 202, cancel.text
    folding.set()
    await tracker_caught_up(api)
    ended = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
    assert (ended["status"], ended["status_reason"]) == ("cancelled", "cancelled on request"), ended
    statuses = [e.content for e in await stored_events(api.control.jet.js, customer_id, task_id) if e.kind == "status"]
    assert statuses.count("cancelled") == 1, statuses
