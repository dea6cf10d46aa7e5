"""Pure parts of the webhook server: rate limiting, names and manifests of signup, views, the API document."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import re
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import ip_network
from pathlib import Path
from typing import Any, TypeVar, cast

import jsonschema_rs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from iotistic_billing.api_keys import usage_key_hash
from iotistic_billing.customer import (
    CUSTOMER_ID_PATTERN,
    DNS_NAME_PATTERN,
    TrialStatus,
    derived_customer_id,
    parse_spec,
    resource_name_for,
)
from iotistic_billing.directory import CustomerRecord
from iotistic_billing.errors import Unavailable, ValidationFailed
from iotistic_billing.licensing.keys import (
    SigningKeys,
    generate_private_key,
    private_key_pem,
    public_key_pem,
)
from iotistic_billing.licensing.minting import NO_TRIAL, LicenseCustomer, SubscriptionTerms, mint_license
from iotistic_billing.licensing.plans import PLANS
from iotistic_billing.operator.__main__ import build_context
from iotistic_billing.settings import Settings, SettingsError
from iotistic_billing.usage.store import ReportPosition
from iotistic_billing.webhook_server import licenses
from iotistic_billing.webhook_server.access_log import access_log_arguments
from iotistic_billing.webhook_server.console.data import EVENT_RESULTS
from iotistic_billing.webhook_server.context import KEYRING
from iotistic_billing.webhook_server.errors import error_middleware
from iotistic_billing.webhook_server.keyring import LicenseKeyring
from iotistic_billing.webhook_server.messages import (
    IDEMPOTENCY_KEY_MAX,
    IDEMPOTENCY_KEY_PATTERN,
    read_body,
    read_customer_id,
    read_idempotency_key,
    read_notice_id,
    read_query,
)
from iotistic_billing.webhook_server.metrics import Metrics
from iotistic_billing.webhook_server.openapi import build_document
from iotistic_billing.webhook_server.options import RateLimit
from iotistic_billing.webhook_server.route_table import ROUTES
from iotistic_billing.webhook_server.schemas import (
    CancelRequest,
    NoticeQuery,
    ReportsCursor,
    Request,
    SignupRequest,
    UsageHistory,
    UsageQuery,
    reports_cursor,
)
from iotistic_billing.webhook_server.security import RateLimiter, address_bucket, client_address
from iotistic_billing.webhook_server.views import (
    customer_view,
    new_customer_id,
    queue_stats,
    signup_manifest,
)
from tests.conftest import REPO


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(per_second=2.0, burst=3), clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    wait = limiter.take("a")
    assert wait == pytest.approx(0.5)
    assert limiter.take("b") is None  # buckets are per key
    clock.now += 0.5
    assert limiter.take("a") is None
    assert limiter.take("a") is not None
    clock.now += 100
    assert [limiter.take("a") for _ in range(4)].count(None) == 3  # never more than the burst


def test_token_bucket_memory_is_bounded() -> None:
    limiter = RateLimiter(RateLimit(per_second=1.0, burst=1), clock=FakeClock(), max_keys=10)
    for index in range(100):
        limiter.take(f"client-{index}")
    assert len(limiter._buckets) == 10


INGRESS = (ip_network("10.244.0.0/16"), ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "trusted", "client"),
    [
        # No trusted proxy: the header is anyone's to write and is ignored.
        ("203.0.113.7", ["198.51.100.1"], (), "203.0.113.7"),
        # From an untrusted peer the header is ignored too.
        ("203.0.113.7", ["198.51.100.1"], INGRESS, "203.0.113.7"),
        # From the ingress: the address it appended.
        ("10.244.1.5", ["198.51.100.1"], INGRESS, "198.51.100.1"),
        # A client's own prefix does not choose its bucket: the right-most untrusted hop does.
        ("10.244.1.5", ["6.6.6.6, 198.51.100.1"], INGRESS, "198.51.100.1"),
        # Chained trusted proxies are skipped, over repeated headers too.
        ("10.244.1.5", ["198.51.100.1, 10.244.2.9", "fd00::3"], INGRESS, "198.51.100.1"),
        # One address, one bucket: ports and spellings are normalised.
        ("10.244.1.5", ["198.51.100.1:5678"], INGRESS, "198.51.100.1"),
        ("10.244.1.5", ["[2001:db8:0::1]:443"], INGRESS, "2001:db8::1"),
        ("10.244.1.5", [" 2001:DB8::1 "], INGRESS, "2001:db8::1"),
        # Only proxies in the chain, no header, or an entry that is no address: the peer.
        ("10.244.1.5", ["10.244.3.3"], INGRESS, "10.244.1.5"),
        ("10.244.1.5", [], INGRESS, "10.244.1.5"),
        ("10.244.1.5", ["198.51.100.1, junk"], INGRESS, "10.244.1.5"),
        (None, [], INGRESS, "unknown"),
        # A dual-stack proxy writes the IPv4 hop it saw IPv4-mapped: still trusted, still one client
        # (found in review: the walk stopped there, and everyone behind it shared its bucket).
        ("10.244.1.5", ["198.51.100.1, ::ffff:10.244.2.9"], INGRESS, "198.51.100.1"),
        ("10.244.1.5", ["::ffff:198.51.100.1"], INGRESS, "198.51.100.1"),
        # A bracketed IPv6 entry without a port is an address too (found in review: it ended the walk).
        ("10.244.1.5", ["[2001:db8::1]"], INGRESS, "2001:db8::1"),
        ("10.244.1.5", ["198.51.100.1, [fd00::3]"], INGRESS, "198.51.100.1"),
        ("10.244.1.5", ["198.51.100.1, [2001:db8::1]junk"], INGRESS, "10.244.1.5"),
        # A trusted network written IPv4-mapped holds the IPv4 peers and hops it maps (found in review:
        # peers are read as IPv4, and no IPv6 network held them).
        ("10.1.2.3", ["198.51.100.1, 10.2.0.1"], (ip_network("::ffff:10.0.0.0/104"),), "198.51.100.1"),
        ("10.1.2.3", ["198.51.100.1"], (ip_network("::ffff:10.0.0.0/104"),), "198.51.100.1"),
        ("10.1.2.3", ["198.51.100.1"], (ip_network("::ffff:192.168.0.0/112"),), "10.1.2.3"),
    ],
)
def test_client_address_reads_forwarded_for_only_from_trusted_proxies(
    peer: str | None, forwarded_for: list[str], trusted: tuple[Any, ...], client: str
) -> None:
    assert client_address(peer, forwarded_for, trusted) == client


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        ("198.51.100.7", "198.51.100.7"),
        # An IPv6 client holds a whole /64 (and picks any address of it): the /64 is the client.
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        # A dual-stack socket's IPv4 peer is the IPv4 client.
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("unknown", "unknown"),
    ],
)
def test_an_address_s_rate_limit_bucket_is_its_client(address: str, bucket: str) -> None:
    assert address_bucket(address) == bucket


def test_one_ipv6_client_cannot_take_a_fresh_bucket_per_address() -> None:
    limiter = RateLimiter(RateLimit(per_second=1.0, burst=5), clock=FakeClock())
    allowed = sum(
        limiter.take(address_bucket(client_address("10.244.0.7", [f"2001:db8:1:2::{i:x}"], INGRESS))) is None
        for i in range(1000)
    )
    assert allowed == 5, f"{allowed} of 1,000 requests from one /64 at one instant were allowed (burst 5)"
    assert limiter.take(address_bucket("2001:db8:1:3::1")) is None  # the next /64 is another client


def test_the_keyring_verifies_our_licences_whatever_their_times_and_only_ours() -> None:
    keys = SigningKeys(generate_private_key())
    keyring = LicenseKeyring(keys.public_key)

    def minted(now: datetime, signing: SigningKeys = keys) -> str:
        return mint_license(
            customer=LicenseCustomer("cust_abc123", "Acme"),
            plan=PLANS["starter"],
            trial=NO_TRIAL,
            subscription=SubscriptionTerms("active"),
            now=now,
            keys=signing,
            issuer="https://billing.example",
            audience="iotistic-instance",
        ).token

    now = datetime.now(UTC)
    # Minted by an operator whose clock is two minutes ahead (nbf and iat in our future), or expired.
    for token in (minted(now + timedelta(minutes=2)), minted(now - timedelta(days=40))):
        claims, verified = keyring.decode(token, "iotistic-instance")
        assert verified and claims["customerId"] == "cust_abc123"
    assert keyring.decode(minted(now), "another-audience") == ({}, False)
    stranger = minted(now, SigningKeys(generate_private_key()))
    claims, verified = keyring.decode(stranger, "iotistic-instance")
    assert not verified and claims["customerId"] == "cust_abc123"  # shown, never trusted


def _public_key_file(folder: Path, keys: SigningKeys, name: str) -> Path:
    path = folder / name
    path.write_bytes(public_key_pem(keys.public_key))
    return path


def test_jwks_lists_each_key_once(tmp_path: Path) -> None:
    current, older = SigningKeys(generate_private_key()), SigningKeys(generate_private_key())
    current_path = _public_key_file(tmp_path, current, "public-key.pem")
    # The current key listed among the retired ones too, as a rotation's copy-paste leaves it.
    settings = Settings(
        license_public_key_path=current_path,
        license_extra_public_key_paths=[current_path, _public_key_file(tmp_path, older, "older.pem")],
    )
    keyring = LicenseKeyring.from_settings(settings)
    assert [jwk["kid"] for jwk in keyring.jwks()["keys"]] == [current.kid, older.kid]
    assert keyring.pem() == public_key_pem(current.public_key)


async def test_extra_keys_alone_are_not_a_current_key(tmp_path: Path) -> None:
    retired = SigningKeys(generate_private_key())
    settings = Settings(license_extra_public_key_paths=[_public_key_file(tmp_path, retired, "older.pem")])
    keyring = LicenseKeyring.from_settings(settings)
    assert not keyring.configured
    app = web.Application()
    app[KEYRING] = keyring
    # No key is served as the current signing key's: both answer 503 naming the setting that is unset.
    for handler in (licenses.get_public_key, licenses.get_jwks):
        with pytest.raises(Unavailable) as unset:
            await handler(make_mocked_request("GET", "/", app=app))
        assert unset.value.details == {"setting": "LICENSE_PUBLIC_KEY_PATH"}
    # Licences the retired key signed still verify (the admin API shows them as ours).
    token = mint_license(
        customer=LicenseCustomer("cust_abc123", "Acme"),
        plan=PLANS["starter"],
        trial=NO_TRIAL,
        subscription=SubscriptionTerms("active"),
        now=datetime.now(UTC),
        keys=retired,
        issuer="https://billing.example",
        audience="iotistic-instance",
    ).token
    assert keyring.decode(token, "iotistic-instance")[1]


@pytest.mark.parametrize(
    ("private", "public", "extra", "message"),
    [
        ("ours", "missing", None, "LICENSE_PUBLIC_KEY_PATH: {missing}: cannot read"),
        ("ours", "another", None, "LICENSE_PUBLIC_KEY_PATH: {another}: public key does not belong to"),
        ("missing", "ours", None, "LICENSE_PRIVATE_KEY_PATH: {missing}: cannot read"),
        ("ours", "ours", "missing", "LICENSE_EXTRA_PUBLIC_KEY_PATHS: {missing}: cannot read"),
    ],
)
def test_the_server_and_the_operator_refuse_key_files_they_cannot_use_naming_the_variable_of_the_path(
    tmp_path: Path, private: str, public: str, extra: str | None, message: str
) -> None:
    """Found in review: with both variables set, an unreadable public key file or one of another pair was
    blamed on LICENSE_PRIVATE_KEY_PATH, by the server and by the operator. The server still refuses to
    start on either (it never signs, but would publish a key that is not the operator's), and on a private
    key it cannot read."""
    keys = SigningKeys(generate_private_key())
    (tmp_path / "private-key.pem").write_bytes(private_key_pem(keys.private_key))
    paths = {
        "ours": _public_key_file(tmp_path, keys, "public-key.pem"),
        "another": _public_key_file(tmp_path, SigningKeys(generate_private_key()), "another.pem"),
        "missing": tmp_path / "missing.pem",
    }
    settings = Settings(
        license_private_key_path=tmp_path / "private-key.pem" if private == "ours" else paths[private],
        license_public_key_path=paths[public],
        license_extra_public_key_paths=[] if extra is None else [paths[extra]],
    )
    with pytest.raises(SettingsError) as refused:
        LicenseKeyring.from_settings(settings)
    assert str(refused.value).startswith(message.format_map(paths)), refused.value
    with pytest.raises(SettingsError) as refused:
        build_context(
            settings.model_copy(update={"instance_chart": str(REPO / "charts" / "customer-instance")}),
            "postgresql://x",
        )
    assert str(refused.value).startswith(message.format_map(paths)), refused.value


def test_usage_keys_are_looked_up_by_their_sha256() -> None:
    # The operator stores the same form (operator/license.py usage_key_hash).
    assert usage_key_hash("iuk_secret") == "7fc9465164ca6fb6a1643785a3d90e5b5dee701f040405eab2c7530a179a2365"


def test_a_usage_key_that_was_not_utf8_hashes_as_the_bytes_sent() -> None:
    # aiohttp hands header bytes that are not UTF-8 over as surrogate-escaped text; .encode() raised.
    assert usage_key_hash("iuk_\udcff") == hashlib.sha256(b"iuk_\xff").hexdigest()


@pytest.mark.parametrize(
    "customer_id",
    ["cust_abc123", "cust_" + "a1" * 16, derived_customer_id("2f0e6c1a-uid"), "cust_abcdef123456"],
)
def test_customer_ids_in_use_are_read_from_the_path(customer_id: str) -> None:
    request = make_mocked_request(
        "GET", f"/api/customers/{customer_id}", match_info={"customerId": customer_id}
    )
    assert read_customer_id(request) == customer_id


@pytest.mark.parametrize(
    "customer_id", ["cust_x\x00", "cust_abc", "cust_ABCDEF123", "cust_" + "a" * 33, "customer-1", ""]
)
def test_a_customer_id_off_the_crd_pattern_is_a_400_naming_it(customer_id: str) -> None:
    request = make_mocked_request("GET", "/api/customers/x", match_info={"customerId": customer_id})
    with pytest.raises(ValidationFailed) as refused:
        read_customer_id(request)
    assert refused.value.details[0]["field"] == "customerId"
    assert refused.value.message.startswith("customerId: ")


@pytest.mark.parametrize(("notice_id", "expected"), [("1", 1), ("0042", 42), (str(2**63 - 1), 2**63 - 1)])
def test_notice_ids_are_read_from_the_path(notice_id: str, expected: int) -> None:
    request = make_mocked_request("POST", "/", match_info={"noticeId": notice_id})
    assert read_notice_id(request) == expected


@pytest.mark.parametrize(
    "notice_id",
    ["0", "-1", "1.5", "\u00b2", "\u0663", str(2**63), "9" * 30, pytest.param("9" * 4301, id="4301-digits")],
)
def test_a_notice_id_off_the_range_is_a_400_naming_it(notice_id: str) -> None:
    """Found in review: 4,301 digits passed isdigit() and int() refused them, a 500."""
    request = make_mocked_request("POST", "/", match_info={"noticeId": notice_id})
    with pytest.raises(ValidationFailed) as refused:
        read_notice_id(request)
    assert refused.value.status == 400
    assert refused.value.details[0]["field"] == "noticeId"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=1&limit=500", "limit"),  # which one counted was the first
        ("limit=5.0", "limit"),
        ("limit=%2B5", "limit"),  # +5
        ("limit=%205", "limit"),  # " 5"
        ("limit=1_0", "limit"),
        ("limit=%D9%A3", "limit"),  # an Arabic-Indic three
        ("status=sent&status=dead", "status"),
    ],
)
def test_a_query_parameter_repeated_or_not_in_plain_digits_is_a_400_naming_it(query: str, field: str) -> None:
    """Found in review: ?limit=1&limit=500 read the first and ignored the other, and 5.0, +5, " 5" and
    1_0 were read as numbers."""
    with pytest.raises(ValidationFailed) as refused:
        read_query(make_mocked_request("GET", f"/api/notices?{query}"), NoticeQuery)
    assert [problem["field"] for problem in refused.value.details] == [field]
    read = read_query(make_mocked_request("GET", "/api/notices?limit=05&cache=1&cache=2"), NoticeQuery)
    assert read.limit == 5  # plain digits, and unknown parameters (repeated too) ignored


@pytest.mark.parametrize(
    ("company", "expected"),
    [
        ("Acme Corp.", "acme-corp"),
        ("  Müller & Söhne GmbH ", "muller-sohne-gmbh"),
        ("株式会社", "customer"),
        ("A" * 80, "a" * 40),
    ],
)
def test_resource_names_are_dns_labels_short_enough_for_the_namespace(company: str, expected: str) -> None:
    name = resource_name_for(company)
    assert name == expected
    suffixed = resource_name_for(company, "x1y2z3")
    assert re.fullmatch(DNS_NAME_PATTERN, suffixed) and len("customer-" + suffixed) <= 63


def test_customer_ids_match_the_crd_pattern() -> None:
    ids = {new_customer_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(CUSTOMER_ID_PATTERN, value) for value in ids)


def test_signup_manifest_is_a_valid_customer_without_the_password() -> None:
    request = SignupRequest(
        email="owner@acme.example", company_name="Acme", full_name="Ann Owner", password="hunter2-hunter2"
    )
    signed_up = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
    manifest = signup_manifest(
        name="acme",
        customer_id="cust_abc123def456",
        request=request,
        billing_mode="stripe",
        trial_days=14,
        now=signed_up,
    )
    spec = parse_spec(manifest["spec"])
    assert (spec.customer_id, spec.contact_name, spec.billing.mode, spec.trial.days) == (
        "cust_abc123def456",
        "Ann Owner",
        "stripe",
        14,
    )
    assert "hunter2" not in str(manifest)
    # The trial's end itself (found in review): a Customer restored from a backup, or re-created, counted
    # its 14 days again from its new creationTimestamp.
    assert spec.trial.ends_at == datetime(2026, 3, 15, 9, 30, 15, tzinfo=UTC)
    assert spec.trial.ends_at_for(signed_up + timedelta(days=200)) == spec.trial.ends_at


def test_signup_validation_messages_name_the_field() -> None:
    with pytest.raises(ValidationError) as invalid:
        SignupRequest.model_validate({"email": "nope", "company_name": ""})
    failed = ValidationFailed.from_pydantic(invalid.value)
    assert failed.message == (
        "email: value is not a valid email address; company_name: String should have at least 1 character"
    )
    assert [problem["field"] for problem in failed.details] == ["email", "company_name"]


M = TypeVar("M", bound=BaseModel)


class _Body:
    """What read_body reads of a request: its bytes."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def read(self) -> bytes:
        return self.raw


async def read_request(model: type[M], body: dict[str, Any]) -> M:
    return await read_body(cast(web.Request, _Body(json.dumps(body).encode())), model)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"immediately": "yes"}, "immediately"),
        ({"immediately": "t"}, "immediately"),
        ({"immediately": "on"}, "immediately"),
        ({"immediately": "1"}, "immediately"),
        ({"immediately": 1}, "immediately"),
        ({"immediately": 1.0}, "immediately"),
        ({"customer_id": " cust_abc123xyz789 "}, "customer_id"),
    ],
)
async def test_request_bodies_are_read_strictly_as_json_types_them(body: dict[str, Any], field: str) -> None:
    """Found in review: bodies were validated loosely, so {"immediately": "yes"} (or "t", "on", "1", 1,
    1.0) cancelled a subscription at once, though the document says boolean, and " cust_abc123xyz789 "
    was stripped and taken despite the id's pattern."""
    with pytest.raises(ValidationFailed) as refused:
        await read_request(CancelRequest, {"customer_id": "cust_abc123xyz789", **body})
    assert [problem["field"] for problem in refused.value.details] == [field]
    assert refused.value.message.startswith(f"{field}: ")
    cancel = await read_request(CancelRequest, {"customer_id": "cust_abc123xyz789", "immediately": True})
    assert cancel.immediately is True


