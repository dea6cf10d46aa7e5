"""The dunning ladder end to end: Stripe events through the webhook server's inbox, the operator's passes
on an injected clock. A failed renewal keeps the plan through its grace, then restricts the licence (its
claims checked), then a paid invoice brings the plan back at once; a second failure ends with Stripe's
deletion of the subscription: suspended. One notice per step."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.db.models import Notice
from iotistic_billing.operator.reconcile import reconcile
from tests.conftest import OperatorProcess, unique_name
from tests.integration.test_operator import Cluster
from tests.integration.test_operator_recovery import _context
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    PRICES,
    Customers,
    api_fixture,
    customer_id_for,
    customers_fixture,
    deliver,
    event,
    invoice_object,
    random_id,
    subscription_object,
    webhook_settings_fixture,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(k8s_client: kubernetes.client.ApiClient, kubeconfig: Path) -> Cluster:
    return Cluster(k8s_client, kubeconfig)


@pytest.fixture
def stopped_operator(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The session operator stopped: the passes under test, on their clock, are the only ones."""
    operator.stop()
    try:
        yield operator
    finally:
        operator.start()


def overdue(cluster: Cluster, name: str) -> tuple[str, str] | None:
    condition = cluster.condition(name, "PaymentOverdue")
    return (condition["status"], condition["reason"]) if condition else None


async def notices(engine: AsyncEngine, customer_id: str) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(Notice.kind).where(Notice.customer_id == customer_id).order_by(Notice.id)
        )
        return [row[0] for row in rows]


async def stripe_event_applied(
    api: TestClient[Any, Any], event_type: str, obj: dict[str, Any], at: datetime
) -> None:
    """A Stripe event created at `at`, delivered to the webhook server and applied."""
    status, answer = await deliver(api, event(event_type, obj, created=int(at.timestamp())))
    assert (status, answer["result"]) == (200, "applied"), answer


async def pass_on_clock(operator_env: dict[str, str], name: str, moment: datetime) -> None:
    """One operator pass of Customer `name` with its clock at `moment`, succeeding."""
    context = _context(operator_env, moment)
    try:
        result = await reconcile(context, name)
        assert result is not None and result.permanent_error is None, result
    finally:
        await context.engine.dispose()


@dataclass(frozen=True)
class StripeBilled:
    """A Customer in stripe mode and its professional subscription, whose period ends a month from `now`."""

    name: str
    customer_id: str
    subscription_id: str
    stripe_customer: str
    now: datetime
    period_end: int

    def subscription(self, status: str) -> dict[str, Any]:
        return subscription_object(
            self.subscription_id,
            customer=self.stripe_customer,
            price=PRICES["professional"],
            status=status,
            period_end=self.period_end,
            metadata={"customerId": self.customer_id},
        )

    def renewal(self, period_end: int | None = None) -> dict[str, Any]:
        """The unpaid renewal invoice of the period that ends at `period_end` (the current one)."""
        return invoice_object(
            customer=self.stripe_customer,
            subscription_id=self.subscription_id,
            price=PRICES["professional"],
            paid=False,
            period_end=self.period_end if period_end is None else period_end,
        )


def stripe_billed(customers: Customers, prefix: str) -> StripeBilled:
    name = unique_name(prefix)
    customer_id = customer_id_for(name)
    customers.create(name, customerId=customer_id, billing={"mode": "stripe"})
    now = datetime.now(UTC).replace(microsecond=0)
    period_end = int((now + timedelta(days=30)).timestamp())
    return StripeBilled(name, customer_id, random_id("sub_"), random_id("cus_"), now, period_end)


