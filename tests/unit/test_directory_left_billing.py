"""Directory.left_billing, the count behind iotistic_subscriptions_left_billing: the Customers listed only
when a subscription is open, and read raw."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from iotistic_billing.customer import Customer
from iotistic_billing.db import models
from iotistic_billing.directory import Directory
from iotistic_billing.stripe_inbox.events import OPEN_STATUSES


class ListingKube:
    """The API server: `customers` listed, `lists` the LIST calls made."""

    def __init__(self, customers: list[dict[str, Any]]) -> None:
        self.customers = customers
        self.lists = 0

    async def list_customers(self) -> list[dict[str, Any]]:
        self.lists += 1
        return self.customers


class Answers:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def all(self) -> list[tuple[Any, ...]]:
        return self.rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)


class QueuedSession:
    """A session answering its queries with `answers`, in order (the open subscriptions, then the mirror's
    links, then the deletions)."""

    def __init__(self, *answers: list[tuple[Any, ...]]) -> None:
        self.answers = list(answers)

    async def execute(self, statement: Any) -> Answers:
        return Answers(self.answers.pop(0) if self.answers else [])


async def test_a_count_with_no_subscription_open_lists_no_customer() -> None:
    """Found in review: each count of iotistic_subscriptions_left_billing listed and parsed every Customer
    on the server's event loop (1.4 to 2 s and 140 MB for 10,000 of them), once a minute per replica, with
    no subscription open to hold against them."""
    kube = ListingKube([{"metadata": {"name": "acme"}, "spec": {"customerId": "cust_acme"}}])

    assert await Directory(kube).left_billing(QueuedSession([]), OPEN_STATUSES) == []  # type: ignore[arg-type]
    assert kube.lists == 0


async def test_a_count_reads_the_customers_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: the count validated every Customer with pydantic to read three fields of each. One
    holds its id whatever its spec, by spec.subscription or by spec.billing.stripeCustomerId too."""

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a Customer was parsed")

    monkeypatch.setattr(Customer, "model_validate", refused)
    kube = ListingKube(
        [
            {"metadata": {"name": "held"}, "spec": {"customerId": "cust_held", "plan": "bogus-plan"}},
            {
                "metadata": {"name": "renamed"},
                "spec": {"customerId": "cust_new", "subscription": {"stripeSubscriptionId": "sub_moved"}},
            },
            {
                "metadata": {"name": "moved"},
                "spec": {"customerId": "cust_b", "billing": {"stripeCustomerId": "cus_a"}},
            },
        ]
    )
    at = datetime(2026, 6, 1, tzinfo=UTC)

    def row(customer_id: str, subscription_id: str) -> models.Subscription:
        return models.Subscription(
            customer_id=customer_id,
            stripe_subscription_id=subscription_id,
            status="active",
            plan="starter",
            updated_at=at,
        )

    session = QueuedSession(
        [
            (row("cust_held", "sub_held"), None),
            (row("cust_old", "sub_moved"), None),
            (row("cust_a", "sub_billed"), "cus_a"),
            (row("cust_gone", "sub_gone"), "cus_gone"),
        ],
        [("cust_gone", "cus_gone")],  # the mirror's links of the candidates' Stripe customers
    )

    found = await Directory(kube).left_billing(session, OPEN_STATUSES)  # type: ignore[arg-type]

    assert [(f.customer_id, f.subscription_id) for f in found] == [("cust_gone", "sub_gone")]
    assert kube.lists == 1
