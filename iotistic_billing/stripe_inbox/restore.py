"""Giving a Customer made again its Stripe subscription back.

Manifests never carry spec.subscription (the inbox owns it), so a Customer billed through Stripe that is
deleted and made again under its customer id (a cluster rebuilt from Git, `kubectl delete` then apply,
Argo CD's replace) holds none, while Stripe still bills it and its `subscriptions` rows still hold the
state: it would fall back to its trial, and a checkout would be refused (the live subscription). The
inbox looks for such Customers at its start and every RESTORE_SECONDS (one list of the Customers, and
one query of rows when some hold none) and gives each the newest live subscription on a plan of its
customer id's rows (`apply.held_subscription`, what a batch decides its events from meanwhile), under
the batch lock (no batch of any replica decides its events meanwhile) and its own, by the batch's
server-side apply (`apply.apply_subscription`) onto the Customer as read under them: one given a
subscription since (an event's batch, a person), or deleted, is left as it is; one written otherwise
(the operator's status) is read again and written once more.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from kubernetes.client.exceptions import ApiException
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from iotistic_billing.customer import KIND, SubscriptionSpec, customer_id_in_use
from iotistic_billing.db import models
from iotistic_billing.directory import CustomerRecord
from iotistic_billing.k8s import Kube, KubernetesUnavailable
from iotistic_billing.stripe_inbox.apply import (
    EventApplier,
    apply_subscription,
    held_subscription,
    lock_and_read,
    stored_subscription,
)
from iotistic_billing.stripe_inbox.events import LIVE_STATUSES

log = logging.getLogger(__name__)

# Seconds between two looks for Customers to give their subscription back (and the first at the start).
RESTORE_SECONDS: Final = 60.0
# The reason of the Event on a Customer given its subscription back.
RESTORED: Final = "SubscriptionRestored"


@dataclass(frozen=True)
class Restored:
    """A Customer given its subscription back: as read before the write, and what it was given."""

    record: CustomerRecord
    subscription: SubscriptionSpec


def unsubscribed(bodies: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The Customers (name: customer id) that may have lost their subscription: billed through Stripe,
    holding none, not being deleted. A customer id that another Customer not being deleted goes by too is
    left out: whose subscription it is is no guess of ours. Read off the raw objects: the fleet's list is
    not parsed each minute (a pydantic model of 10,000 Customers held the event loop for 0.7 s), only
    the Customers chosen, read again under their locks."""
    present = {
        str(metadata.get("name")): (body.get("spec") or {}, customer_id_in_use(body))
        for body in bodies
        if not (metadata := body.get("metadata") or {}).get("deletionTimestamp")
    }
    shared = Counter(customer_id for _, customer_id in present.values())
    return {
        name: customer_id
        for name, (spec, customer_id) in present.items()
        if (spec.get("billing") or {}).get("mode") == "stripe"
        and not spec.get("subscription")
        and shared[customer_id] == 1
    }


