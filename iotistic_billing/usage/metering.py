"""Stripe metered billing: one Billing meter event per closed period and metric with overage.

Exactly once, end to end: an event is recorded in `usage_meter_events` only after Stripe accepted it,
under the identifier `<customer id>:<period start YYYYMMDD>:<metric>`. A crash between Stripe's answer
and the insert re-sends the same identifier on the next run, which Stripe refuses as one it holds (for
at least 24 hours): that refusal is recorded as the event sent;
a recorded event is never sent again. One run at a time across server replicas (a PostgreSQL advisory
lock), so two replicas never race on one event.

An event Stripe refuses (a meter not created yet, a Stripe customer deleted and not linked anew: an
operator can mend both) is tried again by later runs, which take the periods never refused first and
then the one refused longest ago, so refused periods never hold up the others. Stripe takes no meter
event more than 35 days old: once a period's events are past that, it is given up (`metered_at` set,
`meter_refusal` naming what was not billed) instead of being sent again for good.

Stripe side: one meter per metric (`iotistic_devices`, `iotistic_mqtt_traffic_gb`,
`iotistic_http_traffic_gb`, `iotistic_storage_gb_months`, `iotistic_api_calls`), aggregated by sum,
with a metered per-unit price at the earlier system's overage rate (API calls: $0.0005 a call). Not a
package price of $0.50 per 1,000 calls: Stripe's transform_quantity rounds the period's calls to whole
thousands, so 2,500 calls would bill $1.50 (or $1.00) where the rollup, the CLI and
`overage_amount_cents` say $1.25.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Protocol

import stripe

from iotistic_billing.db.pool import Connection, Pool, Queryable, connection, session_lock
from iotistic_billing.settings import STRIPE_METER_WINDOW_SECONDS
from iotistic_billing.usage.periods import BillingPeriod
from iotistic_billing.usage.pricing import billed_quantity
from iotistic_billing.usage.rollups import (
    BILLED_MANUALLY,
    BILLED_PLANS,
    ManualBilling,
    close_periods,
    overage_quantities,
)

if TYPE_CHECKING:
    from stripe.params.billing import MeterEventCreateParams

log = logging.getLogger(__name__)

EVENT_NAME_PREFIX: Final = "iotistic_"
# Any constant of ours: pg_try_advisory_lock keys are one bigint per purpose.
METER_LOCK_KEY: Final = 0x10715_0006
# Stripe refuses a meter event whose timestamp is more than 35 days old.
STRIPE_METER_WINDOW: Final = timedelta(seconds=STRIPE_METER_WINDOW_SECONDS)
# Of the customer ids given, when the Stripe subscription of each that one ended early (cancelled inside
# its period: usage.service.ended_early); the others are left out.
SubscriptionEnds = Callable[[Collection[str]], Awaitable[Mapping[str, datetime]]]
# Stripe finalizes a period's invoice at most this long after the period (its invoice finalization grace
# period): usage sent later is taken but billed on no invoice.
STRIPE_INVOICE_GRACE: Final = timedelta(hours=72)


def meter_identifier(customer_id: str, period_start: datetime, metric: str) -> str:
    """Stripe refuses a meter event whose identifier it holds: one per customer, period and metric.
    The period start is the date when it is a midnight UTC (calendar months), the second otherwise: two
    periods can start on one day (a checkout cuts the running period short at its own start), and with
    the date alone the second period's events were taken for the first's and never sent."""
    start = period_start.astimezone(UTC)
    stamp = f"{start:%Y%m%d}" if start.time() == time(0) else f"{start:%Y%m%dT%H%M%SZ}"
    return f"{customer_id}:{stamp}:{metric}"


def meter_value(quantity: Decimal) -> str | None:
    """The quantity as Stripe takes it (a plain decimal string, at most 15 significant digits), or None
    when it rounds to nothing."""
    if quantity <= 0:
        return None
    rounded = billed_quantity(quantity)  # the quantity the overage's amount is priced from
    if rounded <= 0:
        return None
    text = f"{rounded:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True)
class MeterEvent:
    customer_id: str
    period_start: datetime
    metric: str
    identifier: str
    stripe_customer_id: str
    value: str
    # Unix seconds: the last second of the period, so Stripe counts the event in that period (a period
    # is [start, end), and an event stamped at its end would fall into the next one).
    timestamp: int

    @property
    def event_name(self) -> str:
        return EVENT_NAME_PREFIX + self.metric

    def past_stripe_window(self, now: datetime) -> bool:
        """Whether Stripe refuses the event for its age, on this run and every later one."""
        return now.timestamp() - self.timestamp > STRIPE_METER_WINDOW.total_seconds()

    def params(self) -> MeterEventCreateParams:
        return {
            "event_name": self.event_name,
            "payload": {"stripe_customer_id": self.stripe_customer_id, "value": self.value},
            "identifier": self.identifier,
            "timestamp": self.timestamp,
        }


def meter_events_for(
    customer_id: str, stripe_customer_id: str, period: BillingPeriod, quantities: Mapping[str, Decimal]
) -> list[MeterEvent]:
    """The meter events a closed period owes: one per metric over its quota (nothing for a quantity
    too small to bill)."""
    events = []
    for metric, quantity in quantities.items():
        value = meter_value(quantity)
        if value is None:
            continue
        events.append(
            MeterEvent(
                customer_id=customer_id,
                period_start=period.start,
                metric=metric,
                identifier=meter_identifier(customer_id, period.start, metric),
                stripe_customer_id=stripe_customer_id,
                value=value,
                timestamp=int(period.end.timestamp()) - 1,
            )
        )
    return events


def refusal_reason(event: MeterEvent, error: Exception) -> str:
    """What the send of the event said, the same on every try of one refusal (Stripe's request id left
    out), so that a refusal is logged once however many runs meet it."""
    if isinstance(error, stripe.StripeError):
        status = f"HTTP {error.http_status}: " if error.http_status else ""
        return f"{event.metric}: {status}{error.user_message or type(error).__name__}"
    return f"{event.metric}: {type(error).__name__}: {error}"


class StripeUnavailable(Exception):
    """Stripe cannot be reached, is overloaded or refuses our key: the run stops, the next one retries."""


class MeterSender(Protocol):
    async def __call__(self, event: MeterEvent) -> str:
        """Send the event; the identifier Stripe answered with."""
        ...


# Stripe's answer to an identifier it holds (400 invalid_request_error).
_ALREADY_HELD: Final = "already exists with identifier"


class StripeMeterSender:
    """Meter events through the stripe SDK (`client.v1.billing.meter_events`)."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self.client = client

    async def __call__(self, event: MeterEvent) -> str:
        try:
            created = await self.client.v1.billing.meter_events.create_async(params=event.params())
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.AuthenticationError) as error:
            raise StripeUnavailable(type(error).__name__) from None
        except stripe.InvalidRequestError as error:
            # Stripe refuses an identifier it holds rather than dropping the repeat: a send whose record
            # was lost (a crash after Stripe's answer) is an event Stripe has.
            if _ALREADY_HELD in str(error.user_message or error):
                return event.identifier
            raise
        except stripe.StripeError as error:
            if (error.http_status or 500) >= 500:
                raise StripeUnavailable(f"HTTP {error.http_status}") from None
            raise
        return str(created.identifier or event.identifier)


