"""Admin routes of subscriptions: state, checkout, plan change, cancellation, the customer portal.

These only ask Stripe; the Customer learns the outcome from the webhook events Stripe sends afterwards,
so there is one writer of spec.subscription and one order of truth (the events' `created`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from aiohttp import web
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from iotistic_billing.customer import PAID_STATUSES, PaidPlanName
from iotistic_billing.db import models
from iotistic_billing.db.pool import database_unreachable
from iotistic_billing.directory import CustomerRecord, remember
from iotistic_billing.errors import (
    Conflict,
    NotFound,
    Unavailable,
    ValidationFailed,
    customer_not_found,
    stripe_not_configured,
)
from iotistic_billing.stripe_api import (
    CheckoutSession,
    CustomerSubscribed,
    IdempotencyKeyReused,
    StripeApi,
    StripeCustomerMissing,
)
from iotistic_billing.stripe_inbox.events import ENDED_STATUSES, LIVE_STATUSES, OPEN_STATUSES, paid_plan
from iotistic_billing.webhook_server.context import CATALOG, DIRECTORY, SESSIONS, stripe_api
from iotistic_billing.webhook_server.messages import (
    idempotency_key_reused,
    json_model,
    key_digest,
    read_body,
    read_customer_id,
    read_idempotency_key,
)
from iotistic_billing.webhook_server.schemas import (
    CancelRequest,
    CheckoutRequest,
    CheckoutResponse,
    PortalRequest,
    PortalResponse,
    SubscriptionChangeResponse,
    UpgradeRequest,
)
from iotistic_billing.webhook_server.views import subscription_status

# The Customer's spec field of each field of a Stripe customer's create.
_SPEC_FIELDS: Final = {"email": "spec.email", "company_name": "spec.companyName"}


def _price(request: web.Request, plan: PaidPlanName) -> str:
    price = request.app[CATALOG].price_for(plan)
    if price is None:
        raise stripe_not_configured(f"STRIPE_PRICE_{plan.upper()}")
    return price


def _billed_through_stripe(record: CustomerRecord) -> None:
    """Refuse a subscription to a Customer whose licence would not follow it: in manual billing its plan
    is spec.plan (operator/entitlement.py), so it would pay and keep its plan."""
    mode = record.customer.spec.billing.mode
    if mode != "stripe":
        raise Conflict(
            "Not billed through Stripe",
            f"customer {record.customer_id} has spec.billing.mode {mode}, so its plan is spec.plan and a "
            "subscription would not change it; set spec.billing.mode to stripe first",
            [{"field": "spec.billing.mode", "message": f"is {mode}, not stripe"}],
        )


async def _live_subscription_id(
    session: AsyncSession, record: CustomerRecord, statuses: frozenset[str] = LIVE_STATUSES
) -> str | None:
    """The id of the customer's current subscription in `statuses`: spec.subscription, else the newest
    such row. Not an active or trialing one set to cancel at its period's end once that end has come:
    the operator has lapsed the Customer already, and a checkout refused "Already subscribed" left it no
    way back until Stripe's deletion was applied (an unpaid or paused one stays: Stripe ends it only when
    cancelled immediately, which this finds it for)."""
    current = record.customer.spec.subscription
    now = datetime.now(UTC)
    if (
        current is not None
        and current.stripe_subscription_id
        and current.status in statuses
        and not (current.status in PAID_STATUSES and current.ended_at_period_end(now))
    ):
        return current.stripe_subscription_id
    return await _newest_live_row(session, record.customer_id, statuses)


async def _newest_live_row(session: AsyncSession, customer_id: str, statuses: frozenset[str]) -> str | None:
    """The id of the customer's newest subscription row on a plan in `statuses`, not one ended at its
    period's end."""
    row = models.Subscription
    now = datetime.now(UTC)
    return await session.scalar(
        select(row.stripe_subscription_id)
        .where(
            row.customer_id == customer_id,
            row.status.in_(sorted(statuses)),
            # Not another product's subscription on the customer's Stripe customer, on no plan's price
            # (the inbox records it superseded, never held): found in review, the cancel cancelled it.
            row.plan.is_not(None),
            # The row's state is the spec's: not one ended at its period's end either.
            or_(
                row.status.not_in(sorted(PAID_STATUSES)),
                ~row.cancel_at_period_end,
                row.current_period_end.is_(None),
                row.current_period_end > now,
            ),
        )
        .order_by(models.Subscription.last_event_created.desc())
        .limit(1)
    )


