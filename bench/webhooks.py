"""Signed Stripe events at rising rates: latency to the 2xx and to the Customer update.

In one run, on this machine's loopback: an embedded PostgreSQL, a local control plane with the CRDs,
`--customers` Customers in stripe mode, and two servers, each in its own process:
  - the webhook server (`python -m iotistic_billing.webhook_server`);
  - the baseline: a bare aiohttp handler that verifies the Stripe signature with the same SDK call and
    inserts the event into PostgreSQL with asyncpg, nothing else.
For each rate of `--rates` (events/s, open loop: sends are scheduled, not paced by answers) it sends
`--seconds` worth of `customer.subscription.updated` events to each server and prints p50/p99 to the
2xx, the ratio of the two p99s, and, for the webhook server, p50/p99 from the 2xx... to the Customer's
spec.subscription applied (stripe_events.applied_at - received_at, both PostgreSQL's clock).
Target: p99 to the 2xx under 50 ms at 200 events/s. Exit 1 when missed.
Run: `.venv/bin/python bench/webhooks.py [--rates 50,100,200,400] [--seconds 10]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import kubernetes

from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.devenv.controlplane import ControlPlane, find_binary
from iotistic_billing.processes import ManagedProcess, free_port

SECRET = "whsec_bench_" + "0" * 24
PRICE = "price_bench_professional"
REPO = Path(__file__).resolve().parents[1]
TARGET_RATE, TARGET_P99 = 200, 0.050

BASELINE = r"""
import asyncio, json, sys
import asyncpg, stripe
from aiohttp import web

