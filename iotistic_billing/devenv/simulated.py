"""A simulated full cluster: the local control plane plus kube-controller-manager, kube-scheduler and kwok.

kwok stands in for the kubelet: it keeps a few fake Nodes Ready and moves the Pods the scheduler binds
to them to Running/Ready, so Deployments really roll out, namespaces really finish deleting and garbage
collection runs. No container is ever started.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from iotistic_billing.devenv.controlplane import REPO_BIN, ControlPlane, MissingBinaryError, find_binary
from iotistic_billing.k8s import api_client
from iotistic_billing.processes import ManagedProcess, StartTimeout, free_port, wait_for_http

# kwok manages only the Nodes carrying this annotation (the convention of kwok's own examples).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_VALUE = "fake"
# Stages (Node and Pod lifecycles) of the kwok version built: kwok does nothing without them.
KWOK_STAGES = "kwok-stages.yaml"


def fake_node(name: str, ip: str, cpu: str = "32", memory: str = "256Gi", pods: int = 110) -> dict[str, Any]:
    """A Node for kwok to keep Ready; the capacity is what the scheduler fits Pods into."""
    capacity = {"cpu": cpu, "memory": memory, "pods": str(pods)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: KWOK_NODE_VALUE, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": name,
                "type": "kwok",
            },
        },
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
        },
    }


def node_ready(node: Any) -> bool:
    """Ready, and without the not-ready taints the node lifecycle controller adds before that."""
    conditions = node.status.conditions or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    return ready and not any(t.effect in ("NoSchedule", "NoExecute") for t in node.spec.taints or [])


def _kwok_stages(kwok: Path) -> Path:
    for candidate in (kwok.parent / KWOK_STAGES, REPO_BIN / KWOK_STAGES):
        if candidate.is_file():
            return candidate
    raise MissingBinaryError(
        f"{KWOK_STAGES} not found next to {kwok} nor in {REPO_BIN}; run `make tools-e2e`"
    )


class SimulatedCluster:
    """ControlPlane + kube-controller-manager + kube-scheduler + kwok with `nodes` fake Nodes.

    `etcd_data` keeps etcd's data elsewhere than in `workdir/control-plane/etcd` (ControlPlane's
    default): the dev environment's `.dev/etcd`, so a second start finds the cluster it left, fake Nodes
    included (their creation accepts that they exist).
    """

    def __init__(self, workdir: Path, nodes: int = 3, etcd_data: Path | None = None) -> None:
        self.workdir = workdir.resolve()
        self.node_names = [f"kwok-node-{index}" for index in range(nodes)]
        self.plane = ControlPlane(self.workdir / "control-plane", etcd_data=etcd_data)
        self.components: list[ManagedProcess] = []

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    def processes(self) -> list[ManagedProcess]:
        return [*self.plane.processes(), *self.components]

    def start(self, timeout: float = 120.0) -> SimulatedCluster:
        try:
            binaries = {
                name: find_binary(name) for name in ("kube-controller-manager", "kube-scheduler", "kwok")
            }
        except MissingBinaryError as missing:
            raise MissingBinaryError(f"{missing} (the simulated cluster's tools: `make tools-e2e`)") from None
        stages = _kwok_stages(binaries["kwok"])
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.plane.start(timeout)
            self._start_serving("kube-controller-manager", self._controller_manager_argv, timeout)
            self._start_serving("kube-scheduler", self._scheduler_argv, timeout)
            self._release_node_leases()
            self._start_serving("kwok", lambda port: self._kwok_argv(port, stages), timeout, https=False)
            self._create_nodes(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _common_argv(self, name: str, port: int) -> list[str]:
        kubeconfig = str(self.plane.kubeconfig)
        return [
            str(find_binary(name)),
            f"--kubeconfig={kubeconfig}",
            # The same admin identity checks the callers of its own /healthz and /metrics.
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / name}",
            "--v=1",
        ]

    def _controller_manager_argv(self, port: int) -> list[str]:
        certs = self.plane.certs
        return [
            *self._common_argv("kube-controller-manager", port),
            "--controllers=*",
            "--use-service-account-credentials=false",
            f"--service-account-private-key-file={certs / 'sa.key'}",
            f"--root-ca-file={certs / 'ca.crt'}",
            # No --cluster-signing-*: nothing here asks for certificates through CSRs, so the signer
            # controller stays off rather than needing the CA's key on disk.
            "--cluster-name=iotistic-simulated",
        ]

    def _scheduler_argv(self, port: int) -> list[str]:
        return self._common_argv("kube-scheduler", port)

    def _kwok_argv(self, port: int, stages: Path) -> list[str]:
        return [
            str(find_binary("kwok")),
            f"--kubeconfig={self.plane.kubeconfig}",
            f"--config={stages}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}={KWOK_NODE_VALUE}",
            "--cidr=10.244.0.1/16",
            f"--server-address=127.0.0.1:{port}",
            # The stages' heartbeat expects Leases: without them the controller-manager marks every Node
            # (and so every Pod) NotReady after its grace period, and `make dev`'s instances fell from
            # Ready to Degraded 50 s after they rolled out.
            "--node-lease-duration-seconds=40",
        ]

    def _start_serving(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        timeout: float,
        https: bool = True,
        attempts: int = 3,
    ) -> ManagedProcess:
        """Start a component on a free port and wait for its /healthz; again if another process took it."""
        for attempt in range(1, attempts + 1):
            port = free_port()
            # kwok reads ~/.kwok/kwok.yaml when it exists: a HOME of its own keeps a user's file out.
            env = {**os.environ, "HOME": str(self.workdir / name)}
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
            process = ManagedProcess(name, argv(port), self.workdir / f"{name}.log", env=env)
            self.components.append(process)
            scheme = "https" if https else "http"
            try:
                _wait_healthz(f"{scheme}://127.0.0.1:{port}/healthz", process, timeout)
                return process
            except RuntimeError:
                process.stop()
                self.components.remove(process)
                if attempt == attempts or "address already in use" not in process.log_tail():
                    raise
        raise AssertionError("unreachable")

    def _release_node_leases(self) -> None:
        """Delete the Nodes' Leases an earlier kwok held (a start on the same etcd data): kwok does not take
        over a Lease another holder renewed lately, and left the Pods of that Node alone until it expired,
        so `make dev` started again took 30 s or more to roll out what changed."""
        client: Any = api_client("devenv", kubeconfig=str(self.plane.kubeconfig))
        try:
            leases: Any = kubernetes.client.CoordinationV1Api(client)
            for name in self.node_names:
                try:
                    leases.delete_namespaced_lease(name, "kube-node-lease")
                except ApiException as error:
                    if error.status != 404:
                        raise
        finally:
            client.close()

    def _create_nodes(self, timeout: float) -> None:
        client: Any = api_client("devenv", kubeconfig=str(self.plane.kubeconfig))
        try:
            # Any: the client's stubs want V1Node objects where the API takes the plain dict.
            core: Any = kubernetes.client.CoreV1Api(client)
            for index, name in enumerate(self.node_names):
                try:
                    core.create_node(fake_node(name, ip=f"10.240.0.{index + 1}"))
                except ApiException as error:
                    # Kept from an earlier start on the same etcd data: kwok takes it over as it is.
                    if error.status != 409:
                        raise
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self._check_running()
                nodes = core.list_node(label_selector="type=kwok").items
                # The serviceaccounts controller's `default` account shows the controller manager at work.
                accounts = core.list_namespaced_service_account("default").items
                if len([n for n in nodes if node_ready(n)]) == len(self.node_names) and accounts:
                    return
                time.sleep(0.2)
            kwok = next(p for p in self.components if p.name == "kwok")
            raise StartTimeout(
                f"simulated nodes not Ready within {timeout}s; kwok log:\n{kwok.log_tail()}", kwok.log_path
            )
        finally:
            client.close()

    def _check_running(self) -> None:
        for process in self.components:
            if not process.running():
                raise RuntimeError(f"{process.name} {process.ended()}:\n{process.log_tail()}")

    def stop(self) -> None:
        for process in reversed(self.components):
            process.stop()
        self.components.clear()
        self.plane.stop()


def _wait_healthz(url: str, process: ManagedProcess, timeout: float) -> None:
    # Loopback only, and the component's serving certificate is self-signed: verification proves nothing.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    wait_for_http(url, process, timeout, lambda body: body.strip() == b"ok", context)
