"""The webhook server's Kubernetes calls: Customers (read, list, create, apply spec.subscription, suspend)
and the licence Secret. The official client runs in threads, bounded by a semaphore, with a timeout per
call; an API server that cannot be reached or answers 5xx is a `DependencyUnavailable` (503)."""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Callable
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import (
    API_VERSION,
    GROUP,
    KIND,
    LICENSE_SECRET_NAME,
    PLURAL,
    VERSION,
    WEBHOOK_FIELD_MANAGER,
)
from iotistic_billing.webhook_server.errors import DependencyUnavailable

_APPLY = "application/apply-patch+yaml"
_MERGE = "application/merge-patch+json"
# Customers created by signup are written under this manager, so that managedFields tell them apart
# from GitOps; spec.subscription is applied under WEBHOOK_FIELD_MANAGER.
SIGNUP_FIELD_MANAGER = "iotistic-billing-api"


class Cluster:
    def __init__(self, api_client: kubernetes.client.ApiClient, timeout: float, concurrency: int) -> None:
        self.api_client = api_client
        self.timeout = timeout
        self.objects = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.version = kubernetes.client.VersionApi(api_client)
        self._slots = asyncio.Semaphore(concurrency)

    async def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(function, *args, _request_timeout=self.timeout, **kwargs)
        async with self._slots:
            try:
                return await asyncio.to_thread(call)
            except ApiException as error:
                if error.status is None or error.status >= 500 or error.status == 429:
                    raise DependencyUnavailable("Kubernetes API") from None
                raise
            except (urllib3.exceptions.HTTPError, OSError):
                raise DependencyUnavailable("Kubernetes API") from None

    async def ping(self) -> None:
        await self._call(self.version.get_code)

    async def get_customer(self, name: str) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = await self._call(
                self.objects.get_cluster_custom_object, GROUP, VERSION, PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return body

    async def list_customers(self, page_size: int = 500) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            extra = {"_continue": token} if token else {}
            page: dict[str, Any] = await self._call(
                self.objects.list_cluster_custom_object, GROUP, VERSION, PLURAL, limit=page_size, **extra
            )
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    async def create_customer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a Customer; ApiException 409 when the name is taken."""
        created: dict[str, Any] = await self._call(
            self.objects.create_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            body,
            field_manager=SIGNUP_FIELD_MANAGER,
        )
        return created

    async def apply_subscription(self, name: str, subscription: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of spec.subscription alone, under the webhook server's field manager.

        Only apiVersion, kind, metadata.name and spec.subscription are sent: the rest of the spec belongs
        to people and GitOps, and an apply owns exactly what it sends.
        """
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name},
            "spec": {"subscription": subscription},
        }
        applied: dict[str, Any] = await self._call(
            self.objects.patch_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            name,
            body,
            field_manager=WEBHOOK_FIELD_MANAGER,
            force=True,
            _content_type=_APPLY,
        )
        return applied

    async def suspend(self, name: str) -> dict[str, Any]:
        """spec.suspended: true by a merge patch (an admin action, not state the server keeps owning)."""
        patched: dict[str, Any] = await self._call(
            self.objects.patch_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            name,
            {"spec": {"suspended": True}},
            field_manager=SIGNUP_FIELD_MANAGER,
            _content_type=_MERGE,
        )
        return patched

    async def patch_status(self, name: str, patch: dict[str, Any], field_manager: str) -> dict[str, Any]:
        """A merge patch of a Customer's status (carrying metadata.resourceVersion makes it conditional)."""
        patched: dict[str, Any] = await self._call(
            self.objects.patch_cluster_custom_object_status,
            GROUP,
            VERSION,
            PLURAL,
            name,
            patch,
            field_manager=field_manager,
            _content_type=_MERGE,
        )
        return patched

    async def read_license_secret(self, namespace: str) -> dict[str, bytes] | None:
        """The decoded data of the licence Secret, or None while it (or its namespace) does not exist."""
        try:
            secret = await self._call(self.core.read_namespaced_secret, LICENSE_SECRET_NAME, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}


__all__ = ["SIGNUP_FIELD_MANAGER", "Cluster"]
