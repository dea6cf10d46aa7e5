"""Finding Customers: by our customer id, by Stripe customer id or by Stripe subscription id.

The Customer resources are the truth; the `customers` mirror table remembers which resource holds which
customer id and which Stripe customer, so a lookup is usually one GET. A mirror entry that is missing or
stale falls back to listing the Customers (spec.customerId, status.customerId, spec.billing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import Customer
from iotistic_billing.db import models
from iotistic_billing.operator.state import customer_id_for, namespace_for
from iotistic_billing.webhook_server.cluster import Cluster
from iotistic_billing.webhook_server.stripe_events import LookupHints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CustomerRecord:
    """A Customer resource, parsed, with the customer id in use (spec, status, or the derived one)."""

    customer: Customer
    body: dict[str, Any]
    customer_id: str

    @property
    def name(self) -> str:
        return self.customer.metadata.name

    @property
    def namespace(self) -> str:
        return namespace_for(self.name)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> CustomerRecord | None:
        try:
            customer = Customer.model_validate(body)
        except ValidationError:
            # The API server validated it against the CRD; a resource our models refuse is skipped,
            # not fatal for every lookup.
            log.warning("Customer %s does not parse; skipped", (body.get("metadata") or {}).get("name"))
            return None
        customer_id = customer.status.customer_id or customer_id_for(
            customer.spec, customer.metadata.uid or customer.metadata.name
        )
        if customer.spec.customer_id:
            customer_id = customer.spec.customer_id
        return cls(customer, body, customer_id)


def _records(bodies: Iterable[dict[str, Any]]) -> list[CustomerRecord]:
    return [record for body in bodies if (record := CustomerRecord.from_body(body)) is not None]


class Directory:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def all(self) -> list[CustomerRecord]:
        return _records(await self.cluster.list_customers())

    async def by_name(self, name: str) -> CustomerRecord | None:
        body = await self.cluster.get_customer(name)
        return CustomerRecord.from_body(body) if body is not None else None

    async def by_customer_id(self, session: AsyncSession, customer_id: str) -> CustomerRecord | None:
        name = await session.scalar(
            select(models.Customer.resource_name).where(models.Customer.customer_id == customer_id)
        )
        if name is not None:
            record = await self.by_name(name)
            if record is not None and record.customer_id == customer_id:
                return record
        return next((r for r in await self.all() if r.customer_id == customer_id), None)

    async def by_stripe_customer(
        self, session: AsyncSession, stripe_customer_id: str
    ) -> CustomerRecord | None:
        customer_id = await session.scalar(
            select(models.Customer.customer_id).where(
                models.Customer.stripe_customer_id == stripe_customer_id
            )
        )
        if customer_id is not None:
            record = await self.by_customer_id(session, customer_id)
            if record is not None:
                return record
        return next(
            (r for r in await self.all() if r.customer.spec.billing.stripe_customer_id == stripe_customer_id),
            None,
        )

    async def by_subscription(self, session: AsyncSession, subscription_id: str) -> CustomerRecord | None:
        customer_id = await session.scalar(
            select(models.Subscription.customer_id).where(
                models.Subscription.stripe_subscription_id == subscription_id
            )
        )
        return await self.by_customer_id(session, customer_id) if customer_id is not None else None

    async def resolve(self, session: AsyncSession, hints: LookupHints) -> CustomerRecord | None:
        """The Customer an event is about, strongest hint first."""
        if hints.customer_id is not None:
            record = await self.by_customer_id(session, hints.customer_id)
            if record is not None:
                return record
        if hints.stripe_customer_id is not None:
            record = await self.by_stripe_customer(session, hints.stripe_customer_id)
            if record is not None:
                return record
        if hints.subscription_id is not None:
            return await self.by_subscription(session, hints.subscription_id)
        return None

    async def stripe_customer_id(self, session: AsyncSession, record: CustomerRecord) -> str | None:
        stored = await session.scalar(
            select(models.Customer.stripe_customer_id).where(
                models.Customer.customer_id == record.customer_id
            )
        )
        return stored or record.customer.spec.billing.stripe_customer_id

    async def remember(
        self, session: AsyncSession, record: CustomerRecord, stripe_customer_id: str | None = None
    ) -> None:
        """Upsert the mirror row of `record`; a given Stripe customer id replaces the stored one."""
        spec, status = record.customer.spec, record.customer.status
        # A resource name moves to the new customer id when a Customer was deleted and created again.
        await session.execute(
            delete(models.Customer).where(
                models.Customer.resource_name == record.name,
                models.Customer.customer_id != record.customer_id,
            )
        )
        values: dict[str, Any] = {
            "customer_id": record.customer_id,
            "resource_name": record.name,
            "email": spec.email,
            "company_name": spec.company_name,
            "contact_name": spec.contact_name,
            "plan": spec.plan,
            "phase": str(status.phase) if status.phase else None,
            "stripe_customer_id": stripe_customer_id or spec.billing.stripe_customer_id,
        }
        statement = insert(models.Customer).values(**values)
        updates: dict[str, Any] = {key: statement.excluded[key] for key in values if key != "customer_id"}
        if stripe_customer_id is None:
            # Nothing new learnt: keep the link a webhook or checkout stored.
            updates["stripe_customer_id"] = func.coalesce(
                models.Customer.stripe_customer_id, statement.excluded.stripe_customer_id
            )
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[models.Customer.customer_id], set_={**updates, "updated_at": func.now()}
            )
        )


__all__ = ["CustomerRecord", "Directory"]
