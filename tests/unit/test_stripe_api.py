"""Our Stripe client against a small fake Stripe (aiohttp): what it sends, and how Stripe's answers
become our errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from iotistic_billing.errors import ApiError
from iotistic_billing.settings import load_settings
from iotistic_billing.stripe_api import StripeApi

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def item(item_id: str, price: str) -> dict[str, Any]:
    return {"id": item_id, "object": "subscription_item", "price": {"id": price, "object": "price"}}


class FakeStripe:
    """Records each request's form; answers a write with `answer` when set, else a subscription or a
    session. Keeps the checkout sessions it made (listed by customer and status, expired); with
    `lose_answers` it closes the connection after reading a request, as an answer lost on the way does."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.answer: tuple[int, dict[str, Any]] | None = None
        self.lose_answers = False
        self.subscription: dict[str, Any] = {
            "id": "sub_1",
            "object": "subscription",
            "status": "active",
            "cancel_at_period_end": False,
            "items": {"object": "list", "data": []},
        }
        self.sessions: dict[str, dict[str, Any]] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = dict(parse_qsl(await request.text()))
        self.requests.append((request.method, request.path, form))
        if self.lose_answers:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if self.answer is not None and request.method != "GET":
            status, payload = self.answer
            return web.json_response(payload, status=status)
        if request.path.startswith("/v1/subscriptions/"):
            return web.json_response(self.subscription)
        if request.path == "/v1/checkout/sessions" and request.method == "GET":
            return web.json_response(self._list_sessions(request.query))
        if request.path == "/v1/checkout/sessions":
            return web.json_response(self._open_session(form))
        if request.path.startswith("/v1/checkout/sessions/") and request.path.endswith("/expire"):
            session = self.sessions[request.path.split("/")[4]]
            session["status"] = "expired"
            return web.json_response(session)
        return web.json_response({"id": "x", "object": "unknown"})

    def _open_session(self, form: dict[str, str]) -> dict[str, Any]:
        session_id = f"cs_{len(self.sessions) + 1}"
        self.sessions[session_id] = {
            "id": session_id,
            "object": "checkout.session",
            "url": f"https://checkout.example/{session_id}",
            "status": "open",
            "mode": form.get("mode"),
            "customer": form.get("customer"),
            "expires_at": int(form["expires_at"]) if "expires_at" in form else None,
        }
        return self.sessions[session_id]

    def _list_sessions(self, query: Mapping[str, str]) -> dict[str, Any]:
        found = [
            session
            for session in self.sessions.values()
            if all(session.get(key) == query[key] for key in ("customer", "status") if key in query)
        ]
        return {"object": "list", "url": "/v1/checkout/sessions", "has_more": False, "data": found}

    def payable(self, customer: str) -> list[str]:
        return [
            session["id"]
            for session in self.sessions.values()
            if session["customer"] == customer and session["status"] == "open"
        ]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeStripe, StripeApi]]:
    stripe = FakeStripe()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stripe.handle)
    async with TestServer(app) as server:
        api = StripeApi(
            load_settings(
                stripe_secret_key="sk_test_123",
                stripe_api_base=f"http://{server.host}:{server.port}",
                stripe_price_starter="price_starter",
                stripe_price_enterprise="price_enterprise",
                stripe_metered_prices=["price_devices_overage", "price_api_calls_overage"],
            ),
            clock=lambda: NOW,
        )
        try:
            yield stripe, api
        finally:
            await api.close()


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        # Another request with the same idempotency key is in flight: Stripe's advice is to retry.
        (409, {"type": "invalid_request_error", "code": "idempotency_key_in_use"}, (503, None)),
        (400, {"type": "idempotency_error"}, (409, "idempotency_error")),
        (402, {"type": "card_error", "code": "card_declined"}, (409, "card_declined")),
        (404, {"type": "invalid_request_error", "code": "resource_missing"}, (409, "resource_missing")),
        (429, {"type": "invalid_request_error", "code": "rate_limit"}, (503, None)),
        (500, {"type": "api_error"}, (503, None)),
    ],
)
async def test_stripe_s_refusals_become_our_errors_with_its_code(
    fake: tuple[FakeStripe, StripeApi], status: int, error: dict[str, Any], expected: tuple[int, str | None]
) -> None:
    stripe, api = fake
    stripe.answer = (status, {"error": {**error, "message": "Stripe's sentence."}})

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True)

    answer, code = expected
    assert raised.value.status == answer
    if answer == 409:
        assert raised.value.error == "Stripe refused the request"
        assert raised.value.details == {"stripe_code": code}
    else:
        assert raised.value.error == "Stripe unavailable"
        assert raised.value.headers == {"Retry-After": "5"}


