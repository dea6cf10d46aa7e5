"""What a Customer is entitled to while suspended or revoked, and what its licence step tells the customer."""

from __future__ import annotations

from dataclasses import replace

import pytest

from iotistic_billing.customer import REVOKED_LICENSE
from iotistic_billing.notices.content import NoticeKind
from iotistic_billing.operator import license as license_step
from iotistic_billing.operator.license import ensure_license
from iotistic_billing.operator.state import PassTarget
from tests.unit.test_operator_state import LicenceStepParts, _reported, _target_of


def _revoked(target: PassTarget, jti: str) -> PassTarget:
    """`target` whose Customer carries the revoke route's REVOKED_LICENSE annotation naming `jti`."""
    metadata = target.customer.metadata.model_copy(update={"annotations": {REVOKED_LICENSE: jti}})
    return replace(target, customer=target.customer.model_copy(update={"metadata": metadata}))


async def test_a_revoke_is_one_notice_with_its_reason_not_a_second_suspended_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the revoke route writes `license.revoked` with the admin's reason and sets
    spec.suspended; the operator's next pass, seeing a suspension, sent `license.suspended` "suspended by
    an administrator" too: two mails for one action, the second without the reason."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    ctx = parts.context()
    held = await ensure_license(ctx, _target_of({"plan": "starter"}), None)
    parts.notices.clear()

    # The route revoked `held` (its row and notice are the route's) and suspended the Customer.
    revoked = _revoked(_reported(_target_of({"plan": "starter", "suspended": True}), held.jti), held.jti)
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


@pytest.mark.parametrize("annotation", [None, "j-revoked-long-ago"])
async def test_a_suspension_that_is_no_revoke_still_says_so(
    monkeypatch: pytest.MonkeyPatch, annotation: str | None
) -> None:
    """A suspension by the console or the CLI (no revoke), or one after a revoke that was lifted since
    (REVOKED_LICENSE names an older licence than the one replaced), is the customer's only word of it."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    ctx = parts.context()
    held = await ensure_license(ctx, _target_of({"plan": "starter"}), None)
    parts.notices.clear()

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
