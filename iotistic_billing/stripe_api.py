"""The Stripe client: outgoing Stripe calls through the stripe SDK's async methods, on an aiohttp
session of its own (the webhook server's subscription routes, usage metering's meter events).

STRIPE_API_BASE points the client at stripe-mock in tests and `make dev`. Stripe's answers become our
errors: unreachable, overloaded or busy with the same idempotency key (409) is 503 (retry; after a write,
one that may have been made: check first), rate limited (429) a 503 saying the request was not made
(for a write: unless an earlier try of it went unanswered), a refused field of the request is 400 naming
it, any other refused request 409 with Stripe's message and code; but a cancel Stripe refuses of a
subscription it has canceled within CANCELLED_BY_A_RETRY (the SDK's retry of one whose answer was lost)
is answered cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import stripe

from iotistic_billing.customer import ENDED_STATUSES, PaidPlanName
from iotistic_billing.errors import (
    NOTHING_CHANGED,
    ApiError,
    Conflict,
    DependencyUnavailable,
    ValidationFailed,
    stripe_refused_key,
)
from iotistic_billing.prices import PriceCatalog, item_price
from iotistic_billing.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
# The start-up probe must not hold the server's start for the SDK's 30 s and retries.
PROBE_TIMEOUT = 5.0
# How long a checkout session can be paid: Stripe's default is 24 h, its least 30 minutes from its own
# clock when the create arrives. `expires_at` is read once, and the SDK's third try (two 30 s timeouts
# and up to 1.5 s of back-off) can arrive 61.5 s later: 35 minutes keeps that try above the least with
# over 3 minutes to spare for a clock behind Stripe's.
CHECKOUT_LIFETIME: Final = timedelta(minutes=35)
# A checkout with a client's idempotency key rounds its session's `expires_at` up to this step, so that a
# retry within the step sends Stripe the same parameters under the same key (Stripe refuses a key reused
# with others) and gets the same session back.
CHECKOUT_EXPIRY_STEP: Final = 300
# The session metadata naming the client's request (a digest of its Idempotency-Key): sessions carrying
# the same one are one checkout, made again by a retry.
CHECKOUT_KEY_METADATA: Final = "checkoutKey"
# How many deleted Stripe customers of one signup key are made again before the signup gives up.
_REMADE_AT_MOST: Final = 5
# A cancel Stripe refuses of a subscription it has canceled is answered cancelled only when the later of
# Stripe's canceled_at (the time of the request that cancelled it) and ended_at (unless it ended when it
# was set to: `_last_cancel`) is this recent: the SDK's retry of a cancel whose answer was lost comes
# within 61.5 s of its first try, and a client's retry after its own timeout (the SDK's three 30 s tries)
# and a back-off of a few minutes within 10, with a clock apart from Stripe's by seconds. A subscription
# cancelled earlier (by dunning days ago, its events not applied to spec.subscription yet), or ended on its
# schedule, was cancelled by no try of this request: its refusal prompts a look for the customer's live
# one, which a "cancelled" would hide while it bills.
CANCELLED_BY_A_RETRY: Final = timedelta(minutes=10)


@dataclass(frozen=True)
class CheckoutSession:
    session_id: str
    checkout_url: str


class CustomerSubscribed(Exception):
    """A checkout found the customer subscribed in Stripe (an earlier session paid, its events not applied
    to the Customer yet, or paid while the new one was made, which is then expired again)."""

    def __init__(self, subscription_id: str) -> None:
        super().__init__(f"the customer has the live subscription {subscription_id} in Stripe")
        self.subscription_id = subscription_id


class StripeCustomerMissing(Conflict):
    """Stripe has no customer of the id a request named (deleted in Stripe, whose `customer.deleted` the
    inbox records and does not apply): the 409 of any other refusal, which a checkout answers by making
    the Customer a new Stripe customer."""


class IdempotencyKeyReused(Conflict):
    """Stripe refused a request's idempotency key as one it had within 24 hours with other parameters
    (`idempotency_error`): the 409 of any other refusal, which a route whose key is derived from the
    client's Idempotency-Key answers as that key reused with another request."""


