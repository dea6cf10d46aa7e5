"""The client side of a Kubernetes call: `KubeApi.send` against the official client's typed method.

Both go through the same ApiClient and connection pool; the transport is replaced by one that answers
at once, so what is timed is the Python work of a call alone. Also the import each needs in a fresh
process (a start of the operator or of a CLI command pays it). No target: it says why KubeApi does not
use the typed API classes (k8s.py).

    .venv/bin/python bench/kube_client.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import kubernetes
from machine import print_machine_speed

from iotistic_billing.k8s import FieldManager, KubeApi


class Answer:
    """What the REST client returns, answered at once."""

    status = 200
    reason = "OK"
    data = b'{"metadata": {"name": "acme"}}'

    @property
    def response(self) -> Answer:
        return self

    def read(self) -> bytes:
        return self.data

    def getheaders(self) -> dict[str, str]:
        return {}


def per_call_us(call: Any, calls: int) -> tuple[float, float]:
    """(the first call, the mean of the next `calls`) in microseconds."""
    started = time.perf_counter()
    call()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return first * 1e6, (time.perf_counter() - started) / calls * 1e6


def import_seconds(statement: str, rounds: int = 3) -> float:
    """The best of `rounds` fresh interpreters running `statement`, less a bare interpreter's start."""

    def best(code: str) -> float:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - started)
        return min(times)

    return best(statement) - best("pass")


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, read apart from the run: a unit test parses the README's examples with it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    print_machine_speed()

    configuration = kubernetes.client.Configuration()
    configuration.host = "http://127.0.0.1:1"
    client = kubernetes.client.ApiClient(configuration)
    client.rest_client.request = lambda *_args, **_kwargs: Answer()  # type: ignore[method-assign]
    api = KubeApi(client, FieldManager.CLI)
    typed = kubernetes.client.CustomObjectsApi(client)

    def typed_read() -> Any:
        return typed.get_cluster_custom_object(
            "iotistic.io", "v1alpha1", "customers", "acme", _preload_content=False
        ).data

    def typed_patch() -> Any:
        return typed.patch_cluster_custom_object_status(
            "iotistic.io",
            "v1alpha1",
            "customers",
            "acme",
            {"status": {"phase": "Ready"}},
            field_manager="bench",
            _content_type="application/merge-patch+json",
            _preload_content=False,
        ).data

    rows = [
        ("GET customer, typed method", per_call_us(typed_read, args.calls)),
        ("GET customer, KubeApi.read_customer", per_call_us(lambda: api.read_customer("acme"), args.calls)),
        ("PATCH status, typed method", per_call_us(typed_patch, args.calls)),
        (
            "PATCH status, KubeApi.patch_customer_status",
            per_call_us(lambda: api.patch_customer_status("acme", {"phase": "Ready"}), args.calls),
        ),
    ]
    for name, (first, mean) in rows:
        print(f"{name:45} first {first:8.0f} us   then {mean:6.1f} us a call")
    print(f"(KubeApi's include parsing the answer as JSON; {args.calls} calls each)")
    typed_import = import_seconds(
        "import kubernetes.client as k; k.CoreV1Api; k.CustomObjectsApi; k.AppsV1Api"
    )
    ours = import_seconds("import iotistic_billing.k8s")
    print(f"import, typed API classes (core, custom objects, apps): {typed_import:.2f} s")
    print(f"import, iotistic_billing.k8s (the client, no typed class): {ours:.2f} s")


if __name__ == "__main__":
    main()
