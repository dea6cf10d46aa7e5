"""The iotistic-billing chart (operator and webhook server), rendered by the real helm CLI, and the
kustomize base generated from it."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast, get_args

import prometheus_client
import pytest
import yaml
from pydantic import SecretStr

REPO = Path(__file__).parents[2]
CHART = REPO / "charts" / "iotistic-billing"
INSTANCE_CHART = REPO / "charts" / "customer-instance"
BASE = REPO / "manifests" / "base"
RELEASE = "iotistic-billing"
NAMESPACE = "iotistic-system"
OPERATOR = f"{RELEASE}-operator"
WEBHOOK_SERVER = f"{RELEASE}-webhook-server"
MONITORING = {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}


def credential_variables() -> set[str]:
    """Environment variables that carry credentials, always a secretKeyRef, never a value: DATABASE_URL
    and every SecretStr setting."""
    from iotistic_billing.settings import Settings

    secret = {
        name for name, field in Settings.model_fields.items() if SecretStr in get_args(field.annotation)
    }
    return {"DATABASE_URL"} | {name.upper() for name in secret}


CREDENTIAL_ENV = credential_variables()

Manifest = dict[str, Any]


def tool(name: str) -> Path:
    in_repo = REPO / "bin" / name
    if in_repo.exists():
        return in_repo
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(f"no {name} binary: neither {in_repo} (run `make tools`) nor `{name}` on PATH")
    return Path(on_path)


@pytest.fixture(scope="module")
def helm() -> Path:
    return tool("helm")


@pytest.fixture(scope="module")
def kubectl() -> Path:
    return tool("kubectl")


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False)


def values_args(tmp_path: Path, values: dict[str, Any] | None) -> list[str]:
    if values is None:
        return []
    values_file = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    return ["--values", str(values_file)]


def template(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart, which a test may expect to refuse its values."""
    return run(helm, "template", RELEASE, CHART, *args)


