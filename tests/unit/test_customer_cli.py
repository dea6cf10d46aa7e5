"""The customer command's pure checks (the commands themselves: tests/integration/test_cli_customer.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from iotistic_billing.cli.customer import trial_ended

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def trial_customer(created: datetime, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "acme", "creationTimestamp": created.isoformat()},
        "spec": {
            "email": "a@b.cd",
            "companyName": "x",
            "plan": "trial",
            "billing": {"mode": "manual"},
            "trial": {"days": 14},
        },
        "status": status or {},
    }


def test_upgrade_to_trial_goes_by_the_trial_end_the_operator_counted() -> None:
    """Found in review: the guard on `customer upgrade --plan trial` counted trial.days from the object's
    creation, while the operator counts them from its customer id's first licence: a Customer made
    again an hour ago whose trial ended weeks ago was let through as a running trial. It goes by
    status.trial.endsAt, the operator's own answer, and counts from the creation only without one."""
    first_trial_ended = NOW - timedelta(days=26)
    made_again = trial_customer(
        NOW - timedelta(hours=1), {"trial": {"isTrialMode": False, "endsAt": first_trial_ended.isoformat()}}
    )
    assert trial_ended(made_again, NOW) == first_trial_ended

    # No status yet (or no trial in it): from the creation, as before.
    assert trial_ended(trial_customer(NOW - timedelta(hours=1)), NOW) is None
    assert trial_ended(trial_customer(NOW - timedelta(days=20)), NOW) == NOW - timedelta(days=6)
    # A running trial the operator counted says so.
    running = trial_customer(
        NOW - timedelta(days=2), {"trial": {"endsAt": (NOW + timedelta(days=12)).isoformat()}}
    )
    assert trial_ended(running, NOW) is None
