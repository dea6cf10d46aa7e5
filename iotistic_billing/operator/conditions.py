"""The conditions a pass writes: one function per step, and `summarize` deriving the kstatus trio
(Stalled, Reconciling, Ready) from the outcome, as Flux's helm-controller does (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from iotistic_billing.customer import Condition, ConditionStatus, ConditionType, find_condition, set_condition
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.entitlement import Entitlement
from iotistic_billing.operator.outcomes import PassOutcome, ReleaseOutcome, split_left_out


@dataclass(frozen=True)
class ConditionValue:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str


@dataclass(frozen=True)
class NoCondition:
    """The condition of a step this Customer does not have (Stripe billing, a webhook), to be removed:
    left at its last word it read as current, and a Customer moved to manual billing kept its dunning
    step (and the housekeeping's pass every minute)."""

    type: str


def license_condition(outcome: PassOutcome, entitlement: Entitlement) -> ConditionValue | None:
    if outcome.license_error is not None:
        return ConditionValue(ConditionType.LICENSE_ISSUED, False, c.LICENSE_FAILED, outcome.license_error)
    if outcome.license_unavailable is not None:
        return ConditionValue(
            ConditionType.LICENSE_ISSUED, False, c.DATABASE_UNAVAILABLE, outcome.license_unavailable
        )
    if outcome.license_refused is not None:
        # False even while the licence in force has days left: the renewal that should replace it cannot
        # be written, and True with the old expiry hid that until the instance ran out of licence.
        return ConditionValue(
            ConditionType.LICENSE_ISSUED, False, c.LICENSE_SECRET_REFUSED, outcome.license_refused
        )
    if outcome.license is None:
        return None
    return ConditionValue(
        ConditionType.LICENSE_ISSUED,
        True,
        c.LICENSE_ISSUED,
        f"{entitlement.plan} licence, expires {outcome.license.expires_at}",
    )


def release_condition(release: ReleaseOutcome | None, previous: Sequence[Condition]) -> ConditionValue | None:
    if release is None:
        return None
    reason, message = release.reason, release.message
    last = find_condition(previous, ConditionType.RELEASE_DEPLOYED)
    if release.result == "unchanged" and last is not None and last.status == ConditionStatus.TRUE:
        # Keep what the last install or upgrade said: rewriting it to "unchanged" on the next pass was
        # a status patch (and a watch event) per Customer that told nobody anything. Not its note of the
        # extraEnv entries left out, which is this pass's: their removal leaves the values as they were
        # (left out already), so the release unchanged, and the note kept asked to remove them for ever.
        reason, message = last.reason, split_left_out(last.message)[0] + release.note
    return ConditionValue(ConditionType.RELEASE_DEPLOYED, release.deployed, reason, message)


def trial_condition(entitlement: Entitlement) -> ConditionValue:
    ends_at = entitlement.trial_ends_at
    if entitlement.suspended and ends_at is not None:
        # False (the trial grants nothing while suspended), the suspension its reason, and the end it
        # keeps, worded to hold whether the trial ends during the suspension or ended before it.
        message = (
            f"{entitlement.message}; a suspension does not stop the trial's clock:"
            f" it ends (or ended) {ends_at.isoformat()}"
        )
        return ConditionValue(ConditionType.TRIAL_ACTIVE, False, c.SUSPENDED, message)
    if entitlement.trial_active:
        reason = c.TRIAL_ACTIVE
    else:
        reason = c.TRIAL_EXPIRED if entitlement.reason == c.TRIAL_EXPIRED else c.NOT_IN_TRIAL
    message = entitlement.message if entitlement.trial_ends_at else "not in a trial"
    return ConditionValue(ConditionType.TRIAL_ACTIVE, entitlement.trial_active, reason, message)


def subscription_condition(entitlement: Entitlement) -> ConditionValue:
    paying = entitlement.reason in (c.MANUAL_BILLING, c.SUBSCRIPTION_ACTIVE, c.SUBSCRIPTION_PAST_DUE)
    reason = entitlement.reason if entitlement.reason != c.TRIAL_ACTIVE else c.NO_SUBSCRIPTION
    return ConditionValue(ConditionType.SUBSCRIPTION_ACTIVE, paying, reason, entitlement.message)


def notifications_condition(outcome: PassOutcome) -> ConditionValue | NoCondition:
    """Whether a Customer's notices can be signed (Ready does not wait on it): for one with a webhook, and
    for one whose withdrawn key's copy the API server kept (its removal refused). The step's outcome is
    None otherwise."""
    notifications = outcome.notifications
    if notifications is None:
        return NoCondition(ConditionType.NOTIFICATIONS_READY)
    return ConditionValue(
        ConditionType.NOTIFICATIONS_READY, notifications.ready, notifications.reason, notifications.message
    )


def payment_condition(entitlement: Entitlement, stripe_billed: bool) -> ConditionValue | NoCondition:
    """The dunning ladder's step, for a Stripe-billed Customer: True while a payment is overdue."""
    if not stripe_billed:
        return NoCondition(ConditionType.PAYMENT_OVERDUE)
    step = entitlement.payment_step
    if step is None:
        return ConditionValue(ConditionType.PAYMENT_OVERDUE, False, c.PAYMENTS_CURRENT, "no payment overdue")
    message = entitlement.payment_message or entitlement.message
    return ConditionValue(ConditionType.PAYMENT_OVERDUE, True, step, message)


def stalled(reason: str, message: str) -> list[ConditionValue]:
    """Retrying cannot help until something changes: Stalled, and Ready False with the same words (a
    kstatus reader must never see an earlier Ready=True on a Customer that failed since). What must
    change is the Stalled message's to say: not always the spec (a namespace freed, a chart pushed, a
    rollout's annotation)."""
    return [
        ConditionValue(ConditionType.STALLED, True, reason, message),
        ConditionValue(
            ConditionType.RECONCILING,
            False,
            reason,
            "not retried until what Stalled names changes, or a pass is requested (annotation"
            " reconcile.iotistic.io/requested-at)",
        ),
        ConditionValue(ConditionType.READY, False, reason, message),
    ]


def waiting(reason: str, message: str) -> list[ConditionValue]:
    """Nothing could be done yet, for a reason that goes by itself (a namespace being deleted): Reconciling
    with that reason, Ready False with the same words, not Stalled (the pass is retried)."""
    return [
        ConditionValue(ConditionType.STALLED, False, c.RECONCILED, ""),
        ConditionValue(ConditionType.RECONCILING, True, reason, message),
        ConditionValue(ConditionType.READY, False, reason, message),
    ]


def summarize(outcome: PassOutcome) -> list[ConditionValue]:
    """Stalled, Reconciling and Ready, from the steps' outcome."""
    if outcome.stalled_reason is not None:
        return stalled(outcome.stalled_reason, outcome.failure or "")
    health = outcome.health
    if outcome.ready:
        assert health is not None
        return [
            ConditionValue(ConditionType.STALLED, False, c.RECONCILED, ""),
            ConditionValue(ConditionType.RECONCILING, False, c.RECONCILED, ""),
            ConditionValue(ConditionType.READY, True, health.reason, health.message),
        ]
    release = outcome.release
    deployed = release is not None and release.deployed
    waiting_on, waiting = outcome.waiting_on, outcome.waiting_reason
    if release is not None and release.result == "failed":
        reason = release.reason  # retried (ChartPullFailed, UpgradeFailed...): said, not "Progressing"
    else:
        reason = health.reason if health and deployed else waiting
    return [
        ConditionValue(ConditionType.STALLED, False, c.RECONCILED, ""),
        ConditionValue(ConditionType.RECONCILING, True, waiting, waiting_on),
        ConditionValue(ConditionType.READY, False, reason, waiting_on),
    ]


def with_conditions(
    conditions: Sequence[Condition] | None,
    values: Iterable[ConditionValue | NoCondition | None],
    *,
    generation: int,
    now: datetime,
) -> list[Condition] | None:
    """`conditions` with each value set and each NoCondition removed; None leaves a condition as it is
    (its step did not run). lastTransitionTime moves only when a status changes."""
    result = list(conditions) if conditions is not None else None
    for value in values:
        if value is None:
            continue
        if isinstance(value, NoCondition):
            if result is not None:
                result = [condition for condition in result if condition.type != value.type]
            continue
        status = (
            ConditionStatus.UNKNOWN
            if value.status is None
            else ConditionStatus.TRUE
            if value.status
            else ConditionStatus.FALSE
        )
        result = set_condition(
            result,
            type_=value.type,
            status=status,
            reason=value.reason,
            message=value.message,
            observed_generation=generation,
            now=now,
        )
    return result


__all__ = [
    "ConditionValue",
    "NoCondition",
    "license_condition",
    "notifications_condition",
    "payment_condition",
    "release_condition",
    "stalled",
    "subscription_condition",
    "summarize",
    "trial_condition",
    "waiting",
    "with_conditions",
]
