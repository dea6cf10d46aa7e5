"""Stripe meter events of a closed period: identifiers, values Stripe accepts, and the stored JSON."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from itertools import pairwise
from typing import Any, cast

import asyncpg
import pytest

from iotistic_billing.customer import Customer
from iotistic_billing.db.pool import Pool
from iotistic_billing.licensing.plans import plan_by_name
from iotistic_billing.usage.metering import MeterEvent, meter_events_for, meter_identifier, meter_value
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.periods import BillingPeriod
from iotistic_billing.usage.pricing import CENT, OverageLine, PeriodTotals, overage
from iotistic_billing.usage.rollups import (
    PlanHistory,
    catch_up_spans,
    compute_rollup,
    overage_json,
    overage_quantities,
    period_plan,
    totals_json,
)
from iotistic_billing.usage.service import (
    cancelled_by,
    customer_period,
    customer_plan,
    ended_early,
    ended_period_plan,
)

START = datetime(2026, 11, 15, 9, 30, tzinfo=UTC)
END = datetime(2026, 12, 15, 9, 30, tzinfo=UTC)
GB = 10**9


def test_the_identifier_is_stable_per_customer_period_and_metric() -> None:
    midnight = datetime(2026, 11, 1, tzinfo=UTC)  # a calendar month
    assert meter_identifier("cust_abc123", midnight, "devices") == "cust_abc123:20261101:devices"
    assert meter_identifier("cust_abc123", START, "devices") == "cust_abc123:20261115T093000Z:devices"
    # The period start is taken in UTC, whatever zone the datetime carries.
    assert meter_identifier("cust_abc123", START.astimezone(), "api_calls").endswith(
        ":20261115T093000Z:api_calls"
    )


def test_two_periods_that_start_on_one_day_have_their_own_identifiers() -> None:
    # A checkout at 15:00 cuts the period that started at 09:00 short: both start on Nov 15.
    later = START.replace(hour=15)
    assert meter_identifier("cust_abc123", START, "devices") != meter_identifier(
        "cust_abc123", later, "devices"
    )


def stripe_amount(line: OverageLine) -> Decimal:
    """What Stripe invoices for a line: the meter value it is sent, at the metered price, to the cent."""
    value = meter_value(line.quantity)
    sent = Decimal(value) if value is not None else Decimal(0)
    return (sent * line.unit_price / line.per).quantize(CENT, rounding=ROUND_HALF_UP)


@pytest.mark.parametrize(
    ("totals", "metric", "amount"),
    [
        # 0.0249996 GB-months over starter's 5 is sent as 0.025: $0.005, a cent.
        (PeriodTotals(START, END, storage_gb_months=Decimal("5.0249996")), "storage_gb_months", "0.01"),
        # 10 GB included, 0.0499996 GB over, all MQTT: sent as 0.05, $0.005.
        (PeriodTotals(START, END, mqtt_bytes=10 * GB + 49_999_600), "mqtt_traffic_gb", "0.01"),
        # 0.0999996 GB of HTTP over, sent as 0.1: $0.015, two cents (the unrounded $0.01499994 was one).
        (PeriodTotals(START, END, http_bytes=10 * GB + 99_999_600), "http_traffic_gb", "0.02"),
    ],
)
def test_a_line_s_amount_is_what_stripe_invoices_for_the_value_it_is_sent(
    totals: PeriodTotals, metric: str, amount: str
) -> None:
    """Found in review: a line's amount was priced from the unrounded quantity, Stripe's from the meter
    value rounded to 6 decimals: 0.0249996 GB-months over showed $0.00 and Stripe billed $0.01."""
    line = overage(totals, plan_by_name("starter").included).line(metric)
    assert line is not None
    assert line.amount == stripe_amount(line) == Decimal(amount)


def test_values_are_plain_decimals_of_at_most_15_digits() -> None:
    assert meter_value(Decimal(3)) == "3"
    assert meter_value(Decimal("1.5")) == "1.5"
    assert meter_value(Decimal("0.3333333333333333333333333333")) == "0.333333"
    assert meter_value(Decimal("123456789012.123456789")) == "123456789012.123"
    assert meter_value(Decimal("1E+20")) == "100000000000000000000"
    assert meter_value(Decimal("1E-9")) is None  # rounds to nothing: nothing to bill
    assert meter_value(Decimal(0)) is None


def test_a_closed_period_owes_one_event_per_metric_over_its_quota() -> None:
    totals = PeriodTotals(
        START, END, peak_devices=13, mqtt_bytes=9 * GB, http_bytes=3 * GB, api_calls=102_500
    )
    stored = overage_json(overage(totals, plan_by_name("starter").included))
    events = meter_events_for("cust_abc123", "cus_Q1", BillingPeriod(START, END), overage_quantities(stored))
    assert [(e.metric, e.value) for e in events] == [
        ("devices", "3"),
        ("mqtt_traffic_gb", "1.5"),
        ("http_traffic_gb", "0.5"),
        ("api_calls", "2500"),
    ]
    first = events[0]
    assert first.params() == {
        "event_name": "iotistic_devices",
        "payload": {"stripe_customer_id": "cus_Q1", "value": "3"},
        "identifier": "cust_abc123:20261115T093000Z:devices",
        # The last second of the period: Stripe bills [start, end), and the end is the next period's.
        "timestamp": int(END.timestamp()) - 1,
    }


def test_stripe_takes_a_periods_events_until_35_days_after_its_last_second() -> None:
    (event,) = meter_events_for("cust_abc123", "cus_Q1", BillingPeriod(START, END), {"devices": Decimal(3)})
    last_second = END - timedelta(seconds=1)
    assert not event.past_stripe_window(END + timedelta(hours=1))
    assert not event.past_stripe_window(last_second + timedelta(days=35))
    assert event.past_stripe_window(last_second + timedelta(days=35, seconds=1))


def test_rollup_json_keeps_decimals_exact_as_strings() -> None:
    totals = PeriodTotals(START, END, peak_devices=13, storage_gb_months=Decimal("7.5"), reports=2)
    rollup = compute_rollup("cust_abc123", BillingPeriod(START, END), "starter", totals)
    assert totals_json(totals) == {
        "period_start": "2026-11-15T09:30:00+00:00",
        "period_end": "2026-12-15T09:30:00+00:00",
        "peak_devices": 13,
        "mqtt_bytes": 0,
        "http_bytes": 0,
        "api_calls": 0,
        "storage_gb_months": "7.5",
        "reports": 2,
    }
    assert overage_json(rollup.overage) == {
        "lines": [
            {"metric": "devices", "quantity": "3", "unit_price": "2.00", "per": 1, "amount": "6.00"},
            {
                "metric": "storage_gb_months",
                "quantity": "2.5",
                "unit_price": "0.20",
                "per": 1,
                "amount": "0.50",
            },
        ],
        "total": "6.50",
        "total_cents": 650,
    }
    assert rollup.billed
    assert not compute_rollup("cust_abc123", BillingPeriod(START, END), "trial", totals).billed


@pytest.mark.parametrize(
    ("effective", "recorded", "priced"),
    [
        ("unlicensed", "professional", "professional"),  # lapsed: the paid plan stays
        ("trial", "starter", "starter"),
        ("starter", "professional", "starter"),  # a paid plan changed: the last one
        ("starter", "trial", "starter"),  # a trial converted
        ("professional", "unlicensed", "professional"),  # reinstated
        ("unlicensed", "trial", "unlicensed"),  # never paid: not billed
        ("unlicensed", None, "unlicensed"),  # no row yet: nothing recorded
    ],
)
def test_a_period_is_priced_against_the_last_paid_plan_it_held(
    effective: str, recorded: str | None, priced: str
) -> None:
    assert period_plan(effective, recorded) == priced


def professional_until(end: datetime, cancel_at_period_end: bool) -> Customer:
    """A Stripe-billed professional Customer whose subscription's period ends at `end`."""
    return Customer.model_validate(
        {
            "metadata": {"name": "acme"},
            "spec": {
                "email": "a@b.cd",
                "companyName": "Acme",
                "billing": {"mode": "stripe"},
                "subscription": {
                    "status": "active",
                    "plan": "professional",
                    "currentPeriodEnd": end.isoformat(),
                    "cancelAtPeriodEnd": cancel_at_period_end,
                },
            },
            "status": {"plan": "professional"},
        }
    )


