"""Teams through the API: members in separate agent processes, the manager in the control plane, and the
transcript equal to AgentChat's own team run in this process with the same scripts."""

from __future__ import annotations

from tests.conftest import Api
from tests.gateway.teams_support import (
    MaxMessageTermination,
    TextMentionTermination,
    agents,
    api_transcript,
    local_team,
    local_transcript,
    run_local,
    script,
    start,
    task_status,
    team,
)


async def test_round_robin_matches_agentchat_in_process(api: Api) -> None:
    _, headers = await api.new_customer()
    specs = {
        "alice": {"model": script("a1", "a2", "a3")},
        "bob": {"model": script("b1", "b2", "b3")},
        "carol": {"model": script("c1", "c2 DONE", "c3")},
    }
    made = await agents(api, headers, specs)
    created = await team(
        api,
        headers,
        members=[made[n]["id"] for n in specs],
        mode="round_robin",
        termination={"max_messages": 9, "text_mention": "DONE"},
    )
    task_id = await start(api, headers, created["id"], "Count, one each.")
    task = await task_status(api, headers, task_id)
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    local = local_team(specs, "round_robin", MaxMessageTermination(9) | TextMentionTermination("DONE"))
    items, stop_reason = await run_local(local, "Count, one each.")
    assert api_transcript(task) == local_transcript(items)
    assert [m["source"] for m in task["messages"]] == ["user", "alice", "bob", "carol", "alice", "bob", "carol"]
    assert task["result"] == "c2 DONE"
    assert stop_reason and "DONE" in stop_reason
