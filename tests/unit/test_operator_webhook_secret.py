"""The Secret a Customer's webhook names, rotated after it was copied: the housekeeping notices it;
taken back: its copy goes; and its copy, kept by the Customer's deletion for the webhooks still to be
sent."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import (
    LICENSE_SECRET_NAME,
    NOTIFICATIONS_SECRET_KEY,
    NOTIFICATIONS_SECRET_NAME,
    deletion_running_annotation,
    signs_until_annotation,
)
from iotistic_billing.k8s import KubernetesUnavailable, SecretData
from iotistic_billing.operator import constants as c
from iotistic_billing.operator import delete as delete_module
from iotistic_billing.operator import handlers
from iotistic_billing.operator.context import BackgroundPasses, OperatorContext
from iotistic_billing.operator.delete import DeletionFailed, finalize
from iotistic_billing.operator.helm import HelmError
from iotistic_billing.operator.webhook_secret import ensure_webhook_secret
from tests.unit.test_operator_namespace import Cluster, Helm, context, customer, namespace_of, target_of

NOW = datetime(2026, 6, 1, tzinfo=UTC)
OLD, NEW = b"whsec_" + b"A" * 44, b"whsec_" + b"B" * 44


class Secrets:
    """The namespace's Secrets as the operator reads them; `away` makes every read fail."""

    def __init__(self) -> None:
        self.data = {"hook": {"k": OLD}, NOTIFICATIONS_SECRET_NAME: {NOTIFICATIONS_SECRET_KEY: OLD}}
        self.reads = 0
        self.away = False

    async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
        assert namespace == "customer-acme"
        self.reads += 1
        if self.away:
            raise KubernetesUnavailable("the API server cannot be reached")
        data = self.data.get(name)
        return SecretData(data, {}, {}) if data is not None else None


def signed_customer() -> dict[str, Any]:
    """A Customer whose webhook is signed with the copy (NotificationsReady True), nothing else due."""
    return {
        "metadata": {"name": "acme", "uid": "uid-acme", "creationTimestamp": "2026-05-01T00:00:00Z"},
        "spec": {
            "email": "ops@acme.example",
            "companyName": "Acme",
            "plan": "starter",
            "notifications": {
                "webhook": {"url": "https://hooks.acme.example/x", "secretRef": {"name": "hook", "key": "k"}}
            },
        },
        "status": {
            "plan": "starter",
            "license": {
                "jti": "j1",
                "issuedAt": NOW.isoformat(),
                "expiresAt": (NOW + timedelta(days=30)).isoformat(),
            },
            "conditions": [
                {
                    "type": "NotificationsReady",
                    "status": "True",
                    "reason": "WebhookSecretReady",
                    "message": "webhooks signed with customer-acme/hook key k",
                    "lastTransitionTime": NOW.isoformat(),
                }
            ],
        },
    }


