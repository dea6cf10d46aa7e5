"""The chart's ClusterRoles are enough for the code and no more: the operator's and the webhook server's
own calls made as their ServiceAccounts, and `kubectl auth can-i` for what they must not do.

This module runs its own control plane. On the session one, the session operator (admin rights) may be
running and would provision the same Customers first, and then a pass as the ServiceAccount would
prove little. This one also enables OwnerReferencesPermissionEnforcement, as hardened clusters do, so
the ownerReferences with blockOwnerDeletion that the operator sets are checked as well.
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from sqlalchemy import select

from iotistic_billing.customer import (
    DELETED_NOTIFICATIONS_SECRET_NAME,
    GROUP,
    KIND,
    LICENSE_SECRET_NAME,
    NOTIFICATIONS_SECRET_NAME,
    PLURAL,
    VERSION,
)
from iotistic_billing.db.models import LicenseHistory
from iotistic_billing.devenv.controlplane import REPO_BIN, ControlPlane
from iotistic_billing.k8s import FieldManager, Kube, KubeApi, KubernetesUnavailable, api_client
from iotistic_billing.operator.__main__ import build_context
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.delete import finalize
from iotistic_billing.operator.reconcile import reconcile
from iotistic_billing.served_crds import CUSTOMERS_CRD, check_served_crds
from iotistic_billing.settings import load_settings
from tests.conftest import REPO, OperatorProcess, eventually, unique_name, wait_until

pytestmark = pytest.mark.integration

CHART = REPO / "charts" / "iotistic-billing"
INSTANCE_CHART = REPO / "charts" / "customer-instance"
RELEASE = "iotistic-billing"
# Short: a client certificate's CN (the user name) holds 64 characters at most.
NAMESPACE = "billing"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


class HardenedControlPlane(ControlPlane):
    def _apiserver_argv(self) -> list[str]:
        return [*super()._apiserver_argv(), "--enable-admission-plugins=OwnerReferencesPermissionEnforcement"]


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...]
    kubeconfig: Path

    def impersonation(self) -> list[str]:
        return [f"--as={self.user}", *(f"--as-group={group}" for group in self.groups)]


@dataclass(frozen=True)
class Installed:
    plane: ControlPlane
    admin: kubernetes.client.ApiClient
    kubectl: list[str]
    helm: list[str]
    operator: Identity
    webhook_server: Identity

    @property
    def objects(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.admin)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.admin)


def service_account(plane: ControlPlane, name: str) -> Identity:
    """The identity a Pod of this ServiceAccount has: its user name and groups, as a client certificate."""
    user = f"system:serviceaccount:{NAMESPACE}:{name}"
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}")
    return Identity(user, groups, plane.user_kubeconfig(user, groups))


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory, helm_binary: Path, kubectl_binary: Path
) -> Iterator[Installed]:
    plane = HardenedControlPlane(tmp_path_factory.mktemp("rbac-control-plane")).start()
    admin = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
    try:
        kubectl = [str(kubectl_binary), "--kubeconfig", str(plane.kubeconfig)]
        helm = [str(helm_binary), "--kubeconfig", str(plane.kubeconfig)]
        run([*kubectl, "apply", "--server-side", "-f", str(CHART / "crds")])
        run([*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"])
        run([*kubectl, "create", "namespace", NAMESPACE])
        rendered = run([str(helm_binary), "template", RELEASE, str(CHART), "--namespace", NAMESPACE])
        rbac = [doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] in RBAC_KINDS]
        assert {doc["kind"] for doc in rbac} == RBAC_KINDS
        run([*kubectl, "apply", "-f", "-"], stdin=yaml.safe_dump_all(rbac))
        yield Installed(
            plane=plane,
            admin=admin,
            kubectl=kubectl,
            helm=helm,
            operator=service_account(plane, f"{RELEASE}-operator"),
            webhook_server=service_account(plane, f"{RELEASE}-webhook-server"),
        )
    finally:
        admin.close()
        plane.stop()


def run(argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


def customer_manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Customer",
        "metadata": {"name": name},
        "spec": {"email": f"ops@{name}.example.com", "companyName": f"{name.title()} Corp", **spec},
    }


def helm_release_records(installed: Installed, namespace: str) -> list[str]:
    secrets = installed.core.list_namespaced_secret(namespace, label_selector="owner=helm,name=instance")
    return sorted(item.metadata.name for item in secrets.items)


# ----- the operator -----


@pytest.fixture
async def operator_context(
    installed: Installed, database_url: str, license_keys: tuple[Path, Path], helm_binary: Path
) -> AsyncIterator[OperatorContext]:
    private_key, public_key = license_keys
    settings = load_settings(
        database_url=database_url,
        license_private_key_path=private_key,
        license_public_key_path=public_key,
        instance_chart=str(INSTANCE_CHART),
        helm_binary=str(helm_binary),
        base_domain="rbac.iotistic.example",
        billing_namespace=NAMESPACE,
    )
    ctx = build_context(settings, database_url, kubeconfig=str(installed.operator.kubeconfig))
    try:
        yield ctx
    finally:
        await ctx.engine.dispose()
        ctx.kube.api.close()


async def test_operator_account_provisions_upgrades_and_finalizes_a_customer(
    installed: Installed, operator_context: OperatorContext
) -> None:
    name = unique_name("rbac")
    namespace = f"customer-{name}"
    webhook = {"url": "https://hooks.rbac.example/x", "secretRef": {"name": "hook"}}
    installed.objects.create_cluster_custom_object(
        GROUP, VERSION, PLURAL, customer_manifest(name, plan="starter", notifications={"webhook": webhook})
    )

    # First pass: namespace (server-side apply creates it), licence Secret, helm install, status.
    first = await reconcile(operator_context, name)
    assert first is not None
    assert first.permanent_error is None and first.temporary_error is None, first
    assert first.status.license is not None and first.status.release is not None
    assert first.status.release.revision == 1
    labels = installed.core.read_namespace(namespace).metadata.labels
    assert labels["app.kubernetes.io/managed-by"] == "iotistic-billing-operator"
    secret = installed.core.read_namespaced_secret(LICENSE_SECRET_NAME, namespace)
    assert secret.metadata.owner_references[0].block_owner_deletion is True
    assert helm_release_records(installed, namespace) == ["sh.helm.release.v1.instance.v1"]
    body = installed.objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    assert body["status"]["release"]["revision"] == 1

    # A plan change: a new licence over the existing Secret, helm upgrade to revision 2; the webhook's
    # signing secret, there now, copied.
    signing = "whsec_" + base64.b64encode(b"r" * 32).decode()
    hook = {"metadata": {"name": "hook"}, "data": {"secret": base64.b64encode(signing.encode()).decode()}}
    installed.core.create_namespaced_secret(namespace, hook)
    installed.objects.patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, name, {"spec": {"plan": "professional"}}
    )
    second = await reconcile(operator_context, name)
    assert second is not None and second.temporary_error is None, second
    assert second.status.release is not None and second.status.release.revision == 2
    assert second.status.license is not None and second.status.license.jti != first.status.license.jti

    # A status without the release's Deployments (an earlier operator's): helm reads them from the
    # deployed revision's manifest as this account.
    installed.objects.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, name, {"status": {"release": {"deployments": None}}}
    )
    third = await reconcile(operator_context, name)
    assert third is not None and third.temporary_error is None, third
    assert third.status.release is not None and third.status.release.revision == 2
    assert third.status.release.deployments == second.status.release.deployments
    assert third.status.release.deployments

    # The webhook's Secret deleted: its copy is deleted too, as this account; created again, copied again.
    def copies() -> list[Any]:
        only = f"metadata.name={NOTIFICATIONS_SECRET_NAME}"
        return list(installed.core.list_namespaced_secret(namespace, field_selector=only).items)

    installed.core.delete_namespaced_secret("hook", namespace)
    await reconcile(operator_context, name)
    assert copies() == []
    installed.core.create_namespaced_secret(namespace, hook)
    await reconcile(operator_context, name)
    assert len(copies()) == 1

    # The finalizer's work: helm uninstall, the licence revoked, the webhook's signing secret kept in
    # the billing namespace, the namespace's deletion requested; the same again after a crash.
    body = installed.objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    customer_id = str(body["status"]["customerId"])
    await finalize(operator_context, body)
    assert helm_release_records(installed, namespace) == []
    assert installed.core.read_namespace(namespace).metadata.deletion_timestamp is not None
    await finalize(operator_context, body)
    kept = installed.core.read_namespaced_secret(DELETED_NOTIFICATIONS_SECRET_NAME, NAMESPACE)
    assert base64.b64decode(kept.data[customer_id]).decode() == signing
    # Retried once the namespace's Secrets are gone (the namespace controller's work): the kept copy stays.
    installed.core.delete_collection_namespaced_secret(namespace)
    await finalize(operator_context, body)
    kept = installed.core.read_namespaced_secret(DELETED_NOTIFICATIONS_SECRET_NAME, NAMESPACE)
    assert base64.b64decode(kept.data[customer_id]).decode() == signing
    async with operator_context.sessions() as session:
        actions = (
            await session.scalars(
                select(LicenseHistory.action).where(LicenseHistory.jti == second.status.license.jti)
            )
        ).all()
    assert "revoked" in actions
    installed.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def test_operator_process_runs_end_to_end_as_its_service_account(
    installed: Installed,
    database_url: str,
    license_keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Kopf's own calls too: CRD discovery, peering, the finalizer and annotation patches, Events."""
    private_key, public_key = license_keys
    env = {
        **os.environ,
        "KUBECONFIG": str(installed.operator.kubeconfig),
        "DATABASE_URL": database_url,
        "LICENSE_PRIVATE_KEY_PATH": str(private_key),
        "LICENSE_PUBLIC_KEY_PATH": str(public_key),
        "INSTANCE_CHART": str(INSTANCE_CHART),
        "PATH": f"{REPO_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "BASE_DOMAIN": "rbac.iotistic.example",
        # As deployed: with peering, so that ensure_peering and Kopf's peering run as the account.
        "OPERATOR_PEERING": RELEASE,
    }
    log = tmp_path / "operator.log"
    operator = OperatorProcess(env, log)
    name = unique_name("rbac-kopf")
    namespace = f"customer-{name}"
    operator.start()
    try:
        installed.objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, customer_manifest(name))

        def deployed() -> bool:
            body = installed.objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            release = (body.get("status") or {}).get("release") or {}
            return release.get("revision") == 1 and bool(body["metadata"].get("finalizers"))

        wait_until(deployed, timeout=90, message=f"Customer {name} provisioned; log: {log}")
        installed.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)

        def gone() -> bool:
            try:
                installed.objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            except ApiException as error:
                return error.status == 404
            return False

        wait_until(gone, timeout=90, message=f"Customer {name} finalized; log: {log}")
        assert installed.core.read_namespace(namespace).metadata.deletion_timestamp is not None
        peering = installed.objects.get_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", RELEASE
        )
        # Kopf keeps its own record in the peering object: the account may patch it.
        assert RELEASE in peering["metadata"]["name"] and peering.get("status")
        # The phase transitions' and the deletion's Events, posted by the account (a cluster-scoped
        # object's are in `default`).
        wait_until(
            lambda: (
                {"Terminating", "Deleted"}
                <= {
                    event.reason
                    for event in installed.core.list_namespaced_event(
                        "default", field_selector=f"involvedObject.name={name}"
                    ).items
                }
            ),
            message=f"Events of Customer {name}; log: {log}",
        )
    finally:
        operator.stop()
    text = log.read_text()
    for refusal in ("forbidden", "Not enough permissions", "not posted"):
        assert refusal.lower() not in text.lower(), f"{refusal!r} in the operator's log: {log}"


