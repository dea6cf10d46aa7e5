"""Pure decisions of a reconcile pass: what it aims at, the phase, and the status it ends with.

No I/O here: every function takes the facts (the Customer, the clock, the steps' outcome) and returns
what should be. Conditions are conditions.py's; the effective plan is entitlement.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from iotistic_billing.customer import (
    RECONCILE_REQUESTED_AT,
    Condition,
    ConditionType,
    Customer,
    CustomerSpec,
    CustomerStatus,
    InstanceStatus,
    Phase,
    ReleaseStatus,
    TrialStatus,
    VersionSource,
    chart_version_problem,
    customer_id_in_use,
    namespace_for,
)
from iotistic_billing.licensing.minting import issued_ahead, renewal_due
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.conditions import (
    ConditionValue,
    license_condition,
    notifications_condition,
    payment_condition,
    release_condition,
    stalled,
    subscription_condition,
    summarize,
    trial_condition,
    waiting,
    with_conditions,
)
from iotistic_billing.operator.entitlement import (
    RESTRICTED_FOR,
    Entitlement,
    capped_at_end,
    effective_plan,
    trial_started,
)
from iotistic_billing.operator.manifests import namespace_holder, owner_reference
from iotistic_billing.operator.outcomes import InstanceHealth, NamespaceRefused, PassOutcome, ReleaseOutcome
from iotistic_billing.rollout import ROLLOUT_CHART_VERSION, ROLLOUT_PREVIOUS_VERSION, ROLLOUT_UPDATED_AT


@dataclass(frozen=True, kw_only=True)
class PassTarget:
    """What one pass aims at, worked out once from the Customer and the clock; every step reads it."""

    customer: Customer
    customer_id: str
    namespace: str
    domain: str
    entitlement: Entitlement
    # The ownerReference of everything the pass creates for the Customer.
    owner: dict[str, Any]
    now: datetime
    # The instance chart's version the pass installs, and where it came from (chart_target).
    chart_version: str
    version_source: VersionSource

    @property
    def name(self) -> str:
        return self.customer.metadata.name

    @property
    def spec(self) -> CustomerSpec:
        return self.customer.spec

    @property
    def url(self) -> str:
        return f"https://{self.domain}"

    @property
    def chart_problem(self) -> str | None:
        """Why the version aimed at is no chart version, naming the field; None when it is one. Only the
        rollout's annotation can be: no model checks an annotation, and someone may write it with kubectl."""
        if self.version_source != "Rollout" or (problem := chart_version_problem(self.chart_version)) is None:
            return None
        return f"metadata.annotations[{ROLLOUT_CHART_VERSION}] {problem}"

    @property
    def rollout_updated_at(self) -> str | None:
        """The rollout annotation's updated-at the pass aims by (versionSource Rollout), for
        status.release.rolloutUpdatedAt; None for another source."""
        if self.version_source != "Rollout":
            return None
        updated_at = self.customer.metadata.annotations.get(ROLLOUT_UPDATED_AT)
        # A rollout writes 25 characters; a longer one, by hand, failed the status model (64 at most).
        return updated_at if updated_at is not None and len(updated_at) <= 64 else None


def instance_domain(name: str, spec: CustomerSpec, base_domain: str) -> str:
    return spec.instance.domain or f"{name}.{base_domain}"


