"""Helm values of a customer's release, derived from its spec and effective plan (pure)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from iotistic_billing.licensing.plans import plan_by_name
from iotistic_billing.operator.state import PassTarget


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def desired_release_values(
    target: PassTarget, billing_url: str, license_sha256: str | None
) -> dict[str, Any]:
    """spec.instance.values first, then the values the operator owns on top: a user override can tune
    the chart but cannot lift the plan's limits or switch a suspended instance back on. The CRD refuses
    those keys in spec.instance.values; a Customer applied before that refusal may still hold one."""
    spec, entitlement = target.spec, target.entitlement
    plan = plan_by_name(entitlement.plan, allow_unlicensed=True)
    managed: dict[str, Any] = {
        "enabled": spec.instance.enabled and not spec.suspended,
        "customerId": target.customer_id,
        "plan": entitlement.plan,
        "domain": target.domain,
        "billingUrl": billing_url,
        "license": {"maxDevices": plan.features.max_devices, "sha256": license_sha256 or ""},
        "retention": {"days": plan.features.data_retention_days},
    }
    return deep_merge(spec.instance.values or {}, managed)


def values_hash(values: dict[str, Any], chart_version: str) -> str:
    canonical = json.dumps({"chart": chart_version, "values": values}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
