"""Whether the API server serves the CRDs this version writes. Helm never upgrades a chart's crds/, and
an older served schema does not refuse a field it lacks: it drops it from every write (pruning), in
silence, so the operator and the webhook server check at their start and refuse to run on one
(`check_served_crds`).

What this version writes is its models (iotistic_billing.customer, .rollout), which the tests keep field
for field in step with crds/ (tests/unit/test_crd_schema.py): the image ships no crds/ to compare with.
A served CRD with more than the models (a newer version's, after a rollback) is fine.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel

from iotistic_billing.customer import CRD_NAME, VERSION, CustomerSpec, CustomerStatus
from iotistic_billing.k8s import KubeApi
from iotistic_billing.rollout import ROLLOUT_CRD_NAME, RolloutSpec, RolloutStatus

# What README says to run before an upgrade (helm's crds/ and the repository's are the same files).
APPLY_CRDS: Final = "kubectl apply --server-side --force-conflicts -f charts/iotistic-billing/crds/"
# Paths named in the message, per CRD; the rest are counted.
_NAMED_PATHS: Final = 4


@dataclass(frozen=True)
class WrittenCrd:
    """A CRD as this version writes it: its name, the version it calls, a model per top-level field."""

    name: str
    version: str
    sections: tuple[tuple[str, type[BaseModel]], ...]


CUSTOMERS_CRD: Final = WrittenCrd(CRD_NAME, VERSION, (("spec", CustomerSpec), ("status", CustomerStatus)))
ROLLOUTS_CRD: Final = WrittenCrd(
    ROLLOUT_CRD_NAME, VERSION, (("spec", RolloutSpec), ("status", RolloutStatus))
)


class StaleCrds(Exception):
    """A CRD this version writes is missing, or served without fields it writes; the message says which
    and the command that applies this version's."""


def _resolved(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    """A model's JSON schema node with its $ref followed and Optional's `null` branch dropped."""
    while True:
        if "$ref" in node:
            node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
            continue
        members = [member for member in node.get("anyOf", ()) if member.get("type") != "null"]
        if len(members) == 1:
            node = {**{k: v for k, v in node.items() if k != "anyOf"}, **members[0]}
            continue
        return node


def _missing(
    path: str, served: Mapping[str, Any], model: Mapping[str, Any], defs: Mapping[str, Any]
) -> Iterator[str]:
    model = _resolved(model, defs)
    if served.get("x-kubernetes-preserve-unknown-fields"):
        return  # the API server keeps whatever is written here
    if model.get("additionalProperties") is True:
        yield f"{path} (free-form)"
        return
    served_enum = served.get("enum")
    if served_enum is not None:
        for value in model.get("enum", ()):
            if value not in served_enum:
                yield f"{path}={value}"
    if isinstance(model.get("items"), Mapping) and isinstance(served.get("items"), Mapping):
        yield from _missing(f"{path}[]", served["items"], model["items"], defs)
    if isinstance(model.get("additionalProperties"), Mapping) and isinstance(
        served.get("additionalProperties"), Mapping
    ):
        yield from _missing(f"{path}.*", served["additionalProperties"], model["additionalProperties"], defs)
    served_properties: Mapping[str, Any] = served.get("properties") or {}
    for name, child in (model.get("properties") or {}).items():
        if name in served_properties:
            yield from _missing(f"{path}.{name}", served_properties[name], child, defs)
        else:
            yield f"{path}.{name}"


def missing_fields(served_crd: Mapping[str, Any], written: WrittenCrd) -> list[str]:
    """What this version writes that `served_crd` lacks: field paths (`status.steps[].allMovedAt`), which
    the API server would drop from every write, and enum values (`status.phase=Expired`), which it would
    refuse; `version v1alpha1` when it does not serve the version this version calls."""
    versions = served_crd.get("spec", {}).get("versions") or []
    served = next((v for v in versions if v.get("name") == written.version and v.get("served")), None)
    if served is None:
        return [f"version {written.version}"]
    properties = ((served.get("schema") or {}).get("openAPIV3Schema") or {}).get("properties") or {}
    found: list[str] = []
    for section, model in written.sections:
        model_schema = model.model_json_schema(by_alias=True, mode="validation")
        if section not in properties:
            found.append(section)
        else:
            found.extend(_missing(section, properties[section], model_schema, model_schema.get("$defs", {})))
    return found


def stale_crds_message(
    served: Mapping[str, Mapping[str, Any] | None], written: Sequence[WrittenCrd]
) -> str | None:
    """One line naming each CRD of `written` that `served` (the API server's, by name; None: not
    installed) lacks or has without something this version writes, and the command that applies this
    version's; None when every one is current."""
    problems = []
    for crd in written:
        body = served.get(crd.name)
        missing = None if body is None else missing_fields(body, crd)
        if missing is None:
            problems.append(f"{crd.name} is not installed")
        elif missing:
            more = f" and {len(missing) - _NAMED_PATHS} more" if len(missing) > _NAMED_PATHS else ""
            problems.append(f"{crd.name} serves no {', '.join(missing[:_NAMED_PATHS])}{more}")
    if not problems:
        return None
    return (
        f"CRDs older than this version (a field its CRD lacks is dropped from every write): "
        f"{'; '.join(problems)}; apply this version's CRDs, then start again: {APPLY_CRDS}"
    )


def check_served_crds(api: KubeApi, written: Sequence[WrittenCrd]) -> None:
    """StaleCrds when the API server lacks one of `written` or serves it without fields this version
    writes; KubernetesUnavailable or ApiException (a 403) when it cannot be read."""
    message = stale_crds_message({crd.name: api.read_crd(crd.name) for crd in written}, written)
    if message is not None:
        raise StaleCrds(message)
