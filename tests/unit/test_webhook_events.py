"""The pure reading of Stripe events: verification, facts, whose they are, and the ordering decision."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pytest
import stripe

from iotistic_billing.customer import CustomerSpec, SubscriptionSpec
from iotistic_billing.db import models
from iotistic_billing.db.retention import retention_cutoff
from iotistic_billing.errors import BadRequest, DependencyUnavailable, Unavailable, ValidationFailed
from iotistic_billing.prices import PriceCatalog
from iotistic_billing.settings import STRIPE_EVENT_RETENTION_MIN_DAYS
from iotistic_billing.stripe_api import _stripe
from iotistic_billing.stripe_inbox import apply
from iotistic_billing.stripe_inbox.apply import InvoiceLines, listed_once, read_facts, with_all_lines
from iotistic_billing.stripe_inbox.events import (
    MAX_TIMESTAMP,
    Coalesced,
    LookupHints,
    StoredSubscription,
    StripeEvent,
    StripeEventObject,
    SubscriptionFacts,
    coalesce,
    committed_subscription,
    decide,
    lookup_hints,
    newest_live,
    other_mode,
    subscription_facts,
    unmatched_row,
)
from iotistic_billing.stripe_inbox.inbox import MAX_PAUSE, pause_after, within_size
from iotistic_billing.stripe_inbox.retention import FINAL_RESULTS, expired
from iotistic_billing.webhook_server.console.data import EVENT_RESULTS
from iotistic_billing.webhook_server.console.pages import replayable
from iotistic_billing.webhook_server.metrics import Metrics, RefusalReason
from iotistic_billing.webhook_server.webhooks import (
    REFUSAL_ADVICE,
    REFUSAL_LOG_SECONDS,
    DeliveryRefusals,
    SignatureRefused,
    verify_event,
)

CATALOG = PriceCatalog({"starter": "price_s", "professional": "price_p", "enterprise": "price_e"})
PERIOD_END = 1_900_000_000
AT_PERIOD_END = datetime.fromtimestamp(PERIOD_END, UTC)
MONTH = 30 * 86400


SECRET = "whsec_unit"


def signed(payload: bytes) -> str:
    return stripe.WebhookSignature.generate_signature_header(payload.decode(), SECRET)


def envelope(**overrides: Any) -> bytes:
    body = {"id": "evt_1", "type": "customer.created", "created": 1_800_000_000, "data": {"object": {}}}
    return json.dumps({**body, **overrides}).encode()


def test_a_signature_header_that_is_not_ascii_is_an_invalid_signature() -> None:
    # stripe's hmac.compare_digest raises TypeError on such text: once a 500.
    with pytest.raises(BadRequest) as refused:
        verify_event(envelope(), f"t={int(time.time())},v1=é", SECRET)
    assert refused.value.error == "Invalid signature" and "Stripe-Signature" in refused.value.message


@pytest.mark.parametrize(("ahead", "accepted"), [(60, True), (301 + 60, False)])
def test_a_signature_dated_ahead_is_refused_beyond_the_tolerance(ahead: int, accepted: bool) -> None:
    """Found in review: Stripe's check refuses old signatures only, so one dated an hour ahead could be
    replayed for an hour and five minutes; a clock a minute apart is no reason to refuse."""
    payload = envelope()
    header = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), SECRET, timestamp=int(time.time()) + ahead
    )
    if accepted:
        assert verify_event(payload, header, SECRET).id == "evt_1"
        return
    with pytest.raises(BadRequest) as refused:
        verify_event(payload, header, SECRET)
    assert refused.value.error == "Invalid signature"
    assert refused.value.message.startswith("Timestamp outside the tolerance zone")


SIGNED_AT = 1_800_000_000


@pytest.mark.parametrize(
    ("header", "now", "reason"),
    [
        (None, SIGNED_AT, "missing"),
        ("t=abc,v1=def", SIGNED_AT, "malformed"),
        (f"t={SIGNED_AT},v2=def", SIGNED_AT, "malformed"),
        ("v1=def", SIGNED_AT, "malformed"),
        # Bare items Stripe's SDK cannot read either: its error must not read as a rolled secret.
        ("signed-with:t", SIGNED_AT, "malformed"),
        ("signed-with:v1", SIGNED_AT, "malformed"),
        ("signed", SIGNED_AT + 300.4, "stale"),  # Stripe's own check refuses past 300.0 s
        ("signed:wrong-secret", SIGNED_AT, "mismatch"),
        ("signed:wrong-secret", SIGNED_AT + 3600, "mismatch"),  # the signature first, as Stripe's SDK
        ("signed", SIGNED_AT + 301, "stale"),
        ("signed", SIGNED_AT - 301, "ahead"),
    ],
)
def test_a_refused_signature_says_which_check_refused_it(header: str | None, now: float, reason: str) -> None:
    """Found in review: a clock 5 minutes off and a rolled signing secret were the same 400 and the same
    alert; the refusal names its reason (the metric's label)."""
    payload = envelope()
    if header is not None and header.startswith("signed"):
        secret = "whsec_other" if header.endswith("wrong-secret") else SECRET
        bare = header.partition("signed-with:")[2]
        header = stripe.WebhookSignature.generate_signature_header(
            payload.decode(), secret, timestamp=SIGNED_AT
        )
        if bare:
            header = f"{bare},{header}"
    with pytest.raises(SignatureRefused) as refused:
        verify_event(payload, header, SECRET, now=now)
    assert refused.value.reason == reason and refused.value.error == "Invalid signature"


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_a_signature_within_the_tolerance_either_way_is_accepted(offset: int) -> None:
    payload = envelope()
    header = stripe.WebhookSignature.generate_signature_header(payload.decode(), SECRET, timestamp=SIGNED_AT)
    assert verify_event(payload, header, SECRET, now=SIGNED_AT + offset).id == "evt_1"


def test_refusals_of_a_reason_are_one_warning_in_a_while_that_counts_the_ones_between(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: a forged post a second would be a warning a second; a reason's warning comes once
    in REFUSAL_LOG_SECONDS, with the advice for it, and the next one counts what it left out."""
    now = [0.0]
    refusals = DeliveryRefusals(clock=lambda: now[0])
    mismatch = ("mismatch", "No signatures found matching the expected signature for payload")
    stale = ("stale", "Timestamp outside the tolerance zone (1)")
    with caplog.at_level(logging.WARNING):
        refusals.refused(*mismatch)
        refusals.refused(*stale)  # another reason has a line of its own
        for _ in range(3):
            now[0] += 60
            refusals.refused(*mismatch)
        now[0] = REFUSAL_LOG_SECONDS
        refusals.refused(*mismatch)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    assert "(mismatch)" in lines[0] and "STRIPE_WEBHOOK_SECRET" in lines[0] and "more refused" not in lines[0]
    assert "(stale)" in lines[1] and "clock" in lines[1]
    assert "(mismatch)" in lines[2] and "(3 more refused so since the last line)" in lines[2]


def test_a_signed_body_nested_deeper_than_the_parser_recurses_is_not_json() -> None:
    payload = b"[" * 5000 + b"]" * 5000
    with pytest.raises(ValidationFailed) as refused:
        verify_event(payload, signed(payload), SECRET)
    assert refused.value.message == "body: is not valid JSON"


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_signed_body_with_a_number_json_has_not_is_not_json(constant: bytes) -> None:
    # json.loads reads them; JSONB refuses them, which answered Stripe 500 and had it retry for days.
    payload = envelope().replace(
        b'"data": {"object": {}}', b'"data": {"object": {"amount": ' + constant + b"}}"
    )
    with pytest.raises(ValidationFailed) as refused:
        verify_event(payload, signed(payload), SECRET)
    assert refused.value.message == "body: is not valid JSON"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"created": 2**63}, "created"),
        ({"created": 1_800_000_000_000}, "created"),  # milliseconds, by mistake: no datetime holds it
        ({"id": "evt_\x00"}, "id"),
        ({"type": "customer.\x00"}, "type"),
        ({"data": {"object": {"items": [{"note": "a\x00"}]}}}, "data.object.items.0.note"),
        ({"data": {"object": {"k\x00": 1}}}, "data.object"),
        ({"request": {"idempotency_key": "\x00"}}, "request.idempotency_key"),
        # json.loads reads an escaped lone surrogate, which no UTF-8 text or JSONB holds.
        ({"data": {"object": {"name": "a\ud800"}}}, "data.object.name"),
        ({"data": {"object": {"\udcff": 1}}}, "data.object"),
    ],
)
def test_a_signed_event_the_table_cannot_hold_names_the_field(overrides: dict[str, Any], field: str) -> None:
    payload = envelope(**overrides)
    with pytest.raises(ValidationFailed) as refused:
        verify_event(payload, signed(payload), SECRET)
    assert refused.value.details[0]["field"] == field and refused.value.message.startswith(f"{field}: ")


def test_a_signed_event_at_the_limits_of_the_table_is_accepted() -> None:
    payload = envelope(created=MAX_TIMESTAMP, data={"object": {"deep": json.loads("[" * 900 + "]" * 900)}})
    assert verify_event(payload, signed(payload), SECRET).created == MAX_TIMESTAMP


def subscription(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "sub_1",
        "object": "subscription",
        "customer": "cus_1",
        "status": "active",
        "cancel_at_period_end": False,
        "metadata": {"customerId": "cust_abcdef123"},
        "items": {"object": "list", "data": [{"price": {"id": "price_p"}, "current_period_end": PERIOD_END}]},
    }
    body.update(overrides)
    return body


def test_subscription_facts_read_the_period_from_the_items() -> None:
    facts = subscription_facts("customer.subscription.updated", subscription(), CATALOG)
    assert facts == SubscriptionFacts("sub_1", "active", "professional", AT_PERIOD_END, False)


def test_a_subscription_ended_inside_its_period_keeps_when_it_ended() -> None:
    """Found in review: a deletion's ended_at was not read, so a subscription cancelled immediately (by
    an admin, or by Stripe's dunning) held its period to the old end, and the usage period ran on there
    on the paid plan (usage.service.customer_period cuts it at spec.subscription.endedAt now)."""
    ended = PERIOD_END - 20 * 86400
    live = SubscriptionSpec(status="active", plan="professional", stripe_subscription_id="sub_1")
    deleted = subscription_facts("customer.subscription.deleted", subscription(ended_at=ended), CATALOG)
    assert deleted is not None and deleted.ended_at == datetime.fromtimestamp(ended, UTC)

    decision = decide(live, None, deleted, created=ended + 1)

    assert decision.subscription is not None
    assert decision.subscription.status == "canceled"
    assert decision.subscription.ended_at == datetime.fromtimestamp(ended, UTC)
    assert "endedAt" in decision.subscription.to_k8s()
    # A live subscription's own ended_at (none; a stray one) is not kept: only an ending has one.
    updated = subscription_facts("customer.subscription.updated", subscription(ended_at=ended), CATALOG)
    assert updated is not None and updated.ended_at is None


def test_subscription_facts_fall_back_to_the_period_on_the_subscription() -> None:
    legacy = subscription(
        items={"data": [{"price": {"id": "price_s"}}]},
        current_period_end=PERIOD_END,
        cancel_at_period_end=True,
    )
    facts = subscription_facts("customer.subscription.updated", legacy, CATALOG)
    assert facts == SubscriptionFacts("sub_1", "active", "starter", AT_PERIOD_END, True)


def test_subscription_facts_read_stripe_s_period_start_where_they_read_its_end() -> None:
    start = PERIOD_END - 28 * 86400
    items = {
        "data": [
            {"price": {"id": "price_p"}, "current_period_start": start, "current_period_end": PERIOD_END}
        ]
    }
    legacy = subscription(
        items={"data": [{"price": {"id": "price_p"}}]},
        current_period_start=start,
        current_period_end=PERIOD_END,
    )
    for body in (subscription(items=items), legacy):
        facts = subscription_facts("customer.subscription.updated", body, CATALOG)
        assert facts is not None and facts.current_period_start == datetime.fromtimestamp(start, UTC)
        assert facts.current_period_end == AT_PERIOD_END
    # A start not before its end is no period's start: the end alone is read.
    backwards = subscription(
        items={
            "data": [
                {
                    "price": {"id": "price_p"},
                    "current_period_start": PERIOD_END + 1,
                    "current_period_end": PERIOD_END,
                }
            ]
        }
    )
    facts = subscription_facts("customer.subscription.updated", backwards, CATALOG)
    assert facts is not None and (facts.current_period_start, facts.current_period_end) == (
        None,
        AT_PERIOD_END,
    )


def test_a_paid_invoice_carries_its_plan_line_s_period_start() -> None:
    start = PERIOD_END - 31 * 86400
    invoice = {
        "subscription": "sub_1",
        "lines": {"data": [{"price": {"id": "price_e"}, "period": {"start": start, "end": PERIOD_END}}]},
    }
    paid = subscription_facts("invoice.payment_succeeded", invoice, CATALOG)
    assert paid is not None and paid.current_period_start == datetime.fromtimestamp(start, UTC)
    failed = subscription_facts("invoice.payment_failed", invoice, CATALOG)
    assert failed is not None and failed.current_period_start is None


def test_subscription_facts_read_the_plan_item_beside_metered_ones_in_any_order() -> None:
    metered = {"price": {"id": "price_devices_overage"}, "current_period_end": PERIOD_END}
    plan = {"price": {"id": "price_e"}, "current_period_end": PERIOD_END}
    for items in ([metered, plan], [plan, metered]):
        facts = subscription_facts(
            "customer.subscription.updated", subscription(items={"data": items}), CATALOG
        )
        assert facts == SubscriptionFacts("sub_1", "active", "enterprise", AT_PERIOD_END, False)
    # Two plan items: the event names no plan (the Customer keeps the one it has), but still its period.
    both = subscription(
        items={"data": [plan, {"price": {"id": "price_s"}, "current_period_end": PERIOD_END}]}
    )
    facts = subscription_facts("customer.subscription.updated", both, CATALOG)
    assert facts == SubscriptionFacts("sub_1", "active", None, AT_PERIOD_END, False)


def test_a_deleted_subscription_is_canceled_and_an_unknown_price_has_no_plan() -> None:
    facts = subscription_facts(
        "customer.subscription.deleted",
        subscription(items={"data": [{"price": {"id": "price_other"}}]}),
        CATALOG,
    )
    assert facts is not None and (facts.status, facts.plan) == ("canceled", None)


def test_a_subscription_moved_to_a_price_no_plan_s_is_a_warning_and_keeps_its_plan(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: a subscription's own event whose items are on no plan's price named no plan, as an
    event that does not say, so a swap in Stripe's Dashboard from professional to a custom price kept
    professional in silence. An update that moves it off a plan's price (its previous items had one) is
    a warning naming the subscription, the Customer and the price. It keeps its plan: dropping it (this
    stop's first fix) left a paying customer unlicensed when the team moved subscriptions to a plan's new
    price before STRIPE_PRICE_* named it, until each one's next event."""
    custom = subscription(
        items={"data": [{"price": {"id": "price_custom"}, "current_period_end": PERIOD_END}]}
    )
    swap = StripeEvent.model_validate(
        {
            "id": "evt_swap",
            "type": "customer.subscription.updated",
            "created": 300,
            "data": {"object": custom, "previous_attributes": {"items": subscription()["items"]}},
        }
    )
    caplog.set_level(logging.WARNING, logger="iotistic_billing.stripe_inbox")
    moved = read_facts(swap, CATALOG, "acme")
    [warning] = [r.getMessage() for r in caplog.records]
    assert "sub_1" in warning and "price_custom" in warning and "acme" in warning
    assert "keeps the plan it had" in warning
    held, rows = current(plan="professional"), row(plan="professional")
    result = coalesce("cust_a", held, rows, [(moved, 300)])
    assert result.subscription == current(plan="professional", last_event_created=300)
    assert result.rows["sub_1"].plan == "professional"
    # Its renewal (no previous items) on the custom price: no warning again, the plan still kept.
    renewal = read_facts(swap.model_copy(update={"data": StripeEventObject(object=custom)}), CATALOG, "acme")
    again = coalesce("cust_a", result.subscription, result.rows, [(renewal, 400)])
    assert again.subscription == current(plan="professional", last_event_created=400)
    assert len(caplog.records) == 1


@pytest.mark.parametrize(
    ("livemode", "event_livemode", "other"),
    [
        (True, False, "a test-mode event (livemode false) while STRIPE_SECRET_KEY is a live key"),
        (False, True, "a live-mode event (livemode true) while STRIPE_SECRET_KEY is a test key"),
        (True, True, None),
        (False, False, None),
        (None, True, None),  # no key: every event, as before
        (True, None, None),  # an event that does not say
    ],
)
def test_an_event_of_the_other_stripe_mode_than_the_key_s_is_told_apart(
    livemode: bool | None, event_livemode: bool | None, other: str | None
) -> None:
    """Found in review: livemode was never read, so a test-mode event reaching a live deployment (or the
    reverse: a staging cluster sharing customer ids) was applied; it is recorded ignored, saying why."""
    body: dict[str, Any] = {"id": "evt_1", "type": "invoice.paid", "created": 100, "data": {"object": {}}}
    if event_livemode is not None:
        body["livemode"] = event_livemode
    assert other_mode(StripeEvent.model_validate(body), livemode) == other


def test_checkout_sessions_carry_the_subscription_and_the_plan_of_their_metadata() -> None:
    session = {
        "mode": "subscription",
        "payment_status": "paid",
        "subscription": "sub_9",
        "client_reference_id": "cust_abcdef123",
        "customer": "cus_9",
        "metadata": {"plan": "enterprise"},
    }
    assert subscription_facts("checkout.session.completed", session, CATALOG) == SubscriptionFacts(
        "sub_9", "active", "enterprise"
    )
    assert lookup_hints("checkout.session.completed", session) == LookupHints(
        "cust_abcdef123", "cus_9", "sub_9"
    )
    unpaid = {**session, "payment_status": "unpaid"}
    assert subscription_facts("checkout.session.completed", unpaid, CATALOG).status == "incomplete"  # type: ignore[union-attr]
    payment = {**session, "mode": "payment"}
    assert subscription_facts("checkout.session.completed", payment, CATALOG) is None


def test_an_expanded_subscription_in_a_checkout_session_is_read_whole() -> None:
    session = {"mode": "subscription", "subscription": subscription(status="trialing")}
    facts = subscription_facts("checkout.session.completed", session, CATALOG)
    assert facts == SubscriptionFacts("sub_1", "trialing", "professional", AT_PERIOD_END, False)


@pytest.mark.parametrize("api", ["2025", "legacy"])
def test_invoices_of_both_api_shapes(api: str) -> None:
    line: dict[str, Any] = {"period": {"end": PERIOD_END}}
    invoice: dict[str, Any] = {"customer": "cus_1", "billing_reason": "subscription_cycle"}
    if api == "2025":
        line["pricing"] = {"price_details": {"price": "price_e"}}
        invoice["parent"] = {
            "subscription_details": {"subscription": "sub_1", "metadata": {"customerId": "cust_abcdef123"}}
        }
        proration = {
            "parent": {"subscription_item_details": {"proration": True}},
            "pricing": {"price_details": {"price": "price_s"}},
        }
    else:
        line["price"] = {"id": "price_e"}
        invoice["subscription"] = "sub_1"
        invoice["subscription_details"] = {"metadata": {"customerId": "cust_abcdef123"}}
        proration = {"proration": True, "price": {"id": "price_s"}}
    invoice["lines"] = {"data": [proration, line]}

    paid = subscription_facts("invoice.payment_succeeded", invoice, CATALOG)
    assert paid == SubscriptionFacts(
        "sub_1", "active", "enterprise", AT_PERIOD_END, from_invoice=True, billed_until=AT_PERIOD_END
    )
    failed = subscription_facts("invoice.payment_failed", invoice, CATALOG)
    assert failed is not None and (failed.status, failed.current_period_end) == ("past_due", None)
    first = subscription_facts(
        "invoice.payment_failed", {**invoice, "billing_reason": "subscription_create"}, CATALOG
    )
    assert first is not None and first.status == "incomplete"
    assert lookup_hints("invoice.payment_failed", invoice) == LookupHints("cust_abcdef123", "cus_1", "sub_1")


def test_a_renewal_invoice_is_read_from_its_plan_line_whatever_metered_lines_come_first() -> None:
    # The overage of the period before is a metered line, of that period, and may be listed first.
    earlier = PERIOD_END - 30 * 86400
    invoice = {
        "subscription": "sub_1",
        "billing_reason": "subscription_cycle",
        "lines": {
            "data": [
                {"price": {"id": "price_meter_devices"}, "period": {"end": earlier}},
                {"price": {"id": "price_e"}, "period": {"end": PERIOD_END}},
            ]
        },
    }
    paid = subscription_facts("invoice.payment_succeeded", invoice, CATALOG)
    assert paid == SubscriptionFacts(
        "sub_1", "active", "enterprise", AT_PERIOD_END, from_invoice=True, billed_until=AT_PERIOD_END
    )


def test_an_invoice_of_prorations_only_names_no_plan() -> None:
    # An upgrade invoiced at once: "Unused time on Starter" first; the subscription's events say the plan.
    invoice = {
        "subscription": "sub_1",
        "lines": {
            "data": [
                {"proration": True, "price": {"id": "price_s"}},
                {"proration": True, "price": {"id": "price_p"}},
            ]
        },
    }
    assert subscription_facts("invoice.payment_succeeded", invoice, CATALOG) == SubscriptionFacts(
        "sub_1", "active", from_invoice=True
    )


@pytest.mark.parametrize("end", [10**12, 2**62])
def test_a_timestamp_no_datetime_holds_is_not_read(end: int) -> None:
    # Milliseconds by mistake raised out of the batch, and stopped every Customer's events.
    facts = subscription_facts(
        "customer.subscription.updated",
        subscription(items={"data": [{"price": {"id": "price_p"}, "current_period_end": end}]}),
        CATALOG,
    )
    assert facts == SubscriptionFacts("sub_1", "active", "professional", None, False)


def test_a_one_off_invoice_carries_no_subscription() -> None:
    assert (
        subscription_facts("invoice.payment_succeeded", {"customer": "cus_1", "lines": {"data": []}}, CATALOG)
        is None
    )


def test_hints_ignore_values_that_are_not_ids() -> None:
    hints = lookup_hints(
        "customer.subscription.updated",
        subscription(metadata={"customerId": "DROP TABLE"}, customer={"id": "cus_2", "object": "customer"}),
    )
    assert hints == LookupHints(None, "cus_2", "sub_1")


def current(**overrides: Any) -> SubscriptionSpec:
    values: dict[str, Any] = {
        "status": "active",
        "plan": "starter",
        "stripe_subscription_id": "sub_1",
        "current_period_end": AT_PERIOD_END,
        "cancel_at_period_end": False,
        "last_event_created": 100,
    }
    values.update(overrides)
    return SubscriptionSpec(**values)


def test_a_newer_event_applies_and_keeps_what_it_does_not_say() -> None:
    decision = decide(current(), 100, SubscriptionFacts("sub_1", "past_due"), 150)
    assert decision.action == "apply" and decision.record_row
    overdue_since = datetime.fromtimestamp(150, UTC)  # the dunning ladder counts from the failure
    assert decision.subscription == current(
        status="past_due", last_event_created=150, past_due_since=overdue_since
    )
    # Still overdue later: the ladder keeps counting from the first failure; paid: it stops.
    later = decide(decision.subscription, 150, SubscriptionFacts("sub_1", "past_due"), 200)
    assert later.subscription is not None and later.subscription.past_due_since == overdue_since
    paid = decide(later.subscription, 200, SubscriptionFacts("sub_1", "active"), 250)
    assert paid.subscription is not None and paid.subscription.past_due_since is None


def test_a_period_start_is_kept_only_beside_the_end_it_came_with() -> None:
    start = datetime.fromtimestamp(PERIOD_END - 30 * 86400, UTC)
    held = current(current_period_start=start)
    # An event that says the same end and no start keeps the start.
    same_end = decide(
        held, None, SubscriptionFacts("sub_1", "past_due", current_period_end=AT_PERIOD_END), 200
    )
    assert same_end.subscription is not None and same_end.subscription.current_period_start == start
    # A renewal's invoice (a later end) without its start: the old start would make a two-month period.
    renewal = SubscriptionFacts("sub_1", "active", current_period_end=later_end(), from_invoice=True)
    renewed = decide(held, None, renewal, 200)
    assert renewed.subscription is not None
    assert (renewed.subscription.current_period_start, renewed.subscription.current_period_end) == (
        None,
        later_end(),
    )
    # With its start, the new period's both ends are written.
    with_start = decide(held, None, replace(renewal, current_period_start=AT_PERIOD_END), 200)
    assert with_start.subscription is not None
    assert with_start.subscription.current_period_start == AT_PERIOD_END


def later_end() -> datetime:
    return datetime.fromtimestamp(PERIOD_END + 31 * 86400, UTC)


def test_an_older_event_of_the_same_subscription_is_stale() -> None:
    assert decide(current(), 100, SubscriptionFacts("sub_1", "past_due"), 99).action == "stale"
    # Either record of the newest event is enough: the Customer's, or the row's.
    assert decide(None, 100, SubscriptionFacts("sub_1", "past_due"), 99).action == "stale"
    assert decide(current(), None, SubscriptionFacts("sub_1", "past_due"), 99).action == "stale"
    # An ending is final: only invoices of the last period can be newer than it.
    assert decide(current(), 100, SubscriptionFacts("sub_1", "canceled"), 99).action == "apply"
    ended = current(status="canceled", last_event_created=100)
    assert decide(ended, 100, SubscriptionFacts("sub_1", "incomplete_expired"), 99).action == "stale"


@pytest.mark.parametrize("ended", ["canceled", "incomplete_expired"])
def test_an_ended_subscription_is_not_revived_by_a_later_event(ended: str) -> None:
    # The final usage invoice paid after the deletion, an open invoice paid after dunning canceled it.
    paid = SubscriptionFacts("sub_1", "active", "starter")
    held = current(status=ended, last_event_created=100)
    assert decide(held, 100, paid, 200, stored_status=ended).action == "stale"
    assert decide(None, 100, paid, 200, stored_status=ended).action == "stale"  # the row alone
    assert decide(held, None, SubscriptionFacts("sub_1", "past_due"), 200).action == "stale"  # the spec alone
    assert (
        decide(held, 100, SubscriptionFacts("sub_1", "canceled"), 200, stored_status=ended).action == "apply"
    )
    # A new subscription still replaces it.
    assert decide(held, None, SubscriptionFacts("sub_2", "active", "starter"), 200).action == "apply"


def test_an_event_as_old_as_the_last_applies() -> None:
    assert decide(current(), 100, SubscriptionFacts("sub_1", "active", "enterprise"), 100).action == "apply"


def test_the_first_event_applies() -> None:
    decision = decide(None, None, SubscriptionFacts("sub_2", "trialing", "professional"), 5)
    assert decision.subscription == SubscriptionSpec(
        status="trialing", plan="professional", stripe_subscription_id="sub_2", last_event_created=5
    )


def test_another_subscription_replaces_only_when_it_does_not_end_a_live_one() -> None:
    ended = decide(current(), None, SubscriptionFacts("sub_old", "canceled"), 200)
    assert (ended.action, ended.record_row) == ("superseded", True)
    older = decide(current(), None, SubscriptionFacts("sub_new", "active", "enterprise"), 50)
    assert older.action == "superseded"
    newer = decide(current(), None, SubscriptionFacts("sub_new", "active", "enterprise"), 200)
    assert newer.action == "apply"
    assert newer.subscription == SubscriptionSpec(
        status="active", plan="enterprise", stripe_subscription_id="sub_new", last_event_created=200
    )
    after_cancel = decide(current(status="canceled"), None, SubscriptionFacts("sub_new", "incomplete"), 200)
    assert after_cancel.action == "apply"


def test_price_catalog_from_settings_leaves_unset_prices_out() -> None:
    from iotistic_billing.settings import load_settings

    catalog = PriceCatalog.from_settings(
        load_settings(
            stripe_price_starter="price_a", stripe_price_professional=None, stripe_price_enterprise=""
        )
    )
    assert catalog.prices == {"starter": "price_a"}
    assert catalog.plan_for("price_a") == "starter" and catalog.plan_for(None) is None
    assert catalog.metered == ()
    metered = load_settings(stripe_metered_prices=["price_m1", "price_m2"])
    assert PriceCatalog.from_settings(metered).metered == ("price_m1", "price_m2")


def test_two_events_of_one_second_apply_in_the_lifecycle_s_order_whatever_comes_first() -> None:
    applied = current(status="active", last_event_created=100)
    failed = decide(applied, 100, SubscriptionFacts("sub_1", "past_due"), 100)
    assert failed.action == "apply"  # later in the lifecycle: it wins the second
    assert failed.subscription is not None
    back = decide(
        failed.subscription, 100, SubscriptionFacts("sub_1", "active"), 100, stored_status="past_due"
    )
    assert back.action == "stale"  # the same pair the other way round ends the same
    # Only the row knows the second's state (the Customer was written by another subscription):
    assert (
        decide(None, 100, SubscriptionFacts("sub_1", "active"), 100, stored_status="canceled").action
        == "stale"
    )


def test_the_newest_live_subscription_wins_and_an_older_one_is_recorded_only() -> None:
    newer = current(stripe_subscription_id="sub_new", status="active", last_event_created=100)
    older_event = SubscriptionFacts("sub_old", "active", cancel_at_period_end=True, started=10)
    decision = decide(newer, 90, older_event, 200, current_started=50)
    assert (decision.action, decision.record_row) == ("superseded", True)
    # A subscription newer than the Customer's takes over; unknown start times decide as before.
    assert (
        decide(
            newer,
            None,
            SubscriptionFacts("sub_next", "active", "starter", started=60),
            200,
            current_started=50,
        ).action
        == "apply"
    )
    assert (
        decide(newer, None, SubscriptionFacts("sub_x", "active", "starter"), 200, current_started=50).action
        == "apply"
    )


def invoice_facts(
    event_type: str,
    price: str = "price_s",
    period_end: int = PERIOD_END,
    billing_reason: str = "subscription_cycle",
) -> SubscriptionFacts:
    """The facts of an invoice of sub_1 on `price` (invoice.paid or invoice.payment_failed) billing the
    period that ends at `period_end`: a renewal's, unless `billing_reason` says otherwise."""
    body = {
        "id": "in_1",
        "subscription": "sub_1",
        "billing_reason": billing_reason,
        "lines": {"data": [{"type": "subscription", "price": {"id": price}, "period": {"end": period_end}}]},
    }
    facts = subscription_facts(event_type, body, CATALOG)
    assert facts is not None
    return facts


def test_a_deletion_delivered_after_the_final_invoice_ends_the_subscription_for_good() -> None:
    """Stripe retried the deletion (at 100) after the final usage invoice, paid an hour later, was
    applied: an ending is final whatever its time, and no invoice brings the subscription back."""
    paid = coalesce("cust_a", current(last_event_created=50), {}, [(invoice_facts("invoice.paid"), 3700)])
    assert paid.subscription is not None and paid.subscription.status == "active"
    ended = coalesce("cust_a", paid.subscription, paid.rows, [(SubscriptionFacts("sub_1", "canceled"), 100)])
    assert ended.subscription is not None and ended.subscription.status == "canceled"
    assert ended.rows["sub_1"].status == "canceled"
    later = coalesce(
        "cust_a", ended.subscription, {**paid.rows, **ended.rows}, [(invoice_facts("invoice.paid"), 3800)]
    )
    assert [step.decision.action for step in later.steps if step.decision] == ["stale"]
    assert later.subscription == ended.subscription


def actions(result: Coalesced) -> list[str]:
    return [step.decision.action for step in result.steps if step.decision]


@pytest.mark.parametrize("overdue_status", ["past_due", "unpaid"])
def test_a_subscription_canceled_while_overdue_keeps_when_its_payment_failed(overdue_status: str) -> None:
    """Found in review: the ending cleared pastDueSince, so a subscription Stripe canceled at the end of
    dunning (or one canceled with its renewal unpaid) read as a paid-up one canceled, PaymentOverdue
    False while money was owed. The Customer and the row keep it (a retried deletion too); a paid-up
    subscription canceled gets none, as before."""
    since = datetime.fromtimestamp(150, UTC)
    overdue = current(status=overdue_status, last_event_created=150, past_due_since=since)
    overdue_row = row(
        status=overdue_status, last_event_created=150, own_event_created=150, past_due_since=since
    )
    for rows in (overdue_row, {}):
        ended = coalesce("cust_a", overdue, rows, [(SubscriptionFacts("sub_1", "canceled"), 200)])
        assert ended.subscription == current(status="canceled", last_event_created=200, past_due_since=since)
        assert (ended.rows["sub_1"].status, ended.rows["sub_1"].past_due_since) == ("canceled", since)
        retried = coalesce(
            "cust_a", ended.subscription, ended.rows, [(SubscriptionFacts("sub_1", "canceled"), 250)]
        )
        assert retried.subscription is not None and retried.subscription.past_due_since == since
        assert retried.rows["sub_1"].past_due_since == since
    paid_up = coalesce("cust_a", current(), row(), [(SubscriptionFacts("sub_1", "canceled"), 200)])
    assert paid_up.subscription == current(status="canceled", last_event_created=200)
    assert paid_up.rows["sub_1"].past_due_since is None
    # Recorded only (the customer's other live subscription takes over): its row keeps it all the same.
    held = current(stripe_subscription_id="sub_new", status=overdue_status, past_due_since=since)
    rows_of_two = {
        **row("sub_old", stripe_created=5),
        **row("sub_new", status=overdue_status, past_due_since=since),
    }
    taken_over = coalesce("cust_a", held, rows_of_two, [(SubscriptionFacts("sub_new", "canceled"), 200)])
    assert actions(taken_over) == ["superseded"]
    assert taken_over.rows["sub_new"].past_due_since == since


@pytest.mark.parametrize("event_type", ["invoice.paid", "invoice.payment_succeeded"])
def test_the_invoice_left_unpaid_by_a_cancellation_paid_later_settles_it_without_the_plan(
    event_type: str,
) -> None:
    """The open invoice of a subscription dunning canceled, paid afterwards: no payment is overdue any
    more, and the subscription stays ended (Stripe starts a new one rather than revive it). Older news
    settles nothing: an event older than the ending, an older period's invoice, a failed retry; nor does
    an invoice without the plan's line (the final usage)."""
    since = datetime.fromtimestamp(150, UTC)
    ended = current(status="canceled", last_event_created=200, past_due_since=since)
    ended_row = row(status="canceled", last_event_created=200, own_event_created=200, past_due_since=since)
    for rows in (ended_row, {}):
        paid = coalesce("cust_a", ended, rows, [(invoice_facts(event_type), 300)])
        assert actions(paid) == ["apply"]
        assert paid.subscription == current(status="canceled", last_event_created=300)
        assert (paid.rows["sub_1"].status, paid.rows["sub_1"].past_due_since) == ("canceled", None)
    # Found in review: the final usage invoice (metered lines alone, no plan line) paid after the ending
    # cleared it too, though the renewal the ending left unpaid is still owed.
    metered = {"price": {"id": "price_metered"}, "period": {"end": PERIOD_END}}
    usage_only = subscription_facts(
        event_type, {"id": "in_2", "subscription": "sub_1", "lines": {"data": [metered]}}, CATALOG
    )
    assert usage_only is not None
    older_news = [
        (invoice_facts(event_type), 190),
        (invoice_facts(event_type, period_end=PERIOD_END - MONTH), 300),
        (invoice_facts("invoice.payment_failed"), 300),
        (usage_only, 300),
    ]
    for facts, created in older_news:
        late = coalesce("cust_a", ended, ended_row, [(facts, created)])
        assert actions(late) == ["stale"] and late.subscription == ended and late.rows == {}
    # The customer holds another subscription: the ended one's row is settled, the Customer keeps its own.
    for other in ("active", "canceled"):
        held = current(stripe_subscription_id="sub_new", status=other, last_event_created=250)
        settled = coalesce("cust_a", held, ended_row, [(invoice_facts(event_type), 300)])
        assert actions(settled) == ["superseded"] and settled.subscription == held
        assert (settled.rows["sub_1"].status, settled.rows["sub_1"].past_due_since) == ("canceled", None)


def test_the_invoice_left_unpaid_by_a_cancellation_voided_later_settles_it_without_the_plan() -> None:
    """Found in review: the billing team voids the open invoice of a subscription dunning canceled, and
    nothing is owed any more, but `invoice.voided` was not handled: PaymentOverdue said CanceledUnpaid
    until the customer subscribed again. Voided, it settles what the ending left owed as its payment does
    (the subscription stays ended, no notice); a voided invoice pays nothing else: of a live
    subscription, of an older period, without the plan's line, older than the ending, or of a
    subscription nothing is known of, it changes nothing (stale, no row written)."""
    invoice = {"customer": "cus_1", "subscription": "sub_1", "metadata": {"customerId": "cust_abcdef123"}}
    assert lookup_hints("invoice.voided", invoice) == LookupHints("cust_abcdef123", "cus_1", "sub_1")
    since = datetime.fromtimestamp(150, UTC)
    ended = current(status="canceled", last_event_created=200, past_due_since=since)
    ended_row = row(status="canceled", last_event_created=200, own_event_created=200, past_due_since=since)
    for rows in (ended_row, {}):
        voided = coalesce("cust_a", ended, rows, [(invoice_facts("invoice.voided"), 300)])
        assert actions(voided) == ["apply"]
        assert voided.subscription == current(status="canceled", last_event_created=300)
        assert (voided.rows["sub_1"].status, voided.rows["sub_1"].past_due_since) == ("canceled", None)
    # A lost batch that voided it is decided again the same way, from the row.
    written = current(status="canceled", last_event_created=300)
    again = coalesce("cust_a", written, ended_row, [(invoice_facts("invoice.voided"), 300)])
    assert actions(again) == ["apply"] and again.subscription == written
    assert again.rows["sub_1"].past_due_since is None

    metered = {"price": {"id": "price_metered"}, "period": {"end": PERIOD_END}}
    usage_only = subscription_facts(
        "invoice.voided", {"id": "in_2", "subscription": "sub_1", "lines": {"data": [metered]}}, CATALOG
    )
    assert usage_only is not None
    for facts, created in [
        (invoice_facts("invoice.voided"), 190),
        (invoice_facts("invoice.voided", period_end=PERIOD_END - MONTH), 300),
        (usage_only, 300),
    ]:
        late = coalesce("cust_a", ended, ended_row, [(facts, created)])
        assert actions(late) == ["stale"] and late.subscription == ended and late.rows == {}
    overdue = current(status="past_due", last_event_created=150, past_due_since=since)
    overdue_row = row(status="past_due", last_event_created=150, own_event_created=150, past_due_since=since)
    for held, rows in [(current(), row()), (overdue, overdue_row), (overdue, {}), (None, {})]:
        live = coalesce("cust_a", held, rows, [(invoice_facts("invoice.voided"), 300)])
        assert actions(live) == ["stale"] and live.subscription == held and live.rows == {}


def test_a_lost_cancellation_or_payment_is_decided_again_with_the_row_s_past_due_since() -> None:
    """A batch lost after it wrote the Customer is decided again from the row: the row of a subscription
    that ended overdue keeps its pastDueSince, so the second decision is the first one."""
    since = datetime.fromtimestamp(150, UTC)
    overdue_row = row(status="past_due", last_event_created=150, own_event_created=150, past_due_since=since)
    lost_ending = [(SubscriptionFacts("sub_1", "canceled"), 200)]
    written = current(status="canceled", last_event_created=200, past_due_since=since)
    again = coalesce("cust_a", written, overdue_row, lost_ending)
    assert actions(again) == ["apply"] and again.subscription == written
    assert again.rows["sub_1"].past_due_since == since

    ended_row = row(status="canceled", last_event_created=200, own_event_created=200, past_due_since=since)
    lost_payment = [(invoice_facts("invoice.paid"), 300)]
    settled = current(status="canceled", last_event_created=300)
    assert committed_subscription(settled, ended_row, lost_payment) == written
    decided_again = coalesce("cust_a", settled, ended_row, lost_payment)
    assert actions(decided_again) == ["apply"] and decided_again.subscription == settled
    assert decided_again.rows["sub_1"].past_due_since is None


def test_a_declined_retry_leaves_a_suspended_subscription_unpaid() -> None:
    """Unpaid is past the ladder's grace: a failed retry does not put the subscription back in past_due
    (and its access back), and the ladder still counts from the first failure."""
    since = datetime.fromtimestamp(50, UTC)
    suspended = current(status="unpaid", past_due_since=since)
    for rows in (row(status="unpaid", past_due_since=since), {}):
        declined = coalesce("cust_a", suspended, rows, [(invoice_facts("invoice.payment_failed"), 200)])
        assert declined.subscription == current(status="unpaid", past_due_since=since, last_event_created=200)
        assert (declined.rows["sub_1"].status, declined.rows["sub_1"].past_due_since) == ("unpaid", since)
    # A payment that goes through still ends it.
    paid = coalesce("cust_a", suspended, {}, [(invoice_facts("invoice.paid"), 300)])
    assert paid.subscription is not None
    assert (paid.subscription.status, paid.subscription.past_due_since) == ("active", None)


def test_paying_an_older_invoice_keeps_the_subscription_overdue() -> None:
    """Found in review: two renewals failed and the customer paid the older one alone; Stripe keeps the
    subscription past_due (its status follows the latest invoice), but the payment made it active,
    cleared the ladder and sent payment.recovered. An invoice of a period before the one held sets
    neither the status nor the period."""
    since = datetime.fromtimestamp(50, UTC)
    overdue = current(status="past_due", past_due_since=since)
    older = invoice_facts("invoice.paid", period_end=PERIOD_END - MONTH)
    for rows in (row(status="past_due", past_due_since=since), {}):
        paid = coalesce("cust_a", overdue, rows, [(older, 300)])
        assert paid.subscription == current(status="past_due", past_due_since=since, last_event_created=300)
        assert (paid.rows["sub_1"].status, paid.rows["sub_1"].current_period_end) == (
            "past_due",
            AT_PERIOD_END,
        )
    # The latest invoice paid ends it.
    latest = coalesce("cust_a", overdue, {}, [(invoice_facts("invoice.paid"), 300)])
    assert latest.subscription is not None
    assert (latest.subscription.status, latest.subscription.past_due_since) == ("active", None)


@pytest.mark.parametrize("overdue_status", ["past_due", "unpaid"])
def test_paying_an_older_invoice_on_a_price_no_plan_s_now_keeps_the_subscription_overdue(
    overdue_status: str,
) -> None:
    """Found in review: the period an invoice bills was read off a line on a plan's price (STRIPE_PRICE_*)
    alone, so an invoice of a subscription kept on a price the team has since replaced (grandfathered)
    billed no known period and counted as the latest: paying the older of two open invoices made a
    past_due subscription active (pastDueSince cleared, payment.recovered) and an unpaid one active,
    access not paid for. The period is its plan line's, a price of the catalog or not."""
    since = datetime.fromtimestamp(50, UTC)
    overdue = current(status=overdue_status, past_due_since=since)
    older = invoice_facts("invoice.paid", price="price_s_old", period_end=PERIOD_END - MONTH)
    assert older.billed_until == AT_PERIOD_END - timedelta(seconds=MONTH) and older.plan is None
    for rows in (row(status=overdue_status, past_due_since=since), {}):
        paid = coalesce("cust_a", overdue, rows, [(older, 300)])
        assert paid.subscription == current(
            status=overdue_status, past_due_since=since, last_event_created=300
        )
    # The latest invoice paid ends it, its plan the one held.
    latest = coalesce("cust_a", overdue, {}, [(invoice_facts("invoice.paid", price="price_s_old"), 300)])
    assert latest.subscription == current(last_event_created=300)


def test_the_invoice_an_ending_left_owed_on_a_price_no_plan_s_now_settles_it() -> None:
    """Found in review: a subscription canceled with its renewal unpaid, on a grandfathered price: the
    invoice billed no known period, so paying it never settled what was owed (PaymentOverdue for good)."""
    since = datetime.fromtimestamp(150, UTC)
    ended = current(status="canceled", last_event_created=200, past_due_since=since)
    paid = coalesce("cust_a", ended, {}, [(invoice_facts("invoice.paid", price="price_s_old"), 300)])
    assert actions(paid) == ["apply"]
    assert paid.subscription == current(status="canceled", last_event_created=300)


@pytest.mark.parametrize("api", ["2025", "legacy"])
def test_an_invoice_s_period_is_its_plan_line_s_whatever_its_price_and_the_metered_lines_before_it(
    api: str,
) -> None:
    """Found in review: with no line on a plan's price, an invoice billed no period. The plan line is the
    first of the subscription's lines that is neither a proration nor a metered price's (the overage of
    the period before, STRIPE_METERED_PRICES or a price whose usage is metered); one-off invoice items
    bill no period of the subscription."""
    catalog = PriceCatalog(dict(CATALOG.prices), ("price_meter_devices",))
    earlier = PERIOD_END - MONTH

    def line(price: str, end: int, *, item: bool = True, **extra: Any) -> dict[str, Any]:
        if api == "2025":
            kind = "subscription_item_details" if item else "invoice_item_details"
            return {
                "parent": {"type": kind, kind: {"proration": False}},
                "pricing": {"price_details": {"price": price}},
                "period": {"end": end},
            }
        return {
            "type": "subscription" if item else "invoiceitem",
            "price": {"id": price, **extra},
            "period": {"end": end},
        }

    lines = [
        line("price_meter_devices", earlier),
        line("price_meter_old", earlier, recurring={"usage_type": "metered"}),
        line("price_setup", earlier + 1, item=False),
        line("price_s_old", PERIOD_END),
    ]
    if api == "2025":
        lines.pop(1)  # a line's price is its id alone: only STRIPE_METERED_PRICES says it is metered
    invoice = {"subscription": "sub_1", "billing_reason": "subscription_cycle", "lines": {"data": lines}}
    paid = subscription_facts("invoice.payment_succeeded", invoice, catalog)
    assert paid == SubscriptionFacts(
        "sub_1", "active", None, AT_PERIOD_END, from_invoice=True, billed_until=AT_PERIOD_END
    )
    # The final usage invoice (metered lines alone) still bills no plan period.
    usage_only = {**invoice, "lines": {"data": lines[:1]}}
    assert subscription_facts("invoice.payment_succeeded", usage_only, catalog) == SubscriptionFacts(
        "sub_1", "active", from_invoice=True
    )


def line_2025(price: str, start: int, end: int) -> dict[str, Any]:
    """A line of a subscription item as API versions from 2025-03 send it: its price by id alone."""
    return {
        "parent": {"type": "subscription_item_details", "subscription_item_details": {"proration": False}},
        "pricing": {"price_details": {"price": price}},
        "period": {"start": start, "end": end},
    }


def test_a_renewal_s_metered_line_on_a_price_not_in_stripe_metered_prices_is_not_its_plan_line() -> None:
    """Found in review: with no line on a plan's price, the first line of the subscription that was not
    metered was taken as the plan's; a metered price rotated out of STRIPE_METERED_PRICES, named by its
    id alone (newer API versions carry no usage_type), is not known to be metered, so a renewal listing
    its overage first billed the period before: paying the latest invoice of an overdue subscription
    read as paying an older one and left it past_due, and the final usage invoice billed a plan period.
    The invoice's own period looks back (Stripe): the plan line starts where it ends, usage ends there."""
    billed_from = PERIOD_END - MONTH
    invoice = {
        "subscription": "sub_1",
        "billing_reason": "subscription_cycle",
        "period_start": billed_from - MONTH,
        "period_end": billed_from,
        "lines": {
            "data": [
                line_2025("price_meter_rotated", billed_from - MONTH, billed_from),
                line_2025("price_s_old", billed_from, PERIOD_END),
            ]
        },
    }
    paid = subscription_facts("invoice.paid", invoice, CATALOG)
    assert paid == SubscriptionFacts(
        "sub_1",
        "active",
        None,
        AT_PERIOD_END,
        from_invoice=True,
        current_period_start=datetime.fromtimestamp(billed_from, UTC),
        billed_until=AT_PERIOD_END,
    )
    since = datetime.fromtimestamp(50, UTC)
    overdue = current(status="past_due", past_due_since=since)
    recovered = coalesce("cust_a", overdue, row(status="past_due", past_due_since=since), [(paid, 300)])
    assert recovered.subscription is not None
    assert (recovered.subscription.status, recovered.subscription.past_due_since) == ("active", None)
    # The final usage invoice (its rotated metered line alone, ending where the invoice does) bills no
    # plan period.
    usage_only = {**invoice, "lines": {"data": invoice["lines"]["data"][:1]}}  # type: ignore[index]
    assert subscription_facts("invoice.paid", usage_only, CATALOG) == SubscriptionFacts(
        "sub_1", "active", from_invoice=True
    )


@pytest.mark.parametrize("says_its_period", [True, False])
def test_an_add_on_on_another_interval_is_not_taken_for_the_plan_line(says_its_period: bool) -> None:
    """Found in review: an annual add-on sold beside a monthly plan on a replaced price, listed first,
    was taken as the plan line: the first invoice recorded the plan's period as ending a year out (the
    Customer's currentPeriodEnd, and every later monthly invoice read as older, paid or not). Lines
    that bill different periods cannot be told apart: the invoice bills none, and the subscription's
    own events say it. An add-on billed on the plan's interval bills the plan's period."""
    start = PERIOD_END - MONTH
    invoice: dict[str, Any] = {"subscription": "sub_1", "billing_reason": "subscription_create"}
    if says_its_period:
        invoice |= {"period_start": start, "period_end": start}
    annual = line_2025("price_support_annual", start, start + 365 * 86400)
    monthly = line_2025("price_s_old", start, PERIOD_END)
    invoice["lines"] = {"data": [annual, monthly]}
    assert subscription_facts("invoice.paid", invoice, CATALOG) == SubscriptionFacts(
        "sub_1", "active", from_invoice=True
    )
    same_interval = line_2025("price_support_monthly", start, PERIOD_END)
    invoice["lines"] = {"data": [same_interval, monthly]}
    paid = subscription_facts("invoice.paid", invoice, CATALOG)
    assert paid is not None and paid.billed_until == AT_PERIOD_END


def invoice_event(lines: list[dict[str, Any]], *, has_more: bool) -> StripeEvent:
    """An invoice.paid event of sub_1's invoice in_1 carrying `lines` (Stripe sends 10 at most)."""
    invoice = {
        "id": "in_1",
        "object": "invoice",
        "subscription": "sub_1",
        "billing_reason": "subscription_cycle",
        "lines": {"object": "list", "data": lines, "has_more": has_more, "url": "/v1/invoices/in_1/lines"},
    }
    return StripeEvent.model_validate(
        {"id": "evt_1", "type": "invoice.paid", "created": 300, "data": {"object": invoice}}
    )


async def test_an_invoice_event_carrying_its_first_lines_alone_is_read_with_every_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: an invoice event carries its first lines alone (has_more), so one whose plan line
    came after them (an upgrade's many prorations first) read as billing no period, and paying an older
    invoice of an overdue subscription made it active. Its lines are listed from Stripe; a listing that
    fails raises (the apply step leaves the Customer's events pending for a retry: recorded, the event
    would be decided on part of its invoice for good); without STRIPE_SECRET_KEY, a warning naming it."""
    prorations = [{"proration": True, "price": {"id": "price_p"}} for _ in range(10)]
    plan = {"type": "subscription", "price": {"id": "price_s"}, "period": {"end": PERIOD_END - MONTH}}
    asked: list[str] = []

    async def invoice_lines(invoice_id: str) -> list[dict[str, Any]]:
        asked.append(invoice_id)
        return [*prorations, plan]

    event = invoice_event(prorations, has_more=True)
    whole = await with_all_lines(event, invoice_lines)
    facts = read_facts(whole, CATALOG, "acme")
    assert asked == ["in_1"] and facts is not None
    assert facts.billed_until == AT_PERIOD_END - timedelta(seconds=MONTH)
    since = datetime.fromtimestamp(50, UTC)
    overdue = current(status="past_due", past_due_since=since)
    assert coalesce("cust_a", overdue, {}, [(facts, 300)]).subscription == current(
        status="past_due", past_due_since=since, last_event_created=300
    )
    # All its lines carried: nothing is asked.
    carried = invoice_event([*prorations[:9], plan], has_more=False)
    assert await with_all_lines(carried, invoice_lines) is carried and asked == ["in_1"]

    async def unreachable(invoice_id: str) -> list[dict[str, Any]]:
        raise DependencyUnavailable("Stripe")

    with pytest.raises(DependencyUnavailable):
        await with_all_lines(event, unreachable)
    with caplog.at_level(logging.WARNING, logger="iotistic_billing.stripe_inbox"):
        assert await with_all_lines(event, None) is event
    assert "stripe event evt_1: invoice in_1 has more lines than the event carries" in caplog.text


def answering(error: stripe.StripeError) -> InvoiceLines:
    """StripeApi.invoice_lines as Stripe's `error` leaves it: our error (stripe_api._stripe)."""

    async def invoice_lines(invoice_id: str) -> list[dict[str, Any]]:
        async def refused() -> list[dict[str, Any]]:
            raise error

        return await _stripe(refused(), "list the invoice's lines")

    return invoice_lines


def not_found(invoice_id: str) -> stripe.InvalidRequestError:
    message = f"No such invoice: '{invoice_id}'"
    body = {"error": {"type": "invalid_request_error", "code": "resource_missing", "message": message}}
    return stripe.InvalidRequestError(message, "id", code="resource_missing", http_status=404, json_body=body)


async def test_an_invoice_s_lines_stripe_refuses_for_good_are_read_from_those_the_event_carries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: a listing Stripe refused in a way no retry clears (a restricted key without
    "Invoices: read", 403; an invoice Stripe does not have, 404 resource_missing: deleted test data,
    another account's) left the event pending for ever, retried with backoff, and every newer event of
    its Customer (a cancellation, a failed payment) held behind it; the warning said the key was
    revoked or another account's while every other call worked. The event is read from the lines it
    carries, with a warning naming it, its invoice and the refusal; a failure a retry may clear (no
    answer, 5xx, 429, a key refused altogether) still leaves it pending."""
    event = invoice_event([{"proration": True, "price": {"id": "price_p"}}] * 10, has_more=True)
    forbidden = stripe.PermissionError(
        "The provided key does not have the required permissions", http_status=403
    )
    caplog.set_level(logging.WARNING, logger="iotistic_billing.stripe_inbox")
    assert await with_all_lines(event, listed_once(answering(forbidden))) is event
    [warning] = [r.getMessage() for r in caplog.records if r.name.startswith("iotistic_billing.stripe_inbox")]
    assert warning.startswith("stripe event evt_1: invoice in_1 has more lines than the event carries")
    assert "403" in warning and "Invoices: read" in warning and "revoked" not in warning

    caplog.clear()
    assert await with_all_lines(event, listed_once(answering(not_found("in_1")))) is event
    assert "No such invoice: 'in_1' (resource_missing)" in caplog.text and "evt_1" in caplog.text

    for passing in (
        stripe.APIConnectionError("Connection reset"),
        stripe.APIError("Internal error", http_status=500),
        stripe.RateLimitError("Too many requests", http_status=429),
        stripe.AuthenticationError("Invalid API Key provided", http_status=401),
    ):
        with pytest.raises(Unavailable):
            await with_all_lines(event, listed_once(answering(passing)))


async def test_a_batch_lists_an_invoice_once_and_names_a_listing_that_took_too_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: two events of one invoice (invoice.paid and invoice.payment_succeeded) listed it
    twice under the batch lock, each listing up to 10 s; and one that took too long was recorded as a
    bare "TimeoutError" (its str is empty) in the event's last_error and the warning."""
    asked: list[str] = []

    async def invoice_lines(invoice_id: str) -> list[dict[str, Any]]:
        asked.append(invoice_id)
        await asyncio.sleep(0)  # an answer takes a while: an ask at once comes meanwhile
        if len(asked) == 1:
            raise DependencyUnavailable("Stripe")
        return [{"type": "subscription", "price": {"id": "price_s"}, "period": {"end": PERIOD_END}}]

    paid = invoice_event([{"proration": True, "price": {"id": "price_p"}}] * 10, has_more=True)
    succeeded = paid.model_copy(update={"id": "evt_2", "type": "invoice.payment_succeeded"})
    batch = listed_once(invoice_lines)
    for each in (paid, succeeded):  # its failure too: the second event does not ask again
        with pytest.raises(DependencyUnavailable):
            await with_all_lines(each, batch)
    assert asked == ["in_1"]
    batch = listed_once(invoice_lines)  # the next batch
    whole = [await with_all_lines(each, batch) for each in (paid, succeeded)]
    assert asked == ["in_1", "in_1"]
    for each in whole:
        facts = read_facts(each, CATALOG, "acme")
        assert facts is not None and facts.billed_until == AT_PERIOD_END
    # Asked at once (unmatched events are listed together): the second waits for the first's listing.
    batch = listed_once(invoice_lines)
    await asyncio.gather(*(with_all_lines(each, batch) for each in (paid, succeeded)))
    assert asked == ["in_1"] * 3

    never = asyncio.Event()

    async def no_answer(invoice_id: str) -> list[dict[str, Any]]:
        await never.wait()
        return []

    monkeypatch.setattr(apply, "INVOICE_LINES_TIMEOUT", 0)  # expired at once: no time waited for
    with pytest.raises(DependencyUnavailable) as raised:
        await with_all_lines(paid, listed_once(no_answer))
    assert str(raised.value) == "Stripe did not list the lines of invoice in_1 within 0 s; retry later"


def test_a_failed_retry_of_an_older_invoice_after_the_latest_was_paid_starts_no_dunning() -> None:
    """Found in review: the latest invoice paid (Stripe: active), then a retry of an older one failed and
    started the ladder (payment.failed, the licence restricted on day 7) against an active subscription."""
    failed = coalesce(
        "cust_a",
        current(),
        {},
        [(invoice_facts("invoice.payment_failed", period_end=PERIOD_END - MONTH), 300)],
    )
    assert failed.subscription == current(last_event_created=300)
    # The latest invoice failing starts it.
    latest = coalesce("cust_a", current(), {}, [(invoice_facts("invoice.payment_failed"), 300)])
    assert latest.subscription is not None
    assert (latest.subscription.status, latest.subscription.past_due_since) == (
        "past_due",
        datetime.fromtimestamp(300, UTC),
    )


def test_an_invoice_paid_after_a_plan_change_does_not_undo_it() -> None:
    """A renewal drafted on starter, the plan changed to professional within its draft window, then the
    invoice paid: the subscription's own event says the plan; the invoice's line is older news."""
    upgraded = SubscriptionFacts("sub_1", "active", "professional", AT_PERIOD_END, False)
    result = coalesce(
        "cust_a", current(), {}, [(upgraded, 1800), (invoice_facts("invoice.paid", "price_s"), 3600)]
    )
    assert result.subscription is not None and result.subscription.plan == "professional"
    assert result.rows["sub_1"].plan == "professional"
    # An invoice still names a plan nothing has named yet: a first payment whose subscription's events
    # are still to come.
    first = coalesce("cust_a", None, {}, [(invoice_facts("invoice.paid", "price_e"), 10)])
    assert first.subscription is not None and first.subscription.plan == "enterprise"


# ----- coalescing a Customer's pending events -----


def row(subscription_id: str = "sub_1", **overrides: Any) -> dict[str, StoredSubscription]:
    values: dict[str, Any] = {
        "customer_id": "cust_a",
        "status": "active",
        "plan": "starter",
        "current_period_end": AT_PERIOD_END,
        "cancel_at_period_end": False,
        "last_event_created": 100,
        "stripe_created": 10,
        "past_due_since": None,
        "own_event_created": 100,
        "invoice_event_created": 0,
    }
    values.update(overrides)
    return {subscription_id: StoredSubscription(**values)}


def test_a_customer_s_events_coalesce_into_what_they_do_one_after_the_other() -> None:
    later = datetime.fromtimestamp(PERIOD_END + 86400, UTC)
    events = [
        (SubscriptionFacts("sub_1", "past_due"), 150),
        (SubscriptionFacts("sub_1", "active", "enterprise", current_period_end=later), 160),
        (SubscriptionFacts("sub_1", "trialing"), 120),  # older than both: stale, whatever its place
        (None, 170),  # carries no subscription facts: recorded as ignored
    ]
    result = coalesce("cust_a", current(), row(), events)
    assert [step.decision.action if step.decision else None for step in result.steps] == [
        "apply",
        "apply",
        "stale",
        None,
    ]
    # Each step saw what the ones before it left (its notices compare with that).
    assert result.steps[0].previous == current()
    assert result.steps[1].previous is not None and result.steps[1].previous.status == "past_due"
    # One write of the Customer and of the row: the second event's state, paid again, on the new plan.
    assert result.subscription == current(plan="enterprise", current_period_end=later, last_event_created=160)
    assert result.applied
    assert result.rows["sub_1"] == StoredSubscription(
        customer_id="cust_a",
        status="active",
        plan="enterprise",
        current_period_end=later,
        cancel_at_period_end=False,
        last_event_created=160,
        stripe_created=10,
        past_due_since=None,
        own_event_created=160,
        invoice_event_created=0,
    )


def test_coalesced_decisions_are_the_ones_separate_applies_make() -> None:
    """The same events decided one apply at a time (the Customer and the row written after each) and
    coalesced (written once) reach the same decisions and the same final state."""
    events = [
        (SubscriptionFacts("sub_1", "past_due"), 150),
        (SubscriptionFacts("sub_new", "active", "enterprise", started=50), 150),
        (SubscriptionFacts("sub_1", "canceled"), 155),  # the replaced one ends: recorded only
        (SubscriptionFacts("sub_new", "active", cancel_at_period_end=True), 140),  # older: stale
    ]
    state, rows = current(), row()
    separate = []
    for facts, created in events:
        one = coalesce("cust_a", state, rows, [(facts, created)])
        separate.append(one.steps[0].decision)
        state, rows = one.subscription, {**rows, **one.rows}
    together = coalesce("cust_a", current(), row(), events)
    assert [step.decision for step in together.steps] == separate
    assert [d.action for d in separate if d] == ["apply", "apply", "superseded", "stale"]
    assert together.subscription == state
    assert {**row(), **together.rows} == rows


def test_nothing_new_for_the_customer_applies_nothing() -> None:
    result = coalesce("cust_a", current(), row(), [(SubscriptionFacts("sub_1", "past_due"), 99)])
    assert not result.applied and result.subscription == current() and result.rows == {}


def test_events_whose_apply_was_lost_after_the_customer_was_written_are_decided_as_the_first_time() -> None:
    """The Customer holds the state of the pending events at 150 and 160 (their apply wrote it, then its
    transaction was lost): the row still says 100. They are decided again from the row's state."""
    failed = current(
        status="past_due", last_event_created=150, past_due_since=datetime.fromtimestamp(150, UTC)
    )
    written = current(status="past_due", last_event_created=160, past_due_since=failed.past_due_since)
    events = [(SubscriptionFacts("sub_1", "past_due"), 150), (SubscriptionFacts("sub_1", "past_due"), 160)]
    assert committed_subscription(written, row(), events) == current()
    result = coalesce("cust_a", written, row(), events)
    assert [step.decision.action for step in result.steps if step.decision] == ["apply", "apply"]
    assert result.steps[0].previous == current()  # as the lost apply saw it: a payment failure is news
    assert result.subscription == written  # the Customer has it already: nothing more to write

    # Not these events' doing (the row is behind, but no pending event put the Customer where it is:
    # a restored database): the Customer's state stands.
    assert committed_subscription(written, row(), events[:1]) == written
    # The row caught up (a committed apply): the Customer's state stands.
    assert committed_subscription(written, row(last_event_created=160), events) == written
    # No row at all: the lost apply was the subscription's first; it is decided again from nothing (its
    # events name its plan: one on no plan's price is not held over none).
    assert committed_subscription(written, {}, events) is None
    named = [(replace(facts, plan="starter"), created) for facts, created in events]
    assert [
        step.decision.action for step in coalesce("cust_a", written, {}, named).steps if step.decision
    ] == [
        "apply",
        "apply",
    ]


def test_a_lost_apply_is_decided_again_from_the_row_s_past_due_since() -> None:
    """The Customer carries the lost apply's pastDueSince (none once paid, a new failure's after one);
    the row keeps the one of the state before it. A row written before rows kept one (migration 0008)
    takes the Customer's while both are overdue, as before."""
    failed_at = datetime.fromtimestamp(150, UTC)
    overdue = row(status="past_due", last_event_created=150, past_due_since=failed_at)
    paid = current(last_event_created=160)
    failed_again = current(
        status="past_due", last_event_created=170, past_due_since=datetime.fromtimestamp(170, UTC)
    )
    events = [(SubscriptionFacts("sub_1", "active"), 160), (SubscriptionFacts("sub_1", "past_due"), 170)]
    before = current(status="past_due", last_event_created=150, past_due_since=failed_at)
    assert committed_subscription(paid, overdue, events[:1]) == before
    assert committed_subscription(failed_again, overdue, events) == before
    legacy = row(status="past_due", last_event_created=150)
    assert committed_subscription(paid, legacy, events[:1]) == current(
        status="past_due", last_event_created=150
    )
    assert committed_subscription(failed_again, legacy, events) == current(
        status="past_due", last_event_created=150, past_due_since=failed_again.past_due_since
    )

    # Each row written keeps its own: the applied state's, or (a subscription the Customer does not hold)
    # its own failure's, kept while it stays overdue.
    result = coalesce("cust_a", before, overdue, events)
    assert result.rows["sub_1"].past_due_since == failed_again.past_due_since
    other = {
        **overdue,
        **row(
            "sub_old",
            status="past_due",
            last_event_created=120,
            past_due_since=datetime.fromtimestamp(120, UTC),
        ),
    }
    superseded = coalesce(
        "cust_a",
        before,
        other,
        [(SubscriptionFacts("sub_old", "past_due"), 140), (SubscriptionFacts("sub_x", "unpaid"), 90)],
    )
    assert superseded.steps[0].decision is not None and superseded.steps[0].decision.action == "superseded"
    assert superseded.rows["sub_old"].past_due_since == datetime.fromtimestamp(120, UTC)
    assert superseded.rows["sub_x"].past_due_since == datetime.fromtimestamp(90, UTC)


def test_while_events_arrive_batches_start_at_most_once_a_cycle_and_back_off_when_slow() -> None:
    assert pause_after(0.2, cycle=1.0, ratio=0.5) == pytest.approx(0.8)  # the rest of the cycle
    assert pause_after(1.0, cycle=1.0, ratio=0.5) == pytest.approx(0.5)  # a slow batch: half as long again
    assert pause_after(3.0, cycle=1.0, ratio=0.5) == pytest.approx(1.5)
    assert pause_after(60.0, cycle=1.0, ratio=0.5) == MAX_PAUSE


@pytest.mark.parametrize(
    ("sizes", "budget", "kept"),
    [
        ([40, 50, 10], 100, ["e0", "e1", "e2"]),  # exactly the budget
        ([40, 50, 11], 100, ["e0", "e1"]),  # one byte more: the rest waits for the next batch
        ([40, 70, 10], 100, ["e0"]),  # in order: a small event after a large one waits too
        ([250, 10], 100, ["e0"]),  # the first alone past the budget is claimed all the same
        ([], 100, []),
    ],
)
def test_a_batch_claims_events_in_order_up_to_its_size(
    sizes: list[int], budget: int, kept: list[str]
) -> None:
    assert within_size([(f"e{i}", size) for i, size in enumerate(sizes)], budget) == kept


# ----- a subscription's own events among its invoices', and a Customer's other live subscription -----


def test_a_plan_change_delivered_after_a_newer_invoice_still_changes_the_plan() -> None:
    """Stripe sends an upgrade's customer.subscription.updated (at 1800) and a renewal's invoice.paid (at
    3600) in no set order. Once the invoice was applied first, the upgrade was older than the row's
    newest state and stale: the Customer kept starter until the subscription's next event, a month on.
    The subscription's own events are ordered among themselves; the invoice's newer status stands."""
    paid = coalesce("cust_a", current(), row(), [(invoice_facts("invoice.paid"), 3600)])
    assert paid.rows["sub_1"].own_event_created == 100  # the invoice is not the subscription's own event
    upgraded = SubscriptionFacts(
        "sub_1", "past_due", "professional", AT_PERIOD_END, cancel_at_period_end=True
    )
    late = coalesce("cust_a", paid.subscription, {**row(), **paid.rows}, [(upgraded, 1800)])
    assert [step.decision.action for step in late.steps if step.decision] == ["apply"]
    # Its plan and cancellation are news; its past_due is older than the invoice paid at 3600.
    assert late.subscription == current(
        plan="professional", cancel_at_period_end=True, last_event_created=3600
    )
    assert (late.rows["sub_1"].plan, late.rows["sub_1"].status) == ("professional", "active")
    assert (late.rows["sub_1"].last_event_created, late.rows["sub_1"].own_event_created) == (3600, 1800)

    # Older than an own event already recorded: stale, as before.
    rows = {**row(), **late.rows}
    older = coalesce(
        "cust_a", late.subscription, rows, [(SubscriptionFacts("sub_1", "active", "starter"), 1700)]
    )
    assert [step.decision.action for step in older.steps if step.decision] == ["stale"]
    # A row written before rows kept the time of their own events (migration 0010): stale, as before.
    legacy = {**row(), **paid.rows}
    legacy["sub_1"] = replace(legacy["sub_1"], own_event_created=None)
    unknown = coalesce("cust_a", paid.subscription, legacy, [(upgraded, 1800)])
    assert [step.decision.action for step in unknown.steps if step.decision] == ["stale"]


def test_a_late_own_event_s_period_start_does_not_go_beside_a_newer_invoice_s_end() -> None:
    """An upgrade's event of the period before (start S0, end E0) applied after the renewal's invoice
    (start E0, end E1): the period stays the invoice's, E0 .. E1, not S0 .. E1."""
    renewed = current(
        current_period_start=AT_PERIOD_END, current_period_end=later_end(), last_event_created=3600
    )
    rows = row(current_period_end=later_end(), last_event_created=3600, invoice_event_created=3600)
    upgrade = SubscriptionFacts(
        "sub_1",
        "active",
        "professional",
        AT_PERIOD_END,
        current_period_start=datetime.fromtimestamp(PERIOD_END - 30 * 86400, UTC),
    )
    late = coalesce("cust_a", renewed, rows, [(upgrade, 1800)])
    assert late.subscription is not None and late.subscription.plan == "professional"
    assert (late.subscription.current_period_start, late.subscription.current_period_end) == (
        AT_PERIOD_END,
        later_end(),
    )


def test_an_own_event_of_the_same_second_as_a_failed_invoice_keeps_the_failure_and_takes_the_plan() -> None:
    failed = coalesce("cust_a", current(), row(), [(invoice_facts("invoice.payment_failed"), 3600)])
    assert failed.subscription is not None and failed.subscription.status == "past_due"
    upgraded = SubscriptionFacts("sub_1", "active", "enterprise", AT_PERIOD_END)
    late = coalesce("cust_a", failed.subscription, {**row(), **failed.rows}, [(upgraded, 3600)])
    assert late.subscription == failed.subscription.model_copy(update={"plan": "enterprise"})
    # Stripe's own word that the subscription is unpaid (its retries ran out) is not undone by an
    # invoice's failure: it suspends, as it would have in Stripe's order.
    unpaid = coalesce(
        "cust_a",
        failed.subscription,
        {**row(), **failed.rows},
        [(SubscriptionFacts("sub_1", "unpaid"), 3000)],
    )
    assert unpaid.subscription is not None and unpaid.subscription.status == "unpaid"
    assert unpaid.subscription.past_due_since == failed.subscription.past_due_since


@pytest.mark.parametrize("first", ["invoice", "subscription"])
def test_a_declined_plan_change_invoice_leaves_the_status_as_the_subscription_says(first: str) -> None:
    """Found in review: every failed invoice but a subscription's first read as past_due. A plan change
    invoiced at once with Stripe's pending updates (payment_behavior=pending_if_incomplete) that is
    declined leaves the subscription active (only its pending_update set), yet past_due won the second
    over the subscription's own `updated` (active) in either order: a "payment failed" notice, the
    dunning ladder, and a restricted licence after 7 days. Such an invoice says nothing of the status;
    without pending updates the subscription's own event says past_due."""
    declined = invoice_facts("invoice.payment_failed", "price_e", billing_reason="subscription_update")
    for status, since in (("active", None), ("past_due", datetime.fromtimestamp(200, UTC))):
        own = SubscriptionFacts("sub_1", status, "starter", AT_PERIOD_END)
        events = [(declined, 200), (own, 200)]
        result = coalesce("cust_a", current(), row(), events if first == "invoice" else events[::-1])
        assert sorted(actions(result)) == ["apply", "stale"]
        assert result.subscription == current(status=status, past_due_since=since, last_event_created=200)
        assert result.rows["sub_1"].status == status
    # The same invoice paid makes the change, as any payment does; a renewal's failure is still overdue.
    paid = invoice_facts("invoice.paid", "price_e", billing_reason="subscription_update")
    assert decide(current(), 100, paid, 200).action == "apply"
    assert decide(current(), 100, invoice_facts("invoice.payment_failed"), 200).action == "apply"


def test_when_the_customer_s_subscription_ends_its_other_live_one_takes_over() -> None:
    """Two live subscriptions (a second checkout): the Customer holds the newer. Cancelling it left the
    Customer canceled, its instance unlicensed, while the older one was still billed, until that one's
    next event. The older live one now takes over, and the ending notices nothing."""
    rows = {
        **row("sub_old", plan="starter", stripe_created=10, last_event_created=90, own_event_created=90),
        **row("sub_new", plan="enterprise", stripe_created=50),
        **row("sub_ended", status="canceled", stripe_created=60),
        **row("sub_elses", customer_id="cust_b", plan="professional", stripe_created=40),
    }
    held = current(stripe_subscription_id="sub_new", plan="enterprise")
    result = coalesce("cust_a", held, rows, [(SubscriptionFacts("sub_new", "canceled"), 200)])
    assert [step.decision.action for step in result.steps if step.decision] == ["superseded"]
    assert result.applied
    assert result.subscription == current(
        stripe_subscription_id="sub_old", plan="starter", last_event_created=90
    )
    assert result.rows["sub_new"].status == "canceled" and set(result.rows) == {"sub_new"}
    # The same events decided again (a batch lost after the Customer was written): the same outcome.
    again = coalesce("cust_a", result.subscription, rows, [(SubscriptionFacts("sub_new", "canceled"), 200)])
    assert [step.decision.action for step in again.steps if step.decision] == ["superseded"]
    assert again.subscription == result.subscription

    # No other live subscription of this customer: the ending applies, as before.
    alone = {sub: rows[sub] for sub in ("sub_new", "sub_ended", "sub_elses")}
    ended = coalesce("cust_a", held, alone, [(SubscriptionFacts("sub_new", "canceled"), 200)])
    assert [step.decision.action for step in ended.steps if step.decision] == ["apply"]
    assert ended.subscription is not None and ended.subscription.status == "canceled"


@pytest.mark.parametrize("status", ["unpaid", "paused"])
def test_a_subscription_that_stops_granting_hands_the_customer_to_its_other_live_one(status: str) -> None:
    """Found in review: only an ending handed over; an unpaid (retries ran out) or paused subscription
    left the customer unlicensed while its other subscription was billed, until that one's next event."""
    rows = {
        **row("sub_old", plan="starter", stripe_created=10, last_event_created=90),
        **row("sub_new", plan="enterprise", stripe_created=50),
    }
    held = current(stripe_subscription_id="sub_new", plan="enterprise")
    result = coalesce("cust_a", held, rows, [(SubscriptionFacts("sub_new", status), 300)])
    assert [step.decision.action for step in result.steps if step.decision] == ["superseded"]
    assert result.subscription == current(
        stripe_subscription_id="sub_old", plan="starter", last_event_created=90
    )
    assert result.rows["sub_new"].status == status
    # Paid again later, the newer subscription is the Customer's again.
    back = coalesce(
        "cust_a",
        result.subscription,
        {**rows, **result.rows},
        [(SubscriptionFacts("sub_new", "active"), 400)],
    )
    assert back.subscription is not None and back.subscription.stripe_subscription_id == "sub_new"


def enterprise_events_of_sub_2(started: int) -> list[tuple[SubscriptionFacts, int]]:
    """A subscription sales made in Stripe's dashboard at `started`: its creation, its first invoice paid
    and its update, as Stripe sends them a second apart."""
    invoice = {
        "id": "in_2",
        "subscription": "sub_2",
        "billing_reason": "subscription_create",
        "lines": {"data": [{"price": {"id": "price_e"}, "period": {"end": PERIOD_END}}]},
    }
    paid = subscription_facts("invoice.paid", invoice, CATALOG)
    assert paid is not None
    own = SubscriptionFacts("sub_2", "active", "enterprise", AT_PERIOD_END, started=started)
    return [(own, started), (paid, started + 1), (own, started + 1)]


@pytest.mark.parametrize("status", ["canceled", "unpaid", "paused"])
def test_a_live_subscription_whose_events_come_after_the_held_one_stopped_takes_the_customer(
    status: str,
) -> None:
    """Found in review: sales made sub_2 (enterprise) and then ended sub_1; sub_2's events (a 503 retried
    an hour later) came after sub_1's ending, which found no other live row to hand over to. Each was
    older than that ending and recorded superseded: the Customer stayed on the stopped sub_1, unlicensed,
    while Stripe billed enterprise. A live subscription takes over from one that no longer grants its
    plan whatever its events' time, as `newest_live` would have handed it over."""
    stopped = coalesce("cust_a", current(), row(), [(SubscriptionFacts("sub_1", status), 300)])
    assert actions(stopped) == ["apply"]
    assert stopped.subscription is not None and stopped.subscription.status == status
    late = coalesce(
        "cust_a", stopped.subscription, {**row(), **stopped.rows}, enterprise_events_of_sub_2(200)
    )
    assert actions(late) == ["apply", "apply", "apply"]
    assert late.subscription is not None
    assert (
        late.subscription.stripe_subscription_id,
        late.subscription.plan,
        late.subscription.status,
        late.subscription.last_event_created,
    ) == ("sub_2", "enterprise", "active", 201)
    # One event is enough, whichever comes first; one of a subscription that is not live takes nothing,
    # nor does one on no plan's price (an add-on).
    assert decide(
        stopped.subscription, None, SubscriptionFacts("sub_2", "past_due", "enterprise"), 50
    ).action == ("apply")
    assert (
        decide(stopped.subscription, None, SubscriptionFacts("sub_2", "past_due"), 50).action == "superseded"
    )
    assert decide(stopped.subscription, None, SubscriptionFacts("sub_2", "incomplete"), 50).action == (
        "superseded"
    )


def test_a_newer_live_subscription_whose_events_come_late_takes_the_customer_from_an_older_one() -> None:
    """Found in review: the held sub_1's renewal (at 300) applied before the events of sub_2, made by
    Stripe later (at 200) than sub_1 (at 10): each was older than the renewal and recorded superseded,
    though the newest live subscription is the Customer's. Stripe's start times order two live
    subscriptions; the events' times only when a start is unknown."""
    renewed = coalesce("cust_a", current(), row(), [(invoice_facts("invoice.paid"), 300)])
    assert actions(renewed) == ["apply"]
    late = coalesce(
        "cust_a", renewed.subscription, {**row(), **renewed.rows}, enterprise_events_of_sub_2(200)
    )
    assert actions(late) == ["apply", "apply", "apply"]
    assert late.subscription is not None
    assert (late.subscription.stripe_subscription_id, late.subscription.plan) == ("sub_2", "enterprise")
    # sub_1's next event is an older live subscription's: recorded, not applied.
    rows = {**row(), **renewed.rows, **late.rows}
    next_renewal = coalesce("cust_a", late.subscription, rows, [(invoice_facts("invoice.paid"), 400)])
    assert actions(next_renewal) == ["superseded"] and next_renewal.subscription == late.subscription


def acme_record() -> Any:
    """The directory's record of Customer acme (cust_a00000001), as the inbox reads it."""
    from iotistic_billing.directory import CustomerRecord

    body = {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": "acme", "uid": "uid-acme"},
        "spec": {"customerId": "cust_a00000001", "email": "ops@acme.example", "companyName": "Acme"},
    }
    record = CustomerRecord.from_body(body)
    assert record is not None
    return record


def test_a_trial_will_end_delivered_after_the_trial_s_invoice_notices_nothing() -> None:
    """Found in review: applied under the newer invoice (the trial ended, its first invoice paid), a
    trial_will_end redelivered days late said the trial ends in three days."""
    from iotistic_billing.stripe_inbox.notices import event_notices

    trial_end = 1_000 + 3 * 86400
    trialing = current(status="trialing", last_event_created=1_000)
    paid = coalesce(
        "cust_a",
        trialing,
        row(status="trialing", last_event_created=1_000),
        [(invoice_facts("invoice.paid"), trial_end)],
    )
    will_end = SubscriptionFacts("sub_1", "trialing", "starter")
    late = coalesce("cust_a", paid.subscription, {**row(), **paid.rows}, [(will_end, 1_000 + 60)])
    (step,) = late.steps
    assert step.decision is not None and step.decision.action == "apply"
    record = acme_record()
    obj = {"id": "sub_1", "trial_end": trial_end}
    notices = event_notices(
        "customer.subscription.trial_will_end", obj, record, step.previous, step.decision, 1_060, None
    )
    assert notices == []


def test_a_row_an_older_inbox_moved_on_keeps_a_late_own_event_stale() -> None:
    """Found in review: during a rolling upgrade an inbox from before migration 0010 applied a downgrade
    (at 300) and left the row's own_event_created at 150; a late upgrade (at 200) was then moved under
    it and overwrote the plan Stripe bills. A row whose newest state is neither recorded time is
    unknown: stale, as before 0010."""
    older_inbox = row(plan="starter", last_event_created=300, own_event_created=150, invoice_event_created=0)
    downgraded = current(plan="starter", last_event_created=300)
    upgrade = SubscriptionFacts("sub_1", "active", "professional", AT_PERIOD_END)
    late = coalesce("cust_a", downgraded, older_inbox, [(upgrade, 200)])
    assert [step.decision.action for step in late.steps if step.decision] == ["stale"]
    assert late.subscription == downgraded
    # Written by this inbox, the same row says its newest state was an invoice's: the upgrade applies.
    invoiced = row(plan="starter", last_event_created=300, own_event_created=150, invoice_event_created=300)
    moved = coalesce("cust_a", downgraded, invoiced, [(upgrade, 200)])
    assert moved.subscription is not None and moved.subscription.plan == "professional"


def test_an_invoice_recorded_after_an_older_inbox_moved_the_row_keeps_a_late_own_event_stale() -> None:
    """Found in this stop's review: the row an older inbox moved on (at 300) read as unknown, until this
    inbox recorded an invoice (at 400) on it and it read as known again, its own time still 150: a late
    upgrade (at 200) then applied over the downgrade Stripe bills."""
    older_inbox = row(plan="starter", last_event_created=300, own_event_created=150, invoice_event_created=0)
    downgraded = current(plan="starter", last_event_created=300)
    paid = coalesce("cust_a", downgraded, older_inbox, [(invoice_facts("invoice.paid"), 400)])
    assert (paid.rows["sub_1"].own_event_created, paid.rows["sub_1"].invoice_event_created) == (300, 400)
    upgrade = SubscriptionFacts("sub_1", "active", "professional", AT_PERIOD_END)
    late = coalesce("cust_a", paid.subscription, {**older_inbox, **paid.rows}, [(upgrade, 200)])
    assert [step.decision.action for step in late.steps if step.decision] == ["stale"]


def test_a_live_subscription_on_no_plan_s_price_does_not_take_over_one_on_a_plan() -> None:
    """Found in review: a second subscription on a price that is no plan's (a support add-on sold in
    Stripe's dashboard beside professional) took over the Customer with no plan, so the operator licensed
    the long-ended trial (unlicensed, "trial ended") while the professional subscription was charged. It
    is recorded and the plan's subscription kept; once the plan's ends, the other takes over, and the
    Customer says its price is no plan's."""
    held = current(plan="professional", last_event_created=100)
    add_on = SubscriptionFacts("sub_addon", "active", started=200)
    result = coalesce("cust_a", held, row(plan="professional", stripe_created=50), [(add_on, 300)])
    assert [step.decision.action for step in result.steps if step.decision] == ["superseded"]
    assert result.subscription == held and result.rows["sub_addon"].plan is None
    # A subscription on a plan still takes over, its plan read off its row when the event names none.
    rows = {
        **row(plan="professional", stripe_created=50),
        **row("sub_new", plan="enterprise", stripe_created=60),
    }
    taken = coalesce("cust_a", held, rows, [(SubscriptionFacts("sub_new", "active"), 300)])
    assert taken.subscription is not None
    assert (taken.subscription.stripe_subscription_id, taken.subscription.plan) == ("sub_new", "enterprise")

    from iotistic_billing.operator.entitlement import effective_plan

    alone = SubscriptionSpec(status="active", plan=None, stripe_subscription_id="sub_addon")
    spec = CustomerSpec.model_validate(
        {"email": "a@b.cd", "companyName": "Acme", "billing": {"mode": "stripe"}, "trial": {"days": 14}}
    ).model_copy(update={"subscription": alone})
    entitlement = effective_plan(spec, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC))
    assert entitlement.plan == "unlicensed"
    assert "Stripe subscription active is on no plan's price (STRIPE_PRICE_*)" in entitlement.message


def test_a_subscription_on_no_plan_s_price_is_not_held_by_a_customer_holding_none() -> None:
    """Found in review: a subscription of another product (no customerId, no plan's price) on a trial
    Customer's Stripe customer became the Customer's, so the cancel route would cancel it and its failed
    invoice started a dunning the Customer was told of. A subscription on no plan's price is recorded
    `superseded` by a Customer holding none (its licence is the trial's either way); one on a plan's
    price, named by its row when the event does not say, is held as before."""
    other = subscription(id="sub_9", metadata={}, items={"data": [{"price": {"id": "price_support"}}]})
    created = subscription_facts("customer.subscription.created", other, CATALOG)
    recorded = coalesce("cust_a", None, {}, [(created, 100)])
    assert actions(recorded) == ["superseded"] and recorded.subscription is None
    assert (recorded.rows["sub_9"].status, recorded.rows["sub_9"].plan) == ("active", None)
    failed = invoice_facts("invoice.payment_failed", price="price_support")
    failed = replace(failed, subscription_id="sub_9")
    overdue = coalesce("cust_a", None, recorded.rows, [(failed, 200)])
    assert actions(overdue) == ["superseded"] and overdue.subscription is None
    assert overdue.rows["sub_9"].status == "past_due"
    # A trial Customer's own checkout (its plan in the session's metadata, or on its row) is held.
    ours = SubscriptionFacts("sub_1", "active")
    held = coalesce("cust_a", None, row(), [(ours, 200)])
    assert actions(held) == ["apply"] and held.subscription is not None
    assert (held.subscription.stripe_subscription_id, held.subscription.plan) == ("sub_1", "starter")


def plan_and_add_on_rows(**main: Any) -> dict[str, StoredSubscription]:
    """cust_a's plan subscription sub_main (starter, made by Stripe at 100) and a support add-on sub_addon
    sold beside it in Stripe's dashboard later (at 200), on no plan's price; both active."""
    return {
        **row("sub_main", plan="starter", stripe_created=100, **main),
        **row("sub_addon", plan=None, stripe_created=200, last_event_created=210, own_event_created=210),
    }


def test_the_newest_live_subscription_handed_to_a_customer_is_one_on_a_plan() -> None:
    """Found in review: the newest live row was picked by when Stripe made it, whatever its plan, so a
    Customer made again from Git was given the add-on (plan None: its ended trial's licence, unlicensed)
    while Stripe billed its plan. Only a row on a plan is handed over: on none, the trial decides the
    licence as it does for a Customer holding nothing, and the stopped plan subscription held instead
    still says why its plan lapsed (its dunning, its ending's notice)."""
    rows = plan_and_add_on_rows()
    given = newest_live("cust_a", rows, ended="")
    assert given is not None and (given.stripe_subscription_id, given.plan) == ("sub_main", "starter")
    assert newest_live("cust_a", {"sub_addon": rows["sub_addon"]}, ended="") is None


def test_a_live_subscription_on_a_plan_takes_over_from_a_live_one_on_none_whatever_their_age() -> None:
    """Found in review: a Customer holding the add-on (given it by an earlier version) kept it for good:
    sub_main's renewal was an older live subscription's and recorded superseded, though only sub_main
    grants a plan. A live one on a plan takes over from one on none, whenever Stripe made either."""
    rows = plan_and_add_on_rows()
    add_on = current(stripe_subscription_id="sub_addon", plan=None, last_event_created=210)
    renewal = coalesce("cust_a", add_on, rows, [(SubscriptionFacts("sub_main", "active"), 5000)])
    assert actions(renewal) == ["apply"]
    assert renewal.subscription is not None
    assert (renewal.subscription.stripe_subscription_id, renewal.subscription.plan) == ("sub_main", "starter")
    # The plan read off the event alone, an older event than the Customer's state: the same.
    late = SubscriptionFacts("sub_main", "active", "starter", started=100)
    assert decide(add_on, None, late, 150, current_started=200).action == "apply"
    # The add-on's next event does not take the Customer back.
    back = coalesce(
        "cust_a",
        renewal.subscription,
        {**rows, **renewal.rows},
        [(SubscriptionFacts("sub_addon", "active", started=200), 5100)],
    )
    assert actions(back) == ["superseded"] and back.subscription == renewal.subscription


@pytest.mark.parametrize("status", ["unpaid", "paused", "canceled"])
def test_a_plan_subscription_that_stops_is_not_handed_over_to_an_add_on(status: str) -> None:
    """Found in review: sub_main stopping (unpaid, paused, canceled) handed the Customer to the add-on,
    no plan's: its ending noticed nothing, its dunning was gone, and once paid or resumed sub_main was
    an older live subscription's and recorded superseded, the Customer unlicensed for good. The
    Customer holds sub_main's stopped state, and sub_main paid or resumed applies."""
    rows = plan_and_add_on_rows()
    held = current(stripe_subscription_id="sub_main")
    stopped = coalesce("cust_a", held, rows, [(SubscriptionFacts("sub_main", status), 300)])
    assert actions(stopped) == ["apply"] and not stopped.taken_over
    assert stopped.subscription is not None
    assert (stopped.subscription.stripe_subscription_id, stopped.subscription.status) == ("sub_main", status)
    # The add-on's own renewal after the stop (found in review of that fix: a planless one was kept out
    # only while the held one was live) does not take the Customer either.
    renewal = coalesce(
        "cust_a",
        stopped.subscription,
        {**rows, **stopped.rows},
        [(SubscriptionFacts("sub_addon", "active"), 350)],
    )
    assert actions(renewal) == ["superseded"]
    assert renewal.subscription is not None and renewal.subscription.stripe_subscription_id == "sub_main"
    if status == "canceled":
        return
    again = coalesce(
        "cust_a",
        stopped.subscription,
        {**rows, **stopped.rows},
        [(SubscriptionFacts("sub_main", "active"), 400)],
    )
    assert actions(again) == ["apply"]
    assert again.subscription is not None
    assert (again.subscription.stripe_subscription_id, again.subscription.status) == ("sub_main", "active")


def test_events_no_customer_matches_move_their_subscription_s_row_as_a_batch_would() -> None:
    """An event whose Customer is gone moves its subscription's row as it would for a Customer holding
    it: an older one not at all, an ending whatever its time (keeping the payment still owed), nothing
    after the ending."""
    since = datetime.fromtimestamp(90, UTC)
    overdue = row(status="past_due", past_due_since=since)["sub_1"]
    assert unmatched_row("sub_1", overdue, [(SubscriptionFacts("sub_1", "active"), 50)]) is None
    ended = unmatched_row("sub_1", overdue, [(SubscriptionFacts("sub_1", "canceled"), 60)])
    assert ended is not None
    assert (ended.status, ended.plan, ended.past_due_since, ended.current_period_end) == (
        "canceled",
        "starter",
        since,
        AT_PERIOD_END,
    )
    assert unmatched_row("sub_1", ended, [(invoice_facts("invoice.payment_failed"), 300)]) is None


def test_customers_that_may_have_lost_their_subscription_are_chosen_from_the_raw_list() -> None:
    """Found in review: the restore parsed every Customer of the list with pydantic each minute (0.7 s of
    the event loop at 10,000); it chooses from the raw objects, a Customer whose spec our models refuse
    too (read again and parsed under its lock, such a one is left out there)."""
    from iotistic_billing.stripe_inbox.restore import unsubscribed

    def body(name: str, customer_id: str, deleting: bool = False, **spec: Any) -> dict[str, Any]:
        metadata = {"name": name, "uid": f"uid-{name}"} | (
            {"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {}
        )
        return {"metadata": metadata, "spec": {"customerId": customer_id, **spec}}

    stripe = {"billing": {"mode": "stripe"}}
    bodies = [
        body("lost", "cust_lost00001", **stripe),
        body("lostnull", "cust_lost00002", subscription=None, **stripe),
        body("unparsed", "cust_lost00003", email=42, **stripe),  # no model takes it
        body("holding", "cust_held00001", subscription={"status": "active"}, **stripe),
        body("manual", "cust_manual001", billing={"mode": "manual"}),
        body("nobilling", "cust_manual002"),
        body("leaving", "cust_leave0001", deleting=True, **stripe),
        body("twin", "cust_twin00001", **stripe),
        body("twintoo", "cust_twin00001"),
        # Being deleted, it shares the customer id with no one.
        body("remade", "cust_remade001", **stripe),
        body("remadeold", "cust_remade001", deleting=True, **stripe),
    ]
    assert unsubscribed(bodies) == {
        "lost": "cust_lost00001",
        "lostnull": "cust_lost00002",
        "unparsed": "cust_lost00003",
        "remade": "cust_remade001",
    }


def test_a_trial_will_end_made_stale_by_a_newer_event_of_the_trial_still_notices_it() -> None:
    """Found in review: Stripe retried a trial_will_end (created at 1,000) after a plan change of the same
    trialing subscription (at 4,600) was applied: stale, it noticed nothing, and nothing else announces a
    Stripe trial's end. The trial is still ahead, so it is noticed, once (the notice's key)."""
    from iotistic_billing.stripe_inbox.notices import event_notices

    trial_end = 1_000 + 3 * 86400
    ends = datetime.fromtimestamp(trial_end, UTC)
    upgraded = current(
        status="trialing", plan="professional", last_event_created=4_600, current_period_end=ends
    )
    will_end = SubscriptionFacts("sub_1", "trialing", "starter")
    late = coalesce(
        "cust_a",
        upgraded,
        row(status="trialing", plan="professional", last_event_created=4_600),
        [(will_end, 1_000)],
    )
    (step,) = late.steps
    assert step.decision is not None and step.decision.action == "stale"
    record = acme_record()
    event = "customer.subscription.trial_will_end"
    (notice,) = event_notices(
        event, {"id": "sub_1", "trial_end": trial_end}, record, step.previous, step.decision, 1_000, None
    )
    assert notice.kind == "trial.ending" and notice.facts["days_left"] == 3
    # Not for another subscription, nor for one no longer trialing.
    assert (
        event_notices(
            event, {"id": "sub_2", "trial_end": trial_end}, record, step.previous, step.decision, 1_000, None
        )
        == []
    )
    # Nor for a trial extended since (a later review): the end it announces is no longer true.
    extended = current(
        status="trialing", last_event_created=4_600, current_period_end=ends + timedelta(days=7)
    )
    assert (
        event_notices(
            event, {"id": "sub_1", "trial_end": trial_end}, record, extended, step.decision, 1_000, None
        )
        == []
    )
    active = current(status="active", last_event_created=4_600)
    assert (
        event_notices(
            event, {"id": "sub_1", "trial_end": trial_end}, record, active, step.decision, 1_000, None
        )
        == []
    )


def test_the_prune_takes_the_final_results_only_never_an_event_the_console_replays() -> None:
    # The console's results ("failed": pending after failed tries): what is not pruned is what it replays,
    # or what the inbox still applies.
    for result in EVENT_RESULTS:
        row = models.StripeEvent(result="pending" if result == "failed" else result, attempts=1)
        assert (row.result in FINAL_RESULTS) == (result not in {"pending", "failed", "unmatched"}), result
        assert not (row.result in FINAL_RESULTS and replayable(row)), result
    assert set(FINAL_RESULTS) <= set(EVENT_RESULTS)


def test_the_prune_s_cutoff_holds_stripe_s_time_and_ours_and_outlives_stripe_s_redeliveries() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    cutoff = retention_cutoff(now, timedelta(days=90))
    assert cutoff == now - timedelta(days=90)
    params = expired(cutoff).compile().params
    # Stripe's `created` is in Unix seconds, the rows' times are instants.
    assert sorted(params.values(), key=str) == sorted(
        [list(FINAL_RESULTS), int(cutoff.timestamp()), cutoff, cutoff], key=str
    )
    # Stripe delivers an event again (its retries, a resend) only within the 30 days it keeps it.
    assert timedelta(days=STRIPE_EVENT_RETENTION_MIN_DAYS) > timedelta(days=30)


def test_every_refusal_reason_is_a_series_from_zero_with_advice() -> None:
    """Found in review: a series born at 1 is no increase to Prometheus, so a pod's first refusal of a
    reason (often its only one) raised no alert."""
    metrics = Metrics()
    for reason in get_args(RefusalReason):
        assert (
            metrics.registry.get_sample_value("iotistic_stripe_webhook_rejections_total", {"reason": reason})
            == 0
        )
        assert REFUSAL_ADVICE[reason]
