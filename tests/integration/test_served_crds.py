"""The operator and the webhook server refuse to start on CRDs older than this version, with one line
naming the CRD, the fields and the command. The shared control plane serves the current CRDs, which are
left alone: the stale ones are copies under a group of the test's own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.k8s import FieldManager, KubeApi
from iotistic_billing.processes import free_port
from iotistic_billing.served_crds import APPLY_CRDS, CUSTOMERS_CRD, ROLLOUTS_CRD, check_served_crds
from tests.conftest import CRDS, unique_name
from tests.integration.webhook_support import server_env

pytestmark = pytest.mark.integration

# main() of the component, given the names of the CRDs to check (argv) in place of ours.
START = """
import dataclasses, sys
from iotistic_billing.served_crds import CUSTOMERS_CRD, ROLLOUTS_CRD
from iotistic_billing.{component}.__main__ import main
crds = (
    dataclasses.replace(CUSTOMERS_CRD, name=sys.argv[1]),
    dataclasses.replace(ROLLOUTS_CRD, name=sys.argv[2]),
)
sys.exit(main({arguments}crds=crds[:{count}]))
"""


def stale_copy(file: str, group: str, *drop: tuple[str, ...]) -> dict[str, Any]:
    """crds/<file> under `group`, without the properties at each path of `drop`."""
    crd = yaml.safe_load((CRDS / file).read_text())
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
    crd["spec"]["group"] = group
    for path in drop:
        node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for step in path[:-1]:
            node = node["items"] if step == "[]" else node["properties"][step]
        del node["properties"][path[-1]]
    assert isinstance(crd, dict)
    return crd


@pytest.fixture
def group(k8s_client: kubernetes.client.ApiClient) -> Iterator[str]:
    group = f"{unique_name('crds')}.iotistic.test"
    yield group
    extensions = kubernetes.client.ApiextensionsV1Api(k8s_client)
    for plural in ("customers", "instancerollouts"):
        try:
            extensions.delete_custom_resource_definition(f"{plural}.{group}")
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise


def start(component: str, env: dict[str, str], names: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    script = START.format(
        component=component,
        arguments="[], " if component == "webhook_server" else "",
        count=len(names),
    )
    padded = (*names, "unused")[:2]
    return subprocess.run(
        [sys.executable, "-c", script, *padded],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def refusals(stderr: str, component: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"iotistic-billing {component}: ")]


def test_the_shared_control_planes_crds_are_current(k8s_client: kubernetes.client.ApiClient) -> None:
    check_served_crds(KubeApi(k8s_client, FieldManager.OPERATOR), (CUSTOMERS_CRD, ROLLOUTS_CRD))


def test_the_operator_refuses_to_start_on_a_stale_rollout_crd_and_a_missing_customer_crd(
    k8s_client: kubernetes.client.ApiClient, operator_env: dict[str, str], group: str
) -> None:
    """Found in review: after a helm upgrade without applying crds/ first, the operator ran on the old
    schemas: the API server dropped status.steps[].allMovedAt from every rollout tick (a step never
    ended), and without the InstanceRollout CRD every pass failed before its licence step. It now exits
    at its start with one line naming what is missing and the command."""
    stale = stale_copy("instancerollouts.iotistic.io.yaml", group, ("status", "steps", "[]", "allMovedAt"))
    kubernetes.client.ApiextensionsV1Api(k8s_client).create_custom_resource_definition(stale)
    missing = f"customers.{group}"
    ended = start("operator", operator_env, (missing, stale["metadata"]["name"]))
    assert ended.returncode == 1, ended.stderr
    [line] = refusals(ended.stderr, "operator")
    assert f"{missing} is not installed" in line
    assert f"instancerollouts.{group} serves no status.steps[].allMovedAt;" in line
    assert line.endswith(APPLY_CRDS)


def test_the_webhook_server_refuses_to_start_on_a_stale_customer_crd(
    k8s_client: kubernetes.client.ApiClient,
    database_url: str,
    stripe_mock: StripeMock,
    license_keys: tuple[Path, Path],
    kubeconfig: Path,
    group: str,
) -> None:
    """Found in review: a Customer CRD older than the webhook server dropped the spec.subscription fields
    it applies from Stripe's events, in silence."""
    stale = stale_copy("customers.iotistic.io.yaml", group, ("spec", "subscription", "currentPeriodStart"))
    kubernetes.client.ApiextensionsV1Api(k8s_client).create_custom_resource_definition(stale)
    env = server_env(database_url, stripe_mock, license_keys, kubeconfig, free_port())
    ended = start("webhook_server", env, (stale["metadata"]["name"],))
    assert ended.returncode == 1, ended.stderr
    [line] = refusals(ended.stderr, "webhook server")
    assert f"customers.{group} serves no spec.subscription.currentPeriodStart;" in line
    assert line.endswith(APPLY_CRDS)
