"""Provisioning N Customers at once with the operator, against plain `helm upgrade --install` loops.

For each N (default 1, 10, 100; add 1000 with --sizes), in the same run, each on a fresh local control
plane:
  - baseline: N namespaces created through the API, each followed by `helm upgrade --install` of the
    customer-instance chart with operator-like values, at the operator's helm concurrency
    (HELM_CONCURRENCY) and with the operator's flags, timed until the last one returns;
  - operator (with a fresh PostgreSQL): N Customers created at once; timed until every one has its
    licence Secret, a deployed release and status.release written. Operator peak RSS, its CPU time
    and helm processes in flight are sampled.
  - N=1 is the median of 15 rounds on each side (one install of ~0.3 s varies too much to time once):
    a bare install, then an operator's Customer, each after 1 s of quiet, both control planes up. The
    same number of bare installs before the operator's stack starts gives `ratio_to_alone`. Larger N:
    the bare loop before the operator's stack starts and again after it stopped, the ratio against
    their mean.
  - idle (with --idle SECONDS): every Deployment reported available, all Customers Ready, then the
    operator's CPU use and helm calls over SECONDS.
Targets: N=1 within 1.25x the bare helm install; 100 and 1,000 within 1.15x the bare loop, 1,000 at
<= 250 MiB RSS; idle: no helm call and under 2% of a core. Run: `.venv/bin/python bench/reconcile.py
--sizes 1,10,100 --idle 60`. `--bare-only` runs the bare loop alone; `--floor` (sizes of 10 and more)
also runs bench/floor_operator.py, the least a Kopf operator of Customers does (namespace, the same
helm, status.release, Kopf's finalizer), between the operator and the second bare loop, and prints its
ratio (`floor_ratio`): what the operator's own steps add is the difference. Every result carries the machine's
`openssl speed rsa2048` signs a second, measured at the start, and in `cpu_s` the CPU seconds of each
part and of the whole machine (`machine`; against the window's length, the cores kept busy: with both
cores busy on both sides, what the operator's side adds in CPU is what it adds in time).
`--shards K` (sizes of 2 or more): the bare loop, one operator, K operator shards (HELM_CONCURRENCY / K
helm slots each, the Customers labelled round robin), the bare loop again; each side's ratio against
the mean of the two bare loops, and a check from each shard's metrics (its licence expiry series, one a
customer id) that each shard handled only the Customers labelled for it and together all of them.
Kopf's peering is off in every run (OPERATOR_PEERING=""; `peering` in each result): one process a shard.
A `provisioned:` line (stderr) gives the operator's side as soon as it is timed, without a ratio: the
ratio is printed once the run is checked whole (licence Secrets counted, with --idle every Customer
Ready, the bare loop after the operator's run done). The checks exit non-zero, `python -O` or not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes
import psutil
from machine import print_machine_speed

from iotistic_billing.cli import main as cli
from iotistic_billing.customer import GROUP, PLURAL, SHARD_LABEL, VERSION
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.devenv.controlplane import REPO_BIN, ControlPlane, find_binary
from iotistic_billing.operator.helm import chart_version, helm_environment, helm_runner, upgrade_install_args
from iotistic_billing.operator.values import values_hash
from iotistic_billing.processes import ManagedProcess, free_port

REPO = REPO_BIN.parent
CHART = REPO / "charts" / "customer-instance"
CONCURRENCY = int(os.environ.get("HELM_CONCURRENCY", "4"))
# The baseline's helm carries the labels the operator's does.
RUNNER = helm_runner("bench", 0, "", 0)


def baseline_values(i: int) -> dict[str, Any]:
    return {
        "enabled": True,
        "customerId": f"cust_bench{i:08d}",
        "plan": "starter",
        "domain": f"b{i}.bench.example",
        "billingUrl": "http://billing",
        "license": {"maxDevices": 10, "sha256": "0" * 64},
        "retention": {"days": 30},
    }


async def helm_installs(
    kubeconfig: Path,
    numbers: range,
    create_namespace: Callable[[str], None] | None,
    chart: Path = CHART,
    values_of: Callable[[int], dict[str, Any]] = baseline_values,
) -> float:
    """The baseline: a namespace created through the API, then the operator's own helm command (same
    flags and environment), nothing around it, for one release per number at the operator's concurrency;
    seconds until the last one returned.

    Not helm's `--create-namespace`: with it helm builds the Namespace with client-side validation on,
    whatever --disable-openapi-validation says (helm 4.3.1, pkg/action/install.go), and parses the API
    server's OpenAPI v3 document of core/v1 for it, about 100 ms of CPU an install that the operator's
    helm does not pay (the operator creates the namespace itself)."""
    slots = asyncio.Semaphore(CONCURRENCY)
    helm = str(find_binary("helm"))

    async def install(i: int) -> None:
        if create_namespace is not None:  # None: the releases exist, this is their upgrade
            await asyncio.to_thread(create_namespace, f"baseline-{i}")
        document = values_of(i)
        digest = values_hash(document, chart_version(chart))
        with tempfile.NamedTemporaryFile("w", suffix=".json") as values:
            json.dump(document, values)
            values.flush()
            async with slots:
                process = await asyncio.create_subprocess_exec(
                    helm,
                    "--kubeconfig",
                    str(kubeconfig),
                    *upgrade_install_args(
                        "instance", f"baseline-{i}", chart, Path(values.name), digest, RUNNER
                    ),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    env=helm_environment(),
                )
                _, err = await process.communicate()
                if process.returncode != 0:
                    raise RuntimeError(err.decode())

    started = time.monotonic()
    results = await asyncio.gather(*(install(i) for i in numbers), return_exceptions=True)
    elapsed = time.monotonic() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise SystemExit(f"{len(failures)} of {len(numbers)} baseline installs failed; first: {failures[0]}")
    return elapsed


def api_requests(client: kubernetes.client.ApiClient) -> Counter[str]:
    """The requests the API server has answered so far, by "VERB resource[/subresource]", from its own
    counter (a watch counts once, when it starts), and the watch events it has sent, by "WATCH-EVENT
    resource" (one per watcher an event goes to)."""
    response = client.call_api("GET", f"{client.configuration.host}/metrics")
    response.read()
    counts: Counter[str] = Counter()
    for line in response.data.decode().splitlines():
        name, _, rest = line.partition("{")
        if name not in ("apiserver_request_total", "apiserver_watch_events_total"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', rest.split("}", 1)[0]))
        value = int(float(line.rsplit(" ", 1)[1]))
        if name == "apiserver_watch_events_total":
            counts[f"WATCH-EVENT {labels.get('resource') or labels.get('kind')}"] += value
            continue
        sub = f"/{labels['subresource']}" if labels.get("subresource") else ""
        counts[f"{labels.get('verb')} {labels.get('resource')}{sub}"] += value
    return counts


def per_customer(counts: Counter[str], n: int) -> dict[str, float]:
    """Requests a Customer (or a bare release) cost, the commonest first; those under 0.05 left out."""
    return {key: round(value / n, 2) for key, value in counts.most_common() if value / n >= 0.05}


class Baseline:
    """Bare helm on a control plane of its own: its releases would otherwise be in the operator's
    cluster, and the operator's run would start from a larger etcd than the baseline did."""

    def __init__(self, work: Path) -> None:
        self.plane = ControlPlane(work).start()
        client = kubernetes.config.new_client_from_config(config_file=str(self.plane.kubeconfig))
        self.client, self.core = client, kubernetes.client.CoreV1Api(client)
        # Warm-up, like the operator's: caches and the first helm are not measured.
        asyncio.run(helm_installs(self.plane.kubeconfig, range(1), self.create_namespace))
        self.installed = 1
        self.cpu = CpuShares(
            {
                "helm": waited_children_cpu,
                **plane_parts(self.plane),
                "bench": time.process_time,
                "machine": machine_busy,
            }
        )
        self.requests: Counter[str] = Counter()  # the API requests of the timed loops

    def create_namespace(self, name: str) -> None:
        # The answer is not needed: reading it into the client's models is CPU taken from the run.
        self.core.create_namespace({"metadata": {"name": name}}, _preload_content=False).read()

    def time(self, n: int) -> float:
        numbers = range(self.installed, self.installed + n)
        self.installed += n
        before = api_requests(self.client)
        with self.cpu:
            elapsed = asyncio.run(helm_installs(self.plane.kubeconfig, numbers, self.create_namespace))
        self.requests += api_requests(self.client) - before
        return elapsed

    def stop(self) -> None:
        self.client.close()
        self.plane.stop()


class Sampler(threading.Thread):
    """Every 50 ms: the operator's RSS (its peak) and how many helm processes it runs (peak, samples).
    With shards, one per operator process."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self.peak_helm = 0
        self.helm_samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()

    def mean_helm(self, windows: list[tuple[float, float]]) -> float:
        """Helm processes in flight on average within the timed windows (monotonic start, end): below
        HELM_CONCURRENCY, helm waited for the operator."""
        counts = [n for at, n in self.helm_samples if any(start <= at <= end for start, end in windows)]
        return sum(counts) / len(counts) if counts else 0.0

    def helm_children(self) -> int:
        """The operator's helm children, from /proc/PID/task/PID/children: the operator starts helm from
        its event loop, the main thread (psutil's children() reads every process of the machine, about
        1 ms a sample; reading every thread's children file took 0.38 ms a sample)."""
        count = 0
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return 0
        for child in children:
            with contextlib.suppress(OSError):  # exited meanwhile
                count += Path(f"/proc/{child}/comm").read_text().strip() == "helm"
        return count

    def run(self) -> None:
        while not self.stop_event.wait(0.05):
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                helms = self.helm_children()
            except (psutil.NoSuchProcess, FileNotFoundError):
                return
            self.peak_helm = max(self.peak_helm, helms)
            self.helm_samples.append((time.monotonic(), helms))


def _read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        return str(response.read().decode())


def metric(url: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in _read(url).splitlines() if line.startswith(name))


def own_cpu(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        return float(sum(psutil.Process(pid).cpu_times()[:2]))
    return 0.0


def children_cpu(pid: int) -> float:
    """CPU seconds of a process's children, the exited ones it waited for included (the operator's helm
    processes, PostgreSQL's backends)."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        total = float(sum(root.cpu_times()[2:4]))
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += sum(child.cpu_times()[:2])
        return total
    return 0.0


def machine_busy() -> float:
    """CPU seconds every process has used so far (Linux counts guest time inside user time)."""
    times = psutil.cpu_times()._asdict()
    waiting = ("idle", "iowait", "guest", "guest_nice")
    return float(sum(value for name, value in times.items() if name not in waiting))


def waited_children_cpu() -> float:
    """CPU seconds of this process's exited children (the baseline's helm processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuShares:
    """Where the two cores went in timed windows: cumulative CPU seconds of each named part."""

    def __init__(self, parts: dict[str, Callable[[], float]]) -> None:
        self.parts = parts
        self.totals = dict.fromkeys(parts, 0.0)
        self._start: dict[str, float] = {}

    def __enter__(self) -> CpuShares:
        self._start = {name: read() for name, read in self.parts.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for name, read in self.parts.items():
            self.totals[name] += read() - self._start[name]

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 1) for name, value in self.totals.items()}


def plane_parts(plane: ControlPlane) -> dict[str, Callable[[], float]]:
    if plane.apiserver is None or plane.etcd is None:
        raise SystemExit("the control plane is not running")
    apiserver, etcd = plane.apiserver.pid, plane.etcd.pid
    return {"kube-apiserver": lambda: own_cpu(apiserver), "etcd": lambda: own_cpu(etcd)}


def rounds_for(n: int) -> int:
    """One Customer is a single helm install of about 0.3 s, and helm alone varies by a third from one
    install to the next here: timed once, the noise decides the ratio. It is the median of 15 rounds, each
    a bare install right before an operator's Customer (the machine drifts between halves of a run);
    larger sizes run once, with a bare loop before the operator's stack starts and one after it stopped."""
    return 15 if n == 1 else 1


def run_size(n: int, idle: float, work: Path, floor: bool = False) -> dict[str, Any]:
    """One size, both sides. A size timed once gets its bare loop twice, before the operator's stack starts
    and after it stopped, each on a fresh control plane, and the ratio is against their mean: this
    machine's speed drifts over minutes (the same bare loop of 300 took 56 to 78 s within an hour), and
    one bare loop before the operator's run put all of the drift on one side. With `floor`, the floor
    operator (bench/floor_operator.py) runs between the operator and the second bare loop."""
    result = provision(n, idle, work)
    if floor:
        result["floor"] = provision(n, 0, work, bare=False, floor=True)
    if result["rounds"] == 1:
        before = result["bare_helm_before_s"]
        later, later_cpu = bare_after(n, work)
        result |= against_bare(result["operator_s"], before, later) | {"bare_helm_after_cpu_s": later_cpu}
        if floor:
            result["floor_ratio"] = against_bare(result["floor"]["operator_s"], before, later)["ratio"]
    return result


def bare_after(n: int, work: Path) -> tuple[float, dict[str, float]]:
    """The bare loop after the operator's stack stopped, on a fresh control plane: seconds, CPU."""
    after = Baseline(work / f"cp-{n}-baseline-after")
    try:
        return after.time(n), after.cpu.rounded()
    finally:
        after.stop()


def against_bare(operator_s: float, before: float, after: float) -> dict[str, float]:
    """The operator's time against the mean of the bare loops before and after it."""
    mean = (before + after) / 2
    return {
        "bare_helm_s": round(mean, 2),
        "ratio": round(operator_s / mean, 2),
        "bare_helm_before_s": round(before, 2),
        "bare_helm_after_s": round(after, 2),
    }


def run_shards(n: int, idle: float, work: Path, shards: int) -> dict[str, Any]:
    """One operator, then `shards` shards, each on a fresh control plane and PostgreSQL, between a bare
    loop before and one after (as run_size); each shard checked to have handled its own Customers."""
    one = provision(n, idle, work, bare=True)
    sharded = provision(n, idle, work, shards=shards, bare=False)
    later, later_cpu = bare_after(n, work)
    before = one["bare_helm_before_s"]
    return {
        "one_operator": one | against_bare(one["operator_s"], before, later),
        "sharded": sharded | against_bare(sharded["operator_s"], before, later),
        "ratio_to_one_operator": round(sharded["operator_s"] / one["operator_s"], 2),
        "bare_helm_after_cpu_s": later_cpu,
    }


def bare_only(n: int, work: Path) -> dict[str, Any]:
    """The baseline alone (`--bare-only`): N namespaces and helm installs, nothing of the operator's."""
    baseline = Baseline(work / f"cp-{n}-bare-only")
    try:
        elapsed = baseline.time(n)
    finally:
        baseline.stop()
    return {"customers": n, "bare_helm_s": round(elapsed, 2), "bare_helm_cpu_s": baseline.cpu.rounded()}


def shard_label(i: int, shards: int) -> dict[str, str]:
    """The Customer's shard, round robin (`iotistic.io/shard`); none without shards."""
    return {SHARD_LABEL: str(i % shards)} if shards > 1 else {}


def provision(
    n: int, idle: float, work: Path, shards: int = 1, bare: bool = True, floor: bool = False
) -> dict[str, Any]:
    """The operator's side of size `n` (and, with `bare`, the bare loop before it). With `shards`, that
    many operator processes, each with HELM_CONCURRENCY / shards helm slots (the same helm work at
    once in all), the Customers labelled round robin. With `floor`, bench/floor_operator.py in the
    operator's place (no licence Secrets to count, no idle measurement)."""
    rounds = rounds_for(n)
    bare_times: list[float] = []
    interleaved: Baseline | None = None
    alone: list[float] = []
    if bare:
        baseline = Baseline(work / f"cp-{n}-baseline")
        if rounds == 1:
            try:
                bare_times.append(baseline.time(n))
            finally:
                baseline.stop()
        interleaved = baseline if rounds > 1 else None
        # The same rounds of bare helm before the operator's stack starts, for comparison.
        alone = [baseline.time(n) for _ in range(rounds)] if interleaved is not None else bare_times
    tag = f"{n}-shards-{shards}" if shards > 1 else f"{n}-floor" if floor else str(n)
    plane = ControlPlane(work / f"cp-{tag}").start()
    postgres = EmbeddedPostgres(work / f"pg-{tag}").start()
    operators: list[ManagedProcess] = []
    try:
        database = postgres.create_database("bench")
        keys = work / "keys"
        if not (keys / "private-key.pem").exists():
            cli(["keys", "generate", "--out", str(keys)])
        subprocess.run(
            [
                str(find_binary("kubectl")),
                "--kubeconfig",
                str(plane.kubeconfig),
                "apply",
                "--server-side",
                "-f",
                str(REPO / "crds"),
            ],
            check=True,
            capture_output=True,
        )

        env = {
            **os.environ,
            "KUBECONFIG": str(plane.kubeconfig),
            "DATABASE_URL": database,
            "LICENSE_PRIVATE_KEY_PATH": str(keys / "private-key.pem"),
            "INSTANCE_CHART": str(CHART),
            "PATH": f"{REPO_BIN}{os.pathsep}{os.environ['PATH']}",
            "OPERATOR_PEERING": "",
            "HELM_CONCURRENCY": str(max(1, CONCURRENCY // shards)),
            "OPERATOR_SHARDS": str(shards),
            "LOG_FORMAT": "json",
        }
        metrics_urls = []
        for shard in range(shards):
            port = free_port()
            operators.append(
                ManagedProcess(
                    f"operator-{shard}",
                    [sys.executable, str(REPO / "bench" / "floor_operator.py")]
                    if floor
                    else [sys.executable, "-m", "iotistic_billing.operator"],
                    work / f"operator-{tag}-{shard}.log",
                    env=env
                    | {
                        "OPERATOR_SHARD": str(shard),
                        "OPERATOR_LIVENESS_PORT": str(free_port()),
                        "OPERATOR_METRICS_PORT": str(port),
                        "FLOOR_LIVENESS_PORT": str(port),
                    },
                )
            )
            metrics_urls.append(f"http://127.0.0.1:{port}/{'healthz' if floor else 'metrics'}")
        for url in metrics_urls:
            _wait(lambda url=url: _up(url), 60, "operator metrics endpoint")
        samplers = [Sampler(operator.pid) for operator in operators]
        for sampler in samplers:
            sampler.start()

        client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
        objects = kubernetes.client.CustomObjectsApi(client)
        # Warm-up: one Customer per operator first, so that a cold start (imports, pools, the first helm)
        # is not timed.
        warm = {"email": "ops@warm.example", "companyName": "Warm-up", "plan": "starter"}
        warm_ups = {f"warm-up-{shard}": shard for shard in range(shards)}
        for name, shard in warm_ups.items():
            objects.create_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "Customer",
                    "metadata": {"name": name, "labels": shard_label(shard, shards)},
                    "spec": warm,
                },
            )
        watch_provisioned(objects, set(warm_ups), time.monotonic(), timeout=120)

        def create(i: int) -> None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Customer",
                "metadata": {"name": f"bench-{i}", "labels": shard_label(i, shards)},
                "spec": {"email": f"ops{i}@bench.example", "companyName": f"Bench {i}", "plan": "starter"},
            }
            # The answer is not needed: reading it into the client's models is CPU taken from the run.
            objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, body, _preload_content=False).read()

        total = n * rounds
        times = []
        windows = []
        if postgres.process is None:
            raise SystemExit("PostgreSQL is not running")
        operator_pids, postgres_pid = [operator.pid for operator in operators], postgres.process.pid
        cpu = CpuShares(
            {
                "operator": lambda: sum(map(own_cpu, operator_pids)),
                "helm": lambda: sum(map(children_cpu, operator_pids)),
                **plane_parts(plane),
                "postgresql": lambda: own_cpu(postgres_pid) + children_cpu(postgres_pid),
                # This script's own CPU (creating, watching, sampling), which the baseline does not pay.
                "bench": time.process_time,
                "machine": machine_busy,
            }
        )
        requests_before = api_requests(client)
        for round_ in range(rounds):
            names = range(round_ * n, (round_ + 1) * n)
            if interleaved is not None:
                # Each half starts on a quiet machine: the operator's trailing work of the last round
                # (Kopf's annotations, the pass that follows the new Deployments) is not timed against helm.
                time.sleep(1)
                bare_times.append(interleaved.time(n))
                time.sleep(1)
            with cpu:
                started = time.monotonic()
                # All at once, as `kubectl apply` of a directory with a few connections would.
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(create, names))
                created = time.monotonic() - started
                times.append(watch_provisioned(objects, {f"bench-{i}" for i in names}, started, timeout=1800))
                windows.append((started, time.monotonic()))
        elapsed = statistics.median(times)
        # After the timed windows, the bench's own reads below not counted (the idle ones are, if any).
        operator_requests = api_requests(client) - requests_before
        secrets = (
            kubernetes.client.CoreV1Api(client)
            .list_secret_for_all_namespaces(
                # helm's storage Secrets carry the label too, and the label owner=helm
                label_selector="app.kubernetes.io/managed-by=iotistic-billing-operator,!owner"
            )
            .items
        )
        result: dict[str, Any] = {
            "customers": n,
            "rounds": rounds,
            "operator_s": round(elapsed, 2),
            "create_calls_s": round(created, 2),
            "peak_rss_mib": round(max(sampler.peak_rss for sampler in samplers) / 2**20, 1),
            "operator_cpu_s": round(cpu.totals["operator"], 1),
            "bench_cpu_s": round(cpu.totals["bench"], 1),
            # CPU seconds of each part in the timed windows, on both sides: where the two cores went.
            "cpu_s": cpu.rounded(),
            "peak_helm_in_flight": sum(sampler.peak_helm for sampler in samplers),
            "mean_helm_in_flight": round(sum(sampler.mean_helm(windows) for sampler in samplers), 2),
            # The bench's own creates and watch are in it (one create each, one list and watch).
            "api_requests_per_customer": per_customer(operator_requests, n * rounds),
        }
        if bare_times:
            bare_helm = statistics.median(bare_times)
            if rounds > 1:
                result |= {"bare_helm_s": round(bare_helm, 2), "ratio": round(elapsed / bare_helm, 2)}
            else:  # the ratio waits for the bare loop after the operator's run (run_size)
                result["bare_helm_before_s"] = round(bare_helm, 2)
            result["bare_helm_cpu_s"] = baseline.cpu.rounded()
            result["bare_api_requests_per_release"] = per_customer(baseline.requests, len(bare_times) * n)
        if shards > 1:
            result |= {
                "shards": shards,
                "helm_concurrency_per_shard": max(1, CONCURRENCY // shards),
                "peak_rss_per_shard_mib": [round(sampler.peak_rss / 2**20, 1) for sampler in samplers],
            }
        # Kopf's peering is off (OPERATOR_PEERING=""): one process a shard, no standby replica to pause.
        result["peering"] = "off (OPERATOR_PEERING='')"
        if rounds > 1:
            result["operator_rounds_s"] = [round(t, 3) for t in times]
            result["bare_helm_rounds_s"] = [round(t, 3) for t in bare_times]
            result["bare_helm_alone_rounds_s"] = [round(t, 3) for t in alone]
            result["ratio_to_alone"] = round(elapsed / statistics.median(alone), 2)
        print(progress_line(result), file=sys.stderr, flush=True)  # kept if idle fails
        if not floor:
            check_licence_secrets(len(secrets), total, shards)
        if shards > 1 and not floor:
            result |= check_shards(objects, metrics_urls)
        if idle:
            result |= measure_idle(client, objects, total + shards, operator_pids, metrics_urls, idle)
            # Every Deployment turning available is a burst of watch events and passes of its own.
            result["peak_rss_through_ready_mib"] = round(
                max(sampler.peak_rss for sampler in samplers) / 2**20, 1
            )
        for sampler in samplers:
            sampler.stop_event.set()
        client.close()
        return result
    finally:
        for operator in operators:
            operator.stop()
        if interleaved is not None:
            interleaved.stop()
        postgres.stop()
        plane.stop()


def progress_line(result: dict[str, Any]) -> str:
    """The operator's side as soon as it is timed (kept if a later step fails), without any ratio: the
    licence Secrets are not counted yet, the Customers not Ready, and for a size timed once the bare loop
    after the operator's run not run yet."""
    return f"provisioned: {json.dumps({key: value for key, value in result.items() if 'ratio' not in key})}"


def check_licence_secrets(found: int, customers: int, warm_ups: int) -> None:
    """Every Customer and warm-up got its licence Secret (not an assert: `python -O` drops those)."""
    if found != customers + warm_ups:
        raise SystemExit(f"{found} licence Secrets for {customers} Customers and {warm_ups} warm-up(s)")


LICENCE_EXPIRY = "iotistic_operator_license_expiry_timestamp_seconds"


def label_values(text: str, name: str, label: str) -> set[str]:
    """The values of `label` over the series of metric `name` in a Prometheus text exposition."""
    values = set()
    for line in text.splitlines():
        series, _, rest = line.partition("{")
        if series == name:
            values |= {value for key, value in re.findall(r'(\w+)="([^"]*)"', rest) if key == label}
    return values


def shard_problems(owners: dict[str, int], handled: list[set[str]]) -> list[str]:
    """What is wrong with the shards' work: `owners` is each Customer's shard by its label (customer id
    -> shard), `handled` the customer ids each shard minted a licence for (its metrics). Each shard
    handled only its own, and together all of them."""
    problems = []
    for shard, ids in enumerate(handled):
        foreign = sorted(i for i in ids if owners.get(i) != shard)
        if foreign:
            problems.append(f"shard {shard} handled Customers of other shards: {', '.join(foreign)}")
    missing = sorted(set(owners) - set().union(*handled))
    if missing:
        problems.append(f"no shard handled: {', '.join(missing)}")
    return problems


def check_shards(objects: Any, metrics_urls: list[str], timeout: float = 30) -> dict[str, Any]:
    """Each shard handled only the Customers labelled for it, and together all of them: from each shard's
    licence expiry series (one a customer id it minted a licence for). The last pass's series may be set
    just after its status write, so the shards get `timeout` to show them all."""
    owners = {}
    for item in objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]:
        customer_id = (item.get("status") or {}).get("customerId")
        if customer_id is None:
            raise SystemExit(f"Customer {item['metadata']['name']} has no status.customerId")
        owners[customer_id] = int(item["metadata"]["labels"][SHARD_LABEL])  # the bench labels each one
    deadline = time.monotonic() + timeout
    while True:
        handled = [label_values(_read(url), LICENCE_EXPIRY, "customer_id") for url in metrics_urls]
        problems = shard_problems(owners, handled)
        if not problems or time.monotonic() >= deadline:
            break
        time.sleep(1)
    if problems:
        raise SystemExit("shards: " + "; ".join(problems))
    return {
        "customers_per_shard": [len(ids) for ids in handled],
        "helm_operations_per_shard": [
            int(metric(url, "iotistic_operator_helm_operations_total")) for url in metrics_urls
        ],
    }


