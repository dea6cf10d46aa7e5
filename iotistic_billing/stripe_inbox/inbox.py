"""The Stripe event inbox: the webhook route stores each verified event as `pending` (store_event) and
answers; a loop here applies them after that 2xx.

One batch at a time, across every replica: a loop takes the batch lock (a transaction-level advisory
lock), claims the pending events that are due, up to a batch (a count, and a size of their JSON: a
batch's payloads are held in memory), oldest `created` first, applies them in that one transaction,
the events of each Customer coalesced into one decision and one write (apply.py; `workers` Customers
at once), and records every event's result in it. Batches
in turn keep each Customer's events in Stripe's order whichever replica claims them (two batches side by
side could apply a Customer's newer event first and leave the older one stale, its notice unsent), and
`events.decide` still refuses an event older than the state applied (a late delivery). A crash rolls the
whole batch back and releases the lock: its events are pending for the next batch, of any replica. A
failure of one Customer (API server away, a write refused) leaves that Customer's events pending, retried
after a backoff, and its newer events wait with them (a newer one applied first would leave the failed
one stale, its notice unsent); the others are recorded.

Applying yields to accepting: the process runs niced, and while events keep arriving its batches start
at most twice a second and pause after a long one (`pause_after`), so that under load each batch
coalesces more events into the same number of Customer writes (the cost of a batch grows with its
Customers, not with its events). The route NOTIFYs the inboxes once a burst, not once an event.

The inbox also prunes, every PRUNE_SECONDS, the events of a final result older than its retention
(retention.py), and gives a Customer made again without its subscription the one its rows hold, at its
start and every RESTORE_SECONDS, under the batch lock (restore.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Container, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from sqlalchemy import Text, all_, any_, bindparam, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import func

from iotistic_billing.db import models
from iotistic_billing.db.listen import listen
from iotistic_billing.db.pool import (
    DATABASE_UNREACHABLE,
    Pool,
    connection,
    database_unreachable,
)
from iotistic_billing.db.retention import PRUNE_BATCH, prune_every, prune_expired, retention_cutoff
from iotistic_billing.db.schema import SchemaGate, after_schema
from iotistic_billing.k8s import KubernetesUnavailable, refusal_message
from iotistic_billing.stripe_inbox.apply import EventApplier, Failure, Outcome, Results, apply_events
from iotistic_billing.stripe_inbox.events import StripeEvent
from iotistic_billing.stripe_inbox.restore import RESTORE_SECONDS, restore, tell, to_restore
from iotistic_billing.stripe_inbox.retention import expired
from iotistic_billing.workers import Outage, Precedence, nap, stop_tasks

log = logging.getLogger(__name__)

Sessions = async_sessionmaker[AsyncSession]
# Counts an applied (or retried) event: (event type, result).
ResultCounter = Callable[[str, str], None]

PENDING: Final = "pending"
# The result an event left pending for a retry is counted under (iotistic_stripe_webhook_events_total).
RETRY: Final = "retry"
INBOX_CHANNEL: Final = "stripe_inbox"
# The advisory lock one batch at a time holds, in every replica (any bigint; this one spells "inbox").
BATCH_LOCK: Final = 0x696E626F78
# Customers of a batch looked up, read and applied at once.
WORKERS: Final = 4
# Events claimed at once: the more are pending, the more of them share each Customer's write (a burst
# of a thousand renewals, several events each, coalesces only when a batch sees them all).
BATCH: Final = 5000
# The JSON a batch claims at most, in bytes (one event more when the first alone is larger): parsed, a
# payload takes about six times its text in memory, so a batch holds about 100 MiB at most, whatever
# the size of the events (the chart gives the webhook server 512 Mi).
BATCH_BYTES: Final = 16 * 1024 * 1024
# Whose events a batch applies at most (a batch's cost grows with its Customers, not its events): the
# claimed events of the Customers past them are left for the next batch.
BATCH_CUSTOMERS: Final = 500
# While events keep arriving, batches start at most once a CYCLE (seconds), and a batch is followed by a
# pause of at least PAUSE_RATIO times its duration (at most MAX_PAUSE seconds).
CYCLE: Final = 0.5
PAUSE_RATIO: Final = 0.5
MAX_PAUSE: Final = 2.0
POLL_SECONDS: Final = 1.0
# A process that stores events NOTIFYs the inboxes at most this often (one NOTIFY a burst, not one an
# event: the commit of a transaction that NOTIFYs takes a lock of the whole database).
NOTIFY_SECONDS: Final = 0.05
RETRY_BACKOFF: Final = (1.0, 2.0, 5.0, 15.0, 60.0)


# One statement, its own transaction: a delivery costs the route one round trip to PostgreSQL. A
# concurrent delivery of the same id waits at the key for the other's commit, then finds the row.
STORE_EVENT: Final = f"""
INSERT INTO stripe_events (event_id, type, created, result, payload, payload_bytes)
VALUES ($1, $2, $3, '{PENDING}', $4::jsonb, $5)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""  # noqa: S608 - PENDING is a constant


