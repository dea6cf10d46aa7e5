"""Passes of one Customer: one at a time; the Events of their transitions and the retries of their
failures, whoever started them; what the operator keeps of a Customer, dropped once no pass wants it or
the Customer has left this operator."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import kopf
import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import REGISTRY
from sqlalchemy.exc import OperationalError

from iotistic_billing.customer import (
    NOTIFICATIONS_SECRET_NAME,
    Customer,
    CustomerStatus,
    LicenseStatus,
    ReleaseStatus,
)
from iotistic_billing.k8s import KubernetesUnavailable, SecretData
from iotistic_billing.notices.content import NoticeKind
from iotistic_billing.operator import constants as c
from iotistic_billing.operator import handlers
from iotistic_billing.operator import license as license_step
from iotistic_billing.operator import reconcile as reconcile_module
from iotistic_billing.operator import release as release_module
from iotistic_billing.operator.context import (
    RECENT_LIST_SECONDS,
    BackgroundPasses,
    CustomerIdHolders,
    CustomerLocks,
    DeletionHolders,
    OperatorContext,
    PassRequests,
    PassRetries,
    retry_delay,
    trial_notices_outage,
)
from iotistic_billing.operator.kopf_tuning import HandledSpecs
from iotistic_billing.operator.license import ensure_license
from iotistic_billing.operator.metrics import LICENSE_EXPIRY, forget_customer, report_stall
from iotistic_billing.operator.outcomes import (
    InstanceHealth,
    NotificationsOutcome,
    PassOutcome,
    ReleaseOutcome,
)
from iotistic_billing.operator.reconcile import (
    SUBSCRIPTION_RESTORE_WAIT,
    PassResult,
    StatusConflict,
    _count,
    _reconcile,
    reconcile,
    write_status,
)
from iotistic_billing.operator.refusals import Refused, refused_as
from iotistic_billing.operator.sharding import Shard
from iotistic_billing.operator.state import (
    PassTarget,
    housekeeping_due,
    next_status,
    pass_target,
    stall_of,
    stalled_status,
)
from iotistic_billing.operator.webhook_secret import ensure_webhook_secret
from iotistic_billing.rollout import ROLLOUT_CHART_VERSION
from iotistic_billing.workers import to_the_end
from tests.conftest import Retries
from tests.unit.test_operator_namespace import customer
from tests.unit.test_operator_namespace import target_of as hook_target_of
from tests.unit.test_operator_state import CREATED, NOW, LicenceStepParts, _licence, _target_of
from tests.unit.test_operator_status_patch import StatusServer, context
from tests.unit.test_operator_webhook_secret import CustomerNamespace, hooked, signed


class GoneCustomers:
    """An API server that knows none of the Customers asked for (deleted, or events of another shard's)."""

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        return None


async def test_the_stop_waits_for_the_background_passes_and_the_helm_they_run() -> None:
    """Found in review: Kopf's stop waits for its handlers only, then cancels whatever is left at once:
    a housekeeping's or a watch's pass in helm had its helm killed, its release left pending for the
    next Pod to wait out (HELM_TIMEOUT). The stop cancels them first and waits; a helm runs to its end."""
    passes = BackgroundPasses()
    helm_ended, napping = asyncio.Event(), asyncio.Event()

    async def in_helm() -> None:
        async def helm() -> None:
            await asyncio.sleep(0.3)
            helm_ended.set()

        await to_the_end(helm())

    async def waiting() -> None:
        napping.set()
        await asyncio.sleep(3600)  # a requested pass before its delay: cancelled at once

    passes.start(in_helm())
    passes.start(waiting())
    await napping.wait()
    assert len(passes) == 2
    await asyncio.wait_for(passes.stop(), 5)
    assert helm_ended.is_set() and len(passes) == 0


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
    retries = Retries()
    moved = {
        "metadata": {"name": "moved", "uid": "uid-moved", "labels": {"iotistic.io/shard": "1"}},
        "spec": {"customerId": "cust_moved"},
        "status": {"customerId": "cust_moved"},
    }
    ctx = SimpleNamespace(
        kube=Customers(moved, listed=False),  # still there, another shard's now
        locks=CustomerLocks(),
        housekeepers={},
        told_unpinned=set(),
        applied_namespaces={},
        written={},
        deletion_holders=DeletionHolders(),
        pass_retries=PassRetries(retries.later),
    )
    ctx.pass_retries.failed("moved", lambda: None)
    memo = kopf.Memo(context=ctx, handled=HandledSpecs(prefix="iotistic.io", key="last-handled"))
    LICENSE_EXPIRY.labels("cust_moved").set(1_900_000_000)
    LICENSE_EXPIRY.labels("cust_staying").set(1_900_000_000)

    await handlers.customer_gone(type="DELETED", body=kopf.Body(moved), memo=memo, uid="uid-moved")
    assert licence_expiry("cust_moved") is None
    assert licence_expiry("cust_staying") == 1_900_000_000
    assert retries.scheduled == []  # its retry is the other shard's business now
    # Again (the Customer's deletion after its finalizer, which forgot the series already): no error.
    await handlers.customer_gone(type="DELETED", body=kopf.Body(moved), memo=memo, uid="uid-moved")
    LICENSE_EXPIRY.remove("cust_staying")


class Customers:
    """An API server holding these Customers, by name; `listed` False: a list of them is a test failure
    (found in review: relabelling a thousand Customers to another shard listed the fleet a thousand
    times on the shard they left)."""

    def __init__(self, *bodies: dict[str, Any], listed: bool = True) -> None:
        self.bodies = {body["metadata"]["name"]: body for body in bodies}
        self.listed = listed

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        return self.bodies.get(name)

    async def list_customers(self) -> list[dict[str, Any]]:
        assert self.listed, "the fleet listed"
        return list(self.bodies.values())


def licensed(customer_id: str) -> CustomerStatus:
    """The status of a pass that issued the customer a licence."""
    licence = LicenseStatus(jti="j2", issued_at=NOW, expires_at=NOW + timedelta(days=30))
    return CustomerStatus(customer_id=customer_id, license=licence)


async def test_a_pass_that_ends_after_its_customer_left_this_shard_does_not_export_its_licence_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a pass no Kopf worker runs (a housekeeping renewal, a Deployment event's, a retry)
    was under way when its Customer was relabelled to another shard; customer_gone dropped its licence
    expiry series, then the pass ended and set it again, exported here until a restart, and
    IotisticLicenseExpired fired weeks later for a licence the new shard renews. customer_gone drops
    what the process keeps of the Customer once the pass in flight has ended."""
    moved: dict[str, Any] = {
        "metadata": {"name": "moved", "uid": "uid-moved", "labels": {"iotistic.io/shard": "1"}},
        "spec": {"customerId": "cust_moved0001"},
        "status": {"customerId": "cust_moved0001"},
    }
    renewing, released = asyncio.Event(), asyncio.Event()

    async def renewal(ctx: Any, body: dict[str, Any], now: datetime) -> PassResult:
        renewing.set()
        await released.wait()  # in helm, say
        return PassResult(licensed("cust_moved0001"), "Ready")

    monkeypatch.setattr(reconcile_module, "_reconcile", renewal)
    ctx = SimpleNamespace(
        kube=Customers(moved, listed=False),
        locks=CustomerLocks(),
        pass_slots=asyncio.Semaphore(4),
        shard=Shard(1, 3),
        clock=lambda: NOW,
        housekeepers={},
        told_unpinned=set(),
        applied_namespaces={},
        written={},
        deletion_holders=DeletionHolders(),
        pass_retries=PassRetries(Retries().later),
    )
    memo = kopf.Memo(context=ctx, handled=HandledSpecs(prefix="iotistic.io", key="last-handled"))

    pass_ = asyncio.create_task(reconcile(cast(OperatorContext, ctx), "moved"))
    await asyncio.wait_for(renewing.wait(), 5)
    relabelled = {**moved, "metadata": {**moved["metadata"], "labels": {"iotistic.io/shard": "2"}}}
    ctx.kube.bodies["moved"] = relabelled
    gone = asyncio.create_task(
        handlers.customer_gone(type="DELETED", body=kopf.Body(relabelled), memo=memo, uid="uid-moved")
    )
    await asyncio.sleep(0)
    released.set()
    await asyncio.wait_for(asyncio.gather(pass_, gone), 5)
    assert licence_expiry("cust_moved0001") is None


class RelabelledServer(StatusServer):
    """A Customer labelled for `shard`, which the test moves to another shard while a pass runs."""

    shard = "1"

    def metadata(self, name: str) -> dict[str, Any]:
        return {**super().metadata(name), "labels": {"iotistic.io/shard": self.shard}}


async def test_a_pass_whose_status_patch_finds_its_customer_relabelled_drops_it_from_this_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: relabelled to another shard while this shard's watch was down (an API server
    restart: Kopf re-lists and makes no DELETED of what the list lacks), a Customer never had
    customer_gone run here; a renewal pass under way at the relabel exported its expiry until a restart
    (a false IotisticLicenseExpired a month on) and kept its housekeeping and retries. The status patch
    answers with the Customer's labels: another shard's, it is dropped here as customer_gone drops it (its
    housekeeper kept: Kopf would start none again for it)."""
    server = RelabelledServer({"customerId": "cust_left0001"}, resource_version=7, uid="uid-left")

    async def renewal(ctx: Any, body: dict[str, Any], now: datetime) -> PassResult:
        server.shard = "2"  # relabelled while the pass ran
        return await write_status(
            ctx, body, CustomerStatus.model_validate(body["status"]), licensed("cust_left0001")
        )

    monkeypatch.setattr(reconcile_module, "_reconcile", renewal)
    retries = Retries()
    ctx: Any = context(server)
    ctx.locks, ctx.pass_slots, ctx.shard, ctx.clock = (
        CustomerLocks(),
        asyncio.Semaphore(4),
        Shard(1, 3),
        lambda: NOW,
    )
    housekeeper = asyncio.get_running_loop().create_future()
    ctx.housekeepers = {"uid-left": housekeeper}
    ctx.told_unpinned = set()
    ctx.applied_namespaces = {"customer-left": {"kind": "Namespace"}}
    ctx.deletion_holders = DeletionHolders()
    ctx.pass_retries = PassRetries(retries.later)
    ctx.pass_retries.failed("left", lambda: None)

    await handlers._refresh(ctx, "left")
    assert server.document["license"]["jti"] == "j2"  # written, as the API server took it
    assert licence_expiry("cust_left0001") is None
    # Its housekeeper stays: Kopf, not having seen it go, would start none again were it moved back.
    assert not housekeeper.done() and ctx.housekeepers == {"uid-left": housekeeper}
    assert ctx.applied_namespaces == {} and ctx.written == {} and retries.scheduled == []


async def test_the_housekeeping_of_a_customer_that_left_while_the_watch_was_down_sends_no_trial_notice() -> (
    None
):
    """Found in review: relabelled to another shard while this shard's watch was down, a Customer kept its
    housekeeping here on Kopf's last body, for good, which wrote "trial ends on <old date>" before any
    look at the Customer: one paid for since was sent it, from a shard that had left it (another notice
    key than the new shard's, so no dedupe). The notice is written from the Customer read fresh and only
    while it is this shard's; found another shard's, the Customer is dropped here, its housekeeping
    idle."""
    old: dict[str, Any] = {
        "metadata": {
            "name": "acme",
            "uid": "uid-acme",
            "creationTimestamp": CREATED.isoformat(),
            "labels": {"iotistic.io/shard": "1"},
        },
        "spec": {"email": "ops@acme.example", "companyName": "Acme", "trial": {"days": 14}},
    }
    paid = {
        "metadata": {**old["metadata"], "labels": {"iotistic.io/shard": "2"}},
        "spec": {"email": "ops@acme.example", "companyName": "Acme", "plan": "starter"},
    }
    parts = LicenceStepParts()
    ctx: Any = parts.context()
    housekeeper = asyncio.get_running_loop().create_future()
    day_12 = NOW + timedelta(days=9)  # the trial ends in two days, by the old body
    for part, value in {
        "kube": Customers(paid, listed=False),
        "shard": Shard(1, 3),
        "clock": lambda: day_12,
        "noticed": set(),
        "first_licences": {},
        "told_unpinned": set(),
        "trial_notices": trial_notices_outage(),
        "locks": CustomerLocks(),
        "housekeepers": {"uid-acme": housekeeper},
        "applied_namespaces": {},
        "written": {},
        "deletion_holders": DeletionHolders(),
        "pass_retries": PassRetries(Retries().later),
        "background_passes": BackgroundPasses(),
    }.items():
        setattr(ctx, part, value)

    await handlers.housekeeping(name="acme", body=kopf.Body(old), memo=kopf.Memo(context=ctx))
    assert parts.notices == []
    # Kept idle: Kopf, not having seen it go, would start no housekeeping again were it moved back.
    assert not housekeeper.done() and ctx.housekeepers == {"uid-acme": housekeeper}


def deletion_context(holders: DeletionHolders) -> SimpleNamespace:
    """What the DELETED handler reads of the operator's context, with `holders` for the finalizers'
    answers; kube and customer_id_holders are the test's."""
    return SimpleNamespace(
        locks=CustomerLocks(),
        housekeepers={},
        told_unpinned=set(),
        applied_namespaces={},
        written={},
        deletion_holders=holders,
        pass_retries=PassRetries(Retries().later),
    )


async def test_the_deletion_of_a_renamed_customer_leaves_the_id_s_expiry_to_the_customer_holding_it() -> None:
    """Found in review: the finalizer kept the customer id's expiry series for the Customer that holds the
    id after a rename, and the old name's DELETED dropped it anyway, blind until the holder's next pass."""
    ctx = deletion_context(DeletionHolders())
    holder = {"metadata": {"name": "acme-new", "uid": "uid-new"}, "spec": {"customerId": "cust_held0001"}}
    ctx.kube = Customers(holder)
    ctx.customer_id_holders = CustomerIdHolders(ctx.kube.list_customers)
    old = {"metadata": {"name": "acme-old", "uid": "uid-old"}, "spec": {"customerId": "cust_held0001"}}
    LICENSE_EXPIRY.labels("cust_held0001").set(1_900_000_000)
    memo = kopf.Memo(context=ctx, handled=HandledSpecs(prefix="iotistic.io", key="last-handled"))

    await handlers.customer_gone(type="DELETED", body=kopf.Body(old), memo=memo, uid="uid-old")
    assert licence_expiry("cust_held0001") == 1_900_000_000
    del ctx.kube.bodies["acme-new"]  # the holder deleted too: the id's series goes with it
    await handlers.customer_gone(type="DELETED", body=kopf.Body(holder), memo=memo, uid="uid-new")
    assert licence_expiry("cust_held0001") is None


async def test_a_deleted_event_minutes_after_its_finalizer_keeps_the_series_of_a_customer_applied_since() -> (
    None
):
    """Found in review: a DELETED went by its finalizer's answer. In a foreground deletion the Customer
    stays until its namespace has terminated (minutes); a Customer applied meanwhile under the id, whose
    first pass exported the id's expiry, lost the series when the DELETED came, as its finalizer had
    found nobody, and got no pass for days to export it again. None found is looked at again."""
    seconds = [0.0]
    ctx = deletion_context(DeletionHolders(clock=lambda: seconds[0]))
    ctx.kube = Customers()
    ctx.customer_id_holders = CustomerIdHolders(ctx.kube.list_customers, clock=lambda: seconds[0])
    old = {"metadata": {"name": "acme", "uid": "uid-old"}, "spec": {"customerId": "cust_again0001"}}
    # Its finalizer finds no other Customer of the id.
    assert await ctx.customer_id_holders.fresh_holder("uid-old", "cust_again0001") is None
    ctx.deletion_holders.record("uid-old", None)
    seconds[0] += 120  # the namespace terminating
    again = {"metadata": {"name": "acme-2", "uid": "uid-again"}, "spec": {"customerId": "cust_again0001"}}
    ctx.kube.bodies["acme-2"] = again
    LICENSE_EXPIRY.labels("cust_again0001").set(1_900_000_000)  # its first pass
    memo = kopf.Memo(context=ctx, handled=HandledSpecs(prefix="iotistic.io", key="last-handled"))

    await handlers.customer_gone(type="DELETED", body=kopf.Body(old), memo=memo, uid="uid-old")
    assert licence_expiry("cust_again0001") == 1_900_000_000
    forget_customer("acme-2", "cust_again0001")


@pytest.mark.parametrize("same_customer_id", [False, True])
async def test_an_old_customers_deletion_handled_after_its_name_was_taken_again_leaves_the_new_one_alone(
    same_customer_id: bool,
) -> None:
    """Kopf handles each object's events in a worker of its own (keyed by uid), in no order between
    objects: `kubectl delete` and `apply` of a Customer under load, and the new Customer's first pass
    (stalled, say) ran before the old one's DELETED was handled, which dropped what the process kept under
    the name: the new one's stall series (no further pass brings it back), its pending retry."""
    retries = Retries()
    ctx = SimpleNamespace(
        locks=CustomerLocks(),
        housekeepers={},
        told_unpinned=set(),
        applied_namespaces={"customer-acme": {"metadata": {"ownerReferences": [{"uid": "uid-new"}]}}},
        written={"acme": 42},
        deletion_holders=DeletionHolders(),
        pass_retries=PassRetries(retries.later),
    )
    new_id = "cust_old0001" if same_customer_id else "cust_new0001"
    new = {"metadata": {"name": "acme", "uid": "uid-new"}, "spec": {"customerId": new_id}}
    ctx.kube = Customers(new)
    old = {"metadata": {"name": "acme", "uid": "uid-old"}, "spec": {"customerId": "cust_old0001"}}
    LICENSE_EXPIRY.labels("cust_old0001").set(1_900_000_000)
    report_stall("acme", c.INVALID_SPEC)  # the new one's first pass stalled
    ctx.pass_retries.failed("acme", lambda: None)
    memo = kopf.Memo(context=ctx, handled=HandledSpecs(prefix="iotistic.io", key="last-handled"))

    await handlers.customer_gone(type="DELETED", body=kopf.Body(old), memo=memo, uid="uid-old")
    assert stalled("acme") == {c.INVALID_SPEC: 1}
    assert ctx.written == {"acme": 42} and "customer-acme" in ctx.applied_namespaces
    assert retries.delays == [5]
    # The old customer id's expiry series goes, unless the new Customer goes by it too.
    assert (licence_expiry("cust_old0001") is not None) == same_customer_id
    forget_customer("acme", "cust_old0001")


def ended(phase: str, previous: str | None, step: tuple[str, str] | None = None, **more: Any) -> PassResult:
    """A pass that took the Customer from phase `previous` to `phase`, its dunning step then (status,
    reason) if any, stalled (InvalidSpec) by its permanent error if it has one."""
    at = datetime(2025, 3, 1, tzinfo=UTC).isoformat()
    conditions = []
    if step is not None:
        conditions.append(
            {
                "type": "PaymentOverdue",
                "status": step[0],
                "reason": step[1],
                "message": f"payment step {step[1]}",
                "lastTransitionTime": at,
            }
        )
    if (error := more.get("permanent_error")) is not None:
        conditions.append(
            {
                "type": "Stalled",
                "status": "True",
                "reason": "InvalidSpec",
                "message": error,
                "lastTransitionTime": at,
            }
        )
    status = CustomerStatus.model_validate({"phase": phase, "conditions": conditions or None})
    return PassResult(status, previous, **more)


@pytest.mark.parametrize(
    ("result", "events"),
    [
        (ended("Ready", "Ready"), []),
        (ended("Provisioning", None), [("Normal", "Provisioning", "phase none -> Provisioning")]),
        (ended("Ready", "Provisioning"), [("Normal", "Ready", "phase Provisioning -> Ready")]),
        (ended("Degraded", "Ready"), [("Warning", "Degraded", "phase Ready -> Degraded")]),
        (ended("Expired", "Ready"), [("Warning", "Expired", "phase Ready -> Expired")]),
        (
            ended("Ready", "Ready", ("True", "Restricted"), previous_payment_step="GracePeriod"),
            [("Warning", "PaymentRestricted", "payment step Restricted")],
        ),
        (ended("Ready", "Ready", ("False", "PaymentsCurrent")), []),  # a first "current" is no step
        (
            ended("Failed", "Ready", permanent_error="spec.plan is unknown"),
            [
                ("Warning", "Failed", "phase Ready -> Failed"),
                ("Warning", "ReconcileFailed", "spec.plan is unknown"),
            ],
        ),
        # Stalled as it was: no Event on every pass that finds it so (the housekeeping's, a watch's).
        (
            ended(
                "Failed",
                "Failed",
                permanent_error="spec.plan is unknown",
                previous_stall=("InvalidSpec", "spec.plan is unknown"),
            ),
            [],
        ),
        (
            ended(
                "Failed",
                "Failed",
                permanent_error="spec.trial.days must be between 0 and 90, got 120",
                previous_stall=("InvalidSpec", "spec.plan is unknown"),
            ),
            [("Warning", "ReconcileFailed", "spec.trial.days must be between 0 and 90, got 120")],
        ),
    ],
)
def test_the_events_of_a_pass_are_its_transitions(result: PassResult, events: list[Any]) -> None:
    assert result.events == events


class EventRecorder:
    """The API server's Events, as the operator posts them on Customers."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, str | None, str, str]] = []
        self.away = False

    async def create_event(
        self, kind: str, involved: dict[str, Any], *, reason: str, message: str, event_type: str = "Normal"
    ) -> None:
        if self.away:
            raise KubernetesUnavailable("the API server is away")
        assert kind == "Customer"
        meta = involved["metadata"]
        self.posted.append((meta["name"], meta["uid"], event_type, reason))


async def test_passes_the_housekeeping_and_the_watches_start_post_the_events_of_their_transitions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only Kopf's handlers posted Events: trial expiry, the dunning steps time drives, and Ready or
    Degraded from the Deployments happened without one."""
    outcomes = {
        "ready": ended("Ready", "Provisioning", uid="uid-ready"),
        "expired": ended("Expired", "Ready", uid="uid-expired"),
        "restricted": ended(
            "Ready",
            "Ready",
            ("True", "Restricted"),
            previous_payment_step="GracePeriod",
            uid="uid-restricted",
        ),
        "quiet": ended("Ready", "Ready", uid="uid-quiet"),
    }

    async def pass_(ctx: Any, name: str, deployment_event: int | None = None) -> PassResult | None:
        return outcomes.get(name)

    monkeypatch.setattr(handlers, "reconcile", pass_)
    kube = EventRecorder()
    ctx = cast(
        OperatorContext,
        SimpleNamespace(
            kube=kube, pass_retries=PassRetries(Retries().later), background_passes=BackgroundPasses()
        ),
    )
    for name in ("ready", "expired", "restricted", "quiet", "gone"):
        await handlers._refresh(ctx, name, deployment_event=3)
    assert kube.posted == [
        ("ready", "uid-ready", "Normal", "Ready"),
        ("expired", "uid-expired", "Warning", "Expired"),
        ("restricted", "uid-restricted", "Warning", "PaymentRestricted"),
    ]

    kube.away = True  # an Event lost is no failure of the pass
    await handlers._refresh(ctx, "expired", deployment_event=4)


def test_a_failing_pass_is_tried_again_after_5_s_doubling_up_to_5_minutes() -> None:
    assert [retry_delay(retry) for retry in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]


@pytest.mark.parametrize(
    "error",
    [
        KubernetesUnavailable("reading Customer acme: the API server answered 503"),
        StatusConflict("the status of Customer acme kept changing under the pass"),
    ],
    ids=["API server away", "status conflict"],
)
async def test_a_pass_handler_backs_off_when_the_api_server_is_away(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    """Found in review: raised out of Kopf's pass handlers they were unexpected errors to Kopf, a
    traceback and a constant 5 s, not the passes' backoff and one line with the cause. Whoever ran the
    pass, its failures in a row share one backoff and one retry pending."""

    async def pass_(ctx: Any, name: str, handed: Any = None, deployment_event: int | None = None) -> None:
        raise error

    monkeypatch.setattr(handlers, "reconcile", pass_)
    retries = Retries()
    ctx = cast(
        OperatorContext,
        SimpleNamespace(pass_retries=PassRetries(retries.later), background_passes=BackgroundPasses()),
    )
    memo = kopf.Memo(context=ctx)
    body = kopf.Body({"metadata": {"name": "acme", "uid": "uid-acme"}})
    moved = {ROLLOUT_CHART_VERSION: "0.2.0"}
    handled = [
        partial(handlers.reconcile_customer, name="acme", body=body, memo=memo),
        partial(handlers.reconcile_requested, name="acme", body=body, memo=memo, new="now"),
        partial(handlers.rollout_version_changed, name="acme", body=body, memo=memo, old={}, new=moved),
    ]
    with caplog.at_level("WARNING", logger=handlers.log.name):
        for handler in handled:
            await handler(retry=0)  # no TemporaryError: Kopf keeps no retry of its own
            assert len(retries.scheduled) == 1
        await handlers._refresh(ctx, "acme")  # the passes no Kopf handler runs alike
    assert retries.delays == [retry_delay(3)]
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("WARNING", None)] * 4
    assert all(str(error) in record.getMessage() for record in caplog.records)


class ScriptedPasses:
    """handlers.reconcile replaced by passes that end as `outcomes` say (an exception is raised), in an
    operator context Kopf runs (a housekeeping daemon of `uid` running) whose retries the test fires
    (Retries) instead of waiting. `calls`: what each pass was handed and its Deployment event."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, outcomes: list[Any], uid: str = "uid-acme") -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[Any, int | None]] = []
        self.passed = asyncio.Event()
        self.retries = Retries()
        self.kube = EventRecorder()
        self.housekeepers: dict[str, Any] = {uid: asyncio.get_running_loop().create_future()}
        self.ctx = cast(
            OperatorContext,
            SimpleNamespace(
                kube=self.kube,
                pass_requests=PassRequests(),
                pass_retries=PassRetries(self.retries.later),
                housekeepers=self.housekeepers,
                told_unpinned=set(),
                background_passes=BackgroundPasses(),
            ),
        )
        monkeypatch.setattr(handlers, "reconcile", self.reconcile)
        monkeypatch.setattr(handlers, "PASS_REQUEST_DELAY", 0)

    async def reconcile(
        self, ctx: Any, name: str, handed: Any = None, deployment_event: int | None = None
    ) -> Any:
        self.calls.append((handed, deployment_event))
        self.passed.set()
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def retried(self) -> None:
        """The first retry scheduled fired, and the pass it requested has run."""
        self.passed.clear()
        self.retries.fire()
        await asyncio.wait_for(self.passed.wait(), 5)


async def test_a_failed_pass_of_a_kopf_handler_is_retried_by_the_operator_whatever_the_spec_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: Kopf retried a failed pass of its handlers as part of the spec change it handled;
    an edit reverted while the retry waited left Kopf no change to handle (the spec as it last handled
    it), and it dropped the retry: the Customer kept the failure's Ready (Degraded, the registry's error)
    until a renewal, a restart or a Reconcile now. The handler ends as handled and the operator retries
    (PassRetries) with a pass of the Customer as it is then; Kopf never retries the same failure too."""
    edited = kopf.Body({"metadata": {"name": "acme", "uid": "uid-acme"}, "spec": {"chartVersion": "0.5.0"}})
    passes = ScriptedPasses(
        monkeypatch,
        [
            ended("Degraded", "Ready", uid="uid-acme", temporary_error="helm pull: connection refused"),
            # The edit reverted meanwhile: retried all the same (Kopf sees the revert as a change now, below).
            KubernetesUnavailable("reading Customer acme: the API server answered 503"),
            ended("Ready", "Degraded", uid="uid-acme"),
        ],
    )
    retries, kube = passes.retries, passes.kube
    memo = kopf.Memo(context=passes.ctx)

    await handlers.reconcile_customer(name="acme", body=edited, memo=memo, retry=0)
    assert retries.delays == [5] and kube.posted == [("acme", "uid-acme", "Warning", "Degraded")]
    await passes.retried()  # fails again: one retry pending, its backoff doubled
    assert retries.delays == [10]
    await passes.retried()  # the Customer as it is now (reverted): converged, nothing left to retry
    # The Customer each pass was handed (None: it read the Customer itself).
    assert [handed for handed, _ in passes.calls] == [edited, None, None] and retries.scheduled == []
    assert kube.posted[1:] == [("acme", "uid-acme", "Normal", "Ready")]

    # A pass Kopf runs for the revert, converging before the retry is due, drops that retry.
    reverted = kopf.Body({"metadata": {"name": "acme", "uid": "uid-acme"}, "spec": {}})
    passes.outcomes.extend(
        [
            ended("Degraded", "Ready", temporary_error="helm pull: connection refused"),
            ended("Ready", "Degraded"),
        ]
    )
    await handlers.reconcile_customer(name="acme", body=edited, memo=memo, retry=0)
    assert retries.delays == [5]
    await handlers.reconcile_customer(name="acme", body=reverted, memo=memo, retry=0)
    assert retries.scheduled == [] and passes.outcomes == []


async def test_a_pass_no_kopf_handler_runs_is_retried_while_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A housekeeping or watch pass that failed was only logged: a failed helm left the Customer
    Reconciling with nothing due for the housekeeping, a failed database left a usage key unstored."""
    passes = ScriptedPasses(
        monkeypatch,
        [
            RuntimeError("PostgreSQL is away"),
            ended("Expired", "Ready", temporary_error="helm: connection refused"),
            ended("Expired", "Expired", temporary_error="helm: connection refused"),
            ended("Expired", "Expired"),  # helm is back
        ],
    )
    ctx, retries = passes.ctx, passes.retries
    await handlers._refresh(ctx, "acme")
    assert retries.delays == [5]
    for delay in (10, 20):
        await passes.retried()
        assert retries.delays == [delay]
    await passes.retried()
    assert retries.scheduled == [] and [event for _, event in passes.calls] == [None, None, None, None]

    # Failing again later starts from 5 s; a watch's pass failing meanwhile replaces the pending retry.
    passes.outcomes.extend([ended("Ready", "Ready", temporary_error="helm: timeout")] * 2)
    await handlers._refresh(ctx, "acme")
    await handlers._refresh(ctx, "acme", deployment_event=9)
    assert retries.delays == [10]
    # A pass that finds the Customer gone (or another shard's) ends its retries: its failures are
    # forgotten, and one failing after starts from 5 s again.
    passes.outcomes.extend([None, ended("Ready", "Ready", temporary_error="helm: timeout")])
    await passes.retried()
    assert retries.scheduled == []
    await handlers._refresh(ctx, "acme")
    assert retries.delays == [5]


async def test_a_stalled_customer_whose_webhook_secret_is_missing_is_left_alone_until_its_spec_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: for a Stalled Customer the housekeeping rechecked NotificationsReady=False every
    minute with a whole pass, which ran helm upgrade again on the values that had failed (they never
    match the deployed revision) and posted a Warning ReconcileFailed each time."""
    body: dict[str, Any] = {
        "metadata": {"name": "acme", "uid": "uid-acme", "creationTimestamp": CREATED.isoformat()},
        "spec": {
            "email": "ops@acme.example",
            "companyName": "Acme",
            "plan": "starter",
            "notifications": {
                "webhook": {"url": "https://hooks.acme.example/iotistic", "secretRef": {"name": "hook"}}
            },
        },
    }
    customer = Customer.model_validate(body)
    licence = LicenseStatus(jti="j1", issued_at=NOW, expires_at=NOW + timedelta(days=30))
    missing = NotificationsOutcome(False, c.SECRET_NOT_FOUND, "no Secret hook in customer-acme")
    failed = ReleaseOutcome("failed", c.UPGRADE_FAILED, "values don't meet the schema", permanent=True)
    stalled = PassOutcome(license=licence, release=failed, notifications=missing)

    # Passes finding it stalled as the one before (a watch's, a retry's, Reconcile now) post no Event.
    server = StatusServer({}, resource_version=7)
    events: list[tuple[str, str, str]] = []
    for minute in range(3):
        previous = CustomerStatus.model_validate(server.document)
        aimed = pass_target(
            body, customer, "iotistic.cloud", NOW + timedelta(minutes=minute), ("0.1.0", "Fleet")
        )
        read = {**body, "metadata": {**body["metadata"], "resourceVersion": str(server.resource_version)}}
        status = next_status(previous, aimed, stalled, generation=2)
        events += (
            await write_status(context(server), read, previous, status, permanent=stalled.failure)
        ).events
    assert [reason for _, reason, _ in events] == ["Failed", "ReconcileFailed"]

    # Minute after minute, the housekeeping starts no pass (and so no helm) for it.
    passes: list[str] = []

    async def refresh(ctx: Any, name: str, deployment_event: int | None = None) -> None:
        passes.append(name)

    monkeypatch.setattr(handlers, "_refresh", refresh)
    clock = [NOW]
    settings = SimpleNamespace(dunning_restrict_days=14, trial_notice_days=3)
    memo = kopf.Memo(
        context=SimpleNamespace(
            clock=lambda: clock[0],
            settings=settings,
            noticed=set(),
            first_licences={},
            background_passes=BackgroundPasses(),
        )
    )
    for _check in range(5):
        clock[0] += timedelta(minutes=1)
        await handlers.housekeeping(
            name="acme", body=kopf.Body({**body, "status": server.document}), memo=memo
        )
    assert passes == []

    # Not stalled, the Secret is looked for again at the next check (it may have been created since).
    deployed = ReleaseOutcome("unchanged", c.RELEASE_UNCHANGED, "revision 3 is current")
    health = InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, "6 available")
    ready = PassOutcome(license=licence, release=deployed, health=health, notifications=missing)
    aimed = pass_target(body, customer, "iotistic.cloud", NOW, ("0.1.0", "Fleet"))
    waiting = next_status(CustomerStatus(), aimed, ready, generation=2).to_k8s()
    await handlers.housekeeping(name="acme", body=kopf.Body({**body, "status": waiting}), memo=memo)
    assert passes == ["acme"]


async def test_the_housekeeping_passes_a_ready_customer_whose_generation_no_pass_observed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: an edit and its revert while the Customer's Kopf worker was busy (a console
    Suspend, Argo CD's self-heal) left Kopf no spec change and the housekeeping nothing due: generation
    N+2 against observedGeneration N, in progress for kstatus until an unrelated pass days later."""
    body: dict[str, Any] = {
        "metadata": {"name": "acme", "uid": "uid-acme", "creationTimestamp": CREATED.isoformat()},
        "spec": {"email": "ops@acme.example", "companyName": "Acme", "plan": "starter"},
    }
    licence = LicenseStatus(jti="j1", issued_at=NOW, expires_at=NOW + timedelta(days=30))
    deployed = ReleaseOutcome("unchanged", c.RELEASE_UNCHANGED, "revision 3 is current")
    health = InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, "6 available")
    ready = PassOutcome(license=licence, release=deployed, health=health)
    aimed = pass_target(body, Customer.model_validate(body), "iotistic.cloud", NOW, ("0.1.0", "Fleet"))
    passes: list[str] = []

    async def refresh(ctx: Any, name: str, deployment_event: int | None = None) -> None:
        passes.append(name)

    monkeypatch.setattr(handlers, "_refresh", refresh)
    settings = SimpleNamespace(dunning_restrict_days=14, trial_notice_days=3)
    memo = kopf.Memo(
        context=SimpleNamespace(
            clock=lambda: NOW,
            settings=settings,
            noticed=set(),
            first_licences={},
            background_passes=BackgroundPasses(),
        )
    )
    for observed, generation in ((4, 4), (2, 4)):
        status = next_status(CustomerStatus(), aimed, ready, generation=observed).to_k8s()
        live = {**body, "metadata": {**body["metadata"], "generation": generation}, "status": status}
        await handlers.housekeeping(name="acme", body=kopf.Body(live), memo=memo)
    assert passes == ["acme"]


def reconcile_errors(reason: str) -> float:
    return REGISTRY.get_sample_value("iotistic_operator_reconcile_errors_total", {"reason": reason}) or 0


def stalls(name: str) -> tuple[PassTarget, LicenseStatus, ReleaseOutcome, CustomerStatus, CustomerStatus]:
    """A Customer's pass target, its licence, a release helm refused for good, the status that refusal
    left (stalled), and the status of an invalid spec after it (stalled under InvalidSpec)."""
    body = {"metadata": {"name": name, "uid": "uid-" + name}, "spec": {"email": "a@b.cd", "companyName": "x"}}
    aimed = pass_target(body, Customer.model_validate(body), "iotistic.cloud", NOW, ("0.1.0", "Fleet"))
    licence = LicenseStatus(jti="j1", issued_at=NOW, expires_at=NOW + timedelta(days=30))
    broken = ReleaseOutcome("failed", c.UPGRADE_FAILED, "values don't meet the schema", permanent=True)
    upgrade_failed = next_status(CustomerStatus(), aimed, PassOutcome(license=licence, release=broken), 1)
    invalid = stalled_status(upgrade_failed, 2, c.INVALID_SPEC, "spec.trial.days: at most 90", NOW)
    return aimed, licence, broken, upgrade_failed, invalid


def test_a_pass_that_did_not_converge_is_counted_under_the_reason_that_stopped_it() -> None:
    """Found in review: an invalid spec sets no LicenseIssued or ReleaseDeployed condition, so its
    stall was counted as Unknown, or under the reason an earlier failure had left there."""
    aimed, licence, broken, upgrade_failed, invalid = stalls("acme")
    away = ReleaseOutcome("failed", c.CHART_PULL_FAILED, "connection refused")
    retried = next_status(CustomerStatus(), aimed, PassOutcome(license=licence, release=away), 1)
    counted = [c.INVALID_SPEC, c.UPGRADE_FAILED, c.CHART_PULL_FAILED, "Unknown"]
    before = [reconcile_errors(reason) for reason in counted]

    _count("acme", PassResult(invalid, "Failed", permanent_error="spec.trial.days: at most 90"))
    _count("acme", PassResult(upgrade_failed, None, permanent_error=broken.message))
    _count("acme", PassResult(retried, None, temporary_error=away.message))
    assert [reconcile_errors(reason) - was for reason, was in zip(counted, before, strict=True)] == [
        1,
        1,
        1,
        0,
    ]


def stalled(customer: str) -> dict[str, float]:
    """The Customer's series of iotistic_operator_customer_stalled, by reason."""
    return {
        sample.labels["reason"]: sample.value
        for family in REGISTRY.collect()
        if family.name == "iotistic_operator_customer_stalled"
        for sample in family.samples
        if sample.labels["customer"] == customer
    }


def test_a_stalled_customer_is_exported_until_a_pass_or_its_deletion_ends_the_stall() -> None:
    """Found in review: a stall gets no further pass, so the alert on the passes' counter (its increase
    over 15 minutes, for 30) never fired; a gauge says which Customers are stalled for as long as they are."""
    aimed, licence, broken, upgrade_failed, invalid = stalls("stuck")
    deployed = ReleaseOutcome("unchanged", c.RELEASE_UNCHANGED, "revision 3 is current")
    converged = next_status(CustomerStatus(), aimed, PassOutcome(license=licence, release=deployed), 3)

    _count("stuck", PassResult(invalid, "Failed", permanent_error="spec.trial.days: at most 90"))
    assert stalled("stuck") == {c.INVALID_SPEC: 1}
    _count("stuck", PassResult(upgrade_failed, None, permanent_error=broken.message))
    assert stalled("stuck") == {stall_of(upgrade_failed)[0]: 1}  # type: ignore[index]
    _count("stuck", PassResult(converged, None))
    assert stalled("stuck") == {}

    _count("stuck", PassResult(invalid, "Failed", permanent_error="spec.trial.days: at most 90"))
    forget_customer("stuck", "cust_stuck")  # deleted, or another shard's now
    assert stalled("stuck") == {}


async def housekeeping_checks(
    monkeypatch: pytest.MonkeyPatch, body: dict[str, Any], server: StatusServer, ctx: Any, minutes: int
) -> list[PassResult]:
    """The housekeeping's checks, a minute apart on the injectable clock, with the passes they start run
    as _reconcile runs them (on the Customer as `server` has it now)."""
    passes: list[PassResult] = []

    def now_read() -> dict[str, Any]:
        meta = {**body["metadata"], "resourceVersion": str(server.resource_version)}
        return {**body, "metadata": meta, "status": server.document}

    async def refresh(_ctx: Any, name: str, deployment_event: int | None = None) -> None:
        passes.append(await _reconcile(ctx, now_read(), ctx.clock()))

    monkeypatch.setattr(handlers, "_refresh", refresh)
    ctx.background_passes = BackgroundPasses()
    memo = kopf.Memo(context=ctx)
    start = ctx.clock()
    for minute in range(1, minutes + 1):
        ctx.clock = lambda minute=minute: start + timedelta(minutes=minute)
        await handlers.housekeeping(name=body["metadata"]["name"], body=kopf.Body(now_read()), memo=memo)
    return passes


class LicenceHistory:
    """The licence history as a pass reads the trial's start from it: `first`, the issue of the first
    licence of the (one) customer id asked for; PostgreSQL away when `error` is given."""

    def __init__(self, first: datetime | None = None, error: Exception | None = None) -> None:
        self.first, self.error, self.reads = first, error, 0

    def sessions(self) -> LicenceHistory:
        return self

    async def __aenter__(self) -> LicenceHistory:
        if self.error is not None:
            raise self.error
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    # The customer id's live subscription rows on a plan (the inbox's restore gives the newest back).
    live_subscription: str | None = None

    async def scalar(self, statement: Any, parameters: Any = None) -> Any:
        self.reads += 1
        return self.first

    async def execute(self, statement: Any) -> list[tuple[str, str]]:
        """The live subscription rows on a plan of the customer ids asked (restore.live_on_plan)."""
        assert "subscriptions" in str(statement)
        asked = [value for value in statement.compile().params.values() if isinstance(value, list)]
        return (
            [(customer_id, self.live_subscription) for customer_id in asked[0]]
            if self.live_subscription
            else []
        )


def housekeeping_context(server: StatusServer, history: LicenceHistory | None = None) -> Any:
    ctx: Any = context(server)
    ctx.fleet_moves_at_once = False
    ctx.clock = lambda: NOW
    ctx.noticed = set()
    ctx.first_licences = {}
    ctx.told_unpinned = set()
    ctx.customer_id_holders = CustomerIdHolders(lambda: server.list_customers())  # type: ignore[attr-defined]
    ctx.sessions = (history or LicenceHistory()).sessions
    ctx.settings = SimpleNamespace(
        dunning_restrict_days=14, trial_notice_days=3, base_domain="iotistic.cloud", billing_url="b"
    )
    return ctx


# Ready earlier, on the starter plan, with a licence whose renewal is due.
RENEWAL_DUE = {
    "phase": "Ready",
    "plan": "starter",
    "license": {
        "jti": "j1",
        "issuedAt": (NOW - timedelta(days=29)).isoformat(),
        "expiresAt": (NOW + timedelta(days=1)).isoformat(),
    },
}


@pytest.mark.parametrize(
    ("annotation", "problem"),
    [
        ("1.2.3-" + "a" * 70, "must be at most 64 characters long, got 76"),
        ("latest", "must match ^v?[0-9]+"),
    ],
)
async def test_a_rollout_annotation_that_is_no_chart_version_stalls_the_release_and_not_the_licence(
    monkeypatch: pytest.MonkeyPatch, annotation: str, problem: str
) -> None:
    """Found in review: the annotation (kubectl annotate can write anything) went unchecked into
    status.release.targetVersion, and every pass crashed on the status model (64 characters at most).
    Then it stalled the whole pass as InvalidSpec, before the licence: the licence was never renewed
    (it expired), and the housekeeping, finding renewal still due, ran a failing pass every minute."""
    body: dict[str, Any] = {
        "metadata": {
            "name": "acme",
            "uid": "uid-acme",
            "generation": 3,
            "creationTimestamp": CREATED.isoformat(),
            "annotations": {ROLLOUT_CHART_VERSION: annotation},
        },
        "spec": {"email": "a@b.cd", "companyName": "x", "plan": "starter"},
    }
    minted: list[LicenseStatus] = []

    async def ensure_license(ctx: Any, target: Any, existing: Any) -> LicenseStatus:
        minted.append(
            LicenseStatus(
                jti=f"j{len(minted) + 2}", issued_at=target.now, expires_at=target.now + timedelta(days=30)
            )
        )
        return minted[-1]

    async def namespace_and_secret(ctx: Any, target: Any, made_before: bool, **_: Any) -> None:
        return None

    monkeypatch.setattr(reconcile_module, "ensure_license", ensure_license)
    monkeypatch.setattr(reconcile_module, "_namespace_and_secret", namespace_and_secret)
    server = StatusServer(dict(RENEWAL_DUE), resource_version=7)

    passes = await housekeeping_checks(monkeypatch, body, server, housekeeping_context(server), minutes=5)

    # One pass, which renewed the licence; the four checks after it found nothing due.
    assert len(passes) == 1 and [licence.jti for licence in minted] == ["j2"]
    assert server.document["license"]["jti"] == "j2" and server.document["plan"] == "starter"
    field = f"metadata.annotations[{ROLLOUT_CHART_VERSION}] {problem}"
    status = CustomerStatus.model_validate(server.document)
    for kind in ("Stalled", "ReleaseDeployed"):
        condition = status.condition(kind)
        assert condition is not None and condition.reason == c.CHART_VERSION_INVALID
        assert condition.message.startswith(field)
    assert status.condition("Stalled").status == "True"  # type: ignore[union-attr]
    assert status.condition("LicenseIssued").status == "True"  # type: ignore[union-attr]
    assert status.phase == "Failed" and status.observed_generation == 3
    assert passes[0].permanent_error == status.condition("Stalled").message  # type: ignore[union-attr]
    # What the pass aimed at is no version: none is written (the status model takes 64 characters).
    assert status.release is not None
    assert (status.release.target_version, status.release.version_source) == (None, "Rollout")


async def test_a_customer_stalled_before_its_licence_gets_no_housekeeping_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: an InvalidSpec pass writes neither status.plan nor status.license, so the plan
    the housekeeping found changed, or the renewal it found due, stayed so: a failing pass every
    minute, for good. The change that can mend it (spec, name) runs its own pass."""
    body: dict[str, Any] = {
        "metadata": {
            "name": "acme-",  # a name the CRD refuses today: the pass stalls before the licence
            "uid": "uid-acme",
            "generation": 3,
            "creationTimestamp": CREATED.isoformat(),
        },
        "spec": {"email": "a@b.cd", "companyName": "x", "plan": "professional"},
    }
    server = StatusServer(dict(RENEWAL_DUE), resource_version=7)
    ctx = housekeeping_context(server)
    first = await _reconcile(
        ctx,
        {**body, "metadata": {**body["metadata"], "resourceVersion": "7"}, "status": server.document},
        NOW,
    )
    # Stalled, with the plan (professional now) and the licence (renewal due) left as they were.
    assert stall_of(first.status) == (c.INVALID_SPEC, first.permanent_error)
    assert (server.document["plan"], server.document["license"]["jti"]) == ("starter", "j1")

    passes = await housekeeping_checks(monkeypatch, body, server, ctx, minutes=5)
    assert passes == []


async def test_a_subscription_set_to_cancel_lapses_at_the_housekeeping_check_after_its_period_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: nothing ran a pass when the period of a subscription set to cancel ended, so
    the paid plan stayed until Stripe's deletion was applied (up to 3 days of its retries). The check
    finds the plan changed at the period's end: a pass within OPERATOR_TIMER_INTERVAL of it."""
    period_end = NOW + timedelta(minutes=2, seconds=30)
    ending = {
        "status": "active",
        "plan": "professional",
        "currentPeriodEnd": period_end.isoformat(),
        "cancelAtPeriodEnd": True,
    }
    body: dict[str, Any] = {
        "metadata": {"name": "acme", "uid": "uid-acme", "creationTimestamp": CREATED.isoformat()},
        "spec": {
            "email": "a@b.cd",
            "companyName": "x",
            "billing": {"mode": "stripe"},
            "subscription": ending,
        },
    }
    customer = Customer.model_validate(body)
    licence = LicenseStatus(jti="j1", issued_at=NOW, expires_at=NOW + timedelta(days=30))
    health = InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, "6 available")
    deployed = ReleaseOutcome("unchanged", c.RELEASE_UNCHANGED, "revision 3 is current")
    outcome = PassOutcome(license=licence, release=deployed, health=health)
    first = pass_target(body, customer, "iotistic.cloud", NOW, ("0.1.0", "Fleet"))
    statuses = [next_status(CustomerStatus(), first, outcome, generation=2)]
    assert statuses[0].plan == "professional"

    passes: list[datetime] = []

    async def refresh(ctx: Any, name: str, deployment_event: int | None = None) -> None:
        passes.append(ctx.clock())
        aimed = pass_target(body, customer, "iotistic.cloud", ctx.clock(), ("0.1.0", "Fleet"))
        statuses.append(next_status(statuses[-1], aimed, outcome, generation=2))

    monkeypatch.setattr(handlers, "_refresh", refresh)
    clock = [NOW]
    settings = SimpleNamespace(dunning_restrict_days=14, trial_notice_days=3)
    memo = kopf.Memo(
        context=SimpleNamespace(
            clock=lambda: clock[0],
            settings=settings,
            noticed=set(),
            first_licences={},
            background_passes=BackgroundPasses(),
        )
    )
    for _check in range(5):
        clock[0] += timedelta(minutes=1)
        live = kopf.Body({**body, "status": statuses[-1].to_k8s()})
        await handlers.housekeeping(name="acme", body=live, memo=memo)

    # The first check after the period's end ran the one pass, which wrote the lapse.
    assert passes == [NOW + timedelta(minutes=3)]
    assert (statuses[-1].plan, statuses[-1].phase) == ("unlicensed", "Expired")


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(
            111, "Connect call failed ('127.0.0.1', 14416)"
        ),  # as asyncpg's connect raises it
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
        OperationalError("INSERT INTO license_history", {}, Exception("server closed the connection")),
    ],
)
async def test_a_licence_step_postgresql_refuses_is_a_database_unavailable_condition_and_a_retry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    """Found in review: with PostgreSQL away a new Customer's pass raised the driver's connection error
    into Kopf (a 9.8 KB traceback every 5 s naming no database), and the Customer had no status at all."""
    body: dict[str, Any] = {
        "metadata": {
            "name": "acme",
            "uid": "uid-acme",
            "generation": 1,
            "resourceVersion": "7",
            "creationTimestamp": CREATED.isoformat(),
        },
        "spec": {
            "email": "a@b.cd",
            "companyName": "x",
            "plan": "starter",
            "instance": {"chartVersion": "0.1.0"},
        },
    }

    async def ensure_license(ctx: Any, target: Any, existing: Any) -> LicenseStatus:
        raise error  # the history row's transaction: the Secret may be written already

    async def namespace_and_secret(ctx: Any, target: Any, made_before: bool, **_: Any) -> None:
        return None

    monkeypatch.setattr(reconcile_module, "ensure_license", ensure_license)
    monkeypatch.setattr(reconcile_module, "_namespace_and_secret", namespace_and_secret)
    server = StatusServer({}, resource_version=7)

    result = await _reconcile(housekeeping_context(server), body, NOW)

    assert result.permanent_error is None and result.temporary_error is not None
    assert result.temporary_error.startswith(f"PostgreSQL cannot be reached ({type(error).__name__})")
    status = CustomerStatus.model_validate(server.document)
    issued = status.condition("LicenseIssued")
    assert issued is not None
    assert (issued.status, issued.reason, issued.message) == (
        "False",
        "DatabaseUnavailable",
        result.temporary_error,
    )
    for kind, value in (("Ready", "False"), ("Reconciling", "True")):
        condition = status.condition(kind)
        assert condition is not None and (condition.status, condition.reason) == (
            value,
            "DatabaseUnavailable",
        )
    assert status.condition("Stalled").status == "False"  # type: ignore[union-attr]
    assert status.phase == "Pending" and status.license is None and status.observed_generation is None
    # Retried after the passes' backoff as any failed pass (not by Kopf): one line, no traceback.
    retries = Retries()
    ctx = housekeeping_context(server)
    ctx.pass_retries = PassRetries(retries.later)
    with caplog.at_level("WARNING", logger=handlers.log.name):
        handlers.retry_if_failed(ctx, "acme", result)
    assert retries.delays == [retry_delay(0)]
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("WARNING", None)]
    assert result.temporary_error in caplog.records[0].getMessage()


