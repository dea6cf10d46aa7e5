"""The lists and watches the operator follows itself instead of Kopf (operator/watches.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes
import pytest

from iotistic_billing.k8s import FieldManager, KubeApi
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.watches import MANAGED_SECRETS, LoopFollower
from tests.conftest import eventually, unique_name

pytestmark = pytest.mark.integration


async def test_the_secret_watch_hands_over_listed_and_deleted_secrets_by_their_metadata_alone(
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    api = KubeApi(k8s_client, FieldManager.CLI)
    core = kubernetes.client.CoreV1Api(k8s_client)
    namespace = f"customer-{unique_name('watch')}"
    core.create_namespace({"metadata": {"name": namespace}})
    labels = {c.LABEL_MANAGED_BY: c.MANAGED_BY}
    secret = {"metadata": {"name": "listed", "labels": labels}, "stringData": {"token": "s3cret"}}
    core.create_namespaced_secret(namespace, secret)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "unlabelled"}, "stringData": {"a": "b"}})
    seen: list[tuple[str | None, dict[str, Any]]] = []
    watch = LoopFollower(
        api, MANAGED_SECRETS, asyncio.get_running_loop(), lambda kind, body: seen.append((kind, body))
    )
    watch.start()
    try:

        def events(name: str) -> list[tuple[str | None, dict[str, Any]]]:
            return [
                (k, b)
                for k, b in seen
                if b["metadata"]["namespace"] == namespace and b["metadata"]["name"] == name
            ]

        async def listed() -> bool:
            return [k for k, _ in events("listed")] == [None]

        await eventually(listed, 20, "the labelled Secret listed")
        core.create_namespaced_secret(namespace, {**secret, "metadata": {"name": "later", "labels": labels}})
        core.delete_namespaced_secret("listed", namespace)

        async def deleted() -> bool:
            return [k for k, _ in events("listed")] == [None, "DELETED"] and bool(events("later"))

        await eventually(deleted, 20, "the deletion and the new Secret seen")
        assert [k for k, _ in events("later")] == ["ADDED"]
        assert events("unlabelled") == []  # the API server applied the selector
        # Names, namespaces and labels only: no Secret's data crossed the wire.
        assert all("data" not in body and "stringData" not in body for _, body in seen)
        assert events("later")[0][1]["metadata"]["labels"] == labels
    finally:
        watch.stop()
        core.delete_namespace(namespace)
