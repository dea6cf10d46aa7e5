"""The one way into Kubernetes for every part (operator, webhook server, CLI, tests).

A client named after its component (its User-Agent), every write under a field manager of ours (who
writes which field: docs/architecture.md), answers read as plain JSON rather than the client's models,
"not found" as None, and an API server that cannot answer as `KubernetesUnavailable`. `KubeApi` makes
the calls, each with a timeout and none retried by urllib3 (the callers back off); `Kube` runs them in
threads of its own off the event loop, bounded, for the asynchronous parts.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, Literal, NamedTuple, ParamSpec, TypeVar
from urllib.parse import quote

import kubernetes
import orjson
import urllib3
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import API_VERSION, GROUP, KIND, PLURAL, VERSION
from iotistic_billing.rollout import ROLLOUT_KIND, ROLLOUT_PLURAL

APPLY_PATCH: Final = "application/apply-patch+yaml"
MERGE_PATCH: Final = "application/merge-patch+json"
# Labels and names only: helm's storage Secrets carry the whole release (chart files included).
_METADATA_ONLY: Final = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
# The same for one object: those of a watch's events, a Pod read.
_METADATA_ONLY_OBJECT: Final = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
# The API server's answers and watch events, parsed at twice the standard library's pace (the operator's
# Deployment watch and lists, bench/README.md, reconcile). It reads no integer past 64 bits exactly, and
# the API server writes none (Go's unstructured objects hold int64 or float64).
_parse: Final = orjson.loads
# Seconds to connect to the API server and to wait for each read of its answer (the webhook server sets
# its own): one that accepts and never answers, or a connection gone half-open, held the calling thread
# for ever, and with it a pass's lock and slot. The API server gives up on a request itself after 60 s.
CALL_TIMEOUT: Final = (10.0, 30.0)
# A watch's read waits this much longer than the server's own end of the watch.
WATCH_READ_MARGIN: Final = 30
# The kinds Events are posted about: both cluster-scoped, of API_VERSION.
EventKind = Literal["Customer", "InstanceRollout"]
EVENT_KINDS: Final[tuple[EventKind, ...]] = (KIND, ROLLOUT_KIND)
# Where every Event on a Customer or an InstanceRollout is posted, whatever namespace the poster runs
# in: `kubectl describe` of a cluster-scoped object lists only Events whose involvedObject has no
# namespace, and the API server keeps such an Event in `default` alone (or kube-system, with eventTime).
EVENTS_NAMESPACE: Final = "default"
# Kube's calls in flight at once, unless its maker says: the operator's passes (2 x HELM_CONCURRENCY),
# housekeeping and rollout ticks share them.
KUBE_CONCURRENCY: Final = 16

P = ParamSpec("P")
T = TypeVar("T")


class FieldManager(StrEnum):
    """Who wrote a field, as `managedFields` shows it."""

    OPERATOR = "iotistic-operator"  # namespaces, licence Secrets, Customer status
    SIGNUP = "iotistic-billing-api"  # Customers created by the signup route, admin suspensions
    STRIPE = "iotistic-webhooks"  # spec.subscription, by server-side apply
    USAGE = "iotistic-usage"  # status.usage and the WithinLimits condition
    CLI = "iotistic-billing-cli"  # `iotistic-billing customer`
    CONSOLE = "iotistic-console"  # the admin console's actions: a suspension, a reconcile request
    ROLLOUT = "iotistic-rollout"  # a Customer's rollout.iotistic.io/* annotations, InstanceRollout status
    NOTICES = "iotistic-notices"  # the notice sender: a deleted Customer's kept signing secret, dropped


@dataclass(frozen=True)
class Watched:
    """What a list and then a watch follow (operator/watches.py): every object of a resource the API
    server's label selector keeps, whole or its metadata only."""

    what: str  # for messages: "Customers"
    resource: Literal["customers", "deployments", "secrets"]
    label_selector: str | None = None
    metadata_only: bool = False


CUSTOMERS: Final = Watched("Customers", "customers")


class SecretData(NamedTuple):
    """A Secret's decoded data, its annotations and its labels (whose copy it is: the operator's
    Secrets carry the customer id)."""

    data: dict[str, bytes]
    annotations: dict[str, str]
    labels: dict[str, str]
    # What a write conditional on this read names (merge_secret_data's `resource_version`).
    resource_version: str = ""
    # The uids of its owners (the operator's Secrets are owned by their Customer).
    owner_uids: tuple[str, ...] = ()


