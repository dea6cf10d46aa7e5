"""What `kubectl describe` shows of the cluster-scoped Customers and InstanceRollouts: their Events, each
once, and a Customer being deleted as Terminating while a step of its finalizer fails and is retried."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import kubernetes
import pytest

from iotistic_billing.customer import GROUP, KIND, PLURAL, RECONCILE_REQUESTED_AT, VERSION
from iotistic_billing.devenv.controlplane import find_binary
from iotistic_billing.k8s import FieldManager, KubeApi
from iotistic_billing.rollout import ROLLOUT_KIND, ROLLOUT_PLURAL
from tests.conftest import REPO, OperatorProcess, unique_name, wait_until
from tests.integration.test_helm import remove_kind, widget, widget_kind
from tests.integration.test_operator import Cluster, customer_manifest, kopf_logged, logged_since
from tests.integration.test_operator_recovery import (  # noqa: F401 - fixtures
    cluster_fixture,
    paused_operator_fixture,
)

pytestmark = pytest.mark.integration


def described(cluster: Cluster, kind: str, name: str, uid: str) -> list[Any]:
    """The Events `kubectl describe` lists for a cluster-scoped object: from every namespace, those whose
    involvedObject has its kind, name and uid and an empty namespace (kubectl's describe.searchEvents)."""
    selector = (
        f"involvedObject.name={name},involvedObject.namespace=,"
        f"involvedObject.kind={kind},involvedObject.uid={uid}"
    )
    items: list[Any] = cluster.core.list_event_for_all_namespaces(field_selector=selector).items
    return items


def reasons(cluster: Cluster, kind: str, name: str, uid: str) -> Counter[str]:
    return Counter(event.reason for event in described(cluster, kind, name, uid))


def describe(cluster: Cluster, kubectl_binary: Path, resource: str, name: str) -> str:
    """The Events section of `kubectl describe`."""
    out = subprocess.run(
        [str(kubectl_binary), "--kubeconfig", str(cluster.kubeconfig), "describe", resource, name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return out.split("\nEvents:", 1)[1]


def test_a_failing_customers_events_are_listed_by_kubectl_describe_once_each(
    cluster: Cluster, operator: OperatorProcess, kubectl_binary: Path
) -> None:
    """Found in review: Kopf posted ReconcileFailed (and every handler's Event) with involvedObject.namespace
    `default`, and `kubectl describe customer` said `Events: <none>`."""
    name = unique_name("described")
    namespace = f"customer-{name}"
    cluster.core.create_namespace({"metadata": {"name": namespace}})  # someone else's: the Customer stalls
    uid = cluster.create(customer_manifest(name, plan="starter"))["metadata"]["uid"]
    try:
        assert cluster.stalled(name)["reason"] == "NamespaceTaken"
        wait_until(
            lambda: reasons(cluster, KIND, name, uid)["ReconcileFailed"],
            message="ReconcileFailed listed as kubectl describe lists Events",
        )
        # A pass asked for now runs after the creation's handlers have returned (Kopf runs one object's
        # handlers one at a time), so a second copy of their Events is posted by the time its handler
        # has returned; it finds the same stall and posts nothing.
        logged_from = operator.log.stat().st_size
        cluster.objects.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, name, {"metadata": {"annotations": {RECONCILE_REQUESTED_AT: "once"}}}
        )
        wait_until(
            lambda: kopf_logged(logged_since(operator, logged_from), name, "Handler 'reconcile_requested"),
            message=f"the asked-for pass's handler returned; log: {operator.log}",
        )
        assert cluster.customer(name)["status"]["lastHandledReconcileAt"] == "once"  # type: ignore[index]
        assert reasons(cluster, KIND, name, uid) == Counter({"Failed": 1, "ReconcileFailed": 1})
        section = describe(cluster, kubectl_binary, "customer", name)
        assert "ReconcileFailed" in section and f"metadata.name: namespace {namespace} exists" in section
    finally:
        cluster.objects.delete_cluster_custom_object(GROUP, VERSION, "customers", name)
        wait_until(lambda: cluster.customer(name) is None, message="Customer deleted")
        cluster.core.delete_namespace(namespace)


def test_a_rollouts_events_are_listed_by_kubectl_describe_once_each(
    cluster: Cluster, kubectl_binary: Path
) -> None:
    """The rollout daemon's Events went through Kopf too, with involvedObject.namespace `default`."""
    name = unique_name("described")
    rollout = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": ROLLOUT_KIND,
        "metadata": {"name": name},
        "spec": {"chartVersion": "9.9.9", "steps": [{"rest": True}]},
    }
    created = cluster.objects.create_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, rollout)
    uid = created["metadata"]["uid"]
    try:
        # The session's chart is a directory: the rollout stalls RolloutsDisabled, one Warning.
        wait_until(
            lambda: reasons(cluster, ROLLOUT_KIND, name, uid)["RolloutsDisabled"],
            message="RolloutsDisabled listed as kubectl describe lists Events",
        )

        # A tick writes the status (its observedGeneration) before it posts its Events: seen to observe a
        # first edit, that tick may still be posting. A second edit's generation is observed by a later
        # tick, which starts once that one has posted everything (a second copy among it, if any).
        def observed() -> Any:
            found = cast(
                dict[str, Any],
                cluster.objects.get_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, name),
            )
            return found.get("status", {}).get("observedGeneration")

        for bake in (1, 2):
            edited = cast(
                dict[str, Any],
                cluster.objects.patch_cluster_custom_object(
                    GROUP,
                    VERSION,
                    ROLLOUT_PLURAL,
                    name,
                    {"spec": {"steps": [{"rest": True, "bakeSeconds": bake}]}},
                ),
            )
            generation = edited["metadata"]["generation"]
            wait_until(
                lambda generation=generation: observed() == generation,
                message=f"generation {generation} observed by a later tick",
            )
        assert reasons(cluster, ROLLOUT_KIND, name, uid) == Counter({"RolloutsDisabled": 1})
        assert "RolloutsDisabled" in describe(cluster, kubectl_binary, "instancerollout", name)
    finally:
        cluster.objects.delete_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, name)


