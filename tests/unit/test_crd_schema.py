"""The Customer CRD and the pydantic models in iotistic_billing.customer describe the same resource.

Both are walked side by side: every property, required field, enum, default, bound and pattern must
agree, and a difference fails with its path (spec.trial.days: ...). Runs without a cluster.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from iotistic_billing import customer
from iotistic_billing.k8s import FieldManager
from iotistic_billing.operator.values import LICENSED_COMPONENTS, OPERATOR_ENV_NAMES, OPERATOR_ENV_PREFIXES

CRD_PATH = Path(__file__).parents[2] / "crds" / "customers.iotistic.io.yaml"

# Keys compared as they are; formats only where the model can express them (not int64).
CONSTRAINT_KEYS = ("type", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems")
COMPARED_FORMATS = {"date-time", "date", "email"}
MISSING: Any = object()

Diffs = list[str]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(loaded, dict)
    return loaded


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


# ----- walking the model's JSON schema and the CRD schema side by side -----


def resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Follow $ref and drop the `null` branch of Optional, keeping the outer keys (default, ...)."""
    while True:
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            continue
        if "anyOf" in node:
            members = [m for m in node["anyOf"] if m.get("type") != "null"]
            if len(members) == 1 and len(node["anyOf"]) == 2:
                node = {**{k: v for k, v in node.items() if k != "anyOf"}, **members[0]}
                continue
        return node


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, directly or inside Optional/list/Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def apply_crd_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server stores for `value`: nested defaults filled in, as structural defaulting does."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    result = dict(value)
    for name, prop in schema["properties"].items():
        if name not in result and "default" in prop:
            result[name] = copy.deepcopy(prop["default"])
        if name in result:
            result[name] = apply_crd_defaults(prop, result[name])
    return result


def model_default(model: type[BaseModel], alias: str) -> Any:
    field = next(f for name, f in model.model_fields.items() if (f.alias or name) == alias)
    if field.is_required():
        return MISSING
    default = to_jsonable_python(
        field.get_default(call_default_factory=True, validated_data={}), by_alias=True, exclude_none=True
    )
    return MISSING if default is None else default


def compare(
    path: str,
    crd_node: dict[str, Any],
    model_node: dict[str, Any],
    defs: dict[str, Any],
    model: type[BaseModel] | None,
) -> Iterator[str]:
    model_node = resolve(model_node, defs)
    for key in CONSTRAINT_KEYS:
        crd_value, model_value = crd_node.get(key, MISSING), model_node.get(key, MISSING)
        if crd_value != model_value:
            yield f"{path}: {key} is {shown(crd_value)} in the CRD but {shown(model_value)} in the model"
    crd_format = crd_node.get("format") if crd_node.get("format") in COMPARED_FORMATS else None
    if crd_format != model_node.get("format"):
        yield f"{path}: format is {crd_format!r} in the CRD but {model_node.get('format')!r} in the model"
    crd_enum, model_enum = crd_node.get("enum"), model_node.get("enum")
    if (crd_enum is None) != (model_enum is None) or set(crd_enum or ()) != set(model_enum or ()):
        yield f"{path}: enum is {crd_enum} in the CRD but {model_enum} in the model"

    crd_open = bool(crd_node.get("x-kubernetes-preserve-unknown-fields"))
    model_open = model_node.get("additionalProperties") is True
    if crd_open != model_open:
        yield f"{path}: free-form is {crd_open} in the CRD but {model_open} in the model"

    if "items" in crd_node or "items" in model_node:
        if "items" not in crd_node or "items" not in model_node:
            yield f"{path}: array items declared on one side only"
        else:
            yield from compare(f"{path}[]", crd_node["items"], model_node["items"], defs, model)

    crd_props: dict[str, Any] = crd_node.get("properties", {})
    model_props: dict[str, Any] = model_node.get("properties", {})
    if crd_open and model_open:
        # A free-form node's declared keys are the CRD's refusals (the operator's own values), which the
        # model must still read on a Customer applied before them.
        return
    for name in sorted(crd_props.keys() - model_props.keys()):
        yield f"{path}.{name}: in the CRD but not in the model"
    for name in sorted(model_props.keys() - crd_props.keys()):
        yield f"{path}.{name}: in the model but not in the CRD"
    crd_required, model_required = set(crd_node.get("required", [])), set(model_node.get("required", []))
    for name in sorted(crd_required ^ model_required):
        side = "the CRD" if name in crd_required else "the model"
        yield f"{path}.{name}: required only in {side}"

    for name in sorted(crd_props.keys() & model_props.keys()):
        child_path, crd_child = f"{path}.{name}", crd_props[name]
        child_model = None
        if model is not None:
            field = next(f for fname, f in model.model_fields.items() if (f.alias or fname) == name)
            child_model = model_in(field.annotation)
            crd_default = crd_child.get("default", MISSING)
            if crd_default is not MISSING:
                crd_default = apply_crd_defaults(crd_child, crd_default)
            default = model_default(model, name)
            if crd_default != default:
                yield (
                    f"{child_path}: default is {shown(crd_default)} in the CRD (after nested defaults) "
                    f"but {shown(default)} in the model"
                )
        yield from compare(child_path, crd_child, model_props[name], defs, child_model)


