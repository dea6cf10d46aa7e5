"""What we ship for a cluster is valid Kubernetes: the chart's render (default values, and with
monitoring) and the kustomize base pass the Kubernetes 1.36 schemas in strict mode, and the API server
accepts every object in a server-side dry-run apply."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml

from iotistic_billing.devenv.controlplane import ControlPlane
from tests.conftest import REPO, unique_name

pytestmark = pytest.mark.integration

CHART = REPO / "charts" / "iotistic-billing"
BASE = REPO / "manifests" / "base"
RELEASE = "iotistic-billing"
KUBERNETES_VERSION = "1.36"
MONITORING = [
    "--set",
    "monitoring.serviceMonitor.enabled=true",
    "--set",
    "monitoring.prometheusRule.enabled=true",
]
# Custom resources of the prometheus-operator: kubernetes-validate has no schema for them and the local
# control plane has not their CRDs, so they are checked through helm template only (unit tests).
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

Manifest = dict[str, Any]


def run(argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stderr}"
    return result.stdout


def parse(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(helm: Path, namespace: str, *args: str) -> list[Manifest]:
    argv = [str(helm), "template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds", *args]
    return parse(run(argv))


def kustomize(kubectl: Path, tmp_path: Path, namespace: str | None = None) -> list[Manifest]:
    """The base as is, or through an overlay that moves it to `namespace`, as a user's overlay would."""
    if namespace is None:
        return parse(run([str(kubectl), "kustomize", str(BASE)]))
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize accepts a base only by a relative path.
    base = os.path.relpath(BASE, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({"namespace": namespace, "resources": [base]}))
    return parse(run([str(kubectl), "kustomize", str(overlay)]))


@pytest.fixture
def namespace(k8s_client: kubernetes.client.ApiClient) -> Iterator[str]:
    name = unique_name("billing")
    core = kubernetes.client.CoreV1Api(k8s_client)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


# ----- schemas -----


def schema_errors(objects: list[Manifest]) -> list[str]:
    errors = []
    for manifest in objects:
        if manifest["kind"] in PROMETHEUS_OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{manifest['kind']} {manifest['metadata']['name']}: {error.message}")
    return errors


def test_validator_knows_the_kubernetes_version() -> None:
    # validate() falls back to the newest schema older than the version asked for: make sure it is 1.36.
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}
    assert kubernetes_validate.validate(deployment, KUBERNETES_VERSION) == KUBERNETES_VERSION


@pytest.mark.parametrize("monitoring", [False, True], ids=["default", "monitoring"])
def test_chart_render_passes_the_kubernetes_schemas(helm_binary: Path, monitoring: bool) -> None:
    objects = helm_template(helm_binary, "iotistic-system", *(MONITORING if monitoring else []))

    assert schema_errors(objects) == []
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole", "NetworkPolicy", "Ingress"} <= kinds
    assert (kinds >= PROMETHEUS_OPERATOR_KINDS) is monitoring


def test_kustomize_base_passes_the_kubernetes_schemas(kubectl_binary: Path, tmp_path: Path) -> None:
    objects = kustomize(kubectl_binary, tmp_path)

    assert len(objects) > 10
    assert schema_errors(objects) == []


def test_a_schema_violation_is_caught() -> None:
    """The check above is not vacuous: a field the schema lacks fails in strict mode."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


# ----- the API server -----


def dry_run_apply(kubectl: Path, control_plane: ControlPlane, objects: list[Manifest]) -> list[str]:
    out = run(
        [
            str(kubectl),
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=iotistic-billing-dry-run",
            "-f",
            "-",
        ],
        stdin=yaml.safe_dump_all(objects),
    )
    return [line for line in out.splitlines() if line.strip()]


def test_chart_objects_are_accepted_by_the_api_server(
    helm_binary: Path, kubectl_binary: Path, control_plane: ControlPlane, namespace: str
) -> None:
    objects = helm_template(helm_binary, namespace)

    applied = dry_run_apply(kubectl_binary, control_plane, objects)

    assert len(applied) == len(objects), applied
    assert all(line.endswith("serverside-applied (server dry run)") for line in applied), applied


def test_kustomize_base_objects_are_accepted_by_the_api_server(
    kubectl_binary: Path, control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    objects = kustomize(kubectl_binary, tmp_path, namespace)
    bindings = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert {s["namespace"] for b in bindings for s in b["subjects"]} == {namespace}

    applied = dry_run_apply(kubectl_binary, control_plane, objects)

    assert len(applied) == len(objects), applied
    assert all(line.endswith("serverside-applied (server dry run)") for line in applied), applied
