"""Listing a customer's tasks as they pile up.

- ``GET /v1/tasks?limit=20`` over 100, 1,000 and 3,000 tasks of 20 messages each, for a customer whose transcripts
  are kept beside the task records (one key per message, as tasks are stored now) beside one whose records hold
  their transcripts (as records written before were stored, and are still read);
- the newest 20 of 1,000, 5,000 and 20,000 tasks listed through the tasks' index (as ``GET /v1/tasks`` lists them
  now), beside the same page found by reading every record of the customer (as it was listed before); and a page
  of a status no task has: ``running`` (of tasks in flight: the records of the tasks that hold a quota slot are
  read, here none) and ``killed`` (an ended task's status: the records of the tasks not known to have ended are
  read, here none once the first such listing, timed apart, read them and marked them ended).

Measured in the same run, requests interleaved. Run by ./dev/bench; prints its figures."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from agent.protocol import utcnow
from control.ids import new_id
from control.models import Task, TaskMessage, TaskStatus, TranscriptEntry
from control.services.tasks import task_key
from control.store import Repo
from tests.conftest import Api

SIZES = (100, 1000, 3000)
MESSAGES = 20
ROUNDS = int(os.environ.get("BENCH_LISTING_ROUNDS", "7"))


async def test_listing_tasks_as_they_pile_up(api: Api) -> None:
    records = Repo(api.control.jet.kv["tasks"], Task)
    transcripts = api.control.jet.kv["transcripts"]
    message = TaskMessage(source="writer", type="TextMessage", content="x" * 200, at=utcnow())
    entry = TranscriptEntry(attempt=1, message=message).model_dump_json().encode()
    beside_id, beside = await api.new_customer("beside")
    inside_id, inside = await api.new_customer("inside")
    made = 0
    seq = 0

    async def add(count: int) -> None:
        nonlocal seq
        for _ in range(count):
            task = Task(id=new_id("tk"), customer_id=beside_id, task="count", status=TaskStatus.COMPLETED)
            await records.create(task_key(beside_id, task.id), task)
            keys = [f"{task_key(beside_id, task.id)}.{seq + n}" for n in range(MESSAGES)]
            seq += MESSAGES
            await asyncio.gather(*(transcripts.put(key, entry) for key in keys))
            old = Task(id=new_id("tk"), customer_id=inside_id, task="count", status=TaskStatus.COMPLETED)
            await records.create(task_key(inside_id, old.id), old.model_copy(update={"messages": [message] * MESSAGES}))

    print()
    print(f"GET /v1/tasks?limit=20, tasks of {MESSAGES} messages, median of {ROUNDS} interleaved requests")
    for size in SIZES:
        await add(size - made)
        made = size
        for headers in (beside, inside):  # the records the index does not know yet are indexed at the first
            await api.client.get("/v1/tasks?limit=20", headers=headers)
        times: dict[str, list[float]] = {"transcripts beside": [], "in the record (before)": []}
        for _ in range(ROUNDS):
            for name, headers in zip(times, (beside, inside), strict=True):
                started = time.perf_counter()
                response = await api.client.get("/v1/tasks?limit=20", headers=headers)
                times[name].append(time.perf_counter() - started)
                listed = response.json()
                assert len(listed) == 20 and all(len(t["messages"]) == MESSAGES for t in listed)
        medians = {name: statistics.median(values) for name, values in times.items()}
        ratio = medians["transcripts beside"] / medians["in the record (before)"]
        row = "  ".join(f"{name} {value * 1000:6.1f} ms" for name, value in medians.items())
        print(f"{size:5d} tasks  {row}  ratio {ratio:.2f}x")


INDEX_SIZES = (1000, 5000, 20000)


async def test_a_page_of_tasks_through_the_index_beside_every_record_read(api: Api) -> None:
    control = api.control
    records = Repo(control.jet.kv["tasks"], Task)
    customer_id, _ = await api.new_customer("many")

    async def every_record_read(status: TaskStatus | None) -> list[Task]:
        """The page as the listing found it before the index: every record of the customer read, then sorted."""
        tasks = [t for t in await records.list(f"{customer_id}.*") if status is None or t.status == status]
        newest = sorted(tasks, key=lambda t: (t.created_at, t.id), reverse=True)[:20]
        return await control.tasks._with_transcripts(newest)

    print()
    print(f"the newest 20 tasks, median of {ROUNDS} interleaved listings (TaskService.list beside every record read)")
    made = 0
    for size in INDEX_SIZES:
        batch = [
            Task(id=new_id("tk"), customer_id=customer_id, agent_id="ag-000000000001", task="t", status="completed")
            for _ in range(size - made)
        ]
        for start in range(0, len(batch), 500):
            await asyncio.gather(*(records.create(task_key(customer_id, t.id), t) for t in batch[start : start + 500]))
        made = size
        healed = time.perf_counter()
        await control.tasks.list(customer_id, limit=20)
        healed = time.perf_counter() - healed
        marked = time.perf_counter()
        await control.tasks.list(customer_id, TaskStatus.KILLED, limit=20)
        marked = time.perf_counter() - marked
        for status in (None, TaskStatus.RUNNING, TaskStatus.KILLED):
            times: dict[str, list[float]] = {"index": [], "every record (before)": []}
            for _ in range(ROUNDS):
                started = time.perf_counter()
                listed = await control.tasks.list(customer_id, status, limit=20)
                times["index"].append(time.perf_counter() - started)
                started = time.perf_counter()
                before = await every_record_read(status)
                times["every record (before)"].append(time.perf_counter() - started)
                assert [t.id for t in listed] == [t.id for t in before]
                assert len(listed) == (20 if status is None else 0)
            medians = {name: statistics.median(values) for name, values in times.items()}
            ratio = medians["index"] / medians["every record (before)"]
            row = "  ".join(f"{name} {value * 1000:7.1f} ms" for name, value in medians.items())
            shown = "any status" if status is None else f"status={status.value}"
            print(f"{size:6d} tasks  {shown:15s} {row}  ratio {ratio:.3f}x")
        print(f"{'':6s}        (the first listing, which indexed the {len(batch)} new records: {healed * 1000:.0f} ms;")
        print(f"{'':6s}        the first of an ended status, which read them and marked them: {marked * 1000:.0f} ms)")
