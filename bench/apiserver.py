"""What the API server spends on each kind of request a Customer's pass makes, against the bare loop's own.

On a fresh local control plane with the CRDs installed, each kind of request is made `--requests` times,
four at a time (the operator's helm concurrency, roughly how many of its calls are in flight), and the
API server's CPU is read before and after; the client's CPU (this process: the official client, as the
operator uses it through `KubeApi`) likewise. Three rounds; the median of each kind is printed, in ms a
request, with its ratio to the baseline: the namespace POST, the one request the bare helm loop of
bench/reconcile.py makes itself.

The Customer's writes are measured at two sizes: a Customer whose status is what the operator writes
(seven conditions, licence, release, instance; about 4.5 KB with the managedFields that status brings)
and one whose status is `release` alone (what bench/floor_operator.py writes). Every write of a
Customer costs with the size of the whole object, not of the patch: the API server decodes, validates,
tracks the fields of and encodes all of it (a rollout's annotation, applied to a Customer, included).
Run: `.venv/bin/python bench/apiserver.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from machine import print_machine_speed
from reconcile import REPO, own_cpu

from iotistic_billing.customer import API_VERSION, KIND
from iotistic_billing.devenv.controlplane import ControlPlane, find_binary
from iotistic_billing.k8s import FieldManager, KubeApi, api_client
from iotistic_billing.rollout import ROLLOUT_CHART_VERSION

STAMP = "2026-12-04T13:48:41Z"
CONDITIONS = [
    ("LicenseIssued", "True", "LicenseIssued", "trial licence, expires 2026-12-18 13:48:41+00:00"),
    ("ReleaseDeployed", "True", "InstallSucceeded", "installed chart 0.1.0 at revision 1"),
    ("TrialActive", "True", "TrialActive", "trial ends 2026-12-18T13:48:41+00:00"),
    ("SubscriptionActive", "False", "NoSubscription", "trial ends 2026-12-18T13:48:41+00:00"),
    ("Stalled", "False", "Reconciled", ""),
    ("Reconciling", "False", "Reconciled", ""),
    ("Ready", "False", "DeploymentsUnavailable", "waiting for Deployments: api 0/1, dashboard 0/1"),
]


def operator_status(i: int, generation: int) -> dict[str, Any]:
    """A status of the shape and size the operator writes after a first install."""
    namespace = f"customer-c{i}"
    return {
        "customerId": f"cust_{i:016d}",
        "phase": "Provisioning",
        "plan": "trial",
        "observedGeneration": generation,
        "trial": {"isTrialMode": True, "endsAt": STAMP},
        "license": {
            "secretName": "iotistic-license",
            "jti": f"{i:032x}",
            "keyId": "p5dovLD9rfIX-iww9X0DBtBwOY1x3gKeALUT21E6cSw",
            "issuedAt": STAMP,
            "expiresAt": STAMP,
            "sha256": f"{i:064x}",
        },
        "release": {
            "name": "instance",
            "namespace": namespace,
            "revision": 1,
            "chartVersion": "0.1.0",
            "valuesHash": f"{i:032x}",
            "targetVersion": "0.1.0",
            "versionSource": "Fleet",
        },
        "instance": {"namespace": namespace, "url": f"https://c{i}.iotistic.cloud"},
        "conditions": [
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": STAMP,
                "observedGeneration": generation,
            }
            for kind, status, reason, message in CONDITIONS
        ],
    }


def floor_status(i: int) -> dict[str, Any]:
    return {"release": {"name": "instance", "namespace": f"customer-f{i}", "revision": 1}}


def deployment(name: str, namespace: str) -> dict[str, Any]:
    """About the size of the instance chart's Deployments (5 KB of JSON each once stored)."""
    container = {
        "name": name,
        "image": "ghcr.io/iotistic/instance:1.0.0",
        "env": [{"name": f"SETTING_{k}", "value": "v" * 40} for k in range(30)],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/instance": "instance", "app.kubernetes.io/managed-by": "Helm"},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [container]}},
        },
    }


