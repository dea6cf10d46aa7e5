"""The customer directory: finding Customers by our customer id, by Stripe customer id or by Stripe
subscription id, for the webhook server's routes, the Stripe inbox and usage metering.

The Customer resources are the truth; the `customers` mirror table remembers which resource holds which
customer id and which Stripe customer (the spec's spec.billing.stripeCustomerId when it names one, else
the one a signup, checkout or webhook linked), so a lookup is usually one GET. A mirror entry that is
missing or stale falls back to listing the Customers (spec.customerId, status.customerId, spec.billing).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError
from sqlalchemy import or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import PAID_STATUSES, Customer, customer_id_in_use, namespace_for
from iotistic_billing.db import models
from iotistic_billing.db.license_history import deleted_at
from iotistic_billing.errors import customer_not_found, customer_not_gone
from iotistic_billing.k8s import Kube

log = logging.getLogger(__name__)

# What a lookup compares of a Customer's raw object (customer_id_in_use, stripe_customer_named, ...).
RawKey = Callable[[dict[str, Any]], str | None]


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
        read = read_customer(body)
        if isinstance(read, UnreadableCustomer):
            # The API server validated it against the CRD; a resource our models refuse is skipped,
            # not fatal for every lookup.
            log.warning("Customer %s does not parse; skipped: %s", read.name, "; ".join(read.problems))
            return None
        return read


@dataclass(frozen=True)
class UnreadableCustomer:
    """A Customer resource this version's models refuse: a spec a later CRD rule refuses, kept by the
    API server's validation ratcheting, or a status a newer operator wrote during an upgrade. The
    console lists it from its raw body, as one that needs a look: found in review, it vanished from the
    overview, the list and its own page (a 404), the Customers that most need one."""

    body: dict[str, Any]
    problems: list[str]  # "spec.trial.endsAt: ...", as a 400 names a field

    @property
    def name(self) -> str:
        return str((self.body.get("metadata") or {}).get("name") or "")

    @property
    def conditions(self) -> list[dict[str, Any]]:
        status = self.body.get("status")
        conditions = status.get("conditions") if isinstance(status, dict) else None
        return [c for c in conditions if isinstance(c, dict)] if isinstance(conditions, list) else []

    @property
    def phase(self) -> str:
        status = self.body.get("status")
        phase = status.get("phase") if isinstance(status, dict) else None
        return phase if isinstance(phase, str) and phase else "Unreadable"


@dataclass(frozen=True)
class Listing:
    """Every Customer: those our models read, and those they refuse."""

    records: list[CustomerRecord]
    unreadable: list[UnreadableCustomer]


@dataclass(frozen=True)
class LeftBilling:
    """A Stripe subscription still billing a customer id no Customer holds any more (its Customer deleted
    with the subscription open: a GitOps prune cannot cancel first), until someone cancels it."""

    customer_id: str
    subscription_id: str
    plan: str | None
    status: str
    # When the id's last Customer was deleted (its licence's revocation); None when no licence was
    # revoked then (none was minted), so the row's last change is all that is known.
    deleted_at: datetime | None
    updated_at: datetime

    @property
    def cancel_body(self) -> str:
        return cancel_body(self.customer_id, self.subscription_id)


def cancel_body(customer_id: str, subscription_id: str) -> str:
    """The body of the POST /api/subscriptions/cancel that ends a deleted customer's subscription now:
    naming it (subscription_id), a retry cancels no other subscription of the id."""
    return json.dumps({"customer_id": customer_id, "subscription_id": subscription_id, "immediately": True})


def read_customer(body: dict[str, Any]) -> CustomerRecord | UnreadableCustomer:
    """A Customer resource as a record, or, when our models refuse it, as unreadable, naming why."""
    try:
        customer = Customer.model_validate(body)
    except ValidationError as error:
        problems = [
            f"{'.'.join(str(part) for part in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
        ]
        return UnreadableCustomer(body, problems)
    return CustomerRecord(customer, body, customer_id_in_use(body))


def _records(bodies: Iterable[dict[str, Any]]) -> list[CustomerRecord]:
    return [record for body in bodies if (record := CustomerRecord.from_body(body)) is not None]


class Directory:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def all(self) -> list[CustomerRecord]:
        return _records(await self._bodies())

    async def where(self, wanted: Callable[[dict[str, Any]], bool]) -> list[CustomerRecord]:
        """The Customers whose raw object is `wanted`, in the list's order: only those are parsed. Found
        in review: every signup, and a lookup the mirror could not answer, parsed every Customer on the
        event loop (about 300 ms at 1,000), stalling the Stripe webhooks the same loop accepts."""
        return _records(body for body in await self._bodies() if wanted(body))

    async def _first(self, key: RawKey, value: str) -> CustomerRecord | None:
        """The first Customer our models read whose raw object's `key` is `value`."""
        return next(iter(await self.where(lambda body: key(body) == value)), None)

    async def _bodies(self) -> list[dict[str, Any]]:
        return await self.kube.list_customers()

    async def listing(self) -> Listing:
        """Every Customer, those our models refuse too (the console's lists)."""
        listing = Listing([], [])
        for body in await self.kube.list_customers():
            read = read_customer(body)
            if isinstance(read, UnreadableCustomer):
                listing.unreadable.append(read)
            else:
                listing.records.append(read)
        return listing

    def for_batch(self) -> Directory:
        """This directory for one batch of lookups: a lookup the mirror cannot answer lists the fleet,
        and here the first such lookup lists it for all the others (a batch naming a thousand Customers
        never mirrored, created by GitOps, lists the fleet once, not a thousand times)."""
        return _BatchDirectory(self.kube)

    async def confirm_gone(self, customer_id: str) -> None:
        """A 409 unless no Customer the API server lists holds `customer_id`, one our models refuse too:
        the routes that act on a deleted customer's id (its cancel, its revoke) took an unreadable
        Customer for a gone one, and revoked a running instance's keys (found in review)."""
        listing = await self.listing()
        for record in listing.records:
            if record.customer_id == customer_id:
                raise customer_not_gone(customer_id, record.name, "made since it was looked up")
        for unreadable in listing.unreadable:
            if customer_id_in_use(unreadable.body) == customer_id:
                why = "this version cannot read it: " + "; ".join(unreadable.problems)
                raise customer_not_gone(customer_id, unreadable.name, why)

    async def subscriptions_left_billing(
        self, session: AsyncSession, statuses: Set[str]
    ) -> tuple[list[LeftBilling], Listing]:
        """The subscriptions in `statuses` (the open ones, stripe_inbox.events.OPEN_STATUSES) on a plan
        that no Customer holds (`left_billing_of`), oldest deletion first, and the listing they were read
        against (the console's overview shows both). The rows are read before the Customers are listed,
        so a Customer applied meanwhile is listed, not taken for gone."""
        rows = await _open_subscriptions(session, statuses)
        listing = await self.listing()
        bodies = [*(r.body for r in listing.records), *(u.body for u in listing.unreadable)]
        return await left_billing_of(session, rows, bodies), listing

    async def left_billing(self, session: AsyncSession, statuses: Set[str]) -> list[LeftBilling]:
        """`subscriptions_left_billing` without the listing (iotistic_subscriptions_left_billing): the
        Customers are listed only when a subscription is open, and read raw, not parsed. Found in review:
        each count parsed every Customer on the server's event loop, 1.4 to 2 s and 140 MB for 10,000 of
        them, once a minute per replica, with nothing left billing."""
        rows = await _open_subscriptions(session, statuses)
        if not rows:
            return []
        return await left_billing_of(session, rows, await self.kube.list_customers())

    async def by_name(self, name: str) -> CustomerRecord | None:
        body = await self.kube.read_customer(name)
        return CustomerRecord.from_body(body) if body is not None else None

    async def named(self, name: str) -> CustomerRecord | UnreadableCustomer | None:
        """The Customer `name`, read, or unreadable; None when there is none (the console's page)."""
        body = await self.kube.read_customer(name)
        return read_customer(body) if body is not None else None

    async def by_customer_id(self, session: AsyncSession, customer_id: str) -> CustomerRecord | None:
        name = await session.scalar(
            select(models.Customer.resource_name).where(models.Customer.customer_id == customer_id)
        )
        if name is not None:
            record = await self.by_name(name)
            if record is not None and record.customer_id == customer_id:
                return record
        return await self._first(customer_id_in_use, customer_id)

    async def existing(self, session: AsyncSession, customer_id: str) -> CustomerRecord:
        """The Customer of `customer_id`, or a 404 "Customer not found" naming it."""
        record = await self.by_customer_id(session, customer_id)
        if record is None:
            raise customer_not_found(customer_id)
        return record

    async def by_stripe_customer(
        self, session: AsyncSession, stripe_customer_id: str
    ) -> CustomerRecord | None:
        customer_id = await session.scalar(
            select(models.Customer.customer_id)
            .where(models.Customer.stripe_customer_id == stripe_customer_id)
            # A deleted Customer's row (its name freed) last: one made again may have the same link.
            .order_by(models.Customer.resource_name.is_(None))
            .limit(1)
        )
        if customer_id is not None:
            record = await self.by_customer_id(session, customer_id)
            if record is not None:
                return record
        return await self._first(stripe_customer_named, stripe_customer_id)

    async def by_subscription(self, session: AsyncSession, subscription_id: str) -> CustomerRecord | None:
        customer_id = await session.scalar(
            select(models.Subscription.customer_id).where(
                models.Subscription.stripe_subscription_id == subscription_id
            )
        )
        return await self.by_customer_id(session, customer_id) if customer_id is not None else None

    async def resolve(
        self,
        session: AsyncSession,
        *,
        customer_id: str | None,
        stripe_customer_id: str | None,
        subscription_id: str | None,
    ) -> CustomerRecord | None:
        """The Customer these ids point at, strongest first: ours, Stripe's customer, Stripe's
        subscription (what a Stripe event says about whose it is)."""
        if customer_id is not None:
            record = await self.by_customer_id(session, customer_id)
            if record is not None:
                return record
        if stripe_customer_id is not None:
            record = await self.by_stripe_customer(session, stripe_customer_id)
            if record is not None:
                return record
        if subscription_id is not None:
            return await self.by_subscription(session, subscription_id)
        return None

    async def stripe_customer_id(self, session: AsyncSession, record: CustomerRecord) -> str | None:
        """The Customer's Stripe customer (`stripe_customer_of`: its spec's, else the mirror's link)."""
        stored = await session.scalar(
            select(models.Customer.stripe_customer_id).where(
                models.Customer.customer_id == record.customer_id
            )
        )
        return stripe_customer_of(record.customer, stored)

    async def stripe_customer_ids(
        self, session: AsyncSession, records: Iterable[CustomerRecord]
    ) -> dict[str, str | None]:
        """`stripe_customer_id` of each record, by customer id, in one query (a batch of the inbox)."""
        wanted = {record.customer_id: record for record in records}
        if not wanted:
            return {}
        found = await session.execute(
            select(models.Customer.customer_id, models.Customer.stripe_customer_id).where(
                models.Customer.customer_id.in_(sorted(wanted))
            )
        )
        stored = {customer_id: link for customer_id, link in found}
        return {
            customer_id: stripe_customer_of(record.customer, stored.get(customer_id))
            for customer_id, record in wanted.items()
        }


