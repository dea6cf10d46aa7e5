"""The real helm CLI installs a chart into the local control plane; the operator's helm step keeps what
the API server refuses a permanent error, with the field named, although helm's OpenAPI check is off."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import kubernetes
import pytest

from iotistic_billing.k8s import FieldManager, Kube, KubeApi
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.helm import Helm, HelmError, upgrade_install_args
from iotistic_billing.operator.release import Recovery, _recover_stuck
from tests.conftest import eventually, unique_name, wait_until

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


def widget_kind(k8s_client: kubernetes.client.ApiClient) -> str:
    """A namespaced kind Widget of a group of its own (a stand-in for the ServiceMonitor of the Prometheus
    operator), served once this returns; its apiVersion."""
    group = f"{unique_name('w')}.iotistic.test"
    kubernetes.client.ApiextensionsV1Api(k8s_client).create_custom_resource_definition(
        {
            "metadata": {"name": f"widgets.{group}"},
            "spec": {
                "group": group,
                "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                "scope": "Namespaced",
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            }
                        },
                    }
                ],
            },
        }
    )
    wait_until(lambda: _served(k8s_client, group), message=f"Widget of {group} served")
    return f"{group}/v1"


def remove_kind(k8s_client: kubernetes.client.ApiClient, api_version: str) -> None:
    """The CRD of widget_kind's Widget deleted, with every Widget (the API server's own cleanup), and gone."""
    group = api_version.split("/")[0]
    crds = kubernetes.client.ApiextensionsV1Api(k8s_client)
    crds.delete_custom_resource_definition(f"widgets.{group}")

    def gone() -> bool:
        try:
            crds.read_custom_resource_definition(f"widgets.{group}")
        except kubernetes.client.ApiException as error:
            return error.status == 404
        return False

    wait_until(gone, message=f"CRD widgets.{group} gone")


def _served(k8s_client: kubernetes.client.ApiClient, group: str) -> bool:
    try:
        kubernetes.client.CustomObjectsApi(k8s_client).list_cluster_custom_object(group, "v1", "widgets")
    except kubernetes.client.ApiException:
        return False
    return True


def widget(api_version: str) -> str:
    """A chart template of one Widget named after the release."""
    return (
        f"apiVersion: {api_version}\nkind: Widget\nmetadata:\n  name: {{{{ .Release.Name }}}}\nspec: {{}}\n"
    )


async def test_an_uninstall_of_a_release_with_an_object_of_a_removed_kind_fails_saying_so(
    k8s_client: kubernetes.client.ApiClient,
    kubeconfig: Path,
    helm_binary: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: helm 4 cannot build the objects of a release holding an object of a kind whose CRD
    was removed since, and says only "failed to delete release" (why in its debug log): the deletion of
    such a Customer was retried for ever, not told from the API server away. Also: no release at all is
    helm's "release: not found", which a "resource mapping not found" must not be taken for."""
    api_version = widget_kind(k8s_client)
    chart = config_map_chart(tmp_path / "monitored", "data:\n  a: b\n")
    (chart / "templates" / "widget.yaml").write_text(widget(api_version))
    namespace = new_namespace(k8s_client)
    helm = Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120)
    await helm.upgrade_install("instance", namespace, chart, {}, "0" * 32)

    remove_kind(k8s_client, api_version)
    # A discovery cache without the kind, as a restarted operator's (with one from before, helm builds the
    # object from it, and its deletion answers 404, which helm accepts).
    monkeypatch.setenv("KUBECACHEDIR", str(tmp_path / "fresh-cache"))
    for _ in range(2):  # every try alike
        with pytest.raises(HelmError) as refused:
            await helm.uninstall("instance", namespace)
        message = refused.value.message
        assert message.startswith("Error: failed to delete release: instance: unable to build kubernetes")
        assert f'no matches for kind "Widget" in version "{api_version}"' in message
        assert refused.value.missing_kind and "level=" not in message

    assert await helm.uninstall("instance", new_namespace(k8s_client)) is False


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


