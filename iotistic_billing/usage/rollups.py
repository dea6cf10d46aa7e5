"""Rollups: a customer's usage of one billing period, its overage against the plan, in `usage_rollups`.

While a period is open its row is refreshed by every status flush (from PostgreSQL's sums); once the
period has ended and a grace has passed (for the reports of its last hours still on their way), the
meter run rolls it up one last time from the stored reports with `pricing.roll_up` and closes it: a
closed row never changes, so what was sent to Stripe stays what the row says. A report's counters are
in the row of the period its end falls in (usage.periods), its storage in each row it overlaps. The
current period starts no earlier than the end of the customer's ended rows (`unsettled_period`), so that
no report is billed twice. A report that no row holds, of a period that ended before any flush saw it,
gets its period's row from the flush that sees it (the meter run's, `unheld_arrivals`, when its server
stopped before its own) if it arrived while the close grace of the period it ends in lasted
(`open_missing_rollups`), priced against the plan the licence history says that period held
(`PlanHistory`); a report that arrives after that, or after that period closed, is kept, and billed in
no period (`reports_after_close`). A lapse from a paid plan within a period keeps that plan
for it (`period_plan`), and a flush that saw the Customer billed manually leaves the period to manual
billing (`billed_manually`, kept through a cut and the close). Amounts are stored as strings of exact
decimals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg

from iotistic_billing.customer import PAID_PLAN_NAMES
from iotistic_billing.db.pool import Connection, Queryable, database_unreachable
from iotistic_billing.licensing.plans import IncludedUsage, plan_by_name
from iotistic_billing.usage.periods import INSTANT, LONGEST_PERIOD, BillingPeriod
from iotistic_billing.usage.pricing import Overage, PeriodTotals, overage, roll_up
from iotistic_billing.usage.reports import MAX_PERIOD, earliest_start_reaching
from iotistic_billing.usage.store import period_samples, period_totals

log = logging.getLogger(__name__)

# Overage is billed on paid plans only: a trial is free, and the unlicensed fallback is never billed.
BILLED_PLANS: Final = frozenset(PAID_PLAN_NAMES)
# A closed period of a Customer billed manually: done with, no meter event sent (its meter_refusal).
BILLED_MANUALLY: Final = "billed manually (spec.billing.mode: manual): no meter events sent to Stripe"

# Of the customer ids given, those whose Customer is billed manually (spec.billing.mode: manual).
ManualBilling = Callable[[Collection[str]], Awaitable[AbstractSet[str]]]


@dataclass(frozen=True)
class Rollup:
    customer_id: str
    period: BillingPeriod
    plan: str
    totals: PeriodTotals
    overage: Overage

    @property
    def billed(self) -> bool:
        """Whether Stripe meter events are owed for this rollup (once its period has closed)."""
        return self.plan in BILLED_PLANS and bool(self.overage.lines)


def period_plan(effective: str, recorded: str | None, *, lapsed: bool = False) -> str:
    """The plan a period is priced against: the Customer's `effective` plan, unless that is not a paid
    one and the period's open row `recorded` a paid plan (the last it held in the period): a lapse to
    the unlicensed fallback (dunning, a suspension, a cancellation) must not erase the overage it
    consumed while paying. A period never on a paid plan stays unbilled, and so does one that starts
    once the subscription had ended (`lapsed`): a flush before the ending was applied recorded the paid
    plan for usage no subscription pays."""
    if lapsed:
        return effective
    if effective not in BILLED_PLANS and recorded in BILLED_PLANS:
        return recorded
    return effective


# The plan of each licence that took effect for a customer from the one in force at $2 on, oldest
# first. When a licence took effect is its issued_at (the token's iat): generated_at is when its row was
# written, later for a licence its pass recorded after a crash or at the Customer's deletion. A
# `revoked` row is a licence's end, when it was written: unlicensed from then (a deleted Customer's
# finalizer revokes its licence, and a Customer made again under its customer id starts afresh).
_LICENSED_PLANS: Final = """
WITH licences AS (
    SELECT id,
           CASE WHEN action = 'revoked' THEN generated_at ELSE issued_at END AS took_effect,
           CASE WHEN action = 'revoked' THEN 'unlicensed' ELSE plan END AS plan
    FROM license_history WHERE customer_id = $1
)
SELECT took_effect, plan FROM licences
WHERE took_effect >= coalesce((SELECT max(took_effect) FROM licences WHERE took_effect <= $2), $2)
ORDER BY took_effect, id
"""


@dataclass(frozen=True)
class PlanHistory:
    """A customer's licences by the licence history from `since` on: (issued_at, plan), oldest first,
    the first the one in force at `since` when one was."""

    since: datetime
    licences: tuple[tuple[datetime, str], ...]

    def held(self, period: BillingPeriod) -> str | None:
        """The plan `period` held, by the rule `period_plan` keeps for an open row: of the licences in
        force during it (the one in force at its start and those issued inside it), the newest on a paid
        plan, else the one in force at its end; None when no licence took effect by its end (the history
        holds no row of it: a customer id made elsewhere, rows deleted by hand, a licence whose pass has
        not recorded it yet)."""
        if period.start < self.since:
            raise ValueError(
                f"period.start must not be before the history read ({self.since.isoformat()}),"
                f" got {period.start.isoformat()}"
            )
        at_start = [plan for issued, plan in self.licences if issued <= period.start][-1:]
        inside = [plan for issued, plan in self.licences if period.start < issued < period.end]
        in_force = at_start + inside
        paid = [plan for plan in in_force if plan in BILLED_PLANS]
        if paid:
            return paid[-1]
        return in_force[-1] if in_force else None


async def plan_history(conn: Queryable, customer_id: str, since: datetime) -> PlanHistory:
    """The customer's `PlanHistory` from `since` on, in one statement."""
    rows = await conn.fetch(_LICENSED_PLANS, customer_id, since)
    return PlanHistory(since, tuple((row["took_effect"], row["plan"]) for row in rows))


