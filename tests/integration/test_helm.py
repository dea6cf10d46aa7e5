"""The real helm CLI installs a chart into the local control plane; the operator's helm step keeps what
the API server refuses a permanent error, with the field named, although helm's OpenAPI check is off."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes
import pytest

from iotistic_billing.operator.helm import Helm, HelmError, upgrade_install_args
from tests.conftest import unique_name

pytestmark = pytest.mark.integration


def test_helm_installs_a_small_chart(helm_binary: Path, kubeconfig: Path, tmp_path: Path) -> None:
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    release, namespace = unique_name("tiny"), unique_name("helm")
    helm = [str(helm_binary), "--kubeconfig", str(kubeconfig)]
    subprocess.run(
        [*helm, "upgrade", "--install", release, str(chart), "-n", namespace, "--create-namespace"],
        check=True,
        capture_output=True,
    )
    listed = subprocess.run(
        [*helm, "list", "-n", namespace, "-o", "json"], check=True, capture_output=True, text=True
    )
    releases = json.loads(listed.stdout)
    assert [(r["name"], r["status"], r["revision"]) for r in releases] == [(release, "deployed", "1")]
    subprocess.run(
        [*helm, "upgrade", "--install", release, str(chart), "-n", namespace, "--set", "greeting=bye"],
        check=True,
        capture_output=True,
    )
    values = subprocess.run(
        [*helm, "get", "values", release, "-n", namespace, "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(values.stdout) == {"greeting": "bye"}


def config_map_chart(chart: Path, body: str) -> Path:
    """A chart of one ConfigMap named after the chart, with `body` after its metadata."""
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(f"apiVersion: v2\nname: {chart.name}\nversion: 0.1.0\n")
    (chart / "templates" / "configmap.yaml").write_text(
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {chart.name}\n{body}"
    )
    return chart


def new_namespace(k8s_client: kubernetes.client.ApiClient) -> str:
    namespace = unique_name("helm")
    kubernetes.client.CoreV1Api(k8s_client).create_namespace({"metadata": {"name": namespace}})
    return namespace


def test_the_operator_command_skips_only_the_client_side_openapi_check(tmp_path: Path) -> None:
    args = upgrade_install_args("instance", "customer-a", tmp_path, tmp_path / "values.json", "0" * 32)
    assert args[:4] == ["upgrade", "--install", "instance", str(tmp_path)]
    assert "--disable-openapi-validation" in args
    assert "--wait" not in args and "--skip-schema-validation" not in args


async def test_an_unknown_field_is_refused_by_the_api_server_as_a_permanent_error(
    k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, helm_binary: Path, tmp_path: Path
) -> None:
    chart = config_map_chart(tmp_path / "bad", "data:\n  a: b\nbogusField: 1\n")
    namespace = new_namespace(k8s_client)
    helm = Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120)
    with pytest.raises(HelmError) as refused:
        await helm.upgrade_install("bad", namespace, chart, {}, "0" * 32)
    assert "bogusField" in refused.value.message
    assert refused.value.permanent and not refused.value.stuck


async def test_a_refused_upgrade_is_reported_by_helm_s_error_line_alone(
    k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, helm_binary: Path, tmp_path: Path
) -> None:
    """Found in review: helm v4 logs `level=WARN msg="upgrade failed" ... error="..."` before its error,
    and conditions and Events started with that line, then repeated the error."""
    namespace = new_namespace(k8s_client)
    helm = Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120)
    good = config_map_chart(tmp_path / "good", "data:\n  a: b\n")
    await helm.upgrade_install("good", namespace, good, {}, "0" * 32)
    bad = config_map_chart(tmp_path / "bad", "data:\n  a: b\nbogusField: 1\n")
    with pytest.raises(HelmError) as refused:
        await helm.upgrade_install("good", namespace, bad, {}, "0" * 32)
    message = refused.value.message
    assert message.startswith("Error: UPGRADE FAILED: ") and "bogusField" in message
    assert "\n" not in message and "level=" not in message
    assert refused.value.permanent


async def test_the_operator_labels_helm_storage_for_its_filtered_watch_and_with_the_values_hash(
    k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, helm_binary: Path, tmp_path: Path
) -> None:
    chart = config_map_chart(tmp_path / "good", "data:\n  plan: {{ .Values.plan }}\n")
    namespace = new_namespace(k8s_client)
    release = await Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120).upgrade_install(
        "instance", namespace, chart, {"plan": "starter"}, "1" * 32
    )
    assert (release.revision, release.status) == (1, "deployed")
    selected = (
        kubernetes.client.CoreV1Api(k8s_client)
        .list_namespaced_secret(
            namespace, label_selector="app.kubernetes.io/managed-by=iotistic-billing-operator"
        )
        .items
    )
    assert [
        (
            s.metadata.labels["owner"],
            s.metadata.labels["version"],
            s.metadata.labels["iotistic.io/values-hash"],
        )
        for s in selected
    ] == [("helm", "1", "1" * 32)]
