"""The operator's diff-base storage builds exactly Kopf's essence, without copying what Kopf drops, and
keeps it in memory instead of an annotation."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from iotistic_billing.operator.kopf_tuning import HandledSpecs, LeanDiffBaseStorage, TransientProgressStorage


def customer_body() -> dict[str, Any]:
    return {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {
            "name": "acme",
            "uid": "0f4c",
            "resourceVersion": "812",
            "generation": 3,
            "creationTimestamp": "2026-11-30T10:00:00Z",
            "finalizers": ["iotistic.io/customer-protection"],
            "labels": {"team": "edge", "tier": ""},
            "annotations": {
                "iotistic.io/kopf-managed": "yes",
                "iotistic.io/last-handled-configuration": '{"spec":{"plan":"trial"}}',
                "iotistic.io/reconcile_customer": '{"started":"2026-11-30T10:00:01Z"}',
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
                "owner": "platform",
            },
            "managedFields": [
                {"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {"f:plan": {}}}},
                {"manager": "iotistic", "operation": "Update", "subresource": "status", "fieldsV1": {}},
            ],
        },
        "spec": {"email": "ops@acme.example.com", "plan": "starter", "instance": {"values": {"a": [1, {}]}}},
        "status": {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True"}]},
    }


def kopfs_storage() -> kopf.AnnotationsDiffBaseStorage:
    return kopf.AnnotationsDiffBaseStorage(prefix="iotistic.io", key="last-handled-configuration")


def lean_storage() -> LeanDiffBaseStorage:
    return LeanDiffBaseStorage(prefix="iotistic.io", key="last-handled-configuration")


@pytest.mark.parametrize(
    "change",
    [
        lambda body: None,
        lambda body: body["metadata"].pop("labels"),
        lambda body: body["metadata"].pop("annotations"),
        lambda body: body.pop("status"),
        lambda body: body.pop("spec"),
        lambda body: body["metadata"].update(labels={}, annotations={"iotistic.io/kopf-managed": "yes"}),
    ],
)
def test_the_essence_is_kopfs(change: Any) -> None:
    body = customer_body()
    change(body)
    essence = lean_storage().build(body=kopf.Body(copy.deepcopy(body)))
    assert essence == kopfs_storage().build(body=kopf.Body(copy.deepcopy(body)))
    assert "status" not in essence and "managedFields" not in essence.get("metadata", {})


def test_the_essence_does_not_share_the_bodys_objects() -> None:
    body = customer_body()
    essence = lean_storage().build(body=kopf.Body(body))
    essence["spec"]["instance"]["values"]["a"][1]["changed"] = True
    essence["metadata"]["labels"]["team"] = "core"
    assert body["spec"]["instance"]["values"]["a"][1] == {}
    assert body["metadata"]["labels"]["team"] == "edge"


@pytest.mark.parametrize(
    ("extra", "kept"),
    [
        (["status.phase"], {"status": {"phase": "Ready"}}),
        ([("metadata", "generation")], {"metadata": {"generation": 3}}),
        ([("spec",)], {}),  # the reconcile handler's field: in the lean body already
        (["metadata.labels.team", "spec.plan"], {}),
    ],
)
def test_extra_fields_are_kopfs(extra: list[Any], kept: dict[str, Any]) -> None:
    body = customer_body()
    essence = lean_storage().build(body=kopf.Body(body), extra_fields=extra)
    assert essence == kopfs_storage().build(body=kopf.Body(body), extra_fields=extra)
    for stanza, fields in kept.items():
        assert essence[stanza].items() >= fields.items()


class NotToBeCopied:
    def __deepcopy__(self, memo: Any) -> Any:
        raise AssertionError("the status and managedFields are not copied")


@pytest.mark.parametrize("extra", [None, [("spec",)]])
def test_status_and_managed_fields_are_not_copied(extra: Any) -> None:
    body = customer_body()
    body["status"]["conditions"].append(NotToBeCopied())
    body["metadata"]["managedFields"].append(NotToBeCopied())
    essence = lean_storage().build(body=kopf.Body(body), extra_fields=extra)
    assert essence["spec"] == body["spec"]
    with pytest.raises(AssertionError, match="not copied"):
        kopfs_storage().build(body=kopf.Body(body), extra_fields=extra)


def deployment_body() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "instance-api", "namespace": "customer-acme", "labels": {"app": "api"}},
        "spec": {"replicas": 1, "template": {"spec": {"containers": [NotToBeCopied()]}}},
    }


@pytest.mark.parametrize("api_version", ["apps/v1", "v1"])
def test_other_kinds_have_an_empty_essence_built_without_copying(api_version: str) -> None:
    body = deployment_body() | {"apiVersion": api_version}
    assert lean_storage().build(body=kopf.Body(body)) == {}


def test_only_customers_have_handlers_that_use_the_essence() -> None:
    """Kopf's essence feeds change handlers (their diff) and daemons (a change resets their idling);
    the lean storage leaves it empty for every other kind, so such a handler on another resource
    would never see a change."""
    registry = kopf.get_default_registry()
    handlers = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    assert handlers
    for handler in handlers:
        assert handler.selector is not None
        if handler.selector.any_name == "instancerollouts":
            # The rollout's daemon reads Kopf's live body, never the essence, and does not idle.
            assert handler.id == "rollout" and getattr(handler, "idle", None) is None
            continue
        assert (handler.selector.group, handler.selector.any_name) == ("iotistic.io", "customers"), handler.id


def handled_specs() -> HandledSpecs:
    return HandledSpecs(prefix="iotistic.io", key="last-handled-configuration")


def test_the_handled_essence_is_kept_per_customer_without_a_patch() -> None:
    storage, body = handled_specs(), kopf.Body(customer_body())
    essence = storage.build(body=body)
    assert storage.fetch(body=body) is None  # the earlier versions' annotation is not read
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=essence)
    assert not patch  # nothing for Kopf to write to the Customer
    assert storage.fetch(body=body) == essence
    other = customer_body()
    other["metadata"]["uid"] = "7a21"
    assert storage.fetch(body=kopf.Body(other)) is None


def test_a_changed_spec_differs_from_the_handled_essence() -> None:
    storage, body = handled_specs(), kopf.Body(customer_body())
    storage.store(body=body, patch=kopf.Patch(), essence=storage.build(body=body))
    changed = customer_body()
    changed["spec"]["plan"] = "professional"
    old = storage.fetch(body=kopf.Body(changed))
    new = storage.build(body=kopf.Body(changed))
    assert old is not None and old["spec"]["plan"] == "starter" and new["spec"]["plan"] == "professional"


def test_a_deleted_customer_is_forgotten() -> None:
    storage, body = handled_specs(), kopf.Body(customer_body())
    storage.store(body=body, patch=kopf.Patch(), essence=storage.build(body=body))
    storage.forget(body)
    assert storage.fetch(body=body) is None
    deleting = customer_body()
    deleting["metadata"]["deletionTimestamp"] = "2026-11-30T11:00:00Z"
    storage.store(body=body, patch=kopf.Patch(), essence=storage.build(body=body))
    storage.store(body=kopf.Body(deleting), patch=kopf.Patch(), essence=storage.build(body=body))
    assert storage.fetch(body=body) is None


def progress_storage() -> TransientProgressStorage:
    return TransientProgressStorage(prefix="iotistic.io")


def plain_customer() -> kopf.Body:
    body = customer_body()
    body["metadata"]["annotations"] = {"owner": "platform"}
    return kopf.Body(body)


def test_progress_purged_in_the_same_cycle_leaves_no_patch() -> None:
    storage, body, patch = progress_storage(), plain_customer(), kopf.Patch()
    storage.store(key=kopf.HandlerId("reconcile_customer"), record={"success": True}, body=body, patch=patch)
    assert patch["metadata"]["annotations"]["iotistic.io/kopf-managed"] == "yes"
    storage.purge(key=kopf.HandlerId("reconcile_customer"), body=body, patch=patch)
    assert not patch


def test_the_marker_stays_beside_progress_that_stays() -> None:
    storage, body, patch = progress_storage(), plain_customer(), kopf.Patch({"status": {"phase": "Ready"}})
    storage.store(key=kopf.HandlerId("reconcile_customer"), record={"retries": 1}, body=body, patch=patch)
    storage.store(key=kopf.HandlerId("housekeeping"), record={"success": True}, body=body, patch=patch)
    storage.purge(key=kopf.HandlerId("housekeeping"), body=body, patch=patch)
    annotations = patch["metadata"]["annotations"]
    assert set(annotations) == {"iotistic.io/kopf-managed", "iotistic.io/reconcile_customer"}
    assert patch["status"] == {"phase": "Ready"}


def test_a_purge_of_stored_progress_keeps_the_written_marker() -> None:
    body = customer_body()
    body["metadata"]["annotations"] = {
        "iotistic.io/kopf-managed": "yes",
        "iotistic.io/reconcile_customer": '{"retries":1}',
    }
    storage, patch = progress_storage(), kopf.Patch()
    storage.purge(key=kopf.HandlerId("reconcile_customer"), body=kopf.Body(body), patch=patch)
    assert patch == {"metadata": {"annotations": {"iotistic.io/reconcile_customer": None}}}
