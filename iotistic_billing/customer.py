"""The Customer resource (customers.iotistic.io/v1alpha1) as typed pydantic models, and its constants.

crds/customers.iotistic.io.yaml is the API; these models mirror it field for field (camelCase aliases,
the same defaults, enums, patterns and bounds), and tests/unit/test_crd_schema.py keeps the two in step.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, get_args, get_origin
from urllib.parse import urlsplit

import annotated_types
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

GROUP = "iotistic.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND: Final = "Customer"
PLURAL = "customers"
SINGULAR = "customer"
SHORT_NAMES = ("cust",)
CRD_NAME = f"{PLURAL}.{GROUP}"

# Set by the admin console (or a person) to ask for a pass now, as Flux's reconcile.fluxcd.io/requestedAt;
# a Stalled Customer is tried again too. Not under the operator's own `iotistic.io/` prefix: Kopf leaves
# the annotations of its storage prefix out of what it compares, so a change there would start no handler.
RECONCILE_REQUESTED_AT = "reconcile.iotistic.io/requested-at"
# The licence the last revoke revoked (its jti), written with spec.suspended: a revoke whose commit was
# lost is recorded by its retry for that licence, not for the unlicensed one minted since. Under Kopf's
# storage prefix: it starts no handler.
REVOKED_LICENSE = "iotistic.io/revoked-license"
# A Customer's namespace is this prefix and its name.
NAMESPACE_PREFIX = "customer-"
# Which operator shard owns the Customer (iotistic_billing/operator/sharding.py); none: shard 0.
SHARD_LABEL = "iotistic.io/shard"
# On what the operator writes for a Customer (its namespace and Secrets): whose they are, as a name
# alone cannot tell once a deleted Customer's name is taken again.
CUSTOMER_ID_LABEL = "iotistic.io/customer-id"

# The Secret the operator writes into the customer namespace and the chart reads.
LICENSE_SECRET_NAME = "iotistic-license"  # noqa: S105 (a Secret's name, not a password)
LICENSE_JWT_KEY = "license.jwt"
LICENSE_PUBLIC_KEY_KEY = "public-key.pem"
USAGE_API_KEY_KEY = "usage-api-key"
# The Secret the operator writes from spec.notifications.webhook.secretRef: the only other Secret of a
# customer namespace the webhook server may read (its notice sender signs the customer's webhooks with it).
NOTIFICATIONS_SECRET_NAME = "iotistic-notifications"  # noqa: S105 (a Secret's name, not a password)
NOTIFICATIONS_SECRET_KEY = "webhook-secret"  # noqa: S105
# In the billing namespace (BILLING_NAMESPACE): the signing secrets of deleted Customers, one key per
# customer id, kept while their webhook deliveries are pending (their namespaces are gone).
DELETED_NOTIFICATIONS_SECRET_NAME = "iotistic-notifications-deleted"  # noqa: S105
# On that Secret, while the deletion of the customer id's Customer runs (kept before its last notice is
# written): the notice sender does not drop a key so marked, though nothing of it is pending yet.
DELETION_RUNNING_PREFIX = "deleting.iotistic.io/"


def deletion_running_annotation(customer_id: str) -> str:
    """The annotation that marks `customer_id`'s kept signing secret as its deletion's, still running."""
    return f"{DELETION_RUNNING_PREFIX}{customer_id}"


def deletion_mark(name: str, uid: str) -> str:
    """That annotation's value: the deleting Customer, so that the notice sender lifts a mark whose
    Customer went without its deletion lifting it (a finalizer dropped by hand)."""
    return f"{name}/{uid}"


def marking_customer(mark: str) -> tuple[str, str] | None:
    """The name and uid a deletion mark names; None for one that names none ("true", as written before
    the value named the Customer: it is lifted by its deletion only)."""
    name, slash, uid = mark.partition("/")
    return (name, uid) if slash and name and uid else None


# On that Secret, once a deletion has written its last notice: the time (PostgreSQL's clock, as a notice's
# created_at) until which the customer id's notices are the deleted Customer's, signed with its key.
SIGNS_UNTIL_PREFIX = "signs-until.iotistic.io/"


def signs_until_annotation(customer_id: str) -> str:
    """The annotation with the time until which the key kept under `customer_id` signs its notices."""
    return f"{SIGNS_UNTIL_PREFIX}{customer_id}"


# The dunning ladder (docs/architecture.md, "Effective plan"): a failed payment keeps full access this
# long, then a restricted licence for DUNNING_RESTRICT_DAYS (a setting), then the unlicensed feature set.
PAST_DUE_GRACE = timedelta(days=7)
# DUNNING_RESTRICT_DAYS' default; the operator and the Stripe inbox pass the setting.
RESTRICTED_FOR: Final = timedelta(days=14)


@dataclass(frozen=True)
class DunningDates:
    """When an overdue payment's licence becomes restricted, and when it falls to the unlicensed feature
    set: the same moment when there is no restriction period (DUNNING_RESTRICT_DAYS=0)."""

    restricted_at: datetime
    suspended_at: datetime


def dunning_dates(since: datetime, restricted_for: timedelta) -> DunningDates:
    """The dunning ladder's dates from the first failed payment (`since`): PAST_DUE_GRACE of full access,
    then `restricted_for` restricted. The one rule for the licence (operator/entitlement.py) and the
    notices announcing it (notices/content.py)."""
    if restricted_for < timedelta(0):
        raise ValueError(f"restricted_for must not be negative, got {restricted_for}")
    restricted_at = since + PAST_DUE_GRACE
    return DunningDates(restricted_at=restricted_at, suspended_at=restricted_at + restricted_for)


DEFAULT_TRIAL_DAYS = 14
MAX_TRIAL_DAYS = 90

CUSTOMER_ID_PATTERN = r"^cust_[a-z0-9]{6,32}$"
# Whitespace beyond Go's \s spelled out: the API server's \s is [\t\n\f\r ], Python's and pydantic's are
# Unicode (each its own set), and an address with a pasted no-break space must be refused by all alike.
_UNICODE_SPACES = "\x0b\x1c-\x1f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_EMAIL_PART = r"[^@\s" + _UNICODE_SPACES + "]+"
EMAIL_PATTERN = rf"^{_EMAIL_PART}@{_EMAIL_PART}\.{_EMAIL_PART}$"
# A character that is no space (searched for, as the API server does): a name of spaces alone would pass
# the CRD and the model and then be refused by minting, which strips it, naming no field of the Customer.
BLANK_CHARACTERS = r"\s" + _UNICODE_SPACES
NOT_BLANK_PATTERN = f"[^{BLANK_CHARACTERS}]"
# The same rule for a request's text (the API's and the console's forms), which holds no NUL either:
# PostgreSQL text cannot.
NOT_BLANK_TEXT_PATTERN = rf"^[^\x00]*[^\x00{BLANK_CHARACTERS}][^\x00]*$"
# metadata.name: the operator's namespace is customer-<name>, and a namespace name is a DNS label.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 63 - len(NAMESPACE_PREFIX)
DNS_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRIPE_CUSTOMER_ID_PATTERN = r"^cus_[A-Za-z0-9]+$"
# The end of an RFC 3339 time: Z or an offset below 24 hours (the CRD's date-time format takes to +99:59).
UTC_OFFSET_PATTERN = r"([zZ]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
# http(s), then no control character and no space of any kind, spelt out: `\s` is one set in Go's
# regexp (the API server), another in ECMA-262 (the OpenAPI document's readers) and in Python; Go knows
# no `\u` escape, so the spaces beyond Latin-1 are the characters themselves.
URL_PATTERN = (
    r"^https?://[^\x00-\x20\x7f-\xa0" + "\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff" + "]+$"
)
STRIPE_SUBSCRIPTION_ID_PATTERN = r"^sub_[A-Za-z0-9]+$"
SHA256_HEX_PATTERN = r"^[a-f0-9]{64}$"
# The metav1.Condition patterns, as controller-gen writes them.
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

PlanName = Literal["trial", "starter", "professional", "enterprise"]
PaidPlanName = Literal["starter", "professional", "enterprise"]
# What status.plan reports: a plan, or the unlicensed feature set after a lapsed trial, a cancelled
# subscription or a suspension.
EffectivePlanName = Literal["trial", "starter", "professional", "enterprise", "unlicensed"]
BillingMode = Literal["manual", "stripe"]
SubscriptionStatus = Literal[
    "incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"
]
# A subscription that ended stays so: Stripe makes a new one rather than revive it, so a later event of
# it (the final usage invoice paid after the deletion, an open invoice paid after dunning canceled it)
# does not bring its plan back.
ENDED_STATUSES: Final = frozenset({"canceled", "incomplete_expired"})
# A subscription paid up or in Stripe's trial: it grants its plan in full, and a cancellation set for its
# period's end ends it then (Stripe deletes it itself; an unpaid or paused one only when cancelled now).
PAID_STATUSES: Final = frozenset({"active", "trialing"})

# Plan names; the plans themselves (features, limits, included usage) are licensing.plans.PLANS, whose
# names tests/unit/test_customer_model.py holds equal to these.
PLAN_NAMES: tuple[PlanName, ...] = get_args(PlanName)
PAID_PLAN_NAMES: tuple[PaidPlanName, ...] = get_args(PaidPlanName)


class Phase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    READY = "Ready"
    DEGRADED = "Degraded"
    SUSPENDED = "Suspended"
    EXPIRED = "Expired"
    TERMINATING = "Terminating"
    FAILED = "Failed"


# Ready's reasons while a step of the operator's fails and is retried (operator/constants.py has each):
# such a Customer gets an Event when one starts, and the console lists it among the failing. With the
# API server's refusals of the namespace's and the licence Secret's writes (an admission policy, RBAC).
RETRIED_FAILURE_REASONS: Final = frozenset(
    {"ChartPullFailed", "InstallFailed", "UpgradeFailed", "NamespaceRefused", "LicenseSecretRefused"}
)


class ConditionType(StrEnum):
    # kstatus conventions, read by Flux, Argo CD and `kubectl wait`.
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    LICENSE_ISSUED = "LicenseIssued"
    RELEASE_DEPLOYED = "ReleaseDeployed"
    TRIAL_ACTIVE = "TrialActive"
    SUBSCRIPTION_ACTIVE = "SubscriptionActive"
    WITHIN_LIMITS = "WithinLimits"
    NOTIFICATIONS_READY = "NotificationsReady"
    PAYMENT_OVERDUE = "PaymentOverdue"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


CustomerId = Annotated[str, Field(pattern=CUSTOMER_ID_PATTERN, max_length=37)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class CustomerModel(BaseModel):
    """camelCase on the wire (the CRD's names), snake_case in Python; unknown fields are an error."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_k8s(self) -> dict[str, Any]:
        """The JSON the API server stores: camelCase, RFC 3339 times, unset (None) fields left out.

        Left-out fields are not cleared by a merge patch; to remove one, patch it to null explicitly.
        """
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(CustomerModel):
    """A part of a status, which only this system's processes write: a field unknown here is ignored, not
    refused. A newer operator's field (its CRD stays: helm never downgrades CRDs) failed every pass of an
    operator rolled back below it; the status merge patch names only the fields it knows, so it stays
    (outside lists, which are written whole). A newer enum value is still refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# ----- spec -----


class BillingSpec(CustomerModel):
    mode: BillingMode = "manual"
    stripe_customer_id: Annotated[str, Field(pattern=STRIPE_CUSTOMER_ID_PATTERN, max_length=255)] | None = (
        None
    )


class TrialSpec(CustomerModel):
    """trial.endsAt, when set, takes precedence over trial.days (which the CRD always defaults)."""

    days: Annotated[int, Field(ge=0, le=MAX_TRIAL_DAYS)] = DEFAULT_TRIAL_DAYS
    # The parser refuses an offset of 24 hours or more; the CRD says so with this pattern.
    ends_at: Annotated[AwareDatetime, Field(json_schema_extra={"pattern": UTC_OFFSET_PATTERN})] | None = None

    def ends_at_for(self, created_at: datetime) -> datetime:
        """End of the trial of a Customer created at `created_at`."""
        if self.ends_at is not None:
            return self.ends_at
        return created_at + timedelta(days=self.days)


# A chart version as helm and OCI tags take it (SemVer 2, an optional leading v); INSTANCE_CHART_VERSION too.
CHART_VERSION_PATTERN = r"^v?[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.+-]+)?$"
CHART_VERSION_MAX_LENGTH = 64
# spec.instance.chartVersion, an InstanceRollout's spec.chartVersion (their CRDs say the same).
ChartVersion = Annotated[str, Field(max_length=CHART_VERSION_MAX_LENGTH, pattern=CHART_VERSION_PATTERN)]


def chart_version_problem(version: str) -> str | None:
    """Why `version` is no ChartVersion, worded to follow the name of the field that holds it (a field
    no model checks: the rollout's annotation on a Customer); None when it is one."""
    if len(version) > CHART_VERSION_MAX_LENGTH:
        return f"must be at most {CHART_VERSION_MAX_LENGTH} characters long, got {len(version)}"
    if not re.fullmatch(CHART_VERSION_PATTERN, version):
        return f"must match {CHART_VERSION_PATTERN}, got {version!r}"
    return None


# Where a Customer's chart version comes from: its spec (pinned), a rollout's annotation, the fleet.
VersionSource = Literal["Pinned", "Rollout", "Fleet"]


class InstanceSpec(CustomerModel):
    enabled: bool = True
    domain: Annotated[str, Field(pattern=DNS_NAME_PATTERN, max_length=253)] | None = None
    chart_version: ChartVersion | None = None
    # Free-form Helm values overrides; the chart's values.schema.json judges them.
    values: dict[str, Any] | None = None


# A Secret's name and a key of its data, as Kubernetes validates them.
SECRET_NAME_PATTERN = DNS_NAME_PATTERN
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 (a pattern of data keys)
# The quotas of a plan (licensing.plans.IncludedUsage) a threshold can watch.
UsageMetric = Literal["devices", "trafficGb", "storageGb", "apiCalls"]
USAGE_METRICS: tuple[UsageMetric, ...] = get_args(UsageMetric)


class SecretKeyRef(CustomerModel):
    name: Annotated[str, Field(pattern=SECRET_NAME_PATTERN, max_length=253)]
    key: Annotated[str, Field(pattern=SECRET_KEY_PATTERN, max_length=253)] = "secret"


class NotificationWebhook(CustomerModel):
    url: Annotated[str, Field(pattern=URL_PATTERN, max_length=2048)]
    secret_ref: SecretKeyRef


class UsageThreshold(CustomerModel):
    metric: UsageMetric
    value: Annotated[int, Field(ge=1)]


class NotificationsSpec(CustomerModel):
    emails: (
        Annotated[list[Annotated[str, Field(pattern=EMAIL_PATTERN, max_length=320)]], Field(max_length=10)]
        | None
    ) = None
    webhook: NotificationWebhook | None = None
    usage_thresholds: Annotated[list[UsageThreshold], Field(max_length=20)] | None = None


class SubscriptionSpec(CustomerModel):
    """Written only by the webhook server (field manager `iotistic-webhooks`), never by GitOps."""

    # A field a newer webhook server writes (its CRD applied first) is ignored, not refused: refused, an
    # older replica of a rolling upgrade (or after a rollback) would read the Customer as none at all and
    # record its Stripe events unmatched.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    status: SubscriptionStatus
    plan: PaidPlanName | None = None
    stripe_subscription_id: (
        Annotated[str, Field(pattern=STRIPE_SUBSCRIPTION_ID_PATTERN, max_length=255)] | None
    ) = None
    # Stripe's current period, [start, end): the period usage is billed in (usage.periods). The start
    # is kept only beside the end it came with; Customers written before it have the end alone.
    current_period_start: AwareDatetime | None = None
    current_period_end: AwareDatetime | None = None
    cancel_at_period_end: bool | None = None
    # Stripe's ended_at, once it ended the subscription (canceled, incomplete_expired): cancelled
    # immediately (ours, or dunning's "cancel after all retries fail") it ends inside its period, and the
    # usage period is cut there (usage.service.customer_period).
    ended_at: AwareDatetime | None = None
    # When the payment first failed (the event's time), while the status is past_due or unpaid: the
    # dunning ladder counts from it. Kept when the subscription is canceled so, until that payment is made.
    past_due_since: AwareDatetime | None = None
    # `created` (Unix seconds) of the last Stripe event applied: older events never overwrite newer state.
    last_event_created: NonNegativeInt | None = None

    def ended_at_period_end(self, at: datetime) -> bool:
        """Whether it was set to cancel at its period's end and that end has come by `at`: ended, whenever
        Stripe's deletion is applied (its retries take days while the webhook server is down). On the
        whole second, as a trial ends: the licence capped at the period's end is whole seconds, and one
        judged live in the second's last fraction would end before it was issued."""
        end = self.current_period_end
        return bool(self.cancel_at_period_end) and end is not None and end.replace(microsecond=0) <= at

    def ended_by(self, at: datetime) -> datetime | None:
        """When it ended, if Stripe ended it by `at` (its endedAt); None while it is live, or for an
        ending recorded without that time."""
        if self.status not in ENDED_STATUSES or self.ended_at is None:
            return None
        return self.ended_at if self.ended_at <= at else None

    def grace_started(self, now: datetime) -> datetime:
        """Where a past_due subscription's grace (PAST_DUE_GRACE, then the restricted licence) counts
        from: the first failed payment; a subscription written before pastDueSince, its period's end."""
        return self.past_due_since or self.current_period_end or now


class CustomerSpec(CustomerModel):
    customer_id: CustomerId | None = None
    email: Annotated[str, Field(pattern=EMAIL_PATTERN, max_length=320)]
    company_name: Annotated[str, Field(min_length=1, max_length=200, pattern=NOT_BLANK_PATTERN)]
    contact_name: Annotated[str, Field(max_length=200)] | None = None
    plan: PlanName = "trial"
    billing: BillingSpec = Field(default_factory=BillingSpec)
    trial: TrialSpec = Field(default_factory=TrialSpec)
    instance: InstanceSpec = Field(default_factory=InstanceSpec)
    suspended: bool = False
    notifications: NotificationsSpec = Field(default_factory=NotificationsSpec)
    subscription: SubscriptionSpec | None = None


# ----- status -----


class TrialStatus(StatusModel):
    is_trial_mode: bool | None = None
    ends_at: AwareDatetime | None = None


class LicenseStatus(StatusModel):
    secret_name: Annotated[str, Field(max_length=253)] | None = None
    jti: Annotated[str, Field(max_length=128)] | None = None
    key_id: Annotated[str, Field(max_length=128)] | None = None
    issued_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    sha256: Annotated[str, Field(pattern=SHA256_HEX_PATTERN)] | None = None


class ReleaseStatus(StatusModel):
    name: Annotated[str, Field(max_length=53)] | None = None
    namespace: Annotated[str, Field(max_length=63)] | None = None
    revision: NonNegativeInt | None = None
    chart_version: Annotated[str, Field(max_length=64)] | None = None
    values_hash: Annotated[str, Field(max_length=128)] | None = None
    # The Deployments helm rendered for the revision: readiness waits for each, a missing one is put back.
    deployments: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=64)] | None = None
    # The version the last pass aimed at, and where it came from (docs/architecture.md, "Fleet rollouts").
    target_version: Annotated[str, Field(max_length=64)] | None = None
    version_source: VersionSource | None = None
    # The rollout.iotistic.io/updated-at the pass aimed by (versionSource Rollout only): a rollout counts
    # a Customer's return only from a pass that read the annotation it set (rollout_plan.member).
    rollout_updated_at: Annotated[str, Field(max_length=64)] | None = None