def record(name: str, phase: str | None = None, **spec: Any) -> CustomerRecord:
    body: dict[str, Any] = {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"email": f"a@{name}.example", "companyName": name.title(), **spec},
        "status": {"phase": phase} if phase else {},
    }
    found = CustomerRecord.from_body(body)
    assert found is not None
    return found


def test_records_use_the_derived_customer_id_when_the_spec_has_none() -> None:
    assert record("a", customerId="cust_given123").customer_id == "cust_given123"
    derived = record("b").customer_id
    assert re.fullmatch(CUSTOMER_ID_PATTERN, derived)
    assert CustomerRecord.from_body({"metadata": {"name": "broken"}, "spec": {}}) is None


def test_a_customer_whose_subscription_holds_a_newer_field_is_still_a_customer() -> None:
    """Found in review: spec.subscription refused fields it did not know, so a webhook server older than
    the one that wrote a new field (a rolling upgrade, a rollback) read the Customer as none and recorded
    its Stripe events unmatched."""
    subscription = {"status": "active", "currentPeriodEnd": "2026-02-28T10:00:00Z", "billingAnchorDay": 31}
    found = record("newer", billing={"mode": "stripe"}, subscription=subscription)
    assert found.customer.spec.subscription is not None
    assert found.customer.spec.subscription.status == "active"


