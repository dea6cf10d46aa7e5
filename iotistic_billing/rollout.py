"""The InstanceRollout resource: a new customer-instance chart version taken to a set of Customers in
steps, gated on their health (crds/instancerollouts.iotistic.io.yaml, which this module mirrors;
docs/architecture.md, "Fleet rollouts").

A rollout never writes a Customer's spec (Git owns it): it records the version a Customer should run in
the Customer's ROLLOUT_* annotations, by server-side apply under its own field manager, and the operator
installs that version and reports it as status.release.chartVersion and status.release.targetVersion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, Field, NonNegativeInt, model_validator

from iotistic_billing.customer import (
    GROUP,
    NAME_PATTERN,
    VERSION,
    ChartVersion,
    Condition,
    CustomerModel,
    PlanName,
    StatusModel,
    find_condition,
)

ROLLOUT_KIND: Final = "InstanceRollout"
ROLLOUT_PLURAL = "instancerollouts"
ROLLOUT_CRD_NAME = f"{ROLLOUT_PLURAL}.{GROUP}"
ROLLOUT_RESOURCE = (GROUP, VERSION, ROLLOUT_PLURAL)

# A Customer's chart version as the rollouts set it, and what it had before (rollback returns to it).
ROLLOUT_CHART_VERSION = "rollout.iotistic.io/chart-version"
ROLLOUT_PREVIOUS_VERSION = "rollout.iotistic.io/previous-chart-version"
ROLLOUT_NAME = "rollout.iotistic.io/rollout"
ROLLOUT_UPDATED_AT = "rollout.iotistic.io/updated-at"
# On an InstanceRollout: stop it for good where it is (the console's Abort, or kubectl annotate).
ROLLOUT_ABORT = "rollout.iotistic.io/abort"
# status.failures lists this many failed Customers at most (the object's size); status.failed counts on.
MAX_LISTED_FAILURES = 100


class RolloutPhase(StrEnum):
    PENDING = "Pending"
    WAITING = "Waiting"  # another active rollout selects some of the same Customers
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    ROLLING_BACK = "RollingBack"
    SUCCEEDED = "Succeeded"
    HALTED = "Halted"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"


TERMINAL_PHASES = frozenset(
    {RolloutPhase.SUCCEEDED, RolloutPhase.HALTED, RolloutPhase.ROLLED_BACK, RolloutPhase.ABORTED}
)


class SelectorRequirement(CustomerModel):
    key: Annotated[str, Field(min_length=1, max_length=317)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64)] | None = None


class LabelSelector(CustomerModel):
    """metav1.LabelSelector."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = None
    match_expressions: Annotated[list[SelectorRequirement], Field(max_length=32)] | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(key) != value for key, value in (self.match_labels or {}).items()):
            return False
        for requirement in self.match_expressions or ():
            present, value = requirement.key in labels, labels.get(requirement.key)
            wanted = requirement.values or []
            if requirement.operator == "In" and not (present and value in wanted):
                return False
            if requirement.operator == "NotIn" and present and value in wanted:
                return False
            if requirement.operator == "Exists" and not present:
                return False
            if requirement.operator == "DoesNotExist" and present:
                return False
        return True


class RolloutStep(CustomerModel):
    """Exactly one of `customers`, `percent`, `rest` says who the step takes."""

    customers: (
        Annotated[
            list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]],
            Field(min_length=1, max_length=100),
        ]
        | None
    ) = None
    percent: Annotated[int, Field(ge=1, le=100)] | None = None
    rest: bool | None = None
    max_parallel: Annotated[int, Field(ge=1, le=1000)] = 5
    bake_seconds: Annotated[int, Field(ge=0, le=86400)] = 0

    @model_validator(mode="after")
    def _one_kind(self) -> RolloutStep:
        if sum((self.customers is not None, self.percent is not None, bool(self.rest))) != 1:
            raise ValueError("a step names exactly one of customers, percent, rest")
        return self


class HealthGate(CustomerModel):
    timeout_seconds: Annotated[int, Field(ge=1, le=86400)] = 600
    max_failures: Annotated[int, Field(ge=1, le=1000)] = 1


class RolloutSpec(CustomerModel):
    chart_version: ChartVersion
    selector: LabelSelector | None = None
    plans: Annotated[list[PlanName], Field(min_length=1, max_length=4)] | None = None
    steps: Annotated[list[RolloutStep], Field(min_length=1, max_length=20)]
    health_gate: HealthGate = Field(default_factory=HealthGate)
    paused: bool = False
    on_failure: Literal["halt", "rollback"] = "halt"