@dataclass(frozen=True)
class SubscriptionChange:
    subscription_id: str
    status: str
    cancel_at_period_end: bool
    # False: the subscription was as asked already (a plan change to the price it is on), nothing sent.
    changed: bool = True
    # The plan of its plan item, as Stripe answered (set by cancel): None when it has none of ours.
    plan: PaidPlanName | None = None


async def _stripe(
    call: Awaitable[T], action: str, *, writes: bool = False, fields: Mapping[str, str] | None = None
) -> T:
    """`call`'s answer, or Stripe's failure as our error. `writes`: the call changes something, which an
    answer lost (after the SDK's retries, under one idempotency key) leaves in doubt. `fields`: the
    request body's name of each Stripe parameter the client gave, for a 400 naming the one refused."""
    try:
        return await call
    except stripe.RateLimitError as error:
        log.warning("Stripe %s was rate limited (%s)", action, _stripe_code(error))
        raise _rate_limited(action, error, writes=writes) from None
    except stripe.APIConnectionError as error:
        log.warning("Stripe %s failed: %s", action, type(error).__name__)
        raise (
            _maybe_made(action, type(error).__name__) if writes else DependencyUnavailable("Stripe")
        ) from None
    except (stripe.AuthenticationError, stripe.PermissionError) as refused:
        status = refused.http_status or 401
        log.warning("Stripe %s: the API key was refused with %s", action, status)
        raise stripe_refused_key(status) from None
    except stripe.StripeError as error:
        status, code = error.http_status or 500, _stripe_code(error)
        log.warning("Stripe %s refused with %s (%s)", action, status, code)
        # 409: another request with the same idempotency key is in flight (or a lock): Stripe says retry.
        if status >= 500 or status == 409:
            if writes:
                raise _maybe_made(action, str(code or status)) from None
            raise DependencyUnavailable(
                "Stripe", f"Stripe could not {action} now ({code or status}); retry later"
            ) from None
        param = getattr(error, "param", None)
        if status == 400 and isinstance(param, str) and fields and param in fields:
            raise ValidationFailed(
                [
                    {
                        "field": fields[param],
                        "message": f"Stripe refused it: {error.user_message or 'no reason given'}",
                        "type": "stripe_refused",
                    }
                ]
            ) from None
        details = {"stripe_code": code} | ({"stripe_param": param} if param else {})
        kind = (
            StripeCustomerMissing
            if (code, param) == ("resource_missing", "customer")
            else IdempotencyKeyReused
            if code == "idempotency_error"
            else Conflict
        )
        raise kind(
            "Stripe refused the request",
            f"Stripe refused to {action}: {error.user_message or 'no reason given'}",
            details,
        ) from None


def _rate_limited(action: str, error: stripe.RateLimitError, *, writes: bool) -> DependencyUnavailable:
    """The 503 of a request Stripe refused as too many; retry after Stripe's Retry-After when it sends
    whole seconds, else our 5. Stripe's limiters refuse before acting, so this try was not made; but the
    SDK's 429 may be its retry of a write whose earlier try went unanswered (or was a 5xx), and it does not
    say how many tries it made, so a write's sentence holds for both."""
    code = _stripe_code(error) or 429
    refused = DependencyUnavailable(
        "Stripe",
        f"Stripe refused to {action} now: too many requests ({code}); retry later: it was not made, unless "
        "an earlier try of it went unanswered (then it may have been: check first)"
        if writes
        else f"Stripe refused to {action} now: too many requests ({code}); {NOTHING_CHANGED}",
    )
    retry_after = (error.headers or {}).get("Retry-After")
    if isinstance(retry_after, str) and retry_after.isdigit():
        refused.headers = {"Retry-After": retry_after}
    return refused


def _maybe_made(action: str, why: str) -> DependencyUnavailable:
    """The 503 of a write Stripe gave no answer to (a 5xx's outcome is unknown to Stripe's own advice too):
    the request may have reached Stripe and been made, so a retry must check first."""
    return DependencyUnavailable(
        "Stripe",
        f"Stripe did not answer the request to {action} ({why}); the change may have been made: check "
        "before retrying",
    )