RESOURCE_VERSION = re.compile(rb'"resourceVersion":"(\d+)"')


def watch_provisioned(objects: Any, names: set[str], started: float, timeout: float) -> float:
    """Seconds from `started` until every Customer of `names` has status.release written (a watch, not
    polling, so that the time is not rounded up to a poll interval).

    The watch reads the raw event lines and decodes only those that carry a release revision: the
    client's Watch decodes every event three times (loads, dumps, loads), and restarted without a
    resourceVersion after each server timeout replays every Customer as ADDED. At 1,000 Customers this
    script took 9-10 s of CPU in the timed window, most of it here, beside the operator on two cores."""
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    resource_version: str | None = None
    while time.monotonic() < deadline:
        response = objects.list_cluster_custom_object(
            GROUP,
            VERSION,
            PLURAL,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=60,
            _preload_content=False,
        )
        try:
            for line in _lines(response):
                if line.startswith(b'{"type":"ERROR"'):  # 410 Gone: start again from the current state
                    resource_version = None
                    break
                if b'"revision"' not in line:
                    found = RESOURCE_VERSION.search(line)
                    resource_version = found.group(1).decode() if found else resource_version
                    continue
                body = json.loads(line)["object"]
                resource_version = body["metadata"]["resourceVersion"]
                if body["metadata"]["name"] in names and (body.get("status", {}).get("release") or {}).get(
                    "revision"
                ):
                    done.add(body["metadata"]["name"])
                if done == names:
                    return time.monotonic() - started
        finally:
            response.close()  # not released to the pool unread: the next request would read the rest
            response.release_conn()
    raise SystemExit(f"timed out after {timeout}s: {len(done)} of {len(names)} Customers provisioned")


