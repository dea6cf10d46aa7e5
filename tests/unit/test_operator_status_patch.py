"""The pass's status patch against another writer of the status (usage metering): nothing it wrote is lost;
and against a Customer deleted and created again under its name, or marked Terminating meanwhile."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import CustomerStatus
from iotistic_billing.k8s import KubeApi
from iotistic_billing.operator import delete as delete_module
from iotistic_billing.operator.context import (
    CustomerIdHolders,
    CustomerLocks,
    DeletionHolders,
    OperatorContext,
)
from iotistic_billing.operator.customer_view import CustomerView
from iotistic_billing.operator.delete import finalize
from iotistic_billing.operator.reconcile import STATUS_CONFLICT_RETRIES, StatusConflict, write_status
from iotistic_billing.operator.state import over_current

T0 = "2026-11-25T12:00:00Z"
T1 = "2026-11-25T12:05:00Z"


def condition(type_: str, status: str = "True", reason: str = "Ok", at: str = T0) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": "", "lastTransitionTime": at}


READ = {  # what the pass read
    "phase": "Provisioning",
    "conditions": [condition("LicenseIssued"), condition("Ready", "False", "Provisioning")],
}
WRITTEN = {  # what usage metering wrote after that read
    **READ,
    "usage": {"periodStart": "2026-11-01T00:00:00Z", "activeDevices": 3, "lastReportAt": T1},
    "conditions": [*READ["conditions"], condition("WithinLimits", reason="WithinIncludedUsage", at=T1)],
}
PASS = {  # what the pass computed from its read
    "phase": "Ready",
    "conditions": [condition("LicenseIssued"), condition("Ready", "True", "Available", at=T1)],
}


def status(document: dict[str, Any]) -> CustomerStatus:
    return CustomerStatus.model_validate(document)


def test_the_pass_status_over_the_current_one_keeps_usage_and_within_limits_in_place() -> None:
    merged = over_current(status(PASS), status(WRITTEN)).to_k8s()
    assert merged["phase"] == "Ready" and merged["usage"] == WRITTEN["usage"]
    assert [(c["type"], c["status"]) for c in merged["conditions"]] == [
        ("LicenseIssued", "True"),
        ("Ready", "True"),
        ("WithinLimits", "True"),
    ]
    # A WithinLimits the pass carried from an older read takes the current one's place and value.
    stale = {
        **PASS,
        "conditions": [condition("WithinLimits", "False", "IncludedUsageExceeded"), *PASS["conditions"]],
    }
    merged = over_current(status(stale), status(WRITTEN)).to_k8s()
    first = merged["conditions"][0]
    assert (first["type"], first["reason"]) == ("WithinLimits", "WithinIncludedUsage")
    # Gone from the current status: gone from the patch too.
    assert [c["type"] for c in over_current(status(stale), status(READ)).to_k8s()["conditions"]] == [
        "LicenseIssued",
        "Ready",
    ]


class StatusServer:
    """The Customer's status on the API server: merge patches conditional on the resourceVersion."""

    def __init__(
        self, document: dict[str, Any], resource_version: int, moves: int = 0, uid: str | None = None
    ) -> None:
        self.document = document
        self.resource_version = resource_version
        self.moves = moves  # times another writer changes the Customer right after each read
        self.uid = uid  # the Customer's of that name now
        self.patches: list[tuple[str, dict[str, Any]]] = []

    def metadata(self, name: str) -> dict[str, Any]:
        meta = {"name": name, "resourceVersion": str(self.resource_version)}
        return meta if self.uid is None else {**meta, "uid": self.uid}

    async def read_customer(self, name: str) -> dict[str, Any]:
        body = {"metadata": self.metadata(name)}
        if self.moves:
            self.moves -= 1
            self.resource_version += 1
        return {**body, "status": self.document}

    async def patch_customer_status(
        self, name: str, patch: dict[str, Any], resource_version: str
    ) -> dict[str, Any]:
        self.patches.append((resource_version, patch))
        if resource_version != str(self.resource_version):
            raise ApiException(status=409, reason="Conflict")
        conditions = patch.get("conditions", self.document.get("conditions"))  # merge patch: lists replaced
        self.document = {**self.document, **patch, "conditions": conditions}
        self.resource_version += 1
        return {"metadata": self.metadata(name), "status": self.document}


class DeletedCustomer(StatusServer):
    """The Customer being deleted, its namespace gone, no other Customer: the finalizer's other reads."""

    async def read_namespace(self, name: str) -> None:
        return None

    async def list_customers(self) -> list[dict[str, Any]]:
        return []

    async def create_event(self, kind: str, involved: dict[str, Any], **event: Any) -> None:
        pass

    async def merge_secret_data(self, namespace: str, name: str, data: dict[str, Any], **more: Any) -> None:
        assert data == {}  # no copy found: a mark an earlier try left lifted, nothing kept

    async def read_secret_data(self, namespace: str, name: str) -> None:
        return None  # nothing kept in the billing namespace either