def _stripe_code(error: stripe.StripeError) -> str | None:
    """Stripe's error code (`card_declined`), else its type (`idempotency_error`): the SDK sets
    `error.code` for a few error classes only."""
    body = error.json_body if isinstance(error.json_body, dict) else {}
    detail = body.get("error")
    if not isinstance(detail, dict):
        detail = {}
    found = error.code or detail.get("code") or detail.get("type")
    return str(found) if found else None


def _checkout_key(session: Any) -> str | None:
    metadata = session.to_dict().get("metadata") or {}
    key = metadata.get(CHECKOUT_KEY_METADATA)
    return str(key) if key else None


def _payable(sessions: Collection[Any]) -> Any:
    """The one of a customer's open sessions to keep: the first session (Stripe's `created`, ties broken
    by id) of the newest checkout, a checkout being the sessions of one client's key (a retry's are made
    after its first, which it answers) or a session made without one. Found in review: "the newest
    session" was a retry's abandoned first request's, made after the retry's answer, which it expired."""
    first: dict[str, Any] = {}
    for session in sorted(sessions, key=_made_at):
        first.setdefault(_checkout_key(session) or f"session {session.id}", session)
    return max(first.values(), key=_made_at)


def _at(timestamp: Any) -> datetime:
    """A Stripe timestamp (Unix seconds) as a time."""
    return datetime.fromtimestamp(int(timestamp), UTC)


def _last_cancel(subscription: Mapping[str, Any]) -> datetime | None:
    """When a request last cancelled the canceled subscription: the later of its canceled_at and its
    ended_at, which counts only when it is not the end the subscription was set for (`_scheduled_ends`).
    A cancel set for the period's end keeps that request's canceled_at when an immediate cancel ends it,
    whose time is then its ended_at; an end Stripe reached on that schedule is no request's."""
    moments = [subscription.get("canceled_at")]
    ended = subscription.get("ended_at")
    if ended is not None and ended not in _scheduled_ends(subscription):
        moments.append(ended)
    return max((_at(moment) for moment in moments if moment is not None), default=None)


def _scheduled_ends(subscription: Mapping[str, Any]) -> set[Any]:
    """When the subscription was set to end: its cancel_at, and its period's end when it was to cancel
    then (current_period_end: on its items from API version 2025-03 on, on it before)."""
    ends = {subscription.get("cancel_at")}
    if subscription.get("cancel_at_period_end") is True:
        ends.add(subscription.get("current_period_end"))
        items = subscription.get("items")
        for item in items.get("data", []) if isinstance(items, Mapping) else []:
            if isinstance(item, Mapping):
                ends.add(item.get("current_period_end"))
    return ends - {None}


def _made_at(session: Any) -> tuple[int, str]:
    return int(session.created), str(session.id)


def _checkout_ended(customer_id: str, session: Any, *, keyed: bool, paid: str | None = None) -> Conflict:
    """The 409 of a checkout whose session Stripe answered is not open (expired, or paid) while the
    customer has none open: Stripe's first session of a retry's key, ended since (its first try found
    the customer subscribed and expired it, or it was paid and that subscription cancelled). Its link pays
    nothing, and a new session under its key would take the place of the ended one's checkout unseen.
    `paid`: the subscription of a paid one, not ended, which the answer names (details.subscription_id),
    asking for no new checkout: found in review, a retry of a checkout paid moments ago, its subscription
    not listed by Stripe yet, was asked to check out again, which would bill the customer twice."""
    details = {"customer_id": customer_id, "session_id": str(session.id), "status": str(session.status)}
    if paid is not None:
        return Conflict(
            "Checkout session ended",
            f"checkout session {session.id} of customer {customer_id}, "
            + ("made by an earlier try of this Idempotency-Key, " if keyed else "")
            + f"was paid: its subscription {paid} is the customer's (Stripe may not list it yet, and its"
            " events may not be applied yet); no new checkout is needed",
            details | {"subscription_id": paid},
        )
    return Conflict(
        "Checkout session ended",
        f"checkout session {session.id} of customer {customer_id}, "
        + ("made by an earlier try of this Idempotency-Key, " if keyed else "")
        + f"is {session.status} and cannot be paid: check out again"
        + (" with a new Idempotency-Key" if keyed else ""),
        details,
    )