@dataclass(frozen=True)
class MeterRun:
    closed: int = 0  # periods closed by this run
    sent: int = 0  # events Stripe accepted and we recorded
    failed: int = 0  # events to try again by a later run
    expired: int = 0  # events given up: past Stripe's 35 days, billed in no invoice
    late: int = 0  # periods sent past Stripe's invoice grace: taken, on no invoice
    manual: int = 0  # periods closed in Stripe billing, left unsent to manual billing
    not_invoiced: int = 0  # periods whose subscription ended before their events could be sent
    not_closed: int = 0  # open periods whose close raised: left open with why (meter_refusal)
    skipped: bool = False  # another replica holds the lock


# Periods never refused first, then the one refused longest ago: with the oldest first, `limit`
# periods Stripe keeps refusing filled every run and no newer period was ever sent.
_UNMETERED: Final = """
SELECT r.customer_id, r.period_start, r.period_end, r.plan, r.overage::text AS overage,
       r.meter_refusal, r.billed_manually, c.stripe_customer_id
FROM usage_rollups r JOIN customers c ON c.customer_id = r.customer_id
WHERE r.metered_at IS NULL AND r.closed_at IS NOT NULL AND r.period_end <= $1
  AND c.stripe_customer_id IS NOT NULL
ORDER BY r.meter_refused_at NULLS FIRST, r.period_end
LIMIT $2
"""
_RECORDED: Final = "SELECT identifier FROM usage_meter_events WHERE identifier = ANY($1::varchar[])"
_RECORD: Final = """
INSERT INTO usage_meter_events (customer_id, period_start, metric, identifier, value, stripe_event_identifier)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (identifier) DO NOTHING
"""
# None of these touches updated_at: rollups.reports_after_close reads it as the time the row closed.
_METERED: Final = """
UPDATE usage_rollups SET metered_at = $3, meter_refusal = $4
WHERE customer_id = $1 AND period_start = $2
"""
_REFUSED: Final = """
UPDATE usage_rollups SET meter_refused_at = $3, meter_refusal = $4
WHERE customer_id = $1 AND period_start = $2
"""
_GIVEN_UP: Final = """
UPDATE usage_rollups SET metered_at = $3, meter_refused_at = $3, meter_refusal = $4
WHERE customer_id = $1 AND period_start = $2
"""


