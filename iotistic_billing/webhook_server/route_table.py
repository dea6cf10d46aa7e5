"""The route table: every route of the server, in registration order (fixed paths before `{customerId}`)."""

from __future__ import annotations

from typing import Final

from iotistic_billing.webhook_server import (
    customers,
    licenses,
    notices,
    openapi,
    probes,
    subscriptions,
    usage,
    webhooks,
)
from iotistic_billing.webhook_server.route import Route
from iotistic_billing.webhook_server.schemas import (
    CancelRequest,
    CheckoutRequest,
    CheckoutResponse,
    CustomerList,
    CustomerView,
    Health,
    HistoryQuery,
    Jwks,
    LicenseHistoryResponse,
    LicenseResponse,
    ListCustomersQuery,
    NoticeList,
    NoticeQuery,
    NoticeView,
    PortalRequest,
    PortalResponse,
    QueueStats,
    Readiness,
    RevokeRequest,
    RevokeResponse,
    SignupRequest,
    SignupResponse,
    StripeEvent,
    SubscriptionChangeResponse,
    SubscriptionStatusResponse,
    UpgradeRequest,
    UsageHistory,
    UsageQuery,
    UsageReportAck,
    UsageReportRequest,
    WebhookAck,
)

_LOCATION: Final = {"Location": {"description": "The customer's URL", "schema": {"type": "string"}}}