async def test_a_licence_step_that_fails_for_a_bug_still_raises_it(monkeypatch: pytest.MonkeyPatch) -> None:
    async def ensure_license(ctx: Any, target: Any, existing: Any) -> LicenseStatus:
        raise KeyError("a bug")

    async def namespace_and_secret(ctx: Any, target: Any, made_before: bool, **_: Any) -> None:
        return None

    monkeypatch.setattr(reconcile_module, "ensure_license", ensure_license)
    monkeypatch.setattr(reconcile_module, "_namespace_and_secret", namespace_and_secret)
    body: dict[str, Any] = {
        "metadata": {"name": "acme", "uid": "u", "generation": 1, "resourceVersion": "7"},
        "spec": {"email": "a@b.cd", "companyName": "x", "instance": {"chartVersion": "0.1.0"}},
    }
    with pytest.raises(KeyError):
        await _reconcile(housekeeping_context(StatusServer({}, resource_version=7)), body, NOW)


async def test_a_retry_due_while_kopf_pauses_the_operator_waits_for_the_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a failed pass's retry that came due while Kopf's peering paused this operator
    was dropped (request_pass runs no pass then), and no Kopf handler retried the failure after the
    resume: the Customer kept the failure until a renewal or an edit."""
    passes = ScriptedPasses(
        monkeypatch,
        [
            ended("Degraded", "Ready", uid="uid-acme", temporary_error="helm pull: connection refused"),
            ended("Ready", "Degraded", uid="uid-acme"),
        ],
    )
    body = kopf.Body({"metadata": {"name": "acme", "uid": "uid-acme"}, "spec": {}})
    await handlers.reconcile_customer(name="acme", body=body, memo=kopf.Memo(context=passes.ctx), retry=0)

    paused = passes.housekeepers.pop("uid-acme")  # Kopf stops every daemon while it pauses the operator
    passes.passed.clear()
    passes.retries.fire()
    assert passes.retries.delays == [10] and not passes.passed.is_set()  # still pending, not dropped

    passes.housekeepers["uid-acme"] = paused  # resumed
    await passes.retried()
    assert passes.outcomes == [] and passes.retries.scheduled == []


def refusal(status: int, message: str) -> ApiException:
    """The API server's answer refusing a write, each with its own headers (as an admission webhook or
    RBAC answers)."""
    answer = SimpleNamespace(
        status=status,
        reason="Forbidden" if status == 403 else "Unprocessable Entity",
        data=json.dumps({"kind": "Status", "message": message}).encode(),
        headers={"Audit-Id": f"audit-{id(message)}"},
    )
    return ApiException(http_resp=answer)


POLICY = (
    'admission webhook "validate.kyverno.svc-fail" denied the request: policy Namespace/customer-acme'
    " for resource violation: require-team-label: namespaces need label team"
)


class PolicedNamespaces(StatusServer):
    """The API server, its admission policy refusing the namespace the operator creates until mended."""

    def __init__(self) -> None:
        super().__init__({}, resource_version=7)
        self.mended = False
        self.created: list[str] = []

    async def create_namespace(self, body: dict[str, Any]) -> bool:
        if not self.mended:
            raise refusal(403, POLICY)
        self.created.append(body["metadata"]["name"])
        return True

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        """None until mended: the refused create is read after (one of the name may be there)."""
        return {"metadata": {"name": name}} if name in self.created else None

    async def read_secret_data(self, namespace: str, name: str) -> None:
        return None


def as_now(body: dict[str, Any], server: StatusServer) -> dict[str, Any]:
    """`body` as the API server has it now: its status and resourceVersion."""
    meta = {**body["metadata"], "resourceVersion": str(server.resource_version)}
    return {**body, "metadata": meta, "status": server.document}


async def test_a_namespace_the_api_server_refuses_is_said_in_ready_posted_once_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: an admission policy refusing the new Customer's namespace (403) raised out of
    the pass into the handler's traceback: no status at all (`kubectl get cust` empty columns), no
    Event, and `kubectl wait --for=condition=Ready` timed out with no hint."""
    server = PolicedNamespaces()
    ctx = housekeeping_context(server)
    ctx.applied_namespaces = {}
    retries = Retries()
    ctx.pass_retries = PassRetries(retries.later)
    body: dict[str, Any] = {
        "metadata": {
            "name": "acme",
            "uid": "uid-acme",
            "generation": 1,
            "creationTimestamp": CREATED.isoformat(),
        },
        "spec": {
            "email": "a@b.cd",
            "companyName": "x",
            "plan": "starter",
            "instance": {"chartVersion": "0.1.0"},
        },
    }
    said = f"the API server refused to create namespace customer-acme (403): {POLICY}"

    with caplog.at_level("WARNING", logger=handlers.log.name):
        first = await _reconcile(ctx, as_now(body, server), NOW)
        handlers.retry_if_failed(ctx, "acme", first)

    status = CustomerStatus.model_validate(server.document)
    assert status.phase == "Pending" and status.customer_id is not None
    for kind, value in (("Ready", "False"), ("Reconciling", "True")):
        condition = status.condition(kind)
        assert condition is not None
        assert (condition.status, condition.reason, condition.message) == (value, c.NAMESPACE_REFUSED, said)
    assert status.condition("Stalled").status == "False"  # type: ignore[union-attr]
    assert (first.permanent_error, first.temporary_error) == (None, said)
    assert first.events == [
        ("Normal", "Pending", "phase none -> Pending"),
        ("Warning", c.NAMESPACE_REFUSED, f"{said} (retried)"),
    ]
    # Retried after the passes' backoff (the policy may be mended): one line, no traceback.
    assert retries.delays == [retry_delay(0)]
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("WARNING", None)]

    # Refused again for the same cause: no second Event, the one retry pending at the next backoff.
    again = await _reconcile(ctx, as_now(body, server), NOW)
    handlers.retry_if_failed(ctx, "acme", again)
    assert again.temporary_error == said and again.events == []
    assert retries.delays == [retry_delay(1)]


