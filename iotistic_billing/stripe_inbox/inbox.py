"""The Stripe event inbox: the webhook route stores each verified event as `pending` (store_event) and
answers; workers here apply them after that 2xx.

A few workers claim one pending event at a time (`FOR UPDATE SKIP LOCKED`, oldest `created` first, so
replicas share the work without taking the same event), apply it in that row's transaction and write
the result. A failure (API server or database down) rolls the apply back and leaves the event pending;
it is tried again after a backoff. Ordering per subscription does not depend on the order of apply:
`stripe_events.decide` refuses an event older than the state already applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import func

from iotistic_billing.db import models
from iotistic_billing.db.listen import listen
from iotistic_billing.stripe_inbox.apply import EventApplier
from iotistic_billing.stripe_inbox.events import StripeEvent
from iotistic_billing.workers import nap, stop_tasks

log = logging.getLogger(__name__)

Sessions = async_sessionmaker[AsyncSession]
# Counts an applied (or retried) event: (event type, result).
ResultCounter = Callable[[str, str], None]

PENDING: Final = "pending"
INBOX_CHANNEL: Final = "stripe_inbox"
WORKERS: Final = 4
POLL_SECONDS: Final = 1.0
RETRY_BACKOFF: Final = (1.0, 2.0, 5.0, 15.0, 60.0)


async def store_event(sessions: Sessions, event: StripeEvent, payload: dict[str, object]) -> bool:
    """Commit the verified event as pending; False when its id was already there (a redelivery)."""
    async with sessions() as session, session.begin():
        first = await session.scalar(
            insert(models.StripeEvent)
            .values(
                event_id=event.id, type=event.type, created=event.created, result=PENDING, payload=payload
            )
            # A concurrent delivery of the same id waits here for this transaction, then sees the row.
            .on_conflict_do_nothing(index_elements=[models.StripeEvent.event_id])
            .returning(models.StripeEvent.event_id)
        )
        if first is not None:
            # Delivered at commit to every inbox LISTENing, in whichever process or replica.
            await session.execute(select(func.pg_notify(INBOX_CHANNEL, event.id)))
    return first is not None


class EventInbox:
    def __init__(
        self,
        *,
        sessions: Sessions,
        applier: EventApplier,
        count: ResultCounter,
        workers: int = WORKERS,
        poll: float = POLL_SECONDS,
        database_url: str = "",
    ) -> None:
        self.sessions = sessions
        self.applier = applier
        self.count = count
        self.workers = workers
        self.poll = poll
        self.database_url = database_url
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # event id -> monotonic time before which it is not retried (per process; a restart retries now).
        self._not_before: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def wake(self) -> None:
        self._wakeup.set()

    async def start(self) -> None:
        if self.workers == 0:
            return
        self._tasks = [
            asyncio.create_task(self._work(), name=f"stripe-inbox-{i}") for i in range(self.workers)
        ]
        if self.database_url:
            self._tasks.append(
                asyncio.create_task(
                    listen(self.database_url, INBOX_CHANNEL, self.wake), name="stripe-inbox-listen"
                )
            )

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks = []

    async def _work(self) -> None:
        while True:
            try:
                applied = await self.apply_one()
            except Exception:  # the database is down: wait and try again, the events stay pending
                log.exception("stripe inbox: cannot claim an event")
                applied = False
            if applied:
                continue
            self._wakeup.clear()
            await nap(self._wakeup, self.poll)

    async def apply_one(self) -> bool:
        """Claim and apply the oldest pending event that is due; False when there is none."""
        now = time.monotonic()
        waiting = [event_id for event_id, due in self._not_before.items() if due > now]
        async with self.sessions() as session, session.begin():
            query = (
                select(models.StripeEvent.event_id, models.StripeEvent.payload)
                .where(models.StripeEvent.result == PENDING)
                .order_by(models.StripeEvent.created, models.StripeEvent.received_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if waiting:
                query = query.where(models.StripeEvent.event_id.not_in(waiting))
            row = (await session.execute(query)).first()
            if row is None:
                return False
            event_id, payload = row
            event = StripeEvent.model_validate(payload)
            try:
                async with session.begin_nested():
                    outcome = await self.applier.apply(session, event)
            except Exception as error:
                self._backoff(event_id)
                await session.execute(
                    update(models.StripeEvent)
                    .where(models.StripeEvent.event_id == event_id)
                    .values(attempts=models.StripeEvent.attempts + 1, last_error=str(error)[:1000])
                )
                log.warning(
                    "stripe event %s (%s) not applied yet, will retry: %s",
                    event_id,
                    event.type,
                    type(error).__name__,
                )
                self.count(event.type, "retry")
                return True
            await session.execute(
                update(models.StripeEvent)
                .where(models.StripeEvent.event_id == event_id)
                .values(
                    result=outcome.result,
                    customer_id=outcome.customer_id,
                    applied_at=func.now(),
                    last_error=None,
                )
            )
        self._not_before.pop(event_id, None)
        self._failures.pop(event_id, None)
        self.count(event.type, outcome.result)
        log.info(
            "stripe event %s (%s): %s",
            event_id,
            event.type,
            outcome.result,
            extra={"event_id": event_id, "customer_id": outcome.customer_id, "result": outcome.result},
        )
        return True

    def _backoff(self, event_id: str) -> None:
        failures = self._failures.get(event_id, 0)
        self._failures[event_id] = failures + 1
        delay = RETRY_BACKOFF[min(failures, len(RETRY_BACKOFF) - 1)]
        self._not_before[event_id] = time.monotonic() + delay

    async def drain(self, within: float = 30.0) -> None:
        """Apply until nothing is pending and due (tests, and shutdown)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not await self.apply_one():
                return
        raise TimeoutError("stripe inbox not drained")


__all__ = ["INBOX_CHANNEL", "PENDING", "EventInbox", "store_event"]
