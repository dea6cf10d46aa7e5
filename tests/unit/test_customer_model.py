"""The Customer models read what the API server returns and write status the CRD accepts."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from iotistic_billing.customer import (
    API_VERSION,
    EMAIL_PATTERN,
    KIND,
    Condition,
    ConditionStatus,
    ConditionType,
    Customer,
    CustomerSpec,
    CustomerStatus,
    InvalidSpecError,
    LicenseStatus,
    Phase,
    TrialSpec,
    name_errors,
    parse_spec,
    set_condition,
    spec_errors,
)
from iotistic_billing.operator.reconcile import merge_patch
from iotistic_billing.rollout import RolloutStatus

SAMPLES = sorted((Path(__file__).parents[2] / "manifests" / "samples").glob("*.yaml"))
NOW = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)

# A Customer as kube-apiserver v1.36 returned it after `kubectl apply` of {email, companyName} and a
# status patch: the CRD's defaults filled in, camelCase names, RFC 3339 times.
FROM_API_SERVER: dict[str, Any] = {
    "apiVersion": "iotistic.io/v1alpha1",
    "kind": "Customer",
    "metadata": {
        "name": "t1",
        "uid": "6f1c2d2e-8a57-4a59-9f0e-0a4b1f7c2d11",
        "generation": 3,
        "resourceVersion": "412",
        "creationTimestamp": "2026-02-20T09:00:00Z",
        "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update"}],
        "finalizers": ["iotistic.io/cleanup"],
    },
    "spec": {
        "billing": {"mode": "manual"},
        "companyName": "Acme",
        "email": "a@b.io",
        "instance": {"enabled": True},
        "notifications": {},
        "plan": "trial",
        "suspended": False,
        "trial": {"days": 14},
    },
    "status": {
        "customerId": "cust_abcdef",
        "phase": "Ready",
        "plan": "trial",
        "observedGeneration": 3,
        "trial": {"isTrialMode": True, "endsAt": "2026-03-06T09:00:00Z"},
        "license": {
            "secretName": "iotistic-license",
            "jti": "0d8e6c1e",
            "keyId": "k1",
            "issuedAt": "2026-02-20T09:00:05Z",
            "expiresAt": "2026-03-06T09:00:00Z",
            "sha256": "a" * 64,
        },
        "release": {
            "name": "iotistic",
            "namespace": "customer-t1",
            "revision": 2,
            "chartVersion": "0.1.0",
            "valuesHash": "b" * 64,
        },
        "instance": {"namespace": "customer-t1", "url": "https://t1.iotistic.cloud"},
        "usage": {
            "periodStart": "2026-02-01T00:00:00Z",
            "activeDevices": 4,
            "lastReportAt": "2026-03-01T12:00:00Z",
        },
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Reconciled",
                "message": "instance is ready",
                "lastTransitionTime": "2026-02-20T09:01:00Z",
                "observedGeneration": 3,
            }
        ],
        "kopf": {"progress": {"reconcile": {"retries": 1}}},
    },
}


def test_a_customer_from_the_api_server_parses_into_typed_objects() -> None:
    parsed = Customer.model_validate(FROM_API_SERVER)

    assert parsed.metadata.name == "t1"
    assert parsed.metadata.creation_timestamp == datetime(2026, 2, 20, 9, tzinfo=UTC)
    assert parsed.spec.company_name == "Acme"
    assert parsed.spec.trial.days == 14
    assert parsed.spec.billing.mode == "manual"
    assert parsed.status.phase is Phase.READY
    assert parsed.status.license is not None
    assert parsed.status.license.expires_at == datetime(2026, 3, 6, 9, tzinfo=UTC)
    ready = parsed.status.condition(ConditionType.READY)
    assert ready is not None
    assert ready.status is ConditionStatus.TRUE


def test_spec_and_status_dump_back_to_the_json_the_api_server_holds() -> None:
    parsed = Customer.model_validate(FROM_API_SERVER)

    assert parsed.spec.to_k8s() == FROM_API_SERVER["spec"]
    assert parsed.status.to_k8s() == FROM_API_SERVER["status"]


def test_the_model_applies_the_same_defaults_as_the_crd() -> None:
    minimal = CustomerSpec.model_validate({"email": "a@b.io", "companyName": "Acme"})

    assert minimal.to_k8s() == FROM_API_SERVER["spec"]


def test_snake_case_names_build_a_spec_too() -> None:
    spec = CustomerSpec(email="a@b.io", company_name="Acme", plan="professional", customer_id="cust_abc123")

    assert spec.to_k8s()["customerId"] == "cust_abc123"
    assert spec.to_k8s()["companyName"] == "Acme"


def test_status_dump_leaves_unset_fields_out_and_uses_crd_names() -> None:
    status = CustomerStatus(
        customer_id="cust_abc123",
        phase=Phase.PROVISIONING,
        license=LicenseStatus(secret_name="iotistic-license", issued_at=NOW),
    )

    assert status.to_k8s() == {
        "customerId": "cust_abc123",
        "phase": "Provisioning",
        "license": {"secretName": "iotistic-license", "issuedAt": "2026-03-01T12:30:15.123456Z"},
    }


def test_an_out_of_range_trial_is_named_with_its_bounds() -> None:
    assert spec_errors({"email": "a@b.io", "companyName": "Acme", "trial": {"days": 120}}) == [
        "spec.trial.days must be between 0 and 90, got 120"
    ]


def test_every_problem_of_a_spec_is_reported_with_its_path() -> None:
    problems = spec_errors(
        {
            "companyName": "",
            "plan": "gold",
            "customerId": "CUST-1",
            "billing": {"stripeCustomerId": "acct_1"},
            "subscription": {"status": "active", "lastEventCreated": -5},
            "colour": "blue",
        }
    )

    assert problems == [
        "spec.customerId must match ^cust_[a-z0-9]{6,32}$, got 'CUST-1'",
        "spec.email is required",
        "spec.companyName must not be empty",
        "spec.plan must be one of 'trial', 'starter', 'professional' or 'enterprise', got 'gold'",
        "spec.billing.stripeCustomerId must match ^cus_[A-Za-z0-9]+$, got 'acct_1'",
        "spec.subscription.lastEventCreated must be >= 0, got -5",
        "spec.colour is not a field of the Customer resource",
    ]


def test_parse_spec_raises_one_error_carrying_every_problem() -> None:
    with pytest.raises(InvalidSpecError) as raised:
        parse_spec({"email": "not-an-email", "companyName": "Acme", "trial": {"days": -1}})

    assert raised.value.problems == [
        "spec.email must be an email address (name@domain.tld, no spaces), got 'not-an-email'",
        "spec.trial.days must be between 0 and 90, got -1",
    ]
    assert str(raised.value) == "; ".join(raised.value.problems)


@pytest.mark.parametrize("space", ["\u00a0", "\u2003", "\u3000", "\x0b", "\x1c", "\u0085", "\ufeff", " "])
def test_emails_with_any_whitespace_are_refused_alike_by_python_re_and_the_model(space: str) -> None:
    # The API server's Go \s is ASCII only; the pattern spells out the rest, so that an address the
    # webhook server (re) or the operator (pydantic) would refuse never gets past the CRD either.
    email = f"jane@acme.com{space}"
    assert re.fullmatch(EMAIL_PATTERN, email) is None
    assert spec_errors({"email": email, "companyName": "Acme"}) == [
        f"spec.email must be an email address (name@domain.tld, no spaces), got {email!r}"
    ]


@pytest.mark.parametrize("blank", ["  ", "\t", "\u00a0", "\u3000 ", "\x1c", "\ufeff"])
def test_a_blank_company_name_is_an_invalid_spec_naming_the_field(blank: str) -> None:
    """Found in review: "  " passed the model (and the CRD), and the licence minted from it was refused
    as "customer.name must not be empty": a LicenseFailed stall naming no field of the Customer."""
    with pytest.raises(InvalidSpecError) as raised:
        parse_spec({"email": "a@b.io", "companyName": blank})
    assert raised.value.problems == [f"spec.companyName must not be blank, got {blank!r}"]
    assert spec_errors({"email": "a@b.io", "companyName": f"{blank}Acme{blank}"}) == []


def test_unicode_addresses_stay_valid() -> None:
    assert spec_errors({"email": "jöhn@exämple.de", "companyName": "Acme"}) == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("acme.corp", "metadata.name must be lowercase letters, digits and '-'"),
        ("Acme", "metadata.name must be lowercase letters, digits and '-'"),
        ("-acme", "metadata.name must be lowercase letters, digits and '-'"),
        ("a" * 55, "metadata.name must be at most 54 characters long, got 55"),
    ],
)
def test_names_the_namespace_could_not_hold_are_named(name: str, problem: str) -> None:
    (message,) = name_errors(name)
    assert message.startswith(problem)


def test_names_that_make_a_namespace_name_are_fine() -> None:
    assert name_errors("a" * 54) == [] and name_errors("acme-01") == [] and len("customer-" + "a" * 54) == 63


def test_a_valid_spec_has_no_errors() -> None:
    assert spec_errors({"email": "a@b.io", "companyName": "Acme"}) == []


def test_trial_ends_days_after_creation_unless_ends_at_is_set() -> None:
    created = datetime(2026, 2, 20, 9, tzinfo=UTC)
    explicit = datetime(2026, 4, 1, tzinfo=UTC)

    assert TrialSpec().ends_at_for(created) == created + timedelta(days=14)
    assert TrialSpec(days=0).ends_at_for(created) == created
    assert TrialSpec(days=30, ends_at=explicit).ends_at_for(created) == explicit


def test_set_condition_keeps_the_transition_time_while_the_status_holds() -> None:
    first = set_condition(
        None,
        type_=ConditionType.READY,
        status=ConditionStatus.FALSE,
        reason="Installing",
        message="helm install running",
        observed_generation=1,
        now=NOW,
    )
    later = NOW + timedelta(minutes=5)
    same_status = set_condition(
        first,
        type_=ConditionType.READY,
        status=ConditionStatus.FALSE,
        reason="WaitingForWorkloads",
        message="2 of 6 deployments available",
        observed_generation=2,
        now=later,
    )
    flipped = set_condition(
        same_status,
        type_=ConditionType.READY,
        status=ConditionStatus.TRUE,
        reason="Reconciled",
        message="",
        observed_generation=2,
        now=later,
    )

    assert first[0].last_transition_time == NOW.replace(microsecond=0)
    assert same_status[0].last_transition_time == NOW.replace(microsecond=0)
    assert (same_status[0].reason, same_status[0].observed_generation) == ("WaitingForWorkloads", 2)
    assert flipped[0].last_transition_time == later.replace(microsecond=0)
    assert len(flipped) == 1


def test_set_condition_appends_a_new_type_and_keeps_the_others() -> None:
    ready = set_condition(
        None,
        type_=ConditionType.READY,
        status=ConditionStatus.TRUE,
        reason="Reconciled",
        message="",
        observed_generation=1,
        now=NOW,
    )
    both = set_condition(
        ready,
        type_=ConditionType.LICENSE_ISSUED,
        status=ConditionStatus.TRUE,
        reason="LicenseMinted",
        message="expires 2026-03-31",
        observed_generation=1,
        now=NOW,
    )

    assert [c.type for c in both] == ["Ready", "LicenseIssued"]
    assert CustomerStatus(conditions=both).to_k8s()["conditions"][1] == {
        "type": "LicenseIssued",
        "status": "True",
        "reason": "LicenseMinted",
        "message": "expires 2026-03-31",
        "lastTransitionTime": "2026-03-01T12:30:15Z",
        "observedGeneration": 1,
    }


def test_a_condition_reason_must_be_camel_case_as_metav1_requires() -> None:
    with pytest.raises(ValueError, match="reason"):
        Condition(
            type="Ready", status=ConditionStatus.TRUE, reason="not ok", message="", last_transition_time=NOW
        )


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        TrialSpec(ends_at=datetime(2026, 1, 1))


@pytest.mark.parametrize("sample", SAMPLES, ids=[path.name for path in SAMPLES])
def test_samples_are_valid_customers_ready_for_gitops(sample: Path) -> None:
    manifest = yaml.safe_load(sample.read_text())

    parsed = Customer.model_validate(manifest)

    assert (manifest["apiVersion"], manifest["kind"]) == (API_VERSION, KIND)
    assert "subscription" not in manifest["spec"], (
        "GitOps manifests must leave spec.subscription to the webhooks"
    )
    assert "status" not in manifest
    assert parsed.spec.subscription is None
    # Found in review: a Stripe-billed sample without spec.customerId went by an id derived from its uid;
    # deleted and made again from Git it was a new customer, whose subscription the restore did not find
    # (Stripe's events name the old id), and a checkout made it a second Stripe customer.
    if parsed.spec.billing.mode == "stripe":
        assert parsed.spec.customer_id is not None, "a Stripe-billed GitOps Customer pins spec.customerId"


@pytest.mark.parametrize("sample", SAMPLES, ids=[path.name for path in SAMPLES])
def test_samples_do_not_ask_gitops_to_delete_and_recreate_them(sample: Path) -> None:
    """Found in review: Flux's force (spec.force, or this annotation set to enabled) deletes and creates
    again an object whose apply the API server refuses as Invalid (fluxcd/pkg ssa takes any 422 for an
    immutable field), and Argo CD's Replace=true,Force=true does the same: a typo one of the CRD's rules
    refuses would uninstall the instance (the finalizer deletes its namespace, volumes and licence). No
    sample asks for it (README, "GitOps": keep Customers out of a forced Kustomization or Application)."""
    annotations = (yaml.safe_load(sample.read_text())["metadata"].get("annotations")) or {}
    labels = (yaml.safe_load(sample.read_text())["metadata"].get("labels")) or {}
    for held in (annotations, labels):
        assert held.get("kustomize.toolkit.fluxcd.io/force") != "enabled"
    options = {option.strip() for option in annotations.get("argocd.argoproj.io/sync-options", "").split(",")}
    assert not options & {"Force=true", "Replace=true"}


def test_there_are_samples_for_a_stripe_trial_and_a_paid_manual_customer() -> None:
    plans = {
        (spec.plan, spec.billing.mode)
        for spec in (Customer.model_validate(yaml.safe_load(path.read_text())).spec for path in SAMPLES)
    }

    # The README's checkout runs on the Stripe-billed one (a manual one is refused a subscription).
    assert ("trial", "stripe") in plans
    assert ("professional", "manual") in plans


def test_the_plan_names_are_the_plan_catalog_s() -> None:
    from iotistic_billing.customer import PLAN_NAMES
    from iotistic_billing.licensing.plans import PLAN_NAMES as CATALOG_NAMES

    assert PLAN_NAMES == CATALOG_NAMES


def test_a_license_history_row_is_a_license_record_with_its_action() -> None:
    """One record type from minting to the table to the API: the row's columns carry its fields."""
    from dataclasses import fields

    from iotistic_billing.db.models import LicenseHistory
    from iotistic_billing.licensing.minting import LicenseRecord
    from iotistic_billing.webhook_server.schemas import LicenseHistoryItem

    record_fields = {field.name for field in fields(LicenseRecord)}
    assert record_fields <= set(LicenseHistory.__table__.columns.keys())
    # The API item is the row without the customer id (the route's own).
    assert set(LicenseHistoryItem.model_fields) == (record_fields - {"customer_id"}) | {
        "id",
        "action",
        "metadata",
        "generated_at",
    }


