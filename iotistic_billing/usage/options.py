"""Tunables of usage metering in the webhook server, with safe defaults (tests shorten or disable the
timers; production takes the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Final

# The most reports a page of GET /api/usage/{customerId} lists, and the size of its pages by default.
REPORT_LIST_LIMIT: Final = 500


@dataclass(frozen=True)
class UsageOptions:
    # A report batch of 1,000 is about 0.5 MB of JSON; the app-wide limit (256 KiB) is for everything else.
    max_body: int = 2 * 1024 * 1024
    # A period may end this far ahead of our clock (instances' clocks drift).
    clock_skew: timedelta = timedelta(minutes=5)
    # Usage keys are looked up once per TTL: a revoked key keeps working for up to this long.
    key_cache_ttl: float = 30.0
    # An unknown key is remembered for less time, so that a key created just now works soon.
    key_cache_negative_ttl: float = 5.0
    # Seconds between status flushes (one merge patch per customer that reported); None: never by
    # timer (tests call flush()). Also flushed once on shutdown.
    flush_interval: float | None = 10.0
    # Seconds between runs of the period closing and Stripe meter events; None: never by timer.
    meter_interval: float | None = 3600.0
    # The first run comes this long after start-up, not at once: a crash-looping server does not
    # hammer Stripe, and a restart soon after a run does not repeat it.
    meter_initial_delay: float = 60.0
    # Seconds after its end before a period is closed (rolled up a last time, then metered): reports of
    # its last hours that arrive late, or are retried after an outage, are billed with it. A report
    # arriving later than that is kept but billed in no period (the flush logs it): a closed period is
    # what Stripe was sent.
    close_grace: float = 3600.0
    # Seconds between partition runs (usage.partitions: this month's partition of usage_reports and the
    # next `partitions_ahead` made, those past `raw_retention_months` dropped); the first runs at start.
    # None: never by timer (tests call maintain_partitions()).
    partition_interval: float | None = 3600.0
    partitions_ahead: int = 2
    # Raw reports are kept this many months (USAGE_RAW_RETENTION), and never dropped inside a billing
    # period still open; rollups are kept for good.
    raw_retention_months: int = 13
    # Connections of the dedicated asyncpg pool.
    pool_size: int = 10
    # GET /api/usage/{customerId} lists at most this many reports a page (the daily series covers them all).
    report_list_limit: int = REPORT_LIST_LIMIT

    @property
    def catch_up_window(self) -> timedelta:
        """How far back each meter run looks for stored reports that no flush rolled up (their server
        stopped before its flush): three meter intervals (of an hour when runs are not timed), so that
        one run failing or coming late loses none of them."""
        return timedelta(seconds=3 * (self.meter_interval if self.meter_interval is not None else 3600.0))

    def __post_init__(self) -> None:
        for name in ("flush_interval", "meter_interval", "partition_interval"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.close_grace < 0:
            raise ValueError(f"close_grace must not be negative, got {self.close_grace}")
        # Two months at least: the oldest report of a billing period (a month at most) that is still
        # being reported is then never in a partition old enough to go.
        if self.raw_retention_months < 2:
            raise ValueError(f"raw_retention_months must be at least 2, got {self.raw_retention_months}")
        if self.partitions_ahead < 1:
            raise ValueError(f"partitions_ahead must be at least 1, got {self.partitions_ahead}")
        if self.max_body < 1024 or self.pool_size < 1 or self.report_list_limit < 1:
            raise ValueError(f"max_body, pool_size and report_list_limit are too small in {self}")


__all__ = ["REPORT_LIST_LIMIT", "UsageOptions"]
