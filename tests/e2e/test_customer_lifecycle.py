"""A Customer's life on a cluster where workloads really run: nothing here patches a status by hand.

Its Deployments roll out on the cluster's nodes before it turns Ready, a plan change rolls them out
again, and deleting it leaves no namespace behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.k8s import FieldManager, KubeApi
from tests.conftest import OperatorProcess, unique_name, wait_until

pytestmark = pytest.mark.e2e

# Scheduling, kwok's stages and the rollouts take seconds on the simulated cluster; a real one pulls
# images first.
ROLLOUT_TIMEOUT = float(os.environ.get("E2E_TIMEOUT", "180"))
RELEASE = "app.kubernetes.io/instance=instance"


def customer_manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Customer",
        "metadata": {"name": name},
        "spec": {
            "customerId": f"cust_{name.replace('-', '')}",
            "email": f"ops@{name}.example.com",
            "companyName": f"{name.title()} Corp",
            **spec,
        },
    }


class Cluster:
    def __init__(
        self, client: kubernetes.client.ApiClient, kubeconfig: Path, operator: OperatorProcess
    ) -> None:
        self.objects = kubernetes.client.CustomObjectsApi(client)
        self.kube = KubeApi(client, FieldManager.CLI)
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.kubeconfig = kubeconfig
        self.operator_log = operator.log
        self.created: list[str] = []

    def create(self, body: dict[str, Any]) -> None:
        self.objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        self.created.append(body["metadata"]["name"])

    def delete_created(self) -> None:
        """Delete what the tests made while the operator still runs to take its finalizer off."""
        for name in self.created:
            try:
                self.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            except ApiException as error:
                if error.status != 404:
                    raise
        wait_until(
            lambda: all(self.customer(name) is None for name in self.created),
            timeout=ROLLOUT_TIMEOUT,
            message="the suite's Customers deleted",
        )

    def customer(self, name: str) -> dict[str, Any] | None:
        return self.kube.read_customer(name)

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        status = (self.customer(name) or {}).get("status", {})
        return next((c for c in status.get("conditions", []) if c["type"] == type_), {})

    def ready(self, name: str, revision: int) -> dict[str, Any] | None:
        """The Customer once the operator has judged the given release revision Ready."""
        body = self.customer(name) or {}
        status = body.get("status", {})
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        done = (
            ready.get("status") == "True"
            and status.get("release", {}).get("revision") == revision
            and status.get("observedGeneration") == body["metadata"]["generation"]
        )
        return body if done else None

    def namespace_exists(self, namespace: str) -> bool:
        try:
            self.core.read_namespace(namespace)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def rolled_out(self, namespace: str) -> list[Any]:
        """The release's Deployments once each has fully rolled out its current generation.

        `kubectl rollout status`'s test: the controller saw the generation, every replica is updated and
        available, and no replica of an older ReplicaSet is left.
        """
        deployments = self.apps.list_namespaced_deployment(namespace, label_selector=RELEASE).items
        for deployment in deployments:
            wanted = deployment.spec.replicas
            status = deployment.status
            if not (
                (status.observed_generation or 0) >= deployment.metadata.generation
                and status.updated_replicas == wanted
                and status.available_replicas == wanted
                and status.replicas == wanted
            ):
                return []
        return deployments

    def pods(self, namespace: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace, label_selector=RELEASE).items)

    def node_names(self) -> set[str]:
        return {node.metadata.name for node in self.core.list_node().items}

    def helm_revision(self, name: str) -> str | None:
        out = subprocess.run(
            ["helm", "--kubeconfig", str(self.kubeconfig), "list", "-n", f"customer-{name}", "-o", "json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        releases = json.loads(out)
        return str(releases[0]["revision"]) if releases else None


@pytest.fixture(scope="module")
def cluster(
    k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, operator: OperatorProcess
) -> Iterator[Cluster]:
    cluster = Cluster(k8s_client, kubeconfig, operator)
    yield cluster
    # An existing cluster (E2E_KUBECONFIG) outlives the suite: leave no Customers behind on it.
    cluster.delete_created()


def running_on_nodes(cluster: Cluster, namespace: str) -> list[Any]:
    """Pods of the release's Deployments, each bound by the scheduler to a node of the cluster and Ready."""
    nodes = cluster.node_names()
    pods = [
        pod
        for pod in cluster.pods(namespace)
        if pod.metadata.owner_references
        and pod.metadata.owner_references[0].kind == "ReplicaSet"
        and pod.metadata.deletion_timestamp is None
    ]
    for pod in pods:
        assert pod.spec.node_name in nodes, f"{pod.metadata.name} on {pod.spec.node_name!r}, nodes {nodes}"
        assert pod.status.phase == "Running", f"{pod.metadata.name} is {pod.status.phase}"
        assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
    return pods