class InstanceStatus(StatusModel):
    namespace: Annotated[str, Field(max_length=63)] | None = None
    url: Annotated[str, Field(max_length=2048)] | None = None


class UsageStatus(StatusModel):
    period_start: AwareDatetime | None = None
    active_devices: NonNegativeInt | None = None
    last_report_at: AwareDatetime | None = None


class Condition(StatusModel):
    """metav1.Condition."""

    type: Annotated[str, Field(max_length=316, pattern=CONDITION_TYPE_PATTERN)]
    status: ConditionStatus
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=CONDITION_REASON_PATTERN)]
    message: Annotated[str, Field(max_length=32768)]
    last_transition_time: AwareDatetime
    observed_generation: NonNegativeInt | None = None


class CustomerStatus(StatusModel):
    customer_id: CustomerId | None = None
    phase: Phase | None = None
    plan: EffectivePlanName | None = None
    observed_generation: NonNegativeInt | None = None
    # The RECONCILE_REQUESTED_AT value the last pass answered (Flux's lastHandledReconcileAt).
    last_handled_reconcile_at: Annotated[str, Field(max_length=64)] | None = None
    trial: TrialStatus | None = None
    license: LicenseStatus | None = None
    release: ReleaseStatus | None = None
    instance: InstanceStatus | None = None
    usage: UsageStatus | None = None
    # None, not []: an empty list in a merge patch would wipe the conditions already there.
    conditions: Annotated[list[Condition], Field(max_length=32)] | None = None
    # Kopf's bookkeeping, when it keeps it in status rather than in annotations; opaque to us.
    kopf: dict[str, Any] | None = None

    def condition(self, type_: str) -> Condition | None:
        return find_condition(self.conditions or (), type_)