def included_usage(plan: str) -> IncludedUsage:
    return plan_by_name(plan, allow_unlicensed=True).included


def compute_rollup(customer_id: str, period: BillingPeriod, plan: str, totals: PeriodTotals) -> Rollup:
    return Rollup(customer_id, period, plan, totals, overage(totals, included_usage(plan)))


def totals_json(totals: PeriodTotals) -> dict[str, Any]:
    return {
        "period_start": totals.period_start.isoformat(),
        "period_end": totals.period_end.isoformat(),
        "peak_devices": totals.peak_devices,
        "mqtt_bytes": totals.mqtt_bytes,
        "http_bytes": totals.http_bytes,
        "api_calls": totals.api_calls,
        "storage_gb_months": str(totals.storage_gb_months),
        "reports": totals.reports,
    }


def overage_json(bill: Overage) -> dict[str, Any]:
    return {
        "lines": [
            {
                "metric": line.metric,
                "quantity": str(line.quantity),
                "unit_price": str(line.unit_price),
                "per": line.per,
                "amount": str(line.amount),
            }
            for line in bill.lines
        ],
        "total": str(bill.total),
        "total_cents": bill.total_cents,
    }


def overage_quantities(stored: dict[str, Any]) -> dict[str, Decimal]:
    """metric -> quantity over the quota, from a stored overage JSON."""
    return {line["metric"]: Decimal(line["quantity"]) for line in stored.get("lines", ())}


# A closed row is final: the WHERE of the DO UPDATE leaves it as it is. billed_manually is only ever
# set: a period some flush saw billed manually is the manual invoice's, whatever the later flushes saw.
# The close clears meter_refused_at, which an open row holds only for a close that raised (_NOT_CLOSED):
# kept, it sorted the closed row after every other in the meter run's work list, as one Stripe refused.
# Until then a flush keeps it and its meter_refusal: cleared, the next failing close warned again.
_UPSERT: Final = """
INSERT INTO usage_rollups
    (customer_id, period_start, period_end, totals, overage, overage_amount_cents, plan, closed_at,
     metered_at, meter_refusal, billed_manually, updated_at)
VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8, $9, $10, $11, now())
ON CONFLICT ON CONSTRAINT uq_usage_rollups_period DO UPDATE SET
    period_end = EXCLUDED.period_end,
    totals = EXCLUDED.totals,
    overage = EXCLUDED.overage,
    overage_amount_cents = EXCLUDED.overage_amount_cents,
    plan = EXCLUDED.plan,
    closed_at = EXCLUDED.closed_at,
    metered_at = EXCLUDED.metered_at,
    meter_refusal = CASE WHEN EXCLUDED.closed_at IS NULL THEN usage_rollups.meter_refusal
                         ELSE EXCLUDED.meter_refusal END,
    meter_refused_at = CASE WHEN EXCLUDED.closed_at IS NULL THEN usage_rollups.meter_refused_at END,
    billed_manually = usage_rollups.billed_manually OR EXCLUDED.billed_manually,
    updated_at = now()
WHERE usage_rollups.closed_at IS NULL
"""