def test_customer_view_shows_the_trial_end_and_the_subscription() -> None:
    view = customer_view(
        record(
            "acme",
            trial={"days": 10},
            subscription={"status": "active", "plan": "starter", "stripeSubscriptionId": "sub_1"},
        ),
        "cus_1",
        datetime(2026, 1, 2, tzinfo=UTC),
    )
    assert view.trial_ends_at == datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=10)
    assert view.subscription is not None and view.subscription.stripe_subscription_id == "sub_1"
    assert view.stripe_customer_id == "cus_1"


def test_a_paying_customer_shows_no_trial_end_once_the_operator_said_so() -> None:
    """Found in review: the operator writes status.trial without an end for a Stripe subscription's plan,
    and the view then fell back to the signup's spec.plan trial, showing a trial end for a paying
    customer (the CLI and console showed none)."""
    paying = record("acme", trial={"days": 10}, plan="trial", billing={"mode": "stripe"})
    paying.customer.status.trial = TrialStatus(is_trial_mode=False)
    assert customer_view(paying, None, datetime(2026, 1, 2, tzinfo=UTC)).trial_ends_at is None
    paying.customer.status.trial = None  # not written yet: the spec's
    assert customer_view(paying, None, datetime(2026, 1, 2, tzinfo=UTC)).trial_ends_at == datetime(
        2026, 1, 11, tzinfo=UTC
    )


