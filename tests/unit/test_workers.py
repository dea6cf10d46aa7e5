"""A worker's stop ends it even when it swallows a cancellation (as Python 3.11's wait_for can); a
precedence holds the waiting work while the busy work runs, for its longest at most."""

from __future__ import annotations

import asyncio

from iotistic_billing.workers import Precedence, nap, stop_tasks


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


async def test_the_waiting_work_goes_at_once_when_idle_and_after_the_busy_spell_ends() -> None:
    precedence = Precedence(most=30, clock=lambda: 100.0)
    await asyncio.wait_for(precedence.wait_turn(), 1)  # never busy: at once
    precedence.busy()
    waiting = asyncio.create_task(precedence.wait_turn())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    precedence.busy()  # still the same spell
    precedence.idle()
    await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(precedence.wait_turn(), 1)


async def test_a_busy_spell_holds_the_waiting_work_for_its_longest_at_most() -> None:
    now = [100.0]
    precedence = Precedence(most=30, clock=lambda: now[0])
    precedence.busy()
    now[0] = 120.0
    waiting = asyncio.create_task(precedence.wait_turn())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # 10 s of the 30 are left
    waiting.cancel()
    now[0] = 130.5  # the spell goes on past its longest: the waiting work goes, busy or not
    await asyncio.wait_for(precedence.wait_turn(), 1)
    precedence.idle()
    precedence.busy()  # a new spell holds it again from its own start
    waiting = asyncio.create_task(precedence.wait_turn())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    precedence.idle()
    await asyncio.wait_for(waiting, 1)
