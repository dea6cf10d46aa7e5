"""`python -m iotistic_billing.operator`: settings and clients first (a bad setting stops the start with
its name), then Kopf, cluster-wide, with peering for one active replica and a liveness endpoint."""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import errno
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from ipaddress import IPv6Address
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import kopf
import prometheus_client
from kubernetes.client.exceptions import ApiException

from iotistic_billing.db import migrate
from iotistic_billing.db.engine import create_engine, session_factory
from iotistic_billing.k8s import (
    FieldManager,
    Kube,
    KubeApi,
    KubernetesUnavailable,
    api_client,
    refusal_message,
)
from iotistic_billing.licensing.keys import LicenseKeyError, SigningKeys
from iotistic_billing.notices.outbox import Outbox
from iotistic_billing.operator import handlers  # registers the Kopf handlers (rollouts: register_rollouts)
from iotistic_billing.operator.charts import ChartStore
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.customer_view import CustomerView
from iotistic_billing.operator.deployments import InstanceDeployments
from iotistic_billing.operator.helm import Helm, helm_runner
from iotistic_billing.operator.sharding import Shard
from iotistic_billing.served_crds import CUSTOMERS_CRD, ROLLOUTS_CRD, StaleCrds, WrittenCrd, check_served_crds
from iotistic_billing.settings import OCI_PREFIX, Settings, SettingsError, load_settings

log = logging.getLogger("iotistic_billing.operator")


def build_context(settings: Settings, database_url: str, kubeconfig: str | None = None) -> OperatorContext:
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if settings.license_private_key_path is None:
        raise SettingsError("LICENSE_PRIVATE_KEY_PATH: required by the operator to sign licences")
    oci_chart = settings.instance_chart.startswith(OCI_PREFIX)
    if not oci_chart and not (Path(settings.instance_chart) / "Chart.yaml").is_file():
        raise SettingsError(f"INSTANCE_CHART: no Chart.yaml in {settings.instance_chart}")
    try:
        keys = SigningKeys.from_pem_files(
            settings.license_private_key_path,
            settings.license_public_key_path,
            settings.license_extra_public_key_paths,
        )
    except LicenseKeyError as error:
        raise SettingsError(f"{settings.key_path_setting(error.path)}: {error}") from None
    engine = create_engine(database_url)
    kube = Kube(KubeApi(api_client("operator", kubeconfig=kubeconfig), FieldManager.OPERATOR))
    watch_api = KubeApi(api_client("operator", kubeconfig=kubeconfig), FieldManager.OPERATOR)
    shard = Shard(settings.operator_shard, settings.operator_shards)
    # The host is the Pod's name: the same after a container restart, which then recovers at once the
    # releases its killed predecessor left pending (release.py).
    peering = shard.peering(settings.operator_peering)
    runner = helm_runner(socket.gethostname(), shard.index, peering, settings.operator_priority)
    helm = Helm(
        settings.helm_binary,
        kubeconfig,
        settings.helm_concurrency,
        timeout=settings.helm_timeout,
        runner=runner,
        pod=settings.pod_name or "",
        pod_uid=settings.pod_uid or "",
    )
    # Pulled chart versions, for this process only (a restart pulls again: a fraction of a second each).
    chart_cache = Path(tempfile.mkdtemp(prefix="iotistic-charts-"))
    atexit.register(shutil.rmtree, chart_cache, ignore_errors=True)
    return OperatorContext(
        settings=settings,
        keys=keys,
        kube=kube,
        deployments=InstanceDeployments(kube),
        helm=helm,
        charts=ChartStore(settings, helm, chart_cache),
        engine=engine,
        sessions=session_factory(engine),
        # Twice helm's slots: the steps before helm (licence, namespace) overlap the installs.
        pass_slots=asyncio.Semaphore(2 * settings.helm_concurrency),
        customer_view=CustomerView(watch_api),
        watch_api=watch_api,
        outbox=Outbox(settings.notify_webhook_url),
        shard=shard,
    )


def ensure_peering(kube: Kube, name: str) -> None:
    """The ClusterKopfPeering object Kopf's peering needs (its CRD ships in crds/)."""
    try:
        kube.api.call(
            "POST",
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            body={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}},
            parse=False,
        )
    except ApiException as error:
        if error.status != 409:
            raise


