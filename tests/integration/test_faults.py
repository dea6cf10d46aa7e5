"""Faults the operator must ride out (the webhook and usage outages have their own tests): kube-apiserver
restarted under it, and a helm that fails once. Each case converges with no duplicate history row."""

from __future__ import annotations

import shutil
from pathlib import Path

import kubernetes
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.devenv.controlplane import ControlPlane
from tests.conftest import OperatorProcess, eventually, unique_name, wait_until
from tests.integration.test_operator import Cluster, customer_manifest, history

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, operator: OperatorProcess) -> Cluster:
    return Cluster(k8s_client, kubeconfig)


async def test_kube_apiserver_restart_under_the_operator(
    cluster: Cluster, control_plane: ControlPlane, operator: OperatorProcess, db_engine: AsyncEngine
) -> None:
    before = unique_name("before")
    cluster.create(customer_manifest(before, customerId=f"cust_{before.replace('-', '')}", plan="starter"))
    # Deployed, not just revision 1: a first install still pending when the API server goes away is
    # rolled back onto itself by the operator, so its revision moves on.
    wait_until(
        lambda: (cluster.release(before) or {}).get("status") == "deployed", message="first Customer deployed"
    )

    control_plane.restart_apiserver()
    assert operator.process is not None and operator.process.poll() is None, "the operator died"

    # Work that arrives after the restart: a new Customer and a change to the old one.
    after = unique_name("after")
    cluster.create(customer_manifest(after, customerId=f"cust_{after.replace('-', '')}", plan="starter"))
    cluster.patch_spec(before, {"plan": "professional"})
    wait_until(
        lambda: (cluster.release(after) or {}).get("revision") == "1", timeout=90, message="new Customer"
    )
    # A pass cut off by the restart may deploy the same values once more, so the revision number does not
    # say the change arrived; the deployed values do.
    wait_until(
        lambda: (
            cluster.release(before) is not None
            and cluster.helm("get", "values", "instance", "-n", f"customer-{before}").get("plan")
            == "professional"
        ),
        timeout=90,
        message="plan change deployed",
    )
    rows = await history(db_engine, f"cust_{before.replace('-', '')}")
    assert [action for action, _, _ in rows] == ["generated", "upgraded"]
    assert [action for action, _, _ in await history(db_engine, f"cust_{after.replace('-', '')}")] == [
        "generated"
    ]


async def test_a_helm_that_fails_once_is_retried_and_converges(
    cluster: Cluster, operator: OperatorProcess, db_engine: AsyncEngine, helm_binary: Path, tmp_path: Path
) -> None:
    flaky = tmp_path / "helm"
    marker = tmp_path / "failed-once"
    flaky.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = upgrade ] && [ ! -e {marker} ]; then\n'
        f"  touch {marker}\n"
        '  echo "Error: Kubernetes cluster unreachable: connection refused" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec {shutil.which(str(helm_binary)) or helm_binary} "$@"\n'
    )
    flaky.chmod(0o755)
    try:
        operator.stop()
        operator.start(HELM_BINARY=str(flaky))
        name = unique_name("flaky")
        customer_id = f"cust_{name.replace('-', '')}"
        cluster.create(customer_manifest(name, customerId=customer_id, plan="starter"))
        wait_until(
            lambda: (cluster.release(name) or {}).get("status") == "deployed", timeout=90, message="deployed"
        )
        assert marker.exists(), "the flaky helm was never called"
        rows = await eventually(lambda: history(db_engine, customer_id), message="history")
        assert [action for action, _, _ in rows] == ["generated"]
        # helm marks the release deployed before the operator's pass writes the condition
        wait_until(
            lambda: (cluster.condition(name, "ReleaseDeployed") or {}).get("status") == "True",
            timeout=30,
            message="ReleaseDeployed True",
        )
    finally:
        operator.stop()
        operator.start()
