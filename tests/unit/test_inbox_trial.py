"""A Stripe trial through the inbox's decisions (stripe_inbox/events.py): the subscription's own events
say `trialing`, and the $0 first invoice Stripe makes and pays at once (billing_reason
`subscription_create`) does not end the trial, in whichever order and second the two arrive; the
invoice at the trial's end (billing_reason `subscription_cycle`) does."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from iotistic_billing.customer import SubscriptionSpec
from iotistic_billing.prices import PriceCatalog
from iotistic_billing.stripe_inbox.events import (
    StoredSubscription,
    SubscriptionFacts,
    coalesce,
    subscription_facts,
)

CATALOG = PriceCatalog({"starter": "price_s", "professional": "price_p", "enterprise": "price_e"})
START = 1_800_000_000
DAY = 86400
TRIAL_END = START + 14 * DAY
MONTH = 30 * DAY


def at(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def own_event(event_type: str, status: str, period: tuple[int, int]) -> SubscriptionFacts:
    """The facts of one of sub_1's own events (Stripe's subscription object), on the professional plan."""
    item = {"price": {"id": "price_p"}, "current_period_start": period[0], "current_period_end": period[1]}
    body: dict[str, Any] = {
        "id": "sub_1",
        "object": "subscription",
        "customer": "cus_1",
        "status": status,
        "created": START,
        "cancel_at_period_end": False,
        "trial_end": TRIAL_END,
        "items": {"object": "list", "data": [item]},
    }
    facts = subscription_facts(event_type, body, CATALOG)
    assert facts is not None
    return facts


def paid_invoice(
    billing_reason: str, period: tuple[int, int], amount: int, *, proration: bool = False
) -> SubscriptionFacts:
    """The facts of sub_1's invoice.paid: its plan line bills `period` (`proration`: its one line is a
    plan change's proration, as on an upgrade invoiced at once)."""
    body = {
        "id": f"in_{billing_reason}",
        "object": "invoice",
        "customer": "cus_1",
        "subscription": "sub_1",
        "billing_reason": billing_reason,
        "amount_paid": amount,
        "status": "paid",
        "lines": {
            "data": [
                {
                    "price": {"id": "price_p"},
                    "amount": amount,
                    "proration": proration,
                    "period": {"start": period[0], "end": period[1]},
                }
            ]
        },
    }
    facts = subscription_facts("invoice.paid", body, CATALOG)
    assert facts is not None
    return facts


CREATED = own_event("customer.subscription.created", "trialing", (START, TRIAL_END))
# Stripe's first invoice of a trial: $0, paid at once, its line billing the trial.
FIRST_INVOICE = paid_invoice("subscription_create", (START, TRIAL_END), 0)
WILL_END = own_event("customer.subscription.trial_will_end", "trialing", (START, TRIAL_END))
TRIAL_OVER = own_event("customer.subscription.updated", "active", (TRIAL_END, TRIAL_END + MONTH))
RENEWAL = paid_invoice("subscription_cycle", (TRIAL_END, TRIAL_END + MONTH), 4900)

Events = Sequence[tuple[SubscriptionFacts, int]]


def applied(
    events: Events,
    *,
    one_at_a_time: bool,
    current: SubscriptionSpec | None = None,
    rows: dict[str, StoredSubscription] | None = None,
) -> tuple[SubscriptionSpec | None, dict[str, StoredSubscription]]:
    """The Customer's spec.subscription and the rows after `events`: coalesced in one batch, or one
    batch each (the Customer and the rows written after each)."""
    state, known = current, dict(rows or {})
    for batch in [[one] for one in events] if one_at_a_time else [list(events)]:
        result = coalesce("cust_a", state, known, batch)
        state, known = result.subscription, {**known, **result.rows}
    return state, known


