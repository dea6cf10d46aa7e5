"""Settings of the operator, the webhook server and the CLI: one class, read once at start-up."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Annotated, Final, Literal, get_args
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from iotistic_billing.customer import (
    CHART_VERSION_PATTERN,
    DNS_NAME_PATTERN,
    URL_PATTERN,
    webhook_url_problem,
)

OCI_PREFIX = "oci://"
_OCI_REFERENCE = re.compile(r"^oci://[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+$")
# As the customer-instance chart's billingUrl takes it (no white space): a BILLING_URL it refuses failed
# every Customer's helm run for good, so each URL setting is held to it.
_HTTP_URL = re.compile(URL_PATTERN)
# Stripe takes no meter event older than this (usage.metering.STRIPE_METER_WINDOW).
STRIPE_METER_WINDOW_SECONDS: Final = 35 * 24 * 3600
# The shortest NOTICE_RETENTION_DAYS: a usage notice's key is written again at each flush of its billing
# period (31 days at most), a trial-ending one's for TRIAL_NOTICE_DAYS (30 at most); a day more for clocks.
NOTICE_RETENTION_MIN_DAYS: Final = 32
# The shortest STRIPE_EVENT_RETENTION_DAYS: Stripe delivers an event again (its retries for 3 days, a
# resend from its Dashboard or CLI) only within the 30 days it keeps events; a day more for clocks. A
# pruned event's row no longer stops its redelivery (stripe_inbox/retention.py).
STRIPE_EVENT_RETENTION_MIN_DAYS: Final = 31
# The longest object name the API server takes (a DNS subdomain), as a ClusterKopfPeering's.
_MAX_OBJECT_NAME: Final = 253


def shard_peering(peering: str, shard: int) -> str:
    """The Kopf peering of one shard's operators (the ClusterKopfPeering's name): replicas of a shard
    pause each other, shards do not. Shard 0 keeps the unsharded name, so going from one operator to
    shards keeps its peering; "" (standalone) stays standalone."""
    return peering if shard == 0 or not peering else f"{peering}-shard-{shard}"


# A setting whose empty value would only fail later (licences no instance accepts, a URL of nothing):
# refused at the start.
NonEmptyStr = Annotated[str, Field(min_length=1)]


class SettingsError(ValueError):
    """Raised at start-up when an environment variable is missing or invalid; names the variable."""


def _refuse_edge_white_space(secret: SecretStr | None) -> None:
    """A secret read from a file keeps its last newline, and no client sends it: refused at the start."""
    if secret is not None and secret.get_secret_value() != secret.get_secret_value().strip():
        raise ValueError("must not start or end with white space (a file's last newline?)")


class Settings(BaseSettings):
    """Environment names follow the earlier system where they apply (`PORT`, `DATABASE_URL`,
    `STRIPE_*`, ...)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    port: Annotated[int, Field(ge=1, le=65535)] = 3100
    # Required by the operator, the webhook server and `iotistic-billing usage` (each says so when unset).
    database_url: str | None = None

    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    # Base URL of the Stripe API; tests and `make dev` point it at stripe-mock.
    stripe_api_base: NonEmptyStr = "https://api.stripe.com"
    stripe_price_starter: str | None = None
    stripe_price_professional: str | None = None
    stripe_price_enterprise: str | None = None
    # The metered prices of the usage overage (JSON list, one per meter): a checkout puts them on the
    # subscription beside the plan's price, as Stripe bills meter events only through a metered price
    # on the customer's subscription.
    stripe_metered_prices: list[NonEmptyStr] = Field(default_factory=list)

    license_private_key_path: Path | None = None
    license_public_key_path: Path | None = None
    # Extra public keys (PEM files) that still verify licences during a key rotation.
    license_extra_public_key_paths: list[Path] = Field(default_factory=list)
    license_issuer: NonEmptyStr = "https://billing.iotistic.cloud"
    license_audience: NonEmptyStr = "iotistic-instance"
    license_lifetime_days: Annotated[int, Field(ge=1, le=366)] = 30

    default_trial_days: Annotated[int, Field(ge=0, le=90)] = 14
    # <Customer name>.<BASE_DOMAIN> is the instance's domain, which the instance chart takes as a DNS name
    # only (63 for the name and its dot leave 189).
    base_domain: Annotated[str, Field(min_length=1, max_length=189, pattern=DNS_NAME_PATTERN)] = (
        "iotistic.cloud"
    )
    # The customer-instance chart: a chart directory, or an OCI reference `oci://host[:port]/path/name`
    # (no tag: the version is INSTANCE_CHART_VERSION, or a Customer's spec.instance.chartVersion).
    instance_chart: NonEmptyStr = "charts/customer-instance"
    # With an OCI chart: the version of every Customer without spec.instance.chartVersion (required).
    instance_chart_version: Annotated[str, Field(pattern=CHART_VERSION_PATTERN)] | None = None
    # The registry speaks plain HTTP (a local registry without TLS, as make dev's).
    instance_chart_plain_http: bool = False
    # The registry's credentials: a Docker config JSON (the `.dockerconfigjson` of a Secret of type
    # kubernetes.io/dockerconfigjson, mounted), given to `helm pull` as its registry config.
    instance_chart_registry_config: Path | None = None
    # How the fleet moves to a new INSTANCE_CHART_VERSION: `rollout`, only through InstanceRollouts (a
    # Customer keeps the version it runs); `immediate`, every unpinned Customer at once. A chart
    # directory has one version only, so with one the fleet always moves at once.
    instance_chart_upgrade: Literal["rollout", "immediate"] = "rollout"
    helm_binary: NonEmptyStr = "helm"
    helm_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    # Seconds a helm process may run before it is killed and its step retried: longer than helm's own
    # --timeout (5 minutes, which the operator leaves as it is), so a chart's hook that times out is
    # reported by helm itself.
    helm_timeout: Annotated[float, Field(ge=10, le=3600, allow_inf_nan=False)] = 360.0

    admin_api_token: SecretStr | None = None
    # The admin console's second role: signed in with it, a person may look but not act.
    admin_viewer_token: SecretStr | None = None
    # Seals the console's session cookies, the same on every replica. No token derives it: a cookie
    # sealed with a key derived from a token lets its holder test guesses of that token offline.
    console_session_key: SecretStr | None = None

    # The operator: liveness endpoint port, Kopf peering name ("" runs standalone) and priority.
    operator_liveness_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    operator_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 8081
    # The Pod's address the kubelet probes (the chart sets it from status.podIP): Kopf's liveness endpoint
    # listens on one address family, this one's (IPv4 when unset); every other listener takes both.
    pod_ip: IPv4Address | IPv6Address | None = None
    # The operator's Pod (the chart sets it from metadata.name), in BILLING_NAMESPACE: it labels helm's
    # release records, so that a pending revision whose Pod is gone is recovered at once (release.py).
    # A label value: 63 characters at most, as every Pod a Deployment makes.
    pod_name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=63)] | None = None
    # Its uid (the chart sets it from metadata.uid), labelled beside the name: a Pod of that name with
    # another uid is a later one (a StatefulSet's), told apart without comparing two machines' clocks.
    pod_uid: (
        Annotated[str, Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
        | None
    ) = None
    # json (structured, with the object and customer id) or text.
    log_format: Literal["json", "text"] = "json"
    # The webhook server's line a request at INFO (the probes and scrapes only when they fail): false
    # turns them off, as usage reports and console refreshes make hundreds of thousands a day.
    access_log: bool = True
    operator_peering: str = "iotistic-billing"
    operator_priority: int = 0
    # Sharding (docs/architecture.md, "Shards"): OPERATOR_SHARDS operators, this one owning the Customers
    # labelled iotistic.io/shard=<OPERATOR_SHARD>; shard 0 also owns those no other shard does.
    operator_shards: Annotated[int, Field(ge=1, le=64)] = 1
    operator_shard: Annotated[int, Field(ge=0)] = 0
    # Seconds between the housekeeping checks of each Customer (licence renewal, trial end): an hour at
    # most, as a licence of a day is renewed in its last eight hours; under half a second it spins.
    operator_timer_interval: Annotated[float, Field(ge=0.5, le=3600, allow_inf_nan=False)] = 60.0
    # Seconds a signup waits for the operator's licence before answering 202 (GET /api/licenses/{id}
    # has it later). Under the server's 30 s drain at shutdown (ServerOptions.shutdown_timeout): a
    # signup cut off there has made its Customer, and its retry would be a 409.
    signup_license_wait: Annotated[float, Field(ge=0, le=25, allow_inf_nan=False)] = 10.0
    # Webhook server rate limits, per client address and per API key: a token bucket.
    rate_limit_per_second: Annotated[float, Field(gt=0)] = 50.0
    rate_limit_burst: Annotated[int, Field(ge=1)] = 500
    # Wrong tokens (a console sign-in, a bearer that is not the admin token) a client address may send a
    # minute, and every address together: past either, no token is checked (429) until a try is back.
    wrong_tokens_per_minute: Annotated[int, Field(ge=1, le=1_000_000)] = 10
    wrong_tokens_per_minute_total: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    # Proxies in front of the webhook server (the ingress controller's pod range), as a JSON list of
    # CIDRs: for a request from one of them the client address is read from X-Forwarded-For.
    trusted_proxies: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    # Stripe events are applied after their 2xx by a process of their own beside each webhook server
    # (so that applying never slows the answers): how many Customers of a batch it applies at once (0: no
    # inbox here) and its health/metrics port (0: PORT + 1).
    stripe_inbox_workers: Annotated[int, Field(ge=0, le=64)] = 4
    stripe_inbox_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # Usage metering: seconds between status flushes (1 s to an hour) and between meter runs (a minute to
    # 12 hours: a run that lost the record of an event Stripe took sends it again the next run, and
    # Stripe refuses an identifier it holds for 24 hours only); usage-key cache TTL (an hour at most: a
    # revoked key works that long); seconds after its end before a period is closed (late reports of it
    # are still billed until then), which with a meter interval stays under Stripe's 35 days
    # (_meter_window).
    usage_flush_interval: Annotated[float, Field(ge=1, le=3600, allow_inf_nan=False)] = 10.0
    usage_meter_interval: Annotated[float, Field(ge=60, le=43200, allow_inf_nan=False)] = 3600.0
    usage_key_cache_ttl: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 30.0
    usage_close_grace: Annotated[float, Field(ge=0, lt=STRIPE_METER_WINDOW_SECONDS, allow_inf_nan=False)] = (
        3600.0
    )
    # Months raw usage reports are kept: older ones go with their month's partition of usage_reports,
    # never inside a billing period still open; rollups stay. At least 2 (a period is up to a month).
    usage_raw_retention: Annotated[int, Field(ge=2, le=1200)] = 13
    # Public URL of the webhook server, given to customer instances for usage reports.
    billing_url: NonEmptyStr = "http://localhost:3100"

    # Notices (docs/architecture.md, "Notices"): mail through this SMTP server (smtp:// or smtps://,
    # user:password@ when it wants them; unset: each mail's try fails saying so and its delivery ends dead,
    # as a failed webhook's does; webhooks still go), from this address.
    smtp_url: SecretStr | None = None
    notify_from: NonEmptyStr = "Iotistic Billing <billing@iotistic.cloud>"
    # The platform team's endpoint: every notice of every customer, signed with NOTIFY_WEBHOOK_SECRET.
    notify_webhook_url: str | None = None
    notify_webhook_secret: SecretStr | None = None
    # The non-public addresses (JSON list of CIDRs) customers' webhooks may go to: by default only
    # public ones, so that a Customer's URL reaches nothing inside the cluster (docs/architecture.md).
    notify_webhook_allowed_cidrs: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    # Where a customer whose payment failed updates the card: Stripe's customer portal login link.
    customer_portal_url: str | None = None
    # Days before a trial's end that its "trial ends" notice goes out (Stripe's trial_will_end: 3).
    trial_notice_days: Annotated[int, Field(ge=1, le=30)] = 3
    # Days of the restricted licence after a failed payment's grace (PAST_DUE_GRACE, 7 days), before the
    # customer falls back to the unlicensed feature set if Stripe has not ended the subscription first.
    dunning_restrict_days: Annotated[int, Field(ge=0, le=90)] = 14
    # A delivery that failed this many times is dead (the admin API sends it again on request).
    notify_max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    # Days a finished notice (each delivery sent or dead) is kept after its last try, then pruned by the
    # sender. At least NOTICE_RETENTION_MIN_DAYS: a notice's key must outlive the time its fact may be
    # written again, or the notice goes out again.
    notice_retention_days: Annotated[int, Field(ge=NOTICE_RETENTION_MIN_DAYS, le=36500)] = 90
    # Days a Stripe event applied, ignored, stale or superseded is kept after it was received and
    # recorded, then pruned by the inbox. At least STRIPE_EVENT_RETENTION_MIN_DAYS: its row is what keeps
    # a redelivery from being applied again.
    stripe_event_retention_days: Annotated[int, Field(ge=STRIPE_EVENT_RETENTION_MIN_DAYS, le=36500)] = 90
    # The namespace the operator and the webhook server run in (the chart sets it from the Pod's own):
    # where a deleted Customer's webhook signing secret is kept while its deliveries are pending.
    billing_namespace: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)] = (
        "default"
    )

    @field_validator("admin_api_token", "admin_viewer_token")
    @classmethod
    def _admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        # The server strips the token a client sends: one kept with its newline never matched (all 401).
        _refuse_edge_white_space(value)
        return value

    @field_validator("stripe_secret_key", "stripe_webhook_secret")
    @classmethod
    def _stripe_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Set but empty (`STRIPE_SECRET_KEY=` in a file) counted as set, and Stripe's 401 came later.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty (leave it unset to run without Stripe)")
        _refuse_edge_white_space(value)
        return value

    @field_validator("license_private_key_path", "license_public_key_path", mode="before")
    @classmethod
    def _key_path(cls, value: object) -> object:
        # Set but empty was Path("."), the working directory, refused only when the key was read.
        if value == "":
            raise ValueError("must not be empty (leave it unset for no key file)")
        return value

    @field_validator("console_session_key")
    @classmethod
    def _session_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        key = value.get_secret_value()
        if len(key) < 32:
            raise ValueError(f"must be at least 32 characters (`openssl rand -base64 32`), got {len(key)}")
        if any(character.isspace() for character in key):
            raise ValueError("must hold no spaces or line breaks (a file's last newline?)")
        tokens = (info.data.get("admin_api_token"), info.data.get("admin_viewer_token"))
        if any(token is not None and token.get_secret_value() == key for token in tokens):
            raise ValueError("must be a secret of its own, not ADMIN_API_TOKEN or ADMIN_VIEWER_TOKEN")
        return value

    @field_validator("pod_ip", mode="before")
    @classmethod
    def _pod_ip(cls, value: object) -> object:
        if value is None or value == "":  # a Pod without its address yet: as unset
            return None
        try:
            return ip_address(str(value))
        except ValueError:
            raise ValueError("must be an IPv4 or IPv6 address") from None

    @field_validator("trusted_proxies", "notify_webhook_allowed_cidrs", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        networks = []
        for entry in value:
            try:
                networks.append(ip_network(str(entry)))
            except ValueError as error:
                raise ValueError(f"{entry!r} is not a network in CIDR form ({error})") from None
        return networks

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgres(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
            ("postgresql://", "postgres://", "postgresql+asyncpg://")
        ):
            raise ValueError("must be a postgresql:// URL")
        # Said at start, not by the first connection (the operator's migration, a traceback then).
        problem = None if value is None else database_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("smtp://", "smtps://")):
            raise ValueError("must be an smtp:// or smtps:// URL")
        return value

    @field_validator("billing_url", "notify_webhook_url", "customer_portal_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not _HTTP_URL.fullmatch(value):
            raise ValueError("must be an http:// or https:// URL without white space")
        return value

    @field_validator("notify_webhook_url")
    @classmethod
    def _webhook_host(cls, value: str | None) -> str | None:
        problem = webhook_url_problem(value) if value is not None else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("notify_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            webhook_secret_bytes(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _metered_prices_are_not_plans(self) -> Settings:
        plans = {
            "STRIPE_PRICE_STARTER": self.stripe_price_starter,
            "STRIPE_PRICE_PROFESSIONAL": self.stripe_price_professional,
            "STRIPE_PRICE_ENTERPRISE": self.stripe_price_enterprise,
        }
        for index, price in enumerate(self.stripe_metered_prices):
            plan = next((name for name, plan_price in plans.items() if plan_price == price), None)
            if plan is not None:
                raise ValueError(
                    f"STRIPE_METERED_PRICES: {price} is {plan}, a plan's price, not a metered one"
                )
            if price in self.stripe_metered_prices[:index]:
                raise ValueError(f"STRIPE_METERED_PRICES: {price} is listed twice")
        return self

    @model_validator(mode="after")
    def _pod_uid_has_its_name(self) -> Settings:
        if self.pod_uid is not None and self.pod_name is None:
            raise ValueError("POD_UID: set without POD_NAME (the Pod is read by its name)")
        return self

    @model_validator(mode="after")
    def _viewer_is_not_admin(self) -> Settings:
        admin, viewer = self.admin_api_token, self.admin_viewer_token
        if admin is not None and viewer is not None and admin.get_secret_value() == viewer.get_secret_value():
            raise ValueError("ADMIN_VIEWER_TOKEN: must differ from ADMIN_API_TOKEN (the viewer may not act)")
        return self

    @field_validator("instance_chart")
    @classmethod
    def _chart_reference(cls, value: str) -> str:
        if value.startswith(OCI_PREFIX) and not _OCI_REFERENCE.match(value):
            raise ValueError(
                "must be a chart directory or oci://<registry>/<path>/<chart> without a tag or digest"
            )
        return value

    @model_validator(mode="after")
    def _oci_chart_has_a_fleet_version(self) -> Settings:
        if self.instance_chart.startswith(OCI_PREFIX) and self.instance_chart_version is None:
            raise ValueError(
                "INSTANCE_CHART_VERSION: required with an oci:// INSTANCE_CHART (the version the fleet runs)"
            )
        return self

    @field_validator("instance_chart_registry_config")
    @classmethod
    def _registry_config(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        try:
            config = json.loads(value.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot read {value} as a Docker config JSON ({type(error).__name__})"
            ) from None
        if not isinstance(config, dict) or not isinstance(config.get("auths"), dict):
            raise ValueError(f'{value} has no "auths" object (a .dockerconfigjson has one)')
        return value

    @model_validator(mode="after")
    def _shard_is_one_of_the_shards(self) -> Settings:
        if self.operator_shard >= self.operator_shards:
            raise ValueError(
                f"OPERATOR_SHARD: must be below OPERATOR_SHARDS ({self.operator_shards}), "
                f"got {self.operator_shard}"
            )
        return self

    @model_validator(mode="after")
    def _operator_ports_differ(self) -> Settings:
        # Both are served by the one operator process: the second bind died with EADDRINUSE naming neither.
        port = self.operator_liveness_port
        if port and port == self.operator_metrics_port:
            raise ValueError(f"OPERATOR_LIVENESS_PORT: must differ from OPERATOR_METRICS_PORT (both {port})")
        return self

    @model_validator(mode="after")
    def _peering_is_an_object_name(self) -> Settings:
        # The name of the ClusterKopfPeering ensure_peering creates, the longest the last shard's:
        # one the API server refuses was a 422 and a traceback at start.
        name = self.operator_peering
        if not name:  # standalone
            return self
        if not re.fullmatch(DNS_NAME_PATTERN, name):
            raise ValueError(
                "OPERATOR_PEERING: must be a lowercase DNS subdomain (letters, digits, '-' and '.'; the"
                f" ClusterKopfPeering's name), got {name!r}"
            )
        suffix = shard_peering(name, self.operator_shards - 1)[len(name) :]
        if len(name) + len(suffix) > _MAX_OBJECT_NAME:
            why = (
                f" with OPERATOR_SHARDS={self.operator_shards} (the last shard adds {suffix})"
                if suffix
                else ""
            )
            raise ValueError(
                f"OPERATOR_PEERING: at most {_MAX_OBJECT_NAME - len(suffix)} characters{why}, got {len(name)}"
            )
        return self

    @model_validator(mode="after")
    def _meter_window(self) -> Settings:
        # A period is metered up to the grace and a meter interval after its end: at Stripe's 35 days its
        # events are past what Stripe takes, given up, and billed in no invoice.
        late = self.usage_close_grace + self.usage_meter_interval
        if late >= STRIPE_METER_WINDOW_SECONDS:
            raise ValueError(
                "USAGE_CLOSE_GRACE: with USAGE_METER_INTERVAL it must stay under Stripe's 35 days"
                f" ({STRIPE_METER_WINDOW_SECONDS} s) of meter events, got {self.usage_close_grace:g} s"
                f" + {self.usage_meter_interval:g} s"
            )
        return self

    @model_validator(mode="after")
    def _platform_webhook_is_signed(self) -> Settings:
        if self.notify_webhook_url is not None and self.notify_webhook_secret is None:
            raise ValueError(
                "NOTIFY_WEBHOOK_SECRET: required when NOTIFY_WEBHOOK_URL is set (webhooks are signed)"
            )
        return self

    @property
    def lifetime(self) -> timedelta:
        """Lifetime of a licence (a trial licence ends with its trial, sooner, and that of a subscription set
        to cancel at its period's end with the period)."""
        return timedelta(days=self.license_lifetime_days)

    @property
    def stripe_configured(self) -> bool:
        return self.stripe_secret_key is not None

    @property
    def stripe_livemode(self) -> bool | None:
        """The Stripe mode of STRIPE_SECRET_KEY (sk_live_/rk_live_: live; sk_test_/rk_test_: test), whose
        events alone the inbox applies; None (no key, or one of no known kind): every event."""
        key = self.stripe_secret_key.get_secret_value() if self.stripe_secret_key else ""
        modes = {"sk_live_": True, "rk_live_": True, "sk_test_": False, "rk_test_": False}
        return next((live for prefix, live in modes.items() if key.startswith(prefix)), None)

    def start_warnings(self) -> list[str]:
        """Settings that are valid, and may be meant, but that a server logs as a WARNING at its start
        for what they do (found in review: none was said, and the overage looked billed)."""
        warnings = []
        plan_prices = (
            self.stripe_price_starter,
            self.stripe_price_professional,
            self.stripe_price_enterprise,
        )
        if self.stripe_configured and any(plan_prices) and not self.stripe_metered_prices:
            warnings.append(
                "STRIPE_METERED_PRICES is empty: checkouts make subscriptions without the metered prices of"
                " the usage overage, so Stripe takes every overage meter event (marked metered) and invoices"
                " none of it, while the API and console show it billed; list the overage's metered prices,"
                " unless the plans are meant to bill no overage"
            )
        return warnings

    def key_path_setting(self, path: Path | None) -> str:
        """The variable a licence key file came from, to name it in an error about that file."""
        if path is not None and path == self.license_public_key_path:
            return "LICENSE_PUBLIC_KEY_PATH"
        if path is not None and path in self.license_extra_public_key_paths:
            return "LICENSE_EXTRA_PUBLIC_KEY_PATHS"
        return "LICENSE_PRIVATE_KEY_PATH"


# libpq's TLS modes: DATABASE_URL's `sslmode` (`ssl` its synonym), which every database client reads alike.
SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def database_url_problem(url: str) -> str | None:
    """What makes a postgresql:// URL unreadable to the database clients, or None: a port or host they
    cannot parse (an unencoded `/ ? # @` in the password), a TLS mode libpq does not know, or two."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as error:
        return (
            f"cannot be read as a URL ({error}): percent-encode / ? # @ : [ ] in the user name and password"
        )
    given = {
        name: value
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name in ("ssl", "sslmode")
    }
    for name, value in given.items():
        if value not in SSL_MODES:
            return f"{name} must be one of {', '.join(SSL_MODES)}, got {value!r}"
    if len(set(given.values())) > 1:
        return f"ssl and sslmode differ ({given['ssl']!r}, {given['sslmode']!r}): give sslmode alone"
    return None


def webhook_secret_bytes(secret: str) -> bytes:
    """The key of a Standard Webhooks secret: `whsec_` and base64, or the bare base64; at least 24
    bytes (the specification's minimum) and at most 1024 (it asks for 64 at most; a deleted Customer's
    copy shares one Secret with the others', which holds 1 MiB in all)."""
    encoded = secret.removeprefix("whsec_").strip()
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("must be whsec_ and base64 (Standard Webhooks)") from None
    if len(key) < 24:
        raise ValueError(f"must hold at least 24 bytes, holds {len(key)}")
    if len(key) > 1024:
        raise ValueError(f"must hold at most 1024 bytes, holds {len(key)}")
    return key


# Settings whose value is a credential (SMTP_URL and DATABASE_URL carry passwords): never echoed.
_SECRET_SETTINGS: Final = frozenset(
    name.upper()
    for name, field in Settings.model_fields.items()
    if SecretStr in (field.annotation, *get_args(field.annotation))
)


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a bad value raises SettingsError naming each offending variable."""
    if "HELM_CHART_PATH" in os.environ:  # an earlier name: ignored silently, it would install the default
        raise SettingsError("invalid settings: HELM_CHART_PATH: renamed INSTANCE_CHART (a path or oci://)")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SourceError as exc:  # a list setting that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        variable = field.group(1).upper() if field else "settings"
        example = '["a", "b"]'
        raise SettingsError(f"invalid settings: {variable}: must be a JSON list, like {example}") from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a rule across settings: its message names them; the input is all of them
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            # A list's item is (name, index): the variable and which item, not a variable `<NAME>_0`.
            name, *items = error["loc"]
            variable = str(name).upper() + "".join(f": item {item}" for item in items)
            secret = str(name).upper() in _SECRET_SETTINGS or any(
                word in variable for word in ("SECRET", "TOKEN", "KEY", "PASSWORD", "DATABASE_URL")
            )
            shown = "" if secret else f" (got {error.get('input')!r})"
            problems.append(f"{variable}: {str(error['msg']).removeprefix('Value error, ')}{shown}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