class PolicedSecrets(StatusServer):
    """The API server, its admission policy refusing the licence Secret (422) until mended; the Secret
    applied kept by the licence step's fakes."""

    def __init__(self, document: dict[str, Any], parts: LicenceStepParts) -> None:
        super().__init__(document, resource_version=7)
        self.parts = parts
        self.mended = False

    async def apply(self, manifest: dict[str, Any]) -> None:
        if not self.mended:
            raise refusal(422, 'Secret "iotistic-license" is invalid: metadata.labels.team: Required value')
        await self.parts.apply(manifest)


async def test_a_renewal_whose_secret_the_api_server_refuses_is_no_licence_issued_until_it_is_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a policy refusing the renewal's Secret raised out of the pass, and the Customer
    kept Ready (DeploymentsAvailable) and LicenseIssued True with the old expiry, no Event, while the
    licence ran out."""
    parts = LicenceStepParts()
    monkeypatch.setattr(license_step, "record_license", parts.record_license)
    monkeypatch.setattr(license_step, "revoke_recorded", parts.revoke_recorded)
    licensing = parts.context()
    issued_at = NOW - timedelta(days=25)  # renewal due at NOW (a third of 30 days left)
    held = await ensure_license(licensing, _target_of({"plan": "starter"}, issued_at), None)
    metadata = {"name": "acme", "uid": "u-1", "generation": 1, "creationTimestamp": CREATED.isoformat()}
    spec = {"email": "a@b.cd", "companyName": "x", "plan": "starter", "instance": {"chartVersion": "0.1.0"}}
    body: dict[str, Any] = {"metadata": metadata, "spec": spec}
    available = InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, "6 available")
    deployed = ReleaseOutcome(
        "unchanged", c.RELEASE_UNCHANGED, "revision 1 is current", ReleaseStatus(revision=1)
    )
    ready = next_status(
        CustomerStatus(),
        _target_of({"plan": "starter"}, issued_at),
        PassOutcome(license=held, release=deployed, health=available),
        generation=1,
    )
    assert ready.phase == "Ready"

    server = PolicedSecrets(ready.to_k8s(), parts)
    ctx = housekeeping_context(server)
    for part in ("settings", "keys", "outbox", "sessions", "mirrored"):
        setattr(ctx, part, getattr(licensing, part))
    ctx.deployments = SimpleNamespace(mark=lambda: 1, of=partial(nothing), judged=lambda *args: None)

    async def namespace_and_secret(ctx: Any, target: Any, made_before: bool, **_: Any) -> Any:
        return parts.secret

    async def ensure_release(*args: Any, **kwargs: Any) -> ReleaseOutcome:
        return deployed

    monkeypatch.setattr(reconcile_module, "_namespace_and_secret", namespace_and_secret)
    monkeypatch.setattr(reconcile_module, "ensure_release", ensure_release)
    monkeypatch.setattr(reconcile_module, "instance_health", lambda *args: available)
    said = (
        "the API server refused to apply Secret customer-acme/iotistic-license (422):"
        ' Secret "iotistic-license" is invalid: metadata.labels.team: Required value'
    )

    refused = await _reconcile(ctx, as_now(body, server), NOW)

    status = CustomerStatus.model_validate(server.document)
    for kind, value in (("LicenseIssued", "False"), ("Ready", "False"), ("Reconciling", "True")):
        condition = status.condition(kind)
        assert condition is not None
        assert (condition.status, condition.reason, condition.message) == (
            value,
            c.LICENSE_SECRET_REFUSED,
            said,
        )
    # The licence in force is still the old one, and the instance runs on it meanwhile: Degraded.
    assert status.license is not None and status.license.jti == held.jti and status.phase == "Degraded"
    assert refused.temporary_error == said
    assert refused.events == [
        ("Warning", "Degraded", "phase Ready -> Degraded"),
        ("Warning", c.LICENSE_SECRET_REFUSED, f"{said} (retried)"),
    ]
    assert {action for _, _, action in parts.rows} == {"generated"}  # no row for a Secret not written
    assert (await _reconcile(ctx, as_now(body, server), NOW)).events == []  # the same cause: once

    server.mended = True
    renewed = await _reconcile(ctx, as_now(body, server), NOW)

    status = CustomerStatus.model_validate(server.document)
    assert status.license is not None and status.license.jti != held.jti
    assert status.license.expires_at is not None and status.license.expires_at > NOW + timedelta(days=29)
    for kind, reason in (("LicenseIssued", c.LICENSE_ISSUED), ("Ready", c.DEPLOYMENTS_AVAILABLE)):
        assert status.condition(kind).status == "True"  # type: ignore[union-attr]
        assert status.condition(kind).reason == reason  # type: ignore[union-attr]
    assert status.phase == "Ready" and renewed.temporary_error is None
    assert renewed.events == [("Normal", "Ready", "phase Degraded -> Ready")]


async def nothing(*args: Any, **kwargs: Any) -> list[Any]:
    return []


async def test_a_webhook_secret_copy_the_api_server_refuses_is_said_in_notifications_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a policy refusing Secrets in the namespace refused the notifications step's copy
    too, which raised out of the pass: a refused licence Secret said in LicenseIssued was lost with it."""

    class PolicedCopy(StatusServer):
        async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
            secret = {"hmac": b"whsec_" + base64.b64encode(b"k" * 32)}
            return SecretData(secret, {}, {}) if name == "acme-webhook" else None

        async def apply(self, manifest: dict[str, Any]) -> None:
            raise refusal(403, "secrets is forbidden: namespaces need label team")

    async def ensure_license(ctx: Any, target: Any, existing: Any) -> LicenseStatus:
        raise Refused("to apply Secret customer-acme/iotistic-license", refusal(403, "no"))

    async def namespace_and_secret(ctx: Any, target: Any, made_before: bool, **_: Any) -> None:
        return None

    monkeypatch.setattr(reconcile_module, "ensure_license", ensure_license)
    monkeypatch.setattr(reconcile_module, "_namespace_and_secret", namespace_and_secret)
    webhook = {"url": "https://hooks.acme.example/in", "secretRef": {"name": "acme-webhook", "key": "hmac"}}
    body: dict[str, Any] = {
        "metadata": {"name": "acme", "uid": "uid-acme", "generation": 1, "resourceVersion": "7"},
        "spec": {
            "email": "a@b.cd",
            "companyName": "x",
            "instance": {"chartVersion": "0.1.0"},
            "notifications": {"webhook": webhook},
        },
    }
    server = PolicedCopy({}, resource_version=7)

    await _reconcile(housekeeping_context(server), body, NOW)

    status = CustomerStatus.model_validate(server.document)
    notifications = status.condition("NotificationsReady")
    assert notifications is not None
    assert (notifications.status, notifications.reason, notifications.message) == (
        "False",
        c.NOTIFICATIONS_SECRET_REFUSED,
        "the API server refused to apply Secret customer-acme/iotistic-notifications (403):"
        " secrets is forbidden: namespaces need label team",
    )
    assert status.condition("LicenseIssued").reason == c.LICENSE_SECRET_REFUSED  # type: ignore[union-attr]