def render_text(helm: Path, *args: str) -> str:
    result = template(helm, "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def parse(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None, *args: str) -> list[Manifest]:
    return parse(render_text(helm, *values_args(tmp_path, values), *args))


@pytest.fixture(scope="module")
def default_objects(helm: Path) -> list[Manifest]:
    return parse(render_text(helm))


@pytest.fixture(scope="module")
def monitored_objects(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    return render(helm, tmp_path_factory.mktemp("monitoring"), MONITORING)


def one(objects: Iterable[Manifest], kind: str, name: str) -> Manifest:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_spec(deployment: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: Manifest) -> dict[str, Any]:
    [found] = pod_spec(deployment)["containers"]
    return dict(found)


def env_of(deployment: Manifest) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(deployment)["env"]}


def rules(objects: list[Manifest], name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = one(objects, "ClusterRole", name)["rules"]
    return found


def granted(role_rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in role_rules
        if group in rule["apiGroups"] and resource in rule["resources"] and not rule.get("resourceNames")
        for verb in rule["verbs"]
    }


# ----- lint, schema, CRDs -----


def test_the_chart_needs_a_kubernetes_whose_api_server_takes_the_crds(helm: Path) -> None:
    """optionalOldSelf (the Customer's name rule) needs CRDValidationRatcheting, on by default from 1.30:
    an older API server drops the field, and the rule's oldSelf.hasValue() no longer compiles."""
    assert "optionalOldSelf: true" in (CHART / "crds" / "customers.iotistic.io.yaml").read_text()

    older = template(helm, "--kube-version", "1.29.15")
    assert older.returncode != 0 and "kubeVersion" in older.stderr, older.stderr
    assert template(helm, "--kube-version", "1.30.0").returncode == 0


@pytest.mark.parametrize(
    "values",
    [None, {**MONITORING, "ingress": {"tls": {"enabled": True}, "className": "nginx"}}],
    ids=["default", "monitoring-tls"],
)
def test_helm_lint_strict_is_clean(helm: Path, tmp_path: Path, values: dict[str, Any] | None) -> None:
    result = run(helm, "lint", "--strict", CHART, *values_args(tmp_path, values))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_values_schema_is_draft_07_and_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_a_misspelt_value_is_refused(helm: Path) -> None:
    result = template(helm, "--set", "webhookServer.replica=3")

    assert result.returncode != 0
    assert "additional properties 'replica' not allowed" in result.stderr


def test_large_integers_from_a_values_file_render_as_integers(helm: Path, tmp_path: Path) -> None:
    # Found in review: helm reads a values file's numbers as floats, and `quote` wrote 1000000 as
    # "1e+06", which the settings refuse (exit 2, the pods crash-looping).
    values = {"webhookServer": {"rateLimit": {"burst": 1_000_000}}, "operator": {"priority": 2_000_000}}
    objects = render(helm, tmp_path, values)

    assert env_of(one(objects, "Deployment", WEBHOOK_SERVER))["RATE_LIMIT_BURST"]["value"] == "1000000"
    assert env_of(one(objects, "Deployment", OPERATOR))["OPERATOR_PRIORITY"]["value"] == "2000000"


@pytest.mark.parametrize("domain", ["Apps.Example.com", "apps.example.com.", "https://apps.example.com"])
def test_a_base_domain_that_is_no_dns_name_is_refused(helm: Path, domain: str) -> None:
    # Found in review: it rendered, and every Customer without spec.instance.domain then stalled on the
    # instance chart's refusal of `<name>.<baseDomain>`.
    result = template(helm, "--set", f"config.baseDomain={domain}")

    assert result.returncode != 0
    assert "baseDomain" in result.stderr


@pytest.mark.parametrize(
    ("values", "refused"),
    [
        # Found in review: each rendered, and the operator then refused it (exit 2) or, for billingUrl,
        # every Customer's helm run failed for good on the instance chart's pattern.
        ({"config": {"billingUrl": "https://a b"}}, "at '/config/billingUrl'"),
        ({"operator": {"peering": "billing..peering"}}, "at '/operator/peering'"),
        ({"operator": {"peering": "a" * 245}}, "at '/operator/peering'"),  # shard 63's -shard-63: 254
        ({"operator": {"timerInterval": 0.1}}, "at '/operator/timerInterval'"),
        ({"operator": {"timerInterval": 86400}}, "at '/operator/timerInterval'"),
        ({"operator": {"helmTimeout": 1}}, "at '/operator/helmTimeout'"),
        # The server's port and its Stripe inbox's: a Service with two equal ports, and the server exits 2
        # ("must differ from PORT").
        (
            {"webhookServer": {"port": 3101}},
            "webhookServer.port and webhookServer.inbox.port must differ",
        ),
        # Trusted proxies the settings' ip_network refuses (strict): the pods crash-looped.
        (
            {"webhookServer": {"rateLimit": {"trustedProxies": ["ingress-nginx"]}}},
            "at '/webhookServer/rateLimit/trustedProxies/0'",
        ),
        (
            {"webhookServer": {"rateLimit": {"trustedProxies": ["10.0.5.0/24", "10.0.5.1/24"]}}},
            "trustedProxies: 10.0.5.1/24 has host bits set; the network is 10.0.5.0/24",
        ),
        (
            {"webhookServer": {"rateLimit": {"trustedProxies": ["256.0.0.0/8"]}}},
            "trustedProxies: 256.0.0.0/8 is no IPv4 network",
        ),
        (
            {"config": {"notices": {"webhookAllowedCidrs": ["192.168.192.0/17"]}}},
            "webhookAllowedCidrs: 192.168.192.0/17 has host bits set; the network is 192.168.128.0/17",
        ),
    ],
)
def test_a_value_the_settings_refuse_is_refused_by_the_chart(
    helm: Path, tmp_path: Path, values: dict[str, Any], refused: str
) -> None:
    result = template(helm, *values_args(tmp_path, values))

    assert result.returncode != 0
    assert refused in result.stderr, result.stderr


# Networks the settings read (ipaddress.ip_network, strict). Not here: an IPv6 network whose address or
# host bits the settings refuse, which the chart leaves to them (checkCidrs).
NETWORKS = [
    # Taken by the settings, refused by the chart before.
    "10.0.5.7",
    "fd00::1",
    "10.0.0.0/08",
    "10.64.0.0/010",
    "10.0.0.0/0008",
    "fd00::/008",
    "10.0.0.0/255.0.0.0",
    "10.64.0.0/255.192.0.0",
    "10.0.0.0/0.255.255.255",  # a hostmask
    "10.0.5.7/255.255.255.255",
    "0.0.0.0/0.0.0.0",
    "fe80::%eth0/64",
    # Taken by both before.
    "10.0.5.0/24",
    "0.0.0.0/0",
    "10.1.2.3/32",
    "192.168.128.0/17",
    "fd00::/8",
    "::/0",
    # Refused by both.
    "10.0.5.1/24",
    "10.64.0.0/255.128.0.0",
    "10.0.0.0/0.0.0.0",
    "10.0.0.0/255.0.255.0",
    "10.0.0.0/33",
    "10.0.0.0/+8",
    "10.0.0.0/",
    "010.0.0.0/8",
    "256.0.0.0/8",
    "10.0.0/8",
    "10.0.5.7%eth0",
    "fd00::/129",
    "fd00::/255.0.0.0",
    "ingress-nginx",
]
NETWORK_VALUES = {
    "trusted_proxies": (
        "webhookServer.rateLimit.trustedProxies",
        "/webhookServer/rateLimit/trustedProxies/0",
    ),
    "notify_webhook_allowed_cidrs": (
        "config.notices.webhookAllowedCidrs",
        "/config/notices/webhookAllowedCidrs/0",
    ),
}


@pytest.mark.parametrize("setting", sorted(NETWORK_VALUES))
@pytest.mark.parametrize("network", NETWORKS)
def test_the_chart_takes_the_networks_the_settings_take_and_refuses_the_others(
    helm: Path, tmp_path: Path, network: str, setting: str
) -> None:
    """Found in review: the chart refused networks the settings take. A bare address (the /32 the chart
    took before: helm upgrade of such an install failed), a netmask, and prefixes with a leading zero,
    which Sprig's int read in base 0 (/08 as /0, refused for host bits; /010 as /8)."""
    from pydantic import ValidationError

    from iotistic_billing.settings import Settings

    try:
        Settings.model_validate({setting: [network]})
        taken = True
    except ValidationError as error:
        assert {e["loc"][0] for e in error.errors()} == {setting}, error
        taken = False
    value, schema_path = NETWORK_VALUES[setting]
    values: dict[str, Any] = {}
    node = values
    *parents, leaf = value.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = [network]
    result = template(helm, *values_args(tmp_path, values))

    if taken:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert f"{value}: {network} " in result.stderr or f"at '{schema_path}'" in result.stderr, (
            result.stderr
        )


def schema_property(schema: dict[str, Any], path: str) -> dict[str, Any]:
    found = schema
    for key in path.split("."):
        found = found["properties"][key]
    return found


# Chart values and the settings they set: the schema's bounds are the settings' (annotated_types' Ge, Le...).
BOUNDED_VALUES = {
    "config.defaultTrialDays": "default_trial_days",
    "config.dunningRestrictDays": "dunning_restrict_days",
    "config.license.lifetimeDays": "license_lifetime_days",
    "config.notices.trialNoticeDays": "trial_notice_days",
    "operator.shards": "operator_shards",
    "operator.helmConcurrency": "helm_concurrency",
    "operator.helmTimeout": "helm_timeout",
    "operator.timerInterval": "operator_timer_interval",
}


@pytest.mark.parametrize(("value", "setting"), sorted(BOUNDED_VALUES.items()))
def test_the_schema_s_bounds_are_the_settings(value: str, setting: str) -> None:
    from iotistic_billing.settings import Settings

    bounds = {
        name: getattr(constraint, attribute)
        for constraint in Settings.model_fields[setting].metadata
        for name, attribute in (("minimum", "ge"), ("maximum", "le"), ("exclusiveMinimum", "gt"))
        if hasattr(constraint, attribute)
    }
    schema = schema_property(json.loads((CHART / "values.schema.json").read_text()), value)

    assert {
        name: schema[name] for name in ("minimum", "maximum", "exclusiveMinimum") if name in schema
    } == bounds


def test_the_billing_url_and_peering_patterns_are_the_ones_the_settings_and_the_instance_chart_take() -> None:
    from iotistic_billing.customer import DNS_NAME_PATTERN

    schema = json.loads((CHART / "values.schema.json").read_text())
    instance = json.loads((INSTANCE_CHART / "values.schema.json").read_text())

    # Every URL setting the settings hold to it (settings._http_url), as a value with white space rendered
    # and the webhook server then refused to start (found in review).
    for url in ("config.billingUrl", "config.notices.customerPortalUrl", "config.notices.platformWebhookUrl"):
        assert schema_property(schema, url)["pattern"] == instance["properties"]["billingUrl"]["pattern"], url
    peering = schema_property(schema, "operator.peering")
    assert peering["pattern"] == DNS_NAME_PATTERN
    last_shard = schema_property(schema, "operator.shards")["maximum"] - 1
    assert peering["maxLength"] + len(f"-shard-{last_shard}") == 253


def test_the_operator_s_liveness_and_metrics_ports_differ(helm: Path) -> None:
    """Found in review: one port for both rendered, and the operator died with EADDRINUSE."""
    result = template(helm, "--set", "operator.metricsPort=8080")

    assert result.returncode != 0
    assert "operator.livenessPort and operator.metricsPort must differ" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "source", ["customers.iotistic.io.yaml", "instancerollouts.iotistic.io.yaml", "kopf-peering.yaml"]
)
def test_chart_crds_are_copies_of_the_repository_crds(source: str) -> None:
    assert (CHART / "crds" / source).read_bytes() == (REPO / "crds" / source).read_bytes(), (
        f"charts/iotistic-billing/crds/{source} differs from crds/{source}: cp crds/{source} {CHART}/crds/"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(
        p.name for p in (REPO / "crds").glob("*.yaml")
    )


# ----- what renders -----


def test_default_values_render_both_components(default_objects: list[Manifest]) -> None:
    assert {(o["kind"], o["metadata"]["name"]) for o in default_objects} == {
        ("ServiceAccount", OPERATOR),
        ("ServiceAccount", WEBHOOK_SERVER),
        ("ClusterRole", OPERATOR),
        ("ClusterRole", WEBHOOK_SERVER),
        ("ClusterRoleBinding", OPERATOR),
        ("ClusterRoleBinding", WEBHOOK_SERVER),
        ("Role", OPERATOR),
        ("Role", WEBHOOK_SERVER),
        ("RoleBinding", OPERATOR),
        ("RoleBinding", WEBHOOK_SERVER),
        ("Deployment", OPERATOR),
        ("Deployment", WEBHOOK_SERVER),
        ("Service", OPERATOR),
        ("Service", WEBHOOK_SERVER),
        ("PodDisruptionBudget", WEBHOOK_SERVER),
        ("NetworkPolicy", OPERATOR),
        ("NetworkPolicy", WEBHOOK_SERVER),
        ("Ingress", RELEASE),
    }
    namespaced = [o for o in default_objects if not o["kind"].startswith("ClusterRole")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {NAMESPACE}


def test_monitoring_adds_service_monitors_and_rules(
    default_objects: list[Manifest], monitored_objects: list[Manifest]
) -> None:
    added = {(o["kind"], o["metadata"]["name"]) for o in monitored_objects} - {
        (o["kind"], o["metadata"]["name"]) for o in default_objects
    }

    assert added == {
        ("ServiceMonitor", OPERATOR),
        ("ServiceMonitor", WEBHOOK_SERVER),
        ("PrometheusRule", RELEASE),
    }
    scraped = {
        o["metadata"]["name"]: [endpoint["port"] for endpoint in o["spec"]["endpoints"]]
        for o in monitored_objects
        if o["kind"] == "ServiceMonitor"
    }
    # The webhook server's pods run two processes with metrics: the server and its Stripe inbox.
    assert scraped == {OPERATOR: ["metrics"], WEBHOOK_SERVER: ["http", "inbox"]}
    for name, ports in scraped.items():
        assert set(ports) <= {p["name"] for p in one(monitored_objects, "Service", name)["spec"]["ports"]}
    webhook = one(monitored_objects, "Deployment", WEBHOOK_SERVER)
    inbox_port = next(p["containerPort"] for p in container(webhook)["ports"] if p["name"] == "inbox")
    assert env_of(webhook)["STRIPE_INBOX_PORT"]["value"] == str(inbox_port)


def test_every_container_is_non_root_read_only_with_probes_and_resources(
    default_objects: list[Manifest],
) -> None:
    for name in (OPERATOR, WEBHOOK_SERVER):
        deployment = one(default_objects, "Deployment", name)
        pod = pod_spec(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["serviceAccountName"] == name
        for c in pod["containers"]:
            security = c["securityContext"]
            assert security["runAsNonRoot"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert c["resources"]["requests"].keys() >= {"cpu", "memory"}, name
            assert c["resources"]["limits"].keys() >= {"cpu", "memory"}, name
            assert "livenessProbe" in c, name
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"]), name


def test_operator_is_one_replica_recreated_with_peering_and_kopf_liveness(
    default_objects: list[Manifest],
) -> None:
    operator = one(default_objects, "Deployment", OPERATOR)
    c = container(operator)
    env = env_of(operator)

    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    assert c["args"] == ["iotistic_billing.operator"]
    assert env["OPERATOR_PEERING"]["value"] == "iotistic-billing"
    assert env["INSTANCE_CHART"]["value"] == "/app/charts/customer-instance"
    liveness = c["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert liveness["path"] == "/healthz" and ports[liveness["port"]] == 8080
    assert env["OPERATOR_LIVENESS_PORT"]["value"] == "8080"
    # The kubelet probes the Pod IP: Kopf's endpoint listens on that address's family.
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # Its name, uid and namespace: where a pending helm revision's Pod is looked for and whether it is
    # that Pod or a later one of its name (operator/release.py).
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_UID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert env["BILLING_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert ports["metrics"] == 8081 and env["OPERATOR_METRICS_PORT"]["value"] == "8081"


def test_each_operator_pod_migrates_the_database_first_in_an_init_container_no_probe_bounds(
    helm: Path, tmp_path: Path
) -> None:
    """Found in review: the operator migrated before Kopf served /healthz, so its 3-minute startup probe
    also bounded the migrations; a long one (0007 copies every usage report) was killed and rolled back
    at every restart. Each shard's pod migrates first, in an init container without probes (the
    migration lock takes the shards one at a time), with the operator's database settings."""
    extra = [{"name": "PGSSLMODE", "value": "verify-full"}]
    objects = render(helm, tmp_path, {"operator": {"shards": 2, "extraEnv": extra}})
    operators = [
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].startswith(OPERATOR)
    ]

    assert len(operators) == 2
    for deployment in operators:
        operator = container(deployment)
        [init] = pod_spec(deployment).get("initContainers", [])
        assert (init["name"], init["image"]) == ("migrate", operator["image"])
        assert init["args"] == ["iotistic_billing.db.migrate"]
        assert not {"startupProbe", "livenessProbe", "readinessProbe"} & init.keys()
        env = {item["name"]: item for item in init["env"]}
        assert env == {name: env_of(deployment)[name] for name in ("DATABASE_URL", "PGSSLMODE")}
        assert init["securityContext"] == operator["securityContext"]
        assert init["resources"] == operator["resources"]
    assert "initContainers" not in pod_spec(one(objects, "Deployment", WEBHOOK_SERVER))


def test_shards_are_one_operator_deployment_each_with_selectors_that_do_not_share_pods(
    helm: Path, tmp_path: Path, default_objects: list[Manifest]
) -> None:
    objects = render(helm, tmp_path, {"operator": {"shards": 3}, "networkPolicy": {"enabled": True}})
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    operators = [o for o in deployments if o["metadata"]["name"].startswith(OPERATOR)]

    assert [o["metadata"]["name"] for o in operators] == [
        OPERATOR,
        f"{OPERATOR}-shard-1",
        f"{OPERATOR}-shard-2",
    ]
    assert [
        (env_of(o)["OPERATOR_SHARD"]["value"], env_of(o)["OPERATOR_SHARDS"]["value"]) for o in operators
    ] == [
        ("0", "3"),
        ("1", "3"),
        ("2", "3"),
    ]
    # Shard 0 is the unsharded operator, unchanged: a Deployment's selector cannot change after install.
    assert (
        operators[0]["spec"]["selector"] == one(default_objects, "Deployment", OPERATOR)["spec"]["selector"]
    )
    for deployment in deployments:
        pods = deployment["spec"]["template"]["metadata"]["labels"]
        selecting = [
            other["metadata"]["name"]
            for other in deployments
            if other["spec"]["selector"]["matchLabels"].items() <= pods.items()
        ]
        assert selecting == [deployment["metadata"]["name"]], "each Deployment's pods, its own selector only"
    for operator in operators:
        assert operator["spec"]["replicas"] == 1 and operator["spec"]["strategy"] == {"type": "Recreate"}
    # The metrics Service and the operator's NetworkPolicy take every shard's pod.
    service = one(objects, "Service", OPERATOR)["spec"]["selector"]
    policy = one(objects, "NetworkPolicy", OPERATOR)["spec"]["podSelector"]["matchLabels"]
    for operator in operators:
        pods = operator["spec"]["template"]["metadata"]["labels"]
        assert service.items() <= pods.items() and policy.items() <= pods.items()
    webhook_pods = one(objects, "Deployment", WEBHOOK_SERVER)["spec"]["template"]["metadata"]["labels"]
    assert not service.items() <= webhook_pods.items()
    assert env_of(one(default_objects, "Deployment", OPERATOR))["OPERATOR_SHARDS"]["value"] == "1"
    result = template(helm, "--set", "operator.shards=0")
    assert result.returncode != 0 and "shards" in result.stderr


def test_webhook_server_rolls_several_replicas_behind_a_disruption_budget(
    default_objects: list[Manifest],
) -> None:
    webhook = one(default_objects, "Deployment", WEBHOOK_SERVER)
    c = container(webhook)
    budget = one(default_objects, "PodDisruptionBudget", WEBHOOK_SERVER)

    assert webhook["spec"]["replicas"] == 2
    assert webhook["spec"]["strategy"]["type"] == "RollingUpdate"
    assert webhook["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert c["args"] == ["iotistic_billing.webhook_server"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 3100}, {"name": "inbox", "containerPort": 3101}]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= (
        webhook["spec"]["template"]["metadata"]["labels"].items()
    )


def test_a_budget_that_would_block_every_drain_is_refused(helm: Path) -> None:
    result = template(helm, "--set", "webhookServer.replicas=1")

    assert result.returncode != 0
    assert "minAvailable must be below webhookServer.replicas" in result.stderr


def test_the_instance_chart_can_come_from_a_registry_at_the_version_new_customers_start_on(
    helm: Path, tmp_path: Path
) -> None:
    reference = "oci://registry.example:5000/charts/customer-instance"
    chart = {"reference": reference, "version": "0.2.0", "plainHttp": True}
    env = env_of(one(render(helm, tmp_path, {"operator": {"instanceChart": chart}}), "Deployment", OPERATOR))
    assert (env["INSTANCE_CHART"]["value"], env["INSTANCE_CHART_VERSION"]["value"]) == (reference, "0.2.0")
    assert env["INSTANCE_CHART_PLAIN_HTTP"]["value"] == "true"
    # Bumping the version moves no running Customer unless the upgrade is immediate.
    assert env["INSTANCE_CHART_UPGRADE"]["value"] == "rollout"

    without_version = template(helm, "--set", f"operator.instanceChart.reference={reference}")
    assert without_version.returncode != 0
    assert "operator.instanceChart.version is required with a reference" in without_version.stderr
    tagged = template(helm, "--set", f"operator.instanceChart.reference={reference}:0.2.0")
    assert tagged.returncode != 0 and "/operator/instanceChart/reference" in tagged.stderr


def test_how_the_fleet_moves_to_a_new_instance_chart_version_is_a_value(helm: Path, tmp_path: Path) -> None:
    """Found in review: the chart had no value for INSTANCE_CHART_UPGRADE, so a fleet could not be moved
    at once by a version bump, only through InstanceRollouts."""
    reference = "oci://registry.example/charts/customer-instance"
    chart = {"reference": reference, "version": "0.2.0", "upgrade": "immediate"}
    env = env_of(one(render(helm, tmp_path, {"operator": {"instanceChart": chart}}), "Deployment", OPERATOR))
    assert env["INSTANCE_CHART_UPGRADE"]["value"] == "immediate"

    refused = template(helm, "--set", "operator.instanceChart.upgrade=always")
    assert refused.returncode != 0 and "/operator/instanceChart/upgrade" in refused.stderr, refused.stderr


def test_the_registry_credentials_come_from_a_docker_config_secret(helm: Path, tmp_path: Path) -> None:
    chart = {"reference": "oci://registry.example/charts/customer-instance", "version": "0.2.0"}
    chart["credentialsSecret"] = "registry-pull"
    deployment = one(render(helm, tmp_path, {"operator": {"instanceChart": chart}}), "Deployment", OPERATOR)
    env = env_of(deployment)
    assert env["INSTANCE_CHART_REGISTRY_CONFIG"]["value"] == "/etc/iotistic/registry/config.json"
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "registry-credentials")
    assert volume["secret"]["secretName"] == "registry-pull"
    assert volume["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "registry-credentials")
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/iotistic/registry", True)
    plain = env_of(
        one(
            render(helm, tmp_path, {"operator": {"instanceChart": {**chart, "credentialsSecret": ""}}}),
            "Deployment",
            OPERATOR,
        )
    )
    assert "INSTANCE_CHART_REGISTRY_CONFIG" not in plain


def test_licence_keys_are_files_and_only_the_operator_gets_the_private_key(
    default_objects: list[Manifest],
) -> None:
    def mounted_items(name: str) -> dict[str, str]:
        deployment = one(default_objects, "Deployment", name)
        [volume] = [v for v in pod_spec(deployment)["volumes"] if v.get("secret")]
        assert volume["secret"]["secretName"] == "iotistic-billing-license-keys"
        [mount] = [m for m in container(deployment)["volumeMounts"] if m["name"] == volume["name"]]
        return {f"{mount['mountPath']}/{i['path']}": i["key"] for i in volume["secret"]["items"]}

    operator_files, webhook_files = mounted_items(OPERATOR), mounted_items(WEBHOOK_SERVER)
    operator_env, webhook_env = (
        env_of(one(default_objects, "Deployment", OPERATOR)),
        env_of(one(default_objects, "Deployment", WEBHOOK_SERVER)),
    )

    assert operator_files[operator_env["LICENSE_PRIVATE_KEY_PATH"]["value"]] == "private-key.pem"
    assert operator_files[operator_env["LICENSE_PUBLIC_KEY_PATH"]["value"]] == "public-key.pem"
    assert webhook_files == {webhook_env["LICENSE_PUBLIC_KEY_PATH"]["value"]: "public-key.pem"}
    assert "LICENSE_PRIVATE_KEY_PATH" not in webhook_env


def test_retired_public_keys_are_mounted_for_rotation(helm: Path, tmp_path: Path) -> None:
    values = {"secrets": {"licenseKeys": {"extraPublicKeys": ["old-public-key.pem"]}}}
    objects = render(helm, tmp_path, values)

    for name in (OPERATOR, WEBHOOK_SERVER):
        deployment = one(objects, "Deployment", name)
        paths = json.loads(env_of(deployment)["LICENSE_EXTRA_PUBLIC_KEY_PATHS"]["value"])
        [volume] = [v for v in pod_spec(deployment)["volumes"] if v.get("secret")]
        assert paths == ["/etc/iotistic/license-keys/extra-public-key-0.pem"]
        assert {"key": "old-public-key.pem", "path": "extra-public-key-0.pem"} in volume["secret"]["items"]


def test_postgresql_s_ca_is_mounted_where_database_url_s_sslrootcert_names_it_in_every_container(
    helm: Path, tmp_path: Path, default_objects: list[Manifest]
) -> None:
    """Found in review: no container had PostgreSQL's CA, so sslmode=verify-full&sslrootcert=... failed
    the migrate init container, and a private CA (RDS, Cloud SQL, CloudNativePG) left sslmode=require,
    which does not authenticate the server. Every container that connects gets it, at one path."""

    def ca_files(deployment: Manifest, one_container: dict[str, Any]) -> dict[str, str]:
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        return {
            f"{mount['mountPath']}/{item['path']}": f"{volume['secret']['secretName']}:{item['key']}"
            for mount in one_container.get("volumeMounts", [])
            if mount["mountPath"] == "/etc/iotistic/postgresql" and mount.get("readOnly")
            for volume in [volumes[mount["name"]]]
            for item in volume["secret"]["items"]
        }

    def containers(objects: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
        return [
            (o, c)
            for o in objects
            if o["kind"] == "Deployment"
            for c in pod_spec(o).get("initContainers", []) + pod_spec(o)["containers"]
        ]

    values = {
        "operator": {"shards": 2},
        "secrets": {"database": {"caCert": {"name": "pg-ca", "key": "root.crt"}}},
    }
    found = containers(render(helm, tmp_path, values))

    # Both shards' operator and migrate, and the webhook server.
    assert sorted(c["name"] for _, c in found) == [
        "migrate",
        "migrate",
        "operator",
        "operator",
        "webhook-server",
    ]
    for deployment, one_container in found:
        assert ca_files(deployment, one_container) == {"/etc/iotistic/postgresql/root.crt": "pg-ca:root.crt"}
    assert not [c["name"] for d, c in containers(default_objects) if ca_files(d, c)]


# ----- secrets: named, never inlined -----

SENTINEL = "sk_test_MUSTNOTRENDER0123456789"


def test_credentials_come_from_the_named_secrets(helm: Path, tmp_path: Path) -> None:
    values = {
        "secrets": {
            "database": {"name": "pg-credentials", "key": "dsn"},
            "stripe": {"name": "stripe-live", "secretKey": "api-key", "webhookSecretKey": "signing"},
            "admin": {
                "name": "admin-token",
                "tokenKey": "bearer",
                "viewerTokenKey": "viewer",
                "sessionKeyKey": "cookie-key",
            },
            "licenseKeys": {"name": "licence-signing"},
            "notices": {"name": "notices", "smtpUrlKey": "smtp", "platformWebhookSecretKey": "hook"},
        },
        "config": {"notices": {"platformWebhookUrl": "https://hooks.example.com/iotistic"}},
    }
    objects = render(helm, tmp_path, values)
    references = {
        (deployment["metadata"]["name"], name): (
            item["valueFrom"]["secretKeyRef"]["name"],
            item["valueFrom"]["secretKeyRef"]["key"],
        )
        for deployment in objects
        if deployment["kind"] == "Deployment"
        for name, item in env_of(deployment).items()
        if name in CREDENTIAL_ENV
    }

    assert references == {
        (OPERATOR, "DATABASE_URL"): ("pg-credentials", "dsn"),
        (WEBHOOK_SERVER, "DATABASE_URL"): ("pg-credentials", "dsn"),
        (WEBHOOK_SERVER, "STRIPE_SECRET_KEY"): ("stripe-live", "api-key"),
        (WEBHOOK_SERVER, "STRIPE_WEBHOOK_SECRET"): ("stripe-live", "signing"),
        (WEBHOOK_SERVER, "ADMIN_API_TOKEN"): ("admin-token", "bearer"),
        (WEBHOOK_SERVER, "ADMIN_VIEWER_TOKEN"): ("admin-token", "viewer"),
        (WEBHOOK_SERVER, "CONSOLE_SESSION_KEY"): ("admin-token", "cookie-key"),
        (OPERATOR, "SMTP_URL"): ("notices", "smtp"),
        (WEBHOOK_SERVER, "SMTP_URL"): ("notices", "smtp"),
        (OPERATOR, "NOTIFY_WEBHOOK_SECRET"): ("notices", "hook"),
        (WEBHOOK_SERVER, "NOTIFY_WEBHOOK_SECRET"): ("notices", "hook"),
    }
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_the_notices_secret_s_smtp_key_is_required(helm: Path, tmp_path: Path) -> None:
    """Found in review: SMTP_URL's secretKeyRef was optional, and Kubernetes' optional covers the whole
    Secret: a misspelt secrets.notices.name, or a Secret made after the install (External Secrets,
    sealed secrets), started the pods without SMTP_URL, read once at start, and mail was dead without a
    word. Required, the pods wait (CreateContainerConfigError) until the Secret has the key."""
    objects = render(helm, tmp_path, {"secrets": {"notices": {"name": "notices"}}})

    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        assert env_of(deployment)["SMTP_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "notices",
            "key": "smtp-url",
        }


def test_without_a_mail_server_an_empty_smtp_key_sets_no_smtp_url_and_the_pods_need_the_webhook_key_only(
    helm: Path, tmp_path: Path
) -> None:
    """Found in review: a notices Secret holding only the platform webhook's secret is the install
    without a mail server, which says so with smtpUrlKey "" (the settings read an unset SMTP_URL as no
    mail server); the notes listed the Secret with no key the pods wait for."""
    from iotistic_billing.settings import Settings

    webhook = {"platformWebhookUrl": "https://hooks.example.com/iotistic"}
    values: dict[str, Any] = {"secrets": {"notices": {"name": "notices", "smtpUrlKey": ""}}}
    objects = render(helm, tmp_path, {**values, "config": {"notices": webhook}})

    references = set()
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        env = env_of(deployment)
        assert "SMTP_URL" not in env
        references |= {
            (ref["name"], ref["key"], ref.get("optional", False))
            for item in env.values()
            if (ref := item.get("valueFrom", {}).get("secretKeyRef")) and ref["name"] == "notices"
        }
    assert references == {("notices", "webhook-secret", False)}
    assert Settings.model_fields["smtp_url"].default is None
    notes = install_notes(helm, tmp_path, {**values, "config": {"notices": webhook}})
    assert "  notices (the notices' key webhook-secret)\n" in notes, notes
    # Without the platform webhook the pods read nothing of the Secret, and the notes do not name it.
    notes = install_notes(helm, tmp_path, values)
    assert "notices (" not in notes, notes


def test_both_components_get_the_dunning_ladder_s_restricted_days(helm: Path, tmp_path: Path) -> None:
    """Found in review: the operator's ladder and the inbox's "payment failed" notices both read
    DUNNING_RESTRICT_DAYS, which the chart set in neither: one component's extraEnv told customers a
    suspension date the operator did not keep."""
    objects = render(helm, tmp_path, {"config": {"dunningRestrictDays": 30}})

    assert {
        deployment["metadata"]["name"]: env_of(deployment)["DUNNING_RESTRICT_DAYS"]["value"]
        for deployment in objects
        if deployment["kind"] == "Deployment"
    } == {OPERATOR: "30", WEBHOOK_SERVER: "30"}


@pytest.mark.parametrize("component", ["operator", "webhookServer"])
@pytest.mark.parametrize(
    "variable", ["DUNNING_RESTRICT_DAYS", "LICENSE_ISSUER", "dunning_restrict_days", "License_Issuer"]
)
def test_extra_env_cannot_repeat_a_variable_the_chart_sets_for_both(
    helm: Path, component: str, variable: str
) -> None:
    """Found in review: an extraEnv entry for a setting both components read (set by the chart's
    config) won over the chart's value in that component alone, silently: the two then disagreed. And
    again in lower case, which the check compared as another name while the settings
    (case_sensitive=False) read it as the same one."""
    result = template(
        helm,
        "--set",
        f"{component}.extraEnv[0].name={variable}",
        "--set-string",
        f"{component}.extraEnv[0].value=30",
    )

    assert result.returncode != 0, "rendered the variable twice"
    assert f"{component}.extraEnv: {variable} is set by the chart" in result.stderr, result.stderr


@pytest.mark.parametrize("component", ["operator", "webhookServer"])
@pytest.mark.parametrize("variable", ["BILLING_NAMESPACE", "billing_namespace"])
@pytest.mark.parametrize(
    "given", [("value", "x"), ("valueFrom.fieldRef.fieldPath", "metadata.name")], ids=["value", "fieldRef"]
)
def test_extra_env_cannot_repeat_the_billing_namespace(
    helm: Path, component: str, variable: str, given: tuple[str, str]
) -> None:
    """Found in review: BILLING_NAMESPACE, which the chart gives both components from the Pod's
    namespace, was not refused (the check took the chart's entries with a value only): with
    webhookServer.extraEnv BILLING_NAMESPACE=x the operator kept deleted Customers' signing secrets in
    its namespace while the webhook server looked for them in x."""
    key, value = given
    result = template(
        helm,
        "--set",
        f"{component}.extraEnv[0].name={variable}",
        "--set-string",
        f"{component}.extraEnv[0].{key}={value}",
    )

    assert result.returncode != 0, "rendered the variable twice"
    assert f"{component}.extraEnv: {variable} is set by the chart" in result.stderr, result.stderr
    assert "metadata.namespace" in result.stderr, result.stderr


def test_without_stripe_and_admin_secrets_those_variables_are_absent(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, tmp_path, {"secrets": {"stripe": {"name": ""}, "admin": {"name": ""}}})

    env = env_of(one(objects, "Deployment", WEBHOOK_SERVER))
    assert (
        not {"STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "ADMIN_API_TOKEN", "CONSOLE_SESSION_KEY"}
        & env.keys()
    )


def test_every_replica_gets_the_console_session_key_from_the_admin_secret(
    helm: Path, default_objects: list[Manifest]
) -> None:
    env = env_of(one(default_objects, "Deployment", WEBHOOK_SERVER))
    assert env["CONSOLE_SESSION_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "iotistic-billing-admin",
        "key": "session-key",
    }
    # Required with the admin Secret: without it each replica would seal with a key of its own.
    result = template(helm, "--set", "secrets.admin.sessionKeyKey=")
    assert result.returncode != 0, "rendered the console without a session key"
    assert "secrets.admin.sessionKeyKey" in result.stderr and "CONSOLE_SESSION_KEY" in result.stderr


@pytest.mark.parametrize(
    "attempt",
    [
        ["--set", f"stripeSecretKey={SENTINEL}"],
        ["--set", f"secrets.stripe.value={SENTINEL}"],
        ["--set", f"config.stripe.secretKey={SENTINEL}"],
        ["--set", f"secrets.database.url=postgresql://u:{SENTINEL}@db/billing"],
        ["--set", f"secrets.admin.token={SENTINEL}"],
        [
            "--set",
            "webhookServer.extraEnv[0].name=STRIPE_SECRET_KEY",
            "--set",
            f"webhookServer.extraEnv[0].value={SENTINEL}",
        ],
        [
            "--set",
            "operator.extraEnv[0].name=DATABASE_URL",
            "--set",
            f"operator.extraEnv[0].value={SENTINEL}",
        ],
    ],
    ids=lambda attempt: attempt[1].split("=")[0],
)
def test_a_secret_value_has_nowhere_to_go(helm: Path, attempt: list[str]) -> None:
    result = template(helm, *attempt)

    assert result.returncode != 0, "the schema accepted a place for a secret value"
    assert SENTINEL not in result.stdout


def test_a_platform_webhook_without_its_secret_is_refused_by_name(helm: Path) -> None:
    result = template(
        helm,
        "--set",
        "config.notices.platformWebhookUrl=https://hooks.example.com/x",
    )

    assert result.returncode != 0, "rendered without NOTIFY_WEBHOOK_URL, silently"
    assert "config.notices.platformWebhookUrl" in result.stderr and "secrets.notices.name" in result.stderr


def test_the_schema_names_every_credential_variable() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    refused = schema["definitions"]["env"]["items"]["not"]["properties"]["name"]["pattern"]

    # In any case, as the settings read them: ^(?i:DATABASE_URL|...)$.
    names = re.fullmatch(r"\^\(\?i:([A-Z_|]+)\)\$", refused)
    assert names is not None, refused
    assert set(names.group(1).split("|")) == CREDENTIAL_ENV


@pytest.mark.parametrize("component", ["operator", "webhookServer"])
@pytest.mark.parametrize(
    "variable", sorted(CREDENTIAL_ENV) + sorted(name.lower() for name in CREDENTIAL_ENV) + ["Smtp_Url"]
)
def test_no_credential_variable_takes_an_inline_value(helm: Path, component: str, variable: str) -> None:
    """Found in review (in lower case): the schema's list compared names case-sensitively, so
    stripe_secret_key rendered with the key inline, which the settings (case_sensitive=False) read."""
    inline = [
        "--set",
        f"{component}.extraEnv[0].name={variable}",
        "--set",
        f"{component}.extraEnv[0].value={SENTINEL}",
    ]
    from_secret = ["--set", f"{component}.extraEnv[0].name={variable}"]
    from_secret += ["--set", f"{component}.extraEnv[0].valueFrom.secretKeyRef.name=elsewhere"]

    refused = template(helm, *inline)
    assert refused.returncode != 0 and f"{component}/extraEnv/0" in refused.stderr, refused.stderr
    assert SENTINEL not in refused.stdout
    assert template(helm, *from_secret).returncode == 0


def test_secret_names_and_keys_render_but_no_secret_value(helm: Path) -> None:
    text = render_text(helm, "--set", "secrets.stripe.name=stripe-live")

    assert "stripe-live" in text
    for marker in ("sk_live_", "sk_test_", "whsec_", "postgresql://", "BEGIN PRIVATE KEY", "BEGIN RSA"):
        assert marker not in text


# ----- RBAC -----


def test_cluster_roles_have_no_wildcards_and_no_rights_over_rbac(default_objects: list[Manifest]) -> None:
    for name in (OPERATOR, WEBHOOK_SERVER):
        for rule in rules(default_objects, name):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (name, rule)
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            assert "rbac.authorization.k8s.io" not in rule["apiGroups"], rule
            assert "pods" not in rule["resources"], rule
    for binding in (o for o in default_objects if o["kind"] == "ClusterRoleBinding"):
        name = binding["metadata"]["name"]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]


def test_every_rule_says_which_code_needs_it() -> None:
    for template in ("rbac-operator.yaml", "rbac-webhook-server.yaml"):
        lines = (CHART / "templates" / template).read_text().splitlines()
        for index, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                assert lines[index - 1].strip().startswith("#"), f"{template}:{index + 1} has no comment"


def test_every_module_a_template_cites_exists() -> None:
    """Found in review: the operator's RBAC cited operator/kube.py, which is k8s.py. Paths are the
    package's (iotistic_billing/ may be left out) or the repository's tests; Kopf's own are not checked."""
    cited = {
        (template.name, path)
        for template in (CHART / "templates").iterdir()
        for kopf, path in re.findall(r"(kopf )?\b((?:\w+/)+\w+\.py)\b", template.read_text())
        if not kopf
    }
    missing = [
        (name, path)
        for name, path in sorted(cited)
        if not (
            REPO / path
            if path.startswith(("iotistic_billing/", "tests/"))
            else REPO / "iotistic_billing" / path
        ).is_file()
    ]

    assert cited and not missing


def test_webhook_server_role_is_exactly_what_its_calls_need(
    default_objects: list[Manifest],
) -> None:
    assert rules(default_objects, WEBHOOK_SERVER) == [
        {
            "apiGroups": ["iotistic.io"],
            "resources": ["customers"],
            "verbs": ["get", "list", "create", "patch"],
        },
        # Usage metering's status.usage and WithinLimits (the Role once left it out: every flush of a
        # deployed server was a 403, seen when tests/integration/test_rbac.py made that call too).
        {"apiGroups": ["iotistic.io"], "resources": ["customers/status"], "verbs": ["patch"]},
        # The console's rollouts page, and its Pause, Resume and Abort, each after a read of the rollout
        # (the Role once left get out: every action of a deployed console was a 403, then a 503).
        {
            "apiGroups": ["iotistic.io"],
            "resources": ["instancerollouts"],
            "verbs": ["get", "list", "patch"],
        },
        # The console: the Events about a Customer, and its actions told as Events.
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["iotistic-license", "iotistic-notifications"],
            "verbs": ["get"],
        },
        # Its start's check of the served Customer CRD (served_crds), listed by that name alone.
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "resourceNames": ["customers.iotistic.io"],
            "verbs": ["list"],
        },
    ]
    # In its own namespace only, and that one Secret: the deleted Customers' kept signing secrets.
    role = one(default_objects, "Role", WEBHOOK_SERVER)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["iotistic-notifications-deleted"],
            "verbs": ["get", "patch"],
        }
    ]
    binding = one(default_objects, "RoleBinding", WEBHOOK_SERVER)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": WEBHOOK_SERVER,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": WEBHOOK_SERVER, "namespace": NAMESPACE}]


def test_operator_role_reads_pods_in_its_own_namespace_only(default_objects: list[Manifest]) -> None:
    """Whether the Pod a pending helm revision names is gone (operator/release.py): get, in the release
    namespace alone, where the operator's Pods run."""
    role = one(default_objects, "Role", OPERATOR)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    binding = one(default_objects, "RoleBinding", OPERATOR)
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]