async def test_a_first_install_killed_mid_way_is_rolled_back_onto_itself_keeping_what_it_made(
    k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, helm_binary: Path, tmp_path: Path
) -> None:
    """Found in review: a first install whose helm was killed (HELM_TIMEOUT, an operator crash) or lost
    its last write (the API server away) stays pending-install, and the recovery uninstalled it: the
    instance's generated passwords went with it while its database volume kept the old ones. The
    recovery rolls the pending revision back onto itself: its manifest applied again, nothing deleted."""
    chart = config_map_chart(tmp_path / "made", "data:\n  password: {{ randAlphaNum 16 | quote }}\n")
    (chart / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: never-ready}\nspec:\n"
        "  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: x}}\n"
        "    spec: {containers: [{name: x, image: x}]}\n"
    )
    namespace = new_namespace(k8s_client)
    core = kubernetes.client.CoreV1Api(k8s_client)
    # --wait on a Deployment no kubelet runs: helm has applied the objects and waits until it is killed.
    installing = await asyncio.create_subprocess_exec(
        *(str(helm_binary), "upgrade", "--install", "instance", str(chart), "-n", namespace),
        *("--kubeconfig", str(kubeconfig), "--wait", "--timeout", "10m"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def made_by_the_install() -> Any:
        found = core.list_namespaced_config_map(namespace, field_selector="metadata.name=made").items
        return found[0] if found else None

    try:
        made = await eventually(made_by_the_install, message="the install's ConfigMap")
    finally:
        installing.kill()
        await installing.wait()
    helm = Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120)
    stuck = await helm.status("instance", namespace)
    assert stuck is not None and (stuck.revision, stuck.status) == (1, "pending-install")
    settings = SimpleNamespace(helm_timeout=1.0)
    later = datetime.now(UTC) + timedelta(minutes=5)  # the pending revision is older than HELM_TIMEOUT
    kube = Kube(KubeApi(k8s_client, FieldManager.OPERATOR))
    ctx = cast(OperatorContext, SimpleNamespace(helm=helm, kube=kube, settings=settings, clock=lambda: later))

    assert await _recover_stuck(ctx, namespace) == Recovery(recovered="pending-install")

    recovered = await helm.status("instance", namespace)
    assert recovered is not None and (recovered.revision, recovered.status) == (2, "deployed")
    kept = core.read_namespaced_config_map("made", namespace)
    assert (kept.metadata.uid, kept.data) == (made.metadata.uid, made.data)


@pytest.mark.parametrize("pod_after", ["gone", "there", "made again"])
async def test_a_pending_upgrade_whose_operator_pod_is_gone_is_rolled_back_at_once(
    k8s_client: kubernetes.client.ApiClient,
    kubeconfig: Path,
    helm_binary: Path,
    tmp_path: Path,
    pod_after: str,
) -> None:
    """Found with the container-restart recovery: an operator in a new Pod (a rollout, a lost node,
    `kubectl delete pod`) left an upgrade its predecessor's helm had begun pending for HELM_TIMEOUT. The
    revision's storage Secret names the operator's Pod and its uid; gone from the billing namespace, or
    a Pod of that name with another uid in its place (a StatefulSet's), its helm went with it, and the
    next pass rolls the revision back at once. The Pod still there (no kubelet here: it stays Pending)
    may still run that helm: the revision is left as before."""
    chart = config_map_chart(tmp_path / "made", "data:\n  a: b\n")
    namespace, billing = new_namespace(k8s_client), new_namespace(k8s_client)
    core = kubernetes.client.CoreV1Api(k8s_client)
    pod = unique_name("operator")
    manifest = {"metadata": {"name": pod}, "spec": {"containers": [{"name": "operator", "image": "x"}]}}
    uid = core.create_namespaced_pod(billing, manifest).metadata.uid
    helm = Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120, pod=pod, pod_uid=uid)
    await helm.upgrade_install("instance", namespace, chart, {}, "0" * 32)
    (chart / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: never-ready}\nspec:\n"
        "  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: x}}\n"
        "    spec: {containers: [{name: x, image: x}]}\n"
    )
    values = tmp_path / "values.json"
    values.write_text("{}")
    # The operator's upgrade, then --wait on a Deployment no kubelet runs: killed while it waits, as
    # with its Pod.
    args = upgrade_install_args("instance", namespace, chart, values, "1" * 32, "gone-runner", pod, uid)
    upgrading = await asyncio.create_subprocess_exec(
        *(str(helm_binary), *args, "--kubeconfig", str(kubeconfig), "--wait", "--timeout", "10m"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    apps = kubernetes.client.AppsV1Api(k8s_client)

    async def applied() -> Any:
        return apps.list_namespaced_deployment(namespace, field_selector="metadata.name=never-ready").items

    try:
        await eventually(applied, message="the upgrade's Deployment")
    finally:
        upgrading.kill()
        await upgrading.wait()
    stuck = await helm.status("instance", namespace)
    assert stuck is not None and (stuck.revision, stuck.status) == (2, "pending-upgrade")
    assert stuck.last_deployed is not None
    kube = Kube(KubeApi(k8s_client, FieldManager.OPERATOR))
    labels = (await kube.helm_release_revisions(namespace, "instance"))[2]
    assert (labels["iotistic.io/helm-pod"], labels["iotistic.io/helm-pod-uid"]) == (pod, uid)
    if pod_after != "there":
        # Not scheduled on a node: the API server removes it at once.
        core.delete_namespaced_pod(pod, billing)

        async def removed() -> bool:
            return not core.list_namespaced_pod(billing).items

        await eventually(removed, message="the Pod removed")
    if pod_after == "made again":
        assert core.create_namespaced_pod(billing, manifest).metadata.uid != uid
    # Another operator, in another Pod, a second after the revision began: far within HELM_TIMEOUT.
    recovering = Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120, runner="here", pod="new")
    settings = SimpleNamespace(helm_timeout=360.0, billing_namespace=billing)
    ctx = cast(
        OperatorContext,
        SimpleNamespace(
            helm=recovering,
            kube=kube,
            settings=settings,
            clock=lambda: stuck.last_deployed + timedelta(seconds=1),
            pod_checks_skipped=set(),
        ),
    )

    recovery = await _recover_stuck(ctx, namespace)

    after = await helm.status("instance", namespace)
    assert after is not None
    if pod_after == "there":
        assert recovery.left is not None and "maybe under a helm still running" in recovery.left, recovery
        assert (after.revision, after.status) == (2, "pending-upgrade")
    else:
        assert recovery == Recovery(recovered="pending-upgrade")
        assert (after.revision, after.status) == (3, "deployed")


def scaled_chart(chart: Path) -> Path:
    """A chart of the Deployment `instance-api`, its replicas and a pod label from the values."""
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(f"apiVersion: v2\nname: {chart.name}\nversion: 0.1.0\n")
    (chart / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: instance-api}\nspec:\n"
        "  replicas: {{ .Values.replicas }}\n  selector: {matchLabels: {app: x}}\n  template:\n"
        "    metadata: {labels: {app: x, plan: {{ .Values.plan | quote }}}}\n"
        "    spec: {containers: [{name: x, image: x}]}\n"
    )
    return chart