async def test_a_failed_payment_walks_the_ladder_and_a_payment_brings_the_plan_back(
    api: TestClient[Any, Any],
    customers: Customers,
    cluster: Cluster,
    stopped_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
) -> None:
    name = unique_name("dunning")
    customer_id = customer_id_for(name)
    customers.create(name, customerId=customer_id, billing={"mode": "stripe"})
    subscription_id, stripe_customer = random_id("sub_"), random_id("cus_")
    now = datetime.now(UTC)

    stripe = partial(stripe_event_applied, api)
    pass_at = partial(pass_on_clock, operator_env, name)

    def licence() -> dict[str, Any]:
        return cluster.license(name, verify_times=False)[0]

    subscription = subscription_object(
        subscription_id,
        customer=stripe_customer,
        price=PRICES["professional"],
        metadata={"customerId": customer_id},
    )
    await stripe("customer.subscription.created", subscription, now - timedelta(minutes=5))
    await pass_at(now)
    assert licence()["plan"] == "professional" and licence()["features"]["canAddDevices"] is True
    assert overdue(cluster, name) == ("False", "PaymentsCurrent")

    invoice = invoice_object(
        customer=stripe_customer, subscription_id=subscription_id, price=PRICES["professional"], paid=False
    )
    await stripe("invoice.payment_failed", invoice, now)
    assert (customers.subscription(name) or {})["pastDueSince"] == now.strftime("%Y-%m-%dT%H:%M:%SZ")

    await pass_at(now + timedelta(days=2))  # the grace: full access
    assert overdue(cluster, name) == ("True", "GracePeriod")
    assert licence()["features"]["canAddDevices"] is True

    await pass_at(now + timedelta(days=8))  # restricted: the plan's limits, read-only features
    assert overdue(cluster, name) == ("True", "Restricted")
    restricted = licence()
    assert restricted["plan"] == "professional" and restricted["limits"]["maxUsers"] == 15
    assert (restricted["features"]["canAddDevices"], restricted["features"]["canExportData"]) == (
        False,
        False,
    )
    assert restricted["subscription"]["status"] == "past_due"

    paid = {**invoice, "id": random_id("in_"), "status": "paid", "amount_paid": 9900}
    await stripe("invoice.payment_succeeded", paid, now + timedelta(days=8, hours=1))
    await pass_at(now + timedelta(days=8, hours=2))  # back to the plan at once
    assert overdue(cluster, name) == ("False", "PaymentsCurrent")
    assert licence()["features"]["canAddDevices"] is True and licence()["features"]["canExportData"] is True

    await stripe("invoice.payment_failed", {**invoice, "id": random_id("in_")}, now + timedelta(days=30))
    canceled = subscription_object(
        subscription_id, customer=stripe_customer, price=PRICES["professional"], status="canceled"
    )
    await stripe("customer.subscription.deleted", canceled, now + timedelta(days=45))
    await pass_at(now + timedelta(days=45, hours=1))
    assert licence()["plan"] == "unlicensed"
    assert (cluster.customer(name) or {})["status"]["phase"] == "Expired"

    assert await notices(db_engine, customer_id) == [
        "payment.failed",
        "access.restricted",
        "payment.recovered",
        "payment.failed",
        "subscription.canceled",
    ]


