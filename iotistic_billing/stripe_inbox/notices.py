"""The notices a Stripe event gives (pure): payment failed and recovered, subscription canceled, a trial
about to end. Written by the apply step in the event's own transaction, so an event applied twice (or
rolled back) notices once (or not at all)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from iotistic_billing.customer import PAST_DUE_GRACE, SubscriptionSpec
from iotistic_billing.directory import CustomerRecord
from iotistic_billing.notices.content import (
    Notice,
    payment_failed,
    payment_recovered,
    subscription_canceled,
    trial_ending,
)
from iotistic_billing.stripe_inbox.events import (
    INVOICE_FAILED,
    INVOICE_PAID_EVENTS,
    SUBSCRIPTION_DELETED,
    TRIAL_WILL_END,
    Decision,
    object_id,
    trial_end,
)


def event_notices(
    event_type: str,
    obj: Mapping[str, Any],
    record: CustomerRecord,
    previous: SubscriptionSpec | None,
    decision: Decision,
    created: int,
    portal_url: str | None,
) -> list[Notice]:
    """`previous`: the Customer's spec.subscription before this event; only an applied event notices
    (a stale or superseded one says nothing new about the subscription the Customer holds)."""
    applied = decision.subscription
    if decision.action != "apply" or applied is None:
        return []
    about = {
        "customer_id": record.customer_id,
        "customer_name": record.name,
        "company": record.customer.spec.company_name,
    }
    when = datetime.fromtimestamp(created, UTC)
    identifier = object_id(obj) or str(created)
    if event_type == INVOICE_FAILED and applied.status == "past_due":
        return [
            payment_failed(
                **about,
                invoice_id=identifier,
                plan=applied.plan,
                # The operator's rule (operator/entitlement.py): the first failed payment, not the period.
                restricted_at=applied.grace_started(when) + PAST_DUE_GRACE,
                portal_url=portal_url,
            )
        ]
    if (
        event_type in INVOICE_PAID_EVENTS
        and previous is not None
        and previous.status in ("past_due", "unpaid")
    ):
        return [payment_recovered(**about, invoice_id=identifier, plan=applied.plan)]
    if event_type == SUBSCRIPTION_DELETED:
        return [
            subscription_canceled(
                **about, subscription_id=applied.stripe_subscription_id or identifier, status=applied.status
            )
        ]
    ends_at = trial_end(obj)
    if event_type == TRIAL_WILL_END and ends_at is not None and ends_at > when:
        return [trial_ending(**about, plan=applied.plan or "trial", ends_at=ends_at, now=when)]
    return []


__all__ = ["event_notices"]
