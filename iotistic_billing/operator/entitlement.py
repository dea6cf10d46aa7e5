"""What a Customer is entitled to at a moment (pure): the effective plan, and the history action of a
licence that changes it. The rule: docs/architecture.md, "Effective plan"."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

from iotistic_billing.customer import PAID_STATUSES, RESTRICTED_FOR, CustomerSpec, dunning_dates
from iotistic_billing.licensing.plans import UNLICENSED_PLAN_NAME
from iotistic_billing.operator import constants as c

PLAN_RANK = {UNLICENSED_PLAN_NAME: 0, "trial": 1, "starter": 2, "professional": 3, "enterprise": 4}
# A subscription whose first payment never went through (Stripe expires an incomplete one after 23 h):
# it granted nothing and ended nothing, so the Customer's own trial goes on.
NEVER_PAID_STATUSES: Final = frozenset({"incomplete", "incomplete_expired"})


@dataclass(frozen=True, kw_only=True)
class Entitlement:
    """The plan a Customer's licence carries at a moment, and why."""

    plan: str  # a plan name or "unlicensed"
    reason: str
    message: str
    trial_active: bool = False
    trial_ends_at: datetime | None = None
    # Stripe's status for the licence's subscription claim; a manual paid plan is "active".
    subscription_status: str
    subscription_period_end: datetime | None = None
    # Set to cancel at subscription_period_end (and not ended yet): the licence ends then (license_end).
    cancel_at_period_end: bool = False
    suspended: bool = False
    lapsed: bool = False  # a lapsed trial or a cancelled/unpaid subscription
    # The dunning ladder: a failed payment's step (GracePeriod, Restricted, Suspended) and when the next
    # one comes; restricted: the plan's limits with the read-only features (no new devices, no exports).
    payment_step: str | None = None
    next_step_at: datetime | None = None
    # What PaymentOverdue says of the step when `message` is about something else (a suspension's).
    payment_message: str | None = None
    restricted: bool = False


def trial_started(created_at: datetime, first_licensed: datetime | None) -> datetime:
    """When the trial of a Customer created at `created_at` started (trial.days count from it): at the
    first licence its customer id was issued (the licence history's) when that came before, so a
    Customer deleted and made again from Git under its customer id keeps its trial's end, not a new one."""
    if first_licensed is not None and first_licensed < created_at:
        return first_licensed
    return created_at


def _trial(spec: CustomerSpec, created_at: datetime, now: datetime) -> Entitlement:
    # On the whole second: a licence's times are whole seconds, and a trial judged active in the fraction
    # of a second before an endsAt like 12:00:00.5Z would need a licence ending before it was issued.
    ends_at = spec.trial.ends_at_for(created_at).replace(microsecond=0)
    if now < ends_at:
        return Entitlement(
            plan="trial",
            reason=c.TRIAL_ACTIVE,
            message=f"trial ends {ends_at.isoformat()}",
            trial_active=True,
            trial_ends_at=ends_at,
            subscription_status="trialing",
        )
    return Entitlement(
        plan=UNLICENSED_PLAN_NAME,
        reason=c.TRIAL_EXPIRED,
        message=f"trial ended {ends_at.isoformat()}",
        trial_ends_at=ends_at,
        subscription_status="canceled",
        lapsed=True,
    )


def effective_plan(
    spec: CustomerSpec, created_at: datetime, now: datetime, restricted_for: timedelta = RESTRICTED_FOR
) -> Entitlement:
    """The subscription's plan in stripe mode, spec.plan in manual mode; a lapsed trial or subscription
    and a suspension give the unlicensed feature set; an unpaid renewal walks the dunning ladder
    (`restricted_for`: DUNNING_RESTRICT_DAYS)."""
    billed = _billed(spec, created_at, now, restricted_for)
    if spec.suspended:
        # The dunning ladder goes on under it: PaymentOverdue keeps the subscription's step (a suspension
        # said "no payment overdue", and its lifting posted the step again as new). So does the trial's
        # clock: its end is kept (status.trial, TrialActive), though none of it is granted meanwhile.
        return Entitlement(
            plan=UNLICENSED_PLAN_NAME,
            reason=c.SUSPENDED,
            message="suspended by an administrator",
            trial_ends_at=billed.trial_ends_at,
            subscription_status="paused",
            suspended=True,
            payment_step=billed.payment_step,
            next_step_at=billed.next_step_at,
            payment_message=billed.message if billed.payment_step is not None else None,
        )
    return billed