@pytest.mark.parametrize(
    ("cancel_at_period_end", "starts_after_its_end", "plan"),
    [
        (True, True, "unlicensed"),  # cancelled at its end: the next period holds no paid plan
        (True, False, "professional"),  # still its last period
        (False, True, "professional"),  # a renewal not applied yet: still paid
    ],
)
def test_a_period_after_a_subscription_cancelled_at_its_end_holds_no_paid_plan_whatever_the_status_says(
    cancel_at_period_end: bool, starts_after_its_end: bool, plan: str
) -> None:
    """Found in review: the report ending at the boundary flushed the next period while the status still
    said professional (Stripe's deletion not applied yet), and period_plan kept professional for all of
    a period in which the Customer held no paid plan."""
    end = datetime(2026, 12, 20, tzinfo=UTC)
    customer = professional_until(end, cancel_at_period_end)
    start = end if starts_after_its_end else end - timedelta(days=30)
    assert customer_plan(customer, BillingPeriod(start, start + timedelta(days=30))) == plan
    assert customer_plan(customer) == "professional"


MARCH = BillingPeriod(datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC))


def on(day: int, month: int = 3) -> datetime:
    return datetime(2025, month, day, tzinfo=UTC)


@pytest.mark.parametrize(
    ("licences", "held"),
    [
        # Upgraded on the 1st of April, after March: March held starter.
        (((on(10, 2), "starter"), (on(1, 4), "professional")), "starter"),
        # Lapsed by dunning after March: its paid plan all the same.
        (((on(10, 2), "starter"), (on(3, 4), "unlicensed")), "starter"),
        # Downgraded after March: the plan it held, not the cheaper one.
        (((on(10, 2), "enterprise"), (on(1, 4), "starter")), "enterprise"),
        # Within March: the last paid plan, whether lapsed after it or changed to another paid plan.
        (((on(10, 2), "starter"), (on(20), "unlicensed")), "starter"),
        (((on(10, 2), "trial"), (on(5), "starter"), (on(20), "professional")), "professional"),
        (((on(10, 2), "unlicensed"), (on(20), "starter")), "starter"),
        # Issued exactly as March starts: the one in force at its start, the one before it not.
        (((on(10, 2), "starter"), (on(1), "trial")), "trial"),
        # Never paid in March: the plan in force at its end.
        (((on(10, 2), "trial"), (on(20), "unlicensed")), "unlicensed"),
        # No licence took effect by March's end: the history cannot say.
        (((on(1, 4), "professional"),), None),
        ((), None),
    ],
    ids=[
        "upgraded-after",
        "lapsed-after",
        "downgraded-after",
        "lapsed-within",
        "upgraded-within",
        "reinstated-within",
        "issued-at-its-start",
        "never-paid",
        "history-after-it",
        "no-history",
    ],
)
def test_an_ended_period_holds_the_last_paid_plan_its_licences_had(
    licences: tuple[tuple[datetime, str], ...], held: str | None
) -> None:
    assert PlanHistory(on(1, 1), licences).held(MARCH) == held