def _lines(response: Any) -> Any:
    """Complete lines of a urllib3 watch response, as bytes."""
    pending = b""
    for chunk in response.stream(65536):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line)
    if pending:
        yield pending


def measure_idle(
    client: kubernetes.client.ApiClient,
    objects: Any,
    n: int,
    pids: list[int],
    metrics_urls: list[str],
    seconds: float,
) -> dict[str, Any]:
    """`n` Customers (warm-ups included) Ready, then the operators' CPU and helm calls over `seconds`."""
    apps = kubernetes.client.AppsV1Api(client)
    for deployment in apps.list_deployment_for_all_namespaces(
        label_selector="app.kubernetes.io/instance=instance"
    ).items:
        if not deployment.metadata.namespace.startswith("customer-"):
            continue
        replicas = deployment.spec.replicas or 0
        apps.patch_namespaced_deployment_status(
            deployment.metadata.name,
            deployment.metadata.namespace,
            {
                "status": {
                    "observedGeneration": deployment.metadata.generation,
                    "replicas": replicas,
                    "availableReplicas": replicas,
                    "readyReplicas": replicas,
                    "updatedReplicas": replicas,
                }
            },
        )

    def ready() -> int:
        items = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        return sum(1 for c in items if c.get("status", {}).get("phase") == "Ready")

    _wait(lambda: ready() == n, 600, "all Ready", interval=0.5)
    time.sleep(5)  # let the last watch events settle

    def helm_calls() -> float:
        return sum(metric(url, "iotistic_operator_helm_operations_total") for url in metrics_urls)

    helm_before = helm_calls()
    cpu_before = sum(map(own_cpu, pids))
    time.sleep(seconds)
    cpu = sum(map(own_cpu, pids)) - cpu_before
    return {
        "idle_s": seconds,
        "idle_cpu_percent_of_core": round(100 * cpu / seconds, 2),
        "idle_helm_calls": int(helm_calls() - helm_before),
    }


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
            return True
    except OSError:
        return False


