"""The objects a pass applies for a Customer, as manifests (pure): its namespace and its licence Secret."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Literal

from iotistic_billing.customer import (
    API_VERSION,
    GROUP,
    KIND,
    LICENSE_JWT_KEY,
    LICENSE_PUBLIC_KEY_KEY,
    LICENSE_SECRET_NAME,
    NOTIFICATIONS_SECRET_KEY,
    NOTIFICATIONS_SECRET_NAME,
    USAGE_API_KEY_KEY,
)
from iotistic_billing.operator import constants as c


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind", KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(name: str, customer_id: str) -> dict[str, str]:
    return {c.LABEL_CUSTOMER: name, c.LABEL_CUSTOMER_ID: customer_id, c.LABEL_MANAGED_BY: c.MANAGED_BY}


def namespace_manifest(namespace: str, name: str, customer_id: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace, "labels": _labels(name, customer_id), "ownerReferences": [owner]},
    }


# Whose an existing namespace customer-<name> is (namespace_holder).
NamespaceHolder = Literal["this", "earlier", "other"]


def namespace_holder(namespace: Mapping[str, Any], name: str, uid: str) -> NamespaceHolder:
    """Whose the existing namespace of Customer `name` (uid `uid`) is: this Customer's (it names its uid
    as owner, which the operator writes), an earlier Customer's of that name (the operator's label and a
    Customer of that name as owner: deleted since, as a name is one object's at a time), or someone
    else's (made by hand, by the earlier system, by another tool), which the operator never writes to
    unless its maker labelled it `iotistic.io/customer: <name>` (and no Customer owns it)."""
    meta = namespace.get("metadata") or {}
    owners = [
        ref
        for ref in meta.get("ownerReferences") or ()
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")
    ]
    if any(ref.get("uid") == uid for ref in owners):
        return "this"
    labels = meta.get("labels") or {}
    # Handed over by whoever made it: a GitOps repository that applies the namespace with the Secret a
    # webhook's secretRef names, beside the Customer, labels it for the Customer (README.md).
    if not owners and labels.get(c.LABEL_CUSTOMER) == name:
        return "this"
    if labels.get(c.LABEL_MANAGED_BY) == c.MANAGED_BY and any(ref.get("name") == name for ref in owners):
        return "earlier"
    return "other"


def namespace_as_applied(namespace: Mapping[str, Any], manifest: Mapping[str, Any]) -> bool:
    """Whether an existing namespace already carries what `manifest` would apply (its labels and its
    ownerReference): an apply would change nothing."""
    meta, wanted = namespace.get("metadata") or {}, manifest["metadata"]
    labels, owners = meta.get("labels") or {}, meta.get("ownerReferences") or []
    return all(labels.get(key) == value for key, value in wanted["labels"].items()) and all(
        owner in owners for owner in wanted["ownerReferences"]
    )


def license_secret_manifest(
    *,
    namespace: str,
    name: str,
    customer_id: str,
    owner: dict[str, Any],
    action: str,
    suspended: bool,
    token: str,
    public_key_pem: bytes,
    usage_key: str,
) -> dict[str, Any]:
    """The Secret the instance reads; `action` is the history action its licence is recorded under
    (operator/license.py: a pass that crashed after writing it records the same row later), `suspended`
    whether it was minted under spec.suspended."""

    def encoded(value: bytes) -> str:
        return base64.b64encode(value).decode()

    annotations = {c.ANNOTATION_LICENSE_ACTION: action}
    if suspended:
        annotations[c.ANNOTATION_LICENSE_SUSPENDED] = "true"

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": LICENSE_SECRET_NAME,
            "namespace": namespace,
            "labels": _labels(name, customer_id),
            "annotations": annotations,
            "ownerReferences": [owner],
        },
        "type": "Opaque",
        "data": {
            LICENSE_JWT_KEY: encoded(token.encode()),
            LICENSE_PUBLIC_KEY_KEY: encoded(public_key_pem),
            USAGE_API_KEY_KEY: encoded(usage_key.encode()),
        },
    }


def notifications_secret_manifest(
    *, namespace: str, name: str, customer_id: str, owner: dict[str, Any], secret: bytes
) -> dict[str, Any]:
    """The copy of the customer's webhook signing secret that the webhook server may read."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": NOTIFICATIONS_SECRET_NAME,
            "namespace": namespace,
            "labels": _labels(name, customer_id),
            "ownerReferences": [owner],
        },
        "type": "Opaque",
        "data": {NOTIFICATIONS_SECRET_KEY: base64.b64encode(secret).decode()},
    }


__all__ = [
    "NamespaceHolder",
    "license_secret_manifest",
    "namespace_as_applied",
    "namespace_holder",
    "namespace_manifest",
    "notifications_secret_manifest",
    "owner_reference",
]