async def test_a_checkout_puts_the_metered_prices_on_the_subscription(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake
    await api.create_checkout_session(
        stripe_customer_id="cus_1",
        customer_id="cust_acme01",
        plan="starter",
        price_id="price_starter",
        success_url="https://a.example/ok",
        cancel_url="https://a.example/no",
    )
    _, path, form = stripe.requests[-1]
    assert path == "/v1/checkout/sessions"
    assert {key: value for key, value in form.items() if key.startswith("line_items")} == {
        "line_items[0][price]": "price_starter",
        "line_items[0][quantity]": "1",
        # Metered: Stripe bills the meter events it receives, no quantity.
        "line_items[1][price]": "price_devices_overage",
        "line_items[2][price]": "price_api_calls_overage",
    }


async def test_a_plan_change_moves_the_plan_item_wherever_stripe_lists_it(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake
    stripe.subscription["items"]["data"] = [
        item("si_metered", "price_devices_overage"),
        item("si_plan", "price_starter"),
    ]

    change = await api.change_price("sub_1", "price_enterprise")

    method, path, form = stripe.requests[-1]
    assert (method, path) == ("POST", "/v1/subscriptions/sub_1")
    assert (form["items[0][id]"], form["items[0][price]"]) == ("si_plan", "price_enterprise")
    assert "items[1][id]" not in form  # the metered item stays as it is
    assert change.subscription_id == "sub_1"


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ([item("si_metered", "price_devices_overage")], "No plan item"),
        ([item("si_a", "price_starter"), item("si_b", "price_enterprise")], "Several plan items"),
    ],
)
async def test_a_plan_change_without_one_plan_item_is_refused_naming_the_prices(
    fake: tuple[FakeStripe, StripeApi], items: list[dict[str, Any]], error: str
) -> None:
    stripe, api = fake
    stripe.subscription["items"]["data"] = items

    with pytest.raises(ApiError) as raised:
        await api.change_price("sub_1", "price_enterprise")

    assert (raised.value.status, raised.value.error) == (409, error)
    assert raised.value.details == {
        "subscription_id": "sub_1",
        "prices": [entry["price"]["id"] for entry in items],
    }
    assert [method for method, _, _ in stripe.requests] == ["GET"]  # nothing was changed


