"""Tunables of the webhook server that are not product settings: limits and waits, with safe defaults.

Kept apart from Settings so that tests can build an app with a tiny rate limit or no licence wait.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `burst` requests at once, refilled at `per_second`."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1:
            raise ValueError(f"rate limit needs per_second > 0 and burst >= 1, got {self}")

    @classmethod
    def per_minute(cls, count: int) -> RateLimit:
        """`count` at once, and as many again each minute."""
        return cls(per_second=count / 60, burst=count)


@dataclass(frozen=True)
class ServerOptions:
    # Larger bodies are refused with 413 before a handler sees them (Stripe events are a few KiB).
    client_max_size: int = 256 * 1024
    # Generous: a busy admin script or Stripe's retries after an outage are not throttled.
    rate_per_address: RateLimit = field(default_factory=lambda: RateLimit(per_second=50.0, burst=500))
    rate_per_key: RateLimit = field(default_factory=lambda: RateLimit(per_second=50.0, burst=500))
    # Wrong tokens (a console sign-in, a bearer that is not the admin token) per client address, and from
    # every address together (WRONG_TOKENS_PER_MINUTE, WRONG_TOKENS_PER_MINUTE_TOTAL). A person mistyping
    # is not throttled; a script guessing ADMIN_API_TOKEN or ADMIN_VIEWER_TOKEN tries 14,400 a day from one
    # address instead of the request limit's 4 million. A right token costs no try.
    wrong_tokens_per_address: RateLimit = field(default_factory=lambda: RateLimit.per_minute(10))
    wrong_tokens: RateLimit = field(default_factory=lambda: RateLimit.per_minute(100))
    # Behind an ingress every request comes from the ingress controller: the limit per address applies
    # to the client that X-Forwarded-For names when the request comes from one of these networks.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    # How long signup waits for the operator's licence before answering 202 with a Location.
    license_wait: float = 10.0
    license_poll_interval: float = 0.25
    # Per call to the API server, so that a hung connection becomes a 503 rather than a hung request.
    kube_timeout: float = 10.0
    kube_concurrency: int = 16
    # Workers of this app's Stripe inbox; the server process runs none (a process of its own applies).
    inbox_workers: int = 4
    # Workers sending notices, where the inbox runs.
    notice_workers: int = 2
    # The inbox process: only /healthz, /readyz and /metrics on its port (no API beside the server's).
    probes_only: bool = False
    # In-flight requests get this long to finish after SIGTERM.
    shutdown_timeout: float = 30.0
    # Seconds between a refreshing console page's answer handled and its next refresh (its main part
    # fetched again): a phase change shows within this. The browser tests refresh faster.
    console_refresh: float = 2.0
