"""status.usage and WithinLimits from a period's totals, the merge patch, and the coalescer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from iotistic_billing.customer import Condition, ConditionStatus, CustomerStatus, UsageStatus
from iotistic_billing.licensing.plans import plan_by_name
from iotistic_billing.usage.coalescer import Reported, UsageCoalescer
from iotistic_billing.usage.periods import BillingPeriod
from iotistic_billing.usage.pricing import PeriodTotals
from iotistic_billing.usage.status import (
    INCLUDED_USAGE_EXCEEDED,
    WITHIN_INCLUDED_USAGE,
    exceeded,
    status_patch,
    usage_status,
    within_limits,
)

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 17, 12, 0, 30, 123456, tzinfo=UTC)
GB = 10**9
STARTER = plan_by_name("starter").included


def totals(**fields: object) -> PeriodTotals:
    return PeriodTotals(START, END, **fields)  # type: ignore[arg-type]


def test_nothing_over_is_within_limits() -> None:
    within, reason, message = within_limits(totals(peak_devices=10, mqtt_bytes=10 * GB), "starter", STARTER)
    assert within and reason == WITHIN_INCLUDED_USAGE
    assert message == "usage since 2026-11-01T00:00:00+00:00 is within the starter plan's included usage"


def test_the_message_names_everything_that_is_over() -> None:
    over = totals(
        peak_devices=13,
        mqtt_bytes=9 * GB,
        http_bytes=3 * GB + 500_000_000,
        api_calls=102_500,
        storage_gb_months=Decimal("7.5"),
    )
    assert exceeded(over, STARTER) == [
        "devices (peak 13, 10 included)",
        "traffic (12.5 GB, 10 GB included)",
        "storage (7.5 GB-months, 5 GB included)",
        "API calls (102,500, 100,000 included)",
    ]
    within, reason, message = within_limits(over, "starter", STARTER)
    assert not within and reason == INCLUDED_USAGE_EXCEEDED
    assert message.startswith(
        "usage since 2026-11-01T00:00:00+00:00 is over the starter plan's included usage: "
    )
    assert "devices (peak 13, 10 included); traffic" in message


def test_unlimited_quotas_are_never_exceeded() -> None:
    huge = totals(peak_devices=10**6, mqtt_bytes=10**15, api_calls=10**12, storage_gb_months=Decimal(10**6))
    assert exceeded(huge, plan_by_name("enterprise").included) == []


def test_usage_status_sets_usage_and_the_condition_and_keeps_the_rest() -> None:
    ready = Condition(
        type="Ready",
        status=ConditionStatus.TRUE,
        reason="DeploymentsAvailable",
        message="",
        last_transition_time=START,
    )
    previous = CustomerStatus(plan="starter", conditions=[ready])
    updated = usage_status(
        previous,
        period=BillingPeriod(START, END),
        active_devices=13,
        last_report_at=NOW,
        totals=totals(peak_devices=13),
        plan="starter",
        included=STARTER,
        generation=4,
        now=NOW,
    )
    assert updated.usage == UsageStatus(
        period_start=START, active_devices=13, last_report_at=NOW.replace(microsecond=0)
    )
    assert updated.plan == "starter"
    assert [c.type for c in updated.conditions or ()] == ["Ready", "WithinLimits"]
    limits = updated.condition("WithinLimits")
    assert limits is not None and limits.status == ConditionStatus.FALSE and limits.observed_generation == 4
    assert limits.last_transition_time == NOW.replace(microsecond=0)


def test_last_report_at_never_moves_back() -> None:
    later = NOW + timedelta(minutes=5)
    previous = CustomerStatus(usage=UsageStatus(period_start=START, active_devices=3, last_report_at=later))
    updated = usage_status(
        previous,
        period=BillingPeriod(START, END),
        active_devices=4,
        last_report_at=NOW,
        totals=totals(peak_devices=4),
        plan="starter",
        included=STARTER,
        generation=1,
        now=NOW,
    )
    assert updated.usage is not None and updated.usage.last_report_at == later
    assert updated.usage.active_devices == 4


def test_the_patch_carries_usage_all_conditions_and_the_resource_version() -> None:
    updated = usage_status(
        CustomerStatus(),
        period=BillingPeriod(START, END),
        active_devices=2,
        last_report_at=NOW,
        totals=totals(peak_devices=2),
        plan="trial",
        included=STARTER,
        generation=None,
        now=NOW,
    )
    status = status_patch(updated)
    assert status["usage"] == {
        "periodStart": "2026-11-01T00:00:00Z",
        "activeDevices": 2,
        "lastReportAt": "2026-11-17T12:00:30Z",
    }
    assert [c["type"] for c in status["conditions"]] == ["WithinLimits"]
    assert status["conditions"][0]["status"] == "True"


def test_the_coalescer_keeps_the_last_arrival_and_earliest_period_start_per_customer() -> None:
    coalescer = UsageCoalescer()
    day = timedelta(days=1)
    coalescer.saw({"cust_a": NOW - day, "cust_b": NOW}, NOW)
    coalescer.saw({"cust_a": NOW - 40 * day}, NOW + timedelta(seconds=5))  # a backlog, sent later
    coalescer.saw({"cust_a": NOW}, NOW - timedelta(seconds=5))  # arrived earlier: the latest stays
    assert len(coalescer) == 2
    drained = coalescer.drain()
    assert drained == {
        "cust_a": Reported(NOW + timedelta(seconds=5), NOW - 40 * day),
        "cust_b": Reported(NOW, NOW),
    }
    assert len(coalescer) == 0
    coalescer.saw({"cust_b": NOW + day}, NOW + timedelta(seconds=9))
    # A failed flush puts back what it had, merged with what arrived meanwhile (when an ended period's
    # reports came is PostgreSQL's reported_at, rollups.open_missing_rollups).
    coalescer.requeue(drained)
    assert coalescer.drain() == {
        "cust_a": Reported(NOW + timedelta(seconds=5), NOW - 40 * day),
        "cust_b": Reported(NOW + timedelta(seconds=9), NOW),
    }
