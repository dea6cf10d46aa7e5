"""The apply step of the Stripe inbox: what a batch of stored events does to their Customers
(spec.subscription, by server-side apply under the Stripe field manager), the `subscriptions` rows and the
customer mirror, all inside the inbox's transaction for the batch, so that a failure leaves the events
pending.

The pending events of one Customer are coalesced: decided one after the other in Stripe's order
(`events.coalesce`), then written once: one server-side apply of the Customer, one upsert of each row.
Each event still gets its own result (and its own notices). Customers are read only once the batch holds
their locks, so what is decided is what the Customer holds.

An event whose customer cannot be found is recorded as `unmatched` with a warning: its route answered
Stripe 200 already (an error would make Stripe retry it for days without any chance of success), and the
row keeps it for an operator to look at. Its subscription's row, when there is one, still moves on
(`events.unmatched_row`): a Customer deleted before Stripe's deletion was applied and made again from Git
is not given back a subscription Stripe ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from typing import Any, Literal, TypeVar, cast

from kubernetes.client.exceptions import ApiException
from sqlalchemy import Text, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from iotistic_billing.customer import RESTRICTED_FOR, CustomerSpec, SubscriptionSpec
from iotistic_billing.db import models
from iotistic_billing.directory import CustomerRecord, Directory, remember_all
from iotistic_billing.errors import ApiError, Conflict, DependencyUnavailable
from iotistic_billing.k8s import FieldManager, Kube
from iotistic_billing.notices.content import Notice
from iotistic_billing.notices.outbox import Outbox
from iotistic_billing.prices import PriceCatalog
from iotistic_billing.stripe_inbox.events import (
    CHECKOUT_COMPLETED,
    HANDLED_EVENT_TYPES,
    INVOICE_EVENTS,
    Coalesced,
    LookupHints,
    StoredSubscription,
    StripeEvent,
    SubscriptionFacts,
    coalesce,
    lookup_hints,
    newest_live,
    object_id,
    other_mode,
    previous_attributes,
    subscription_facts,
    unmatched_row,
)
from iotistic_billing.stripe_inbox.notices import event_notices
from iotistic_billing.workers import to_the_end

log = logging.getLogger(__name__)

T = TypeVar("T")
Sessions = async_sessionmaker[AsyncSession]
# Customers of a batch looked up, read and applied at once (the inbox passes its `workers`).
CONCURRENCY = 4
# Whose events one call applies at most (the inbox passes its own).
MAX_CUSTOMERS = 100
# What a server-side apply naming the uid read is answered when that Customer is gone: 409 (no object
# of that uid), 422 (another Customer made under the name since: its uid is immutable; without a uid,
# the create the apply tries, refused by the CRD's required fields), 403 (no right to create), 404 (a
# plain PATCH's answer).
GONE_REFUSALS = frozenset({403, 404, 409, 422})
# Every line of an invoice, listed from Stripe (`StripeApi.invoice_lines`).
InvoiceLines = Callable[[str], Awaitable[Sequence[Mapping[str, Any]]]]
# How long listing an invoice's lines may take: it runs under the batch lock, which every replica's
# batches wait for.
INVOICE_LINES_TIMEOUT = 10.0


@dataclass(frozen=True)
class Outcome:
    result: str
    customer_id: str | None = None


@dataclass(frozen=True)
class Failure:
    """An event left pending for a retry: the error, and what waits with it (`held_back` of the next
    batches): its Customer's name; for an event whose lookup failed, the ids it names (`LookupHints.ids`)
    and the Customers found for the batch's events that name one of them. `customer`: the name of the
    Customer it was found to be of, for the log; None when its lookup failed."""

    error: Exception
    holds: frozenset[str] = frozenset()
    customer: str | None = None


# Per event id: the result to record, or the failure that leaves it pending for a retry. An event of the
# batch that is missing was deferred: left pending as it was, for the next batch.
Results = dict[str, Outcome | Failure]


@dataclass(frozen=True)
class EventApplier:
    """What applying events needs: the Customers on the API server, the directory, the price catalog."""

    kube: Kube
    directory: Directory
    catalog: PriceCatalog
    outbox: Outbox = field(default_factory=Outbox)
    # Stripe's customer portal login link, for the "payment failed" notice, and the ladder's restriction
    # (DUNNING_RESTRICT_DAYS) whose dates it names.
    portal_url: str | None = None
    restricted_for: timedelta = RESTRICTED_FOR
    # The Stripe mode of STRIPE_SECRET_KEY (Settings.stripe_livemode): an event of the other is ignored.
    livemode: bool | None = None
    # Lists an invoice's lines when its event carries the first ones alone (the Stripe client's; None
    # without STRIPE_SECRET_KEY).
    invoice_lines: InvoiceLines | None = None


@dataclass
class _CustomerEvents:
    """One Customer's share of the batch, in Stripe's order, and what they do to it."""

    name: str
    events: list[StripeEvent]
    facts: list[SubscriptionFacts | None]
    record: CustomerRecord
    link: str | None = None
    plan: Coalesced | None = None

    def failed(self, error: Exception) -> dict[str, Failure]:
        """Each of the group's events left pending by `error`; its newer events wait with them."""
        return {event.id: Failure(error, frozenset({self.name}), self.name) for event in self.events}