async def _live_subscription(
    session: AsyncSession, record: CustomerRecord, statuses: frozenset[str] = LIVE_STATUSES
) -> str:
    """`_live_subscription_id`, or a 409 "No active subscription"."""
    subscription_id = await _live_subscription_id(session, record, statuses)
    if subscription_id is None:
        raise _no_active_subscription(record.customer_id)
    return subscription_id


def _no_active_subscription(customer_id: str) -> Conflict:
    return Conflict(
        "No active subscription",
        f"customer {customer_id} has no active subscription; start one with a checkout",
        {"customer_id": customer_id},
    )


async def get_subscription(request: web.Request) -> web.Response:
    """The subscription state the Customer holds (spec.subscription) and the effective plan."""
    customer_id = read_customer_id(request)
    async with request.app[SESSIONS]() as session:
        record = await request.app[DIRECTORY].existing(session, customer_id)
    return json_model(subscription_status(record))


async def create_checkout(request: web.Request) -> web.Response:
    """A Stripe Checkout session that subscribes the customer to a plan."""
    billing = stripe_api(request)
    key = read_idempotency_key(request)
    body = await read_body(request, CheckoutRequest)
    price = _price(request, body.plan)
    # A retry of this checkout (the same key, customer and body) answers the session its first try made.
    request_key = (
        key_digest(
            "POST /api/subscriptions/checkout",
            body.customer_id,
            body.plan,
            body.success_url,
            body.cancel_url,
            key,
        )
        if key is not None
        else None
    )
    directory, sessions = request.app[DIRECTORY], request.app[SESSIONS]
    # No connection is held while Stripe answers (as upgrade, cancel and portal do).
    async with sessions() as session:
        record = await directory.existing(session, body.customer_id)
        _billed_through_stripe(record)
        # Unpaid or paused too: paid or resumed, it would bill beside the new one.
        live = await _live_subscription_id(session, record, OPEN_STATUSES)
        stripe_customer_id = await directory.stripe_customer_id(session, record)
    if live is not None:
        raise _already_subscribed(record.customer_id, live)
    if stripe_customer_id is None:
        # A Customer applied by GitOps has no Stripe customer yet.
        stripe_customer_id = await _new_stripe_customer(billing, sessions, record)
    try:
        try:
            checkout = await _checkout_session(billing, record, body, price, stripe_customer_id, request_key)
        except StripeCustomerMissing:
            # Deleted in Stripe: a returning customer gets a new one, unless its spec names the dead one.
            named = record.customer.spec.billing.stripe_customer_id
            if named is not None:
                raise _spec_names_a_missing_customer(record.customer_id, named) from None
            stripe_customer_id = await _new_stripe_customer(
                billing, sessions, record, replacing=stripe_customer_id
            )
            checkout = await _checkout_session(billing, record, body, price, stripe_customer_id, request_key)
    except CustomerSubscribed as subscribed:
        raise _already_subscribed(record.customer_id, subscribed.subscription_id) from None
    return json_model(CheckoutResponse(session_id=checkout.session_id, checkout_url=checkout.checkout_url))


async def _checkout_session(
    billing: StripeApi,
    record: CustomerRecord,
    body: CheckoutRequest,
    price: str,
    stripe_customer_id: str,
    request_key: str | None,
) -> CheckoutSession:
    # Stripe is asked too: a session paid whose events the Customer has not had yet is live there.
    try:
        return await billing.create_checkout_session(
            stripe_customer_id=stripe_customer_id,
            customer_id=record.customer_id,
            plan=body.plan,
            price_id=price,
            success_url=body.success_url,
            cancel_url=body.cancel_url,
            live_statuses=OPEN_STATUSES,
            request_key=request_key,
        )
    except IdempotencyKeyReused:
        # The session's Stripe key is the client's key's (its body is in it): an earlier try sent Stripe
        # other parameters, the server's (a plan's or a metered price changed between the tries).
        if request_key is None:
            raise
        raise idempotency_key_reused(
            f"Stripe refused the checkout session of customer {record.customer_id}: an earlier try of this"
            " Idempotency-Key within 24 hours sent it other parameters (a price setting changed between"
            " the tries); check out again with a new Idempotency-Key"
        ) from None