def test_a_suspended_customer_shows_the_trial_end_the_operator_reported() -> None:
    """Found in review: a suspended Customer whose status.trial had no end was shown its spec's trial end,
    counted from the object's creation: a paying customer suspended by an admin showed its signup trial's
    end (the operator's status.trial says it has none), though the operator keeps a suspended trial's end
    in status.trial.endsAt, counted from its customer id's first licence when it was made again."""
    now = datetime(2026, 1, 2, tzinfo=UTC)
    paying = record("acme", trial={"days": 10}, plan="trial", billing={"mode": "stripe"}, suspended=True)
    paying.customer.status.trial = TrialStatus(is_trial_mode=False)
    assert customer_view(paying, None, now).trial_ends_at is None
    # Made again on 2026-01-01 under a customer id first licensed on 2025-12-25: the operator's end.
    first_licensed = datetime(2025, 12, 25, tzinfo=UTC)
    made_again = record("acme", trial={"days": 10}, plan="trial", suspended=True)
    made_again.customer.status.trial = TrialStatus(
        is_trial_mode=False, ends_at=first_licensed + timedelta(days=10)
    )
    assert customer_view(made_again, None, now).trial_ends_at == datetime(2026, 1, 4, tzinfo=UTC)


def test_customer_view_shows_the_spec_s_stripe_customer_over_the_mirror_s() -> None:
    moved = record("acme", billing={"mode": "stripe", "stripeCustomerId": "cus_fromspec"})
    view = customer_view(moved, "cus_oldmirror", datetime(2026, 1, 2, tzinfo=UTC))
    assert view.stripe_customer_id == "cus_fromspec"


