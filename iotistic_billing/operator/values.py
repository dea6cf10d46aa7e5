"""Helm values of a customer's release, derived from its spec and effective plan (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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
    refused: list[str] = []
    for component in LICENSED_COMPONENTS:
        for index, entry in enumerate(_extra_env(values, component)):
            if isinstance(entry, Mapping) and operator_env_name(name := entry.get("name")):
                refused.append(f"spec.instance.values.{component}.extraEnv[{index}].name {name}")
    return refused


def _extra_env(values: Mapping[str, Any] | None, component: str) -> list[Any]:
    own = (values or {}).get(component)
    extra = own.get("extraEnv") if isinstance(own, Mapping) else None
    return extra if isinstance(extra, list) else []


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def desired_release_values(
    target: PassTarget, settings: Settings, license_sha256: str | None
) -> dict[str, Any]:
    """spec.instance.values first, then the values the operator owns on top: a user override can tune
    the chart but cannot lift the plan's limits or switch a suspended instance back on. The CRD refuses
    those keys in spec.instance.values (and extraEnv entries of the environment they make, refused_env);
    a Customer applied before that refusal may still hold one, and it is left out."""
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
    return deep_merge(_without_refused_env(spec.instance.values or {}), managed)


def _without_refused_env(values: dict[str, Any]) -> dict[str, Any]:
    kept = dict(values)
    for component in LICENSED_COMPONENTS:
        extra = _extra_env(values, component)
        allowed = [e for e in extra if not (isinstance(e, Mapping) and operator_env_name(e.get("name")))]
        if len(allowed) != len(extra):
            kept[component] = {**values[component], "extraEnv": allowed}
    return kept


def values_hash(values: dict[str, Any], chart_version: str) -> str:
    canonical = json.dumps({"chart": chart_version, "values": values}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
