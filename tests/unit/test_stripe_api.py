"""Our Stripe client against a small fake Stripe (aiohttp): what it sends, and how Stripe's answers
become our errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from iotistic_billing.errors import ApiError
from iotistic_billing.settings import load_settings
from iotistic_billing.stripe_api import StripeApi


def item(item_id: str, price: str) -> dict[str, Any]:
    return {"id": item_id, "object": "subscription_item", "price": {"id": price, "object": "price"}}


class FakeStripe:
    """Records each request's form; answers `answer` when set, else a subscription or a session."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.answer: tuple[int, dict[str, Any]] | None = None
        self.subscription: dict[str, Any] = {
            "id": "sub_1",
            "object": "subscription",
            "status": "active",
            "cancel_at_period_end": False,
            "items": {"object": "list", "data": []},
        }

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(parse_qsl(await request.text()))))
        if self.answer is not None:
            status, payload = self.answer
            return web.json_response(payload, status=status)
        if request.path.startswith("/v1/subscriptions/"):
            return web.json_response(self.subscription)
        if request.path == "/v1/checkout/sessions":
            return web.json_response({"id": "cs_1", "object": "checkout.session", "url": "https://x"})
        return web.json_response({"id": "x", "object": "unknown"})


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
            )
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
