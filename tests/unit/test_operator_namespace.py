"""The Customer's namespace: made by its first pass, never taken over when someone else made it, waited
for while it is being deleted, and deleted with the Customer only when it is the Customer's own."""

from __future__ import annotations

import asyncio
import copy
import json
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import LICENSE_SECRET_NAME, Customer
from iotistic_billing.k8s import FieldManager, KubeApi
from iotistic_billing.operator import constants as c
from iotistic_billing.operator import delete as delete_module
from iotistic_billing.operator import handlers
from iotistic_billing.operator.context import (
    CustomerIdHolders,
    CustomerLocks,
    DeletionHolders,
    OperatorContext,
    PassRetries,
)
from iotistic_billing.operator.delete import DeletionFailed, finalize
from iotistic_billing.operator.helm import HelmError
from iotistic_billing.operator.kopf_tuning import HandledSpecs
from iotistic_billing.operator.manifests import namespace_manifest, owner_reference
from iotistic_billing.operator.outcomes import NamespaceRefused
from iotistic_billing.operator.reconcile import _namespace_and_secret
from iotistic_billing.operator.state import PassTarget, pass_target
from tests.unit.test_operator_state import NOW

SECRET = ({"license.jwt": b"a licence", "usage-api-key": b"iuk_theirs"}, {})