OPERATOR_ALLOWED = [
    # Kopf: discovery of resources, peering, watches, finalizers and annotations, Events.
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ("create", "clusterkopfpeerings.kopf.dev", None, None),
    ("patch", "clusterkopfpeerings.kopf.dev", None, None),
    ("watch", "customers.iotistic.io", None, None),
    ("patch", "customers.iotistic.io", None, None),
    ("patch", "customers.iotistic.io", None, "status"),
    ("update", "customers.iotistic.io", None, "finalizers"),
    ("create", "events", "default", None),
    ("watch", "secrets", None, None),
    ("watch", "deployments.apps", None, None),
    # Whether the operator Pod a pending helm revision names is gone (operator/release.py).
    ("get", "pods", NAMESPACE, None),
]

OPERATOR_REFUSED = [
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, None),
    ("create", "rolebindings.rbac.authorization.k8s.io", "customer-x", None),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", None, None),
    ("bind", "clusterroles.rbac.authorization.k8s.io", None, None),
    ("impersonate", "users", None, None),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ("delete", "customers.iotistic.io", None, None),
    ("update", "customers.iotistic.io", None, None),
    ("delete", "clusterkopfpeerings.kopf.dev", None, None),
    ("get", "nodes", None, None),
    ("create", "pods", "customer-x", None),
    ("get", "pods", "customer-x", None),
    ("list", "pods", NAMESPACE, None),
    ("delete", "pods", NAMESPACE, None),
    ("create", "pods", "customer-x", "exec"),
    ("create", "serviceaccounts", "customer-x", "token"),
    ("list", "configmaps", None, None),
    ("create", "jobs.batch", "customer-x", None),
    ("*", "*", None, None),
]

