"""The operator's Prometheus metrics, served on OPERATOR_METRICS_PORT (default 8081) at /metrics."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("iotistic_operator_reconciles", "Reconcile passes of Customers by result", ["result"])
RECONCILE_ERRORS = Counter(
    "iotistic_operator_reconcile_errors",
    "Reconcile passes that did not converge, by reason: the Stalled condition's for a stall, else the failed"
    " step's (LicenseIssued, ReleaseDeployed), or the exception's type for a pass that raised",
    ["reason"],
)
RECONCILE_DURATION = Histogram(
    "iotistic_operator_reconcile_duration_seconds",
    "Duration of a reconcile pass",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
HELM_OPERATIONS = Counter(
    "iotistic_operator_helm_operations",
    "helm CLI invocations by operation and result",
    ["operation", "result"],
)
HELM_IN_FLIGHT = Gauge("iotistic_operator_helm_in_flight", "helm processes running now")
LICENSES_MINTED = Counter(
    "iotistic_operator_licenses_minted", "Licences signed, by license_history action", ["action"]
)
LICENSE_EXPIRY = Gauge(
    "iotistic_operator_license_expiry_timestamp_seconds",
    "Expiry (Unix time) of each customer's current licence",
    ["customer_id"],
)
LICENSE_ENDS_BY_DESIGN = Gauge(
    "iotistic_operator_license_ends_by_design",
    "1 for each customer whose current licence ends where its entitlement does (a trial's end, the end of a"
    " subscription's period set to cancel), not renewed by design; else 0",
    ["customer_id"],
)
CUSTOMER_STALLED = Gauge(
    "iotistic_operator_customer_stalled",
    "1 for each Customer whose last pass stalled (it waits for its spec to change), by the Stalled"
    " condition's reason",
    ["customer", "reason"],
)
HOUSEKEEPING_CHECKS = Counter(
    "iotistic_operator_housekeeping_checks",
    "Housekeeping checks of Customers, by the reason a pass was due (e.g. LicenseRenewal) or nothing",
    ["due"],
)


# The reason each stalled Customer (by name) is exported under, to drop its series when that changes.
_stalls: dict[str, str] = {}


def report_stall(customer: str, reason: str | None) -> None:
    """The Customer's stall as its last pass left it (None: not stalled). A gauge, not the passes'
    counter: a stall gets no further pass, so a counter's increase is gone after one window."""
    was = _stalls.pop(customer, None)
    if was is not None and was != reason:
        CUSTOMER_STALLED.remove(customer, was)
    if reason is not None:
        CUSTOMER_STALLED.labels(customer, reason).set(1)
        _stalls[customer] = reason


def forget_customer(name: str | None, customer_id: str | None) -> None:
    """The Customer's series no longer exported: it is deleted or another shard's now, and a last value
    kept would fire the expiry alerts for it weeks later (or its stall's for ever). None: that series is
    another live Customer's too (its name taken again, its customer id held by another) and stays."""
    if name is not None:
        report_stall(name, None)
    if customer_id is not None:
        for gauge in (LICENSE_EXPIRY, LICENSE_ENDS_BY_DESIGN):
            with contextlib.suppress(KeyError):  # never reported here: the 0.21 our pin allows raises
                gauge.remove(customer_id)