def test_a_plan_history_read_after_a_period_starts_cannot_say_what_it_held() -> None:
    with pytest.raises(ValueError, match=r"period.start must not be before the history read \(2025-03-02"):
        PlanHistory(on(2), ()).held(MARCH)


def test_an_ended_period_is_priced_on_today_s_plan_only_when_the_history_has_none_of_it() -> None:
    customer = professional_until(MARCH.start, cancel_at_period_end=True)
    february = BillingPeriod(on(1, 2), MARCH.start)
    assert ended_period_plan(customer, february, "starter") == "starter"
    assert ended_period_plan(customer, february, None) == "professional"
    # Starting once the subscription set to cancel at its end ended: no paid plan, though its licence
    # was in force at March's start until the operator's pass lapsed it.
    assert ended_period_plan(customer, MARCH, "professional") == "unlicensed"
    assert ended_period_plan(customer, MARCH, None) == "unlicensed"


def test_periods_are_closed_an_hour_after_their_end_unless_told_otherwise() -> None:
    assert UsageOptions().close_grace == 3600
    assert UsageOptions(close_grace=0).close_grace == 0
    with pytest.raises(ValueError, match="close_grace must not be negative, got -1"):
        UsageOptions(close_grace=-1)


def test_the_meter_run_looks_three_meter_intervals_back_for_reports_no_flush_rolled_up() -> None:
    assert UsageOptions().catch_up_window == timedelta(hours=3)
    assert UsageOptions(meter_interval=600).catch_up_window == timedelta(minutes=30)
    # Runs not timed (tests, the inbox process): as for the default hour.
    assert UsageOptions(meter_interval=None).catch_up_window == timedelta(hours=3)