# Kinds of charts/customer-instance and where RBAC names them. A kind the chart starts to render fails
# here until it is added both to this table and to the operator's ClusterRole.
INSTANCE_KINDS = {
    "ConfigMap": ("", "configmaps"),
    "Deployment": ("apps", "deployments"),
    "Ingress": ("networking.k8s.io", "ingresses"),
    "Secret": ("", "secrets"),
    "Service": ("", "services"),
    "ServiceAccount": ("", "serviceaccounts"),
    "StatefulSet": ("apps", "statefulsets"),
}
HELM_VERBS = {"get", "create", "patch", "delete"}


def test_operator_role_covers_every_kind_the_instance_chart_renders(
    helm: Path, tmp_path: Path, default_objects: list[Manifest]
) -> None:
    kinds: set[str] = set()
    instance_values: list[dict[str, Any] | None] = [
        None,
        {"customerId": "cust_rbac0001", "domain": "rbac.example.com", "ingress": {"tls": {"enabled": True}}},
        {"postgresql": {"persistence": {"enabled": False}}, "enabled": False},
    ]
    for values in instance_values:
        result = run(helm, "template", "instance", INSTANCE_CHART, *values_args(tmp_path, values))
        assert result.returncode == 0, result.stderr
        kinds |= {doc["kind"] for doc in parse(result.stdout)}
    operator_rules = rules(default_objects, OPERATOR)

    assert kinds <= INSTANCE_KINDS.keys(), f"new kinds in customer-instance: {kinds - INSTANCE_KINDS.keys()}"
    for kind in kinds:
        group, resource = INSTANCE_KINDS[kind]
        assert granted(operator_rules, group, resource) >= HELM_VERBS, kind
    # And nothing else is created or deleted: the namespaces (kube.apply, delete_namespace), the
    # peering (ensure_peering), Events (Kopf) are the operator's own.
    creatable = {
        (group, resource)
        for rule in operator_rules
        if {"create", "delete"} & set(rule["verbs"])
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert creatable - set(INSTANCE_KINDS.values()) == {
        ("", "namespaces"),
        ("kopf.dev", "clusterkopfpeerings"),
        ("", "events"),
    }


def test_the_kinds_a_newer_instance_chart_renders_are_granted_by_extra_rules(
    helm: Path, tmp_path: Path, default_objects: list[Manifest]
) -> None:
    """Found in review: the operator's ClusterRole names exactly the image's instance chart's kinds, and
    nothing could add one, so an instance chart version rendering a NetworkPolicy failed every upgrade
    with 403. operator.rbac.extraRules is appended to it, to it alone; a wildcard is refused."""
    extra = [
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": sorted(HELM_VERBS)},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": sorted(HELM_VERBS)},
    ]
    objects = render(helm, tmp_path, {"operator": {"rbac": {"extraRules": extra}}})

    assert rules(objects, OPERATOR) == rules(default_objects, OPERATOR) + extra
    assert granted(rules(objects, OPERATOR), "policy", "poddisruptionbudgets") == HELM_VERBS
    assert rules(objects, WEBHOOK_SERVER) == rules(default_objects, WEBHOOK_SERVER)

    for field in ("apiGroups", "resources", "verbs"):
        wildcard = [{**extra[0], field: ["*"]}]
        refused = template(helm, *values_args(tmp_path, {"operator": {"rbac": {"extraRules": wildcard}}}))
        assert refused.returncode != 0
        assert f"at '/operator/rbac/extraRules/0/{field}/0'" in refused.stderr, refused.stderr