async def record_meter_event(conn: Queryable, event: MeterEvent, stripe_identifier: str) -> None:
    await conn.execute(
        _RECORD,
        event.customer_id,
        event.period_start,
        event.metric,
        event.identifier,
        event.value,
        stripe_identifier,
    )


def not_invoiced(ended: datetime, metrics: Collection[str]) -> str:
    """The meter_refusal of a period whose events would come after its subscription ended."""
    return (
        f"not invoiced: the subscription ended at {ended.isoformat()}, before this period's meter events"
        f" were sent, and Stripe invoices usage only on a live subscription: {', '.join(metrics)};"
        " invoice it by hand"
    )


async def _meter_period(
    conn: Connection,
    row: Mapping[str, Any],
    sender: MeterSender,
    now: datetime,
    ended: datetime | None = None,
) -> MeterRun:
    period = BillingPeriod(row["period_start"], row["period_end"])
    quantities = overage_quantities(json.loads(row["overage"]))
    events = (
        meter_events_for(row["customer_id"], row["stripe_customer_id"], period, quantities)
        if row["plan"] in BILLED_PLANS
        else []
    )
    recorded = {r["identifier"] for r in await conn.fetch(_RECORDED, [e.identifier for e in events])}
    owed = [event for event in events if event.identifier not in recorded]
    customer_id, last_refusal = row["customer_id"], row["meter_refusal"]
    where = f"meter events of {customer_id}, period {period.start.isoformat()} .. {period.end.isoformat()}"
    # All of a period's events carry its last second: past Stripe's window, none can ever be sent.
    if owed and owed[0].past_stripe_window(now):
        reason = "past Stripe's 35 days, not billed: " + ", ".join(event.metric for event in owed)
        if last_refusal:
            reason += f" (last refused: {last_refusal})"
        log.warning("%s, given up: %s", where, reason)
        await conn.execute(_GIVEN_UP, customer_id, period.start, now, reason)
        return MeterRun(expired=len(owed))
    # The subscription ended (`ended`: cancelled inside its period) by the end of this period: Stripe
    # takes the events (meters are the customer's) but no invoice is left to carry them, so the period is
    # said not invoiced, once, instead of metered as billed.
    if owed and ended is not None and period.end >= ended:
        reason = not_invoiced(ended, [event.metric for event in owed])
        log.warning("%s: %s", where, reason)
        await conn.execute(_GIVEN_UP, customer_id, period.start, now, reason)
        return MeterRun(not_invoiced=1)
    sent = 0
    refusals: list[str] = []
    unexpected: Exception | None = None
    for event in owed:
        try:
            echoed = await sender(event)
        except StripeUnavailable:
            raise
        except Exception as error:
            # One refused event must not hold up the others; what refused it may be mended (a meter
            # created, a customer linked anew), so later runs try it again (the work list's order).
            refusals.append(refusal_reason(event, error))
            if not isinstance(error, stripe.StripeError):
                unexpected = unexpected or error
            continue
        await record_meter_event(conn, event, echoed)
        sent += 1
    if not refusals:
        # Stripe takes a past period's usage onto its invoice only while that is a draft.
        late = sent > 0 and now - period.end > STRIPE_INVOICE_GRACE
        note = None
        if late:
            days = (now - period.end).days
            note = (
                f"sent {days} day{'s' if days != 1 else ''} after the period ended, past Stripe's invoice"
                f" grace ({STRIPE_INVOICE_GRACE.days * 24} hours at most): on no invoice"
            )
            log.warning("%s: %s", where, note)
        await conn.execute(_METERED, customer_id, period.start, now, note)
        return MeterRun(sent=sent, late=int(late))
    refusal = "; ".join(refusals)
    # Once per refusal, not once per run: the row keeps what was said last.
    if refusal != last_refusal:
        log.warning(
            "%s, refused: %s; tried again by later runs until Stripe's 35 days have passed",
            where,
            refusal,
            exc_info=unexpected,
        )
    else:
        log.debug("%s, refused again: %s", where, refusal)
    await conn.execute(_REFUSED, customer_id, period.start, now, refusal)
    return MeterRun(sent=sent, failed=len(refusals))