class Cluster:
    """Namespaces, licence Secrets and Customers' statuses as the API server keeps them, the Events
    posted, and the requests the operator made."""

    def __init__(self) -> None:
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, tuple[dict[str, bytes], dict[str, str]]] = {}
        self.customers: list[dict[str, Any]] = []
        self.statuses: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, str, str, str]] = []
        self.messages: list[tuple[str, str]] = []  # each Event's reason and message
        self.requests: list[tuple[str, str]] = []

    async def patch_customer_status(
        self, name: str, status: dict[str, Any], resource_version: str | None = None, manager: Any = None
    ) -> dict[str, Any]:
        self.requests.append(("PATCH customers/status", name))
        self.statuses[name] = {**self.statuses.get(name, {}), **status}
        return {"metadata": {"name": name, "resourceVersion": "2"}, "status": self.statuses[name]}

    async def create_event(
        self, kind: str, involved: dict[str, Any], *, reason: str, message: str, event_type: str = "Normal"
    ) -> None:
        self.events.append((kind, involved["metadata"]["name"], event_type, reason))
        self.messages.append((reason, message))

    async def create_namespace(self, body: dict[str, Any]) -> bool:
        name = body["metadata"]["name"]
        self.requests.append(("POST namespaces", name))
        if name in self.namespaces:
            return False
        self.namespaces[name] = copy.deepcopy(body)
        return True

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        self.requests.append(("GET namespaces", name))
        return copy.deepcopy(self.namespaces.get(name))

    async def apply(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        self.requests.append((f"APPLY {body['kind'].lower()}s", name))
        meta = self.namespaces.setdefault(name, {"metadata": {"name": name}})["metadata"]
        meta.setdefault("labels", {}).update(body["metadata"]["labels"])
        meta["ownerReferences"] = body["metadata"]["ownerReferences"]

    async def read_secret_data(self, namespace: str, name: str) -> Any:
        """The licence Secret alone: no webhook, so no copy of its signing secret."""
        self.requests.append(("GET secrets", namespace))
        if namespace not in self.namespaces or name != LICENSE_SECRET_NAME:
            return None
        return self.secrets.get(namespace)

    async def delete_namespace(self, name: str) -> bool:
        """Accepted again while the namespace terminates: the API server answers 200 with it (409 before
        Kubernetes 1.17, kubernetes/kubernetes#84122)."""
        self.requests.append(("DELETE namespaces", name))
        namespace = self.namespaces.get(name)
        if namespace is not None:
            namespace["metadata"]["deletionTimestamp"] = NOW.isoformat()
        return namespace is not None

    async def list_customers(self) -> list[dict[str, Any]]:
        return self.customers


class Helm:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def uninstall(self, release: str, namespace: str) -> bool:
        self.cluster.requests.append(("helm uninstall", f"{namespace}/{release}"))
        return True


def customer(name: str = "acme", uid: str = "uid-acme") -> dict[str, Any]:
    return {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": name, "uid": uid, "resourceVersion": "1"},
        "spec": {
            "customerId": "cust_acme0001",
            "email": "ops@acme.example",
            "companyName": "Acme",
            "plan": "starter",
        },
    }


def target_of(body: dict[str, Any]) -> PassTarget:
    return pass_target(body, Customer.model_validate(body), "iotistic.cloud", NOW, ("0.1.0", "Fleet"))


def context(cluster: Cluster) -> OperatorContext:
    return cast(
        OperatorContext,
        SimpleNamespace(
            kube=cluster,
            helm=Helm(cluster),
            locks=CustomerLocks(),
            applied_namespaces={},
            mirrored=set(),
            written={},
            clock=lambda: NOW,
            customer_view=SimpleNamespace(saw=lambda body: None),
            rollout_wakeups=set(),
            deletion_failures={},
            deletion_holders=DeletionHolders(),
            customer_id_holders=CustomerIdHolders(cluster.list_customers),
        ),
    )


def namespace_of(body: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    """The namespace the operator made for `body`, with `metadata` over it."""
    name = body["metadata"]["name"]
    manifest = namespace_manifest(f"customer-{name}", name, "cust_acme0001", owner_reference(body))
    manifest["metadata"].update(metadata)
    return manifest


@pytest.fixture
def revocations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The finalizer's licence and usage-key revocations and webhook-secret copy, as calls (PostgreSQL's
    side is tests/integration's)."""
    calls: list[str] = []

    def recorded(what: str, result: Any) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(what)
            return result

        return call

    # A licence revoked, one usage key.
    for step, result in (("revoke_license", True), ("revoke_usage_keys", 1), ("keep_webhook_secret", None)):
        monkeypatch.setattr(delete_module, step, recorded(step, result))
    return calls


async def test_a_new_customers_first_pass_creates_its_namespace_in_one_request() -> None:
    """A namespace just created holds no licence Secret: nothing more to read. The pass before this
    applied the namespace and read the Secret, two requests."""
    cluster = Cluster()
    ctx = context(cluster)
    assert await _namespace_and_secret(ctx, target_of(customer()), made_before=False) is None
    assert cluster.requests == [("POST namespaces", "customer-acme")]
    labels = cluster.namespaces["customer-acme"]["metadata"]["labels"]
    assert labels[c.LABEL_MANAGED_BY] == c.MANAGED_BY and labels[c.LABEL_CUSTOMER] == "acme"

    # The passes after it read the Secret alone, as before.
    cluster.secrets["customer-acme"] = SECRET
    cluster.requests.clear()
    assert await _namespace_and_secret(ctx, target_of(customer()), made_before=True) == SECRET
    assert cluster.requests == [("GET secrets", "customer-acme")]


async def test_a_restarted_operator_reads_its_customers_namespace_and_applies_it_only_when_it_changed() -> (
    None
):
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    cluster.secrets["customer-acme"] = SECRET

    ctx = context(cluster)  # a new process: nothing applied yet
    assert await _namespace_and_secret(ctx, target_of(body), made_before=True) == SECRET
    assert sorted(cluster.requests) == [("GET namespaces", "customer-acme"), ("GET secrets", "customer-acme")]

    # A label someone removed is put back.
    del cluster.namespaces["customer-acme"]["metadata"]["labels"][c.LABEL_CUSTOMER_ID]
    ctx, cluster.requests = context(cluster), []
    assert await _namespace_and_secret(ctx, target_of(body), made_before=True) == SECRET
    assert ("APPLY namespaces", "customer-acme") in cluster.requests
    assert cluster.namespaces["customer-acme"]["metadata"]["labels"][c.LABEL_CUSTOMER_ID] == "cust_acme0001"


GATEKEEPER = (
    'admission webhook "validation.gatekeeper.sh" denied the request: [ns-must-have-team] you must provide'
    ' labels: {"team"}'
)


def gatekeeper_refusal() -> ApiException:
    """The API server's 403 for GATEKEEPER's denial, as the client raises it."""
    answer = SimpleNamespace(
        status=403,
        reason="Forbidden",
        data=json.dumps({"kind": "Status", "message": GATEKEEPER}).encode(),
        headers={},
    )
    return ApiException(http_resp=answer)


class Policed(Cluster):
    """A policy, made after the Customer's namespace, that refuses every namespace without a team label
    on UPDATE: the apply of the operator's labels as well."""

    async def apply(self, body: dict[str, Any]) -> None:
        self.requests.append((f"APPLY {body['kind'].lower()}s", body["metadata"]["name"]))
        raise gatekeeper_refusal()


async def test_a_refused_apply_of_the_customers_own_namespace_is_a_warning_and_the_pass_goes_on() -> None:
    """Found in review: after an operator restart the apply of the Customer's own namespace (a label
    someone removed put back) refused by a policy made since ended every pass as NamespaceRefused: no
    licence step, no release step, until the licence ran out, though the namespace was usable. The pass
    goes on with the Secret it read, a warning said once this process (tried again at its next start)."""
    cluster = Policed()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    del cluster.namespaces["customer-acme"]["metadata"]["labels"][c.LABEL_CUSTOMER_ID]
    cluster.secrets["customer-acme"] = SECRET
    ctx = context(cluster)  # a new process: nothing applied yet
    warnings: list[tuple[str, str]] = []

    assert await _namespace_and_secret(ctx, target_of(body), made_before=True, warnings=warnings) == SECRET
    assert ("APPLY namespaces", "customer-acme") in cluster.requests
    assert warnings == [
        (
            c.NAMESPACE_REFUSED,
            f"the API server refused to apply namespace customer-acme (403): {GATEKEEPER}; the namespace"
            " is used as it is",
        )
    ]

    cluster.requests.clear()
    warnings.clear()
    assert await _namespace_and_secret(ctx, target_of(body), made_before=True, warnings=warnings) == SECRET
    assert cluster.requests == [("GET secrets", "customer-acme")] and warnings == []


class PolicedOnCreate(Cluster):
    """The policy on CREATE too, which admission applies before the API server finds one of the name
    exists: the operator's create, without the team label, is refused whether or not there is one."""

    async def create_namespace(self, body: dict[str, Any]) -> bool:
        self.requests.append(("POST namespaces", body["metadata"]["name"]))
        raise gatekeeper_refusal()


async def test_a_namespace_handed_over_under_a_policy_on_create_is_read_and_taken_over() -> None:
    """Found in review: GitOps made customer-acme with the team label a policy on create asks for, for
    the Customer to take over; the operator's first create, without that label, was refused, which was
    read as no namespace there: the Customer stayed Pending, no licence, no release, the namespace never
    read. A refused create reads the namespace, and only none there is NamespaceRefused."""
    cluster = PolicedOnCreate()
    body = customer()
    handed = {"metadata": {"name": "customer-acme", "labels": {c.LABEL_CUSTOMER: "acme", "team": "payments"}}}
    cluster.namespaces["customer-acme"] = copy.deepcopy(handed)

    assert await _namespace_and_secret(context(cluster), target_of(body), made_before=False) is None
    meta = cluster.namespaces["customer-acme"]["metadata"]
    assert meta["labels"]["team"] == "payments" and meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY

    empty = PolicedOnCreate()  # none there: the create's refusal is the answer, the create not sent again
    refused = await _namespace_and_secret(context(empty), target_of(body), made_before=False)
    assert isinstance(refused, NamespaceRefused) and refused.reason == c.NAMESPACE_REFUSED
    assert GATEKEEPER in refused.message and not refused.runs_on
    assert [request for request in empty.requests if request[0] == "POST namespaces"] == [
        ("POST namespaces", "customer-acme")
    ]


@pytest.mark.parametrize("made_before", [False, True])
async def test_a_namespace_someone_else_made_is_never_written_to_and_outlives_the_customer(
    revocations: list[str], made_before: bool
) -> None:
    """Found in review: the pass applied customer-<name> with a forced server-side apply whoever had
    made it, and the finalizer then uninstalled the release `instance` there and deleted the namespace.
    The earlier system's namespaces (customer-<id>), adopted by a migration, were destroyed so."""
    cluster = Cluster()
    theirs = {"metadata": {"name": "customer-acme", "labels": {"team": "payments"}}}
    cluster.namespaces["customer-acme"] = copy.deepcopy(theirs)
    cluster.secrets["customer-acme"] = SECRET
    ctx = context(cluster)
    body = customer()

    refused = await _namespace_and_secret(ctx, target_of(body), made_before=made_before)
    assert isinstance(refused, NamespaceRefused) and refused.permanent
    assert refused.reason == c.NAMESPACE_TAKEN
    assert refused.message.startswith("metadata.name: namespace customer-acme exists and was not created")
    assert not any(verb.startswith("APPLY") for verb, _ in cluster.requests)
    assert ctx.applied_namespaces == {}

    await finalize(ctx, body)
    assert cluster.namespaces["customer-acme"] == theirs
    assert not any(verb in ("helm uninstall", "DELETE namespaces") for verb, _ in cluster.requests)
    # Its licence is revoked as the history knows it (the Secret there is not read as the Customer's).
    # The keep lifts a mark an earlier try may have left (nothing kept here: no copy).
    assert revocations == ["revoke_license", "revoke_usage_keys", "keep_webhook_secret"]


async def test_a_namespace_its_maker_labelled_for_the_customer_is_handed_over() -> None:
    """A GitOps repository applies customer-<name> with the Secret a webhook's secretRef names, beside the
    Customer: labelled `iotistic.io/customer: <name>` (and owned by no Customer), it is the Customer's,
    which takes it over (its labels and owner applied) and deletes it with itself."""
    cluster = Cluster()
    handed = {"metadata": {"name": "customer-acme", "labels": {c.LABEL_CUSTOMER: "acme", "team": "payments"}}}
    cluster.namespaces["customer-acme"] = copy.deepcopy(handed)
    ctx = context(cluster)
    body = customer()

    assert await _namespace_and_secret(ctx, target_of(body), made_before=False) is None
    meta = cluster.namespaces["customer-acme"]["metadata"]
    assert meta["labels"]["team"] == "payments" and meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY
    assert [owner["uid"] for owner in meta["ownerReferences"]] == [body["metadata"]["uid"]]

    # Labelled for another Customer, or owned by another Customer: not handed to this one.
    for other in (
        {"labels": {c.LABEL_CUSTOMER: "globex"}},
        {
            "labels": {c.LABEL_CUSTOMER: "acme"},
            "ownerReferences": [{**meta["ownerReferences"][0], "uid": "x"}],
        },
    ):
        cluster = Cluster()
        cluster.namespaces["customer-acme"] = {"metadata": {"name": "customer-acme", **other}}
        refused = await _namespace_and_secret(context(cluster), target_of(body), made_before=False)
        assert isinstance(refused, NamespaceRefused), other


@pytest.mark.parametrize("made_before", [False, True])
async def test_an_earlier_customers_namespace_is_waited_for_and_nothing_in_it_is_used(
    made_before: bool,
) -> None:
    """A Customer deleted and made again under its name: the old namespace, Terminating with the old
    licence Secret in it, is not the new Customer's; the pass waits until it is gone."""
    cluster = Cluster()
    earlier = customer(uid="uid-earlier")
    cluster.namespaces["customer-acme"] = namespace_of(earlier, deletionTimestamp=NOW.isoformat())
    cluster.secrets["customer-acme"] = SECRET
    ctx = context(cluster)
    body = customer(uid="uid-again")

    refused = await _namespace_and_secret(ctx, target_of(body), made_before=made_before)
    assert refused == NamespaceRefused(
        c.NAMESPACE_TERMINATING,
        "namespace customer-acme belongs to an earlier Customer acme, deleted, and is being deleted;"
        " waiting until it is gone",
        permanent=False,
    )
    assert not any(verb.startswith("APPLY") for verb, _ in cluster.requests)
    assert ctx.applied_namespaces == {}

    # Gone: the next pass makes a new one, with nothing in it.
    del cluster.namespaces["customer-acme"], cluster.secrets["customer-acme"]
    assert await _namespace_and_secret(ctx, target_of(body), made_before=False) is None
    owners = cluster.namespaces["customer-acme"]["metadata"]["ownerReferences"]
    assert [owner["uid"] for owner in owners] == ["uid-again"]


async def test_a_customers_own_namespace_being_deleted_is_waited_for_and_made_again() -> None:
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body, deletionTimestamp=NOW.isoformat())
    cluster.secrets["customer-acme"] = SECRET
    ctx = context(cluster)
    ctx.applied_namespaces["customer-acme"] = namespace_of(body)

    # The Secret is still there while the namespace terminates: the namespace this process applied is
    # looked at again only once the Secret is missing, as the namespace's deletion comes to.
    assert await _namespace_and_secret(ctx, target_of(body), made_before=True) == SECRET
    del cluster.secrets["customer-acme"]
    refused = await _namespace_and_secret(ctx, target_of(body), made_before=True)
    assert isinstance(refused, NamespaceRefused) and not refused.permanent
    assert refused.message == "namespace customer-acme is being deleted; it is created again once it is gone"

    del cluster.namespaces["customer-acme"]
    assert await _namespace_and_secret(ctx, target_of(body), made_before=True) is None
    assert "customer-acme" in cluster.namespaces


async def test_the_finalizer_deletes_the_customers_own_namespace_again_after_a_crash(
    revocations: list[str],
) -> None:
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)
    await finalize(ctx, body)
    # Retried: the namespace Terminating, the release gone, the Customer marked Terminating already.
    await finalize(ctx, {**body, "status": cluster.statuses["acme"]})
    assert [request for request in cluster.requests if request[0] != "GET namespaces"] == [
        ("PATCH customers/status", "acme"),
        ("GET secrets", "customer-acme"),  # the signing secret's copy (none: no webhook)
        ("helm uninstall", "customer-acme/instance"),
        ("GET secrets", "customer-acme"),
        ("DELETE namespaces", "customer-acme"),
        ("GET secrets", "customer-acme"),
        ("GET secrets", "customer-acme"),
        ("DELETE namespaces", "customer-acme"),
    ]
    assert revocations == ["revoke_license", "revoke_usage_keys", "keep_webhook_secret"] * 2


