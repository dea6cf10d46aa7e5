"""Minting: every claim, the RS256 signature with its kid, trial capping, re-mint and renewal decisions."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jwt
import pytest

from iotistic_billing.customer import LICENSE_JWT_KEY
from iotistic_billing.licensing.keys import SigningKeys, generate_private_key
from iotistic_billing.licensing.minting import (
    NO_TRIAL,
    SIGNATURE_ONLY,
    LicenseCustomer,
    LicenseRecord,
    MintedLicense,
    MintingError,
    SubscriptionTerms,
    TrialTerms,
    claims_differ,
    license_claims,
    mint_license,
    renewal_due,
)
from iotistic_billing.licensing.plans import PLAN_NAMES, PLANS, UNLICENSED, Plan
from iotistic_billing.licensing.verifier import LicenseVerifier
from iotistic_billing.operator import license as license_step
from iotistic_billing.operator.license import ensure_license
from tests.unit.test_operator_state import LicenceStepParts, _target_of

NOW = datetime(2025, 10, 21, 10, 30, 0, tzinfo=UTC)
ISSUER = "https://billing.iotistic.cloud"
AUDIENCE = "iotistic-instance"
ACME = LicenseCustomer("cust_abc123", "Acme Corp")
ACTIVE = SubscriptionTerms("active", datetime(2025, 11, 21, tzinfo=UTC))
JTI = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def keys() -> SigningKeys:
    return SigningKeys(generate_private_key())


def mint(keys: SigningKeys, **overrides: Any) -> MintedLicense:
    arguments: dict[str, Any] = {
        "customer": ACME,
        "plan": PLANS["professional"],
        "trial": NO_TRIAL,
        "subscription": ACTIVE,
        "now": NOW,
        "keys": keys,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jti": JTI,
    }
    arguments.update(overrides)
    return mint_license(**arguments)


def decoded(minted: MintedLicense, keys: SigningKeys) -> dict[str, Any]:
    # pyjwt's own verification, at the minting time, stands in for an instance.
    claims: dict[str, Any] = jwt.decode(
        minted.token,
        keys.public_key,
        algorithms=["RS256"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    return claims


def test_claims_are_the_earlier_system_payload_plus_registered_claims(keys: SigningKeys) -> None:
    minted = mint(keys)
    iat = int(NOW.timestamp())
    exp = iat + 30 * 86400
    assert decoded(minted, keys) == {
        "iss": ISSUER,
        "sub": "cust_abc123",
        "aud": AUDIENCE,
        "iat": iat,
        "nbf": iat - 300,
        "exp": exp,
        "jti": JTI,
        "customerId": "cust_abc123",
        "customerName": "Acme Corp",
        "plan": "professional",
        "features": {
            "maxDevices": 50,
            "dataRetentionDays": 365,
            "canExportData": True,
            "hasAdvancedAlerts": True,
            "hasApiAccess": True,
            "hasMqttAccess": True,
            "hasCustomBranding": False,
            "canExecuteJobs": True,
            "canScheduleJobs": True,
            "hasRemoteAccess": True,
            "hasOtaUpdates": True,
            "hasCustomDashboards": True,
            # Beyond the earlier system's claims: false in a restricted licence (dunning).
            "canAddDevices": True,
        },
        "limits": {"maxUsers": 15, "maxAlertRules": 100, "maxDashboards": 20, "maxJobTemplates": 100},
        "trial": {"isTrialMode": False},
        "subscription": {"status": "active", "currentPeriodEndsAt": "2025-11-21T00:00:00Z"},
        "issuedAt": iat,
        "expiresAt": exp,
    }
    assert minted.claims == decoded(minted, keys)


def test_nbf_is_before_iat_so_an_instance_whose_clock_is_behind_takes_a_fresh_licence(
    keys: SigningKeys,
) -> None:
    minted = mint(keys)
    iat = int(NOW.timestamp())
    assert minted.claims["nbf"] < minted.claims["iat"] == iat
    assert minted.claims["exp"] == iat + 30 * 86400  # the lifetime still counts from iat
    # An instance whose clock is three minutes behind the operator's: beyond its 60 s leeway.
    instance = LicenseVerifier([keys.public_key], audience=AUDIENCE, issuer=ISSUER)
    verified = instance.verify(minted.token, now=NOW - timedelta(minutes=3))
    assert verified.valid, verified.reason


def test_header_is_rs256_with_the_signing_key_id(keys: SigningKeys) -> None:
    header = jwt.get_unverified_header(mint(keys).token)
    assert header == {"alg": "RS256", "typ": "JWT", "kid": keys.kid}


def test_token_is_byte_for_byte_what_pyjwt_signs(keys: SigningKeys) -> None:
    # The licence is signed without pyjwt's per-call work; any JWT library must read it the same.
    minted = mint(keys)
    assert minted.token == jwt.encode(
        dict(minted.claims), keys.private_key, algorithm="RS256", headers={"kid": keys.kid}
    )


def test_minted_license_carries_hash_ids_and_times(keys: SigningKeys) -> None:
    minted = mint(keys)
    assert minted.sha256 == hashlib.sha256(minted.token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", minted.sha256)
    assert minted.jti == JTI
    assert minted.kid == keys.kid
    assert minted.issued_at == NOW
    assert minted.expires_at == NOW + timedelta(days=30)
    assert (minted.customer_id, minted.plan) == ("cust_abc123", "professional")


def test_jti_is_a_fresh_uuid4_hex_unless_given(keys: SigningKeys) -> None:
    first, second = mint(keys, jti=None), mint(keys, jti=None)
    assert first.jti != second.jti
    for minted in (first, second):
        assert re.fullmatch(r"[0-9a-f]{32}", minted.jti)
        assert minted.jti[12] == "4"  # the UUID version nibble
        assert minted.claims["jti"] == minted.jti


def test_times_are_whole_seconds_rounded_down(keys: SigningKeys) -> None:
    minted = mint(keys, now=NOW + timedelta(microseconds=999_999))
    assert minted.claims["iat"] == int(NOW.timestamp())
    assert minted.issued_at == NOW


def test_other_timezones_give_the_same_instants(keys: SigningKeys) -> None:
    berlin = timezone(timedelta(hours=2))
    minted = mint(keys, now=NOW.astimezone(berlin))
    assert minted.claims["iat"] == int(NOW.timestamp())
    period_end = SubscriptionTerms("active", datetime(2025, 11, 21, 2, 0, tzinfo=berlin))
    assert (
        mint(keys, subscription=period_end).claims["subscription"]["currentPeriodEndsAt"]
        == "2025-11-21T00:00:00Z"
    )


@pytest.mark.parametrize("name", [*PLAN_NAMES, "unlicensed"])
def test_each_plan_mints_its_features_and_limits(keys: SigningKeys, name: str) -> None:
    plan: Plan = PLANS.get(name, UNLICENSED)
    claims = decoded(mint(keys, plan=plan), keys)
    assert claims["plan"] == name
    assert claims["features"] == plan.features.to_claims()
    assert claims["limits"] == plan.limits.to_claims()


def test_enterprise_unlimited_is_minus_one(keys: SigningKeys) -> None:
    claims = mint(keys, plan=PLANS["enterprise"]).claims
    assert claims["features"]["maxDevices"] == -1
    assert claims["limits"]["maxUsers"] == -1


def test_lifetime_is_configurable(keys: SigningKeys) -> None:
    minted = mint(keys, lifetime=timedelta(days=7))
    assert minted.expires_at == NOW + timedelta(days=7)
    assert minted.claims["expiresAt"] == minted.claims["exp"]


def test_trial_licence_expires_no_later_than_the_trial(keys: SigningKeys) -> None:
    trial_end = NOW + timedelta(days=5, hours=3, microseconds=500)
    minted = mint(
        keys,
        plan=PLANS["trial"],
        trial=TrialTerms(True, trial_end),
        subscription=SubscriptionTerms("trialing"),
    )
    assert minted.expires_at == (NOW + timedelta(days=5, hours=3))
    assert minted.claims["exp"] <= trial_end.timestamp()
    assert minted.claims["trial"] == {"isTrialMode": True, "endsAt": "2025-10-26T13:30:00Z"}
    assert minted.claims["subscription"] == {"status": "trialing"}


def test_trial_longer_than_the_lifetime_keeps_the_lifetime(keys: SigningKeys) -> None:
    minted = mint(keys, plan=PLANS["trial"], trial=TrialTerms(True, NOW + timedelta(days=60)))
    assert minted.expires_at == NOW + timedelta(days=30)


def test_a_subscription_set_to_cancel_gives_a_licence_that_ends_with_its_period(keys: SigningKeys) -> None:
    """Found in review: only a trial capped the licence's exp. A subscription set to cancel at its
    period's end (known since the cancellation) got 30 days whatever, so with no operator pass at that
    end (operator down, Customer stalled) the last licence, and every offline copy, ran up to 30 days
    past the subscription's end."""
    period_end = NOW + timedelta(days=5, hours=3, microseconds=500)
    minted = mint(keys, subscription=SubscriptionTerms("active", period_end, cancel_at_period_end=True))
    assert minted.expires_at == NOW + timedelta(days=5, hours=3)
    assert minted.claims["exp"] == minted.claims["expiresAt"] <= period_end.timestamp()
    assert minted.claims["subscription"] == {
        "status": "active",
        "currentPeriodEndsAt": "2025-10-26T13:30:00Z",
        "cancelAtPeriodEnd": True,
    }
    instance = LicenseVerifier([keys.public_key], audience=AUDIENCE, issuer=ISSUER)
    held = instance.verify(minted.token, now=period_end - timedelta(minutes=1))
    assert (held.valid, held.subscription.cancel_at_period_end) == (True, True)
    gone = instance.verify(minted.token, now=period_end + timedelta(minutes=2))
    assert (gone.valid, gone.reason) == (False, "licence expired at 2025-10-26T13:30:00+00:00")
    # Not set to cancel, or ending after the lifetime: the lifetime, and no claim of it.
    renewing = mint(keys, subscription=SubscriptionTerms("active", period_end))
    assert renewing.expires_at == NOW + timedelta(days=30)
    assert "cancelAtPeriodEnd" not in renewing.claims["subscription"]
    assert instance.verify(renewing.token, now=NOW).subscription.cancel_at_period_end is False
    later = SubscriptionTerms("active", NOW + timedelta(days=60), cancel_at_period_end=True)
    assert mint(keys, subscription=later).expires_at == NOW + timedelta(days=30)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"subscription": SubscriptionTerms("active", NOW, cancel_at_period_end=True)},
            r"subscription.current_period_ends_at \(2025-10-21T10:30:00Z\) is not after now",
        ),
        (
            {"subscription": SubscriptionTerms("active", cancel_at_period_end=True)},
            "subscription.current_period_ends_at is required when it cancels at its end",
        ),
        ({"trial": TrialTerms(True, NOW)}, r"trial.ends_at \(2025-10-21T10:30:00Z\) is not after now"),
        ({"trial": TrialTerms(True, None)}, "trial.ends_at is required in trial mode"),
        ({"trial": TrialTerms(True, datetime(2025, 12, 1))}, "trial.ends_at must be timezone-aware"),
        ({"now": datetime(2025, 10, 21, 10, 30)}, "now must be timezone-aware"),
        ({"subscription": SubscriptionTerms("paid")}, "subscription.status must be one of active, trialing"),
        ({"customer": LicenseCustomer("", "Acme")}, "customer.customer_id must be 1 to 40 characters"),
        ({"customer": LicenseCustomer("c" * 41, "Acme")}, "customer.customer_id must be 1 to 40 characters"),
        ({"customer": LicenseCustomer("cust_abc123", "  ")}, "customer.name must not be empty"),
        ({"lifetime": timedelta(seconds=5)}, "lifetime must be at least one minute"),
        ({"audience": ""}, "issuer and audience must not be empty"),
    ],
)
def test_bad_inputs_are_refused_naming_the_field(
    keys: SigningKeys, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(MintingError, match=message):
        mint(keys, **overrides)


def test_license_claims_is_what_mint_signs(keys: SigningKeys) -> None:
    claims = license_claims(
        customer=ACME,
        plan=PLANS["professional"],
        trial=NO_TRIAL,
        subscription=ACTIVE,
        now=NOW,
        issuer=ISSUER,
        audience=AUDIENCE,
        jti=JTI,
    )
    assert claims == mint(keys).claims


def test_claims_differ_ignores_times_and_jti_only(keys: SigningKeys) -> None:
    current = mint(keys).claims
    later = mint(keys, now=NOW + timedelta(days=12), jti="f" * 32).claims
    assert not claims_differ(current, later)
    assert claims_differ(current, mint(keys, plan=PLANS["starter"]).claims)
    assert claims_differ(current, mint(keys, customer=LicenseCustomer("cust_abc123", "Acme Inc")).claims)
    assert claims_differ(current, mint(keys, subscription=SubscriptionTerms("past_due")).claims)
    assert claims_differ(current, mint(keys, audience="another-audience").claims)
    extended = mint(keys, plan=PLANS["trial"], trial=TrialTerms(True, NOW + timedelta(days=14))).claims
    again = mint(keys, plan=PLANS["trial"], trial=TrialTerms(True, NOW + timedelta(days=21))).claims
    assert claims_differ(extended, again)
    assert claims_differ(current, {key: value for key, value in current.items() if key != "limits"})


def test_renewal_is_due_once_less_than_a_third_of_the_lifetime_is_left() -> None:
    issued = NOW
    expires = NOW + timedelta(days=30)
    assert not renewal_due(expires, issued, now=issued)
    assert not renewal_due(expires, issued, now=issued + timedelta(days=20))  # exactly a third left
    assert renewal_due(expires, issued, now=issued + timedelta(days=20, seconds=1))
    assert renewal_due(expires, issued, now=expires + timedelta(days=1))
    with pytest.raises(MintingError, match="now must be timezone-aware"):
        renewal_due(expires, issued, now=datetime(2025, 10, 21))


def test_record_holds_the_hash_not_the_token(keys: SigningKeys) -> None:
    minted = mint(keys)
    record = minted.record()
    assert record == LicenseRecord.from_token(minted.token)
    assert record.license_hash == minted.sha256
    assert (record.customer_id, record.plan, record.max_devices, record.jti, record.kid) == (
        "cust_abc123",
        "professional",
        50,
        JTI,
        keys.kid,
    )
    assert (record.issued_at, record.expires_at) == (minted.issued_at, minted.expires_at)
    assert minted.token not in repr(record)
    with pytest.raises(MintingError, match="not a licence token"):
        LicenseRecord.from_token("not-a-token")


def test_record_from_a_token_without_claims_names_the_claim(keys: SigningKeys) -> None:
    token = jwt.encode({"plan": "starter"}, keys.private_key, algorithm="RS256", headers={"kid": keys.kid})
    with pytest.raises(MintingError, match="licence claim 'features' must be dict"):
        LicenseRecord.from_token(token)


def edited(token: str, **claims: Any) -> str:
    """`token` with its payload edited (as someone may edit a licence Secret): the signature no longer
    covers it, which reading a record back does not check."""
    header, payload, signature = token.split(".")
    edited_claims = {**json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))), **claims}
    encoded = base64.urlsafe_b64encode(json.dumps(edited_claims).encode()).rstrip(b"=").decode()
    return f"{header}.{encoded}.{signature}"