ROUTES: Final[tuple[Route, ...]] = (
    # ----- Stripe -----
    Route(
        "POST",
        "/api/webhooks/stripe",
        webhooks.receive_stripe_event,
        "Receive a Stripe event",
        "webhooks",
        "stripe",
        {200: WebhookAck},
        body=StripeEvent,
        errors=(503,),
        description=(
            "Signature verified with STRIPE_WEBHOOK_SECRET (its timestamp within 300 s of now, either "
            "way). Each event id is applied once (while its row is kept: STRIPE_EVENT_RETENTION_DAYS); "
            "a repeat answers duplicate: true. An event older than the state applied for its subscription "
            "is recorded and not applied. An event that matches no customer is acknowledged and recorded "
            "as unmatched, as Stripe would otherwise retry it for days."
        ),
        # Stripe delivers from a few addresses, in bursts after an outage; the signature check (one
        # HMAC) is the guard here, and a throttled event would only come back later.
        rate_limited=False,
    ),
    # ----- customers -----
    Route(
        "POST",
        "/api/customers",
        customers.create_customer,
        "Sign up a customer",
        "customers",
        "admin",
        {201: SignupResponse, 202: SignupResponse},
        body=SignupRequest,
        errors=(409, 422),
        headers=_LOCATION,
        description=(
            "Creates a Customer resource in trial (a Stripe customer too when Stripe is configured) and "
            "waits for the operator's licence (SIGNUP_LICENSE_WAIT seconds): 201 with it, or 202 with "
            "license null. "
            "An email already registered is a 409, also for the second of two signups at once on any "
            "replicas. A signup refused before its Customer exists deletes the Stripe customer it made; "
            "one whose create got no answer keeps it and is a 503 naming the customer id to read, as is "
            "one whose Stripe customer's create got none (`details.customer_id`). With an Idempotency-Key "
            "the customer id is derived from it and the email, so a retry makes the same Customer and "
            "Stripe customer, and one once it exists is the 409 naming it; one while a try of the email is "
            "in progress is 409 `Signup in progress` with Retry-After and `details.customer_id`; one Stripe "
            "refuses as the key's earlier try with another company_name or email case is 422 "
            "`Idempotency-Key reused`. "
            "The password of the earlier system's payload is accepted and discarded, never stored."
        ),
        idempotency_key=True,
    ),
    Route(
        "GET",
        "/api/customers",
        customers.list_customers,
        "List customers",
        "customers",
        "admin",
        {200: CustomerList},
        query=ListCustomersQuery,
    ),
    Route(
        "GET",
        "/api/customers/{customerId}",
        customers.get_customer,
        "Get a customer",
        "customers",
        "admin",
        {200: CustomerView},
        errors=(404,),
    ),
    # ----- subscriptions -----
    Route(
        "POST",
        "/api/subscriptions/checkout",
        subscriptions.create_checkout,
        "Create a checkout session for a plan",
        "subscriptions",
        "admin",
        {200: CheckoutResponse},
        body=CheckoutRequest,
        errors=(404, 409, 422),
        description=(
            "A Stripe Checkout session that subscribes the customer to the plan's price and the metered"
            " prices of its usage overage (STRIPE_METERED_PRICES); a Customer without a Stripe customer"
            " gets one first, kept even when the session then fails (a retry uses it; a spec.email or"
            " spec.companyName Stripe refuses is a 409 `Stripe refused the Customer's spec` naming it)."
            " 409 `Already subscribed` while the customer has a live subscription (its plan changes with"
            " /api/subscriptions/upgrade), `Not billed through Stripe` for a Customer whose"
            " spec.billing.mode is not stripe (its plan is spec.plan). Stripe is asked too: a customer it"
            " shows subscribed (a paid session whose events are not applied yet) is also a 409 `Already"
            " subscribed`. Each session is payable for 35 minutes; once made, the customer's open"
            " subscription sessions but the newest are expired (409 `Checkout started twice`, naming the"
            " payable session, for a checkout whose session is not the newest; a create Stripe refuses"
            " leaves them payable). With an Idempotency-Key, the sessions of one key, customer and body"
            " are one checkout: a retry answers its first session (Stripe's same one within the 5 minutes"
            " its expiry is rounded up to), and no session of a retry or of the abandoned first try"
            " expires it; one whose session is no longer open (expired, or paid) is 409 `Checkout session"
            " ended`: a new key makes a new session; one Stripe refuses as sent before with other"
            " parameters (a price setting changed between the tries) is 422 `Idempotency-Key reused`."
        ),
        idempotency_key=True,
    ),
    Route(
        "POST",
        "/api/subscriptions/upgrade",
        subscriptions.upgrade_subscription,
        "Change the subscription's plan (prorated)",
        "subscriptions",
        "admin",
        {200: SubscriptionChangeResponse},
        body=UpgradeRequest,
        errors=(404, 409),
        description=(
            "Moves the plan's item of the customer's live subscription to the new plan's price, prorated;"
            " its metered items stay. 409 `Plan unchanged` when Stripe has it on that plan already (the"
            " Customer's spec.subscription follows once Stripe's event is applied), `No active"
            " subscription` without one, `No plan item` or `Several plan items` when the subscription"
            " does not have exactly one item on a plan's price, `Not billed through Stripe` for a Customer"
            " whose spec.billing.mode is not stripe."
        ),
    ),
    Route(
        "POST",
        "/api/subscriptions/cancel",
        subscriptions.cancel_subscription,
        "Cancel the subscription",
        "subscriptions",
        "admin",
        {200: SubscriptionChangeResponse},
        body=CancelRequest,
        errors=(404, 409),
        description=(
            "The customer's live subscription (open: unpaid and paused too), at its period's end or now. A "
            "customer id no Customer holds any more (deleted with its subscription open) is cancelled by the "
            "newest open subscription recorded for it; 404 when there is none. With `subscription_id`, that "
            "subscription of the customer's and no other: one ended already is answered 200 with the "
            "status it ended in (canceled, or incomplete_expired: never paid), nothing sent to Stripe (a "
            "retry after a lost answer), and 404 `Subscription not found` "
            "when the customer has none of that id on a plan. A cancel Stripe refuses of a subscription it "
            "has canceled within 10 minutes (an earlier try's: its `canceled_at`, or its `ended_at` when "
            "that is not the end it was set for) is answered as cancelled too; one it ended before, or on "
            "its schedule (`cancel_at`, the period's end), stays the 409, with `details.ended_at` and the "
            "customer's live subscription on a plan in Stripe (`details.live_subscription_id`)."
        ),
    ),
    Route(
        "POST",
        "/api/subscriptions/portal",
        subscriptions.create_portal_session,
        "Create a Stripe customer portal session",
        "subscriptions",
        "admin",
        {200: PortalResponse},
        body=PortalRequest,
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/api/subscriptions/{customerId}",
        subscriptions.get_subscription,
        "Get a customer's subscription",
        "subscriptions",
        "admin",
        {200: SubscriptionStatusResponse},
        errors=(404,),
    ),
    # ----- licences -----
    Route(
        "GET",
        "/api/licenses/public-key",
        licenses.get_public_key,
        "The public key that verifies licences (PEM)",
        "licenses",
        "public",
        {200: "text/plain"},
        errors=(503,),
    ),
    Route(
        "GET",
        "/.well-known/jwks.json",
        licenses.get_jwks,
        "The public keys that verify licences (JWKS)",
        "licenses",
        "public",
        {200: Jwks},
        errors=(503,),
    ),
    Route(
        "GET",
        "/api/licenses/{customerId}",
        licenses.get_license,
        "Get a customer's licence",
        "licenses",
        "instance",
        {200: LicenseResponse},
        errors=(404,),
        description="The admin token, or the customer's own usage key in X-API-Key.",
    ),
    Route(
        "GET",
        "/api/licenses/{customerId}/history",
        licenses.get_license_history,
        "Get a customer's licence history",
        "licenses",
        "admin",
        {200: LicenseHistoryResponse},
        query=HistoryQuery,
        errors=(404,),
    ),
    Route(
        "POST",
        "/api/licenses/{customerId}/revoke",
        licenses.revoke_license,
        "Revoke the licence and suspend the customer",
        "licenses",
        "admin",
        {200: RevokeResponse},
        body=RevokeRequest,
        errors=(404, 409),
        description=(
            "Records a revoked history row for the licence in force and sets spec.suspended: true, so the "
            "operator re-mints an unlicensed licence. Reinstate by setting spec.suspended: false. A customer "
            "id no Customer holds any more (deleted with its finalizer removed by hand) has its usage keys "
            "and the last licence its history knows revoked, nothing patched (customer_deleted: true); 404 "
            "when neither its history nor its usage keys know it."
        ),
    ),
    # ----- usage -----
    Route(
        "POST",
        "/api/usage/report",
        usage.report_usage,
        "Report usage (one report or a batch of up to 1,000)",
        "usage",
        "instance",
        {202: UsageReportAck},
        body=UsageReportRequest,
        errors=(403, 409, 413),
        description=(
            "The instance's usage key in X-API-Key or as the bearer token (the admin token may report for "
            "any customer). Counters are deltas over [period_start, period_end) (at most 31 days, not in "
            "the future, not before the raw reports kept: USAGE_RAW_RETENTION months, a 400 naming "
            "period_start); active_devices and total_devices are levels. Each (customer_id, instance_id, "
            "report_id, period_start) is stored once: a repeat counts as duplicate (send a retry with the "
            "same period_start), and must repeat the report stored: one that differs in any field is a 409 "
            "naming each (reports[i].<field> in a batch, with the stored and sent values), and nothing of "
            "the request is stored. Every report must be the key's "
            "customer's (403 naming the first that is not), and a batch is stored whole or not at all. "
            "Usage keys are cached for USAGE_KEY_CACHE_TTL seconds (30 by default), so a revoked key works "
            "that much longer."
        ),
    ),
    Route(
        "GET",
        "/api/usage/{customerId}",
        usage.get_usage,
        "Get a customer's usage: reports, daily series, billing period and overage",
        "usage",
        "instance",
        {200: UsageHistory},
        query=UsageQuery,
        errors=(404,),
        description=(
            "The admin token, or the customer's own usage key. The window's reports come a page at a time, "
            "newest first: reports_next_cursor, passed back as reports_before, reads the next page, until "
            "it is null; report_count, daily and billing_period cover the whole window on every page."
        ),
    ),
    # ----- notices -----
    Route(
        "GET",
        "/api/notices",
        notices.list_notices,
        "Notices and their deliveries",
        "notices",
        "admin",
        {200: NoticeList},
        query=NoticeQuery,
        description=(
            "Each notice (trial ending, payment failed, licence suspended, usage threshold, ...) with the "
            "state of its deliveries by mail and webhook: sent, pending (with the next try and the last "
            "error) or dead after the last try."
        ),
    ),
    Route(
        "POST",
        "/api/notices/{noticeId}/resend",
        notices.resend_notice,
        "Send a notice again",
        "notices",
        "admin",
        {202: NoticeView},
        errors=(404, 409),
        description=(
            "The deliveries that did not arrive (dead, pending) are due again, or all when all arrived;"
            " the customer's webhook goes to its URL now, the mail to the addresses its Customer names now"
            " (a new delivery for one added or fixed since; one it no longer names is not mailed again;"
            " a deleted Customer's stored addresses stand). A delivery that did not arrive keeps its"
            " Message-ID and webhook-id; when all arrived, a mail gets a Message-ID of its own, a webhook"
            " keeps its webhook-id (a receiver that drops ids it has seen drops it). A deleted Customer's"
            " webhook that no signing secret kept for it signs any more is left as it is; when nothing else"
            " is sent again, 409 `Webhook cannot be signed`, naming the customer and the Secret"
            " (iotistic-notifications-deleted in the billing namespace). PostgreSQL lost at the commit is a"
            " 503 saying the resend may have been made: look at the notice's deliveries before asking again."
        ),
    ),
    # ----- operations: probes, metrics, this document -----
    Route(
        "GET",
        "/api/queue/stats",
        customers.get_queue_stats,
        "Customers by phase",
        "operations",
        "admin",
        {200: QueueStats},
    ),
    Route(
        "GET",
        "/healthz",
        probes.healthz,
        "Liveness",
        "operations",
        "public",
        {200: Health},
        rate_limited=False,
    ),
    Route(
        "GET",
        "/readyz",
        probes.readyz,
        "Readiness: PostgreSQL at this version's schema or a newer one's (the API server: reported only)",
        "operations",
        "public",
        {200: Readiness, 503: Readiness},
        rate_limited=False,
    ),
    Route(
        "GET",
        "/metrics",
        probes.metrics,
        "Prometheus metrics",
        "operations",
        "public",
        {200: "text/plain"},
        rate_limited=False,
    ),
    Route(
        "GET",
        "/api/openapi.json",
        openapi.get_openapi,
        "This OpenAPI document",
        "operations",
        "public",
        {200: "application/json"},
    ),
    Route(
        "GET",
        "/api/docs",
        openapi.get_docs,
        "The routes of this API as a page",
        "operations",
        "public",
        {200: "text/html"},
    ),
)

# What the Stripe inbox process serves on its own port (STRIPE_INBOX_PORT): the kubelet's probes and
# Prometheus. The API stays on the server's port, behind its rate limits.
INBOX_ROUTES: Final[tuple[Route, ...]] = tuple(
    route for route in ROUTES if route.path in ("/healthz", "/readyz", "/metrics")
)

__all__ = ["INBOX_ROUTES", "ROUTES"]