def test_customer_turns_ready_once_its_deployments_roll_out_on_the_nodes(cluster: Cluster) -> None:
    name = unique_name("acme")
    namespace = f"customer-{name}"
    cluster.create(customer_manifest(name, plan="starter"))

    body = wait_until(
        lambda: cluster.ready(name, revision=1),
        timeout=ROLLOUT_TIMEOUT,
        message=f"Customer Ready at revision 1; operator log {cluster.operator_log}",
    )
    assert body["status"]["phase"] == "Ready"
    ready = cluster.condition(name, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "DeploymentsAvailable"

    deployments = cluster.rolled_out(namespace)
    assert len(deployments) >= 5, [
        d.metadata.name for d in cluster.apps.list_namespaced_deployment(namespace).items
    ]
    # The deployment controller made a ReplicaSet per Deployment, whose Pods run on the nodes.
    replica_sets = cluster.apps.list_namespaced_replica_set(namespace, label_selector=RELEASE).items
    owners = {rs.metadata.owner_references[0].name for rs in replica_sets}
    assert owners == {d.metadata.name for d in deployments}
    pods = running_on_nodes(cluster, namespace)
    assert len(pods) == sum(d.spec.replicas for d in deployments)


def test_deleting_a_customer_removes_its_namespace_for_good(cluster: Cluster) -> None:
    name = unique_name("hooli")
    namespace = f"customer-{name}"
    cluster.create(customer_manifest(name, plan="starter"))
    wait_until(
        lambda: cluster.ready(name, revision=1),
        timeout=ROLLOUT_TIMEOUT,
        message=f"Customer Ready; operator log {cluster.operator_log}",
    )
    assert cluster.pods(namespace), "running Pods to clean up"

    cluster.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    wait_until(lambda: cluster.customer(name) is None, timeout=ROLLOUT_TIMEOUT, message="Customer gone")
    # The namespace controller empties it (Pods stopped by the node agent, dependents collected by the
    # garbage collector) and then removes the namespace object itself.
    wait_until(
        lambda: not cluster.namespace_exists(namespace),
        timeout=ROLLOUT_TIMEOUT,
        message=f"namespace {namespace} deleted",
    )
    leftovers = cluster.core.list_pod_for_all_namespaces(field_selector=f"metadata.namespace={namespace}")
    assert leftovers.items == []


def test_plan_change_rolls_out_revision_2(cluster: Cluster) -> None:
    name = unique_name("initech")
    namespace = f"customer-{name}"
    cluster.create(customer_manifest(name, plan="starter"))
    wait_until(
        lambda: cluster.ready(name, revision=1),
        timeout=ROLLOUT_TIMEOUT,
        message=f"Customer Ready at revision 1; operator log {cluster.operator_log}",
    )
    before = {d.metadata.name: d.metadata.generation for d in cluster.rolled_out(namespace)}
    first_pods = {pod.metadata.name for pod in running_on_nodes(cluster, namespace)}
    assert first_pods, "revision 1 runs no Pod: the wait for them to go would pass at once"

    cluster.objects.patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, name, {"spec": {"plan": "professional"}}
    )
    body = wait_until(
        lambda: cluster.ready(name, revision=2),
        timeout=ROLLOUT_TIMEOUT,
        message=f"Customer Ready at revision 2; operator log {cluster.operator_log}",
    )
    assert body["status"]["phase"] == "Ready" and body["status"]["plan"] == "professional"
    assert cluster.helm_revision(name) == "2"

    deployments = wait_until(
        lambda: cluster.rolled_out(namespace), timeout=ROLLOUT_TIMEOUT, message="Deployments rolled out again"
    )
    after = {d.metadata.name: d.metadata.generation for d in deployments}
    assert after.keys() == before.keys()
    assert all(after[name] > before[name] for name in before), (before, after)
    # New Pods with the professional plan's medium preset replaced the old ones.
    wait_until(
        lambda: not first_pods & {pod.metadata.name for pod in cluster.pods(namespace)},
        timeout=ROLLOUT_TIMEOUT,
        message="the Pods of revision 1 gone",
    )
    pods = running_on_nodes(cluster, namespace)
    assert len(pods) == sum(d.spec.replicas for d in deployments)
    api = [pod for pod in pods if pod.metadata.labels.get("app.kubernetes.io/component") == "api"]
    assert api and all(pod.spec.containers[0].resources.requests["cpu"] == "250m" for pod in api)
