"""Billing periods and report windows: pure date arithmetic, every function takes `now`.

A Customer billed through Stripe is billed per subscription period: Stripe's own,
`spec.subscription.currentPeriodStart` .. `currentPeriodEnd`, while it holds `now`. Without the start
(a Customer written before it was kept), before it or after the end (the renewal not in yet), the
months anchored there: the month ending at currentPeriodEnd starts on the same day of the month one
month earlier (clamped to that month's last day, as Stripe does for an anchor on the 29th to 31st), so
Stripe's first period of a checkout on Jan 31 (Jan 31 .. Feb 28) would start on Jan 28. Every other
Customer is billed per UTC calendar month. All are one rule: months anchored at an instant, the
calendar month being anchored at midnight UTC on the 1st.

A report counts in the period its period_end falls in, start < period_end <= end: it can only be sent
once it has ended, so one across a period's end arrives while the period it ends in is still open.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

# Midnight UTC on a 1st: the anchor of calendar months.
CALENDAR_ANCHOR: Final = datetime(2000, 1, 1, tzinfo=UTC)
# The longest period, a 31-day month.
LONGEST_PERIOD: Final = timedelta(days=31)
# Python's and PostgreSQL's times are whole microseconds: a report ending at `end` counts in the period
# holding `end - INSTANT`.
INSTANT: Final = timedelta(microseconds=1)


@dataclass(frozen=True, order=True)
class BillingPeriod:
    """[start, end) for a moment (`contains`); a report's counters belong to the period its
    period_end falls in, start < period_end <= end (see the module's note)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError(f"a billing period must end after it starts, got {self.start} .. {self.end}")

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    def closed(self, now: datetime) -> bool:
        return self.end <= now


def shift_months(anchor: datetime, months: int) -> datetime:
    """`anchor` moved by whole months, keeping its day of the month where that month has it and the
    month's last day where it does not (Jan 31 + 1 month = Feb 28 or 29), and its time of day."""
    index = anchor.year * 12 + (anchor.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_containing(now: datetime, anchor: datetime = CALENDAR_ANCHOR) -> BillingPeriod:
    """The monthly period anchored at `anchor` that holds `now` (`anchor` may be before or after it).

    Each boundary is computed from the anchor itself, never from the previous boundary, so a clamped
    February does not pull every later month to the 28th.
    """
    now = now.astimezone(UTC)
    anchor = anchor.astimezone(UTC)
    months = (now.year - anchor.year) * 12 + (now.month - anchor.month)
    # The estimate is off by at most one month either way (day and time of day within the month).
    while shift_months(anchor, months) > now:
        months -= 1
    while shift_months(anchor, months + 1) <= now:
        months += 1
    return BillingPeriod(shift_months(anchor, months), shift_months(anchor, months + 1))


def billing_period(
    now: datetime, current_period_end: datetime | None, current_period_start: datetime | None = None
) -> BillingPeriod:
    """The period `now` is billed in: with a subscription's currentPeriodEnd, Stripe's period when
    `current_period_start` is its start and `now` lies in it, the months ending at that start before
    it, else the months anchored at currentPeriodEnd; without one, the UTC calendar month.

    A start that makes no monthly period with its end (not before it, or more than LONGEST_PERIOD
    before it: a yearly price, a long Stripe trial) is not used: reports, partitions and the close
    grace all assume periods of a month at most."""
    if current_period_end is None:
        return period_containing(now, CALENDAR_ANCHOR)
    if current_period_start is not None and (
        current_period_start < current_period_end <= current_period_start + LONGEST_PERIOD
    ):
        if current_period_start <= now < current_period_end:
            return BillingPeriod(current_period_start, current_period_end)
        if now < current_period_start:
            return period_containing(now, current_period_start)
    return period_containing(now, current_period_end)


def period_ending_at(end: datetime) -> BillingPeriod:
    """The month ending at `end`: same day of the month one month earlier, clamped."""
    return BillingPeriod(shift_months(end, -1), end)


def window_start(now: datetime, days: int) -> datetime:
    """Start of a `days`-day report window ending now: midnight UTC of the oldest day, so the window
    holds `days` whole UTC days counting today."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    return datetime(first.year, first.month, first.day, tzinfo=UTC)


def utc_days(start: datetime, end: datetime) -> list[date]:
    """Every UTC date from `start` up to and including the date of `end`."""
    first, last = start.astimezone(UTC).date(), end.astimezone(UTC).date()
    return [first + timedelta(days=offset) for offset in range((last - first).days + 1)]


__all__ = [
    "CALENDAR_ANCHOR",
    "INSTANT",
    "LONGEST_PERIOD",
    "BillingPeriod",
    "billing_period",
    "period_containing",
    "period_ending_at",
    "shift_months",
    "utc_days",
    "window_start",
]