def test_a_look_back_longer_than_a_span_is_cut_into_spans_oldest_first() -> None:
    """After an outage of weeks the look is many statements of a span each, not one of all of it."""
    started, hour = datetime(2025, 4, 1, 2, tzinfo=UTC), timedelta(hours=1)
    assert catch_up_spans(started, 3 * hour, 3 * hour) == [(started - 3 * hour, started)]
    spans = catch_up_spans(started, timedelta(days=20, minutes=5), 3 * hour)
    assert len(spans) == 161 and spans[0][0] == started - timedelta(days=20, minutes=5)
    assert all(until - since == 3 * hour for since, until in spans[:-1])
    assert all(a[1] == b[0] for a, b in pairwise(spans)) and spans[-1][1] == started
    with pytest.raises(ValueError, match="span must be positive, got 0:00:00"):
        catch_up_spans(started, hour, timedelta(0))


async def test_an_identifier_stripe_already_holds_is_an_event_sent() -> None:
    """Found in review: Stripe does not drop a repeated identifier quietly, it refuses it (400, "An event
    already exists with identifier ..."): a send whose record was lost (a crash after Stripe's answer)
    was refused for good, and after 35 days reported as billed in no invoice, though Stripe had it."""
    import stripe

    from iotistic_billing.usage.metering import StripeMeterSender

    (event,) = meter_events_for(
        "cust_dup0000001", "cus_dup", BillingPeriod(START, END), {"api_calls": Decimal(2500)}
    )

    class Refusing:
        def __init__(self, message: str) -> None:
            self.message = message

        async def create_async(self, params: object) -> object:
            raise stripe.InvalidRequestError(self.message, "identifier", http_status=400)

    def sender(message: str) -> StripeMeterSender:
        client = type("Client", (), {})()
        client.v1 = type("V1", (), {})()
        client.v1.billing = type("Billing", (), {})()
        client.v1.billing.meter_events = Refusing(message)
        return StripeMeterSender(client)  # type: ignore[arg-type]

    held = f"An event already exists with identifier {event.identifier}."
    assert await sender(held)(event) == event.identifier
    with pytest.raises(stripe.InvalidRequestError):
        await sender("No active meter was found for event_name iotistic_devices.")(event)


