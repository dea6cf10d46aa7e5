"""The operator's pure decisions: effective plan, licence action, health, phase, conditions, values."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest

from iotistic_billing.customer import (
    LICENSE_JWT_KEY,
    LICENSE_SECRET_NAME,
    RECONCILE_REQUESTED_AT,
    USAGE_API_KEY_KEY,
    ConditionType,
    Customer,
    CustomerSpec,
    CustomerStatus,
    LicenseStatus,
    ReleaseStatus,
    VersionSource,
    customer_id_in_use,
    derived_customer_id,
)
from iotistic_billing.k8s import SecretData
from iotistic_billing.licensing.keys import SigningKeys, generate_private_key
from iotistic_billing.licensing.minting import LicenseRecord
from iotistic_billing.notices.content import Notice, NoticeKind
from iotistic_billing.operator import constants as c
from iotistic_billing.operator import license as license_step
from iotistic_billing.operator.conditions import (
    ConditionValue,
    NoCondition,
    subscription_condition,
    with_conditions,
)
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.deployments import DeploymentState, instance_health
from iotistic_billing.operator.entitlement import Entitlement, effective_plan, license_action
from iotistic_billing.operator.license import (
    desired_claims,
    ensure_license,
    license_notice,
    needs_new_license,
    previous_suspended,
)
from iotistic_billing.operator.manifests import license_secret_manifest
from iotistic_billing.operator.outcomes import (
    InstanceHealth,
    NamespaceRefused,
    NotificationsOutcome,
    PassOutcome,
    ReleaseOutcome,
)
from iotistic_billing.operator.reconcile import PassResult, merge_patch
from iotistic_billing.operator.state import (
    PassTarget,
    answered_request,
    housekeeping_due,
    namespace_freed,
    next_status,
    pass_target,
    refused_status,
    stall_of,
    stalled_on_namespace,
    stalled_status,
    terminating_status,
)
from iotistic_billing.operator.values import (
    OPERATOR_ENV_NAMES,
    accepted_by_schema,
    desired_release_values,
    operator_env_name,
    refused_env,
    values_hash,
)
from iotistic_billing.rollout import ROLLOUT_CHART_VERSION, ROLLOUT_UPDATED_AT
from iotistic_billing.settings import Settings

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
CREATED = NOW - timedelta(days=3)


def spec(**fields: Any) -> CustomerSpec:
    return CustomerSpec.model_validate({"email": "ops@acme.example", "companyName": "Acme", **fields})


def subscription(
    status: str, plan: str = "professional", period_end: datetime = NOW + timedelta(days=20)
) -> dict[str, Any]:
    return {"status": status, "plan": plan, "currentPeriodEnd": period_end.isoformat()}


@pytest.mark.parametrize(
    ("fields", "plan", "reason"),
    [
        ({}, "trial", "TrialActive"),
        ({"trial": {"days": 2}}, "unlicensed", "TrialExpired"),
        ({"trial": {"endsAt": "2026-01-01T00:00:00Z"}}, "unlicensed", "TrialExpired"),
        ({"plan": "starter"}, "starter", "ManualBilling"),
        ({"plan": "enterprise", "suspended": True}, "unlicensed", "Suspended"),
        ({"billing": {"mode": "stripe"}, "plan": "enterprise"}, "trial", "TrialActive"),
        (
            {"billing": {"mode": "stripe"}, "subscription": subscription("active")},
            "professional",
            "SubscriptionActive",
        ),
        (
            {"billing": {"mode": "stripe"}, "subscription": subscription("trialing")},
            "professional",
            "SubscriptionActive",
        ),
        (
            {"billing": {"mode": "stripe"}, "subscription": subscription("past_due")},
            "professional",
            "SubscriptionPastDue",
        ),
        (
            {
                "billing": {"mode": "stripe"},
                "subscription": subscription("past_due", period_end=NOW - timedelta(days=8)),
            },
            "professional",
            "SubscriptionRestricted",
        ),
        # The first payment failed (incomplete), and 23 h later Stripe expired it: the trial goes on.
        ({"billing": {"mode": "stripe"}, "subscription": subscription("incomplete")}, "trial", "TrialActive"),
        (
            {"billing": {"mode": "stripe"}, "subscription": subscription("incomplete_expired")},
            "trial",
            "TrialActive",
        ),
        (
            {"billing": {"mode": "stripe"}, "subscription": subscription("canceled")},
            "unlicensed",
            "SubscriptionLapsed",
        ),
        (
            {"billing": {"mode": "stripe"}, "subscription": subscription("unpaid")},
            "unlicensed",
            "SubscriptionLapsed",
        ),
    ],
)
def test_effective_plan(fields: dict[str, Any], plan: str, reason: str) -> None:
    entitlement = effective_plan(spec(**fields), CREATED, NOW)
    assert (entitlement.plan, entitlement.reason) == (plan, reason)
    assert entitlement.lapsed == (reason in ("TrialExpired", "SubscriptionLapsed"))


@pytest.mark.parametrize(
    ("failed_days_ago", "plan", "step", "next_in_days", "restricted"),
    [
        (3, "professional", "GracePeriod", 4, False),  # full access for 7 days
        (10, "professional", "Restricted", 11, True),  # then read-only for DUNNING_RESTRICT_DAYS (14)
        (22, "unlicensed", "Suspended", None, False),  # then the unlicensed feature set
    ],
)
def test_a_failed_payment_walks_the_dunning_ladder(
    failed_days_ago: int, plan: str, step: str, next_in_days: int | None, restricted: bool
) -> None:
    since = NOW - timedelta(days=failed_days_ago)
    overdue = subscription("past_due", period_end=NOW + timedelta(days=25))
    overdue["pastDueSince"] = since.isoformat()
    entitlement = effective_plan(spec(billing={"mode": "stripe"}, subscription=overdue), CREATED, NOW)
    assert (entitlement.plan, entitlement.payment_step, entitlement.restricted) == (plan, step, restricted)
    assert entitlement.next_step_at == (NOW + timedelta(days=next_in_days) if next_in_days else None)
    assert entitlement.lapsed == (step == "Suspended")
    shorter = effective_plan(
        spec(billing={"mode": "stripe"}, subscription=overdue), CREATED, NOW, restricted_for=timedelta(days=2)
    )
    assert shorter.payment_step == ("GracePeriod" if failed_days_ago < 7 else "Suspended")
    paid = effective_plan(spec(billing={"mode": "stripe"}, subscription=subscription("active")), CREATED, NOW)
    assert paid.payment_step is None and not paid.restricted  # back to the plan at once


def test_trial_ends_days_after_creation_unless_ends_at_is_given() -> None:
    assert effective_plan(spec(trial={"days": 14}), CREATED, NOW).trial_ends_at == CREATED + timedelta(
        days=14
    )
    ends = datetime(2026, 12, 1, tzinfo=UTC)
    assert (
        effective_plan(spec(trial={"days": 1, "endsAt": ends.isoformat()}), CREATED, NOW).trial_ends_at
        == ends
    )


def test_a_customer_made_again_counts_its_trial_from_its_customer_ids_first_licence() -> None:
    """Found in review: a Customer deleted and made again from Git (a cluster rebuilt, a tool's delete
    and create) with trial.days and no endsAt counted its trial from the new object's creation: an
    Expired trial got trial.days more of a full trial licence. Its customer id's first licence (the
    licence history's) is where its trial started."""
    made_again = NOW - timedelta(hours=1)
    body = {
        "metadata": {"name": "acme", "uid": "u-2", "creationTimestamp": made_again.isoformat()},
        "spec": {"email": "a@b.cd", "companyName": "x", "customerId": "cust_acme01", "trial": {"days": 14}},
    }
    customer = Customer.model_validate(body)
    first = NOW - timedelta(days=40)
    aimed = pass_target(body, customer, "iotistic.cloud", NOW, ("0.1.0", "Fleet"), first_licensed=first)
    assert (aimed.entitlement.plan, aimed.entitlement.reason) == ("unlicensed", c.TRIAL_EXPIRED)
    assert aimed.entitlement.trial_ends_at == first + timedelta(days=14) and aimed.entitlement.lapsed
    # Its first licence came after the object it was issued to: the trial counts from the creation.
    after = pass_target(
        body, customer, "iotistic.cloud", NOW, ("0.1.0", "Fleet"), first_licensed=NOW - timedelta(minutes=5)
    )
    assert after.entitlement.trial_active and after.entitlement.trial_ends_at == made_again + timedelta(
        days=14
    )
    # trial.endsAt (an API signup's) is the trial's end whatever its customer id's history.
    ends = NOW + timedelta(days=2)
    signed_up = {**body, "spec": {**body["spec"], "trial": {"endsAt": ends.isoformat()}}}
    kept = pass_target(
        signed_up,
        Customer.model_validate(signed_up),
        "iotistic.cloud",
        NOW,
        ("0.1.0", "Fleet"),
        first_licensed=first,
    )
    assert kept.entitlement.trial_active and kept.entitlement.trial_ends_at == ends


