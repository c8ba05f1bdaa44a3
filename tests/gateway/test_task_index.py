"""``GET /v1/tasks`` reads the tasks' index keys and only the records of the page it fills: records the index
does not know yet (written by an older Caravan) are listed all the same, in order, and indexed once; a key whose
record is gone is not listed; a page of one status is filled however many tasks of other statuses lie between."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import nats.errors
import pytest

from agent.backends.natskv import kv_keys
from agent.protocol import utcnow
from control.models import Task, TaskStatus
from control.services.task_index import Indexed
from control.services.tasks import task_key
from control.store import Repo
from tests.conftest import Api
from tests.gateway.test_tasks_api import finished, running_agent, running_slow_task, start_task
from tests.support.helpers import assert_eventually, named_reads, now

AGENT = "ag-0000000000a1"
TEAM = "tm-0000000000b2"
MS = timedelta(milliseconds=1)


async def ids_listed(api: Api, headers: dict[str, str], **params: Any) -> list[str]:
    response = await api.client.get("/v1/tasks", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()]


async def test_tasks_stored_before_the_index_are_listed_in_order_a_page_at_a_time_and_indexed_once(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    records = Repo(api.control.jet.kv["tasks"], Task)
    index = api.control.jet.kv["task_index"]
    start = utcnow() - timedelta(days=1)
    made = []
    for n in range(230):  # stored as an older Caravan stored them: records, no index keys
        at = start + timedelta(milliseconds=n // 2)  # two at a time: ordered by id
        failed = n in (3, 5, 120)  # a page of failed tasks has hundreds of others between them
        task = Task(
            id=f"tk-{n * 7919 % 4096:012x}",
            customer_id=customer_id,
            agent_id=None if n % 3 == 0 else AGENT,
            team_id=TEAM if n % 3 == 0 else None,
            task=f"task {n}",
            status=TaskStatus.FAILED if failed else TaskStatus.COMPLETED,
            created_at=at,
        )
        await records.create(task_key(customer_id, task.id), task)
        made.append(task)
    newest = [t.id for t in sorted(made, key=lambda t: (t.created_at, t.id), reverse=True)]
    assert await kv_keys(index, f"{customer_id}.>") == []

    assert await ids_listed(api, headers, limit=1000) == newest
    assert len(await kv_keys(index, f"{customer_id}.>")) == 230  # indexed as they were listed
    pages: list[str] = []
    while page := await ids_listed(api, headers, limit=47, **({"before": pages[-1]} if pages else {})):
        pages += page
    assert pages == newest

    failed = [i for i in newest if next(t for t in made if t.id == i).status is TaskStatus.FAILED]
    assert await ids_listed(api, headers, status="failed", limit=2) == failed[:2]
    assert await ids_listed(api, headers, status="failed", before=failed[1]) == failed[2:]
    assert await ids_listed(api, headers, status="running") == []
    by_team = [i for i in newest if next(t for t in made if t.id == i).team_id == TEAM]
    assert await ids_listed(api, headers, team_id=TEAM, limit=1000) == by_team
    assert await ids_listed(api, headers, agent_id=AGENT, limit=1000) == [i for i in newest if i not in by_team]

    _, stranger = await api.new_customer("stranger")
    assert await ids_listed(api, stranger) == []
    assert await ids_listed(api, await api.admin(), customer_id=customer_id, limit=1000) == newest


async def test_a_listing_of_an_ended_status_reads_again_only_the_tasks_not_known_to_have_ended(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task found ended is not read again by a listing of another ended status; one that ends after it was read
    is read until it is found ended, and listed with its status."""
    customer_id, headers = await api.new_customer()
    records = Repo(api.control.jet.kv["tasks"], Task)
    start = utcnow() - timedelta(hours=1)
    statuses = {
        f"tk-{n:012x}": TaskStatus.FAILED if n % 100 == 7 else TaskStatus.RUNNING if n == 150 else TaskStatus.COMPLETED
        for n in range(300)
    }
    for n, (task_id, status) in enumerate(statuses.items()):
        task = Task(id=task_id, customer_id=customer_id, agent_id=AGENT, task="t", status=status)
        await records.create(task_key(customer_id, task_id), task.model_copy(update={"created_at": start + n * MS}))
    failed = sorted((i for i, s in statuses.items() if s is TaskStatus.FAILED), reverse=True)
    still_running = f"tk-{150:012x}"
    assert await ids_listed(api, headers, status="killed") == []  # every record read (and indexed)
    ended = await kv_keys(api.control.jet.kv["task_ended"], f"{customer_id}.>")
    assert sorted(ended) == sorted(f"{customer_id}.{i}.{s.value}" for i, s in statuses.items() if i != still_running)
    read = named_reads(monkeypatch, api.control.tasks._repo)

    assert await ids_listed(api, headers, status="killed") == []
    assert await ids_listed(api, headers, status="failed") == failed
    assert read == [still_running, failed[0], still_running, *failed[1:]]  # newest first: it lies among them

    read.clear()
    await records.update(  # as the task's end is folded into its record
        task_key(customer_id, still_running), lambda t: t.model_copy(update={"status": TaskStatus.FAILED})
    )
    assert await ids_listed(api, headers, status="failed") == [failed[0], still_running, *failed[1:]]
    assert await ids_listed(api, headers, status="cancelled") == []
    assert read == [failed[0], still_running, *failed[1:]]  # the newly ended task read once, by the first


