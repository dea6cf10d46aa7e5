"""The customer-instance chart from a real OCI registry (CNCF Distribution): the fleet's version from
INSTANCE_CHART_VERSION, a Customer pinned to another, a version the registry lacks stalls the Customer
until it is pushed and a reconcile is asked for, a registry that is away is retried (also once the
edit that needed it is reverted), and at a restart is not needed by a release that is current."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from iotistic_billing.customer import KIND, RECONCILE_REQUESTED_AT
from iotistic_billing.devenv.registry import ChartRegistry
from tests.conftest import REPO, OperatorProcess, unique_name, wait_until
from tests.integration.test_operator import Cluster, customer_manifest, operator_metric
from tests.integration.test_operator_events import reasons

STALLED = "iotistic_operator_customer_stalled"

pytestmark = pytest.mark.integration

CHART = REPO / "charts" / "customer-instance"


@pytest.fixture
def oci_operator(operator: OperatorProcess, chart_registry: ChartRegistry) -> Iterator[OperatorProcess]:
    """The session operator, on the registry's chart at 0.1.0 for the fleet; back to the directory after."""
    operator.stop()
    operator.start(
        INSTANCE_CHART=chart_registry.reference("customer-instance"),
        INSTANCE_CHART_VERSION="0.1.0",
        INSTANCE_CHART_PLAIN_HTTP="true",
    )
    try:
        yield operator
    finally:
        operator.stop()
        operator.start()


@pytest.fixture
def cluster(
    k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, oci_operator: OperatorProcess
) -> Cluster:
    return Cluster(k8s_client, kubeconfig)


def deployed_chart(cluster: Cluster, name: str) -> str | None:
    """The chart version of the Customer's deployed release, once the operator reported it."""
    body = cluster.customer(name) or {}
    release = (body.get("status") or {}).get("release") or {}
    deployed = (cluster.condition(name, "ReleaseDeployed") or {}).get("status") == "True"
    helm = cluster.release(name) or {}
    if (
        deployed
        and helm.get("status") == "deployed"
        and helm.get("chart") == f"customer-instance-{release.get('chartVersion')}"
    ):
        return str(release["chartVersion"])
    return None


def release_condition(cluster: Cluster, name: str, reason: str) -> dict[str, Any] | None:
    condition = cluster.condition(name, "ReleaseDeployed") or {}
    return condition if condition.get("reason") == reason else None


def test_the_fleet_runs_the_registry_s_version_and_a_pinned_customer_its_own(
    cluster: Cluster, chart_registry: ChartRegistry
) -> None:
    chart_registry.push(CHART, "0.2.0")
    fleet, pinned = unique_name("fleet"), unique_name("pinned")
    cluster.create(customer_manifest(fleet, plan="starter"))
    cluster.create(customer_manifest(pinned, plan="starter", instance={"chartVersion": "0.2.0"}))
    assert wait_until(lambda: deployed_chart(cluster, fleet), timeout=90, message="fleet deployed") == "0.1.0"
    assert (
        wait_until(lambda: deployed_chart(cluster, pinned), timeout=90, message="pinned deployed") == "0.2.0"
    )


def test_a_version_the_registry_lacks_stalls_until_it_is_pushed_and_a_reconcile_is_asked(
    cluster: Cluster, chart_registry: ChartRegistry, oci_operator: OperatorProcess
) -> None:
    name = unique_name("ahead")
    version = "0.3." + datetime.now(UTC).strftime("%H%M%S%f")  # a version no other test pushed
    cluster.create(customer_manifest(name, plan="starter", instance={"chartVersion": version}))
    stalled = wait_until(
        lambda: release_condition(cluster, name, "ChartVersionUnavailable"), timeout=60, message="stalled"
    )
    reference = chart_registry.reference("customer-instance")
    assert stalled["status"] == "False"
    assert stalled["message"] == f"spec.instance.chartVersion is {version}, which {reference} does not have"
    assert (cluster.condition(name, "Stalled") or {}).get("status") == "True"
    series = f'customer="{name}",reason="ChartVersionUnavailable"'
    # What IotisticCustomersStalled counts; set just after the status write.
    wait_until(lambda: operator_metric(oci_operator, STALLED, series) == 1, timeout=10, message="exported")

    chart_registry.push(CHART, version)
    request_reconcile(cluster, name)
    assert wait_until(lambda: deployed_chart(cluster, name), timeout=90, message="deployed") == version
    assert (cluster.condition(name, "Stalled") or {}).get("status") == "False"
    wait_until(lambda: operator_metric(oci_operator, STALLED, series) == 0, timeout=10, message="dropped")