# ----- the whole object -----


class CustomerMetadata(BaseModel):
    """The parts of ObjectMeta the operator reads; the rest of metadata is ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: str
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: AwareDatetime | None = None
    deletion_timestamp: AwareDatetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)


class Customer(CustomerModel):
    """A Customer as the API server returns it (for example Kopf's `body`)."""

    api_version: Literal["iotistic.io/v1alpha1"] = "iotistic.io/v1alpha1"
    kind: Literal["Customer"] = "Customer"
    metadata: CustomerMetadata
    spec: CustomerSpec
    status: CustomerStatus = Field(default_factory=CustomerStatus)


# ----- as people are shown it (the console, the CLI) -----


def shown_phase(phase: str | None) -> str:
    """A Customer's phase as the console and `customer list` show it: Pending until the operator's first
    pass reports one."""
    return str(phase or Phase.PENDING)


# Field managers of people and of this system: any other manager of spec fields is a GitOps controller
# (Flux's kustomize-controller and helm-controller, Argo CD's application controller, ...).
OWN_MANAGERS: Final = frozenset(
    {
        "kubectl",
        "kubectl-client-side-apply",
        "kubectl-create",
        "kubectl-edit",
        "kubectl-patch",
        "kubectl-label",
        "kubectl-annotate",
        "iotistic-console",
        "iotistic-billing-api",
        "iotistic-billing-cli",
        "iotistic-webhooks",
        "iotistic-operator",
        "iotistic-usage",
        "OpenAPI-Generator",
    }
)
# kubectl's client-side apply (Argo CD's by default) keeps what it applied here and diffs against it.
LAST_APPLIED: Final = "kubectl.kubernetes.io/last-applied-configuration"
GITOPS_LABELS: Final = (
    "kustomize.toolkit.fluxcd.io/name",
    "helm.toolkit.fluxcd.io/name",
    "argocd.argoproj.io/instance",
)


def gitops_manager(body: Mapping[str, Any], field: str | None = None) -> str | None:
    """The controller that owns the Customer's spec when Git does (Git would revert a spec action).

    With `field` (a spec field: `suspended`, `plan`), only when Git owns that field: Flux's server-side
    apply and Argo CD's diff put back the fields Git sets, not the others, so a Customer whose Git
    manifest leaves spec.suspended out keeps a suspension made by hand. Told by the managedFields of the
    controller (Flux's and Argo CD's server-side apply own what Git sets), or by kubectl's
    last-applied-configuration (Argo CD's client-side apply diffs on it); a GitOps label with neither
    (managedFields not read) cannot say which fields, and is taken to own them all."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    label = next((f"{name}={labels[name]}" for name in GITOPS_LABELS if name in labels), None)
    controllers = [
        (str(entry.get("manager", "")), (entry.get("fieldsV1") or {})["f:spec"] or {})
        for entry in meta.get("managedFields") or []
        if "f:spec" in (entry.get("fieldsV1") or {}) and _gitops_controller(str(entry.get("manager", "")))
    ]
    if field is None:
        return label or next((manager for manager, _ in controllers), None)
    owner = next((manager for manager, spec in controllers if f"f:{field}" in spec), None)
    if owner is not None:
        return owner
    applied = _last_applied_spec(meta)
    if (label or controllers) and applied is not None and field in applied:
        return label or controllers[0][0]
    return None if controllers or applied is not None else label


def _gitops_controller(manager: str) -> bool:
    return manager not in OWN_MANAGERS and not manager.startswith("kubectl")


def _last_applied_spec(meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The spec of kubectl's (and Argo CD's client-side) last apply, if the annotation holds one."""
    text = (meta.get("annotations") or {}).get(LAST_APPLIED)
    try:
        spec = json.loads(text).get("spec") if text else None
    except (ValueError, AttributeError):
        return None
    return spec if isinstance(spec, Mapping) else None


def git_reverts(body: Mapping[str, Any], field: str) -> str | None:
    """The warning for a change of spec.`field` made outside Git (the console, the CLI, the admin API)
    on a Customer whose Git owns that field (gitops_manager): Flux or Argo CD puts it back within
    seconds, and the operator follows. None when Git does not own it."""
    if (manager := gitops_manager(body, field)) is None:
        return None
    name = (body.get("metadata") or {}).get("name", "")
    return (
        f"customer/{name}'s spec is managed by GitOps ({manager}): Git reverts this change of"
        f" spec.{field}; change it in Git"
    )


def unpinned_customer_id(body: Mapping[str, Any]) -> str | None:
    """Why a Customer that Git manages should pin spec.customerId; None when it does, or nothing manages
    it. Without it the id is derived from the object's uid: deleted and made again from Git (a cluster
    rebuilt, a tool's delete and create), the Customer is a new customer id, and the Stripe subscription,
    licence history and trial of the old one are not found again (Stripe keeps billing the old one)."""
    manager = gitops_manager(body)
    if manager is None or (body.get("spec") or {}).get("customerId"):
        return None
    name = (body.get("metadata") or {}).get("name", "")
    return (
        f"spec.customerId is not set and {manager} manages this Customer: made again from Git it would"
        f" get a new customer id and lose its Stripe subscription, licence history and trial; write its"
        f" id ({customer_id_in_use(body)}) into the manifest in Git as spec.customerId"
        f" (kubectl get customer {name} -o jsonpath='{{.status.customerId}}')"
    )


# ----- identity -----


def namespace_for(name: str) -> str:
    return NAMESPACE_PREFIX + name


# A name made from a company name: room for a suffix within MAX_NAME_LENGTH.
_MAX_SLUG: Final = 40


def resource_name_for(company_name: str, suffix: str = "") -> str:
    """A DNS-safe Customer name from the company name (signup and `customer add`): `Acme Corp.` ->
    `acme-corp`, `Müller GmbH` -> `muller-gmbh`; `customer` when nothing of it is Latin."""
    ascii_name = unicodedata.normalize("NFKD", company_name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:_MAX_SLUG].strip("-") or "customer"
    return f"{slug}-{suffix}" if suffix else slug


def customer_of_namespace(namespace: str | None) -> str | None:
    """The Customer whose namespace this is, if it is one."""
    if namespace and namespace.startswith(NAMESPACE_PREFIX):
        return namespace[len(NAMESPACE_PREFIX) :]
    return None


def derived_customer_id(uid: str) -> str:
    """A stable id for a Customer without spec.customerId: it never changes for the object."""
    return "cust_" + hashlib.sha256(uid.encode()).hexdigest()[:16]


def customer_id_in_use(body: Mapping[str, Any]) -> str:
    """The customer id a Customer goes by: spec.customerId, else the one the operator reported, else
    the one derived from its uid. Read from the raw object, so that a Customer whose spec no longer
    validates can still be found and deleted."""
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    return str(
        spec.get("customerId")
        or status.get("customerId")
        or derived_customer_id(str(meta.get("uid") or meta.get("name", "")))
    )


# ----- conditions -----


def find_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((condition for condition in conditions if condition.type == type_), None)


def set_condition(
    conditions: Sequence[Condition] | None,
    *,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: datetime,
) -> list[Condition]:
    """The conditions with `type_` set; lastTransitionTime moves only when the status changes."""
    existing = list(conditions or ())
    previous = find_condition(existing, type_)
    transition_time = (
        previous.last_transition_time
        if previous is not None and previous.status == status
        else now.replace(microsecond=0)
    )
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:32768],
        last_transition_time=transition_time,
        observed_generation=observed_generation,
    )
    if previous is None:
        return [*existing, updated]
    return [updated if condition.type == type_ else condition for condition in existing]