async def apply_events(
    deps: EventApplier,
    session: AsyncSession,
    events: Sequence[StripeEvent],
    sessions: Sessions,
    concurrency: int = CONCURRENCY,
    max_customers: int = MAX_CUSTOMERS,
    held_back: Collection[str] = (),
) -> Results:
    """What the events do, inside the caller's transaction (see inbox.py); `events` in Stripe's order
    (`created`, then arrival). `sessions` serves the lookups, which run beside that transaction;
    `concurrency` Customers are looked up, read and applied at once. The events of the first
    `max_customers` Customers they name are applied, each Customer's all; the others' are left as they
    are (deferred), so that what a Customer has applied is always the oldest of its events. So are the
    events of the Customers `held_back` (an event of theirs failed and waits for its retry; `Failure.holds`
    of it: names, and the ids of an event whose lookup failed): a newer event applied before the older
    one that failed would leave that one stale, its notice unsent. An event whose lookup fails holds back
    in the same way the Customers of the batch's events that name one of its ids."""
    slots = asyncio.Semaphore(max(concurrency, 1))
    results: Results = {}
    handled: list[tuple[StripeEvent, LookupHints]] = []
    for event in events:
        if (other := other_mode(event, deps.livemode)) is not None:
            # Recorded, not refused: the route answered Stripe 200, and a refusal would be retried for days.
            log.warning("stripe event %s (%s) is %s; recorded as ignored", event.id, event.type, other)
            results[event.id] = Outcome("ignored")
        elif event.type in HANDLED_EVENT_TYPES:
            handled.append((event, lookup_hints(event.type, event.data.object)))
        else:
            log.info("stripe event %s: type %s is not handled; recorded", event.id, event.type)
            results[event.id] = Outcome("ignored")
    found, records = await _find_and_lock(
        deps,
        session,
        sessions,
        [hints for _, hints in handled],
        slots,
        max_customers,
        held_back,
    )

    waiting = _customers_naming(found, {*held_back, *_failed_lookup_ids(found)})
    groups: dict[str, _CustomerEvents] = {}
    unmatched: list[tuple[StripeEvent, LookupHints]] = []
    for event, hints in handled:
        name = found[hints]
        if isinstance(name, str) and (name not in records or name in waiting):
            continue  # past the batch's limit, or held back for a retry: left pending (deferred)
        record = records.get(name) if isinstance(name, str) else None
        if isinstance(name, Exception):
            results[event.id] = Failure(name, hints.ids() | _customers_naming(found, hints.ids()))
        elif isinstance(record, Exception):
            results[event.id] = Failure(record, frozenset({cast(str, name)}), cast(str, name))
        elif name is None or record is None:
            log.warning(
                "stripe event %s (%s) matches no Customer; acknowledged and recorded as unmatched",
                event.id,
                event.type,
            )
            unmatched.append((event, hints))
        else:
            groups.setdefault(name, _CustomerEvents(name, [], [], record)).events.append(event)
    ready: list[_CustomerEvents] = []
    invoice_lines = listed_once(deps.invoice_lines) if deps.invoice_lines is not None else None
    listed = await asyncio.gather(
        *(_bounded(slots, _all_lines_in_order(groups[name].events, invoice_lines)) for name in sorted(groups))
    )
    for name, (whole, unlisted) in zip(sorted(groups), listed, strict=True):
        group = groups[name]
        if unlisted is not None:  # its Customer's events wait for a retry, not recorded without them
            results.update(group.failed(unlisted))
            continue
        group.events = whole
        try:
            group.facts = [read_facts(e, deps.catalog, name) for e in group.events]
        except Exception as error:  # an event no rule foresaw: its Customer's events wait, not the batch's
            results.update(group.failed(error))
        else:
            ready.append(group)

    rows = await _rows(session, ready)
    links = await deps.directory.stripe_customer_ids(session, [group.record for group in ready])
    owner: dict[str, str] = {}
    for group in ready:
        # With the customer's other subscriptions: one of them takes over when the one it holds ends.
        mine = _subscription_ids(group) | {
            sub for sub, row in rows.items() if row.customer_id == group.record.customer_id
        }
        if any(owner.get(sub, group.name) != group.name for sub in mine):
            # A subscription that events of two Customers name: the second waits for the next batch, so
            # that each row is decided from one state only.
            continue
        owner.update(dict.fromkeys(mine, group.name))
        group.link = _link(group, links[group.record.customer_id])
        try:
            group.plan = coalesce(
                group.record.customer_id,
                held_subscription(group.record, rows),
                {sub: rows[sub] for sub in mine if sub in rows},
                [(facts, event.created) for facts, event in zip(group.facts, group.events, strict=True)],
            )
        except Exception as error:  # a state the models refuse: this Customer's events stay pending
            results.update(group.failed(error))
    results.update(await _move_unmatched_rows(deps, session, unmatched, owner, slots, invoice_lines))
    planned = [group for group in ready if group.plan is not None]
    patched = await asyncio.gather(
        *(_bounded(slots, _apply_to_customer(deps.kube, group)) for group in planned)
    )
    written: list[tuple[_CustomerEvents, bool]] = []
    for group, patch in zip(planned, patched, strict=True):
        if isinstance(patch, Exception):
            results.update(group.failed(patch))
        else:
            written.append((group, patch == "gone"))
    try:  # all Customers' records at once; should one be refused, each on its own below
        async with session.begin_nested():
            recorded = await _record(deps, session, written)
    except Exception as refused:
        log.info("a batch's records were refused together (%s); recording each Customer's alone", refused)
    else:
        results.update(recorded)
        return results
    for one in written:
        try:
            async with session.begin_nested():
                results.update(await _record(deps, session, [one]))
        except Exception as error:  # that Customer's events stay pending; the others are recorded
            results.update(one[0].failed(error))
    return results