# When the period definition of a customer changes (manual billing -> a Stripe subscription anchored
# elsewhere), an open row of the old definition must not overlap the new period, or reports would be
# billed twice: an earlier open row is cut at the new start, a later one (a period that no longer
# exists) is dropped. Closed rows are history and stay. A cut row keeps its billed_manually: its days
# are the old definition's (the manual era), not the subscription's, which starts at the cut.
_CUT_EARLIER: Final = """
UPDATE usage_rollups SET period_end = $2, updated_at = now()
WHERE customer_id = $1 AND closed_at IS NULL AND period_start < $2 AND period_end > $2
"""
_DROP_LATER: Final = """
DELETE FROM usage_rollups
WHERE customer_id = $1 AND closed_at IS NULL AND period_start > $2 AND period_start < $3
"""


async def save_rollup(
    conn: Queryable,
    rollup: Rollup,
    *,
    closed_at: datetime | None = None,
    metered_at: datetime | None = None,
    meter_note: str | None = None,
    billed_manually: bool = False,
) -> None:
    """Upsert the row; `meter_note` is its meter_refusal (why a closed row is metered without events);
    `billed_manually` marks the period as the manual invoice's (never unmarked)."""
    await conn.execute(
        _UPSERT,
        rollup.customer_id,
        rollup.period.start,
        rollup.period.end,
        json.dumps(totals_json(rollup.totals)),
        json.dumps(overage_json(rollup.overage)),
        rollup.overage.total_cents,
        rollup.plan,
        closed_at,
        metered_at,
        meter_note,
        billed_manually,
    )


# The latest end, inside (start, end), of a customer's rollup that is closed or has ended: its reports
# are billed, or about to be, with that period. A period anchored on the 29th to 31st reaches back over
# the previous one's end (Dec 31 .. Jan 31, then Jan 28 .. Feb 28), and so may a Stripe period that
# follows a calendar month; the current period starts after it instead. An ended row not yet closed
# counts too: closing waits for a grace, and the flushes in between must not cut the period it bills.
_SETTLED_END: Final = """
SELECT max(period_end) FROM usage_rollups
WHERE customer_id = $1 AND period_end > $2 AND period_end < $3
  AND (closed_at IS NOT NULL OR period_end <= $4)
"""


async def unsettled_period(
    conn: Queryable, customer_id: str, period: BillingPeriod, now: datetime
) -> BillingPeriod:
    """`period` (the one holding `now`) without its part already held by a closed or ended rollup of
    the customer: it starts no earlier than the latest such rollup's end."""
    settled_end: datetime | None = await conn.fetchval(
        _SETTLED_END, customer_id, period.start, period.end, now
    )
    return period if settled_end is None else BillingPeriod(settled_end, period.end)


# The plan the open row of a period holds (what earlier flushes priced it against).
_RECORDED_PLAN: Final = """
SELECT plan FROM usage_rollups WHERE customer_id = $1 AND period_start = $2 AND closed_at IS NULL
"""


async def priced_plan(
    conn: Queryable,
    customer_id: str,
    period: BillingPeriod,
    effective: str,
    *,
    lock: bool = False,
    lapsed: bool = False,
) -> str:
    """`period_plan` of the customer's open row of `period`; `lock` holds the row until the transaction
    ends, so that a concurrent flush reads the plan this one writes."""
    query = _RECORDED_PLAN + " FOR UPDATE" if lock else _RECORDED_PLAN
    return period_plan(effective, await conn.fetchval(query, customer_id, period.start), lapsed=lapsed)


