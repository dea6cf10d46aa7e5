"""The instance-side verifier: what it accepts, what it refuses (with the fallback), and its guards."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from iotistic_billing.licensing import verifier as verifier_module
from iotistic_billing.licensing.keys import SigningKeys, generate_private_key
from iotistic_billing.licensing.minting import (
    NO_TRIAL,
    NOT_BEFORE_SKEW,
    LicenseCustomer,
    MintedLicense,
    SubscriptionTerms,
    TrialTerms,
    mint_license,
)
from iotistic_billing.licensing.plans import PLAN_NAMES, PLANS, UNLICENSED, Features, Plan
from iotistic_billing.licensing.verifier import License, LicenseVerifier, unlicensed

NOW = datetime(2025, 10, 21, 10, 30, 0, tzinfo=UTC)
ISSUER = "https://billing.iotistic.cloud"
AUDIENCE = "iotistic-instance"
# As the module chose them at import, before any test patches in the standard library's.
ACCELERATED_JSON = verifier_module._parse_json
ACCELERATED_BASE64URL = verifier_module._decode_base64url


@pytest.fixture(autouse=True, params=["accelerated", "standard library"])
def decoders(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every case runs with orjson and pybase64, as the package installs them, and without them, as an
    instance that lacks them verifies: the answers must be the same."""
    if request.param == "standard library":
        monkeypatch.setattr(verifier_module, "_parse_json", json.loads)
        monkeypatch.setattr(verifier_module, "_json_text", verifier_module._json_text_std)
        monkeypatch.setattr(verifier_module, "_decode_base64url", verifier_module._decode_base64url_std)
    return str(request.param)


@pytest.fixture(scope="module")
def keys() -> SigningKeys:
    return SigningKeys(generate_private_key())


@pytest.fixture(scope="module")
def other_keys() -> SigningKeys:
    return SigningKeys(generate_private_key())


@pytest.fixture
def verifier(keys: SigningKeys) -> LicenseVerifier:
    return LicenseVerifier.from_pem(keys.public_key_pem(), audience=AUDIENCE, issuer=ISSUER)


def mint(keys: SigningKeys, plan: Plan | None = None, **overrides: Any) -> MintedLicense:
    arguments: dict[str, Any] = {
        "customer": LicenseCustomer("cust_abc123", "Acme Corp"),
        "plan": plan or PLANS["professional"],
        "trial": NO_TRIAL,
        "subscription": SubscriptionTerms("active", datetime(2025, 11, 21, tzinfo=UTC)),
        "now": NOW,
        "keys": keys,
        "issuer": ISSUER,
        "audience": AUDIENCE,
    }
    arguments.update(overrides)
    return mint_license(**arguments)