def shown(value: Any) -> str:
    return "unset" if value is MISSING else repr(value)


def schema_diffs(crd: dict[str, Any], section: str, model: type[BaseModel]) -> Diffs:
    json_schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = json_schema.get("$defs", {})
    return list(compare(section, openapi_schema(crd)["properties"][section], json_schema, defs, model))


def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


# ----- the tests -----


def test_spec_schema_matches_customer_spec_model(crd: dict[str, Any]) -> None:
    diffs = schema_diffs(crd, "spec", customer.CustomerSpec)
    assert not diffs, "CRD and CustomerSpec disagree:\n" + "\n".join(diffs)


def test_status_schema_matches_customer_status_model(crd: dict[str, Any]) -> None:
    diffs = schema_diffs(crd, "status", customer.CustomerStatus)
    assert not diffs, "CRD and CustomerStatus disagree:\n" + "\n".join(diffs)


def test_top_level_properties_match_customer_model(crd: dict[str, Any]) -> None:
    aliases = {field.alias or name for name, field in customer.Customer.model_fields.items()}
    assert set(openapi_schema(crd)["properties"]) == aliases
    assert openapi_schema(crd)["required"] == ["spec"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda s: s["spec"]["properties"]["trial"]["properties"]["days"].update(maximum=91),
            "spec.trial.days",
        ),
        (lambda s: s["spec"]["properties"]["plan"].update(default="starter"), "spec.plan: default"),
        (
            lambda s: s["spec"]["properties"]["billing"]["properties"].pop("mode"),
            "spec.billing.mode: in the model",
        ),
        (lambda s: s["spec"]["required"].append("contactName"), "spec.contactName: required only in the CRD"),
        (lambda s: s["status"]["properties"]["phase"]["enum"].pop(), "status.phase: enum"),
        (
            lambda s: s["status"]["properties"]["license"]["properties"].update(extra={}),
            "status.license.extra",
        ),
        (
            lambda s: s["status"]["properties"]["conditions"]["items"]["properties"]["reason"].update(
                pattern="^x$"
            ),
            "status.conditions[].reason: pattern",
        ),
        (lambda s: s["spec"]["properties"]["instance"].update(default=None), "spec.instance: default"),
    ],
)
def test_a_disagreement_is_reported_with_its_path(crd: dict[str, Any], mutate: Any, expected: str) -> None:
    changed = copy.deepcopy(crd)
    mutate(openapi_schema(changed)["properties"])
    diffs = schema_diffs(changed, "spec", customer.CustomerSpec) + schema_diffs(
        changed, "status", customer.CustomerStatus
    )
    assert any(diff.startswith(expected) for diff in diffs), diffs