def once_per_run(manual_billing: ManualBilling | None) -> ManualBilling:
    """`manual_billing` asked once per customer in a run (the close and the sends ask of the same
    customers); without one, no Customer is billed manually."""
    known: dict[str, bool] = {}

    async def billed_manually(customer_ids: Collection[str]) -> AbstractSet[str]:
        unknown = set(customer_ids) - known.keys()
        if unknown and manual_billing is not None:
            manual = await manual_billing(unknown)
            known.update((customer_id, customer_id in manual) for customer_id in unknown)
        return {customer_id for customer_id in customer_ids if known.get(customer_id)}

    return billed_manually


def ends_once_per_run(subscription_ends: SubscriptionEnds | None) -> SubscriptionEnds:
    """`subscription_ends` asked once per customer in a run; without one, no subscription ended early."""
    known: dict[str, datetime | None] = {}

    async def ends(customer_ids: Collection[str]) -> Mapping[str, datetime]:
        unknown = set(customer_ids) - known.keys()
        if unknown and subscription_ends is not None:
            found = await subscription_ends(unknown)
            known.update((customer_id, found.get(customer_id)) for customer_id in unknown)
        return {
            customer_id: ended
            for customer_id in customer_ids
            if (ended := known.get(customer_id)) is not None
        }

    return ends


_SENT_METRICS: Final = (
    "SELECT metric FROM usage_meter_events WHERE customer_id = $1 AND period_start = $2 ORDER BY metric"
)


async def _leave_to_manual_billing(conn: Queryable, row: Mapping[str, Any], now: datetime) -> None:
    """A period closed in Stripe billing and not sent yet when its Customer moved to manual billing (or
    one a flush marked billed manually, closed by a server from before migration 0017): its invoice is
    the manual one, so it is marked metered and never sent. The metrics Stripe took
    before (the others refused) are named: they are on a Stripe invoice, not to be invoiced by hand."""
    sent = [
        record["metric"]
        for record in await conn.fetch(_SENT_METRICS, row["customer_id"], row["period_start"])
    ]
    note = BILLED_MANUALLY
    if sent:
        note += f", but {', '.join(sent)} had been sent to Stripe before: bill the rest only"
    log.info(
        "meter events of %s, period %s .. %s: %s",
        row["customer_id"],
        row["period_start"].isoformat(),
        row["period_end"].isoformat(),
        note,
    )
    await conn.execute(_METERED, row["customer_id"], row["period_start"], now, note)


