"""Usage metering's status flush when the server stops: what the timer's flush had taken is flushed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import Select

from iotistic_billing.db.pool import Pool
from iotistic_billing.directory import CustomerRecord, Directory
from iotistic_billing.k8s import Kube
from iotistic_billing.usage.metering import MeterRun
from iotistic_billing.usage.metrics import UsageMetrics
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.partitions import PartitionRun
from iotistic_billing.usage.reports import parse_reports
from iotistic_billing.usage.service import FlushResult, UsageMetering, run_result

NOW = datetime(2026, 11, 17, 12, tzinfo=UTC)
CUSTOMER_ID = "cust_acme00000001"


def acme() -> CustomerRecord:
    record = CustomerRecord.from_body(
        {
            "apiVersion": "iotistic.io/v1alpha1",
            "kind": "Customer",
            "metadata": {"name": "acme", "uid": "uid-acme", "resourceVersion": "7", "generation": 1},
            "spec": {
                "customerId": CUSTOMER_ID,
                "email": "ops@acme.example",
                "companyName": "Acme",
                "plan": "starter",
                "billing": {"mode": "manual"},
            },
        }
    )
    assert record is not None
    return record


class FakeConnection:
    """PostgreSQL for one flush of a customer with no rollups and no usage yet."""

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        if "INSERT INTO usage_reports" in query:  # a report stored, none compared with a stored one
            return [{"inserted": 1, "customer_id": None}]
        return []

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any] | None:
        if "peak_devices" in query:  # the period's sums
            return dict.fromkeys(
                ("peak_devices", "mqtt_bytes", "http_bytes", "api_calls", "storage_mb_seconds", "reports"), 0
            ) | {"device_seconds": 0}
        return None  # the latest report, the rollups around a moment

    async def fetchval(self, query: str, *args: Any) -> Any:
        return 1 if "INSERT" in query else None  # a report stored; no settled period

    async def execute(self, query: str, *args: Any) -> str:
        return "OK"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


class FakePool(FakeConnection):
    @asynccontextmanager
    async def acquire(self, **options: Any) -> AsyncIterator[FakeConnection]:
        yield FakeConnection()


class FakeSession:
    """The customers mirror: it knows acme's resource name; writes go nowhere."""

    async def __aenter__(self) -> FakeSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[FakeSession]:
        yield self

    async def execute(self, statement: Any, parameters: Any = None) -> list[tuple[str, str]]:
        return [(CUSTOMER_ID, "acme")] if isinstance(statement, Select) else []


class SlowDirectory:
    """The API server, whose first read of a Customer hangs until `release` is set."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def by_name(self, name: str) -> CustomerRecord | None:
        if not self.entered.is_set():
            self.entered.set()
            await self.release.wait()
        return acme()

    async def all(self) -> list[CustomerRecord]:
        return [acme()]


class FakeKube:
    def __init__(self) -> None:
        self.patched: list[str] = []

    async def patch_customer_status(self, name: str, patch: dict[str, Any], *args: Any) -> None:
        self.patched.append(name)


async def test_a_flush_the_stop_cancels_leaves_its_customers_to_the_final_flush() -> None:
    """Found in review: stop() cancelled the timer's flush while it awaited the API server, after it
    had taken its customers from the coalescer; the cancellation passed `except Exception`, nothing
    was put back, and the flush at shutdown found nothing to write."""
    directory, kube = SlowDirectory(), FakeKube()
    usage = UsageMetering(
        pool=cast(Pool, FakePool()),
        options=UsageOptions(flush_interval=0.01, meter_interval=None, partition_interval=None),
        session_factory=lambda: cast(AsyncSession, FakeSession()),
        directory=cast(Directory, directory),
        kube=cast(Kube, kube),
        stripe=None,
        metrics=UsageMetrics(CollectorRegistry()),
        clock=lambda: NOW,
    )
    body = {
        "customer_id": CUSTOMER_ID,
        "instance_id": "prod-1",
        "report_id": "r-1",
        "period_start": "2026-11-17T11:00:00Z",
        "period_end": "2026-11-17T12:00:00Z",
        "active_devices": 3,
        "total_devices": 3,
    }
    await usage.store(parse_reports(json.dumps(body).encode()), NOW)
    usage.start()
    try:
        await asyncio.wait_for(directory.entered.wait(), 5)  # the timer's flush is reading the Customer
        await usage.stop()
    finally:
        directory.release.set()
    assert kube.patched == ["acme"]


def metering(registry: CollectorRegistry) -> UsageMetering:
    """The usage service on fakes, its timers off."""
    return UsageMetering(
        pool=cast(Pool, FakePool()),
        options=UsageOptions(flush_interval=None, meter_interval=None, partition_interval=None),
        session_factory=lambda: cast(AsyncSession, FakeSession()),
        directory=cast(Directory, SlowDirectory()),
        kube=cast(Kube, FakeKube()),
        stripe=None,
        metrics=UsageMetrics(registry),
        clock=lambda: NOW,
    )


async def test_a_shutdown_stopped_as_its_final_flush_ends_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: Python 3.11's wait_for returned a final flush that ended as the shutdown was
    cancelled and dropped the cancellation, so stop() returned as if nothing had cancelled it."""
    usage = metering(CollectorRegistry())
    task: asyncio.Task[None] | None = None

    async def flush() -> None:
        assert task is not None
        task.cancel()  # the cancellation arrives as the flush ends

    monkeypatch.setattr(usage, "flush", flush)
    task = asyncio.create_task(usage.stop())
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task