class KubernetesUnavailable(Exception):
    """The API server cannot be reached, or answered 5xx or 429: retry later. `maybe_applied`: a write
    that was sent and then not answered (timed out, the connection dropped, 500 or 504), which the
    server may have made; otherwise nothing was changed."""

    def __init__(self, message: str, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


# Answers after which a write may have been made: the server's own failure or timeout mid-request.
_MAYBE_APPLIED_STATUSES: Final = frozenset({500, 504})


@contextmanager
def _unavailable_as_such(doing: str = "", writes: bool = False) -> Iterator[None]:
    """No answer (unreachable, timed out), 5xx and 429 as KubernetesUnavailable, `doing` said first; any
    other answer stays the client's ApiException, with its code and message (a 403 of RBAC, a 401 of a
    rotated token, a 409). `writes`: the call changes something, which a lost answer leaves in doubt."""
    try:
        yield
    except ApiException as error:
        if error.status is None or error.status >= 500 or error.status == 429:
            raise KubernetesUnavailable(
                f"{doing}the API server answered {error.status}",
                maybe_applied=writes and error.status in _MAYBE_APPLIED_STATUSES,
            ) from None
        raise
    except urllib3.exceptions.ReadTimeoutError:
        raise KubernetesUnavailable(
            f"{doing}the API server did not answer in time", maybe_applied=writes
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        sent = isinstance(error, urllib3.exceptions.ProtocolError)  # dropped after the request went out
        raise KubernetesUnavailable(
            f"{doing}the API server cannot be reached ({type(error).__name__})", maybe_applied=writes and sent
        ) from None


def _package_version() -> str:
    try:
        return version("iotistic-billing")
    except PackageNotFoundError:
        return "dev"


def api_client(component: str, *, kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """The given kubeconfig, else KUBECONFIG; in a Pod without either, its service account. Requests
    carry `iotistic-billing/<version> (<component>)` as User-Agent (the API server's audit log).

    No urllib3 retries: its default retried a read that timed out three times (a 10 s timeout became
    40 s) and slept through a 429's or 503's Retry-After, where every caller backs off on its own. TCP
    keepalive as client-go's, so that a watch's connection dropped by a load balancer is noticed."""
    config: Any = kubernetes.config
    configuration = kubernetes.client.Configuration()
    configuration.retries = False
    configuration.keep_alive = True
    # A connection for each of Kube's threads: urllib3's pool (5 a CPU) dropped and reopened the rest.
    configuration.connection_pool_maxsize = max(KUBE_CONCURRENCY, configuration.connection_pool_maxsize)
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
        client = kubernetes.client.ApiClient(configuration)
    else:
        client = config.new_client_from_config(config_file=kubeconfig, client_configuration=configuration)
    client.user_agent = f"iotistic-billing/{_package_version()} ({component})"
    return client


def not_found_as_none(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
    try:
        return call(*args, **kwargs)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def refusal_message(error: ApiException) -> str:
    """What the API server said when it refused a request (its Status's message), else the HTTP reason."""
    try:
        status = json.loads(error.body or "{}")
    except ValueError:
        status = None
    message = status.get("message") if isinstance(status, dict) else None
    return str(message or error.reason or f"HTTP {error.status}")


def refusal_causes(error: ApiException) -> list[dict[str, Any]]:
    """The details.causes of the API server's Status in a refusal; none when its body holds no Status."""
    try:
        status = json.loads(error.body or "{}")
    except ValueError:
        return []
    details = status.get("details") if isinstance(status, dict) else None
    causes = details.get("causes") if isinstance(details, dict) else None
    return [cause for cause in causes if isinstance(cause, dict)] if isinstance(causes, list) else []


def refused_for_its_uid(error: ApiException) -> bool:
    """A write naming metadata.uid refused because the object of its name has another uid: deleted and
    made again since it was read (the API server's 422, a uid being immutable)."""
    causes = refusal_causes(error)
    return error.status == 422 and any(cause.get("field") == "metadata.uid" for cause in causes)


def resource_version(body: Mapping[str, Any]) -> int:
    """An object's resourceVersion as a number (0 when it has none), to tell which of two copies of one
    object is newer: Kubernetes calls them opaque, but the API server's are etcd revisions."""
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return 0


def _path(*parts: str) -> str:
    """A REST path of the API server: a fixed prefix, then names and resources, each quoted, so that no
    name given on a command line reaches another path."""
    return "/".join([parts[0], *(quote(part, safe="") for part in parts[1:])])


def _ours(plural: str, *names: str) -> str:
    """The path of one of our cluster-scoped resources (`customers`, `instancerollouts`), of an object
    of it, of its status."""
    return _path(f"/apis/{GROUP}/{VERSION}/{plural}", *names)


# Where the watched resources are listed and watched, across namespaces.
_WATCHED_PATHS: Final = {
    "customers": _ours(PLURAL),
    "deployments": "/apis/apps/v1/deployments",
    "secrets": "/api/v1/secrets",
}


_CRDS_PATH: Final = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def customer_body(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


class KubeApi:
    """Synchronous calls, bodies as plain JSON. Writes go under `field_manager` unless a call names
    another; `timeout` bounds each call: seconds in all, or to connect and for each read (None:
    CALL_TIMEOUT)."""

    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        field_manager: FieldManager,
        timeout: float | tuple[float, float] | None = None,
    ) -> None:
        self.client = client
        self.field_manager = field_manager
        self.timeout = CALL_TIMEOUT if timeout is None else timeout

    def send(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        *,
        content_type: str | None = None,
        accept: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """One request to the API server, through the official client's connection pool and credentials,
        its answer not read yet (a watch streams it); ApiException for any answer but a 2xx. Not the
        client's typed API classes: importing them took a second at every start of the operator and of
        each CLI command, and their pydantic checks a third of a call's own CPU (bench/kube_client.py).
        """
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = [(key, value) for key, value in (query or {}).items() if value is not None]
        request = self.client.param_serialize(
            method, path, query_params=params, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        answer: Any = self.client.call_api(*request, _request_timeout=timeout or self.timeout)
        if not 200 <= answer.status <= 299:
            answer.read()
            raise ApiException.from_response(http_resp=answer, body=None, data=None)
        response: urllib3.BaseHTTPResponse = answer.response
        return response

    def call(self, method: str, path: str, *args: Any, parse: bool = True, **options: Any) -> Any:
        """`send`, its answer read whole (which returns the connection to the pool) and parsed as plain
        JSON: building the client's models was the largest single part of the operator's CPU."""
        with _unavailable_as_such(writes=method != "GET"):
            data = self.send(method, path, *args, **options).data
        return _parse(data) if parse else None

    def _manager(self, manager: FieldManager | None) -> str:
        return str(manager or self.field_manager)

    # ----- Customers -----

    def read_customer(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = not_found_as_none(self.call, "GET", _ours(PLURAL, name))
        return found

    def list_customers(self, page_size: int = 500) -> list[dict[str, Any]]:
        return self.list_at(CUSTOMERS, page_size)[0]

    def list_at(self, kind: Watched, page_size: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every object of `kind`, and the resourceVersion of the list (where a watch of what follows
        starts)."""
        return self._list_pages(
            _WATCHED_PATHS[kind.resource],
            {"labelSelector": kind.label_selector},
            page_size,
            _METADATA_ONLY if kind.metadata_only else "application/json",
        )

    def _list_pages(
        self, path: str, query: Mapping[str, Any], page_size: int, accept: str = "application/json"
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object a list at `path` returns, a page at a time, and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = self.call("GET", path, {**query, "limit": page_size, "continue": token}, accept=accept)
            # An empty PartialObjectMetadataList has "items": null (kubernetes-client/python#2142).
            items.extend(page.get("items") or [])
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion", ""))

    def watch(
        self,
        kind: Watched,
        resource_version: str,
        timeout_seconds: int = 300,
        opened: Callable[[Any], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The watch events of `kind` after `resource_version` (type and object, bookmarks included),
        until the server ends the watch. `opened` gets the response, so that another thread may close
        it to stop the watch."""
        with _unavailable_as_such(f"cannot watch {kind.what}: "):
            response = self.send(
                "GET",
                _WATCHED_PATHS[kind.resource],
                {
                    "labelSelector": kind.label_selector,
                    "watch": True,
                    "allowWatchBookmarks": True,
                    "resourceVersion": resource_version,
                    "timeoutSeconds": timeout_seconds,
                },
                accept=_METADATA_ONLY_OBJECT if kind.metadata_only else "application/json",
                # A read that waits longer than the server's own end of the watch: the connection is gone.
                timeout=(CALL_TIMEOUT[0], timeout_seconds + WATCH_READ_MARGIN),
            )
        if opened is not None:
            opened(response)
        try:
            pending = b""
            for chunk in response.stream(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line:
                        event: dict[str, Any] = _parse(line)
                        yield event
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubernetesUnavailable(f"the watch of {kind.what} broke ({type(error).__name__})") from None
        finally:
            response.close()
            response.release_conn()

    def create_customer(self, body: dict[str, Any], manager: FieldManager | None = None) -> dict[str, Any]:
        """Create a Customer; ApiException 409 when the name is taken."""
        created: dict[str, Any] = self.call(
            "POST", _ours(PLURAL), {"fieldManager": self._manager(manager)}, body
        )
        return created

    def _merge_patch(self, path: str, patch: dict[str, Any], manager: FieldManager | None) -> dict[str, Any]:
        patched: dict[str, Any] = self.call(
            "PATCH", path, {"fieldManager": self._manager(manager)}, patch, content_type=MERGE_PATCH
        )
        return patched

    def patch_customer(
        self, name: str, patch: dict[str, Any], manager: FieldManager | None = None
    ) -> dict[str, Any]:
        """A merge patch of a Customer (spec changes of people and admins: a plan, a suspension)."""
        return self._merge_patch(_ours(PLURAL, name), patch, manager)

    def apply_customer_spec(
        self,
        name: str,
        spec: dict[str, Any],
        manager: FieldManager | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """Server-side apply of the given part of a spec: the manager owns exactly the fields it sends
        (spec.subscription for the Stripe inbox), the rest belongs to people and GitOps. With `uid`, only
        onto that Customer: none is a 409, another one made under its name since a 422 (its uid is
        immutable). With `resource_version`, only onto the Customer as it was read: changed since, a 409."""
        body = customer_body(name, spec)
        if uid is not None:
            body["metadata"]["uid"] = uid
        if resource_version is not None:
            body["metadata"]["resourceVersion"] = resource_version
        return self._apply_customer(body, manager)

    def _apply_customer(self, body: dict[str, Any], manager: FieldManager | None) -> dict[str, Any]:
        applied: dict[str, Any] = self.call(
            "PATCH",
            _ours(PLURAL, body["metadata"]["name"]),
            {"fieldManager": self._manager(manager), "force": True},
            body,
            content_type=APPLY_PATCH,
        )
        return applied

    def patch_customer_status(
        self,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
        manager: FieldManager | None = None,
    ) -> dict[str, Any]:
        """A merge patch of the status; with `resource_version`, conditional on it (409 when it moved,
        as a merge patch replaces the conditions list another writer may have changed)."""
        patch: dict[str, Any] = {"status": status}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        return self._merge_patch(_ours(PLURAL, name, "status"), patch, manager)

    def apply_customer_annotations(
        self, name: str, annotations: dict[str, str], manager: FieldManager | None = None
    ) -> dict[str, Any]:
        """Server-side apply of annotations alone: the manager owns exactly these keys (one it owned
        and leaves out is removed), never the spec."""
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "annotations": annotations},
        }
        return self._apply_customer(body, manager)

    # ----- InstanceRollouts -----

    def list_rollouts(self) -> list[dict[str, Any]]:
        page = self.call("GET", _ours(ROLLOUT_PLURAL))
        items: list[dict[str, Any]] = page.get("items") or []
        return items

    def read_rollout(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = not_found_as_none(self.call, "GET", _ours(ROLLOUT_PLURAL, name))
        return found

    def patch_rollout(
        self, name: str, patch: dict[str, Any], manager: FieldManager | None = None, status: bool = False
    ) -> dict[str, Any]:
        """A merge patch of an InstanceRollout (the console's pause, resume, abort), or of its status."""
        path = _ours(ROLLOUT_PLURAL, name, "status") if status else _ours(ROLLOUT_PLURAL, name)
        return self._merge_patch(path, patch, manager)

    # ----- namespaced objects -----

    def apply(self, body: dict[str, Any]) -> None:
        """Server-side apply of a Namespace or a Secret: create or converge in one call."""
        meta = body["metadata"]
        if body["kind"] == "Namespace":
            path = _path("/api/v1/namespaces", meta["name"])
        elif body["kind"] == "Secret":
            path = _path("/api/v1/namespaces", meta["namespace"], "secrets", meta["name"])
        else:
            raise ValueError(f"apply of {body['kind']} is not supported")
        query = {"fieldManager": self._manager(None), "force": True}
        self.call("PATCH", path, query, body, content_type=APPLY_PATCH, parse=False)

    def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
        """A Secret's decoded data, annotations and labels, or None when it (or its namespace) is missing."""
        secret = not_found_as_none(self.call, "GET", _path("/api/v1/namespaces", namespace, "secrets", name))
        if secret is None:
            return None
        data = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
        meta = secret["metadata"]
        return SecretData(
            data,
            dict(meta.get("annotations") or {}),
            dict(meta.get("labels") or {}),
            str(meta.get("resourceVersion") or ""),
            tuple(str(ref.get("uid")) for ref in meta.get("ownerReferences") or () if ref.get("uid")),
        )

    def merge_secret_data(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, bytes | None],
        labels: Mapping[str, str] | None = None,
        manager: FieldManager | None = None,
        resource_version: str | None = None,
        annotations: Mapping[str, str | None] | None = None,
    ) -> None:
        """Set (bytes) or remove (None) keys of a Secret that several writers share, in one merge patch
        (no read-modify-write, so no other writer's key is lost), and its `annotations` likewise. A missing
        Secret is created with `labels` when something is set, and left missing when everything is
        removed. With `resource_version` the patch applies only to the Secret as read then (ApiException
        409 when it was written since)."""
        encoded = {
            key: None if value is None else base64.b64encode(value).decode() for key, value in data.items()
        }
        secrets = _path("/api/v1/namespaces", namespace, "secrets")
        query = {"fieldManager": self._manager(manager)}
        metadata: dict[str, Any] = {}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        if annotations:
            metadata["annotations"] = dict(annotations)
        patch = partial(
            self.call,
            "PATCH",
            _path(secrets, name),
            query,
            {"data": encoded, **({"metadata": metadata} if metadata else {})},
            content_type=MERGE_PATCH,
            parse=False,
        )
        try:
            patch()
            return
        except ApiException as error:
            if error.status != 404:
                raise
        set_annotations = {key: value for key, value in (annotations or {}).items() if value is not None}
        if all(value is None for value in data.values()) and not set_annotations:
            return
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(labels or {}),
                "annotations": set_annotations,
            },
            "type": "Opaque",
            "data": {key: value for key, value in encoded.items() if value is not None},
        }
        try:
            self.call("POST", secrets, query, body, parse=False)
        except ApiException as error:
            if error.status != 409:
                raise
            patch()  # another writer created it meanwhile

    def delete_secret(self, namespace: str, name: str, resource_version: str | None = None) -> bool:
        """Delete a Secret; False when it (or its namespace) was already gone. With `resource_version`,
        only the Secret as read then (ApiException 409 when it was written since)."""
        options = {"preconditions": {"resourceVersion": resource_version}} if resource_version else None
        try:
            self.call(
                "DELETE", _path("/api/v1/namespaces", namespace, "secrets", name), None, options, parse=False
            )
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def create_namespace(self, body: dict[str, Any]) -> bool:
        """Create a Namespace; False when one of that name exists (409), whoever made it and even while
        it is being deleted. Cheaper for the API server than an apply, and it never takes over a
        namespace someone else made."""
        try:
            self.call("POST", "/api/v1/namespaces", {"fieldManager": self._manager(None)}, body, parse=False)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def read_namespace(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = not_found_as_none(self.call, "GET", _path("/api/v1/namespaces", name))
        return found

    def delete_namespace(self, name: str) -> bool:
        """Request the namespace's deletion; False when it was already gone. One already being deleted is
        accepted again (200 with the namespace; a 409 only before Kubernetes 1.17, kubernetes#84122)."""
        try:
            self.call("DELETE", _path("/api/v1/namespaces", name), parse=False)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def list_deployments(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        result = not_found_as_none(
            self.call,
            "GET",
            _path("/apis/apps/v1/namespaces", namespace, "deployments"),
            {"labelSelector": selector},
        )
        items: list[dict[str, Any]] = (result or {}).get("items") or []
        return items

    def helm_release_revisions(self, namespace: str, release: str) -> dict[int, dict[str, str]]:
        """Helm's own storage (Secrets labelled owner=helm): revision -> its labels (helm's `status`
        among them), read without helm."""
        result = self.call(
            "GET",
            _path("/api/v1/namespaces", namespace, "secrets"),
            {"labelSelector": f"owner=helm,name={release}"},
            accept=_METADATA_ONLY,
        )
        revisions = {}
        # An empty PartialObjectMetadataList has "items": null (kubernetes-client/python#2142).
        for item in result.get("items") or []:
            labels = item["metadata"].get("labels") or {}
            revisions[int(labels.get("version", 0))] = labels
        return revisions

    def read_pod_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Pod's metadata alone (its name, uid, creationTimestamp), or None when there is none."""
        found: dict[str, Any] | None = not_found_as_none(
            self.call,
            "GET",
            _path("/api/v1/namespaces", namespace, "pods", name),
            accept=_METADATA_ONLY_OBJECT,
        )
        return found

    def list_customer_events(
        self, name: str, uid: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The newest `limit` Events about Customer `name`, newest first, from EVENTS_NAMESPACE, where
        every one is posted (create_event); with `uid`, only that Customer's, not those of a deleted one
        of the same name. Read whole, a page at a time: the API server lists in the order of the Events'
        names, which are random, so a first page of `limit` was any `limit`."""
        selector = f"involvedObject.kind={KIND},involvedObject.name={name}"
        if uid is not None:
            selector += f",involvedObject.uid={uid}"
        items = self._list_pages(
            _path("/api/v1/namespaces", EVENTS_NAMESPACE, "events"), {"fieldSelector": selector}, 500
        )[0]

        def newest(event: dict[str, Any]) -> tuple[str, int]:
            # Seconds are the timestamps' resolution: the resourceVersion orders Events of one second.
            when = (
                event.get("lastTimestamp")
                or event.get("eventTime")
                or event["metadata"].get("creationTimestamp")
                or ""
            )
            return str(when), resource_version(event)

        return sorted(items, key=newest, reverse=True)[:limit]

    def create_event(
        self,
        kind: EventKind,
        involved: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        event_type: str = "Normal",
    ) -> None:
        """An Event on the Customer or InstanceRollout `involved` (its body, or its metadata's name and
        uid), in EVENTS_NAMESPACE. Its involvedObject has no namespace: `kubectl describe` of a
        cluster-scoped object lists the Events whose involvedObject has its kind, name and uid and an
        empty namespace (Kopf's posting set the namespace it posted into, and describe showed none)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(EVENT_KINDS)}, got {kind!r}")
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": EVENTS_NAMESPACE},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": kind,
                "name": meta["name"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": event_type,
            "source": {"component": str(self.field_manager)},
            "reportingComponent": str(self.field_manager),
            "reportingInstance": str(self.field_manager),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.call("POST", _path("/api/v1/namespaces", EVENTS_NAMESPACE, "events"), body=body, parse=False)

    def server_version(self) -> dict[str, Any]:
        found: dict[str, Any] = self.call("GET", "/version/")
        return found

    def read_crd(self, name: str) -> dict[str, Any] | None:
        """A CustomResourceDefinition as the API server serves it, None when it is not installed. A list
        narrowed to its name, not a get: the operator's ClusterRole lists CRDs (Kopf's discovery does),
        and the webhook server's lists this one name alone (RBAC's resourceNames with the field selector).
        """
        page = self.call("GET", _CRDS_PATH, {"fieldSelector": f"metadata.name={name}"})
        items: list[dict[str, Any]] = page.get("items") or []
        return items[0] if items else None

    def close(self) -> None:
        close: Any = self.client.close  # untyped in the client
        close()


class Kube:
    """`KubeApi`'s calls for asynchronous code: each in a thread of its own pool, at most `concurrency`
    at once (the rest wait their turn). Not asyncio's default pool (the CPU count + 4 threads): a hung API
    server took all of it, and every other call queued behind."""

    def __init__(self, api: KubeApi, concurrency: int = KUBE_CONCURRENCY) -> None:
        self.api = api
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="kube")

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        # The caller's context variables go along, as with asyncio.to_thread.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, partial(context.run, call, *args, **kwargs)
        )

    def close(self) -> None:
        """Calls not started yet are cancelled; the running ones end by their timeout."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        return await self.run(self.api.read_customer, name)

    async def list_customers(self) -> list[dict[str, Any]]:
        return await self.run(self.api.list_customers)

    async def create_customer(
        self, body: dict[str, Any], manager: FieldManager | None = None
    ) -> dict[str, Any]:
        return await self.run(self.api.create_customer, body, manager)

    async def patch_customer(
        self, name: str, patch: dict[str, Any], manager: FieldManager | None = None
    ) -> dict[str, Any]:
        return await self.run(self.api.patch_customer, name, patch, manager)

    async def apply_customer_spec(
        self,
        name: str,
        spec: dict[str, Any],
        manager: FieldManager | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        return await self.run(self.api.apply_customer_spec, name, spec, manager, uid, resource_version)

    async def patch_customer_status(
        self,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
        manager: FieldManager | None = None,
    ) -> dict[str, Any]:
        return await self.run(self.api.patch_customer_status, name, status, resource_version, manager)

    async def apply_customer_annotations(
        self, name: str, annotations: dict[str, str], manager: FieldManager | None = None
    ) -> dict[str, Any]:
        return await self.run(self.api.apply_customer_annotations, name, annotations, manager)

    async def list_rollouts(self) -> list[dict[str, Any]]:
        return await self.run(self.api.list_rollouts)

    async def read_rollout(self, name: str) -> dict[str, Any] | None:
        return await self.run(self.api.read_rollout, name)

    async def patch_rollout(
        self, name: str, patch: dict[str, Any], manager: FieldManager | None = None, status: bool = False
    ) -> dict[str, Any]:
        return await self.run(self.api.patch_rollout, name, patch, manager, status)

    async def apply(self, body: dict[str, Any]) -> None:
        await self.run(self.api.apply, body)

    async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
        return await self.run(self.api.read_secret_data, namespace, name)

    async def merge_secret_data(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, bytes | None],
        labels: Mapping[str, str] | None = None,
        manager: FieldManager | None = None,
        resource_version: str | None = None,
        annotations: Mapping[str, str | None] | None = None,
    ) -> None:
        await self.run(
            self.api.merge_secret_data, namespace, name, data, labels, manager, resource_version, annotations
        )

    async def delete_secret(self, namespace: str, name: str, resource_version: str | None = None) -> bool:
        return await self.run(self.api.delete_secret, namespace, name, resource_version)

    async def create_namespace(self, body: dict[str, Any]) -> bool:
        return await self.run(self.api.create_namespace, body)

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        return await self.run(self.api.read_namespace, name)

    async def delete_namespace(self, name: str) -> bool:
        return await self.run(self.api.delete_namespace, name)

    async def list_deployments(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return await self.run(self.api.list_deployments, namespace, selector)

    async def helm_release_revisions(self, namespace: str, release: str) -> dict[int, dict[str, str]]:
        return await self.run(self.api.helm_release_revisions, namespace, release)

    async def read_pod_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.run(self.api.read_pod_metadata, namespace, name)

    async def list_customer_events(self, name: str, uid: str | None = None) -> list[dict[str, Any]]:
        return await self.run(self.api.list_customer_events, name, uid)

    async def create_event(
        self,
        kind: EventKind,
        involved: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        event_type: str = "Normal",
    ) -> None:
        await self.run(
            self.api.create_event, kind, involved, reason=reason, message=message, event_type=event_type
        )

    async def server_version(self) -> dict[str, Any]:
        return await self.run(self.api.server_version)


__all__ = [
    "APPLY_PATCH",
    "CALL_TIMEOUT",
    "CUSTOMERS",
    "EVENTS_NAMESPACE",
    "EVENT_KINDS",
    "KUBE_CONCURRENCY",
    "MERGE_PATCH",
    "WATCH_READ_MARGIN",
    "EventKind",
    "FieldManager",
    "Kube",
    "KubeApi",
    "KubernetesUnavailable",
    "SecretData",
    "Watched",
    "api_client",
    "customer_body",
    "not_found_as_none",
    "refusal_causes",
    "refusal_message",
    "refused_for_its_uid",
    "resource_version",
]