async def send_meter_events(
    pool: Pool,
    sender: MeterSender | None,
    now: datetime,
    *,
    close_grace: timedelta,
    limit: int = 500,
    before_close: Callable[[Connection], Awaitable[object]] | None = None,
    manual_billing: ManualBilling | None = None,
    subscription_ends: SubscriptionEnds | None = None,
) -> MeterRun:
    """Run `before_close` (the rollups a flush still owes: UsageMetering.flush_unheld), close the
    periods that ended at least `close_grace` ago (rollups.close_periods), then send the meter events
    they owe, `limit` periods a query, each once, those Stripe refused after the rest (see the module's
    note); all under the lock.

    A Customer `manual_billing` names is sent nothing: a period closed while it is billed manually is
    closed as metered, and one closed before and still unsent is marked metered (`BILLED_MANUALLY`); so
    is a period whose row a flush marked billed manually, whatever the Customer's mode now.
    A period that ends once its customer's subscription had ended early (`subscription_ends`) is not
    sent: it is marked metered as not invoiced (`not_invoiced`), as no invoice would carry it.
    Without a sender (Stripe not configured) periods are still closed; their events wait for Stripe.
    """
    billed_manually = once_per_run(manual_billing)
    ended_early = ends_once_per_run(subscription_ends)
    async with connection(pool) as conn, session_lock(conn, METER_LOCK_KEY) as held:
        if not held:
            return MeterRun(skipped=True)
        if before_close is not None:
            await before_close(conn)
        closing = await close_periods(conn, now, grace=close_grace, manual_billing=billed_manually)
        run = MeterRun(closed=closing.closed, not_closed=closing.not_closed)
        if sender is None:
            return run
        # `limit` periods at a time until each owed one was tried once: one batch a run left a
        # month-end's rest an interval later. Those refused now sort after any not tried yet.
        tried: set[tuple[str, datetime]] = set()
        while True:
            batch = [
                row
                for row in await conn.fetch(_UNMETERED, now, limit)
                if (row["customer_id"], row["period_start"]) not in tried
            ]
            if not batch:
                return run
            manual = await billed_manually({row["customer_id"] for row in batch})
            ends = await ended_early({row["customer_id"] for row in batch if row["plan"] in BILLED_PLANS})
            for row in batch:
                tried.add((row["customer_id"], row["period_start"]))
                if row["billed_manually"] or row["customer_id"] in manual:
                    await _leave_to_manual_billing(conn, row, now)
                    run = replace(run, manual=run.manual + 1)
                    continue
                try:
                    result = await _meter_period(conn, row, sender, now, ends.get(row["customer_id"]))
                except StripeUnavailable as error:
                    log.warning("Stripe unavailable (%s): meter events wait for the next run", error)
                    return replace(run, failed=run.failed + 1)
                run = replace(
                    run,
                    sent=run.sent + result.sent,
                    failed=run.failed + result.failed,
                    expired=run.expired + result.expired,
                    late=run.late + result.late,
                    not_invoiced=run.not_invoiced + result.not_invoiced,
                )


__all__ = [
    "EVENT_NAME_PREFIX",
    "STRIPE_METER_WINDOW",
    "MeterEvent",
    "MeterRun",
    "MeterSender",
    "StripeMeterSender",
    "StripeUnavailable",
    "SubscriptionEnds",
    "meter_events_for",
    "meter_identifier",
    "meter_value",
    "not_invoiced",
    "record_meter_event",
    "refusal_reason",
    "send_meter_events",
]
