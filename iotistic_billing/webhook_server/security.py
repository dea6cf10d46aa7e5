"""Who may call what, how often, and the headers every answer carries.

- Admin: `Authorization: Bearer <ADMIN_API_TOKEN>`, compared in constant time.
- Instance: `X-API-Key: <usage key>` or `Authorization: Bearer <usage key>`; only its SHA-256 is stored
  (api_keys), so lookup is by hash. Lookups are cached for a short TTL (UsageKeyCache): a revoked key
  keeps working until its cache entry expires (30 s by default); a replaced one, ROTATION_GRACE longer.
- Rate limits: an in-memory token bucket per client address (an IPv6 client's /64) and per
  authenticated principal; wrong tokens (console sign-ins, bearers) have far smaller buckets of their own
  (TokenGuesses), per client address and for the server as a whole.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final, Literal

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.api_keys import usage_key_hash
from iotistic_billing.db.models import ApiKey
from iotistic_billing.errors import ApiError, Forbidden, TooManyRequests, Unauthorized
from iotistic_billing.settings import Settings
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
    # surrogateescape: the bytes sent, even when they are not UTF-8 (see api_keys.usage_key_hash).
    return hmac.compare_digest(
        token.encode("utf-8", "surrogateescape"), settings.admin_api_token.get_secret_value().encode()
    )


MAX_KEY_LENGTH: Final = 512


async def usage_key_customer(session: AsyncSession, key: str) -> str | None:
    """The customer whose live usage key `key` is, or None."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    customer_id: str | None = await session.scalar(
        select(ApiKey.customer_id).where(ApiKey.key_hash == usage_key_hash(key), ApiKey.live())
    )
    return customer_id


async def instance_principal(request: web.Request, session: AsyncSession) -> Principal | None:
    customer_id = await usage_key_customer(session, request.headers.get(API_KEY_HEADER, ""))
    return Principal("instance", customer_id) if customer_id is not None else None