TRIAL_STARTS = [
    pytest.param([(CREATED, START), (FIRST_INVOICE, START)], id="created-first-same-second"),
    pytest.param([(CREATED, START), (FIRST_INVOICE, START + 1)], id="created-first-invoice-a-second-later"),
    pytest.param([(FIRST_INVOICE, START), (CREATED, START)], id="invoice-first-same-second"),
    pytest.param([(FIRST_INVOICE, START + 1), (CREATED, START)], id="invoice-first-a-second-later"),
]


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["coalesced", "one-batch-each"])
@pytest.mark.parametrize("events", TRIAL_STARTS)
def test_a_trial_s_paid_first_invoice_leaves_it_trialing_whatever_the_order(
    events: Events, one_at_a_time: bool
) -> None:
    """Found in review: the $0 first invoice, paid, read as `active` and ranked above `trialing` in
    its second, so the Customer said active (GET /api/subscriptions, its condition, its licence's
    subscription.status claim) for the whole trial but its last three days."""
    state, rows = applied(events, one_at_a_time=one_at_a_time)
    assert state is not None
    assert (state.status, state.plan, state.current_period_end) == ("trialing", "professional", at(TRIAL_END))
    assert rows["sub_1"].status == "trialing"


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["coalesced", "one-batch-each"])
@pytest.mark.parametrize(
    "ending",
    [
        pytest.param([(TRIAL_OVER, TRIAL_END), (RENEWAL, TRIAL_END)], id="updated-first"),
        pytest.param([(RENEWAL, TRIAL_END), (TRIAL_OVER, TRIAL_END)], id="renewal-first"),
        pytest.param([(RENEWAL, TRIAL_END + 1), (TRIAL_OVER, TRIAL_END)], id="renewal-a-second-later-first"),
        pytest.param([(RENEWAL, TRIAL_END)], id="renewal-alone"),
    ],
)
@pytest.mark.parametrize("start", TRIAL_STARTS)
def test_the_renewal_at_the_trial_s_end_makes_it_active(
    start: Events, ending: Events, one_at_a_time: bool
) -> None:
    """The invoice of the first paid period (billing_reason subscription_cycle) ends the trial, with
    or without the subscription's own `updated`."""
    trial, rows = applied([*start, (WILL_END, TRIAL_END - 3 * DAY)], one_at_a_time=one_at_a_time)
    assert trial is not None and trial.status == "trialing"
    state, rows = applied(ending, one_at_a_time=one_at_a_time, current=trial, rows=rows)
    assert state is not None
    assert (state.status, state.current_period_end) == ("active", at(TRIAL_END + MONTH))
    assert rows["sub_1"].status == "active"


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["coalesced", "one-batch-each"])
@pytest.mark.parametrize("invoice_at", [START, START + 1])
@pytest.mark.parametrize("invoice_first", [False, True])
def test_a_subscription_without_a_trial_whose_first_invoice_is_paid_is_active(
    invoice_first: bool, invoice_at: int, one_at_a_time: bool
) -> None:
    """No trial (a coupon of 100 %, or a first payment): the first invoice paid leaves it active."""
    created = own_event("customer.subscription.created", "active", (START, START + MONTH))
    first = paid_invoice("subscription_create", (START, START + MONTH), 0)
    events = (
        [(first, invoice_at), (created, START)] if invoice_first else [(created, START), (first, invoice_at)]
    )
    state, rows = applied(events, one_at_a_time=one_at_a_time)
    assert state is not None and (state.status, rows["sub_1"].status) == ("active", "active")


def test_a_first_invoice_paid_while_the_subscription_is_incomplete_makes_it_active() -> None:
    """The first payment of a subscription created `incomplete` (a card asking for 3-D Secure)."""
    created = own_event("customer.subscription.created", "incomplete", (START, START + MONTH))
    first = paid_invoice("subscription_create", (START, START + MONTH), 4900)
    for events in ([(created, START), (first, START + 5)], [(first, START + 5), (created, START)]):
        state, _ = applied(events, one_at_a_time=False)
        assert state is not None and state.status == "active"


LONG_TRIAL_END = START + 60 * DAY
EARLY_END = START + 5 * DAY


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["coalesced", "one-batch-each"])
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_trial_ended_early_is_active_on_its_new_period(order: tuple[int, ...], one_at_a_time: bool) -> None:
    """Found in review: a 60-day trial whose plan is changed and then ended (`trial_end=now`) in one
    second sends the plan change's `updated` (trialing to day 60), the ending's `updated` (active, a new
    period to day 35) and its invoice: with the trialing event last it stayed trialing to day 60 (the
    usage months cut there, the licence's claim wrong) until the next renewal."""
    created = own_event("customer.subscription.created", "trialing", (START, LONG_TRIAL_END))
    first = paid_invoice("subscription_create", (START, LONG_TRIAL_END), 0)
    trial, rows = applied([(created, START), (first, START)], one_at_a_time=False)
    new_period = (EARLY_END, EARLY_END + MONTH)
    events = [
        own_event("customer.subscription.updated", "trialing", (START, LONG_TRIAL_END)),
        own_event("customer.subscription.updated", "active", new_period),
        paid_invoice("subscription_update", new_period, 4900),
    ]
    ordered = [(events[index], EARLY_END) for index in order]
    state, rows = applied(ordered, one_at_a_time=one_at_a_time, current=trial, rows=rows)
    assert state is not None
    assert (state.status, state.current_period_end) == ("active", at(EARLY_END + MONTH))


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["coalesced", "one-batch-each"])
@pytest.mark.parametrize("invoice_at", [0, 1])
@pytest.mark.parametrize("invoice_first", [False, True])
def test_a_plan_change_inside_the_trial_leaves_it_trialing(
    invoice_first: bool, invoice_at: int, one_at_a_time: bool
) -> None:
    """Found in review: an upgrade on the trial's third day with `proration_behavior=always_invoice`
    has Stripe pay a $0 invoice (billing_reason subscription_update) of proration lines for the rest of
    the trial, which read as the end of the trial: active for the rest of it."""
    trial, rows = applied([(CREATED, START), (FIRST_INVOICE, START)], one_at_a_time=False)
    changed_at = START + 3 * DAY
    updated = own_event("customer.subscription.updated", "trialing", (START, TRIAL_END))
    proration = paid_invoice("subscription_update", (changed_at, TRIAL_END), 0, proration=True)
    events = [(updated, changed_at), (proration, changed_at + invoice_at)]
    state, rows = applied(
        events[::-1] if invoice_first else events, one_at_a_time=one_at_a_time, current=trial, rows=rows
    )
    assert state is not None
    assert (state.status, state.current_period_end) == ("trialing", at(TRIAL_END))
    assert rows["sub_1"].status == "trialing"
