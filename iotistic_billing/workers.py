"""The background loops' shared steps (the Stripe inbox's and the notice sender's workers, the operator's
watches and rollout ticks): a nap until woken or the poll interval is over, a stop that cannot hang,
and the backoff of a loop whose dependency is away.

Python 3.11's `asyncio.wait_for` loses a cancellation that arrives as the awaited event is set
(gh-86296): a worker cancelled at that moment went on polling, and the `await` of its stop never
returned (a test's teardown hung 300 s while the loop logged a database that had shut down).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

# A task that ignored its cancellation is cancelled again this often until it ends.
CANCEL_AGAIN_SECONDS = 1.0


def backoff(failures: int, first: float, most: float) -> float:
    """Seconds to wait after `failures` failures in a row: none after none, then `first` doubling up to
    `most`."""
    if failures <= 0:
        return 0.0
    return float(min(most, first * 2 ** (failures - 1)))


async def nap(wakeup: asyncio.Event, seconds: float) -> None:
    """Until `wakeup` is set or `seconds` have passed, whichever is first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wakeup.wait()


async def stop_tasks(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait until every one has ended, cancelling again any that goes on."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    while pending:
        _, still = await asyncio.wait(pending, timeout=CANCEL_AGAIN_SECONDS)
        for task in still:
            task.cancel()
        pending = list(still)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a worker logs its own failures


__all__ = ["CANCEL_AGAIN_SECONDS", "backoff", "nap", "stop_tasks"]
