"""A NOTIFY on the Stripe inbox's channel (stripe_inbox/inbox.py `EventInbox.replayed`): the console's
replay names the event, whose backoff and its Customer's are forgotten; a delivery's names none."""

from __future__ import annotations

from typing import Any, cast

from iotistic_billing.stripe_inbox.apply import Failure
from iotistic_billing.stripe_inbox.inbox import EventInbox


def failing_inbox() -> EventInbox:
    """An inbox whose events evt_a1, evt_a2 (Customer acme) and evt_b1 (Customer beta) failed, and
    evt_l1, whose lookup failed: it holds back its Stripe customer's id and Customer gamma (found for
    another event naming that id), whose evt_g1 failed too."""
    inbox = EventInbox(
        sessions=cast(Any, None), applier=cast(Any, None), count=lambda *_: None, clock=lambda: 0.0
    )
    for event_id, holds in (
        ("evt_a1", {"acme"}),
        ("evt_a2", {"acme"}),
        ("evt_b1", {"beta"}),
        ("evt_l1", {"stripe-customer:cus_1", "gamma"}),
        ("evt_g1", {"gamma"}),
    ):
        inbox.failed(event_id, Failure(RuntimeError("failed"), frozenset(holds)), "invoice.paid")
    return inbox


def waiting(inbox: EventInbox) -> tuple[set[str], set[str]]:
    return inbox._events_backoff.waiting(), inbox._held_back.waiting()


def test_a_replay_retries_its_customer_s_failed_events_at_once_and_no_one_else_s() -> None:
    inbox = failing_inbox()
    inbox.replayed("evt_a2")
    assert waiting(inbox) == ({"evt_b1", "evt_l1", "evt_g1"}, {"beta", "stripe-customer:cus_1", "gamma"})


def test_a_replayed_event_whose_lookup_failed_retries_what_it_held_back() -> None:
    inbox = failing_inbox()
    inbox.replayed("evt_l1")
    assert waiting(inbox) == ({"evt_a1", "evt_a2", "evt_b1"}, {"acme", "beta"})


def test_a_delivery_s_notify_or_an_unknown_event_forgets_no_backoff() -> None:
    inbox = failing_inbox()
    inbox.replayed("")  # the route's wake
    inbox.replayed("evt_unmatched")  # a replayed event that had not failed here
    assert waiting(inbox) == (
        {"evt_a1", "evt_a2", "evt_b1", "evt_l1", "evt_g1"},
        {"acme", "beta", "stripe-customer:cus_1", "gamma"},
    )


def test_what_a_failed_event_holds_back_waits_until_its_retry_whatever_held_it_back_before() -> None:
    """Found in review: an event's first attempt held back its Customer (its read failed), its second
    the ids it names (its lookup failed); each key had a backoff of its own, so the ids, failed once, were
    due before the event, failed twice, and a newer event naming them went first."""
    now = [0.0]
    inbox = EventInbox(
        sessions=cast(Any, None), applier=cast(Any, None), count=lambda *_: None, clock=lambda: now[0]
    )
    inbox.failed("evt_a", Failure(RuntimeError("read"), frozenset({"acme"})), "invoice.paid")
    now[0] = 1.0
    inbox.failed("evt_a", Failure(RuntimeError("lookup"), frozenset({"subscription:sub_1"})), "invoice.paid")
    now[0] = 2.5  # the event is due at 3 (its second failure)
    assert waiting(inbox) == ({"evt_a"}, {"subscription:sub_1"})
    now[0] = 3.5
    assert waiting(inbox) == (set(), set())