class StepStatus(StatusModel):
    selected: NonNegativeInt | None = None
    updated: NonNegativeInt | None = None
    healthy: NonNegativeInt | None = None
    # Failed while the step ran (listed or not: the count is not capped).
    failed: NonNegativeInt | None = None
    started_at: AwareDatetime | None = None
    # The first tick (the operator's clock) that found none of the step's Customers left to move: those
    # this run moved until then are the ones its bake waits for; those moved since (signups) are judged.
    all_moved_at: AwareDatetime | None = None
    # When the Customers the bake waits for (and any left over from the steps before) were first healthy,
    # or failed below healthGate.maxFailures: the bake starts.
    healthy_at: AwareDatetime | None = None
    # When its bake was over (healthyAt plus bakeSeconds as they were then), written as the step ends:
    # the Customers it moved after it, the next step judges (rollout_plan._Tick._carried); from the
    # spec as it is now, a bakeSeconds raised since put the end after the step's and carried nobody.
    baked_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None


class RolloutFailure(StatusModel):
    customer: Annotated[str, Field(max_length=63)]
    step: Annotated[int, Field(ge=1)]
    reason: Annotated[str, Field(max_length=128)]
    message: Annotated[str, Field(max_length=1024)]
    # The version the Customer had before (what a rollback returns it to); None: none recorded.
    previous_version: Annotated[str, Field(max_length=64)] | None = None


class RolloutStatus(StatusModel):
    phase: RolloutPhase | None = None
    observed_generation: NonNegativeInt | None = None
    target_version: Annotated[str, Field(max_length=64)] | None = None
    # 1-based, as STEP shows it; the number of steps once finished.
    current_step: NonNegativeInt | None = None
    selected: NonNegativeInt | None = None
    updated: NonNegativeInt | None = None
    healthy: NonNegativeInt | None = None
    failed: NonNegativeInt | None = None
    steps: Annotated[list[StepStatus], Field(max_length=20)] | None = None
    failures: Annotated[list[RolloutFailure], Field(max_length=MAX_LISTED_FAILURES)] | None = None
    started_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None
    conditions: Annotated[list[Condition], Field(max_length=8)] | None = None

    def condition(self, type_: str) -> Condition | None:
        return find_condition(self.conditions or (), type_)


def selects(spec: RolloutSpec, customer: Mapping[str, Any]) -> bool:
    """Whether the rollout takes this Customer: its labels and plan match and it is not pinned
    (spec.instance.chartVersion: a rollout never touches a pinned Customer) nor being deleted.

    The plan is the effective one the operator reports (status.plan), as `kubectl get cust` shows it:
    spec.plan is the plan of manual billing only (a Stripe-billed professional Customer has the
    default, trial, there). Before the operator's first report, spec.plan."""
    meta = customer.get("metadata") or {}
    body_spec = customer.get("spec") or {}
    if meta.get("deletionTimestamp") or (body_spec.get("instance") or {}).get("chartVersion"):
        return False
    plan = (customer.get("status") or {}).get("plan") or body_spec.get("plan", "trial")
    if spec.plans is not None and plan not in spec.plans:
        return False
    return spec.selector is None or spec.selector.matches(meta.get("labels") or {})


def settled_version(rollouts: Sequence[Mapping[str, Any]], customer: Mapping[str, Any]) -> str | None:
    """The version the fleet has settled on for `customer`: the newest Succeeded rollout that selects
    it and left a Customer healthy on its version; None when none has (the operator's
    INSTANCE_CHART_VERSION then)."""
    best: tuple[datetime, str] | None = None
    for body in rollouts:
        try:
            spec = RolloutSpec.model_validate(body.get("spec") or {})
            status = RolloutStatus.model_validate(body.get("status") or {})
        except ValueError:
            continue
        if status.phase != RolloutPhase.SUCCEEDED or status.completed_at is None:
            continue
        if not status.healthy:
            # It selected nobody (a selector no Customer matches, a mistyped chartVersion never pushed)
            # or every one failed: no health gate saw the version run, new Customers must not start on it.
            continue
        newer = best is None or status.completed_at > best[0]
        if newer and status.target_version == spec.chart_version and selects(spec, customer):
            best = (status.completed_at, spec.chart_version)
    return best[1] if best else None


__all__ = [
    "MAX_LISTED_FAILURES",
    "ROLLOUT_ABORT",
    "ROLLOUT_CHART_VERSION",
    "ROLLOUT_CRD_NAME",
    "ROLLOUT_KIND",
    "ROLLOUT_NAME",
    "ROLLOUT_PLURAL",
    "ROLLOUT_PREVIOUS_VERSION",
    "ROLLOUT_RESOURCE",
    "ROLLOUT_UPDATED_AT",
    "TERMINAL_PHASES",
    "HealthGate",
    "LabelSelector",
    "RolloutFailure",
    "RolloutPhase",
    "RolloutSpec",
    "RolloutStatus",
    "RolloutStep",
    "StepStatus",
    "selects",
    "settled_version",
]