async def test_a_subscription_canceled_with_its_renewal_unpaid_says_so_until_that_invoice_is_paid(
    api: TestClient[Any, Any],
    customers: Customers,
    cluster: Cluster,
    stopped_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
) -> None:
    """Found in review: Stripe's cancellation at the end of dunning cleared pastDueSince, and PaymentOverdue
    read False "no payment overdue" while the renewal was still owed. It says CanceledUnpaid (the licence
    unlicensed, no further step or notice) until the open invoice is paid, which brings no plan back."""
    billed = stripe_billed(customers, "canceled-unpaid")
    name, customer_id, now, subscription = billed.name, billed.customer_id, billed.now, billed.subscription
    stripe = partial(stripe_event_applied, api)
    pass_at = partial(pass_on_clock, operator_env, name)

    def payment_overdue() -> tuple[str, str, str]:
        condition = cluster.condition(name, "PaymentOverdue") or {}
        return condition.get("status", ""), condition.get("reason", ""), condition.get("message", "")

    await stripe("customer.subscription.created", subscription("active"), now - timedelta(minutes=5))
    await pass_at(now)
    invoice = billed.renewal()
    await stripe("invoice.payment_failed", invoice, now)
    await pass_at(now + timedelta(days=8))
    assert payment_overdue()[:2] == ("True", "Restricted")

    await stripe("customer.subscription.deleted", subscription("canceled"), now + timedelta(days=10))
    held = customers.subscription(name) or {}
    assert (held["status"], held["pastDueSince"]) == ("canceled", now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    owed = (
        "True",
        "CanceledUnpaid",
        f"Stripe subscription canceled with the payment that failed {now:%Y-%m-%d} unpaid",
    )
    for moment in (now + timedelta(days=10, hours=1), now + timedelta(days=40)):  # no step follows
        await pass_at(moment)
        assert payment_overdue() == owed
        assert cluster.license(name, verify_times=False)[0]["plan"] == "unlicensed"

    paid = {**invoice, "id": random_id("in_"), "status": "paid", "amount_paid": 9900}
    await stripe("invoice.paid", paid, now + timedelta(days=41))
    held = customers.subscription(name) or {}
    assert held["status"] == "canceled" and "pastDueSince" not in held
    await pass_at(now + timedelta(days=41, hours=1))
    assert payment_overdue() == ("False", "PaymentsCurrent", "no payment overdue")
    assert cluster.license(name, verify_times=False)[0]["plan"] == "unlicensed"

    assert await notices(db_engine, customer_id) == [
        "payment.failed",
        "access.restricted",
        "subscription.canceled",
    ]


async def test_a_subscription_canceled_with_its_renewal_unpaid_is_settled_when_that_invoice_is_voided(
    api: TestClient[Any, Any],
    customers: Customers,
    cluster: Cluster,
    stopped_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
) -> None:
    """Found in review: the billing team voided the open invoice a cancellation left unpaid, and nothing
    was owed any more, but `invoice.voided` was ignored: PaymentOverdue said CanceledUnpaid until the
    customer subscribed again. The void of that invoice settles it as its payment does (no plan back, no
    notice); voiding an older period's invoice settles nothing, and is acknowledged as stale."""
    billed = stripe_billed(customers, "canceled-voided")
    name, customer_id, now, subscription = billed.name, billed.customer_id, billed.now, billed.subscription
    stripe = partial(stripe_event_applied, api)
    pass_at = partial(pass_on_clock, operator_env, name)

    await stripe("customer.subscription.created", subscription("active"), now - timedelta(minutes=5))
    await pass_at(now)
    renewal = billed.renewal()
    await stripe("invoice.payment_failed", renewal, now)
    await stripe("customer.subscription.deleted", subscription("canceled"), now + timedelta(days=10))
    await pass_at(now + timedelta(days=10, hours=1))
    assert overdue(cluster, name) == ("True", "CanceledUnpaid")
    noticed = await notices(db_engine, customer_id)
    assert {"payment.failed", "subscription.canceled"} <= set(noticed)

    older = {**billed.renewal(billed.period_end - 30 * 86400), "status": "void"}
    voided_older = event("invoice.voided", older, created=int((now + timedelta(days=11)).timestamp()))
    assert await deliver(api, voided_older) == (
        200,
        {"received": True, "duplicate": False, "result": "stale"},
    )
    held = customers.subscription(name) or {}
    assert held["pastDueSince"] == now.strftime("%Y-%m-%dT%H:%M:%SZ")

    await stripe("invoice.voided", {**renewal, "status": "void"}, now + timedelta(days=12))
    held = customers.subscription(name) or {}
    assert held["status"] == "canceled" and "pastDueSince" not in held
    await pass_at(now + timedelta(days=12, hours=1))
    assert overdue(cluster, name) == ("False", "PaymentsCurrent")
    assert cluster.license(name, verify_times=False)[0]["plan"] == "unlicensed"

    assert await notices(db_engine, customer_id) == noticed