async def _open_subscriptions(
    session: AsyncSession, statuses: Set[str]
) -> list[tuple[models.Subscription, str | None]]:
    """The subscriptions in `statuses` on a plan, but not one an active or trialing subscription set to
    cancel at its period's end (Stripe ends it), each with its customer id's Stripe customer (the mirror's
    link), by customer id and subscription."""
    row = models.Subscription
    found = await session.execute(
        select(row, models.Customer.stripe_customer_id)
        .outerjoin(models.Customer, models.Customer.customer_id == row.customer_id)
        .where(
            row.status.in_(sorted(statuses)),
            # Another product's subscription on the Stripe customer (no plan's price) is not ours.
            row.plan.is_not(None),
            or_(row.status.not_in(sorted(PAID_STATUSES)), ~row.cancel_at_period_end),
        )
        .order_by(row.customer_id, row.stripe_subscription_id)
    )
    return [(subscription, stripe_customer_id) for subscription, stripe_customer_id in found.all()]


async def left_billing_of(
    session: AsyncSession,
    rows: Sequence[tuple[models.Subscription, str | None]],
    bodies: Iterable[dict[str, Any]],
) -> list[LeftBilling]:
    """Of `rows` (a subscription, its customer id's Stripe customer), those no Customer of `bodies` (raw
    objects, as confirm_gone reads them: one this version cannot read holds its id too) holds, oldest
    deletion first. A Customer holds a subscription by its customer id, by naming it in spec.subscription,
    or by its Stripe customer: spec.billing.stripeCustomerId naming it (a GitOps move), or the mirror
    linking it to the Customer's id. Found in review: a subscription whose Stripe customer a live Customer
    holds was listed left billing, with a cancel body, while the Stripe inbox (Directory.resolve) gives
    its events to that Customer."""
    if not rows:
        return []
    held: set[str] = set()
    named: set[str | None] = set()
    billed: set[str | None] = set()
    for body in bodies:
        held.add(customer_id_in_use(body))
        named.add(subscription_named(body))
        billed.add(stripe_customer_named(body))
    candidates = [
        (r, stripe)
        for r, stripe in rows
        if r.customer_id not in held and r.stripe_subscription_id not in named
    ]
    linked = {stripe for _, stripe in candidates if stripe is not None}
    if linked:
        links = await session.execute(
            select(models.Customer.customer_id, models.Customer.stripe_customer_id).where(
                models.Customer.stripe_customer_id.in_(sorted(linked))
            )
        )
        billed |= {stripe for customer_id, stripe in links.all() if customer_id in held}
    left = [r for r, stripe in candidates if stripe is None or stripe not in billed]
    deleted = await deleted_at(session, (r.customer_id for r in left))
    found = [
        LeftBilling(
            customer_id=r.customer_id,
            subscription_id=r.stripe_subscription_id,
            plan=r.plan,
            status=r.status,
            deleted_at=deleted.get(r.customer_id),
            updated_at=r.updated_at,
        )
        for r in left
    ]
    found.sort(key=lambda f: (f.deleted_at or f.updated_at, f.subscription_id))
    return found


