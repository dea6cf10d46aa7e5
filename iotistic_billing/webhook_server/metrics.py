"""Prometheus metrics of one app, in a registry of its own (no import-time global state)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, get_args

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from iotistic_billing.stripe_inbox.events import HANDLED_EVENT_TYPES
from iotistic_billing.usage.metrics import UsageMetrics
from iotistic_billing.webhook_server.errors import CLIENT_CLOSED_REQUEST

# Why a Stripe delivery was refused (400): which check of its Stripe-Signature, or its body ("payload":
# signed, but not an event this version reads). The rejections metric's label (webhooks.py).
RefusalReason = Literal["missing", "malformed", "mismatch", "stale", "ahead", "payload"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "iotistic_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "iotistic_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route", "method"],
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "iotistic_stripe_webhook_events",
            "Stripe events by type and result: at the webhook queued (stored), duplicate or rejected (a"
            " bad signature); in the inbox applied, stale, superseded, unmatched or ignored, or retry (not"
            " applied yet, tried again later).",
            ["type", "result"],
            registry=self.registry,
        )
        self.delivery_refusals = Counter(
            "iotistic_stripe_webhook_rejections",
            "Stripe deliveries refused (400), by reason: their Stripe-Signature missing, malformed,"
            " mismatch (no signature matches STRIPE_WEBHOOK_SECRET), stale or ahead (signed more than 300 s"
            " before or after this server's clock); payload (signed, not an event this version reads).",
            ["reason"],
            registry=self.registry,
        )
        # Each series from 0: one born at 1 is no increase to Prometheus (a first refusal may be the only).
        for reason in get_args(RefusalReason):
            self.delivery_refusals.labels(reason)
        self.readiness = Gauge(
            "iotistic_readiness_check",
            "The readiness checks' last results, by check (1 passed, 0 failed): database and schema make"
            " /readyz fail, kubernetes is reported only. Checked at each scrape: an outage that takes every"
            " replica out of the Service leaves the requests' metrics still and `up` at 1.",
            ["check"],
            registry=self.registry,
        )
        self.left_billing = Gauge(
            "iotistic_subscriptions_left_billing",
            "Stripe subscriptions still billing a deleted customer: open (active, trialing, past_due, unpaid,"
            " paused; not one set to end at its period's end) on a plan, their customer id held by no"
            " Customer. Stripe bills each until it is cancelled; the console's overview lists them. Counted"
            " from the database and the Customers at a scrape of the webhook server (not its Stripe inbox),"
            " at most once a minute; a count that fails keeps the last.",
            registry=self.registry,
        )
        self.usage = UsageMetrics(self.registry)
        # Set once the app shuts down (on_shutdown runs before aiohttp cancels the requests still in
        # progress, closing their connections itself): such a request is the server's failure, not 499.
        self.shutting_down = False

    async def mark_shutdown(self, app: web.Application) -> None:
        self.shutting_down = True

    def webhook_event(self, event_type: str, result: str) -> None:
        # Only types we know become labels: a label per arbitrary string would grow without bound.
        self.webhook_events.labels(event_type if event_type in HANDLED_EVENT_TYPES else "other", result).inc()

    def delivery_refused(self, reason: RefusalReason) -> None:
        self.delivery_refusals.labels(reason).inc()

    def readiness_checked(self, results: Iterable[tuple[str, bool]]) -> None:
        for check, passed in results:
            self.readiness.labels(check).set(1 if passed else 0)

    def exposition(self) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    def middleware(self) -> Middleware:
        @web.middleware
        async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as http_error:
                status = http_error.status
                raise
            except asyncio.CancelledError:
                # A handler cancelled because its client left answered no one and failed at nothing, so it
                # is counted apart from the 5xx the alerts watch; one cancelled at shutdown (its connection
                # closed by aiohttp, not the client) stays a 500.
                if request.transport is None and not self.shutting_down:
                    status = CLIENT_CLOSED_REQUEST
                raise
            finally:
                # The route template, never the raw path: ids in paths would explode the label set.
                route = request.match_info.route.resource
                template = route.canonical if route is not None else "unmatched"
                self.requests.labels(template, request.method, str(status)).inc()
                self.latency.labels(template, request.method).observe(time.perf_counter() - started)

        return count_requests


__all__ = ["Metrics"]
