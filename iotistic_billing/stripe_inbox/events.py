"""Pure reading of Stripe events: which customer an event is about, the subscription facts it carries,
and whether those facts may overwrite what the Customer already holds (docs/architecture.md, "Stripe
events").

No I/O here: the apply step (apply.py) reads the Customer and the `subscriptions` rows, asks
`coalesce()` what a Customer's pending events do (`decide()` for each, in Stripe's order), and then writes
what it was told to, once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from iotistic_billing.customer import (
    CUSTOMER_ID_PATTERN,
    ENDED_STATUSES,
    PAID_PLAN_NAMES,
    PAID_STATUSES,
    STRIPE_CUSTOMER_ID_PATTERN,
    STRIPE_SUBSCRIPTION_ID_PATTERN,
    PaidPlanName,
    SubscriptionSpec,
    SubscriptionStatus,
)
from iotistic_billing.prices import PriceCatalog, item_price

CHECKOUT_COMPLETED: Final = "checkout.session.completed"
SUBSCRIPTION_CREATED: Final = "customer.subscription.created"
SUBSCRIPTION_UPDATED: Final = "customer.subscription.updated"
SUBSCRIPTION_DELETED: Final = "customer.subscription.deleted"
SUBSCRIPTION_PAUSED: Final = "customer.subscription.paused"
SUBSCRIPTION_RESUMED: Final = "customer.subscription.resumed"
TRIAL_WILL_END: Final = "customer.subscription.trial_will_end"
INVOICE_PAID: Final = "invoice.payment_succeeded"
# Stripe sends invoice.paid beside invoice.payment_succeeded (and alone for an invoice paid out of band).
INVOICE_PAID_ALSO: Final = "invoice.paid"
INVOICE_FAILED: Final = "invoice.payment_failed"
# Voided by the billing team: nothing is owed on it any more, though nothing was paid.
INVOICE_VOIDED: Final = "invoice.voided"
# Events whose object is the subscription itself: each says its state as of the event.
SUBSCRIPTION_EVENTS: Final = frozenset(
    {
        SUBSCRIPTION_CREATED,
        SUBSCRIPTION_UPDATED,
        SUBSCRIPTION_DELETED,
        SUBSCRIPTION_PAUSED,
        SUBSCRIPTION_RESUMED,
        TRIAL_WILL_END,
    }
)
INVOICE_PAID_EVENTS: Final = frozenset({INVOICE_PAID, INVOICE_PAID_ALSO})
# Events whose object is an invoice of the subscription.
INVOICE_EVENTS: Final = frozenset({*INVOICE_PAID_EVENTS, INVOICE_FAILED, INVOICE_VOIDED})
HANDLED_EVENT_TYPES: Final = frozenset({CHECKOUT_COMPLETED, *SUBSCRIPTION_EVENTS, *INVOICE_EVENTS})
SUBSCRIPTION_STATUSES: Final[tuple[SubscriptionStatus, ...]] = get_args(SubscriptionStatus)
# Statuses under which a subscription still grants its plan (past_due within the operator's grace).
LIVE_STATUSES: Final = PAID_STATUSES | {"past_due"}
# Statuses of a subscription that is not over: live ones, and those that bill again once paid or resumed
# (a cancellation finds them; a checkout beside one would make a second subscription).
OPEN_STATUSES: Final = LIVE_STATUSES | {"unpaid", "paused"}
# A payment failed and is not paid yet: the dunning ladder's statuses.
OVERDUE_STATUSES: Final = frozenset({"past_due", "unpaid"})
# States whose pastDueSince is a payment still owed: overdue ones, and one that ended overdue (dunning ran
# out, or it was canceled with its renewal unpaid): an ending pays nothing.
OWING_STATUSES: Final = OVERDUE_STATUSES | ENDED_STATUSES
# The latest instant a datetime holds (9999-12-31T23:59:59Z): a later Stripe timestamp is not one.
MAX_TIMESTAMP: Final = 253_402_300_799

_CUSTOMER_ID = re.compile(CUSTOMER_ID_PATTERN)
_STRIPE_CUSTOMER_ID = re.compile(STRIPE_CUSTOMER_ID_PATTERN)
_SUBSCRIPTION_ID = re.compile(STRIPE_SUBSCRIPTION_ID_PATTERN)


class StripeEventObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: dict[str, Any]


class StripeEvent(BaseModel):
    """The envelope of a Stripe event as the webhook route accepts it; the object inside is read below."""

    model_config = ConfigDict(extra="allow")

    id: Annotated[str, Field(min_length=1, max_length=255)]
    type: Annotated[str, Field(min_length=1, max_length=100)]
    # Unix seconds: what facts and notices turn into datetimes (milliseconds by mistake are refused).
    created: Annotated[int, Field(ge=0, le=MAX_TIMESTAMP)]
    data: StripeEventObject


@dataclass(frozen=True)
class LookupHints:
    """What an event says about whose it is, strongest first: our id, then Stripe's ids."""

    customer_id: str | None = None
    stripe_customer_id: str | None = None
    subscription_id: str | None = None

    def ids(self) -> frozenset[str]:
        """The ids it names, each with its kind (a Customer's name has no colon: none is mistaken for
        one): events that share one may be the same Customer's, before a lookup says."""
        named = {
            "customer-id": self.customer_id,
            "stripe-customer": self.stripe_customer_id,
            "subscription": self.subscription_id,
        }
        return frozenset(f"{kind}:{value}" for kind, value in named.items() if value is not None)


