"""`iotistic-billing usage`: mistakes and a slow database answered with a sentence, not a traceback."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from iotistic_billing.cli import main
from iotistic_billing.cli import usage as usage_cli
from iotistic_billing.db import pool
from iotistic_billing.usage.periods import BillingPeriod
from iotistic_billing.usage.pricing import PeriodTotals, totals_from_sums
from iotistic_billing.usage.rollups import compute_rollup, overage_json


def test_a_window_ending_before_any_report_could_be_stored_is_refused_naming_until(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found in review: --until early in year 1 passed the window's check, and the calendar month's
    totals read 31 days before 0001-01-01: an OverflowError's traceback."""
    assert main(["usage", "--customer", "cust_abc123", "--until", "0001-01-15", "--days", "1"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: --until: no usage is stored before 2000-01-01, got 0001-01-15")
    )


def test_a_statement_past_the_command_timeout_is_a_sentence(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the connection's command timeout (a table locked by a migration, a year of
    every customer's reports) escaped as a bare TimeoutError's traceback."""

    async def slow(*_: Any) -> int:
        raise TimeoutError

    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://billing@127.0.0.1:5432/billing")
    monkeypatch.setattr(usage_cli, "_show", slow)
    assert main(["usage", "--all"]) == 1  # not 2: the command was right, try it again later
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: PostgreSQL did not answer within 60 s; try fewer --days, or --customer")
    )


def test_an_overage_that_is_not_billed_is_marked_and_left_out_of_the_total() -> None:
    """A trial's period over its quotas is shown, said not billed, and counted apart from what is owed;
    a trial without overage adds no line."""
    periods = [
        {"plan": "trial", "billed": False, "overage": {"total": "64.00"}},
        {"plan": "trial", "billed": False, "overage": {"total": "0.00"}},
        {"plan": "starter", "billed": True, "overage": {"total": "6.00"}},
        {"plan": "professional", "billed": True, "overage": {"total": "1234.50"}},
    ]
    assert usage_cli.total_lines(periods, unlisted=1) == [
        "Overage of every customer's current billing period: $1,240.50 (1 customer not listed: no report in"
        " the window)",
        "Not billed (plan trial: only paid plans are billed): $64.00",
    ]
    assert usage_cli.total_lines(periods[2:], unlisted=0) == [
        "Overage of every customer's current billing period: $1,240.50"
    ]
    shown = usage_cli.table_rows(
        [
            {"plan": "trial", "periodOverage": Decimal("64.00"), "billed": False},
            {"plan": "starter", "periodOverage": Decimal("6.00"), "billed": True},
        ]
    )
    assert [row["periodOverage"] for row in shown] == ["$64.00 (not billed)", "$6.00"]


def at(month: int, day: int) -> datetime:
    return datetime(2025, month, day, tzinfo=UTC)


class RollupsConnection:
    """PostgreSQL as the usage CLI reads it: one customer, `acme`, whose mirror row holds `spec_plan`,
    its rollups as (start, end, plan, closed), and its reports as (start, end, active devices), with
    `traffic_bytes` in all."""

    def __init__(
        self,
        spec_plan: str,
        rollups: list[tuple[datetime, datetime, str, bool]],
        reports: list[tuple[datetime, datetime, int]],
        traffic_bytes: int = 0,
    ) -> None:
        self.spec_plan, self.rollups, self.reports = spec_plan, rollups, reports
        self.traffic_bytes = traffic_bytes

    async def fetchval(self, query: str, *args: Any) -> Any:
        return "cust_acme" if "FROM customers" in query else None

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        if "GROUP BY r.customer_id" in query:  # the window's summaries
            start, end = args[0], args[1]
            shown = [r for r in self.reports if start <= r[0] < end]
            if not shown:
                return []
            return [
                {
                    "customer_id": "cust_acme",
                    "reports": len(shown),
                    "peak_active_devices": max(r[2] for r in shown),
                    "traffic_bytes": self.traffic_bytes,
                    "http_requests": 0,
                    "postgres_size_mb": None,
                    "last_report_at": max(r[1] for r in shown),
                    "device_seconds": 0,
                    "company_name": "Acme",
                    "mirror_plan": self.spec_plan,
                }
            ]
        if "DISTINCT ON (customer_id)" in query:  # the rollup holding now, or the latest before
            now = args[1]
            held = sorted(r for r in self.rollups if r[0] <= now)
            return [self.rollup_row(*held[-1])] if held else []
        if "period_start <= $1 AND period_end > $1" in query:  # the customers of a period holding now
            return [{"customer_id": "cust_acme"} for r in self.rollups if r[0] <= args[0] < r[1]]
        return []  # the days of the window

    def rollup_row(self, start: datetime, end: datetime, plan: str, closed: bool) -> dict[str, Any]:
        overage = overage_json(
            compute_rollup("cust_acme", BillingPeriod(start, end), plan, self.totals(start, end)).overage
        )
        return {
            "customer_id": "cust_acme",
            "period_start": start,
            "period_end": end,
            "plan": plan,
            "overage": json.dumps(overage),
            "closed_at": end + timedelta(hours=1) if closed else None,
        }

    def totals(self, start: datetime, end: datetime) -> PeriodTotals:
        held = [r for r in self.reports if start < r[1] <= end]
        return totals_from_sums(
            start,
            end,
            peak_devices=max((r[2] for r in held), default=0),
            mqtt_bytes=0,
            http_bytes=0,
            api_calls=0,
            storage_mb_seconds=Decimal(0),
            reports=len(held),
        )

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any]:
        if "FROM customers" in query:  # the mirror's row
            return {"customer_id": "cust_acme", "plan": self.spec_plan}
        assert "peak_devices" in query  # the period's sums
        totals = self.totals(args[1], args[2])
        return {
            "peak_devices": totals.peak_devices,
            "mqtt_bytes": 0,
            "http_bytes": 0,
            "api_calls": 0,
            "storage_mb_seconds": 0,
            "reports": totals.reports,
            "device_seconds": 0,
        }

    async def close(self) -> None:
        return None


def usage_json(
    conn: RollupsConnection, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> dict[str, Any]:
    async def connect(url: str) -> RollupsConnection:
        return conn

    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://billing@127.0.0.1:5432/billing")
    monkeypatch.setattr(pool, "connect", connect)
    assert main(["usage", *args, "--until", "2025-04-20", "-o", "json"]) == 0
    shown: dict[str, Any] = json.loads(capsys.readouterr().out)
    return shown


def test_after_a_stripe_period_ended_the_cli_shows_the_next_anchored_period_not_the_calendar_month(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: Stripe's Mar 15 .. Apr 15 was rolled up and closed, then the instance stopped
    reporting (its last report on Apr 10). On Apr 20 the CLI fell back to the calendar month, Apr 1 ..
    May 1, and showed (and added to --all's total) the overage of Apr 1 .. 10 that Stripe's period had
    billed; the API shows the month anchored at that period's end, Apr 15 .. May 15, with nothing in it."""
    reports = [(at(4, day), at(4, day) + timedelta(hours=1), 13) for day in range(1, 11)]
    conn = RollupsConnection("starter", [(at(3, 15), at(4, 15), "starter", True)], reports)
    # Stripe's period billed the 3 devices over the starter plan's 10.
    assert json.loads(conn.rollup_row(*conn.rollups[0])["overage"])["total"] == "6.00"

    period = usage_json(conn, monkeypatch, capsys, "--customer", "acme")["billing_period"]
    assert (period["period_start"], period["period_end"]) == (
        "2025-04-15T00:00:00+00:00",
        "2025-05-15T00:00:00+00:00",
    )
    assert (period["plan"], period["billed"], period["overage"]["total"]) == ("starter", True, "0.00")

    everyone = usage_json(conn, monkeypatch, capsys, "--all")
    assert [(row["customerId"], row["periodOverage"]) for row in everyone["customers"]] == [
        ("cust_acme", "0.00")
    ]
    assert everyone["currentPeriods"]["overage"] == "0.00"


def test_after_a_rollup_ended_the_cli_prices_the_next_period_against_the_plan_the_server_rolled_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: the period after an ended rollup was priced against the mirror's spec.plan, where
    the server (and its rollups) use the effective plan, status.plan or spec.plan: a professional
    customer's 13 devices showed as a starter's $6.00 over."""
    reports = [(at(4, 16), at(4, 16) + timedelta(hours=1), 13)]
    conn = RollupsConnection("starter", [(at(3, 1), at(4, 1), "professional", True)], reports)

    period = usage_json(conn, monkeypatch, capsys, "--customer", "acme")["billing_period"]
    assert (period["period_start"], period["period_end"]) == (
        "2025-04-01T00:00:00+00:00",
        "2025-05-01T00:00:00+00:00",
    )
    assert (period["plan"], period["overage"]["total"]) == ("professional", "0.00")


class CancelledConnection(RollupsConnection):
    """acme's starter subscription ended on Apr 10, inside its Mar 20 .. Apr 20 period: the server cut
    its period there, and the meter run found that period's events would come after the ending."""

    REASON = (
        "not invoiced: the subscription ended at 2025-04-10T00:00:00+00:00, before this period's meter"
        " events were sent, and Stripe invoices usage only on a live subscription: devices;"
        " invoice it by hand"
    )

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        if "FROM subscriptions" in query:
            return [{"status": "canceled"}]
        if "not invoiced" in query:
            return [{"period_start": at(3, 20), "period_end": at(4, 10), "meter_refusal": self.REASON}]
        return await super().fetch(query, *args)


def test_after_a_subscription_ended_the_cli_bills_no_plan_and_names_the_period_not_invoiced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: after a subscription was cancelled immediately (no report since), the CLI priced
    the period after the ended rollup on its starter plan, billed, and said nothing of the period whose
    meter events no invoice carried."""
    reports = [(at(4, 9), at(4, 9) + timedelta(hours=1), 13)]
    conn = CancelledConnection("starter", [(at(3, 20), at(4, 10), "starter", True)], reports)

    period = usage_json(conn, monkeypatch, capsys, "--customer", "acme")["billing_period"]

    assert (period["period_start"], period["plan"], period["billed"]) == (
        "2025-04-10T00:00:00+00:00",
        "unlicensed",
        False,
    )
    assert period["not_invoiced"] == {
        "period_start": "2025-03-20T00:00:00+00:00",
        "period_end": "2025-04-10T00:00:00+00:00",
        "reason": CancelledConnection.REASON,
    }


def test_json_decimals_are_never_in_exponent_notation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: decimals were written with str(), which keeps scaleb's exponent: a customer
    without traffic showed "trafficGb": "0E-9", one with 512 bytes "5.12E-7", where the README promises
    exact decimal strings."""
    reports = [(at(4, 16), at(4, 16) + timedelta(hours=1), 3)]
    for traffic, shown in ((0, "0.000000000"), (512, "0.000000512")):
        conn = RollupsConnection("starter", [], reports, traffic_bytes=traffic)
        everyone = usage_json(conn, monkeypatch, capsys, "--all")
        assert [row["trafficGb"] for row in everyone["customers"]] == [shown]


def test_a_customer_without_a_report_in_the_window_is_shown_on_its_mirror_s_plan(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: the plan came from the window's summary, which only a customer that reported
    in the window has: a new professional customer without reports was shown on the trial plan, its
    overage "not billed (plan trial: only paid plans are billed)"."""
    conn = RollupsConnection("professional", [], [])

    period = usage_json(conn, monkeypatch, capsys, "--customer", "acme")["billing_period"]
    assert (period["plan"], period["billed"], period["source"]) == (
        "professional",
        True,
        "calendar month, computed now",
    )


@pytest.mark.parametrize(
    "lost",
    [
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        pool.DatabaseUnavailable("ConnectionRefusedError: [Errno 111] Connection refused"),
    ],
)
def test_a_database_away_or_lost_mid_query_exits_1_not_as_a_refusal(
    lost: Exception, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: every failure exited 2, a mistake in the command, so a cron job could not tell
    "try again later" from "fix the command"; and a connection lost mid-query, a PostgresError, read
    `DATABASE_URL: PostgreSQL refused (...)`, as if the URL were wrong."""

    async def away(*_: Any) -> int:
        raise lost

    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://billing@127.0.0.1:5432/billing")
    monkeypatch.setattr(usage_cli, "_show", away)
    assert main(["usage", "--all"]) == 1
    said = capsys.readouterr().err.strip()
    assert said.startswith("iotistic-billing: error: cannot reach PostgreSQL at DATABASE_URL (")
    assert "refused (" not in said and str(lost) in said


def test_a_database_that_refuses_the_command_still_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of exit 1: a database that is not there is a DATABASE_URL to fix."""

    async def refused(*_: Any) -> int:
        raise asyncpg.InvalidCatalogNameError('database "no_such_database" does not exist')

    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://billing@127.0.0.1:5432/billing")
    monkeypatch.setattr(usage_cli, "_show", refused)
    assert main(["usage", "--all"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith('error: DATABASE_URL: PostgreSQL refused (database "no_such_database" does not exist)')
    )