def test_a_trial_end_with_a_fraction_of_a_second_ends_on_the_whole_second() -> None:
    # Judged active 0.2 s before 12:00:00.5, the trial would need a licence ending (12:00:00, times are
    # whole seconds) at or before its issue time (12:00:00): minting refused, the Customer Failed.
    ends = datetime(2026, 11, 26, 12, 0, 0, 500_000, tzinfo=UTC)
    entitlement = effective_plan(
        spec(trial={"endsAt": ends.isoformat()}), CREATED, ends - timedelta(seconds=0.2)
    )
    assert entitlement.trial_ends_at == ends.replace(microsecond=0)
    assert not entitlement.trial_active and entitlement.plan == "unlicensed"


def _entitlement(plan: str, suspended: bool = False) -> Entitlement:
    return Entitlement(plan=plan, reason="x", message="", subscription_status="active", suspended=suspended)


def target(
    entitlement: Entitlement | None = None, now: datetime = NOW, customer_spec: CustomerSpec | None = None
) -> PassTarget:
    customer = Customer.model_validate(
        {"metadata": {"name": "acme", "uid": "6f1c1d1e-uid"}, "spec": {"email": "a@b.cd", "companyName": "x"}}
    )
    if customer_spec is not None:
        customer = customer.model_copy(update={"spec": customer_spec})
    return PassTarget(
        customer=customer,
        customer_id="cust_acme0001",
        namespace="customer-acme",
        domain="acme.example",
        entitlement=entitlement or _entitlement("starter"),
        owner={},
        now=now,
        chart_version="0.1.0",
        version_source="Fleet",
    )


@pytest.mark.parametrize(
    ("previous", "was_suspended", "entitlement", "action"),
    [
        (None, False, _entitlement("trial"), "generated"),
        ("trial", False, _entitlement("trial"), "renewed"),
        ("starter", False, _entitlement("professional"), "upgraded"),
        ("enterprise", False, _entitlement("starter"), "downgraded"),
        ("trial", False, _entitlement("unlicensed"), "downgraded"),
        ("professional", False, _entitlement("unlicensed", suspended=True), "suspended"),
        ("unlicensed", True, _entitlement("professional"), "reinstated"),
        ("unlicensed", True, _entitlement("unlicensed", suspended=True), "renewed"),
    ],
)
def test_license_action(
    previous: str | None, was_suspended: bool, entitlement: Entitlement, action: str
) -> None:
    assert license_action(previous, was_suspended, entitlement) == action


def test_a_suspension_is_suspended_once_and_reinstated_after_the_re_mints_while_it_lasts() -> None:
    def secret_annotations(action: str, suspended: bool) -> dict[str, str]:
        secret = license_secret_manifest(
            namespace="customer-acme",
            name="acme",
            customer_id="cust_acme0001",
            owner={},
            action=action,
            suspended=suspended,
            token="t",
            public_key_pem=b"k",
            usage_key="iuk_k",
        )
        annotations: dict[str, str] = secret["metadata"]["annotations"]
        return annotations

    suspension = _entitlement("unlicensed", suspended=True)
    first = license_action("starter", previous_suspended(secret_annotations("generated", False)), suspension)
    assert first == "suspended"
    # A renewal, a new company name, a deleted Secret (`generated`) while suspended: none is a second
    # suspension, and none makes the lifting anything but a reinstatement.
    held = secret_annotations(first, True)
    for action in ("renewed", "generated"):
        assert license_action("unlicensed", previous_suspended(held), suspension) == "renewed"
        held = secret_annotations(action, True)
    assert license_action("unlicensed", previous_suspended(held), _entitlement("starter")) == "reinstated"
    # A Secret written before the marker existed says it by its action.
    assert previous_suspended({"iotistic.io/license-action": "suspended"})


def deployment(
    name: str, replicas: int, available: int, generation: int = 2, observed: int = 2, current: int = 0
) -> DeploymentState:
    return DeploymentState.of(
        {
            "metadata": {"name": name, "generation": generation},
            "spec": {"replicas": replicas},
            "status": {
                "observedGeneration": observed,
                "availableReplicas": available,
                "updatedReplicas": available,
                "replicas": current or available,
            },
        }
    )


def test_instance_health_needs_every_deployment_rolled_out() -> None:
    assert instance_health([deployment("api", 1, 1), deployment("mqtt", 1, 1)], enabled=True).available
    waiting = instance_health([deployment("api", 2, 1), deployment("mqtt", 1, 1)], enabled=True)
    assert not waiting.available and "api 1/2" in waiting.message
    assert not instance_health([deployment("api", 1, 1, generation=3, observed=2)], enabled=True).available
    assert not instance_health([], enabled=True).available
    assert instance_health([], enabled=False).available
    mid_rollout = deployment("api", 1, 1, current=2)  # the old ReplicaSet's pod is still there
    assert not instance_health([mid_rollout], enabled=True).available


def status_after(
    release: ReleaseOutcome | None,
    health: InstanceHealth | None,
    entitlement: Entitlement | None = None,
    previous: CustomerStatus | None = None,
    now: datetime = NOW,
) -> CustomerStatus:
    outcome = PassOutcome(
        license=LicenseStatus(jti="j1", expires_at=NOW + timedelta(days=30)), release=release, health=health
    )
    return next_status(previous or CustomerStatus(), target(entitlement, now), outcome, generation=4)


DEPLOYED = ReleaseOutcome("installed", "InstallSucceeded", "installed", ReleaseStatus(revision=1))


def test_ready_only_when_deployments_are_available_and_then_observed_generation_moves() -> None:
    provisioning = status_after(DEPLOYED, InstanceHealth(False, "DeploymentsUnavailable", "waiting"))
    assert provisioning.phase == "Provisioning" and provisioning.observed_generation is None
    assert provisioning.condition("Ready").status == "False"  # type: ignore[union-attr]
    assert provisioning.condition("Reconciling").status == "True"  # type: ignore[union-attr]

    ready = status_after(DEPLOYED, InstanceHealth(True, "DeploymentsAvailable", "6 available"))
    assert ready.phase == "Ready" and ready.observed_generation == 4
    assert [ready.condition(t).status for t in ("Ready", "Reconciling", "Stalled")] == [
        "True",
        "False",
        "False",
    ]  # type: ignore[union-attr]


def test_a_ready_instance_rolling_out_an_upgrade_stays_ready_and_degrades_only_when_it_stops_serving() -> (
    None
):
    """Found in review: every upgrade (a renewal's licence rolls the api Deployment) made a Ready
    Customer Degraded, with a Warning Event, while its old replica served throughout."""
    ready = status_after(DEPLOYED, InstanceHealth(True, "DeploymentsAvailable", "6 available"))
    upgraded = ReleaseOutcome("upgraded", "UpgradeSucceeded", "upgraded", ReleaseStatus(revision=2))
    later = NOW + timedelta(minutes=1)
    rolling = InstanceHealth(
        False, "DeploymentsUnavailable", "waiting for Deployments: api 0/1 updated", True
    )
    during = status_after(upgraded, rolling, previous=ready, now=later)
    assert during.phase == "Ready"
    assert (during.condition("Ready").status, during.condition("Reconciling").status) == ("False", "True")  # type: ignore[union-attr]
    stuck = InstanceHealth(False, "DeploymentsUnavailable", "waiting for Deployments: api 0/1 available")
    assert status_after(upgraded, stuck, previous=ready, now=later).phase == "Degraded"
    assert status_after(DEPLOYED, rolling).phase == "Provisioning"  # never served: not Ready yet


def test_a_permanent_failure_stalls_with_reason_and_message() -> None:
    failed = ReleaseOutcome("failed", "InstallFailed", "at '/api/replicas': maximum 20", permanent=True)
    stalled = status_after(failed, None)
    assert stalled.phase == "Failed" and stalled.observed_generation == 4
    condition = stalled.condition("Stalled")
    assert condition is not None and (condition.status, condition.reason) == ("True", "InstallFailed")
    assert stalled.condition("ReleaseDeployed").message == failed.message  # type: ignore[union-attr]


