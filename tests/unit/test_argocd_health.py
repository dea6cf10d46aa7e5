"""manifests/argocd/health-checks.yaml: Argo CD's Lua health checks of the two kinds, run as Argo CD
runs them (Lua 5.1, gopher-lua's language), on every phase the operator writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51 as lupa
import pytest
import yaml

from iotistic_billing.customer import Phase
from iotistic_billing.rollout import RolloutPhase

HEALTH_CHECKS = Path(__file__).parents[2] / "manifests" / "argocd" / "health-checks.yaml"
KEY = "resource.customizations.health.iotistic.io_{}"


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """The check's (status, message), with `obj` the global Argo CD gives it."""
    script = yaml.safe_load(HEALTH_CHECKS.read_text())["data"][KEY.format(kind)]
    lua = lupa.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    found = lua.execute(script)
    return str(found["status"]), str(found["message"])


def condition(type_: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def customer(phase: Phase | None, *conditions: dict[str, str], observed: int = 2) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "acme", "generation": 2}}
    if phase is not None:
        body["status"] = {
            "phase": phase.value,
            "observedGeneration": observed,
            "conditions": list(conditions),
        }
    return body


READY = condition("Ready", "True", "DeploymentsAvailable", "every Deployment is available")
NOT_READY = condition("Ready", "False", "DeploymentsProgressing", "2 of 6 Deployments available")

# Every phase has its deliberate health: a phase added to the operator fails this table.
CUSTOMER_HEALTH = {
    Phase.PENDING: ((NOT_READY,), "Progressing"),
    Phase.PROVISIONING: ((NOT_READY, condition("Reconciling", "True", "Provisioning")), "Progressing"),
    Phase.READY: ((READY,), "Healthy"),
    Phase.DEGRADED: ((condition("Ready", "False", "UpgradeFailed", "helm refused it"),), "Degraded"),
    Phase.SUSPENDED: ((READY,), "Suspended"),
    Phase.EXPIRED: ((READY,), "Suspended"),
    Phase.TERMINATING: ((condition("Ready", "False", "Terminating"),), "Progressing"),
    Phase.FAILED: ((condition("Ready", "False", "LicenseFailed"),), "Degraded"),
}


def test_every_customer_phase_has_a_health() -> None:
    assert set(CUSTOMER_HEALTH) == set(Phase)


@pytest.mark.parametrize("phase", list(Phase))
def test_a_customer_s_health_follows_its_phase_and_conditions(phase: Phase) -> None:
    conditions, expected = CUSTOMER_HEALTH[phase]
    status, message = health("Customer", customer(phase, *conditions))
    assert status == expected
    assert message.startswith(conditions[0]["reason"])


def test_a_stalled_customer_is_degraded_with_why_though_argo_cd_reads_no_condition_itself() -> None:
    stalled = condition("Stalled", "True", "InvalidSpec", "spec.trial.days must be at most 90")
    found = health("Customer", customer(Phase.FAILED, stalled, condition("Ready", "False", "InvalidSpec")))
    assert found == ("Degraded", "InvalidSpec: spec.trial.days must be at most 90")


def test_a_customer_ready_for_an_older_generation_is_progressing() -> None:
    assert health("Customer", customer(Phase.READY, READY, observed=1))[0] == "Progressing"
    assert health("Customer", customer(None)) == ("Progressing", "waiting for the operator's first pass")


ROLLOUT_HEALTH = {
    RolloutPhase.PENDING: "Progressing",
    RolloutPhase.WAITING: "Progressing",
    RolloutPhase.PROGRESSING: "Progressing",
    RolloutPhase.PAUSED: "Suspended",
    RolloutPhase.ROLLING_BACK: "Progressing",
    RolloutPhase.SUCCEEDED: "Healthy",
    RolloutPhase.HALTED: "Degraded",
    RolloutPhase.ROLLED_BACK: "Degraded",
    RolloutPhase.ABORTED: "Degraded",
}


def rollout(phase: RolloutPhase, observed: int = 3) -> dict[str, Any]:
    ready = condition("Ready", "False", phase.value, f"step 2 of 3 ({phase.value})")
    return {
        "metadata": {"name": "instance-0.2.0", "generation": 3},
        "status": {"phase": phase.value, "observedGeneration": observed, "conditions": [ready]},
    }


@pytest.mark.parametrize("phase", list(RolloutPhase))
def test_a_rollout_s_health_follows_its_phase(phase: RolloutPhase) -> None:
    assert set(ROLLOUT_HEALTH) == set(RolloutPhase)
    assert health("InstanceRollout", rollout(phase)) == (
        ROLLOUT_HEALTH[phase],
        f"{phase.value}: step 2 of 3 ({phase.value})",
    )


def test_a_rollout_the_operator_has_not_read_since_its_edit_is_progressing() -> None:
    found = health("InstanceRollout", rollout(RolloutPhase.SUCCEEDED, observed=2))
    assert found == ("Progressing", "waiting for the operator")