async def _new_stripe_customer(
    billing: StripeApi,
    sessions: async_sessionmaker[AsyncSession],
    record: CustomerRecord,
    replacing: str | None = None,
) -> str:
    """A Stripe customer made for the Customer (in place of `replacing`, which Stripe no longer has) and
    remembered at once, so a retry after a failed session finds it (another create under its idempotency
    key, with an email corrected meanwhile, is refused by Stripe)."""
    try:
        stripe_customer_id = await billing.create_customer(
            email=record.customer.spec.email,
            company_name=record.customer.spec.company_name,
            customer_id=record.customer_id,
            replacing=replacing,
        )
    except ValidationFailed as refused:
        # The fields Stripe refused are the Customer's spec, not this request's: mend the Customer.
        problems = [
            {**problem, "field": _SPEC_FIELDS.get(problem["field"], problem["field"])}
            for problem in refused.details
        ]
        raise Conflict(
            "Stripe refused the Customer's spec",
            f"customer {record.customer_id}: "
            + "; ".join(f"{problem['field']}: {problem['message']}" for problem in problems)
            + "; correct the Customer, then check out again",
            problems,
        ) from None
    try:
        async with sessions() as session, session.begin():
            await remember(session, record.customer, record.customer_id, stripe_customer_id)
    except Exception as error:
        if not database_unreachable(error):
            raise
        # Not "nothing was changed": the Stripe customer exists, and a retry finds it again only
        # under the same idempotency key, which Stripe refuses once spec.email is edited.
        raise Unavailable(
            "Database unavailable",
            f"Stripe customer {stripe_customer_id} was made for customer {record.customer_id} but not"
            " recorded: check out again soon, without editing spec.email or spec.companyName meanwhile"
            " (a retry within 24 hours finds the same Stripe customer)",
            {"dependency": "Database", "stripe_customer_id": stripe_customer_id},
            headers={"Retry-After": "5"},
        ) from None
    return stripe_customer_id


def _spec_names_a_missing_customer(customer_id: str, stripe_customer_id: str) -> Conflict:
    """GitOps owns spec.billing.stripeCustomerId: a new Stripe customer would not be the Customer's."""
    return Conflict(
        "Stripe customer missing",
        f"customer {customer_id}'s spec.billing.stripeCustomerId names Stripe customer {stripe_customer_id},"
        " which Stripe does not have (deleted?); set it to a live one, or remove it and check out again"
        " (a checkout then makes a new Stripe customer)",
        [
            {
                "field": "spec.billing.stripeCustomerId",
                "message": f"Stripe has no customer {stripe_customer_id}",
            }
        ],
    )


def _already_subscribed(customer_id: str, subscription_id: str) -> Conflict:
    """A second subscription would bill the customer twice; the live one changes plan instead."""
    return Conflict(
        "Already subscribed",
        f"customer {customer_id} has the live subscription {subscription_id}; change its plan with "
        "POST /api/subscriptions/upgrade (unpaid or paused: cancel it first with POST "
        '/api/subscriptions/cancel and {"immediately": true}; at its period\'s end it stays in the way '
        "until then)",
        {"customer_id": customer_id, "subscription_id": subscription_id},
    )


async def upgrade_subscription(request: web.Request) -> web.Response:
    """Move the subscription to another plan's price, prorated."""
    billing = stripe_api(request)
    body = await read_body(request, UpgradeRequest)
    price = _price(request, body.new_plan)
    async with request.app[SESSIONS]() as session:
        record = await request.app[DIRECTORY].existing(session, body.customer_id)
        _billed_through_stripe(record)
        subscription_id = await _live_subscription(session, record)
    change = await billing.change_price(subscription_id, price)
    if not change.changed:
        raise Conflict(
            "Plan unchanged",
            f"subscription {subscription_id} is already on the {body.new_plan} plan",
            [{"field": "new_plan", "message": "equals the current plan"}],
        )
    return json_model(
        SubscriptionChangeResponse(
            customer_id=record.customer_id,
            subscription_id=change.subscription_id,
            status=change.status,
            plan=body.new_plan,
            cancel_at_period_end=change.cancel_at_period_end,
        )
    )