async def save_open_rollup(
    conn: Connection,
    customer_id: str,
    period: BillingPeriod,
    effective: str,
    totals: PeriodTotals,
    *,
    billed_manually: bool,
    lapsed: bool = False,
) -> Rollup:
    """The current period's row, refreshed, priced against `period_plan` (the Customer's `effective`
    plan, or the paid plan the row holds unless the period starts once the subscription had ended:
    `lapsed`), marked `billed_manually` when the Customer is now; overlapping open rows of an older
    period definition fixed (a subscription ended early cuts its period's row at its end)."""
    async with conn.transaction():
        await conn.execute(_CUT_EARLIER, customer_id, period.start)
        await conn.execute(_DROP_LATER, customer_id, period.start, period.end)
        plan = await priced_plan(conn, customer_id, period, effective, lock=True, lapsed=lapsed)
        rollup = compute_rollup(customer_id, period, plan, totals)
        await save_rollup(conn, rollup, billed_manually=billed_manually)
    return rollup


# The earliest end, in ($3, $4], of a customer's report starting from $2 that no rollup holds (a
# rollup holds the reports that end inside it, start < end <= its end): its period ended before a
# status flush saw any of its reports (a flush rolls up the period holding its `now`).
_UNHELD_END: Final = """
SELECT r.period_end FROM usage_reports r
WHERE r.customer_id = $1 AND r.period_start >= $2 AND r.period_start < $4
  AND r.period_end > $3 AND r.period_end <= $4
  AND NOT EXISTS (
      SELECT 1 FROM usage_rollups u
      WHERE u.customer_id = $1 AND u.period_start < r.period_end AND u.period_end >= r.period_end
  )
ORDER BY r.period_end
LIMIT 1
"""
# The customer's rollups either side of a report's end that none holds: the latest end before it, the
# earliest start from it.
_NEIGHBOURS: Final = """
SELECT (SELECT max(period_end) FROM usage_rollups WHERE customer_id = $1 AND period_end < $2) AS end_before,
       (SELECT min(period_start) FROM usage_rollups WHERE customer_id = $1 AND period_start >= $2)
           AS start_after
"""


async def open_missing_rollups(
    conn: Queryable,
    customer_id: str,
    plan_of: Callable[[BillingPeriod, str | None], str],
    period_of: Callable[[datetime], BillingPeriod],
    since: datetime,
    until: datetime,
    now: datetime,
    grace: timedelta,
    *,
    billed_manually: bool,
) -> tuple[list[Rollup], list[BillingPeriod]]:
    """An open row for each period holding reports of the customer, starting from `since` and ending by
    `until`, that no row holds: the period (`period_of`) the earliest such report's end falls in, cut
    to the gap between the customer's rows around it (so that no report is in two rows); the meter run
    closes and meters it as any other. A period whose first report came `grace` or more after its end
    gets none, as a closed one takes no more reports: Stripe would refuse or no longer invoice it. When
    that report came is its own (PostgreSQL's reported_at, placed on the caller's clock `now`), not the
    customer's first arrival: another period's report that came in time let a late one be billed.
    Each row is priced against `plan_of` the period and the plan the licence history says it held
    (`PlanHistory.held`, read once, from the first row's start: a later row starts after that row), not
    the plan now: no flush recorded what it held, and a plan changed since its end (an upgrade on the
    1st, a lapse by dunning) would hide or erase its overage. The rows are marked `billed_manually`
    when the Customer is now. Returns the rows opened and those periods."""
    opened: list[Rollup] = []
    missed: list[BillingPeriod] = []
    history: PlanHistory | None = None
    after = since  # a report starting from `since` ends after it
    while (end := await conn.fetchval(_UNHELD_END, customer_id, since, after, until)) is not None:
        period = period_of(end - INSTANT)
        neighbours = await conn.fetchrow(_NEIGHBOURS, customer_id, end)
        assert neighbours is not None  # two scalar subqueries always return a row
        gap = BillingPeriod(
            max(period.start, neighbours["end_before"] or period.start),
            min(period.end, neighbours["start_after"] or period.end),
        )
        # A missed gap's reports stay unheld: the next look starts after it.
        after = gap.end
        age = await conn.fetchval(
            _FIRST_ARRIVAL_AGE, customer_id, gap.start, gap.end, earliest_start_reaching(gap.start)
        )
        if gap.end + grace <= now - age:
            missed.append(gap)
            continue
        if history is None:
            history = await plan_history(conn, customer_id, gap.start)
        plan = plan_of(gap, history.held(gap))
        rollup = compute_rollup(customer_id, gap, plan, await period_totals(conn, customer_id, gap))
        await save_rollup(conn, rollup, billed_manually=billed_manually)
        opened.append(rollup)
    return opened, missed