async def main(port, dsn, secret):
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=10)

    async def receive(request):
        payload = (await request.read()).decode()
        stripe.WebhookSignature.verify_header(payload, request.headers["Stripe-Signature"], secret, 300)
        event = json.loads(payload)
        await pool.execute(
            "INSERT INTO stripe_events (event_id, type, created, result, payload)"
            " VALUES ($1, $2, $3, 'pending', $4) ON CONFLICT DO NOTHING",
            event["id"], event["type"], event["created"], payload)
        return web.json_response({"received": True})

    app = web.Application()
    app.router.add_post("/api/webhooks/stripe", receive)
    app.router.add_get("/healthz", lambda request: web.json_response({"status": "ok"}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"""


def signed(body: dict[str, Any]) -> tuple[bytes, str]:
    payload = json.dumps(body).encode()
    ts = int(time.time())
    signature = hmac.new(SECRET.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={ts},v1={signature}"


def make_event(customer_id: str, created: int) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "created": created,
        "type": "customer.subscription.updated",
        "data": {
            "object": {
                "id": f"sub_{customer_id[5:]}",
                "object": "subscription",
                "customer": f"cus_{customer_id[5:]}",
                "status": "active",
                "cancel_at_period_end": False,
                "metadata": {"customerId": customer_id},
                "items": {"data": [{"price": {"id": PRICE}, "current_period_end": created + 30 * 86400}]},
            }
        },
    }


async def open_loop(
    url: str, rate: int, seconds: float, customer_ids: list[str]
) -> tuple[list[float], list[str]]:
    """Send `rate` events per second for `seconds`, on schedule; latencies to the 2xx and the event ids."""
    latencies: list[float] = []
    ids: list[str] = []
    base = int(time.time())

    async def send(session: aiohttp.ClientSession, index: int, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        body = make_event(customer_ids[index % len(customer_ids)], base + index)
        payload, header = signed(body)
        started = time.perf_counter()
        async with session.post(url, data=payload, headers={"Stripe-Signature": header}) as response:
            await response.read()
            if response.status != 200:
                raise SystemExit(f"{url} answered {response.status}")
        latencies.append(time.perf_counter() - started)
        ids.append(body["id"])

    total = int(rate * seconds)
    start = time.perf_counter() + 0.2
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(send(session, i, start + i / rate) for i in range(total)))
    return latencies, ids


def quantiles(values: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(values, n=100)
    return cuts[49], cuts[98]


async def applied_latencies(dsn: str, ids: list[str], within: float = 120) -> list[float]:
    connection = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            rows = await connection.fetch(
                "SELECT result, EXTRACT(EPOCH FROM applied_at - received_at) AS seconds FROM stripe_events "
                "WHERE event_id = ANY($1::text[])",
                ids,
            )
            if len(rows) == len(ids) and all(row["result"] != "pending" for row in rows):
                assert all(row["result"] in ("applied", "stale") for row in rows), {r["result"] for r in rows}
                return [float(row["seconds"]) for row in rows]
            await asyncio.sleep(0.5)
        raise SystemExit("events still pending after 120 s")
    finally:
        await connection.close()


def wait_healthy(url: str, process: ManagedProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not process.running():
            raise SystemExit(f"{process.name} exited:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} not healthy")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="50,100,200,400")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--customers", type=int, default=50)
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as folder:
        work = Path(folder)
        os.environ["KUBECACHEDIR"] = str(work / "kube-cache")  # kubectl's, gone with the folder
        postgres = EmbeddedPostgres(work / "postgres").start()
        plane = ControlPlane(work / "control-plane").start()
        servers: list[ManagedProcess] = []
        try:
            database = postgres.create_database("bench")
            baseline_db = postgres.create_database("baseline")
            migrate.upgrade(database)
            migrate.upgrade(baseline_db)
            kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(plane.kubeconfig)]
            subprocess.run(
                [*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [*kubectl, "wait", "--for=condition=Established", "crd", "--all"],
                check=True,
                capture_output=True,
            )
            client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
            objects = kubernetes.client.CustomObjectsApi(client)
            customer_ids = [f"cust_bench{i:04d}" for i in range(args.customers)]
            for i, customer_id in enumerate(customer_ids):
                objects.create_cluster_custom_object(
                    GROUP,
                    VERSION,
                    PLURAL,
                    {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "Customer",
                        "metadata": {"name": f"bench-{i:04d}"},
                        "spec": {
                            "customerId": customer_id,
                            "email": f"ops@b{i}.example.com",
                            "companyName": f"Bench {i}",
                            "billing": {"mode": "stripe"},
                        },
                    },
                )
            client.close()

            port, baseline_port = free_port(), free_port()
            env = {
                **os.environ,
                "KUBECONFIG": str(plane.kubeconfig),
                "DATABASE_URL": database,
                "PORT": str(port),
                "STRIPE_WEBHOOK_SECRET": SECRET,
                "STRIPE_PRICE_PROFESSIONAL": PRICE,
                "LOG_FORMAT": "json",
            }
            server = ManagedProcess(
                "webhooks",
                [sys.executable, "-m", "iotistic_billing.webhook_server"],
                work / "webhooks.log",
                env=env,
            )
            baseline = ManagedProcess(
                "baseline",
                [sys.executable, "-c", BASELINE, str(baseline_port), baseline_db, SECRET],
                work / "baseline.log",
            )
            servers += [server, baseline]
            wait_healthy(f"http://127.0.0.1:{port}/healthz", server)
            wait_healthy(f"http://127.0.0.1:{baseline_port}/healthz", baseline)

            missed = False
            for rate in rates:
                ours, ids = asyncio.run(
                    open_loop(
                        f"http://127.0.0.1:{port}/api/webhooks/stripe", rate, args.seconds, customer_ids
                    )
                )
                bare, _ = asyncio.run(
                    open_loop(
                        f"http://127.0.0.1:{baseline_port}/api/webhooks/stripe",
                        rate,
                        args.seconds,
                        customer_ids,
                    )
                )
                applied = asyncio.run(applied_latencies(database, ids))
                (p50, p99), (b50, b99), (a50, a99) = quantiles(ours), quantiles(bare), quantiles(applied)
                result = {
                    "rate_per_s": rate,
                    "events": len(ours),
                    "to_2xx_ms": {"p50": round(p50 * 1000, 1), "p99": round(p99 * 1000, 1)},
                    "baseline_to_2xx_ms": {"p50": round(b50 * 1000, 1), "p99": round(b99 * 1000, 1)},
                    "p99_ratio_to_baseline": round(p99 / b99, 2),
                    "to_customer_update_ms": {"p50": round(a50 * 1000, 1), "p99": round(a99 * 1000, 1)},
                }
                if rate == TARGET_RATE:
                    met = p99 < TARGET_P99
                    result["target"] = (
                        f"p99 to the 2xx < {TARGET_P99 * 1000:.0f} ms: {'met' if met else 'MISSED'}"
                    )
                    missed |= not met
                print(json.dumps(result), flush=True)
            return 1 if missed else 0
        finally:
            for process in servers:
                process.stop()
            plane.stop()
            postgres.stop()


if __name__ == "__main__":
    sys.exit(main())