def _billed(
    spec: CustomerSpec, created_at: datetime, now: datetime, restricted_for: timedelta
) -> Entitlement:
    """effective_plan without a suspension."""
    if spec.billing.mode == "manual":
        if spec.plan == "trial":
            return _trial(spec, created_at, now)
        return Entitlement(
            plan=spec.plan,
            reason=c.MANUAL_BILLING,
            message=f"{spec.plan} plan, billed manually",
            subscription_status="active",
        )

    subscription = spec.subscription
    if subscription is not None and subscription.status in NEVER_PAID_STATUSES:
        # Said beside the trial: a Customer checking out again months after its trial, with nothing
        # until the payment goes through, read as if only that old trial's end were the reason.
        trial = _trial(spec, created_at, now)
        return replace(trial, message=f"{trial.message}; Stripe subscription {subscription.status}")
    if subscription is None:
        return _trial(spec, created_at, now)
    if subscription.plan is None:
        # Its price is no plan's: the trial decides, and the Customer says why its payment does not.
        trial = _trial(spec, created_at, now)
        why = f"Stripe subscription {subscription.status} is on no plan's price (STRIPE_PRICE_*)"
        return replace(trial, message=f"{trial.message}; {why}")
    period_end = subscription.current_period_end
    if subscription.status in PAID_STATUSES:
        cancels = bool(subscription.cancel_at_period_end) and period_end is not None
        if subscription.ended_at_period_end(now) and period_end is not None:
            # The licence the deletion gives, and the housekeeping's check runs the pass as the plan
            # changes (state.housekeeping_due).
            return Entitlement(
                plan=UNLICENSED_PLAN_NAME,
                reason=c.SUBSCRIPTION_LAPSED,
                message=(
                    f"Stripe subscription {subscription.status}, set to cancel at its period's end,"
                    f" {_day(period_end)}"
                ),
                subscription_status="canceled",
                subscription_period_end=period_end,
                lapsed=True,
            )
        return Entitlement(
            plan=subscription.plan,
            reason=c.SUBSCRIPTION_ACTIVE,
            message=f"Stripe subscription {subscription.status}",
            subscription_status=subscription.status,
            subscription_period_end=period_end,
            cancel_at_period_end=cancels,
        )
    if subscription.status == "past_due":
        since = subscription.grace_started(now)
        dates = dunning_dates(since, restricted_for)
        restricted_at, suspended_at = dates.restricted_at, dates.suspended_at
        if now < restricted_at:
            then = "restricted" if restricted_for else "suspended"  # DUNNING_RESTRICT_DAYS=0: no restriction
            return Entitlement(
                plan=subscription.plan,
                reason=c.SUBSCRIPTION_PAST_DUE,
                message=f"payment failed {_day(since)}; full access until {_day(restricted_at)}, then {then}",
                subscription_status="past_due",
                subscription_period_end=period_end,
                payment_step=c.GRACE_PERIOD,
                next_step_at=restricted_at,
            )
        if now < suspended_at:
            return Entitlement(
                plan=subscription.plan,
                reason=c.SUBSCRIPTION_RESTRICTED,
                message=(
                    f"payment failed {_day(since)}; restricted until {_day(suspended_at)}, then suspended"
                ),
                subscription_status="past_due",
                subscription_period_end=period_end,
                payment_step=c.RESTRICTED,
                next_step_at=suspended_at,
                restricted=True,
            )
        return Entitlement(
            plan=UNLICENSED_PLAN_NAME,
            reason=c.SUBSCRIPTION_LAPSED,
            message=f"payment failed {_day(since)}; suspended since {_day(suspended_at)}",
            subscription_status="past_due",
            subscription_period_end=period_end,
            lapsed=True,
            payment_step=c.PAYMENT_SUSPENDED,
        )
    message, step = f"Stripe subscription {subscription.status}", None
    if subscription.status == "unpaid":
        step = c.PAYMENT_SUSPENDED
    elif subscription.status == "canceled" and subscription.past_due_since is not None:
        # Ended while overdue (the inbox keeps pastDueSince then): the payment is still owed, though no
        # step of the ladder follows an ending.
        step = c.CANCELED_UNPAID
        message = f"{message} with the payment that failed {_day(subscription.past_due_since)} unpaid"
    return Entitlement(
        plan=UNLICENSED_PLAN_NAME,
        reason=c.SUBSCRIPTION_LAPSED,
        message=message,
        subscription_status=subscription.status,
        subscription_period_end=period_end,
        lapsed=True,
        payment_step=step,
    )


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def license_end(entitlement: Entitlement) -> datetime | None:
    """When the entitlement's licence stops working whatever its lifetime (minting caps `exp` there): the
    trial's end, or the end of a subscription's period set to cancel at it; None when nothing caps it."""
    if entitlement.trial_active:
        return entitlement.trial_ends_at
    if entitlement.cancel_at_period_end:
        return entitlement.subscription_period_end
    return None


def capped_at_end(entitlement: Entitlement, expires_at: datetime) -> bool:
    """A licence that already ends when its entitlement does (license_end): renewing it cannot give it
    more time, so it is not renewed as its last third begins."""
    end = license_end(entitlement)
    return end is not None and expires_at >= end.replace(microsecond=0)


def license_action(
    previous_plan: str | None,
    previous_suspended: bool,
    entitlement: Entitlement,
    previous_restricted: bool = False,
) -> str:
    """The license_history action of a new licence, given the plan of the licence it replaces (a
    restricted licence ranks below its plan) and whether that one was minted under a suspension."""
    if previous_plan is None:
        return "generated"
    if entitlement.suspended:
        # Only the suspension itself is `suspended` (and noticed): a re-mint while it lasts (a renewal, a
        # new company name or signing key) is a renewal.
        return "renewed" if previous_suspended else "suspended"
    if previous_suspended:
        return "reinstated"
    if entitlement.restricted != previous_restricted and entitlement.plan == previous_plan:
        return "downgraded" if entitlement.restricted else "upgraded"
    old, new = PLAN_RANK.get(previous_plan, 0), PLAN_RANK.get(entitlement.plan, 0)
    if new > old:
        return "upgraded"
    if new < old:
        return "downgraded"
    return "renewed"


__all__ = [
    "NEVER_PAID_STATUSES",
    "PLAN_RANK",
    "RESTRICTED_FOR",
    "Entitlement",
    "capped_at_end",
    "effective_plan",
    "license_action",
    "license_end",
    "trial_started",
]