@dataclass(frozen=True)
class SubscriptionFacts:
    """What one event tells about one subscription; None means the event does not say."""

    subscription_id: str
    status: SubscriptionStatus
    plan: PaidPlanName | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool | None = None
    # When Stripe created the subscription (Unix seconds): of two live ones, the newer wins.
    started: int | None = None
    # Read off an invoice: it adds to what the subscription's own events say, never overrules them.
    from_invoice: bool = False
    # Read with current_period_end from the same object, and only beside it: a start belongs to its end.
    current_period_start: datetime | None = None
    # An invoice's: the end of the period its plan line bills, paid or not (`_invoice_facts_over`).
    billed_until: datetime | None = None
    # A voided invoice's: no longer owed, yet not paid, so it settles only what an ended subscription
    # owed (as its payment would) and says nothing of a live one (`decide`).
    voided: bool = False
    # A declined invoice of the subscription's update (a plan change invoiced at once, a trial ended
    # early): Stripe's pending updates leave the subscription as it was, and without them its own event
    # says past_due, so it says nothing of the status (`decide`).
    update_declined: bool = False
    # Stripe's ended_at of an ended subscription's own event: where its usage period is cut.
    ended_at: datetime | None = None
    # The prices of an update that moved the subscription off a plan's price (its previous items had one,
    # its items have none: a swap in Stripe's Dashboard to a custom price, or to a plan's new price before
    # STRIPE_PRICE_* names it): a warning (apply.read_facts). The subscription keeps its row's plan, as one
    # on a replaced price does: dropping it left a paying customer unlicensed until its next event.
    off_plan: tuple[str, ...] = ()

    @property
    def says_nothing(self) -> bool:
        """An invoice that neither pays nor moves its subscription: voided while it settles nothing an
        ended subscription owed, or a declined update's. The subscription's own events say its status."""
        return self.update_declined or (self.voided and not self.settles_ended)

    @property
    def settles_ended(self) -> bool:
        """An invoice paid (or voided) for a subscription that had ended owing it (`_invoice_facts_over`
        gives it the ended status): nothing is owed any more, the subscription stays ended."""
        return self.from_invoice and self.status in ENDED_STATUSES


@dataclass(frozen=True)
class Decision:
    """`apply`: write `subscription` to the Customer. `stale`: an older event for the same subscription,
    one that would revive an ended subscription, or an invoice that says nothing
    (`SubscriptionFacts.says_nothing`); recorded and acknowledged, nothing written.
    `superseded`: the event is the newest for its own subscription (so its row is written) but the
    Customer holds another, live subscription, or holds none and the event's is on no plan's price."""

    action: Literal["apply", "stale", "superseded"]
    subscription: SubscriptionSpec | None
    record_row: bool


# ----- small readers of Stripe's JSON, tolerant of expanded and unexpanded references -----


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _ref_id(value: object) -> str | None:
    """An id, whether Stripe sent the bare id or the expanded object."""
    if isinstance(value, str):
        return value
    identifier = _mapping(value).get("id")
    return identifier if isinstance(identifier, str) else None


def _matching(value: object, pattern: re.Pattern[str]) -> str | None:
    return value if isinstance(value, str) and pattern.fullmatch(value) else None


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_TIMESTAMP:
        return None
    return datetime.fromtimestamp(value, UTC)


def _period(start: object, end: object) -> tuple[datetime | None, datetime | None]:
    """A billing period's (start, end) from Stripe's timestamps; a start not before its end is none."""
    period_start, period_end = _timestamp(start), _timestamp(end)
    if period_start is not None and (period_end is None or period_start >= period_end):
        period_start = None
    return period_start, period_end


def _status(value: object) -> SubscriptionStatus | None:
    return value if isinstance(value, str) and value in SUBSCRIPTION_STATUSES else None


def paid_plan(value: object) -> PaidPlanName | None:
    """`value` as a paid plan's name, or None (a row or metadata naming no plan of ours)."""
    return value if isinstance(value, str) and value in PAID_PLAN_NAMES else None


def _first_item(subscription: Mapping[str, Any]) -> Mapping[str, Any]:
    data = _mapping(subscription.get("items")).get("data")
    return _mapping(data[0]) if isinstance(data, list) and data else {}


def _invoice_subscription_details(invoice: Mapping[str, Any]) -> Mapping[str, Any]:
    # API versions from 2025-03 moved the subscription of an invoice under parent.subscription_details.
    return _mapping(_mapping(invoice.get("parent")).get("subscription_details")) or _mapping(
        invoice.get("subscription_details")
    )


def _invoice_subscription_id(invoice: Mapping[str, Any]) -> str | None:
    return _ref_id(invoice.get("subscription")) or _ref_id(
        _invoice_subscription_details(invoice).get("subscription")
    )


def _invoice_line(invoice: Mapping[str, Any], catalog: PriceCatalog) -> Mapping[str, Any]:
    """The invoice line of the subscription's plan price: prorations of a plan change come first on an
    upgrade invoice and name the old price, and a renewal's metered lines (the overage of the period
    before, its period) may come first too, so both are passed over. A subscription on a price no
    plan's (one the team replaced in STRIPE_PRICE_*, kept by older subscriptions) still bills its
    period, read off its other lines of the subscription (`_unnamed_plan_line`). An invoice of
    prorations only (an upgrade invoiced at once) names no plan: the subscription's own events say it."""
    data = _mapping(invoice.get("lines")).get("data")
    lines = (
        [_mapping(line) for line in data if not _is_proration(_mapping(line))]
        if isinstance(data, list)
        else []
    )
    on_plan = next((line for line in lines if catalog.plan_for(_line_price_id(line))), None)
    if on_plan is not None:
        return on_plan
    return _unnamed_plan_line(
        invoice, [line for line in lines if _of_subscription(line) and not _is_metered(line, catalog)]
    )