def tune_malloc(arenas: int = 2, threshold: int = 128 * 1024) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core); the Kubernetes
    client's calls run in a thread pool, and each arena keeps its freed pages, so the operator's RSS
    grew with the thread count rather than with its data. Two arenas, set before any thread starts
    (what MALLOC_ARENA_MAX=2 does).

    Fixed mmap and trim thresholds: by default glibc raises its mmap threshold each time a large block
    is freed, after which big buffers (API answers, watch events) come from the heap, where they
    fragment it and are not given back. bench/README.md has what each measured."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except AttributeError:  # not glibc (musl, macOS): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_arena_max, arenas)
    mallopt(m_mmap_threshold, threshold)
    mallopt(m_trim_threshold, threshold)


def liveness_endpoint(settings: Settings) -> str | None:
    """Kopf's liveness endpoint, on every address of the Pod IP's family: Kopf binds the one host of its
    URL, and the kubelet probes the Pod IP (a "::" socket of asyncio's takes IPv6 alone)."""
    if not settings.operator_liveness_port:
        return None
    host = "[::]" if isinstance(settings.pod_ip, IPv6Address) else "0.0.0.0"  # noqa: S104 - the Pod's addresses
    return f"http://{host}:{settings.operator_liveness_port}/healthz"


class _DualStackServer(ThreadingMixIn, WSGIServer):
    """An IPv6 socket that takes IPv4 too, whatever the host's net.ipv6.bindv6only (set, a "::" socket
    served IPv6 alone)."""

    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Not a line on stderr for each scrape."""


def serve_metrics(port: int) -> None:
    """Prometheus' /metrics on every address of both families, in a thread of its own (it answers while
    the event loop is busy); IPv4 alone on a kernel without IPv6."""
    try:
        server = make_server("::", port, prometheus_client.make_wsgi_app(), _DualStackServer, _QuietHandler)
    except OSError as error:
        if error.errno != errno.EAFNOSUPPORT:
            raise
        prometheus_client.start_http_server(port, addr="0.0.0.0")  # noqa: S104 - the Pod's addresses
        return
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def main(crds: Sequence[WrittenCrd] = (CUSTOMERS_CRD, ROLLOUTS_CRD)) -> int:
    """`crds`: the CRDs checked before anything runs (the tests name a stale copy)."""
    tune_malloc()
    try:
        settings = load_settings()
        kopf.configure(
            log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
        )
        if settings.database_url is None:
            raise SettingsError("DATABASE_URL: required by the operator (make dev sets it in .dev/env)")
        # Deployed, the pod's init container (python -m iotistic_billing.db.migrate) has migrated with no
        # probe to bound it, and this finds nothing to do; started bare (make dev, the tests) it migrates.
        migrate.upgrade(settings.database_url)
        context = build_context(settings, settings.database_url)
    except SettingsError as error:
        print(f"iotistic-billing operator: {error}", file=sys.stderr)
        return 2
    # Helm never upgrades the chart's CRDs: on older ones every pass would write fields the API server
    # drops (a rollout step that never ends, a licence not renewed without the InstanceRollout CRD).
    try:
        check_served_crds(context.kube.api, crds)
    except StaleCrds as error:
        print(f"iotistic-billing operator: {error}", file=sys.stderr)
        return 1
    except KubernetesUnavailable as error:
        print(f"iotistic-billing operator: cannot read the CRDs: {error}", file=sys.stderr)
        return 1
    except ApiException as error:
        print(f"iotistic-billing operator: cannot read the CRDs: {refusal_message(error)}", file=sys.stderr)
        return 1
    if settings.operator_metrics_port:
        serve_metrics(settings.operator_metrics_port)
    if context.shard.runs_rollouts:
        handlers.register_rollouts()
    peering = context.shard.peering(settings.operator_peering)
    standalone = not peering
    if not standalone:
        ensure_peering(context.kube, peering)
    if context.shard.count > 1:
        log.info("shard %s: Customers %s", context.shard, context.shard.selector())
    asyncio.run(
        kopf.operator(
            clusterwide=True,
            standalone=standalone,
            peering_name=peering or None,
            priority=settings.operator_priority,
            liveness_endpoint=liveness_endpoint(settings),
            memo=kopf.Memo(context=context),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