def test_a_create_that_the_api_server_refuses_for_another_reason_is_an_error() -> None:
    """Only 409 (the name is taken) means "it exists": a 403 of missing rights is not."""
    api = KubeApi(cast(Any, None), FieldManager.OPERATOR)
    refused = {"status": 409}

    def send(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        assert (method, path) == ("POST", "/api/v1/namespaces")
        raise ApiException(status=refused["status"], reason="refused")

    api.send = send  # type: ignore[method-assign]
    assert api.create_namespace({"metadata": {"name": "customer-acme"}}) is False
    refused["status"] = 403
    with pytest.raises(ApiException):
        api.create_namespace({"metadata": {"name": "customer-acme"}})


async def test_a_failed_step_of_the_deletion_is_named_and_the_customer_marked_terminating_once(
    revocations: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: while a step failed (PostgreSQL away when revoking the licence) the Customer
    still said Ready, its release uninstalled, and nothing said which step failed or why."""
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)
    memo = kopf.Memo(context=ctx, handled=HandledSpecs(prefix="iotistic.io", key="handled"))

    async def refused(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError("connection to PostgreSQL refused")

    recorded = delete_module.revoke_license
    monkeypatch.setattr(delete_module, "revoke_license", refused)
    with pytest.raises(DeletionFailed) as failed:
        await finalize(ctx, body)
    assert str(failed.value) == "revoking the licence failed: connection to PostgreSQL refused"
    status = cluster.statuses["acme"]
    assert status["phase"] == "Terminating"
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Ready", "False", "Terminating")
    ]

    # Kopf's handler: the failure as a Warning naming the step, retried after the passes' backoff.
    marked = {**body, "metadata": {**body["metadata"], "resourceVersion": "2"}, "status": status}
    for retry in range(1, 13):  # an hour of PostgreSQL away: one Warning for the cause, not one a retry
        with pytest.raises(kopf.TemporaryError) as retried:
            await handlers.delete_customer(body=kopf.Body(marked), memo=memo, retry=retry)
        assert retried.value.delay == min(5 * 2**retry, 300)
    monkeypatch.setattr(delete_module, "revoke_license", recorded)
    await handlers.delete_customer(body=kopf.Body(marked), memo=memo, retry=2)

    assert [request for request in cluster.requests if request[0] == "PATCH customers/status"] == [
        ("PATCH customers/status", "acme")
    ]
    assert [(kind, type_, reason) for kind, _, type_, reason in cluster.events] == [
        ("Customer", "Normal", "Terminating"),
        ("Customer", "Warning", "DeletionFailed"),
        ("Customer", "Normal", "Deleted"),
    ]
    assert cluster.namespaces["customer-acme"]["metadata"].get("deletionTimestamp")


def deletion_memo(ctx: OperatorContext) -> kopf.Memo:
    return kopf.Memo(context=ctx, handled=HandledSpecs(prefix="iotistic.io", key="handled"))


async def test_a_finalizer_finding_its_namespace_terminating_completes(revocations: list[str]) -> None:
    """Found in review: a namespace already terminating (a GitOps repository pruning the labelled
    namespace with the Customer, Argo CD's foreground deletion, a retry after a crash that followed the
    first DELETE) is deleted again, which the API server accepts; no release was uninstalled (the
    namespace's deletion removes it), yet the Deleted Event said "release uninstalled"."""
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body, deletionTimestamp=NOW.isoformat())
    ctx = context(cluster)

    await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=0)

    assert ("helm uninstall", "customer-acme/instance") not in cluster.requests
    assert ("DELETE namespaces", "customer-acme") in cluster.requests
    assert revocations == ["revoke_license", "revoke_usage_keys", "keep_webhook_secret"]
    assert [reason for reason, _ in cluster.messages] == ["Terminating", "Deleted"]
    assert cluster.messages[-1] == (
        "Deleted",
        "licence revoked; namespace customer-acme already being deleted, which removes the release",
    )


async def test_deleting_a_customer_without_a_release_does_not_say_one_was_uninstalled(
    revocations: list[str],
) -> None:
    """Found in review: the Deleted Event said "release uninstalled" also when helm found no release (a
    Customer whose first pass failed before helm ran, or a retry after a try that uninstalled it)."""
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)

    class NoRelease(Helm):
        async def uninstall(self, release: str, namespace: str) -> bool:
            await super().uninstall(release, namespace)
            return False  # helm: release not found

    ctx.helm = NoRelease(cluster)

    await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=0)

    assert ("helm uninstall", "customer-acme/instance") in cluster.requests
    assert cluster.messages[-1] == (
        "Deleted",
        "no release left to uninstall, licence revoked, namespace deletion requested",
    )