def test_a_registry_that_is_away_is_retried_not_stalled(
    cluster: Cluster, chart_registry: ChartRegistry
) -> None:
    name = unique_name("patient")
    version = "0.4." + datetime.now(UTC).strftime("%H%M%S%f")
    chart_registry.push(CHART, version)
    chart_registry.stop()
    try:
        cluster.create(customer_manifest(name, plan="starter", instance={"chartVersion": version}))
        failed = wait_until(
            lambda: release_condition(cluster, name, "ChartPullFailed"), timeout=60, message="pull failed"
        )
        assert failed["status"] == "False" and "connection refused" in failed["message"]
        assert (cluster.condition(name, "Stalled") or {}).get("status") == "False"
    finally:
        chart_registry.start()
    assert wait_until(lambda: deployed_chart(cluster, name), timeout=120, message="deployed") == version


def test_an_edit_reverted_while_its_failed_pass_waits_for_a_retry_leaves_the_customer_ready(
    cluster: Cluster, chart_registry: ChartRegistry
) -> None:
    """Found in review: the retry of a pass that failed temporarily was Kopf's, bound to the spec change it
    handled; an edit reverted meanwhile left Kopf no change to handle (no diff against the spec it last
    handled) and it dropped the retry: the Customer said Degraded, ChartPullFailed, until a renewal, a
    restart or a Reconcile now, while its spec asked for the release it runs. The registry stays away:
    the reverted spec's release is current and needs no chart."""
    name = unique_name("revert")
    uid = cluster.create(customer_manifest(name, plan="starter"))["metadata"]["uid"]
    assert wait_until(lambda: deployed_chart(cluster, name), timeout=90, message="deployed") == "0.1.0"
    assert cluster.make_deployments_available(name) >= 5
    ready = wait_until(lambda: ready_condition(cluster, name, "True"), message="Ready")
    revision = (cluster.release(name) or {}).get("revision")

    version = "0.5." + datetime.now(UTC).strftime("%H%M%S%f")
    chart_registry.push(CHART, version)
    chart_registry.stop()
    try:
        cluster.patch_spec(name, {"instance": {"chartVersion": version}})
        failed = wait_until(
            lambda: ready_condition(cluster, name, "False"), timeout=60, message="pull failed"
        )
        assert failed["reason"] == "ChartPullFailed" and "connection refused" in failed["message"], failed
        assert (cluster.customer(name) or {})["status"]["phase"] == "Degraded"

        cluster.patch_spec(name, {"instance": {"chartVersion": None}})
        again = wait_until(lambda: ready_condition(cluster, name, "True"), timeout=60, message="Ready again")
        assert (again["reason"], again["message"]) == (ready["reason"], ready["message"])
        assert (cluster.customer(name) or {})["status"]["phase"] == "Ready"
        assert (cluster.condition(name, "ReleaseDeployed") or {}).get("status") == "True"
        assert (cluster.release(name) or {}).get("revision") == revision  # nothing installed again
        # What `kubectl describe` lists: the failure once when it started, then the way back.
        events = reasons(cluster, KIND, name, uid)
        assert (events["ChartPullFailed"], events["Degraded"], events["Ready"]) == (1, 1, 2), events
    finally:
        chart_registry.start()


