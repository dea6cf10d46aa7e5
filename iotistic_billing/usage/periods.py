"""Billing periods and report windows: pure date arithmetic, every function takes `now`.

A Customer billed through Stripe is billed per subscription period: the month ending at
`spec.subscription.currentPeriodEnd`, which starts on the same day of the month one month earlier
(clamped to that month's last day, as Stripe does for an anchor on the 29th to 31st). Every other
Customer is billed per UTC calendar month. Both are one rule: months anchored at an instant, the
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


def billing_period(now: datetime, current_period_end: datetime | None) -> BillingPeriod:
    """The period `now` is billed in: anchored at the subscription's currentPeriodEnd when there is one
    (so the month ending there while it is still ahead), else the UTC calendar month."""
    return period_containing(now, current_period_end or CALENDAR_ANCHOR)


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
