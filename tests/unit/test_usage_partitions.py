"""The monthly partitions of usage_reports: which months are made ahead and which are dropped, with
`now` an input; and the retention setting that drives it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from iotistic_billing.settings import SettingsError, load_settings
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.partitions import (
    month_of,
    month_of_partition,
    partition_name,
    plan_partitions,
    retention_cutoff,
    unmade,
)
from iotistic_billing.usage.periods import shift_months

NOW = datetime(2026, 12, 3, 13, 30, tzinfo=UTC)


def month(year: int, number: int) -> datetime:
    return datetime(year, number, 1, tzinfo=UTC)


def months(first: datetime, last: datetime) -> list[datetime]:
    found, current = [], first
    while current <= last:
        found.append(current)
        current = shift_months(current, 1)
    return found


def test_a_partition_is_named_after_its_utc_month() -> None:
    assert month_of(NOW) == month(2026, 12)
    # 00:30 on Jan 1 in UTC+2 is still December in UTC: reports are partitioned by UTC month.
    assert month_of(datetime(2027, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))) == month(2026, 12)
    assert partition_name(month(2026, 3)) == "usage_reports_2026_03"
    assert month_of_partition("usage_reports_2026_03") == month(2026, 3)
    for other in ("usage_reports_default", "usage_reports", "usage_rollups", "usage_reports_2026_3"):
        assert month_of_partition(other) is None


def test_a_partition_run_names_this_month_or_the_next_left_without_its_partition() -> None:
    """Found in review: a partition run whose DDL waited past LOCK_TIMEOUT left the month unmade, said
    so in a warning per try, and counted as done; a later month unmade is the next runs' to make."""
    assert unmade(months(month(2026, 12), month(2027, 2)), NOW) == ()
    assert unmade([month(2026, 12), month(2027, 2)], NOW) == ("usage_reports_2027_01",)
    assert unmade([month(2027, 1)], NOW) == ("usage_reports_2026_12",)
    assert unmade([], month(2027, 1)) == ("usage_reports_2027_01", "usage_reports_2027_02")


@pytest.mark.parametrize(
    ("existing", "now", "oldest_open", "create", "drop"),
    [
        # A new database: this month and the next two.
        ([], NOW, None, months(month(2026, 12), month(2027, 2)), []),
        # Made before: nothing to do; on the first of a month, the next month ahead.
        (months(month(2026, 12), month(2027, 2)), NOW, None, [], []),
        (months(month(2026, 12), month(2027, 2)), month(2027, 1), None, [month(2027, 3)], []),
        # 13 months back from Dec 3 is Nov 3, 2025: the months that end by then go, November stays
        # whole (a partition goes at once, so its reports stay up to a month past the retention).
        (months(month(2025, 9), month(2027, 2)), NOW, None, [], [month(2025, 9), month(2025, 10)]),
        # A billing period still open from Oct 15, 2025: October holds its first reports, and a report
        # of up to 31 days that started in September can run into it: both stay.
        (months(month(2025, 9), month(2027, 2)), NOW, datetime(2025, 10, 15, tzinfo=UTC), [], []),
        # One open from Nov 1: 31 days before it is Oct 1, where September ends; September goes.
        (months(month(2025, 9), month(2027, 2)), NOW, month(2025, 11), [], [month(2025, 9)]),
        # Exactly 13 months after a month's end (October 2025 ends on Nov 1), it goes.
        (months(month(2025, 10), month(2027, 2)), month(2026, 12), None, [], [month(2025, 10)]),
        (months(month(2025, 10), month(2027, 2)), month(2026, 12) - timedelta(seconds=1), None, [], []),
        # Gaps are never filled backwards: only the months ahead are made.
        ([month(2025, 1)], NOW, None, months(month(2026, 12), month(2027, 2)), [month(2025, 1)]),
    ],
)
def test_months_ahead_are_made_and_months_past_the_retention_dropped(
    existing: list[datetime],
    now: datetime,
    oldest_open: datetime | None,
    create: list[datetime],
    drop: list[datetime],
) -> None:
    plan = plan_partitions(existing, now, ahead=2, retention_months=13, oldest_open_start=oldest_open)
    assert (list(plan.create), list(plan.drop)) == (create, drop)


def test_the_cutoff_never_reaches_a_report_of_an_open_billing_period() -> None:
    assert retention_cutoff(NOW, 13, None) == datetime(2025, 11, 3, 13, 30, tzinfo=UTC)
    open_since = datetime(2024, 6, 15, tzinfo=UTC)  # a period left open (never closed) long ago
    # Reports are at most 31 days long: the earliest that can run into the period starts May 15.
    assert retention_cutoff(NOW, 13, open_since) == datetime(2024, 5, 15, tzinfo=UTC)
    assert retention_cutoff(NOW, 13, NOW) == datetime(2025, 11, 3, 13, 30, tzinfo=UTC)
    # Months are calendar months, clamped: 13 months before Mar 31 is Feb 28.
    assert retention_cutoff(datetime(2026, 3, 31, tzinfo=UTC), 13, None) == datetime(2025, 2, 28, tzinfo=UTC)
    # Whatever the retention, no month holding a report that can run into the oldest open period is
    # dropped.
    open_start = datetime(2026, 10, 20, tzinfo=UTC)
    everything = months(month(2024, 1), month(2027, 2))
    for retention in range(2, 30):
        plan = plan_partitions(
            everything, NOW, ahead=2, retention_months=retention, oldest_open_start=open_start
        )
        assert all(shift_months(dropped, 1) <= open_start - timedelta(days=31) for dropped in plan.drop)


def test_the_retention_is_two_months_at_least() -> None:
    assert UsageOptions().raw_retention_months == 13
    with pytest.raises(ValueError, match="raw_retention_months must be at least 2, got 1"):
        UsageOptions(raw_retention_months=1)
    with pytest.raises(ValueError, match="partition_interval must be positive or None, got 0"):
        UsageOptions(partition_interval=0)


def test_usage_raw_retention_is_read_and_checked_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().usage_raw_retention == 13
    monkeypatch.setenv("USAGE_RAW_RETENTION", "24")
    assert load_settings().usage_raw_retention == 24
    monkeypatch.setenv("USAGE_RAW_RETENTION", "1")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "USAGE_RAW_RETENTION: Input should be greater than or equal to 2" in str(refused.value)