async def to_restore(kube: Kube, sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    """The names of the Customers `unsubscribed` whose customer id a live subscription row on a plan
    names."""
    customers = unsubscribed(await kube.list_customers())
    if not customers:
        return []
    async with sessions() as session:
        live = await live_on_plan(session, customers.values())
    return sorted(name for name, customer_id in customers.items() if customer_id in live)


async def live_on_plan(session: AsyncSession, customer_ids: Iterable[str]) -> dict[str, str]:
    """Of `customer_ids`, those a live subscription row on a plan names, each with one such subscription
    id: what the restore hands over (one on no plan's price never is: `events.newest_live`). The operator
    asks it too, to wait for the restore rather than install a Customer made again unlicensed."""
    rows = await session.execute(
        select(models.Subscription.customer_id, models.Subscription.stripe_subscription_id).where(
            models.Subscription.customer_id.in_(sorted(set(customer_ids))),
            models.Subscription.status.in_(sorted(LIVE_STATUSES)),
            models.Subscription.plan.is_not(None),
        )
    )
    return {customer_id: subscription_id for customer_id, subscription_id in rows}


async def restore(
    deps: EventApplier, session: AsyncSession, names: Sequence[str], concurrency: int
) -> list[Restored]:
    """Inside the caller's transaction, which holds the batch lock: each named Customer locked and read
    again, and one still `unsubscribed` given `held_subscription` of its customer id's rows, naming the
    uid and resourceVersion read (refused as written since, it is read again and, still holding none,
    written once more); `concurrency` Customers at once. One not written is logged and left for the
    next look."""
    slots = asyncio.Semaphore(max(concurrency, 1))
    read = await lock_and_read(deps, session, names, slots)
    records: list[CustomerRecord] = []
    for name, record in read.items():
        if isinstance(record, Exception):
            log.warning("Customer %s not read to restore its subscription (%s)", name, _why(record))
        elif record is not None:
            records.append(record)
    still = unsubscribed(record.body for record in records)
    wanted = [record for record in records if record.name in still]
    if not wanted:
        return []
    rows = {
        row.stripe_subscription_id: stored_subscription(row)
        for row in await session.scalars(
            select(models.Subscription).where(
                models.Subscription.customer_id.in_(sorted({record.customer_id for record in wanted}))
            )
        )
    }
    planned = [
        (record, subscription)
        for record in wanted
        if (subscription := held_subscription(record, rows)) is not None
    ]

    async def write(
        record: CustomerRecord, subscription: SubscriptionSpec
    ) -> tuple[Restored, str | Exception]:
        async with slots:
            outcome = await apply_subscription(deps.kube, record, subscription, unchanged_since_read=True)
            if not (isinstance(outcome, ApiException) and outcome.status == HTTPStatus.CONFLICT):
                return Restored(record, subscription), outcome
            # Written since the read, by the operator's status mostly (a fleet rebuilt from Git): read
            # again under the locks still held, and written once more while it still holds none.
            try:
                again = await deps.directory.by_name(record.name)
            except Exception as error:
                return Restored(record, subscription), error
            if again is None:
                return Restored(record, subscription), "gone"
            same = again.customer.metadata.uid == record.customer.metadata.uid
            given = held_subscription(again, rows) if same and unsubscribed([again.body]) else None
            if given is None:
                return Restored(again, subscription), "held"
            return Restored(again, given), await apply_subscription(
                deps.kube, again, given, unchanged_since_read=True
            )

    written = await asyncio.gather(*(write(record, subscription) for record, subscription in planned))
    restored: list[Restored] = []
    for (one, outcome), (record, subscription) in zip(written, planned, strict=True):
        if outcome == "applied":
            restored.append(one)
        elif outcome == "gone":
            log.info("Customer %s deleted before its subscription was restored", record.name)
        elif outcome == "held":
            log.info("Customer %s given a subscription or made again meanwhile; left as it is", record.name)
        else:
            log.warning(
                "Customer %s: subscription %s not restored yet (%s); tried again in the next look",
                record.name,
                subscription.stripe_subscription_id,
                _why(outcome),
            )
    return restored


async def tell(kube: Kube, restored: Restored) -> None:
    """The restoration logged, and told to the Customer as an Event (one that cannot be posted is
    logged: the subscription is restored all the same)."""
    record, subscription = restored.record, restored.subscription
    what = (
        f"{subscription.stripe_subscription_id} ({subscription.status}, plan {subscription.plan or 'none'}"
        + (
            f", period ending {subscription.current_period_end:%Y-%m-%dT%H:%M:%SZ}"
            if subscription.current_period_end
            else ""
        )
        + ")"
    )
    log.info(
        "Customer %s held no subscription: restored %s from the subscriptions of %s",
        record.name,
        what,
        record.customer_id,
        extra={"customer_id": record.customer_id},
    )
    try:
        await kube.create_event(
            KIND,
            record.body,
            reason=RESTORED,
            message=f"spec.subscription restored from the Stripe subscriptions of {record.customer_id}: "
            f"{what} (the Customer was made without it)",
        )
    except (KubernetesUnavailable, ApiException) as error:
        log.warning("the Event of the restored subscription of %s was not posted (%s)", record.name, error)


def _why(error: str | Exception) -> str:
    return str(error) or type(error).__name__


__all__ = [
    "RESTORED",
    "RESTORE_SECONDS",
    "Restored",
    "live_on_plan",
    "restore",
    "tell",
    "to_restore",
    "unsubscribed",
]
