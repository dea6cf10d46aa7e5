"""What the Customer's status says about usage: `status.usage` and the `WithinLimits` condition.

Pure: the flusher (usage.service) reads the Customer and the period's totals, calls `usage_status`, and
sends the result as one merge patch when it differs from what it read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Final

from iotistic_billing.customer import (
    ConditionStatus,
    ConditionType,
    CustomerStatus,
    UsageStatus,
    UsageThreshold,
    set_condition,
)
from iotistic_billing.licensing.plans import UNLIMITED, IncludedUsage
from iotistic_billing.usage.periods import BillingPeriod
from iotistic_billing.usage.pricing import BYTES_PER_GB, PeriodTotals

# Condition reasons of WithinLimits, a CamelCase pair.
WITHIN_INCLUDED_USAGE: Final = "WithinIncludedUsage"
INCLUDED_USAGE_EXCEEDED: Final = "IncludedUsageExceeded"


def _number(value: Decimal) -> str:
    """At most three decimals, no trailing zeros: 12.5, 0.001, 7."""
    text = f"{value.quantize(Decimal('0.001')):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def exceeded(totals: PeriodTotals, included: IncludedUsage) -> list[str]:
    """Each quota the period's usage is over, said with both numbers."""
    over = []
    if included.devices != UNLIMITED and totals.peak_devices > included.devices:
        over.append(f"devices (peak {totals.peak_devices}, {included.devices} included)")
    traffic_gb = Decimal(totals.mqtt_bytes + totals.http_bytes) / BYTES_PER_GB
    if included.traffic_gb != UNLIMITED and traffic_gb > included.traffic_gb:
        over.append(f"traffic ({_number(traffic_gb)} GB, {included.traffic_gb} GB included)")
    if included.storage_gb != UNLIMITED and totals.storage_gb_months > included.storage_gb:
        over.append(
            f"storage ({_number(totals.storage_gb_months)} GB-months, {included.storage_gb} GB included)"
        )
    if included.api_calls != UNLIMITED and totals.api_calls > included.api_calls:
        over.append(f"API calls ({totals.api_calls:,}, {included.api_calls:,} included)")
    return over


@dataclass(frozen=True)
class Crossing:
    """A threshold the period's usage has reached: `80%` or `100%` of a quota, or a value the Customer
    set in spec.notifications.usageThresholds."""

    metric: str  # devices, trafficGb, storageGb, apiCalls
    threshold: str
    used: int | float
    limit: int | float


def _used(totals: PeriodTotals) -> dict[str, Decimal]:
    return {
        "devices": Decimal(totals.peak_devices),
        "trafficGb": Decimal(totals.mqtt_bytes + totals.http_bytes) / BYTES_PER_GB,
        "storageGb": totals.storage_gb_months,
        "apiCalls": Decimal(totals.api_calls),
    }


def crossings(
    totals: PeriodTotals, included: IncludedUsage, thresholds: Sequence[UsageThreshold]
) -> list[Crossing]:
    """Every threshold the period's usage has reached so far; the notices' keys make each one notice
    once per period, however often the flush finds it."""
    used = _used(totals)
    quotas = {
        "devices": included.devices,
        "trafficGb": included.traffic_gb,
        "storageGb": included.storage_gb,
        "apiCalls": included.api_calls,
    }

    def shown(value: Decimal) -> int | float:
        return int(value) if value == value.to_integral_value() else float(_number(value))

    found = []
    for metric, quota in quotas.items():
        if quota in (UNLIMITED, 0):
            continue
        for share in (80, 100):
            if used[metric] * 100 >= quota * share:
                found.append(Crossing(metric, f"{share}%", shown(used[metric]), quota))
    for threshold in thresholds:
        if used[threshold.metric] >= threshold.value:
            found.append(
                Crossing(
                    threshold.metric, str(threshold.value), shown(used[threshold.metric]), threshold.value
                )
            )
    return found


def within_limits(totals: PeriodTotals, plan: str, included: IncludedUsage) -> tuple[bool, str, str]:
    """(within, reason, message) of the WithinLimits condition for the period's totals."""
    since = totals.period_start.isoformat()
    over = exceeded(totals, included)
    if over:
        return (
            False,
            INCLUDED_USAGE_EXCEEDED,
            f"usage since {since} is over the {plan} plan's included usage: " + "; ".join(over),
        )
    return True, WITHIN_INCLUDED_USAGE, f"usage since {since} is within the {plan} plan's included usage"


def usage_status(
    previous: CustomerStatus,
    *,
    period: BillingPeriod,
    active_devices: int | None,
    last_report_at: datetime,
    totals: PeriodTotals,
    plan: str,
    included: IncludedUsage,
    generation: int | None,
    now: datetime,
) -> CustomerStatus:
    """`previous` with status.usage and WithinLimits brought up to date; every other field as read.

    lastReportAt never moves back: two servers, or a flush that lost a race, cannot rewind it.
    """
    last = last_report_at.replace(microsecond=0)
    if previous.usage is not None and previous.usage.last_report_at is not None:
        last = max(last, previous.usage.last_report_at)
    within, reason, message = within_limits(totals, plan, included)
    conditions = set_condition(
        previous.conditions,
        type_=ConditionType.WITHIN_LIMITS,
        status=ConditionStatus.TRUE if within else ConditionStatus.FALSE,
        reason=reason,
        message=message,
        observed_generation=generation,
        now=now,
    )
    usage = UsageStatus(period_start=period.start, active_devices=active_devices, last_report_at=last)
    return previous.model_copy(update={"usage": usage, "conditions": conditions})


def status_patch(updated: CustomerStatus) -> dict[str, object]:
    """The status fields usage metering writes by merge patch: usage and the whole conditions list (a
    merge patch replaces lists). Sent conditional on the resourceVersion read, so that conditions the
    operator wrote in the meantime are never overwritten with the older list (the API server answers 409
    and we read again)."""
    status = updated.to_k8s()
    return {"usage": status.get("usage", {}), "conditions": status.get("conditions", [])}


__all__ = [
    "INCLUDED_USAGE_EXCEEDED",
    "WITHIN_INCLUDED_USAGE",
    "Crossing",
    "crossings",
    "exceeded",
    "status_patch",
    "usage_status",
    "within_limits",
]
