"""A worker's stop ends it even when it swallows a cancellation (as Python 3.11's wait_for can)."""

from __future__ import annotations

import asyncio

from iotistic_billing.workers import nap, stop_tasks


async def test_a_task_that_swallows_its_first_cancellation_is_stopped_all_the_same() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # the lost cancellation: the loop goes on

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_tasks([task]), 5)
    assert task.cancelled() and swallowed == 1


async def test_a_nap_ends_when_woken_or_when_its_time_is_over() -> None:
    wakeup = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await nap(wakeup, 0.05)
    assert loop.time() - started >= 0.05
    wakeup.set()
    started = loop.time()
    await nap(wakeup, 5)
    assert loop.time() - started < 1
