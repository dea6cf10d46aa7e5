"""What the Stripe inbox logs of the events it leaves pending for a retry (stripe_inbox/inbox.py
`EventInbox.failed`): the cause and the Customer once a cause, not once an event and a retry."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing.k8s import KubernetesUnavailable
from iotistic_billing.stripe_inbox.apply import Failure
from iotistic_billing.stripe_inbox.inbox import EventInbox

UPDATED = "customer.subscription.updated"
FORBIDDEN = (
    'customers.iotistic.io "acme" is forbidden: User "system:serviceaccount:billing:webhook-server" cannot'
    ' patch resource "customers" in API group "iotistic.io" in the namespace "billing"'
)


def forbidden() -> ApiException:
    """The API server's 403 for a patch the ClusterRole no longer grants, as the client raises it."""
    return refused(403, "Forbidden", FORBIDDEN)


def refused(status: int, reason: str, message: str) -> ApiException:
    answer = SimpleNamespace(
        status=status,
        reason=reason,
        data=json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status}).encode(),
        headers={},
    )
    return ApiException(http_resp=answer)


def inbox() -> EventInbox:
    return EventInbox(
        sessions=cast(Any, None), applier=cast(Any, None), count=lambda *_: None, clock=lambda: 0.0
    )


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.endswith("inbox") and r.levelno == level]


def test_a_refused_write_is_logged_with_its_status_reason_and_customer_once_for_all_its_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: a ClusterRole without `patch` left every event pending, retried for ever, each
    retry one warning that said only "ApiException": no status, no reason, no Customer, and 2,000
    pending events made 2,000 lines a minute."""
    events = inbox()
    caplog.set_level(logging.INFO, logger="iotistic_billing.stripe_inbox")
    for _retry in range(3):
        for n in range(100):
            customer = f"customer-{n}" if n else "acme"
            events.failed(f"evt_{n}", Failure(forbidden(), frozenset({customer}), customer), UPDATED)

    [warning] = lines(caplog, logging.WARNING)
    assert "403 Forbidden" in warning and FORBIDDEN in warning
    assert f"evt_0 ({UPDATED}) of Customer acme" in warning

    # Another cause is told once too, beside the first; a lookup that failed names the ids it had.
    unavailable = KubernetesUnavailable("the API server did not answer in time")
    events.failed("evt_l", Failure(unavailable, frozenset({"stripe-customer:cus_9"})), UPDATED)
    events.failed("evt_m", Failure(unavailable, frozenset({"stripe-customer:cus_8"})), UPDATED)
    [_, second] = lines(caplog, logging.WARNING)
    assert "the API server did not answer in time" in second and "stripe-customer:cus_9" in second
    assert not lines(caplog, logging.INFO)


def test_a_cause_is_told_over_once_no_event_fails_of_it(caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: nothing said when the refusals ended; and a cause told once stays quiet only
    while it lasts, so the next outage of it is told again."""
    events = inbox()
    caplog.set_level(logging.INFO, logger="iotistic_billing.stripe_inbox")
    for event_id in ("evt_1", "evt_2"):
        events.failed(event_id, Failure(forbidden(), frozenset({"acme"}), "acme"), UPDATED)
    events.applied("evt_1")
    assert not lines(caplog, logging.INFO)  # evt_2 is still refused

    events.failed(
        "evt_2", Failure(KubernetesUnavailable("the API server answered 503"), frozenset()), UPDATED
    )
    [over] = lines(caplog, logging.INFO)  # evt_2 fails now for another cause: the refusals are over
    assert "403 Forbidden" in over

    events.applied("evt_2")
    assert len(lines(caplog, logging.INFO)) == 2
    events.failed("evt_3", Failure(forbidden(), frozenset({"acme"}), "acme"), UPDATED)
    assert len(lines(caplog, logging.WARNING)) == 3


def test_another_customer_s_other_refusal_of_the_same_status_is_told_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: causes were keyed by the status alone, so a second Customer's 422 (an admission
    policy) stayed at DEBUG for as long as the first one's 422 (a value refused) lasted; an unexpected
    error hid another of its class the same way."""
    events = inbox()
    caplog.set_level(logging.INFO, logger="iotistic_billing.stripe_inbox")
    value = 'Customer.iotistic.io "acme" is invalid: spec.subscription.status: Unsupported value: "paused"'
    policy = "customers.iotistic.io \"globex\" is forbidden: ValidatingAdmissionPolicy 'no-billing' denied it"
    for _retry in range(2):
        events.failed(
            "evt_a",
            Failure(refused(422, "Unprocessable Entity", value), frozenset({"acme"}), "acme"),
            UPDATED,
        )
        events.failed(
            "evt_g",
            Failure(refused(422, "Unprocessable Entity", policy), frozenset({"globex"}), "globex"),
            UPDATED,
        )
        events.failed("evt_k", Failure(KeyError("items"), frozenset({"initech"}), "initech"), UPDATED)
        events.failed("evt_l", Failure(KeyError("customer"), frozenset({"hooli"}), "hooli"), UPDATED)
    warnings = lines(caplog, logging.WARNING)
    assert len(warnings) == 4, warnings
    assert [value in w for w in warnings] == [True, False, False, False]
    assert policy in warnings[1] and "of Customer globex" in warnings[1]
    assert "KeyError: 'items'" in warnings[2] and "KeyError: 'customer'" in warnings[3]