async def cancel_subscription(request: web.Request) -> web.Response:
    """Cancel at the period end, or now with `immediately: true`; the subscription `subscription_id`
    names when given, else the customer's current one."""
    billing = stripe_api(request)
    body = await read_body(request, CancelRequest)
    named = body.subscription_id
    async with request.app[SESSIONS]() as session:
        record = await request.app[DIRECTORY].by_customer_id(session, body.customer_id)
        # Unpaid or paused too: Stripe keeps billing an unpaid one's drafts, and resumes a paused one.
        if record is not None:
            current = await _live_subscription_id(session, record, OPEN_STATUSES)
        else:
            # A Customer deleted with its subscription open (a GitOps prune cannot cancel first): Stripe
            # bills it until it is cancelled, here by its row. The inbox records Stripe's deletion of it
            # unmatched, and moves the row on.
            current = await _newest_live_row(session, body.customer_id, OPEN_STATUSES)
        if named is not None and named != current:
            # A retry of a cancel whose deletion is applied finds the customer's other subscription current.
            row = await _customer_s_subscription(session, body.customer_id, named)
            if row.status in ENDED_STATUSES:
                return _cancelled_already(body, row)
        subscription_id = named or current
        if subscription_id is None:
            if record is None:
                raise customer_not_found(body.customer_id)
            raise _no_active_subscription(record.customer_id)
        if record is None:
            await request.app[DIRECTORY].confirm_gone(body.customer_id)
    # OPEN_STATUSES: a refusal of one Stripe ended before names the customer's subscription that bills.
    change = await billing.cancel(subscription_id, immediately=body.immediately, live_statuses=OPEN_STATUSES)
    return json_model(
        SubscriptionChangeResponse(
            customer_id=body.customer_id,
            subscription_id=change.subscription_id,
            status=change.status,
            # The cancelled subscription's, not spec.subscription's: the newest live one of the
            # customer's records when spec.subscription's is not live.
            plan=change.plan,
            cancel_at_period_end=change.cancel_at_period_end,
            canceled_immediately=body.immediately,
        )
    )


async def _customer_s_subscription(
    session: AsyncSession, customer_id: str, subscription_id: str
) -> models.Subscription:
    """The customer's subscription row of `subscription_id` on a plan, or a 404 naming the field: another
    customer's, or another product's on the customer's Stripe customer, is not this cancel's."""
    row = await session.scalar(
        select(models.Subscription).where(models.Subscription.stripe_subscription_id == subscription_id)
    )
    if row is None or row.customer_id != customer_id or row.plan is None:
        raise NotFound(
            "Subscription not found",
            f"customer {customer_id} has no subscription {subscription_id} on a plan (its checkout's events "
            "may not be applied yet): nothing was cancelled",
            [
                {
                    "field": "subscription_id",
                    "message": f"customer {customer_id} has no subscription {subscription_id} on a plan",
                }
            ],
        )
    return row


def _cancelled_already(body: CancelRequest, row: models.Subscription) -> web.Response:
    """The answer of a first cancel, from the row of a subscription ended already (a retry's, whose first
    try's deletion the inbox has applied): nothing is sent to Stripe."""
    return json_model(
        SubscriptionChangeResponse(
            customer_id=body.customer_id,
            subscription_id=row.stripe_subscription_id,
            status=row.status,
            plan=paid_plan(row.plan),
            cancel_at_period_end=row.cancel_at_period_end,
            canceled_immediately=body.immediately,
        )
    )


async def create_portal_session(request: web.Request) -> web.Response:
    """A Stripe customer portal session, where the customer manages payment methods and invoices."""
    billing = stripe_api(request)
    body = await read_body(request, PortalRequest)
    async with request.app[SESSIONS]() as session:
        record = await request.app[DIRECTORY].existing(session, body.customer_id)
        stripe_customer_id = await request.app[DIRECTORY].stripe_customer_id(session, record)
    if stripe_customer_id is None:
        raise Conflict(
            "No Stripe customer",
            f"customer {record.customer_id} has no Stripe customer yet; start with a checkout",
            {"customer_id": record.customer_id},
        )
    url = await billing.portal_session(stripe_customer_id=stripe_customer_id, return_url=body.return_url)
    return json_model(PortalResponse(url=url))


__all__ = [
    "cancel_subscription",
    "create_checkout",
    "create_portal_session",
    "get_subscription",
    "upgrade_subscription",
]
