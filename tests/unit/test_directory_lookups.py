"""The directory's lookups the mirror cannot answer, and signup's look for an email: the Customers listed
raw and only those matching parsed."""

from __future__ import annotations

from typing import Any

import pytest

from iotistic_billing import directory as directory_module
from iotistic_billing.directory import CustomerRecord, Directory, UnreadableCustomer
from tests.unit.test_directory_left_billing import ListingKube


def fleet_member(index: int, stripe_customer_id: str | None = None) -> dict[str, Any]:
    billing = {"mode": "stripe", "stripeCustomerId": stripe_customer_id} if stripe_customer_id else {}
    return {
        "metadata": {"name": f"tenant-{index}", "uid": f"uid-{index}"},
        "spec": {
            "customerId": f"cust_tenant{index:04d}",
            "email": f"ops{index}@tenant.example",
            "companyName": f"Tenant {index}",
            "billing": billing,
        },
    }


class UnmirroredSession:
    """A session whose mirror table names no Customer."""

    async def scalar(self, statement: Any) -> None:
        return None


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Customers the directory parses with our models."""
    names: list[str] = []
    read = directory_module.read_customer

    def counted(body: dict[str, Any]) -> CustomerRecord | UnreadableCustomer:
        names.append(body["metadata"]["name"])
        return read(body)

    monkeypatch.setattr(directory_module, "read_customer", counted)
    return names


async def test_a_lookup_the_mirror_cannot_answer_parses_only_the_customers_it_names(
    parsed: list[str],
) -> None:
    """Found in review: a lookup of an id the mirror cannot name (a deleted Customer's, an unknown one)
    parsed every Customer on the event loop (about 300 ms at 1,000), stalling the Stripe webhooks it
    accepts, and the Stripe inbox's batch did so under its lock."""
    fleet = [fleet_member(i) for i in range(50)]
    fleet.append(fleet_member(50, stripe_customer_id="cus_T50"))
    directory = Directory(ListingKube(fleet))  # type: ignore[arg-type]
    session: Any = UnmirroredSession()

    assert await directory.by_customer_id(session, "cust_gone0001") is None
    assert await directory.by_stripe_customer(session, "cus_gone") is None
    assert parsed == []
    found = await directory.by_customer_id(session, "cust_tenant0007")
    assert found is not None and found.name == "tenant-7"
    by_stripe = await directory.by_stripe_customer(session, "cus_T50")
    assert by_stripe is not None and by_stripe.name == "tenant-50"
    assert parsed == ["tenant-7", "tenant-50"]


async def test_a_batch_lists_the_fleet_once_and_parses_only_what_its_lookups_name(parsed: list[str]) -> None:
    kube = ListingKube([fleet_member(i, stripe_customer_id=f"cus_T{i}") for i in range(50)])
    batch = Directory(kube).for_batch()  # type: ignore[arg-type]
    session: Any = UnmirroredSession()

    for index in (3, 30, 31):
        record = await batch.resolve(
            session, customer_id=f"cust_tenant{index:04d}", stripe_customer_id=None, subscription_id=None
        )
        assert record is not None and record.name == f"tenant-{index}"
    by_stripe = await batch.resolve(
        session, customer_id="cust_gone0001", stripe_customer_id="cus_T9", subscription_id=None
    )
    assert by_stripe is not None and by_stripe.name == "tenant-9"
    assert kube.lists == 1 and parsed == ["tenant-3", "tenant-30", "tenant-31", "tenant-9"]


async def test_a_lookup_skips_a_customer_our_models_refuse_as_before(parsed: list[str]) -> None:
    refused = fleet_member(1)
    refused["spec"]["trial"] = {"days": 900}
    directory = Directory(ListingKube([refused, fleet_member(2)]))  # type: ignore[arg-type]

    assert await directory.by_customer_id(UnmirroredSession(), "cust_tenant0001") is None  # type: ignore[arg-type]
    assert parsed == ["tenant-1"]