async def test_a_plan_change_to_the_price_stripe_has_sends_nothing(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake
    stripe.subscription["items"]["data"] = [
        item("si_metered", "price_devices_overage"),
        item("si_plan", "price_enterprise"),
    ]

    change = await api.change_price("sub_1", "price_enterprise")

    assert change.changed is False and change.subscription_id == "sub_1"
    assert [method for method, _, _ in stripe.requests] == ["GET"]


async def test_a_new_checkout_leaves_no_earlier_session_payable(fake: tuple[FakeStripe, StripeApi]) -> None:
    # Found in review: two checkouts (two tabs, a retry after a timeout) left two sessions payable for
    # Stripe's default 24 h, and paying both made two billed subscriptions.
    stripe, api = fake
    stripe.sessions["cs_other"] = {
        "id": "cs_other",
        "status": "open",
        "mode": "payment",
        "customer": "cus_1",
    }
    checkout = {
        "stripe_customer_id": "cus_1",
        "customer_id": "cust_acme01",
        "plan": "starter",
        "price_id": "price_starter",
        "success_url": "https://a.example/ok",
        "cancel_url": "https://a.example/no",
    }

    await api.create_checkout_session(**checkout)
    second = await api.create_checkout_session(**{**checkout, "plan": "enterprise"})

    # The earlier subscription session is expired; a payment-mode one of the customer is not ours.
    assert stripe.payable("cus_1") == ["cs_other", second.session_id]
    # Each payable for 31 minutes, not Stripe's default 24 h: two checkouts at the same moment, each
    # finding the other not made yet, leave two sessions for that long only.
    made = [session for session in stripe.sessions.values() if session["id"] != "cs_other"]
    assert [session["expires_at"] - NOW.timestamp() for session in made] == [31 * 60, 31 * 60]


async def test_a_cancel_whose_answer_is_lost_does_not_say_nothing_was_changed(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Found in review: a cancel sent and never answered (after the SDK's retries) was a 503 "nothing was
    # changed, retry later", though Stripe may have cancelled.
    stripe, api = fake
    stripe.lose_answers = True

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True)

    # Sent, each retry under the same idempotency key: Stripe may have acted on any of them.
    assert {(method, path) for method, path, _ in stripe.requests} == {("DELETE", "/v1/subscriptions/sub_1")}
    assert (raised.value.status, raised.value.error) == (503, "Stripe unavailable")
    assert "nothing was changed" not in raised.value.message
    assert "may have been made" in raised.value.message and "before retrying" in raised.value.message


async def test_a_read_whose_answer_is_lost_still_says_nothing_was_changed(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake
    stripe.lose_answers = True

    with pytest.raises(ApiError) as raised:
        await api.change_price("sub_1", "price_enterprise")  # its first call reads the subscription

    assert {method for method, _, _ in stripe.requests} == {"GET"}
    assert raised.value.status == 503 and "nothing was changed" in raised.value.message


@pytest.mark.parametrize(
    ("call", "param", "field"),
    [
        ("create_customer", "email", "email"),
        ("create_customer", "name", "company_name"),
        ("create_checkout_session", "success_url", "success_url"),
        ("create_checkout_session", "cancel_url", "cancel_url"),
        ("portal_session", "return_url", "return_url"),
    ],
)
async def test_a_field_stripe_refuses_is_a_400_naming_it(
    fake: tuple[FakeStripe, StripeApi], call: str, param: str, field: str
) -> None:
    # Found in review: Stripe's refusal of an email (`x@.example.com`) or a URL (`https://.`) was a 409
    # "Stripe refused the request" naming no field.
    stripe, api = fake
    message = f"Invalid {param}: not one Stripe takes"
    stripe.answer = (400, {"error": {"type": "invalid_request_error", "param": param, "message": message}})
    arguments: dict[str, dict[str, Any]] = {
        "create_customer": {"email": "x@.example.com", "company_name": "Acme", "customer_id": "cust_acme01"},
        "create_checkout_session": {
            "stripe_customer_id": "cus_1",
            "customer_id": "cust_acme01",
            "plan": "starter",
            "price_id": "price_starter",
            "success_url": "https://.",
            "cancel_url": "https://.",
        },
        "portal_session": {"stripe_customer_id": "cus_1", "return_url": "https://."},
    }

    with pytest.raises(ApiError) as raised:
        await getattr(api, call)(**arguments[call])

    assert (raised.value.status, raised.value.error) == (400, "Validation failed")
    (problem,) = raised.value.details
    assert (problem["field"], problem["message"]) == (field, f"Stripe refused it: {message}")


async def test_a_refused_parameter_that_is_no_request_field_stays_a_409(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # The Stripe customer the Customer links: not the client's to correct in its request.
    stripe, api = fake
    stripe.answer = (
        400,
        {"error": {"type": "invalid_request_error", "param": "customer", "message": "No such customer"}},
    )

    with pytest.raises(ApiError) as raised:
        await api.portal_session(stripe_customer_id="cus_gone", return_url="https://a.example/account")

    assert (raised.value.status, raised.value.error) == (409, "Stripe refused the request")
    assert raised.value.details == {"stripe_code": "invalid_request_error", "stripe_param": "customer"}