def test_a_retried_failure_is_named_on_ready_degrades_a_served_instance_and_is_one_event() -> None:
    """Found in review: a registry away (ChartPullFailed) or a quota refusing an upgrade showed phase
    Provisioning, Ready "Progressing" and only Normal Events, also for a Ready Customer whose instance
    went on serving the version before; the console's failing list and describe looked healthy."""
    pull = ReleaseOutcome("failed", "ChartPullFailed", "dial tcp 127.0.0.1:5000: connect: connection refused")
    first = status_after(pull, None)
    assert first.phase == "Provisioning"
    assert (first.condition("Ready").reason, first.condition("Ready").message) == (
        "ChartPullFailed",
        pull.message,
    )  # type: ignore[union-attr]
    ready = status_after(DEPLOYED, InstanceHealth(True, "DeploymentsAvailable", "5 available"))
    upgrade = ReleaseOutcome("failed", "UpgradeFailed", "Error: UPGRADE FAILED: exceeded quota")
    served = status_after(upgrade, None, previous=ready, now=NOW + timedelta(minutes=1))
    assert served.phase == "Degraded" and served.condition("Ready").reason == "UpgradeFailed"  # type: ignore[union-attr]

    def events(status: CustomerStatus, before: CustomerStatus) -> list[tuple[str, str, str]]:
        ready_before = before.condition("Ready")
        return PassResult(
            status,
            before.phase,
            temporary_error=status.condition("Ready").message,  # type: ignore[union-attr]
            previous_ready_reason=ready_before.reason if ready_before else None,
        ).events

    assert events(served, ready) == [
        ("Warning", "Degraded", "phase Ready -> Degraded"),
        ("Warning", "UpgradeFailed", "Error: UPGRADE FAILED: exceeded quota (retried)"),
    ]
    again = status_after(upgrade, None, previous=served, now=NOW + timedelta(minutes=2))
    assert events(again, served) == []  # the same failure retried: no Event each time
    # A renewal PostgreSQL cannot record runs no release step: the instance serves as it did.
    away = next_status(ready, target(), PassOutcome(license_unavailable="PostgreSQL cannot be reached"), 4)
    assert away.phase == "Degraded" and away.condition("Ready").reason == "DatabaseUnavailable"  # type: ignore[union-attr]


def test_an_expired_customer_whose_instance_ran_on_degrades_when_its_upgrade_fails_or_sticks() -> None:
    """Found in review: a trial that lapsed (Expired, its instance serving on the unlicensed plan) and
    then checked out, whose upgrade helm refused, was Provisioning on every retry, out of the console's
    failing list; so was a Deployment stuck after that upgrade."""
    lapsed = Entitlement(
        plan="unlicensed", reason="TrialExpired", message="", subscription_status="canceled", lapsed=True
    )
    available = InstanceHealth(True, "DeploymentsAvailable", "6 available")
    expired = status_after(DEPLOYED, available, entitlement=lapsed)
    assert expired.phase == "Expired"
    paid, later = _entitlement("professional"), NOW + timedelta(minutes=1)
    refused = ReleaseOutcome("failed", "UpgradeFailed", "Error: UPGRADE FAILED: exceeded quota")
    failed = status_after(refused, None, paid, previous=expired, now=later)
    assert failed.phase == "Degraded"
    assert status_after(refused, None, paid, previous=failed, now=later).phase == "Degraded"  # each retry
    away = next_status(expired, target(paid), PassOutcome(license_unavailable="PostgreSQL away"), 4)
    assert away.phase == "Degraded"

    upgraded = ReleaseOutcome("upgraded", "UpgradeSucceeded", "upgraded", ReleaseStatus(revision=2))
    stuck = InstanceHealth(False, "DeploymentsUnavailable", "api: ProgressDeadlineExceeded")
    assert status_after(upgraded, stuck, paid, previous=expired, now=later).phase == "Degraded"
    # Its old replicas serving while the paid values roll out: it serves, and degrades once stuck.
    rolling = InstanceHealth(False, "DeploymentsUnavailable", "api 0/1 updated", serving=True)
    during = status_after(upgraded, rolling, paid, previous=expired, now=later)
    assert during.phase == "Ready" and during.condition("Ready").status == "False"  # type: ignore[union-attr]
    assert status_after(upgraded, stuck, paid, previous=during, now=later).phase == "Degraded"

    # A suspension scaled the instance to zero, and a trial lapsed before its install left none: neither
    # served, so a failure on the way back is still Provisioning.
    suspended = status_after(DEPLOYED, available, entitlement=_entitlement("unlicensed", suspended=True))
    assert suspended.phase == "Suspended"
    assert status_after(refused, None, paid, previous=suspended, now=later).phase == "Provisioning"
    never = ReleaseOutcome("failed", "InstallFailed", "Error: INSTALLATION FAILED: exceeded quota")
    uninstalled = status_after(never, None, entitlement=lapsed)
    assert uninstalled.phase == "Expired"
    assert status_after(never, None, paid, previous=uninstalled, now=later).phase == "Provisioning"


def test_the_pass_after_an_install_writes_the_same_status() -> None:
    """The next pass finds the release current: it keeps what the install said, so no status patch."""
    waiting = InstanceHealth(False, "DeploymentsUnavailable", "waiting")
    installed = status_after(DEPLOYED, waiting)
    unchanged = ReleaseOutcome(
        "unchanged", "ReleaseUnchanged", "revision 1 is current", ReleaseStatus(revision=1)
    )
    again = status_after(unchanged, waiting, previous=installed, now=NOW + timedelta(seconds=3))
    assert again.to_k8s() == installed.to_k8s()
    assert again.condition("ReleaseDeployed").reason == "InstallSucceeded"  # type: ignore[union-attr]


def test_transition_time_moves_only_when_a_condition_changes_status() -> None:
    first = status_after(DEPLOYED, InstanceHealth(False, "DeploymentsUnavailable", "waiting"))
    waiting = InstanceHealth(False, "DeploymentsUnavailable", "still waiting")
    later = status_after(DEPLOYED, waiting, previous=first, now=NOW + timedelta(minutes=5))
    assert later.condition("Ready").last_transition_time == first.condition("Ready").last_transition_time  # type: ignore[union-attr]
    assert later.condition("Ready").message == "still waiting"  # type: ignore[union-attr]


def test_the_customer_id_in_use_is_the_spec_s_else_the_reported_else_the_derived_one() -> None:
    uid = "6f1c1d1e-0000-4000-8000-000000000001"
    derived = derived_customer_id(uid)
    assert derived == derived_customer_id(uid) != derived_customer_id(uid + "x")
    assert CustomerSpec.model_validate({"email": "a@b.cd", "companyName": "x", "customerId": derived})
    body: dict[str, Any] = {"metadata": {"name": "acme", "uid": uid}, "spec": {}}
    assert customer_id_in_use(body) == derived
    assert customer_id_in_use({**body, "status": {"customerId": "cust_reported1"}}) == "cust_reported1"
    given = {**body, "spec": {"customerId": "cust_given01"}, "status": {"customerId": "cust_reported1"}}
    assert customer_id_in_use(given) == "cust_given01"
    # A spec the models refuse is still read: a Customer must stay deletable.
    assert customer_id_in_use({**body, "spec": {"plan": 42}}) == derived


def test_the_pass_target_is_worked_out_once_from_the_customer() -> None:
    body = {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": "acme", "uid": "u-1", "creationTimestamp": CREATED.isoformat()},
        "spec": {
            "email": "a@b.cd",
            "companyName": "x",
            "plan": "starter",
            "instance": {"domain": "a.example"},
        },
    }
    aimed = pass_target(body, Customer.model_validate(body), "iotistic.cloud", NOW, ("0.1.0", "Fleet"))
    assert (aimed.customer_id, aimed.namespace, aimed.url) == (
        derived_customer_id("u-1"),
        "customer-acme",
        "https://a.example",
    )
    assert aimed.entitlement.plan == "starter" and aimed.owner["uid"] == "u-1"


def test_a_pass_aimed_by_a_rollout_records_the_updated_at_it_read_and_other_passes_record_none() -> None:
    """A rollout counts a Customer's return only from a pass that read the annotation it set
    (rollout_plan.member): the status from a pass before names the returned version too."""
    moved_at = "2026-11-25T12:00:00+00:00"
    body = {
        "metadata": {
            "name": "acme",
            "uid": "u-1",
            "creationTimestamp": CREATED.isoformat(),
            "annotations": {ROLLOUT_CHART_VERSION: "2.0.0", ROLLOUT_UPDATED_AT: moved_at},
        },
        "spec": {"email": "a@b.cd", "companyName": "x"},
    }
    outcome = PassOutcome(license=LicenseStatus(jti="j1"), release=DEPLOYED)

    def pass_aimed_at(previous: CustomerStatus, chart: tuple[str, VersionSource]) -> CustomerStatus:
        aimed = pass_target(body, Customer.model_validate(body), "iotistic.cloud", NOW, chart)
        return next_status(previous, aimed, outcome, 2)

    by_rollout = pass_aimed_at(CustomerStatus(), ("2.0.0", "Rollout"))
    pinned = pass_aimed_at(by_rollout, ("1.0.0", "Pinned"))
    body["metadata"]["annotations"][ROLLOUT_UPDATED_AT] = "x" * 65  # no rollout writes that
    too_long = pass_aimed_at(by_rollout, ("2.0.0", "Rollout"))

    assert by_rollout.to_k8s()["release"] == {
        "revision": 1,
        "targetVersion": "2.0.0",
        "versionSource": "Rollout",
        "rolloutUpdatedAt": moved_at,
    }
    assert pinned.release is not None and pinned.release.rollout_updated_at is None
    assert merge_patch(by_rollout.to_k8s(), pinned.to_k8s())["release"]["rolloutUpdatedAt"] is None
    assert too_long.release is not None and too_long.release.rollout_updated_at is None


