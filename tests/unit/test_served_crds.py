"""The operator's and the webhook server's check of the served CRDs against what this version writes
(iotistic_billing.served_crds), on copies of crds/ changed as an older or a newer version's would be."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from iotistic_billing.served_crds import (
    APPLY_CRDS,
    CUSTOMERS_CRD,
    ROLLOUTS_CRD,
    missing_fields,
    stale_crds_message,
)

CRDS = Path(__file__).parents[2] / "crds"


def load(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((CRDS / f"{name}.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def properties(crd: dict[str, Any], *path: str) -> dict[str, Any]:
    """The properties of the node at `path` (`[]` steps into an array's items) of the served version."""
    node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for step in path:
        node = node["items"] if step == "[]" else node["properties"][step]
    found: dict[str, Any] = node["properties"]
    return found


def test_the_repositorys_crds_have_everything_this_version_writes() -> None:
    assert missing_fields(load(CUSTOMERS_CRD.name), CUSTOMERS_CRD) == []
    assert missing_fields(load(ROLLOUTS_CRD.name), ROLLOUTS_CRD) == []


def test_a_rollout_crd_from_before_the_bake_fields_is_named_with_the_fields_and_the_command() -> None:
    """Found in review: helm never upgrades crds/; an operator on an InstanceRollout CRD without
    status.steps[].allMovedAt and bakedAt had them dropped from each tick's patch, and a step never
    ended. The check names them and the command that applies this version's CRDs."""
    old = load(ROLLOUTS_CRD.name)
    steps = properties(old, "status", "steps", "[]")
    del steps["allMovedAt"], steps["bakedAt"]
    assert missing_fields(old, ROLLOUTS_CRD) == ["status.steps[].allMovedAt", "status.steps[].bakedAt"]
    message = stale_crds_message(
        {CUSTOMERS_CRD.name: load(CUSTOMERS_CRD.name), ROLLOUTS_CRD.name: old}, (CUSTOMERS_CRD, ROLLOUTS_CRD)
    )
    assert message is not None
    assert (
        "instancerollouts.iotistic.io serves no status.steps[].allMovedAt, status.steps[].bakedAt;" in message
    )
    assert "customers.iotistic.io" not in message
    assert message.endswith(APPLY_CRDS)
    assert "\n" not in message


def test_a_missing_crd_a_missing_enum_value_and_an_unserved_version_are_named() -> None:
    old = load(CUSTOMERS_CRD.name)
    release = properties(old, "status", "release")
    del release["versionSource"], release["deployments"]
    properties(old, "status")["phase"]["enum"].remove("Expired")
    missing = missing_fields(old, CUSTOMERS_CRD)
    assert {"status.release.versionSource", "status.release.deployments", "status.phase=Expired"} == set(
        missing
    )
    unserved = load(ROLLOUTS_CRD.name)
    unserved["spec"]["versions"][0]["served"] = False
    assert missing_fields(unserved, ROLLOUTS_CRD) == ["version v1alpha1"]
    message = stale_crds_message({CUSTOMERS_CRD.name: old}, (CUSTOMERS_CRD, ROLLOUTS_CRD))
    assert message is not None
    assert "instancerollouts.iotistic.io is not installed" in message


def test_many_missing_fields_are_counted_past_the_first_few() -> None:
    old = load(CUSTOMERS_CRD.name)
    del properties(old)["status"]["properties"]
    message = stale_crds_message({CUSTOMERS_CRD.name: old}, (CUSTOMERS_CRD,))
    assert message is not None and " more; apply" in message


@pytest.mark.parametrize(
    "newer",
    [
        lambda crd: properties(crd, "status", "steps", "[]").update(rolledBackAt={"type": "string"}),
        lambda crd: properties(crd, "status")["phase"]["enum"].append("Superseded"),
        lambda crd: properties(crd, "spec").update(canary={"type": "object"}),
        lambda crd: crd["spec"]["versions"].append(
            {**copy.deepcopy(crd["spec"]["versions"][0]), "name": "v1"}
        ),
    ],
)
def test_a_crd_newer_than_this_version_is_fine(newer: Any) -> None:
    """A rollback: helm keeps the newer CRD, with fields and values this version does not write."""
    crd = load(ROLLOUTS_CRD.name)
    newer(crd)
    assert missing_fields(crd, ROLLOUTS_CRD) == []
    assert stale_crds_message({ROLLOUTS_CRD.name: crd}, (ROLLOUTS_CRD,)) is None
