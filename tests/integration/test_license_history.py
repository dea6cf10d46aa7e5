"""Licence audit history in the real PostgreSQL: idempotent rows, the earlier system's statistics,
never a token."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.api_keys import ROTATION_GRACE, new_usage_key, usage_key_hash
from iotistic_billing.db.license_history import license_history, record_license
from iotistic_billing.db.models import ApiKey, LicenseHistory
from iotistic_billing.licensing.keys import SigningKeys, generate_private_key, private_key_pem
from iotistic_billing.licensing.minting import (
    NO_TRIAL,
    LicenseCustomer,
    LicenseRecord,
    MintedLicense,
    SubscriptionTerms,
    mint_license,
)
from iotistic_billing.licensing.plans import PLANS
from iotistic_billing.operator.license import _record_usage_key
from iotistic_billing.webhook_server.schemas import LicenseHistoryItem

pytestmark = pytest.mark.integration

NOW = datetime(2025, 10, 21, 10, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def keys() -> SigningKeys:
    return SigningKeys(generate_private_key())


@pytest.fixture
def customer_id() -> str:
    return f"cust_{uuid.uuid4().hex[:12]}"


def mint(keys: SigningKeys, customer_id: str, plan: str = "starter", days: int = 0) -> MintedLicense:
    return mint_license(
        customer=LicenseCustomer(customer_id, "Acme Corp"),
        plan=PLANS[plan],
        trial=NO_TRIAL,
        subscription=SubscriptionTerms("active"),
        now=NOW + timedelta(days=days),
        keys=keys,
        issuer="https://billing.iotistic.cloud",
        audience="iotistic-instance",
    )


async def rows_of(session: AsyncSession, customer_id: str) -> list[dict[str, Any]]:
    result = await session.execute(
        text("SELECT * FROM license_history WHERE customer_id = :customer_id ORDER BY id"),
        {"customer_id": customer_id},
    )
    return [dict(row) for row in result.mappings()]


async def test_recorded_row_holds_the_hash_and_grants(
    db_session: AsyncSession, keys: SigningKeys, customer_id: str
) -> None:
    minted = mint(keys, customer_id, "professional")
    assert await record_license(db_session, minted, "generated", {"newPlan": "professional"}) is True
    [row] = await rows_of(db_session, customer_id)
    assert row["action"] == "generated"
    assert row["plan"] == "professional"
    assert row["max_devices"] == 50
    assert row["license_hash"] == minted.sha256
    assert (row["jti"], row["kid"]) == (minted.jti, keys.kid)
    assert (row["issued_at"], row["expires_at"]) == (minted.issued_at, minted.expires_at)
    assert row["features"] == PLANS["professional"].features.to_claims()
    assert row["limits"] == PLANS["professional"].limits.to_claims()
    assert row["metadata"] == {"newPlan": "professional"}


async def test_rows_never_contain_the_token_or_a_key(
    db_session: AsyncSession, keys: SigningKeys, customer_id: str
) -> None:
    minted = [mint(keys, customer_id, "starter"), mint(keys, customer_id, "professional", days=1)]
    await record_license(db_session, minted[0], "generated", {"newPlan": "starter"})
    await record_license(db_session, minted[1], "upgraded", {"oldPlan": "starter", "newPlan": "professional"})
    await record_license(db_session, minted[1], "revoked", {"reason": "Customer requested cancellation"})
    rows = await rows_of(db_session, customer_id)
    assert len(rows) == 3
    forbidden = [private_key_pem(keys.private_key).decode(), keys.public_key_pem().decode()]
    for license in minted:
        forbidden.append(license.token)
        forbidden.extend(license.token.split("."))
    for row in rows:
        for column, value in row.items():
            rendered = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
            for secret in forbidden:
                assert secret not in rendered, f"column {column} holds part of a token or key"
            assert "eyJ" not in rendered, f"column {column} holds something JWT-shaped"


async def test_same_jti_and_action_twice_leaves_one_row(
    db_session: AsyncSession, keys: SigningKeys, customer_id: str
) -> None:
    minted = mint(keys, customer_id)
    assert await record_license(db_session, minted, "generated") is True
    assert await record_license(db_session, minted, "generated", {"retry": True}) is False
    # A record read back from the token (as a retried operator step does) is the same fact.
    assert await record_license(db_session, LicenseRecord.from_token(minted.token), "generated") is False
    # Another action on the same licence is another fact.
    assert await record_license(db_session, minted, "revoked", {"reason": "deleted"}) is True
    count = await db_session.scalar(
        select(func.count()).select_from(LicenseHistory).where(LicenseHistory.customer_id == customer_id)
    )
    assert count == 2
    assert [row["metadata"] for row in await rows_of(db_session, customer_id)] == [{}, {"reason": "deleted"}]


async def test_history_and_the_earlier_systems_statistics(
    db_session: AsyncSession, keys: SigningKeys, customer_id: str
) -> None:
    # The earlier system's example: five generations, three `generated` and two `upgraded`, on two plans.
    plan_actions = [
        ("starter", "generated"),
        ("starter", "generated"),
        ("professional", "upgraded"),
        ("professional", "generated"),
        ("professional", "upgraded"),
    ]
    minted = []
    for day, (plan, action) in enumerate(plan_actions):
        license = mint(keys, customer_id, plan, days=day)
        minted.append(license)
        assert await record_license(db_session, license, action)
    await record_license(db_session, mint(keys, f"cust_{uuid.uuid4().hex[:12]}"), "generated")  # someone else

    report = await license_history(db_session, customer_id)
    assert report.customer_id == customer_id
    assert report.statistics == {
        "totalGenerations": 5,
        "byAction": {"generated": 3, "upgraded": 2},
        "byPlan": {"starter": 2, "professional": 3},
    }
    # Newest first; rows of one transaction share now(), so insertion order decides.
    assert [entry.jti for entry in report.history] == [license.jti for license in reversed(minted)]
    newest = report.history[0]
    assert newest.record() == minted[-1].record()  # the row is the minted licence's record, whole
    item = LicenseHistoryItem.model_validate(newest, from_attributes=True).model_dump(mode="json")
    assert set(item) >= {"id", "action", "plan", "max_devices", "generated_at", "metadata"}
    assert (item["action"], item["plan"], item["max_devices"]) == ("upgraded", "professional", 50)

    limited = await license_history(db_session, customer_id, limit=2)
    assert [entry.jti for entry in limited.history] == [minted[4].jti, minted[3].jti]
    assert limited.statistics["totalGenerations"] == 5


async def test_unknown_customer_has_empty_history(db_session: AsyncSession) -> None:
    report = await license_history(db_session, "cust_nobody000")
    assert report.history == []
    assert report.statistics == {"totalGenerations": 0, "byAction": {}, "byPlan": {}}


async def test_bad_action_and_secret_metadata_are_refused(
    db_session: AsyncSession, keys: SigningKeys, customer_id: str
) -> None:
    minted = mint(keys, customer_id)
    with pytest.raises(ValueError, match="action must be one of generated, renewed"):
        await record_license(db_session, minted, "stolen")
    with pytest.raises(ValueError, match="metadata must not carry a token or a key"):
        await record_license(db_session, minted, "generated", {"license": minted.token})
    with pytest.raises(ValueError, match="metadata must not carry a token or a key"):
        await record_license(
            db_session, minted, "generated", {"key": private_key_pem(keys.private_key).decode()}
        )
    with pytest.raises(ValueError, match="limit must be at least 1"):
        await license_history(db_session, customer_id, limit=0)
    assert await rows_of(db_session, customer_id) == []


async def test_a_customer_ids_first_licence_is_read_where_its_trial_started(
    db_session: AsyncSession, keys: SigningKeys, customer_id: str
) -> None:
    """The operator's read of where a Customer made again started its trial (trial_history.py), on the
    real table: the earliest issue of its customer id's licences, whatever their order of recording
    (a licence recorded after a crash comes after a later one); None for an id the history lacks."""
    from types import SimpleNamespace

    from iotistic_billing.operator.trial_history import first_licensed_at

    class Sessions:
        def __call__(self) -> Sessions:
            return self

        async def __aenter__(self) -> AsyncSession:
            return db_session

        async def __aexit__(self, *exc: object) -> None:
            return None

    later, first = mint(keys, customer_id, "trial", days=30), mint(keys, customer_id, "trial", days=2)
    for minted, action in ((later, "renewed"), (first, "generated")):
        assert await record_license(db_session, minted, action)
    ctx: Any = SimpleNamespace(sessions=Sessions(), first_licences={})

    assert await first_licensed_at(ctx, customer_id) == first.issued_at == NOW + timedelta(days=2)
    assert ctx.first_licences == {customer_id: first.issued_at}
    assert await first_licensed_at(ctx, f"cust_{uuid.uuid4().hex[:12]}") is None


async def test_a_licence_secret_s_usage_key_is_the_customer_s_one_live_key(
    db_session: AsyncSession, customer_id: str
) -> None:
    """The licence step stores the Secret's usage key: a new one retires the other after the grace, one
    revoked and stored again (its Secret restored) works again, and a key another customer holds stays
    that customer's, revoked or not."""
    first, second = new_usage_key(), new_usage_key()

    async def keys_of(owner: str) -> dict[str, bool]:
        """Each of the owner's keys (by prefix) and whether it still works."""
        live = await db_session.execute(
            select(ApiKey.key_prefix, ApiKey.live()).where(ApiKey.customer_id == owner)
        )
        return {prefix: bool(works) for prefix, works in live.all()}

    async def revoked_in(owner: str, prefix: str) -> timedelta | None:
        until = await db_session.scalar(
            select(ApiKey.revoked_at - func.now()).where(
                ApiKey.customer_id == owner, ApiKey.key_prefix == prefix
            )
        )
        return until

    await _record_usage_key(db_session, customer_id, "acme", first)
    assert await keys_of(customer_id) == {first[:12]: True}
    assert await revoked_in(customer_id, first[:12]) is None

    await _record_usage_key(db_session, customer_id, "acme", second)
    assert await keys_of(customer_id) == {first[:12]: True, second[:12]: True}  # the first in its grace
    assert await revoked_in(customer_id, first[:12]) == ROTATION_GRACE
    assert await revoked_in(customer_id, second[:12]) is None

    await revoke_usage_key(db_session, customer_id, second)
    await _record_usage_key(db_session, customer_id, "acme", second)  # its Secret restored
    assert await revoked_in(customer_id, second[:12]) is None

    # The Customer deleted, and its key copied into another customer's Secret: not revived, not moved.
    await revoke_usage_key(db_session, customer_id, second)
    other = f"cust_{uuid.uuid4().hex[:12]}"
    await _record_usage_key(db_session, other, "other", second)
    assert await keys_of(other) == {}
    assert await keys_of(customer_id) == {first[:12]: True, second[:12]: False}
    description = await db_session.scalar(select(ApiKey.description).where(ApiKey.key_prefix == second[:12]))
    assert description == "usage key of acme"


async def revoke_usage_key(session: AsyncSession, owner: str, key: str) -> None:
    """As a deleted Customer's finalizer does (revoke_usage_keys), within the test's transaction."""
    await session.execute(
        update(ApiKey)
        .where(ApiKey.customer_id == owner, ApiKey.key_hash == usage_key_hash(key))
        .values(revoked_at=func.now())
    )