class UsageKeyCache:
    """Usage key -> customer id, remembered for `ttl` seconds (unknown keys for `negative_ttl`), so
    that the hot usage route does not query PostgreSQL per request. Entries are keyed by the key's
    SHA-256, never the key; the least recently used go first beyond `max_keys`.

    The price: a key revoked in api_keys keeps working until its entry expires.
    """

    def __init__(
        self,
        session_factory: Callable[[], AsyncSession],
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_factory = session_factory
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_keys = max_keys
        self.clock = clock
        self._entries: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        # One lookup per key at a time: when an entry expires under load, the requests that arrive
        # meanwhile wait for that lookup instead of each querying PostgreSQL. The lookup is a task of
        # its own, so a client that disconnects does not cancel it for the others.
        self._lookups: dict[str, asyncio.Task[str | None]] = {}

    async def customer_for(self, key: str) -> str | None:
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        digest = usage_key_hash(key)
        cached = self._entries.get(digest)
        if cached is not None and cached[1] > self.clock():
            self._entries.move_to_end(digest)
            return cached[0]
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = asyncio.create_task(self._lookup(key, digest))
            self._lookups[digest] = lookup
        return await asyncio.shield(lookup)

    async def _lookup(self, key: str, digest: str) -> str | None:
        try:
            async with self.session_factory() as session:
                customer_id = await usage_key_customer(session, key)
        finally:
            # A failure (PostgreSQL down: a 503 for every waiter) is not cached.
            del self._lookups[digest]
        expires = self.clock() + (self.ttl if customer_id is not None else self.negative_ttl)
        self._entries[digest] = (customer_id, expires)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
        return customer_id


def admin_not_configured(what: str = "Admin API", closed: str = "admin routes") -> ApiError:
    """The 503 of the admin routes (and of the console's pages) on a server without ADMIN_API_TOKEN."""
    return ApiError(
        f"{what} is not configured",
        f"ADMIN_API_TOKEN is not set on this server, so {closed} are closed",
        {"setting": "ADMIN_API_TOKEN"},
        status=503,
    )


async def authenticate(
    request: web.Request,
    settings: Settings,
    usage_keys: UsageKeyCache,
    allow_instance: bool,
    guesses: TokenGuesses,
    address: str,
) -> Principal:
    """The caller of an admin route (or, where `allow_instance`, of an instance route), or 401/403, or
    429 when `address` (a client address's bucket) or the server is out of tries for wrong tokens.

    A usage key comes in X-API-Key or, as instances with a generic HTTP client prefer, as the bearer
    token: on an instance route a bearer that is not the admin token is looked up as a usage key. An
    admin route looks up no bearer (a query per guess of the admin token): only the admin token opens it.
    """
    header_key = request.headers.get(API_KEY_HEADER)
    bearer = _bearer(request)
    # A bearer is a try of the admin token only where one is set (else it could not be right).
    tried = bearer is not None and settings.admin_api_token is not None
    refusal = guesses.attempt(address) if tried else None
    if tried and refusal is None and is_admin(request, settings):
        guesses.proved_right(address)
        return ADMIN
    key = header_key or (bearer if allow_instance else None)
    if key:
        customer_id = await usage_keys.customer_for(key)
        if customer_id is not None:
            if tried and refusal is None and not header_key:
                guesses.proved_right(address)  # the instance's key, not a guess of the admin token
            if not allow_instance:
                raise Forbidden(
                    "this route needs the admin token; a usage key may only reach its own customer"
                )
            return Principal("instance", customer_id)
    if refusal is not None:
        raise refusal
    if header_key:
        raise Unauthorized("the X-API-Key is not a known usage key")
    if settings.admin_api_token is None and not allow_instance:
        raise admin_not_configured()
    if bearer is not None and allow_instance:
        raise Unauthorized("the bearer token is neither the admin token nor a known usage key")
    if bearer is not None:
        raise Unauthorized("the bearer token is not the admin token, which this route needs")
    raise Unauthorized("send Authorization: Bearer <ADMIN_API_TOKEN>, or a usage key in X-API-Key")


def _hop_address(hop: str) -> IPv4Address | IPv6Address | None:
    """An X-Forwarded-For entry as an address: plain, bracketed, or with a port as some proxies write
    it (`192.0.2.1:5678`, `[2001:db8::1]`, `[2001:db8::1]:5678`), an IPv4-mapped one as its IPv4
    address (a dual-stack proxy's spelling, which no IPv4 network contains); None when it is neither."""
    hop = hop.strip()
    candidates: tuple[str, ...]
    if hop.startswith("["):
        inside, bracket, port = hop[1:].partition("]")
        candidates = (inside,) if bracket and (not port or port.startswith(":")) else ()
    else:
        candidates = (hop, hop.rsplit(":", 1)[0] if ":" in hop else "")
    for candidate in candidates:
        if candidate:
            try:
                address = ip_address(candidate)
            except ValueError:
                continue
            mapped = address.ipv4_mapped if isinstance(address, IPv6Address) else None
            return mapped or address
    return None


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPv4Network | IPv6Network]
) -> str:
    """The address a request's rate limit applies to. The peer, unless the peer is a trusted proxy;
    then X-Forwarded-For read from the right, skipping trusted proxies: the first other entry is what
    the last trusted proxy saw (a client can prepend anything, but not append). An entry that is no
    address ends the walk at the peer; so does a chain of trusted proxies only. Without trusted proxies
    the header is ignored."""

    if peer is None or not is_trusted_proxy(peer, trusted):
        return peer or "unknown"
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            return peer
        if not is_trusted_proxy(hop, trusted):
            return str(address)
    return peer