def undocumented(crd: dict[str, Any]) -> list[str]:
    """Properties without a description (kubectl explain shows nothing); metadata is the one exception:
    the API server refuses anything but `type` there."""
    return [
        path
        for path, node in walk(openapi_schema(crd), "")
        if path != "metadata" and not str(node.get("description", "")).strip()
    ]


def test_every_property_has_a_description(crd: dict[str, Any]) -> None:
    assert not undocumented(crd)


def test_every_node_has_a_type_as_a_structural_schema_requires(crd: dict[str, Any]) -> None:
    untyped = [path or "<root>" for path, node in walk(openapi_schema(crd), "") if "type" not in node]
    assert not untyped


def test_unknown_fields_are_kept_only_in_instance_values_and_kopf_bookkeeping(crd: dict[str, Any]) -> None:
    preserving = [
        path
        for path, node in walk(openapi_schema(crd), "")
        if node.get("x-kubernetes-preserve-unknown-fields")
    ]
    # license, retention, api and exporter inside the values, and extraEnv's entries: the chart's other
    # keys there stay the user's.
    assert preserving == [
        "spec.instance.values",
        "spec.instance.values.license",
        "spec.instance.values.api",
        "spec.instance.values.api.extraEnv[]",
        "spec.instance.values.exporter",
        "spec.instance.values.exporter.extraEnv[]",
        "spec.instance.values.retention",
        "status.kopf",
    ]


