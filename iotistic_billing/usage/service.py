"""Usage metering inside the webhook server: storing reports, the status flusher and the meter runs.

The request path stores a batch with one statement and notes the customer in the coalescer; nothing
there touches Kubernetes. A background task flushes the coalescer every `flush_interval`: per customer
that reported, one read of the Customer, the period's totals from PostgreSQL, the open rollup row
refreshed (and a row opened for an ended period whose reports all came after its end), and one merge
patch of status.usage and the WithinLimits condition when they changed.
Another task closes ended periods (a grace after their end, for late reports) and sends their Stripe
meter events every `meter_interval`; before it closes any, it flushes the customers whose recent
reports no rollup holds, from PostgreSQL (a server that stopped after its 202 and before its flush
took their coalescer entries with it). A third keeps the monthly partitions of usage_reports, at start
and every `partition_interval` (usage.partitions).
The flush runs once more when the server stops.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from kubernetes.client.exceptions import ApiException
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import Customer
from iotistic_billing.db import models
from iotistic_billing.db.pool import Connection, DatabaseUnavailable, Pool, Queryable, connection
from iotistic_billing.db.schema import SchemaGate, after_schema
from iotistic_billing.directory import CustomerRecord, Directory, remember
from iotistic_billing.errors import DependencyUnavailable
from iotistic_billing.k8s import FieldManager, Kube, KubernetesUnavailable
from iotistic_billing.licensing.plans import UNLICENSED_PLAN_NAME
from iotistic_billing.notices.content import usage_threshold
from iotistic_billing.notices.outbox import Outbox
from iotistic_billing.stripe_api import StripeApi
from iotistic_billing.usage.coalescer import Reported, UsageCoalescer
from iotistic_billing.usage.metering import (
    STRIPE_METER_WINDOW,
    MeterRun,
    MeterSender,
    StripeMeterSender,
    send_meter_events,
)
from iotistic_billing.usage.metrics import UsageMetrics
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.partitions import PartitionRun, maintain_partitions
from iotistic_billing.usage.periods import (
    LONGEST_PERIOD,
    BillingPeriod,
    billing_period,
    period_containing,
    period_ending_at,
)
from iotistic_billing.usage.pricing import PeriodTotals
from iotistic_billing.usage.reports import Accepted, ParsedReports, earliest_starts, report_rows
from iotistic_billing.usage.rollups import (
    catch_up_look_back,
    catch_up_spans,
    included_usage,
    note_caught_up,
    open_missing_rollups,
    reports_after_close,
    save_open_rollup,
    unheld_arrivals,
    unheld_starts_from,
    unsettled_period,
)
from iotistic_billing.usage.status import crossings, status_patch, usage_status
from iotistic_billing.usage.store import insert_reports, latest_report, period_totals

log = logging.getLogger(__name__)

# Customers flushed at once; the Cluster bounds its own API calls further.
FLUSH_CONCURRENCY: Final = 8
# A flush that loses the race with another writer of the status reads the Customer again this often.
CONFLICT_RETRIES: Final = 3
SHUTDOWN_FLUSH_TIMEOUT: Final = 10.0
# How far back a meter run looks for reports no rollup holds, at most: a report stored earlier ends in a
# period that ended more than Stripe's meter window ago, which Stripe would not bill any more.
CATCH_UP_LIMIT: Final = LONGEST_PERIOD + STRIPE_METER_WINDOW


def customer_period(customer: Customer, now: datetime) -> BillingPeriod:
    """The billing period `now` falls in for this Customer (see usage.periods).

    A subscription Stripe ended inside its period (cancelled immediately: by us, or by dunning once every
    retry failed) cuts that period at its endedAt: usage until then is the subscription's, metered for
    its last second inside it; from then on the months anchored at that end, on no paid plan
    (`cancelled_by`). Without the cut the period ran on to its old end on the paid plan, and its meter
    events, stamped then, fell after the subscription and on no invoice."""
    subscription = customer.spec.subscription
    if customer.spec.billing.mode != "stripe" or subscription is None:
        return billing_period(now, None)
    period = billing_period(now, subscription.current_period_end, subscription.current_period_start)
    ended = ended_early(customer)
    if ended is None:
        return period
    if now >= ended:
        return period_containing(now, ended)
    if period.start < ended < period.end:
        return BillingPeriod(period.start, ended)
    return period


def ended_early(customer: Customer) -> datetime | None:
    """When the Customer's Stripe subscription ended before its period's end (spec.subscription.endedAt
    inside currentPeriodStart .. currentPeriodEnd); None for one live, or ended at its period's end."""
    subscription = customer.spec.subscription
    if customer.spec.billing.mode != "stripe" or subscription is None:
        return None
    ended = subscription.ended_at
    end = subscription.current_period_end
    if ended is None or end is None or subscription.status not in ("canceled", "incomplete_expired"):
        return None
    start = subscription.current_period_start or period_ending_at(end).start
    return ended if start < ended < end else None


