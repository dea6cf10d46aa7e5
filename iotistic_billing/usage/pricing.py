"""Consumption billing (the earlier system's "Pricing Model"): usage of a billing period against the plan's
included quotas, and the overage in exact decimal dollars.

Pure: every input is a value, every amount a Decimal; a line is priced from its quantity as billed
(`billed_quantity`, the value Stripe's meter is sent) and rounded once, to the cent, half up, and the
total is the sum of the rounded lines (what an invoice shows).

Units: a billing period (Stripe's, about a month) counts as one month; a GB is 10^9 bytes; storage is
charged in GB-months, the time-weighted average database size over the period (each report weighted by
its time inside the period: one across the period's end counts in both periods); devices are the peak
of active devices reported in the period; API calls are HTTP requests. The included traffic quota
covers MQTT and HTTP together; traffic above it is split between MQTT and HTTP in proportion to their
shares and priced at their own rates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

from iotistic_billing.licensing.plans import UNLIMITED, IncludedUsage

BYTES_PER_GB: Final = Decimal(10) ** 9
MB_PER_GB: Final = Decimal(1000)
CENT: Final = Decimal("0.01")
SECONDS_PER_HOUR: Final = Decimal(3600)

# Dollars per unit over the plan's quota (the earlier system's "Overage Pricing").
PRICE_PER_DEVICE_MONTH: Final = Decimal("2.00")
PRICE_PER_GB_MQTT: Final = Decimal("0.10")
PRICE_PER_GB_HTTP: Final = Decimal("0.15")
PRICE_PER_GB_MONTH_STORAGE: Final = Decimal("0.20")
PRICE_PER_1000_API_CALLS: Final = Decimal("0.50")

METRICS: Final = ("devices", "mqtt_traffic_gb", "http_traffic_gb", "storage_gb_months", "api_calls")

# Stripe refuses meter values with more than 15 significant digits; quantities keep at most 6 decimals
# (a kilobyte of a GB), fewer when the integer part is long.
MAX_DIGITS: Final = 15
MAX_DECIMALS: Final = 6


@dataclass(frozen=True)
class UsageSample:
    """One stored report, as the rollup needs it: counters are deltas over [period_start, period_end)."""

    period_start: datetime
    period_end: datetime
    active_devices: int
    mqtt_bytes: int  # sent + received
    http_bytes: int  # sent + received
    http_requests: int
    postgres_size_mb: Decimal


@dataclass(frozen=True)
class PeriodTotals:
    period_start: datetime
    period_end: datetime
    peak_devices: int = 0
    mqtt_bytes: int = 0
    http_bytes: int = 0
    api_calls: int = 0
    storage_gb_months: Decimal = Decimal(0)
    reports: int = 0
    # Active devices times hours, summed over the reports (the earlier system's device-hours metric).
    device_hours: Decimal = Decimal(0)


@dataclass(frozen=True)
class OverageLine:
    metric: str
    quantity: Decimal  # units over the quota (devices, GB, GB-months, calls)
    unit_price: Decimal
    per: int  # the price is per `per` units (1, or 1000 for API calls)
    amount: Decimal  # dollars, rounded to the cent

    @property
    def cents(self) -> int:
        return int(self.amount * 100)


@dataclass(frozen=True)
class Overage:
    lines: tuple[OverageLine, ...] = field(default_factory=tuple)

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal("0.00"))

    @property
    def total_cents(self) -> int:
        return sum(line.cents for line in self.lines)

    def line(self, metric: str) -> OverageLine | None:
        return next((line for line in self.lines if line.metric == metric), None)


def roll_up(samples: Iterable[UsageSample], period_start: datetime, period_end: datetime) -> PeriodTotals:
    """Sum the samples of one billing period: counters belong wholly to the period their report ends
    in, start < period_end <= end (a report is sent once it has ended, so one across a period's end
    arrives while the period it ends in is open), while storage (a level) counts the part of every
    report inside the period, wherever it starts, so that a report across a period's end is billed in
    both periods for its time in each."""
    length = period_end - period_start
    if length <= timedelta(0):
        raise ValueError(f"period_end must be after period_start, got {period_start} .. {period_end}")
    peak = mqtt = http = calls = count = device_seconds = 0
    storage_mb_seconds = Decimal(0)
    for sample in samples:
        covered = min(sample.period_end, period_end) - max(sample.period_start, period_start)
        if covered > timedelta(0):
            storage_mb_seconds += sample.postgres_size_mb * Decimal(int(covered.total_seconds()))
        if not period_start < sample.period_end <= period_end:
            continue
        count += 1
        peak = max(peak, sample.active_devices)
        mqtt += sample.mqtt_bytes
        http += sample.http_bytes
        calls += sample.http_requests
        device_seconds += sample.active_devices * int(
            (sample.period_end - sample.period_start).total_seconds()
        )
    return totals_from_sums(
        period_start,
        period_end,
        peak_devices=peak,
        mqtt_bytes=mqtt,
        http_bytes=http,
        api_calls=calls,
        storage_mb_seconds=storage_mb_seconds,
        reports=count,
        device_seconds=Decimal(device_seconds),
    )


def totals_from_sums(
    period_start: datetime,
    period_end: datetime,
    *,
    peak_devices: int,
    mqtt_bytes: int,
    http_bytes: int,
    api_calls: int,
    storage_mb_seconds: Decimal,
    reports: int,
    device_seconds: Decimal = Decimal(0),
) -> PeriodTotals:
    """The totals of a period from its sums, as `roll_up` ends: shared with the SQL aggregate that
    computes the same sums inside PostgreSQL (usage.store), so the two cannot drift apart."""
    length = period_end - period_start
    if length <= timedelta(0):
        raise ValueError(f"period_end must be after period_start, got {period_start} .. {period_end}")
    # GB-months: the size averaged over the whole period (a period without reports counts as empty).
    gb_months = storage_mb_seconds / MB_PER_GB / Decimal(int(length.total_seconds()))
    return PeriodTotals(
        period_start,
        period_end,
        peak_devices,
        mqtt_bytes,
        http_bytes,
        api_calls,
        gb_months,
        reports,
        device_hours(device_seconds),
    )


def device_hours(device_seconds: Decimal) -> Decimal:
    """Device-seconds as device-hours, to the thousandth."""
    return (device_seconds / SECONDS_PER_HOUR).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP)


def _over(used: Decimal, included: int) -> Decimal:
    if included == UNLIMITED:
        return Decimal(0)
    return max(Decimal(0), used - Decimal(included))


def billed_quantity(quantity: Decimal) -> Decimal:
    """The quantity as billed: what Stripe is sent (usage.metering.meter_value), at most MAX_DECIMALS
    decimals and MAX_DIGITS digits, half up; a line's amount is priced from it, so that what the API,
    the console and the CLI show is what Stripe invoices."""
    integer_digits = max(1, quantity.adjusted() + 1)
    decimals = max(0, min(MAX_DECIMALS, MAX_DIGITS - integer_digits))
    return quantity.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def _line(metric: str, quantity: Decimal, unit_price: Decimal, per: int = 1) -> OverageLine:
    # Priced from the quantity as billed: 0.0249996 GB-months over is sent as 0.025, $0.005, which
    # rounds to a cent, where the unrounded quantity's $0.0049999 showed $0.00.
    amount = (billed_quantity(quantity) * unit_price / per).quantize(CENT, rounding=ROUND_HALF_UP)
    return OverageLine(metric, quantity, unit_price, per, amount)


def overage(totals: PeriodTotals, included: IncludedUsage) -> Overage:
    """The overage of a period; lines with nothing over the quota are left out."""
    mqtt_gb = Decimal(totals.mqtt_bytes) / BYTES_PER_GB
    http_gb = Decimal(totals.http_bytes) / BYTES_PER_GB
    traffic_over = _over(mqtt_gb + http_gb, included.traffic_gb)
    traffic = mqtt_gb + http_gb
    mqtt_over = traffic_over * mqtt_gb / traffic if traffic else Decimal(0)
    http_over = traffic_over - mqtt_over
    storage_over = _over(totals.storage_gb_months, included.storage_gb)
    candidates = (
        _line("devices", _over(Decimal(totals.peak_devices), included.devices), PRICE_PER_DEVICE_MONTH),
        _line("mqtt_traffic_gb", mqtt_over, PRICE_PER_GB_MQTT),
        _line("http_traffic_gb", http_over, PRICE_PER_GB_HTTP),
        _line("storage_gb_months", storage_over, PRICE_PER_GB_MONTH_STORAGE),
        _line(
            "api_calls", _over(Decimal(totals.api_calls), included.api_calls), PRICE_PER_1000_API_CALLS, 1000
        ),
    )
    return Overage(tuple(line for line in candidates if line.quantity > 0))