class Requests:
    """The kinds of request, each a function of its number (a fresh object where the request writes)."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.round = 0

    def name(self, prefix: str, i: int) -> str:
        return f"{prefix}{self.round}-{i}"

    def customer(self, prefix: str, i: int) -> None:
        spec = {"email": f"c{i}@example.com", "companyName": "Bench", "plan": "trial"}
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": self.name(prefix, i)}}
        self.api.create_customer({**body, "spec": spec})

    def namespace(self, prefix: str, i: int) -> dict[str, Any]:
        labels = {"app.kubernetes.io/managed-by": "iotistic-operator", "iotistic.io/customer": f"c{i}"}
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": self.name(prefix, i), "labels": labels},
        }

    def kinds(self) -> dict[str, tuple[Callable[[int], Any], Callable[[int], Any] | None]]:
        """name -> (the request, what must exist first, made untimed)."""
        api = self.api
        token = "e" * 1200  # a licence JWT's size

        def secret(i: int) -> dict[str, Any]:
            data = {"license.jwt": token, "public-key.pem": token[:450], "usage-api-key": token[:43]}
            meta = {"name": "iotistic-license", "namespace": self.name("ns", i)}
            return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": data}

        return {
            "POST namespaces (baseline)": (
                lambda i: api.call("POST", "/api/v1/namespaces", body=self.namespace("post", i), parse=False),
                None,
            ),
            "APPLY namespaces, new": (lambda i: api.apply(self.namespace("ns", i)), None),
            "GET secrets, missing": (
                lambda i: api.read_secret_data(self.name("ns", i), "iotistic-license"),
                None,
            ),
            "APPLY secrets, new": (lambda i: api.apply(secret(i)), None),
            "GET customers": (
                lambda i: api.read_customer(self.name("c", i)),
                lambda i: self.customer("c", i),
            ),
            "PATCH customers/status, floor's size": (
                lambda i: api.patch_customer_status(self.name("f", i), floor_status(i)),
                lambda i: self.customer("f", i),
            ),
            "PATCH customers/status, operator's size": (
                lambda i: api.patch_customer_status(self.name("c", i), operator_status(i, 1)),
                None,
            ),
            "PATCH customers (Kopf's annotation), floor's size": (
                lambda i: api.patch_customer(self.name("f", i), {"metadata": {"annotations": {"k": "v"}}}),
                None,
            ),
            "PATCH customers (Kopf's annotation), operator's size": (
                lambda i: api.patch_customer(self.name("c", i), {"metadata": {"annotations": {"k": "v"}}}),
                None,
            ),
            "APPLY customers (a rollout's annotation), operator's size": (
                lambda i: api.apply_customer_annotations(
                    self.name("c", i), {ROLLOUT_CHART_VERSION: "0.2.0"}, FieldManager.ROLLOUT
                ),
                None,
            ),
            "POST events": (
                lambda i: api.create_event(
                    KIND,
                    {"metadata": {"name": self.name("c", i), "uid": "u"}},
                    reason="Provisioning",
                    message="phase none -> Provisioning",
                ),
                None,
            ),
            "LIST deployments (five)": (
                lambda i: api.list_deployments(self.name("ns", i), "app.kubernetes.io/instance=instance"),
                lambda i: [
                    api.call(
                        "POST",
                        f"/apis/apps/v1/namespaces/{self.name('ns', i)}/deployments",
                        body=deployment(f"d{k}", self.name("ns", i)),
                        parse=False,
                    )
                    for k in range(5)
                ],
            ),
        }


def measure(
    pool: ThreadPoolExecutor, apiserver: int, call: Callable[[int], Any], n: int
) -> tuple[float, float]:
    """ms of the API server's and of this process's CPU a request."""
    time.sleep(0.5)  # the previous kind's tail (watch cache, etcd compaction) out of the window
    server, client = own_cpu(apiserver), time.process_time()
    list(pool.map(call, range(n)))
    time.sleep(0.2)
    return (own_cpu(apiserver) - server) * 1e3 / n, (time.process_time() - client) * 1e3 / n


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, read apart from the run: a unit test parses the README's examples with it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="requests of each kind a round")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main() -> int:
    args = arguments()
    print_machine_speed()
    with tempfile.TemporaryDirectory() as work:
        plane = ControlPlane(Path(work)).start()
        try:
            kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(plane.kubeconfig)]
            subprocess.run([*kubectl, "apply", "-f", str(REPO / "crds")], check=True, capture_output=True)
            subprocess.run(
                [*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"],
                check=True,
                capture_output=True,
            )
            api = KubeApi(api_client("bench", kubeconfig=str(plane.kubeconfig)), FieldManager.OPERATOR)
            assert plane.apiserver is not None
            requests = Requests(api)
            samples: dict[str, list[tuple[float, float]]] = {}
            with ThreadPoolExecutor(4) as pool:
                for round_ in range(args.rounds):
                    requests.round = round_
                    for kind, (call, setup) in requests.kinds().items():
                        if setup is not None:
                            list(pool.map(setup, range(args.requests)))
                        samples.setdefault(kind, []).append(
                            measure(pool, plane.apiserver.pid, call, args.requests)
                        )
        finally:
            plane.stop()
    medians = {
        kind: (statistics.median(s for s, _ in runs), statistics.median(c for _, c in runs))
        for kind, runs in samples.items()
    }
    baseline = medians["POST namespaces (baseline)"][0]
    result = {
        "requests_per_kind": args.requests,
        "rounds": args.rounds,
        "ms_a_request": {
            kind: {
                "apiserver": round(server, 2),
                "client": round(client, 2),
                "ratio": round(server / baseline, 2),
                "apiserver_rounds": [round(s, 2) for s, _ in samples[kind]],
            }
            for kind, (server, client) in medians.items()
        },
    }
    for kind, (server, client) in medians.items():
        print(f"{kind:55s} API server {server:5.2f} ms ({server / baseline:4.2f}x)  client {client:5.2f} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
