"""Signup's order of writes, with the API server, the database and Stripe faked: nothing is created in
Stripe before the database is reached and the email is free, and a signup that fails before its Customer
exists leaves no Stripe customer behind."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from kubernetes.client.exceptions import ApiException

from iotistic_billing import directory as directory_module
from iotistic_billing.customer import CUSTOMER_ID_PATTERN
from iotistic_billing.directory import Directory
from iotistic_billing.errors import DependencyUnavailable
from iotistic_billing.k8s import KubernetesUnavailable, SecretData
from iotistic_billing.settings import load_settings
from iotistic_billing.stripe_api import IdempotencyKeyReused, _maybe_made
from iotistic_billing.webhook_server.context import (
    CLOCK,
    DIRECTORY,
    KUBE,
    OPTIONS,
    SESSIONS,
    SETTINGS,
    STRIPE,
)
from iotistic_billing.webhook_server.customers import create_customer
from iotistic_billing.webhook_server.errors import error_middleware
from iotistic_billing.webhook_server.options import ServerOptions

SIGNUP = {"email": "ops@initech.example", "company_name": "Initech"}


class FakeKube:
    """The API server's Customers; `refuse_create` is raised by every create, `lose_answer` after a
    create stored its Customer (a read timeout)."""

    def __init__(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}
        self.refuse_create: Exception | None = None
        self.lose_answer: Exception | None = None
        # The licence JWT of each namespace's licence Secret; `refuse_secret` is raised by a read of one.
        self.licences: dict[str, str] = {}
        self.refuse_secret: Exception | None = None
        # The creates refused because the name was taken (409 AlreadyExists).
        self.names_refused = 0

    async def list_customers(self) -> list[dict[str, Any]]:
        return list(self.customers.values())

    async def create_customer(self, body: dict[str, Any], manager: Any = None) -> dict[str, Any]:
        if self.refuse_create is not None:
            raise self.refuse_create
        name = body["metadata"]["name"]
        if name in self.customers:
            self.names_refused += 1
            raise ApiException(status=409, reason="AlreadyExists")
        metadata = {**body["metadata"], "uid": f"uid-{name}", "creationTimestamp": "2026-06-01T00:00:00Z"}
        self.customers[name] = {**body, "metadata": metadata}
        if self.lose_answer is not None:
            raise self.lose_answer
        return self.customers[name]

    async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
        if self.refuse_secret is not None:
            raise self.refuse_secret
        token = self.licences.get(namespace)
        return SecretData({"license.jwt": token.encode()}, {}, {}) if token is not None else None


class FakeStripe:
    """Stripe's customers: made, deleted; `refuse_delete` is raised by a delete."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.refuse_delete: Exception | None = None
        # Raised by a create once it was made (its answer lost after the SDK's retries).
        self.lose_create: Exception | None = None

    async def create_customer(self, *, email: str, company_name: str, customer_id: str) -> str:
        self.calls.append({"email": email, "company_name": company_name, "customer_id": customer_id})
        self.created.append(f"cus_{len(self.created) + 1}")
        if self.lose_create is not None:
            raise self.lose_create
        return self.created[-1]

    async def delete_customer(self, stripe_customer_id: str) -> None:
        if self.refuse_delete is not None:
            raise self.refuse_delete
        self.deleted.append(stripe_customer_id)

    @property
    def kept(self) -> list[str]:
        return [customer for customer in self.created if customer not in self.deleted]


class FakeDatabase:
    """While `up` is False every statement fails as a refused connection does; while `locked`, another
    signup holds the email's lock; with `lost_at_commit`, the connection drops at the commit."""

    def __init__(self) -> None:
        self.up = True
        self.locked = False
        self.lost_at_commit = False

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[FakeDatabase]:
        yield self

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[FakeDatabase]:
        yield self
        if self.lost_at_commit:
            raise ConnectionResetError("PostgreSQL went away")

    async def execute(self, *args: Any, **kwargs: Any) -> None:
        if not self.up:
            raise ConnectionRefusedError("PostgreSQL is away")

    async def scalar(self, *args: Any, **kwargs: Any) -> bool:
        await self.execute()
        return not self.locked