def _replayed(answer: Any) -> bool:
    """Stripe's answer is its first answer to the idempotency key, sent again."""
    response = answer.last_response
    return response is not None and response.headers.get("Idempotent-Replayed") == "true"


def _sub_fields(subscription: Any, *, changed: bool = True) -> SubscriptionChange:
    return SubscriptionChange(
        subscription_id=str(subscription.id),
        status=str(subscription.status),
        cancel_at_period_end=bool(subscription.cancel_at_period_end),
        changed=changed,
    )


class StripeApi:
    def __init__(self, settings: Settings, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if settings.stripe_secret_key is None:
            raise ValueError("StripeApi needs STRIPE_SECRET_KEY")
        # aiohttp as the async transport: it is already ours, and this session is closed with the app.
        self._http = stripe.AIOHTTPClient(timeout=30)
        self.client = stripe.StripeClient(
            settings.stripe_secret_key.get_secret_value(),
            base_addresses={"api": settings.stripe_api_base},
            http_client=self._http,
            max_network_retries=2,
        )
        self.catalog = PriceCatalog.from_settings(settings)
        self.clock = clock

    async def probe(self) -> str | None:
        """One read-only call (the balance), for the start-up line: None when Stripe took our key, else
        what went wrong (refused, no answer)."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):  # not wait_for: see workers.py
                await _stripe(self.client.v1.balance.retrieve_async(), "read the balance")
        except ApiError as error:
            return f"a first call failed: {error.message}"
        except TimeoutError:
            return f"a first call got no answer in {PROBE_TIMEOUT:g} s"
        return None

    async def close(self) -> None:
        http: Any = self._http  # the SDK's transports are untyped
        await http.close_async()

    async def create_customer(
        self, *, email: str, company_name: str, customer_id: str, replacing: str | None = None
    ) -> str:
        """A Stripe customer; a refused email or name is a 400 naming `email` or `company_name`, as a
        signup's body does. `replacing`: the Stripe customer of the customer id that Stripe no longer has
        (checkout's), which this one takes the place of."""
        # A retried create for the same customer id (checkout's, of a Customer applied by GitOps) makes no
        # second Stripe customer; one replacing a deleted one is another create, under a key of its own.
        key = f"signup-{customer_id}" + (f"-replacing-{replacing}" if replacing else "")
        customer = await self._create_customer(key, email, company_name, customer_id)
        # Stripe answers a key it had within 24 h with its first answer, though that customer is deleted
        # since: a signup's retry under the client's Idempotency-Key (one customer id) after its first try
        # failed and deleted the Stripe customer it made. A replayed answer is read back, and a deleted
        # customer is made again under a key naming it, as a retry of that retry finds it. Every create's
        # answer is read, the last one's too: a live customer made is the answer, never left behind.
        remade = 0
        while _replayed(customer):
            current = await _stripe(
                self.client.v1.customers.retrieve_async(str(customer.id)), "read the customer back"
            )
            if current.to_dict().get("deleted") is not True:
                break
            if remade == _REMADE_AT_MOST:
                raise Conflict(
                    "Stripe customer deleted",
                    f"Stripe's customers of customer {customer_id} made under this idempotency key were"
                    f" deleted {_REMADE_AT_MOST + 1} times over: sign up again with another Idempotency-Key",
                    {"customer_id": customer_id},
                )
            key = f"{key}-after-{customer.id}"
            customer = await self._create_customer(key, email, company_name, customer_id)
            remade += 1
        return str(customer.id)

    async def _create_customer(self, key: str, email: str, company_name: str, customer_id: str) -> Any:
        return await _stripe(
            self.client.v1.customers.create_async(
                params={"email": email, "name": company_name, "metadata": {"customerId": customer_id}},
                options={"idempotency_key": key},
            ),
            "create a customer",
            writes=True,
            fields={"email": "email", "name": "company_name"},
        )

    async def delete_customer(self, stripe_customer_id: str) -> str:
        """Delete a Stripe customer: a signup's, when the signup failed before its Customer existed; the
        id Stripe says it deleted."""
        answer = await _stripe(
            self.client.v1.customers.delete_async(stripe_customer_id), "delete a customer", writes=True
        )
        fields = answer.to_dict()
        deleted, answered_id = fields.get("deleted"), fields.get("id")
        # A 200 is no proof: only `deleted: true` for this id says the customer is gone.
        if deleted is not True or answered_id != stripe_customer_id:
            raise Conflict(
                "Stripe did not delete the customer",
                f"Stripe did not delete customer {stripe_customer_id}: it answered deleted={deleted!r}"
                f" for {answered_id!r}",
                {"stripe_customer_id": stripe_customer_id},
            )
        return str(answered_id)

    async def create_checkout_session(
        self,
        *,
        stripe_customer_id: str,
        customer_id: str,
        plan: str,
        price_id: str,
        success_url: str,
        cancel_url: str,
        live_statuses: Collection[str],
        request_key: str | None = None,
    ) -> CheckoutSession:
        """A session that subscribes the customer, payable for CHECKOUT_LIFETIME; once it is made the
        customer's open subscription sessions but the newest are expired (a create Stripe refuses leaves
        them payable), so one at most can be paid (two paid sessions would be two billed subscriptions).
        CustomerSubscribed, and no session payable, when Stripe has a subscription of the customer in
        `live_statuses` before the create or once the others are expired; a 409 naming the newest when
        another checkout's session, made at the same moment, is newer (this one's is expired). A failure
        once the session is made says so: earlier sessions may have been expired by then.

        `request_key`: the digest of the client's Idempotency-Key (with the customer and the request it
        was sent for). The session carries it, and the sessions carrying one are one checkout, whose
        first session is the payable one: a retry (of a client, or the SDK's of an abandoned request
        still running on another replica) answers that session, and makes none the others must expire;
        once it is not open (expired, or paid), a 409 "Checkout session ended" asks for a new key, or, paid
        and its subscription not ended, names that subscription and asks for no checkout."""
        subscribed = await self._live_subscription(stripe_customer_id, live_statuses)
        if subscribed is not None:
            raise CustomerSubscribed(subscribed)
        metadata = {"customerId": customer_id, "plan": plan}
        # The metered prices bill the usage overage's meter events (no quantity: Stripe sums the usage).
        line_items: list[Any] = [{"price": price_id, "quantity": 1}]
        line_items += [{"price": metered} for metered in self.catalog.metered]
        expires_at = int((self.clock() + CHECKOUT_LIFETIME).timestamp())
        options: stripe.RequestOptions = {}
        if request_key is not None:
            expires_at = -(-expires_at // CHECKOUT_EXPIRY_STEP) * CHECKOUT_EXPIRY_STEP
            options["idempotency_key"] = f"checkout-{stripe_customer_id}-{request_key[:64]}-{expires_at}"
        session = await _stripe(
            self.client.v1.checkout.sessions.create_async(
                params={
                    "mode": "subscription",
                    "customer": stripe_customer_id,
                    "client_reference_id": customer_id,
                    "metadata": metadata
                    | ({CHECKOUT_KEY_METADATA: request_key} if request_key is not None else {}),
                    # Copied onto the subscription, so its own events name the customer too.
                    "subscription_data": {"metadata": metadata},
                    "line_items": line_items,
                    "success_url": success_url,
                    "cancel_url": cancel_url,
                    "expires_at": expires_at,
                },
                options=options,
            ),
            "create a checkout session",
            writes=True,
            fields={"success_url": "success_url", "cancel_url": "cancel_url"},
        )
        try:
            # Asked again once no other session can be paid: one paid since the first ask (and listed as
            # open no more) has left its subscription.
            newest, subscribed, session = await self._keep_newest_checkout(stripe_customer_id, session)
            # This checkout's own: its session, or the first one of its key (made by an earlier try).
            ours = newest is not None and (
                newest.id == session.id or (request_key is not None and _checkout_key(newest) == request_key)
            )
            if subscribed is None:
                subscribed = await self._live_subscription(stripe_customer_id, live_statuses)
            if subscribed is not None and ours and newest is not None:
                await self._expire_checkout(str(newest.id), "the new checkout session")
        except ApiError as failed:
            # Its own sentence may say nothing was changed, but the session is made and the earlier links
            # may be dead: a new checkout (which expires this session) is what gets a payable one.
            said = failed.message.removesuffix(f"; {NOTHING_CHANGED}").removesuffix("; retry later")
            failed.message = (
                f"{said}; before that, checkout session "
                f"{session.id} was made and the customer's earlier open subscription sessions may have been "
                "expired: a new checkout makes a payable session"
            )
            failed.args = (failed.message,)
            if isinstance(failed.details, dict):
                failed.details = {**failed.details, "checkout_session_id": str(session.id)}
            raise
        if subscribed is not None:
            raise CustomerSubscribed(subscribed)
        if newest is None:
            paid = await self._paid_subscription(session)
            raise _checkout_ended(customer_id, session, keyed=request_key is not None, paid=paid)
        if not ours:
            raise Conflict(
                "Checkout started twice",
                f"another checkout of customer {customer_id} made a session at the same moment: its session "
                f"{newest.id} is the one payable, this one's ({session.id}) is expired",
                {"customer_id": customer_id, "session_id": str(newest.id), "checkout_url": str(newest.url)},
            )
        return CheckoutSession(session_id=str(newest.id), checkout_url=str(newest.url or ""))

    async def _keep_newest_checkout(
        self, stripe_customer_id: str, made: Any
    ) -> tuple[Any | None, str | None, Any]:
        """Expire the customer's open subscription sessions but the newest checkout's (`_payable`), `made`
        too when it is not that one; that one (None when none is open), the subscription of one paid
        before its expire arrived (else None), and `made` as read. Every checkout agrees on which is the
        newest, whatever the order of their steps (two at the same moment, or one finished within the
        same second of Stripe's clock, its id sorting after), so exactly one stays payable; expiring all
        but `made` left none. `made` not listed open is read: a retry's, under its key, is Stripe's
        first session again, which may have been expired or paid since, and is then no checkout's."""
        open_sessions = await _stripe(
            self._open_checkouts(stripe_customer_id), "list the customer's open checkout sessions"
        )
        listed = {str(session.id) for session in open_sessions}
        if str(made.id) not in listed:
            made = await _stripe(
                self.client.v1.checkout.sessions.retrieve_async(str(made.id)),
                f"read checkout session {made.id}",
            )
        sessions = [*open_sessions, *([made] if str(made.id) not in listed and made.status == "open" else [])]
        if not sessions:
            return None, None, made
        newest = _payable(sessions)
        subscribed = None
        for session in sessions:
            if session.id == newest.id:
                continue
            try:
                await self._expire_checkout(session.id, f"the customer's checkout session {session.id}")
            except Conflict:
                # Stripe expires open sessions only: this one was paid or expired since the list.
                ended = await _stripe(
                    self.client.v1.checkout.sessions.retrieve_async(session.id),
                    f"read the customer's checkout session {session.id}",
                )
                if ended.status == "open":
                    raise
                if ended.status == "complete" and ended.subscription:
                    subscribed = str(ended.subscription)
        return newest, subscribed, made

    async def _paid_subscription(self, session: Any) -> str | None:
        """The subscription a paid (complete) session made, unless Stripe says it has ended since; one it
        cannot read is taken as live (asking for a new checkout could bill the customer twice)."""
        if session.status != "complete" or not session.subscription:
            return None
        subscription_id = str(session.subscription)
        try:
            subscription = await _stripe(
                self.client.v1.subscriptions.retrieve_async(subscription_id),
                f"read subscription {subscription_id}",
            )
        except ApiError as unread:
            log.warning("subscription %s of a paid checkout not read: %s", subscription_id, unread.message)
            return subscription_id
        return None if subscription.status in ENDED_STATUSES else subscription_id

    async def _expire_checkout(self, session_id: str, which: str) -> None:
        await _stripe(
            self.client.v1.checkout.sessions.expire_async(session_id), f"expire {which}", writes=True
        )

    async def _open_checkouts(self, stripe_customer_id: str) -> list[Any]:
        """The customer's open subscription sessions (not a one-time payment's), every page."""
        page = await self.client.v1.checkout.sessions.list_async(
            params={"customer": stripe_customer_id, "status": "open", "limit": 100}
        )
        return [session async for session in page.auto_paging_iter() if session.mode == "subscription"]

    async def _live_subscription(
        self, stripe_customer_id: str, live_statuses: Collection[str], *, on_plan: bool = False
    ) -> str | None:
        return await _stripe(
            self._newest_live(stripe_customer_id, live_statuses, on_plan=on_plan),
            "list the customer's subscriptions",
        )

    async def _newest_live(
        self, stripe_customer_id: str, live_statuses: Collection[str], *, on_plan: bool = False
    ) -> str | None:
        """The newest of the customer's subscriptions in `live_statuses`, every page (Stripe lists the
        newest first, and no cancelled one); `on_plan`: of those with an item on a plan's price."""
        page = await self.client.v1.subscriptions.list_async(
            params={"customer": stripe_customer_id, "limit": 100}
        )
        async for subscription in page.auto_paging_iter():
            # Another customer's is not this one's: stripe-mock (`make dev`) lists a fixture's whatever
            # the customer asked for.
            if subscription.customer != stripe_customer_id or subscription.status not in live_statuses:
                continue
            if on_plan and not self.catalog.plan_items(subscription.to_dict()):
                continue
            return str(subscription.id)
        return None

    async def invoice_lines(self, invoice_id: str) -> list[dict[str, Any]]:
        """Every line of an invoice, every page (an invoice event carries its first lines alone, saying
        `has_more`); a failure is our error, as any read's."""
        return await _stripe(self._invoice_lines(invoice_id), "list the invoice's lines")

    async def _invoice_lines(self, invoice_id: str) -> list[dict[str, Any]]:
        page = await self.client.v1.invoices.line_items.list_async(invoice_id, params={"limit": 100})
        return [line.to_dict() async for line in page.auto_paging_iter()]

    async def change_price(self, subscription_id: str, price_id: str) -> SubscriptionChange:
        """Move the subscription's plan item (not a metered one) to `price_id`, prorated; nothing is
        sent when it is on that price already (`changed` False). Stripe's item says so, not the
        Customer's spec.subscription, which lags until the inbox applies the change's event."""
        subscription = await _stripe(
            self.client.v1.subscriptions.retrieve_async(subscription_id), "read the subscription"
        )
        item = self._plan_item(subscription_id, subscription.to_dict())
        if item_price(item) == price_id:
            return _sub_fields(subscription, changed=False)
        updated = await _stripe(
            self.client.v1.subscriptions.update_async(
                subscription_id,
                params={
                    "items": [{"id": item["id"], "price": price_id}],
                    "proration_behavior": "create_prorations",
                },
            ),
            "change the subscription's price",
            writes=True,
        )
        return _sub_fields(updated)

    def _plan_item(self, subscription_id: str, subscription: dict[str, Any]) -> dict[str, Any]:
        """The one item of the subscription on a plan's price (STRIPE_PRICE_*), else a 409 naming the
        prices it has: an upgrade must not swap a metered price for a plan's."""
        item = self.catalog.plan_item(subscription)
        if item is not None:
            return dict(item)
        several = len(self.catalog.plan_items(subscription)) > 1
        prices = [item_price(each) for each in subscription.get("items", {}).get("data", [])]
        raise Conflict(
            "Several plan items" if several else "No plan item",
            f"subscription {subscription_id} has {'several items' if several else 'no item'} on a plan's "
            f"price (STRIPE_PRICE_*); its prices: {', '.join(map(str, prices)) or 'none'}. Mend its items in "
            "Stripe's dashboard",
            {"subscription_id": subscription_id, "prices": prices},
        )

    async def cancel(
        self, subscription_id: str, *, immediately: bool, live_statuses: Collection[str]
    ) -> SubscriptionChange:
        """The subscription cancelled, with its plan as Stripe has it (the Customer's spec.subscription
        may be another subscription of the customer's); one Stripe has canceled within
        CANCELLED_BY_A_RETRY, as cancelled. `live_statuses`: the statuses that bill, for the refusal of
        one cancelled earlier to name the customer's newest such subscription."""
        if immediately:
            action = "cancel the subscription"
            call = self.client.v1.subscriptions.cancel_async(subscription_id)
        else:
            action = "cancel the subscription at the period end"
            call = self.client.v1.subscriptions.update_async(
                subscription_id, params={"cancel_at_period_end": True}
            )
        cancelled = await self._cancelled(subscription_id, call, action, live_statuses)
        item = self.catalog.plan_item(cancelled.to_dict())
        plan = self.catalog.plan_for(item_price(item)) if item is not None else None
        return replace(_sub_fields(cancelled), plan=plan)

    async def _cancelled(
        self, subscription_id: str, call: Awaitable[Any], action: str, live_statuses: Collection[str]
    ) -> Any:
        """The subscription as `call` (a cancel) left it. Stripe refuses to cancel one it has canceled ("No
        such subscription" to a DELETE, or a 400 about a canceled subscription): the SDK's retry of an
        immediate cancel whose answer was lost (a v1 DELETE, which it retries after a lost answer or a 5xx
        with no idempotency key: it sends one with a POST or a v2 DELETE only), or a client's retry once
        Stripe ended it. So a refusal is read back, and one canceled within CANCELLED_BY_A_RETRY is the
        answer; one canceled before keeps the refusal, saying when it ended."""
        try:
            return await _stripe(call, action, writes=True)
        except Conflict as refused:
            try:
                subscription = await _stripe(
                    self.client.v1.subscriptions.retrieve_async(subscription_id), "read the subscription"
                )
            except Conflict:
                raise refused from None
            except ApiError:
                # Unread, the refusal may be of a retry whose first try cancelled: not "nothing was changed".
                code = refused.details.get("stripe_code") if isinstance(refused.details, dict) else None
                raise DependencyUnavailable(
                    "Stripe",
                    f"Stripe refused to {action} ({code or 'no code'}) and the subscription could not be "
                    "read back: an earlier try of it may have been made; check before retrying",
                ) from None
            if subscription.status != "canceled":
                raise refused from None
            cancelled_at = _last_cancel(subscription.to_dict())
            if cancelled_at is None or self.clock() - cancelled_at > CANCELLED_BY_A_RETRY:
                raise await self._ended_before(refused, subscription, live_statuses) from None
            log.info(
                "Stripe refused to %s %s, which it has canceled: answered as cancelled",
                action,
                subscription_id,
            )
            return subscription

    async def _ended_before(
        self, refused: Conflict, subscription: Any, live_statuses: Collection[str]
    ) -> Conflict:
        """Stripe's refusal to cancel a subscription it ended before this request, saying when, and naming
        the customer's newest subscription on a plan in `live_statuses` when Stripe lists one (not read: not
        named)."""
        read = subscription.to_dict()
        ended = read.get("ended_at") or read.get("canceled_at")
        when = _at(ended).strftime("%Y-%m-%dT%H:%M:%SZ") if ended is not None else None
        live = None
        customer = read.get("customer")
        if isinstance(customer, str):
            try:
                # On a plan's price: another product's subscription on the Stripe customer is not the one
                # to cancel instead (found in review: it was named).
                live = await self._live_subscription(customer, live_statuses, on_plan=True)
            except ApiError as unread:
                log.warning("the customer's live subscription could not be listed: %s", unread.message)
        refused.message += (
            f"; subscription {subscription.id} ended at {when or 'an unknown time'} ({subscription.status}),"
            " before this request"
            + (
                f": the customer's live subscription {live} bills (cancel it with subscription_id)"
                if live is not None
                else ""
            )
        )
        refused.args = (refused.message,)
        if isinstance(refused.details, dict):
            refused.details = {**refused.details, "ended_at": when, "live_subscription_id": live}
        return refused

    async def portal_session(self, *, stripe_customer_id: str, return_url: str) -> str:
        session = await _stripe(
            self.client.v1.billing_portal.sessions.create_async(
                params={"customer": stripe_customer_id, "return_url": return_url}
            ),
            "create a portal session",
            # A portal session changes nothing: its retry needs no check.
            fields={"return_url": "return_url"},
        )
        return str(session.url)


__all__ = [
    "CheckoutSession",
    "CustomerSubscribed",
    "IdempotencyKeyReused",
    "StripeApi",
    "StripeCustomerMissing",
    "SubscriptionChange",
]
