"""Typed keys of what the app holds (built in `app.create_app`, opened and closed in its cleanup_ctx)
and small accessors the handlers share."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from iotistic_billing.db.pool import Pool
from iotistic_billing.db.schema import SchemaGate
from iotistic_billing.directory import Directory
from iotistic_billing.errors import stripe_not_configured
from iotistic_billing.k8s import Kube
from iotistic_billing.notices.outbox import Outbox
from iotistic_billing.notices.sender import NoticeSender
from iotistic_billing.prices import PriceCatalog
from iotistic_billing.settings import Settings
from iotistic_billing.stripe_api import StripeApi
from iotistic_billing.stripe_inbox.inbox import EventInbox
from iotistic_billing.usage.service import UsageMetering
from iotistic_billing.webhook_server.keyring import LicenseKeyring
from iotistic_billing.webhook_server.metrics import Metrics
from iotistic_billing.webhook_server.options import ServerOptions
from iotistic_billing.webhook_server.route import Route
from iotistic_billing.webhook_server.security import (
    Principal,
    RateLimiter,
    TokenGuesses,
    UsageKeyCache,
    address_bucket,
    client_address,
)

SETTINGS = web.AppKey("settings", Settings)
OPTIONS = web.AppKey("options", ServerOptions)
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("clock")
CATALOG = web.AppKey("catalog", PriceCatalog)
KEYRING = web.AppKey("keyring", LicenseKeyring)
METRICS = web.AppKey("metrics", Metrics)
ADDRESS_LIMITER = web.AppKey("address_limiter", RateLimiter)
KEY_LIMITER = web.AppKey("key_limiter", RateLimiter)
# Wrong tokens per client address and for the server: the console's sign-in and the API's bearers.
TOKEN_GUESSES = web.AppKey("token_guesses", TokenGuesses)
ROUTE_ENTRIES: web.AppKey[dict[web.AbstractRoute, Route]] = web.AppKey("route_entries")
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
# Opened in cleanup_ctx, so they exist only while the app runs.
ENGINE = web.AppKey("engine", AsyncEngine)
SESSIONS = web.AppKey("sessions", async_sessionmaker[AsyncSession])
# What the background work (the inbox, the notice sender, usage metering) waits at (db/schema.py).
SCHEMA = web.AppKey("schema", SchemaGate)
# The hot paths' asyncpg pool (db.pool): Stripe deliveries, usage reports and the usage queries.
POOL = web.AppKey("pool", Pool)
KUBE = web.AppKey("kube", Kube)
DIRECTORY = web.AppKey("directory", Directory)
STRIPE: web.AppKey[StripeApi | None] = web.AppKey("stripe")
# Usage metering: its coalescer and timers; the usage-key cache of the auth middleware.
USAGE = web.AppKey("usage", UsageMetering)
USAGE_KEYS = web.AppKey("usage_keys", UsageKeyCache)
INBOX = web.AppKey("inbox", EventInbox)
# Notices: written by the routes and services beside their facts; sent by the inbox process.
OUTBOX = web.AppKey("outbox", Outbox)
NOTICES = web.AppKey("notices", NoticeSender)

PRINCIPAL = web.RequestKey("principal", Principal)


def stripe_api(request: web.Request) -> StripeApi:
    """The Stripe client, or 503 "Stripe is not configured" when STRIPE_SECRET_KEY is unset."""
    billing = request.app[STRIPE]
    if billing is None:
        raise stripe_not_configured()
    return billing


def request_address(request: web.Request) -> str:
    """The client a request comes from: the peer, or what X-Forwarded-For says when a trusted proxy
    (TRUSTED_PROXIES) sent it."""
    return client_address(
        request.remote, request.headers.getall("X-Forwarded-For", ()), request.app[OPTIONS].trusted_proxies
    )


def client_bucket(request: web.Request) -> str:
    """The key of the request's client in the limits per address: its address, an IPv6 client's /64."""
    return address_bucket(request_address(request))


def address_wait(request: web.Request) -> float | None:
    """Spend a token of the limit per client address (an IPv6 client's /64): None when allowed, else the
    seconds until a token is there again."""
    return request.app[ADDRESS_LIMITER].take(client_bucket(request))
