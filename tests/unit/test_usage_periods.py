"""Billing periods: months anchored at currentPeriodEnd (clamped to short months) or calendar months."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from iotistic_billing.usage.periods import (
    BillingPeriod,
    billing_period,
    period_containing,
    period_ending_at,
    shift_months,
    utc_days,
    window_start,
)


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_without_a_subscription_the_period_is_the_utc_calendar_month() -> None:
    assert billing_period(at(2026, 11, 17, 13), None) == BillingPeriod(at(2026, 11, 1), at(2026, 12, 1))
    assert billing_period(at(2026, 12, 31, 23, 59), None) == BillingPeriod(at(2026, 12, 1), at(2027, 1, 1))
    # The first instant of a month belongs to that month, not the one before.
    assert billing_period(at(2027, 1, 1), None).start == at(2027, 1, 1)


def test_a_time_in_another_zone_is_placed_by_its_utc_instant() -> None:
    # 2026-12-01 00:30 in UTC+2 is still November 30 in UTC.
    local = datetime(2026, 12, 1, 0, 30, tzinfo=UTC) - timedelta(hours=2)
    assert billing_period(local.astimezone(UTC), None).start == at(2026, 11, 1)


def test_with_a_subscription_the_period_is_the_month_ending_at_current_period_end() -> None:
    end = at(2026, 12, 15, 9, 30)
    assert billing_period(at(2026, 12, 1), end) == BillingPeriod(at(2026, 11, 15, 9, 30), end)
    assert billing_period(at(2026, 11, 15, 9, 30), end).start == at(2026, 11, 15, 9, 30)


def test_the_month_before_a_period_end_is_clamped_to_the_shorter_month() -> None:
    assert period_ending_at(at(2026, 3, 31)) == BillingPeriod(at(2026, 2, 28), at(2026, 3, 31))
    assert period_ending_at(at(2028, 3, 30)) == BillingPeriod(at(2028, 2, 29), at(2028, 3, 30))  # leap year
    assert period_ending_at(at(2026, 5, 31)).start == at(2026, 4, 30)
    assert period_ending_at(at(2026, 1, 15)).start == at(2025, 12, 15)
    # The same rule through billing_period: a time inside the month ending at currentPeriodEnd.
    assert billing_period(at(2026, 3, 10), at(2026, 3, 31)) == BillingPeriod(at(2026, 2, 28), at(2026, 3, 31))


def test_with_stripe_s_period_start_the_period_is_stripe_s_own_not_the_clamped_month() -> None:
    # A checkout on Jan 31 at 10:00: Stripe's first period ends on Feb 28 and starts at the checkout,
    # not on Jan 28 (the month before Feb 28), which would bill the trial's last days on the paid plan.
    start, end = at(2026, 1, 31, 10), at(2026, 2, 28, 10)
    assert billing_period(at(2026, 1, 31, 11), end, start) == BillingPeriod(start, end)
    assert billing_period(at(2026, 2, 28, 9, 59), end, start) == BillingPeriod(start, end)
    # Before Stripe's start: the month ending there (a late report of the trial), not one reaching over it.
    assert billing_period(at(2026, 1, 29), end, start) == BillingPeriod(at(2025, 12, 31, 10), start)
    # From its end on, until the renewal arrives: the month after currentPeriodEnd, as without a start.
    assert billing_period(at(2026, 3, 1), end, start) == billing_period(at(2026, 3, 1), end)


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(at(2026, 2, 28, 10), id="at-its-end"),
        pytest.param(at(2026, 3, 1), id="after-its-end"),
        pytest.param(at(2025, 2, 28, 10), id="a-year-long"),
    ],
)
def test_a_start_that_makes_no_monthly_period_with_its_end_is_not_used(start: datetime) -> None:
    # A yearly or long trial period of Stripe's, or a start written by hand after the end: months
    # derived from currentPeriodEnd, as for a Customer written before currentPeriodStart existed.
    end = at(2026, 2, 28, 10)
    assert billing_period(at(2026, 2, 10), end, start) == BillingPeriod(at(2026, 1, 28, 10), end)


def test_after_current_period_end_the_next_month_is_billed_until_the_renewal_arrives() -> None:
    # Stripe's renewal webhook may come later than the period end: reports go to the next period.
    end = at(2026, 1, 31)
    assert billing_period(at(2026, 2, 3), end) == BillingPeriod(at(2026, 1, 31), at(2026, 2, 28))
    assert billing_period(at(2026, 3, 1), end) == BillingPeriod(at(2026, 2, 28), at(2026, 3, 31))


def test_boundaries_are_computed_from_the_anchor_so_a_short_february_does_not_stick() -> None:
    anchor = at(2026, 1, 31, 12)
    assert [shift_months(anchor, k).day for k in range(0, 6)] == [31, 28, 31, 30, 31, 30]
    assert period_containing(at(2026, 4, 30, 13), anchor) == BillingPeriod(
        at(2026, 4, 30, 12), at(2026, 5, 31, 12)
    )
    # An anchor far ahead (a period end years away) still finds the month that holds now.
    assert period_containing(at(2026, 6, 5), at(2030, 6, 10)) == BillingPeriod(
        at(2026, 5, 10), at(2026, 6, 10)
    )


def test_shift_months_crosses_years_both_ways() -> None:
    assert shift_months(at(2026, 11, 30), 3) == at(2027, 2, 28)
    assert shift_months(at(2026, 1, 31), -2) == at(2025, 11, 30)
    assert shift_months(at(2026, 1, 1), -13) == at(2024, 12, 1)


def test_a_period_must_end_after_it_starts() -> None:
    with pytest.raises(ValueError, match="must end after it starts"):
        BillingPeriod(at(2026, 1, 2), at(2026, 1, 1))


def test_the_window_holds_whole_utc_days_counting_today() -> None:
    now = at(2026, 11, 17, 15, 45)
    assert window_start(now, 1) == at(2026, 11, 17)
    assert window_start(now, 30) == at(2026, 10, 19)
    assert utc_days(at(2026, 10, 30), at(2026, 11, 2, 23)) == [
        date(2026, 10, 30),
        date(2026, 10, 31),
        date(2026, 11, 1),
        date(2026, 11, 2),
    ]
    with pytest.raises(ValueError, match="days must be at least 1"):
        window_start(now, 0)
