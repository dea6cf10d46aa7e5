"""What each notice says and to whom (pure): its kind, idempotency key, subject and facts, and the
targets a Customer's spec and the platform's settings give it. docs/architecture.md, "Notices"."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from iotistic_billing.customer import CustomerSpec, NotificationsSpec, dunning_dates
from iotistic_billing.licensing.plans import UNLIMITED, plan_by_name


class NoticeKind(StrEnum):
    """The `type` of a webhook body; the templates' name of the notice."""

    TRIAL_ENDING = "trial.ending"
    TRIAL_ENDED = "trial.ended"
    PAYMENT_FAILED = "payment.failed"
    PAYMENT_RECOVERED = "payment.recovered"
    SUBSCRIPTION_CANCELED = "subscription.canceled"
    LICENSE_SUSPENDED = "license.suspended"
    LICENSE_REINSTATED = "license.reinstated"
    LICENSE_REVOKED = "license.revoked"
    ACCESS_RESTRICTED = "access.restricted"
    USAGE_THRESHOLD = "usage.threshold"


class Channel(StrEnum):
    EMAIL = "email"
    WEBHOOK = "webhook"  # the customer's own endpoint (spec.notifications.webhook)
    PLATFORM = "platform"  # the platform team's endpoint (NOTIFY_WEBHOOK_URL)


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    customer_id: str
    customer_name: str  # the Customer resource's name: its namespace holds the webhook secret
    # Written once: a second notice with the same key (a retried step, a replayed report) is no notice.
    key: str
    subject: str
    # What the mail says, paragraph by paragraph, and what the templates and the webhook body show.
    lines: tuple[str, ...]
    facts: Mapping[str, Any] = field(default_factory=dict)
    links: Mapping[str, str] = field(default_factory=dict)

    def to_facts(self) -> dict[str, Any]:
        """The stored facts: everything a template or a webhook body shows, as JSON."""
        return {"lines": list(self.lines), "links": dict(self.links), **self.facts}


@dataclass(frozen=True)
class Target:
    channel: Channel
    target: str  # an email address, or an endpoint URL


def targets_for(spec: CustomerSpec, platform_webhook_url: str | None) -> list[Target]:
    """spec.email and spec.notifications.emails by mail (each once), the customer's endpoint, the
    platform team's endpoint."""
    addresses = dict.fromkeys(address.lower() for address in [spec.email, *(spec.notifications.emails or [])])
    targets = [Target(Channel.EMAIL, address) for address in addresses]
    if (url := webhook_url(spec.notifications)) is not None:
        targets.append(Target(Channel.WEBHOOK, url))
    if platform_webhook_url:
        targets.append(Target(Channel.PLATFORM, platform_webhook_url))
    return targets


def webhook_url(notifications: NotificationsSpec) -> str | None:
    """The URL of the customer's own webhook (spec.notifications.webhook), None when it names none: where
    a delivery of the channel goes when written, and again before each try and at a re-send, as the
    customer may have moved it or taken it away since."""
    return notifications.webhook.url if notifications.webhook is not None else None


def message_id(notice_key: str, target: Target) -> str:
    """The delivery's id, the same on every try: the webhook's webhook-id, the mail's Message-ID."""
    digest = hashlib.sha256(f"{notice_key}\n{target.channel}\n{target.target}".encode()).hexdigest()
    return "msg_" + digest[:32]


