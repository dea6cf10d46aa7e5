"""The stripe SDK, pointed at stripe-mock, speaks the real Stripe API shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer

from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.errors import Conflict
from iotistic_billing.settings import load_settings
from iotistic_billing.stripe_api import CustomerSubscribed, StripeApi
from iotistic_billing.stripe_inbox.events import LIVE_STATUSES
from tests.integration.webhook_support import stripe_mock_plan_price

pytestmark = pytest.mark.integration

CHECKOUT: dict[str, Any] = {
    "stripe_customer_id": "cus_123",
    "customer_id": "cust_abc123",
    "plan": "starter",
    "price_id": "price_starter",
    "success_url": "https://app.example.com/success",
    "cancel_url": "https://app.example.com/cancel",
    "live_statuses": LIVE_STATUSES,
}


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
        # Its list of the customer's subscriptions is an active one of another customer: not this one's.
        session = await billing.create_checkout_session(
            **{**CHECKOUT, "plan": "enterprise", "price_id": "price_enterprise"}
        )
        assert session.session_id.startswith("cs_")
        change = await billing.change_price("sub_123", "price_enterprise")
        assert change.status == "active"
    finally:
        await billing.close()


class StandIn:
    """A stand-in in front of stripe-mock, which keeps nothing: its list of sessions is one fixture (the
    id and `created` of every session it makes) of another customer in payment mode. The stand-in makes
    that one this customer's earlier open subscription session `cs_test_earlier`, made a minute before the
    new one (the one the checkout keeps is the newest), and with `paid` answers its expire as
    Stripe does once it was paid (a 400) and its read as complete, so each call still passes stripe-mock's
    check against Stripe's API. `answered`: each call's method, path and status."""

    def __init__(self, stripe_mock: StripeMock, *, paid: bool = False) -> None:
        self.stripe_mock, self.paid = stripe_mock, paid
        self.answered: list[tuple[str, str, int]] = []

    async def forward(self, request: web.Request) -> web.Response:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                f"{self.stripe_mock.url}{request.path_qs}",
                headers={
                    key: value
                    for key, value in request.headers.items()
                    if key.lower() not in ("host", "content-length")
                },
                data=await request.read(),
            ) as answer,
        ):
            payload: dict[str, Any] = await answer.json()
        status = answer.status
        if request.method == "GET" and request.path == "/v1/checkout/sessions" and status == 200:
            for listed in payload["data"]:
                listed.update(
                    id="cs_test_earlier",
                    mode="subscription",
                    customer=request.query["customer"],
                    status="open",
                    created=listed["created"] - 60,
                )
        earlier = request.path.startswith("/v1/checkout/sessions/cs_test_earlier")
        if self.paid and earlier and request.path.endswith("/expire"):
            status = 400
            payload = {"error": {"type": "invalid_request_error", "message": "Only open sessions expire."}}
        elif self.paid and earlier and status == 200:
            payload.update(status="complete", subscription="sub_paid")
        self.answered.append((request.method, request.path.rsplit("/", 1)[-1], status))
        return web.json_response(payload, status=status)

    @asynccontextmanager
    async def billing(self) -> AsyncIterator[StripeApi]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        async with TestServer(app) as server:
            billing = StripeApi(
                load_settings(stripe_secret_key="sk_test_123", stripe_api_base=str(server.make_url("")))
            )
            try:
                yield billing
            finally:
                await billing.close()


async def test_stripe_mock_takes_the_expiry_of_a_customer_s_earlier_checkout_and_the_new_one_s(
    stripe_mock: StripeMock,
) -> None:
    """The ask for a live subscription, the create (with its expires_at), the list and the expire each pass
    stripe-mock's check against Stripe's API."""
    stand_in = StandIn(stripe_mock)
    async with stand_in.billing() as billing:
        session = await billing.create_checkout_session(**CHECKOUT)

    assert session.session_id.startswith("cs_")
    assert stand_in.answered == [
        ("GET", "subscriptions", 200),
        ("POST", "sessions", 200),
        ("GET", "sessions", 200),
        # stripe-mock's list lacks the session it made: the checkout reads it (a retry's first session
        # may have ended since).
        ("GET", session.session_id, 200),
        ("POST", "expire", 200),
        ("GET", "subscriptions", 200),
    ]


async def test_an_earlier_checkout_paid_before_its_expire_expires_the_new_one_against_stripe_mock(
    stripe_mock: StripeMock,
) -> None:
    stand_in = StandIn(stripe_mock, paid=True)
    async with stand_in.billing() as billing:
        with pytest.raises(CustomerSubscribed) as raised:
            await billing.create_checkout_session(**CHECKOUT)

    assert raised.value.subscription_id == "sub_paid"
    made = stand_in.answered[3][1]  # the new session, read as stripe-mock's list lacks it
    assert made.startswith("cs_") and made != "cs_test_earlier"
    assert stand_in.answered == [
        ("GET", "subscriptions", 200),
        ("POST", "sessions", 200),
        ("GET", "sessions", 200),
        ("GET", made, 200),
        ("POST", "expire", 400),
        ("GET", "cs_test_earlier", 200),
        ("POST", "expire", 200),  # the new session's
    ]


async def test_our_client_lists_an_invoice_s_lines_as_stripe_serves_them(stripe_mock: StripeMock) -> None:
    """The inbox reads an invoice's lines past the first ones its event carries (has_more) through
    StripeApi.invoice_lines: the SDK's path and paging against stripe-mock's shapes."""
    billing = StripeApi(load_settings(stripe_secret_key="sk_test_123", stripe_api_base=stripe_mock.url))
    try:
        lines = await billing.invoice_lines("in_123")
    finally:
        await billing.close()
    assert lines
    assert {line["object"] for line in lines} == {"line_item"}
    assert all(isinstance(line["period"]["start"], int) for line in lines)
