"""The app factory: routes from the route table, middlewares, and the clients the app opens and closes.

Nothing is created at import: `create_app(settings)` builds an app, and its cleanup_ctx opens the
database engine, the Kubernetes client and the Stripe client when the app starts and closes them when it
stops (after in-flight requests have finished).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import kubernetes
from aiohttp import hdrs, web

from iotistic_billing.db.engine import create_engine, session_factory
from iotistic_billing.db.schema import SchemaGate
from iotistic_billing.directory import Directory
from iotistic_billing.k8s import FieldManager, Kube, KubeApi, api_client
from iotistic_billing.notices.outbox import Outbox
from iotistic_billing.notices.sender import NoticeSender, SenderOptions
from iotistic_billing.prices import PriceCatalog
from iotistic_billing.settings import Settings
from iotistic_billing.stripe_api import StripeApi
from iotistic_billing.stripe_inbox.apply import EventApplier
from iotistic_billing.stripe_inbox.inbox import EventInbox
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.service import UsageMetering
from iotistic_billing.usage.store import open_pool
from iotistic_billing.webhook_server.console.pages import console_guard
from iotistic_billing.webhook_server.console.pages import register as register_console
from iotistic_billing.webhook_server.context import (
    ADDRESS_LIMITER,
    CATALOG,
    CLOCK,
    DIRECTORY,
    ENGINE,
    INBOX,
    KEY_LIMITER,
    KEYRING,
    KUBE,
    METRICS,
    NOTICES,
    OPENAPI,
    OPTIONS,
    OUTBOX,
    POOL,
    PRINCIPAL,
    ROUTE_ENTRIES,
    SCHEMA,
    SESSIONS,
    SETTINGS,
    STRIPE,
    TOKEN_GUESSES,
    USAGE,
    USAGE_KEYS,
    address_wait,
    client_bucket,
)
from iotistic_billing.webhook_server.errors import Handler, error_middleware, method_not_allowed
from iotistic_billing.webhook_server.keyring import LicenseKeyring
from iotistic_billing.webhook_server.metrics import Metrics
from iotistic_billing.webhook_server.openapi import build_document
from iotistic_billing.webhook_server.options import ServerOptions
from iotistic_billing.webhook_server.probes import LEFT_BILLING, READINESS, LeftBillingCount, ReadinessChecks
from iotistic_billing.webhook_server.route import Route
from iotistic_billing.webhook_server.route_table import INBOX_ROUTES, ROUTES
from iotistic_billing.webhook_server.security import (
    RateLimiter,
    TokenGuesses,
    UsageKeyCache,
    add_security_headers,
    authenticate,
    throttled,
)
from iotistic_billing.webhook_server.webhooks import DELIVERY_REFUSALS, DeliveryRefusals

log = logging.getLogger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rate limit per address, authenticate as the route's entry demands (a wrong token costs a try of the
    address's few: TokenGuesses), then rate limit per principal."""
    app = request.app
    entry = app[ROUTE_ENTRIES].get(request.match_info.route)
    if entry is None:
        return await handler(request)  # aiohttp's own 404, or the route table's 405
    if entry.rate_limited:
        wait = address_wait(request)
        if wait is not None:
            raise throttled(wait, "address")
    if entry.access in ("admin", "instance"):
        principal = await authenticate(
            request,
            app[SETTINGS],
            app[USAGE_KEYS],
            allow_instance=entry.access == "instance",
            guesses=app[TOKEN_GUESSES],
            address=client_bucket(request),
        )
        request[PRINCIPAL] = principal
        wait = app[KEY_LIMITER].take(principal.rate_key)
        if wait is not None:
            raise throttled(wait, "key")
    return await handler(request)