def context(server: StatusServer) -> OperatorContext:
    view = CustomerView(cast(KubeApi, object()))
    return cast(
        OperatorContext, SimpleNamespace(kube=server, rollout_wakeups=set(), customer_view=view, written={})
    )


async def test_a_status_patch_that_lost_the_race_keeps_what_usage_metering_wrote() -> None:
    server = StatusServer(WRITTEN, resource_version=8)
    body = {
        "metadata": {"name": "acme", "resourceVersion": "7"},
        "status": READ,
    }  # read before the usage write
    result = await write_status(context(server), body, status(READ), status(PASS))
    assert [rv for rv, _ in server.patches] == ["7", "8"]
    assert server.document["usage"] == WRITTEN["usage"] and server.document["phase"] == "Ready"
    assert [c["type"] for c in server.document["conditions"]] == ["LicenseIssued", "Ready", "WithinLimits"]
    assert result.status.to_k8s() == server.document and result.previous_phase == "Provisioning"


async def test_a_pass_whose_status_is_already_there_after_the_race_patches_nothing_more() -> None:
    current = over_current(status(PASS), status(WRITTEN)).to_k8s()
    server = StatusServer(current, resource_version=8)
    body = {"metadata": {"name": "acme", "resourceVersion": "7"}, "status": READ}
    await write_status(context(server), body, status(READ), status(PASS))
    assert [rv for rv, _ in server.patches] == ["7"]


async def test_a_status_that_keeps_changing_fails_the_pass_for_a_retry() -> None:
    server = StatusServer(WRITTEN, resource_version=8, moves=STATUS_CONFLICT_RETRIES)
    body = {"metadata": {"name": "acme", "resourceVersion": "7"}, "status": READ}
    with pytest.raises(StatusConflict, match="acme"):
        await write_status(context(server), body, status(READ), status(PASS))
    assert len(server.patches) == STATUS_CONFLICT_RETRIES and server.document == WRITTEN


async def test_a_status_write_that_lost_the_race_to_a_recreated_customer_writes_nothing_on_it() -> None:
    """Found in review: a pass that waited in helm while its Customer was deleted (finalizer done) and
    applied again re-read the Customer by name after its 409 and laid its status over the new one's:
    the new Customer was licensed under the old customer id for good, and the old one's finalizer saw a
    rename (no revocation). A Customer of another uid is not the pass's, as a 404 says it is gone."""
    server = StatusServer({}, resource_version=20, uid="uid-new")
    body = {"metadata": {"name": "acme", "uid": "uid-old", "resourceVersion": "7"}, "status": READ}
    computed = {**PASS, "customerId": "cust_old0000000001", "observedGeneration": 5}
    await write_status(context(server), body, status(READ), status(computed))
    assert [rv for rv, _ in server.patches] == ["7"]  # refused, and nothing sent after the re-read
    assert server.document == {}


async def test_marking_terminating_after_a_pass_keeps_what_the_pass_wrote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the finalizer marked the Customer Terminating from the body Kopf handed it, older
    than the pass it waited for; its patch lost the race, and laid over the Customer as it is now it
    nulled the customer id, the licence and the release that pass had written."""
    for step in ("revoke_license", "revoke_usage_keys"):
        monkeypatch.setattr(delete_module, step, _nothing)
    server = DeletedCustomer(READ, resource_version=8, uid="uid-acme")  # deleted while the pass ran helm
    ctx = context(server)
    for part, value in {
        "locks": CustomerLocks(),
        "clock": lambda: datetime(2026, 11, 25, 12, 10, tzinfo=UTC),
        "applied_namespaces": {},
        "mirrored": set(),
        "settings": SimpleNamespace(billing_namespace="billing"),
        "deletion_holders": DeletionHolders(),
        "customer_id_holders": CustomerIdHolders(server.list_customers),
    }.items():
        setattr(ctx, part, value)
    computed = {
        **PASS,
        "customerId": "cust_acme0001",
        "license": {"jti": "j1", "issuedAt": T1, "expiresAt": "2026-12-25T12:05:00Z"},
        "release": {"name": "instance", "namespace": "customer-acme", "revision": 1},
    }
    read = {"metadata": {"name": "acme", "uid": "uid-acme", "resourceVersion": "7"}, "status": READ}
    await write_status(ctx, read, status(READ), status(computed))  # the pass, as it ends
    handed = {  # what Kopf handed the delete handler, which waited for that pass
        "metadata": {
            "name": "acme",
            "uid": "uid-acme",
            "resourceVersion": "8",
            "deletionTimestamp": T1,
        },
        "spec": {"email": "ops@acme.example", "companyName": "Acme", "plan": "starter"},
        "status": READ,
    }

    await finalize(ctx, handed)
    assert server.document["phase"] == "Terminating"
    assert server.document["customerId"] == "cust_acme0001"
    assert server.document["license"] == computed["license"]
    assert server.document["release"] == computed["release"]


async def _nothing(*args: Any, **kwargs: Any) -> None:
    """A revocation (PostgreSQL's side is tests/integration's)."""
