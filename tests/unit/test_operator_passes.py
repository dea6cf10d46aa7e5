"""Passes of one Customer: one at a time; and what the operator keeps of a Customer, dropped once no pass
wants it or the Customer has left this operator."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import kopf
from prometheus_client import REGISTRY

from iotistic_billing.operator import handlers
from iotistic_billing.operator.context import CustomerLocks, OperatorContext
from iotistic_billing.operator.kopf_tuning import HandledSpecs
from iotistic_billing.operator.metrics import LICENSE_EXPIRY
from iotistic_billing.operator.reconcile import reconcile


class GoneCustomers:
    """An API server that knows none of the Customers asked for (deleted, or events of another shard's)."""

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        return None


async def test_passes_of_customers_that_are_gone_leave_no_lock_behind() -> None:
    ctx = cast(
        OperatorContext,
        SimpleNamespace(kube=GoneCustomers(), locks=CustomerLocks(), pass_slots=asyncio.Semaphore(4)),
    )
    for index in range(10_000):
        assert await reconcile(ctx, f"gone-{index}") is None
    assert len(ctx.locks) == 0


async def test_a_customers_passes_run_one_at_a_time_while_its_lock_comes_and_goes() -> None:
    locks = CustomerLocks()
    inside: list[str] = []
    overlapped: list[tuple[str, ...]] = []
    release = {name: asyncio.Event() for name in ("first", "second", "third")}

    async def pass_(name: str) -> None:
        async with locks.held("acme"):
            if inside:
                overlapped.append((*inside, name))
            inside.append(name)
            await release[name].wait()
            inside.remove(name)

    first = asyncio.create_task(pass_("first"))
    await asyncio.sleep(0)
    assert locks.busy("acme") and inside == ["first"]
    second = asyncio.create_task(pass_("second"))  # waits for the first
    await asyncio.sleep(0)
    release["first"].set()
    await first
    await asyncio.sleep(0)
    assert inside == ["second"]
    # A pass asked for now waits for the second's, which holds the lock the first one made.
    third = asyncio.create_task(pass_("third"))
    await asyncio.sleep(0)
    assert inside == ["second"]
    release["second"].set()
    release["third"].set()
    await asyncio.gather(second, third)
    assert overlapped == [] and not locks.busy("acme") and len(locks) == 0

    # A pass cancelled while it waits gives up its place without keeping the lock alive.
    release = {name: asyncio.Event() for name in ("first", "second")}
    holder = asyncio.create_task(pass_("first"))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(pass_("second"))
    await asyncio.sleep(0)
    waiter.cancel()
    release["first"].set()
    await holder
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled() and len(locks) == 0


def licence_expiry(customer_id: str) -> float | None:
    """The operator's licence expiry sample of the customer, as /metrics exports it (None: none)."""
    return REGISTRY.get_sample_value(
        "iotistic_operator_license_expiry_timestamp_seconds", {"customer_id": customer_id}
    )


async def test_a_customer_that_left_this_shard_no_longer_exports_its_licence_expiry() -> None:
    """Relabelled to another shard (the watch says DELETED), a Customer's last expiry stayed exported
    here for good, and weeks later the expiry alerts fired for a Customer the other shard renews."""
    ctx = SimpleNamespace(housekeepers={}, applied_namespaces={}, written={})
    memo = kopf.Memo(context=ctx, handled=HandledSpecs(prefix="iotistic.io", key="last-handled"))
    moved = {
        "metadata": {"name": "moved", "uid": "uid-moved", "labels": {"iotistic.io/shard": "1"}},
        "spec": {"customerId": "cust_moved"},
        "status": {"customerId": "cust_moved"},
    }
    LICENSE_EXPIRY.labels("cust_moved").set(1_900_000_000)
    LICENSE_EXPIRY.labels("cust_staying").set(1_900_000_000)

    await handlers.customer_gone(type="DELETED", body=kopf.Body(moved), memo=memo, uid="uid-moved")
    assert licence_expiry("cust_moved") is None
    assert licence_expiry("cust_staying") == 1_900_000_000
    # Again (the Customer's deletion after its finalizer, which forgot the series already): no error.
    await handlers.customer_gone(type="DELETED", body=kopf.Body(moved), memo=memo, uid="uid-moved")
    LICENSE_EXPIRY.remove("cust_staying")