def create_app(
    settings: Settings,
    *,
    kube: kubernetes.client.ApiClient | None = None,
    clock: Callable[[], datetime] | None = None,
    options: ServerOptions | None = None,
    usage: UsageOptions | None = None,
    schema: SchemaGate | None = None,
) -> web.Application:
    """The webhook server. `kube`, when given, is used and left open (its owner closes it); otherwise a
    client is built from the service account or KUBECONFIG when the app starts, and closed with it.
    The background work waits at `schema` when given (tests time its looks), else at a gate of the app's
    engine."""
    if settings.database_url is None:
        raise ValueError("DATABASE_URL is required by the webhook server")
    database_url = settings.database_url
    options = options or ServerOptions()
    usage_options = usage or UsageOptions()
    metrics = Metrics()
    app = web.Application(
        client_max_size=options.client_max_size,
        middlewares=[metrics.middleware(), error_middleware, access_middleware, console_guard],
    )
    app[SETTINGS] = settings
    app[OPTIONS] = options
    app[CLOCK] = clock or utc_now
    app[METRICS] = metrics
    app.on_shutdown.append(metrics.mark_shutdown)
    app[CATALOG] = PriceCatalog.from_settings(settings)
    if not options.probes_only:  # the server's; its inbox process would say it again
        for warning in settings.start_warnings():
            log.warning("%s", warning)
    app[OUTBOX] = Outbox(settings.notify_webhook_url)
    app[KEYRING] = LicenseKeyring.from_settings(settings)
    app[ADDRESS_LIMITER] = RateLimiter(options.rate_per_address)
    app[KEY_LIMITER] = RateLimiter(options.rate_per_key)
    app[TOKEN_GUESSES] = TokenGuesses(options.wrong_tokens_per_address, options.wrong_tokens)
    app[READINESS] = ReadinessChecks()
    if not options.probes_only:  # the server's count; its inbox process would make it again
        app[LEFT_BILLING] = LeftBillingCount()
        app.on_shutdown.append(app[LEFT_BILLING].close)
    app[DELIVERY_REFUSALS] = DeliveryRefusals()

    served = INBOX_ROUTES if options.probes_only else ROUTES
    entries: dict[web.AbstractRoute, Route] = {}
    methods: dict[web.Resource, list[str]] = {}
    for entry in served:
        route = app.router.add_route(entry.method, entry.path, entry.handler)
        entries[route] = entry
        assert isinstance(route.resource, web.Resource)  # add_route always makes one
        methods.setdefault(route.resource, []).append(entry.method)
        if entry.method == hdrs.METH_GET:
            # As aiohttp's add_get does: HEAD answered as the GET, without its body (a load balancer's
            # or an uptime check's HEAD /healthz was a 405). The document lists the GETs alone.
            entries[route.resource.add_route(hdrs.METH_HEAD, entry.handler)] = entry
            methods[route.resource].append(hdrs.METH_HEAD)
    for resource, allowed in methods.items():
        # Without it aiohttp goes on to the next resource: `GET /api/subscriptions/checkout` was read as
        # `GET /api/subscriptions/{customerId}`, and other methods got an Allow of both paths' methods.
        resource.add_route(hdrs.METH_ANY, method_not_allowed(allowed))
    app[ROUTE_ENTRIES] = entries
    if not options.probes_only:
        register_console(app, settings)
    app[OPENAPI] = build_document(served)
    app.on_response_prepare.append(add_security_headers)

    async def database(app: web.Application) -> AsyncIterator[None]:
        engine = create_engine(database_url)
        app[ENGINE] = engine
        app[SESSIONS] = session_factory(engine)
        app[SCHEMA] = schema or SchemaGate.of(engine)
        app[POOL] = await open_pool(database_url, usage_options.pool_size)
        yield
        await app[POOL].close()
        await engine.dispose()

    async def kubernetes_api(app: web.Application) -> AsyncIterator[None]:
        client = kube if kube is not None else api_client("webhook-server")
        # Its own writes are signups and suspensions; the Stripe inbox and usage metering name theirs.
        api = KubeApi(client, FieldManager.SIGNUP, timeout=options.kube_timeout)
        app[KUBE] = Kube(api, options.kube_concurrency)
        app[DIRECTORY] = Directory(app[KUBE])
        yield
        app[KUBE].close()
        if kube is None:
            api.close()

    async def stripe_client(app: web.Application) -> AsyncIterator[None]:
        stripe = StripeApi(settings) if settings.stripe_configured else None
        app[STRIPE] = stripe
        if stripe is not None and not options.probes_only:
            failed = await stripe.probe()
            if failed is None:
                log.info("Stripe at %s: a first call succeeded", settings.stripe_api_base)
            else:  # a key refused or revoked, or no answer: found in review at INFO, unseen by alerting
                log.warning("Stripe at %s: %s", settings.stripe_api_base, failed)
        yield
        if stripe is not None:
            await stripe.close()

    async def stripe_inbox(app: web.Application) -> AsyncIterator[None]:
        stripe = app[STRIPE]
        applier = EventApplier(
            kube=app[KUBE],
            directory=app[DIRECTORY],
            catalog=app[CATALOG],
            outbox=app[OUTBOX],
            portal_url=settings.customer_portal_url,
            restricted_for=timedelta(days=settings.dunning_restrict_days),
            livemode=settings.stripe_livemode,
            invoice_lines=stripe.invoice_lines if stripe is not None else None,
        )
        inbox = EventInbox(
            sessions=app[SESSIONS],
            schema=app[SCHEMA],
            applier=applier,
            count=metrics.webhook_event,
            workers=options.inbox_workers,
            database_url=database_url,
            retention=timedelta(days=settings.stripe_event_retention_days),
            now=app[CLOCK],
        )
        app[INBOX] = inbox
        await inbox.start()
        yield
        await inbox.stop()

    async def notice_sender(app: web.Application) -> AsyncIterator[None]:
        # Beside the inbox: the server process, which runs no inbox workers, sends nothing either.
        sender = NoticeSender(
            sessions=app[SESSIONS],
            schema=app[SCHEMA],
            kube=app[KUBE],
            options=SenderOptions(
                smtp_url=settings.smtp_url.get_secret_value() if settings.smtp_url else None,
                mail_from=settings.notify_from,
                platform_webhook_secret=(
                    settings.notify_webhook_secret.get_secret_value()
                    if settings.notify_webhook_secret
                    else None
                ),
                max_attempts=settings.notify_max_attempts,
                workers=options.notice_workers if options.inbox_workers else 0,
                billing_namespace=settings.billing_namespace,
                webhook_allowed_networks=tuple(settings.notify_webhook_allowed_cidrs),
                retention=timedelta(days=settings.notice_retention_days),
            ),
            clock=app[CLOCK],
            # Mail waits while the inbox applies a burst: both are on this process's event loop.
            precedence=app[INBOX].precedence,
            database_url=database_url,
        )
        app[NOTICES] = sender
        await sender.start()
        yield
        await sender.stop()

    async def usage_metering(app: web.Application) -> AsyncIterator[None]:
        # Last in, first out: stopped (with its final status flush) while the engine, the Kubernetes
        # client and Stripe are still open.
        app[USAGE_KEYS] = UsageKeyCache(
            app[SESSIONS], ttl=usage_options.key_cache_ttl, negative_ttl=usage_options.key_cache_negative_ttl
        )
        metering = UsageMetering(
            pool=app[POOL],
            options=usage_options,
            session_factory=app[SESSIONS],
            directory=app[DIRECTORY],
            kube=app[KUBE],
            stripe=app[STRIPE],
            metrics=metrics.usage,
            outbox=app[OUTBOX],
            clock=app[CLOCK],
            schema=app[SCHEMA],
        )
        app[USAGE] = metering
        metering.start()
        yield
        await metering.stop()

    app.cleanup_ctx.extend(
        [database, kubernetes_api, stripe_client, stripe_inbox, notice_sender, usage_metering]
    )
    return app


__all__ = ["create_app"]