# The review's scenario: a starter subscription of Jan 20 10:00 .. Feb 20 10:00, cancelled immediately on
# Jan 25 at 10:00 (by an admin, or by Stripe's dunning).
JAN_20, FEB_20 = datetime(2027, 1, 20, 10, tzinfo=UTC), datetime(2027, 2, 20, 10, tzinfo=UTC)
CANCELLED = datetime(2027, 1, 25, 10, tzinfo=UTC)


def starter_cancelled(ended_at: datetime | None, status: str = "canceled") -> Customer:
    """A Stripe-billed starter Customer whose subscription Stripe ended at `ended_at`; the operator's
    pass has not lapsed the status yet."""
    return Customer.model_validate(
        {
            "metadata": {"name": "acme"},
            "spec": {
                "email": "a@b.cd",
                "companyName": "Acme",
                "billing": {"mode": "stripe"},
                "subscription": {
                    "status": status,
                    "plan": "starter",
                    "currentPeriodStart": JAN_20.isoformat(),
                    "currentPeriodEnd": FEB_20.isoformat(),
                    **({"endedAt": ended_at.isoformat()} if ended_at else {}),
                },
            },
            "status": {"plan": "starter"},
        }
    )


def test_a_subscription_ended_inside_its_period_cuts_the_period_there() -> None:
    """Found in review: a subscription cancelled immediately on Jan 25 left its usage period running to
    Feb 20 on starter: its overage was metered for Feb 20 09:59:59, when no subscription bills the
    customer (on no invoice, yet shown billed), and the usage after the cancellation was priced on
    starter too."""
    customer = starter_cancelled(CANCELLED)

    cut = BillingPeriod(JAN_20, CANCELLED)
    assert customer_period(customer, datetime(2027, 1, 24, tzinfo=UTC)) == cut
    assert customer_plan(customer, cut) == "starter"
    # Its meter events carry the last second before the cancellation, inside the subscription.
    (event,) = meter_events_for("cust_acme", "cus_acme", cut, {"mqtt_traffic_gb": Decimal(80)})
    assert event.timestamp == int(CANCELLED.timestamp()) - 1
    # From the cancellation on: months from it, on no paid plan, whatever the status still says and
    # whatever a flush before the deletion was applied recorded for the period.
    after = customer_period(customer, CANCELLED)
    assert after == BillingPeriod(CANCELLED, datetime(2027, 2, 25, 10, tzinfo=UTC))
    assert customer_period(customer, datetime(2027, 2, 21, tzinfo=UTC)) == after
    assert customer_plan(customer, after) == "unlicensed"
    assert cancelled_by(customer, after.start)
    assert period_plan(customer_plan(customer, after), "starter", lapsed=True) == "unlicensed"
    assert ended_early(customer) == CANCELLED


@pytest.mark.parametrize(
    ("ended_at", "status"),
    [
        (FEB_20, "canceled"),  # ended at its period's end: the period stands
        (None, "canceled"),  # an ending recorded without Stripe's time: as before
        (CANCELLED, "active"),  # live (an endedAt of an earlier life is not read)
    ],
)
def test_a_subscription_not_ended_early_keeps_its_period(ended_at: datetime | None, status: str) -> None:
    customer = starter_cancelled(ended_at, status)
    assert ended_early(customer) is None
    assert customer_period(customer, datetime(2027, 1, 26, tzinfo=UTC)) == BillingPeriod(JAN_20, FEB_20)


class MeterConnection:
    """PostgreSQL for a meter run with one closed, unmetered period of `row`: records the updates."""

    def __init__(self, row: dict[str, object]) -> None:
        self.rows = [row]
        self.executed: list[tuple[str, tuple[object, ...]]] = []

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        if "FROM usage_rollups r JOIN customers" in query:
            rows, self.rows = self.rows, []
            return rows
        return []  # nothing due to close, no event recorded yet

    async def fetchval(self, query: str, *args: object) -> object:
        return True  # the meter run's lock

    async def execute(self, query: str, *args: object) -> str:
        self.executed.append((query, args))
        return "OK"

    @asynccontextmanager
    async def acquire(self, **options: object) -> AsyncIterator[MeterConnection]:
        yield self


