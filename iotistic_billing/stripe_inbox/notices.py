"""The notices a Stripe event gives (pure): payment failed and recovered, subscription canceled, a trial
about to end. Written by the apply step in the event's own transaction, so an event applied twice (or
rolled back) notices once (or not at all)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from iotistic_billing.customer import PAID_STATUSES, RESTRICTED_FOR, SubscriptionSpec
from iotistic_billing.directory import CustomerRecord
from iotistic_billing.notices.content import (
    Notice,
    payment_failed,
    payment_recovered,
    subscription_canceled,
    trial_ending,
)
from iotistic_billing.stripe_inbox.events import (
    OVERDUE_STATUSES,
    SUBSCRIPTION_DELETED,
    TRIAL_WILL_END,
    Decision,
    invoice_id,
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
    restricted_for: timedelta = RESTRICTED_FOR,
) -> list[Notice]:
    """`previous`: the Customer's spec.subscription before this event; only an applied event notices
    (a stale or superseded one says nothing new about the subscription the Customer holds)."""
    applied = decision.subscription
    if decision.action != "apply" or applied is None:
        if not _trial_news(event_type, obj, previous, decision):
            return []
        # Made stale by a newer event of the subscription (a plan change applied first): the trial it
        # announces may still be ahead, and nothing else says so (its notice's key keeps it to one).
        applied = previous
    assert applied is not None
    about = {
        "customer_id": record.customer_id,
        "customer_name": record.name,
        "company": record.customer.spec.company_name,
    }
    when = datetime.fromtimestamp(created, UTC)
    identifier = object_id(obj) or str(created)
    notices = payment_notices(
        previous, applied, about, invoice_id(event_type, obj), when, portal_url, restricted_for
    )
    if event_type == SUBSCRIPTION_DELETED and applied.plan is not None:
        notices.append(
            subscription_canceled(
                **about, subscription_id=applied.stripe_subscription_id or identifier, status=applied.status
            )
        )
    ends_at = trial_end(obj)
    # As of the state applied: a late trial_will_end applied under a newer invoice (events.py) may come
    # after the trial it announces has ended.
    as_of = max(when, datetime.fromtimestamp(applied.last_event_created or 0, UTC))
    if event_type == TRIAL_WILL_END and ends_at is not None and ends_at > as_of:
        notices.append(trial_ending(**about, plan=applied.plan or "trial", ends_at=ends_at, now=as_of))
    return notices


def _trial_news(
    event_type: str, obj: Mapping[str, Any], previous: SubscriptionSpec | None, decision: Decision
) -> bool:
    """A stale trial_will_end of the trialing subscription the Customer holds, of the trial end it holds
    (one extended since announces an end no longer true)."""
    return (
        event_type == TRIAL_WILL_END
        and decision.action == "stale"
        and previous is not None
        and previous.status == "trialing"
        and previous.stripe_subscription_id == object_id(obj)
        and trial_end(obj) == previous.current_period_end
    )


def payment_notices(
    previous: SubscriptionSpec | None,
    applied: SubscriptionSpec,
    about: Mapping[str, str],
    invoice: str | None,
    when: datetime,
    portal_url: str | None,
    restricted_for: timedelta = RESTRICTED_FOR,
) -> list[Notice]:
    """From the subscription's status, whichever event moved it (Stripe sends an invoice's event and the
    subscription's in no set order, and the older of the two is stale): "payment failed" when it becomes
    past_due, "payment recovered" when it leaves past_due or unpaid for active. Both are keyed by the
    subscription and its pastDueSince, so one failure gives one of each, and a retried event, deciding
    from the same state, the same key. (Going straight to unpaid, the licence is suspended at once: the
    operator's `license.suspended` says so.) A subscription on no plan's price tells neither: the trial
    decides the licence whatever its payments (operator/entitlement.py), so no ladder runs."""
    subscription_id = applied.stripe_subscription_id
    if subscription_id is None or applied.plan is None:
        return []
    overdue = (
        previous
        if previous is not None
        and previous.stripe_subscription_id == subscription_id
        and previous.status in OVERDUE_STATUSES
        else None
    )
    if applied.status == "past_due" and overdue is None:
        since = applied.grace_started(when)
        return [
            payment_failed(
                restricted_for,
                **about,
                subscription_id=subscription_id,
                overdue_since=since,
                invoice_id=invoice,
                plan=applied.plan,
                portal_url=portal_url,
            )
        ]
    if applied.status in PAID_STATUSES and overdue is not None:
        return [
            payment_recovered(
                **about,
                subscription_id=subscription_id,
                overdue_since=overdue.grace_started(when),
                invoice_id=invoice,
                plan=applied.plan,
            )
        ]
    return []


__all__ = ["event_notices", "payment_notices"]