def scale_instance_api(kubectl_binary: Path, kubeconfig: Path, namespace: str, replicas: int) -> None:
    """`kubectl scale`, as an admin would: through the scale subresource, under kubectl's field manager."""
    kubectl = [str(kubectl_binary), "--kubeconfig", str(kubeconfig)]
    scale = ["scale", "deployment", "instance-api", "-n", namespace, f"--replicas={replicas}"]
    subprocess.run([*kubectl, *scale], check=True, capture_output=True)


def install_client_side(
    helm_binary: Path, kubeconfig: Path, namespace: str, chart: Path, values: Path
) -> None:
    """The release installed by helm's client-side apply, as helm 3 or `--server-side=false` by hand did."""
    helm = [str(helm_binary), "--kubeconfig", str(kubeconfig)]
    install = ["upgrade", "--install", "instance", str(chart), "-n", namespace, "--values", str(values)]
    subprocess.run([*helm, *install, "--server-side=false"], check=True, capture_output=True)


@pytest.mark.parametrize("applied_before", ["server-side", "client-side"])
async def test_an_upgrade_takes_back_the_replicas_a_kubectl_scale_took(
    k8s_client: kubernetes.client.ApiClient,
    kubeconfig: Path,
    helm_binary: Path,
    kubectl_binary: Path,
    tmp_path: Path,
    applied_before: str,
) -> None:
    """Found in review: after `kubectl scale deploy instance-api --replicas=3` kubectl owned the
    Deployment's .spec.replicas, and helm 4's server-side apply of every later upgrade (a renewal, a plan
    change, a suspension's 0 replicas) was refused, "Apply failed with 1 conflict: conflict with
    "kubectl" ... .spec.replicas", and retried for ever: the suspension never applied. The operator
    forces the conflicts it meets. A revision applied client-side (helm 3, or --server-side=false by
    hand) has helm's `--server-side auto` apply client-side too, which refuses --force-conflicts: the
    operator applies server-side whatever the revision before did."""
    chart = scaled_chart(tmp_path / "scaled")
    namespace = new_namespace(k8s_client)
    helm = Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120)
    running = {"plan": "starter", "replicas": 1}
    if applied_before == "server-side":
        await helm.upgrade_install("instance", namespace, chart, running, "1" * 32)
    else:
        values = tmp_path / "values.json"
        values.write_text(json.dumps(running))
        install_client_side(helm_binary, kubeconfig, namespace, chart, values)
    scale_instance_api(kubectl_binary, kubeconfig, namespace, 3)

    suspended = await helm.upgrade_install(
        "instance", namespace, chart, {"plan": "starter", "replicas": 0}, "2" * 32
    )

    assert (suspended.revision, suspended.status) == (2, "deployed")
    deployment = kubernetes.client.AppsV1Api(k8s_client).read_namespaced_deployment("instance-api", namespace)
    assert deployment.spec.replicas == 0


async def test_a_rollback_takes_back_the_replicas_a_kubectl_scale_took(
    k8s_client: kubernetes.client.ApiClient,
    kubeconfig: Path,
    helm_binary: Path,
    kubectl_binary: Path,
    tmp_path: Path,
) -> None:
    """Found in review: the recovery of a pending revision rolls it back, a server-side apply too, and a
    field another manager took since (`kubectl scale`) made it fail as the upgrade did, for ever."""
    chart = scaled_chart(tmp_path / "scaled")
    namespace = new_namespace(k8s_client)
    helm = Helm(str(helm_binary), str(kubeconfig), concurrency=1, timeout=120)
    await helm.upgrade_install("instance", namespace, chart, {"plan": "starter", "replicas": 1}, "1" * 32)
    await helm.upgrade_install("instance", namespace, chart, {"plan": "starter", "replicas": 2}, "2" * 32)
    scale_instance_api(kubectl_binary, kubeconfig, namespace, 3)

    await helm.rollback("instance", namespace, 1)

    back = await helm.status("instance", namespace)
    assert back is not None and (back.revision, back.status) == (3, "deployed")
    deployment = kubernetes.client.AppsV1Api(k8s_client).read_namespaced_deployment("instance-api", namespace)
    assert deployment.spec.replicas == 1
