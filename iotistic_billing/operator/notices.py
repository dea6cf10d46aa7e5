"""The notices the operator writes on its own clock: a trial's "ends in N days" (Stripe sends its own
trial_will_end for the trials of its subscriptions; the inbox turns that into the same notice)."""

from __future__ import annotations

from datetime import datetime, timedelta

from iotistic_billing.customer import Customer, customer_id_in_use
from iotistic_billing.db.pool import DATABASE_UNREACHABLE, database_unreachable
from iotistic_billing.notices.content import Notice, trial_ending
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.entitlement import Entitlement, effective_plan, trial_started
from iotistic_billing.operator.trial_history import known_trial_start


def trial_ending_due(entitlement: Entitlement, now: datetime, days: int) -> bool:
    """The operator's own trial (not a Stripe subscription's) ends within `days`."""
    ends_at = entitlement.trial_ends_at
    return (
        entitlement.trial_active and ends_at is not None and ends_at - timedelta(days=days) <= now < ends_at
    )


def trial_ending_notice(
    customer: Customer,
    body: dict[str, object],
    now: datetime,
    days: int,
    first_licensed: datetime | None = None,
) -> Notice | None:
    """`first_licensed`: the first licence of its customer id, where a Customer made again started its
    trial (entitlement.trial_started)."""
    created = trial_started(customer.metadata.creation_timestamp or now, first_licensed)
    entitlement = effective_plan(customer.spec, created, now)
    if not trial_ending_due(entitlement, now, days) or entitlement.trial_ends_at is None:
        return None
    return trial_ending(
        customer_id=customer_id_in_use(body),
        customer_name=customer.metadata.name,
        company=customer.spec.company_name,
        plan=entitlement.plan,
        ends_at=entitlement.trial_ends_at,
        now=now,
    )


async def write_trial_ending(
    ctx: OperatorContext, customer: Customer, body: dict[str, object], now: datetime
) -> bool:
    """Write the notice once (its key makes a second write a no-op; `ctx.noticed` spares the database
    the checks of a process that wrote it already). True when it was written now; False too while
    PostgreSQL is away, said once an outage (`ctx.trial_notices`), as the next check writes it."""
    first_licensed = known_trial_start(ctx, customer, customer_id_in_use(body))
    notice = trial_ending_notice(customer, body, now, ctx.settings.trial_notice_days, first_licensed)
    if notice is None or notice.key in ctx.noticed:
        return False
    try:
        async with ctx.sessions() as session, session.begin():
            written = await ctx.outbox.enqueue(session, notice, customer.spec)
    except Exception as error:
        if not database_unreachable(error):
            raise
        ctx.trial_notices.failed(error, f"{DATABASE_UNREACHABLE} ({type(error).__name__})")
        return False
    ctx.trial_notices.succeeded()
    ctx.noticed.add(notice.key)
    return written


__all__ = ["trial_ending_due", "trial_ending_notice", "write_trial_ending"]