def terminating(doing: str) -> ApiException:
    """The API server's answer to a write into a namespace being deleted: a 403 with no policy in it."""
    message = (
        f"{doing} is forbidden: unable to create new content in namespace customer-acme because it is"
        " being terminated"
    )
    cause = {"reason": "NamespaceTerminating", "message": message, "field": "metadata.namespace"}
    answer = SimpleNamespace(
        status=403,
        reason="Forbidden",
        data=json.dumps({"kind": "Status", "message": message, "details": {"causes": [cause]}}).encode(),
        headers={},
    )
    return ApiException(http_resp=answer)


def namespace_gone() -> ApiException:
    answer = SimpleNamespace(
        status=404,
        reason="Not Found",
        data=json.dumps({"kind": "Status", "message": 'namespaces "customer-acme" not found'}).encode(),
        headers={},
    )
    return ApiException(http_resp=answer)


HOOKED: dict[str, Any] = {
    "email": "a@b.cd",
    "companyName": "x",
    "customerId": "cust_acme0001",
    "plan": "starter",
    "instance": {"chartVersion": "0.1.0"},
    "notifications": {
        "webhook": {"url": "https://hooks.acme.example/iotistic", "secretRef": {"name": "hook", "key": "k"}}
    },
}


def served(monkeypatch: pytest.MonkeyPatch, ctx: Any) -> None:
    """Every step of the pass but the notifications' as for a Customer licensed and served: Ready."""
    available = InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, "6 available")
    deployed = ReleaseOutcome(
        "unchanged", c.RELEASE_UNCHANGED, "revision 1 is current", ReleaseStatus(revision=1)
    )
    licence = LicenseStatus(jti="j1", issued_at=NOW, expires_at=NOW + timedelta(days=30))

    async def namespace_and_secret(ctx: Any, target: Any, made_before: bool, **_: Any) -> None:
        return None

    async def ensure_license(ctx: Any, target: Any, existing: Any) -> LicenseStatus:
        return licence

    async def ensure_release(*args: Any, **kwargs: Any) -> ReleaseOutcome:
        return deployed

    monkeypatch.setattr(reconcile_module, "_namespace_and_secret", namespace_and_secret)
    monkeypatch.setattr(reconcile_module, "ensure_license", ensure_license)
    monkeypatch.setattr(reconcile_module, "ensure_release", ensure_release)
    monkeypatch.setattr(reconcile_module, "instance_health", lambda *args: available)
    ctx.deployments = SimpleNamespace(mark=lambda: 1, of=partial(nothing), judged=lambda *args: None)


