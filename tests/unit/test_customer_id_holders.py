"""CustomerIdHolders: who holds a customer id, from lists of the fleet shared by those asking meanwhile;
DeletionHolders: what each finalizer found, for its DELETED."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from iotistic_billing.operator.context import DELETION_ANSWER_SECONDS, CustomerIdHolders, DeletionHolders


def held(name: str, customer_id: str, **metadata: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", **metadata}, "spec": {"customerId": customer_id}}


class GatedFleet:
    """The API server's Customers; each list answers the Customers as they were when it started, once
    `release` is set."""

    def __init__(self, *customers: dict[str, Any]) -> None:
        self.customers = list(customers)
        self.lists = 0
        self.release = asyncio.Event()
        self.failure: Exception | None = None
        self.listing = asyncio.Event()  # set once a list has started

    async def list_customers(self) -> list[dict[str, Any]]:
        self.lists += 1
        listed, failure = list(self.customers), self.failure
        self.listing.set()
        await self.release.wait()
        if failure is not None:
            raise failure
        return listed


async def test_a_fresh_answer_is_from_a_list_started_after_it_was_asked() -> None:
    """A Customer applied while a list runs is not in it: who asked after it was applied waits for the
    next list, one for all of them."""
    fleet = GatedFleet(held("acme", "cust_a"))
    holders = CustomerIdHolders(fleet.list_customers)
    first = asyncio.create_task(holders.fresh_holder("uid-old", "cust_b"))
    await fleet.listing.wait()
    fleet.customers.append(held("acme-renamed", "cust_b"))
    later = [asyncio.create_task(holders.fresh_holder("uid-old", "cust_b")) for _ in range(3)]
    await asyncio.sleep(0)
    fleet.release.set()
    assert await first is None
    assert await asyncio.gather(*later) == ["acme-renamed"] * 3
    assert fleet.lists == 2


async def test_a_recent_answer_is_from_a_list_at_most_its_age_old() -> None:
    fleet = GatedFleet(
        held("acme", "cust_a"), held("gone", "cust_b", deletionTimestamp="2026-01-01T00:00:00Z")
    )
    fleet.release.set()
    seconds = [0.0]
    holders = CustomerIdHolders(fleet.list_customers, clock=lambda: seconds[0], max_age=5.0)
    assert await holders.recent_holder("uid-other", "cust_a") == "acme"
    assert await holders.recent_holder("uid-acme", "cust_a") is None  # itself
    assert await holders.recent_holder("uid-other", "cust_b") is None  # being deleted
    seconds[0] = 5.0
    fleet.customers.append(held("globex", "cust_b"))
    assert await holders.recent_holder("uid-other", "cust_b") is None and fleet.lists == 1
    seconds[0] = 5.5
    assert await holders.recent_holder("uid-other", "cust_b") == "globex" and fleet.lists == 2
    # A fresh answer lists again whatever the age of the last list.
    assert await holders.fresh_holder("uid-other", "cust_b") == "globex" and fleet.lists == 3


async def test_a_failed_list_fails_those_sharing_it_and_the_next_ask_lists_again() -> None:
    fleet = GatedFleet(held("acme", "cust_a"))
    fleet.failure = ConnectionResetError("the API server went away")
    holders = CustomerIdHolders(fleet.list_customers)
    waiting = [asyncio.create_task(holders.recent_holder(None, "cust_a")) for _ in range(2)]
    await asyncio.sleep(0)
    fleet.release.set()
    for task in waiting:
        with pytest.raises(ConnectionResetError):
            await task
    fleet.failure = None
    assert await holders.fresh_holder(None, "cust_a") == "acme" and fleet.lists == 2


async def test_a_caller_given_up_leaves_the_list_to_the_others() -> None:
    fleet = GatedFleet(held("acme", "cust_a"))
    holders = CustomerIdHolders(fleet.list_customers)
    given_up = asyncio.create_task(holders.recent_holder(None, "cust_a"))
    waiting = asyncio.create_task(holders.recent_holder(None, "cust_a"))
    await asyncio.sleep(0)
    given_up.cancel()
    fleet.release.set()
    assert await waiting == "acme" and fleet.lists == 1


def test_finalizer_answers_whose_deleted_never_comes_are_dropped() -> None:
    """Found in review: a finalizer's answer was kept until its Customer's DELETED took it, and this
    process never handles the DELETED of a Customer gone while its watch re-listed (a 410) or while a
    peer paused it: one entry more for each, for good. An answer is kept DELETION_ANSWER_SECONDS."""
    seconds = [0.0]
    answers = DeletionHolders(clock=lambda: seconds[0])
    answers.record("uid-gone-unseen", "acme-new")
    seconds[0] = DELETION_ANSWER_SECONDS / 2
    answers.record("uid-waiting", None)  # a foreground deletion: its DELETED minutes later
    seconds[0] = DELETION_ANSWER_SECONDS + 1
    answers.record("uid-next", "globex")
    assert len(answers) == 2  # the unseen DELETED's answer pruned
    assert answers.take("uid-waiting") == (True, None)
    assert answers.take("uid-waiting") == (False, None)  # taken once
    assert answers.take("uid-gone-unseen") == (False, None)
    seconds[0] += DELETION_ANSWER_SECONDS + 1
    assert answers.take("uid-next") == (False, None)  # too old to go by: the DELETED looks itself
    assert len(answers) == 0
