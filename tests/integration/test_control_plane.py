"""The local control plane is a real Kubernetes API server: version, CRDs, watch, RBAC."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from iotistic_billing.devenv.controlplane import ControlPlane
from tests.conftest import REPO, unique_name, wait_until

pytestmark = pytest.mark.integration


def pinned_kubernetes_version() -> str:
    for line in (REPO / "tools" / "versions.env").read_text().splitlines():
        if line.startswith("KUBERNETES_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("tools/versions.env pins no KUBERNETES_VERSION")


def test_reports_the_pinned_kubernetes_version(control_plane: ControlPlane) -> None:
    assert control_plane.version() == pinned_kubernetes_version()


def _widget_crd(group: str) -> dict[str, object]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def _wait_established(api: kubernetes.client.ApiextensionsV1Api, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = api.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            return
        time.sleep(0.1)
    raise AssertionError(f"CRD {name} not established")


def test_custom_resource_create_read_patch_watch_delete(k8s_client: kubernetes.client.ApiClient) -> None:
    group = f"{unique_name('t')}.example.com"
    extensions = kubernetes.client.ApiextensionsV1Api(k8s_client)
    extensions.create_custom_resource_definition(_widget_crd(group))
    _wait_established(extensions, f"widgets.{group}")
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 1}}

    seen: list[tuple[str, int]] = []
    # Watched from the empty list's version: every write below is seen, however late the watch starts.
    since = objects.list_namespaced_custom_object(group, "v1", "default", "widgets")["metadata"][
        "resourceVersion"
    ]

    def watch_widgets() -> None:
        watch = kubernetes.watch.Watch()
        for event in watch.stream(
            objects.list_namespaced_custom_object,
            group,
            "v1",
            "default",
            "widgets",
            resource_version=since,
            timeout_seconds=20,
        ):
            seen.append((event["type"], event["object"]["spec"]["size"]))
            if event["type"] == "DELETED":
                watch.stop()

    watcher = threading.Thread(target=watch_widgets, daemon=True)
    watcher.start()

    objects.create_namespaced_custom_object(group, "v1", "default", "widgets", body)
    read = objects.get_namespaced_custom_object(group, "v1", "default", "widgets", "w1")
    assert read["spec"]["size"] == 1
    objects.patch_namespaced_custom_object(group, "v1", "default", "widgets", "w1", {"spec": {"size": 3}})
    assert objects.get_namespaced_custom_object(group, "v1", "default", "widgets", "w1")["spec"]["size"] == 3
    with pytest.raises(ApiException) as refused:
        objects.patch_namespaced_custom_object(group, "v1", "default", "widgets", "w1", {"spec": {"size": 0}})
    assert refused.value.status == 422 and "spec.size" in refused.value.body
    objects.delete_namespaced_custom_object(group, "v1", "default", "widgets", "w1")
    watcher.join(20)
    assert seen == [("ADDED", 1), ("MODIFIED", 3), ("DELETED", 3)]
    with pytest.raises(ApiException) as gone:
        objects.get_namespaced_custom_object(group, "v1", "default", "widgets", "w1")
    assert gone.value.status == 404


def test_rbac_is_enforced_for_a_non_admin_user(
    control_plane: ControlPlane, k8s_client: kubernetes.client.ApiClient
) -> None:
    user = unique_name("viewer")
    config: Path = control_plane.user_kubeconfig(user, groups=("iotistic:testers",))
    user_client = kubernetes.config.new_client_from_config(config_file=str(config))
    core_as_user = kubernetes.client.CoreV1Api(user_client)
    with pytest.raises(ApiException) as forbidden:
        core_as_user.list_namespaced_config_map("default")
    assert forbidden.value.status == 403

    rbac = kubernetes.client.RbacAuthorizationV1Api(k8s_client)
    rbac.create_namespaced_role(
        "default",
        {
            "metadata": {"name": user},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        "default",
        {
            "metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    )

    def allowed() -> bool:
        try:
            core_as_user.list_namespaced_config_map("default")
        except ApiException as error:
            assert error.status == 403, error
            return False
        return True

    # The RBAC authorizer reads bindings from its informer's cache: a moment after the write, not at once.
    wait_until(allowed, timeout=10, message="the RoleBinding allows the list")
    with pytest.raises(ApiException) as still_forbidden:
        core_as_user.create_namespaced_config_map("default", {"metadata": {"name": user}})
    assert still_forbidden.value.status == 403
    user_client.close()