class PolicedCopies(StatusServer, CustomerNamespace):
    """The Customer's status and customer-acme's Secrets, an admission policy refusing the deletion of
    the webhook signing secret's copy until mended."""

    def __init__(self, document: dict[str, Any]) -> None:
        StatusServer.__init__(self, document, resource_version=7)
        CustomerNamespace.__init__(self, copy_of="cust_acme0001")
        self.mended = False

    async def delete_secret(self, namespace: str, name: str, resource_version: str | None = None) -> bool:
        if not self.mended:
            raise refusal(403, "secrets in customer namespaces may not be deleted")
        return await CustomerNamespace.delete_secret(self, namespace, name, resource_version)


# Ready, its webhook signed with the copy (NotificationsReady True).
SIGNED_READY = {**signed(customer())["status"], "phase": "Ready"}


def hooked_body() -> dict[str, Any]:
    """Customer acme as first applied, its webhook signed (HOOKED)."""
    meta = {"name": "acme", "uid": "uid-acme", "generation": 1, "creationTimestamp": CREATED.isoformat()}
    return {"metadata": meta, "spec": HOOKED}


COPY_REFUSED = (
    "the API server refused to delete Secret customer-acme/iotistic-notifications (403): secrets in"
    " customer namespaces may not be deleted; the customer's notices are still signed with the copy, tried"
    " again every minute (a Stalled Customer's at its next pass)"
)