# How long ago the first of a customer's reports ending in ($2, $3] was stored, by PostgreSQL's clock;
# they start from $4 (`reports.earliest_start_reaching`), which prunes the months before.
_FIRST_ARRIVAL_AGE: Final = """
SELECT now() - min(reported_at) FROM usage_reports
WHERE customer_id = $1 AND period_start >= $4 AND period_start < $3
  AND period_end > $2 AND period_end <= $3
"""


# Per customer, the reports stored from $1 until $2 (PostgreSQL's times: it stamped reported_at) that no
# rollup holds (none that they end inside), starting from $3: their earliest start, and how long ago the
# last arrived. The reports come through each partition's reported_at index, the months before $3
# pruned; the rollups that end after $3 (two or three a customer, whatever its history) are hashed by
# customer and each report is checked against its customer's: the span's size is the cost, not the
# table's.
_UNHELD_ARRIVALS: Final = """
SELECT r.customer_id, min(r.period_start) AS earliest_start,
       now() - max(r.reported_at) AS last_age
FROM usage_reports r
WHERE r.reported_at >= $1 AND r.reported_at < $2 AND r.period_start >= $3
  AND NOT EXISTS (
      SELECT 1 FROM usage_rollups u
      WHERE u.customer_id = r.customer_id AND u.period_end > $3
        AND u.period_start < r.period_end AND u.period_end >= r.period_end
  )
GROUP BY r.customer_id
ORDER BY r.customer_id
"""


@dataclass(frozen=True)
class UnheldArrivals:
    """A customer's recent reports that no rollup holds: what a status flush would have been told."""

    customer_id: str
    earliest_start: datetime
    last_age: timedelta


# PostgreSQL's time now and how long ago the last catch-up was (NULL before the first).
_LAST_CATCH_UP: Final = "SELECT now() AS now, (SELECT now() - caught_up_at FROM usage_catch_up) AS since"
_CAUGHT_UP: Final = """
INSERT INTO usage_catch_up (id, caught_up_at) VALUES (1, $1)
ON CONFLICT (id) DO UPDATE SET caught_up_at = greatest(usage_catch_up.caught_up_at, excluded.caught_up_at)
"""
# Reports stored this long before the last catch-up are looked at again: an insert's reported_at is its
# transaction's start, which may come before the catch-up's look and commit after it.
CATCH_UP_OVERLAP: Final = timedelta(minutes=5)


async def catch_up_look_back(
    conn: Queryable, window: timedelta, longest: timedelta
) -> tuple[datetime, timedelta]:
    """PostgreSQL's time now (where the look ends: catch_up_spans), and how far back to look for
    reports no rollup holds: `window`, or back to the last catch-up when that is longer ago (every
    replica down, or every flush failing, for longer), at most `longest` (nothing older can be billed
    any more)."""
    row = await conn.fetchrow(_LAST_CATCH_UP)
    assert row is not None  # a SELECT of scalars always returns a row
    since: timedelta | None = row["since"]
    within = window if since is None else min(max(window, since + CATCH_UP_OVERLAP), longest)
    return row["now"], within


async def note_caught_up(conn: Queryable, at: datetime) -> None:
    """The reports stored before `at` (PostgreSQL's time) that no rollup held were all flushed."""
    await conn.execute(_CAUGHT_UP, at)


def catch_up_spans(started: datetime, within: timedelta, span: timedelta) -> list[tuple[datetime, datetime]]:
    """The look back `within` from `started` (PostgreSQL's times), oldest first, cut into spans of at
    most `span`, each [from, until): one statement each, so that the look after a long outage (every
    flush failing for weeks) costs many statements of a span's reports rather than one past the pool's
    timeout, and is noted span by span."""
    if span <= timedelta(0):
        raise ValueError(f"span must be positive, got {span}")
    spans = []
    since = started - within
    while since < started:
        until = min(since + span, started)
        spans.append((since, until))
        since = until
    return spans


def unheld_starts_from(now: datetime, within: timedelta, close_grace: timedelta) -> datetime:
    """The earliest start of a report stored in the last `within` that a period still in its close grace
    can bill: it ends after that period's start, at most a month before the period's end, and starts at
    most MAX_PERIOD before its own end."""
    return now - within - close_grace - LONGEST_PERIOD - MAX_PERIOD


