"""The operator's own Kubernetes calls, through the official client, run in threads off the event loop.

Responses are read as plain JSON (`_preload_content=False`), not as the client's models: building a
V1DeploymentList and turning it back into dicts was the largest single part of the operator's CPU.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.operator import constants as c

_APPLY = "application/apply-patch+yaml"
_MERGE = "application/merge-patch+json"
# Labels and names only: helm's storage Secrets carry the whole release (chart files included).
_METADATA_ONLY = {"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"}


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
        "kind": body.get("kind", "Customer"),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.objects = kubernetes.client.CustomObjectsApi(api_client)

    async def _call(self, method: Any, *args: Any, parse: bool = True, **options: Any) -> Any:
        """A method of the official client in a thread, its response body parsed as plain JSON (read
        whole either way, which returns the connection to the pool)."""

        def call() -> Any:
            body = method(*args, _preload_content=False, **options).data
            return json.loads(body) if parse else None

        return await asyncio.to_thread(call)

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = await self._call(
                self.objects.get_cluster_custom_object, GROUP, VERSION, PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return body

    async def patch_customer_status(self, name: str, status: dict[str, Any], resource_version: str) -> None:
        """A merge patch of the status, conditional on `resource_version` (a 409 when it moved)."""
        await self._call(
            self.objects.patch_cluster_custom_object_status,
            GROUP,
            VERSION,
            PLURAL,
            name,
            {"metadata": {"resourceVersion": resource_version}, "status": status},
            _content_type=_MERGE,
            parse=False,
        )

    async def apply(self, kind: str, namespace: str, body: dict[str, Any]) -> None:
        """Server-side apply under the operator's field manager: create or converge in one call."""
        name = body["metadata"]["name"]
        options: dict[str, Any] = {"field_manager": c.FIELD_MANAGER, "force": True, "_content_type": _APPLY}
        if kind == "Namespace":
            await self._call(self.core.patch_namespace, name, body, parse=False, **options)
        elif kind == "Secret":
            await self._call(self.core.patch_namespaced_secret, name, namespace, body, parse=False, **options)
        else:
            raise ValueError(f"apply of {kind} is not supported")

    async def read_secret_data(
        self, namespace: str, name: str
    ) -> tuple[dict[str, bytes], dict[str, str]] | None:
        """A Secret's decoded data and its annotations, or None when it (or its namespace) is missing."""
        try:
            secret = await self._call(self.core.read_namespaced_secret, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        data = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
        return data, dict(secret["metadata"].get("annotations") or {})

    async def namespace_exists(self, name: str) -> bool:
        try:
            namespace = await self._call(self.core.read_namespace, name)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return "deletionTimestamp" not in namespace["metadata"]

    async def delete_namespace(self, name: str) -> bool:
        """Request the namespace's deletion; False when it was already gone."""
        try:
            await self._call(self.core.delete_namespace, name, parse=False)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    async def list_deployments(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        try:
            result = await self._call(
                self.apps.list_namespaced_deployment, namespace, label_selector=selector
            )
        except ApiException as error:
            if error.status == 404:
                return []
            raise
        items: list[dict[str, Any]] = result.get("items") or []
        return items

    async def helm_release_revisions(self, namespace: str, release: str) -> dict[int, str]:
        """Helm's own storage (Secrets labelled owner=helm): revision -> status, read without helm."""
        result = await self._call(
            self.core.list_namespaced_secret,
            namespace,
            label_selector=f"owner=helm,name={release}",
            _headers=_METADATA_ONLY,
        )
        revisions = {}
        # An empty PartialObjectMetadataList has "items": null (kubernetes-client/python#2142).
        for item in result.get("items") or []:
            labels = item["metadata"].get("labels") or {}
            revisions[int(labels.get("version", 0))] = labels.get("status", "")
        return revisions