async def test_a_copy_whose_webhook_was_removed_and_whose_delete_is_refused_is_looked_at_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the webhook removed from the spec and the delete of its key's copy refused, the
    pass said NotificationsSecretRefused on a Customer with no webhook and counted as a success, and the
    housekeeping looked only at Customers with a webhook: nobody tried again and the copy of the
    withdrawn key stayed, signing. Now a Warning Event says so, once, and the housekeeping is due until
    the copy is gone (the condition with it)."""
    spec = {**HOOKED, "notifications": {}}
    body: dict[str, Any] = {
        "metadata": {
            "name": "acme",
            "uid": "uid-acme",
            "generation": 1,
            "creationTimestamp": CREATED.isoformat(),
        },
        "spec": spec,
    }
    server = PolicedCopies(SIGNED_READY)
    ctx = housekeeping_context(server)
    served(monkeypatch, ctx)

    refused = await _reconcile(ctx, as_now(body, server), NOW)

    status = CustomerStatus.model_validate(server.document)
    notifications = status.condition("NotificationsReady")
    assert notifications is not None
    assert (notifications.status, notifications.reason, notifications.message) == (
        "False",
        c.NOTIFICATIONS_SECRET_REFUSED,
        COPY_REFUSED,
    )
    assert status.phase == "Ready" and NOTIFICATIONS_SECRET_NAME in server.secrets
    assert ("Warning", c.NOTIFICATIONS_SECRET_REFUSED, COPY_REFUSED) in refused.events
    customer_now = Customer.model_validate(as_now(body, server))
    assert housekeeping_due(customer_now.spec, status, CREATED, NOW) == c.NOTIFICATIONS_SECRET_REFUSED

    again = await _reconcile(ctx, as_now(body, server), NOW)  # the housekeeping's pass: the same cause
    assert again.events == []

    server.mended = True
    await _reconcile(ctx, as_now(body, server), NOW)
    status = CustomerStatus.model_validate(server.document)
    assert NOTIFICATIONS_SECRET_NAME not in server.secrets and status.condition("NotificationsReady") is None
    assert housekeeping_due(customer_now.spec, status, CREATED, NOW) is None


async def test_a_withdrawn_signing_secret_whose_copy_the_api_server_keeps_is_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the customer deleted its webhook's Secret to withdraw a leaked key, a policy
    refused the delete of the copy, and Ready stayed True with no Event while the sender kept signing
    with the leaked key. Now a Warning Event says so (once a cause) and the pass is tried again."""
    body = hooked_body()
    server = PolicedCopies(SIGNED_READY)
    del server.secrets["hook"]
    ctx = housekeeping_context(server)
    served(monkeypatch, ctx)
    said = f"spec.notifications.webhook.secretRef.name: no Secret hook in customer-acme; {COPY_REFUSED}"

    refused = await _reconcile(ctx, as_now(body, server), NOW)

    status = CustomerStatus.model_validate(server.document)
    notifications = status.condition("NotificationsReady")
    assert notifications is not None and (notifications.reason, notifications.message) == (
        c.NOTIFICATIONS_SECRET_REFUSED,
        said,
    )
    assert refused.events == [("Warning", c.NOTIFICATIONS_SECRET_REFUSED, said)]
    customer_now = Customer.model_validate(as_now(body, server))
    assert housekeeping_due(customer_now.spec, status, CREATED, NOW) == c.NOTIFICATIONS_SECRET_REFUSED
    assert (await _reconcile(ctx, as_now(body, server), NOW)).events == []


async def test_a_copy_changed_since_its_read_is_read_again_and_deleted_not_refused() -> None:
    """Found in review: the copy's delete, conditional on the resourceVersion read, answered 409 when
    the copy had changed since, and that conflict was reported as NotificationsSecretRefused (409), a
    policy blamed. It is read again and deleted."""

    class Changing(CustomerNamespace):
        async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
            read = await super().read_secret_data(namespace, name)
            if name == NOTIFICATIONS_SECRET_NAME and self.reads.count(name) == 1 and read is not None:
                # Written again right after this first read.
                self.secrets[name] = SecretData(read.data, {}, read.labels, "9")
            return read

    namespace = Changing(copy_of="cust_acme0001")
    del namespace.secrets["hook"]
    outcome = await ensure_webhook_secret(
        cast(OperatorContext, SimpleNamespace(kube=namespace)), hook_target_of(hooked(customer()))
    )
    assert outcome is not None and outcome.reason == c.SECRET_NOT_FOUND
    assert NOTIFICATIONS_SECRET_NAME not in namespace.secrets
    assert namespace.writes == [f"DELETE {NOTIFICATIONS_SECRET_NAME}"] * 2


@pytest.mark.parametrize("step", ["licence", "notifications"])
@pytest.mark.parametrize("answer", ["terminating", "gone"])
async def test_a_write_into_a_namespace_going_away_is_no_policys_refusal(
    monkeypatch: pytest.MonkeyPatch, step: str, answer: str
) -> None:
    """Found in review: the licence Secret's or the webhook copy's write into a namespace being deleted
    (403, cause NamespaceTerminating) or gone (404) was reported as LicenseSecretRefused or
    NotificationsSecretRefused, a Warning Event blaming a policy, and the namespace cached as applied
    kept the namespace step from looking. It is NamespaceTerminating, retried, no Warning, and the next
    pass reads the namespace."""
    error = terminating("secrets") if answer == "terminating" else namespace_gone()

    class Going(PolicedCopies):
        async def apply(self, body: dict[str, Any]) -> None:
            raise error

    server = Going(SIGNED_READY)
    server.secrets["hook"] = SecretData({"k": b"whsec_" + base64.b64encode(b"k" * 32)}, {}, {}, "1")
    ctx = housekeeping_context(server)
    served(monkeypatch, ctx)
    ctx.applied_namespaces = {"customer-acme": {"as": "applied"}}
    if step == "licence":

        async def renewal(ctx: Any, target: Any, existing: Any) -> LicenseStatus:
            # As license.ensure_license writes a renewal's Secret.
            with refused_as("to apply Secret customer-acme/iotistic-license"):
                await ctx.kube.apply({})
            raise AssertionError

        monkeypatch.setattr(reconcile_module, "ensure_license", renewal)
    body = hooked_body()
    going = await _reconcile(ctx, as_now(body, server), NOW)

    status = CustomerStatus.model_validate(server.document)
    ready = status.condition("Ready")
    assert ready is not None and ready.reason == c.NAMESPACE_TERMINATING
    assert going.temporary_error is not None and "looked at again" in going.temporary_error
    assert [event for event in going.events if event[0] == "Warning"] == []
    assert status.phase == "Provisioning" and "customer-acme" not in ctx.applied_namespaces
    for kind in ("LicenseIssued", "NotificationsReady"):
        condition = status.condition(kind)
        assert condition is None or "Refused" not in condition.reason


