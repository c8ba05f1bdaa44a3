"""Listing a customer's tasks as they pile up: ``GET /v1/tasks?limit=20`` over 100, 1,000 and 3,000 tasks of 20
messages each, for a customer whose transcripts are kept beside the task records (one key per message, as tasks
are stored now) beside one whose records hold their transcripts (as records written before were stored, and are
still read), measured in the same run, requests interleaved. Run by ./dev/bench; prints its figures."""

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