async def _all_lines_in_order(
    events: Sequence[StripeEvent], invoice_lines: InvoiceLines | None
) -> tuple[list[StripeEvent], Exception | None]:
    """Events that wait for each other (a Customer's; unmatched ones naming a common id) given every line
    of their invoices (`with_all_lines`), one after the other in Stripe's order up to the first whose
    listing failed, and that failure (None: all listed). The newer ones wait with it unlisted: with
    Stripe hanging, one timeout under the batch lock, not one each, and no refusal warned again."""
    whole: list[StripeEvent] = []
    for event in events:
        try:
            whole.append(await with_all_lines(event, invoice_lines))
        except Exception as error:
            return whole, error
    return whole, None


async def with_all_lines(event: StripeEvent, invoice_lines: InvoiceLines | None) -> StripeEvent:
    """The event with every line of its invoice: Stripe sends an invoice's first lines alone (saying
    `has_more`), and a plan line past them read as an invoice billing no period (paying an older one
    lifted past_due). Listed from Stripe (`listed_once`: within INVOICE_LINES_TIMEOUT); a failure a retry
    may clear (no answer, 5xx, 429, a key Stripe refuses altogether) raises, so that the event stays
    pending (recorded, it would be decided on part of its invoice for good). A refusal no retry clears
    (403: a restricted key without "Invoices: read"; a 404 or other 4xx: an invoice Stripe does not
    have), or no STRIPE_SECRET_KEY to list them with: a warning naming the invoice, and its first lines
    (left pending, the event held every newer one of its Customer, a cancellation, a failed payment)."""
    invoice = event.data.object
    lines = invoice.get("lines")
    if (
        event.type not in INVOICE_EVENTS
        or not isinstance(lines, Mapping)
        or lines.get("has_more") is not True
    ):
        return event
    invoice_id = object_id(invoice)
    if invoice_lines is None or invoice_id is None:
        log.warning(
            "stripe event %s: invoice %s has more lines than the event carries, and without"
            " STRIPE_SECRET_KEY they cannot be listed; read from the ones it carries",
            event.id,
            invoice_id,
        )
        return event
    try:
        listed = await invoice_lines(invoice_id)
    except Exception as error:
        refusal = _refused_for_good(error)
        if refusal is None:
            raise
        log.warning(
            "stripe event %s: invoice %s has more lines than the event carries, and Stripe refused to list"
            " them (%s); read from the ones it carries",
            event.id,
            invoice_id,
            refusal,
        )
        return event
    whole = {**invoice, "lines": {**lines, "data": [dict(line) for line in listed], "has_more": False}}
    return event.model_copy(update={"data": event.data.model_copy(update={"object": whole})})


