"""Where a Customer's trial started, read from the licence history: a Customer deleted and made again
under its customer id (a cluster rebuilt from Git, a tool's delete and create) is not a new customer,
and its trial.days count from its customer id's first licence, not from the new object's creation."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import bindparam, func, select

from iotistic_billing.customer import Customer
from iotistic_billing.db.models import LicenseHistory
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.entitlement import effective_plan


def trial_counts(customer: Customer, now: datetime, restricted_for: timedelta) -> bool:
    """Whether the Customer's licence depends on where its trial started: trial.days decides its plan
    (trial.endsAt, an API signup's, is where it ends whatever the object's age; a paid plan has no trial)."""
    if customer.spec.trial.ends_at is not None:
        return False
    created = customer.metadata.creation_timestamp or now
    return effective_plan(customer.spec, created, now, restricted_for).trial_ends_at is not None


def started_as_passed(customer: Customer) -> datetime | None:
    """Where the Customer's last pass counted its trial.days from: status.trial.endsAt less trial.days
    (None without one). Only a status holding a licence says so: a pass that could not read the history
    issued none, yet wrote the end it counted from the object's creation (a Customer made again during
    a PostgreSQL outage), which its next pass took for the anchored start and licensed a new trial.
    trial.days changed since, it keeps the end that pass wrote."""
    trial = customer.status.trial
    if trial is None or trial.ends_at is None or customer.spec.trial.ends_at is not None:
        return None
    if customer.status.license is None:
        return None
    return trial.ends_at - timedelta(days=customer.spec.trial.days)


def known_trial_start(ctx: OperatorContext, customer: Customer, customer_id: str) -> datetime | None:
    """The trial's start as known without a read (the housekeeping's checks): what this process's passes
    read from the history, else what the Customer's last pass counted from (a process restarted knows
    nothing of its own, and counting from the object's creation told one made again its old trial ends
    soon)."""
    return ctx.first_licences.get(customer_id) or started_as_passed(customer)


# Built once, its value bound: every new Customer's first pass reads it (as db/license_history.py's row).
_FIRST_LICENCE: Final = select(func.min(LicenseHistory.issued_at)).where(
    LicenseHistory.customer_id == bindparam("customer_id")
)


async def first_licensed_at(ctx: OperatorContext, customer_id: str) -> datetime | None:
    """When the first licence the history holds of `customer_id` was issued; None when it holds none.
    Kept once found (it never moves later), so a Customer's passes read it once a process; PostgreSQL's
    errors are raised (reconcile.py: a pass that cannot read it issues no licence)."""
    if (known := ctx.first_licences.get(customer_id)) is not None:
        return known
    async with ctx.sessions() as session:
        first: datetime | None = await session.scalar(_FIRST_LICENCE, {"customer_id": customer_id})
    if first is not None:  # none yet (a new Customer's first pass) is read again: its licence comes
        ctx.first_licences[customer_id] = first
    return first


__all__ = ["first_licensed_at", "known_trial_start", "started_as_passed", "trial_counts"]