async def unheld_arrivals(
    conn: Queryable, since: datetime, until: datetime, starts_from: datetime
) -> list[UnheldArrivals]:
    """Per customer, the reports stored from `since` until `until` (PostgreSQL's times) that start from
    `starts_from` and that no rollup holds: a flush was owed for them and never ran (the server stopped
    before it, or it failed), or has not run yet. Ages, not times: PostgreSQL stamped them, and the
    caller's clock places them."""
    rows = await conn.fetch(_UNHELD_ARRIVALS, since, until, starts_from)
    return [UnheldArrivals(row["customer_id"], row["earliest_start"], row["last_age"]) for row in rows]


# Reports starting from $2 and ending by $3 that a closed row holds (they end inside it) but that were
# stored after it closed, per row. Both times are PostgreSQL's: reported_at is set by the insert,
# updated_at last by the closing upsert (a closed row is never updated again; marking it metered leaves
# updated_at alone).
_AFTER_CLOSE: Final = """
SELECT u.period_start, u.period_end, count(*) AS reports
FROM usage_rollups u JOIN usage_reports r
    ON r.customer_id = u.customer_id AND r.period_end > u.period_start AND r.period_end <= u.period_end
WHERE u.customer_id = $1 AND u.closed_at IS NOT NULL AND u.period_start < $3 AND u.period_end > $2
  AND r.period_start >= $2 AND r.period_start < $3 AND r.period_end <= $3 AND r.reported_at > u.updated_at
GROUP BY u.period_start, u.period_end
ORDER BY u.period_start
"""


async def reports_after_close(
    conn: Queryable, customer_id: str, since: datetime, until: datetime
) -> list[tuple[BillingPeriod, int]]:
    """The customer's closed periods holding reports, starting from `since` and ending by `until`, that
    arrived after the period closed, and how many: kept (the usage views show them) but billed in no
    period, as a closed row is what Stripe was sent."""
    rows = await conn.fetch(_AFTER_CLOSE, customer_id, since, until)
    return [(BillingPeriod(row["period_start"], row["period_end"]), int(row["reports"])) for row in rows]


async def roll_up_period(
    conn: Queryable,
    customer_id: str,
    period: BillingPeriod,
    plan: str,
    *,
    close_at: datetime | None = None,
    billed_manually: bool = False,
) -> Rollup:
    """Roll the customer's stored reports of `period` up with `pricing.roll_up`, price the overage
    against `plan`, and upsert the row; `close_at` closes it (its meter events are then owed, or, when
    nothing is billed or the period is `billed_manually`, it is marked metered at once, in the same
    statement: no meter run can send it in between)."""
    totals = roll_up(await period_samples(conn, customer_id, period), period.start, period.end)
    rollup = compute_rollup(customer_id, period, plan, totals)
    left_to_manual = close_at is not None and rollup.billed and billed_manually
    metered_at = close_at if close_at is not None and (not rollup.billed or left_to_manual) else None
    await save_rollup(
        conn,
        rollup,
        closed_at=close_at,
        metered_at=metered_at,
        meter_note=BILLED_MANUALLY if left_to_manual else None,
        billed_manually=billed_manually,
    )
    return rollup


# Rows never refused a close first, then the one refused longest ago (as metering's work list): a row
# that keeps failing must not fill every batch, and one refused in this run sorts after those not tried.
_DUE: Final = """
SELECT customer_id, period_start, period_end, plan, billed_manually, meter_refusal FROM usage_rollups
WHERE closed_at IS NULL AND period_end <= $1
ORDER BY meter_refused_at NULLS FIRST, period_end
LIMIT $2
"""
# Why an open row could not close, where a closed one says why it was not billed; the close that succeeds
# writes its own meter_refusal over it and clears meter_refused_at (_UPSERT).
_NOT_CLOSED: Final = """
UPDATE usage_rollups SET meter_refused_at = $3, meter_refusal = $4
WHERE customer_id = $1 AND period_start = $2 AND closed_at IS NULL
"""


@dataclass(frozen=True)
class Closed:
    closed: int = 0  # periods closed
    not_closed: int = 0  # periods whose last roll-up raised: left open with why, tried again by later runs


