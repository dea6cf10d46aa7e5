"""The real helm CLI installs a chart into the local control plane."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

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
