"""Shutdown must not hang on a task that lost its cancellation (asyncio.wait_for on Python 3.11 can swallow one)."""

from __future__ import annotations

import asyncio

from agent.aio import cancel_and_wait


async def test_a_task_that_swallowed_a_cancellation_is_still_ended() -> None:
    swallowed = 0

    async def loses_the_first_cancellation() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what wait_for does when the cancellation meets its inner future's result
                current = asyncio.current_task()
                assert current is not None
                current.uncancel()

    task = asyncio.create_task(loses_the_first_cancellation())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, nudge_s=0.05), timeout=30)
    assert task.cancelled() and swallowed == 1


async def test_an_error_the_task_ended_with_reaches_the_caller() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    try:
        await cancel_and_wait(task)
    except ValueError as exc:
        assert str(exc) == "broken"
    else:
        raise AssertionError("the task's error was swallowed")
