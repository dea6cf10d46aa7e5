"""What a Customer is entitled to while suspended or revoked, and what its licence step tells the customer."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, cast

import prometheus_client
import pytest

from iotistic_billing.customer import REVOKED_LICENSE, Customer, CustomerStatus, LicenseStatus, TrialStatus
from iotistic_billing.notices.content import NoticeKind
from iotistic_billing.operator import constants as c
from iotistic_billing.operator import license as license_step
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.license import desired_claims, ensure_license
from iotistic_billing.operator.metrics import forget_customer
from iotistic_billing.operator.notices import trial_ending_notice
from iotistic_billing.operator.outcomes import InstanceHealth, PassOutcome
from iotistic_billing.operator.state import PassTarget, next_status
from iotistic_billing.settings import Settings
from tests.unit.test_operator_state import (
    CREATED,
    DEPLOYED,
    NOW,
    LicenceStepParts,
    _reported,
    _target_of,
)


def _revoked(target: PassTarget, jti: str) -> PassTarget:
    """`target` whose Customer carries the revoke route's REVOKED_LICENSE annotation naming `jti`."""
    metadata = target.customer.metadata.model_copy(update={"annotations": {REVOKED_LICENSE: jti}})
    return replace(target, customer=target.customer.model_copy(update={"metadata": metadata}))