# ----- validation errors that name the field -----


class InvalidSpecError(ValueError):
    """A Customer spec that the models refuse; `problems` names each field and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_spec(spec: Mapping[str, Any]) -> CustomerSpec:
    """`spec` as a CustomerSpec, or InvalidSpecError with messages such as
    `spec.trial.days must be between 0 and 90, got 120`."""
    try:
        return CustomerSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpecError(list(describe_errors(exc, CustomerSpec, prefix="spec"))) from None


def name_errors(name: str) -> list[str]:
    """Why `name` cannot name a Customer (its namespace would be refused); empty when it can."""
    if len(name) > MAX_NAME_LENGTH:
        return [f"metadata.name must be at most {MAX_NAME_LENGTH} characters long, got {len(name)}"]
    if not re.fullmatch(NAME_PATTERN, name):
        return [
            "metadata.name must be lowercase letters, digits and '-', starting and ending with a letter"
            f" or digit (the namespace customer-<name> is a DNS label), got {name!r}"
        ]
    return []


def webhook_url_problem(url: str) -> str | None:
    """Why no webhook could ever be posted to `url` although URL_PATTERN takes it (a host name the
    resolver cannot encode: an empty label, a label over 63 characters; no host; a bad port); None
    when one could. Not part of the model: a bad webhook must not stop the Customer's licence."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading it checks it)
    except ValueError as error:
        return f"is not a URL ({error})"
    if not parts.hostname:
        return "has no host"
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        return (
            f"host {parts.hostname!r} is not a valid host name (an empty label, or a label longer than "
            "63 characters)"
        )
    return None


