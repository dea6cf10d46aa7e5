"""The plan catalog carries the earlier system's table, the unlicensed fallback, and refuses a malformed
table."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from iotistic_billing.licensing.plans import (
    PLAN_NAMES,
    PLANS,
    UNLICENSED,
    UNLIMITED,
    EntitlementError,
    Features,
    IncludedUsage,
    Limits,
    Plan,
    PlanCatalogError,
    plan_by_name,
    validate_catalog,
)

FEATURE_CLAIMS = (
    "maxDevices",
    "dataRetentionDays",
    "canExportData",
    "hasAdvancedAlerts",
    "hasApiAccess",
    "hasMqttAccess",
    "hasCustomBranding",
    "canExecuteJobs",
    "canScheduleJobs",
    "hasRemoteAccess",
    "hasOtaUpdates",
    "hasCustomDashboards",
    # Ours: false in a restricted licence (a payment overdue past its grace).
    "canAddDevices",
)
LIMIT_CLAIMS = ("maxUsers", "maxAlertRules", "maxDashboards", "maxJobTemplates")

# The earlier system's "Subscription Plans" table: price, max devices, retention, advanced alerts,
# branding, users.
SEED_TABLE = {
    "trial": (0, 10, 30, False, False, 2),
    "starter": (2900, 10, 30, False, False, 5),
    "professional": (9900, 50, 365, True, False, 15),
    "enterprise": (None, UNLIMITED, UNLIMITED, True, True, UNLIMITED),
}
# The earlier system's "Feature Comparison": which plans have each feature.
ALL_PLANS = set(PLAN_NAMES)
PROFESSIONAL_UP = {"professional", "enterprise"}
SEED_FEATURE_PLANS = {
    "canExecuteJobs": ALL_PLANS,
    "canScheduleJobs": PROFESSIONAL_UP,
    "hasRemoteAccess": ALL_PLANS,
    "hasOtaUpdates": PROFESSIONAL_UP,
    "canExportData": ALL_PLANS,
    "hasAdvancedAlerts": PROFESSIONAL_UP,
    "hasCustomDashboards": PROFESSIONAL_UP,
    "hasApiAccess": ALL_PLANS,
    "hasMqttAccess": ALL_PLANS,
    "hasCustomBranding": {"enterprise"},
}
# The earlier system's "Pricing Model": included devices, traffic GB, storage GB.
SEED_INCLUDED = {
    "starter": (10, 10, 5),
    "professional": (50, 100, 50),
    "enterprise": (UNLIMITED, UNLIMITED, UNLIMITED),
}


def test_catalog_lists_the_four_plans_in_order() -> None:
    assert tuple(PLANS) == ("trial", "starter", "professional", "enterprise")


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_plan_matches_the_earlier_system_table(name: str) -> None:
    price, devices, retention, alerts, branding, users = SEED_TABLE[name]
    plan = PLANS[name]
    assert plan.name == name
    assert plan.monthly_price_cents == price
    assert plan.features.max_devices == devices
    assert plan.features.data_retention_days == retention
    assert plan.features.has_advanced_alerts is alerts
    assert plan.features.has_custom_branding is branding
    assert plan.limits.max_users == users


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_plan_features_match_the_earlier_system_comparison(name: str) -> None:
    claims = PLANS[name].features.to_claims()
    for feature, plans in SEED_FEATURE_PLANS.items():
        assert claims[feature] is (name in plans), feature


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_plan_carries_every_feature_and_limit_claim_of_the_earlier_system(name: str) -> None:
    plan = PLANS[name]
    assert tuple(plan.features.to_claims()) == FEATURE_CLAIMS
    assert tuple(plan.limits.to_claims()) == LIMIT_CLAIMS


def test_professional_limits_are_the_earlier_system_example() -> None:
    limits = PLANS["professional"].limits.to_claims()
    assert limits["maxUsers"] == 15
    assert limits["maxAlertRules"] == 100
    assert limits["maxDashboards"] == 20


def test_enterprise_is_unlimited_everywhere() -> None:
    enterprise = PLANS["enterprise"]
    assert all(value == UNLIMITED for value in enterprise.limits.to_claims().values())
    assert all(value in (True, UNLIMITED) for value in enterprise.features.to_claims().values())


@pytest.mark.parametrize("name", sorted(SEED_INCLUDED))
def test_included_usage_matches_the_earlier_system_pricing_model(name: str) -> None:
    included = PLANS[name].included
    assert (included.devices, included.traffic_gb, included.storage_gb) == SEED_INCLUDED[name]


def test_included_devices_equal_max_devices_on_every_plan() -> None:
    for plan in (*PLANS.values(), UNLICENSED):
        assert plan.included.devices == plan.features.max_devices


def test_unlicensed_fallback_is_the_earlier_systems_unlicensed_mode() -> None:
    features = UNLICENSED.features
    assert UNLICENSED.name == "unlicensed"
    assert features.max_devices == 2
    assert features.can_execute_jobs is True
    assert features.can_schedule_jobs is False
    assert features.has_remote_access is True
    assert features.has_ota_updates is False
    assert features.can_export_data is False
    assert features.has_advanced_alerts is False
    assert features.has_custom_branding is False
    assert features.has_custom_dashboards is False


def test_unlicensed_is_never_more_than_a_plan_grants() -> None:
    for plan in PLANS.values():
        for claim, value in UNLICENSED.features.to_claims().items():
            granted = plan.features.to_claims()[claim]
            assert granted == UNLIMITED or value <= granted, (plan.name, claim)


def test_values_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PLANS["starter"].features.max_devices = 1000  # type: ignore[misc]
    with pytest.raises(TypeError):
        PLANS["trial"] = PLANS["enterprise"]  # type: ignore[index]


def test_plan_by_name_and_its_error() -> None:
    assert plan_by_name("professional") is PLANS["professional"]
    assert plan_by_name("unlicensed", allow_unlicensed=True) is UNLICENSED
    with pytest.raises(
        ValueError, match="plan must be one of trial, starter, professional, enterprise, got 'gold'"
    ):
        plan_by_name("gold")
    with pytest.raises(ValueError, match="got 'unlicensed'"):
        plan_by_name("unlicensed")


def _features(**changes: Any) -> Features:
    return dataclasses.replace(PLANS["starter"].features, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_devices": "10"}, r"features\.maxDevices must be an integer, got '10'"),
        ({"max_devices": True}, r"features\.maxDevices must be an integer, got True"),
        ({"max_devices": 10.0}, r"features\.maxDevices must be an integer, got 10\.0"),
        ({"data_retention_days": -2}, r"features\.dataRetentionDays must be -1 \(unlimited\) or at least 0"),
        ({"can_export_data": 1}, r"features\.canExportData must be a boolean, got 1"),
        ({"has_ota_updates": "yes"}, r"features\.hasOtaUpdates must be a boolean"),
    ],
)
def test_malformed_feature_value_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(EntitlementError, match=message):
        _features(**changes)


def test_malformed_limit_and_quota_values_are_refused() -> None:
    with pytest.raises(EntitlementError, match=r"limits\.maxUsers must be an integer"):
        Limits(max_users=None, max_alert_rules=1, max_dashboards=1, max_job_templates=1)  # type: ignore[arg-type]
    with pytest.raises(EntitlementError, match=r"included\.trafficGb must be -1"):
        IncludedUsage(devices=1, traffic_gb=-5, storage_gb=1, api_calls=1)


def _plan(**changes: Any) -> Plan:
    return dataclasses.replace(PLANS["starter"], **changes)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: _plan(included=IncludedUsage(devices=20, traffic_gb=10, storage_gb=5, api_calls=1)),
            "included.devices",
        ),
        (lambda: _plan(features=_features(max_devices=0)), "maxDevices must be -1 or at least 1"),
        (lambda: _plan(monthly_price_cents=-1), "monthlyPriceCents"),
        (lambda: _plan(name="Gold Plan"), "lower-case word"),
    ],
)
def test_malformed_plan_is_refused(build: Any, message: str) -> None:
    with pytest.raises(PlanCatalogError, match=message):
        build()


def test_validate_catalog_accepts_the_real_table() -> None:
    assert dict(validate_catalog(PLANS, UNLICENSED)) == dict(PLANS)


@pytest.mark.parametrize(
    ("table", "unlicensed", "message"),
    [
        (
            {name: PLANS[name] for name in PLAN_NAMES if name != "enterprise"},
            UNLICENSED,
            "must list the plans",
        ),
        ({**PLANS, "gold": PLANS["enterprise"]}, UNLICENSED, "must list the plans"),
        ({**PLANS, "starter": PLANS["trial"]}, UNLICENSED, "plan 'starter' carries the name 'trial'"),
        ({**PLANS, "trial": {"maxDevices": 10}}, UNLICENSED, "plan 'trial' must be a Plan"),
        (PLANS, PLANS["trial"], "fallback must be named 'unlicensed'"),
        (
            PLANS,
            dataclasses.replace(
                UNLICENSED, features=dataclasses.replace(UNLICENSED.features, has_ota_updates=True)
            ),
            r"unlicensed features\.hasOtaUpdates \(True\) exceeds plan 'trial' \(False\)",
        ),
        (
            PLANS,
            dataclasses.replace(
                UNLICENSED,
                features=dataclasses.replace(UNLICENSED.features, max_devices=11),
                included=IncludedUsage(devices=11, traffic_gb=0, storage_gb=0, api_calls=0),
            ),
            r"unlicensed features\.maxDevices \(11\) exceeds plan 'trial' \(10\)",
        ),
    ],
)
def test_malformed_catalog_is_refused(table: Any, unlicensed: Plan, message: str) -> None:
    with pytest.raises(PlanCatalogError, match=message):
        validate_catalog(table, unlicensed)


def test_from_claims_takes_missing_claims_from_the_fallback_and_refuses_wrong_types() -> None:
    parsed = Features.from_claims({"maxDevices": 50, "hasOtaUpdates": True}, UNLICENSED.features)
    assert parsed.max_devices == 50
    assert parsed.has_ota_updates is True
    assert parsed.can_export_data is UNLICENSED.features.can_export_data
    with pytest.raises(EntitlementError, match=r"features\.maxDevices must be an integer"):
        Features.from_claims({"maxDevices": "50"}, UNLICENSED.features)
    with pytest.raises(EntitlementError, match="limits must be an object, got list"):
        Limits.from_claims([], UNLICENSED.limits)