def test_usage_after_an_ended_subscription_is_shown_not_billed_and_why() -> None:
    """Found in review: after an immediate cancel, GET /api/usage/{id} and the console showed the period
    running on to its old end on starter, billed: true, though no subscription would invoice it; from
    the ending on it is on no paid plan and says so."""
    from iotistic_billing.usage.pricing import PeriodTotals, overage
    from iotistic_billing.usage.rollups import included_usage
    from iotistic_billing.webhook_server.usage import period_view

    ended = datetime(2027, 1, 25, 10, tzinfo=UTC)
    totals = PeriodTotals(ended, datetime(2027, 2, 25, 10, tzinfo=UTC), mqtt_bytes=90 * 10**9, reports=1)
    view = period_view("unlicensed", totals, overage(totals, included_usage("unlicensed")), ended)
    assert not view.billed
    assert view.not_billed_reason is not None
    assert view.not_billed_reason.startswith("the subscription ended at 2027-01-25T10:00:00+00:00")
    trial = period_view("trial", totals, overage(totals, included_usage("trial")))
    assert trial.not_billed_reason == "plan trial: only paid plans are billed"
    paid = period_view("starter", totals, overage(totals, included_usage("starter")), ended)
    assert paid.billed and paid.not_billed_reason is None


@pytest.mark.parametrize("result", ["expired", "late", "not_invoiced", "not_closed"])
def test_a_meter_run_counts_what_no_invoice_carries(result: str) -> None:
    """Found in review: a period said not invoiced (its subscription ended first) was a log line only, no
    metric, so nothing alerted the billing team to invoice it by hand."""
    registry = CollectorRegistry()
    UsageMetrics(registry).meter_run(MeterRun(sent=2, **{result: 1}))
    assert registry.get_sample_value("iotistic_usage_meter_events_total", {"result": result}) == 1
    assert registry.get_sample_value("iotistic_usage_meter_events_total", {"result": "sent"}) == 2


def test_the_meter_results_are_series_from_zero() -> None:
    """Found in review: a `not_invoiced` series born at 1 is no increase to Prometheus, so a pod's first
    such period (often its only one) raised no IotisticUsageNotBilled."""
    registry = CollectorRegistry()
    UsageMetrics(registry)
    for result in ("sent", "failed", "expired", "late", "not_invoiced", "not_closed"):
        assert registry.get_sample_value("iotistic_usage_meter_events_total", {"result": result}) == 0


@pytest.mark.parametrize(
    ("flushed", "result"),
    [
        (FlushResult(), "skipped"),  # nothing reported since the last: the inbox process's, always
        (FlushResult(failed=3), "failed"),  # every Customer refused: no write at all
        (FlushResult(patched=2, failed=1), "ok"),
        (FlushResult(unchanged=1), "ok"),
    ],
)
def test_a_flush_is_counted_by_what_it_wrote(flushed: FlushResult, result: str) -> None:
    """Found in review: a flush catches its errors itself, so every flush counted ok, the inbox process's
    empty ones every 10 s too: IotisticUsageRunsFailing could never fire for a flush the API server
    refused for hours."""
    assert run_result(flushed) == result


async def test_a_usage_run_that_raises_is_counted_failed_not_only_logged() -> None:
    """Found in review: a meter run that raised every time (a Customer it could not read) was one
    traceback an hour and nothing else: no period closed, nothing went to Stripe, and no alert fired
    (IotisticUsageNotBilled counts only runs that complete)."""
    registry = CollectorRegistry()
    usage = metering(registry)
    usage.metrics.timer_started("meter")

    def runs(result: str) -> float | None:
        return registry.get_sample_value("iotistic_usage_runs_total", {"run": "meter", "result": result})

    assert (runs("ok"), runs("failed"), runs("skipped")) == (0, 0, 0)  # exported before any run

    async def unreadable() -> MeterRun:
        raise RuntimeError("the Customer cannot be read")

    async def done() -> MeterRun:
        return MeterRun(closed=1)

    async def locked_elsewhere() -> MeterRun:
        return MeterRun(skipped=True)

    assert await usage.run_once(unreadable, "meter") == "failed"
    assert await usage.run_once(unreadable, "meter") == "failed"
    assert await usage.run_once(locked_elsewhere, "meter") == "skipped"
    assert await usage.run_once(done, "meter") == "ok"
    assert (runs("ok"), runs("failed"), runs("skipped")) == (1, 2, 1)


async def test_a_partition_run_that_leaves_this_month_or_the_next_unmade_is_counted_failed() -> None:
    """Found in review: a partition run whose DDL never had its lock in time (LOCK_TIMEOUT) was a warning
    per month and a run done: the month's reports went to the default partition with nothing counted."""
    registry = CollectorRegistry()
    usage = metering(registry)

    async def unmade_month() -> PartitionRun:
        return PartitionRun(missing=("usage_reports_2026_12",))

    async def made() -> PartitionRun:
        return PartitionRun(created=("usage_reports_2026_12",))

    async def locked_elsewhere() -> PartitionRun:
        return PartitionRun(skipped=True)

    assert await usage.run_once(unmade_month, "partitions") == "failed"
    assert await usage.run_once(made, "partitions") == "ok"
    assert await usage.run_once(locked_elsewhere, "partitions") == "skipped"
    counted = {
        result: registry.get_sample_value(
            "iotistic_usage_runs_total", {"run": "partitions", "result": result}
        )
        for result in ("ok", "failed", "skipped")
    }
    assert counted == {"ok": 1, "failed": 1, "skipped": 1}
