"""Usage metering's Prometheus counters, registered in the registry of the process that meters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class UsageMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reports = Counter(
            "iotistic_usage_reports",
            "Usage reports received, by result (accepted: stored; duplicate: stored before).",
            ["result"],
            registry=registry,
        )
        self.status_flushes = Counter(
            "iotistic_usage_status_flushes",
            "Customers handled by the usage status flush, by result (patched, unchanged, missing, failed).",
            ["result"],
            registry=registry,
        )
        self.meter_events = Counter(
            "iotistic_usage_meter_events",
            "Stripe meter events, by result (sent: accepted and recorded; failed: refused, tried again by a"
            " later run, a run cut short by Stripe away counting one, whatever it left; expired: past"
            " Stripe's 35 days, given up, billed in no invoice; late: periods sent"
            " past Stripe's invoice grace of 72 hours, taken but on no invoice).",
            ["result"],
            registry=registry,
        )


__all__ = ["UsageMetrics"]
