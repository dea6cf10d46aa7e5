"""The stripe SDK, pointed at stripe-mock, speaks the real Stripe API shapes."""

from __future__ import annotations

import pytest
import stripe

from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.settings import load_settings
from iotistic_billing.stripe_api import StripeApi

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
        made = await billing.create_customer(email="ops@acme.example", name="Acme", customer_id="cust_abc123")
        await billing.delete_customer(made)
    finally:
        await billing.close()
