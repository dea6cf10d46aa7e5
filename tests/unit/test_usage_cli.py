"""`iotistic-billing usage`: mistakes and a slow database answered with a sentence, not a traceback."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from iotistic_billing.cli import main
from iotistic_billing.cli import usage as usage_cli


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
    assert main(["usage", "--all"]) == 2
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