async def test_deleting_a_customer_with_its_release_says_it_was_uninstalled(revocations: list[str]) -> None:
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)

    await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=0)

    assert cluster.messages[-1] == (
        "Deleted",
        "release uninstalled, licence revoked, namespace deletion requested",
    )


def subscribed(status: str, **subscription: Any) -> dict[str, Any]:
    """The Customer with a Stripe subscription of `status` (the webhook server's spec.subscription)."""
    body = customer()
    body["spec"]["billing"] = {"mode": "stripe", "stripeCustomerId": "cus_acme"}
    body["spec"]["subscription"] = {
        "status": status,
        "plan": "starter",
        "stripeSubscriptionId": "sub_acme1",
        "lastEventCreated": 1,
        **subscription,
    }
    return body


@pytest.mark.parametrize("status", ["active", "trialing", "past_due", "unpaid", "paused"])
async def test_deleting_a_customer_with_a_live_subscription_warns_that_stripe_still_bills_it(
    revocations: list[str], status: str
) -> None:
    """Found in review: the deletion left the Customer's Stripe subscription billing with no word of it, and
    the Deleted Event named only the release, the licence and the namespace: a GitOps prune (which cannot
    cancel first) left the customer paying for an instance that was gone. Its cancel named no subscription
    (the id's newest open one), so a retry once the first was applied could cancel another."""
    cluster = Cluster()
    body = subscribed(status)
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)
    ctx.helm = HelmRefusing(cluster, "Error: uninstall: Kubernetes cluster unreachable")

    # A failed try, then the one that completes: the Warning once, with the Deleted Event.
    with pytest.raises(kopf.TemporaryError):
        await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=0)
    ctx.helm = Helm(cluster)
    body["metadata"]["resourceVersion"] = "2"  # as Kopf hands it over again: with its status marked
    body["status"] = cluster.statuses["acme"]
    await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=1)

    assert [reason for reason, _ in cluster.messages] == [
        "Terminating",
        "DeletionFailed",
        "Deleted",
        "SubscriptionLeftActive",
    ]
    assert cluster.events[-1][2] == "Warning"
    assert cluster.messages[-1][1] == (
        f"Stripe subscription sub_acme1 ({status}) of customer id cust_acme0001 was open when the Customer"
        " was deleted, and Stripe bills it until it is cancelled: cancel it in the Stripe Dashboard, or with"
        ' POST /api/subscriptions/cancel {"customer_id": "cust_acme0001", "subscription_id": "sub_acme1",'
        ' "immediately": true} (naming it, a retry cancels no other subscription). The console\'s overview'
        " lists it, and iotistic_subscriptions_left_billing counts it, until it is cancelled. A cancel sent"
        " moments before the deletion may not have reached this Customer yet"
    )