def test_queue_stats_count_unreconciled_customers_as_pending() -> None:
    stats = queue_stats([record("a"), record("b", "Ready"), record("c", "Ready"), record("d", "Failed")])
    dumped = stats.model_dump(by_alias=True)
    assert (dumped["Pending"], dumped["Ready"], dumped["Failed"], dumped["total"]) == (1, 2, 1, 4)


def test_the_document_describes_every_route_with_its_errors() -> None:
    document = build_document(ROUTES)
    for operation in ROUTES:
        entry = document["paths"][operation.path][operation.method.lower()]
        statuses = set(entry["responses"])
        if operation.access == "admin":
            assert {"401", "403", "429"} <= statuses, operation.path
            assert entry["security"] == [{"adminToken": []}]
        if operation.body is not None:
            assert {"400", "413"} <= statuses
        if "{customerId}" in operation.path:
            assert "400" in statuses, operation.path
    schemas = document["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error", "message"]
    assert "customerId" in str(document["paths"]["/api/customers/{customerId}"]["get"]["parameters"])


@pytest.mark.parametrize(
    "position",
    [
        ReportPosition(datetime(2025, 4, 17, 12, tzinfo=UTC), 1),
        ReportPosition(datetime(2025, 4, 17, 12, 0, 0, 500, tzinfo=UTC), 2**63 - 1),
    ],
)
def test_a_reports_cursor_reads_back_as_its_position(position: ReportPosition) -> None:
    cursor = reports_cursor(position)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", cursor) and len(cursor) <= 100
    assert UsageQuery.model_validate({"reports_before": cursor}).reports_before == position
    # An answer holds the position the store gave and shows it as the cursor.
    answer = TypeAdapter(ReportsCursor)
    assert answer.dump_python(answer.validate_python(position), mode="json") == cursor
    # Another zone's text of the same time is no cursor of ours: only what an answer gave is one.
    other_zone = f"{position.period_end.astimezone(timezone(timedelta(hours=2))).isoformat()},{position.id}"
    made_up = base64.urlsafe_b64encode(other_zone.encode()).decode().rstrip("=")
    with pytest.raises(ValidationError, match="reports_cursor"):
        UsageQuery.model_validate({"reports_before": made_up})