def spec_errors(spec: Mapping[str, Any]) -> list[str]:
    """Why `spec` is not a valid Customer spec, one message per problem; empty when it is valid."""
    try:
        parse_spec(spec)
    except InvalidSpecError as exc:
        return exc.problems
    return []


def describe_errors(exc: ValidationError, model: type[BaseModel], *, prefix: str) -> Iterator[str]:
    for error in exc.errors():
        yield _describe_error(error, model, prefix)


def pattern_rule(pattern: object) -> str | None:
    """What a pattern of text a person writes asks, in words (`must not be blank`), for an error naming
    its field: a Customer's (describe_errors) and a request's (errors.ValidationFailed); None for
    another, whose pattern is the message."""
    if pattern == EMAIL_PATTERN:
        return "must be an email address (name@domain.tld, no spaces)"
    if pattern in (NOT_BLANK_PATTERN, NOT_BLANK_TEXT_PATTERN):
        return "must not be blank"
    return None


def _describe_error(error: ErrorDetails, model: type[BaseModel], prefix: str) -> str:
    path = ".".join([prefix, *(_path_part(part) for part in error["loc"])]).replace(".[", "[")
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "missing":
        return f"{path} is required"
    if kind == "extra_forbidden":
        return f"{path} is not a field of the Customer resource"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low, high = _bounds(model, error["loc"])
        if low is not None and high is not None:
            return f"{path} must be between {low} and {high}, got {got!r}"
        bound = ctx.get("ge", ctx.get("gt", ctx.get("le", ctx.get("lt"))))
        relation = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<="}.get(kind, "<")
        return f"{path} must be {relation} {bound}, got {got!r}"
    if kind == "literal_error":
        return f"{path} must be one of {ctx.get('expected', '')}, got {got!r}"
    if kind == "enum":
        return f"{path} must be one of {ctx.get('expected', '')}, got {got!r}"
    if kind == "string_pattern_mismatch" and (rule := pattern_rule(ctx.get("pattern"))) is not None:
        return f"{path} {rule}, got {got!r}"
    if kind == "string_pattern_mismatch":
        return f"{path} must match {ctx.get('pattern')}, got {got!r}"
    if kind == "string_too_long":
        return f"{path} must be at most {ctx.get('max_length')} characters long, got {len(str(got))}"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return f"{path} must not be empty"
    if kind == "string_too_short":
        return f"{path} must be at least {ctx.get('min_length')} characters long, got {got!r}"
    if kind == "too_long":
        return f"{path} must have at most {ctx.get('max_length')} items"
    return f"{path}: {error['msg'].lower()}, got {got!r}"


def _path_part(part: int | str) -> str:
    return f"[{part}]" if isinstance(part, int) else part


def _bounds(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[Any, Any]:
    """The numeric bounds (ge, le) declared on the field at `loc` (aliases and list indexes)."""
    current: Any = model
    metadata: list[Any] = []
    for part in loc:
        current, metadata = _unwrap(current)
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None, None
        field = next(
            (f for name, f in current.model_fields.items() if part in (name, f.alias)),
            None,
        )
        if field is None:
            return None, None
        current, metadata = field.annotation, list(field.metadata)
    _, inner_metadata = _unwrap(current)
    metadata = [*metadata, *inner_metadata]
    low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    return low, high


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """Strip Optional, list[...] and Annotated, keeping the Annotated constraints."""
    metadata: list[Any] = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                metadata.extend(getattr(item, "metadata", [item]))
            continue
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if get_origin(annotation) in (list, tuple) or (len(args) == 1 and args != list(get_args(annotation))):
            annotation = args[0]
            continue
        return annotation, metadata