def test_an_invalid_spec_is_failed_and_stalled_and_no_longer_ready() -> None:
    """Found in review: the Customer was set Failed but kept an earlier Ready=True (no Stalled written),
    which kstatus readers (Flux, Argo CD, `kubectl wait`) call healthy."""
    ready = status_after(DEPLOYED, InstanceHealth(True, "DeploymentsAvailable", "6 available"))
    assert ready.condition("Ready").status == "True"  # type: ignore[union-attr]
    failed = stalled_status(ready, 5, "InvalidSpec", "spec.trial.days must be at most 90", NOW)
    assert failed.phase == "Failed" and failed.observed_generation == 5
    states = {c.type: (c.status, c.reason) for c in failed.conditions or ()}
    assert states["Ready"] == ("False", "InvalidSpec")
    assert states["Stalled"] == ("True", "InvalidSpec")
    assert states["Reconciling"] == ("False", "InvalidSpec")
    assert failed.condition("Stalled").message == "spec.trial.days must be at most 90"  # type: ignore[union-attr]


def test_a_pass_refused_its_namespace_stalls_or_waits_and_leaves_the_steps_conditions_alone() -> None:
    ready = status_after(DEPLOYED, InstanceHealth(True, "DeploymentsAvailable", "6 available"))
    taken = NamespaceRefused(c.NAMESPACE_TAKEN, "metadata.name: namespace customer-acme exists", True)
    stalled = refused_status(ready, target(), taken, generation=5)
    assert (stalled.phase, stalled.observed_generation, stalled.customer_id) == ("Failed", 5, "cust_acme0001")
    assert stall_of(stalled) == (c.NAMESPACE_TAKEN, taken.message)
    assert stalled.condition("Ready").status == "False"  # type: ignore[union-attr]

    going = NamespaceRefused(c.NAMESPACE_TERMINATING, "namespace customer-acme is being deleted", False)
    waiting = refused_status(ready, target(), going, generation=5)
    states = {c.type: (c.status, c.reason) for c in waiting.conditions or ()}
    assert states["Stalled"] == ("False", "Reconciled")
    assert states["Reconciling"] == ("True", c.NAMESPACE_TERMINATING)
    assert states["Ready"] == ("False", c.NAMESPACE_TERMINATING)
    assert waiting.condition("ReleaseDeployed") == ready.condition("ReleaseDeployed")
    assert (waiting.phase, waiting.observed_generation) == ("Provisioning", ready.observed_generation)
    # A new Customer waiting for an earlier one's namespace is Pending, with its customer id reported.
    new = refused_status(CustomerStatus(), target(), going, generation=1)
    assert (new.phase, new.customer_id, new.license) == ("Pending", "cust_acme0001", None)


def test_a_customer_being_deleted_is_terminating_and_not_ready_once() -> None:
    """Found in review: while a failing finalizer was retried the Customer said Ready (Ready=True), its
    release already uninstalled; the phase Terminating was set by nothing."""
    ready = status_after(DEPLOYED, InstanceHealth(True, "DeploymentsAvailable", "6 available"))
    going = terminating_status(ready, 6, NOW)
    assert going is not None and going.phase == "Terminating"
    states = {c.type: (c.status, c.reason, c.observed_generation) for c in going.conditions or ()}
    assert states["Ready"] == ("False", c.TERMINATING, 6)
    assert states["Reconciling"] == ("True", c.TERMINATING, 6)
    assert going.condition("ReleaseDeployed") == ready.condition("ReleaseDeployed")
    assert (going.license, going.observed_generation) == (ready.license, ready.observed_generation)
    assert terminating_status(going, 6, NOW + timedelta(minutes=1)) is None  # a retry writes nothing

    # A Customer deleted before its first pass: Ready only, no Reconciling made up.
    new = terminating_status(CustomerStatus(), 2, NOW)
    assert new is not None and [(c.type, c.status) for c in new.conditions or ()] == [("Ready", "False")]


def test_release_values_keep_plan_limits_over_user_overrides() -> None:
    customer = spec(
        plan="professional",
        instance={"values": {"plan": "enterprise", "api": {"replicas": 3}, "license": {"maxDevices": 9999}}},
    )
    values = desired_release_values(
        target(_entitlement("professional"), customer_spec=customer), Settings(), "ab" * 32
    )
    assert values["plan"] == "professional" and values["license"]["maxDevices"] == 50
    assert values["api"] == {"replicas": 3} and values["retention"] == {"days": 365}
    assert values["enabled"] is True
    suspended = desired_release_values(
        target(_entitlement("unlicensed", True), customer_spec=spec(plan="professional", suspended=True)),
        Settings(),
        None,
    )
    assert suspended["enabled"] is False
    assert values_hash(values, "0.1.0") == values_hash(dict(values), "0.1.0") != values_hash(values, "0.1.1")


def test_the_instance_verifies_its_licence_with_the_operator_s_issuer_audience_and_secret() -> None:
    """Found in review: the instance was never given the licence's issuer and audience (the chart passed
    neither), so a LICENSE_AUDIENCE of the environment's made every instance refuse every licence; and
    license.secretName was the Customer's to point at a Secret of its own."""
    settings = Settings(license_issuer="https://billing.staging.example", license_audience="staging-instance")
    customer = spec(
        instance={"values": {"license": {"secretName": "mine", "issuer": "me", "audience": "anyone"}}}
    )

    values = desired_release_values(target(_entitlement("starter"), customer_spec=customer), settings, None)

    assert (values["license"]["secretName"], values["license"]["issuer"], values["license"]["audience"]) == (
        LICENSE_SECRET_NAME,
        "https://billing.staging.example",
        "staging-instance",
    )


def test_extra_env_of_the_operator_s_variables_is_left_out_and_named() -> None:
    """Found in review: api.extraEnv and exporter.extraEnv were rendered after the operator's variables,
    and Kubernetes keeps the last of a name: IOTISTIC_LICENSE_KEY there (the old system's way to pass the
    licence) pinned a literal licence that no renewal, suspension or revocation reached, BILLING_URL or
    USAGE_API_KEY sent usage nowhere. The CRD refuses them now; a Customer stored before holds them still."""
    mine = {"name": "LOG_LEVEL", "value": "debug"}
    customer = spec(
        instance={
            "values": {
                "api": {"replicas": 2, "extraEnv": [{"name": "IOTISTIC_LICENSE_KEY", "value": "eyJ"}, mine]},
                "exporter": {"extraEnv": [mine, {"name": "BILLING_URL", "value": "http://nowhere"}]},
                "dashboard": {"extraEnv": [{"name": "CUSTOMER_ID", "value": "shown"}]},
            }
        }
    )

    values = desired_release_values(target(_entitlement("starter"), customer_spec=customer), Settings(), None)

    assert values["api"] == {"replicas": 2, "extraEnv": [mine]}
    assert values["exporter"] == {"extraEnv": [mine]}
    # The dashboard is given none of them: its own to set.
    assert values["dashboard"] == {"extraEnv": [{"name": "CUSTOMER_ID", "value": "shown"}]}
    assert refused_env(customer.instance.values) == [
        "spec.instance.values.api.extraEnv[0].name IOTISTIC_LICENSE_KEY",
        "spec.instance.values.exporter.extraEnv[1].name BILLING_URL",
    ]
    assert refused_env({"api": {"extraEnv": "not a list"}, "exporter": None}) == []


def test_the_operator_s_values_a_chart_s_schema_does_not_declare_are_left_out() -> None:
    """A key is left out only where its object's schema is closed (additionalProperties false), lacks the
    property and has no patternProperties taking it; local $refs are followed, an open object keeps all."""
    schema = {
        "additionalProperties": False,
        "definitions": {
            "licence": {"$ref": "#/definitions/closed"},
            "closed": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"secretName": {"type": "string"}},
                "patternProperties": {"^max": {"type": "integer"}},
            },
        },
        "properties": {"enabled": {}, "license": {"$ref": "#/definitions/licence"}, "retention": {}},
    }
    values = {
        "enabled": False,
        "domain": "a.example",
        "license": {"secretName": "s", "issuer": "i", "maxDevices": 5},
        "retention": {"days": 30, "anything": 1},
    }

    assert accepted_by_schema(values, schema) == {
        "enabled": False,
        "license": {"secretName": "s", "maxDevices": 5},
        "retention": {"days": 30, "anything": 1},
    }
    assert accepted_by_schema(values, {}) == values
    # A reference to another document, or one that leads nowhere: nothing refused there.
    elsewhere = {"properties": {"license": {"$ref": "other.json#/x"}, "retention": {"$ref": "#/nowhere"}}}
    assert accepted_by_schema(values, elsewhere) == values


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        *((name, True) for name in OPERATOR_ENV_NAMES),
        ("IOTISTIC_LICENSE_PUBLIC_KEY", True),
        ("IOTISTIC_LICENSE_AUDIENCE", True),
        ("LICENSE_PUBLIC_KEY_PATH", True),
        ("LOG_LEVEL", False),
        ("DB_HOST", False),
        ("customer_id", False),
        (None, False),
    ],
)
def test_operator_env_names(name: str | None, refused: bool) -> None:
    assert operator_env_name(name) is refused