def listed_once(invoice_lines: InvoiceLines) -> InvoiceLines:
    """`invoice_lines` for one batch: within INVOICE_LINES_TIMEOUT (it runs under the batch lock, which
    every replica's batches wait for), and each invoice once, its failure too: two events of one invoice
    (invoice.paid and invoice.payment_succeeded) come together, and each listing may take that long. An
    ask while the invoice is being listed waits for that listing (unmatched events are listed at once)."""
    listed: dict[str, Sequence[Mapping[str, Any]] | Exception] = {}
    listing: dict[str, asyncio.Lock] = {}

    async def once(invoice_id: str) -> Sequence[Mapping[str, Any]]:
        async with listing.setdefault(invoice_id, asyncio.Lock()):
            if invoice_id not in listed:
                try:
                    async with asyncio.timeout(INVOICE_LINES_TIMEOUT):  # not wait_for: see workers.py
                        listed[invoice_id] = await invoice_lines(invoice_id)
                except TimeoutError:
                    # Named: a TimeoutError says nothing (its str is empty) in the event's last_error and log.
                    listed[invoice_id] = DependencyUnavailable(
                        "Stripe",
                        f"Stripe did not list the lines of invoice {invoice_id} within"
                        f" {INVOICE_LINES_TIMEOUT:g} s; retry later",
                    )
                except Exception as error:
                    listed[invoice_id] = error
        found = listed[invoice_id]
        if isinstance(found, Exception):
            raise found
        return found

    return once


def _refused_for_good(error: Exception) -> str | None:
    """What a refusal of an invoice's listing that no retry clears says (None: another failure): a 403
    (the key may not read invoices; every other call may work) or Stripe's other refusals of the request
    (`Conflict`: a 404 resource_missing, an invoice of deleted test data or another account). A 401 is
    not: the key is refused altogether, and the events wait for it to be mended."""
    details = error.details if isinstance(error, ApiError) else None
    if isinstance(details, Mapping) and details.get("stripe_status") == 403:
        return "403: the key may not read invoices; a restricted key needs Invoices: read"
    if isinstance(error, Conflict):
        code = details.get("stripe_code") if isinstance(details, Mapping) else None
        return f"{error.message} ({code})" if code else error.message
    return None


def read_facts(event: StripeEvent, catalog: PriceCatalog, customer: str) -> SubscriptionFacts | None:
    """The subscription facts of a Customer's event (`customer`: its name, for the log). One that moves
    its subscription off a plan's price is a warning: the Customer keeps the plan it had while Stripe
    bills another price, which the billing team maps in STRIPE_PRICE_* (a plan's new price) or moves
    back (found in review: a custom price in the Dashboard kept professional in silence)."""
    facts = subscription_facts(event.type, event.data.object, catalog, previous_attributes(event))
    if facts is not None and facts.off_plan:
        log.warning(
            "stripe event %s: subscription %s of Customer %s moved to a price that is no plan's (%s);"
            " it keeps the plan it had: set the price in STRIPE_PRICE_* if it is a plan's, or move the"
            " subscription back",
            event.id,
            facts.subscription_id,
            customer,
            ", ".join(facts.off_plan),
        )
    return facts