# ----- network, ingress -----


def test_network_policies_admit_only_the_serving_ports(default_objects: list[Manifest]) -> None:
    def ingress_ports(name: str) -> set[int]:
        policy = one(default_objects, "NetworkPolicy", name)
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        return {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}

    def egress_ports(name: str) -> set[tuple[str, int]]:
        policy = one(default_objects, "NetworkPolicy", name)
        return {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}

    assert ingress_ports(OPERATOR) == {8080, 8081}
    assert ingress_ports(WEBHOOK_SERVER) == {3100, 3101}  # the server, and its Stripe inbox's /metrics
    common = {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6443), ("TCP", 5432)}
    assert egress_ports(OPERATOR) == common
    assert egress_ports(WEBHOOK_SERVER) == common | {("TCP", 80)}  # the notices' http:// webhooks
    webhook_egress = one(default_objects, "NetworkPolicy", WEBHOOK_SERVER)["spec"]["egress"]
    assert any(
        rule["ports"] == [{"protocol": "TCP", "port": 443}] and "ipBlock" in rule["to"][0]
        for rule in webhook_egress
    ), "HTTPS for Stripe"


def test_services_take_the_cluster_s_family_unless_the_ip_family_values_say(
    default_objects: list[Manifest], helm: Path, tmp_path: Path
) -> None:
    """The Services had no IP family value before, so a dual-stack cluster gave them its first
    family only, and a client of the other family could not reach the webhook server."""
    for name in (OPERATOR, WEBHOOK_SERVER):
        spec = one(default_objects, "Service", name)["spec"]
        assert "ipFamilyPolicy" not in spec and "ipFamilies" not in spec

    dual = {"service": {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6", "IPv4"]}}
    objects = render(helm, tmp_path, dual)
    for name in (OPERATOR, WEBHOOK_SERVER):
        spec = one(objects, "Service", name)["spec"]
        assert (spec["ipFamilyPolicy"], spec["ipFamilies"]) == ("PreferDualStack", ["IPv6", "IPv4"])

    # The API server refuses two families under a single-stack policy: the chart says so first.
    refused = template(helm, "--set", "service.ipFamilies={IPv4,IPv6}")
    assert refused.returncode != 0 and "/service/ipFamilyPolicy" in refused.stderr, refused.stderr
    refused = template(
        helm, "--set", "service.ipFamilies={IPv4,IPv4}", "--set", "service.ipFamilyPolicy=PreferDualStack"
    )
    assert refused.returncode != 0 and "/service/ipFamilies" in refused.stderr, refused.stderr


@pytest.mark.parametrize("port", [443, 6443, 5432, 80, 25, 8443])
def test_default_egress_reaches_an_ipv6_address_as_it_reaches_an_ipv4_one(
    helm: Path, tmp_path: Path, port: int
) -> None:
    """An IPv6-only cluster's API server, Stripe and webhook receivers have IPv6 addresses only."""
    values = {**NOTICES, **chart_from("oci://registry.example/charts/customer-instance")}
    for policy in (o for o in render(helm, tmp_path, values) if o["kind"] == "NetworkPolicy"):
        assert egress_allowed(policy, "2001:db8::9", port) == egress_allowed(policy, "198.51.100.9", port)


def egress_allowed(policy: Manifest, address: str, port: int) -> bool:
    """Whether a NetworkPolicy lets its pods open a TCP connection to an address outside the cluster:
    some egress rule takes the port (or names none) and the address (an ipBlock holding it, or no peer)."""
    target = ipaddress.ip_address(address)
    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
            continue
        peers = rule.get("to")
        if not peers:
            return True
        for peer in peers:
            block = peer.get("ipBlock")
            if (
                block
                and target in ipaddress.ip_network(block["cidr"])
                and not any(target in ipaddress.ip_network(e) for e in block.get("except", []))
            ):
                return True
    return False


# The API server's and Stripe's rules narrowed as values.yaml advises: what still gets through is allowed
# by a rule of its own, not by their 0.0.0.0/0 on 443.
NARROWED = {"apiServer": {"cidrs": ["10.96.0.1/32"]}, "https": {"cidrs": ["203.0.113.0/24"]}}
NOTICES = {"secrets": {"notices": {"name": "iotistic-billing-notices"}}}
SMTP_FROM_A_SECRET = {"name": "SMTP_URL", "valueFrom": {"secretKeyRef": {"name": "mail", "key": "url"}}}
SMTP_HOST, WEBHOOK_HOST, REGISTRY_HOST = "198.51.100.25", "198.51.100.80", "198.51.100.50"
METADATA = {("169.254.169.254", 80), ("169.254.169.254", 443)}


def policies(helm: Path, tmp_path: Path, values: dict[str, Any]) -> dict[str, Manifest]:
    narrowed = {**values, "networkPolicy": {**NARROWED, **values.get("networkPolicy", {})}}
    return {
        o["metadata"]["name"]: o for o in render(helm, tmp_path, narrowed) if o["kind"] == "NetworkPolicy"
    }


@pytest.mark.parametrize(
    ("values", "allowed", "denied"),
    [
        # SMTP_URL's server on whichever port it names: 25 (smtp://), 465 (smtps://), 587 (submission).
        (NOTICES, {(SMTP_HOST, 25), (SMTP_HOST, 465), (SMTP_HOST, 587)}, set()),
        (
            {**NOTICES, "networkPolicy": {"smtp": {"ports": [2525], "cidrs": ["198.51.100.0/24"]}}},
            {(SMTP_HOST, 2525)},
            {(SMTP_HOST, 587), ("192.0.2.25", 2525)},
        ),
        # No Secret with SMTP_URL: no mail is sent, no SMTP port is open.
        ({}, set(), {(SMTP_HOST, 25), (SMTP_HOST, 465), (SMTP_HOST, 587)}),
        # SMTP_URL from a Secret of one's own through extraEnv (found in review: the rule was not rendered,
        # and the mail was silently dropped), of either component; another variable opens nothing.
        (
            {"webhookServer": {"extraEnv": [SMTP_FROM_A_SECRET]}},
            {(SMTP_HOST, 25), (SMTP_HOST, 465), (SMTP_HOST, 587)},
            set(),
        ),
        (
            {"operator": {"extraEnv": [SMTP_FROM_A_SECRET]}},
            {(SMTP_HOST, 25), (SMTP_HOST, 465), (SMTP_HOST, 587)},
            set(),
        ),
        (
            {"webhookServer": {"extraEnv": [{"name": "NOTIFY_MAX_ATTEMPTS", "value": "12"}]}},
            set(),
            {(SMTP_HOST, 25), (SMTP_HOST, 465), (SMTP_HOST, 587)},
        ),
        # The customers' webhooks, http:// and https://, whatever Stripe's rule is narrowed to; not the
        # cloud's metadata service.
        # IPv6 as IPv4, link-local and AWS's IPv6 metadata service left out.
        (
            {},
            {(WEBHOOK_HOST, 80), (WEBHOOK_HOST, 443), ("2001:db8::80", 443)},
            {(WEBHOOK_HOST, 8443), *METADATA, ("fe80::1", 443), ("fd00:ec2::254", 80)},
        ),
        # The platform team's webhook on a port of its own.
        (
            {
                **NOTICES,
                "config": {"notices": {"platformWebhookUrl": "https://hooks.example.com:8443/iotistic"}},
            },
            {(WEBHOOK_HOST, 8443), (WEBHOOK_HOST, 80), (WEBHOOK_HOST, 443)},
            {(WEBHOOK_HOST, 8080), *METADATA, ("169.254.169.254", 8443)},
        ),
        # IPv6 too, with the link-local range left out of ::/0 (found in review: the schema refused ::/0).
        (
            {
                "networkPolicy": {
                    "webhooks": {"cidrs": ["0.0.0.0/0", "::/0"], "except": ["169.254.0.0/16", "fe80::/10"]}
                }
            },
            {(WEBHOOK_HOST, 443), ("2001:db8::80", 443)},
            {*METADATA, ("fe80::1", 443)},
        ),
    ],
    ids=[
        "smtp",
        "smtp-narrowed",
        "no-smtp",
        "smtp-by-extra-env",
        "smtp-by-operator-extra-env",
        "no-smtp-by-extra-env",
        "webhooks",
        "platform-webhook-port",
        "webhooks-ipv6",
    ],
)
def test_webhook_server_reaches_the_notices_smtp_server_and_webhooks(
    helm: Path,
    tmp_path: Path,
    values: dict[str, Any],
    allowed: set[tuple[str, int]],
    denied: set[tuple[str, int]],
) -> None:
    found = policies(helm, tmp_path, values)
    webhook_server, operator = found[WEBHOOK_SERVER], found[OPERATOR]

    assert {t for t in allowed | denied if egress_allowed(webhook_server, *t)} == allowed
    # The operator sends no notice.
    assert not [t for t in allowed if egress_allowed(operator, *t)]


def chart_from(reference: str, plain_http: bool = False) -> dict[str, Any]:
    return {
        "operator": {"instanceChart": {"reference": reference, "version": "1.2.3", "plainHttp": plain_http}}
    }


@pytest.mark.parametrize(
    ("values", "allowed", "denied"),
    [
        (chart_from("oci://ghcr.io/iotistic/charts/customer-instance"), {443}, {80, 5000}),
        (
            chart_from("oci://registry.example:5000/charts/customer-instance", plain_http=True),
            {5000},
            {80, 443},
        ),
        (chart_from("oci://registry.example/charts/customer-instance", plain_http=True), {80}, {443, 5000}),
        (
            {
                **chart_from("oci://registry.example/charts/customer-instance"),
                "networkPolicy": {
                    "instanceChartRegistry": {"ports": [443, 8443], "cidrs": ["198.51.100.0/24"]}
                },
            },
            {443, 8443},
            {80},
        ),
        # The chart the image carries: no registry.
        ({}, set(), {80, 443, 5000}),
    ],
    ids=["https", "plain-http-port", "plain-http", "ports-value", "no-registry"],
)
def test_operator_reaches_the_instance_chart_registry(
    helm: Path, tmp_path: Path, values: dict[str, Any], allowed: set[int], denied: set[int]
) -> None:
    found = policies(helm, tmp_path, values)

    assert {p for p in allowed | denied if egress_allowed(found[OPERATOR], REGISTRY_HOST, p)} == allowed
    assert not egress_allowed(found[WEBHOOK_SERVER], REGISTRY_HOST, 5000)


def test_extra_egress_goes_to_its_component_only(helm: Path, tmp_path: Path) -> None:
    relay = {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [{"protocol": "TCP", "port": 2525}]}
    proxy = {"to": [{"ipBlock": {"cidr": "192.0.2.20/32"}}], "ports": [{"protocol": "TCP", "port": 3128}]}
    found = policies(
        helm, tmp_path, {"networkPolicy": {"extraEgress": {"webhookServer": [relay], "operator": [proxy]}}}
    )

    assert egress_allowed(found[WEBHOOK_SERVER], "192.0.2.10", 2525)
    assert not egress_allowed(found[WEBHOOK_SERVER], "192.0.2.20", 3128)
    assert egress_allowed(found[OPERATOR], "192.0.2.20", 3128)
    assert not egress_allowed(found[OPERATOR], "192.0.2.10", 2525)


def test_ingress_routes_webhooks_and_instance_calls_only(helm: Path, tmp_path: Path) -> None:
    values = {"ingress": {"host": "billing.example.com", "className": "nginx", "tls": {"enabled": True}}}
    ingress = one(render(helm, tmp_path, values), "Ingress", RELEASE)
    [rule] = ingress["spec"]["rules"]
    paths = {p["path"] for p in rule["http"]["paths"]}

    assert rule["host"] == "billing.example.com"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["billing.example.com"], "secretName": f"{RELEASE}-tls"}]
    assert "/api/webhooks/stripe" in paths and "/api/usage" in paths
    assert not {"/", "/metrics", "/api/customers", "/api/subscriptions"} & paths
    for path in rule["http"]["paths"]:
        assert path["backend"]["service"] == {"name": WEBHOOK_SERVER, "port": {"name": "http"}}


