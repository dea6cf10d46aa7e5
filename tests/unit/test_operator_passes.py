"""Passes of one Customer: one at a time, and nothing kept of a Customer once no pass wants it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from iotistic_billing.operator.context import CustomerLocks, OperatorContext
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