async def _move_unmatched_rows(
    deps: EventApplier,
    session: AsyncSession,
    unmatched: Sequence[tuple[StripeEvent, LookupHints]],
    owner: Mapping[str, str],
    slots: asyncio.Semaphore,
    invoice_lines: InvoiceLines | None = None,
) -> Results:
    """Each event that matched no Customer recorded `unmatched` (the console replays it), its
    subscription's row, when there is one, moved on by it (`events.unmatched_row`; no Customer written, no
    notice), read with every line of its invoice as a Customer's is (`_all_lines_in_order`: the events
    naming a common id one after the other, the others `slots` at a time, as the Customers' are: under
    the batch lock). One whose row a Customer of the batch reads too is left pending for the next batch
    (a row is decided from one state), and those whose row is refused, or whose lines could not be listed
    yet, stay pending, retried (with the batch's others naming the same ids, so that the row moves in
    Stripe's order)."""
    results: Results = {}
    by_subscription: dict[str, list[tuple[StripeEvent, LookupHints, SubscriptionFacts]]] = {}
    chains = _naming_a_common_id([hints for _, hints in unmatched])
    listed = await asyncio.gather(
        *(
            _bounded(slots, _all_lines_in_order([unmatched[at][0] for at in chain], invoice_lines))
            for chain in chains
        )
    )
    read: dict[int, StripeEvent | Exception] = {}
    for chain, (whole, failed) in zip(chains, listed, strict=True):
        read.update(zip(chain, whole, strict=False))  # the listed ones: up to the failure
        if failed is not None:  # it and the chain's newer events wait for a retry
            read.update(dict.fromkeys(chain[len(whole) :], failed))
    for at, (event, hints) in enumerate(unmatched):
        whole_or_failure = read[at]
        if isinstance(whole_or_failure, Exception):
            results[event.id] = Failure(whole_or_failure, hints.ids())
            continue
        event = whole_or_failure
        results[event.id] = Outcome("unmatched")
        try:
            facts = subscription_facts(
                event.type, event.data.object, deps.catalog, previous_attributes(event)
            )
        except Exception as error:  # an event no rule foresaw: unmatched as it is, for the console
            log.warning("stripe event %s moves no row: its facts cannot be read (%s)", event.id, error)
            continue
        if facts is not None:
            by_subscription.setdefault(facts.subscription_id, []).append((event, hints, facts))
    if not by_subscription:
        return results
    found = await session.scalars(
        select(models.Subscription)
        .where(models.Subscription.stripe_subscription_id.in_(sorted(by_subscription)))
        .order_by(models.Subscription.stripe_subscription_id)
        .with_for_update()
    )
    rows = {row.stripe_subscription_id: stored_subscription(row) for row in found}
    moved: dict[str, StoredSubscription] = {}
    for subscription_id, events in by_subscription.items():
        row = rows.get(subscription_id)
        if row is None:
            continue  # nothing is known of it: no Customer holds or is given it
        if subscription_id in owner:
            for event, _, _ in events:
                del results[event.id]
            continue
        after = unmatched_row(subscription_id, row, [(facts, event.created) for event, _, facts in events])
        if after is not None:
            moved[subscription_id] = after
            log.info(
                "subscription %s moved on to %s by events no Customer matched", subscription_id, after.status
            )
    try:
        async with session.begin_nested():
            await _write_rows(session, moved)
    except Exception as error:  # retried: a row left live would be given to a Customer made again
        for subscription_id in moved:
            for event, hints, _ in by_subscription[subscription_id]:
                results[event.id] = Failure(error, hints.ids())
    return results


def _naming_a_common_id(hints: Sequence[LookupHints]) -> list[list[int]]:
    """The positions of `hints` in chains, each in order, of those naming an id another of it names
    (`LookupHints.ids`, through any number of them): the events of one chain wait for each other."""
    chain_of = list(range(len(hints)))

    def first_of(at: int) -> int:
        while chain_of[at] != at:
            at = chain_of[at]
        return at

    first_naming: dict[str, int] = {}
    for at, each in enumerate(hints):
        for key in each.ids():
            chain_of[first_of(at)] = first_of(first_naming.setdefault(key, at))
    chains: dict[int, list[int]] = {}
    for at in range(len(hints)):
        chains.setdefault(first_of(at), []).append(at)
    return list(chains.values())


def _failed_lookup_ids(found: Mapping[LookupHints, str | Exception | None]) -> set[str]:
    """The ids the events whose lookup failed name."""
    return {key for hints, name in found.items() if isinstance(name, Exception) for key in hints.ids()}


def _customers_naming(
    found: Mapping[LookupHints, str | Exception | None], keys: Collection[str]
) -> frozenset[str]:
    """The Customers found for events that name one of `keys` (ids of events whose lookup failed, now or
    in an earlier batch): they may be those events' Customers, so they wait with them."""
    return frozenset(
        name for hints, name in found.items() if isinstance(name, str) and not hints.ids().isdisjoint(keys)
    )


async def _bounded(slots: asyncio.Semaphore, call: Awaitable[T]) -> T:
    async with slots:
        return await call