def ingress_takes(paths: list[dict[str, Any]], path: str) -> bool:
    """Whether an Ingress rule's paths take a request path as Kubernetes defines the path types: Exact,
    the whole path; Prefix, element by element split on '/'. ImplementationSpecific is the controller's
    to define, so a default that used it could not be checked here."""
    for entry in paths:
        if entry["pathType"] == "Exact" and path == entry["path"]:
            return True
        if entry["pathType"] == "Prefix":
            wanted = [e for e in entry["path"].split("/") if e]
            if [e for e in path.split("/") if e][: len(wanted)] == wanted:
                return True
        assert entry["pathType"] in ("Exact", "Prefix"), entry
    return False


# What the default Ingress publishes: Stripe's webhook, the instances' usage routes, the public keys.
# GET /api/licenses/{customerId} is not among them: no standard path tells it from its admin siblings.
PUBLISHED_ROUTES = {
    ("POST", "/api/webhooks/stripe"),
    ("POST", "/api/usage/report"),
    ("GET", "/api/usage/{customerId}"),
    ("GET", "/api/licenses/public-key"),
    ("GET", "/.well-known/jwks.json"),
}


def test_default_ingress_publishes_no_admin_route_nor_console_page(default_objects: list[Manifest]) -> None:
    from iotistic_billing.webhook_server.console.pages import PAGES
    from iotistic_billing.webhook_server.route_table import ROUTES

    [rule] = one(default_objects, "Ingress", RELEASE)["spec"]["rules"]
    paths = rule["http"]["paths"]

    def published(path: str) -> bool:
        return ingress_takes(paths, re.sub(r"\{[^}]+\}", "cust_abc123", path))

    admin = [(r.method, r.path) for r in ROUTES if r.access == "admin" and published(r.path)]
    assert not admin, f"the Ingress publishes admin routes: {admin}"
    assert not [(p.method, p.path) for p in PAGES if published(p.path)]
    assert {(r.method, r.path) for r in ROUTES if published(r.path)} == PUBLISHED_ROUTES
    assert {r.access for r in ROUTES if (r.method, r.path) in PUBLISHED_ROUTES} == {
        "stripe",
        "instance",
        "public",
    }