def closed_row(period: BillingPeriod) -> dict[str, object]:
    bill = overage_json(
        overage(
            PeriodTotals(period.start, period.end, mqtt_bytes=90 * GB, reports=1),
            plan_by_name("starter").included,
        )
    )
    return {
        "customer_id": "cust_acme",
        "period_start": period.start,
        "period_end": period.end,
        "plan": "starter",
        "overage": json.dumps(bill),
        "meter_refusal": None,
        "billed_manually": False,
        "stripe_customer_id": "cus_acme",
    }


@pytest.mark.parametrize(
    ("period", "invoiced"),
    [
        (BillingPeriod(JAN_20, FEB_20), False),  # uncut (closed before the ending was known): after it
        (BillingPeriod(JAN_20, CANCELLED), False),  # cut at the ending, not metered before it
        (BillingPeriod(JAN_20 - timedelta(days=31), JAN_20), True),  # the period before: its own invoice
    ],
)
async def test_a_period_whose_subscription_ended_first_is_not_metered_as_billed(
    period: BillingPeriod, invoiced: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: the meter run sent the events of a period whose subscription Stripe had ended
    (dunning's cancel, or an immediate one) and marked it metered: Stripe took them (meters are the
    customer's), no invoice carried them, and the API, console and CLI said billed."""
    from iotistic_billing.usage.metering import send_meter_events

    conn = MeterConnection(closed_row(period))
    sent: list[MeterEvent] = []

    async def sender(event: MeterEvent) -> str:
        sent.append(event)
        return event.identifier

    async def ends(customer_ids: Collection[str]) -> Mapping[str, datetime]:
        return dict.fromkeys(customer_ids, CANCELLED)

    now = FEB_20 + timedelta(hours=1)
    run = await send_meter_events(
        cast(Pool, conn), sender, now, close_grace=timedelta(hours=1), subscription_ends=ends
    )

    (update, args), *_ = [(q, a) for q, a in conn.executed if "UPDATE usage_rollups" in q]
    if invoiced:
        assert [event.metric for event in sent] == ["mqtt_traffic_gb"] and run.not_invoiced == 0
        return
    assert sent == [] and run.not_invoiced == 1
    # Marked metered (never sent again), its meter_refusal saying why it is not billed.
    assert "metered_at" in update and args[2] == now
    reason = str(args[3])
    assert reason.startswith("not invoiced: the subscription ended at 2027-01-25T10:00:00+00:00")
    assert "mqtt_traffic_gb" in reason
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"meter events of cust_acme, period {period.start.isoformat()} .. {period.end.isoformat()}: {reason}"
    ]


class DueRows:
    """The open rollups close_periods fetches: one row, due; what it executed."""

    def __init__(self) -> None:
        self.executed: list[str] = []

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        return [
            {
                "customer_id": "cust_acme",
                "period_start": JAN_20,
                "period_end": FEB_20,
                "plan": "starter",
                "billed_manually": False,
                "meter_refusal": None,
            }
        ]

    async def execute(self, query: str, *args: object) -> str:
        self.executed.append(query)
        return "UPDATE 1"


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(),
        ConnectionResetError(),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
    ],
)
async def test_postgresql_away_or_timing_out_fails_the_close_not_the_row(
    error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: every error of a row's close marked it "not closed", so PostgreSQL timing out
    at a month-end said its periods cannot close (an alert to mend a plan), and an outage of every row
    left the run counted ok."""
    from iotistic_billing.usage import rollups

    async def failing(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(rollups, "roll_up_period", failing)
    conn = DueRows()
    with pytest.raises(type(error)):
        await rollups.close_periods(cast(Any, conn), FEB_20 + timedelta(hours=2), grace=timedelta(hours=1))
    assert conn.executed == []  # nothing said of the row
