"""The InstanceRollout CRD and the models in iotistic_billing.rollout describe the same resource (the
walk of tests/unit/test_crd_schema.py), every field is documented for `kubectl explain`, and the
printer columns are the issue's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from iotistic_billing import rollout
from tests.unit.test_crd_schema import openapi_schema, schema_diffs, undocumented

CRD_PATH = Path(__file__).parents[2] / "crds" / "instancerollouts.iotistic.io.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize(
    ("section", "model"), [("spec", rollout.RolloutSpec), ("status", rollout.RolloutStatus)]
)
def test_the_schema_matches_the_model(crd: dict[str, Any], section: str, model: Any) -> None:
    diffs = schema_diffs(crd, section, model)
    assert not diffs, f"CRD and {model.__name__} disagree:\n" + "\n".join(diffs)


def test_every_property_has_a_description(crd: dict[str, Any]) -> None:
    assert not undocumented(crd)


def test_names_scope_and_printer_columns(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == rollout.ROLLOUT_CRD_NAME
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        rollout.ROLLOUT_KIND,
        rollout.ROLLOUT_PLURAL,
        ["irollout"],
        ["iotistic"],
    )
    assert crd["spec"]["scope"] == "Cluster"
    columns = [c["name"].upper() for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["VERSION", "STEP", "UPDATED", "HEALTHY", "PHASE", "AGE"]


# What kubectl resolves for other projects' rollout resources: their plural, singular and short names.
# kubectl does not expand a short name that is another resource's singular or plural, so with a short
# name `rollout`, `kubectl patch rollout x` could patch an Argo Rollout (found in review).
OTHER_PROJECTS_NAMES = {
    "rollout",  # Argo Rollouts (argoproj.io), OpenKruise (rollouts.kruise.io), KusionStack: singular
    "rollouts",  # their plural
    "ro",  # Argo Rollouts' and KusionStack's short name
    "hr",  # Flux's HelmRelease
    "ks",  # Flux's Kustomization
    "app",  # Argo CD's Application
    "deploy",  # Kubernetes' Deployment, which `kubectl rollout` acts on
}


def test_no_name_of_ours_is_one_another_project_s_resource_answers_to(crd: dict[str, Any]) -> None:
    names = crd["spec"]["names"]

    assert not {names["plural"], names["singular"], *names["shortNames"]} & OTHER_PROJECTS_NAMES


def test_the_phase_enum_is_the_model_s(crd: dict[str, Any]) -> None:
    phase = openapi_schema(crd)["properties"]["status"]["properties"]["phase"]
    assert phase["enum"] == [p.value for p in rollout.RolloutPhase]