def test_ingress_is_optional_and_tls_off_by_default(
    helm: Path, tmp_path: Path, default_objects: list[Manifest]
) -> None:
    assert "tls" not in one(default_objects, "Ingress", RELEASE)["spec"]
    assert not [o for o in render(helm, tmp_path, {"ingress": {"enabled": False}}) if o["kind"] == "Ingress"]


# ----- alerts -----


def exposed_series(registry: prometheus_client.CollectorRegistry) -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {
        family.name + suffix for family in registry.collect() for suffix in suffixes.get(family.type, ("",))
    }


def test_alerts_use_only_metrics_the_code_exposes(monitored_objects: list[Manifest]) -> None:
    import iotistic_billing.operator.metrics  # noqa: F401 - registers the operator's metrics
    from iotistic_billing.webhook_server.metrics import Metrics

    exposed = exposed_series(prometheus_client.REGISTRY) | exposed_series(Metrics().registry)
    rule = one(monitored_objects, "PrometheusRule", RELEASE)
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    # Metric names; not a label (iotistic_io_shard="1").
    used = {name for r in alerts for name in re.findall(r"\b(iotistic_[a-z_]+)\b(?!=)", r["expr"])}

    assert used <= exposed, used - exposed
    assert {
        "iotistic_operator_reconcile_errors_total",
        "iotistic_operator_customer_stalled",
        "iotistic_operator_license_expiry_timestamp_seconds",
        "iotistic_http_requests_total",
        "iotistic_stripe_webhook_events_total",
        "iotistic_readiness_check",
        "iotistic_subscriptions_left_billing",
    } <= used
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_the_cli_commands_alerts_tell_on_call_to_run_parse(monitored_objects: list[Manifest]) -> None:
    """Found in review: IotisticUsageNotBilled told on-call to run `iotistic-billing usage <customer id>`,
    which the CLI refuses (it takes --customer or --all): each command an alert names is parsed by the
    CLI's own parser, its <placeholders> filled in."""
    from iotistic_billing.cli import build_parser

    rule = one(monitored_objects, "PrometheusRule", RELEASE)
    texts = [
        text for group in rule["spec"]["groups"] for r in group["rules"] for text in r["annotations"].values()
    ]
    commands = [command for text in texts for command in re.findall(r"`iotistic-billing ([^`]+)`", text)]

    assert commands
    for command in commands:
        argv = re.sub(r"<[^>]+>", "cust_x", command).split()
        assert build_parser().parse_args(argv) is not None, command


def test_a_helm_call_killed_at_its_timeout_raises_an_alert(monitored_objects: list[Manifest]) -> None:
    """On the result label helm.py counts a killed helm under, whose series exist from the start (an
    increase() misses a series that first appears at 1)."""
    from iotistic_billing.operator.helm import TIMED_OUT, Helm

    rule = one(monitored_objects, "PrometheusRule", RELEASE)
    [alert] = [r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "IotisticHelmTimeouts"]
    assert f'iotistic_operator_helm_operations_total{{result="{TIMED_OUT}", ' in alert["expr"]
    assert "by (operation)" in alert["expr"] and "{{ $labels.operation }}" in alert["annotations"]["summary"]

    Helm("helm", None, 1, timeout=1)
    exposed = {
        sample.labels["operation"]
        for family in prometheus_client.REGISTRY.collect()
        if family.name == "iotistic_operator_helm_operations"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["result"] == TIMED_OUT
    }
    assert exposed >= {"pull", "upgrade", "uninstall", "rollback", "status", "get"}


def test_a_licence_that_ends_by_design_raises_no_expiring_alert(monitored_objects: list[Manifest]) -> None:
    """Found in review: IotisticLicenseExpiringSoon paged for every subscription set to cancel at its
    period's end (its licence capped there, not renewed by design) and for every trial's last licence.
    It leaves out the customers whose licence the operator exports as ending by design."""
    rule = one(monitored_objects, "PrometheusRule", RELEASE)
    [alert] = [
        r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "IotisticLicenseExpiringSoon"
    ]
    assert alert["expr"].endswith(
        f' unless on (customer_id) iotistic_operator_license_ends_by_design{{namespace="{NAMESPACE}"}} == 1'
    )
    assert "trial" not in alert["annotations"]["description"]


def scraped_up(objects: list[Manifest], down: set[str]) -> list[tuple[dict[str, str], float]]:
    """The `up` series of the operator's pods as the ServiceMonitor has Prometheus label them (job: the
    Service; the pod labels podTargetLabels names, "." and "/" as "_"): 0 for the Deployments in `down`."""
    copied = one(objects, "ServiceMonitor", OPERATOR)["spec"].get("podTargetLabels", [])
    series = []
    for deployment in objects:
        if deployment["kind"] != "Deployment" or not deployment["metadata"]["name"].startswith(OPERATOR):
            continue
        pod = deployment["spec"]["template"]["metadata"]["labels"]
        labels = {"job": OPERATOR, "namespace": NAMESPACE}
        labels |= {re.sub(r"[^a-zA-Z0-9_]", "_", key): pod[key] for key in copied if key in pod}
        series.append((labels, 0.0 if deployment["metadata"]["name"] in down else 1.0))
    return series


def absent_fires(expr: str, series: list[tuple[dict[str, str], float]]) -> bool:
    """`absent(up{...} == 1)` over `series`: the one form the operator's down alert takes."""
    match = re.fullmatch(r"absent\(up\{(.*)\} == 1\)", expr.strip())
    assert match, f"not absent(up{{...}} == 1): {expr}"
    matchers = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
    return not any(
        value == 1 and all(labels.get(key, "") == wanted for key, wanted in matchers.items())
        for labels, value in series
    )


