"""Helm values of a customer's release, derived from its spec and effective plan (pure)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from iotistic_billing.customer import LICENSE_SECRET_NAME
from iotistic_billing.licensing.plans import plan_by_name
from iotistic_billing.operator.state import PassTarget
from iotistic_billing.settings import Settings

# The environment the chart gives the API and the exporter from the operator's values (its _helpers.tpl
# licenseEnv, api.yaml, exporter.yaml): the identity, the licence and how to verify it, its limits, where
# usage goes. An extraEnv entry of one of these names in spec.instance.values is refused (the CRD; and
# left out here for a Customer stored before that refusal), or a literal licence pinned there outlived
# every renewal, suspension and revocation. Every name under the prefixes: the licence's, and the
# instance's own settings a later chart may set.
OPERATOR_ENV_NAMES: Final = ("CUSTOMER_ID", "DATA_RETENTION_DAYS", "BILLING_URL", "USAGE_API_KEY")
OPERATOR_ENV_PREFIXES: Final = ("IOTISTIC_", "LICENSE_")
# The chart's components that get that environment.
LICENSED_COMPONENTS: Final = ("api", "exporter")


def operator_env_name(name: object) -> bool:
    """Whether `name` is an environment variable the operator's values set in the instance."""
    return isinstance(name, str) and (name in OPERATOR_ENV_NAMES or name.startswith(OPERATOR_ENV_PREFIXES))


def refused_env(values: Mapping[str, Any] | None) -> list[str]:
    """The extraEnv entries of spec.instance.values that set an operator's variable, each as its field
    path and name (`spec.instance.values.api.extraEnv[0].name IOTISTIC_LICENSE_KEY`)."""
    return [
        f"spec.instance.values.{component}.extraEnv[{index}].name {extra[index]['name']}"
        for component, extra, refused in _refused_extra_env(values)
        for index in refused
    ]


def _refused_extra_env(values: Mapping[str, Any] | None) -> Iterator[tuple[str, list[Any], list[int]]]:
    """Each licensed component whose extraEnv in `values` sets an operator's variable: its name, its
    extraEnv, and the indexes of those entries (what refused_env names is what the release leaves out)."""
    for component in LICENSED_COMPONENTS:
        own = (values or {}).get(component)
        extra = own.get("extraEnv") if isinstance(own, Mapping) else None
        if not isinstance(extra, list):
            continue
        refused = [
            index
            for index, entry in enumerate(extra)
            if isinstance(entry, Mapping) and operator_env_name(entry.get("name"))
        ]
        if refused:
            yield component, extra, refused


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def desired_release_values(
    target: PassTarget,
    settings: Settings,
    license_sha256: str | None,
    schema: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """spec.instance.values first, then the values the operator owns on top: a user override can tune
    the chart but cannot lift the plan's limits or switch a suspended instance back on. The CRD refuses
    those keys in spec.instance.values (and extraEnv entries of the environment they make, refused_env);
    a Customer applied before that refusal may still hold one, and it is left out.

    `schema`: the chart version's values.schema.json, when known; the operator's values it does not
    accept are left out (accepted_by_schema), so a version published before one of them still installs."""
    spec, entitlement = target.spec, target.entitlement
    plan = plan_by_name(entitlement.plan, allow_unlicensed=True)
    managed: dict[str, Any] = {
        "enabled": spec.instance.enabled and not spec.suspended,
        "customerId": target.customer_id,
        "plan": entitlement.plan,
        "domain": target.domain,
        "billingUrl": settings.billing_url,
        "license": {
            "secretName": LICENSE_SECRET_NAME,
            "issuer": settings.license_issuer,
            "audience": settings.license_audience,
            "maxDevices": plan.features.max_devices,
            "sha256": license_sha256 or "",
        },
        "retention": {"days": plan.features.data_retention_days},
    }
    if schema is not None:
        managed = accepted_by_schema(managed, schema)
    return deep_merge(_without_refused_env(spec.instance.values or {}), managed)


def accepted_by_schema(values: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """`values` without the keys `schema` (a chart's values.schema.json) refuses as undeclared: a key of
    an object whose schema says additionalProperties false, lists no such property and has no
    patternProperties matching it. Every chart version published before license.issuer and
    license.audience closed `license` so, and helm refused the whole release (`at '/license': additional
    properties 'audience', 'issuer' not allowed`), a suspension's enabled: false with it. Only for the
    operator's values: a misspelt key of spec.instance.values still fails the install, naming it."""
    return _accepted(values, schema, schema)


def _accepted(values: dict[str, Any], node: Mapping[str, Any], document: Mapping[str, Any]) -> dict[str, Any]:
    node = _resolved(node, document)
    declared = node.get("properties")
    declared = declared if isinstance(declared, Mapping) else {}
    patterns = node.get("patternProperties")
    patterns = patterns if isinstance(patterns, Mapping) else {}
    closed = node.get("additionalProperties") is False
    kept: dict[str, Any] = {}
    for key, value in values.items():
        own = declared.get(key)
        if own is None and closed and not any(re.search(pattern, key) for pattern in patterns):
            continue
        if isinstance(value, dict) and isinstance(own, Mapping):
            value = _accepted(value, own, document)
        kept[key] = value
    return kept


def _resolved(node: Mapping[str, Any], document: Mapping[str, Any]) -> Mapping[str, Any]:
    """`node` with its local `$ref` (`#/definitions/...`) followed; a reference this cannot follow (to
    another document) is read as a schema that refuses nothing."""
    for _ in range(32):  # a chain of references, not a loop of them
        ref = node.get("$ref")
        if not isinstance(ref, str):
            return node
        if not ref.startswith("#"):
            return {}
        found: Any = document
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            found = found.get(part) if isinstance(found, Mapping) else None
        if not isinstance(found, Mapping):
            return {}
        node = found
    return {}


def _without_refused_env(values: dict[str, Any]) -> dict[str, Any]:
    kept = dict(values)
    for component, extra, refused in _refused_extra_env(values):
        kept[component] = {
            **values[component],
            "extraEnv": [e for i, e in enumerate(extra) if i not in refused],
        }
    return kept


def values_hash(values: dict[str, Any], chart_version: str) -> str:
    canonical = json.dumps({"chart": chart_version, "values": values}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
