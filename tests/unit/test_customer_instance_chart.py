"""The customer-instance chart, rendered by the real helm CLI: lint, objects, and the values it refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from iotistic_billing.customer import LICENSE_JWT_KEY, LICENSE_SECRET_NAME, USAGE_API_KEY_KEY
from iotistic_billing.operator.helm import chart_values_schema
from iotistic_billing.operator.values import (
    LICENSED_COMPONENTS,
    OPERATOR_ENV_NAMES,
    deep_merge,
    desired_release_values,
    operator_env_name,
)
from iotistic_billing.settings import Settings
from tests.unit.test_operator_state import _entitlement, spec, target

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
    "license": {
        "secretName": "iotistic-license",
        "issuer": "https://billing.staging.example",
        "audience": "staging-instance",
        "maxDevices": 50,
        "sha256": "ab" * 32,
    },
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
    helm: Path, tmp_path: Path, values: dict[str, Any] | None, *extra: str
) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra]
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


def test_the_instance_is_given_the_licence_s_issuer_and_audience(operator_objects: list[Manifest]) -> None:
    """Found in review: the chart passed neither, while the verifier needs the audience: a LICENSE_AUDIENCE
    of the environment's (charts/iotistic-billing's license.audience) made every instance refuse every
    licence."""
    for name in ("api", "exporter"):
        env = env_of(containers(component(operator_objects, name))[0])

        assert env["IOTISTIC_LICENSE_ISSUER"]["value"] == "https://billing.staging.example", name
        assert env["IOTISTIC_LICENSE_AUDIENCE"]["value"] == "staging-instance", name


def chart_before_issuer_at(into: Path) -> Path:
    """The chart as every version published before license.issuer and license.audience was: this one
    without them (its `license` closed, additionalProperties false, as it was), copied into `into`.
    Made from the chart of today, not taken from git, so that a clone without history tests it too."""
    chart = Path(shutil.copytree(CHART, into / "customer-instance"))
    schema_file = chart / "values.schema.json"
    schema = json.loads(schema_file.read_text())
    closed = schema["properties"]["license"]
    for key in ("issuer", "audience"):
        del closed["properties"][key]
        closed["required"].remove(key)
    schema_file.write_text(json.dumps(schema, indent=2))
    values_file = chart / "values.yaml"
    values_file.write_text(
        "".join(
            line
            for line in values_file.read_text().splitlines(keepends=True)
            if not line.startswith(("  issuer:", "  audience:"))
        )
    )
    helpers = chart / "templates" / "_helpers.tpl"
    text = helpers.read_text()
    for name, key in (("IOTISTIC_LICENSE_ISSUER", "issuer"), ("IOTISTIC_LICENSE_AUDIENCE", "audience")):
        entry = f"- name: {name}\n  value: {{{{ .Values.license.{key} | quote }}}}\n"
        assert entry in text, f"{name} is no longer rendered as the test expects"
        text = text.replace(entry, "")
    helpers.write_text(text)
    return chart


@pytest.fixture(scope="module")
def chart_before_issuer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chart_before_issuer_at(tmp_path_factory.mktemp("chart-before-issuer"))


@pytest.mark.parametrize("suspended", [False, True])
def test_a_chart_version_from_before_an_operator_value_still_installs(
    helm: Path, tmp_path: Path, chart_before_issuer: Path, suspended: bool
) -> None:
    """Found in review: the operator sent license.issuer and license.audience to every chart version, and
    each one published before them refuses both (`at '/license': additional properties 'audience',
    'issuer' not allowed`, a permanent failure): after an operator upgrade every Customer on an older
    version (pinned, rolled back, an OCI registry's) stalled in UpgradeFailed, and no value reached it, a
    suspension's enabled: false neither. The operator's values a version's schema does not declare are
    left out for it; the chart of today is given them all."""
    settings = Settings(license_issuer="https://billing.staging.example", license_audience="staging-instance")
    aim = target(
        _entitlement("unlicensed", True) if suspended else _entitlement("starter"),
        customer_spec=spec(plan="starter", suspended=suspended),
    )
    values_file = tmp_path / "values.json"
    for chart in (chart_before_issuer, CHART):
        values = desired_release_values(aim, settings, "ab" * 32, chart_values_schema(chart))
        values_file.write_text(json.dumps(values))
        result = run_helm(
            helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, "--values", str(values_file)
        )
        assert result.returncode == 0, result.stderr
        objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        replicas = {w["spec"]["replicas"] for w in workloads(objects)}
        assert replicas == ({0} if suspended else {1}), chart
        env = env_of(containers(component(objects, "api"))[0])
        assert env["CUSTOMER_ID"]["value"] == "cust_acme0001"
        if chart == CHART:
            assert env["IOTISTIC_LICENSE_ISSUER"]["value"] == "https://billing.staging.example"
            assert env["IOTISTIC_LICENSE_AUDIENCE"]["value"] == "staging-instance"
        else:
            assert "IOTISTIC_LICENSE_ISSUER" not in env
            assert sorted(values["license"]) == ["maxDevices", "secretName", "sha256"]
            assert values["license"]["secretName"] == LICENSE_SECRET_NAME


# Every value the operator sets (operator/values.py), each changed.
OTHER_OPERATOR_VALUES: dict[str, Any] = {
    "customerId": "cust_other0001",
    "plan": "starter",
    "billingUrl": "http://elsewhere.example",
    "license": {
        "secretName": "other-license",
        "issuer": "https://other.example",
        "audience": "other",
        "maxDevices": 10,
        "sha256": "cd" * 32,
    },
    "retention": {"days": 30},
}


def test_every_variable_the_operator_s_values_set_is_one_extra_env_may_not_set(
    helm: Path, tmp_path: Path, operator_objects: list[Manifest]
) -> None:
    """The CRD refuses, and the operator leaves out, extraEnv entries named as operator_env_name says:
    each variable of the API and the exporter that changes with the operator's values is one of them, and
    each name it lists is set by the chart (a renamed variable left out of the list was the Customer's to
    override, the licence's among them)."""
    other = render(helm, tmp_path, deep_merge(OPERATOR_VALUES, OTHER_OPERATOR_VALUES))
    given: set[str] = set()
    for name in LICENSED_COMPONENTS:
        ours = containers(component(operator_objects, name))[0]["env"]
        theirs = containers(component(other, name))[0]["env"]
        assert [e["name"] for e in ours] == [e["name"] for e in theirs], name
        given |= {mine["name"] for mine, changed in zip(ours, theirs, strict=True) if mine != changed}
        # The operator's last, after extraEnv: Kubernetes keeps the last entry of a name.
        operators = [operator_env_name(e["name"]) for e in ours]
        assert operators == sorted(operators), name
    assert {"IOTISTIC_LICENSE_KEY", "IOTISTIC_LICENSE_AUDIENCE", "BILLING_URL", "USAGE_API_KEY"} <= given
    assert [name for name in sorted(given) if not operator_env_name(name)] == []
    assert set(OPERATOR_ENV_NAMES) <= given


def test_extra_env_cannot_override_the_operator_s_variables(helm: Path, tmp_path: Path) -> None:
    """Found in review: extraEnv was rendered after the operator's variables, and Kubernetes keeps the last
    entry of a name, so api.extraEnv's IOTISTIC_LICENSE_KEY (the old system's way to pass the licence)
    pinned a literal licence past every renewal, suspension and revocation, and exporter.extraEnv's
    BILLING_URL or USAGE_API_KEY sent usage nowhere. The CRD refuses them and the operator leaves them out;
    one that slips past both still loses to the operator's, while the chart's other variables stay the
    Customer's to override."""
    pinned = [
        {"name": "IOTISTIC_LICENSE_KEY", "value": "eyJhbGc"},
        {"name": "BILLING_URL", "value": "http://nowhere"},
        {"name": "USAGE_API_KEY", "value": "stolen"},
        {"name": "DB_HOST", "value": "external-db"},
    ]
    values = deep_merge(OPERATOR_VALUES, {"api": {"extraEnv": pinned}, "exporter": {"extraEnv": pinned}})

    objects = render(helm, tmp_path, values)

    for name in LICENSED_COMPONENTS:
        env = env_of(containers(component(objects, name))[0])  # the last of a name, as Kubernetes keeps
        assert env["IOTISTIC_LICENSE_KEY"]["valueFrom"] == {
            "secretKeyRef": {"name": LICENSE_SECRET_NAME, "key": LICENSE_JWT_KEY}
        }, name
        assert env["DB_HOST"]["value"] == "external-db", name
    exporter = env_of(containers(component(objects, "exporter"))[0])
    assert exporter["BILLING_URL"]["value"] == "http://iotistic-billing.iotistic-system.svc:3100"
    assert exporter["USAGE_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": LICENSE_SECRET_NAME, "key": USAGE_API_KEY_KEY}
    }


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


# ----- values that would write YAML of their own -----

# A value that, written into a template unquoted, ends the object it is in and starts a Secret in another
# namespace: the operator (which may create Secrets in any namespace) would apply it.
NEWLINE_OBJECT = (
    "\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: pwned\n  namespace: kube-system\n"
    "stringData:\n  a: |1"
)
# The same with the other line breaks of YAML, which helm's split on "\n---" does not see but its YAML
# parser does: inside a block scalar they end it, and the keys after them replace the object's own.
OTHER_BREAKS = {
    "cr": NEWLINE_OBJECT.replace("\n", "\r"),
    "line-separator": NEWLINE_OBJECT.replace("\n", "\u2028"),
    "next-line": NEWLINE_OBJECT.replace("\n", "\u0085"),
}
# A string of several lines that toYaml writes as a block scalar, keeping the U+2028 in it: the lines
# after it are indented as toYaml's own, less than nindent's, and become keys of the workload's spec.
BLOCK_BREAKOUT = "\nz\u2028replicas: 7\u2028x:"


def nested(path: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b"."""
    *parents, last = path.split(".")
    found: dict[str, Any] = {last: value}
    for key in reversed(parents):
        found = {key: found}
    return found


def schema_path(path: str) -> str:
    return "/" + path.replace(".", "/")


# Every string of values.yaml a Customer may set, with what the value starts with (a path starts with /).
CUSTOMER_STRINGS = {
    "domain": "globex.iotistic.cloud",
    "license.secretName": "iotistic-license",
    "exporter.instanceId": "instance-1",
    "ingress.className": "nginx",
    "ingress.tls.secretName": "globex-tls",
    "postgresql.persistence.storageClass": "standard",
    "postgresql.persistence.size": "8Gi",
    "postgresql.database": "iotistic",
    "postgresql.username": "iotistic",
    "mosquitto.extraConfig": "log_type all",
    "mosquitto.service.type": "ClusterIP",
    **{f"{name}.healthPath": "/health" for name in ("api", "dashboard", "exporter")},
    **{f"{name}.image.repository": "iotistic/x" for name in sorted(COMPONENTS)},
    **{f"{name}.image.tag": "1.2.3" for name in sorted(COMPONENTS)},
    **{f"{name}.image.pullPolicy": "Always" for name in sorted(COMPONENTS)},
}
# Strings in lists, and strings of maps and lists the chart writes with toYaml.
CUSTOMER_LIST_STRINGS = {
    **{f"{name}.writablePaths": "/tmp" for name in ("api", "dashboard", "exporter")},
}


def injected_values(payload: str) -> dict[str, Any]:
    values = OPERATOR_VALUES
    for path, start in CUSTOMER_STRINGS.items():
        values = deep_merge(values, nested(path, start + payload))
    for path, start in CUSTOMER_LIST_STRINGS.items():
        values = deep_merge(values, nested(path, [start + payload]))
    return deep_merge(
        values,
        {
            "imagePullSecrets": [{"name": "pull" + payload}],
            "nodeSelector": {"disk": "ssd" + payload},
            "ingress": {"annotations": {"a": "b" + payload}},
            "api": {"extraEnv": [{"name": "X", "value": "y" + payload}]},
        },
    )


def shape(node: Any, at: str = "") -> set[str]:
    """The paths of every key and list item under `node`: what a string of it could add to."""
    if isinstance(node, dict):
        return {f"{at}/{key}" for key in node} | {p for k, v in node.items() for p in shape(v, f"{at}/{k}")}
    if isinstance(node, list):
        return {f"{at}/{i}" for i in range(len(node))} | {
            p for i, v in enumerate(node) for p in shape(v, f"{at}/{i}")
        }
    return set()


def shapes(objects: list[Manifest]) -> dict[tuple[str, str], set[str]]:
    return {(o["kind"], o["metadata"]["name"]): shape(o) for o in objects}


@pytest.mark.parametrize(
    "payload",
    [NEWLINE_OBJECT, *OTHER_BREAKS.values(), BLOCK_BREAKOUT],
    ids=["lf", *OTHER_BREAKS, "block-breakout"],
)
def test_no_value_can_write_yaml_of_its_own(helm: Path, tmp_path: Path, payload: str) -> None:
    """Found in review: several strings were written into the templates unquoted (storageClass,
    ingress.className, the TLS and licence Secrets' names, healthPath, writablePaths, the images), and
    mosquitto.extraConfig into a block scalar that a carriage return ends: a Customer's
    spec.instance.values rendered a Secret in kube-system, or turned the mosquitto ConfigMap into an
    object of any kind, which the operator applied; toYaml's block scalars (nodeSelector, annotations,
    extraEnv) let a U+2028 write keys of the workload's own. Even past the schema (skipped here), every
    string stays a string: the same objects with the same keys as with harmless values, no namespace."""
    harmless = render_result(helm, tmp_path, injected_values(""), "--skip-schema-validation")
    assert harmless.returncode == 0, harmless.stderr

    result = render_result(helm, tmp_path, injected_values(payload), "--skip-schema-validation")

    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert shapes(objects) == shapes([doc for doc in yaml.safe_load_all(harmless.stdout) if doc])
    assert [o["metadata"]["name"] for o in objects if "namespace" in o["metadata"]] == []
    claim = one(objects, "StatefulSet", "instance-postgresql")["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["storageClassName"] == "standard" + payload
    config = one(objects, "ConfigMap", "instance-mosquitto")["data"]["mosquitto.conf"]
    assert config.endswith("\nlog_type all" + payload + "\n")
    assert component(objects, "api")["spec"]["template"]["spec"]["nodeSelector"] == {"disk": "ssd" + payload}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        *(
            (nested(path, start + NEWLINE_OBJECT), schema_path(path))
            for path, start in CUSTOMER_STRINGS.items()
            if path != "mosquitto.extraConfig"
        ),
        *(
            (nested("mosquitto.extraConfig", "log_type all" + payload), "/mosquitto/extraConfig")
            for payload in OTHER_BREAKS.values()
        ),
        *(
            (nested(path, [start + NEWLINE_OBJECT]), schema_path(path) + "/0")
            for path, start in CUSTOMER_LIST_STRINGS.items()
        ),
        ({"imagePullSecrets": [{"name": "pull" + NEWLINE_OBJECT}]}, "/imagePullSecrets/0/name"),
        # Names and images that Kubernetes would refuse anyway.
        (nested("ingress.className", "Nginx"), "/ingress/className"),
        (nested("api.image.repository", "iotistic/API"), "/api/image/repository"),
        (nested("api.image.tag", ":latest"), "/api/image/tag"),
    ],
)
def test_a_value_that_would_write_yaml_fails_the_render_naming_it(
    helm: Path, tmp_path: Path, override: dict[str, Any], named: str
) -> None:
    """Found in review: the schema let these strings hold line breaks (a path was only "^/"), so a bad
    value rendered instead of being refused naming its field (the Customer Stalled with helm's message)."""
    result = render_result(helm, tmp_path, deep_merge(OPERATOR_VALUES, override))

    assert result.returncode != 0, f"{named} rendered"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert f"at '{named}'" in result.stderr, result.stderr


def test_values_users_set_today_still_render_as_they_did(helm: Path, tmp_path: Path) -> None:
    """Found in review of the quoting: the schema refused an image tag pinned by digest (Renovate's
    `1.4.0@sha256:...`) and a path with a space, which rendered before, and a value set null to drop
    the chart's default (an OpenShift SCC's uid, the API server's replicas) rendered 0: a pod refused
    as root beside runAsNonRoot, a component scaled to zero. Each renders as before the quoting."""
    digest = "1.4.0@sha256:" + "0" * 64
    values = deep_merge(
        OPERATOR_VALUES,
        {
            "api": {
                "image": {"repository": "registry.local:5000/iotistic/api", "tag": digest},
                "writablePaths": ["/app/My Data"],
                "runAsUser": None,
                "replicas": None,
            }
        },
    )
    api = component(render(helm, tmp_path, values), "api")

    [container] = containers(api)
    assert container["image"] == f"registry.local:5000/iotistic/api:{digest}"
    assert "/app/My Data" in [mount["mountPath"] for mount in container["volumeMounts"]]
    assert api["spec"]["replicas"] is None  # null: the API server's default, as before the quoting
    context = api["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context)
