"""A fleet moved to a new chart version by an InstanceRollout, against a bare `helm upgrade` loop of the
same releases at the same concurrency, in the same run.

On this machine's loopback, in one run:
  - a CNCF Distribution registry (`bin/registry`) with the customer-instance chart pushed at 0.1.0 and
    0.2.0 (the same chart: an upgrade that changes every object's chart label, as a release does);
  - baseline, on a local control plane of its own: `--customers` releases installed at 0.1.0 with the
    operator's values (untimed), then timed: `helm upgrade` of every one to 0.2.0 (pulled once) with the
    operator's own command and flags, HELM_CONCURRENCY (4) at once; twice, before the operator's run
    and after it, each on a fresh control plane, and the ratio is against their mean;
  - operator, on a fresh control plane with a fresh PostgreSQL: the operator as users run it, on the
    registry's `oci://` chart at 0.1.0; `--customers` Customers, every one Ready on 0.1.0 (untimed);
    then timed: an InstanceRollout to 0.2.0 with steps [1%, 10%, rest], no bake, maxParallel
    `--max-parallel`, from its creation until its phase is Succeeded (followed by a watch).
The Customers run with `spec.instance.enabled: false` (scaled to zero): the local control plane has no
nodes, so only then can they be Ready and pass the health gate; helm's work, an upgrade of every object
of the release, is the same. Target: operator <= 1.25x the bare loop. Exit 1 when missed. Also printed:
each step's time, the operator's CPU seconds; for each side while timed, the CPU seconds of
kube-apiserver, etcd and helm, the cores the machine kept busy and the API requests per Customer (per
release for the bare loop); and `openssl speed rsa2048` signs a second at the start.
Run: `.venv/bin/python bench/rollout.py [--customers 300] [--max-parallel 50]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes
import psutil
from machine import print_machine_speed
from reconcile import (
    CHART,
    CONCURRENCY,
    REPO,
    api_requests,
    baseline_values,
    children_cpu,
    helm_installs,
    machine_busy,
    own_cpu,
    per_customer,
    waited_children_cpu,
)

from iotistic_billing.cli import main as cli
from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.devenv.controlplane import REPO_BIN, ControlPlane, find_binary
from iotistic_billing.devenv.registry import ChartRegistry
from iotistic_billing.k8s import FieldManager, KubeApi
from iotistic_billing.processes import ManagedProcess, free_port
from iotistic_billing.rollout import ROLLOUT_PLURAL

OLD, NEW = "0.1.0", "0.2.0"
TARGET = 1.25


def disabled_values(i: int) -> dict[str, Any]:
    return {**baseline_values(i), "enabled": False}


def pulled_chart(registry: ChartRegistry, version: str, into: Path) -> Path:
    helm = str(find_binary("helm"))
    reference = registry.reference("customer-instance")
    subprocess.run(
        [helm, "pull", reference, "--version", version, "--untar", "--untardir", str(into), "--plain-http"],
        check=True,
        capture_output=True,
    )
    return into / "customer-instance"


def bare_loop(n: int, chart_new: Path, work: Path) -> tuple[float, dict[str, Any]]:
    """Seconds the upgrades took, and what they cost (TimedCost: CPU by part, requests per release)."""
    plane = ControlPlane(work).start()
    client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
    core = kubernetes.client.CoreV1Api(client)
    try:

        def create_namespace(name: str) -> None:
            core.create_namespace({"metadata": {"name": name}}, _preload_content=False).read()

        asyncio.run(helm_installs(plane.kubeconfig, range(n), create_namespace, CHART, disabled_values))
        print(f"baseline: {n} releases at {OLD}", file=sys.stderr, flush=True)
        cost = TimedCost(plane, client, waited_children_cpu)
        seconds = asyncio.run(helm_installs(plane.kubeconfig, range(n), None, chart_new, disabled_values))
        return seconds, cost.since(n)
    finally:
        client.close()
        plane.stop()


def ready_on(body: dict[str, Any], version: str) -> bool:
    status = body.get("status") or {}
    release = status.get("release") or {}
    ready = next((c for c in status.get("conditions") or () if c["type"] == "Ready"), {})
    return release.get("chartVersion") == version and ready.get("status") == "True"


def operator_run(n: int, max_parallel: int, registry: ChartRegistry, work: Path) -> dict[str, Any]:
    plane = ControlPlane(work / "cp-operator").start()
    postgres = EmbeddedPostgres(work / "pg").start()
    operator: ManagedProcess | None = None
    client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
    objects = kubernetes.client.CustomObjectsApi(client)
    try:
        kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(plane.kubeconfig)]
        subprocess.run(
            [*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")], check=True, capture_output=True
        )
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"],
            check=True,
            capture_output=True,
        )
        keys = work / "keys"
        with contextlib.redirect_stdout(sys.stderr):  # its key id is not the result
            cli(["keys", "generate", "--out", str(keys)])
        env = {
            **os.environ,
            "KUBECONFIG": str(plane.kubeconfig),
            "DATABASE_URL": postgres.create_database("bench"),
            "LICENSE_PRIVATE_KEY_PATH": str(keys / "private-key.pem"),
            "INSTANCE_CHART": registry.reference("customer-instance"),
            "INSTANCE_CHART_VERSION": OLD,
            "INSTANCE_CHART_PLAIN_HTTP": "true",
            "PATH": f"{REPO_BIN}{os.pathsep}{os.environ['PATH']}",
            "OPERATOR_PEERING": "",
            "OPERATOR_LIVENESS_PORT": str(free_port()),
            "OPERATOR_METRICS_PORT": str(free_port()),
            "POD_IP": "",  # /healthz on IPv4, where this looks
            "HELM_CONCURRENCY": str(CONCURRENCY),
            "LOG_FORMAT": "json",
        }
        operator = ManagedProcess(
            "operator", [sys.executable, "-m", "iotistic_billing.operator"], work / "operator.log", env=env
        )

        def create(i: int) -> None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Customer",
                "metadata": {"name": f"bench-{i}"},
                "spec": {
                    "email": f"ops{i}@bench.example",
                    "companyName": f"Bench {i}",
                    "plan": "starter",
                    "instance": {"enabled": False},
                },
            }
            objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, body, _preload_content=False).read()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        wait(lambda: count_ready(objects, OLD) == n, 1800, f"{n} Customers Ready on {OLD}")
        print(f"operator: {n} Customers Ready on {OLD}", file=sys.stderr, flush=True)
        time.sleep(2)  # the passes that follow Ready settle
        fleet_list = list_cost(plane, KubeApi(client, FieldManager.CLI))

        process = psutil.Process(operator.pid)
        cpu_before = sum(process.cpu_times()[:2])
        cost = TimedCost(plane, client, lambda: children_cpu(process.pid))
        rollout = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InstanceRollout",
            "metadata": {"name": "bench"},
            "spec": {
                "chartVersion": NEW,
                "steps": [
                    {"percent": 1, "maxParallel": max_parallel},
                    {"percent": 10, "maxParallel": max_parallel},
                    {"rest": True, "maxParallel": max_parallel},
                ],
            },
        }
        started = time.monotonic()
        objects.create_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, rollout)
        status = succeeded(objects, 1800)
        elapsed = time.monotonic() - started
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        api = cost.since(n)
        ready = count_ready(objects, NEW)
        if ready != n:  # not an assert: `python -O` drops those
            raise SystemExit(f"{ready} of {n} Customers Ready on the new version")
        steps = [
            round(
                (
                    datetime.fromisoformat(s["completedAt"]) - datetime.fromisoformat(s["startedAt"])
                ).total_seconds()
            )
            for s in status["steps"]
        ]
        return {
            "operator_s": round(elapsed, 2),
            "operator_cpu_s": round(cpu, 1),
            "steps_s": steps,
            "fleet_list_ms": fleet_list,
            "api": api,
        }
    finally:
        client.close()
        if operator is not None:
            operator.stop()
        postgres.stop()
        plane.stop()


class TimedCost:
    """Where the machine's CPU goes from now on: kube-apiserver (and the requests it answers), etcd,
    helm (`helm_cpu`: the CPU seconds of helm's processes so far), and every process together (two
    cores give two a second)."""

    def __init__(
        self, plane: ControlPlane, client: kubernetes.client.ApiClient, helm_cpu: Callable[[], float]
    ) -> None:
        assert plane.apiserver is not None and plane.etcd is not None
        self.pid, self.etcd, self.client, self.helm_cpu = (
            plane.apiserver.pid,
            plane.etcd.pid,
            client,
            helm_cpu,
        )
        self.cpu, self.etcd_cpu, self.helm = own_cpu(self.pid), own_cpu(self.etcd), helm_cpu()
        self.requests = api_requests(client)
        self.machine, self.started = machine_busy(), time.monotonic()

    def since(self, n: int) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "apiserver_cpu_s": round(own_cpu(self.pid) - self.cpu, 1),
            "etcd_cpu_s": round(own_cpu(self.etcd) - self.etcd_cpu, 1),
            "helm_cpu_s": round(self.helm_cpu() - self.helm, 1),
            "machine_busy_cores": round((machine_busy() - self.machine) / seconds, 2),
            "requests_per_customer": per_customer(api_requests(self.client) - self.requests, n),
        }


def list_cost(plane: ControlPlane, api: KubeApi, rounds: int = 20) -> dict[str, float]:
    """What one list of every Customer costs, as a tick that lists the fleet paid it (the ticks now read
    the operator's watch-fed view): the API server's CPU and the JSON decode in the caller, each in ms."""
    assert plane.apiserver is not None
    apiserver = psutil.Process(plane.apiserver.pid)
    server_before, client_before = sum(apiserver.cpu_times()[:2]), time.process_time()
    for _ in range(rounds):
        api.list_customers()
    return {
        "kube_apiserver_cpu": round(1000 * (sum(apiserver.cpu_times()[:2]) - server_before) / rounds, 1),
        "client_cpu": round(1000 * (time.process_time() - client_before) / rounds, 1),
    }


def count_ready(objects: Any, version: str) -> int:
    listed = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    return sum(ready_on(body, version) for body in listed["items"])


def succeeded(objects: Any, timeout: float) -> dict[str, Any]:
    """The status of rollout "bench" once it has Succeeded, followed by a watch: polling it ten times a
    second cost the API server and this process CPU that only the rollout's side paid."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        events = kubernetes.watch.Watch().stream(
            objects.list_cluster_custom_object,
            GROUP,
            VERSION,
            ROLLOUT_PLURAL,
            field_selector="metadata.name=bench",
            timeout_seconds=max(1, int(left)),
        )
        for event in events:
            status: dict[str, Any] = event["object"].get("status") or {}
            if status.get("phase") in ("Halted", "RolledBack", "Aborted"):
                raise SystemExit(f"the rollout stopped: {json.dumps(status)}")
            if status.get("phase") == "Succeeded":
                return status
    raise SystemExit("timed out: rollout Succeeded")


def wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.1)
    raise SystemExit(f"timed out: {what}")


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, read apart from the run: a unit test parses the README's examples with it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--max-parallel", type=int, default=50)
    return parser.parse_args(argv)


def main() -> int:
    args = arguments()
    speed = print_machine_speed()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        work = Path(tmp)
        registry = ChartRegistry(work / "registry-work")
        (work / "registry-work").mkdir()
        registry.start()
        try:
            registry.push(CHART, OLD)
            registry.push(CHART, NEW)
            chart_new = pulled_chart(registry, NEW, work / "pulled")
            before, bare_api = bare_loop(args.customers, chart_new, work / "cp-baseline")
            print(f"baseline: {args.customers} upgrades in {before:.2f} s", file=sys.stderr, flush=True)
            result = operator_run(args.customers, args.max_parallel, registry, work)
            after, bare_after_api = bare_loop(args.customers, chart_new, work / "cp-baseline-after")
            print(f"baseline after: {args.customers} upgrades in {after:.2f} s", file=sys.stderr, flush=True)
        finally:
            registry.stop()
    # Against the mean of a bare loop before the operator's run and one after: this machine's speed
    # drifts over minutes, and one bare loop before put all of the drift on one side (as bench/reconcile.py).
    bare = (before + after) / 2
    ratio = result["operator_s"] / bare
    result |= {
        "customers": args.customers,
        "max_parallel": args.max_parallel,
        "helm_concurrency": CONCURRENCY,
        "bare_helm_s": round(bare, 2),
        "bare_helm_before_s": round(before, 2),
        "bare_helm_after_s": round(after, 2),
        "bare_api": bare_api,
        "bare_after_api": bare_after_api,
        "ratio": round(ratio, 2),
        "target": TARGET,
        "openssl_rsa2048_signs_s": speed,
    }
    print(json.dumps(result))
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