async def starter_licensed(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[LicenceStepParts, OperatorContext, LicenseStatus]:
    """The licence step's fakes in place, and a starter Customer's licence issued (its notices cleared)."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    monkeypatch.setattr(license_step, "revoke_recorded", parts.revoke_recorded)
    ctx = parts.context()
    held = await ensure_license(ctx, _target_of({"plan": "starter"}), None)
    parts.notices.clear()
    return parts, ctx, held


async def test_a_revoke_is_one_notice_with_its_reason_not_a_second_suspended_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the revoke route writes `license.revoked` with the admin's reason and sets
    spec.suspended; the operator's next pass, seeing a suspension, sent `license.suspended` "suspended by
    an administrator" too: two mails for one action, the second without the reason."""
    parts, ctx, held = await starter_licensed(monkeypatch)

    # The route revoked `held` (its row and notice are the route's) and suspended the Customer.
    revoked = _revoked(_reported(_target_of({"plan": "starter", "suspended": True}), held.jti), held.jti)
    parts.rows.add((revoked.customer_id, held.jti, "revoked"))
    minted = await ensure_license(ctx, revoked, parts.secret)
    assert minted.jti != held.jti and parts.notices == []
    # The unlicensed licence is a licence the instance holds: its history row stays.
    row = (revoked.customer_id, minted.jti, "suspended")
    assert row in parts.rows

    # Its row lost with the pass (PostgreSQL away after the Secret was written): the retry, which does
    # not know the licence it replaced, holds the notice back as well (the status still reports `held`).
    parts.rows.discard(row)
    assert (await ensure_license(ctx, revoked, parts.secret)).jti == minted.jti
    assert row in parts.rows and parts.notices == []


async def test_a_revoke_whose_record_was_lost_leaves_the_suspension_s_notice_to_tell_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a revoke whose commit was lost after its patch (PostgreSQL at the commit, or the
    patch's answer lost) has no row and no notice, and the pass it started held its own notice back: the
    customer was cut off and told nothing unless an admin retried."""
    parts, ctx, held = await starter_licensed(monkeypatch)

    revoked = _revoked(_reported(_target_of({"plan": "starter", "suspended": True}), held.jti), held.jti)
    await ensure_license(ctx, revoked, parts.secret)
    assert [notice.kind for notice in parts.notices] == [NoticeKind.LICENSE_SUSPENDED]


@pytest.mark.parametrize("by", ["revoke", "console"])
async def test_a_reinstatement_recorded_after_a_new_suspension_does_not_say_reinstated(
    monkeypatch: pytest.MonkeyPatch, by: str
) -> None:
    """Found in review: a resumed Customer's pass wrote its reinstated licence to the Secret and lost its
    commit (row and license.reinstated rolled back); an admin revoked that licence (its row and
    license.revoked) or suspended the Customer before the retry, which recorded the licence late as
    reinstated and sent "back on the starter plan" to a customer cut off, after the revoke's word."""
    parts, ctx, held = await starter_licensed(monkeypatch)
    suspended_spec = {"plan": "starter", "suspended": True}
    suspended = await ensure_license(ctx, _reported(_target_of(suspended_spec), held.jti), parts.secret)
    resumed = _reported(_target_of({"plan": "starter"}), suspended.jti)
    reinstated = await ensure_license(ctx, resumed, parts.secret)
    parts.rows.discard((resumed.customer_id, reinstated.jti, "reinstated"))  # its commit lost
    parts.notices.clear()

    again = _reported(_target_of(suspended_spec), suspended.jti)
    if by == "revoke":  # the route's row and notice, and its annotation
        parts.rows.add((again.customer_id, reinstated.jti, "revoked"))
        again = _revoked(again, reinstated.jti)
    replaced = await ensure_license(ctx, again, parts.secret)
    assert (again.customer_id, reinstated.jti, "reinstated") in parts.rows
    assert (again.customer_id, replaced.jti, "suspended") in parts.rows
    # The revoke's license.revoked told it; a suspension by the console, its licence's own notice.
    told = [] if by == "revoke" else [NoticeKind.LICENSE_SUSPENDED]
    assert [notice.kind for notice in parts.notices] == told


async def test_a_trial_s_end_lost_with_a_reinstatement_is_told_when_the_next_suspension_lifts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trial.ended that a lost reinstatement's commit took with it is not told while the Customer is
    suspended again (no trial notice goes out meanwhile), nor lost: the licence lifting that suspension
    tells it (keyed by the trial's end, once)."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    monkeypatch.setattr(license_step, "revoke_recorded", parts.revoke_recorded)
    ctx = parts.context()
    trial, day = {"trial": {"days": 14}}, timedelta(days=1)  # ends on day 11 from NOW
    held = await ensure_license(ctx, _target_of(trial), None)
    suspended = {**trial, "suspended": True}
    cut = await ensure_license(ctx, _reported(_target_of(suspended, NOW + day), held.jti), parts.secret)
    resumed = _reported(_target_of(trial, NOW + 12 * day), cut.jti)
    reinstated = await ensure_license(ctx, resumed, parts.secret)
    parts.rows.discard((resumed.customer_id, reinstated.jti, "reinstated"))  # its commit lost
    parts.notices.clear()

    again = await ensure_license(ctx, _reported(_target_of(suspended, NOW + 12 * day), cut.jti), parts.secret)
    assert [notice.kind for notice in parts.notices] == [NoticeKind.LICENSE_SUSPENDED]
    parts.notices.clear()
    await ensure_license(ctx, _reported(_target_of(trial, NOW + 13 * day), again.jti), parts.secret)
    assert [notice.kind for notice in parts.notices] == [NoticeKind.TRIAL_ENDED]


@pytest.mark.parametrize("annotation", [None, "j-revoked-long-ago"])
async def test_a_suspension_that_is_no_revoke_still_says_so(
    monkeypatch: pytest.MonkeyPatch, annotation: str | None
) -> None:
    """A suspension by the console or the CLI (no revoke), or one after a revoke that was lifted since
    (REVOKED_LICENSE names an older licence than the one replaced), is the customer's only word of it."""
    parts, ctx, held = await starter_licensed(monkeypatch)

    suspended = _reported(_target_of({"plan": "starter", "suspended": True}), held.jti)
    if annotation is not None:
        suspended = _revoked(suspended, annotation)
    minted = await ensure_license(ctx, suspended, parts.secret)
    assert [notice.kind for notice in parts.notices] == [NoticeKind.LICENSE_SUSPENDED]

    # Recorded after a lost row, it is still noticed (once the row is written).
    parts.rows.discard((suspended.customer_id, minted.jti, "suspended"))
    parts.notices.clear()
    await ensure_license(ctx, suspended, parts.secret)
    assert [notice.kind for notice in parts.notices] == [NoticeKind.LICENSE_SUSPENDED]


def _customer(customer_spec: dict[str, Any]) -> dict[str, Any]:
    """A Customer's body as _target_of builds it (created 3 days before NOW)."""
    return {
        "metadata": {"name": "acme", "uid": "u-1", "creationTimestamp": CREATED.isoformat()},
        "spec": {"email": "a@b.cd", "companyName": "x", **customer_spec},
    }


def test_a_suspended_trial_keeps_its_end_and_says_that_the_suspension_holds_it() -> None:
    """Found in review: a Customer suspended on day 3 of a 14-day trial read status.trial {isTrialMode:
    false, endsAt: null}, TrialActive False "not in a trial", an empty TRIAL-ENDS column, though the
    trial's clock runs on; its resumption on day 10 brought the same end back."""
    trial = {"trial": {"days": 14}}
    ends_at = CREATED + timedelta(days=14)
    outcome = PassOutcome(
        license=LicenseStatus(jti="j1", issued_at=NOW, expires_at=NOW + timedelta(days=30)),
        release=DEPLOYED,
        health=InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, "6 available"),
    )
    trialing = next_status(CustomerStatus(), _target_of(trial), outcome, generation=2)
    suspended = next_status(trialing, _target_of({**trial, "suspended": True}), outcome, generation=3)
    # In a running trial is what isTrialMode says: none runs for the customer while it is suspended.
    assert suspended.trial == TrialStatus(is_trial_mode=False, ends_at=ends_at)
    assert suspended.to_k8s()["trial"] == {"isTrialMode": False, "endsAt": "2026-12-06T12:00:00Z"}
    condition = suspended.condition("TrialActive")
    assert condition is not None and (condition.status, condition.reason) == ("False", "Suspended")
    assert condition.message == (
        "suspended by an administrator; a suspension does not stop the trial's clock:"
        f" it ends (or ended) {ends_at.isoformat()}"
    )

    resumed = next_status(suspended, _target_of(trial, now=NOW + timedelta(days=7)), outcome, generation=4)
    assert resumed.trial == TrialStatus(is_trial_mode=True, ends_at=ends_at)
    condition = resumed.condition("TrialActive")
    assert condition is not None and (condition.status, condition.reason) == ("True", "TrialActive")

    # A trial that ended during the suspension: its end stays, and nothing says it still runs.
    late = _target_of({**trial, "suspended": True}, now=NOW + timedelta(days=20))
    assert (late.entitlement.trial_active, late.entitlement.trial_ends_at) == (False, ends_at)


def test_the_licence_of_a_suspended_trial_claims_no_trial_and_no_trial_notice_goes_out_meanwhile() -> None:
    """The licence minted under a suspension grants nothing of the trial: it claims none, and is not cut
    short at the trial's end (a renewal due then would re-mint the same unlicensed licence). The "trial
    ends in 3 days" notice waits for the suspension's lifting: it asks the customer to choose a plan
    while an administrator holds the instance down; lifted within its days, the housekeeping's next
    check sends it."""
    trial = {"trial": {"days": 14}}
    ctx = cast(OperatorContext, SimpleNamespace(settings=Settings()))
    claims = desired_claims(ctx, _target_of({**trial, "suspended": True}))
    assert claims["plan"] == "unlicensed" and claims["trial"] == {"isTrialMode": False}
    assert claims["exp"] - claims["iat"] == 30 * 24 * 3600

    day_12 = NOW + timedelta(days=9)
    body = _customer({**trial, "suspended": True})
    assert trial_ending_notice(Customer.model_validate(body), body, day_12, 3) is None
    body = _customer(trial)
    notice = trial_ending_notice(Customer.model_validate(body), body, day_12, 3)
    assert notice is not None and notice.kind == NoticeKind.TRIAL_ENDING


@pytest.mark.parametrize("status", ["active", "trialing"])
def test_a_subscription_set_to_cancel_at_its_period_end_lapses_then_as_its_deletion_would(
    status: str,
) -> None:
    """Found in review: `active` with cancelAtPeriodEnd kept the paid plan after currentPeriodEnd until
    Stripe's deletion event was applied (days, with the webhook server down), while usage metering
    already billed the period after it as unpaid."""
    ends = NOW - timedelta(days=2)
    ending = {
        "status": status,
        "plan": "professional",
        "currentPeriodEnd": ends.isoformat(),
        "cancelAtPeriodEnd": True,
    }
    stripe = {"billing": {"mode": "stripe"}}
    lapsed = _target_of({**stripe, "subscription": ending})
    deleted = _target_of({**stripe, "subscription": {**ending, "status": "canceled"}})
    entitlement = lapsed.entitlement
    assert (entitlement.plan, entitlement.reason, entitlement.lapsed) == (
        "unlicensed",
        "SubscriptionLapsed",
        True,
    )
    assert (
        entitlement.message == f"Stripe subscription {status}, set to cancel at its period's end, 2026-11-23"
    )
    assert entitlement.payment_step is None and not entitlement.restricted
    # The licence is the one the deletion gives: when the deletion is applied, nothing is minted again.
    ctx = cast(OperatorContext, SimpleNamespace(settings=Settings()))
    assert desired_claims(ctx, lapsed) == desired_claims(ctx, deleted)

    # Until its end the plan is paid for; a subscription not set to cancel waits for Stripe's renewal.
    before = _target_of({**stripe, "subscription": ending}, now=ends - timedelta(seconds=1))
    assert before.entitlement.plan == "professional"
    renewing = _target_of({**stripe, "subscription": {**ending, "cancelAtPeriodEnd": False}})
    assert renewing.entitlement.plan == "professional"


def _ends_by_design(customer_id: str) -> float | None:
    return prometheus_client.REGISTRY.get_sample_value(
        "iotistic_operator_license_ends_by_design", {"customer_id": customer_id}
    )


async def test_a_licence_that_ends_by_design_is_exported_so_and_raises_no_expiry_alert(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a licence capped at the end of a subscription's period set to cancel (as a
    trial's last one at the trial's end) is not renewed by design, and IotisticLicenseExpiringSoon paged
    for each such customer in its last days. The licence step exports whether it ends by design, which
    the alert leaves out; one renewed as usual, and one whose cancellation was undone, are 0."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    monkeypatch.setattr(license_step, "revoke_recorded", parts.revoke_recorded)
    ctx = parts.context()
    ending = {
        "status": "active",
        "plan": "professional",
        "currentPeriodEnd": (NOW + timedelta(days=10)).isoformat(),
    }
    stripe = {"billing": {"mode": "stripe"}}
    cancelling = _target_of({**stripe, "subscription": {**ending, "cancelAtPeriodEnd": True}})

    capped = await ensure_license(ctx, cancelling, None)
    assert capped.expires_at == NOW + timedelta(days=10)
    assert _ends_by_design(cancelling.customer_id) == 1
    held = await ensure_license(ctx, _reported(cancelling, capped.jti), parts.secret)
    assert held.jti == capped.jti and _ends_by_design(cancelling.customer_id) == 1

    renewing = _target_of({**stripe, "subscription": {**ending, "cancelAtPeriodEnd": False}})
    await ensure_license(ctx, _reported(renewing, capped.jti), parts.secret)
    assert _ends_by_design(renewing.customer_id) == 0
    # A trial's licence, capped at the trial's end.
    trial = _target_of({"trial": {"days": 14}})
    assert (await ensure_license(ctx, trial, None)).expires_at == trial.entitlement.trial_ends_at
    assert _ends_by_design(trial.customer_id) == 1

    forget_customer(None, cancelling.customer_id)
    assert _ends_by_design(cancelling.customer_id) is None