async def test_a_rotated_webhook_secret_is_copied_without_a_spec_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the copy was made by passes only (a spec change, Reconcile now, a renewal about
    20 days on), so webhooks were signed with the old value after a rotation, refused by the receiver
    and dead hours later, while NotificationsReady said they were signed."""
    passes: list[str] = []

    async def refresh(ctx: Any, name: str, deployment_event: int | None = None) -> None:
        passes.append(name)

    monkeypatch.setattr(handlers, "_refresh", refresh)
    secrets, clock = Secrets(), [NOW]
    settings = SimpleNamespace(dunning_restrict_days=14, trial_notice_days=3)
    context = SimpleNamespace(
        clock=lambda: clock[0],
        settings=settings,
        noticed=set(),
        first_licences={},
        kube=secrets,
        webhook_secrets_checked={},
        background_passes=BackgroundPasses(),
    )
    memo = kopf.Memo(context=context)
    body = kopf.Body(signed_customer())

    async def checks(minutes: int) -> None:
        for _minute in range(minutes):
            clock[0] += timedelta(minutes=1)
            await handlers.housekeeping(name="acme", body=body, memo=memo)

    await checks(30)
    assert passes == [] and secrets.reads == 2 * 2  # unchanged: two reads ten minutes apart, no pass

    secrets.data["hook"] = {"k": NEW}
    await checks(10)
    assert passes == ["acme"]  # the pass copies it (ensure_webhook_secret)

    # The API server away: the check says so and the next one looks again.
    secrets.away = True
    await checks(10)
    assert passes == ["acme"]


class ForegroundDeletion(Cluster):
    """A Customer deleted with `--cascade=foreground` (Argo CD's prune): the garbage collector deletes its
    dependents while the finalizer runs, here once the finalizer has made its first two reads there
    (the namespace and one Secret), and the notice sender drops the kept keys of the customer ids with
    no webhook pending (forget_settled_secrets) while helm uninstalls."""

    def __init__(self) -> None:
        super().__init__()
        self.namespaces["customer-acme"] = namespace_of(customer())
        self.in_namespace = {
            LICENSE_SECRET_NAME: SecretData({"license.jwt": b"a licence"}, {}, {}),
            NOTIFICATIONS_SECRET_NAME: SecretData(
                {NOTIFICATIONS_SECRET_KEY: OLD}, {}, {c.LABEL_CUSTOMER_ID: "cust_acme0001"}
            ),
        }
        self.reads = 0
        self.kept: dict[str, bytes] = {}  # iotistic-notifications-deleted in the billing namespace
        self.merges: list[dict[str, bytes | None]] = []
        self.marks: dict[str, str] = {}  # its annotations
        self.pending: set[str] = set()  # customer ids with a webhook pending

    def collect_garbage(self) -> None:
        self.reads += 1
        if self.reads == 2:
            self.in_namespace.clear()
            self.namespaces["customer-acme"]["metadata"]["deletionTimestamp"] = NOW.isoformat()

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        found = await super().read_namespace(name)
        self.collect_garbage()
        return found

    async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
        if (namespace, name) == ("billing", "iotistic-notifications-deleted"):
            return SecretData(dict(self.kept), dict(self.marks), {}) if self.kept or self.marks else None
        assert namespace == "customer-acme"
        found = self.in_namespace.get(name)
        self.collect_garbage()
        return found

    async def merge_secret_data(
        self,
        namespace: str,
        name: str,
        data: dict[str, bytes | None],
        labels: Any = None,
        annotations: dict[str, str | None] | None = None,
        resource_version: str | None = None,
    ) -> None:
        assert (namespace, name) == ("billing", "iotistic-notifications-deleted")
        self.merges.append(data)
        for customer_id, value in data.items():
            if value is None:
                self.kept.pop(customer_id, None)
            else:
                self.kept[customer_id] = value
        for key, mark in (annotations or {}).items():
            if mark is None:
                self.marks.pop(key, None)
            else:
                self.marks[key] = mark

    async def read_customer(self, name: str) -> dict[str, Any]:
        return hooked(customer(name))  # a retry reads the Customer the first try marked Terminating

    def sender_drops_settled(self) -> None:
        """What the notice sender's forget_settled_secrets does: drop the keys with no webhook pending
        and no running deletion's mark."""
        for customer_id in set(self.kept) - self.pending:
            if deletion_running_annotation(customer_id) not in self.marks:
                self.kept.pop(customer_id)


def revocations_written(
    monkeypatch: pytest.MonkeyPatch, cluster: ForegroundDeletion, failures: list[Exception] | None = None
) -> None:
    """The finalizer's revocations as the fake cluster sees them: `license.revoked` (not for a rename's
    holder) leaves a webhook delivery pending; each of `failures` is raised by a revocation first."""
    left = list(failures or [])

    async def revoke_license(ctx: Any, customer_id: str, *args: Any, **kwargs: Any) -> None:
        if left:
            raise left.pop(0)
        if "held_by" not in kwargs:
            cluster.pending.add(customer_id)

    async def revoke_usage_keys(*args: Any, **kwargs: Any) -> None:
        pass

    monkeypatch.setattr(delete_module, "revoke_license", revoke_license)
    monkeypatch.setattr(delete_module, "revoke_usage_keys", revoke_usage_keys)


# PostgreSQL's clock once the deletion's notice is written (the finalizer's last keep reads it).
ENDED = NOW + timedelta(minutes=3)


class PostgresClock:
    """A session of PostgreSQL as the finalizer's last keep uses it: it reads the clock alone."""

    async def __aenter__(self) -> PostgresClock:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def scalar(self, statement: object) -> datetime:
        return ENDED


def deletion_context(cluster: ForegroundDeletion, helm: Helm | None = None) -> Any:
    """The finalizer's context on the fake cluster, its billing namespace `billing`, and `helm` if given."""
    ctx = context(cluster)
    ctx.settings = SimpleNamespace(billing_namespace="billing")
    ctx.sessions = PostgresClock
    if helm is not None:
        ctx.helm = helm
    return ctx


class SlowHelm(Helm):
    """helm uninstall takes seconds: the notice sender's drop of settled keys comes meanwhile."""

    cluster: ForegroundDeletion

    async def uninstall(self, release: str, namespace: str) -> bool:
        self.cluster.sender_drops_settled()
        return await super().uninstall(release, namespace)


@pytest.mark.parametrize("holder", [None, "acme-renamed"])
async def test_finalize_keeps_the_signing_secret_when_a_foreground_deletion_removes_the_copy(
    monkeypatch: pytest.MonkeyPatch, holder: str | None
) -> None:
    """Found in review: the finalizer kept the copy last, after helm, the licence Secret, the Customers'
    list and PostgreSQL, when a foreground deletion had had it deleted long before: the license.revoked
    just queued (and any retrying webhook) had no secret to be signed with and died. Kept before then,
    and once more after the notice is written (the sender drops a key with nothing pending). A rename
    that kept the customer id keeps nothing: the id's webhooks are the holder's to sign."""
    cluster = ForegroundDeletion()
    if holder is not None:
        cluster.customers.append(customer(holder, uid="uid-renamed"))
    ctx = deletion_context(cluster, SlowHelm(cluster))

    revocations_written(monkeypatch, cluster)

    await finalize(ctx, customer())
    if holder is None:
        assert cluster.kept == {"cust_acme0001": OLD}
    else:  # not even for a moment: the sender signs the id's webhooks with a kept key first
        assert not any(value is not None for merge in cluster.merges for value in merge.values())


def hooked(body: dict[str, Any]) -> dict[str, Any]:
    """The Customer with a webhook: its namespace holds the signing secret's copy."""
    webhook = {"url": "https://hooks.acme.example/iotistic", "secretRef": {"name": "hook", "key": "k"}}
    return {**body, "spec": {**body["spec"], "notifications": {"webhook": webhook}}}


class HelmFailingOnce(SlowHelm):
    """helm uninstall fails the first time (another operation in progress): the finalizer is retried
    after a backoff of up to 5 minutes, long enough for the sender's drop and the garbage collector."""

    failures = 1

    async def uninstall(self, release: str, namespace: str) -> bool:
        if self.failures:
            self.failures -= 1
            raise HelmError("uninstall", "another operation (install/upgrade/rollback) is in progress")
        return await super().uninstall(release, namespace)


async def test_a_finalizer_retried_after_the_copy_went_still_keeps_the_signing_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a first try kept the key and failed at helm; the sender dropped it meanwhile
    (nothing pending yet) and the garbage collector the copy, so the retry had nothing to keep and the
    license.revoked it wrote could never be signed. The key is marked while its deletion runs, and the
    mark lifted once the notice is written."""
    cluster = ForegroundDeletion()
    ctx = deletion_context(cluster, HelmFailingOnce(cluster))

    revocations_written(monkeypatch, cluster)

    with pytest.raises(DeletionFailed):
        await finalize(ctx, hooked(customer()))
    cluster.sender_drops_settled()  # during the backoff
    assert cluster.kept == {"cust_acme0001": OLD}
    await finalize(ctx, hooked(customer()))
    assert cluster.kept == {"cust_acme0001": OLD}
    assert cluster.marks == {signs_until_annotation("cust_acme0001"): ENDED.isoformat()}  # no mark


class NamespaceGoneOnRetry(ForegroundDeletion):
    """The garbage collector has finished with the namespace by the finalizer's retry."""

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        if self.reads >= 2:
            return None
        return await super().read_namespace(name)


@pytest.mark.parametrize("holder_on_retry", [False, True])
async def test_a_finalizer_retried_after_the_namespace_went_leaves_no_mark(
    monkeypatch: pytest.MonkeyPatch, holder_on_retry: bool
) -> None:
    """Found in review: a first try kept and marked the key and failed; the retry, finding the namespace
    gone (or another Customer applied meanwhile holding the id), never lifted the mark, so the sender
    kept the key for ever (and signed the holder's webhooks with it). Lifted on every retry without a
    holder; with one, the key this deletion kept is dropped."""
    cluster = NamespaceGoneOnRetry()
    ctx = deletion_context(cluster)
    revocations_written(monkeypatch, cluster, failures=[RuntimeError("PostgreSQL away")])

    with pytest.raises(DeletionFailed):
        await finalize(ctx, hooked(customer()))
    assert cluster.kept == {"cust_acme0001": OLD} and cluster.marks  # kept, marked
    if holder_on_retry:
        cluster.customers.append(customer("acme-renamed", uid="uid-renamed"))
    await finalize(ctx, hooked(customer()))
    # The retry found no copy: the key an earlier try kept signs the notices written until now.
    until = {signs_until_annotation("cust_acme0001"): ENDED.isoformat()}
    assert cluster.marks == ({} if holder_on_retry else until)
    assert cluster.kept == ({} if holder_on_retry else {"cust_acme0001": OLD})


@pytest.mark.parametrize("copied", [True, False], ids=["a webhook", "no webhook"])
async def test_a_kept_key_signs_only_the_notices_written_until_its_deletion_ended(
    monkeypatch: pytest.MonkeyPatch, copied: bool
) -> None:
    """Found in review: the sender signed every notice of a kept key's customer id with it, also those of
    a Customer created again under the id after the deletion (a new webhook secret, a receiver that knows
    only that one). The deletion notes PostgreSQL's time (the clock of a notice's created_at) once its
    notice is written; while it runs the key signs every notice of the id. Nothing is noted for a
    Customer whose deletion kept no key (another's key is kept meanwhile)."""
    cluster = ForegroundDeletion()
    cluster.kept = {"cust_globex0001": NEW}
    if not copied:
        del cluster.in_namespace[NOTIFICATIONS_SECRET_NAME]
    ctx = deletion_context(cluster)
    marks: list[dict[str, str]] = []

    async def revoke_license(*args: Any, **kwargs: Any) -> None:
        marks.append(dict(cluster.marks))  # as the deletion's notice is written

    revocations_written(monkeypatch, cluster)
    monkeypatch.setattr(delete_module, "revoke_license", revoke_license)
    await finalize(ctx, hooked(customer()))
    # The mark names the deleting Customer: the sender lifts it if the Customer goes without it.
    assert marks == [{deletion_running_annotation("cust_acme0001"): "acme/uid-acme"} if copied else {}]
    if copied:
        assert cluster.kept == {"cust_globex0001": NEW, "cust_acme0001": OLD}
        assert cluster.marks == {signs_until_annotation("cust_acme0001"): ENDED.isoformat()}
    else:
        assert cluster.kept == {"cust_globex0001": NEW} and cluster.marks == {}


async def test_a_deletion_that_kept_no_key_leaves_an_earlier_deletion_s_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a Customer created again under a deleted one's id, with no copy of its own, was
    deleted in turn while the first one's key was still kept; its deletion noted its own time on that key,
    which then signed the second Customer's notices written in between (and kept them pending). A
    deletion notes a time only for a key it kept itself (its mark on it)."""
    cluster = ForegroundDeletion()
    del cluster.in_namespace[NOTIFICATIONS_SECRET_NAME]
    earlier = {signs_until_annotation("cust_acme0001"): (NOW - timedelta(days=1)).isoformat()}
    cluster.kept, cluster.marks = {"cust_acme0001": OLD}, dict(earlier)
    ctx = deletion_context(cluster)
    revocations_written(monkeypatch, cluster)

    await finalize(ctx, hooked(customer()))
    assert cluster.kept == {"cust_acme0001": OLD}
    assert cluster.marks == earlier


class CustomerNamespace:
    """customer-acme's Secrets as the API server keeps them (data, labels, resourceVersion), and the
    operator's writes to them."""

    def __init__(self, copy_of: str) -> None:
        self.secrets: dict[str, SecretData] = {
            "hook": SecretData({"k": OLD}, {}, {}, "1"),
            NOTIFICATIONS_SECRET_NAME: SecretData(
                {NOTIFICATIONS_SECRET_KEY: OLD}, {}, {c.LABEL_CUSTOMER_ID: copy_of}, "2"
            ),
        }
        self.writes: list[str] = []
        self.reads: list[str] = []

    async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
        assert namespace == "customer-acme"
        self.reads.append(name)
        return self.secrets.get(name)

    async def delete_secret(self, namespace: str, name: str, resource_version: str | None = None) -> bool:
        assert namespace == "customer-acme"
        self.writes.append(f"DELETE {name}")
        found = self.secrets.get(name)
        if found is None:
            return False
        if resource_version is not None and resource_version != found.resource_version:
            raise ApiException(status=409, reason="Conflict")
        del self.secrets[name]
        return True

    async def apply(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        assert (meta["namespace"], body["kind"]) == ("customer-acme", "Secret")
        self.writes.append(f"APPLY {meta['name']}")
        data = {key: base64.b64decode(value) for key, value in body["data"].items()}
        self.secrets[meta["name"]] = SecretData(data, {}, dict(meta["labels"]), "3")


def source_taken_back(namespace: CustomerNamespace, how: str) -> None:
    """The customer takes its signing secret back from the Secret its webhook's secretRef names."""
    if how == "deleted":
        del namespace.secrets["hook"]
    elif how == "key removed":
        namespace.secrets["hook"] = SecretData({"other": OLD}, {}, {}, "4")
    else:
        namespace.secrets["hook"] = SecretData({"k": b"whsec_leaked!"}, {}, {}, "4")


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("deleted", c.SECRET_NOT_FOUND),
        ("key removed", c.SECRET_KEY_NOT_FOUND),
        ("invalid value", c.INVALID_SECRET),
    ],
)
async def test_a_signing_secret_taken_back_deletes_the_copy_until_it_is_back(how: str, reason: str) -> None:
    """Found in review: a Secret deleted (its key leaked, say), its key removed or an invalid value put
    there made NotificationsReady False, but the copy stayed, and the sender went on signing the
    customer's webhooks with the key the customer had taken back. The copy goes with it, once (a retried
    pass finds nothing to delete), and comes back with the Secret."""
    namespace = CustomerNamespace(copy_of="cust_acme0001")
    ctx = cast(OperatorContext, SimpleNamespace(kube=namespace))
    target = target_of(hooked(customer()))
    source_taken_back(namespace, how)

    for _try in range(2):  # Kopf's retry of the pass
        outcome = await ensure_webhook_secret(ctx, target)
        assert outcome is not None and (outcome.ready, outcome.reason) == (False, reason)
        assert "spec.notifications.webhook.secretRef" in outcome.message
        assert NOTIFICATIONS_SECRET_NAME not in namespace.secrets
    assert namespace.writes == [f"DELETE {NOTIFICATIONS_SECRET_NAME}"]

    namespace.secrets["hook"] = SecretData({"k": NEW}, {}, {}, "5")
    outcome = await ensure_webhook_secret(ctx, target)
    assert outcome is not None and outcome.ready
    copied = namespace.secrets[NOTIFICATIONS_SECRET_NAME]
    assert copied.data == {NOTIFICATIONS_SECRET_KEY: NEW}
    assert copied.labels[c.LABEL_CUSTOMER_ID] == "cust_acme0001"


