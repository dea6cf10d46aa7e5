"""The customer-instance chart, rendered by the real helm CLI: lint, objects, and the values it refuses."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from iotistic_billing.customer import LICENSE_JWT_KEY, LICENSE_SECRET_NAME, USAGE_API_KEY_KEY

REPO = Path(__file__).parents[2]
CHART = REPO / "charts" / "customer-instance"
RELEASE = "instance"
NAMESPACE = "customer-globex"
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
COMPONENTS = {"api", "dashboard", "exporter", "postgresql", "mosquitto", "redis"}

# What the operator passes for a professional customer.
OPERATOR_VALUES: dict[str, Any] = {
    "enabled": True,
    "customerId": "cust_globex01",
    "plan": "professional",
    "domain": "globex.iotistic.cloud",
    "billingUrl": "http://iotistic-billing.iotistic-system.svc:3100",
    "license": {"secretName": "iotistic-license", "maxDevices": 50, "sha256": "ab" * 32},
    "retention": {"days": 365},
    "ingress": {"className": "nginx", "tls": {"enabled": True}},
}

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def helm() -> Path:
    in_repo = REPO / "bin" / "helm"
    if in_repo.exists():
        return in_repo
    on_path = shutil.which("helm")
    if on_path is None:
        pytest.fail(f"no helm binary: neither {in_repo} (run `make tools`) nor `helm` on PATH")
    return Path(on_path)


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, check=False)


def render(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None) -> list[Manifest]:
    result = render_result(helm, tmp_path, values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_result(
    helm: Path, tmp_path: Path, values: dict[str, Any] | None
) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["--values", str(values_file)]
    return run_helm(helm, *args)


@pytest.fixture(scope="module")
def default_objects(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    return render(helm, tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def operator_objects(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    return render(helm, tmp_path_factory.mktemp("operator"), OPERATOR_VALUES)


def workloads(objects: list[Manifest]) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] in WORKLOAD_KINDS]


def one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    [found] = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    return found


def containers(workload: Manifest, *, init: bool = False) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    found: list[dict[str, Any]] = pod["containers"]
    return [*found, *pod.get("initContainers", [])] if init else found


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def component(objects: list[Manifest], name: str) -> Manifest:
    [found] = [
        w for w in workloads(objects) if w["metadata"]["labels"]["app.kubernetes.io/component"] == name
    ]
    return found


def all_renders(default_objects: list[Manifest], operator_objects: list[Manifest]) -> Iterator[Manifest]:
    yield from default_objects
    yield from operator_objects


# ----- lint -----


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_is_clean(helm: Path, strict: bool) -> None:
    result = run_helm(helm, "lint", *(["--strict"] if strict else []), str(CHART))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_lint_with_operator_values_is_clean(helm: Path, tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(OPERATOR_VALUES))

    result = run_helm(helm, "lint", "--strict", str(CHART), "--values", str(values_file))

    assert result.returncode == 0, result.stdout + result.stderr


# ----- what renders -----


def test_default_values_render_every_component(default_objects: list[Manifest]) -> None:
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in default_objects}

    assert {
        w["metadata"]["labels"]["app.kubernetes.io/component"] for w in workloads(default_objects)
    } == COMPONENTS
    assert ("StatefulSet", "instance-postgresql") in kinds
    assert ("ConfigMap", "instance-mosquitto") in kinds
    assert ("Secret", "instance-credentials") in kinds
    for name in COMPONENTS:
        assert ("Service", f"instance-{name}") in kinds
    # No domain, no Ingress.
    assert not [obj for obj in default_objects if obj["kind"] == "Ingress"]


def test_every_container_runs_as_non_root_with_probes_and_resources(
    default_objects: list[Manifest], operator_objects: list[Manifest]
) -> None:
    for workload in workloads([*all_renders(default_objects, operator_objects)]):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers(workload, init=True):
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert container["resources"]["requests"].keys() >= {"cpu", "memory"}, where
            assert container["resources"]["limits"].keys() >= {"cpu", "memory"}, where
        for container in containers(workload):
            assert "readinessProbe" in container, f"{name}/{container['name']}"
            assert "livenessProbe" in container, f"{name}/{container['name']}"


def test_writable_paths_of_a_read_only_root_are_empty_dirs(operator_objects: list[Manifest]) -> None:
    for workload in workloads(operator_objects):
        pod = workload["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for container in containers(workload):
            for mount in container.get("volumeMounts", []):
                claimed = any(
                    t["metadata"]["name"] == mount["name"]
                    for t in workload["spec"].get("volumeClaimTemplates", [])
                )
                assert claimed or mount["name"] in volumes, f"{workload['metadata']['name']}: {mount['name']}"


def test_images_are_public_and_pinned(operator_objects: list[Manifest]) -> None:
    images = {c["image"] for w in workloads(operator_objects) for c in containers(w, init=True)}

    assert images == {
        "iotistic/api:1.0.0",
        "iotistic/dashboard:1.0.0",
        "iotistic/billing-exporter:1.0.0",
        "postgres:16-alpine",
        "eclipse-mosquitto:2.0",
        "redis:7-alpine",
    }


def test_image_tag_of_the_iotistic_images_is_a_value(helm: Path, tmp_path: Path) -> None:
    objects = render(
        helm, tmp_path, {**OPERATOR_VALUES, "api": {"image": {"repository": "iotistic/api", "tag": "2.3.4"}}}
    )

    assert containers(component(objects, "api"))[0]["image"] == "iotistic/api:2.3.4"


def test_the_licence_comes_from_the_iotistic_license_secret(operator_objects: list[Manifest]) -> None:
    for name in ("api", "exporter"):
        env = env_of(containers(component(operator_objects, name))[0])

        assert env["IOTISTIC_LICENSE_KEY"]["valueFrom"] == {
            "secretKeyRef": {"name": LICENSE_SECRET_NAME, "key": LICENSE_JWT_KEY}
        }, name
        assert env["CUSTOMER_ID"]["value"] == "cust_globex01", name
        assert env["IOTISTIC_PLAN"]["value"] == "professional", name


def test_the_exporter_reports_usage_with_the_usage_key(operator_objects: list[Manifest]) -> None:
    env = env_of(containers(component(operator_objects, "exporter"))[0])

    assert env["USAGE_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": LICENSE_SECRET_NAME, "key": USAGE_API_KEY_KEY}
    }
    assert env["BILLING_URL"]["value"] == "http://iotistic-billing.iotistic-system.svc:3100"
    assert env["INSTANCE_ID"]["value"] == f"{NAMESPACE}/{RELEASE}"


def test_plan_limits_reach_the_api(operator_objects: list[Manifest]) -> None:
    env = env_of(containers(component(operator_objects, "api"))[0])

    assert env["LICENSE_MAX_DEVICES"]["value"] == "50"
    assert env["DATA_RETENTION_DAYS"]["value"] == "365"


def test_a_renewed_licence_rolls_the_pods_that_read_it(operator_objects: list[Manifest]) -> None:
    for name in ("api", "exporter"):
        annotations = component(operator_objects, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["iotistic.io/license-sha256"] == "ab" * 32


def test_an_all_digit_licence_hash_stays_a_string(helm: Path, tmp_path: Path) -> None:
    # YAML reads an unquoted 000...0 as the number 0, which the API server refuses in an annotation.
    digits = "0" * 64
    objects = render(
        helm, tmp_path, {**OPERATOR_VALUES, "license": {**OPERATOR_VALUES["license"], "sha256": digits}}
    )
    for name in ("api", "exporter"):
        annotations = component(objects, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["iotistic.io/license-sha256"] == digits


def test_disabled_instance_scales_every_workload_to_zero(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, tmp_path, {**OPERATOR_VALUES, "enabled": False})

    replicas = {w["metadata"]["name"]: w["spec"]["replicas"] for w in workloads(objects)}
    assert len(replicas) == len(COMPONENTS)
    assert set(replicas.values()) == {0}, replicas


def test_enabled_instance_runs_one_of_each(operator_objects: list[Manifest]) -> None:
    assert {w["spec"]["replicas"] for w in workloads(operator_objects)} == {1}


def test_the_ingress_serves_the_domain(operator_objects: list[Manifest]) -> None:
    ingress = one(operator_objects, "Ingress", RELEASE)

    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "globex.iotistic.cloud"
    backends = {p["path"]: p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
    assert backends == {"/api": "instance-api", "/": "instance-dashboard"}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["globex.iotistic.cloud"], "secretName": "instance-tls"}]


def test_standard_labels_on_every_object(operator_objects: list[Manifest]) -> None:
    for obj in operator_objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "customer-instance", obj["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["iotistic.io/customer-id"] == "cust_globex01"
        assert "app.kubernetes.io/component" in labels
    for workload in workloads(operator_objects):
        selector = workload["spec"]["selector"]["matchLabels"]
        # Only labels that never change: a Deployment's selector is immutable.
        assert set(selector) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        }
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize(
    ("plan", "preset", "api_memory_limit"),
    [
        ("trial", None, "512Mi"),
        ("starter", None, "512Mi"),
        ("professional", None, "1Gi"),
        ("enterprise", None, "2Gi"),
        ("trial", "large", "2Gi"),
        # A lapsed trial or a suspension: the operator passes the unlicensed feature set.
        ("unlicensed", None, "512Mi"),
    ],
)
def test_the_plan_picks_a_resource_preset(
    helm: Path, tmp_path: Path, plan: str, preset: str | None, api_memory_limit: str
) -> None:
    values = {**OPERATOR_VALUES, "plan": plan, **({"resourcesPreset": preset} if preset else {})}

    objects = render(helm, tmp_path, values)

    assert containers(component(objects, "api"))[0]["resources"]["limits"]["memory"] == api_memory_limit


def test_a_component_s_own_resources_replace_the_preset(helm: Path, tmp_path: Path) -> None:
    own = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}
    objects = render(
        helm,
        tmp_path,
        {**OPERATOR_VALUES, "api": {"image": {"repository": "iotistic/api"}, "resources": own}},
    )

    assert containers(component(objects, "api"))[0]["resources"] == own
    assert containers(component(objects, "redis"))[0]["resources"]["limits"]["memory"] == "512Mi"


def test_postgresql_keeps_its_data_in_a_claim_unless_persistence_is_off(
    helm: Path, tmp_path: Path, operator_objects: list[Manifest]
) -> None:
    statefulset = one(operator_objects, "StatefulSet", "instance-postgresql")
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"

    ephemeral = render(
        helm,
        tmp_path,
        {
            **OPERATOR_VALUES,
            "postgresql": {
                "image": {"repository": "postgres", "tag": "16-alpine"},
                "persistence": {"enabled": False},
            },
        },
    )
    statefulset = one(ephemeral, "StatefulSet", "instance-postgresql")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}


def test_mosquitto_requires_authentication_by_default(operator_objects: list[Manifest]) -> None:
    config = one(operator_objects, "ConfigMap", "instance-mosquitto")["data"]["mosquitto.conf"]

    assert "allow_anonymous false" in config
    assert "password_file /mosquitto/auth/passwd" in config
    [init] = component(operator_objects, "mosquitto")["spec"]["template"]["spec"]["initContainers"]
    assert "mosquitto_passwd -U" in " ".join(init["command"])


# ----- values the schema refuses -----


@pytest.mark.parametrize(
    ("override", "named"),
    [
        # The value the operator's failure test relies on.
        ({"retention": {"days": "forever"}}, "/retention/days"),
        ({"retention": {"days": -2}}, "/retention/days"),
        ({"plan": "gold"}, "/plan"),
        ({"customerId": "CUST-1"}, "/customerId"),
        ({"license": {"secretName": "iotistic-license", "maxDevices": "lots"}}, "/license/maxDevices"),
        ({"domain": "Not_A_Host"}, "/domain"),
        ({"colour": "blue"}, "colour"),
        ({"api": {"image": {"repository": "iotistic/api"}, "replicas": -1}}, "/api/replicas"),
    ],
)
def test_an_invalid_value_fails_the_render_naming_the_field(
    helm: Path, tmp_path: Path, override: dict[str, Any], named: str
) -> None:
    result = render_result(helm, tmp_path, {**OPERATOR_VALUES, **override})

    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr, result.stderr