def assert_fallback(license: License, reason: str) -> None:
    assert license.valid is False
    assert reason in (license.reason or ""), license.reason
    assert license.plan == "unlicensed"
    assert license.features == UNLICENSED.features
    assert license.limits == UNLICENSED.limits
    assert license.customer_id is None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def test_valid_licence_gives_typed_grants(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    minted = mint(keys)
    license = verifier.verify(minted.token, now=NOW + timedelta(days=1))
    assert license.valid is True
    assert license.reason is None
    assert (license.customer_id, license.customer_name, license.plan) == (
        "cust_abc123",
        "Acme Corp",
        "professional",
    )
    assert license.features == PLANS["professional"].features
    assert isinstance(license.features, Features)
    assert license.limits.max_users == 15
    assert license.trial.is_trial_mode is False
    assert license.trial.ends_at is None
    assert license.subscription.status == "active"
    assert license.subscription.current_period_ends_at == datetime(2025, 11, 21, tzinfo=UTC)
    assert (license.issued_at, license.expires_at) == (minted.issued_at, minted.expires_at)
    assert (license.jti, license.kid) == (minted.jti, keys.kid)


@pytest.mark.parametrize("name", [*PLAN_NAMES, "unlicensed"])
def test_each_plan_verifies_to_its_catalog_entry(
    keys: SigningKeys, verifier: LicenseVerifier, name: str
) -> None:
    plan = PLANS.get(name, UNLICENSED)
    license = verifier.verify(mint(keys, plan).token, now=NOW)
    assert license.valid
    assert (license.plan, license.features, license.limits) == (name, plan.features, plan.limits)


def test_trial_licence_reports_its_end(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    trial_end = NOW + timedelta(days=14)
    token = mint(
        keys, PLANS["trial"], trial=TrialTerms(True, trial_end), subscription=SubscriptionTerms("trialing")
    )
    license = verifier.verify(token.token, now=NOW)
    assert license.trial.is_trial_mode is True
    assert license.trial.ends_at == trial_end
    assert license.subscription.status == "trialing"
    assert license.subscription.current_period_ends_at is None
    # Past the trial end the licence itself has expired.
    assert_fallback(verifier.verify(token.token, now=trial_end + timedelta(minutes=2)), "expired")


@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_licence_gives_the_fallback(verifier: LicenseVerifier, token: str | None) -> None:
    license = verifier.verify(token, now=NOW)
    assert_fallback(license, "no licence" if token is None or token == "" else "malformed")


def test_a_licence_read_as_bytes_verifies_and_other_objects_give_the_fallback(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    token = mint(keys).token
    assert verifier.verify(token.encode() + b"\n", now=NOW).valid  # a file's bytes, newline and all
    assert_fallback(verifier.verify(b"\xff" + token.encode(), now=NOW), "malformed")
    for thing in (bytearray(token.encode()), 42, ["a", "b"]):
        assert_fallback(verifier.verify(thing, now=NOW), "malformed")  # type: ignore[arg-type]


@pytest.mark.parametrize("token", ["abc", "a.b", "a.b.c.d", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "x" * 20_000])
def test_garbage_gives_the_fallback(verifier: LicenseVerifier, token: str) -> None:
    license = verifier.verify(token, now=NOW)
    assert license.valid is False
    assert license.plan == "unlicensed"


def test_tampered_payload_is_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    header, payload, signature = mint(keys).token.split(".")
    claims = b64url_json(payload)
    claims["features"]["maxDevices"] = 5000
    forged = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    assert_fallback(verifier.verify(forged, now=NOW), "signature does not verify")


def test_tampered_signature_is_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    header, payload, signature = mint(keys).token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[-1] ^= 1
    assert_fallback(verifier.verify(f"{header}.{payload}.{b64url(bytes(raw))}", now=NOW), "signature")
    # Characters of the standard alphabet are refused, not decoded leniently into the same bytes.
    for foreign in ("+", "/", "="):
        assert_fallback(verifier.verify(f"{header}.{payload}.{foreign}{signature[1:]}", now=NOW), "base64url")
    # So are unused bits set in the last character, which lenient decoders drop (the same signature).
    assert len(signature) % 4 == 2 and signature[-1] in "AQgw"
    respelled = signature[:-1] + chr(ord(signature[-1]) + 1)
    assert base64.urlsafe_b64decode(respelled + "==") == base64.urlsafe_b64decode(signature + "==")
    assert_fallback(verifier.verify(f"{header}.{payload}.{respelled}", now=NOW), "base64url")


def test_a_signature_over_another_digest_or_of_another_length_is_refused(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    # The verifier compares the signature's whole PKCS#1 block with SHA-256's DigestInfo of the input.
    header, payload, signature = mint(keys).token.split(".")
    signing_input = f"{header}.{payload}".encode()
    others = [
        keys.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA512()),
        keys.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA1()),  # noqa: S303 - a digest it must refuse
        keys.private_key.sign(signing_input, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()),
        b"\0" + base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
    ]
    for other in others:
        assert_fallback(
            verifier.verify(f"{header}.{payload}.{b64url(other)}", now=NOW), "signature does not verify"
        )
    # A signature whose first byte is zero, that byte left out: the same number, and still refused
    # (one spelling per signature, as OpenSSL's RSA_verify has it). About one licence in 200 has one.
    for number in range(5000):
        token = mint(keys, customer=LicenseCustomer(f"cust_zero{number}", "Acme Corp")).token
        header, payload, signature = token.split(".")
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        if raw[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero byte in 5,000 licences")
    assert verifier.verify(token, now=NOW).valid
    assert_fallback(
        verifier.verify(f"{header}.{payload}.{b64url(raw[1:])}", now=NOW), "signature does not verify"
    )


def test_the_accelerated_and_the_standard_base64url_agree() -> None:
    # The package installs orjson and pybase64, so the module picked them.
    assert ACCELERATED_JSON.__module__ == "orjson"
    faster = ACCELERATED_BASE64URL
    assert faster is not verifier_module._decode_base64url_std
    generator = random.Random(7)  # noqa: S311 - test inputs, not a secret
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_. !\n\xff"
    accepted = 0
    for _ in range(5000):
        segment = bytes(generator.choice(alphabet) for _ in range(generator.randint(0, 14)))
        answers = []
        for decode in (faster, verifier_module._decode_base64url_std):
            try:
                answers.append(decode(segment))
            except ValueError as exc:  # binascii.Error
                answers.append(type(exc))
        assert answers[0] == answers[1], segment
        accepted += isinstance(answers[0], bytes)
    assert 1000 < accepted < 4000


def test_algorithm_none_and_hmac_are_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    _, payload, _ = mint(keys).token.split(".")
    none_header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": keys.kid}).encode())
    assert_fallback(verifier.verify(f"{none_header}.{payload}.", now=NOW), "algorithm 'none' is not RS256")
    claims = b64url_json(payload)
    # The classic confusion: HMAC keyed with the public key's PEM.
    hmac_token = jwt.encode(claims, "not-the-key-" * 4, algorithm="HS256", headers={"kid": keys.kid})
    assert_fallback(verifier.verify(hmac_token, now=NOW), "algorithm 'HS256' is not RS256")


def test_critical_header_extensions_are_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    claims = mint(keys).claims
    token = jwt.encode(
        dict(claims), keys.private_key, algorithm="RS256", headers={"kid": keys.kid, "crit": ["x"]}
    )
    assert_fallback(verifier.verify(token, now=NOW), "critical extensions")


def test_wrong_audience_is_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    token = mint(keys, audience="another-product").token
    assert_fallback(verifier.verify(token, now=NOW), "licence is for audience 'another-product'")


def test_wrong_issuer_is_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    token = mint(keys, issuer="https://evil.example").token
    assert_fallback(verifier.verify(token, now=NOW), "licence is from issuer 'https://evil.example'")
    # A verifier that does not pin the issuer accepts it.
    assert LicenseVerifier([keys.public_key], audience=AUDIENCE).verify(token, now=NOW).valid


def test_expired_licence_is_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    minted = mint(keys)
    assert verifier.verify(minted.token, now=minted.expires_at - timedelta(seconds=1)).valid
    assert_fallback(
        verifier.verify(minted.token, now=minted.expires_at + timedelta(days=1)),
        "licence expired at 2025-11-20T10:30:00+00:00",
    )


def test_not_yet_valid_licence_is_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    minted = mint(keys, now=NOW + timedelta(hours=1))  # its nbf is NOT_BEFORE_SKEW (5 min) earlier
    assert_fallback(
        verifier.verify(minted.token, now=NOW), "licence is not valid before 2025-10-21T11:25:00+00:00"
    )


def test_leeway_absorbs_small_clock_skew(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    minted = mint(keys, now=NOW + NOT_BEFORE_SKEW + timedelta(seconds=30))  # nbf 30 s ahead of the clock
    assert verifier.verify(minted.token, now=NOW).valid
    strict = LicenseVerifier([keys.public_key], audience=AUDIENCE, leeway=timedelta(0))
    assert_fallback(strict.verify(minted.token, now=NOW), "not valid before")


def test_cached_licence_is_still_checked_against_the_clock(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    minted = mint(keys)
    assert verifier.verify(minted.token, now=NOW).valid
    assert verifier.verify(minted.token, now=NOW).valid
    assert_fallback(verifier.verify(minted.token, now=minted.expires_at + timedelta(hours=1)), "expired")
    assert_fallback(verifier.verify(minted.token, now=NOW - timedelta(hours=1)), "not valid before")
    # A known payload under another signature is still refused: the signature is checked every time.
    header, payload, _ = minted.token.split(".")
    _, _, foreign_signature = mint(keys, customer=LicenseCustomer("cust_other01", "Other")).token.split(".")
    assert_fallback(verifier.verify(f"{header}.{payload}.{foreign_signature}", now=NOW), "signature")


def test_a_licence_of_another_customer_is_refused_for_this_one(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    """Found in review: verify() could not be told whose instance it runs in, and every licence is
    signed by one key for one audience, so an enterprise licence minted for cust_otherco1, copied into
    another customer's instance, verified there as valid with its grants."""
    theirs = mint(keys, PLANS["enterprise"], customer=LicenseCustomer("cust_otherco1", "Other Co")).token
    assert_fallback(
        verifier.verify(theirs, now=NOW, customer_id="cust_abc123"),
        "licence is for customer 'cust_otherco1' (claim 'customerId'), not 'cust_abc123'",
    )
    ours = verifier.verify(mint(keys).token, now=NOW, customer_id="cust_abc123")
    assert (ours.valid, ours.customer_id) == (True, "cust_abc123")
    # The same licence, checked and cached, is still refused for another customer on the next call.
    assert verifier.verify(theirs, now=NOW, customer_id="cust_otherco1").valid
    assert_fallback(verifier.verify(theirs, now=NOW, customer_id="cust_abc123"), "'cust_otherco1'")
    # A verifier built for the instance's customer (the chart's CUSTOMER_ID) refuses it on every call.
    instance = LicenseVerifier.from_pem(
        keys.public_key_pem(), audience=AUDIENCE, issuer=ISSUER, customer_id="cust_abc123"
    )
    assert_fallback(instance.verify(theirs, now=NOW), "claim 'customerId'")
    assert instance.verify(mint(keys).token, now=NOW).valid
    for built in (
        LicenseVerifier([keys.public_key], audience=AUDIENCE, customer_id="cust_abc123"),
        LicenseVerifier.from_jwks(keys.jwks(), audience=AUDIENCE, customer_id="cust_abc123"),
    ):
        assert_fallback(built.verify(theirs, now=NOW), "not 'cust_abc123'")
    with pytest.raises(ValueError, match="customer_id must not be empty"):
        LicenseVerifier([keys.public_key], audience=AUDIENCE, customer_id="")


def test_a_licence_whose_subject_is_another_customer_is_refused(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    """Found in review: a licence names its customer twice (customerId and sub); one signed with ours in
    customerId and another's in sub is not ours either, and one without sub (minted elsewhere) is
    judged by customerId alone."""
    claims = dict(mint(keys).claims)
    mixed = keys.sign_jwt({**claims, "sub": "cust_otherco1"})
    assert_fallback(
        verifier.verify(mixed, now=NOW, customer_id="cust_abc123"),
        "licence is for customer 'cust_otherco1' (claim 'sub'), not 'cust_abc123'",
    )
    without_subject = keys.sign_jwt({k: v for k, v in claims.items() if k != "sub"})
    assert verifier.verify(without_subject, now=NOW, customer_id="cust_abc123").valid
    assert_fallback(verifier.verify(without_subject, now=NOW, customer_id="cust_zzz999"), "'customerId'")


def test_licence_from_an_unknown_key_is_refused(other_keys: SigningKeys, verifier: LicenseVerifier) -> None:
    token = mint(other_keys).token
    assert_fallback(verifier.verify(token, now=NOW), f"licence signed with an unknown key '{other_keys.kid}'")


def test_licence_without_kid_is_tried_against_every_key(
    keys: SigningKeys, other_keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    claims = dict(mint(keys).claims)
    token = jwt.encode(claims, keys.private_key, algorithm="RS256")
    both = LicenseVerifier([other_keys.public_key, keys.public_key], audience=AUDIENCE)
    license = both.verify(token, now=NOW)
    assert license.valid
    assert license.kid is None
    foreign = jwt.encode(claims, other_keys.private_key, algorithm="RS256")
    assert_fallback(verifier.verify(foreign, now=NOW), "signature does not verify")


def test_rotation_old_key_verifies_until_removed(keys: SigningKeys, other_keys: SigningKeys) -> None:
    old_token = mint(keys).token
    rotated = keys.rotate(other_keys.private_key)
    new_token = mint(rotated).token
    during = LicenseVerifier.from_jwks(json.dumps(rotated.jwks()), audience=AUDIENCE)
    assert during.verify(old_token, now=NOW).valid
    assert during.verify(new_token, now=NOW).kid == rotated.kid
    after = LicenseVerifier.from_jwks(rotated.without_verification_key(keys.kid).jwks(), audience=AUDIENCE)
    assert after.verify(new_token, now=NOW).valid
    assert_fallback(after.verify(old_token, now=NOW), "unknown key")


def test_bad_claim_types_are_refused(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    base = dict(mint(keys).claims)

    def signed(**changes: Any) -> str:
        return jwt.encode({**base, **changes}, keys.private_key, algorithm="RS256", headers={"kid": keys.kid})

    cases = {
        signed(features={**base["features"], "maxDevices": "50"}): "features.maxDevices must be an integer",
        signed(features={**base["features"], "hasOtaUpdates": 1}): "features.hasOtaUpdates must be a boolean",
        signed(limits=[1, 2]): "limits must be an object",
        signed(features=None): "features must be an object",
        signed(customerId=""): "claim 'customerId' is missing",
        signed(plan=7): "claim 'plan' is missing",
        signed(exp="tomorrow"): "claim 'exp' is missing or not a time",
        signed(exp=10**15): "claim 'exp' is missing or not a time",
        signed(nbf=1.5): "claim 'nbf' is not a time",
        signed(trial={"isTrialMode": "no"}): "claim 'trial' must be an object",
        signed(trial={"isTrialMode": True, "endsAt": "soon"}): "'trial.endsAt' is not an ISO 8601 time",
        signed(subscription={"status": 3}): "claim 'subscription' must be an object",
        signed(
            subscription={"status": "active", "cancelAtPeriodEnd": 1}
        ): "claim 'subscription.cancelAtPeriodEnd' must be a boolean",
    }
    for token, reason in cases.items():
        assert_fallback(verifier.verify(token, now=NOW), reason)


def test_features_an_older_licence_lacks_take_the_fallback_value(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    claims = dict(mint(keys).claims)
    claims["features"] = {key: value for key, value in claims["features"].items() if key != "hasOtaUpdates"}
    token = jwt.encode(claims, keys.private_key, algorithm="RS256", headers={"kid": keys.kid})
    license = verifier.verify(token, now=NOW)
    assert license.valid
    assert license.features.max_devices == 50
    assert license.features.has_ota_updates is UNLICENSED.features.has_ota_updates


def test_grants_seen_before_do_not_excuse_a_wrong_type_null_or_missing_claim(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    # The verifier reuses the typed grants of licences with the same values; these differ only in type
    # (1 == True in Python), in null against absent, so each must be typed on its own.
    base = dict(mint(keys).claims)
    assert base["features"]["hasOtaUpdates"] is True
    assert verifier.verify(mint(keys).token, now=NOW).valid

    def signed(features: dict[str, Any]) -> str:
        return jwt.encode({**base, "features": features}, keys.private_key, algorithm="RS256")

    assert_fallback(
        verifier.verify(signed({**base["features"], "hasOtaUpdates": 1}), now=NOW),
        "features.hasOtaUpdates must be a boolean, got 1",
    )
    assert_fallback(
        verifier.verify(signed({**base["features"], "maxDevices": 50.0}), now=NOW),
        "features.maxDevices must be an integer, got 50.0",
    )
    without = {key: value for key, value in base["features"].items() if key != "hasOtaUpdates"}
    for _ in range(2):
        license = verifier.verify(signed(without), now=NOW)
        assert license.valid
        assert license.features.has_ota_updates is UNLICENSED.features.has_ota_updates
    assert_fallback(
        verifier.verify(signed({**base["features"], "hasOtaUpdates": None}), now=NOW),
        "features.hasOtaUpdates must be a boolean, got None",
    )
    assert verifier.verify(mint(keys).token, now=NOW).features == PLANS["professional"].features


def test_device_limit_body_is_the_earlier_systems_403(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    license = verifier.verify(mint(keys).token, now=NOW)
    assert license.check_device_limit(49) is None
    assert license.check_device_limit(50) == {
        "error": "Device limit exceeded",
        "message": (
            "Your professional plan allows a maximum of 50 devices. You currently have 50 active devices. "
            "Please upgrade your plan to add more devices."
        ),
        "details": {"currentDevices": 50, "maxDevices": 50, "plan": "professional"},
    }


def test_unlimited_devices_are_never_full(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    license = verifier.verify(mint(keys, PLANS["enterprise"]).token, now=NOW)
    assert license.check_device_limit(0) is None
    assert license.check_device_limit(10**9) is None
    assert license.allows_another("maxUsers", 10**6)


def test_fallback_allows_two_devices() -> None:
    fallback = unlicensed("no licence")
    assert fallback.check_device_limit(1) is None
    body = fallback.check_device_limit(2)
    assert body is not None
    assert body["details"] == {"currentDevices": 2, "maxDevices": 2, "plan": "unlicensed"}


def test_feature_guards(keys: SigningKeys, verifier: LicenseVerifier) -> None:
    professional = verifier.verify(mint(keys).token, now=NOW)
    starter = verifier.verify(mint(keys, PLANS["starter"]).token, now=NOW)
    assert professional.has_feature("canScheduleJobs") is True
    assert starter.has_feature("canScheduleJobs") is False
    assert starter.has_feature("hasRemoteAccess") is True
    assert unlicensed("x").has_feature("canExportData") is False
    assert professional.limit("maxUsers") == 15
    assert professional.limit("maxDevices") == 50
    assert professional.allows_another("maxDashboards", 19)
    assert not professional.allows_another("maxDashboards", 20)
    with pytest.raises(ValueError, match="'canFly' is not a boolean feature"):
        professional.has_feature("canFly")
    with pytest.raises(ValueError, match="'maxDevices' is not a boolean feature"):
        professional.has_feature("maxDevices")
    with pytest.raises(ValueError, match="'maxCats' is not a limit"):
        professional.limit("maxCats")


def signed_payload(keys: SigningKeys, payload: bytes) -> str:
    """A token over payload bytes as they are, which JSON encoders would not write."""
    header = b64url(json.dumps({"alg": "RS256", "kid": keys.kid}).encode())
    signing_input = f"{header}.{b64url(payload)}"
    signature = keys.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def test_grants_are_not_shared_by_text_that_only_escaped_looks_the_same(
    keys: SigningKeys, verifier: LicenseVerifier, decoders: str
) -> None:
    # U+10000, and its two surrogates as UTF-8 bytes (json reads them, orjson refuses): ASCII-escaped,
    # both are "\ud800\udc00", so a key of escaped text would give the second the first's grants.
    base = dict(mint(keys).claims)
    astral = json.dumps({**base, "subscription": {"status": "\U00010000"}}, ensure_ascii=False)
    surrogates = json.dumps({**base, "subscription": {"status": "\ud800\udc00"}}, ensure_ascii=False)
    first = verifier.verify(signed_payload(keys, astral.encode()), now=NOW)
    assert first.subscription.status == "\U00010000"
    second = verifier.verify(signed_payload(keys, surrogates.encode("utf-8", "surrogatepass")), now=NOW)
    if decoders == "standard library":
        assert second.subscription.status == "\ud800\udc00"
    else:
        assert_fallback(second, "malformed")


def test_a_claim_nested_deeper_than_orjson_writes_is_still_typed(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    base = dict(mint(keys).claims)
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    token = jwt.encode(
        {**base, "features": {**base["features"], "note": deep}}, keys.private_key, algorithm="RS256"
    )
    for _ in range(2):
        license = verifier.verify(token, now=NOW)
        assert license.valid, license.reason
        assert license.features == PLANS["professional"].features


def test_verifier_construction_errors(keys: SigningKeys) -> None:
    with pytest.raises(ValueError, match="at least one public key"):
        LicenseVerifier([], audience=AUDIENCE)
    with pytest.raises(ValueError, match="audience must not be empty"):
        LicenseVerifier([keys.public_key], audience="")
    with pytest.raises(ValueError, match="must be an RSA public key"):
        LicenseVerifier({"ec": ec.generate_private_key(ec.SECP256R1()).public_key()}, audience=AUDIENCE)
    with pytest.raises(ValueError, match="JWKS document is not JSON"):
        LicenseVerifier.from_jwks("{", audience=AUDIENCE)
    with pytest.raises(ValueError, match="public key 1: not a PEM public key"):
        LicenseVerifier.from_pem("garbage", audience=AUDIENCE)
    assert LicenseVerifier.from_pem(keys.public_key_pem().decode(), audience=AUDIENCE).key_ids == (keys.kid,)


def test_more_licences_than_the_verifier_remembers_all_verify(
    keys: SigningKeys, verifier: LicenseVerifier
) -> None:
    tokens = [
        mint(keys, customer=LicenseCustomer(f"cust_many{index:04d}", "Many")).token for index in range(40)
    ]
    for _ in range(2):
        for index, token in enumerate(tokens):
            license = verifier.verify(token, now=NOW)
            assert license.valid
            assert license.customer_id == f"cust_many{index:04d}"


def test_a_restricted_licence_provisions_no_new_device(keys: SigningKeys) -> None:
    from iotistic_billing.licensing.plans import restricted

    token = mint_license(
        customer=LicenseCustomer("cust_abc123", "Acme"),
        plan=restricted(PLANS["professional"]),
        trial=NO_TRIAL,
        subscription=SubscriptionTerms("past_due"),
        now=datetime.now(UTC),
        keys=keys,
        issuer="https://billing.iotistic.cloud",
        audience="iotistic-instance",
    ).token
    licence = LicenseVerifier([keys.public_key], audience="iotistic-instance").verify(token)
    assert licence.valid and licence.plan == "professional"
    body = licence.check_device_limit(3)
    assert body is not None and body["details"]["restricted"] is True
    assert not licence.has_feature("canExportData")