@pytest.mark.parametrize("shards", [1, 3])
def test_operator_down_fires_for_each_shard_that_is_down(helm: Path, tmp_path: Path, shards: int) -> None:
    """One Service takes every shard's pods: an alert on the job alone stayed silent while one shard
    was down. The pods carry their shard, the ServiceMonitor copies it, and one alert a shard fires."""
    objects = render(helm, tmp_path, {**MONITORING, "operator": {"shards": shards}})
    rule = one(objects, "PrometheusRule", RELEASE)
    down_alerts = [
        r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "IotisticOperatorDown"
    ]
    operators = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Deployment" and o["metadata"]["name"].startswith(OPERATOR)
    ]
    assert len(operators) == shards

    assert not [r for r in down_alerts if absent_fires(r["expr"], scraped_up(objects, set()))]
    for shard, name in enumerate(operators):
        firing = [r for r in down_alerts if absent_fires(r["expr"], scraped_up(objects, {name}))]
        assert [r["labels"].get("shard") for r in firing] == [str(shard)], name
    everything_down = [r for r in down_alerts if absent_fires(r["expr"], scraped_up(objects, set(operators)))]
    assert len(everything_down) == shards


def test_the_webhook_server_and_its_stripe_inbox_each_raise_their_own_down_alert(
    monitored_objects: list[Manifest],
) -> None:
    """Found in review: IotisticWebhookServerDown was absent(up{job=...} == 1) over both endpoints the
    ServiceMonitor scrapes under that job (http, inbox), so an inbox still answering hid the server
    down, and nothing said when the inbox alone was down."""
    ports = [e["port"] for e in one(monitored_objects, "ServiceMonitor", WEBHOOK_SERVER)["spec"]["endpoints"]]
    rule = one(monitored_objects, "PrometheusRule", RELEASE)
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}

    def firing(down: set[str]) -> set[str]:
        # `up` as Prometheus labels it: job, the Service; endpoint, the ServiceMonitor's port name.
        series = [
            ({"job": WEBHOOK_SERVER, "namespace": NAMESPACE, "endpoint": port}, 0.0 if port in down else 1.0)
            for port in ports
        ]
        return {
            name
            for name in ("IotisticWebhookServerDown", "IotisticStripeInboxDown")
            if absent_fires(alerts[name], series)
        }

    assert sorted(ports) == ["http", "inbox"]
    assert firing(set()) == set()
    assert firing({"http"}) == {"IotisticWebhookServerDown"}
    assert firing({"inbox"}) == {"IotisticStripeInboxDown"}
    assert firing({"http", "inbox"}) == {"IotisticWebhookServerDown", "IotisticStripeInboxDown"}


def webhook_alerts(objects: list[Manifest]) -> list[dict[str, Any]]:
    rule = one(objects, "PrometheusRule", RELEASE)
    [group] = [g for g in rule["spec"]["groups"] if g["name"] == "iotistic-billing.webhook-server"]
    return cast(list[dict[str, Any]], group["rules"])


def test_each_readiness_check_that_takes_replicas_out_raises_a_critical_alert_naming_it(
    monitored_objects: list[Manifest],
) -> None:
    """Found in review: a PostgreSQL outage fired no alert. Every replica failed /readyz and left the
    Service, so no request reached the server: its 5xx alerts saw nothing (the error rate 0/0), and
    `up` stayed 1 (the ServiceMonitor scrapes unready endpoints). The alerts read the checks themselves
    (iotistic_readiness_check, set at each scrape), one per check that makes /readyz fail."""
    from iotistic_billing.webhook_server.probes import GATING

    alerts = webhook_alerts(monitored_objects)
    for check in GATING:
        [alert] = [a for a in alerts if a["labels"].get("check") == check]
        assert f'iotistic_readiness_check{{check="{check}", namespace="{NAMESPACE}"}}' in alert["expr"]
        assert alert["labels"]["severity"] == "critical", alert["alert"]
        assert "up{" not in alert["expr"] and "iotistic_http_requests" not in alert["expr"]
    by_check = {a["labels"]["check"]: a["alert"] for a in alerts if "check" in a["labels"]}
    assert by_check == {"database": "IotisticDatabaseUnavailable", "schema": "IotisticDatabaseSchemaBehind"}


def test_events_the_inbox_keeps_retrying_raise_an_alert(monitored_objects: list[Manifest]) -> None:
    """Found in review: an inbox that ran but applied nothing (its ClusterRole without patch, every
    write refused 403) retried each event for ever and fired no alert: it was up, and answered Stripe."""
    from iotistic_billing.stripe_inbox.inbox import RETRY

    [alert] = [a for a in webhook_alerts(monitored_objects) if a["alert"] == "IotisticStripeEventsNotApplied"]
    assert (
        f'iotistic_stripe_webhook_events_total{{result="{RETRY}", namespace="{NAMESPACE}"}}' in alert["expr"]
    )
    assert alert["for"] == "30m"


def test_a_subscription_still_billing_a_deleted_customer_raises_an_alert_saying_how_to_cancel_it(
    monitored_objects: list[Manifest],
) -> None:
    """Found in review: a Customer deleted with its subscription open (a GitOps prune at night) had one
    Warning Event, dropped by the API server within the hour, and no alert: Stripe billed on for an
    instance that was gone. The alert reads the gauge the server counts from the state itself."""
    [alert] = [
        a for a in webhook_alerts(monitored_objects) if a["alert"] == "IotisticSubscriptionLeftBilling"
    ]
    assert alert["expr"] == f'max(iotistic_subscriptions_left_billing{{namespace="{NAMESPACE}"}}) > 0'
    assert (alert["labels"]["severity"], alert["for"]) == ("warning", "30m")
    description = alert["annotations"]["description"]
    assert "console's overview" in description and "Stripe's Dashboard" in description
    assert (
        'POST /api/subscriptions/cancel {"customer_id": "<customer id>",'
        ' "subscription_id": "<subscription id>", "immediately": true}' in description
    )


def test_usage_runs_that_never_succeed_raise_an_alert_by_run(
    helm: Path, tmp_path: Path, monitored_objects: list[Manifest]
) -> None:
    """Found in review: a meter run that raised every time was one traceback an hour and no alert
    (IotisticUsageNotBilled counts only runs that complete): no period closed, nothing went to Stripe,
    partitions stopped being dropped, and after 35 days Stripe took no more events. The alert fires on
    no ok run in 3 meter intervals of the setting's default, over every replica (one runs under the lock,
    the others skip, which is no failure), by run."""
    from iotistic_billing.settings import Settings

    [alert] = [a for a in webhook_alerts(monitored_objects) if a["alert"] == "IotisticUsageRunsFailing"]
    window = f"{3 * Settings.model_fields['usage_meter_interval'].default / 3600:g}h"
    assert window == "3h"

    def runs(which: str, result: str) -> str:
        selector = f'{which}, result="{result}", namespace="{NAMESPACE}"'
        return f"sum by (run) (increase(iotistic_usage_runs_total{{{selector}}}[{window}]))"

    # A flush runs only when reports came: it alerts on failures without a success, not on a quiet hour.
    flush, others = 'run="flush"', 'run!="flush"'
    assert alert["expr"] == (
        f"{runs(others, 'ok')} == 0 or ({runs(flush, 'failed')} > 0 and {runs(flush, 'ok')} == 0)"
    )
    assert "{{ $labels.run }}" in alert["annotations"]["summary"]

    longer = render(
        helm,
        tmp_path,
        {
            "monitoring": {
                **MONITORING["monitoring"],
                "prometheusRule": {"enabled": True, "usageRunWindow": "36h"},
            }
        },
    )
    [alert] = [a for a in webhook_alerts(longer) if a["alert"] == "IotisticUsageRunsFailing"]
    assert "[36h]" in alert["expr"] and "36h" in alert["annotations"]["summary"]


def usage_run_values(window: str | None, *interval: dict[str, Any]) -> dict[str, Any]:
    """The alerts on, with usageRunWindow `window` and webhookServer.extraEnv `interval`'s entries."""
    rule = {"enabled": True, "usageRunWindow": window}
    return {
        "monitoring": {**MONITORING["monitoring"], "prometheusRule": rule},
        "webhookServer": {"extraEnv": list(interval)},
    }


@pytest.mark.parametrize(
    ("interval", "window"),
    [
        ("21600", "18h"),  # 6 h runs: 3 of them
        ("43200", "36h"),
        ("5400", "270m"),
        ("3600.5", "181m"),  # whole minutes, rounded up
        ("1800", "3h"),  # never below 3h
        ("3.6e+3", "3h"),
    ],
)
def test_the_usage_run_window_follows_the_meter_interval(
    helm: Path, tmp_path: Path, interval: str, window: str
) -> None:
    """Found in review: IotisticUsageRunsFailing looked back a fixed 3h (usageRunWindow), so a webhook
    server given USAGE_METER_INTERVAL=21600 (webhookServer.extraEnv, the README's way) fired it between
    every two healthy meter runs unless usageRunWindow was raised too, which only a comment said. Left
    empty it is 3 x the interval, at least 3h; the settings read the name in any case."""
    env = {"name": "usage_meter_interval", "value": interval}
    for values in (usage_run_values("", env), usage_run_values(None, env)):
        [alert] = [
            a
            for a in webhook_alerts(render(helm, tmp_path, values))
            if a["alert"] == "IotisticUsageRunsFailing"
        ]
        assert alert["expr"].count(f"[{window}]") == 3, alert["expr"]
        assert alert["annotations"]["summary"].endswith(f"in the last {window}.")


def test_a_usage_run_window_shorter_than_two_meter_runs_is_refused(helm: Path, tmp_path: Path) -> None:
    """Found in review: a usageRunWindow kept at 3h (a release upgraded with --reuse-values holds its
    old default) under USAGE_METER_INTERVAL=21600 rendered, and alerted between healthy runs. A window
    that holds two meter runs renders; one that cannot be checked (the interval from valueFrom) renders
    only when given."""
    six_hours = {"name": "USAGE_METER_INTERVAL", "value": "21600"}
    refused = template(helm, *values_args(tmp_path, usage_run_values("3h", six_hours)))
    assert refused.returncode != 0
    assert (
        "monitoring.prometheusRule.usageRunWindow: 3h holds fewer than two meter runs at"
        " USAGE_METER_INTERVAL 21600 s" in refused.stderr
    ), refused.stderr
    assert "give at least 12h" in refused.stderr
    # The chart's default interval: 2 runs of 3600 s.
    assert template(helm, *values_args(tmp_path, usage_run_values("119m"))).returncode != 0
    for window in ("12h", "720m"):
        objects = render(helm, tmp_path, usage_run_values(window, six_hours))
        [alert] = [a for a in webhook_alerts(objects) if a["alert"] == "IotisticUsageRunsFailing"]
        assert f"[{window}]" in alert["expr"]

    from_config_map = {
        "name": "USAGE_METER_INTERVAL",
        "valueFrom": {"configMapKeyRef": {"name": "usage", "key": "meter-interval"}},
    }
    unread = template(helm, *values_args(tmp_path, usage_run_values("", six_hours, from_config_map)))
    assert unread.returncode != 0
    assert "USAGE_METER_INTERVAL through valueFrom, which the chart cannot read" in unread.stderr
    given = render(helm, tmp_path, usage_run_values("3h", six_hours, from_config_map))
    assert [a for a in webhook_alerts(given) if a["alert"] == "IotisticUsageRunsFailing"]
    bad = template(helm, *values_args(tmp_path, usage_run_values("", {**six_hours, "value": "6h"})))
    assert bad.returncode != 0
    assert "USAGE_METER_INTERVAL must be a number of seconds" in bad.stderr, bad.stderr


# ----- the kustomize base -----


def test_kustomize_base_is_the_current_render_of_the_chart(helm: Path, tmp_path: Path) -> None:
    result = run(sys.executable, BASE / "generate.py", "--out", tmp_path, "--helm", helm)
    assert result.returncode == 0, result.stderr

    generated = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in BASE.glob("*.yaml")}
    assert generated == committed, "manifests/base is stale: run python manifests/base/generate.py"