OUT_OF_RANGE_TIMES = [("iat", 10**20), ("exp", -(10**13)), ("exp", 253_402_300_800)]


@pytest.mark.parametrize(("claim", "seconds"), OUT_OF_RANGE_TIMES)
def test_record_from_a_token_with_out_of_range_times_names_the_claim(
    keys: SigningKeys, claim: str, seconds: int
) -> None:
    with pytest.raises(MintingError, match=f"licence claim '{claim}' must be a time"):
        LicenseRecord.from_token(edited(mint(keys).token, **{claim: seconds}))


@pytest.mark.parametrize(("claim", "seconds"), OUT_OF_RANGE_TIMES)
async def test_a_secret_token_with_out_of_range_times_is_replaced(
    monkeypatch: pytest.MonkeyPatch, claim: str, seconds: int
) -> None:
    """Found in review: such a token raised OverflowError or ValueError out of the licence step, so the
    Customer's pass failed and was retried for ever instead of replacing the token as a tampered one."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    ctx = parts.context()
    target = _target_of({"plan": "starter"})
    held = await ensure_license(ctx, target, None)
    assert parts.secret is not None
    token = edited(parts.secret.data[LICENSE_JWT_KEY].decode(), **{claim: seconds})
    parts.secret = parts.secret._replace(data={**parts.secret.data, LICENSE_JWT_KEY: token.encode()})

    replaced = await ensure_license(ctx, target, parts.secret)
    assert replaced.jti != held.jti
    claims = jwt.decode(
        parts.secret.data[LICENSE_JWT_KEY].decode(),
        ctx.keys.public_key,
        algorithms=["RS256"],
        audience=AUDIENCE,
        options=SIGNATURE_ONLY,
    )
    assert (claims["jti"], claims["plan"]) == (replaced.jti, "starter")


def test_signature_covers_the_claims(keys: SigningKeys) -> None:
    header, payload, signature = mint(keys).token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["features"]["maxDevices"] = 5000
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(f"{header}.{forged}.{signature}", keys.public_key, algorithms=["RS256"], audience=AUDIENCE)
