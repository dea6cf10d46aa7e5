"""What we ship for a cluster is valid Kubernetes: the chart's render (default values, and with
monitoring) and the kustomize base pass the Kubernetes 1.36 schemas in strict mode, the API server
accepts every object in a server-side dry-run apply, and the operator pods' init container migrates a
real database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml
from alembic.script import ScriptDirectory
from sqlalchemy import text

from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine
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


# ----- the operator's init container -----


def init_command(helm: Path) -> list[str]:
    """What the operator pod's init container runs: the image's ENTRYPOINT (python -m) and its args."""
    objects = helm_template(helm, "iotistic-system")
    operator = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator")
    )
    [init] = operator["spec"]["template"]["spec"]["initContainers"]
    return [sys.executable, "-m", *init["args"]]


def run_with_database(argv: list[str], database_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)


def revision_of(database_url: str) -> str | None:
    async def read() -> str | None:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as connection:
                found = await connection.scalar(text("SELECT version_num FROM alembic_version"))
                return None if found is None else str(found)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_the_operator_s_init_container_migrates_a_database_then_finds_nothing_to_do(
    helm_binary: Path, postgres: EmbeddedPostgres
) -> None:
    url = postgres.create_database(f"init_{uuid.uuid4().hex[:10]}")
    head = ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
    command = init_command(helm_binary)

    first = run_with_database(command, url)
    assert first.returncode == 0, first.stderr
    assert revision_of(url) == head
    assert f"to {head}" in first.stdout, first.stdout

    again = run_with_database(command, url)
    assert again.returncode == 0, again.stderr
    assert f"at {head}" in again.stdout and "nothing to do" in again.stdout, again.stdout


def test_the_operator_s_init_container_fails_with_what_went_wrong(
    helm_binary: Path, postgres: EmbeddedPostgres
) -> None:
    """A failure is a non-zero exit (the pod does not start its operator) whose last line says why."""
    command = init_command(helm_binary)

    unset = run_with_database(command, None)
    assert unset.returncode == 2 and "DATABASE_URL: required" in unset.stderr, unset.stderr

    missing = run_with_database(command, postgres.database_url(f"missing_{uuid.uuid4().hex[:8]}"))
    assert missing.returncode == 1, missing.stderr
    last = missing.stderr.strip().splitlines()[-1]
    assert "DATABASE_URL" in last and "does not exist" in last, missing.stderr

    # A rollback to a version older than the database's: it says so instead of migrating.
    newer = postgres.create_database(f"newer_{uuid.uuid4().hex[:10]}")
    migrate.upgrade(newer)

    async def stamp_unknown_revision() -> None:
        engine = create_engine(newer, pool_size=1)
        try:
            async with engine.begin() as connection:
                await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        finally:
            await engine.dispose()

    asyncio.run(stamp_unknown_revision())
    unknown = run_with_database(command, newer)
    assert unknown.returncode == 1, unknown.stderr
    last = unknown.stderr.strip().splitlines()[-1]
    assert "9999" in last and "does not know" in last, unknown.stderr
    assert revision_of(newer) == "9999"