WEBHOOK_SERVER_REFUSED = [
    # The Customer CRD alone, by its name (served_crds).
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ("get", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ("delete", "customers.iotistic.io", None, None),
    ("update", "customers.iotistic.io", None, None),
    ("watch", "customers.iotistic.io", None, None),
    ("update", "customers.iotistic.io", None, "status"),
    ("delete", "namespaces", None, None),
    ("create", "namespaces", None, None),
    ("list", "secrets", "customer-x", None),
    ("get", "secrets/other", "customer-x", None),
    ("create", "secrets", "customer-x", None),
    ("get", "secrets/iotistic-billing-database", NAMESPACE, None),
    ("patch", "secrets/iotistic-billing-database", NAMESPACE, None),
    ("get", f"secrets/{DELETED_NOTIFICATIONS_SECRET_NAME}", "customer-x", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, None),
    ("impersonate", "users", None, None),
    ("delete", "events", "default", None),
    ("patch", "events", "default", None),
]


def can_i(
    installed: Installed, identity: Identity, verb: str, resource: str, namespace: str | None, sub: str | None
) -> bool:
    argv = [*installed.kubectl, "auth", "can-i", verb, resource, *identity.impersonation()]
    argv += ["--namespace", namespace] if namespace else ["--all-namespaces"]
    if sub:
        argv += [f"--subresource={sub}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.stdout.strip() in ("yes", "no"), f"{' '.join(argv)}: {result.stdout} {result.stderr}"
    return result.stdout.strip() == "yes"


def check_id(check: tuple[str, str, str | None, str | None]) -> str:
    verb, resource, namespace, sub = check
    return f"{verb} {resource}{'/' + sub if sub else ''}{' -n ' + namespace if namespace else ''}"


@pytest.mark.parametrize("check", OPERATOR_ALLOWED, ids=check_id)
def test_operator_may_do_what_kopf_needs(
    installed: Installed, check: tuple[str, str, str | None, str | None]
) -> None:
    assert can_i(installed, installed.operator, *check)


@pytest.mark.parametrize("check", OPERATOR_REFUSED, ids=check_id)
def test_operator_may_not(installed: Installed, check: tuple[str, str, str | None, str | None]) -> None:
    assert not can_i(installed, installed.operator, *check)


@pytest.mark.parametrize("check", WEBHOOK_SERVER_REFUSED, ids=check_id)
def test_webhook_server_may_not(installed: Installed, check: tuple[str, str, str | None, str | None]) -> None:
    assert not can_i(installed, installed.webhook_server, *check)


# ----- the webhook server -----


async def test_webhook_server_account_makes_every_cluster_call(installed: Installed) -> None:
    """Each call the webhook server makes (k8s.Kube, as app.py builds it, under every field manager it
    writes with), as its account."""
    name = unique_name("rbac-hooks")
    namespace = f"customer-{name}"
    api = KubeApi(
        api_client("webhook-server", kubeconfig=str(installed.webhook_server.kubeconfig)),
        FieldManager.SIGNUP,
        timeout=10,
    )
    kube = Kube(api, concurrency=4)
    try:
        await kube.server_version()
        # Its start's check of the Customer CRD: listed by its name alone.
        check_served_crds(api, (CUSTOMERS_CRD,))
        created = await kube.create_customer(customer_manifest(name, plan="trial"))
        assert created["metadata"]["name"] == name
        assert (await kube.read_customer(name) or {})["spec"]["plan"] == "trial"
        assert name in {item["metadata"]["name"] for item in await kube.list_customers()}

        subscription = {
            "status": "active",
            "plan": "starter",
            "stripeSubscriptionId": "sub_rbac123",
            "currentPeriodEnd": "2030-01-01T00:00:00Z",
            "cancelAtPeriodEnd": False,
            "lastEventCreated": 1700000000,
        }
        applied = await kube.apply_customer_spec(name, {"subscription": subscription}, FieldManager.STRIPE)
        assert applied["spec"]["subscription"]["stripeSubscriptionId"] == "sub_rbac123"
        suspended = await kube.patch_customer(name, {"spec": {"suspended": True}})
        assert suspended["spec"]["suspended"] is True
        version = suspended["metadata"]["resourceVersion"]
        await kube.patch_customer_status(name, {"usage": {"activeDevices": 1}}, version, FieldManager.USAGE)
        written = (await kube.read_customer(name) or {})["metadata"]["managedFields"]
        managers = {entry["manager"] for entry in written}
        assert managers >= {"iotistic-billing-api", "iotistic-webhooks", "iotistic-usage"}, managers

        # The console's: the Customer's Events, and an action told as one.
        await kube.create_event(KIND, suspended, reason="ConsoleSuspend", message="suspended (by the admin)")
        reasons = [event["reason"] for event in await kube.list_customer_events(name)]
        assert "ConsoleSuspend" in reasons

        assert await kube.read_secret_data(namespace, LICENSE_SECRET_NAME) is None  # 404, not 403
        # The notice sender's copy of a customer's signing secret: readable too.
        assert await kube.read_secret_data(namespace, NOTIFICATIONS_SECRET_NAME) is None

        # The console's rollout pages and actions: listed, read before an action, and patched (404: no
        # such rollout, not 403).
        async def rollouts_listed() -> bool:
            try:
                await kube.list_rollouts()
            except KubernetesUnavailable:  # 429 until the watch cache of a CRD nobody read yet is ready
                return False
            return True

        assert await eventually(rollouts_listed, message="InstanceRollouts listed")
        assert await kube.read_rollout("rbac-none") is None  # 404, not 403
        with pytest.raises(ApiException) as missing:
            await kube.patch_rollout("rbac-none", {"spec": {"paused": True}}, FieldManager.CONSOLE)
        assert missing.value.status == 404
        installed.core.create_namespace({"metadata": {"name": namespace}})
        installed.core.create_namespaced_secret(
            namespace,
            {
                "metadata": {"name": LICENSE_SECRET_NAME},
                "data": {"license.jwt": base64.b64encode(b"a.b.c").decode()},
            },
        )
        secret = await kube.read_secret_data(namespace, LICENSE_SECRET_NAME)
        assert secret is not None and secret[0] == {"license.jwt": b"a.b.c"}

        # The notice sender: a deleted Customer's kept signing secret (as the operator keeps it) read,
        # then dropped.
        KubeApi(installed.admin, FieldManager.OPERATOR).merge_secret_data(
            NAMESPACE, DELETED_NOTIFICATIONS_SECRET_NAME, {"cust_rbackept01": b"whsec_x"}
        )
        kept = await kube.read_secret_data(NAMESPACE, DELETED_NOTIFICATIONS_SECRET_NAME)
        assert kept is not None and kept[0]["cust_rbackept01"] == b"whsec_x"
        await kube.merge_secret_data(
            NAMESPACE,
            DELETED_NOTIFICATIONS_SECRET_NAME,
            {"cust_rbackept01": None},
            manager=FieldManager.NOTICES,
        )
        kept = await kube.read_secret_data(NAMESPACE, DELETED_NOTIFICATIONS_SECRET_NAME)
        assert kept is not None and "cust_rbackept01" not in kept[0]
    finally:
        api.close()
        installed.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