def test_the_usage_route_documents_its_pages() -> None:
    document = build_document(ROUTES)
    parameters = {
        parameter["name"]: parameter["schema"]
        for parameter in document["paths"]["/api/usage/{customerId}"]["get"]["parameters"]
    }
    assert "reports_next_cursor" in parameters["reports_before"]["description"]
    assert (parameters["reports_limit"]["minimum"], parameters["reports_limit"]["maximum"]) == (1, 500)
    history = document["components"]["schemas"]["UsageHistory"]
    assert "reports_next_cursor" in history["required"]
    assert "reports_before" in history["properties"]["reports_next_cursor"]["description"]


def test_the_routes_a_client_retries_document_their_idempotency_key() -> None:
    document = build_document(ROUTES)
    keyed = {
        (method.upper(), path)
        for path, methods in document["paths"].items()
        for method, entry in methods.items()
        if any(parameter["name"] == "Idempotency-Key" for parameter in entry.get("parameters", []))
    }
    assert keyed == {("POST", "/api/customers"), ("POST", "/api/subscriptions/checkout")}


@functools.cache
def _idempotency_key_schema() -> dict[str, Any]:
    entry = build_document(ROUTES)["paths"]["/api/subscriptions/checkout"]["post"]
    (schema,) = [each["schema"] for each in entry["parameters"] if each["name"] == "Idempotency-Key"]
    return cast(dict[str, Any], schema)