async def _find_and_lock(
    deps: EventApplier,
    session: AsyncSession,
    sessions: Sessions,
    wanted: Sequence[LookupHints],
    slots: asyncio.Semaphore,
    max_customers: int,
    held_back: Collection[str] = (),
) -> tuple[dict[LookupHints, str | Exception | None], dict[str, CustomerRecord | Exception | None]]:
    """Whose events these are (a Customer name per set of hints, `wanted` in the events' order), and
    the first `max_customers` of those Customers locked, then read, past those `held_back`; a
    Customer not read is deferred.

    Hints that carry our customer id are looked up in the mirror, all in one query, and checked against
    the Customer read under its lock (the check `Directory.by_customer_id` makes); the others, and those
    the check refutes, go through the directory, whose lookups read the Customer (before its lock: it is
    read again under it). Which Customers are applied is decided by name, not by hints (two sets of hints
    can name one Customer), so that a Customer's events are all applied or all deferred."""
    ids = {hints.customer_id for hints in wanted if hints.customer_id is not None}
    mirrored: dict[str, str] = {}
    if ids:
        rows = await session.execute(
            select(models.Customer.customer_id, models.Customer.resource_name).where(
                models.Customer.customer_id.in_(sorted(ids))
            )
        )
        # A row without a name (a Customer deleted, its name reused) is the directory's to look up.
        mirrored = {row.customer_id: row.resource_name for row in rows if row.resource_name is not None}
    found: dict[LookupHints, str | Exception | None] = {
        hints: mirrored[hints.customer_id] for hints in wanted if hints.customer_id in mirrored
    }
    candidates = set(found)
    directory = deps.directory.for_batch()
    found.update(await _resolve(directory, sessions, set(wanted) - candidates, slots))
    chosen = _first_names((found[hints] for hints in wanted), max_customers, skip=held_back)
    records = await lock_and_read(deps, session, chosen, slots)

    def holds(hints: LookupHints) -> bool:
        record = records.get(cast(str, found[hints]))
        return isinstance(record, CustomerRecord) and record.customer_id == hints.customer_id

    refuted = {hints for hints in candidates if found[hints] in records and not holds(hints)}
    if refuted:  # the mirror was out of date (a Customer deleted, or made again under another name)
        found.update(await _resolve(directory, sessions, refuted, slots))
        room = max(max_customers - len(records), 0)
        new = _first_names(
            (found[hints] for hints in wanted if hints in refuted), room, skip={*held_back, *records}
        )
        records.update(await lock_and_read(deps, session, new, slots))
    return found, records


def _first_names(
    names: Iterable[str | Exception | None], limit: int, skip: Collection[str] = ()
) -> list[str]:
    """The first `limit` distinct Customer names, in order, past those in `skip`."""
    first: dict[str, None] = {}
    for name in names:
        if isinstance(name, str) and name not in skip and name not in first:
            if len(first) == limit:
                break
            first[name] = None
    return list(first)


async def lock_and_read(
    deps: EventApplier,
    session: AsyncSession,
    names: Iterable[str],
    slots: asyncio.Semaphore,
) -> dict[str, CustomerRecord | Exception | None]:
    """Each Customer locked for the rest of the transaction, then read (None: gone)."""
    ordered = sorted(set(names))
    if not ordered:
        return {}
    # Read, decide and apply of a Customer must not interleave with another's. The inbox's batch lock
    # already keeps batches apart; the Customer's own lock (the one a single-event apply of an earlier
    # version takes, during a rolling upgrade) costs one statement. In name order: no deadlock.
    locked = func.unnest(bindparam("names", ordered, type_=ARRAY(Text))).column_valued("name")
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(func.concat("customer:", locked)))))
    read = await asyncio.gather(
        *(_bounded(slots, deps.directory.by_name(name)) for name in ordered), return_exceptions=True
    )
    records: dict[str, CustomerRecord | Exception | None] = {}
    for name, record in zip(ordered, read, strict=True):
        if isinstance(record, BaseException) and not isinstance(record, Exception):
            raise record
        records[name] = record
    return records


async def _resolve(
    directory: Directory, sessions: Sessions, wanted: set[LookupHints], slots: asyncio.Semaphore
) -> dict[LookupHints, str | Exception | None]:
    """The Customer name each set of hints points at (None: none), looked up a few at a time."""

    async def one(hints: LookupHints) -> str | Exception | None:
        async with slots:
            try:
                async with sessions() as lookup:
                    record = await directory.resolve(
                        lookup,
                        customer_id=hints.customer_id,
                        stripe_customer_id=hints.stripe_customer_id,
                        subscription_id=hints.subscription_id,
                    )
            except Exception as error:  # these events stay pending, the others go on
                return error
            return record.name if record is not None else None

    order = list(wanted)
    return dict(zip(order, await asyncio.gather(*(one(hints) for hints in order)), strict=True))