def _wait(condition: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def numbers(text: str) -> list[int]:
    """A comma-separated list of whole numbers, as --sizes takes it."""
    return [int(part) for part in text.split(",")]


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, read apart from the run: a unit test parses the README's examples with it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=numbers, default="1,10,100", help="comma-separated numbers of Customers"
    )
    parser.add_argument("--idle", type=float, default=0, help="seconds of idle measurement after Ready")
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="also run the operator as this many shards and print its time against one operator",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run bench/floor_operator.py (Kopf, namespace, helm, status.release) and print its ratio",
    )
    parser.add_argument(
        "--bare-only",
        action="store_true",
        help="only the bare helm loop: what this machine's helm and control plane take without the operator",
    )
    args = parser.parse_args(argv)
    if args.shards > 1 and min(args.sizes) < 2:
        # One Customer is timed in interleaved rounds, without the bare loops before and after.
        parser.error("--shards: sizes of 2 or more")
    return args


def main() -> int:
    args = arguments()
    sizes: list[int] = args.sizes
    failed = False
    speed = print_machine_speed()
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as work:
        os.environ["KUBECACHEDIR"] = str(Path(work) / "kube-cache")  # helm's and kubectl's, gone with it
        for n in sizes:
            if args.bare_only:
                result = bare_only(n, Path(work))
                print(json.dumps(result | {"openssl_rsa2048_signs_per_s": speed}), flush=True)
                continue
            if args.shards > 1:
                result = run_shards(n, args.idle, Path(work), args.shards)
                print(json.dumps(result | {"openssl_rsa2048_signs_per_s": speed}), flush=True)
                continue
            result = run_size(n, args.idle, Path(work), floor=args.floor)
            result["openssl_rsa2048_signs_per_s"] = speed
            checks = []
            if n == 1:
                checks.append(("ratio <= 1.25", result["ratio"] <= 1.25))
            if n >= 100:
                checks.append(("ratio <= 1.15", result["ratio"] <= 1.15))
            if n >= 1000:
                rss = result.get("peak_rss_through_ready_mib", result["peak_rss_mib"])
                checks.append(("RSS <= 250 MiB", rss <= 250))
            if "idle_helm_calls" in result:
                checks += [
                    ("idle: no helm call", result["idle_helm_calls"] == 0),
                    ("idle: < 2% of a core", result["idle_cpu_percent_of_core"] < 2),
                ]
            result["targets"] = {name: ("met" if ok else "MISSED") for name, ok in checks}
            failed |= not all(ok for _, ok in checks)
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
