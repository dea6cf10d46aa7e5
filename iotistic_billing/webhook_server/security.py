"""Who may call what, how often, and the headers every answer carries.

- Admin: `Authorization: Bearer <ADMIN_API_TOKEN>`, compared in constant time.
- Instance: `X-API-Key: <usage key>`; only its SHA-256 is stored (api_keys), so lookup is by hash.
- Rate limits: an in-memory token bucket per client address and per authenticated principal.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.api_keys import usage_key_hash
from iotistic_billing.db.models import ApiKey
from iotistic_billing.settings import Settings
from iotistic_billing.webhook_server.errors import ApiError, Forbidden, TooManyRequests, Unauthorized
from iotistic_billing.webhook_server.options import RateLimit

API_KEY_HEADER: Final = "X-API-Key"
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    # Nothing is loaded by any page we serve (the docs page is plain HTML), so nothing is allowed.
    "Content-Security-Policy": (
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True)
class Principal:
    kind: Literal["admin", "instance"]
    # For an instance: the customer whose usage key it presented.
    customer_id: str | None = None

    @property
    def rate_key(self) -> str:
        return "admin" if self.kind == "admin" else f"instance:{self.customer_id}"


ADMIN: Final = Principal("admin")


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def is_admin(request: web.Request, settings: Settings) -> bool:
    token = _bearer(request)
    if token is None or settings.admin_api_token is None:
        return False
    return hmac.compare_digest(token.encode(), settings.admin_api_token.get_secret_value().encode())


async def instance_principal(request: web.Request, session: AsyncSession) -> Principal | None:
    key = request.headers.get(API_KEY_HEADER)
    if not key or len(key) > 512:
        return None
    customer_id = await session.scalar(
        select(ApiKey.customer_id).where(ApiKey.key_hash == usage_key_hash(key), ApiKey.revoked_at.is_(None))
    )
    return Principal("instance", customer_id) if customer_id is not None else None


def admin_not_configured() -> ApiError:
    return ApiError(
        "Admin API is not configured",
        "ADMIN_API_TOKEN is not set on this server, so admin routes are closed",
        {"setting": "ADMIN_API_TOKEN"},
        status=503,
    )


async def authenticate(
    request: web.Request,
    settings: Settings,
    session_factory: Callable[[], AsyncSession],
    allow_instance: bool,
) -> Principal:
    """The caller of an admin route (or, where `allow_instance`, of an instance route), or 401/403."""
    if is_admin(request, settings):
        return ADMIN
    if request.headers.get(API_KEY_HEADER):
        async with session_factory() as session:
            principal = await instance_principal(request, session)
        if principal is None:
            raise Unauthorized("the X-API-Key is not a known usage key")
        if not allow_instance:
            raise Forbidden("this route needs the admin token; a usage key may only read its own licence")
        return principal
    if settings.admin_api_token is None and not allow_instance:
        raise admin_not_configured()
    if _bearer(request) is not None:
        raise Unauthorized("the bearer token is not valid")
    raise Unauthorized("send Authorization: Bearer <ADMIN_API_TOKEN>")


class RateLimiter:
    """Token buckets by key. Memory is bounded: the least recently used buckets are dropped first, and a
    dropped bucket comes back full, which only ever errs towards letting a request through."""

    def __init__(
        self, limit: RateLimit, clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000
    ) -> None:
        self.limit = limit
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float | None:
        """Spend one token; None when allowed, else the seconds until a token is there again."""
        now = self.clock()
        tokens, updated = self._buckets.pop(key, (float(self.limit.burst), now))
        tokens = min(float(self.limit.burst), tokens + (now - updated) * self.limit.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.limit.per_second


def throttled(retry_after: float, scope: str) -> TooManyRequests:
    seconds = max(1, math.ceil(retry_after))
    return TooManyRequests(
        "Too many requests",
        f"rate limit per {scope} exceeded; retry in {seconds} s",
        {"scope": scope, "retry_after": seconds},
        headers={"Retry-After": str(seconds)},
    )


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, errors and aiohttp's own included."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")


__all__ = [
    "ADMIN",
    "API_KEY_HEADER",
    "SECURITY_HEADERS",
    "Principal",
    "RateLimiter",
    "add_security_headers",
    "authenticate",
    "instance_principal",
    "is_admin",
    "throttled",
]