def chart_target(
    customer: Customer, previous: ReleaseStatus | None, immediate: bool
) -> tuple[str | None, VersionSource]:
    """The chart version a pass aims at: the spec's pin, else (unless the fleet moves at once) the
    version a rollout set, else the version the Customer already runs from the fleet, so a new
    INSTANCE_CHART_VERSION does not move it; None: the fleet's version now (the caller looks it up).

    The annotation gives way to a version the Customer runs from the fleet that is neither it nor the
    one the rollout moved it from (previous-chart-version; after a rollback, the version it was returned
    from): INSTANCE_CHART_UPGRADE=immediate installed that one after the annotation, and leaving that
    mode moves nobody.

    The annotation is taken as it is: the release step refuses one that is no chart version
    (PassTarget.chart_problem), after the licence, so a bad annotation does not stop its renewal."""
    if pinned := customer.spec.instance.chart_version:
        return pinned, "Pinned"
    if immediate:
        return None, "Fleet"
    rollout = customer.metadata.annotations.get(ROLLOUT_CHART_VERSION)
    # No versionSource: a status from an operator before rollouts, whose unpinned Customers ran the
    # fleet's version (a pin there is in the spec still, or was lifted since: then it stays too).
    runs = (
        previous.chart_version
        if previous is not None and previous.version_source in ("Fleet", None)
        else None
    )
    # Without previous-chart-version (moved before it ran a version, or returned by a rollback of an
    # operator that did not write it) nothing says the fleet's version came later: the annotation applies.
    moved_from = customer.metadata.annotations.get(ROLLOUT_PREVIOUS_VERSION)
    overtaken = bool(runs and moved_from) and runs not in (rollout, moved_from)
    if rollout and not overtaken:
        return rollout, "Rollout"
    if runs:
        return runs, "Fleet"
    return None, "Fleet"


def pass_target(
    body: Mapping[str, Any],
    customer: Customer,
    base_domain: str,
    now: datetime,
    chart: tuple[str, VersionSource],
    restricted_for: timedelta = RESTRICTED_FOR,
    first_licensed: datetime | None = None,
) -> PassTarget:
    """`first_licensed`: the first licence the history holds of the Customer's customer id (None: none
    read), where its trial started when that came before the Customer (entitlement.trial_started)."""
    name = customer.metadata.name
    created = trial_started(customer.metadata.creation_timestamp or now, first_licensed)
    return PassTarget(
        customer=customer,
        customer_id=customer_id_in_use(body),
        namespace=namespace_for(name),
        domain=instance_domain(name, customer.spec, base_domain),
        entitlement=effective_plan(customer.spec, created, now, restricted_for),
        owner=owner_reference(body),
        now=now,
        chart_version=chart[0],
        version_source=chart[1],
    )


def phase_for(
    entitlement: Entitlement,
    release: ReleaseOutcome | None,
    health: InstanceHealth | None,
    previous_phase: str | None,
    stalled: bool,
    retrying: bool = False,
    *,
    served: bool,
) -> Phase:
    """`retrying`: a step failed and is retried (an upgrade helm refused, a renewal PostgreSQL could not
    record), the instance as it was. `served`: its instance has served (has_served), so what goes wrong
    now is Degraded, not Provisioning."""
    if stalled:
        return Phase.FAILED
    if entitlement.suspended:
        return Phase.SUSPENDED
    if entitlement.lapsed:
        return Phase.EXPIRED
    if release is None or not release.deployed:
        if retrying and served:
            return Phase.DEGRADED  # it runs the revision before, not Provisioning
        return (
            Phase.PENDING
            if release is None and previous_phase in (None, Phase.PENDING)
            else Phase.PROVISIONING
        )
    if health is not None and health.available:
        return Phase.READY
    if health is not None and health.serving and served:
        # A rollout (a renewal's new licence, an upgrade), the old replicas serving meanwhile: the phase
        # stays as it was, Reconciling says it rolls (a Ready instance was Degraded, a Warning, on each);
        # an Expired one's lapse is over, so it serves as Ready.
        return Phase(previous_phase) if previous_phase in _SERVED else Phase.READY
    return Phase.DEGRADED if served else Phase.PROVISIONING


# Phases of a Customer whose instance has served: what goes wrong after is Degraded, not Provisioning.
_SERVED = (Phase.READY, Phase.DEGRADED)


def has_served(previous: CustomerStatus) -> bool:
    """Whether the Customer's instance has served before this pass: Ready or Degraded, or Expired with a
    revision deployed (a lapse keeps the instance running on the unlicensed plan). Not Suspended: a
    suspension scales the instance to zero, so nothing serves until it comes back."""
    if previous.phase in _SERVED:
        return True
    deployed = previous.release is not None and bool(previous.release.revision)
    return previous.phase == Phase.EXPIRED and deployed