@pytest.mark.parametrize(
    "subscription",
    [
        {"status": "canceled"},
        {"status": "incomplete_expired"},
        {"status": "incomplete"},
        # Stripe ends it at its period's end: nothing is billed again.
        {"status": "active", "cancelAtPeriodEnd": True},
    ],
    ids=["canceled", "incomplete_expired", "incomplete", "active, cancelled at its period's end"],
)
async def test_deleting_a_customer_whose_subscription_bills_no_more_posts_no_warning(
    revocations: list[str], subscription: dict[str, Any]
) -> None:
    cluster = Cluster()
    body = subscribed(**subscription)
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)

    await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=0)

    assert [reason for reason, _ in cluster.messages] == ["Terminating", "Deleted"]


async def test_a_renamed_customer_s_subscription_goes_on_with_the_holder_of_its_id_unwarned(
    revocations: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename that kept spec.customerId: the customer goes on, subscription and all, under the holder."""

    async def nothing_kept(*args: Any, **kwargs: Any) -> None:
        pass

    monkeypatch.setattr(delete_module, "drop_marked_webhook_secret", nothing_kept)
    cluster = Cluster()
    body = subscribed("active")
    cluster.namespaces["customer-acme"] = namespace_of(body)
    cluster.customers.append(customer("acme-renamed", uid="uid-renamed"))
    ctx = context(cluster)

    await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=0)

    assert [reason for reason, _ in cluster.messages] == ["Terminating", "Deleted"]


# helm 4.3.1's uninstall of a release holding a ServiceMonitor after its CRD was removed, as
# helm.helm_error_text reads it (its cause from the --debug log line).
UNBUILDABLE = (
    "Error: failed to delete release: instance: unable to build kubernetes objects for delete: resource"
    ' mapping not found for name: "instance" namespace: "" from "": no matches for kind "ServiceMonitor" in'
    ' version "monitoring.coreos.com/v1"\nensure CRDs are installed first'
)


class HelmRefusing(Helm):
    """helm whose uninstall fails every try with `message`."""

    def __init__(self, cluster: Cluster, message: str) -> None:
        super().__init__(cluster)
        self.message = message

    async def uninstall(self, release: str, namespace: str) -> bool:
        await super().uninstall(release, namespace)
        raise HelmError("uninstall", self.message)


@pytest.mark.parametrize("objects", [1, 6], ids=["one object", "six objects (past an Event's 1 KiB)"])
async def test_a_release_helm_cannot_build_any_more_is_left_to_the_namespace_s_deletion(
    revocations: list[str], objects: int
) -> None:
    """Found in review: a release holding a ServiceMonitor whose CRD was removed since cannot be uninstalled
    (helm cannot build its objects), every try alike: the finalizer was retried for ever, the licence never
    revoked and the namespace, which holds the rest of the release and helm's record of it, never deleted."""
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)
    ctx.helm = HelmRefusing(cluster, "\n".join([UNBUILDABLE] * objects))

    await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=0)

    assert ("helm uninstall", "customer-acme/instance") in cluster.requests
    assert revocations == ["revoke_license", "revoke_usage_keys", "keep_webhook_secret"]
    assert cluster.namespaces["customer-acme"]["metadata"].get("deletionTimestamp")
    assert [(type_, reason) for _, _, type_, reason in cluster.events] == [
        ("Normal", "Terminating"),
        ("Warning", "UninstallFailed"),
        ("Normal", "Deleted"),
    ]
    left = dict(cluster.messages)["UninstallFailed"]
    # Said first: the cause, a line per object helm cannot build, may be cut at the Event's 1 KiB.
    assert left.startswith(
        f"left to the deletion of namespace customer-acme: helm uninstall failed: {UNBUILDABLE[:200]}"
    )
    assert cluster.messages[-1] == (
        "Deleted",
        "release left to the namespace's deletion (helm could not uninstall it), licence revoked,"
        " namespace deletion requested",
    )