async def test_a_task_is_known_to_have_ended_as_its_end_is_folded_in_before_any_listing_reads_it(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing of an ended status reads no record of a task known to have ended with another: a task that ends is
    known so from then on, not from the first listing that reads it (which would write on a GET, and read the
    records of every task that ended since)."""
    customer_id, headers, cancelled = await running_slow_task(api)
    done = await start_task(api, headers, (await running_agent(api, headers))["id"])
    assert (await api.client.post(f"/v1/tasks/{cancelled}/cancel", headers=headers)).status_code == 202
    assert (await finished(api, headers, done))["status"] == "completed"
    assert (await finished(api, headers, cancelled))["status"] == "cancelled"
    await assert_eventually(
        lambda: kv_keys(api.control.jet.kv["task_ended"], f"{customer_id}.>"),
        lambda keys: (
            sorted(keys) == sorted([f"{customer_id}.{done}.completed", f"{customer_id}.{cancelled}.cancelled"])
        ),
        what="both tasks known to have ended",
    )
    read = named_reads(monkeypatch, api.control.tasks._repo)
    assert await ids_listed(api, headers, status="failed") == []
    assert await ids_listed(api, headers, status="killed") == []
    assert read == []
    assert await ids_listed(api, headers, status="completed") == [done]
    assert read == [done]


async def test_a_task_whose_end_cannot_be_marked_ends_all_the_same_and_is_marked_by_the_next_listing_that_reads_it(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="caravan.tasks")
    customer_id, headers = await api.new_customer()
    index, ended = api.control.tasks._index, api.control.jet.kv["task_ended"]
    put_ended = index._put_ended

    async def failing(key: str) -> None:
        raise nats.errors.TimeoutError

    monkeypatch.setattr(index, "_put_ended", failing)
    task_id = await start_task(api, headers, (await running_agent(api, headers))["id"])
    assert (await finished(api, headers, task_id))["status"] == "completed"
    warned = f"could not mark task {task_id} completed"
    await assert_eventually(now(lambda: caplog.text), lambda text: warned in text, what="the failed mark logged")
    assert await kv_keys(ended, f"{customer_id}.>") == []
    monkeypatch.setattr(index, "_put_ended", put_ended)
    assert await ids_listed(api, headers, status="completed") == [task_id]
    assert await kv_keys(ended, f"{customer_id}.>") == [f"{customer_id}.{task_id}.completed"]


async def test_a_key_whose_record_is_gone_is_not_listed(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    records = Repo(api.control.jet.kv["tasks"], Task)
    index = api.control.jet.kv["task_index"]
    kept = Task(id="tk-00000000000a", customer_id=customer_id, agent_id=AGENT, task="kept")
    gone = Task(id="tk-00000000000b", customer_id=customer_id, agent_id=AGENT, task="gone", created_at=utcnow())
    for task in (kept, gone):
        await records.create(task_key(customer_id, task.id), task)
    assert await ids_listed(api, headers) == [gone.id, kept.id]
    await records.purge(task_key(customer_id, gone.id))  # as the retention sweep forgets a task
    never = Indexed.of(gone.model_copy(update={"id": "tk-00000000000c"}))  # its record never written
    await index.put(never.key, b"1")
    assert await ids_listed(api, headers) == [kept.id]
    response = await api.client.get("/v1/tasks", params={"before": gone.id}, headers=headers)
    assert response.status_code == 404 and "error" in response.json()