def stripe_customer_named(body: dict[str, Any]) -> str | None:
    """The Stripe customer a Customer's spec.billing.stripeCustomerId names, read from the raw object."""
    spec = body.get("spec")
    billing = spec.get("billing") if isinstance(spec, dict) else None
    named = billing.get("stripeCustomerId") if isinstance(billing, dict) else None
    return named if isinstance(named, str) and named else None


def email_named(body: dict[str, Any]) -> str | None:
    """A Customer's spec.email in lower case (emails are one customer's whatever their case), read from
    the raw object."""
    spec = body.get("spec")
    email = spec.get("email") if isinstance(spec, dict) else None
    return email.lower() if isinstance(email, str) else None


def subscription_named(body: dict[str, Any]) -> str | None:
    """The Stripe subscription a Customer's spec.subscription names, read from the raw object (a spec
    this version refuses names one too)."""
    spec = body.get("spec")
    subscription = spec.get("subscription") if isinstance(spec, dict) else None
    named = subscription.get("stripeSubscriptionId") if isinstance(subscription, dict) else None
    return named if isinstance(named, str) else None


def stripe_customer_of(customer: Customer, stored: str | None) -> str | None:
    """A Customer's Stripe customer: spec.billing.stripeCustomerId when set (GitOps may move it to
    another), else `stored`, the link a signup, a checkout or a webhook left in the mirror."""
    return customer.spec.billing.stripe_customer_id or stored


