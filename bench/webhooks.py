"""Stripe webhook throughput and latency of the webhook server, on this machine's loopback only.

Starts an embedded PostgreSQL and a local control plane (kube-apiserver + etcd), applies the CRDs,
creates `--customers` Customers, runs the app in-process and delivers signed `customer.subscription.updated`
events to it from `--concurrency` clients: each event once, then every event again (the duplicates).
Prints events/s and p50/p95/p99 latency of both rounds. Target: first deliveries answered at p95 under
500 ms and duplicates under 50 ms (Stripe times a webhook out after 10 s, and retries it).
Run: `.venv/bin/python bench/webhooks.py [--events 300] [--customers 20] [--concurrency 8]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
from aiohttp import web

from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.devenv.controlplane import ControlPlane, find_binary
from iotistic_billing.processes import free_port
from iotistic_billing.settings import load_settings
from iotistic_billing.webhook_server.app import create_app

SECRET = "whsec_bench_" + "0" * 24
PRICE = "price_bench_professional"
CRDS = Path(__file__).resolve().parents[1] / "crds"
FIRST_P95_TARGET = 0.5
DUPLICATE_P95_TARGET = 0.05


def signed(body: dict[str, Any]) -> tuple[bytes, str]:
    payload = json.dumps(body).encode()
    ts = int(time.time())
    signature = hmac.new(SECRET.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={ts},v1={signature}"


def events(count: int, customer_ids: list[str]) -> list[dict[str, Any]]:
    now = int(time.time())
    out = []
    for index in range(count):
        customer_id = customer_ids[index % len(customer_ids)]
        subscription = {
            "id": f"sub_{customer_id[5:]}",
            "object": "subscription",
            "customer": f"cus_{customer_id[5:]}",
            "status": "active",
            "cancel_at_period_end": False,
            "metadata": {"customerId": customer_id},
            "items": {"data": [{"price": {"id": PRICE}, "current_period_end": now + 30 * 86400}]},
        }
        out.append(
            {
                "id": f"evt_{uuid.uuid4().hex}",
                "object": "event",
                "created": now - count + index,
                "type": "customer.subscription.updated",
                "data": {"object": subscription},
            }
        )
    return out


async def deliver_all(url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[float, list[float]]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            payload, header = signed(queue.get_nowait())
            started = time.perf_counter()
            async with session.post(url, data=payload, headers={"Stripe-Signature": header}) as response:
                await response.read()
                if response.status != 200:
                    raise SystemExit(f"webhook answered {response.status}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def summary(name: str, elapsed: float, latencies: list[float]) -> float:
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"{name:<11} {len(latencies) / elapsed:8.1f} events/s   "
        f"p50 {cuts[49] * 1000:7.1f} ms   p95 {cuts[94] * 1000:7.1f} ms   p99 {cuts[98] * 1000:7.1f} ms"
    )
    return cuts[94]


async def run(args: argparse.Namespace, kubeconfig: Path, database_url: str) -> int:
    api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    objects = kubernetes.client.CustomObjectsApi(api_client)
    customer_ids = []
    for index in range(args.customers):
        customer_id = f"cust_bench{index:04d}"
        customer_ids.append(customer_id)
        objects.create_cluster_custom_object(
            GROUP,
            VERSION,
            PLURAL,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Customer",
                "metadata": {"name": f"bench-{index:04d}"},
                "spec": {
                    "customerId": customer_id,
                    "email": f"ops@bench{index}.example.com",
                    "companyName": f"Bench {index}",
                    "billing": {"mode": "stripe"},
                },
            },
        )
    settings = load_settings(
        database_url=database_url, stripe_webhook_secret=SECRET, stripe_price_professional=PRICE
    )
    runner = web.AppRunner(create_app(settings, kube=api_client), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/api/webhooks/stripe"
    try:
        bodies = events(args.events, customer_ids)
        first = summary("first", *await deliver_all(url, bodies, args.concurrency))
        duplicate = summary("duplicates", *await deliver_all(url, bodies, args.concurrency))
    finally:
        await runner.cleanup()
        api_client.close()
    ok = first <= FIRST_P95_TARGET and duplicate <= DUPLICATE_P95_TARGET
    print(
        f"targets: first p95 <= {FIRST_P95_TARGET * 1000:.0f} ms, duplicates p95 <= "
        f"{DUPLICATE_P95_TARGET * 1000:.0f} ms: {'met' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--customers", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as folder:
        workdir = Path(folder)
        postgres = EmbeddedPostgres(workdir / "postgres").start()
        plane = ControlPlane(workdir / "control-plane").start()
        try:
            database_url = postgres.create_database("bench")
            migrate.upgrade(database_url)
            subprocess.run(
                [
                    str(find_binary("kubectl")),
                    "--kubeconfig",
                    str(plane.kubeconfig),
                    "apply",
                    "--server-side",
                    "-f",
                    str(CRDS),
                ],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [
                    str(find_binary("kubectl")),
                    "--kubeconfig",
                    str(plane.kubeconfig),
                    "wait",
                    "--for=condition=Established",
                    "crd",
                    "--all",
                    "--timeout=60s",
                ],
                check=True,
                capture_output=True,
            )
            return asyncio.run(run(args, plane.kubeconfig, database_url))
        finally:
            plane.stop()
            postgres.stop()


if __name__ == "__main__":
    sys.exit(main())