def test_kustomize_base_has_the_objects_of_the_chart(helm: Path, kubectl: Path) -> None:
    def identities(objects: list[Manifest]) -> set[tuple[str, str, str | None]]:
        return {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objects}

    built = run(kubectl, "kustomize", BASE)
    assert built.returncode == 0, built.stderr

    assert identities(parse(built.stdout)) == identities(parse(render_text(helm, "--include-crds")))


# ----- what the README and NOTES say -----


def readme_section(title: str) -> str:
    """A section of the chart's README, its lines joined (a verb list may wrap)."""
    text = (CHART / "README.md").read_text()
    return " ".join(text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0].split())


def test_chart_readme_names_every_crd() -> None:
    intro = (CHART / "README.md").read_text().split("\n## ", 1)[0]
    names = {
        doc["metadata"]["name"] for path in (CHART / "crds").glob("*.yaml") for doc in parse(path.read_text())
    }

    assert names and not [name for name in names if f"`{name}`" not in intro]


def test_chart_readme_names_every_setting_the_chart_has_no_value_for() -> None:
    """Found in review: the list left out WRONG_TOKENS_PER_MINUTE and WRONG_TOKENS_PER_MINUTE_TOTAL,
    which no template sets, so it did not say that webhookServer.extraEnv is where they go."""
    from iotistic_billing.settings import Settings

    templates = "".join(path.read_text() for path in (CHART / "templates").iterdir())
    # The plans' prices are set in a loop over config.stripe.prices (STRIPE_PRICE_{{ upper $plan }}).
    looped = "STRIPE_PRICE_{{ upper $plan }}" in templates
    # Set: an env entry's name. The PrometheusRule reads USAGE_METER_INTERVAL from extraEnv, not sets it.
    unset = {
        name.upper()
        for name in Settings.model_fields
        if f"name: {name.upper()}\n" not in templates
        and not (looped and name.upper().startswith("STRIPE_PRICE_"))
    }
    text = " ".join((CHART / "README.md").read_text().split())
    listed = text.split("Settings the chart has no value for", 1)[1].split(" are set through ", 1)[0]

    assert set(re.findall(r"`([A-Z_]+)`", listed)) == unset


def test_chart_readme_rbac_says_what_each_component_is_granted(default_objects: list[Manifest]) -> None:
    """Every resource and Secret name the roles grant is in the component's bullet, and where the bullet
    gives a resource's verbs (`resource` `verb, verb`) they are those granted."""
    bullets = dict(part.split(": ", 1) for part in readme_section("RBAC").split(" - ")[1:])
    granted = {
        component: rules(default_objects, name) + one(default_objects, "Role", name)["rules"]
        for component, name in (("operator", OPERATOR), ("webhook server", WEBHOOK_SERVER))
    }

    assert bullets.keys() == granted.keys()
    for component, role_rules in granted.items():
        text = bullets[component]
        for rule in role_rules:
            for name in rule["resources"] + rule.get("resourceNames", []):
                assert f"`{name}`" in text, (component, name)
        for resource in {resource for rule in role_rules for resource in rule["resources"]}:
            said = {
                tuple(sorted(v.split(", ")))
                for v in re.findall(rf"`{re.escape(resource)}` `([a-z, ]+)`", text)
            }
            verbs = {tuple(sorted(rule["verbs"])) for rule in role_rules if resource in rule["resources"]}
            assert not said or said == verbs, (component, resource, said, verbs)


def install_notes(helm: Path, tmp_path: Path, values: dict[str, Any]) -> str:
    """NOTES.txt as `helm install` prints it (a client-side dry run: no cluster)."""
    args = values_args(tmp_path, values)
    installed = subprocess.run(
        [str(helm), "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")},
    )
    assert installed.returncode == 0, installed.stderr
    return installed.stdout.split("\nNOTES:\n", 1)[1]


def test_notes_name_each_shard_s_operator_deployment_and_its_peering(helm: Path, tmp_path: Path) -> None:
    """Found in review: the notes said "one replica" whatever operator.shards said."""
    assert f'Deployment {OPERATOR} (one replica, Kopf peering "iotistic-billing")' in install_notes(
        helm, tmp_path, {}
    )

    notes = install_notes(helm, tmp_path, {"operator": {"shards": 3}})
    [line] = [line for line in notes.splitlines() if line.strip().startswith("operator")]
    assert "one replica," not in line, line
    for shard, name in enumerate([OPERATOR, f"{OPERATOR}-shard-1", f"{OPERATOR}-shard-2"]):
        peering = "iotistic-billing" + (f"-shard-{shard}" if shard else "")
        assert f'{name} (shard {shard}, one replica, Kopf peering "{peering}")' in notes, notes


def test_notes_warn_of_an_ingress_without_trusted_proxies(helm: Path, tmp_path: Path) -> None:
    """Found in review: with the defaults (an Ingress, no trusted proxy) every request comes from the
    ingress controller's address, one rate-limit bucket: anyone sending 401s uses up every instance's."""
    warning = "webhookServer.rateLimit.trustedProxies is empty"
    assert warning in install_notes(helm, tmp_path, {})
    trusted = {"webhookServer": {"rateLimit": {"trustedProxies": ["10.0.5.0/24"]}}}
    assert warning not in install_notes(helm, tmp_path, trusted)
    assert warning not in install_notes(helm, tmp_path, {"ingress": {"enabled": False}})
    for name in ("TRUSTED_PROXIES", "trusted_proxies"):  # the settings read either (case_sensitive=False)
        by_env = {"webhookServer": {"extraEnv": [{"name": name, "value": '["10.0.5.0/24"]'}]}}
        assert warning not in install_notes(helm, tmp_path, by_env), name


def test_notes_name_every_secret_the_pods_wait_for(helm: Path, tmp_path: Path) -> None:
    values = {
        "secrets": {
            "admin": {"viewerTokenKey": "viewer"},
            "database": {"caCert": {"name": "postgresql-ca"}},
            "notices": {"name": "iotistic-billing-notices"},
            "licenseKeys": {"extraPublicKeys": ["old-public-key.pem"]},
        },
        "config": {"notices": {"platformWebhookUrl": "https://hooks.example.com/iotistic"}},
        "operator": {
            "instanceChart": {
                "reference": "oci://registry.example/charts/customer-instance",
                "version": "1.2.3",
                "credentialsSecret": "registry-login",
            }
        },
    }
    notes = install_notes(helm, tmp_path, values)
    waited: set[tuple[str, str]] = set()
    for deployment in (o for o in render(helm, tmp_path, values) if o["kind"] == "Deployment"):
        for item in container(deployment)["env"]:
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                waited.add((ref["name"], ref["key"]))
        for volume in pod_spec(deployment)["volumes"]:
            if "secret" in volume:
                waited |= {
                    (volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]
                }
    lines = {line.strip().split(" (", 1)[0]: line for line in notes.splitlines()}

    assert len(waited) == 13
    for name, key in waited:
        assert name in lines and key in lines[name], (name, key, notes)


# ----- the environment is the settings -----

NOT_SETTINGS = {"HOME", "PYTHONDONTWRITEBYTECODE", "HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"}


@pytest.mark.parametrize("name", [OPERATOR, WEBHOOK_SERVER])
def test_every_variable_the_chart_sets_is_a_setting_the_code_reads(
    helm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from iotistic_billing.settings import Settings, load_settings

    values = {
        "secrets": {"licenseKeys": {"extraPublicKeys": ["old.pem"]}},
        "config": {
            "stripe": {"prices": {"starter": "price_s"}, "meteredPrices": ["price_m1", "price_m2"]},
            "notices": {"webhookAllowedCidrs": ["10.20.0.0/16"]},
        },
        "webhookServer": {"accessLog": False},
    }
    env = env_of(one(render(helm, tmp_path, values), "Deployment", name))
    unknown = {var for var in env.keys() - NOT_SETTINGS if var.lower() not in Settings.model_fields}
    assert not unknown, f"not in iotistic_billing/settings.py: {unknown}"

    for var in list(Settings.model_fields):
        monkeypatch.delenv(var.upper(), raising=False)
    credentials = {
        "DATABASE_URL": "postgresql://billing@db/billing",
        "ADMIN_API_TOKEN": "t" * 32,
        "CONSOLE_SESSION_KEY": "k" * 44,
        "STRIPE_SECRET_KEY": "sk_test_x",
        "STRIPE_WEBHOOK_SECRET": "whsec_x",
    }
    for var, item in env.items():
        if "value" in item:
            monkeypatch.setenv(var, item["value"])
        elif "fieldRef" in item["valueFrom"]:  # the Pod's own fields, as the kubelet fills them in
            pod = {
                "metadata.name": "iotistic-billing-operator-5f7d8c9b6d-x2x4q",
                "metadata.uid": "2f1c0e9a-5b7d-4c3e-9f8a-1b2c3d4e5f60",
                "metadata.namespace": NAMESPACE,
                "status.podIP": "fd00:10:244::7",
            }
            monkeypatch.setenv(var, pod[item["valueFrom"]["fieldRef"]["fieldPath"]])
        else:
            monkeypatch.setenv(var, credentials[var])
    settings = load_settings()
    assert settings.billing_namespace == NAMESPACE

    assert settings.license_public_key_path == Path("/etc/iotistic/license-keys/public-key.pem")
    assert settings.license_extra_public_key_paths == [
        Path("/etc/iotistic/license-keys/extra-public-key-0.pem")
    ]
    assert settings.billing_url == "http://iotistic-billing-webhook-server.iotistic-system.svc:3100"
    if name == OPERATOR:
        assert settings.instance_chart == "/app/charts/customer-instance"
        assert settings.operator_peering == "iotistic-billing"
        assert settings.license_private_key_path == Path("/etc/iotistic/license-keys/private-key.pem")
        assert str(settings.pod_ip) == "fd00:10:244::7"
        assert settings.pod_name == "iotistic-billing-operator-5f7d8c9b6d-x2x4q"
        assert settings.pod_uid == "2f1c0e9a-5b7d-4c3e-9f8a-1b2c3d4e5f60"
    else:
        assert settings.port == 3100 and settings.license_private_key_path is None
        assert settings.stripe_price_starter == "price_s"
        assert settings.stripe_metered_prices == ["price_m1", "price_m2"]
        assert [str(network) for network in settings.notify_webhook_allowed_cidrs] == ["10.20.0.0/16"]
        assert settings.access_log is False


def test_values_this_chart_added_default_for_a_release_upgraded_with_its_old_values(
    helm: Path, tmp_path: Path
) -> None:
    """Found in review: `helm upgrade --reuse-values` of a release installed before webhookServer.accessLog
    and monitoring.prometheusRule.usageRunWindow renders them as nothing: ACCESS_LOG="" stopped the new
    webhook-server pods (not a boolean), and the alert's range was empty PromQL. Null removes a default
    as the old release's values lack it."""
    values = {
        "webhookServer": {"accessLog": None},
        "monitoring": {
            **MONITORING["monitoring"],
            "prometheusRule": {"enabled": True, "usageRunWindow": None},
        },
    }
    objects = render(helm, tmp_path, values)
    assert env_of(one(objects, "Deployment", WEBHOOK_SERVER))["ACCESS_LOG"]["value"] == "true"
    [alert] = [a for a in webhook_alerts(objects) if a["alert"] == "IotisticUsageRunsFailing"]
    assert "[3h]" in alert["expr"] and "[]" not in alert["expr"]