async def test_a_refused_create_of_a_served_customers_namespace_gone_is_provisioning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: every refusal of the namespace step said the instance runs on (Degraded), also a
    refused create of the namespace that is gone: nothing runs there. Provisioning, as while a namespace
    is being deleted; a refused read of one that is there stays Degraded."""

    server = PolicedNamespaces()  # the namespace gone: none to read
    server.document = {"phase": "Ready", "instance": {"namespace": "customer-acme"}}
    ctx = housekeeping_context(server)
    ctx.applied_namespaces = {}
    body = hooked_body()

    refused = await _reconcile(ctx, as_now(body, server), NOW)

    status = CustomerStatus.model_validate(server.document)
    ready = status.condition("Ready")
    assert ready is not None and ready.reason == c.NAMESPACE_REFUSED
    assert ready.message.startswith("the API server refused to create namespace customer-acme (403)")
    assert status.phase == "Provisioning" and refused.temporary_error == ready.message


def made_again_from_git() -> dict[str, Any]:
    """A trial Customer (trial.days, as the GitOps sample has it) made again an hour ago under its
    customer id, its status gone with the object it replaced."""
    return {
        "metadata": {
            "name": "acme",
            "uid": "uid-acme-2",
            "generation": 1,
            "resourceVersion": "7",
            "creationTimestamp": (NOW - timedelta(hours=1)).isoformat(),
        },
        "spec": {
            "email": "a@b.cd",
            "companyName": "x",
            "customerId": "cust_acme01",
            "trial": {"days": 14},
            "instance": {"chartVersion": "0.1.0"},
        },
    }


def licence_and_release_steps(monkeypatch: pytest.MonkeyPatch) -> list[PassTarget]:
    """The licence step as the targets it was given (each gets a licence), a release step that leaves the
    release as it is, and a namespace made just now (no Secret)."""
    licensed: list[PassTarget] = []

    async def ensure_license(ctx: Any, target: PassTarget, existing: Any) -> LicenseStatus:
        licensed.append(target)
        return LicenseStatus(
            jti=f"j{len(licensed)}", issued_at=target.now, expires_at=target.now + timedelta(days=30)
        )

    async def ensure_release(
        ctx: Any, target: Any, licence: Any, previous: Any, may_exist: bool
    ) -> ReleaseOutcome:
        return ReleaseOutcome("failed", c.INSTALL_FAILED, "no helm here")

    async def namespace_and_secret(ctx: Any, target: Any, made_before: bool, **_: Any) -> None:
        return None

    monkeypatch.setattr(reconcile_module, "ensure_license", ensure_license)
    monkeypatch.setattr(reconcile_module, "ensure_release", ensure_release)
    monkeypatch.setattr(reconcile_module, "_namespace_and_secret", namespace_and_secret)
    return licensed


async def test_a_trial_customer_made_again_from_git_keeps_the_end_of_its_first_trial(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a Customer deleted and made again from Git (a cluster rebuilt, Argo CD's or
    Flux's delete and create) with trial.days counted its trial from the new object's creation: an
    Expired trial, never subscribed, was licensed 14 more days of a full trial. Its pass reads where
    its customer id's trial started from the licence history (once a process), and the housekeeping
    checks after it start no pass to hand it the trial again."""
    licensed = licence_and_release_steps(monkeypatch)
    first = NOW - timedelta(days=40)
    history = LicenceHistory(first)
    server = StatusServer({}, resource_version=7)
    ctx = housekeeping_context(server, history)

    await _reconcile(ctx, made_again_from_git(), NOW)

    assert [(t.entitlement.plan, t.entitlement.reason) for t in licensed] == [("unlicensed", c.TRIAL_EXPIRED)]
    status = CustomerStatus.model_validate(server.document)
    assert (status.phase, status.plan) == ("Expired", "unlicensed")
    assert status.trial is not None and status.trial.ends_at == first + timedelta(days=14)
    passes = await housekeeping_checks(monkeypatch, made_again_from_git(), server, ctx, minutes=3)
    assert passes == [] and len(licensed) == 1 and history.reads == 1


async def test_a_trial_customer_whose_first_licence_cannot_be_read_is_issued_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review (with the trial counted from its customer id's first licence): with PostgreSQL
    away, a pass that took the new object's creation for the trial's start would license a Customer
    made again with a new trial. It issues no licence (LicenseIssued False, DatabaseUnavailable) and
    is retried as any pass PostgreSQL fails, without a traceback."""
    licensed = licence_and_release_steps(monkeypatch)
    history = LicenceHistory(error=ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"))
    server = StatusServer({}, resource_version=7)

    result = await _reconcile(housekeeping_context(server, history), made_again_from_git(), NOW)

    assert licensed == []
    assert result.permanent_error is None and result.temporary_error is not None
    assert result.temporary_error.startswith("PostgreSQL cannot be reached (ConnectionRefusedError)")
    issued = CustomerStatus.model_validate(server.document).condition("LicenseIssued")
    assert issued is not None and (issued.status, issued.reason) == ("False", "DatabaseUnavailable")

    # Back, the pass reads it and licenses the Customer as what it is: an expired trial.
    history.error = None
    history.first = NOW - timedelta(days=40)
    read = {
        **made_again_from_git(),
        "metadata": {**made_again_from_git()["metadata"], "resourceVersion": "8"},
    }
    await _reconcile(housekeeping_context(server, history), {**read, "status": server.document}, NOW)
    assert [t.entitlement.plan for t in licensed] == ["unlicensed"]


async def test_a_paid_customer_s_pass_reads_no_licence_history() -> None:
    """The trial's start is read only where trial.days decides the licence: a Customer on a paid plan,
    or one whose trial.endsAt is given, costs its passes no query and goes on with PostgreSQL away."""
    away = LicenceHistory(error=ConnectionRefusedError(111, "refused"))
    for spec in ({"plan": "starter"}, {"trial": {"endsAt": (NOW + timedelta(days=3)).isoformat()}}):
        body = made_again_from_git()
        body["spec"] = {**body["spec"], **spec}
        ctx = housekeeping_context(StatusServer({}, resource_version=7), away)
        customer = Customer.model_validate(body)
        assert await reconcile_module._first_licensed(ctx, customer, "cust_acme01", NOW) == (None, None)


def unpinned_from_git() -> dict[str, Any]:
    """A manually billed Customer Flux applies without spec.customerId (its id derived from its uid)."""
    body = made_again_from_git()
    body["metadata"]["labels"] = {"kustomize.toolkit.fluxcd.io/name": "customers"}
    body["spec"] = {**body["spec"], "plan": "starter", "billing": {"mode": "manual"}}
    del body["spec"]["customerId"]
    return body


async def test_a_customer_git_manages_without_a_pinned_customer_id_is_warned_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a Customer applied from Git without spec.customerId goes by an id derived from
    its uid; deleted and made again from Git it is a new customer id, whose restore finds no Stripe
    subscription (Stripe's events name the old id and match nothing: the instance drops to the trial
    while Stripe keeps billing, and a checkout makes a second Stripe customer), and nothing said so.
    A Warning Event CustomerIdNotPinned says how to pin it, once, not at every pass."""
    licence_and_release_steps(monkeypatch)
    body = unpinned_from_git()
    server = StatusServer({}, resource_version=7)
    ctx = housekeeping_context(server)

    events = EventsPosted(server)
    ctx.kube = events
    for _pass in range(3):
        read = as_now(body, server)
        await handlers.post_pass_events(ctx, read, await _reconcile(ctx, read, NOW))
    told = [(kind, message) for kind, reason, message in events.posted if reason == "CustomerIdNotPinned"]
    assert len(told) == 1 and told[0][0] == "Warning"
    derived = server.document["customerId"]
    assert "kustomize.toolkit.fluxcd.io/name=customers manages this Customer" in told[0][1]
    assert f"({derived})" in told[0][1] and "jsonpath='{.status.customerId}'" in told[0][1]

    # Pinned, or not managed by Git (kubectl apply by hand), nothing is said.
    pinned = {**body, "spec": {**body["spec"], "customerId": derived}}
    by_hand = {**body, "metadata": {**body["metadata"], "labels": {}, "uid": "uid-acme-3"}}
    for manifest in (pinned, by_hand):
        fresh = housekeeping_context(StatusServer({}, resource_version=7))
        result = await _reconcile(fresh, manifest, NOW)
        assert "CustomerIdNotPinned" not in [reason for _, reason, _ in result.events]


def paying_customer_made_again_from_git() -> dict[str, Any]:
    """made_again_from_git a minute ago, billed through Stripe: its spec.subscription (never in a
    manifest) not yet given back by the inbox's restore."""
    body = made_again_from_git()
    body["metadata"]["creationTimestamp"] = (NOW - timedelta(minutes=1)).isoformat()
    body["spec"] = {**body["spec"], "billing": {"mode": "stripe"}}
    return body


def test_a_customer_made_again_is_not_told_its_trial_ended_before_it_was_made() -> None:
    """Found in review: a paying Stripe customer made again from Git (it paid during its trial, months
    ago), its first pass before the inbox's restore, anchored its trial at its first licence, found it
    expired and queued "Your trial has ended" (trial-ended:<id>:<old end>, a key never written before, as
    it converted before the end). A trial that ended before the Customer was made was told, or paid for,
    by the object it replaced: the new one says nothing of it."""
    body = paying_customer_made_again_from_git()
    first = NOW - timedelta(days=40)
    aimed = pass_target(
        body, Customer.model_validate(body), "iotistic.cloud", NOW, ("0.1.0", "Pinned"), first_licensed=first
    )
    assert aimed.entitlement.reason == c.TRIAL_EXPIRED
    assert license_step.license_notice(aimed, _licence("unlicensed", "j-new"), "generated", None) is None
    # A trial of the Customer that ends after it was made is told its end, once, as before.
    ended = pass_target(
        body, Customer.model_validate(body), "iotistic.cloud", NOW + timedelta(days=15), ("0.1.0", "Pinned")
    )
    notice = license_step.license_notice(ended, _licence("unlicensed", "j-new"), "generated", None)
    assert notice is not None and notice.kind == NoticeKind.TRIAL_ENDED


async def test_a_paying_customer_made_again_waits_for_its_subscription_instead_of_the_unlicensed_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the same Customer's first pass, up to a minute before the inbox's restore
    (RESTORE_SECONDS) gives its subscription back, licensed and installed its instance unlicensed (its
    trial anchored months ago), then upgraded it. While a live subscription row of its customer id is
    there to restore, a Customer made within SUBSCRIPTION_RESTORE_WAIT waits for it: no licence, no
    release, Ready False SubscriptionRestorePending, retried (the restore's write of the spec runs a
    pass anyway)."""
    licensed = licence_and_release_steps(monkeypatch)
    history = LicenceHistory(NOW - timedelta(days=40))
    history.live_subscription = "cust_acme01"
    server = FleetServer({}, resource_version=7)

    result = await _reconcile(
        housekeeping_context(server, history), paying_customer_made_again_from_git(), NOW
    )

    assert licensed == [] and result.temporary_error is not None
    status = CustomerStatus.model_validate(server.document)
    ready = status.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", c.SUBSCRIPTION_RESTORE_PENDING)
    assert status.phase == "Pending" and status.license is None

    # No live subscription (cancelled since), or made long enough ago that no restore is coming: the
    # expired trial is what it has.
    history.live_subscription = None
    read = {**paying_customer_made_again_from_git(), "status": server.document}
    read["metadata"] = {**read["metadata"], "resourceVersion": str(server.resource_version)}
    await _reconcile(housekeeping_context(server, history), read, NOW)
    assert [(t.entitlement.plan, t.entitlement.reason) for t in licensed] == [("unlicensed", c.TRIAL_EXPIRED)]
    history.live_subscription = "cust_acme01"
    later = NOW + SUBSCRIPTION_RESTORE_WAIT + timedelta(hours=1)
    fresh = housekeeping_context(FleetServer({}, resource_version=7), history)
    await _reconcile(fresh, paying_customer_made_again_from_git(), later)
    assert len(licensed) == 2
    # A customer id another Customer holds too is given back to neither (restore.unsubscribed): no wait.
    shared = FleetServer({}, resource_version=7)
    shared.others = [
        {"metadata": {"name": "acme-copy", "uid": "uid-copy"}, "spec": {"customerId": "cust_acme01"}}
    ]
    await _reconcile(housekeeping_context(shared, history), paying_customer_made_again_from_git(), NOW)
    assert len(licensed) == 3


async def test_a_signup_customer_made_again_waits_for_its_subscription_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a Customer made by signup carries its trial's end (trial.endsAt), so its pass
    reads no licence history, and the wait above asked for the first licence it never read: made again
    after its trial ended, it was installed unlicensed until the restore. Its ended trial and a live
    subscription row of its customer id are enough to wait."""
    licensed = licence_and_release_steps(monkeypatch)
    history = LicenceHistory(NOW - timedelta(days=40))
    history.live_subscription = "cust_acme01"
    body = paying_customer_made_again_from_git()
    body["spec"]["trial"] = {"days": 14, "endsAt": (NOW - timedelta(days=26)).isoformat()}
    server = FleetServer({}, resource_version=7)

    result = await _reconcile(housekeeping_context(server, history), body, NOW)

    assert licensed == [] and result.temporary_error is not None
    ready = CustomerStatus.model_validate(server.document).condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", c.SUBSCRIPTION_RESTORE_PENDING)


async def test_customers_waiting_for_their_restores_share_one_list_of_the_fleet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: each pass of a Customer waiting for its subscription's restore (retried at 5, 10,
    20, 40 s... while the inbox restores once a minute) listed the whole fleet to see whether another
    Customer holds its customer id: a cluster rebuilt from Git with 1,000 paying Customers listed it some
    4,500 times. The wait is best-effort: its passes share a list a few seconds old."""
    licensed = licence_and_release_steps(monkeypatch)
    history = LicenceHistory(NOW - timedelta(days=40))
    history.live_subscription = "cust_acme01"
    server = CountedFleet({}, resource_version=7)
    ctx = housekeeping_context(server, history)
    seconds = [0.0]
    ctx.customer_id_holders = CustomerIdHolders(server.list_customers, clock=lambda: seconds[0])

    for _pass in range(3):
        read = {**paying_customer_made_again_from_git(), "status": server.document}
        read["metadata"] = {**read["metadata"], "resourceVersion": str(server.resource_version)}
        result = await _reconcile(ctx, read, NOW)
        assert result.temporary_error is not None  # waiting
        seconds[0] += 1.0
    assert server.lists == 1
    # A copy of it applied since, seen once the list is older than RECENT_LIST_SECONDS: no wait.
    server.others = [
        {"metadata": {"name": "acme-copy", "uid": "uid-copy"}, "spec": {"customerId": "cust_acme01"}}
    ]
    seconds[0] += RECENT_LIST_SECONDS
    read = {**paying_customer_made_again_from_git(), "status": server.document}
    read["metadata"] = {**read["metadata"], "resourceVersion": str(server.resource_version)}
    await _reconcile(ctx, read, NOW)
    assert len(licensed) == 1 and server.lists == 2


class FleetServer(StatusServer):
    """The status server with the fleet's other Customers (`others`) to list."""

    others: list[dict[str, Any]] = []  # noqa: RUF012 (set per test)

    async def list_customers(self) -> list[dict[str, Any]]:
        return self.others


