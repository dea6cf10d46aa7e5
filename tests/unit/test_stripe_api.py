"""Our Stripe client against a small fake Stripe (aiohttp): what it sends, and how Stripe's answers
become our errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from iotistic_billing import stripe_api
from iotistic_billing.errors import ApiError
from iotistic_billing.settings import load_settings
from iotistic_billing.stripe_api import (
    CustomerSubscribed,
    IdempotencyKeyReused,
    StripeApi,
    StripeCustomerMissing,
)
from iotistic_billing.stripe_inbox.events import OPEN_STATUSES
from iotistic_billing.webhook_server import app as app_module

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
# What an answer lost costs the SDK before its next try: its 30 s timeout and its back-off, at most 0.5 s
# before its second try and 1 s before its third (61.5 s for two).
SDK_TRY = timedelta(seconds=30.75)
CHECKOUT: dict[str, Any] = {
    "stripe_customer_id": "cus_1",
    "customer_id": "cust_acme01",
    "plan": "starter",
    "price_id": "price_starter",
    "success_url": "https://a.example/ok",
    "cancel_url": "https://a.example/no",
    "live_statuses": {"active", "trialing", "past_due"},
}


def item(item_id: str, price: str) -> dict[str, Any]:
    return {"id": item_id, "object": "subscription_item", "price": {"id": price, "object": "price"}}


class FakeStripe:
    """Records each request's form; answers a write with `answer` when set, else a subscription or a
    session. Keeps the checkout sessions it made as Stripe does: listed by customer and status, newest
    first, `page_size` a page (so a reader of the first page alone misses the rest), expired only while
    open (a 400 otherwise), made only with an `expires_at` at least 30 minutes after its own clock `now`.
    With `lose_answers` it closes the connection after reading a request, as an answer lost on the way
    does; `lose_next` does that to the next requests only, `lose_creates` to the next session creates only,
    each lost one moving `now` on by SDK_TRY. `rate_limited` answers 429 to the n-th request (from 1) of a
    method and path; with `lists_wait_for` the lists of sessions are answered once that many sessions
    were made (checkouts at the same moment, each listing after both creates)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.answer: tuple[int, dict[str, Any]] | None = None
        self.answer_headers: dict[str, str] = {}
        # Stripe's answer to a session's create (a refused success_url), the other calls answered.
        self.refuse_creates: tuple[int, dict[str, Any]] | None = None
        self.lose_answers = False
        self.lose_next = 0
        self.lose_creates = 0
        self.rate_limited: dict[tuple[str, str], int] = {}
        self.lists_wait_for = 0
        # Every request answered 401, as for a key Stripe refuses (revoked, or another account's).
        self.key_refused = False
        self.made = asyncio.Event()
        self.now = NOW
        self.page_size = 1
        # A session paid just after a page of sessions listing it was answered (before its expire
        # arrives), or when a session's create arrives (before the customer's sessions are listed).
        self.paid_after_list: str | None = None
        self.paid_on_create: str | None = None
        self.subscription: dict[str, Any] = {
            "id": "sub_1",
            "object": "subscription",
            "status": "active",
            "cancel_at_period_end": False,
            "items": {"object": "list", "data": []},
        }
        # The customers' subscriptions Stripe lists (GET /v1/subscriptions), newest first.
        self.subscriptions: list[dict[str, Any]] = []
        self.sessions: dict[str, dict[str, Any]] = {}
        # The form and session of each session create's Idempotency-Key.
        self.session_keys: dict[str, tuple[dict[str, str], str]] = {}
        # The Idempotency-Key of each customer's create.
        self.idempotency_keys: list[str | None] = []
        # The customer each key made, and those deleted since.
        self.customer_keys: dict[str, str] = {}
        self.deleted_customers: set[str] = set()
        # Each invoice's lines (GET /v1/invoices/{id}/lines), `page_size` a page.
        self.invoice_lines: dict[str, list[dict[str, Any]]] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # A GET's parameters are its query.
        form = dict(request.query) if request.method == "GET" else dict(parse_qsl(await request.text()))
        self.requests.append((request.method, request.path, form))
        if request.path == "/v1/customers":
            self.idempotency_keys.append(request.headers.get("Idempotency-Key"))
        if self.key_refused:
            invalid = {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_***123"}
            return web.json_response({"error": invalid}, status=401)
        creates = request.method == "POST" and request.path == "/v1/checkout/sessions"
        if self.lose_answers or self.lose_next or (creates and self.lose_creates):
            if creates and self.lose_creates:
                self.lose_creates -= 1
                self.now += SDK_TRY
            self.lose_next = max(self.lose_next - 1, 0)
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        sent = sum((method, path) == (request.method, request.path) for method, path, _ in self.requests)
        if self.rate_limited.get((request.method, request.path)) == sent:
            limited = {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many requests"}
            return web.json_response({"error": limited}, status=429)
        if request.method == "GET" and request.path == "/v1/checkout/sessions" and self.lists_wait_for:
            await self.made.wait()
        if self.answer is not None and request.method != "GET":
            status, payload = self.answer
            return web.json_response(payload, status=status, headers=self.answer_headers)
        if creates and self.paid_on_create is not None:
            self.pay(self.paid_on_create)
            self.paid_on_create = None
        if creates and self.refuse_creates is not None:
            status, payload = self.refuse_creates
            return web.json_response(payload, status=status)
        if request.path == "/v1/subscriptions" and request.method == "GET":
            customer = request.query.get("customer")
            found = [each for each in self.subscriptions if customer in (None, each["customer"])]
            return web.json_response(self._page(request, found))
        if request.path.startswith("/v1/customers"):
            return self._customer(request, request.headers.get("Idempotency-Key"))
        if request.path.startswith("/v1/subscriptions/"):
            # One Stripe lists is read as listed (a checkout's, paid); any other is `subscription`.
            listed = [each for each in self.subscriptions if each["id"] == request.path.split("/")[3]]
            return web.json_response(listed[0] if listed and request.method == "GET" else self.subscription)
        if request.path.startswith("/v1/invoices/") and request.path.endswith("/lines"):
            return web.json_response(self._page(request, self.invoice_lines[request.path.split("/")[3]]))
        if request.path == "/v1/checkout/sessions" and request.method == "GET":
            return self._list_sessions(request)
        if creates:
            return self._open_session(form, request.headers.get("Idempotency-Key"))
        if request.path.startswith("/v1/checkout/sessions/"):
            return self._session(request.path.split("/")[4], expire=request.path.endswith("/expire"))
        return web.json_response({"id": "x", "object": "unknown"})

    def _customer(self, request: web.Request, key: str | None) -> web.Response:
        """A customer made (the first answer again, `Idempotent-Replayed`, for a key seen), read or
        deleted; a deleted one reads as Stripe's `deleted: true`."""
        if request.method == "POST" and key in self.customer_keys:
            made = {"id": self.customer_keys[key], "object": "customer"}
            return web.json_response(made, headers={"Idempotent-Replayed": "true"})
        if request.method == "POST":
            customer_id = f"cus_{len(self.customer_keys) + 1}"
            self.customer_keys[key or customer_id] = customer_id
            return web.json_response({"id": customer_id, "object": "customer"})
        customer_id = request.path.split("/")[3]
        if request.method == "DELETE":
            self.deleted_customers.add(customer_id)
        if customer_id in self.deleted_customers:
            return web.json_response({"id": customer_id, "object": "customer", "deleted": True})
        return web.json_response({"id": customer_id, "object": "customer"})

    def _open_session(self, form: dict[str, str], key: str | None) -> web.Response:
        if key is not None and key in self.session_keys:
            # Stripe's idempotency: the first answer again, for the same parameters only.
            first_form, session_id = self.session_keys[key]
            if first_form != form:
                error = {"type": "idempotency_error", "message": "Keys for idempotent requests can only be"}
                return web.json_response({"error": error}, status=400)
            return web.json_response(self.sessions[session_id])
        expires_at = int(form["expires_at"]) if "expires_at" in form else None
        if expires_at is not None and expires_at < (self.now + timedelta(minutes=30)).timestamp():
            return refusal("expires_at", "The `expires_at` timestamp must be at least 30 minutes from now.")
        session_id = f"cs_{len(self.sessions) + 1}"
        if key is not None:
            self.session_keys[key] = (form, session_id)
        self.sessions[session_id] = {
            "id": session_id,
            "object": "checkout.session",
            "url": f"https://checkout.example/{session_id}",
            "status": "open",
            "mode": form.get("mode"),
            "customer": form.get("customer"),
            "subscription": None,
            "expires_at": expires_at,
            "created": int(self.now.timestamp()),
            "metadata": {
                name.removeprefix("metadata[").removesuffix("]"): value
                for name, value in form.items()
                if name.startswith("metadata[")
            },
        }
        if len(self.sessions) >= self.lists_wait_for:
            self.made.set()
        return web.json_response(self.sessions[session_id])

    def _session(self, session_id: str, *, expire: bool) -> web.Response:
        session = self.sessions[session_id]
        if expire:
            if session["status"] != "open":
                return refusal(None, f"This Checkout Session is {session['status']}: only open ones expire.")
            session["status"] = "expired"
        return web.json_response(session)

    def _list_sessions(self, request: web.Request) -> web.Response:
        found = [
            session
            for session in reversed(self.sessions.values())
            if all(
                session.get(key) == request.query[key]
                for key in ("customer", "status")
                if key in request.query
            )
        ]
        page = self._page(request, found)
        answer = web.json_response(page)
        paid = self.paid_after_list
        if paid is not None and paid in [session["id"] for session in page["data"]]:
            self.pay(paid)
            self.paid_after_list = None
        return answer

    def _page(self, request: web.Request, found: list[dict[str, Any]]) -> dict[str, Any]:
        """One page of `found` as Stripe serves it: `limit` (at most `page_size`) after `starting_after`."""
        after = request.query.get("starting_after")
        start = next((index + 1 for index, each in enumerate(found) if each["id"] == after), 0)
        size = min(int(request.query.get("limit", 10)), self.page_size)
        page = found[start : start + size]
        return {"object": "list", "url": request.path, "has_more": start + size < len(found), "data": page}

    def pay(self, session_id: str) -> str:
        """The session's customer pays it: complete, with a subscription Stripe lists."""
        session = self.sessions[session_id]
        subscription_id = f"sub_of_{session_id}"
        session.update(status="complete", subscription=subscription_id)
        self.subscriptions.insert(
            0,
            {
                "id": subscription_id,
                "object": "subscription",
                "status": "active",
                "customer": session["customer"],
            },
        )
        return subscription_id

    def payable(self, customer: str) -> list[str]:
        return [
            session["id"]
            for session in self.sessions.values()
            if session["customer"] == customer and session["status"] == "open"
        ]


def refusal(param: str | None, message: str) -> web.Response:
    """Stripe's 400 refusing a request, naming the parameter when it is one."""
    error = {"type": "invalid_request_error", "message": message} | ({"param": param} if param else {})
    return web.json_response({"error": error}, status=400)


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
        await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    answer, code = expected
    assert raised.value.status == answer
    if answer == 409:
        assert raised.value.error == "Stripe refused the request"
        assert raised.value.details == {"stripe_code": code}
        # The routes whose key is the client's answer it as that key reused.
        assert isinstance(raised.value, IdempotencyKeyReused) == (code == "idempotency_error")
    else:
        assert raised.value.error == "Stripe unavailable"
        assert raised.value.headers == {"Retry-After": "5"}


async def test_a_checkout_puts_the_metered_prices_on_the_subscription(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake
    await api.create_checkout_session(**CHECKOUT)
    (form,) = [
        form for method, path, form in stripe.requests if (method, path) == ("POST", "/v1/checkout/sessions")
    ]
    assert {key: value for key, value in form.items() if key.startswith("line_items")} == {
        "line_items[0][price]": "price_starter",
        "line_items[0][quantity]": "1",
        # Metered: Stripe bills the meter events it receives, no quantity.
        "line_items[1][price]": "price_devices_overage",
        "line_items[2][price]": "price_api_calls_overage",
    }


async def test_an_invoice_s_lines_are_listed_every_page(fake: tuple[FakeStripe, StripeApi]) -> None:
    """An invoice event carries its first lines alone (has_more): the inbox lists the rest, every page."""
    stripe, api = fake
    stripe.invoice_lines["in_1"] = [
        {"id": f"il_{n}", "object": "line_item", "period": {"start": n, "end": n + 1}} for n in range(3)
    ]
    lines = await api.invoice_lines("in_1")
    assert [(line["id"], line["period"]["start"]) for line in lines] == [
        ("il_0", 0),
        ("il_1", 1),
        ("il_2", 2),
    ]
    assert [path for method, path, _ in stripe.requests if method == "GET"] == ["/v1/invoices/in_1/lines"] * 3
    stripe.key_refused = True
    with pytest.raises(ApiError):
        await api.invoice_lines("in_1")


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
    stripe.sessions["cs_other"] = {"id": "cs_other", "status": "open", "mode": "payment", "customer": "cus_1"}
    # Its sessions of earlier subscriptions, ended since: paid once, or lapsed unpaid. Not open, so not
    # expired (Stripe would refuse it).
    for session_id, status in [("cs_paid_once", "complete"), ("cs_lapsed", "expired")]:
        stripe.sessions[session_id] = {
            "id": session_id,
            "status": status,
            "mode": "subscription",
            "customer": "cus_1",
            "subscription": "sub_old" if status == "complete" else None,
        }

    first = await api.create_checkout_session(**CHECKOUT)
    second = await api.create_checkout_session(**{**CHECKOUT, "plan": "enterprise"})

    # The earlier subscription session is expired; a payment-mode one of the customer is not ours.
    assert stripe.payable("cus_1") == ["cs_other", second.session_id]
    assert [stripe.sessions[ended]["status"] for ended in ("cs_paid_once", "cs_lapsed")] == [
        "complete",
        "expired",
    ]
    # Each payable for 35 minutes, not Stripe's default 24 h.
    made = [stripe.sessions[session.session_id]["expires_at"] for session in (first, second)]
    assert [expires_at - NOW.timestamp() for expires_at in made] == [35 * 60, 35 * 60]


async def test_a_new_checkout_expires_the_earlier_sessions_of_every_page(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake  # one session a page
    earlier = [await api.create_checkout_session(**CHECKOUT) for _ in range(3)]

    latest = await api.create_checkout_session(**CHECKOUT)

    assert stripe.payable("cus_1") == [latest.session_id]
    assert [stripe.sessions[session.session_id]["status"] for session in earlier] == ["expired"] * 3


async def test_a_refused_checkout_leaves_the_earlier_session_payable(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Found in review: the earlier sessions were expired before the create, so a create Stripe refused (a
    # success_url it does not take, an archived price) left the customer nothing to pay.
    stripe, api = fake
    earlier = await api.create_checkout_session(**CHECKOUT)
    stripe.refuse_creates = (
        400,
        {"error": {"type": "invalid_request_error", "param": "success_url", "message": "Not a valid URL"}},
    )

    with pytest.raises(ApiError) as raised:
        await api.create_checkout_session(**{**CHECKOUT, "success_url": "https://."})

    assert (raised.value.status, raised.value.error) == (400, "Validation failed")
    assert stripe.payable("cus_1") == [earlier.session_id]


async def test_a_checkout_after_an_earlier_session_was_paid_is_refused(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Found in review: a session paid, its events not applied yet, is no live subscription in the mirror,
    # and being complete it is not expired either: the checkout made a second payable session, and
    # paying it made two billed subscriptions. Stripe is asked, before any session is made.
    stripe, api = fake
    earlier = await api.create_checkout_session(**CHECKOUT)
    paid = stripe.pay(earlier.session_id)
    # Newer, on the first page (one a page): a subscription whose first payment Stripe gave up on.
    stripe.subscriptions.insert(
        0, {"id": "sub_tried", "object": "subscription", "status": "incomplete_expired", "customer": "cus_1"}
    )
    made = len(stripe.sessions)

    with pytest.raises(CustomerSubscribed) as raised:
        await api.create_checkout_session(**{**CHECKOUT, "plan": "enterprise"})

    assert raised.value.subscription_id == paid
    assert len(stripe.sessions) == made and stripe.payable("cus_1") == []
    listed = [query for _, path, query in stripe.requests if path == "/v1/subscriptions"]
    assert {query["customer"] for query in listed} == {"cus_1"}


@pytest.mark.parametrize(
    "paid", ["paid_on_create", "paid_after_list"], ids=["before-the-list", "before-its-expire"]
)
async def test_an_earlier_session_paid_meanwhile_refuses_the_checkout_leaving_nothing_payable(
    fake: tuple[FakeStripe, StripeApi], paid: str
) -> None:
    """Paid after the first ask for a live subscription: before the sessions are listed (not open, so not
    listed, and its subscription is found by the second ask), or between the list and its expire (found in
    review: Stripe refused the expire, a 409 "Stripe refused to expire ...", and the new session stayed
    payable: a second subscription once paid)."""
    stripe, api = fake
    earlier = await api.create_checkout_session(**CHECKOUT)
    setattr(stripe, paid, earlier.session_id)

    with pytest.raises(CustomerSubscribed) as raised:
        await api.create_checkout_session(**{**CHECKOUT, "plan": "enterprise"})

    assert raised.value.subscription_id == f"sub_of_{earlier.session_id}"
    assert stripe.payable("cus_1") == []  # the new session is expired


async def test_two_checkouts_at_the_same_moment_leave_exactly_one_session_payable(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Found in review: two checkouts of one customer at the same moment (a double click, an app's retry
    # while the first was in the SDK's retries) each made a session, then each expired the other's: both
    # answered with a URL and nothing was payable.
    stripe, api = fake
    stripe.lists_wait_for = 2  # each lists the customer's sessions once both are made

    answers = await asyncio.gather(
        api.create_checkout_session(**CHECKOUT),
        api.create_checkout_session(**CHECKOUT),
        return_exceptions=True,
    )

    payable = stripe.payable("cus_1")
    assert len(payable) == 1
    (made,) = [answer for answer in answers if not isinstance(answer, BaseException)]
    assert payable == [made.session_id]
    # The other is told which session is payable, not handed a link that no longer pays.
    (refused,) = [answer for answer in answers if isinstance(answer, ApiError)]
    assert (refused.status, refused.error) == (409, "Checkout started twice")
    assert refused.details["session_id"] == made.session_id
    assert refused.details["checkout_url"] == made.checkout_url


async def test_a_checkout_made_in_the_same_second_as_a_finished_one_leaves_one_session_payable(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Stripe's `created` is in seconds and its ids are in no order: an earlier checkout, finished, whose
    # session's id sorts after the new one's is the one kept (it cannot expire the new one).
    stripe, api = fake
    stripe.sessions["cs_z"] = {
        "id": "cs_z",
        "url": "https://checkout.example/cs_z",
        "status": "open",
        "mode": "subscription",
        "customer": "cus_1",
        "created": int(NOW.timestamp()),
    }

    with pytest.raises(ApiError) as raised:
        await api.create_checkout_session(**CHECKOUT)

    assert stripe.payable("cus_1") == ["cs_z"]
    assert (raised.value.status, raised.value.details["session_id"]) == (409, "cs_z")


async def test_a_retried_checkout_s_session_stays_payable_when_its_abandoned_first_try_lands_after_it(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    """Found in review: a checkout retried after the client's timeout (two replicas) answered 200 with the
    retry's session, then the abandoned first request, still running (aiohttp runs a handler after its
    client left) and its SDK retry getting through, made a newer session and expired the retry's as not
    the newest: the customer's link said "session expired". Under one Idempotency-Key they are one
    checkout, and its first session is the one kept and answered."""
    stripe, api = fake
    # The retry, two minutes on (another step of expires_at: Stripe's key for it differs from the first's).
    api.clock = lambda: NOW + timedelta(minutes=2)
    stripe.now = NOW + timedelta(minutes=2)
    retried = await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")
    # The first request's create (its expires_at read at NOW) lands after the retry's answer.
    api.clock = lambda: NOW
    stripe.now += timedelta(seconds=40)
    abandoned = await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")

    assert len(stripe.sessions) == 2  # two creates, under two Stripe keys
    assert stripe.payable("cus_1") == [retried.session_id]
    assert abandoned == retried


async def test_a_checkout_retried_within_its_expiry_step_gets_stripe_s_same_session(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake
    api.clock = lambda: NOW + timedelta(seconds=30)
    first = await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")
    api.clock = lambda: NOW + timedelta(seconds=120)  # expires_at in the same step of 5 minutes
    again = await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")

    assert again == first and list(stripe.sessions) == [first.session_id]
    assert stripe.payable("cus_1") == [first.session_id]
    # Rounded up to the step, at least CHECKOUT_LIFETIME on, and Stripe's key hashes the client's.
    (key, (form, _)), *_ = stripe.session_keys.items()
    assert int(form["expires_at"]) % stripe_api.CHECKOUT_EXPIRY_STEP == 0
    assert int(form["expires_at"]) >= (NOW + stripe_api.CHECKOUT_LIFETIME).timestamp() + 30
    assert key.startswith("checkout-cus_1-digest-of-k1-")
    assert form["metadata[checkoutKey]"] == "digest-of-k1"
    assert "subscription_data[metadata][checkoutKey]" not in form


@pytest.mark.parametrize("ended", ["expired", "complete"])
async def test_a_keyed_checkout_retried_after_its_session_ended_is_a_409_not_its_dead_link(
    fake: tuple[FakeStripe, StripeApi], ended: str
) -> None:
    """Found in review: a retry within the 5-minute step is answered Stripe's first session again, and
    it was answered payable though Stripe no longer listed it open: a first try that found the customer
    subscribed expired its session (409 Already subscribed), the admin cancelled that subscription, the
    page retried under its key and got 200 with the expired session's link. A session of this key that
    is not open is read, neither answered nor expired again: a 409 asking for a new key."""
    stripe, api = fake
    first = await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")
    if ended == "expired":
        stripe.sessions[first.session_id]["status"] = "expired"
    else:
        stripe.pay(first.session_id)
        stripe.subscriptions[0]["status"] = "canceled"  # paid, then cancelled since
    sent = len(stripe.requests)

    with pytest.raises(ApiError) as raised:
        await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")

    assert (raised.value.status, raised.value.error) == (409, "Checkout session ended"), raised.value
    assert raised.value.details["session_id"] == first.session_id
    assert raised.value.details["status"] == ended
    assert "a new Idempotency-Key" in raised.value.message
    # Stripe's same session again: nothing made, nothing expired.
    assert list(stripe.sessions) == [first.session_id]
    assert not [path for _, path, _ in stripe.requests[sent:] if path.endswith("/expire")]


async def test_a_keyed_checkout_retried_after_its_session_was_paid_names_its_subscription(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    """Found in review: a retry of a checkout paid moments ago, its subscription not listed by Stripe yet,
    was 409 "Checkout session ended" asking to check out again with a new Idempotency-Key, which would
    make a second subscription. The 409 names the paid session's subscription and asks for no checkout."""
    stripe, api = fake
    first = await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")
    paid = stripe.pay(first.session_id)
    listed, stripe.subscriptions = stripe.subscriptions, []  # Stripe does not list it yet
    stripe.subscription = {**listed[0], "items": {"object": "list", "data": []}}

    with pytest.raises(ApiError) as raised:
        await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")

    assert (raised.value.status, raised.value.error) == (409, "Checkout session ended"), raised.value
    assert raised.value.details == {
        "customer_id": "cust_acme01",
        "session_id": first.session_id,
        "status": "complete",
        "subscription_id": paid,
    }
    assert f"was paid: its subscription {paid}" in raised.value.message, raised.value.message
    assert "check out again" not in raised.value.message
    assert list(stripe.sessions) == [first.session_id]


async def test_a_new_checkout_under_another_key_is_the_newest_and_expires_the_earlier(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake
    earlier = await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k1")
    stripe.now += timedelta(seconds=5)
    later = await api.create_checkout_session(**CHECKOUT, request_key="digest-of-k2")

    assert stripe.payable("cus_1") == [later.session_id]
    assert stripe.sessions[earlier.session_id]["status"] == "expired"


async def test_a_checkout_failing_after_its_session_was_made_says_what_may_have_changed(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Found in review: once the new session was made and the earlier expired, the second ask for a live
    # subscription answered 429 was a 503 "nothing was changed, retry later": the earlier link was dead.
    stripe, api = fake
    earlier = await api.create_checkout_session(**CHECKOUT)
    stripe.rate_limited = {("GET", "/v1/subscriptions"): 4}  # the second ask of the second checkout

    with pytest.raises(ApiError) as raised:
        await api.create_checkout_session(**CHECKOUT)

    (made,) = stripe.payable("cus_1")
    assert stripe.sessions[earlier.session_id]["status"] == "expired"
    assert (raised.value.status, raised.value.error) == (503, "Stripe unavailable")
    assert "nothing was changed" not in raised.value.message
    assert f"checkout session {made} was made" in raised.value.message
    assert "earlier open subscription sessions may have been expired" in raised.value.message
    assert raised.value.details == {"dependency": "Stripe", "checkout_session_id": made}
    assert raised.value.headers == {"Retry-After": "5"}


async def test_a_checkout_whose_first_two_answers_are_lost_is_still_payable_for_stripe_s_least_30_minutes(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Found in review: `expires_at` is read once, 31 minutes ahead; the SDK's third try arrives up to
    # 61.5 s later, when Stripe refuses it as under 30 minutes ahead (a 409 on a field never sent).
    stripe, api = fake
    stripe.lose_creates = 2

    session = await api.create_checkout_session(**CHECKOUT)

    assert stripe.now == NOW + 2 * SDK_TRY
    assert stripe.payable("cus_1") == [session.session_id]


async def test_a_cancel_whose_answer_is_lost_does_not_say_nothing_was_changed(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Found in review: a cancel sent and never answered (after the SDK's retries) was a 503 "nothing was
    # changed, retry later", though Stripe may have cancelled.
    stripe, api = fake
    stripe.lose_answers = True

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    # Sent, each retry a DELETE with no idempotency key (stripe-python sends one with a POST or a v2
    # DELETE only): Stripe may have acted on any of them.
    assert {(method, path) for method, path, _ in stripe.requests} == {("DELETE", "/v1/subscriptions/sub_1")}
    assert (raised.value.status, raised.value.error) == (503, "Stripe unavailable")
    assert "nothing was changed" not in raised.value.message
    assert "may have been made" in raised.value.message and "before retrying" in raised.value.message


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, {"code": "resource_missing", "param": "id", "message": "No such subscription: 'sub_1'"}),
        (400, {"message": "A canceled subscription can only update its cancellation_details."}),
    ],
)
async def test_a_cancel_whose_retry_stripe_refuses_as_already_canceled_is_answered_cancelled(
    fake: tuple[FakeStripe, StripeApi], status: int, error: dict[str, Any]
) -> None:
    """Found in review: the SDK retries a lost DELETE (which carries no idempotency key), and Stripe
    refuses the retry of the cancel its first try made ("No such subscription", or for some API versions
    a 400 about a canceled subscription): answered 409 "Stripe refused the request" for a subscription
    cancelled as asked. Read back, it is canceled: answered as a first cancel is."""
    stripe, api = fake
    stripe.lose_next = 1  # the first DELETE cancels, its answer lost
    stripe.answer = (status, {"error": {"type": "invalid_request_error", **error}})
    stripe.subscription.update(
        status="canceled",
        canceled_at=int(NOW.timestamp()),
        items={"object": "list", "data": [item("si_1", "price_starter")]},
    )

    change = await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    assert change == stripe_api.SubscriptionChange("sub_1", "canceled", False, plan="starter")
    assert [(method, path) for method, path, _ in stripe.requests] == [
        ("DELETE", "/v1/subscriptions/sub_1"),
        ("DELETE", "/v1/subscriptions/sub_1"),
        ("GET", "/v1/subscriptions/sub_1"),
    ]


async def test_a_cancel_at_the_period_end_of_a_subscription_stripe_has_ended_is_answered_cancelled(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # A client's retry once Stripe ended the subscription (its period over, its deletion not applied yet).
    stripe, api = fake
    refused = "A canceled subscription can only update its cancellation_details."
    stripe.answer = (400, {"error": {"type": "invalid_request_error", "message": refused}})
    # Its first try set the cancel (canceled_at) two minutes ago; the period ended since.
    canceled_at = int((NOW - timedelta(minutes=2)).timestamp())
    stripe.subscription.update(status="canceled", cancel_at_period_end=True, canceled_at=canceled_at)

    change = await api.cancel("sub_1", immediately=False, live_statuses=OPEN_STATUSES)

    assert change == stripe_api.SubscriptionChange("sub_1", "canceled", True, plan=None)
    assert [method for method, _, _ in stripe.requests] == ["POST", "GET"]


async def test_an_immediate_cancel_of_a_subscription_set_to_end_days_ago_is_answered_cancelled_on_retry(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    """Found in review: a subscription set to cancel at its period's end days ago keeps that request's
    `canceled_at` as far as we can tell (Stripe: "the time of the most recent update request"; not
    verifiable on stripe-mock), so the retry of an immediate cancel whose first try ended it just now was
    judged by the old request and answered 409. It ended now (`ended_at`): the latest of the two decides."""
    stripe, api = fake
    stripe.lose_next = 1  # the first DELETE cancels, its answer lost
    stripe.answer = (404, {"error": {"type": "invalid_request_error", "code": "resource_missing"}})
    days_ago = int((NOW - timedelta(days=3)).timestamp())
    stripe.subscription.update(
        status="canceled",
        cancel_at_period_end=True,
        canceled_at=days_ago,
        ended_at=int(NOW.timestamp()),
        items={"object": "list", "data": [item("si_1", "price_starter")]},
    )

    change = await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    assert change.status == "canceled"


@pytest.mark.parametrize("scheduled", ["cancel_at", "period end on its items", "period end on it"])
async def test_a_cancel_refused_of_a_subscription_that_ended_on_its_schedule_just_now_stays_refused(
    fake: tuple[FakeStripe, StripeApi], scheduled: str
) -> None:
    """Found in review: with `ended_at` deciding too, a subscription Stripe ended on its own schedule (its
    cancel_at, or its period's end) two minutes before an immediate cancel of it was answered 200
    "canceled immediately", and the customer's live subscription (a checkout just after) went unnamed.
    Its scheduled end is no request's: the refusal stays, saying when it ended and naming the live one
    (`ended_at` counts when it is not the end set, as an immediate cancel's before its period's end)."""
    stripe, api = fake
    stripe.answer = (404, {"error": {"type": "invalid_request_error", "code": "resource_missing"}})
    days_ago = int((NOW - timedelta(days=3)).timestamp())
    ended = int((NOW - timedelta(minutes=2)).timestamp())
    plan_item = item("si_1", "price_starter")
    stripe.subscription.update(status="canceled", canceled_at=days_ago, ended_at=ended, customer="cus_1")
    if scheduled == "cancel_at":
        stripe.subscription["cancel_at"] = ended
    elif scheduled == "period end on its items":  # API versions from 2025-03 on
        stripe.subscription["cancel_at_period_end"] = True
        plan_item["current_period_end"] = ended
    else:
        stripe.subscription.update(cancel_at_period_end=True, current_period_end=ended)
    stripe.subscription["items"] = {"object": "list", "data": [plan_item]}
    plan = {"object": "list", "data": [item("si_2", "price_starter")]}
    stripe.subscriptions = [
        {"id": "sub_2", "object": "subscription", "status": "active", "customer": "cus_1", "items": plan}
    ]

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    assert (raised.value.status, raised.value.error) == (409, "Stripe refused the request")
    assert "sub_1 ended at 2026-06-01T11:58:00Z (canceled)" in raised.value.message, raised.value.message
    assert raised.value.details == {
        "stripe_code": "resource_missing",
        "ended_at": "2026-06-01T11:58:00Z",
        "live_subscription_id": "sub_2",
    }


@pytest.mark.parametrize("other", [None, "sub_2"])
async def test_a_cancel_stripe_refuses_of_a_subscription_it_ended_long_ago_stays_refused_saying_when(
    fake: tuple[FakeStripe, StripeApi], other: str | None
) -> None:
    """Found in review: with the webhooks behind, spec.subscription still named a subscription Stripe's
    dunning ended a day ago while the customer's new one billed; a cancel without subscription_id went to
    the old one, Stripe refused it, and the read-back (canceled) answered 200 cancelled, so no one looked
    for the live one. Ended long before this request, it was cancelled by no try of it: the refusal
    stays, saying when it ended and naming the customer's live subscription when Stripe lists one. Found
    in review too: the newest, another product's subscription (no plan's price), was named."""
    stripe, api = fake
    stripe.answer = (404, {"error": {"type": "invalid_request_error", "code": "resource_missing"}})
    day_ago = int((NOW - timedelta(days=1)).timestamp())
    stripe.subscription.update(status="canceled", canceled_at=day_ago, ended_at=day_ago, customer="cus_1")
    plan = {"object": "list", "data": [item("si_plan", "price_starter")]}
    stripe.subscriptions = [
        {"id": "sub_3", "object": "subscription", "status": "active", "customer": "cus_other", "items": plan},
        # Another product's, on the same Stripe customer and newer: no plan's price, not the one to cancel.
        {
            "id": "sub_product",
            "object": "subscription",
            "status": "active",
            "customer": "cus_1",
            "items": {"object": "list", "data": [item("si_other", "price_another_product")]},
        },
        *(
            [{"id": other, "object": "subscription", "status": "active", "customer": "cus_1", "items": plan}]
            if other
            else []
        ),
    ]

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    assert (raised.value.status, raised.value.error) == (409, "Stripe refused the request")
    assert "sub_1 ended at 2026-05-31T12:00:00Z (canceled)" in raised.value.message, raised.value.message
    assert (f"live subscription {other}" in raised.value.message) == (other is not None)
    assert raised.value.details == {
        "stripe_code": "resource_missing",
        "ended_at": "2026-05-31T12:00:00Z",
        "live_subscription_id": other,
    }


async def test_a_cancel_stripe_refuses_of_a_subscription_still_live_stays_refused(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Read back and not canceled (nor missing): Stripe's refusal is the answer.
    stripe, api = fake
    refused = {"type": "invalid_request_error", "code": "resource_missing", "message": "No such thing"}
    stripe.answer = (404, {"error": refused})

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    assert (raised.value.status, raised.value.error) == (409, "Stripe refused the request")
    assert raised.value.details == {"stripe_code": "resource_missing"}
    assert [method for method, _, _ in stripe.requests] == ["DELETE", "GET"]


async def test_a_cancel_refused_whose_subscription_cannot_be_read_back_does_not_say_nothing_was_changed(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Its refusal may be of a retry whose first try cancelled: unread, the outcome is in doubt.
    stripe, api = fake
    stripe.answer = (404, {"error": {"type": "invalid_request_error", "code": "resource_missing"}})
    stripe.rate_limited = {("GET", "/v1/subscriptions/sub_1"): 1}

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    assert (raised.value.status, raised.value.error) == (503, "Stripe unavailable")
    assert "nothing was changed" not in raised.value.message
    assert "may have been made" in raised.value.message and "resource_missing" in raised.value.message


async def test_a_read_whose_answer_is_lost_still_says_nothing_was_changed(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    stripe, api = fake
    stripe.lose_answers = True

    with pytest.raises(ApiError) as raised:
        await api.change_price("sub_1", "price_enterprise")  # its first call reads the subscription

    assert {method for method, _, _ in stripe.requests} == {"GET"}
    assert raised.value.status == 503 and "nothing was changed" in raised.value.message


@pytest.mark.parametrize(("retry_after", "answered"), [(None, "5"), ("2", "2")])
async def test_a_rate_limited_write_says_it_was_not_made_unless_an_earlier_try_went_unanswered(
    fake: tuple[FakeStripe, StripeApi], retry_after: str | None, answered: str
) -> None:
    # Found in review: a 429 on a write was "did not answer ... may have been made". Stripe's limiters
    # refuse before acting, and the SDK sends a 429's request once: this try was not made. The SDK does not
    # tell how many tries it made, so the sentence holds for an earlier one unanswered as well.
    stripe, api = fake
    stripe.answer = (
        429,
        {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "Slow down"}},
    )
    stripe.answer_headers = {"Retry-After": retry_after} if retry_after else {}

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    assert len(stripe.requests) == 1
    assert (raised.value.status, raised.value.error) == (503, "Stripe unavailable")
    assert "too many requests" in raised.value.message and "retry later" in raised.value.message
    assert "not made, unless an earlier try of it went unanswered" in raised.value.message
    assert raised.value.headers == {"Retry-After": answered}


async def test_a_rate_limit_after_a_lost_answer_does_not_say_nothing_was_changed(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    # Found in review: the SDK's retry of a cancel whose first answer was lost got a 429, answered "nothing
    # was changed", though the first try may have cancelled.
    stripe, api = fake
    stripe.lose_next = 1
    stripe.answer = (
        429,
        {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "Slow down"}},
    )

    with pytest.raises(ApiError) as raised:
        await api.cancel("sub_1", immediately=True, live_statuses=OPEN_STATUSES)

    assert [(method, path) for method, path, _ in stripe.requests] == [
        ("DELETE", "/v1/subscriptions/sub_1")
    ] * 2
    assert raised.value.status == 503
    assert "nothing was changed" not in raised.value.message
    assert "unless an earlier try of it went unanswered" in raised.value.message


async def test_a_rate_limited_read_says_nothing_was_changed(fake: tuple[FakeStripe, StripeApi]) -> None:
    stripe, api = fake
    stripe.rate_limited = {("GET", "/v1/subscriptions/sub_1"): 1}

    with pytest.raises(ApiError) as raised:
        await api.change_price("sub_1", "price_enterprise")  # its first call reads the subscription

    assert len(stripe.requests) == 1
    assert raised.value.status == 503
    assert "too many requests" in raised.value.message and "nothing was changed" in raised.value.message


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
        "create_checkout_session": {**CHECKOUT, "success_url": "https://.", "cancel_url": "https://."},
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


async def test_a_stripe_customer_stripe_does_not_have_is_said_so_and_replaced_under_a_key_of_its_own(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    """Found in review: a checkout of a customer whose Stripe customer was deleted in Stripe was a 409
    like any other refusal, so the route could not tell it to make a new one; and a new one made under
    signup's idempotency key would be Stripe's answer to the first create again."""
    stripe, api = fake
    stripe.refuse_creates = (
        400,
        {
            "error": {
                "type": "invalid_request_error",
                "code": "resource_missing",
                "param": "customer",
                "message": "No such customer: 'cus_1'",
            }
        },
    )

    with pytest.raises(StripeCustomerMissing) as raised:
        await api.create_checkout_session(**CHECKOUT)
    stripe.refuse_creates = None
    first = await api.create_customer(email="ops@a.example", company_name="A", customer_id="cust_acme01")
    again = await api.create_customer(
        email="ops@a.example", company_name="A", customer_id="cust_acme01", replacing="cus_1"
    )

    assert (raised.value.status, raised.value.error) == (409, "Stripe refused the request")
    assert raised.value.details == {"stripe_code": "resource_missing", "stripe_param": "customer"}
    assert (first, again) == ("cus_1", "cus_2")
    assert stripe.idempotency_keys[-2:] == ["signup-cust_acme01", "signup-cust_acme01-replacing-cus_1"]


async def test_a_signup_retried_after_its_stripe_customer_was_deleted_gets_a_live_one(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    """Found in review: a signup's customer id is its Idempotency-Key's, so its retry sends Stripe the same
    key; after a first try whose Customer the API server refused (its Stripe customer deleted), Stripe
    answered the deleted customer again, and the Customer was made linked to it."""
    stripe, api = fake
    signup = {"email": "ops@a.example", "company_name": "A", "customer_id": "cust_keyed01"}
    first = await api.create_customer(**signup)
    await api.delete_customer(first)
    retried = await api.create_customer(**signup)
    await api.delete_customer(retried)
    again = await api.create_customer(**signup)
    kept = await api.create_customer(**signup)  # a retry of a signup whose Customer was made

    assert (first, retried, again, kept) == ("cus_1", "cus_2", "cus_3", "cus_3")
    assert stripe.deleted_customers == {"cus_1", "cus_2"}
    # The last retry's creates, each replayed: the deleted two, then the live one.
    assert stripe.idempotency_keys[-3:] == [
        "signup-cust_keyed01",
        "signup-cust_keyed01-after-cus_1",
        "signup-cust_keyed01-after-cus_1-after-cus_2",
    ]


async def test_a_signup_remakes_its_deleted_stripe_customer_five_times_and_keeps_no_sixth_live(
    fake: tuple[FakeStripe, StripeApi],
) -> None:
    """Found in review: the loop made the fifth customer again and never read its create's answer, so
    the sixth try of a signup whose tries each failed (their Stripe customers deleted) made a live
    Stripe customer and answered 409 "deleted 5 times over", leaving it to bill no one."""
    stripe, api = fake
    signup = {"email": "ops@a.example", "company_name": "A", "customer_id": "cust_keyed01"}
    made = []
    for _ in range(6):
        made.append(await api.create_customer(**signup))
        await api.delete_customer(made[-1])  # its Customer refused: the signup deletes it

    with pytest.raises(ApiError) as raised:
        await api.create_customer(**signup)

    assert made == [f"cus_{n}" for n in range(1, 7)]
    assert (raised.value.status, raised.value.error) == (409, "Stripe customer deleted")
    # Made again five times at most: no customer made after the refusal's last read, none left live.
    assert stripe.idempotency_keys[-1].count("-after-") == 5
    assert set(stripe.customer_keys.values()) == stripe.deleted_customers == set(made)


@pytest.mark.parametrize(
    ("answer", "level", "said"),
    [
        ("key taken", logging.INFO, "a first call succeeded"),
        ("key refused", logging.WARNING, "a first call failed: Stripe answered 401"),
        ("no answer", logging.WARNING, "a first call got no answer in 0 s"),
    ],
)
async def test_the_start_up_line_of_a_key_stripe_refuses_or_no_answer_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, answer: str, level: int, said: str
) -> None:
    """Found in review: `Stripe at <base>: a first call failed: ...` was logged at INFO, so a key refused
    or revoked at start was invisible to alerting at WARNING, though the README points at that line."""
    stripe = FakeStripe()
    stripe.key_refused = answer == "key refused"
    if answer == "no answer":
        monkeypatch.setattr(stripe_api, "PROBE_TIMEOUT", 0.0)  # over before any answer: no wait
    fake = web.Application()
    fake.router.add_route("*", "/{tail:.*}", stripe.handle)
    async with TestServer(fake) as server:
        base = f"http://{server.host}:{server.port}"
        settings = load_settings(
            database_url="postgresql://nobody@127.0.0.1:1/none",
            stripe_webhook_secret="whsec_test",
            stripe_secret_key="sk_test_123",
            stripe_api_base=base,
        )
        app = app_module.create_app(settings)
        # The server's start-up opens the Stripe client alone: no database or API server here.
        (opens_stripe,) = [ctx for ctx in app.cleanup_ctx if getattr(ctx, "__name__", "") == "stripe_client"]
        with caplog.at_level(logging.INFO, logger=app_module.__name__):
            started = cast(AsyncIterator[None], opens_stripe(app))  # a generator, as cleanup_ctx takes
            await anext(started)
            await anext(started, None)  # closes the client

    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == app_module.__name__]
    assert len(lines) == 1 and lines[0][0] == level, lines
    assert lines[0][1].startswith(f"Stripe at {base}: {said}"), lines
