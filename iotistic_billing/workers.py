"""The background loops' shared steps (the Stripe inbox's and the notice sender's workers, the operator's
watches and rollout ticks): a nap until woken or the poll interval is over, a stop that cannot hang,
the backoff of a loop whose dependency is away, and one loop's precedence over another of its process.

Python 3.11's `asyncio.wait_for` loses a cancellation that arrives as the awaited event is set
(gh-86296): a worker cancelled at that moment went on polling, and the `await` of its stop never
returned (a test's teardown hung 300 s while the loop logged a database that had shut down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

# Seconds a spell of busy work keeps precedence over the work that waits for it (Precedence).
PRECEDENCE_SECONDS = 30.0
# A task that ignored its cancellation is cancelled again this often until it ends.
CANCEL_AGAIN_SECONDS = 1.0
# Seconds a loop waits after its first failure in a row, doubling while it keeps failing, up to the most.
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0

T = TypeVar("T")


def backoff(failures: int, first: float, most: float) -> float:
    """Seconds to wait after `failures` failures in a row: none after none, then `first` doubling up to
    `most`."""
    if failures <= 0:
        return 0.0
    return float(min(most, first * 2 ** (failures - 1)))


class Outage:
    """A loop's failures in a row, and what it logs of them. The first failure of an outage (a dependency
    away, `problem` says which) is one warning line without a traceback, and the ones after it are
    quiet; an error nobody expected (`problem` None) is logged with its traceback each time. Either waits
    `backoff` of the failures so far, and a success logs `back` once an outage has been told and starts
    again from none: a PostgreSQL outage logged a traceback per try, three a second.

    Work its caller tries again on a clock of its own (each notice delivery after its own backoff, each
    Customer's trial notice at its next check) says how in `retried`, which its lines say instead of this
    backoff; the warning then quotes `problem` as given, the caller naming the error in it."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        back: str,
        first: float = RETRY_SECONDS,
        most: float = MAX_RETRY_SECONDS,
        retried: str | None = None,
    ) -> None:
        self.log = logger
        self.what, self.back = what, back
        self.first, self.most = first, most
        self.retried = retried
        self.failures = 0
        self._told = False  # this outage's warning is logged

    def failed(self, error: BaseException, problem: str | None) -> float:
        """One more failure, logged as above; the seconds to wait before the next try."""
        self.failures += 1
        delay = backoff(self.failures, self.first, self.most)
        if problem is None:
            self.log.error(
                "%s; %s", self.what, self.retried or f"trying again in {delay:.0f} s", exc_info=error
            )
        elif not self._told and self.retried is not None:
            self._told = True
            self.log.warning("%s: %s; %s", self.what, problem, self.retried)
        elif not self._told:
            self._told = True
            self.log.warning(
                "%s: %s (%s); trying again in %.0f s, backing off up to %.0f s",
                self.what,
                problem,
                type(error).__name__,
                delay,
                self.most,
            )
        return delay

    def succeeded(self) -> None:
        if self._told:
            self.log.info("%s after %d failed tries", self.back, self.failures)
        self.failures, self._told = 0, False


async def nap(wakeup: asyncio.Event, seconds: float) -> None:
    """Until `wakeup` is set or `seconds` have passed, whichever is first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wakeup.wait()


class Precedence:
    """Work of a process that goes first (the Stripe inbox applying a burst) and work that waits for it
    (the notice sender, on the same event loop and core): the second waits between its steps while the
    first is busy, but no longer than `most` seconds after that busy spell began, so work that never
    stops delays the other by `most`, not for ever."""

    def __init__(self, most: float = PRECEDENCE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.most = most
        self.clock = clock
        self._since: float | None = None  # when the busy spell began; None while idle
        self._idle = asyncio.Event()
        self._idle.set()

    def busy(self) -> None:
        if self._since is None:
            self._since = self.clock()
            self._idle.clear()

    def idle(self) -> None:
        self._since = None
        self._idle.set()

    async def wait_turn(self) -> None:
        """Until the busy spell ends or has lasted `most` seconds; at once when there is none."""
        left = None if self._since is None else self._since + self.most - self.clock()
        if left is not None and left > 0:
            await nap(self._idle, left)


async def to_the_end(work: Awaitable[T]) -> T:
    """`work`, which a cancellation lets finish before it goes on (through every cancellation repeated
    meanwhile, as stop_tasks repeats them): for work whose end matters more than the caller's, bounded by
    its own timeout. Cancelled, its outcome is no one's: it is dropped and the cancellation raised."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not log it as lost
        raise


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


__all__ = [
    "CANCEL_AGAIN_SECONDS",
    "MAX_RETRY_SECONDS",
    "PRECEDENCE_SECONDS",
    "RETRY_SECONDS",
    "Outage",
    "Precedence",
    "backoff",
    "nap",
    "stop_tasks",
    "to_the_end",
]