def ready_condition(cluster: Cluster, name: str, status: str) -> dict[str, Any] | None:
    condition = cluster.condition(name, "Ready") or {}
    return condition if condition.get("status") == status else None


def request_reconcile(cluster: Cluster, name: str) -> str:
    """Reconcile now (the console's annotation); the stamp the pass that answers it reports."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cluster.objects.patch_cluster_custom_object(
        "iotistic.io",
        "v1alpha1",
        "customers",
        name,
        {"metadata": {"annotations": {RECONCILE_REQUESTED_AT: stamp}}},
    )
    return stamp


def test_a_registry_away_at_a_restart_leaves_a_current_release_deployed(
    cluster: Cluster, chart_registry: ChartRegistry, oci_operator: OperatorProcess
) -> None:
    """Found in review: each start pulls into an empty cache, and the release step pulled before it
    looked at helm's deployed revision, so a registry away then failed every Customer's pass."""
    name = unique_name("steady")
    cluster.create(customer_manifest(name, plan="starter"))
    assert wait_until(lambda: deployed_chart(cluster, name), timeout=90, message="deployed") == "0.1.0"
    revision = (cluster.release(name) or {}).get("revision")

    oci_operator.stop()
    chart_registry.stop()
    try:
        oci_operator.start(
            INSTANCE_CHART=chart_registry.reference("customer-instance"),
            INSTANCE_CHART_VERSION="0.1.0",
            INSTANCE_CHART_PLAIN_HTTP="true",
        )
        stamp = request_reconcile(cluster, name)
        answered = wait_until(
            lambda: (
                ((cluster.customer(name) or {}).get("status") or {}).get("lastHandledReconcileAt") == stamp
            ),
            timeout=60,
            message="the pass after the restart",
        )
        assert answered
        deployed = cluster.condition(name, "ReleaseDeployed") or {}
        assert deployed.get("status") == "True", deployed
        assert (cluster.release(name) or {}).get("revision") == revision  # nothing installed again
    finally:
        chart_registry.start()


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartRegistry]:
    """A registry that asks for credentials (htpasswd), with the chart pushed as its user."""
    registry = ChartRegistry(
        tmp_path_factory.mktemp("private-registry"), credentials=("fleet", "s3cret-pw")
    ).start()
    try:
        registry.push(CHART, "0.1.0")
        yield registry
    finally:
        registry.stop()


def test_a_private_registry_is_pulled_from_with_the_credentials_of_its_docker_config(
    operator: OperatorProcess,
    private_registry: ChartRegistry,
    k8s_client: kubernetes.client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
) -> None:
    cluster = Cluster(k8s_client, kubeconfig)
    reference = private_registry.reference("customer-instance")
    assert private_registry.config is not None
    operator.stop()
    try:
        # Without the credentials: refused by the registry, retried (not stalled).
        operator.start(
            INSTANCE_CHART=reference, INSTANCE_CHART_VERSION="0.1.0", INSTANCE_CHART_PLAIN_HTTP="true"
        )
        name = unique_name("locked")
        cluster.create(customer_manifest(name, plan="starter"))
        failed = wait_until(
            lambda: release_condition(cluster, name, "ChartPullFailed"), timeout=60, message="pull refused"
        )
        assert "credential" in failed["message"].lower(), failed
        assert (cluster.condition(name, "Stalled") or {}).get("status") == "False"
        operator.stop()
        # With the Docker config a kubernetes.io/dockerconfigjson Secret holds, mounted as the chart does.
        operator.start(
            INSTANCE_CHART=reference,
            INSTANCE_CHART_VERSION="0.1.0",
            INSTANCE_CHART_PLAIN_HTTP="true",
            INSTANCE_CHART_REGISTRY_CONFIG=str(private_registry.config),
        )
        assert wait_until(lambda: deployed_chart(cluster, name), timeout=120, message="deployed") == "0.1.0"
        # The password is nowhere in what the Customer shows.
        assert "s3cret-pw" not in str(cluster.customer(name))
    finally:
        operator.stop()
        operator.start()