def _subscription_ids(group: _CustomerEvents) -> set[str]:
    """The rows the group's decisions read: its events' subscriptions and the Customer's own."""
    ids = {facts.subscription_id for facts in group.facts if facts is not None}
    current = group.record.customer.spec.subscription
    if current is not None and current.stripe_subscription_id is not None:
        ids.add(current.stripe_subscription_id)
    return ids


async def _rows(session: AsyncSession, groups: Sequence[_CustomerEvents]) -> dict[str, StoredSubscription]:
    """The subscriptions' rows the groups read (their events' and Customers', and each customer's
    others), locked until the batch commits."""
    ids = sorted(set().union(*(_subscription_ids(group) for group in groups)))
    if not ids:
        return {}
    customer_ids = sorted({group.record.customer_id for group in groups})
    found = await session.scalars(
        select(models.Subscription)
        .where(
            models.Subscription.stripe_subscription_id.in_(ids)
            | models.Subscription.customer_id.in_(customer_ids)
        )
        .order_by(models.Subscription.stripe_subscription_id)
        .with_for_update()
    )
    return {row.stripe_subscription_id: stored_subscription(row) for row in found}


def stored_subscription(row: models.Subscription) -> StoredSubscription:
    """A `subscriptions` row as the decisions read it."""
    return StoredSubscription(
        customer_id=row.customer_id,
        status=row.status,
        plan=row.plan,
        current_period_end=row.current_period_end,
        cancel_at_period_end=row.cancel_at_period_end,
        last_event_created=row.last_event_created,
        stripe_created=row.stripe_created,
        past_due_since=row.past_due_since,
        own_event_created=row.own_event_created,
        invoice_event_created=row.invoice_event_created,
    )


def held_subscription(
    record: CustomerRecord, rows: Mapping[str, StoredSubscription]
) -> SubscriptionSpec | None:
    """What the Customer holds, for deciding its events: its spec.subscription; when it is billed through
    Stripe and holds none, the newest live subscription on a plan of its customer id's `rows`
    (`newest_live`), which it lost by being made again from manifests that never carry the field
    (restore.py gives it back between events): decided from no base, a failed payment would restart the
    dunning's grace."""
    held = record.customer.spec.subscription
    if held is not None or record.customer.spec.billing.mode != "stripe":
        return held
    return newest_live(record.customer_id, rows, ended="")


def _link(group: _CustomerEvents, known: str | None) -> str | None:
    """The Stripe customer the mirror should remember after the group's events (None: keep its own),
    `known` the Customer's now: the first link once there is none; after that only a completed checkout
    moves it."""
    link: str | None = None
    for event in group.events:
        hint = lookup_hints(event.type, event.data.object).stripe_customer_id
        if hint is not None and (event.type == CHECKOUT_COMPLETED or not known):
            link = known = hint
    return link


async def _apply_to_customer(kube: Kube, group: _CustomerEvents) -> str | Exception:
    """One server-side apply of the Customer's new spec.subscription, when it differs from what it holds
    (after a crash between this apply and the commit, the retry finds it there and writes nothing)."""
    assert group.plan is not None
    subscription = group.plan.subscription
    if (
        not group.plan.applied
        or subscription is None
        or _same(subscription, group.record.customer.spec.subscription)
    ):
        return "unchanged"
    # Onto the Customer the batch read: one made again under its name since did not have these events.
    applied = await apply_subscription(kube, group.record, subscription)
    if applied == "gone":
        log.warning("Customer %s deleted meanwhile; its applied events are unmatched", group.name)
    return applied


async def apply_subscription(
    kube: Kube, record: CustomerRecord, subscription: SubscriptionSpec, *, unchanged_since_read: bool = False
) -> Literal["applied", "gone"] | Exception:
    """The server-side apply of `subscription` as the spec.subscription of the Customer `record` read,
    under the Stripe field manager and naming its uid (`unchanged_since_read`: its resourceVersion too,
    so that nothing written since is overwritten): "gone" when that Customer was deleted meanwhile; the
    error when it was not written (CustomerReplaced: another was made under its name since)."""
    metadata = record.customer.metadata
    try:
        # A cancellation (the inbox stopped mid-batch) lets it finish first: its thread would send it
        # anyway, after the batch's rollback released the batch lock, so another replica's batch could
        # apply newer events before this stale write landed over them; its outcome is no one's then.
        await to_the_end(
            kube.apply_customer_spec(
                record.name,
                {"subscription": subscription.to_k8s()},
                FieldManager.STRIPE,
                uid=metadata.uid,
                resource_version=metadata.resource_version if unchanged_since_read else None,
            )
        )
    except ApiException as error:
        if error.status not in GONE_REFUSALS:
            return error
        now = await _now_there(kube, record)
        if now == "the same":
            return error
        if now == "another":
            # Perhaps the same billing customer (a `kubectl replace --force`, GitOps re-creating it):
            # pending, the next batch finds whose they are afresh.
            return CustomerReplaced(f"Customer {record.name} was made again under its name since it was read")
        return "gone"
    except Exception as error:  # the API server is away: not written
        return error
    return "applied"