def _day(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def _moment(moment: datetime) -> str:
    """A deadline in a notice's text: its time and zone too (a day alone, in UTC, read as the end of
    that day where the customer is, hours after the access ended)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def plan_facts(plan_name: str) -> dict[str, Any]:
    """The plan's facts a notice shows: its name, price, and what it includes."""
    plan = plan_by_name(plan_name, allow_unlicensed=True)

    def shown(value: int) -> int | str:
        return "unlimited" if value == UNLIMITED else value

    return {
        "plan": plan.name,
        "plan_name": plan.display_name,
        "monthly_price": (
            "custom" if plan.monthly_price_cents is None else f"${plan.monthly_price_cents / 100:.2f}"
        ),
        "max_devices": shown(plan.features.max_devices),
        "included_traffic_gb": shown(plan.included.traffic_gb),
        "included_storage_gb": shown(plan.included.storage_gb),
    }


def trial_ending(
    *, customer_id: str, customer_name: str, company: str, plan: str, ends_at: datetime, now: datetime
) -> Notice:
    # Days begun, as a calendar counts them: 2 days 23 hours left is "in 3 days", 5 hours "in 1 day".
    days = max(0, math.ceil((ends_at - now) / timedelta(days=1)))
    in_days = f"in {days} day" if days == 1 else f"in {days} days"
    return Notice(
        NoticeKind.TRIAL_ENDING,
        customer_id,
        customer_name,
        key=f"trial-ending:{customer_id}:{_stamp(ends_at)}",
        subject=f"Your Iotistic trial ends on {_day(ends_at)}",
        lines=(
            f"Hello {company},",
            f"your trial of the Iotistic platform ends on {_moment(ends_at)}, {in_days}.",
            "Choose a plan before then to keep your devices connected and your data.",
        ),
        facts={"trial_ends_at": _iso(ends_at), "days_left": days, **plan_facts(plan)},
    )


def trial_ended(*, customer_id: str, customer_name: str, company: str, ends_at: datetime) -> Notice:
    return Notice(
        NoticeKind.TRIAL_ENDED,
        customer_id,
        customer_name,
        key=f"trial-ended:{customer_id}:{_stamp(ends_at)}",
        subject="Your Iotistic trial has ended",
        lines=(
            f"Hello {company},",
            f"your trial ended on {_day(ends_at)}. Your instance now runs with the unlicensed feature set.",
            "Choose a plan to get your devices and features back.",
        ),
        facts={"trial_ended_at": _iso(ends_at), **plan_facts("unlicensed")},
    )


def payment_failed(
    restricted_for: timedelta,
    /,
    *,
    customer_id: str,
    customer_name: str,
    company: str,
    subscription_id: str,
    overdue_since: datetime,
    invoice_id: str | None,
    plan: str | None,
    portal_url: str | None,
) -> Notice:
    """The subscription became past_due: keyed by the subscription and when (its pastDueSince), not by
    the event that said so, as an invoice's event and the subscription's may come in either order. The
    dates are the licence's (dunning_dates, `restricted_for`: DUNNING_RESTRICT_DAYS); it is positional so
    that a caller's `**about` (str values) is not taken, by mypy, to fill it."""
    dates = dunning_dates(overdue_since, restricted_for)
    if restricted_for:
        ladder = (
            f"Your instance keeps full access until {_moment(dates.restricted_at)}; after that it is "
            "restricted (no device can be added, data cannot be exported), and on "
            f"{_moment(dates.suspended_at)} your licence is suspended (the unlicensed feature set), unless "
            "the payment succeeds first."
        )
    else:  # no restriction period: straight from full access to the unlicensed feature set
        ladder = (
            f"Your instance keeps full access until {_moment(dates.suspended_at)}; after that your licence "
            "is suspended (the unlicensed feature set), unless the payment succeeds first."
        )
    return Notice(
        NoticeKind.PAYMENT_FAILED,
        customer_id,
        customer_name,
        key=f"payment-failed:{customer_id}:{subscription_id}:{_stamp(overdue_since)}",
        subject="Your Iotistic payment failed",
        lines=(
            f"Hello {company},",
            "we could not collect your last payment.",
            ladder,
            "Please update your payment method.",
        ),
        facts={
            "subscription_id": subscription_id,
            **({"invoice_id": invoice_id} if invoice_id else {}),  # the event may not name one
            "past_due_since": _iso(overdue_since),
            **({"restricted_at": _iso(dates.restricted_at)} if restricted_for else {}),
            "suspended_at": _iso(dates.suspended_at),
            **plan_facts(plan or "unlicensed"),
        },
        links={"customer_portal": portal_url} if portal_url else {},
    )


def payment_recovered(
    *,
    customer_id: str,
    customer_name: str,
    company: str,
    subscription_id: str,
    overdue_since: datetime,
    invoice_id: str | None,
    plan: str | None,
) -> Notice:
    """The subscription left past_due or unpaid for active: keyed as the failure it ends."""
    return Notice(
        NoticeKind.PAYMENT_RECOVERED,
        customer_id,
        customer_name,
        key=f"payment-recovered:{customer_id}:{subscription_id}:{_stamp(overdue_since)}",
        subject="Your Iotistic payment went through",
        lines=(f"Hello {company},", "thank you: your payment succeeded and your plan is fully back."),
        facts={
            "subscription_id": subscription_id,
            **({"invoice_id": invoice_id} if invoice_id else {}),  # the event may not name one
            "past_due_since": _iso(overdue_since),
            **plan_facts(plan or "unlicensed"),
        },
    )


def subscription_canceled(
    *, customer_id: str, customer_name: str, company: str, subscription_id: str, status: str
) -> Notice:
    return Notice(
        NoticeKind.SUBSCRIPTION_CANCELED,
        customer_id,
        customer_name,
        key=f"subscription-canceled:{customer_id}:{subscription_id}",
        subject="Your Iotistic subscription has ended",
        lines=(
            f"Hello {company},",
            "your subscription has ended. Your instance now runs with the unlicensed feature set.",
        ),
        facts={"subscription_id": subscription_id, "subscription_status": status},
    )


_LICENSE_WORDS = {
    NoticeKind.LICENSE_SUSPENDED: ("suspended", "Your Iotistic licence is suspended"),
    NoticeKind.LICENSE_REINSTATED: ("reinstated", "Your Iotistic licence is reinstated"),
    NoticeKind.LICENSE_REVOKED: ("revoked", "Your Iotistic licence was revoked"),
}


def license_changed(
    kind: NoticeKind, *, customer_id: str, customer_name: str, company: str, jti: str, plan: str, reason: str
) -> Notice:
    """Suspended, reinstated or revoked: keyed by the licence (its jti) and what happened to it."""
    word, subject = _LICENSE_WORDS[kind]
    return Notice(
        kind,
        customer_id,
        customer_name,
        key=f"license-{word}:{customer_id}:{jti}",
        subject=subject,
        lines=(f"Hello {company},", f"your licence was {word}: {reason}."),
        facts={"license_id": jti, "reason": reason, **plan_facts(plan)},
    )


def access_restricted(
    *, customer_id: str, customer_name: str, company: str, jti: str, plan: str, suspended_at: datetime
) -> Notice:
    """The dunning ladder's second step: the payment is still overdue after its grace."""
    return Notice(
        NoticeKind.ACCESS_RESTRICTED,
        customer_id,
        customer_name,
        key=f"access-restricted:{customer_id}:{jti}",
        subject="Your Iotistic access is restricted",
        lines=(
            f"Hello {company},",
            "your payment is still overdue: your instance is now restricted. Your devices keep working, "
            "but no device can be added and data cannot be exported.",
            f"Unless the payment succeeds, your licence is suspended on {_moment(suspended_at)}.",
        ),
        facts={"license_id": jti, "suspended_at": _iso(suspended_at), **plan_facts(plan)},
    )


# The quota metrics of a plan (licensing.plans.IncludedUsage) as thresholds name them.
USAGE_METRIC_WORDS = {
    "devices": "devices",
    "trafficGb": "traffic (GB)",
    "storageGb": "storage (GB-months)",
    "apiCalls": "API calls",
}


def usage_threshold(
    *,
    customer_id: str,
    customer_name: str,
    company: str,
    period_start: datetime,
    metric: str,
    threshold: str,
    used: int | float,
    limit: int | float,
) -> Notice:
    """`threshold`: `80%` or `100%` of the plan's quota, or an absolute value the Customer set."""
    words = USAGE_METRIC_WORDS[metric]
    return Notice(
        NoticeKind.USAGE_THRESHOLD,
        customer_id,
        customer_name,
        # The limit too: after a plan change within the period, 100% of the new quota is news.
        key=f"usage:{customer_id}:{_stamp(period_start)}:{metric}:{threshold}:{limit}",
        subject=f"Iotistic usage: {words} reached {threshold}",
        lines=(
            f"Hello {company},",
            f"your {words} in the billing period that started {_day(period_start)} reached {threshold} "
            f"({used} of {limit}).",
        ),
        facts={
            "metric": metric,
            "threshold": threshold,
            "used": used,
            "limit": limit,
            "period_start": _iso(period_start),
        },
    )


__all__ = [
    "USAGE_METRIC_WORDS",
    "Channel",
    "Notice",
    "NoticeKind",
    "Target",
    "access_restricted",
    "license_changed",
    "message_id",
    "payment_failed",
    "payment_recovered",
    "plan_facts",
    "subscription_canceled",
    "targets_for",
    "trial_ended",
    "trial_ending",
    "usage_threshold",
    "webhook_url",
]