def test_housekeeping_runs_a_pass_only_when_renewal_or_an_entitlement_change_is_due() -> None:
    issued = NOW - timedelta(days=10)
    current = CustomerStatus(
        plan="starter", license=LicenseStatus(issued_at=issued, expires_at=issued + timedelta(days=30))
    )
    starter = spec(plan="starter")
    assert housekeeping_due(starter, current, CREATED, NOW) is None
    assert housekeeping_due(starter, current, CREATED, NOW + timedelta(days=11)) == "LicenseRenewal"
    trial = spec(trial={"days": 5})
    trial_status = CustomerStatus(
        plan="trial", license=LicenseStatus(issued_at=CREATED, expires_at=CREATED + timedelta(days=5))
    )
    assert housekeeping_due(trial, trial_status, CREATED, NOW) is None  # capped by the trial's end
    assert (
        housekeeping_due(trial, trial_status, CREATED, CREATED + timedelta(days=5, seconds=1))
        == "TrialExpired"
    )


def _ended(ready: bool, observed: int) -> CustomerStatus:
    """The status of a pass of generation `observed` that ended Ready (or, `ready` False, progressing)."""
    value = ConditionValue(ConditionType.READY, ready, "Succeeded" if ready else "Progressing", "as it ended")
    conditions = with_conditions(None, [value], generation=observed, now=NOW)
    return CustomerStatus(plan="starter", observed_generation=observed, conditions=conditions)


def test_housekeeping_runs_a_pass_for_a_generation_no_pass_observed() -> None:
    """Found in review: observedGeneration moved only on a pass, and passes ran only on a Kopf spec diff
    or when something was due: a console Suspend and Git's revert while the Customer's Kopf worker was
    busy left generation N+2 with the spec Kopf last handled, and kstatus (Flux's wait, Argo CD) read
    the Customer as in progress until an unrelated pass some ten days later."""
    starter = spec(plan="starter")
    ready = _ended(True, observed=3)
    assert housekeeping_due(starter, ready, CREATED, NOW, generation=3) is None
    assert housekeeping_due(starter, ready, CREATED, NOW, generation=5) == c.GENERATION_NOT_OBSERVED
    # A Stalled Customer's pass moves observedGeneration as well (stalled_status): one pass, cheap, even
    # for a stall before the licence, whose pass renews nothing.
    for stall in (c.INVALID_SPEC, c.NAMESPACE_TAKEN, c.UPGRADE_FAILED):
        stuck = stalled_status(ready, 3, stall, "it failed", NOW)
        assert housekeeping_due(starter, stuck, CREATED, NOW, generation=5) == c.GENERATION_NOT_OBSERVED
        passed = stalled_status(stuck, 5, stall, "it failed", NOW)
        assert housekeeping_due(starter, passed, CREATED, NOW, generation=5) is None, stall
    # Ready False and nothing stalling it: the pass it ends leaves observedGeneration behind, and would
    # run every check; its retry or the instance's watch moves it.
    assert housekeeping_due(starter, _ended(False, observed=3), CREATED, NOW, generation=5) is None


@pytest.mark.parametrize(
    ("stall", "due"),
    [
        # A pass that stops before the licence can neither renew it nor write the plan.
        (c.INVALID_SPEC, None),
        (c.LICENSE_FAILED, None),
        (c.NAMESPACE_TAKEN, None),
        # A stalled release: the pass still renews the licence, and writes the plan it is for.
        (c.CHART_VERSION_INVALID, "LicenseRenewal"),
        (c.UPGRADE_FAILED, "LicenseRenewal"),
    ],
)
def test_housekeeping_of_a_stalled_customer_renews_only_what_its_pass_can(
    stall: str, due: str | None
) -> None:
    issued = NOW - timedelta(days=29)
    licensed = CustomerStatus(
        plan="starter", license=LicenseStatus(issued_at=issued, expires_at=issued + timedelta(days=30))
    )
    status = stalled_status(licensed, 2, stall, "it failed", NOW)  # Stalled with that reason
    starter = spec(plan="starter")
    assert housekeeping_due(starter, status, CREATED, NOW) == due
    moved = status.model_copy(update={"plan": "professional"})
    changed = effective_plan(starter, CREATED, NOW).reason
    assert housekeeping_due(starter, moved, CREATED, NOW) == (changed if due else None)


def test_only_a_customer_stalled_on_a_taken_namespace_has_its_namespace_read_until_it_is_freed() -> None:
    """Found in review: a Customer stalled as NamespaceTaken stayed so after the namespace was deleted or
    handed over, until someone annotated it: its housekeeping reads that namespace (and no other
    Customer's does), and a pass is due once it is gone or labelled for the Customer."""
    ready = status_after(DEPLOYED, InstanceHealth(True, "DeploymentsAvailable", "6 available"))
    assert not stalled_on_namespace(ready) and not stalled_on_namespace(CustomerStatus())
    taken = NamespaceRefused(c.NAMESPACE_TAKEN, "metadata.name: namespace customer-acme exists", True)
    stalled = refused_status(CustomerStatus(), target(), taken, generation=1)
    assert stalled_on_namespace(stalled)
    assert not stalled_on_namespace(stalled_status(ready, 2, c.INVALID_SPEC, "spec.plan", NOW))

    theirs = {"metadata": {"name": "customer-acme", "labels": {"team": "payments"}}}
    assert namespace_freed(theirs, "acme", "uid-acme") is None
    another = {"metadata": {"name": "customer-acme", "labels": {c.LABEL_CUSTOMER: "globex"}}}
    assert namespace_freed(another, "acme", "uid-acme") is None
    assert namespace_freed(None, "acme", "uid-acme") == "NamespaceGone"
    handed = {"metadata": {"name": "customer-acme", "labels": {"team": "payments", c.LABEL_CUSTOMER: "acme"}}}
    assert namespace_freed(handed, "acme", "uid-acme") == "NamespaceHandedOver"
    # Labelled, but owned by another Customer: still not this one's.
    owned = {
        "metadata": {
            **handed["metadata"],
            "ownerReferences": [{"apiVersion": "iotistic.io/v1alpha1", "kind": "Customer", "uid": "uid-b"}],
        }
    }
    assert namespace_freed(owned, "acme", "uid-acme") is None


def test_helm_status_json_without_chart_is_read() -> None:
    from iotistic_billing.operator.helm import _release

    status = {
        "name": "instance",
        "namespace": "customer-a",
        "version": 3,
        "info": {"status": "pending-upgrade"},
    }
    release = _release(status)
    assert (release.revision, release.status, release.chart_version) == (3, "pending-upgrade", "")


def test_the_status_patch_removes_what_the_new_status_no_longer_has() -> None:
    old = {
        "phase": "Ready",
        "trial": {"isTrialMode": True, "endsAt": "2026-12-09T00:00:00Z"},
        "usage": {"x": 1},
    }
    new = {"phase": "Ready", "trial": {"isTrialMode": False}, "usage": {"x": 1}}
    assert merge_patch(old, new) == {
        "phase": "Ready",
        "trial": {"isTrialMode": False, "endsAt": None},
        "usage": {"x": 1},
    }
    assert merge_patch(old, old) == old
    assert merge_patch({"conditions": [1, 2]}, {"conditions": [1]}) == {"conditions": [1]}  # lists replace


def test_a_restricted_licence_is_the_plan_read_only_and_the_verifier_refuses_new_devices() -> None:
    from iotistic_billing.licensing.plans import PLANS, restricted

    read_only = restricted(PLANS["professional"])
    assert read_only.limits == PLANS["professional"].limits  # the plan's limits kept
    assert (read_only.features.can_add_devices, read_only.features.can_export_data) == (False, False)
    assert read_only.features.max_devices == 50
    entitlement = Entitlement(
        plan="professional", reason="r", message="", subscription_status="past_due", restricted=True
    )
    assert license_action("professional", False, entitlement) == "downgraded"
    lifted = Entitlement(plan="professional", reason="r", message="", subscription_status="active")
    assert license_action("professional", False, lifted, previous_restricted=True) == "upgraded"


def test_payment_overdue_says_the_step_for_stripe_billing_only() -> None:
    from iotistic_billing.operator.conditions import payment_condition

    overdue = Entitlement(
        plan="starter",
        reason="x",
        message="restricted until 2026-12-20",
        subscription_status="past_due",
        payment_step="Restricted",
    )
    value = payment_condition(overdue, stripe_billed=True)
    assert value is not None and (value.status, value.reason, value.message) == (
        True,
        "Restricted",
        overdue.message,
    )
    current = payment_condition(_entitlement("starter"), stripe_billed=True)
    assert current is not None and (current.status, current.reason) == (False, "PaymentsCurrent")
    assert payment_condition(overdue, stripe_billed=False) == NoCondition("PaymentOverdue")


def _target_of(customer_spec: dict[str, Any], now: datetime = NOW) -> PassTarget:
    body = {
        "metadata": {"name": "acme", "uid": "u-1", "creationTimestamp": CREATED.isoformat()},
        "spec": {"email": "a@b.cd", "companyName": "x", **customer_spec},
    }
    return pass_target(body, Customer.model_validate(body), "iotistic.cloud", now, ("0.1.0", "Fleet"))


