"""The subscription routes with the API server, the database and Stripe faked: which Customers may check
out or change plan, and what is asked of Stripe."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import PaidPlanName
from iotistic_billing.db import models
from iotistic_billing.directory import Directory
from iotistic_billing.errors import ValidationFailed
from iotistic_billing.prices import PriceCatalog
from iotistic_billing.settings import load_settings
from iotistic_billing.stripe_api import (
    CheckoutSession,
    CustomerSubscribed,
    IdempotencyKeyReused,
    StripeCustomerMissing,
    SubscriptionChange,
)
from iotistic_billing.webhook_server import subscriptions
from iotistic_billing.webhook_server.context import CATALOG, DIRECTORY, SESSIONS, SETTINGS, STRIPE
from iotistic_billing.webhook_server.errors import error_middleware
from iotistic_billing.webhook_server.schemas import SubscriptionChangeResponse

PRICES: dict[PaidPlanName, str] = {
    "starter": "price_starter",
    "professional": "price_pro",
    "enterprise": "price_ent",
}
PLANS_BY_PRICE = {price: plan for plan, price in PRICES.items()}
CHECKOUT = {"success_url": "https://a.example/ok", "cancel_url": "https://a.example/no"}
LIVE = {"status": "active", "plan": "starter", "stripeSubscriptionId": "sub_live1", "lastEventCreated": 1}


def customer(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": "2026-06-01T00:00:00Z"},
        "spec": {"customerId": f"cust_{name}01", "email": f"ops@{name}.example", "companyName": name, **spec},
    }


class FakeKube:
    def __init__(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}

    async def list_customers(self) -> list[dict[str, Any]]:
        return list(self.customers.values())

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        return self.customers.get(name)


class FakeDatabase:
    """Every scalar (a mirror row's Stripe customer, a live subscription's id) is `stored`; `open` counts
    the sessions (pooled connections) in use, `log` the commits."""

    def __init__(self, log: list[str]) -> None:
        self.stored: Any = None
        # The mirror row's Stripe customer, when set (else `stored` too).
        self.link: Any = None
        self.open = 0
        self.log = log
        # Raised by a commit (PostgreSQL away).
        self.refuse_commit: Exception | None = None
        # The subscriptions table's rows by Stripe id, for a lookup of one by its id.
        self.rows: dict[str, models.Subscription] = {}

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[FakeDatabase]:
        self.open += 1
        try:
            yield self
        finally:
            self.open -= 1

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[FakeDatabase]:
        yield self
        if self.refuse_commit is not None:
            raise self.refuse_commit
        self.log.append("commit")

    async def execute(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        named = args[0].compile().params.get("stripe_subscription_id_1")
        if named is not None:
            return self.rows.get(named)
        if self.link is not None and "customers.stripe_customer_id" in str(args[0]):
            return self.link
        return self.stored


class FakeStripe:
    """Stripe's side: the calls made, and each subscription's plan price (starter at first); `log` the
    calls with the database sessions open meanwhile."""

    def __init__(self, db: FakeDatabase | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.prices: dict[str, str] = {}
        self.db = db
        # Raised by a customer's create (Stripe refusing one of its fields).
        self.refuse_customer: Exception | None = None
        # Raised by a session's create (Stripe has a live subscription of the customer).
        self.refuse_checkout: Exception | None = None
        # The Stripe customers Stripe does not have (deleted): a session's create for one is refused.
        self.deleted: set[str] = set()

    def _call(self, name: str, kw: dict[str, Any]) -> None:
        self.calls.append((name, kw))
        if self.db is not None:
            self.db.log.append(f"{name} ({self.db.open} open)")

    async def create_customer(self, **kw: Any) -> str:
        self._call("create_customer", kw)
        if self.refuse_customer is not None:
            raise self.refuse_customer
        return "cus_new"

    async def create_checkout_session(self, **kw: Any) -> CheckoutSession:
        self._call("checkout", kw)
        if self.refuse_checkout is not None:
            raise self.refuse_checkout
        if kw["stripe_customer_id"] in self.deleted:
            raise StripeCustomerMissing(
                "Stripe refused the request",
                f"Stripe refused to create a checkout session: No such customer: {kw['stripe_customer_id']}",
                {"stripe_code": "resource_missing", "stripe_param": "customer"},
            )
        return CheckoutSession("cs_test_1", "https://checkout.stripe.com/c/pay/cs_test_1")

    async def change_price(self, subscription_id: str, price_id: str) -> SubscriptionChange:
        self.calls.append(("change_price", {"subscription_id": subscription_id, "price_id": price_id}))
        changed = self.prices.get(subscription_id, PRICES["starter"]) != price_id
        self.prices[subscription_id] = price_id
        return SubscriptionChange(subscription_id, "active", False, changed=changed)

    async def cancel(
        self, subscription_id: str, *, immediately: bool, live_statuses: Collection[str]
    ) -> SubscriptionChange:
        self.calls.append(("cancel", {"subscription_id": subscription_id, "immediately": immediately}))
        plan = PLANS_BY_PRICE[self.prices.get(subscription_id, PRICES["starter"])]
        return SubscriptionChange(subscription_id, "canceled", False, plan=plan)

    async def portal_session(self, **kw: Any) -> str:
        self.calls.append(("portal", kw))
        return "https://billing.stripe.com/p/session/x"

    def made(self, call: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.calls if name == call]


class Routes:
    def __init__(self, client: TestClient[Any, Any], kube: FakeKube, stripe: FakeStripe, db: FakeDatabase):
        self.client, self.kube, self.stripe, self.db = client, kube, stripe, db

    async def post(
        self, path: str, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        answer = await self.client.post(f"/api/subscriptions/{path}", json=payload, headers=headers)
        return answer.status, await answer.json()


@pytest.fixture
async def routes() -> AsyncIterator[Routes]:
    app = web.Application(middlewares=[error_middleware])
    kube, db = FakeKube(), FakeDatabase([])
    stripe = FakeStripe(db)
    app[SETTINGS] = load_settings(admin_api_token="admin-token-" + "a" * 20)
    app[CATALOG] = PriceCatalog(PRICES)
    app[DIRECTORY] = Directory(kube)  # type: ignore[arg-type]
    app[STRIPE] = stripe  # type: ignore[assignment]
    app[SESSIONS] = db  # type: ignore[assignment]
    for path, handler in [
        ("checkout", subscriptions.create_checkout),
        ("upgrade", subscriptions.upgrade_subscription),
        ("cancel", subscriptions.cancel_subscription),
        ("portal", subscriptions.create_portal_session),
    ]:
        app.router.add_post(f"/api/subscriptions/{path}", handler)
    async with TestClient(TestServer(app)) as client:
        yield Routes(client, kube, stripe, db)


async def test_a_plan_change_right_after_another_is_decided_by_stripe_not_the_lagging_spec(
    routes: Routes,
) -> None:
    routes.kube.customers["acme"] = customer(
        "acme", billing={"mode": "stripe", "stripeCustomerId": "cus_acme"}, subscription=LIVE
    )
    up = await routes.post("upgrade", {"customer_id": "cust_acme01", "new_plan": "enterprise"})
    # Stripe is on enterprise now; spec.subscription says starter until the inbox applies the update.
    back = await routes.post("upgrade", {"customer_id": "cust_acme01", "new_plan": "starter"})
    again = await routes.post("upgrade", {"customer_id": "cust_acme01", "new_plan": "starter"})

    assert (up[0], back[0]) == (200, 200), (up, back)
    assert back[1]["plan"] == "starter"
    assert again[0] == 409 and again[1]["error"] == "Plan unchanged", again
    assert again[1]["details"] == [{"field": "new_plan", "message": "equals the current plan"}]
    assert routes.stripe.prices == {"sub_live1": "price_starter"}


async def test_a_cancel_answers_with_the_plan_of_the_subscription_it_cancelled(routes: Routes) -> None:
    """Found in review: the answer's plan was spec.subscription's even when the cancel chose another,
    newer subscription of the customer's records (spec.subscription's had ended)."""
    ended = {**LIVE, "status": "canceled", "stripeSubscriptionId": "sub_old1"}
    routes.kube.customers["acme"] = customer(
        "acme", billing={"mode": "stripe", "stripeCustomerId": "cus_acme"}, subscription=ended
    )
    routes.db.stored = "sub_newer1"  # the newest live row of the subscriptions table
    routes.stripe.prices["sub_newer1"] = PRICES["professional"]

    status, answer = await routes.post("cancel", {"customer_id": "cust_acme01", "immediately": True})

    assert status == 200, answer
    assert routes.stripe.made("cancel") == [{"subscription_id": "sub_newer1", "immediately": True}]
    assert (answer["subscription_id"], answer["plan"]) == ("sub_newer1", "professional")


def row(subscription_id: str, customer_id: str = "cust_acme01", **fields: Any) -> models.Subscription:
    """A subscriptions table row, canceled on starter unless told."""
    values: dict[str, Any] = {"status": "canceled", "plan": "starter", "cancel_at_period_end": False}
    return models.Subscription(
        stripe_subscription_id=subscription_id, customer_id=customer_id, **(values | fields)
    )


@pytest.mark.parametrize(
    ("held", "other"),
    [
        # Stripe's deletion applied: spec.subscription canceled, the customer's other paid one live.
        ("acme", "sub_paid2"),
        # ... and no other: without subscription_id, 409 "No active subscription".
        ("acme", None),
        # A Customer deleted with its subscription open, whose cancel a client retries.
        (None, "sub_paid2"),
    ],
)
async def test_a_retried_cancel_naming_its_subscription_canceled_already_is_answered_cancelled(
    routes: Routes, held: str | None, other: str | None
) -> None:
    """Found in review: a cancel retried after a timeout (or a double click on two replicas) could not say
    which subscription it meant; once the inbox had applied the first one's deletion, the retry cancelled
    the customer's other, paid subscription (spec.subscription moved to it, or the newest live row). Named
    by `subscription_id`, one canceled already is answered as cancelled, and nothing else is."""
    cust_id = "cust_acme01" if held else "cust_gone01"
    if held:
        ended = {**LIVE, "status": "canceled", "stripeSubscriptionId": "sub_live1"}
        routes.kube.customers[held] = customer(
            held, billing={"mode": "stripe", "stripeCustomerId": "cus_acme"}, subscription=ended
        )
    routes.db.stored = other  # the newest open row of the subscriptions table
    routes.db.rows["sub_live1"] = row("sub_live1", cust_id, plan="professional")

    status, answer = await routes.post(
        "cancel", {"customer_id": cust_id, "immediately": True, "subscription_id": "sub_live1"}
    )

    assert status == 200, answer
    assert answer == {
        "customer_id": cust_id,
        "subscription_id": "sub_live1",
        "status": "canceled",
        "plan": "professional",
        "cancel_at_period_end": False,
        "canceled_immediately": True,
    }
    assert routes.stripe.calls == []


async def test_a_cancel_naming_a_subscription_that_expired_unpaid_answers_the_status_it_ended_in(
    routes: Routes,
) -> None:
    """Found in review: README said a named subscription ended already is 200 with status canceled, and
    one whose first payment never came (Stripe's incomplete_expired) answered that status instead. Its
    status is the one it ended in, as README and the schema now say: it never billed."""
    routes.kube.customers["acme"] = customer(
        "acme", billing={"mode": "stripe", "stripeCustomerId": "cus_acme"}, subscription=LIVE
    )
    routes.db.rows["sub_tried1"] = row("sub_tried1", status="incomplete_expired")

    status, answer = await routes.post(
        "cancel", {"customer_id": "cust_acme01", "subscription_id": "sub_tried1"}
    )

    assert status == 200, answer
    assert (answer["subscription_id"], answer["status"]) == ("sub_tried1", "incomplete_expired")
    assert routes.stripe.calls == []
    described = SubscriptionChangeResponse.model_json_schema()["properties"]["status"]["description"]
    assert "incomplete_expired" in described


@pytest.mark.parametrize(
    "named",
    [
        None,  # no subscription_id: as before, the current one
        "sub_live1",  # the current one, named
        "sub_older1",  # an older open one of the customer's: the one named, not the current one
    ],
)
async def test_a_cancel_naming_an_open_subscription_of_the_customer_s_cancels_that_one(
    routes: Routes, named: str | None
) -> None:
    routes.kube.customers["acme"] = customer(
        "acme", billing={"mode": "stripe", "stripeCustomerId": "cus_acme"}, subscription=LIVE
    )
    routes.db.rows["sub_older1"] = row("sub_older1", status="past_due")
    naming = {"subscription_id": named} if named else {}

    status, answer = await routes.post("cancel", {"customer_id": "cust_acme01", **naming})

    assert status == 200, answer
    cancelled = named or "sub_live1"
    assert routes.stripe.made("cancel") == [{"subscription_id": cancelled, "immediately": False}]
    assert answer["subscription_id"] == cancelled


@pytest.mark.parametrize(
    ("named", "stored"),
    [
        ("sub_unknown1", None),  # no row of it
        ("sub_globex1", row("sub_globex1", "cust_globex01", status="active")),  # another customer's
        ("sub_addon1", row("sub_addon1", status="active", plan=None)),  # another product's, on no plan
    ],
)
async def test_a_cancel_naming_no_subscription_of_the_customer_s_is_a_404_naming_it(
    routes: Routes, named: str, stored: models.Subscription | None
) -> None:
    routes.kube.customers["acme"] = customer(
        "acme", billing={"mode": "stripe", "stripeCustomerId": "cus_acme"}, subscription=LIVE
    )
    if stored is not None:
        routes.db.rows[named] = stored

    status, answer = await routes.post(
        "cancel", {"customer_id": "cust_acme01", "immediately": True, "subscription_id": named}
    )

    assert (status, answer["error"]) == (404, "Subscription not found"), answer
    assert answer["details"] == [
        {"field": "subscription_id", "message": f"customer cust_acme01 has no subscription {named} on a plan"}
    ]
    assert routes.stripe.calls == []


@pytest.mark.parametrize("named", [1, "cus_acme", "sub_", "sub_a b"])
async def test_a_cancel_s_subscription_id_is_a_stripe_subscription_id(routes: Routes, named: Any) -> None:
    status, answer = await routes.post("cancel", {"customer_id": "cust_acme01", "subscription_id": named})

    assert status == 400, answer
    assert [problem["field"] for problem in answer["details"]] == ["subscription_id"]
    assert routes.stripe.calls == []


@pytest.mark.parametrize(
    ("path", "payload"),
    [("checkout", {"plan": "enterprise", **CHECKOUT}), ("upgrade", {"new_plan": "enterprise"})],
)
async def test_a_manually_billed_customer_is_sent_to_no_subscription(
    routes: Routes, path: str, payload: dict[str, Any]
) -> None:
    # As manifests/samples/globex-professional.yaml, after a subscription it had in Stripe billing: its
    # licence follows spec.plan whatever Stripe bills.
    routes.kube.customers["globex"] = customer(
        "globex", plan="professional", billing={"mode": "manual"}, subscription=LIVE
    )

    status, answer = await routes.post(path, {"customer_id": "cust_globex01", **payload})

    assert (status, answer["error"]) == (409, "Not billed through Stripe"), answer
    assert "set spec.billing.mode to stripe" in answer["message"]
    assert answer["details"] == [{"field": "spec.billing.mode", "message": "is manual, not stripe"}]
    assert routes.stripe.calls == []


@pytest.mark.parametrize("known_from", ["spec", "row"])
async def test_a_checkout_beside_a_live_subscription_is_refused_naming_it(
    routes: Routes, known_from: str
) -> None:
    billing = {"mode": "stripe", "stripeCustomerId": "cus_acme"}
    if known_from == "spec":
        routes.kube.customers["acme"] = customer("acme", billing=billing, subscription=LIVE)
    else:  # its checkout's events are recorded, not applied to the Customer yet
        routes.kube.customers["acme"] = customer("acme", billing=billing)
        routes.db.stored = "sub_live1"

    status, answer = await routes.post(
        "checkout", {"customer_id": "cust_acme01", "plan": "enterprise", **CHECKOUT}
    )

    assert (status, answer["error"]) == (409, "Already subscribed"), answer
    assert "sub_live1" in answer["message"] and "/api/subscriptions/upgrade" in answer["message"]
    assert answer["details"] == {"customer_id": "cust_acme01", "subscription_id": "sub_live1"}
    assert routes.stripe.calls == []


async def test_a_checkout_after_the_subscription_ended_starts_a_new_one(routes: Routes) -> None:
    routes.kube.customers["acme"] = customer(
        "acme",
        billing={"mode": "stripe", "stripeCustomerId": "cus_acme"},
        subscription={**LIVE, "status": "canceled"},
    )

    status, answer = await routes.post(
        "checkout", {"customer_id": "cust_acme01", "plan": "enterprise", **CHECKOUT}
    )

    assert status == 200, answer
    assert [kw["price_id"] for kw in routes.stripe.made("checkout")] == ["price_ent"]


async def test_a_checkout_s_idempotency_key_reaches_stripe_hashed_and_scoped_to_its_customer_and_body(
    routes: Routes,
) -> None:
    """Found in review: a checkout retried after a timeout could not be told from a new one, so the
    abandoned first request expired the session its retry answered. The client's Idempotency-Key names
    the checkout: its digest with the customer and the body (not the key itself) goes to Stripe."""
    for name in ("acme", "initech"):
        routes.kube.customers[name] = customer(
            name, billing={"mode": "stripe", "stripeCustomerId": f"cus_{name}"}
        )
    sent = {"plan": "starter", **CHECKOUT}
    key = {"Idempotency-Key": "order-7"}

    for customer_id, body, headers in [
        ("cust_acme01", sent, key),
        ("cust_acme01", sent, {"Idempotency-Key": '"order-7"'}),  # the draft's quoted String
        ("cust_initech01", sent, key),
        ("cust_acme01", {**sent, "plan": "enterprise"}, key),
        ("cust_acme01", sent, None),
    ]:
        status, answer = await routes.post("checkout", {"customer_id": customer_id, **body}, headers)
        assert status == 200, answer

    first, retry, other_customer, other_plan, without = [
        kw["request_key"] for kw in routes.stripe.made("checkout")
    ]
    assert first == retry and without is None
    assert len({first, other_customer, other_plan}) == 3
    assert "order-7" not in first and len(first) == 64


@pytest.mark.parametrize(
    "header",
    ["", " ", "k" * 256, "café", "a\tb", '"open', '"a"b"'],
)
async def test_a_bad_idempotency_key_is_a_400_naming_the_header(routes: Routes, header: str) -> None:
    routes.kube.customers["acme"] = customer("acme", billing={"mode": "stripe", "stripeCustomerId": "cus_a"})

    answer = await routes.client.post(
        "/api/subscriptions/checkout",
        json={"customer_id": "cust_acme01", "plan": "starter", **CHECKOUT},
        headers={"Idempotency-Key": header},
    )

    body = await answer.json()
    assert answer.status == 400, body
    assert [problem["field"] for problem in body["details"]] == ["Idempotency-Key"]
    assert routes.stripe.calls == []


async def test_a_keyed_checkout_whose_key_stripe_refuses_as_reused_is_a_422_naming_the_header(
    routes: Routes,
) -> None:
    """Found in review: Stripe's idempotency_error (the session's key sent within 24 hours with other
    parameters: a price setting changed between a try and its retry) came back as an opaque 409 naming
    our key. It is the client's key reused, the IETF draft's 422, naming Idempotency-Key."""
    routes.kube.customers["acme"] = customer("acme", billing={"mode": "stripe", "stripeCustomerId": "cus_a"})
    routes.stripe.refuse_checkout = IdempotencyKeyReused(
        "Stripe refused the request",
        "Stripe refused to create a checkout session: Keys for idempotent requests can only be used with"
        " the same parameters they were first used with. Try using a key other than 'checkout-cus_a-...'",
        {"stripe_code": "idempotency_error"},
    )
    sent = {"customer_id": "cust_acme01", "plan": "starter", **CHECKOUT}

    status, body = await routes.post("checkout", sent, {"Idempotency-Key": "order-7"})

    assert (status, body["error"]) == (422, "Idempotency-Key reused"), body
    assert [problem["field"] for problem in body["details"]] == ["Idempotency-Key"]
    assert "checkout-cus_a" not in body["message"] and "a new Idempotency-Key" in body["message"]


async def test_a_checkout_commits_the_stripe_customer_it_made_before_the_session_and_holds_no_connection(
    routes: Routes,
) -> None:
    # Applied by GitOps: no Stripe customer yet.
    routes.kube.customers["gitops"] = customer("gitops", billing={"mode": "stripe"})

    status, answer = await routes.post(
        "checkout", {"customer_id": "cust_gitops01", "plan": "starter", **CHECKOUT}
    )

    assert status == 200, answer
    # Remembered in a transaction of its own before the session is asked for: a session that fails
    # leaves the link, and the retry uses it instead of creating again.
    assert routes.db.log == ["create_customer (0 open)", "commit", "checkout (0 open)"]


async def test_a_stripe_customer_made_at_checkout_but_not_recorded_is_named_in_the_503(
    routes: Routes,
) -> None:
    """Found in review: the 503 said "nothing was changed" while a Stripe customer had been made, and a
    spec.email edited before the retry made Stripe refuse its idempotency key for a day."""
    routes.kube.customers["gitops"] = customer("gitops", billing={"mode": "stripe"})
    routes.db.refuse_commit = ConnectionRefusedError("connection refused")

    status, answer = await routes.post(
        "checkout", {"customer_id": "cust_gitops01", "plan": "starter", **CHECKOUT}
    )

    assert (status, answer["error"]) == (503, "Database unavailable"), answer
    assert answer["details"] == {"dependency": "Database", "stripe_customer_id": "cus_new"}
    assert "Stripe customer cus_new was made for customer cust_gitops01 but not recorded" in answer["message"]
    assert routes.stripe.made("checkout") == []


async def test_a_customer_spec_stripe_refuses_at_checkout_is_a_409_naming_the_spec_field(
    routes: Routes,
) -> None:
    # Applied by GitOps with an email Stripe refuses: the checkout's body has no such field, the
    # Customer's spec is what to mend.
    routes.kube.customers["gitops"] = customer("gitops", billing={"mode": "stripe"})
    routes.stripe.refuse_customer = ValidationFailed(
        [{"field": "email", "message": "Stripe refused it: Invalid email address", "type": "stripe_refused"}]
    )

    status, answer = await routes.post(
        "checkout", {"customer_id": "cust_gitops01", "plan": "starter", **CHECKOUT}
    )

    assert (status, answer["error"]) == (409, "Stripe refused the Customer's spec"), answer
    assert answer["details"] == [
        {
            "field": "spec.email",
            "message": "Stripe refused it: Invalid email address",
            "type": "stripe_refused",
        }
    ]
    assert routes.stripe.made("checkout") == []


async def test_a_checkout_stripe_finds_subscribed_is_refused_naming_the_live_subscription(
    routes: Routes,
) -> None:
    # Found in review: a session paid whose events the Customer has not had yet was no live subscription
    # in the mirror; Stripe is asked for one with the statuses the mirror's check takes as live.
    routes.kube.customers["acme"] = customer(
        "acme", billing={"mode": "stripe", "stripeCustomerId": "cus_acme"}
    )
    routes.stripe.refuse_checkout = CustomerSubscribed("sub_paid")

    status, answer = await routes.post(
        "checkout", {"customer_id": "cust_acme01", "plan": "enterprise", **CHECKOUT}
    )

    assert (status, answer["error"]) == (409, "Already subscribed"), answer
    assert "sub_paid" in answer["message"] and "/api/subscriptions/upgrade" in answer["message"]
    assert answer["details"] == {"customer_id": "cust_acme01", "subscription_id": "sub_paid"}
    (asked,) = routes.stripe.made("checkout")
    # Unpaid and paused too (a later review): paid or resumed, they would bill beside a new one.
    assert asked["live_statuses"] == {"active", "trialing", "past_due", "unpaid", "paused"}


async def test_a_returning_customer_whose_stripe_customer_was_deleted_checks_out_with_a_new_one(
    routes: Routes,
) -> None:
    """Found in review: the mirror kept the link to a Stripe customer deleted in Stripe (its
    customer.deleted is not applied), so the returning customer's checkout was a 409 "No such customer"
    with no remedy but SQL; removing spec.billing.stripeCustomerId changed nothing. A new Stripe customer
    is made in its place, under an idempotency key of its own (signup's made the deleted one)."""
    routes.kube.customers["acme"] = customer("acme", billing={"mode": "stripe"})
    routes.db.link = "cus_gone"
    routes.stripe.deleted.add("cus_gone")

    status, answer = await routes.post(
        "checkout", {"customer_id": "cust_acme01", "plan": "starter", **CHECKOUT}
    )

    assert status == 200, answer
    assert [kw["stripe_customer_id"] for kw in routes.stripe.made("checkout")] == ["cus_gone", "cus_new"]
    (made,) = routes.stripe.made("create_customer")
    assert (made["customer_id"], made["replacing"]) == ("cust_acme01", "cus_gone")
    # Remembered before the session is asked for, as a first Stripe customer is.
    assert routes.db.log[-3:] == ["create_customer (0 open)", "commit", "checkout (0 open)"]


async def test_a_spec_naming_a_deleted_stripe_customer_is_a_409_naming_the_field(routes: Routes) -> None:
    """Found in review: the 409 said Stripe's "No such customer" alone. GitOps owns the spec's link, so no
    new Stripe customer is made; the answer says which field to mend."""
    routes.kube.customers["acme"] = customer(
        "acme", billing={"mode": "stripe", "stripeCustomerId": "cus_gone"}
    )
    routes.stripe.deleted.add("cus_gone")

    status, answer = await routes.post(
        "checkout", {"customer_id": "cust_acme01", "plan": "starter", **CHECKOUT}
    )

    assert (status, answer["error"]) == (409, "Stripe customer missing"), answer
    assert answer["details"] == [
        {"field": "spec.billing.stripeCustomerId", "message": "Stripe has no customer cus_gone"}
    ]
    assert "remove it and check out again" in answer["message"]
    assert routes.stripe.made("create_customer") == []


async def test_a_deleted_customer_s_live_subscription_is_cancelled_by_its_customer_id(routes: Routes) -> None:
    """Found in review: a Customer deleted with its subscription live (a GitOps prune, which cannot cancel
    first) left Stripe billing it, and the cancel answered 404 "Customer not found": no way to end it
    through us. The subscriptions table still has it."""
    routes.db.stored = "sub_gone1"  # its newest open row (the mirror has no Customer for it)
    routes.stripe.prices["sub_gone1"] = PRICES["professional"]

    status, answer = await routes.post("cancel", {"customer_id": "cust_gone01", "immediately": True})

    assert status == 200, answer
    assert routes.stripe.made("cancel") == [{"subscription_id": "sub_gone1", "immediately": True}]
    assert answer == {
        "customer_id": "cust_gone01",
        "subscription_id": "sub_gone1",
        "status": "canceled",
        "plan": "professional",
        "cancel_at_period_end": False,
        "canceled_immediately": True,
    }
    assert routes.db.log == []  # nothing written: no Customer, and the inbox records Stripe's deletion


async def test_a_cancel_of_a_customer_id_neither_a_customer_nor_a_subscription_has_is_a_404(
    routes: Routes,
) -> None:
    status, answer = await routes.post("cancel", {"customer_id": "cust_nobody01"})

    assert (status, answer["error"]) == (404, "Customer not found"), answer
    assert routes.stripe.calls == []


async def test_a_cancel_of_a_customer_this_version_cannot_read_is_refused_not_taken_for_a_deleted_one(
    routes: Routes,
) -> None:
    """Found in review: a Customer our models refuse is no Customer to the lookups, so its cancel took the
    deleted customer's path and cancelled the newest open subscription row, at once."""
    routes.kube.customers["acme"] = customer("acme", plan="bogus-plan")  # a spec our models refuse
    routes.db.stored = "sub_live9"
    status, answer = await routes.post("cancel", {"customer_id": "cust_acme01", "immediately": True})
    assert (status, answer["error"]) == (409, "Customer not gone"), answer
    assert "acme" in answer["message"] and "cannot read it" in answer["message"]
    assert routes.stripe.calls == []


async def test_the_newest_live_row_is_never_one_on_no_plan() -> None:
    """Found in review: another product's subscription on the customer's Stripe customer (no plan's price,
    recorded superseded by the inbox) was the newest open row, so a cancel with no held subscription (or
    of a deleted Customer's id) cancelled it in Stripe."""
    from sqlalchemy.dialects import postgresql

    from iotistic_billing.webhook_server.subscriptions import _newest_live_row

    asked: list[Any] = []

    class Session:
        async def scalar(self, statement: Any) -> None:
            asked.append(statement)

    await _newest_live_row(cast(AsyncSession, Session()), "cust_acme01", frozenset({"active"}))
    (statement,) = asked
    assert "subscriptions.plan IS NOT NULL" in str(statement.compile(dialect=postgresql.dialect()))
