"""The apply step of the Stripe inbox: what one stored event does to its Customer (spec.subscription,
by server-side apply under the Stripe field manager), the `subscriptions` row and the customer mirror,
all inside the inbox's transaction for that event, so that a failure leaves the event pending.

An event whose customer cannot be found is recorded as `unmatched` with a warning: its route answered
Stripe 200 already (an error would make Stripe retry it for days without any chance of success), and the
row keeps it for an operator to look at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from kubernetes.client.exceptions import ApiException
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import SubscriptionSpec
from iotistic_billing.db import models
from iotistic_billing.directory import CustomerRecord, Directory
from iotistic_billing.k8s import FieldManager, Kube
from iotistic_billing.notices.outbox import Outbox
from iotistic_billing.stripe_inbox.events import (
    CHECKOUT_COMPLETED,
    HANDLED_EVENT_TYPES,
    Decision,
    PriceCatalog,
    StripeEvent,
    SubscriptionFacts,
    decide,
    lookup_hints,
    subscription_facts,
)
from iotistic_billing.stripe_inbox.notices import event_notices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    result: str
    customer_id: str | None = None


@dataclass(frozen=True)
class EventApplier:
    """What applying an event needs: the Customers on the API server, the directory, the price catalog."""

    kube: Kube
    directory: Directory
    catalog: PriceCatalog
    outbox: Outbox = field(default_factory=Outbox)
    # Stripe's customer portal login link, for the "payment failed" notice.
    portal_url: str | None = None

    async def apply(self, session: AsyncSession, event: StripeEvent) -> Outcome:
        return await apply_event(self, session, event)


async def apply_event(deps: EventApplier, session: AsyncSession, event: StripeEvent) -> Outcome:
    """What the event does to its Customer, inside the caller's transaction (see inbox.py)."""
    if event.type not in HANDLED_EVENT_TYPES:
        log.info("stripe event %s: type %s is not handled; recorded", event.id, event.type)
        return Outcome("ignored")
    obj = event.data.object
    hints = lookup_hints(event.type, obj)
    directory = deps.directory
    found = await directory.resolve(
        session,
        customer_id=hints.customer_id,
        stripe_customer_id=hints.stripe_customer_id,
        subscription_id=hints.subscription_id,
    )
    if found is None:
        log.warning(
            "stripe event %s (%s) matches no Customer; acknowledged and recorded as unmatched",
            event.id,
            event.type,
        )
        return Outcome("unmatched")
    # One event at a time per Customer, across replicas: read, decide and apply must not interleave.
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"customer:{found.name}"))))
    record = await directory.by_name(found.name)
    if record is None:
        log.warning("stripe event %s: Customer %s is gone; recorded as unmatched", event.id, found.name)
        return Outcome("unmatched")

    link = hints.stripe_customer_id
    if (
        link is not None
        and event.type != CHECKOUT_COMPLETED
        and await directory.stripe_customer_id(session, record)
    ):
        link = None  # only a completed checkout moves an existing link to another Stripe customer
    await directory.remember(session, record, link)

    facts = subscription_facts(event.type, obj, deps.catalog)
    if facts is None:
        return Outcome("ignored", record.customer_id)
    row = await session.scalar(
        select(models.Subscription)
        .where(models.Subscription.stripe_subscription_id == facts.subscription_id)
        .with_for_update()
    )
    current = record.customer.spec.subscription
    decision = decide(
        current,
        row.last_event_created if row else None,
        replace(facts, started=facts.started or (row.stripe_created if row else None)),
        event.created,
        stored_status=row.status if row else None,
        current_started=await _started(session, current),
    )
    if decision.record_row:
        await _write_row(session, record, row, facts, decision, event.created)
    previous = record.customer.spec.subscription
    for notice in event_notices(event.type, obj, record, previous, decision, event.created, deps.portal_url):
        await deps.outbox.enqueue(session, notice, record.customer.spec)
    if decision.action == "apply" and decision.subscription is not None:
        try:
            await deps.kube.apply_customer_spec(
                record.name, {"subscription": decision.subscription.to_k8s()}, FieldManager.STRIPE
            )
        except ApiException as error:
            if error.status != 404:
                raise
            log.warning("stripe event %s: Customer %s deleted meanwhile; unmatched", event.id, record.name)
            return Outcome("unmatched", record.customer_id)
        return Outcome("applied", record.customer_id)
    if decision.action == "stale":
        log.info(
            "stripe event %s is older than the state applied for %s; not applied",
            event.id,
            facts.subscription_id,
        )
    return Outcome(decision.action, record.customer_id)


async def _started(session: AsyncSession, current: SubscriptionSpec | None) -> int | None:
    """When Stripe created the Customer's current subscription, as its row remembers it."""
    if current is None or current.stripe_subscription_id is None:
        return None
    started: int | None = await session.scalar(
        select(models.Subscription.stripe_created).where(
            models.Subscription.stripe_subscription_id == current.stripe_subscription_id
        )
    )
    return started


async def _write_row(
    session: AsyncSession,
    record: CustomerRecord,
    row: models.Subscription | None,
    facts: SubscriptionFacts,
    decision: Decision,
    created: int,
) -> None:
    """The subscription's row holds its newest known state, whether or not the Customer took it."""
    applied = decision.subscription
    values = {
        "customer_id": record.customer_id,
        "status": facts.status,
        "plan": applied.plan if applied else (facts.plan or (row.plan if row else None)),
        "current_period_end": (
            applied.current_period_end
            if applied
            else (facts.current_period_end or (row.current_period_end if row else None))
        ),
        "cancel_at_period_end": bool(
            applied.cancel_at_period_end
            if applied
            else (
                facts.cancel_at_period_end
                if facts.cancel_at_period_end is not None
                else (row.cancel_at_period_end if row else False)
            )
        ),
        "last_event_created": created,
        "stripe_created": facts.started or (row.stripe_created if row else None),
    }
    statement = insert(models.Subscription).values(stripe_subscription_id=facts.subscription_id, **values)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[models.Subscription.stripe_subscription_id],
            set_={**values, "updated_at": func.now()},
        )
    )


__all__ = ["EventApplier", "Outcome", "apply_event"]