async def store_event(pool: Pool, event: StripeEvent, payload: bytes) -> bool:
    """Commit the verified event (`payload`: its JSON, UTF-8, stored whole) as pending; False when its id
    was already there (a redelivery). The caller then wakes the inbox (`EventInbox.wake`), which tells
    every replica's inbox. DatabaseUnavailable when PostgreSQL cannot be reached: nothing was stored."""
    # Through connection(), which waits 5 s for a pooled one: the pool's own fetchval waits for ever, and
    # Stripe, its delivery timed out, retries what a 503 would have told it to.
    async with connection(pool) as conn:
        first = await conn.fetchval(
            STORE_EVENT, event.id, event.type, event.created, payload.decode(), len(payload)
        )
    return first is not None


class EventInbox:
    def __init__(
        self,
        *,
        sessions: Sessions,
        applier: EventApplier,
        count: ResultCounter,
        workers: int = WORKERS,
        batch: int = BATCH,
        batch_bytes: int = BATCH_BYTES,
        batch_customers: int = BATCH_CUSTOMERS,
        cycle: float = CYCLE,
        pause_ratio: float = PAUSE_RATIO,
        poll: float = POLL_SECONDS,
        database_url: str = "",
        clock: Callable[[], float] = time.monotonic,
        retention: timedelta = timedelta(days=90),
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        restore_interval: float = RESTORE_SECONDS,
        schema: SchemaGate | None = None,
    ) -> None:
        self.sessions = sessions
        # What the claims, the prunes and the restores wait for before their first query (db/schema.py).
        self.schema = schema
        # Seconds between the looks for Customers made again without their subscription (restore.py).
        self.restore_interval = restore_interval
        # STRIPE_EVENT_RETENTION_DAYS, and the wall clock the prune counts it on (retention.py).
        self.retention = retention
        self.now = now
        # Busy from a claim that found events to one that found none: the notice sender of this process
        # waits meanwhile (up to PRECEDENCE_SECONDS), so a burst's mail does not slow its applying.
        self.precedence = Precedence(clock=clock)
        self.applier = applier
        self.count = count
        self.workers = workers
        self.batch = batch
        self.batch_bytes = batch_bytes
        self.batch_customers = batch_customers
        self.cycle = cycle
        self.pause_ratio = pause_ratio
        self.poll = poll
        self.database_url = database_url
        self._wakeup = asyncio.Event()
        self._stored = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Per process (a restart retries at once): failed events, left out of the claims, and what they
        # hold back until their retry (`Failure.holds`: their Customers, the ids of a failed lookup).
        self._events_backoff = RetryBackoff(clock)
        self._held_back = RetryBackoff(clock)
        # What each failed event in the backoff holds back (`Failure.holds`): a replay of one retries the
        # events that hold back any of it.
        self._failed_of: dict[str, frozenset[str]] = {}
        # From the batch lock to the commit, of the last batch that recorded anything.
        self.last_batch_seconds = 0.0
        self._claims = Outage(log, "stripe inbox: cannot claim events", "stripe inbox: claiming events again")
        self._restores = Outage(
            log, "stripe inbox: cannot restore subscriptions", "stripe inbox: restoring subscriptions again"
        )
        self._retries = RetryCauses()

    def wake(self) -> None:
        """Events were stored: this process's loop, if it runs one, and every inbox LISTENing."""
        self._wakeup.set()
        self._stored.set()

    async def start(self) -> None:
        if self.database_url:
            self._tasks.append(asyncio.create_task(self._notify(), name="stripe-inbox-notify"))
        if self.workers == 0:
            return
        self._tasks.append(asyncio.create_task(after_schema(self.schema, self._work), name="stripe-inbox"))
        self._tasks.append(
            asyncio.create_task(
                after_schema(self.schema, lambda: prune_every("finished Stripe events", self.prune_finished)),
                name="stripe-inbox-prune",
            )
        )
        self._tasks.append(
            asyncio.create_task(after_schema(self.schema, self._restore_every), name="stripe-inbox-restore")
        )
        if self.database_url:
            self._tasks.append(
                asyncio.create_task(
                    listen(self.database_url, INBOX_CHANNEL, self._wakeup.set, notified=self.replayed),
                    name="stripe-inbox-listen",
                )
            )

    def replayed(self, payload: str) -> None:
        """A NOTIFY on the inbox channel naming an event (the console's replay, console/pages.py): it is
        tried at once, with its Customer's other failed events (the older ones must come first), their
        backoffs forgotten. A delivery's NOTIFY names none and forgets nothing: a failing Customer
        would be retried on every delivery."""
        if not payload:
            return
        self._events_backoff.forget(payload)
        holds = self._failed_of.get(payload)
        if holds is None:
            return
        for key in holds:
            self._held_back.forget(key)
        for event_id in [event_id for event_id, of in self._failed_of.items() if not of.isdisjoint(holds)]:
            self._events_backoff.forget(event_id)
            del self._failed_of[event_id]

    async def _notify(self) -> None:
        """One NOTIFY for the events stored since the last, at most every NOTIFY_SECONDS."""
        while True:
            await self._stored.wait()
            self._stored.clear()
            try:
                async with self.sessions() as session, session.begin():
                    await session.execute(select(func.pg_notify(INBOX_CHANNEL, "")))
            except Exception as error:  # the inboxes poll: they find the events within POLL_SECONDS
                log.warning("stripe inbox: cannot NOTIFY (%s)", type(error).__name__)
            await asyncio.sleep(NOTIFY_SECONDS)

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks = []

    async def _work(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                recorded = await self.apply_pending()
            except Exception as error:
                # The events stay pending; the listener's wake once PostgreSQL is back ends the wait.
                self.precedence.idle()
                problem = DATABASE_UNREACHABLE if database_unreachable(error) else None
                await nap(self._wakeup, self._claims.failed(error, problem))
                continue
            self._claims.succeeded()
            if recorded:
                if self._wakeup.is_set():
                    await asyncio.sleep(pause_after(self.last_batch_seconds, self.cycle, self.pause_ratio))
                continue
            await nap(self._wakeup, self.poll)

    async def apply_pending(self) -> int:
        """Claim up to `batch` due pending events of up to `batch_bytes` of JSON, oldest `created` first,
        apply them Customer by Customer in one transaction, and record each one's result; how many were
        recorded (0: none was due)."""
        waiting, held_back = self._events_backoff.waiting(), self._held_back.waiting()
        # Those the backoff forgot (recorded by another replica, or due long ago) are no one's failures now.
        self._failed_of = {k: v for k, v in self._failed_of.items() if k in self._events_backoff}
        self._retries.keep(self._events_backoff)
        async with self.sessions() as session, session.begin():
            await session.execute(select(func.pg_advisory_xact_lock(BATCH_LOCK)))
            started = time.monotonic()  # the wait for another replica's batch is not this one's work
            # A row without a payload (unmatched before migration 0002, replayed) is its one event's failure.
            size = func.coalesce(
                models.StripeEvent.payload_bytes, func.octet_length(models.StripeEvent.payload.cast(Text)), 0
            )
            query = (
                select(models.StripeEvent.event_id, size)
                .where(models.StripeEvent.result == PENDING)
                .order_by(models.StripeEvent.created, models.StripeEvent.received_at)
                .limit(self.batch)
                # Not SKIP LOCKED: the batch lock keeps batches apart, and a row another transaction holds
                # (the console's Replay, for milliseconds) skipped let a Customer's newer event go first.
                .with_for_update()
            )
            if waiting:
                query = query.where(
                    models.StripeEvent.event_id
                    != all_(bindparam("waiting", sorted(waiting), type_=ARRAY(Text)))
                )
            sized = (await session.execute(query)).all()
            claimed = await _payloads(session, within_size(sized, self.batch_bytes))
            if not claimed:
                self.precedence.idle()
                return 0
            self.precedence.busy()
            events: list[StripeEvent] = []
            results: Results = {}
            types: dict[str, str] = {}
            for event_id, payload in claimed:
                try:
                    event = StripeEvent.model_validate(payload)
                except ValidationError as invalid:  # stored verified; a row edited by hand lands here
                    results[event_id] = Failure(invalid)
                    types[event_id] = str((payload or {}).get("type", "unknown"))
                    continue
                events.append(event)
                types[event_id] = event.type
            results.update(
                await apply_events(
                    self.applier,
                    session,
                    events,
                    self.sessions,
                    self.workers,
                    self.batch_customers,
                    held_back,
                )
            )
            outcomes = {k: v for k, v in results.items() if isinstance(v, Outcome)}
            failures = {k: v for k, v in results.items() if isinstance(v, Failure)}
            await _record_outcomes(session, outcomes)
            await _record_failures(session, {k: failure.error for k, failure in failures.items()})
        self.last_batch_seconds = time.monotonic() - started
        for event_id, outcome in outcomes.items():
            self.applied(event_id)
            self.count(types[event_id], outcome.result)
            log.info(
                "stripe event %s (%s): %s",
                event_id,
                types[event_id],
                outcome.result,
                extra={"event_id": event_id, "customer_id": outcome.customer_id, "result": outcome.result},
            )
        for event_id, failure in failures.items():
            self.failed(event_id, failure, types[event_id])
            self.count(types[event_id], RETRY)
        return len(outcomes) + len(failures)

    def applied(self, event_id: str) -> None:
        """The event recorded: no backoff of its own, and its cause of failure over for it."""
        self._events_backoff.forget(event_id)
        self._failed_of.pop(event_id, None)
        self._retries.settled(event_id)

    def failed(self, event_id: str, failure: Failure, event_type: str) -> None:
        """The event left out of the claims for its backoff, and what it holds back until its retry at
        least: held back by another failure before, a key may be due earlier (one attempt's lookup
        failed, the next one's Customer read), and the event's newer events would go first. Its cause is
        logged once for all the events it fails (RetryCauses)."""
        self._retries.failed(event_id, event_type, failure)
        due = self._events_backoff.failed(event_id)
        for key in failure.holds:
            self._held_back.hold(key, due)
        if failure.holds:
            self._failed_of[event_id] = failure.holds

    async def _restore_every(self) -> None:
        """`restore_subscriptions` now and every `restore_interval` seconds; a failed look is logged (one
        line an outage of PostgreSQL or the API server) and the next one tries again."""
        while True:
            try:
                await self.restore_subscriptions()
            except Exception as error:
                problem = DATABASE_UNREACHABLE if database_unreachable(error) else None
                if isinstance(error, KubernetesUnavailable):
                    problem = str(error)
                self._restores.failed(error, problem)
            else:
                self._restores.succeeded()
            await asyncio.sleep(self.restore_interval)

    async def restore_subscriptions(self) -> int:
        """Give each Customer billed through Stripe and made again without its spec.subscription the
        newest live subscription on a plan of its customer id's rows (restore.py); how many were given
        one."""
        names = await to_restore(self.applier.kube, self.sessions)
        count = 0
        # As many Customers a transaction as a batch's at most: a fleet made again from Git at once does
        # not hold the events back for all of its writes.
        size = max(self.batch_customers, 1)
        for start in range(0, len(names), size):
            async with self.sessions() as session, session.begin():
                # Between batches: none of any replica decides these Customers' events meanwhile.
                await session.execute(select(func.pg_advisory_xact_lock(BATCH_LOCK)))
                restored = await restore(self.applier, session, names[start : start + size], self.workers)
            for one in restored:
                await tell(self.applier.kube, one)
            count += len(restored)
        return count

    async def prune_finished(self, batch: int = PRUNE_BATCH) -> int:
        """Delete the events of a final result older than the retention (retention.py), `batch` a
        transaction, until a batch finds fewer; how many were deleted."""
        cutoff = retention_cutoff(self.now(), self.retention)
        pruned = await prune_expired(self.sessions, models.StripeEvent.event_id, expired(cutoff), batch)
        if pruned:
            log.info("pruned %d Stripe events recorded before %s", pruned, cutoff.isoformat())
        return pruned

    async def drain(self, within: float = 30.0) -> None:
        """Apply until nothing is pending and due (tests, and shutdown)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not await self.apply_pending():
                return
        raise TimeoutError("stripe inbox not drained")


def retry_cause(error: Exception) -> tuple[str, str]:
    """Why an event was left pending: the cause the events failing alike share, and what the first of
    them logs of it. A permission missing (401, 403) refuses every Customer alike, so it is one cause by
    its status and reason (its message names one object); any other refusal (a value, an admission
    policy) or error is one by its message: keyed by its status alone, a second Customer's other 422
    stayed unlogged for as long as the first one's lasted."""
    if isinstance(error, ApiException):
        cause = f"the API server refused it: {error.status} {error.reason}"
        told = f"{cause} ({refusal_message(error)})"
        return (cause if error.status in (401, 403) else told), told
    if isinstance(error, KubernetesUnavailable):
        return str(error), str(error)
    if database_unreachable(error):
        return DATABASE_UNREACHABLE, DATABASE_UNREACHABLE
    return f"{type(error).__name__}: {error}", f"{type(error).__name__}: {error}"


class RetryCauses:
    """The causes of the events left pending, each an outage (workers.Outage) of its own: the first event
    it fails is one warning naming the cause, the event and its Customer; the same cause's next failures,
    of any event and any retry, are counted (RETRY), not logged; a line says when no event fails of it
    any more. An event per line and per retry, the retries capped at a minute, made 2,000 warnings a
    minute of 2,000 events refused alike, none saying more than the error's class."""

    def __init__(self) -> None:
        self._outages: dict[str, Outage] = {}
        self._cause_of: dict[str, str] = {}  # each failing event's last cause

    def failed(self, event_id: str, event_type: str, failure: Failure) -> None:
        cause, told = retry_cause(failure.error)
        if failure.customer is not None:
            whose = f"Customer {failure.customer}"
        else:  # its lookup failed: the ids it names
            whose = f"no Customer found yet ({', '.join(sorted(failure.holds)) or 'no id'})"
        log.debug(
            "stripe event %s (%s) of %s not applied yet, will retry: %s",
            event_id,
            event_type,
            whose,
            told,
            extra={"event_id": event_id, "customer": failure.customer},
        )
        self._cause_of[event_id] = cause
        if cause not in self._outages:
            self._outages[cause] = Outage(
                log,
                "stripe inbox: events not applied",
                f'stripe inbox: no event fails any more with "{cause}"',
                first=RETRY_BACKOFF[0],
                most=RETRY_BACKOFF[-1],
            )
        problem = f"{told}; the first, {event_id} ({event_type}) of {whose}; the others counted as {RETRY}"
        self._outages[cause].failed(failure.error, problem)
        self._end_over()

    def settled(self, event_id: str) -> None:
        """The event was recorded (applied, or by another replica)."""
        self._cause_of.pop(event_id, None)
        self._end_over()

    def keep(self, failing: Container[str]) -> None:
        """Only the events still `failing` (those the backoff keeps): the others are no one's failures."""
        self._cause_of = {k: v for k, v in self._cause_of.items() if k in failing}
        self._end_over()

    def _end_over(self) -> None:
        left = set(self._cause_of.values())
        for cause in [cause for cause in self._outages if cause not in left]:
            self._outages.pop(cause).succeeded()


class RetryBackoff:
    """Keys (event ids; what failed events hold back) not retried before their time: RETRY_BACKOFF by
    their failures in a row, or held until a time. One due long ago is forgotten: another replica
    recorded it, or it fails again and waits anew."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._due: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def failed(self, key: str) -> float:
        """When `key` is due again (clock time)."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        self._due[key] = self.clock() + RETRY_BACKOFF[min(failures, len(RETRY_BACKOFF) - 1)]
        return self._due[key]

    def hold(self, key: str, until: float) -> None:
        """`key` not due before `until` (nor before the time it was held until)."""
        self._due[key] = max(self._due.get(key, until), until)

    def forget(self, key: str) -> None:
        self._due.pop(key, None)
        self._failures.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def waiting(self) -> set[str]:
        """The keys whose time has not come."""
        now = self.clock()
        for key in [key for key, due in self._due.items() if due < now - RETRY_BACKOFF[-1]]:
            self.forget(key)
        return {key for key, due in self._due.items() if due > now}


def within_size(sized: Sequence[tuple[str, int]], budget: int) -> list[str]:
    """The event ids of `sized` (id, bytes; in claim order) from the first on, while their bytes add up
    to at most `budget`; the first one whatever its size, so that a large event is applied too."""
    kept: list[str] = []
    total = 0
    for event_id, size in sized:
        total += size
        if kept and total > budget:
            break
        kept.append(event_id)
    return kept


async def _payloads(session: AsyncSession, event_ids: list[str]) -> list[tuple[str, Any]]:
    """The payloads of the claimed `event_ids`, in that order (the rows are locked by the claim)."""
    if not event_ids:
        return []
    rows = await session.execute(
        select(models.StripeEvent.event_id, models.StripeEvent.payload).where(
            models.StripeEvent.event_id == any_(bindparam("claimed", event_ids, type_=ARRAY(Text)))
        )
    )
    payloads: dict[str, Any] = {event_id: payload for event_id, payload in rows}
    return [(event_id, payloads[event_id]) for event_id in event_ids]


def pause_after(batch_seconds: float, cycle: float = CYCLE, ratio: float = PAUSE_RATIO) -> float:
    """The pause after a batch while events keep arriving (a NOTIFY came during it): applying yields to
    accepting. A batch starts at most once a `cycle`, and a long batch (a busy machine: the inbox process
    runs niced) is followed by a longer pause still, so that the next batch coalesces more events into
    the same Customer writes instead of competing with the webhook route. A backlog with nothing
    arriving is applied without pauses (the loop does not call this)."""
    return min(max(cycle - batch_seconds, batch_seconds * ratio), MAX_PAUSE)


async def _record_outcomes(session: AsyncSession, outcomes: dict[str, Outcome]) -> None:
    """Each applied event's result, in one statement; only a row still pending is written (a claimed
    row is locked, so that is every one of them)."""
    if not outcomes:
        return
    rows = (
        func.unnest(
            bindparam("ids", list(outcomes), type_=ARRAY(Text)),
            bindparam("results", [o.result for o in outcomes.values()], type_=ARRAY(Text)),
            bindparam("customers", [o.customer_id for o in outcomes.values()], type_=ARRAY(Text)),
        )
        .table_valued("event_id", "result", "customer_id")
        .render_derived("outcome")
    )
    await session.execute(
        update(models.StripeEvent)
        .where(models.StripeEvent.event_id == rows.c.event_id, models.StripeEvent.result == PENDING)
        .values(
            result=rows.c.result,
            customer_id=rows.c.customer_id,
            # When it was recorded, after its Customer was written (now() would be the batch's start).
            applied_at=func.clock_timestamp(),
            last_error=None,
        )
        .execution_options(synchronize_session=False)
    )


async def _record_failures(session: AsyncSession, failures: dict[str, Exception]) -> None:
    """A failed attempt of each: counted, with its error; the event stays pending."""
    if not failures:
        return
    rows = (
        func.unnest(
            bindparam("ids", list(failures), type_=ARRAY(Text)),
            bindparam(
                "errors",
                [(str(error) or type(error).__name__)[:1000] for error in failures.values()],
                type_=ARRAY(Text),
            ),
        )
        .table_valued("event_id", "error")
        .render_derived("failure")
    )
    await session.execute(
        update(models.StripeEvent)
        .where(models.StripeEvent.event_id == rows.c.event_id, models.StripeEvent.result == PENDING)
        .values(attempts=models.StripeEvent.attempts + 1, last_error=rows.c.error)
        .execution_options(synchronize_session=False)
    )


__all__ = ["INBOX_CHANNEL", "PENDING", "RETRY", "EventInbox", "pause_after", "store_event"]