def next_status(
    previous: CustomerStatus, target: PassTarget, outcome: PassOutcome, generation: int
) -> CustomerStatus:
    """The status a pass ends with; observedGeneration moves only when the pass ends ready or stalled."""
    entitlement = target.entitlement
    is_stalled = outcome.stalled_reason is not None
    conditions = with_conditions(
        previous.conditions,
        [
            license_condition(outcome, entitlement),
            release_condition(outcome.release, previous.conditions or ()),
            trial_condition(entitlement),
            subscription_condition(entitlement),
            notifications_condition(outcome),
            payment_condition(entitlement, target.spec.billing.mode == "stripe"),
            *summarize(outcome),
        ],
        generation=generation,
        now=target.now,
    )
    release = outcome.release
    deployed = release.release if release is not None and release.release is not None else previous.release
    # No annotation that is no chart version in the status: a long one failed the status model (64 at most).
    aimed_at = None if target.chart_problem else target.chart_version
    # The annotation it aimed by too: a rollback's wait tells the pass that ran a return from one before
    # the rollout's move, whose status may name the returned version as well (rollout_plan.member).
    aimed = {
        "target_version": aimed_at,
        "version_source": target.version_source,
        "rollout_updated_at": target.rollout_updated_at,
    }
    return previous.model_copy(
        update={
            "customer_id": target.customer_id,
            "phase": phase_for(
                entitlement,
                release,
                outcome.health,
                previous.phase,
                is_stalled,
                outcome.retrying,
                served=has_served(previous),
            ),
            # The licence's plan (the PLAN column): a pass that issued none leaves the licence in force.
            "plan": entitlement.plan if outcome.license is not None else previous.plan,
            "trial": TrialStatus(is_trial_mode=entitlement.trial_active, ends_at=entitlement.trial_ends_at),
            "license": outcome.license or previous.license,
            "release": deployed.model_copy(update=aimed) if deployed else ReleaseStatus(**aimed),
            "instance": InstanceStatus(namespace=target.namespace, url=target.url),
            "conditions": conditions,
            "observed_generation": generation
            if (outcome.ready or is_stalled)
            else previous.observed_generation,
        }
    )


def stalled_status(
    previous: CustomerStatus, generation: int, reason: str, message: str, now: datetime
) -> CustomerStatus:
    """A Customer stalled before any step ran (its spec or name refused, its namespace someone else's):
    Failed and Stalled, Ready False (an earlier Ready=True kept beside phase Failed made kstatus readers
    call it healthy)."""
    return previous.model_copy(
        update={
            "phase": Phase.FAILED,
            "conditions": with_conditions(
                previous.conditions, stalled(reason, message), generation=generation, now=now
            ),
            "observed_generation": generation,
        }
    )


def terminating_status(previous: CustomerStatus, generation: int, now: datetime) -> CustomerStatus | None:
    """A Customer being deleted, from its finalizer's first step on: phase Terminating, Ready False and,
    when it has that condition, Reconciling True, both for reason Terminating (it said Ready, its
    release already uninstalled, while a failing finalizer was retried). None when it says so already:
    a retried finalizer writes nothing."""
    if previous.phase == Phase.TERMINATING:
        return None
    message = "the Customer is being deleted: its release, licence and namespace go"
    values = [ConditionValue(ConditionType.READY, False, c.TERMINATING, message)]
    if previous.condition(ConditionType.RECONCILING) is not None:
        values.append(ConditionValue(ConditionType.RECONCILING, True, c.TERMINATING, message))
    conditions = with_conditions(previous.conditions, values, generation=generation, now=now)
    return previous.model_copy(update={"phase": Phase.TERMINATING, "conditions": conditions})


