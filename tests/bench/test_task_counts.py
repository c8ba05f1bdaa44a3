"""A metrics scrape as ended tasks pile up (they are kept 30 days): ``GET /metrics`` over 1,000, 5,000 and 20,000
ended tasks and 20 in flight, reading every task record at each scrape (``task_count_interval_s`` 0, as every scrape
did before) beside reading only the tasks in flight (the ended ones counted within the interval), measured in the
same run, scrapes interleaved. Run by ./dev/bench; prints its figures."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any, cast

from control.ids import new_id
from control.models import Task, TaskStatus
from control.services.tasks import task_key
from control.store import Repo
from tests.conftest import Api

SIZES = (1000, 5000, 20000)
IN_FLIGHT = 20
ROUNDS = int(os.environ.get("BENCH_SCRAPE_ROUNDS", "7"))


async def test_a_scrape_as_ended_tasks_pile_up(api: Api) -> None:
    records = Repo(api.control.jet.kv["tasks"], Task)
    customer_id, _ = await api.new_customer("piled")
    ended = cast(Any, api.control.stats)._ended

    async def add(count: int, status: TaskStatus) -> None:
        for start in range(0, count, 500):
            batch = range(min(500, count - start))
            made = [Task(id=new_id("tk"), customer_id=customer_id, task="count", status=status) for _ in batch]
            if status is not TaskStatus.COMPLETED:
                for task in made:
                    await api.control.quotas.reserve_task(customer_id, task.id)
            await asyncio.gather(*(records.create(task_key(customer_id, t.id), t) for t in made))

    await add(IN_FLIGHT, TaskStatus.RUNNING)
    made = 0
    print()
    print(f"GET /metrics, {IN_FLIGHT} tasks in flight, median of {ROUNDS} interleaved scrapes")
    for size in SIZES:
        await add(size - made, TaskStatus.COMPLETED)
        made = size
        times: dict[str, list[float]] = {"every record (before)": [], "in flight only": []}
        for _ in range(ROUNDS):
            for name, max_age_s in zip(times, (0.0, 3600.0), strict=True):
                ended._max_age_s = max_age_s
                started = time.perf_counter()
                scraped = await api.client.get("/metrics")
                times[name].append(time.perf_counter() - started)
                assert scraped.status_code == 200
                assert f'caravan_tasks{{status="completed"}} {size}' in scraped.text
                assert f'caravan_tasks{{status="running"}} {IN_FLIGHT}' in scraped.text
        medians = {name: statistics.median(values) for name, values in times.items()}
        ratio = medians["in flight only"] / medians["every record (before)"]
        row = "  ".join(f"{name} {value * 1000:6.1f} ms" for name, value in medians.items())
        print(f"{size:6d} ended tasks  {row}  ratio {ratio:.3f}x")