class CustomerReplaced(Exception):
    """The Customer a batch read was deleted and another made under its name before the batch wrote it."""


async def _now_there(kube: Kube, record: CustomerRecord) -> Literal["none", "another", "the same"]:
    """Which Customer holds the name of the one the batch read: none (deleted), another (made again
    under its name: another uid), or the same; an error reading it counts as the same (the apply's
    own error stands, the events stay pending)."""
    try:
        body = await kube.read_customer(record.name)
    except Exception:
        return "the same"
    if body is None:
        return "none"
    uid = record.customer.metadata.uid
    return "another" if uid is not None and (body.get("metadata") or {}).get("uid") != uid else "the same"


def _same(new: SubscriptionSpec, held: SubscriptionSpec | None) -> bool:
    return held is not None and new.to_k8s() == held.to_k8s()


async def _record(
    deps: EventApplier, session: AsyncSession, written: Sequence[tuple[_CustomerEvents, bool]]
) -> Mapping[str, Outcome]:
    """The groups' mirror entries, rows and notices (a statement or so for each kind, whatever the
    number of Customers: a batch's round trips were most of its time), and each event's result; with
    each group, whether its Customer was gone when written."""
    await remember_all(
        session, [(group.record.customer, group.record.customer_id, group.link) for group, _ in written]
    )
    await _write_rows(
        session, {sub: row for group, _ in written for sub, row in _plan_of(group).rows.items()}
    )
    outcomes: dict[str, Outcome] = {}
    notices: list[tuple[Notice, CustomerSpec]] = []
    for group, gone in written:
        outcomes.update(_outcomes(group, gone=gone))
        notices += [(notice, group.record.customer.spec) for notice in _notices(deps, group)]
    await deps.outbox.enqueue_all(session, notices)
    return outcomes


def _plan_of(group: _CustomerEvents) -> Coalesced:
    assert group.plan is not None
    return group.plan


def _outcomes(group: _CustomerEvents, *, gone: bool) -> dict[str, Outcome]:
    """Each of the group's events' result."""
    record, plan = group.record, _plan_of(group)
    outcomes: dict[str, Outcome] = {}
    for event, facts, step in zip(group.events, group.facts, plan.steps, strict=True):
        decision = step.decision
        if decision is None or facts is None:
            outcomes[event.id] = Outcome("ignored", record.customer_id)
            continue
        if decision.action == "stale":
            log.info(
                "stripe event %s is older than the state applied for %s; not applied",
                event.id,
                facts.subscription_id,
            )
        result = "unmatched" if gone and decision.action == "apply" else decision.action
        outcomes[event.id] = Outcome("applied" if result == "apply" else result, record.customer_id)
    return outcomes


def _notices(deps: EventApplier, group: _CustomerEvents) -> list[Notice]:
    """What the group's events notice, in their order."""
    record = group.record
    return [
        notice
        for event, facts, step in zip(group.events, group.facts, _plan_of(group).steps, strict=True)
        if step.decision is not None and facts is not None
        for notice in event_notices(
            event.type,
            event.data.object,
            record,
            step.previous,
            step.decision,
            event.created,
            deps.portal_url,
            deps.restricted_for,
        )
    ]


async def _write_rows(session: AsyncSession, rows: Mapping[str, StoredSubscription]) -> None:
    """Upsert the subscriptions' rows (by Stripe subscription id) in one statement."""
    if not rows:
        return
    statement = insert(models.Subscription).values(
        [{"stripe_subscription_id": subscription_id, **asdict(row)} for subscription_id, row in rows.items()]
    )
    state = {field.name: statement.excluded[field.name] for field in fields(StoredSubscription)}
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[models.Subscription.stripe_subscription_id],
            set_={**state, "updated_at": func.now()},
        )
    )


__all__ = [
    "CustomerReplaced",
    "EventApplier",
    "Failure",
    "Outcome",
    "Results",
    "apply_events",
    "apply_subscription",
    "held_subscription",
    "lock_and_read",
    "stored_subscription",
]