def address_bucket(address: str) -> str:
    """The key of a client address's rate limit: an IPv6 client is its /64, which a subscriber gets whole
    and takes fresh addresses from at will; an IPv4-mapped IPv6 address is its IPv4 address."""
    try:
        parsed = ip_address(address)
    except ValueError:
        return address  # "unknown", or a peer that is no IP address (a Unix socket)
    if isinstance(parsed, IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return f"{IPv6Address(int(parsed) >> 64 << 64)}/64"
    return str(parsed)


@cache  # the same few configured networks on every request: made once each
def _unmapped_network(network: IPv4Network | IPv6Network) -> IPv4Network | IPv6Network:
    """An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it maps: addresses are
    read IPv4-mapped as IPv4 (`_hop_address`), so only that form can hold them."""
    mapped = network.network_address.ipv4_mapped if isinstance(network, IPv6Network) else None
    if mapped is None or network.prefixlen < 96:
        return network
    return IPv4Network((mapped, network.prefixlen - 96))


def is_trusted_proxy(hop: str | None, trusted: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Whether an address (a peer, an X-Forwarded-For entry) is one of the trusted proxies: only their
    X-Forwarded-* headers are believed."""
    address = _hop_address(hop) if hop else None
    return address is not None and any(address in _unmapped_network(network) for network in trusted)


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

    def give_back(self, key: str) -> None:
        """The token a `take` that was allowed spent, returned: what it was spent on did not count."""
        bucket = self._buckets.get(key)
        if bucket is not None:  # dropped meanwhile: it comes back full anyway
            tokens, updated = bucket
            self._buckets[key] = (min(float(self.limit.burst), tokens + 1.0), updated)


# The key of TokenGuesses' bucket for the whole server.
_EVERY_ADDRESS: Final = ""


class TokenGuesses:
    """Tries of a token (a console sign-in, a bearer compared with the admin token) per client address and
    for the whole server, in buckets far smaller than the request limits: a right token costs no try, a
    wrong one costs one of its address's and one of the server's. The server's bucket bounds guesses
    from many addresses (and from addresses the buckets per address forgot), at the price of refusing
    every token, the right one too, while they go on.

    A try is spent before its token is compared and given back once it proves right, so that guesses
    sent at once are not all compared before the first of them has failed."""

    def __init__(
        self,
        per_address: RateLimit,
        overall: RateLimit,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.per_address = RateLimiter(per_address, clock, max_keys)
        self.overall = RateLimiter(overall, clock, max_keys=1)

    def attempt(self, address: str) -> TooManyRequests | None:
        """Spend a try from `address` (a client address's bucket): None when the token may be compared,
        else the 429 to answer, without comparing it."""
        wait = self.per_address.take(address)
        if wait is not None:
            return wrong_tokens(wait, "address")
        wait = self.overall.take(_EVERY_ADDRESS)
        if wait is not None:
            self.per_address.give_back(address)
            return wrong_tokens(wait, "server")
        return None

    def proved_right(self, address: str) -> None:
        """The try `attempt` spent gives way: its token was right."""
        self.per_address.give_back(address)
        self.overall.give_back(_EVERY_ADDRESS)


def throttled(retry_after: float, scope: str) -> TooManyRequests:
    seconds = max(1, math.ceil(retry_after))
    return TooManyRequests(
        "Too many requests",
        f"rate limit per {scope} exceeded; retry in {seconds} s",
        {"scope": scope, "retry_after": seconds},
        headers={"Retry-After": str(seconds)},
    )


def wrong_tokens(retry_after: float, scope: Literal["address", "server"]) -> TooManyRequests:
    """The 429 of TokenGuesses: it says that no token, the right one included, is compared until then."""
    seconds = max(1, math.ceil(retry_after))
    where, named = (
        ("from this address", "wrong tokens per address")
        if scope == "address"
        else ("on this server", "wrong tokens on this server")
    )
    return TooManyRequests(
        "Too many requests",
        f"too many wrong tokens {where}; retry in {seconds} s (no token is checked until then)",
        {"scope": named, "retry_after": seconds},
        headers={"Retry-After": str(seconds)},
    )


# The admin console's pages: this server's own script, styles and images, nothing inline, no other host.
CONSOLE_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, errors and aiohttp's own included."""
    if request.path.startswith("/admin"):
        response.headers.setdefault("Content-Security-Policy", CONSOLE_CSP)
        # no-referrer makes a browser send `Origin: null` with a form's POST: the console's same-origin
        # check needs its own origin there, and nothing leaves for another site either way.
        response.headers.setdefault("Referrer-Policy", "same-origin")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")


__all__ = [
    "ADMIN",
    "API_KEY_HEADER",
    "CONSOLE_CSP",
    "SECURITY_HEADERS",
    "Principal",
    "RateLimiter",
    "TokenGuesses",
    "UsageKeyCache",
    "add_security_headers",
    "address_bucket",
    "authenticate",
    "client_address",
    "instance_principal",
    "is_admin",
    "is_trusted_proxy",
    "throttled",
    "usage_key_customer",
    "wrong_tokens",
]