class Signup:
    def __init__(
        self, client: TestClient[Any, Any], kube: FakeKube, stripe: FakeStripe, database: FakeDatabase
    ) -> None:
        self.client, self.kube, self.stripe, self.database = client, kube, stripe, database

    async def post(self, body: dict[str, str] = SIGNUP, key: str | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Idempotency-Key": key} if key is not None else None
        answer = await self.client.post("/api/customers", json=body, headers=headers)
        return answer.status, await answer.json()


@pytest.fixture
async def signup() -> AsyncIterator[Signup]:
    app = web.Application(middlewares=[error_middleware])
    kube, stripe, database = FakeKube(), FakeStripe(), FakeDatabase()
    app[SETTINGS] = load_settings(admin_api_token="admin-token-" + "a" * 20)
    app[OPTIONS] = ServerOptions(license_wait=0)
    app[CLOCK] = lambda: datetime(2026, 6, 1, tzinfo=UTC)
    app[KUBE] = kube  # type: ignore[misc]
    app[DIRECTORY] = Directory(kube)  # type: ignore[arg-type]
    app[STRIPE] = stripe  # type: ignore[misc]
    app[SESSIONS] = database  # type: ignore[misc]
    app.router.add_post("/api/customers", create_customer)
    async with TestClient(TestServer(app)) as client:
        yield Signup(client, kube, stripe, database)


async def test_a_signup_parses_only_the_customers_of_its_email_or_customer_id(
    signup: Signup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: each signup parsed every Customer with our models on the event loop (about 300 ms
    at 1,000), stalling the Stripe webhooks the same loop accepts. The raw objects are compared first."""
    for index in range(20):
        name = f"tenant-{index}"
        spec = {
            "customerId": f"cust_tenant{index:04d}",
            "email": f"ops{index}@t.example",
            "companyName": name,
        }
        signup.kube.customers[name] = {"metadata": {"name": name, "uid": f"uid-{index}"}, "spec": spec}
    parsed: list[str] = []
    read = directory_module.read_customer

    def counted(body: dict[str, Any]) -> Any:
        parsed.append(body["metadata"]["name"])
        return read(body)

    monkeypatch.setattr(directory_module, "read_customer", counted)

    status, body = await signup.post()
    assert status == 202, body
    assert parsed == ["initech"]  # the Customer it made, answered with
    status, body = await signup.post({"email": "OPS7@t.example", "company_name": "Seven"})
    assert (status, body["details"][0]["resource_name"]) == (409, "tenant-7"), body
    assert parsed == ["initech", "tenant-7"]


async def test_a_company_name_in_use_is_suffixed_without_a_refused_create(signup: Signup) -> None:
    """Found in review: once signup listed only the Customers of its email or customer id, the names it
    knew were taken were always none, so a second "Acme" sent a create the API server refused (409) before
    trying a suffixed name, holding the email's lock meanwhile. The Customer named as its slug is listed."""
    status, body = await signup.post({"email": "ops@acme.example", "company_name": "Acme"})
    assert (status, body["customer"]["resource_name"]) == (202, "acme"), body
    status, body = await signup.post({"email": "billing@acme-two.example", "company_name": "ACME"})
    assert status == 202, body
    assert re.fullmatch(r"acme-[a-z0-9]{6}", body["customer"]["resource_name"]), body
    assert signup.kube.names_refused == 0


async def test_a_signup_keeps_its_stripe_customer(signup: Signup) -> None:
    status, body = await signup.post()
    assert status == 202, body
    assert body["customer"]["stripe_customer_id"] == "cus_1" and signup.stripe.kept == ["cus_1"]
    # In the Customer too (found in review: only the mirror row had it, lost to a signup killed before
    # its commit, and a checkout then made a second Stripe customer).
    (created,) = signup.kube.customers.values()
    assert created["spec"]["billing"] == {"mode": "stripe", "stripeCustomerId": "cus_1"}


@pytest.mark.parametrize(
    ("refusal", "status", "error"),
    [
        (KubernetesUnavailable("the API server cannot be reached"), 503, "Kubernetes API unavailable"),
        (ApiException(status=409, reason="AlreadyExists"), 409, "Name not available"),
        (ApiException(status=422, reason="Invalid"), 400, "Refused by the API server"),
    ],
)
async def test_a_signup_that_makes_no_customer_deletes_its_stripe_customer(
    signup: Signup, refusal: Exception, status: int, error: str
) -> None:
    signup.kube.refuse_create = refusal
    for _ in range(3):  # each retry made one more
        answer, body = await signup.post()
        assert (answer, body["error"]) == (status, error), body
    assert signup.kube.customers == {}
    assert len(signup.stripe.created) == 3 and signup.stripe.kept == []


async def test_a_create_whose_answer_was_lost_keeps_the_stripe_customer_of_its_customer(
    signup: Signup,
) -> None:
    # The API server stored the Customer and the answer timed out: its Stripe customer is its own.
    signup.kube.lose_answer = KubernetesUnavailable("read timed out", maybe_applied=True)
    status, body = await signup.post()
    assert (status, body["error"]) == (503, "Kubernetes API unavailable"), body
    assert list(signup.kube.customers) == ["initech"] and signup.stripe.kept == ["cus_1"]


async def test_a_create_stored_after_its_timeout_keeps_its_stripe_customer(signup: Signup) -> None:
    # Found in review: the create's answer was lost, the Customers listed at once showed none (the create
    # not stored yet), and the Stripe customer was deleted: the create then landed, its Customer linked
    # to a deleted Stripe customer for good.
    signup.kube.refuse_create = KubernetesUnavailable("read timed out", maybe_applied=True)

    status, body = await signup.post()
    (customer_id,) = {call["customer_id"] for call in signup.stripe.calls}
    signup.kube.refuse_create = None  # the create lands after the answer
    await signup.kube.create_customer({"metadata": {"name": "initech"}, "spec": {"customerId": customer_id}})

    assert signup.stripe.kept == ["cus_1"]
    assert (status, body["error"]) == (503, "Kubernetes API unavailable"), body
    assert f"GET /api/customers/{customer_id}" in body["message"], body
    assert body["details"] == {
        "dependency": "Kubernetes API",
        "customer_id": customer_id,
        "stripe_customer_id": "cus_1",
    }


async def test_with_the_database_away_nothing_is_created_in_stripe(signup: Signup) -> None:
    signup.database.up = False
    status, body = await signup.post()
    assert (status, body["error"]) == (503, "Database unavailable"), body
    assert signup.stripe.created == [] and signup.kube.customers == {}


async def test_a_database_lost_after_the_customer_was_created_still_answers_with_it(
    signup: Signup, caplog: pytest.LogCaptureFixture
) -> None:
    # Found in review: the 503 said "nothing was changed" while the Customer and its Stripe customer
    # existed, and the client's retry got 409 and never the customer id. The operator writes the mirror
    # row when it mints the licence.
    signup.database.lost_at_commit = True
    with caplog.at_level(logging.WARNING, logger="iotistic_billing.webhook_server.customers"):
        status, body = await signup.post()
    assert status == 202, body
    (created,) = signup.kube.customers.values()
    assert body["customer"]["customer_id"] == created["spec"]["customerId"]
    assert signup.stripe.kept == ["cus_1"]
    assert "could not be recorded in PostgreSQL" in caplog.text


async def test_an_email_being_signed_up_is_409_without_waiting(signup: Signup) -> None:
    signup.database.locked = True
    status, body = await signup.post()
    assert (status, body["message"]) == (409, "a signup with this email address is in progress"), body
    assert body["details"] == [{"field": "email", "message": "being registered"}]
    assert signup.stripe.created == [] and signup.kube.customers == {}


async def test_a_keyed_signup_retried_while_its_first_try_runs_is_told_to_retry_and_its_customer_id(
    signup: Signup,
) -> None:
    """Found in review: a keyed signup retried while its first try still held the email's lock (Stripe
    and the Kubernetes create can take over 30 s) was 409 "Customer already exists" with no customer id,
    so the client was told one exists, though the first try could still fail. With a key the answer is a
    409 to retry (the IETF draft's answer to a key whose request is in progress), naming the header and
    the customer id the key makes."""
    _, made = await signup.post({"email": "it@globex.example", "company_name": "Globex"}, key="k-1")
    signup.database.locked = True

    answer = await signup.client.post("/api/customers", json=SIGNUP, headers={"Idempotency-Key": "k-1"})
    body = await answer.json()

    assert (answer.status, body["error"]) == (409, "Signup in progress"), body
    assert answer.headers["Retry-After"] == "5"
    customer_id = body["details"]["customer_id"]
    assert body["details"]["field"] == "Idempotency-Key"
    assert f"GET /api/customers/{customer_id}" in body["message"], body
    # The id the key makes for this email, not another email's under the same key.
    signup.database.locked = False
    _, retried = await signup.post(key="k-1")
    assert customer_id == retried["customer"]["customer_id"] != made["customer"]["customer_id"]


async def test_an_email_taken_is_409_before_stripe_naming_its_customer(signup: Signup) -> None:
    """Found in review: the 409 did not say whose the email was, and a retry of a signup whose answer
    was lost had no way to find its customer but paging through all of them."""
    _, first = await signup.post()
    status, body = await signup.post({**SIGNUP, "email": SIGNUP["email"].upper(), "company_name": "Other"})
    assert (status, body["error"]) == (409, "Customer already exists"), body
    customer_id, name = first["customer"]["customer_id"], first["customer"]["resource_name"]
    assert body["details"] == [
        {"field": "email", "message": "already registered", "customer_id": customer_id, "resource_name": name}
    ]
    assert body["message"] == f"customer {customer_id} (Customer {name}) has this email address"
    assert signup.stripe.created == ["cus_1"] and len(signup.kube.customers) == 1


async def test_a_stripe_customer_that_cannot_be_deleted_is_logged(
    signup: Signup, caplog: pytest.LogCaptureFixture
) -> None:
    signup.kube.refuse_create = KubernetesUnavailable("the API server cannot be reached")
    signup.stripe.refuse_delete = DependencyUnavailable("Stripe")
    with caplog.at_level(logging.ERROR, logger="iotistic_billing.webhook_server.customers"):
        status, body = await signup.post()
    assert (status, body["error"]) == (503, "Kubernetes API unavailable"), body
    assert signup.stripe.kept == ["cus_1"]
    assert any("Stripe customer cus_1 was not deleted" in record.getMessage() for record in caplog.records)


async def test_the_api_server_lost_while_waiting_for_the_licence_still_answers_with_the_customer(
    signup: Signup,
) -> None:
    # Found in review: the wait's read was outside what the create's failures answer, so the Customer
    # and its Stripe customer existed behind a 503 "nothing was changed", and the retry was a 409.
    signup.kube.refuse_secret = KubernetesUnavailable("the API server cannot be reached")
    status, body = await signup.post()
    assert status == 202, body
    (created,) = signup.kube.customers.values()
    assert body["customer"]["customer_id"] == created["spec"]["customerId"] and body["license"] is None
    assert signup.stripe.kept == ["cus_1"]


async def test_a_licence_of_a_deleted_customer_of_the_same_name_is_not_the_new_one_s(signup: Signup) -> None:
    # Found in review: the namespace of a deleted Customer of this name, still being deleted, holds its
    # licence: signup answered it, a licence of another customer id.
    signup.kube.licences["customer-initech"] = jwt.encode(
        {"customerId": "cust_initech0ld1"}, "k" * 32, "HS256"
    )
    status, body = await signup.post()
    assert status == 202, body
    assert body["license"] is None


async def test_a_stripe_customer_create_without_an_answer_is_a_503_naming_the_customer_id(
    signup: Signup,
) -> None:
    """Found in review: Stripe's "the change may have been made: check before retrying" carried no
    customer id, so the client had nothing to check (the Kubernetes create's 503 names it)."""
    signup.stripe.lose_create = _maybe_made("create a customer", "APIConnectionError")
    status, body = await signup.post()

    (customer_id,) = {call["customer_id"] for call in signup.stripe.calls}
    assert (status, body["error"]) == (503, "Stripe unavailable"), body
    assert body["details"] == {"dependency": "Stripe", "customer_id": customer_id}
    assert f"GET /api/customers/{customer_id} is a 404" in body["message"]
    assert signup.kube.customers == {}


async def test_a_signup_retried_with_its_idempotency_key_makes_one_customer(signup: Signup) -> None:
    """Found in review: each try of a signup drew a new customer id, so Stripe's idempotency key
    (`signup-<customer id>`) changed with every client retry: a create whose answer was lost (a 503 "may
    have been made") and its retry made two Stripe customers, one orphaned naming a Customer that never
    existed. Under one Idempotency-Key the tries share the customer id, so Stripe's key too."""
    signup.stripe.lose_create = _maybe_made("create a customer", "APIConnectionError")
    lost, lost_body = await signup.post(key="signup-42")
    signup.stripe.lose_create = None
    made, made_body = await signup.post(key="signup-42")
    again, again_body = await signup.post(key="signup-42")  # its answer lost too: the retry after it

    first_id, retry_id = [call["customer_id"] for call in signup.stripe.calls]
    assert (lost, made) == (503, 202), (lost_body, made_body)
    assert first_id == retry_id == lost_body["details"]["customer_id"]
    assert "a retry with the same Idempotency-Key takes up" in lost_body["message"]
    (created,) = signup.kube.customers.values()
    assert created["spec"]["customerId"] == made_body["customer"]["customer_id"] == first_id
    # As a retry without a key after a lost answer: the 409 naming the customer it made.
    assert (again, again_body["error"]) == (409, "Customer already exists"), again_body
    assert again_body["details"][0]["customer_id"] == first_id
    assert len(signup.stripe.calls) == 2


async def test_one_idempotency_key_of_two_emails_is_two_customers(signup: Signup) -> None:
    _, first = await signup.post(key="k-1")
    _, other = await signup.post({"email": "it@globex.example", "company_name": "Globex"}, key="k-1")
    _, without = await signup.post({"email": "it@hooli.example", "company_name": "Hooli"})

    ids = [body["customer"]["customer_id"] for body in (first, other, without)]
    assert len(set(ids)) == 3 and "k-1" not in ids[0]
    assert all(re.fullmatch(CUSTOMER_ID_PATTERN, customer_id) for customer_id in ids)


async def test_a_keyed_signup_retried_after_its_customer_s_email_was_edited_is_409_naming_it(
    signup: Signup,
) -> None:
    _, first = await signup.post(key="k-1")
    (created,) = signup.kube.customers.values()
    created["spec"]["email"] = "billing@initech.example"

    status, body = await signup.post(key="k-1")

    assert (status, body["error"]) == (409, "Customer already exists"), body
    assert body["details"][0]["field"] == "Idempotency-Key"
    assert body["details"][0]["customer_id"] == first["customer"]["customer_id"]
    assert len(signup.kube.customers) == 1 and signup.stripe.created == ["cus_1"]


async def test_a_keyed_signup_whose_key_stripe_refuses_as_reused_is_a_422_naming_the_header(
    signup: Signup,
) -> None:
    """Found in review: a retry under the same key within 24 hours with another company_name, or the
    email in another case (one customer id), sends Stripe other parameters under its key: Stripe's
    idempotency_error came back as an opaque 409 naming our key `signup-cust_...`. It is the key reused
    with another body, the IETF draft's 422, naming Idempotency-Key."""
    signup.stripe.lose_create = IdempotencyKeyReused(
        "Stripe refused the request",
        "Stripe refused to create a customer: Keys for idempotent requests can only be used with the same"
        " parameters they were first used with. Try using a key other than 'signup-cust_0123456789abcdef'",
        {"stripe_code": "idempotency_error"},
    )

    status, body = await signup.post({**SIGNUP, "company_name": "Initech Inc."}, key="k-1")
    unkeyed, unkeyed_body = await signup.post()

    assert (status, body["error"]) == (422, "Idempotency-Key reused"), body
    (problem,) = body["details"]
    assert problem["field"] == "Idempotency-Key"
    assert problem["customer_id"] == signup.stripe.calls[0]["customer_id"]
    assert "signup-cust_" not in body["message"] and "company_name" in body["message"]
    # Without a key the customer id is new each time: no key of the client's to name.
    assert (unkeyed, unkeyed_body["error"]) == (409, "Stripe refused the request")
    assert signup.kube.customers == {}


async def test_a_signup_with_a_bad_idempotency_key_is_a_400_naming_it(signup: Signup) -> None:
    status, body = await signup.post(key="k" * 256)
    assert (status, body["details"][0]["field"]) == (400, "Idempotency-Key"), body
    assert signup.stripe.calls == [] and signup.kube.customers == {}