def _pass_of(customer_spec: dict[str, Any], previous: CustomerStatus, outcome: PassOutcome) -> CustomerStatus:
    return next_status(previous, _target_of(customer_spec), outcome, generation=2)


def test_a_customer_moved_to_manual_billing_loses_its_dunning_step_and_its_minutely_pass() -> None:
    """Found in review: PaymentOverdue stayed Restricted after the move, and every housekeeping check
    compared it with PaymentsCurrent and ran a full pass."""
    overdue = subscription("past_due", period_end=NOW + timedelta(days=20))
    overdue["pastDueSince"] = (NOW - timedelta(days=10)).isoformat()
    outcome = PassOutcome(
        license=LicenseStatus(jti="j1", issued_at=NOW, expires_at=NOW + timedelta(days=30)),
        release=DEPLOYED,
        health=InstanceHealth(True, "DeploymentsAvailable", "6 available"),
    )
    dunned = _pass_of({"billing": {"mode": "stripe"}, "subscription": overdue}, CustomerStatus(), outcome)
    assert dunned.condition("PaymentOverdue").reason == "Restricted"  # type: ignore[union-attr]
    manual = {"billing": {"mode": "manual"}, "plan": "professional"}
    moved = _pass_of(manual, dunned, outcome)
    assert moved.condition("PaymentOverdue") is None
    assert housekeeping_due(spec(**manual), moved, CREATED, NOW + timedelta(minutes=1)) is None
    # Nor does the status from before the move, until the move's own pass replaces it.
    assert housekeeping_due(spec(**manual), dunned, CREATED, NOW + timedelta(minutes=1)) is None
    assert moved.to_k8s() == _pass_of(manual, moved, outcome).to_k8s()  # no patch on the next pass


def test_a_webhook_removed_removes_notifications_ready_and_a_step_that_did_not_run_keeps_its_own() -> None:
    webhook = {"webhook": {"url": "https://hooks.acme.example/iotistic", "secretRef": {"name": "hook"}}}
    missing = NotificationsOutcome(False, "SecretNotFound", "no Secret hook in customer-acme")
    outcome = PassOutcome(license=LicenseStatus(jti="j1"), release=DEPLOYED, notifications=missing)
    with_webhook = _pass_of({"notifications": webhook}, CustomerStatus(), outcome)
    assert with_webhook.condition("NotificationsReady").reason == "SecretNotFound"  # type: ignore[union-attr]
    without = _pass_of({}, with_webhook, PassOutcome(license_error="no signing key"))
    assert without.condition("NotificationsReady") is None
    # The release step did not run (the licence failed): its condition stays as the last install said.
    assert without.condition("ReleaseDeployed") == with_webhook.condition("ReleaseDeployed")


def test_a_requested_pass_says_which_request_it_answered() -> None:
    stalled = stalled_status(CustomerStatus(), 2, "InvalidSpec", "spec.plan: unknown", NOW)
    asked = {RECONCILE_REQUESTED_AT: "2026-11-25T12:00:00Z"}
    answered = answered_request(stalled, asked)
    assert answered.last_handled_reconcile_at == "2026-11-25T12:00:00Z"
    assert answered.to_k8s()["lastHandledReconcileAt"] == "2026-11-25T12:00:00Z"
    assert answered_request(answered, asked) is answered
    # Without a request the value stays what the last answered request left.
    assert answered_request(answered, {}).last_handled_reconcile_at == "2026-11-25T12:00:00Z"
    assert answered_request(stalled, {}).last_handled_reconcile_at is None


def test_a_request_longer_than_the_status_keeps_is_answered_once() -> None:
    """Found in review: a requested-at annotation over 64 characters was kept cut in the status, so it
    never equalled the annotation: each pass wrote it again and each operator start ran a pass for it."""
    stalled = stalled_status(CustomerStatus(), 2, "InvalidSpec", "spec.plan: unknown", NOW)
    asked = {RECONCILE_REQUESTED_AT: "2026-11-25T12:00:00Z/" + "x" * 80}
    answered = answered_request(stalled, asked)
    assert answered.last_handled_reconcile_at == asked[RECONCILE_REQUESTED_AT][:64]
    assert answered_request(answered, asked) is answered


def _past_due(failed_days_ago: int) -> dict[str, Any]:
    overdue = subscription("past_due", plan="starter", period_end=NOW + timedelta(days=20))
    overdue["pastDueSince"] = (NOW - timedelta(days=failed_days_ago)).isoformat()
    return {"billing": {"mode": "stripe"}, "subscription": overdue}


def _licence(plan: str, jti: str, restricted: bool = False) -> LicenseRecord:
    return LicenseRecord(
        customer_id="cust_acme0001",
        plan=plan,
        max_devices=5,
        license_hash="0" * 64,
        jti=jti,
        kid="k1",
        issued_at=NOW,
        expires_at=NOW + timedelta(days=30),
        features={"canAddDevices": not restricted},
        limits={},
    )


def _notice_of(aimed: PassTarget, replaced: LicenseRecord, was_suspended: bool = False) -> Notice | None:
    """The notice of the licence a pass aimed at `aimed` mints in place of `replaced`."""
    entitlement = aimed.entitlement
    action = license_action(
        replaced.plan,
        was_suspended,
        entitlement,
        previous_restricted=replaced.features["canAddDevices"] is False,
    )
    minted = _licence(entitlement.plan, "j-new", restricted=entitlement.restricted)
    return license_notice(aimed, minted, action, replaced)


def test_lifting_a_suspension_of_a_lapsed_or_restricted_customer_does_not_say_back_on_the_plan() -> None:
    """Found in review: the lifting always said "reinstated: back on the unlicensed plan" (a trial that
    ended during the suspension) or "back on the starter plan" (a restricted payment), and the trial's
    end or the restriction was never said."""
    held = _licence("unlicensed", "j-held")
    # A manual trial whose end came while an administrator had it suspended.
    ended = _notice_of(_target_of({"trial": {"days": 2}}), held, was_suspended=True)
    assert ended is not None and ended.kind == NoticeKind.TRIAL_ENDED
    # A Stripe customer suspended while its payment was overdue, and still restricted when lifted.
    restricted = _notice_of(_target_of(_past_due(10)), held, was_suspended=True)
    assert restricted is not None and restricted.kind == NoticeKind.ACCESS_RESTRICTED
    # ... or lifted after the ladder suspended it too: the ladder's suspension, with its dates.
    lapsed = _notice_of(_target_of(_past_due(25)), held, was_suspended=True)
    assert lapsed is not None and lapsed.kind == NoticeKind.LICENSE_SUSPENDED
    assert "payment failed" in lapsed.lines[1]
    # A plan that is really back says so.
    back = _notice_of(_target_of({"plan": "starter"}), held, was_suspended=True)
    assert back is not None and back.kind == NoticeKind.LICENSE_REINSTATED
    assert back.lines[1] == "your licence was reinstated: back on the starter plan."


def test_a_renewal_or_a_new_incomplete_subscription_sends_no_trial_ended() -> None:
    """Found in review: trial.ended followed the entitlement, not the licence's change: a customer who
    subscribed during its trial, cancelled, and checked out again (the new subscription incomplete) got
    "Your trial ended on <months ago>" with the renewal of its unlicensed licence."""
    months_later = NOW + timedelta(days=200)
    stripe = {"billing": {"mode": "stripe"}}
    new_checkout = {**stripe, "subscription": {"status": "incomplete", "plan": "professional"}}
    aimed = _target_of(new_checkout, now=months_later)
    assert _notice_of(aimed, _licence("unlicensed", "j-lapsed")) is None
    # Nor when its canceled subscription was handed over to the incomplete one at once.
    assert _notice_of(aimed, _licence("starter", "j-paid")) is None
    # The trial's own end says it once, from the trial licence; its renewals say nothing.
    expired = _target_of({"trial": {"days": 2}})
    ended = _notice_of(expired, _licence("trial", "j-trial"))
    assert ended is not None and ended.kind == NoticeKind.TRIAL_ENDED
    assert _notice_of(expired, _licence("unlicensed", "j-expired")) is None
    # The status says what the customer has: an incomplete subscription, not only a months-old trial end.
    assert "incomplete" in subscription_condition(aimed.entitlement).message


def test_a_plan_change_while_restricted_sends_no_second_access_restricted() -> None:
    restricted = _target_of(_past_due(10))
    first = _notice_of(restricted, _licence("starter", "j-full"))
    assert first is not None and first.kind == NoticeKind.ACCESS_RESTRICTED
    # Moved from professional to starter while restricted: a downgrade, and no news about the access.
    assert _notice_of(restricted, _licence("professional", "j-restricted", restricted=True)) is None