async def open_period(conn: Queryable, customer_id: str, customer: Customer, now: datetime) -> BillingPeriod:
    """The period the customer's usage at `now` is billed in: `customer_period`, started no earlier
    than the end of the customer's closed (or ended) rollups, so that no report is in two of them."""
    return await unsettled_period(conn, customer_id, customer_period(customer, now), now)


def bills_manually(customer: Customer) -> bool:
    """Whether the Customer is billed manually (spec.billing.mode: manual): its periods are invoiced by
    hand, never sent to Stripe."""
    return customer.spec.billing.mode == "manual"


def customer_plan(customer: Customer, period: BillingPeriod | None = None) -> str:
    """The Customer's effective plan once the operator has set it, else spec.plan; a period is priced
    against it unless it lapsed from a paid plan within the period (rollups.period_plan).

    Not a paid plan in a `period` that starts once a subscription set to cancel at its period's end has
    ended: the status says the plan until the operator's pass at that end (its housekeeping's next check),
    and the first flush of the next period (a report ending at the boundary) recorded the plan for all of
    it (period_plan keeps it)."""
    if period is not None and cancelled_by(customer, period.start):
        return UNLICENSED_PLAN_NAME
    return customer.status.plan or customer.spec.plan


def cancelled_by(customer: Customer, moment: datetime) -> bool:
    """Whether the Customer's Stripe subscription was set to cancel at its period's end and that end had
    come by `moment`, or Stripe had ended it by `moment` (spec.subscription.endedAt): a period starting
    then holds no paid plan, not even one a flush recorded for it before the ending was applied."""
    subscription = customer.spec.subscription
    return (
        customer.spec.billing.mode == "stripe"
        and subscription is not None
        and (subscription.ended_at_period_end(moment) or subscription.ended_by(moment) is not None)
    )


def ended_period_plan(customer: Customer, period: BillingPeriod, held: str | None) -> str:
    """The plan an ended period first rolled up after its end is priced against: the one it `held` by
    the licence history (rollups.PlanHistory.held), `customer_plan` now when the history holds none of
    it. Not a paid plan in a period starting once a subscription set to cancel at its period's end had
    ended: the paid licence stays in force past that end until the operator's pass lapses it."""
    if held is None or cancelled_by(customer, period.start):
        return customer_plan(customer, period)
    return held


@dataclass(frozen=True)
class FlushResult:
    patched: int = 0
    unchanged: int = 0
    missing: int = 0
    failed: int = 0

    def __add__(self, other: FlushResult) -> FlushResult:
        return FlushResult(
            self.patched + other.patched,
            self.unchanged + other.unchanged,
            self.missing + other.missing,
            self.failed + other.failed,
        )