async def remember(
    session: AsyncSession, customer: Customer, customer_id: str, stripe_customer_id: str | None = None
) -> None:
    """Upsert the mirror row of `customer` (`customer_id`: the id in use). Its Stripe customer is
    `stripe_customer_of(customer, stripe_customer_id)`, which replaces the stored one; with neither a
    spec's nor a given one the stored link stays. The operator writes it when it mints a Customer's
    licence (and once per process when the licence is current), the webhook server, the Stripe inbox and
    usage metering when they found the Customer."""
    await remember_all(session, [(customer, customer_id, stripe_customer_id)])


async def remember_all(session: AsyncSession, entries: Iterable[tuple[Customer, str, str | None]]) -> None:
    """`remember` for many Customers (customer, id in use, Stripe customer) in two statements, whatever
    their number (a batch of the Stripe inbox). A resource name given twice keeps its last entry."""
    rows: dict[str, dict[str, Any]] = {}
    for customer, customer_id, stripe_customer_id in entries:
        spec, status = customer.spec, customer.status
        rows[customer.metadata.name] = {
            "customer_id": customer_id,
            "resource_name": customer.metadata.name,
            "email": spec.email,
            "company_name": spec.company_name,
            "contact_name": spec.contact_name,
            "plan": spec.plan,
            "phase": str(status.phase) if status.phase else None,
            "stripe_customer_id": stripe_customer_of(customer, stripe_customer_id),
        }
    if not rows:
        return
    columns = {column: [row[column] for row in rows.values()] for column in _MIRROR_COLUMNS}
    await session.execute(
        _FREE_MOVED_NAMES, {"names": columns["resource_name"], "ids": columns["customer_id"]}
    )
    await session.execute(_UPSERT_MIRROR_ROWS, columns)