@pytest.mark.parametrize(
    "message",
    [
        "Error: uninstall: Kubernetes cluster unreachable: connection refused",
        "Error: failed to delete release: instance: unable to build kubernetes objects for delete: Get"
        ' "https://127.0.0.1:6443/api": dial tcp 127.0.0.1:6443: connect: connection refused',
        "Error: failed to delete release: instance: the server is currently unable to handle the request",
    ],
)
async def test_an_uninstall_failing_for_anything_else_is_retried_with_the_namespace_kept(
    revocations: list[str], message: str
) -> None:
    """The API server away (helm cannot build the objects then either) may answer the next try: only a
    kind the cluster lacks leaves the release to the namespace's deletion."""
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)
    ctx.helm = HelmRefusing(cluster, message)

    with pytest.raises(kopf.TemporaryError):
        await handlers.delete_customer(body=kopf.Body(body), memo=deletion_memo(ctx), retry=0)

    assert revocations == []
    assert ("DELETE namespaces", "customer-acme") not in cluster.requests
    assert [reason for reason, _ in cluster.messages] == ["Terminating", "DeletionFailed"]


async def test_deleting_a_never_licensed_customer_says_nothing_was_revoked(
    revocations: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a Customer stalled since its creation (NamespaceTaken, InvalidSpec) had no licence,
    yet its Deleted Event said one was revoked."""

    async def nothing_to_revoke(*args: Any, **kwargs: Any) -> bool:
        return False  # no licence Secret, no history row of the customer id

    monkeypatch.setattr(delete_module, "revoke_license", nothing_to_revoke)
    cluster = Cluster()
    cluster.namespaces["customer-acme"] = {"metadata": {"name": "customer-acme"}}  # someone else's
    ctx = context(cluster)

    await handlers.delete_customer(body=kopf.Body(customer()), memo=deletion_memo(ctx), retry=0)

    assert cluster.messages[-1] == (
        "Deleted",
        "no licence to revoke; namespace customer-acme not the Customer's own (or gone): left as it is",
    )


async def test_a_holder_created_during_the_uninstall_keeps_its_usage_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the Customer holding the customer id after a rename was looked for before helm
    uninstall, which takes seconds; one applied meanwhile had its first licence and usage key recorded, and
    the finalizer then revoked every usage key of the id, the holder's too, and told the customer that
    its licence was revoked."""
    cluster = Cluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    cluster.secrets["customer-acme"] = SECRET
    ctx = context(cluster)
    revoked: list[tuple[str, Any]] = []

    class HolderAppliedMeanwhile(Helm):
        async def uninstall(self, release: str, namespace: str) -> bool:
            cluster.customers.append(customer("acme-renamed", uid="uid-renamed"))
            return await super().uninstall(release, namespace)

    async def revoke_license(ctx: Any, customer_id: str, *args: Any, **kwargs: Any) -> bool:
        revoked.append(("licence", kwargs.get("held_by")))
        return True

    async def revoke_usage_keys(ctx: Any, customer_id: str, only: str | None = None) -> int:
        revoked.append(("usage keys", only))
        return 1

    async def keep_webhook_secret(*args: Any, **kwargs: Any) -> None:
        revoked.append(("webhook secret kept", None))

    async def drop_marked_webhook_secret(*args: Any, **kwargs: Any) -> None:
        pass

    ctx.helm = HolderAppliedMeanwhile(cluster)
    monkeypatch.setattr(delete_module, "revoke_license", revoke_license)
    monkeypatch.setattr(delete_module, "revoke_usage_keys", revoke_usage_keys)
    monkeypatch.setattr(delete_module, "keep_webhook_secret", keep_webhook_secret)
    monkeypatch.setattr(delete_module, "drop_marked_webhook_secret", drop_marked_webhook_secret)

    await finalize(ctx, body)

    # No webhook secret copy here (no webhook): nothing kept before the uninstall either.
    assert revoked == [("licence", "acme-renamed"), ("usage keys", "iuk_theirs")]


class DeletedFleet(Cluster):
    """The Cluster as `kubectl delete customers --all` leaves it: the Customers gone once finalized, each
    list of them counted and taking a moment (other deletions ask meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.lists = 0

    async def list_customers(self) -> list[dict[str, Any]]:
        self.lists += 1
        listed = list(self.customers)
        await asyncio.sleep(0)
        return listed

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        return None


async def test_deletions_under_way_together_share_their_lists_of_the_fleet(revocations: list[str]) -> None:
    """Found in review: each deletion listed the whole fleet to look for another Customer holding its
    customer id, once more at its DELETED event, and once before keeping a webhook's signing secret:
    `kubectl delete customers --all` of 1,000 listed it 2,000 to 3,000 times. A deletion's look is from
    a list started after it asks, shared with the deletions asking meanwhile, and its DELETED goes by
    what its finalizer found."""
    cluster = DeletedFleet()
    bodies = [customer(f"acme-{index}", uid=f"uid-{index}") for index in range(5)]
    for body in bodies:
        body["spec"]["customerId"] = f"cust_acme{body['metadata']['uid'][-1]}000"
        cluster.namespaces[f"customer-{body['metadata']['name']}"] = namespace_of(body)
    ctx: Any = context(cluster)
    ctx.housekeepers, ctx.told_unpinned, ctx.pass_retries = {}, set(), PassRetries(lambda delay, due: None)
    memo = deletion_memo(ctx)

    await asyncio.gather(*(finalize(ctx, body) for body in bodies))
    for body in bodies:
        uid = body["metadata"]["uid"]
        await handlers.customer_gone(type="DELETED", body=kopf.Body(body), memo=memo, uid=uid)

    assert revocations.count("revoke_license") == 5
    assert cluster.lists == 2  # the first deletion's, and the one the others asked for while it ran
    assert len(ctx.deletion_holders) == 0


class RefusingCluster(Cluster):
    """The API server refuses the namespace's deletion (RBAC), each answer with its own headers."""

    async def delete_namespace(self, name: str) -> bool:
        self.requests.append(("DELETE namespaces", name))
        answer = SimpleNamespace(
            status=403,
            reason="Forbidden",
            data=b'{"kind":"Status","message":"namespaces \\"customer-acme\\" is forbidden: no"}',
            headers={"Audit-Id": f"audit-{len(self.requests)}", "Date": f"second {len(self.requests)}"},
        )
        raise ApiException(http_resp=answer)


async def test_a_refused_deletion_step_posts_one_warning(revocations: list[str]) -> None:
    """Found in review: DeletionFailed Events are posted once a cause, but the cause was the client's
    exception as a string, with the answer's headers (Audit-Id, Date) that differ every time: each retry
    posted another Warning with a header dump."""
    cluster = RefusingCluster()
    body = customer()
    cluster.namespaces["customer-acme"] = namespace_of(body)
    ctx = context(cluster)
    memo = deletion_memo(ctx)

    for retry in range(3):
        with pytest.raises(kopf.TemporaryError):
            await handlers.delete_customer(body=kopf.Body(body), memo=memo, retry=retry)
        # Kopf hands the retry the Customer marked Terminating by the first try.
        body = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": "2"},
            "status": cluster.statuses["acme"],
        }

    assert [message for reason, message in cluster.messages if reason == c.DELETION_FAILED] == [
        'deleting namespace customer-acme failed: the API server refused it (403): namespaces "customer-acme"'
        " is forbidden: no"
    ]