def namespace_refusal(namespace: Mapping[str, Any], target: PassTarget) -> NamespaceRefused | None:
    """Why a pass may not work in the existing namespace customer-<name>; None when it is this Customer's
    and not being deleted."""
    name = target.namespace
    holder = namespace_holder(namespace, target.name, str(target.owner["uid"]))
    if holder == "other":
        return NamespaceRefused(
            c.NAMESPACE_TAKEN,
            f"metadata.name: namespace {name} exists and was not created by the operator for this Customer;"
            " the operator leaves it as it is (delete it or label it"
            f" {c.LABEL_CUSTOMER}={target.name} to hand it over: the Customer takes it up by itself"
            " within a minute; or give the Customer another name)",
            permanent=True,
        )
    terminating = bool((namespace.get("metadata") or {}).get("deletionTimestamp"))
    if holder == "earlier":
        going = "is being deleted" if terminating else "is left to the garbage collector"
        return NamespaceRefused(
            c.NAMESPACE_TERMINATING,
            f"namespace {name} belongs to an earlier Customer {target.name}, deleted, and {going};"
            " waiting until it is gone",
            permanent=False,
        )
    if terminating:
        return NamespaceRefused(
            c.NAMESPACE_TERMINATING,
            f"namespace {name} is being deleted; it is created again once it is gone",
            permanent=False,
        )
    return None


def refused_status(
    previous: CustomerStatus, target: PassTarget, refusal: NamespaceRefused, generation: int
) -> CustomerStatus:
    """The status of a pass that may not work in the Customer's namespace and so ran no step: stalled
    for someone else's namespace, else waiting for one being deleted (Reconciling, the phase of a
    Customer whose release is not there) or for the API server to take a write it refused (Degraded
    once served: the instance runs on, its licence not renewed); the conditions of the steps as they were."""
    if refusal.permanent:
        status = stalled_status(previous, generation, refusal.reason, refusal.message, target.now)
        return status.model_copy(update={"customer_id": target.customer_id})
    return waiting_status(
        previous, target, refusal.reason, refusal.message, generation, runs_on=refusal.runs_on
    )


def waiting_status(
    previous: CustomerStatus,
    target: PassTarget,
    reason: str,
    message: str,
    generation: int,
    runs_on: bool = False,
    phase: Phase | None = None,
) -> CustomerStatus:
    """The status of a pass that waits, before any step, for what comes by itself (`reason`): Reconciling
    and Ready say so, the steps' conditions as they were. `runs_on`: an instance that served runs on
    meanwhile (Degraded). `phase`: the phase it waits in, when not the target's (a lapse it waits to
    learn is none)."""
    return previous.model_copy(
        update={
            "customer_id": target.customer_id,
            "phase": phase
            or phase_for(
                target.entitlement,
                None,
                None,
                previous.phase,
                stalled=False,
                retrying=runs_on,
                served=has_served(previous),
            ),
            "conditions": with_conditions(
                previous.conditions, waiting(reason, message), generation=generation, now=target.now
            ),
        }
    )


def answered_request(status: CustomerStatus, annotations: Mapping[str, str]) -> CustomerStatus:
    """The status with the reconcile request this pass answered (RECONCILE_REQUESTED_AT), so the
    person who asked sees that it ran, even when nothing else changed."""
    requested = annotations.get(RECONCILE_REQUESTED_AT)
    if not requested or handled_mark(requested) == status.last_handled_reconcile_at:
        return status
    return status.model_copy(update={"last_handled_reconcile_at": handled_mark(requested)})


def handled_mark(requested: str) -> str:
    """What status.lastHandledReconcileAt keeps of a reconcile request: its first 64 characters (the
    CRD's bound), so a longer annotation reads as answered once its pass ran."""
    return requested[:64]


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


def stall_of(status: CustomerStatus) -> tuple[str, str] | None:
    """Why the Customer is stalled (its Stalled condition's reason and message); None when it is not."""
    condition = status.condition(ConditionType.STALLED)
    if condition is None or condition.status != "True":
        return None
    return condition.reason, condition.message


# Stalls whose pass ends before a licence is minted: a spec or name refused, a licence that cannot be,
# a namespace that is someone else's.
_STALLED_BEFORE_LICENSE = frozenset({c.INVALID_SPEC, c.LICENSE_FAILED, c.NAMESPACE_TAKEN})