def test_a_status_field_this_operator_does_not_know_is_ignored_and_left_in_place() -> None:
    """Found in review: the status models refused unknown fields, so an operator rolled back below a
    version that added a status field (helm keeps the newer CRD, and the field on every Customer) failed
    every pass. Status parts ignore such a field; the pass's merge patch does not name it, so it stays.
    A spec still refuses one (a typo in a manifest is named)."""
    body = copy.deepcopy(FROM_API_SERVER)
    body["status"]["fromANewerOperator"] = {"x": 1}
    body["status"]["license"]["newerField"] = "y"
    body["status"]["conditions"][0]["newerField"] = "z"
    parsed = Customer.model_validate(body)
    assert parsed.status.to_k8s() == FROM_API_SERVER["status"]
    written = parsed.status.model_copy(update={"phase": Phase.DEGRADED})
    patch = merge_patch(parsed.status.to_k8s(), written.to_k8s())
    assert patch["phase"] == "Degraded" and "fromANewerOperator" not in patch
    assert "newerField" not in patch["license"]

    rollout_status = RolloutStatus.model_validate(
        {"phase": "Succeeded", "newerField": 1, "steps": [{"x": 2}]}
    )
    assert rollout_status.to_k8s() == {"phase": "Succeeded", "steps": [{}]}

    with pytest.raises(InvalidSpecError, match="newerField"):
        parse_spec({**FROM_API_SERVER["spec"], "newerField": 1})