class LicenceStepParts:
    """What the licence step touches, as small fakes: the Secret it applies, the history table (one row
    per customer, jti and action, as its unique constraint has it) and the notices it enqueues."""

    def __init__(self) -> None:
        self.secret: SecretData | None = None
        self.rows: set[tuple[str, str, str]] = set()
        self.notices: list[Notice] = []

    async def apply(self, manifest: dict[str, Any]) -> None:
        data = {key: base64.b64decode(value) for key, value in manifest["data"].items()}
        self.secret = SecretData(data, dict(manifest["metadata"]["annotations"]), {})

    async def record_license(
        self, session: Any, record: LicenseRecord, action: str, metadata: Any = None
    ) -> bool:
        row = (record.customer_id, record.jti, action)
        inserted = row not in self.rows
        self.rows.add(row)
        return inserted

    async def enqueue(self, session: Any, notice: Notice, spec: CustomerSpec) -> bool:
        self.notices.append(notice)
        return True

    async def revoke_recorded(self, session: Any, customer_id: str, jti: str) -> bool:
        return (customer_id, jti, "revoked") in self.rows

    def context(self) -> OperatorContext:
        class Session:
            def begin(self) -> Session:
                return self

            async def __aenter__(self) -> Session:
                return self

            async def __aexit__(self, *exc: object) -> None:
                return None

            async def execute(self, statement: Any, parameters: Any = None) -> None:
                return None

        return cast(
            OperatorContext,
            SimpleNamespace(
                settings=Settings(),
                keys=SigningKeys(generate_private_key()),
                kube=SimpleNamespace(apply=self.apply),
                outbox=SimpleNamespace(enqueue=self.enqueue),
                sessions=Session,
                mirrored=set(),
            ),
        )


def _reported(target: PassTarget, jti: str | None) -> PassTarget:
    """`target` whose Customer's status reports the licence `jti` (what its last completed pass wrote)."""
    status = CustomerStatus(license=LicenseStatus(jti=jti))
    return replace(target, customer=target.customer.model_copy(update={"status": status}))


def _on_plan(customer_spec: dict[str, Any], plan: str) -> dict[str, Any]:
    return {**customer_spec, "subscription": {**customer_spec["subscription"], "plan": plan}}


@pytest.mark.parametrize(
    ("before", "after", "now"),
    [
        # A plan change while restricted: the restricted licence it replaces said so already.
        (_on_plan(_past_due(10), "professional"), _past_due(10), NOW),
        # A paid licence gone over to a new, incomplete subscription months after the trial ended.
        (
            {"billing": {"mode": "stripe"}, "subscription": subscription("active", plan="starter")},
            {"billing": {"mode": "stripe"}, "subscription": {"status": "incomplete", "plan": "professional"}},
            NOW + timedelta(days=200),
        ),
    ],
)
async def test_a_licence_recorded_before_a_lost_status_write_sends_no_withheld_notice(
    monkeypatch: pytest.MonkeyPatch, before: dict[str, Any], after: dict[str, Any], now: datetime
) -> None:
    """Found in review: the retry after a lost status write recorded the licence again (its row already
    there) and sent the notice the first pass had held back, as the replaced licence was unknown then."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    ctx = parts.context()
    held = await ensure_license(ctx, _target_of(before, now=now), None)
    parts.notices.clear()
    aimed = _reported(_target_of(after, now=now), held.jti)
    minted = await ensure_license(ctx, aimed, parts.secret)
    assert minted.jti != held.jti and parts.notices == []
    # Its status write lost: the next pass finds the new licence in the Secret, the old one reported.
    again = await ensure_license(ctx, aimed, parts.secret)
    assert again.jti == minted.jti
    assert [notice.kind for notice in parts.notices] == []


def test_a_licence_issued_in_the_future_beyond_the_leeway_is_minted_again() -> None:
    """Found in review: a licence minted while the operator's clock was ahead (instances refuse it: "not
    valid before") was kept once the clock was right, as renewal_due only saw more time left."""
    target = _target_of({"plan": "starter"})
    desired = desired_claims(cast(OperatorContext, SimpleNamespace(settings=Settings())), target)

    def minted_ahead_by(seconds: int) -> dict[str, Any]:
        times = ("iat", "nbf", "exp", "issuedAt", "expiresAt")
        return {**desired, **{claim: desired[claim] + seconds for claim in times}}

    assert needs_new_license(minted_ahead_by(10 * 60), desired, target.entitlement, NOW)
    # Within the verifiers' leeway (60 s), and a licence of now, stay.
    assert not needs_new_license(minted_ahead_by(30), desired, target.entitlement, NOW)
    assert not needs_new_license(desired, desired, target.entitlement, NOW)


def test_housekeeping_runs_a_pass_for_a_licence_issued_beyond_the_leeway() -> None:
    """Found in review: only a pass re-minted a licence issued while the operator's clock was ahead, and
    the housekeeping, asking renewal_due alone, ran none (a trial's licence, capped by its end, too)."""
    for customer_spec, plan, lifetime in (
        (spec(plan="starter"), "starter", 30),
        (spec(trial={"days": 5}), "trial", 5),
    ):
        issued = NOW + timedelta(hours=2)
        ahead = CustomerStatus(
            plan=plan, license=LicenseStatus(issued_at=issued, expires_at=CREATED + timedelta(days=lifetime))
        )
        assert housekeeping_due(customer_spec, ahead, CREATED, NOW) == "LicenseRenewal", plan
        within = ahead.model_copy(
            update={
                "license": LicenseStatus(
                    issued_at=NOW + timedelta(seconds=30), expires_at=CREATED + timedelta(days=lifetime)
                )
            }
        )
        assert housekeeping_due(customer_spec, within, CREATED, NOW) is None, plan


def test_a_subscription_canceled_with_its_payment_unpaid_says_the_payment_is_overdue() -> None:
    """Found in review: a subscription Stripe canceled at the end of dunning read PaymentOverdue False
    "no payment overdue" while its renewal was still owed. It says so, and when the payment first failed;
    the licence stays unlicensed, with no further step of the ladder (nothing next, no minutely pass)."""
    from iotistic_billing.operator.conditions import ConditionValue, payment_condition

    canceled = subscription("canceled")
    canceled["pastDueSince"] = datetime(2026, 11, 2, 9, 30, tzinfo=UTC).isoformat()
    stripe_spec = {"billing": {"mode": "stripe"}, "subscription": canceled}
    entitlement = effective_plan(spec(**stripe_spec), CREATED, NOW)
    assert (entitlement.plan, entitlement.lapsed, entitlement.restricted) == ("unlicensed", True, False)
    assert entitlement.next_step_at is None
    owed = ConditionValue(
        "PaymentOverdue",
        True,
        "CanceledUnpaid",
        "Stripe subscription canceled with the payment that failed 2026-11-02 unpaid",
    )
    assert payment_condition(entitlement, stripe_billed=True) == owed
    # Under an administrator's suspension it says the same, as it does of the ladder's steps.
    suspended = effective_plan(spec(**stripe_spec, suspended=True), CREATED, NOW)
    assert payment_condition(suspended, stripe_billed=True) == owed
    # Canceled paid up (or the open invoice paid since): no payment overdue.
    paid_up = effective_plan(
        spec(billing={"mode": "stripe"}, subscription=subscription("canceled")), CREATED, NOW
    )
    assert payment_condition(paid_up, stripe_billed=True) == ConditionValue(
        "PaymentOverdue", False, "PaymentsCurrent", "no payment overdue"
    )

    outcome = PassOutcome(license=LicenseStatus(jti="j1"), release=DEPLOYED)
    dunned = _pass_of(_past_due(22), CustomerStatus(), outcome)
    ended = next_status(dunned, _target_of(stripe_spec), outcome, generation=2)
    step = PassResult(status=ended, previous_phase=dunned.phase, previous_payment_step="Suspended")
    assert [(kind, reason) for kind, reason, _ in step.events if reason.startswith("Payment")] == [
        ("Warning", "PaymentCanceledUnpaid")
    ]
    assert housekeeping_due(spec(**stripe_spec), ended, CREATED, NOW + timedelta(days=30)) is None


def test_a_suspended_past_due_customer_still_says_its_payment_is_overdue() -> None:
    """Found in review: a suspension hid the dunning ladder (PaymentOverdue False "no payment overdue",
    a PaymentPaymentsCurrent Event), and its lifting posted PaymentRestricted again."""

    def pass_of(customer_spec: dict[str, Any], previous: CustomerStatus) -> PassResult:
        status = next_status(previous, _target_of(customer_spec), PassOutcome(), generation=2)
        overdue = previous.condition("PaymentOverdue")
        return PassResult(
            status=status,
            previous_phase=previous.phase,
            previous_payment_step=overdue.reason if overdue is not None else None,
        )

    dunned = pass_of(_past_due(10), CustomerStatus())
    restricted = dunned.status.condition("PaymentOverdue")
    assert restricted is not None and (restricted.status, restricted.reason) == ("True", "Restricted")
    suspended = pass_of({**_past_due(10), "suspended": True}, dunned.status)
    assert suspended.status.phase == "Suspended"
    overdue = suspended.status.condition("PaymentOverdue")
    assert overdue is not None
    assert (overdue.status, overdue.reason, overdue.message) == ("True", "Restricted", restricted.message)
    assert [reason for _, reason, _ in suspended.events] == ["Suspended"]
    lifted = pass_of(_past_due(10), suspended.status)
    assert not [reason for _, reason, _ in lifted.events if reason.startswith("Payment")]
    # The ladder goes on under the suspension: its next step is due as it would be without it.
    later = NOW + timedelta(days=12)
    assert (
        housekeeping_due(spec(**_past_due(10), suspended=True), suspended.status, CREATED, later) is not None
    )


