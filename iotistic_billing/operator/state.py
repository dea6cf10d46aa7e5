"""Pure decisions of a reconcile pass: the effective plan, the licence action, the phase and conditions.

No I/O here: every function takes the facts (spec, times, step outcomes) and returns what should be.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from iotistic_billing.customer import (
    UNLICENSED,
    Condition,
    ConditionStatus,
    ConditionType,
    CustomerSpec,
    CustomerStatus,
    InstanceStatus,
    LicenseStatus,
    Phase,
    ReleaseStatus,
    TrialStatus,
    find_condition,
    set_condition,
)
from iotistic_billing.licensing.minting import renewal_due
from iotistic_billing.operator import constants as c

# How long a past_due subscription keeps its plan before the customer falls back to unlicensed.
PAST_DUE_GRACE = timedelta(days=7)
PLAN_RANK = {UNLICENSED: 0, "trial": 1, "starter": 2, "professional": 3, "enterprise": 4}


@dataclass(frozen=True)
class Entitlement:
    """What a Customer is entitled to at a moment: the plan its licence carries, and why."""

    plan: str  # a plan name or "unlicensed"
    reason: str
    message: str
    trial_active: bool
    trial_ends_at: datetime | None
    # Stripe's status for the licence's subscription claim; a manual paid plan is "active".
    subscription_status: str
    subscription_period_end: datetime | None
    suspended: bool = False
    lapsed: bool = False  # a lapsed trial or a cancelled/unpaid subscription


def customer_id_for(spec: CustomerSpec, uid: str) -> str:
    """spec.customerId, or a stable id derived from the object's uid (it never changes for the object)."""
    return spec.customer_id or derived_customer_id(uid)


def derived_customer_id(uid: str) -> str:
    return "cust_" + hashlib.sha256(uid.encode()).hexdigest()[:16]


def namespace_for(name: str) -> str:
    return c.NAMESPACE_PREFIX + name


def instance_domain(name: str, spec: CustomerSpec, base_domain: str) -> str:
    return spec.instance.domain or f"{name}.{base_domain}"


def _trial(spec: CustomerSpec, created_at: datetime, now: datetime) -> Entitlement:
    # On the whole second: a licence's times are whole seconds, and a trial judged active in the fraction
    # of a second before an endsAt like 12:00:00.5Z would need a licence ending before it was issued.
    ends_at = spec.trial.ends_at_for(created_at).replace(microsecond=0)
    if now < ends_at:
        return Entitlement(
            "trial", c.TRIAL_ACTIVE, f"trial ends {ends_at.isoformat()}", True, ends_at, "trialing", None
        )
    return Entitlement(
        UNLICENSED,
        c.TRIAL_EXPIRED,
        f"trial ended {ends_at.isoformat()}",
        False,
        ends_at,
        "canceled",
        None,
        lapsed=True,
    )


def effective_plan(spec: CustomerSpec, created_at: datetime, now: datetime) -> Entitlement:
    """DESIGN.md section 2: the subscription's plan in stripe mode, spec.plan in manual mode, a lapsed
    trial or subscription and a suspension give the unlicensed feature set."""
    if spec.suspended:
        return Entitlement(
            UNLICENSED, c.SUSPENDED, "suspended by an administrator", False, None, "paused", None, True
        )
    if spec.billing.mode == "manual":
        if spec.plan == "trial":
            return _trial(spec, created_at, now)
        return Entitlement(
            spec.plan, c.MANUAL_BILLING, f"{spec.plan} plan, billed manually", False, None, "active", None
        )

    subscription = spec.subscription
    if subscription is None or subscription.status in ("incomplete",) or subscription.plan is None:
        return _trial(spec, created_at, now)
    period_end = subscription.current_period_end
    if subscription.status in ("active", "trialing"):
        return Entitlement(
            subscription.plan,
            c.SUBSCRIPTION_ACTIVE,
            f"Stripe subscription {subscription.status}",
            False,
            None,
            subscription.status,
            period_end,
        )
    if subscription.status == "past_due" and period_end is not None and now < period_end + PAST_DUE_GRACE:
        return Entitlement(
            subscription.plan,
            c.SUBSCRIPTION_PAST_DUE,
            f"payment past due; plan kept until {(period_end + PAST_DUE_GRACE).isoformat()}",
            False,
            None,
            "past_due",
            period_end,
        )
    return Entitlement(
        UNLICENSED,
        c.SUBSCRIPTION_LAPSED,
        f"Stripe subscription {subscription.status}",
        False,
        None,
        subscription.status,
        period_end,
        lapsed=True,
    )


