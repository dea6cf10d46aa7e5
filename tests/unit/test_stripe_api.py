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
                stripe_secret_key="sk_test_123", stripe_api_base=f"http://{server.host}:{server.port}"
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
