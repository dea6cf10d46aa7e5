"""Two operators in one Kopf peering: the one of lower priority is paused and changes nothing, though
its own watches see the instance Deployments and the licence Secret as the active one's do."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from tests.conftest import OperatorProcess, unique_name, wait_until
from tests.integration.test_operator import (
    Cluster,
    _license_or_none,
    customer_manifest,
    operator_metric_total,
)

pytestmark = pytest.mark.integration
# What a pass does, as each operator counts it on its /metrics.
WORK = (
    "iotistic_operator_reconciles_total",
    "iotistic_operator_helm_operations_total",
    "iotistic_operator_licenses_minted_total",
)


@pytest.fixture
def peers(
    operator: OperatorProcess,
    operator_env: dict[str, str],
    k8s_client: kubernetes.client.ApiClient,
    tmp_path: Path,
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """The session operator (standalone) stopped, and in its place an operator of priority 100 and one
    of priority 0 in a peering of their own; afterwards the session operator runs again."""
    operator.kill()
    peering = unique_name("peering")
    active, paused = (
        OperatorProcess(operator_env, tmp_path / f"{role}.log") for role in ("active", "paused")
    )
    try:
        active.start(OPERATOR_PEERING=peering, OPERATOR_PRIORITY="100")
        # Started second, it finds a peer of higher priority before Kopf lets it handle anything.
        paused.start(OPERATOR_PEERING=peering, OPERATOR_PRIORITY="0")
        yield active, paused
    finally:
        paused.kill()
        active.kill()
        kubernetes.client.CustomObjectsApi(k8s_client).delete_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", peering
        )
        operator.start(**operator.overrides)


def work(operator: OperatorProcess) -> dict[str, float]:
    return {metric: operator_metric_total(operator, metric) for metric in WORK}


def test_an_operator_paused_by_its_peering_leaves_every_pass_to_the_active_one(
    k8s_client: kubernetes.client.ApiClient,
    kubeconfig: Path,
    peers: tuple[OperatorProcess, OperatorProcess],
) -> None:
    """Found in review: the paused operator's Deployment and Secret watches ran passes of their own, so
    a deleted licence Secret was minted twice and helm ran from both processes."""
    cluster = Cluster(k8s_client, kubeconfig)
    active, paused = peers
    name = unique_name("peering")
    cluster.create(customer_manifest(name, plan="starter"))
    wait_until(lambda: (cluster.release(name) or {}).get("status") == "deployed", 60, "deployed")
    assert cluster.make_deployments_available(name)
    wait_until(lambda: (cluster.condition(name, "Ready") or {}).get("status") == "True", 60, "Ready")
    first = cluster.license(name)[0]["jti"]
    cluster.core.delete_namespaced_secret("iotistic-license", f"customer-{name}")
    wait_until(lambda: (_license_or_none(cluster, name) or {}).get("jti", first) != first, 60, "licence back")

    assert all(work(active).values())
    assert work(paused) == dict.fromkeys(WORK, 0.0)
    # Its passes would have started 0.2 s after each event, long before the active one restored the
    # licence; a while longer rules out a slow one.
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: any(work(paused).values()), 3, "the paused operator made a pass")
