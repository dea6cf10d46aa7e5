"""The plan catalog: features, limits and included usage of each plan, and the unlicensed fallback.

Standard library only, because the instance-side verifier imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, ClassVar, Final, Self

UNLIMITED: Final = -1
PLAN_NAMES: Final = ("trial", "starter", "professional", "enterprise")
UNLICENSED_PLAN_NAME: Final = "unlicensed"


class EntitlementError(ValueError):
    """A feature, limit or quota value of the wrong type or out of range; the message names it."""


class PlanCatalogError(EntitlementError):
    """The plan table as a whole is inconsistent (a plan missing, a name mismatch, ...)."""


def claim_name(attribute: str) -> str:
    """`max_devices` -> `maxDevices`: the licence claims use the earlier system's camelCase names."""
    head, *rest = attribute.split("_")
    return head + "".join(part.capitalize() for part in rest)


class _Section:
    """Shared checks of the frozen value sections; each field is a bool or an int where -1 is unlimited."""

    __slots__ = ()
    section: ClassVar[str]
    # (attribute, claim name, is boolean), computed once per class: the verifier builds these objects
    # on every verification, and dataclasses.fields() per call would be most of its cost.
    _spec: ClassVar[tuple[tuple[str, str, bool], ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._spec = ()

    @classmethod
    def spec(cls) -> tuple[tuple[str, str, bool], ...]:
        if not cls._spec:
            cls._spec = tuple((f.name, claim_name(f.name), f.type == "bool") for f in fields(cls))  # type: ignore[arg-type]
        return cls._spec

    def __post_init__(self) -> None:
        for attribute, claim, is_bool in self.spec():
            value = getattr(self, attribute)
            # `type(...) is`: bool is a subclass of int, and True must not pass for a limit of 1.
            if is_bool:
                if type(value) is not bool:
                    raise EntitlementError(f"{self.section}.{claim} must be a boolean, got {value!r}")
            elif type(value) is not int:
                raise EntitlementError(f"{self.section}.{claim} must be an integer, got {value!r}")
            elif value < UNLIMITED:
                raise EntitlementError(
                    f"{self.section}.{claim} must be -1 (unlimited) or at least 0, got {value}"
                )

    def to_claims(self) -> dict[str, int | bool]:
        return {claim: getattr(self, attribute) for attribute, claim, _ in self.spec()}

    @classmethod
    def from_claims(cls, claims: object, fallback: Self) -> Self:
        """Parse a licence section; a claim an older licence lacks takes the fallback's (smaller) value.

        Missing claims are not an error so that an instance upgraded before its licence is renewed keeps
        working; a present claim of the wrong type is, because it means the licence is not ours.
        """
        if not isinstance(claims, Mapping):
            raise EntitlementError(f"{cls.section} must be an object, got {type(claims).__name__}")
        values = {
            attribute: claims.get(claim, getattr(fallback, attribute)) for attribute, claim, _ in cls.spec()
        }
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Features(_Section):
    section: ClassVar[str] = "features"

    max_devices: int
    data_retention_days: int
    can_export_data: bool
    has_advanced_alerts: bool
    has_api_access: bool
    has_mqtt_access: bool
    has_custom_branding: bool
    can_execute_jobs: bool
    can_schedule_jobs: bool
    has_remote_access: bool
    has_ota_updates: bool
    has_custom_dashboards: bool
    # False in a restricted licence (a payment overdue past its grace): the devices there keep working,
    # no new one is provisioned. Licences minted before it have no claim: the fallback's True.
    can_add_devices: bool = True


@dataclass(frozen=True, slots=True)
class Limits(_Section):
    section: ClassVar[str] = "limits"

    max_users: int
    max_alert_rules: int
    max_dashboards: int
    max_job_templates: int


@dataclass(frozen=True, slots=True)
class IncludedUsage(_Section):
    """What the base price covers before consumption billing charges overage (the earlier system's
    Pricing Model)."""

    section: ClassVar[str] = "included"

    devices: int
    traffic_gb: int
    storage_gb: int
    # HTTP API calls per billing period; the earlier system prices calls "over the limit" without naming it.
    api_calls: int


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    display_name: str
    # None: priced per contract (the earlier system's "Custom" enterprise price).
    monthly_price_cents: int | None
    features: Features
    limits: Limits
    included: IncludedUsage

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier() or not self.name.islower():
            raise PlanCatalogError(f"plan name must be a lower-case word, got {self.name!r}")
        if self.monthly_price_cents is not None and (
            isinstance(self.monthly_price_cents, bool)
            or not isinstance(self.monthly_price_cents, int)
            or self.monthly_price_cents < 0
        ):
            raise PlanCatalogError(
                f"{self.name}.monthlyPriceCents must be a non-negative integer or None, "
                f"got {self.monthly_price_cents!r}"
            )
        if self.features.max_devices == 0:
            raise PlanCatalogError(f"{self.name}.features.maxDevices must be -1 or at least 1, got 0")
        if self.included.devices != self.features.max_devices:
            # Consumption billing charges overage above the included devices and the licence stops
            # provisioning at maxDevices: two different numbers would bill for devices that cannot exist.
            raise PlanCatalogError(
                f"{self.name}.included.devices ({self.included.devices}) must equal "
                f"features.maxDevices ({self.features.max_devices})"
            )


def _at_least(smaller: int, larger: int) -> bool:
    return larger == UNLIMITED or (smaller != UNLIMITED and smaller <= larger)


def validate_catalog(plans: Mapping[str, Plan], unlicensed: Plan) -> Mapping[str, Plan]:
    """Check the table as a whole and return it read-only; raises PlanCatalogError naming the problem."""
    names = tuple(plans)
    if names != PLAN_NAMES:
        raise PlanCatalogError(
            f"the catalog must list the plans {', '.join(PLAN_NAMES)} in order, got {names}"
        )
    for key, plan in plans.items():
        if not isinstance(plan, Plan):
            raise PlanCatalogError(f"plan {key!r} must be a Plan, got {type(plan).__name__}")
        if plan.name != key:
            raise PlanCatalogError(f"plan {key!r} carries the name {plan.name!r}")
    if unlicensed.name != UNLICENSED_PLAN_NAME:
        raise PlanCatalogError(f"the unlicensed fallback must be named {UNLICENSED_PLAN_NAME!r}")
    # A fallback more generous than a paid plan would make dropping the licence an upgrade.
    for plan in plans.values():
        for section in ("features", "limits"):
            floor, ceiling = getattr(unlicensed, section), getattr(plan, section)
            for attribute, claim, is_bool in floor.spec():
                low, high = getattr(floor, attribute), getattr(ceiling, attribute)
                if (is_bool and low and not high) or (not is_bool and not _at_least(low, high)):
                    raise PlanCatalogError(
                        f"unlicensed {section}.{claim} ({low}) exceeds plan {plan.name!r} ({high})"
                    )
    return MappingProxyType(dict(plans))


_STARTER_FEATURES = Features(
    max_devices=10,
    data_retention_days=30,
    can_export_data=True,
    has_advanced_alerts=False,
    has_api_access=True,
    has_mqtt_access=True,
    has_custom_branding=False,
    can_execute_jobs=True,
    can_schedule_jobs=False,
    has_remote_access=True,
    has_ota_updates=False,
    has_custom_dashboards=False,
)
_STARTER_INCLUDED = IncludedUsage(devices=10, traffic_gb=10, storage_gb=5, api_calls=100_000)

# The earlier system's "Unlicensed Mode": what an instance may do with no valid licence, and what a suspended
# or lapsed customer's licence carries. Devices keep their MQTT link so that two of them still work.
UNLICENSED: Final = Plan(
    name=UNLICENSED_PLAN_NAME,
    display_name="Unlicensed",
    monthly_price_cents=0,
    features=Features(
        max_devices=2,
        data_retention_days=7,
        can_export_data=False,
        has_advanced_alerts=False,
        has_api_access=False,
        has_mqtt_access=True,
        has_custom_branding=False,
        can_execute_jobs=True,
        can_schedule_jobs=False,
        has_remote_access=True,
        has_ota_updates=False,
        has_custom_dashboards=False,
    ),
    limits=Limits(max_users=1, max_alert_rules=5, max_dashboards=1, max_job_templates=5),
    # Never billed: nothing beyond the two devices is included.
    included=IncludedUsage(devices=2, traffic_gb=0, storage_gb=0, api_calls=0),
)

PLANS: Final[Mapping[str, Plan]] = validate_catalog(
    {
        # The earlier system's trial is the starter plan with fewer users, free.
        "trial": Plan(
            name="trial",
            display_name="Trial",
            monthly_price_cents=0,
            features=_STARTER_FEATURES,
            limits=Limits(max_users=2, max_alert_rules=25, max_dashboards=5, max_job_templates=10),
            included=_STARTER_INCLUDED,
        ),
        "starter": Plan(
            name="starter",
            display_name="Starter",
            monthly_price_cents=2900,
            features=_STARTER_FEATURES,
            limits=Limits(max_users=5, max_alert_rules=25, max_dashboards=5, max_job_templates=10),
            included=_STARTER_INCLUDED,
        ),
        "professional": Plan(
            name="professional",
            display_name="Professional",
            monthly_price_cents=9900,
            features=Features(
                max_devices=50,
                data_retention_days=365,
                can_export_data=True,
                has_advanced_alerts=True,
                has_api_access=True,
                has_mqtt_access=True,
                has_custom_branding=False,
                can_execute_jobs=True,
                can_schedule_jobs=True,
                has_remote_access=True,
                has_ota_updates=True,
                has_custom_dashboards=True,
            ),
            limits=Limits(max_users=15, max_alert_rules=100, max_dashboards=20, max_job_templates=100),
            included=IncludedUsage(devices=50, traffic_gb=100, storage_gb=50, api_calls=1_000_000),
        ),
        "enterprise": Plan(
            name="enterprise",
            display_name="Enterprise",
            monthly_price_cents=None,
            features=Features(
                max_devices=UNLIMITED,
                data_retention_days=UNLIMITED,
                can_export_data=True,
                has_advanced_alerts=True,
                has_api_access=True,
                has_mqtt_access=True,
                has_custom_branding=True,
                can_execute_jobs=True,
                can_schedule_jobs=True,
                has_remote_access=True,
                has_ota_updates=True,
                has_custom_dashboards=True,
            ),
            limits=Limits(
                max_users=UNLIMITED,
                max_alert_rules=UNLIMITED,
                max_dashboards=UNLIMITED,
                max_job_templates=UNLIMITED,
            ),
            included=IncludedUsage(
                devices=UNLIMITED, traffic_gb=UNLIMITED, storage_gb=UNLIMITED, api_calls=UNLIMITED
            ),
        ),
    },
    unlicensed=UNLICENSED,
)


def restricted(plan: Plan) -> Plan:
    """The plan read-only, as a payment overdue past its grace gets it: its limits kept, no new devices,
    no exports (the licence's plan claim still names the plan)."""
    return replace(plan, features=replace(plan.features, can_add_devices=False, can_export_data=False))


def plan_by_name(name: str, *, allow_unlicensed: bool = False) -> Plan:
    """The catalog entry for `name`; a ValueError lists the valid names."""
    if allow_unlicensed and name == UNLICENSED_PLAN_NAME:
        return UNLICENSED
    try:
        return PLANS[name]
    except KeyError:
        valid = PLAN_NAMES + ((UNLICENSED_PLAN_NAME,) if allow_unlicensed else ())
        raise ValueError(f"plan must be one of {', '.join(valid)}, got {name!r}") from None


__all__ = [
    "PLANS",
    "PLAN_NAMES",
    "UNLICENSED",
    "UNLICENSED_PLAN_NAME",
    "UNLIMITED",
    "EntitlementError",
    "Features",
    "IncludedUsage",
    "Limits",
    "Plan",
    "PlanCatalogError",
    "claim_name",
    "plan_by_name",
    "restricted",
    "validate_catalog",
]