def test_the_console_reads_a_customers_newest_events_however_many_there_are(
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """Found in review: the console asked for 100 Events and sorted them newest first, but the API server
    lists Events in the order of their names (random), so past 100 the newest could be left out."""
    name = unique_name("chatty")
    core = kubernetes.client.CoreV1Api(k8s_client)
    old = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for index in range(100):  # older, and named to be listed first
        core.create_namespaced_event(
            "default",
            {
                "metadata": {"name": f"a-{name}-{index:03}"},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name},
                "reason": f"Old{index:03}",
                "message": "an older Event",
                "type": "Normal",
                "firstTimestamp": old,
                "lastTimestamp": old,
            },
        )
    api = KubeApi(k8s_client, FieldManager.CLI)
    api.create_event(KIND, {"metadata": {"name": name, "uid": "uid-chatty"}}, reason="Newest", message="now")

    listed = api.list_customer_events(name)
    assert len(listed) == 100
    assert listed[0]["reason"] == "Newest"
    assert {event["reason"] for event in listed[1:]} < {f"Old{index:03}" for index in range(100)}


def failing_uninstall_helm(folder: Path, flag: Path) -> Path:
    """helm, whose `uninstall` fails while `flag` exists (an API server refusing helm, for one)."""
    helm = folder / "helm"
    helm.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = uninstall ] && [ -e {flag} ]; then\n'
        '  echo "Error: uninstall: Kubernetes cluster unreachable (test)" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec {find_binary("helm")} "$@"\n'
    )
    helm.chmod(0o755)
    return helm