def license_action(previous_plan: str | None, previous_suspended: bool, entitlement: Entitlement) -> str:
    """The license_history action of a new licence, given the plan of the licence it replaces."""
    if previous_plan is None:
        return "generated"
    if entitlement.suspended:
        return "suspended"
    if previous_suspended:
        return "reinstated"
    old, new = PLAN_RANK.get(previous_plan, 0), PLAN_RANK.get(entitlement.plan, 0)
    if new > old:
        return "upgraded"
    if new < old:
        return "downgraded"
    return "renewed"


# ----- outcomes of the steps, as the status builder sees them -----


@dataclass(frozen=True)
class ReleaseOutcome:
    result: Literal["installed", "upgraded", "unchanged", "failed", "disabled-pending"]
    reason: str
    message: str
    release: ReleaseStatus | None = None
    permanent: bool = False

    @property
    def deployed(self) -> bool:
        return self.result in ("installed", "upgraded", "unchanged")


@dataclass(frozen=True)
class InstanceHealth:
    available: bool
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What readiness needs of an instance Deployment, and its identity: the operator keeps one per
    Deployment it watches (six thousand at 1,000 Customers; the object itself is ~5 KB of JSON)."""

    name: str
    uid: str
    generation: int
    replicas: int  # spec.replicas: wanted
    observed_generation: int
    available: int
    updated: int
    current: int  # status.replicas: of every ReplicaSet, old ones included

    @classmethod
    def of(cls, deployment: Mapping[str, Any]) -> DeploymentState:
        meta, spec, status = (
            deployment.get("metadata") or {},
            deployment.get("spec") or {},
            deployment.get("status") or {},
        )
        return cls(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            replicas=1 if spec.get("replicas") is None else int(spec["replicas"]),
            observed_generation=int(status.get("observedGeneration") or 0),
            available=int(status.get("availableReplicas") or 0),
            updated=int(status.get("updatedReplicas") or 0),
            current=int(status.get("replicas") or 0),
        )

    @property
    def rolled_out(self) -> bool:
        """As `kubectl rollout status`: the current generation observed, every wanted replica updated and
        available, and no replica of an older ReplicaSet left."""
        return (
            self.observed_generation >= self.generation
            and self.available >= self.replicas
            and self.updated >= self.replicas
            and self.current <= self.updated
        )


def instance_health(deployments: Sequence[DeploymentState], enabled: bool) -> InstanceHealth:
    """Available when every Deployment of the release has rolled out its current generation."""
    if not enabled:
        return InstanceHealth(True, c.INSTANCE_DISABLED, "instance disabled: scaled to zero")
    if not deployments:
        return InstanceHealth(False, c.DEPLOYMENTS_UNAVAILABLE, "no Deployments of the release yet")
    waiting = sorted(f"{d.name} {d.available}/{d.replicas}" for d in deployments if not d.rolled_out)
    if waiting:
        return InstanceHealth(
            False, c.DEPLOYMENTS_UNAVAILABLE, "waiting for Deployments: " + ", ".join(waiting)
        )
    return InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, f"{len(deployments)} Deployments available")


def phase_for(
    entitlement: Entitlement,
    release: ReleaseOutcome | None,
    health: InstanceHealth | None,
    previous_phase: str | None,
    stalled: bool,
) -> Phase:
    if stalled:
        return Phase.FAILED
    if entitlement.suspended:
        return Phase.SUSPENDED
    if entitlement.lapsed:
        return Phase.EXPIRED
    if release is None or not release.deployed:
        return (
            Phase.PENDING
            if release is None and previous_phase in (None, Phase.PENDING)
            else Phase.PROVISIONING
        )
    if health is not None and health.available:
        return Phase.READY
    return Phase.DEGRADED if previous_phase in (Phase.READY, Phase.DEGRADED) else Phase.PROVISIONING


def next_status(
    previous: CustomerStatus,
    *,
    generation: int,
    customer_id: str,
    entitlement: Entitlement,
    license: LicenseStatus | None,
    license_error: str | None,
    release: ReleaseOutcome | None,
    health: InstanceHealth | None,
    namespace: str,
    url: str,
    stalled_reason: str | None = None,
    stalled_message: str = "",
    now: datetime,
) -> CustomerStatus:
    """The status a pass ends with; observedGeneration moves only when the pass ends ready or stalled."""
    stalled = stalled_reason is not None
    phase = phase_for(entitlement, release, health, previous.phase, stalled)
    ready = (
        not stalled
        and license is not None
        and release is not None
        and release.deployed
        and bool(health and health.available)
    )
    conditions: list[Condition] | None = previous.conditions

    def put(type_: str, status: bool | None, reason: str, message: str) -> None:
        nonlocal conditions
        value = (
            ConditionStatus.UNKNOWN
            if status is None
            else ConditionStatus.TRUE
            if status
            else ConditionStatus.FALSE
        )
        conditions = set_condition(
            conditions,
            type_=type_,
            status=value,
            reason=reason,
            message=message,
            observed_generation=generation,
            now=now,
        )

    if license_error is not None:
        put(ConditionType.LICENSE_ISSUED, False, c.LICENSE_FAILED, license_error)
    elif license is not None:
        put(
            ConditionType.LICENSE_ISSUED,
            True,
            c.LICENSE_ISSUED,
            f"{entitlement.plan} licence, expires {license.expires_at}",
        )
    if release is not None:
        reason, message = release.reason, release.message
        last = find_condition(previous.conditions or (), ConditionType.RELEASE_DEPLOYED)
        if release.result == "unchanged" and last is not None and last.status == ConditionStatus.TRUE:
            # Keep what the last install or upgrade said: rewriting it to "unchanged" on the next pass
            # was a status patch (and a watch event) per Customer that told nobody anything.
            reason, message = last.reason, last.message
        put(ConditionType.RELEASE_DEPLOYED, release.deployed, reason, message)
    put(
        ConditionType.TRIAL_ACTIVE,
        entitlement.trial_active,
        c.TRIAL_ACTIVE
        if entitlement.trial_active
        else (c.TRIAL_EXPIRED if entitlement.reason == c.TRIAL_EXPIRED else c.NOT_IN_TRIAL),
        entitlement.message if entitlement.trial_ends_at else "not in a trial",
    )
    subscription_ok = entitlement.reason in (c.MANUAL_BILLING, c.SUBSCRIPTION_ACTIVE, c.SUBSCRIPTION_PAST_DUE)
    subscription_reason = entitlement.reason if entitlement.reason != c.TRIAL_ACTIVE else c.NO_SUBSCRIPTION
    put(ConditionType.SUBSCRIPTION_ACTIVE, subscription_ok, subscription_reason, entitlement.message)

    if stalled:
        put(ConditionType.STALLED, True, stalled_reason or "Stalled", stalled_message)
        put(ConditionType.RECONCILING, False, stalled_reason or "Stalled", "waiting for a change of the spec")
        put(ConditionType.READY, False, stalled_reason or "Stalled", stalled_message)
    else:
        put(ConditionType.STALLED, False, c.RECONCILED, "")
        if ready:
            put(ConditionType.RECONCILING, False, c.RECONCILED, "")
            put(
                ConditionType.READY,
                True,
                health.reason if health else c.RECONCILED,
                health.message if health else "",
            )
        else:
            waiting_on = (
                license_error
                or (release.message if release is not None and not release.deployed else None)
                or (health.message if health is not None else "provisioning")
            )
            put(ConditionType.RECONCILING, True, c.PROGRESSING, waiting_on)
            put(
                ConditionType.READY,
                False,
                health.reason if health and release and release.deployed else c.PROGRESSING,
                waiting_on,
            )

    return previous.model_copy(
        update={
            "customer_id": customer_id,
            "phase": phase,
            "plan": entitlement.plan,
            "trial": TrialStatus(is_trial_mode=entitlement.trial_active, ends_at=entitlement.trial_ends_at),
            "license": license or previous.license,
            "release": release.release
            if release is not None and release.release is not None
            else previous.release,
            "instance": InstanceStatus(namespace=namespace, url=url),
            "conditions": conditions,
            "observed_generation": generation if (ready or stalled) else previous.observed_generation,
        }
    )


# What other writers keep in a Customer's status: usage metering's status.usage and its condition.
FOREIGN_CONDITIONS = frozenset({ConditionType.WITHIN_LIMITS})


def over_current(status: CustomerStatus, current: CustomerStatus) -> CustomerStatus:
    """A pass's status laid over the status as it is now: the pass's own fields, and what the other
    writers own (`status.usage`, FOREIGN_CONDITIONS) as `current` has it, each condition in its place."""
    theirs = {c.type: c for c in current.conditions or () if c.type in FOREIGN_CONDITIONS}
    conditions: list[Condition] = []
    for condition in status.conditions or ():
        if condition.type not in FOREIGN_CONDITIONS:
            conditions.append(condition)
        elif condition.type in theirs:
            conditions.append(theirs.pop(condition.type))
    conditions.extend(theirs.values())
    return status.model_copy(update={"usage": current.usage, "conditions": conditions or None})


def housekeeping_due(
    spec: CustomerSpec, status: CustomerStatus, created_at: datetime, now: datetime
) -> str | None:
    """Why the periodic check should run a pass now (a timer's whole cost when nothing is due)."""
    entitlement = effective_plan(spec, created_at, now)
    if status.plan is not None and status.plan != entitlement.plan:
        return entitlement.reason
    license = status.license
    if license is None or license.issued_at is None or license.expires_at is None:
        return None
    capped_by_trial = (
        entitlement.trial_active
        and entitlement.trial_ends_at is not None
        and license.expires_at >= entitlement.trial_ends_at.replace(microsecond=0)
    )
    if not capped_by_trial and renewal_due(license.expires_at, license.issued_at, now):
        return "LicenseRenewal"
    return None