def test_the_plan_shown_is_the_licence_s_until_a_licence_of_the_new_one_is_issued() -> None:
    """Found in review: a payment that recovered from the Suspended step while PostgreSQL was away showed
    PLAN starter while the licence Secret still held the unlicensed licence (LicenseIssued False); so
    did a licence that cannot be minted (LicenseFailed), for good, as no later pass mends that."""
    licensed = PassOutcome(
        license=LicenseStatus(jti="j1"),
        release=DEPLOYED,
        health=InstanceHealth(True, "DeploymentsAvailable", "6 available"),
    )
    cut_off = _pass_of(_past_due(22), CustomerStatus(), licensed)
    assert (cut_off.plan, cut_off.phase) == ("unlicensed", "Expired")
    paid = {"billing": {"mode": "stripe"}, "subscription": subscription("active", plan="starter")}
    away = _pass_of(paid, cut_off, PassOutcome(license_unavailable="PostgreSQL cannot be reached"))
    assert away.plan == "unlicensed"
    assert away.condition("LicenseIssued").reason == "DatabaseUnavailable"  # type: ignore[union-attr]
    # The change is still due: the housekeeping runs the pass that licenses it.
    assert housekeeping_due(spec(**paid), away, CREATED, NOW + timedelta(minutes=1)) is not None
    assert _pass_of(paid, cut_off, PassOutcome(license_error="no signing key")).plan == "unlicensed"
    issued = _pass_of(paid, away, replace(licensed, license=LicenseStatus(jti="j2")))
    assert issued.plan == "starter"
    assert _pass_of(paid, issued, replace(licensed, license=LicenseStatus(jti="j2"))).plan == "starter"
    # No licence issued yet: no plan granted.
    assert _pass_of(paid, CustomerStatus(), PassOutcome(license_error="no signing key")).plan is None


async def test_a_licence_secret_whose_usage_key_was_taken_out_gets_a_new_licence_and_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: with the licence still current, a Secret whose usage-api-key was removed by hand
    stayed so (a new key was made and dropped), and the exporter's Pod, which takes the key by
    secretKeyRef, could not start again until the licence was renewed, about 20 days on."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    ctx = parts.context()
    target = _target_of({"plan": "starter"})
    first = await ensure_license(ctx, target, None)
    assert parts.secret is not None
    first_key = parts.secret.data[USAGE_API_KEY_KEY]
    unchanged = await ensure_license(ctx, _reported(target, first.jti), parts.secret)
    assert unchanged.jti == first.jti and parts.secret.data[USAGE_API_KEY_KEY] == first_key

    del parts.secret.data[USAGE_API_KEY_KEY]
    again = await ensure_license(ctx, _reported(target, first.jti), parts.secret)
    assert again.jti != first.jti
    assert parts.secret.data[USAGE_API_KEY_KEY] not in (b"", first_key)


def test_a_paused_subscription_s_licence_says_it_is_suspended() -> None:
    """Found in review: a Stripe subscription paused (its trial ended without a payment method) took the
    customer to the unlicensed feature set with no notice: no Stripe event's notice covers a pause, and
    the licence's said nothing. Once, with the licence that enters it."""
    paused = {"billing": {"mode": "stripe"}, "subscription": subscription("paused", plan="professional")}
    notice = _notice_of(_target_of(paused), _licence("professional", "j-paid"))
    assert notice is not None and notice.kind == NoticeKind.LICENSE_SUSPENDED
    assert "Stripe subscription paused" in notice.lines[1]
    assert _notice_of(_target_of(paused), _licence("unlicensed", "j-paused")) is None  # a renewal


def test_housekeeping_looks_again_for_a_webhook_secret_but_not_at_a_refused_url() -> None:
    """Found in review: a webhook URL refused (InvalidWebhookUrl) ran a full pass every minute for
    good, though only a spec change, which runs a pass of its own, can mend it. A Secret not found yet
    is looked for again (it may have been created since: no watch sees it)."""
    hooked = spec(
        plan="starter", notifications={"webhook": {"url": "https://a..b/", "secretRef": {"name": "h"}}}
    )
    issued = NOW - timedelta(days=1)
    licence = LicenseStatus(issued_at=issued, expires_at=issued + timedelta(days=30))

    def status_with(reason: str) -> CustomerStatus:
        condition = {
            "type": "NotificationsReady",
            "status": "False",
            "reason": reason,
            "message": "m",
            "lastTransitionTime": NOW.isoformat(),
        }
        return CustomerStatus.model_validate(
            {"plan": "starter", "license": licence.to_k8s(), "conditions": [condition]}
        )

    assert housekeeping_due(hooked, status_with("SecretNotFound"), CREATED, NOW) == "SecretNotFound"
    assert housekeeping_due(hooked, status_with("InvalidWebhookUrl"), CREATED, NOW) is None


def _cancelling(period_end: datetime, cancels: bool = True) -> dict[str, Any]:
    """A Stripe-billed Customer whose active subscription is set to cancel at its period's end (or not)."""
    return {
        "billing": {"mode": "stripe"},
        "subscription": {**subscription("active", period_end=period_end), "cancelAtPeriodEnd": cancels},
    }


def _held(parts: LicenceStepParts, ctx: OperatorContext) -> dict[str, Any]:
    """The claims of the licence in the fake Secret."""
    assert parts.secret is not None
    claims = license_step.verified_claims(ctx, parts.secret.data[LICENSE_JWT_KEY].decode())
    assert claims is not None
    return claims


async def test_a_subscription_set_to_cancel_is_licensed_to_its_period_end_and_in_full_once_undone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the licence of a subscription set to cancel at its period's end ran its 30 days
    past that end when no pass came then (operator down, Customer stalled). Capped there now, it must
    not be renewed as its last third begins (no later end to give), and a cancellation undone, or one
    made after a full licence was minted, must get its licence minted again at once, not at the old
    one's renewal: the reactivated customer's instance would stop at the old period's end."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    ctx = parts.context()
    period_end = NOW + timedelta(days=5)
    cancelling = _cancelling(period_end)
    first = await ensure_license(ctx, _target_of(cancelling), None)
    assert first.expires_at == period_end
    assert _held(parts, ctx)["subscription"]["cancelAtPeriodEnd"] is True

    # Four days on, a fifth of its lifetime left: renewing cannot give it more time, so it stays.
    later = NOW + timedelta(days=4)
    target = _reported(_target_of(cancelling, now=later), first.jti)
    assert not needs_new_license(_held(parts, ctx), desired_claims(ctx, target), target.entitlement, later)
    assert (await ensure_license(ctx, target, parts.secret)).jti == first.jti
    capped = CustomerStatus(plan="professional", license=LicenseStatus(issued_at=NOW, expires_at=period_end))
    assert housekeeping_due(spec(**cancelling), capped, CREATED, later) is None
    # At the period's end the plan lapses, and the housekeeping runs the pass that says so.
    assert housekeeping_due(spec(**cancelling), capped, CREATED, period_end) == c.SUBSCRIPTION_LAPSED

    # The cancellation undone a day in: a full licence at once, with no cancelAtPeriodEnd claim.
    day = NOW + timedelta(days=1)
    reactivated = await ensure_license(
        ctx, _reported(_target_of(_cancelling(period_end, cancels=False), now=day), first.jti), parts.secret
    )
    assert reactivated.jti != first.jti
    assert reactivated.expires_at == day + timedelta(days=30)
    assert "cancelAtPeriodEnd" not in _held(parts, ctx)["subscription"]
    # And set again: capped at once, not left to run its 30 days.
    again = await ensure_license(
        ctx, _reported(_target_of(cancelling, now=day), reactivated.jti), parts.secret
    )
    assert (again.jti != reactivated.jti, again.expires_at) == (True, period_end)


def test_a_subscription_ending_in_a_fraction_of_a_second_has_lapsed_on_the_whole_second() -> None:
    """Found in review: with the licence capped at the period's end, a Customer judged active in the last
    fraction of its end's second (an end like 12:00:00.5Z) would need a licence ending before it was
    issued: its pass failed. It lapses on the whole second, as a trial does."""
    ending = _cancelling(NOW + timedelta(milliseconds=500))
    entitlement = effective_plan(spec(**ending), CREATED, NOW)
    assert (entitlement.plan, entitlement.reason) == ("unlicensed", c.SUBSCRIPTION_LAPSED)
    claims = desired_claims(cast(OperatorContext, SimpleNamespace(settings=Settings())), _target_of(ending))
    assert claims["plan"] == "unlicensed"
    active = effective_plan(spec(**_cancelling(NOW + timedelta(seconds=1))), CREATED, NOW)
    assert (active.plan, active.cancel_at_period_end) == ("professional", True)
