"""The end-to-end suite's parts: a cluster where workloads really roll out, PostgreSQL, the operator.

The cluster is a simulated full one (kube-apiserver, kube-controller-manager, kube-scheduler and kwok's
fake nodes, see iotistic_billing.devenv.simulated), or, when E2E_KUBECONFIG names a kubeconfig, that
existing cluster (`make e2e-kind`). PostgreSQL, the licence keys and the tools on PATH come from
tests/conftest.py; the fixtures that there use the bare control plane are overridden here.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from iotistic_billing.devenv.controlplane import REPO_BIN, find_binary
from iotistic_billing.devenv.simulated import SimulatedCluster
from tests.conftest import CRDS, REPO, OperatorProcess


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: needs a cluster where workloads roll out (make e2e)")


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Admin kubeconfig of the cluster under test, with the CRDs applied."""
    existing = os.environ.get("E2E_KUBECONFIG")
    cluster: SimulatedCluster | None = None
    if existing:
        path = Path(existing).resolve()
    else:
        cluster = SimulatedCluster(tmp_path_factory.mktemp("simulated-cluster")).start()
        path = cluster.kubeconfig
    try:
        kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(path)]
        subprocess.run([*kubectl, "apply", "--server-side", "-f", str(CRDS)], check=True, capture_output=True)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"],
            check=True,
            capture_output=True,
        )
        yield path
    finally:
        if cluster is not None:
            cluster.stop()


@pytest.fixture(scope="session")
def k8s_client(kubeconfig: Path) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    yield client
    client.close()


# operator_env and operator repeat tests/conftest.py on purpose: defined here, they get their own
# session instances on this cluster, so `pytest tests/e2e tests/integration` cannot hand the e2e operator
# to the integration tests (or the reverse), which sharing the root fixtures did.
@pytest.fixture(scope="session")
def operator_env(kubeconfig: Path, database_url: str, license_keys: tuple[Path, Path]) -> dict[str, str]:
    private_key, public_key = license_keys
    return {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "DATABASE_URL": database_url,
        "LICENSE_PRIVATE_KEY_PATH": str(private_key),
        "LICENSE_PUBLIC_KEY_PATH": str(public_key),
        "INSTANCE_CHART": str(REPO / "charts" / "customer-instance"),
        "PATH": f"{REPO_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "BASE_DOMAIN": "e2e.iotistic.example",
        "OPERATOR_PEERING": "",
    }


@pytest.fixture(scope="session")
def operator(
    operator_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(operator_env, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