class UsageMetering:
    def __init__(
        self,
        *,
        pool: Pool,
        options: UsageOptions,
        session_factory: Callable[[], AsyncSession],
        directory: Directory,
        kube: Kube,
        stripe: StripeApi | None,
        metrics: UsageMetrics,
        clock: Callable[[], datetime],
        outbox: Outbox | None = None,
        schema: SchemaGate | None = None,
    ) -> None:
        self.pool = pool
        # What the timers' first runs wait for (db/schema.py); the flush at shutdown does not: nothing
        # was reported to this server before its schema was current (readiness).
        self.schema = schema
        self.options = options
        self.session_factory = session_factory
        self.directory = directory
        self.kube = kube
        self.metrics = metrics
        self.clock = clock
        self.outbox = outbox or Outbox()
        self.coalescer = UsageCoalescer()
        # Shared by the timer's flush and the meter run's (flush_unheld): together they hold no more
        # pooled connections than one flush, and leave the rest to the reports.
        self._flush_slots = asyncio.Semaphore(FLUSH_CONCURRENCY)
        # Replaceable, so that tests can wrap the real sender (a crash after Stripe's answer).
        self.meter_sender: MeterSender | None = (
            StripeMeterSender(stripe.client) if stripe is not None else None
        )
        self._tasks: list[asyncio.Task[None]] = []

    # ----- the request path -----

    async def store(self, parsed: ParsedReports, received_at: datetime) -> Accepted:
        """Store the reports exactly once (one transaction) and note their customers, and the earliest
        period start each reported, for the flusher."""
        accepted = await insert_reports(self.pool, report_rows(parsed.reports))
        duplicate = len(parsed.reports) - accepted
        self.coalescer.saw(earliest_starts(parsed.reports), received_at)
        if accepted:
            self.metrics.reports.labels("accepted").inc(accepted)
        if duplicate:
            self.metrics.reports.labels("duplicate").inc(duplicate)
        return Accepted(accepted, duplicate)

    # ----- the status flush -----

    async def flush(self) -> FlushResult:
        """One merge patch per customer that reported since the last flush (see the module's note)."""
        return await self._flush(self.coalescer.drain())

    async def _flush(self, entries: dict[str, Reported]) -> FlushResult:
        """Flush `entries`; what cannot be written goes back to the coalescer for the next flush."""
        if not entries:
            return FlushResult()
        try:
            return await self._flush_entries(entries)
        except asyncio.CancelledError:
            # stop() cancels a flush that has taken these customers (a BaseException, past the excepts
            # below): back in the coalescer, the flush at shutdown writes them.
            self.coalescer.requeue(entries)
            raise

    async def _flush_entries(self, entries: dict[str, Reported]) -> FlushResult:
        try:
            records = await self._records(entries)
        except Exception as error:
            # The API server or PostgreSQL is down: nothing is lost, the customers wait for the next flush.
            log.warning("usage flush: cannot read Customers (%s); retried next flush", type(error).__name__)
            self.coalescer.requeue(entries)
            self.metrics.status_flushes.labels("failed").inc(len(entries))
            return FlushResult(failed=len(entries))

        async def flush_one(customer_id: str) -> str:
            record = records.get(customer_id)
            if record is None:
                # Reports of a customer id no Customer holds (deleted, or an admin's typo): kept, not shown.
                return "missing"
            async with self._flush_slots:
                try:
                    return await self._flush_customer(record, entries[customer_id])
                except (
                    DependencyUnavailable,
                    DatabaseUnavailable,
                    KubernetesUnavailable,
                    ApiException,
                ) as error:
                    log.warning("usage flush of %s failed (%s); retried next flush", customer_id, error)
                except Exception:
                    log.exception("usage flush of %s failed; retried next flush", customer_id)
                self.coalescer.requeue({customer_id: entries[customer_id]})
                return "failed"

        outcomes = await asyncio.gather(*(flush_one(customer_id) for customer_id in entries))
        for outcome in outcomes:
            self.metrics.status_flushes.labels(outcome).inc()
        return FlushResult(
            patched=outcomes.count("patched"),
            unchanged=outcomes.count("unchanged"),
            missing=outcomes.count("missing"),
            failed=outcomes.count("failed"),
        )

    async def _records(self, customer_ids: Iterable[str]) -> dict[str, CustomerRecord]:
        """The Customers of `customer_ids`: a GET each where the mirror knows the name, one LIST for the
        rest; the mirror is refreshed on the way (it links Stripe customers for the meter runs)."""
        wanted = set(customer_ids)
        async with self.session_factory() as session:
            rows = await session.execute(
                select(models.Customer.customer_id, models.Customer.resource_name).where(
                    models.Customer.customer_id.in_(wanted)
                )
            )
            # No name: the Customer was deleted and its name reused (its reports are late ones).
            names = {customer_id: name for customer_id, name in rows if name is not None}
        records: dict[str, CustomerRecord] = {}
        for customer_id, name in names.items():
            record = await self.directory.by_name(name)
            if record is not None and record.customer_id == customer_id:
                records[customer_id] = record
        if wanted - records.keys():
            for record in await self.directory.all():
                if record.customer_id in wanted and record.customer_id not in records:
                    records[record.customer_id] = record
        async with self.session_factory() as session, session.begin():
            for record in records.values():
                await remember(session, record.customer, record.customer_id)
        return records

    async def _flush_customer(self, record: CustomerRecord, reported: Reported) -> str:
        for attempt in range(CONFLICT_RETRIES):
            now = self.clock()
            customer = record.customer
            async with connection(self.pool) as conn:
                period = await open_period(conn, record.customer_id, customer, now)
                totals = await period_totals(conn, record.customer_id, period)
                latest = await latest_report(conn, record.customer_id)
                current = customer_plan(customer, period)
                # The mode now, kept on the row: a checkout that cuts it short must not make it Stripe's.
                rollup = await save_open_rollup(
                    conn,
                    record.customer_id,
                    period,
                    current,
                    totals,
                    billed_manually=bills_manually(customer),
                    lapsed=cancelled_by(customer, period.start),
                )
                # Once a flush: a retry after a conflict logged each missed period again. Only a
                # report starting before the period can end before it, in an ended period.
                if attempt == 0 and reported.earliest_start < period.start:
                    await self._roll_up_ended_periods(conn, record, reported, period)
            # The period's plan (rollups.period_plan): a lapse keeps the paid plan's included usage.
            plan = rollup.plan
            await self._notice_crossings(record, period, totals, plan)
            updated = usage_status(
                customer.status,
                period=period,
                active_devices=latest[0] if latest is not None else None,
                last_report_at=reported.at,
                totals=totals,
                plan=plan,
                included=included_usage(plan),
                generation=customer.metadata.generation,
                now=now,
            )
            if updated.to_k8s() == customer.status.to_k8s():
                return "unchanged"
            try:
                # status.usage and WithinLimits are usage metering's fields (managedFields).
                await self.kube.patch_customer_status(
                    record.name, status_patch(updated), customer.metadata.resource_version, FieldManager.USAGE
                )
                return "patched"
            except ApiException as error:
                if error.status == 404:
                    return "missing"
                if error.status != 409:
                    raise
            # 409: someone (the operator) wrote the Customer since we read it; read it again.
            fresh = await self.directory.by_name(record.name)
            if fresh is None:
                return "missing"
            record = fresh
        raise DependencyUnavailable(
            "Kubernetes API", f"status of {record.name} kept changing under the flush"
        )

    async def _roll_up_ended_periods(
        self, conn: Queryable, record: CustomerRecord, reported: Reported, current: BillingPeriod
    ) -> None:
        """Rows for the ended periods that reports starting from `reported.earliest_start` end in, and
        that came within their close grace (each period judged by when its own first report came): no
        flush made them while they held its `now` when every report of theirs came after their end (an
        instance that reports once a period, a new customer's first report after the month ended, a
        period's last minutes sent after it ended). A report ending in a period closed, or past its
        close grace, is kept and billed in no period: a closed row is what Stripe was sent. One across
        the current period's start is the current period's (`period_totals`). A row opened here is
        priced against the plan its period held by the licence history (`ended_period_plan`), and takes
        the Customer's billing mode now: no flush recorded what its period held."""
        customer_id = record.customer_id
        since = reported.earliest_start
        opened, missed = await open_missing_rollups(
            conn,
            customer_id,
            lambda period, held: ended_period_plan(record.customer, period, held),
            lambda moment: customer_period(record.customer, moment),
            since,
            current.start,
            now=self.clock(),
            grace=timedelta(seconds=self.options.close_grace),
            billed_manually=bills_manually(record.customer),
        )
        for rollup in opened:
            log.info(
                "usage of %s: period %s .. %s reported after it ended, rolled up for closing",
                customer_id,
                rollup.period.start.isoformat(),
                rollup.period.end.isoformat(),
            )
        for period in missed:
            log.warning(
                "usage of %s: period %s .. %s ended more than USAGE_CLOSE_GRACE before its reports"
                " arrived; kept, billed in no period",
                customer_id,
                period.start.isoformat(),
                period.end.isoformat(),
            )
        for closed, reports in await reports_after_close(conn, customer_id, since, current.start):
            log.warning(
                "usage of %s: period %s .. %s closed before %d of its reports arrived;"
                " kept, billed in no period",
                customer_id,
                closed.start.isoformat(),
                closed.end.isoformat(),
                reports,
            )

    async def _notice_crossings(
        self, record: CustomerRecord, period: BillingPeriod, totals: PeriodTotals, plan: str
    ) -> None:
        """A notice per threshold reached in the period; a notice already written is none (its key)."""
        customer = record.customer
        reached = crossings(totals, included_usage(plan), customer.spec.notifications.usage_thresholds or ())
        if not reached:
            return
        notices = [
            usage_threshold(
                customer_id=record.customer_id,
                customer_name=record.name,
                company=customer.spec.company_name,
                period_start=period.start,
                metric=crossing.metric,
                threshold=crossing.threshold,
                used=crossing.used,
                limit=crossing.limit,
            )
            for crossing in reached
        ]
        async with self.session_factory() as session, session.begin():
            await self.outbox.enqueue_all(session, [(notice, customer.spec) for notice in notices])

    # ----- the meter run -----

    async def send_meter_events(self, now: datetime | None = None) -> MeterRun:
        """Flush the customers whose recent reports no rollup holds (`flush_unheld`), then close the
        periods ended by `now` less the close grace and send the Stripe meter events they owe
        (usage.metering); one replica at a time."""
        now = now or self.clock()

        async def flush_unheld(conn: Connection) -> None:
            await self.flush_unheld(conn, now)

        run = await send_meter_events(
            self.pool,
            self.meter_sender,
            now,
            close_grace=timedelta(seconds=self.options.close_grace),
            before_close=flush_unheld,
            manual_billing=self.billed_manually,
            subscription_ends=self.subscription_ends,
        )
        self.metrics.meter_run(run)
        if (
            run.closed
            or run.not_closed
            or run.sent
            or run.failed
            or run.expired
            or run.manual
            or run.not_invoiced
        ):
            log.info(
                "meter run: %d periods closed (%d could not be, left open), %d events sent (%d periods"
                " past Stripe's invoice grace), %d failed, %d given up, %d periods left unsent to manual"
                " billing, %d not invoiced (their subscription ended first)",
                run.closed,
                run.not_closed,
                run.sent,
                run.late,
                run.failed,
                run.expired,
                run.manual,
                run.not_invoiced,
            )
        return run

    async def billed_manually(self, customer_ids: Collection[str]) -> set[str]:
        """Of `customer_ids`, those whose Customer says spec.billing.mode: manual (the mirror keeps no
        billing mode, and keeps a Stripe link a manual Customer had). A customer no Customer holds any
        more (deleted) is not among them: its periods are metered as before. A Customer that cannot be
        read fails the meter run, which closes and sends nothing; the next run asks again."""
        records = await self._records(customer_ids)
        return {customer_id for customer_id, record in records.items() if bills_manually(record.customer)}

    async def subscription_ends(self, customer_ids: Collection[str]) -> dict[str, datetime]:
        """Of `customer_ids`, when the Stripe subscription of those whose Customer says it ended early
        (`ended_early`) ended: a period ending from then on is invoiced by no subscription. A Customer
        that cannot be read fails the meter run, as `billed_manually`."""
        records = await self._records(customer_ids)
        return {
            customer_id: ended
            for customer_id, record in records.items()
            if (ended := ended_early(record.customer)) is not None
        }

    async def flush_unheld(self, conn: Queryable, now: datetime) -> FlushResult:
        """Flush the customers with reports stored in the last `catch_up_window` that no rollup holds, as
        their flush would have: the coalescer is memory, and a server killed after its 202, or whose
        flush at shutdown failed, or scaled down, took its entries with it; nobody retries a report
        that was answered. A period all of whose reports came after its end has no row without that
        flush, so it was never closed nor billed. Their arrivals are placed on `now`'s clock by their
        age in PostgreSQL; reports too old to fall in a period still in its close grace are not looked
        at (nothing left to bill). The look reaches back to the last run that flushed them all when
        that is longer ago (every replica down, or every flush failing, for longer:
        rollups.catch_up_look_back), oldest first, in spans as long as the usual look
        (rollups.catch_up_spans): each span's customers are flushed and the span noted before the next
        is looked at, so that a look of weeks is statements of what a usual run reads (one over all of
        it outlasted the pool's timeout, and every later run's longer look too) and what a run did
        stays done. Once a span's flush failed, no later span can be noted this run: the customers of
        the rest are flushed once, together."""
        started, window = await catch_up_look_back(conn, self.options.catch_up_window, CATCH_UP_LIMIT)
        grace = timedelta(seconds=self.options.close_grace)
        spans = catch_up_spans(started, window, self.options.catch_up_window)
        if len(spans) > 1:
            log.info("meter run: looking back %s for reports no rollup held, in %d spans", window, len(spans))
        result = FlushResult()
        found_customers: set[str] = set()
        after_failure = UsageCoalescer()
        for since, until in spans:
            found = await unheld_arrivals(conn, since, until, unheld_starts_from(now, started - since, grace))
            entries = {
                unheld.customer_id: Reported(now - unheld.last_age, unheld.earliest_start) for unheld in found
            }
            found_customers.update(entries)
            if result.failed:
                after_failure.requeue(entries)
                continue
            result += await self._flush(entries)
            if not result.failed:
                await note_caught_up(conn, until)  # else the next run looks back from this span again
        result += await self._flush(after_failure.drain())
        if found_customers:
            log.info(
                "meter run: %d customers had reports no rollup held (a flush still to come, or lost with"
                " its server), flushed: %d patched, %d unchanged, %d without a Customer, %d failed",
                len(found_customers),
                result.patched,
                result.unchanged,
                result.missing,
                result.failed,
            )
        return result

    # ----- the partitions of usage_reports -----

    async def maintain_partitions(self, now: datetime | None = None) -> PartitionRun:
        """Make the months ahead, drop those past the raw retention (usage.partitions)."""
        run = await maintain_partitions(
            self.pool,
            now or self.clock(),
            ahead=self.options.partitions_ahead,
            retention_months=self.options.raw_retention_months,
        )
        if run.created or run.dropped or run.deleted:
            log.info(
                "partition run: made %s, dropped %s, %d old reports of the default partition deleted",
                ", ".join(run.created) or "none",
                ", ".join(run.dropped) or "none",
                run.deleted,
            )
        if run.missing:
            log.warning(
                "partition run: no partition for %s after the run (its lock not had in time): their"
                " reports go to the default partition; tried again next run",
                ", ".join(run.missing),
            )
        return run

    # ----- the background tasks -----

    def start(self) -> None:
        def timer(
            interval: float, job: Callable[[], Awaitable[object]], initial_delay: float, run: str
        ) -> None:
            self.metrics.timer_started(run)
            every = functools.partial(self._every, interval, job, initial_delay, run)
            self._tasks.append(asyncio.create_task(after_schema(self.schema, every)))

        if self.options.flush_interval is not None:
            timer(self.options.flush_interval, self.flush, self.options.flush_interval, "flush")
        if self.options.meter_interval is not None:
            timer(
                self.options.meter_interval,
                self.send_meter_events,
                self.options.meter_initial_delay,
                "meter",
            )
        if self.options.partition_interval is not None:
            timer(self.options.partition_interval, self.maintain_partitions, 0.0, "partitions")

    async def stop(self) -> None:
        """Stop the timers, then flush what the last requests reported (bounded: a dead API server must
        not hold the shutdown)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        try:
            # Not wait_for, which dropped a cancellation of the shutdown that came in as the flush ended
            # (see workers.py): the stop returned as if it had not been cancelled.
            async with asyncio.timeout(SHUTDOWN_FLUSH_TIMEOUT):
                await self.flush()
        except Exception as error:
            log.warning(
                "usage flush at shutdown failed (%s): status.usage catches up with the next report, the"
                " rollups with the next meter run (flush_unheld)",
                type(error).__name__,
            )

    async def _every(
        self, interval: float, job: Callable[[], Awaitable[object]], initial_delay: float, run: str
    ) -> None:
        await asyncio.sleep(initial_delay)
        while True:
            await self.run_once(job, run)
            await asyncio.sleep(interval)

    async def run_once(self, job: Callable[[], Awaitable[object]], run: str) -> str:
        """One run of a timer's `job`, counted by its result (iotistic_usage_runs_total, `run_result`):
        a run failing every time was one traceback an interval, and no alert, while no period closed."""
        try:
            outcome = await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A failed run is logged and the next one tries again: the timer must outlive any error.
            log.exception("usage %s run failed", run)
            result = "failed"
        else:
            result = run_result(outcome)
        self.metrics.usage_run(run, result)
        return result


def run_result(outcome: object) -> str:
    """How a timer's run that returned `outcome` is counted: skipped while another replica held its lock
    (no failure: that replica ran it) or a flush had nothing to write, failed when a partition run left
    this month or the next without its partition or a flush wrote none of its Customers, else ok."""
    if isinstance(outcome, MeterRun | PartitionRun) and outcome.skipped:
        return "skipped"
    if isinstance(outcome, PartitionRun) and outcome.missing:
        return "failed"
    if isinstance(outcome, FlushResult):
        # A flush catches its errors itself, so each failed as a whole is said by its result: every
        # Customer failed, none written. One with nothing to flush (no report since the last, the inbox
        # process's always) is skipped: counted ok, it hid the server's failing flushes.
        if not (outcome.patched or outcome.unchanged or outcome.missing or outcome.failed):
            return "skipped"
        if outcome.failed and not (outcome.patched or outcome.unchanged):
            return "failed"
    return "ok"


__all__ = [
    "FlushResult",
    "UsageMetering",
    "bills_manually",
    "cancelled_by",
    "customer_period",
    "customer_plan",
    "ended_early",
    "ended_period_plan",
    "open_period",
    "run_result",
]