def test_a_customer_whose_finalizer_fails_is_terminating_not_ready_until_it_is_deleted(
    cluster: Cluster, paused_operator: OperatorProcess, tmp_path: Path
) -> None:
    """Found in review: while a step of the finalizer failed and was retried, `kubectl get cust` said
    Ready (Ready=True) with the release already gone, nothing said why it waited, and the Deleted Event
    was never posted."""
    flag = tmp_path / "uninstall-fails"
    paused_operator.stop()
    paused_operator.start(HELM_BINARY=str(failing_uninstall_helm(tmp_path, flag)))
    name = unique_name("leaving")
    uid = cluster.create(customer_manifest(name, plan="starter"))["metadata"]["uid"]
    wait_until(
        lambda: (cluster.customer(name) or {}).get("status", {}).get("release"),
        60,
        message="release in status",
    )
    cluster.make_deployments_available(name)
    wait_until(
        lambda: (cluster.condition(name, "Ready") or {}).get("status") == "True",
        message=f"Ready; log: {paused_operator.log}",
    )

    flag.touch()
    cluster.objects.delete_cluster_custom_object(GROUP, VERSION, "customers", name)
    wait_until(
        lambda: (cluster.customer(name) or {}).get("status", {}).get("phase") == "Terminating",
        message="phase Terminating",
    )
    ready = cluster.condition(name, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "Terminating")
    assert (cluster.condition(name, "Reconciling") or {}).get("status") == "True"
    wait_until(lambda: reasons(cluster, KIND, name, uid)["DeletionFailed"], message="DeletionFailed Event")
    assert cluster.customer(name) is not None  # the finalizer holds it while the step fails
    [failed, *_] = [e for e in described(cluster, KIND, name, uid) if e.reason == "DeletionFailed"]
    assert failed.type == "Warning"
    assert failed.message.startswith(f"uninstalling release instance from customer-{name} failed:")
    assert "Kubernetes cluster unreachable (test)" in failed.message

    flag.unlink()  # the next retry, after the passes' backoff, completes the deletion

    wait_until(lambda: cluster.customer(name) is None, 60, message="Customer deleted once uninstall works")
    assert cluster.release(name) is None
    done = reasons(cluster, KIND, name, uid)
    assert done["Terminating"] == 1 and done["Deleted"] == 1, done


def test_a_customer_whose_release_holds_an_object_of_a_kind_removed_since_is_deleted(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    k8s_client: kubernetes.client.ApiClient,
    tmp_path: Path,
) -> None:
    """Found in review: the instance chart's release held a ServiceMonitor, and its CRD was removed since:
    helm cannot build the release's objects, its uninstall failed every try, and the finalizer was retried
    for ever, the licence never revoked nor the namespace deleted. The namespace's deletion removes the
    release (its objects and helm's record of it), so the deletion completes, saying so."""
    api_version = widget_kind(k8s_client)
    chart = tmp_path / "customer-instance"
    shutil.copytree(REPO / "charts" / "customer-instance", chart)
    (chart / "templates" / "widget.yaml").write_text(widget(api_version))
    cache = tmp_path / "kube-cache"
    paused_operator.stop()
    paused_operator.start(INSTANCE_CHART=str(chart), KUBECACHEDIR=str(cache))
    name = unique_name("unbuildable")
    uid = cluster.create(customer_manifest(name, plan="starter"))["metadata"]["uid"]
    wait_until(lambda: (cluster.release(name) or {}).get("status") == "deployed", message="deployed")
    wait_until(lambda: (cluster.customer(name) or {}).get("status", {}).get("license"), message="licence")

    remove_kind(k8s_client, api_version)
    shutil.rmtree(cache)  # helm's discovery cache without the kind: a restarted operator's, or one expired
    cluster.objects.delete_cluster_custom_object(GROUP, VERSION, "customers", name)

    wait_until(
        lambda: cluster.customer(name) is None, 60, message=f"Customer deleted; log: {paused_operator.log}"
    )
    namespace = cluster.core.read_namespace(f"customer-{name}")  # no controller-manager: it stays Terminating
    assert namespace.metadata.deletion_timestamp is not None
    events = {event.reason: event for event in described(cluster, KIND, name, uid)}
    assert "DeletionFailed" not in events
    left = events["UninstallFailed"]
    assert left.type == "Warning"
    assert f'no matches for kind "Widget" in version "{api_version}"' in left.message
    assert left.message.startswith(f"left to the deletion of namespace customer-{name}: ")
    assert events["Deleted"].message == (
        "release left to the namespace's deletion (helm could not uninstall it), licence revoked,"
        " namespace deletion requested"
    )
