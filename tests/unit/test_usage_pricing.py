"""Rollups and overage against examples worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise

import pytest

from iotistic_billing.licensing.plans import plan_by_name
from iotistic_billing.usage.pricing import PeriodTotals, UsageSample, overage, roll_up

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)  # 30 days
GB = 10**9


def sample(day: int, hours: int = 24, **fields: object) -> UsageSample:
    begin = START + timedelta(days=day)
    values: dict[str, object] = {
        "active_devices": 0,
        "mqtt_bytes": 0,
        "http_bytes": 0,
        "http_requests": 0,
        "postgres_size_mb": Decimal(0),
    }
    values.update(fields)
    return UsageSample(period_start=begin, period_end=begin + timedelta(hours=hours), **values)  # type: ignore[arg-type]


def test_roll_up_sums_counters_takes_peak_devices_and_averages_storage() -> None:
    samples = [
        sample(
            0,
            hours=24 * 15,
            active_devices=8,
            mqtt_bytes=3 * GB,
            http_bytes=GB,
            http_requests=400,
            postgres_size_mb=Decimal(4000),
        ),
        sample(
            15,
            hours=24 * 15,
            active_devices=12,
            mqtt_bytes=2 * GB,
            http_requests=600,
            postgres_size_mb=Decimal(8000),
        ),
        sample(30, active_devices=99),  # the next period's
        sample(-1, active_devices=99),  # ends as the period starts: the period before's
    ]
    totals = roll_up(samples, START, END)
    # 4 GB for half the period and 8 GB for the other half: 6 GB-months.
    assert totals == PeriodTotals(
        START,
        END,
        peak_devices=12,
        mqtt_bytes=5 * GB,
        http_bytes=GB,
        api_calls=1000,
        storage_gb_months=Decimal(6),
        reports=2,
        device_hours=Decimal(8 * 360 + 12 * 360),  # active devices times each report's hours
    )


def steady(starts: list[datetime]) -> list[UsageSample]:
    """Reports from each start to the next: a 10,000 MB database, 100 API calls each."""
    return [
        UsageSample(start, end, 1, 0, 0, http_requests=100, postgres_size_mb=Decimal(10_000))
        for start, end in pairwise(starts)
    ]


@pytest.mark.parametrize(
    ("samples", "period"),
    [
        # Daily reports from midnight, a Stripe period anchored at noon: each end cuts a report in two.
        (
            steady([datetime(2031, 1, 1, tzinfo=UTC) + timedelta(days=day) for day in range(61)]),
            (datetime(2031, 1, 15, 12, tzinfo=UTC), datetime(2031, 2, 15, 12, tzinfo=UTC)),
        ),
        # A report a month, on the 15th, against calendar February: half of two reports.
        (
            steady([datetime(2031, month, 15, tzinfo=UTC) for month in range(1, 5)]),
            (datetime(2031, 2, 1, tzinfo=UTC), datetime(2031, 3, 1, tzinfo=UTC)),
        ),
    ],
    ids=["daily-reports-noon-period", "monthly-reports-calendar-month"],
)
def test_storage_counts_every_report_for_its_time_inside_the_period(
    samples: list[UsageSample], period: tuple[datetime, datetime]
) -> None:
    """A steady 10,000 MB database is 10 GB-months in any period, however the reports fall across its
    ends (the part after the end counted nowhere gave 9.84 and 5); counters still belong to the period
    their report ends in."""
    totals = roll_up(samples, *period)
    assert totals.storage_gb_months == Decimal(10)
    ending_inside = [sample for sample in samples if period[0] < sample.period_end <= period[1]]
    assert totals.reports == len(ending_inside) and totals.api_calls == 100 * len(ending_inside)


def test_a_report_across_the_periods_end_counts_in_the_period_it_ends_in() -> None:
    """It is sent once it has ended, so only the period it ends in can still be open when it comes:
    counted in the one it started in, it came after that one closed and was billed nowhere."""
    across = sample(29, hours=36, active_devices=7, http_requests=1000, postgres_size_mb=Decimal(3000))
    this, following = roll_up([across], START, END), roll_up([across], END, END + timedelta(days=31))
    assert (this.reports, this.api_calls, this.peak_devices) == (0, 0, 0)
    assert (following.reports, following.api_calls, following.peak_devices) == (1, 1000, 7)
    # Its storage in each, for its time inside: 24 of 720 hours, then 12 of 744.
    assert this.storage_gb_months == Decimal(3) * 24 / 720
    assert following.storage_gb_months == Decimal(3) * 12 / 744


def test_starter_overage_worked_by_hand() -> None:
    # Starter includes 10 devices, 10 GB traffic, 5 GB storage, 100,000 API calls.
    totals = PeriodTotals(
        START,
        END,
        peak_devices=13,
        mqtt_bytes=9 * GB,
        http_bytes=3 * GB,
        api_calls=102_500,
        storage_gb_months=Decimal("7.5"),
        reports=30,
    )
    bill = overage(totals, plan_by_name("starter").included)
    # devices: 3 over x $2 = $6.00
    # traffic: 12 GB used, 2 GB over, split 9:3 ->
    #   MQTT 1.5 GB x $0.10 = $0.15, HTTP 0.5 GB x $0.15 = $0.075 -> $0.08 (half up)
    # storage: 2.5 GB-months over x $0.20 = $0.50
    # API calls: 2,500 over x $0.50 / 1,000 = $1.25
    assert {line.metric: line.amount for line in bill.lines} == {
        "devices": Decimal("6.00"),
        "mqtt_traffic_gb": Decimal("0.15"),
        "http_traffic_gb": Decimal("0.08"),
        "storage_gb_months": Decimal("0.50"),
        "api_calls": Decimal("1.25"),
    }
    assert bill.line("mqtt_traffic_gb").quantity == Decimal("1.5")  # type: ignore[union-attr]
    assert bill.total == Decimal("7.98") and bill.total_cents == 798


def test_nothing_over_the_quota_bills_nothing() -> None:
    totals = PeriodTotals(
        START,
        END,
        peak_devices=50,
        mqtt_bytes=60 * GB,
        http_bytes=40 * GB,
        api_calls=1_000_000,
        storage_gb_months=Decimal(50),
    )
    assert overage(totals, plan_by_name("professional").included).lines == ()


def test_enterprise_is_unlimited() -> None:
    totals = PeriodTotals(
        START,
        END,
        peak_devices=10_000,
        mqtt_bytes=10**15,
        http_bytes=10**15,
        api_calls=10**12,
        storage_gb_months=Decimal(10**6),
    )
    assert overage(totals, plan_by_name("enterprise").included).total == Decimal("0.00")


def test_exact_decimal_arithmetic_has_no_float_drift() -> None:
    # 1 byte over 10 GB of traffic, all MQTT: 1e-9 GB x $0.10 rounds to $0.00 and is still reported.
    totals = PeriodTotals(START, END, mqtt_bytes=10 * GB + 1)
    line = overage(totals, plan_by_name("starter").included).line("mqtt_traffic_gb")
    assert line is not None and line.quantity == Decimal("1E-9") and line.amount == Decimal("0.00")


def test_an_empty_period_is_refused() -> None:
    with pytest.raises(ValueError, match="period_end must be after period_start"):
        roll_up([], END, START)