class CountedFleet(FleetServer):
    """The fleet server counting its lists."""

    lists = 0

    async def list_customers(self) -> list[dict[str, Any]]:
        self.lists += 1
        return await super().list_customers()


def trial_as_last_passed(created: datetime, days: int, ends_at: datetime, plan: str) -> dict[str, Any]:
    """A trial Customer (trial.days `days`) made at `created`, its status as its last pass left it: its
    trial ending `ends_at` (counted from its customer id's first licence), a licence current now."""
    body = made_again_from_git()
    body["metadata"]["creationTimestamp"] = created.isoformat()
    body["spec"] = {**body["spec"], "trial": {"days": days}}
    issued = NOW - timedelta(days=1)
    body["status"] = {
        "phase": "Ready" if plan == "trial" else "Expired",
        "plan": plan,
        "customerId": "cust_acme01",
        "trial": {"isTrialMode": plan == "trial", "endsAt": ends_at.isoformat()},
        "license": {
            "jti": "j1",
            "issuedAt": issued.isoformat(),
            "expiresAt": (issued + timedelta(days=30) if ends_at < issued else ends_at).isoformat(),
        },
        "conditions": [
            {
                "type": "LicenseIssued",
                "status": "True",
                "reason": "LicenseCurrent",
                "message": "",
                "lastTransitionTime": issued.isoformat(),
            }
        ],
    }
    return body


async def test_a_trial_s_pass_after_a_restart_with_postgresql_away_goes_by_the_end_its_status_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the trial's start is kept a process, so the first pass of every trial (active,
    expired, or a Stripe Customer with no subscription) after an operator restart during a PostgreSQL
    outage read the licence history, failed, and issued no licence: LicenseIssued False
    DatabaseUnavailable, Degraded for the whole outage, though the licence in force was current (a
    current licence needs no row written). The end an earlier pass of the object wrote
    (status.trial.endsAt) says where it counted the trial from: the pass goes by it."""
    licensed = licence_and_release_steps(monkeypatch)
    away = LicenceHistory(error=ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"))
    created = NOW - timedelta(days=5)
    body = trial_as_last_passed(created, 14, created + timedelta(days=14), "trial")
    server = StatusServer(body["status"], resource_version=7)

    result = await _reconcile(housekeeping_context(server, away), body, NOW)

    assert [(t.entitlement.plan, t.entitlement.trial_ends_at) for t in licensed] == [
        ("trial", created + timedelta(days=14))
    ]
    issued = CustomerStatus.model_validate(server.document).condition("LicenseIssued")
    assert issued is not None and issued.status == "True"
    assert result.temporary_error != reconcile_module.license_unrecorded(away.error)  # type: ignore[arg-type]

    # Made again an hour ago, its trial anchored 40 days back: its status keeps the anchored end.
    first = NOW - timedelta(days=40)
    again = trial_as_last_passed(NOW - timedelta(hours=1), 14, first + timedelta(days=14), "unlicensed")
    server = StatusServer(again["status"], resource_version=7)
    await _reconcile(housekeeping_context(server, away), again, NOW)
    assert [(t.entitlement.plan, t.entitlement.reason) for t in licensed[1:]] == [
        ("unlicensed", c.TRIAL_EXPIRED)
    ]


async def test_a_customer_made_again_during_an_outage_gets_no_new_trial_from_its_first_pass_s_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a Customer made again while PostgreSQL was away had its first pass issue no
    licence (the history unread) yet write status.trial counted from the new object's creation; its
    second pass took that end for where an earlier pass had anchored the trial and handed the licence
    step a new 14-day trial (its Secret applied before the history row, for the whole outage). Only a
    status holding a licence says where a pass counted from: the second pass issues none either."""
    licensed = licence_and_release_steps(monkeypatch)
    away = LicenceHistory(error=ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"))
    server = StatusServer({}, resource_version=7)

    await _reconcile(housekeeping_context(server, away), made_again_from_git(), NOW)
    again: dict[str, Any] = {**made_again_from_git(), "status": server.document}
    again["metadata"] = {**again["metadata"], "resourceVersion": str(server.resource_version)}
    await _reconcile(housekeeping_context(server, away), again, NOW)

    assert licensed == []
    issued = CustomerStatus.model_validate(server.document).condition("LicenseIssued")
    assert issued is not None and issued.status == "False"


async def test_housekeeping_after_a_restart_counts_a_made_again_trial_from_the_end_its_status_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: after a restart the housekeeping knew no trial's start (a process keeps what its
    passes read) and counted from the object's creation: a Customer made again two days ago whose
    anchored trial ended weeks ago was told "your trial ends in 2 days", and a pass was started as if
    its plan were the trial. It counts from the end its status holds until a pass has read the history."""
    written: list[str] = []

    async def write_trial_ending(ctx: Any, customer: Customer, body: Any, now: datetime) -> bool:
        written.append(customer.metadata.name)
        return True

    monkeypatch.setattr(handlers, "write_trial_ending", write_trial_ending)
    licence_and_release_steps(monkeypatch)
    first = NOW - timedelta(days=40)
    body = trial_as_last_passed(NOW - timedelta(days=2), 4, first + timedelta(days=4), "unlicensed")
    server = StatusServer(body["status"], resource_version=7, uid="uid-acme-2")

    async def read_customer(name: str) -> dict[str, Any]:  # read fresh for the notice: as it is
        return {**body, "status": server.document}

    server.read_customer = read_customer  # type: ignore[method-assign]
    ctx = housekeeping_context(server, LicenceHistory(first))
    ctx.shard = Shard()

    passes = await housekeeping_checks(monkeypatch, body, server, ctx, minutes=2)

    assert written == [] and passes == []


class EventsPosted:
    """`server`, and the Events posted (type, reason, message); the first `refused` CustomerIdNotPinned
    refused."""

    def __init__(self, server: StatusServer, refused: int = 0) -> None:
        self.server, self.refused = server, refused
        self.posted: list[tuple[str, str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    async def create_event(self, kind: str, involved: Any, **event: Any) -> None:
        if self.refused and event["reason"] == "CustomerIdNotPinned":
            self.refused -= 1
            raise KubernetesUnavailable("the API server cannot be reached")
        self.posted.append((event["event_type"], event["reason"], event["message"]))


class FailingOnce(StatusServer):
    """A status patch that fails once, as a pass raising StatusConflict or KubernetesUnavailable."""

    async def patch_customer_status(
        self, name: str, patch: dict[str, Any], resource_version: str
    ) -> dict[str, Any]:
        if not self.patches:
            self.patches.append((resource_version, patch))
            raise KubernetesUnavailable("the API server cannot be reached")
        return await super().patch_customer_status(name, patch, resource_version)


async def test_the_customer_id_not_pinned_warning_of_a_pass_that_failed_is_posted_by_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the CustomerIdNotPinned warning was counted told (once a process) before its Event
    existed; a pass that raised (its status patch failing, the API server away), ended LeftShard or
    stalled on someone else's namespace dropped it, or its Event was not posted, and it was never said
    while the process lived. It is counted told once its Event is posted."""
    licence_and_release_steps(monkeypatch)
    body = unpinned_from_git()
    server = FailingOnce({}, resource_version=7)
    ctx = housekeeping_context(server)
    events = EventsPosted(server, refused=1)
    ctx.kube = events

    def read() -> dict[str, Any]:
        return as_now(body, server)

    with pytest.raises(KubernetesUnavailable):
        await _reconcile(ctx, read(), NOW)
    await handlers.post_pass_events(ctx, read(), await _reconcile(ctx, read(), NOW))  # its Event refused
    assert "CustomerIdNotPinned" not in [reason for _, reason, _ in events.posted]
    for _pass in range(2):
        await handlers.post_pass_events(ctx, read(), await _reconcile(ctx, read(), NOW))
    assert [reason for _, reason, _ in events.posted].count("CustomerIdNotPinned") == 1


async def test_two_passes_that_both_found_the_customer_id_not_pinned_post_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: with the warning counted told once posted, a pass that waited for the Customer's
    lock while another posted its Events found it not told yet, and both posted CustomerIdNotPinned."""
    licence_and_release_steps(monkeypatch)
    body = unpinned_from_git()
    server = StatusServer({}, resource_version=7)
    ctx = housekeeping_context(server)
    events = EventsPosted(server, refused=0)
    ctx.kube = events

    def read() -> dict[str, Any]:
        return as_now(body, server)

    first = await _reconcile(ctx, read(), NOW)
    second = await _reconcile(ctx, read(), NOW)  # before the first's Events are posted
    await asyncio.gather(
        handlers.post_pass_events(ctx, read(), first), handlers.post_pass_events(ctx, read(), second)
    )
    assert [reason for _, reason, _ in events.posted].count("CustomerIdNotPinned") == 1


async def test_extra_env_left_out_is_logged_once_a_change_not_at_every_pass(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: the warning naming the extraEnv entries left out as the operator's was logged at
    every pass (every minute for each such Customer) while ReleaseDeployed already named them. It is
    logged when what is left out changes, not again while the Customer keeps them."""
    licence_and_release_steps(monkeypatch)

    async def helm_step(ctx: Any, target: Any, licence: Any, previous: Any, **_: Any) -> ReleaseOutcome:
        if previous is None:
            return ReleaseOutcome(
                "installed", c.INSTALL_SUCCEEDED, "installed revision 1", ReleaseStatus(revision=1)
            )
        return ReleaseOutcome("unchanged", c.RELEASE_UNCHANGED, "revision 1 is current", previous)

    monkeypatch.setattr(release_module, "_ensure_release", helm_step)
    monkeypatch.setattr(reconcile_module, "ensure_release", release_module.ensure_release)
    available = InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, "6 available")
    monkeypatch.setattr(reconcile_module, "instance_health", lambda *args: available)
    server = StatusServer({}, resource_version=7)
    ctx = housekeeping_context(server)
    ctx.deployments = SimpleNamespace(mark=lambda: 1, of=partial(nothing), judged=lambda *args: None)
    pinned = {"name": "IOTISTIC_LICENSE_KEY", "value": "eyJhbGc"}
    body = unpinned_from_git()

    def with_env(*entries: dict[str, str]) -> dict[str, Any]:
        instance = {**body["spec"]["instance"], "values": {"api": {"extraEnv": list(entries)}}}
        return as_now({**body, "spec": {**body["spec"], "instance": instance}}, server)

    def left_out() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "left out as the operator's variables" in r.getMessage()
        ]

    with caplog.at_level("WARNING", logger=release_module.log.name):
        for _pass in range(3):
            await _reconcile(ctx, with_env(pinned), NOW)
        assert left_out() == [
            "Customer acme: left out as the operator's variables (remove them):"
            " spec.instance.values.api.extraEnv[0].name IOTISTIC_LICENSE_KEY"
        ]
        deployed = CustomerStatus.model_validate(server.document).condition("ReleaseDeployed")
        assert deployed is not None and deployed.message.endswith("extraEnv[0].name IOTISTIC_LICENSE_KEY")

        # Another entry left out is a change, said once more; none left out, nothing.
        for _pass in range(2):
            await _reconcile(ctx, with_env(pinned, {"name": "LICENSE_URL", "value": "x"}), NOW)
        await _reconcile(ctx, with_env(), NOW)
    assert len(left_out()) == 2 and left_out()[1].endswith("extraEnv[1].name LICENSE_URL")