async def close_periods(
    conn: Queryable,
    now: datetime,
    *,
    grace: timedelta,
    default_plan: str = "trial",
    limit: int = 1000,
    manual_billing: ManualBilling | None = None,
) -> Closed:
    """Close every open rollup whose period ended at least `grace` before `now`, with a last roll-up
    from the stored reports; how many were closed, and how many could not be (`Closed`): a row whose
    roll-up raises is left open, saying why in its meter_refusal, and the others close. A billed period
    of a Customer `manual_billing` names, or whose row a flush marked billed manually (the Customer
    moved to Stripe since: a checkout cut its manual-era row short), is closed as metered
    (`BILLED_MANUALLY`): no meter event is ever sent for it. A report ending in a period that arrives
    within the grace (its instance reports late, or retries after an outage) is billed with it, even
    when no row held the period before (`open_missing_rollups`); one that arrives after the period
    closed is kept but not billed (`reports_after_close`). The counters of a report across the period's
    end are the next period's, open when the report can arrive (it is sent once it has ended)."""
    if grace < timedelta(0):
        raise ValueError(f"grace must not be negative, got {grace}")
    # `limit` at a time until none is left: a month-end of more periods than one batch left the rest
    # for the next run, an interval later, and their meter events past Stripe's finalisation grace.
    closed, not_closed = 0, 0
    tried: set[tuple[str, datetime]] = set()
    while True:
        fetched = await conn.fetch(_DUE, now - grace, limit)
        rows = [row for row in fetched if (row["customer_id"], row["period_start"]) not in tried]
        billed = {row["customer_id"] for row in rows if row["plan"] in BILLED_PLANS}
        manual = await manual_billing(billed) if manual_billing is not None and billed else frozenset()
        for row in rows:
            tried.add((row["customer_id"], row["period_start"]))
            period = BillingPeriod(row["period_start"], row["period_end"])
            try:
                await roll_up_period(
                    conn,
                    row["customer_id"],
                    period,
                    row["plan"] or default_plan,
                    close_at=now,
                    billed_manually=row["billed_manually"] or row["customer_id"] in manual,
                )
            except Exception as error:
                # PostgreSQL away or timing out is the run's failure (IotisticUsageRunsFailing), not this
                # row's: said of every row, it hid an outage as periods that "cannot close".
                if database_unreachable(error) or isinstance(error, asyncpg.QueryCanceledError):
                    raise
                # One row that cannot close (a plan a later release renamed: plan_by_name's ValueError)
                # failed the run there, before every row after it, in every run for good.
                await _not_closed(conn, row, period, error, now)
                not_closed += 1
                continue
            closed += 1
        if not rows or len(fetched) < limit:
            return Closed(closed, not_closed)


async def _not_closed(
    conn: Queryable, row: Mapping[str, Any], period: BillingPeriod, error: Exception, now: datetime
) -> None:
    """Leave the row open, saying why on it (meter_refusal) and when (meter_refused_at, which sorts it
    after the others): a warning once per reason, not once per run, as a refused meter event."""
    reason = f"not closed: {type(error).__name__}: {error}"
    where = f"usage period of {row['customer_id']}, {period.start.isoformat()} .. {period.end.isoformat()}"
    if reason != row["meter_refusal"]:
        log.warning(
            "%s, %s; left open, tried again by later runs",
            where,
            reason,
            exc_info=None if isinstance(error, ValueError) else error,
        )
    else:
        log.debug("%s, %s again", where, reason)
    await conn.execute(_NOT_CLOSED, row["customer_id"], period.start, now, reason)


__all__ = [
    "BILLED_MANUALLY",
    "BILLED_PLANS",
    "CATCH_UP_OVERLAP",
    "Closed",
    "ManualBilling",
    "PlanHistory",
    "Rollup",
    "UnheldArrivals",
    "catch_up_look_back",
    "catch_up_spans",
    "close_periods",
    "compute_rollup",
    "included_usage",
    "note_caught_up",
    "open_missing_rollups",
    "overage_json",
    "overage_quantities",
    "period_plan",
    "plan_history",
    "priced_plan",
    "reports_after_close",
    "roll_up_period",
    "save_open_rollup",
    "save_rollup",
    "totals_json",
    "unheld_arrivals",
    "unsettled_period",
]