async def test_a_copy_labelled_with_another_customer_id_is_left_alone() -> None:
    """The copy is deleted only when it is this Customer's (its label names its customer id), as the
    sender reads it."""
    namespace = CustomerNamespace(copy_of="cust_other0001")
    del namespace.secrets["hook"]
    ctx = cast(OperatorContext, SimpleNamespace(kube=namespace))
    outcome = await ensure_webhook_secret(ctx, target_of(hooked(customer())))
    assert outcome is not None and outcome.reason == c.SECRET_NOT_FOUND
    assert namespace.writes == [] and NOTIFICATIONS_SECRET_NAME in namespace.secrets


def signed(body: dict[str, Any]) -> dict[str, Any]:
    """The Customer as the pass that copied its signing secret left it: NotificationsReady True."""
    return {**body, "status": {"conditions": signed_customer()["status"]["conditions"]}}


async def test_a_webhook_removed_from_the_spec_deletes_the_copy() -> None:
    """Found in review: a webhook removed from the spec (its key leaked, or the customer stops webhooks)
    left the copy in place, and the deliveries still retrying were signed with the withdrawn key and
    posted to the withdrawn URL for hours. The pass after the removal deletes it; a Customer that never
    had a webhook, or whose removal was seen, costs no read."""
    namespace = CustomerNamespace(copy_of="cust_acme0001")
    ctx = cast(OperatorContext, SimpleNamespace(kube=namespace))

    assert await ensure_webhook_secret(ctx, target_of(signed(customer()))) is None
    assert namespace.writes == [f"DELETE {NOTIFICATIONS_SECRET_NAME}"]
    assert NOTIFICATIONS_SECRET_NAME not in namespace.secrets

    namespace.secrets[NOTIFICATIONS_SECRET_NAME] = SecretData({NOTIFICATIONS_SECRET_KEY: OLD}, {}, {}, "6")
    namespace.writes.clear()
    namespace.reads.clear()
    assert await ensure_webhook_secret(ctx, target_of(customer())) is None  # no condition: never signed
    assert namespace.writes == namespace.reads == [] and NOTIFICATIONS_SECRET_NAME in namespace.secrets

    other = CustomerNamespace(copy_of="cust_other0001")
    ctx = cast(OperatorContext, SimpleNamespace(kube=other))
    assert await ensure_webhook_secret(ctx, target_of(signed(customer()))) is None
    assert other.writes == [] and NOTIFICATIONS_SECRET_NAME in other.secrets