def _key_taken(header: str) -> bool:
    try:
        read_idempotency_key(make_mocked_request("POST", "/", headers={"Idempotency-Key": header}))
    except ValidationFailed:
        return False
    return True


# Any text a header can carry (latin-1), and the keys the document's pattern draws, as Schemathesis does.
_HEADERS = st.text(st.characters(codec="latin-1"), max_size=2 * IDEMPOTENCY_KEY_MAX + 10)


@hypothesis_settings(
    database=None, derandomize=True, max_examples=200, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(
    header=st.one_of(
        st.from_regex(IDEMPOTENCY_KEY_PATTERN, fullmatch=True),
        _HEADERS,
        st.builds("".join, st.lists(st.sampled_from(['"', "\\", "k", " ", "\t"]), max_size=12)),
    )
)
def test_the_document_s_idempotency_key_schema_is_the_server_s_rule(header: str) -> None:
    """Found in review: the document said any non-empty string, and the server refused a tab, an open
    quote or 256 characters: Schemathesis's positive phase draws such keys and fails as its valid data
    refused. Whatever the schema admits (judged by jsonschema_rs, Schemathesis's validator) is taken,
    and nothing else is."""
    schema = _idempotency_key_schema()
    assert _key_taken(header) == jsonschema_rs.is_valid(schema, header), repr(header)


@pytest.mark.parametrize(
    ("header", "taken"),
    [
        ("k" * IDEMPOTENCY_KEY_MAX, True),
        ("k" * (IDEMPOTENCY_KEY_MAX + 1), False),
        ('"' + "k" * IDEMPOTENCY_KEY_MAX + '"', True),
        ('"' + "k" * (IDEMPOTENCY_KEY_MAX + 1) + '"', False),
        ('"' + '\\"' * IDEMPOTENCY_KEY_MAX + '"', True),  # an escape is one character of the key
        ("a b", True),
        ('a"b', True),
        ("a\tb", False),
        ('"open', False),
        ('"a"b"', False),
        ('""', False),
        ("", False),
    ],
)
def test_an_idempotency_key_s_edges_agree_with_the_document(header: str, taken: bool) -> None:
    assert (_key_taken(header), jsonschema_rs.is_valid(_idempotency_key_schema(), header)) == (taken, taken)


def test_a_usage_report_s_period_start_states_its_format_bounds_and_retention() -> None:
    """Found in review: the retention's description replaced the timestamp's, so the document no longer
    said period_start's format and bounds (which the Schemathesis hooks forgive as said in words)."""
    schemas = build_document(ROUTES)["components"]["schemas"]
    report = next(
        schema
        for name, schema in schemas.items()
        if name.startswith("UsageReport") and "period_start" in schema.get("properties", {})
    )
    said = str(report["properties"]["period_start"])
    assert "RFC 3339 with a zone" in said and "from 2000-01-01T00:00:00Z, before 9000" in said, said
    assert "USAGE_RAW_RETENTION" in said, said


def test_every_text_field_a_request_asks_to_be_filled_says_blank_is_refused() -> None:
    """Requests strip their text, so " " is refused like "": a minimum length alone would document it
    as valid (Schemathesis sent {"reason": " "} to the revoke route and got the 400)."""
    document = build_document(ROUTES)
    requests = {operation.body.__name__ for operation in ROUTES if operation.body is not None}
    filled = [
        (name, field, spec)
        for name in requests & {model.__name__ for model in Request.__subclasses__()}
        for field, spec in document["components"]["schemas"][name].get("properties", {}).items()
        if spec.get("type") == "string" and spec.get("minLength", 0) >= 1 and "format" not in spec
    ]
    assert {(name, field) for name, field, _ in filled} >= {
        ("RevokeRequest", "reason"),
        ("SignupRequest", "company_name"),
    }
    assert [(name, field) for name, field, spec in filled if "pattern" not in spec] == []


@pytest.mark.parametrize("blank", ["\ufeff", "\u00a0\u3000", "\x1c", " "])
def test_a_company_name_the_crd_calls_blank_is_refused_before_anything_is_made(blank: str) -> None:
    """Found in review: a company name of a BOM alone passed the signup's model, so a Stripe customer was
    made, and then the API server refused the Customer, naming spec.companyName."""
    with pytest.raises(ValidationError) as refused:
        SignupRequest.model_validate({"email": "ops@example.com", "company_name": blank})
    assert [error["loc"] for error in refused.value.errors()] == [("company_name",)]
    assert SignupRequest.model_validate({"email": "ops@example.com", "company_name": f"{blank}X"})


def test_every_free_text_field_of_a_request_says_nul_is_refused() -> None:
    """Found by Schemathesis: {"reason": "...\\u0000..."} matched the document and got the 400 that every
    Request answers to NUL (PostgreSQL text holds none)."""
    document = build_document(ROUTES)
    schemas = document["components"]["schemas"]
    texts = [
        (model.__name__, field, spec)
        for model in Request.__subclasses__()
        if model.__name__ in schemas
        for field, property_ in schemas[model.__name__].get("properties", {}).items()
        for spec in [property_, *property_.get("anyOf", [])]
        if spec.get("type") == "string" and "enum" not in spec and "format" not in spec
    ]
    assert {(name, field) for name, field, _ in texts} >= {
        ("RevokeRequest", "reason"),
        ("SignupRequest", "full_name"),
        ("SignupRequest", "password"),
    }
    admitted = [(name, field) for name, field, spec in texts if re.search(spec.get("pattern", ""), "a\x00b")]
    assert admitted == []


def test_the_stripe_events_metric_says_every_result_it_counts() -> None:
    """Found in review: its help left out queued (every delivery stored) and retry (an apply that failed)."""
    (metric,) = [m for m in Metrics().registry.collect() if m.name == "iotistic_stripe_webhook_events"]
    help_text = metric.documentation
    applied = set(EVENT_RESULTS) - {"pending", "failed"}  # what the inbox records an applied event as
    for result in sorted(applied | {"queued", "duplicate", "rejected", "retry"}):
        assert re.search(rf"\b{result}\b", help_text), result


async def test_an_answer_the_server_fails_to_build_is_a_500_not_the_client_s_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: a response model that refused what a handler built (a server bug) answered
    400 "Validation failed" naming the response's field, as if the request were wrong."""

    async def handler(request: web.Request) -> web.Response:
        UsageHistory.model_validate({"customer_id": "cust_x"})  # a bug: most fields missing
        raise AssertionError("unreachable")

    answer = await error_middleware(make_mocked_request("GET", "/api/usage/cust_x"), handler)
    assert isinstance(answer, web.Response) and answer.text is not None
    assert (answer.status, json.loads(answer.text)["error"]) == (500, "Internal server error")
    assert "GET /api/usage/cust_x failed" in caplog.text


async def _access_lines(settings: Settings, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The access log's lines of a probe round, a scrape, a failing readiness and a usage report, served
    with the access log run_app is given (webhook_server/__main__.py)."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=503 if request.query.get("fail") else 200)

    app = web.Application()
    for path in ("/healthz", "/readyz", "/metrics"):
        app.router.add_get(path, answer)  # HEAD too, as the app answers it
    app.router.add_post("/api/usage/report", answer)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    server = TestServer(app)
    await server.start_server(**access_log_arguments(settings))  # TestServer(app, ...) drops them
    async with TestClient(server) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/readyz?fail=1"):
            (await client.get(path)).release()
        # Found in review: a load balancer's HEAD check was logged each time.
        (await client.head("/healthz")).release()
        (await client.post("/api/usage/report", json={})).release()
    return [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]


async def test_probes_and_scrapes_are_not_access_logged_but_their_failures_and_other_requests_are(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: aiohttp's access log wrote a line at INFO for every kubelet probe and Prometheus
    scrape (some 1,100 an hour on two replicas), which say nothing a person reads."""
    lines = await _access_lines(Settings(), caplog)
    assert [line.split('"')[1] for line in lines] == [
        "GET /readyz?fail=1 HTTP/1.1",
        "POST /api/usage/report HTTP/1.1",
    ]
    assert " 503 " in lines[0]


async def test_access_log_false_logs_no_request(caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: nothing turned the access log down; a line a request (usage reports, console
    refreshes) came to some 350,000 a day at 1,000 instances."""
    assert await _access_lines(Settings(access_log=False), caplog) == []
