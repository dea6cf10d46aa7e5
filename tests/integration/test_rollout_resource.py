"""The InstanceRollout resource as the API server serves it: `kubectl explain` documents every field
of the spec, invalid rollouts are refused naming the field, and `kubectl get irollout` shows the issue's
columns."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from iotistic_billing.rollout import RolloutSpec
from tests.conftest import unique_name, wait_until

pytestmark = pytest.mark.integration


def kubectl(
    kubectl_binary: Path, kubeconfig: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kubectl_binary), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def rollout(name: str, **spec: Any) -> str:
    body = {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "InstanceRollout",
        "metadata": {"name": name},
        "spec": {"chartVersion": "1.2.0", "steps": [{"rest": True}], **spec},
    }
    return yaml.safe_dump(body)


def test_kubectl_explain_documents_every_field_of_the_spec(kubectl_binary: Path, kubeconfig: Path) -> None:
    # The API server publishes a new CRD's OpenAPI a few seconds after it is Established.
    result = wait_until(
        lambda: (
            (
                r := kubectl(kubectl_binary, kubeconfig, "explain", "instancerollout.spec", "--recursive")
            ).returncode
            == 0
            and r
        ),
        timeout=60,
        interval=1,
        message="kubectl explain instancerollout.spec",
    )
    shown = result.stdout
    for field in RolloutSpec.model_fields.values():
        assert f"{field.alias}\t" in shown, field.alias
    for field in (
        "maxParallel",
        "bakeSeconds",
        "percent",
        "customers",
        "rest",
        "timeoutSeconds",
        "maxFailures",
    ):
        assert f"{field}\t" in shown, field
    described = kubectl(kubectl_binary, kubeconfig, "explain", "instancerollout.spec.steps.maxParallel")
    assert "upgrading at once" in described.stdout


@pytest.mark.parametrize(
    ("spec", "refusal"),
    [
        ({"steps": []}, "spec.steps: Invalid value: 0: spec.steps in body should have at least 1 items"),
        ({"steps": [{"percent": 101}]}, "spec.steps[0].percent: Invalid value: 101"),
        ({"plans": ["gold"]}, 'spec.plans[0]: Unsupported value: "gold"'),
        ({"steps": [{"percent": 10, "rest": True}]}, "spec.steps[0]: Invalid value"),
        ({"chartVersion": "latest"}, 'spec.chartVersion: Invalid value: "latest"'),
        ({"onFailure": "retry"}, 'spec.onFailure: Unsupported value: "retry"'),
    ],
)
def test_an_invalid_rollout_is_refused_naming_the_field(
    kubectl_binary: Path, kubeconfig: Path, spec: dict[str, Any], refusal: str
) -> None:
    result = kubectl(
        kubectl_binary, kubeconfig, "create", "-f", "-", stdin=rollout(unique_name("bad"), **spec)
    )
    assert result.returncode != 0
    assert refusal in result.stderr, result.stderr


def test_get_rollout_shows_version_step_updated_healthy_phase_age(
    kubectl_binary: Path, kubeconfig: Path
) -> None:
    name = unique_name("shown")
    created = kubectl(kubectl_binary, kubeconfig, "create", "-f", "-", stdin=rollout(name))
    assert created.returncode == 0, created.stderr
    listed = kubectl(kubectl_binary, kubeconfig, "get", "irollout", name)
    assert listed.stdout.split()[:7] == ["NAME", "VERSION", "STEP", "UPDATED", "HEALTHY", "PHASE", "AGE"]
    listed = kubectl(kubectl_binary, kubeconfig, "get", "iotistic")
    assert f"instancerollout.iotistic.io/{name}" in listed.stdout
    defaults = yaml.safe_load(
        kubectl(kubectl_binary, kubeconfig, "get", "irollout", name, "-o", "yaml").stdout
    )
    assert defaults["spec"]["steps"] == [{"rest": True, "maxParallel": 5, "bakeSeconds": 0}]
    assert defaults["spec"]["healthGate"] == {"timeoutSeconds": 600, "maxFailures": 1}
    assert (defaults["spec"]["paused"], defaults["spec"]["onFailure"]) == (False, "halt")
