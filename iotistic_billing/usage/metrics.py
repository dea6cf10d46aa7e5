"""Usage metering's Prometheus counters, registered in the registry of the process that meters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter

if TYPE_CHECKING:
    from iotistic_billing.usage.metering import MeterRun

# The results of a run of usage metering's timers (usage.service: flush, meter, partitions).
RUN_RESULTS: Final = ("ok", "failed", "skipped")
# The meter events counter's results, each a count of MeterRun's of the same name.
METER_RESULTS: Final = ("sent", "failed", "expired", "late", "not_invoiced", "not_closed")


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
            " past Stripe's invoice grace of 72 hours, taken but on no invoice; not_invoiced: periods whose"
            " subscription had ended before their events, which no invoice carries, to invoice by hand;"
            " not_closed: open periods whose close raised, counted each run they stay open, their events"
            " unsent).",
            ["result"],
            registry=registry,
        )
        # Each series from 0: one born at 1 is no increase to Prometheus, and IotisticUsageNotBilled's
        # results are rare (a pod's first is often its only one).
        for result in METER_RESULTS:
            self.meter_events.labels(result)

        self.runs = Counter(
            "iotistic_usage_runs",
            "Runs of usage metering's timers, by run (flush, meter, partitions) and result (ok; failed: it"
            " raised, or a partition run left this month or the next without its partition; skipped:"
            " another replica held the run's lock). IotisticUsageRunsFailing alerts on no ok.",
            ["run", "result"],
            registry=registry,
        )

    def timer_started(self, run: str) -> None:
        """Export the run's series at 0 from its timer's start: an increase() misses a series that first
        appears at 1, and an alert on no ok run needs the series before any."""
        for result in RUN_RESULTS:
            self.runs.labels(run, result)

    def usage_run(self, run: str, result: str) -> None:
        self.runs.labels(run, result).inc()

    def meter_run(self, run: MeterRun) -> None:
        """Count what a meter run did: what was sent, and what no invoice carries (expired, late,
        not_invoiced) or nothing sends yet (not_closed), which IotisticUsageNotBilled alerts on."""
        for result in METER_RESULTS:
            if count := getattr(run, result):
                self.meter_events.labels(result).inc(count)


__all__ = ["RUN_RESULTS", "UsageMetrics"]