# A resource name moves to the new customer id when a Customer was deleted and created again. The old id's
# row stays, its name freed: the meter run reads its Stripe customer for the periods still owed.
_FREE_MOVED_NAMES: Final = text(
    "UPDATE customers SET resource_name = NULL, updated_at = now()"
    " WHERE resource_name = ANY(CAST(:names AS text[]))"
    " AND (resource_name, customer_id) NOT IN"
    " (SELECT * FROM unnest(CAST(:names AS text[]), CAST(:ids AS text[])))"
)
_MIRROR_COLUMNS: Final = (
    "customer_id",
    "resource_name",
    "email",
    "company_name",
    "contact_name",
    "plan",
    "phase",
    "stripe_customer_id",
)
# The rows as arrays, one statement whatever their number, its text the same for every batch: built from
# the models at each call it cost more CPU than its round trip (bench/README.md, reconcile). Nothing new
# learnt of the Stripe customer (no link given, none in the spec) keeps the link a webhook or checkout
# stored.
_UPSERT_MIRROR_ROWS: Final = text(
    "INSERT INTO customers"
    " (customer_id, resource_name, email, company_name, contact_name, plan, phase, stripe_customer_id)"
    " SELECT * FROM unnest(CAST(:customer_id AS text[]), CAST(:resource_name AS text[]),"
    " CAST(:email AS text[]), CAST(:company_name AS text[]), CAST(:contact_name AS text[]),"
    " CAST(:plan AS text[]), CAST(:phase AS text[]), CAST(:stripe_customer_id AS text[]))"
    " ON CONFLICT (customer_id) DO UPDATE SET resource_name = excluded.resource_name,"
    " email = excluded.email, company_name = excluded.company_name,"
    " contact_name = excluded.contact_name, plan = excluded.plan, phase = excluded.phase,"
    " stripe_customer_id = coalesce(excluded.stripe_customer_id, customers.stripe_customer_id),"
    " updated_at = now()"
)


class _BatchDirectory(Directory):
    def __init__(self, kube: Kube) -> None:
        super().__init__(kube)
        self._fleet: asyncio.Future[list[dict[str, Any]]] | None = None
        # The listed bodies by each key a lookup compared, built once: a batch of a thousand lookups
        # does not read the thousand bodies a thousand times.
        self._indexes: dict[RawKey, dict[str | None, list[dict[str, Any]]]] = {}

    async def _first(self, key: RawKey, value: str) -> CustomerRecord | None:
        bodies = await self._bodies()
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = {}
            for body in bodies:
                index.setdefault(key(body), []).append(body)
        return next(iter(_records(index.get(value, ()))), None)

    async def _bodies(self) -> list[dict[str, Any]]:
        if self._fleet is None:
            self._fleet = asyncio.ensure_future(super()._bodies())
        # Shielded: one lookup given up (cancelled) does not take the list away from the others.
        return await asyncio.shield(self._fleet)


__all__ = [
    "CustomerRecord",
    "Directory",
    "LeftBilling",
    "Listing",
    "UnreadableCustomer",
    "cancel_body",
    "email_named",
    "left_billing_of",
    "read_customer",
    "remember",
    "remember_all",
    "stripe_customer_named",
    "stripe_customer_of",
    "subscription_named",
]