def instance_values(crd: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = openapi_schema(crd)["properties"]["spec"]["properties"]["instance"][
        "properties"
    ]["values"]
    return values


def test_the_operator_s_values_are_refused_in_the_customer_s(crd: dict[str, Any]) -> None:
    """Found in review: license.secretName was not refused (the Customer's to point at a Secret of its
    own), and the licence's issuer and audience, the operator's now, were not either."""
    values = instance_values(crd)["properties"]
    refused = {
        f"{parent}.{name}" if parent else name
        for parent, node in [("", values)]
        + [(key, values[key]["properties"]) for key in ("license", "retention")]
        for name, child in node.items()
        if [rule["rule"] for rule in child.get("x-kubernetes-validations", [])] == ["false"]
    }
    owned = {"enabled", "customerId", "plan", "domain", "billingUrl", "retention.days"} | {
        f"license.{name}" for name in ("secretName", "issuer", "audience", "maxDevices", "sha256")
    }
    assert refused == owned


def test_extra_env_refuses_every_variable_the_operator_s_values_set(crd: dict[str, Any]) -> None:
    """Found in review: api.extraEnv's IOTISTIC_LICENSE_KEY pinned a literal licence and exporter.extraEnv's
    BILLING_URL sent usage nowhere; the CRD's rule names the variables operator/values.py leaves out, in
    both components that get them, bounded for the API server's CEL cost estimate."""
    values = instance_values(crd)["properties"]
    for component in LICENSED_COMPONENTS:
        extra_env = values[component]["properties"]["extraEnv"]
        name = extra_env["items"]["properties"]["name"]
        [rule] = name["x-kubernetes-validations"]
        listed = re.fullmatch(r"!\(self in \[(.*)\] \|\| (.*)\)", rule["rule"])
        assert listed is not None, rule["rule"]
        names, prefixes = listed.groups()
        assert names.split(", ") == [f"'{name}'" for name in OPERATOR_ENV_NAMES], component
        assert prefixes.split(" || ") == [f"self.startsWith('{p}')" for p in OPERATOR_ENV_PREFIXES], component
        assert rule["reason"] == "FieldValueForbidden" and rule["messageExpression"].startswith("self + ")
        assert (extra_env["maxItems"], name["maxLength"]) == (100, 256)


def test_names_scope_and_version(crd: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == customer.CRD_NAME == "customers.iotistic.io"
    assert crd["spec"]["group"] == customer.GROUP
    assert crd["spec"]["scope"] == "Cluster"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        customer.KIND,
        customer.PLURAL,
        customer.SINGULAR,
    )
    assert names["shortNames"] == list(customer.SHORT_NAMES) == ["cust"]
    assert names["categories"] == ["iotistic"]
    [version] = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == (customer.VERSION, True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = [
        (column["name"], column["jsonPath"], column["type"])
        for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]
    ]
    assert columns == [
        ("CustomerID", ".status.customerId", "string"),
        ("Plan", ".status.plan", "string"),
        ("Phase", ".status.phase", "string"),
        ("Reason", '.status.conditions[?(@.type=="Ready")].reason', "string"),
        # A string, not a date: kubectl shows a date column as an age, `<invalid>` for a future time.
        ("Trial-Ends", ".status.trial.endsAt", "string"),
        ("URL", ".status.instance.url", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]


def test_customer_id_is_immutable_and_cannot_be_removed_or_changed_by_adding(crd: dict[str, Any]) -> None:
    schema = openapi_schema(crd)
    spec = schema["properties"]["spec"]
    field_rules = spec["properties"]["customerId"]["x-kubernetes-validations"]
    assert field_rules == [{"rule": "self == oldSelf", "message": "customerId is immutable"}]
    [removal] = spec["x-kubernetes-validations"]
    assert "oldSelf.customerId" in removal["rule"]
    assert removal["fieldPath"] == ".customerId"
    adding, _ = schema["x-kubernetes-validations"]
    assert "oldSelf.status.customerId" in adding["rule"]
    assert adding["fieldPath"] == ".spec.customerId"


def test_names_are_checked_at_creation_as_the_operator_checks_them(crd: dict[str, Any]) -> None:
    _, name_rule = openapi_schema(crd)["x-kubernetes-validations"]
    assert name_rule["optionalOldSelf"] is True and name_rule["rule"].startswith("oldSelf.hasValue() ||")
    assert f"size(self.metadata.name) <= {customer.MAX_NAME_LENGTH}" in name_rule["rule"]
    assert f"self.metadata.name.matches('{customer.NAME_PATTERN}')" in name_rule["rule"]


def test_conditions_are_metav1_conditions_in_a_map_list_keyed_by_type(crd: dict[str, Any]) -> None:
    conditions = openapi_schema(crd)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["message"]["maxLength"] == 32768
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert {t.value for t in customer.ConditionType} == {
        "Ready",
        "Reconciling",
        "Stalled",
        "LicenseIssued",
        "ReleaseDeployed",
        "TrialActive",
        "SubscriptionActive",
        "WithinLimits",
        "NotificationsReady",
        "PaymentOverdue",
    }
    for condition_type in customer.ConditionType:
        assert condition_type.value in conditions["description"]


def test_subscription_says_who_writes_it(crd: dict[str, Any]) -> None:
    subscription = openapi_schema(crd)["properties"]["spec"]["properties"]["subscription"]
    assert FieldManager.STRIPE in subscription["description"]
    assert "only by the webhook server" in subscription["description"]


def test_phase_enum_is_the_phase_constants(crd: dict[str, Any]) -> None:
    phase = openapi_schema(crd)["properties"]["status"]["properties"]["phase"]
    assert phase["enum"] == [p.value for p in customer.Phase]


@pytest.mark.parametrize("blank", ["  ", "\t\n", "\u00a0", "\u2003", "\x0b"])
def test_kubectl_apply_refuses_a_blank_company_name_as_the_operator_does(
    crd: dict[str, Any], blank: str
) -> None:
    # The API server searches for the pattern (Go's regexp, its \s ASCII alone), as re.search does here:
    # the spaces beyond ASCII are spelled out, so a name the operator refuses is refused at apply too.
    company = openapi_schema(crd)["properties"]["spec"]["properties"]["companyName"]
    assert re.search(company["pattern"], blank) is None
    assert re.search(company["pattern"].replace("\\s", "\t\n\f\r "), blank) is None
    assert re.search(company["pattern"], "Acme Corp") is not None