def _unnamed_plan_line(invoice: Mapping[str, Any], lines: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Of the subscription's lines on no price the catalog knows, the plan's, or none (`{}`) when they
    cannot be told apart: a wrong period lifts past_due for the wrong period or records a wrong end,
    while none leaves the period to the subscription's own events. Where the invoice says its own
    period, a line billed in advance starts at its end (Stripe's invoice period looks back: the first
    invoice's is a moment, a renewal's the period before) and a line billed in arrears ends there (a
    metered price not in STRIPE_METERED_PRICES, which newer API versions name by its id alone), so only
    the lines starting there count. Of those, an add-on on another interval (an annual one beside a
    monthly plan) bills another period: lines that disagree on it are no line."""
    billed_from = invoice.get("period_end")
    if _timestamp(billed_from) is not None:
        lines = [line for line in lines if _mapping(line.get("period")).get("start") == billed_from]
    periods = {
        _period(_mapping(line.get("period")).get("start"), _mapping(line.get("period")).get("end"))
        for line in lines
    }
    return lines[0] if len(periods) == 1 else {}


def _is_proration(line: Mapping[str, Any]) -> bool:
    item_details = _mapping(_mapping(line.get("parent")).get("subscription_item_details"))
    return bool(line.get("proration") or item_details.get("proration"))


def _of_subscription(line: Mapping[str, Any]) -> bool:
    """A line of a subscription item (older API versions: type subscription; newer: its parent's
    subscription_item_details), not a one-off invoice item."""
    return line.get("type") == "subscription" or bool(
        _mapping(_mapping(line.get("parent")).get("subscription_item_details"))
    )


def _is_metered(line: Mapping[str, Any], catalog: PriceCatalog) -> bool:
    """A line of usage billed in arrears: a price of STRIPE_METERED_PRICES, or (older API versions, the
    price expanded) one whose usage is metered."""
    recurring = _mapping(_mapping(line.get("price")).get("recurring"))
    return _line_price_id(line) in catalog.metered or recurring.get("usage_type") == "metered"


def _line_price_id(line: Mapping[str, Any]) -> str | None:
    # Older API versions: line.price; newer: line.pricing.price_details.price.
    return _ref_id(line.get("price")) or _ref_id(
        _mapping(_mapping(line.get("pricing")).get("price_details")).get("price")
    )


def event_object(event: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(_mapping(event.get("data")).get("object"))


def other_mode(event: StripeEvent, livemode: bool | None) -> str | None:
    """Why an event is of the other Stripe mode than STRIPE_SECRET_KEY's (`livemode`; None: no key, every
    event accepted), or None: a test-mode event reaching a live deployment, or the reverse (a staging
    cluster sharing customer ids), would change a Customer billed in the other mode. An event that does
    not say its mode is taken."""
    said = (event.model_extra or {}).get("livemode")
    if livemode is None or not isinstance(said, bool) or said == livemode:
        return None
    event_mode, key_mode, flag = ("live", "test", "true") if said else ("test", "live", "false")
    return f"a {event_mode}-mode event (livemode {flag}) while STRIPE_SECRET_KEY is a {key_mode} key"


def previous_attributes(event: StripeEvent) -> Mapping[str, Any]:
    """What an update event changed, as it was before (Stripe's data.previous_attributes)."""
    return _mapping((event.data.model_extra or {}).get("previous_attributes"))


# ----- what an event says -----


def lookup_hints(event_type: str, obj: Mapping[str, Any]) -> LookupHints:
    """Whose event this is: metadata.customerId, client_reference_id, Stripe customer and subscription."""
    metadata = _mapping(obj.get("metadata"))
    customer_id = _matching(metadata.get("customerId"), _CUSTOMER_ID)
    subscription_id: str | None = None
    if event_type == CHECKOUT_COMPLETED:
        customer_id = customer_id or _matching(obj.get("client_reference_id"), _CUSTOMER_ID)
        subscription_id = _ref_id(obj.get("subscription"))
    elif event_type in SUBSCRIPTION_EVENTS:
        subscription_id = _ref_id(obj.get("id"))
    elif event_type in INVOICE_EVENTS:
        subscription_metadata = _mapping(_invoice_subscription_details(obj).get("metadata"))
        customer_id = customer_id or _matching(subscription_metadata.get("customerId"), _CUSTOMER_ID)
        subscription_id = _invoice_subscription_id(obj)
    return LookupHints(
        customer_id=customer_id,
        stripe_customer_id=_matching(_ref_id(obj.get("customer")), _STRIPE_CUSTOMER_ID),
        subscription_id=_matching(subscription_id, _SUBSCRIPTION_ID),
    )


def facts_of_subscription(
    subscription: Mapping[str, Any],
    catalog: PriceCatalog,
    *,
    deleted: bool = False,
    previous: Mapping[str, Any] | None = None,
) -> SubscriptionFacts | None:
    """A Stripe subscription object as facts; None when it has no usable id or status. `previous`: what
    an update changed, as it was (the event's data.previous_attributes)."""
    subscription_id = _matching(_ref_id(subscription.get("id")), _SUBSCRIPTION_ID)
    status: SubscriptionStatus | None = "canceled" if deleted else _status(subscription.get("status"))
    if subscription_id is None or status is None:
        return None
    # The plan's item, beside the metered ones; without exactly one, the event names no plan.
    plan_item = catalog.plan_item(subscription)
    # Newer API versions (2025-03 on) moved the billing period from the subscription to its items (all
    # of a subscription's items share it).
    item = plan_item or _first_item(subscription)
    holder = item if _timestamp(item.get("current_period_end")) is not None else subscription
    period_start, period_end = _period(holder.get("current_period_start"), holder.get("current_period_end"))
    cancel = subscription.get("cancel_at_period_end")
    started = subscription.get("created")
    ended_at = _timestamp(subscription.get("ended_at")) if status in ENDED_STATUSES else None
    prices = _item_prices(subscription)
    moved_off = (
        bool(prices) and not catalog.plan_items(subscription) and bool(catalog.plan_items(previous or {}))
    )
    return SubscriptionFacts(
        subscription_id=subscription_id,
        status=status,
        plan=catalog.plan_for(item_price(plan_item)) if plan_item is not None else None,
        current_period_end=period_end,
        cancel_at_period_end=cancel if isinstance(cancel, bool) else None,
        started=started
        if isinstance(started, int) and not isinstance(started, bool) and started > 0
        else None,
        current_period_start=period_start,
        ended_at=ended_at,
        off_plan=prices if moved_off else (),
    )


def _item_prices(subscription: Mapping[str, Any]) -> tuple[str, ...]:
    data = _mapping(subscription.get("items")).get("data")
    items = [_mapping(item) for item in data] if isinstance(data, list) else []
    return tuple(price for item in items if (price := item_price(item)) is not None)


def _facts_of_checkout(session: Mapping[str, Any], catalog: PriceCatalog) -> SubscriptionFacts | None:
    if session.get("mode") != "subscription":
        return None
    expanded = session.get("subscription")
    if isinstance(expanded, Mapping):
        return facts_of_subscription(expanded, catalog)
    subscription_id = _matching(expanded, _SUBSCRIPTION_ID)
    if subscription_id is None:
        return None
    # The session does not carry the subscription's status: a paid (or free) completed checkout means
    # Stripe made the subscription active; the customer.subscription.* events that follow refine it.
    paid = session.get("payment_status") in ("paid", "no_payment_required")
    return SubscriptionFacts(
        subscription_id=subscription_id,
        status="active" if paid else "incomplete",
        plan=paid_plan(_mapping(session.get("metadata")).get("plan")),
    )


def _facts_of_invoice(
    invoice: Mapping[str, Any], catalog: PriceCatalog, *, paid: bool, voided: bool = False
) -> SubscriptionFacts | None:
    subscription_id = _matching(_invoice_subscription_id(invoice), _SUBSCRIPTION_ID)
    if subscription_id is None:
        return None  # a one-off invoice: no subscription to update
    status: SubscriptionStatus
    if paid or voided:
        # Voided, nothing is owed on it, as when paid; `voided` keeps it from counting as a payment.
        status = "active"
    else:
        # The first invoice of a subscription failing leaves it incomplete; a renewal makes it past_due.
        status = "incomplete" if invoice.get("billing_reason") == "subscription_create" else "past_due"
    line = _invoice_line(invoice, catalog)
    period = _mapping(line.get("period"))
    billed_start, billed_until = _period(period.get("start"), period.get("end"))
    return SubscriptionFacts(
        subscription_id=subscription_id,
        status=status,
        plan=catalog.plan_for(_line_price_id(line)),
        current_period_end=billed_until if paid else None,
        from_invoice=True,
        current_period_start=billed_start if paid else None,
        billed_until=billed_until,
        voided=voided,
        update_declined=not (paid or voided) and invoice.get("billing_reason") == "subscription_update",
    )


def subscription_facts(
    event_type: str,
    obj: Mapping[str, Any],
    catalog: PriceCatalog,
    previous: Mapping[str, Any] | None = None,
) -> SubscriptionFacts | None:
    """The subscription facts a handled event carries; None when it carries none (nothing to apply).
    `previous`: the event's data.previous_attributes, what an update changed."""
    if event_type == CHECKOUT_COMPLETED:
        return _facts_of_checkout(obj, catalog)
    if event_type in SUBSCRIPTION_EVENTS:
        return facts_of_subscription(
            obj, catalog, deleted=event_type == SUBSCRIPTION_DELETED, previous=previous
        )
    if event_type in INVOICE_EVENTS:
        return _facts_of_invoice(
            obj, catalog, paid=event_type in INVOICE_PAID_EVENTS, voided=event_type == INVOICE_VOIDED
        )
    return None


def trial_end(subscription: Mapping[str, Any]) -> datetime | None:
    """When a subscription's trial ends (trial_will_end events)."""
    return _timestamp(subscription.get("trial_end"))


def invoice_id(event_type: str, obj: Mapping[str, Any]) -> str | None:
    """The invoice an event is about: an invoice event's own, a subscription's latest, a checkout's."""
    if event_type in INVOICE_EVENTS:
        return object_id(obj)
    if event_type in SUBSCRIPTION_EVENTS:
        return _ref_id(obj.get("latest_invoice"))
    if event_type == CHECKOUT_COMPLETED:
        return _ref_id(obj.get("invoice"))
    return None


def object_id(obj: Mapping[str, Any]) -> str | None:
    identifier = obj.get("id")
    return identifier if isinstance(identifier, str) and identifier else None


# ----- ordering -----


# The order of a subscription's statuses, for two events of the same second: the later state in
# Stripe's lifecycle wins, whichever worker applies first.
STATUS_ORDER: Final = {
    "incomplete": 0,
    "trialing": 1,
    "active": 2,
    "paused": 3,
    "past_due": 4,
    "unpaid": 5,
    "incomplete_expired": 6,
    "canceled": 7,
}


def decide(
    current: SubscriptionSpec | None,
    stored_last_created: int | None,
    facts: SubscriptionFacts,
    created: int,
    *,
    stored_status: str | None = None,
    current_started: int | None = None,
    stored_period_end: datetime | None = None,
) -> Decision:
    """Whether an event created at `created` may write `facts`, given the Customer's spec.subscription and
    the subscription's row (its `last_event_created` and status; either record may be missing or lost).

    Ordering is per subscription: an older event never overwrites newer state of its subscription, and
    nothing but another ending overwrites an ended one (ENDED_STATUSES); an ending is final, so it
    applies over live state whatever its time (a deletion Stripe retried after the final invoice). Two
    events of the same second apply in STATUS_ORDER, whichever comes first, but for a trial's own event
    over the `active` its first invoice gave (`_trial_goes_on`; `stored_period_end`: the row's
    currentPeriodEnd). A different subscription replaces the Customer's when its event is not older,
    and, live, whatever its event's time when the Customer's no longer grants its plan or Stripe created
    it earlier (two subscriptions' events come in no set order); never a live one with a dead one (the
    final `deleted` of a replaced subscription must not cancel its successor), and never a newer live
    subscription with an older live one (`current_started`: when Stripe created the Customer's; the
    newest live subscription wins, an older one's events are recorded, not applied), but for one on a
    plan over one on no plan's price (an add-on), in either order; one on no plan's price is not held
    by a Customer holding none (another product sold to the same Stripe customer). A voided invoice
    applies only where it settles what an ended subscription owed (`SubscriptionFacts.settles_ended`); a
    declined invoice of an update never does (`SubscriptionFacts.update_declined`).
    """
    if facts.says_nothing:
        # A live subscription's status and dunning are Stripe's own events' to say.
        return Decision("stale", None, record_row=False)
    same = current is not None and current.stripe_subscription_id == facts.subscription_id
    newest = [(stored_last_created, stored_status, stored_period_end)]
    if same and current is not None:
        newest.append((current.last_event_created, current.status, current.current_period_end))
    for last, status, period_end in newest:
        if status in ENDED_STATUSES and facts.status not in ENDED_STATUSES:
            return Decision("stale", None, record_row=False)
        # Only invoices of its last period follow an ending, so live state newer than it is theirs: the
        # ending still wins, or the subscription would stay live for good.
        if last is None or (facts.status in ENDED_STATUSES and status not in ENDED_STATUSES):
            continue
        if created < last or (
            created == last
            and status is not None
            and STATUS_ORDER[facts.status] < STATUS_ORDER.get(status, 0)
            and not _trial_goes_on(facts, status, period_end)
        ):
            return Decision("stale", None, record_row=False)

    if current is not None and not same and current.stripe_subscription_id is not None:
        live = current.status in LIVE_STATUSES
        # Of two live subscriptions, whether the event's is the one Stripe created later (None: either
        # start is unknown, or they are the same).
        newer_subscription: bool | None = None
        if (
            live
            and facts.status in LIVE_STATUSES
            and facts.started is not None
            and current_started is not None
            and facts.started != current_started
        ):
            newer_subscription = facts.started > current_started
        # A live one on a plan over a live one on none (an add-on an earlier version handed the Customer),
        # whenever Stripe made either: only the plan's grants a licence.
        plan_over_none = (
            live and facts.status in LIVE_STATUSES and facts.plan is not None and current.plan is None
        )
        older_subscription = newer_subscription is False and not plan_over_none
        # Events of two subscriptions come in no set order (one's delayed past the other's ending): a
        # live one takes over from one that no longer grants its plan, as `newest_live` hands over, and
        # from an older live one, whatever its event's time.
        takes_over = facts.status in LIVE_STATUSES and (
            not live or newer_subscription is True or plan_over_none
        )
        older = (
            not takes_over and current.last_event_created is not None and created < current.last_event_created
        )
        # A live one on no plan's price (an add-on sold beside the plan, a custom price not in
        # STRIPE_PRICE_*) does not take over one on a plan, live or stopped: the Customer lost its licence
        # while paying, or the stopped one's dunning and ending notice with it.
        planless = facts.status in LIVE_STATUSES and facts.plan is None and current.plan is not None
        # The late payment of an ended subscription settles its row; it does not take the Customer back.
        if (
            older
            or older_subscription
            or planless
            or facts.settles_ended
            or (live and facts.status not in LIVE_STATUSES)
        ):
            return Decision("superseded", None, record_row=True)

    if facts.plan is None and (current is None or current.stripe_subscription_id is None):
        # On no plan's price (another product sold to the same Stripe customer): not the Customer's to
        # hold, whose licence would be the trial's all the same, while the cancel route and the dunning
        # would act on it. A subscription of ours names its plan (the checkout's metadata, its row).
        return Decision("superseded", None, record_row=True)

    base = current if same else None
    period_end = facts.current_period_end or (base.current_period_end if base else None)
    # A start goes with the end it came with: the held one beside a later end (a renewal's invoice
    # without its start) would make a period of two months.
    period_start = facts.current_period_start
    if period_start is None and base is not None and base.current_period_end == period_end:
        period_start = base.current_period_start
    merged = SubscriptionSpec(
        status=facts.status,
        plan=facts.plan or (base.plan if base else None),
        stripe_subscription_id=facts.subscription_id,
        current_period_start=period_start,
        current_period_end=period_end,
        cancel_at_period_end=(
            facts.cancel_at_period_end
            if facts.cancel_at_period_end is not None
            else (base.cancel_at_period_end if base else None)
        ),
        past_due_since=past_due_since(base, facts.status, created, paid=facts.settles_ended),
        last_event_created=created,
        # Kept while it stays ended (an invoice that settles it says no time of its own).
        ended_at=(facts.ended_at or (base.ended_at if base else None))
        if facts.status in ENDED_STATUSES
        else None,
    )
    return Decision("apply", merged, record_row=True)


@dataclass(frozen=True)
class StoredSubscription:
    """A `subscriptions` row as `decide` reads it: the newest known state of one Stripe subscription."""

    customer_id: str
    status: str
    plan: str | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    last_event_created: int
    # When Stripe created the subscription (Unix seconds).
    stripe_created: int | None
    # When its payment first failed, while its status is overdue or it ended so (OWING_STATUSES): the
    # pastDueSince of the state the row holds, kept here because a lost batch leaves the Customer's
    # carrying that batch's outcome.
    past_due_since: datetime | None
    # The `created` of the newest of the subscription's own events recorded, and of the newest of its
    # invoices' (0: none yet; None: a row from before migration 0010, unknown): a late own event is
    # ordered against the first. The newest state is the newer of the two; a row an inbox from before
    # 0010 moved on is not, and counts as unknown (`_own_event_under_invoices`).
    own_event_created: int | None = None
    invoice_event_created: int | None = None


def stored_after(
    customer_id: str,
    row: StoredSubscription | None,
    facts: SubscriptionFacts,
    decision: Decision,
    created: int,
    *,
    own_created: int | None = None,
) -> StoredSubscription:
    """The row once an event recorded it: its newest known state, whether or not the Customer took it.
    `own_created`: the event's own `created`, when it is one of the subscription's own events (`created`
    is then the time its facts are ordered at, later for one delivered after newer invoices)."""
    applied = decision.subscription
    # A row whose times are unknown (from before migration 0010, or moved on by an inbox from before it)
    # takes all it holds as the subscription's own: a late own event older than that stays stale.
    if row is None:
        own_before, invoice_before = 0, 0
    elif _times_known(row):
        own_before, invoice_before = row.own_event_created or 0, row.invoice_event_created or 0
    else:
        own_before, invoice_before = row.last_event_created, 0
    return StoredSubscription(
        customer_id=customer_id,
        status=facts.status,
        plan=applied.plan if applied else (facts.plan or (row.plan if row else None)),
        current_period_end=(
            applied.current_period_end
            if applied
            else (facts.current_period_end or (row.current_period_end if row else None))
        ),
        cancel_at_period_end=bool(
            applied.cancel_at_period_end
            if applied
            else (
                facts.cancel_at_period_end
                if facts.cancel_at_period_end is not None
                else (row.cancel_at_period_end if row else False)
            )
        ),
        last_event_created=created,
        stripe_created=facts.started or (row.stripe_created if row else None),
        past_due_since=(
            applied.past_due_since
            if applied
            else _overdue_since(
                row.status if row else None,
                row.past_due_since if row else None,
                facts.status,
                created,
                paid=facts.settles_ended,
            )
        ),
        own_event_created=own_created if own_created is not None else own_before,
        invoice_event_created=created if facts.from_invoice else invoice_before,
    )


def committed_subscription(
    current: SubscriptionSpec | None,
    rows: Mapping[str, StoredSubscription],
    events: Sequence[tuple[SubscriptionFacts | None, int]],
) -> SubscriptionSpec | None:
    """The Customer's spec.subscription as the last committed apply left it. An apply writes the Customer
    before its transaction commits; when that transaction is lost (a crash, a refused write), the Customer
    is ahead of its subscription's row (written in that transaction, or not there at all) while the
    events that put it there are still pending. They are then decided again from the row's state, the
    one they were decided from the first time (no subscription, when the row is not there), so that each
    gets the same result and notices; otherwise the Customer's own state. The pastDueSince is the row's
    too (the Customer's is the lost batch's outcome: a payment cleared it, a new failure restarted it);
    an overdue row written before rows kept one (migration 0008) takes the Customer's while that is
    overdue as well (or ended so), none otherwise."""
    if current is None or current.stripe_subscription_id is None or current.last_event_created is None:
        return current
    if not any(
        facts is not None
        and facts.subscription_id == current.stripe_subscription_id
        and created == current.last_event_created
        for facts, created in events
    ):
        return current  # not these events' doing (a restored database, say): the Customer is the truth
    row = rows.get(current.stripe_subscription_id)
    if row is None:
        return None
    if row.last_event_created >= current.last_event_created:
        return current
    since = row.past_due_since
    if since is None and row.status in OVERDUE_STATUSES and current.status in OWING_STATUSES:
        since = current.past_due_since
    return _held_from_row(current.stripe_subscription_id, row, since)


def unmatched_row(
    subscription_id: str, row: StoredSubscription, events: Sequence[tuple[SubscriptionFacts, int]]
) -> StoredSubscription | None:
    """The row of a subscription after its events that matched no Customer (`events` in Stripe's order;
    deleted before they were applied, say), decided as a batch would for a Customer holding it, so that
    only a newer state or an ending moves it; None when they move nothing. A Customer made again under
    its customer id is given (restore.py), or decides its events from (`apply.held_subscription`), only
    what Stripe still bills."""
    held = _held_from_row(subscription_id, row, row.past_due_since)
    return coalesce(row.customer_id, held, {subscription_id: row}, events).rows.get(subscription_id)


def _held_from_row(subscription_id: str, row: StoredSubscription, since: datetime | None) -> SubscriptionSpec:
    """A subscription's row as the Customer's spec.subscription, with `since` as its pastDueSince. A
    row keeps no period start: usage is billed by months ending at its currentPeriodEnd until the
    subscription's next event says its start."""
    return SubscriptionSpec.model_validate(
        {
            "status": row.status,
            "plan": row.plan,
            "stripe_subscription_id": subscription_id,
            "current_period_end": row.current_period_end,
            "cancel_at_period_end": row.cancel_at_period_end,
            "past_due_since": since,
            "last_event_created": row.last_event_created,
        }
    )


@dataclass(frozen=True)
class Step:
    """One event's part in a coalesced apply. `decision` None: the event carries no subscription facts.
    `previous`: the Customer's spec.subscription just before this event (what its notices compare with)."""

    decision: Decision | None
    previous: SubscriptionSpec | None


@dataclass(frozen=True)
class Coalesced:
    """What a Customer's pending events do together: each event's step, the Customer's spec.subscription
    after the last of them (one server-side apply), and the final state of each row they recorded."""

    steps: tuple[Step, ...]
    subscription: SubscriptionSpec | None
    rows: Mapping[str, StoredSubscription]
    # The Customer's subscription stopped granting and another live one took over (`newest_live`).
    taken_over: bool = False

    @property
    def applied(self) -> bool:
        return self.taken_over or any(
            step.decision is not None and step.decision.action == "apply" for step in self.steps
        )


def coalesce(
    customer_id: str,
    current: SubscriptionSpec | None,
    rows: Mapping[str, StoredSubscription],
    events: Sequence[tuple[SubscriptionFacts | None, int]],
) -> Coalesced:
    """The pending events of one Customer (`(facts, created)`, in Stripe's order: `created`, then
    arrival) decided one after the other exactly as separate applies would decide them, each against the
    state the ones before it left (`current`: the Customer's spec.subscription; `rows`: the subscriptions'
    rows by id, as read under the Customer's lock), so that the Customer and each row are written once."""
    state = committed_subscription(current, rows, events)
    known = dict(rows)
    written: dict[str, StoredSubscription] = {}
    steps: list[Step] = []
    taken_over = False
    for facts, created in events:
        if facts is None:
            steps.append(Step(None, state))
            continue
        row = known.get(facts.subscription_id)
        held = known.get(state.stripe_subscription_id) if state and state.stripe_subscription_id else None
        same = state is not None and state.stripe_subscription_id == facts.subscription_id
        own_created = None if facts.from_invoice else created
        facts = _invoice_facts_over(facts, row or (state if same else None))
        facts, created = _own_event_under_invoices(facts, created, row, state if same else None)
        decision = decide(
            state,
            row.last_event_created if row else None,
            # What its row knows fills what the event does not say (an invoice's or a status event's
            # facts name no plan): a subscription on a plan is not taken for one on none.
            replace(
                facts,
                started=facts.started or (row.stripe_created if row else None),
                plan=facts.plan or (paid_plan(row.plan) if row else None),
            ),
            created,
            stored_status=row.status if row else None,
            current_started=held.stripe_created if held else None,
            stored_period_end=row.current_period_end if row else None,
        )
        successor = None
        if same and decision.subscription is not None and decision.subscription.status not in LIVE_STATUSES:
            successor = newest_live(customer_id, known, facts.subscription_id)
            if successor is not None:  # the Customer keeps a live subscription: recorded, nothing lost
                decision = Decision("superseded", None, record_row=True)
        steps.append(Step(decision, state))
        if decision.record_row:
            known[facts.subscription_id] = written[facts.subscription_id] = stored_after(
                customer_id, row, facts, decision, created, own_created=own_created
            )
        if decision.action == "apply":
            state = decision.subscription
        elif successor is not None:
            state, taken_over = successor, True
    return Coalesced(tuple(steps), state, written, taken_over)


def _own_event_under_invoices(
    facts: SubscriptionFacts, created: int, row: StoredSubscription | None, held: SubscriptionSpec | None
) -> tuple[SubscriptionFacts, int]:
    """One of the subscription's own events older than its row's newest state, where all that is newer
    came from invoices (newer than the row's `own_event_created`): Stripe sends an upgrade's
    `customer.subscription.updated` and the invoice events of the same moment in no set order, and an
    invoice applied first must not make the upgrade stale. Its facts are ordered at the row's newest
    time instead: its plan, period and cancellation apply; the status stays the invoice's newer one
    (but for Stripe's own `unpaid`, which an invoice's failure does not undo, as in
    `_invoice_facts_over`, and for a trial over the `active` of its own first invoice, read before
    the subscription's events said trialing: `_trial_goes_on`). Endings keep their own rule
    (`decide`); a row from before migration 0010, or one an inbox from before it moved on since (its
    newest state is then neither time), does not know its own events' time, nor does a Customer ahead
    of its row (a lost batch): as before."""
    if (
        facts.from_invoice
        or row is None
        or not _times_known(row)
        or created <= (row.own_event_created or 0)
        or facts.status in ENDED_STATUSES
        or row.status in ENDED_STATUSES
        or (held is not None and (held.last_event_created or 0) > row.last_event_created)
    ):
        return facts, created
    last = row.last_event_created
    if created > last or (created == last and STATUS_ORDER[facts.status] >= STATUS_ORDER.get(row.status, 0)):
        return facts, created  # not older than the row: ordered as any event
    status: SubscriptionStatus | None
    if _trial_goes_on(facts, row.status, row.current_period_end):
        status = "trialing"  # the newer invoice was the trial's own first one: it ended nothing
    else:
        status = "unpaid" if facts.status == "unpaid" and row.status != "active" else _status(row.status)
    ends = [end for end in (facts.current_period_end, row.current_period_end) if end is not None]
    period_end = max(ends, default=None)
    # The event's start only beside its own end; beside the row's later one, `decide` keeps the held start.
    period_start = facts.current_period_start if period_end == facts.current_period_end else None
    return replace(
        facts,
        status=status or facts.status,
        current_period_start=period_start,
        current_period_end=period_end,
    ), last


def _trial_goes_on(facts: SubscriptionFacts, status: str | None, period_end: datetime | None) -> bool:
    """Whether a `trialing` event of a subscription holds over its `active` state ending at
    `period_end`: that state came from an invoice billing up to the trial's end (its first, $0, or a
    plan change's inside it), read while nothing said trialing yet. The invoice that ends a trial, at
    its end or early (`trial_end=now`), bills a new period, and its subscription's `updated` says so."""
    return (
        facts.status == "trialing"
        and status == "active"
        and facts.current_period_end is not None
        and period_end == facts.current_period_end
    )


def _inside_trial(billed_until: datetime | None, known: StoredSubscription | SubscriptionSpec) -> bool:
    """Whether a paid invoice of a trialing subscription ends no trial: it bills up to the trial's end
    (its first, $0) or bills no plan period at all (a plan change's prorations, invoiced at once: no
    plan line). The invoice that ends a trial bills a new period on its plan line."""
    return billed_until is None or billed_until == known.current_period_end


def _times_known(row: StoredSubscription) -> bool:
    """Whether the row's newest state is the newer of its own events' and its invoices' times, as this
    version writes them (not NULL from before migration 0010, nor moved on by an inbox from before it)."""
    own, invoice = row.own_event_created, row.invoice_event_created
    return own is not None and invoice is not None and row.last_event_created == max(own, invoice)


def newest_live(
    customer_id: str, rows: Mapping[str, StoredSubscription], ended: str
) -> SubscriptionSpec | None:
    """The customer's newest other live subscription on a plan (by when Stripe created it, then its
    newest event), as the Customer's spec.subscription, to hold when the one it holds stops granting its
    plan (ended, unpaid, paused): two live ones are two checkouts, and the other one is still billed.
    Paid or resumed later, the one that stopped is the newest live one again and takes the Customer
    back. One on no plan's price (an add-on) is never handed over: its licence would be the trial's, as
    with none held, while the stopped subscription held instead says why its plan lapsed (its dunning,
    its ending's notice)."""
    live = [
        (subscription_id, row)
        for subscription_id, row in rows.items()
        if row.customer_id == customer_id
        and subscription_id != ended
        and row.status in LIVE_STATUSES
        and row.plan is not None
    ]
    if not live:
        return None
    subscription_id, row = max(
        live, key=lambda item: (item[1].stripe_created or 0, item[1].last_event_created)
    )
    return _held_from_row(subscription_id, row, row.past_due_since)


def _invoice_facts_over(
    facts: SubscriptionFacts, known: StoredSubscription | SubscriptionSpec | None
) -> SubscriptionFacts:
    """An invoice's facts on top of what is known of its subscription (its row, else the Customer's):
    the subscription's own events are the authority on its plan and status. The invoice's plan line
    counts only while no plan is known (a first payment): a renewal drafted before a plan change and
    paid after it names the old price. A declined retry leaves an unpaid (suspended) subscription
    unpaid: past_due would give its access back until the ladder's restriction. An invoice of a period
    before the one known is older news still: Stripe's status follows the latest invoice, so paying an
    older one leaves the subscription overdue, and an older one's failed retry starts no dunning. An
    invoice paid up to a trial's end (its first, $0, paid at once; a plan change's inside it) leaves it
    trialing; the one billing a new period (the renewal at its end, an early end) makes it active. An
    ended subscription stays ended (`decide`); paid or voided, the invoice its ending left owed (the
    latest, not an older period's) settles it: the ended status, no pastDueSince."""
    if not facts.from_invoice or known is None:
        return facts
    held = _status(known.status)
    older = (
        facts.billed_until is not None
        and known.current_period_end is not None
        and facts.billed_until < known.current_period_end
    )
    # What an ended subscription owed is its last period's plan: an invoice without a plan line (the final
    # usage, prorations) or of an older period pays something else.
    settles = (
        facts.status == "active"
        and known.past_due_since is not None
        and facts.billed_until is not None
        and known.current_period_end is not None
        and facts.billed_until >= known.current_period_end
    )
    if held in ENDED_STATUSES and not settles:
        return facts  # nothing it owed is paid: stale by the ending's own rule (`decide`)
    if held is not None and (older or held in ENDED_STATUSES):
        return replace(
            facts, status=held, plan=paid_plan(known.plan), current_period_start=None, current_period_end=None
        )
    status: SubscriptionStatus = (
        "unpaid" if known.status == "unpaid" and facts.status != "active" else facts.status
    )
    if held == "trialing" and facts.status == "active" and _inside_trial(facts.billed_until, known):
        status = "trialing"
    return replace(facts, status=status, plan=paid_plan(known.plan) or facts.plan)


def past_due_since(
    base: SubscriptionSpec | None, status: str, created: int, *, paid: bool = False
) -> datetime | None:
    """When the payment first failed: kept while the subscription stays overdue, and when it ends so
    (the payment is still owed; the ladder counts no more), from this event when it becomes overdue,
    gone once it is paid (`paid`: the payment of an ended subscription, `SubscriptionFacts.settles_ended`)."""
    return _overdue_since(
        base.status if base else None, base.past_due_since if base else None, status, created, paid=paid
    )


def _overdue_since(
    before: str | None, since: datetime | None, status: str, created: int, *, paid: bool = False
) -> datetime | None:
    """`past_due_since` of a state of status `before` (None: none) with `since`, moved to `status` by an
    event at `created`: of a Customer's spec.subscription, or of a row (`stored_after`)."""
    if status in ENDED_STATUSES:
        # An ending pays nothing: what the ended subscription owed stays owed until its invoice is paid.
        return since if before in OWING_STATUSES and not paid else None
    if status not in OVERDUE_STATUSES:
        return None
    if before in OVERDUE_STATUSES and since is not None:
        return since
    return datetime.fromtimestamp(created, UTC)


__all__ = [
    "CHECKOUT_COMPLETED",
    "ENDED_STATUSES",
    "HANDLED_EVENT_TYPES",
    "INVOICE_EVENTS",
    "INVOICE_FAILED",
    "INVOICE_PAID",
    "INVOICE_PAID_EVENTS",
    "INVOICE_VOIDED",
    "LIVE_STATUSES",
    "MAX_TIMESTAMP",
    "OVERDUE_STATUSES",
    "OWING_STATUSES",
    "STATUS_ORDER",
    "SUBSCRIPTION_CREATED",
    "SUBSCRIPTION_DELETED",
    "SUBSCRIPTION_EVENTS",
    "SUBSCRIPTION_UPDATED",
    "TRIAL_WILL_END",
    "Coalesced",
    "Decision",
    "LookupHints",
    "Step",
    "StoredSubscription",
    "SubscriptionFacts",
    "coalesce",
    "committed_subscription",
    "decide",
    "event_object",
    "facts_of_subscription",
    "invoice_id",
    "lookup_hints",
    "newest_live",
    "object_id",
    "other_mode",
    "paid_plan",
    "past_due_since",
    "previous_attributes",
    "stored_after",
    "subscription_facts",
    "trial_end",
    "unmatched_row",
]