def housekeeping_due(
    spec: CustomerSpec,
    status: CustomerStatus,
    created_at: datetime,
    now: datetime,
    restricted_for: timedelta = RESTRICTED_FOR,
    generation: int | None = None,
) -> str | None:
    """Why the periodic check should run a pass now (a timer's whole cost when nothing is due).

    A `generation` (metadata.generation) past status.observedGeneration of a Customer whose last pass
    ended Ready or Stalled: a pass ends so with observedGeneration moved (next_status, stalled_status),
    and Kopf runs none when the spec came back to the one it last handled (a console Suspend and Git's
    revert while its worker was busy), which left kstatus readers (Flux's wait, Argo CD) seeing it in
    progress for days. Not while Ready is False and nothing stalls it: that pass leaves
    observedGeneration behind, and is retried or followed (PassRetries, the instance's watch) anyway.

    Otherwise nothing for a Customer stalled before its licence: that pass can neither renew it nor
    write the plan, so the reason stayed and a failing pass ran every minute; the spec's change runs one
    (or, for a namespace someone else's, its hand-over: namespace_freed)."""
    stall = stall_of(status)
    ready = status.condition(ConditionType.READY)
    if (
        generation is not None
        and generation > (status.observed_generation or 0)
        and (stall is not None or (ready is not None and ready.status == "True"))
    ):
        return c.GENERATION_NOT_OBSERVED
    if stall is not None and stall[0] in _STALLED_BEFORE_LICENSE:
        return None
    entitlement = effective_plan(spec, created_at, now, restricted_for)
    if status.plan is not None and status.plan != entitlement.plan:
        return entitlement.reason
    # A Customer no longer billed by Stripe has no dunning step, whatever a status not yet passed says.
    overdue = status.condition(ConditionType.PAYMENT_OVERDUE) if spec.billing.mode == "stripe" else None
    if overdue is not None and overdue.reason != (entitlement.payment_step or c.PAYMENTS_CURRENT):
        return entitlement.reason  # the dunning ladder's next step (a restricted licence keeps its plan)
    notifications = status.condition(ConditionType.NOTIFICATIONS_READY)
    if (
        notifications is not None
        and notifications.status == "False"
        and notifications.reason != c.INVALID_WEBHOOK_URL
        and (spec.notifications.webhook is not None or notifications.reason == c.NOTIFICATIONS_SECRET_REFUSED)
        and stall is None
    ):
        # The Secret it names may have been created since: a pass looks again (no watch sees it). Not
        # for a Stalled Customer: that pass ran helm again on the values that failed, every minute; nor
        # for a URL refused, which only a spec change (a pass of its own) mends: a pass each minute.
        # With the webhook removed, only while the copy of its key could not be deleted (refused): it
        # still signs, and nothing else looked again (the pass that found it so counted as a success).
        return notifications.reason
    license = status.license
    if license is None or license.issued_at is None or license.expires_at is None:
        return None
    if issued_ahead(license.issued_at, now) or (
        not capped_at_end(entitlement, license.expires_at)
        and renewal_due(license.expires_at, license.issued_at, now)
    ):
        return "LicenseRenewal"
    return None


def stalled_on_namespace(status: CustomerStatus) -> bool:
    """Whether the Customer is stalled because customer-<name> is someone else's (NamespaceTaken): the
    one stall the housekeeping reads the cluster for (namespace_freed), as no watch sees the namespace."""
    stall = stall_of(status)
    return stall is not None and stall[0] == c.NAMESPACE_TAKEN


def namespace_freed(namespace: Mapping[str, Any] | None, name: str, uid: str) -> str | None:
    """Why the namespace customer-<name> that stalled Customer `name` (uid `uid`) no longer does, so a
    pass is due: deleted (None), or handed over to it (manifests.namespace_holder); None while it is
    still someone else's."""
    if namespace is None:
        return "NamespaceGone"
    if namespace_holder(namespace, name, uid) == "this":
        return "NamespaceHandedOver"
    return None


__all__ = [
    "FOREIGN_CONDITIONS",
    "PassTarget",
    "answered_request",
    "chart_target",
    "handled_mark",
    "has_served",
    "housekeeping_due",
    "instance_domain",
    "namespace_freed",
    "namespace_refusal",
    "next_status",
    "over_current",
    "pass_target",
    "phase_for",
    "refused_status",
    "stall_of",
    "stalled_on_namespace",
    "stalled_status",
    "terminating_status",
    "waiting_status",
]
