"""The stripe SDK, pointed at stripe-mock, speaks the real Stripe API shapes."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer

from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.errors import Conflict
from iotistic_billing.settings import load_settings
from iotistic_billing.stripe_api import StripeApi
from tests.integration.webhook_support import stripe_mock_plan_price

pytestmark = pytest.mark.integration


def test_stripe_sdk_creates_a_customer_and_a_checkout_session(stripe_mock: StripeMock) -> None:
    client = stripe.StripeClient(
        "sk_test_123", base_addresses={"api": stripe_mock.url}, max_network_retries=0
    )
    customer = client.v1.customers.create(
        params={"email": "ops@acme.example", "metadata": {"customerId": "cust_abc123"}}
    )
    assert customer.id.startswith("cus_")
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "customer": customer.id,
            "client_reference_id": "cust_abc123",
            "line_items": [{"price": "price_professional", "quantity": 1}],
            "success_url": "https://app.example.com/success",
            "cancel_url": "https://app.example.com/cancel",
        }
    )
    assert session.id.startswith("cs_")
    assert session.object == "checkout.session"


async def test_our_client_deletes_the_customer_a_failed_signup_made(stripe_mock: StripeMock) -> None:
    billing = StripeApi(load_settings(stripe_secret_key="sk_test_123", stripe_api_base=stripe_mock.url))
    try:
        made = await billing.create_customer(
            email="ops@acme.example", company_name="Acme", customer_id="cust_abc123"
        )
        # stripe-mock answers a delete with the id of its path: the one our client asked to delete.
        assert await billing.delete_customer(made) == made
    finally:
        await billing.close()


@pytest.mark.parametrize(
    "answer",
    [{"id": "cus_kept", "object": "customer", "deleted": False}, {"id": "cus_other", "object": "customer"}],
)
async def test_our_client_raises_when_stripe_answers_a_delete_without_deleting_that_customer(
    answer: dict[str, object],
) -> None:
    async def delete(request: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_delete("/v1/customers/{id}", delete)
    async with TestServer(app) as stripe_stand_in:
        billing = StripeApi(
            load_settings(stripe_secret_key="sk_test_123", stripe_api_base=str(stripe_stand_in.make_url("")))
        )
        try:
            with pytest.raises(Conflict, match="cus_kept") as refused:
                await billing.delete_customer("cus_kept")
        finally:
            await billing.close()
    assert f"deleted={answer.get('deleted')!r} for {answer['id']!r}" in refused.value.message


async def test_our_client_checks_out_with_the_metered_prices_and_moves_the_plan_item(
    stripe_mock: StripeMock,
) -> None:
    starter = stripe_mock_plan_price(stripe_mock)
    billing = StripeApi(
        load_settings(
            stripe_secret_key="sk_test_123",
            stripe_api_base=stripe_mock.url,
            stripe_price_starter=starter,
            stripe_price_enterprise="price_enterprise",
            stripe_metered_prices=["price_devices_overage", "price_api_calls_overage"],
        )
    )
    try:
        # stripe-mock checks the request against Stripe's OpenAPI document: metered items without quantity.
        session = await billing.create_checkout_session(
            stripe_customer_id="cus_123",
            customer_id="cust_abc123",
            plan="enterprise",
            price_id="price_enterprise",
            success_url="https://app.example.com/success",
            cancel_url="https://app.example.com/cancel",
        )
        assert session.session_id.startswith("cs_")
        change = await billing.change_price("sub_123", "price_enterprise")
        assert change.status == "active"
    finally:
        await billing.close()


async def test_stripe_mock_takes_the_expiry_of_a_customer_s_earlier_checkout_and_the_new_one_s(
    stripe_mock: StripeMock,
) -> None:
    """stripe-mock keeps nothing: its list of sessions is one fixture of another customer in payment mode.
    A stand-in in front of it makes that one this customer's open subscription session, so the list, the
    expire and the create (with its expires_at) each pass stripe-mock's check against Stripe's API."""
    answered: list[tuple[str, str, int]] = []

    async def forward(request: web.Request) -> web.Response:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                f"{stripe_mock.url}{request.path_qs}",
                headers={
                    key: value
                    for key, value in request.headers.items()
                    if key.lower() not in ("host", "content-length")
                },
                data=await request.read(),
            ) as answer,
        ):
            payload: dict[str, Any] = await answer.json()
        answered.append((request.method, request.path, answer.status))
        if request.method == "GET" and request.path == "/v1/checkout/sessions" and answer.status == 200:
            for listed in payload["data"]:
                listed.update(mode="subscription", customer=request.query["customer"], status="open")
        return web.json_response(payload, status=answer.status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    async with TestServer(app) as stand_in:
        billing = StripeApi(
            load_settings(stripe_secret_key="sk_test_123", stripe_api_base=str(stand_in.make_url("")))
        )
        try:
            session = await billing.create_checkout_session(
                stripe_customer_id="cus_123",
                customer_id="cust_abc123",
                plan="starter",
                price_id="price_starter",
                success_url="https://app.example.com/success",
                cancel_url="https://app.example.com/cancel",
            )
        finally:
            await billing.close()
    assert session.session_id.startswith("cs_")
    assert [(method, path.rsplit("/", 1)[-1], status) for method, path, status in answered] == [
        ("GET", "sessions", 200),
        ("POST", "expire", 200),
        ("POST", "sessions", 200),
    ]
