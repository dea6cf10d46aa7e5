"""Usage report throughput of the webhook server against what the same machine and PostgreSQL can do bare.

Starts an embedded PostgreSQL (migrated by Alembic) and two servers, each a process of its own run the
same way (`web.run_app`, one process, a pool of 10 asyncpg connections):
- product: the webhook server (`create_app`) with everything a report goes through (metrics, error and
  access middlewares, the usage-key cache, rate limiters, validation, the exactly-once insert, the
  coalescer; the status flusher runs every 10 s against a stand-in API server that knows one Customer,
  the reader of (c), not the customer the reports of (a) and (b) are for);
- baseline: a bare aiohttp handler that parses the JSON and does one asyncpg INSERT of the row.
usage_reports has the monthly partitions of the last `--months` months and the next two, as the usage
service makes them; the reader has `READER_DAYS` days of 5-minute reports from `READER_INSTANCES`
instances. Then, in one run:
(a) single reports: `--clients` concurrent aiohttp clients post one report per request for `--seconds`,
    to each server in turn (`--rounds` rounds each, alternating; the best round of each counts, as other
    work on the machine only ever slows a round down);
    target: product >= 0.6 x baseline requests/s;
(b) batches: `--batch-clients` clients post 1,000-report batches to the product, against the same rows
    written by raw asyncpg COPY (`copy_records_to_table`) from as many connections (rounds alternating);
    target: product >= 0.4 x COPY reports/s;
(c) the usage API: one client reads GET /api/usage/{reader}?days=30 back to back for `--seconds`
    (each round printed; p50 and p99 over the reads of every round).
Throughput counts the reports the answers say were stored (`accepted`), not those sent.
With `--rows N`, the same again after N more reports were written (by PostgreSQL itself, evenly over
the `--months` months, 1,000 instances of 100 customers; then VACUUM ANALYZE, as autovacuum would
have left a table that grew over months), to show (a), (b) and (c) do not move with the table's size;
target: the usage API's p50 then within READS_FACTOR (2x) of the empty table's.
Prints absolute numbers and ratios; exits 1 when a target is missed.
Run: `.venv/bin/python bench/usage.py [--seconds 5] [--rounds 3] [--clients 16] [--batch-clients 4]
[--rows 20000000] [--months 13]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import kubernetes
from aiohttp import web
from machine import print_machine_speed

from iotistic_billing.api_keys import usage_key_hash
from iotistic_billing.customer import Customer
from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import plain_url
from iotistic_billing.db.pool import keep_session
from iotistic_billing.processes import free_port, wait_for_port
from iotistic_billing.settings import load_settings
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.partitions import maintain_partitions, month_of
from iotistic_billing.usage.periods import shift_months
from iotistic_billing.usage.reports import COLUMNS
from iotistic_billing.usage.store import open_pool
from iotistic_billing.webhook_server.__main__ import freeze_startup_objects
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.options import RateLimit, ServerOptions

CUSTOMER_ID = "cust_benchmark01"
USAGE_KEY = "iuk_bench_" + "k" * 32
ADMIN_TOKEN = "bench-admin-token-" + "0" * 16
SINGLE_TARGET = 0.6
BATCH_TARGET = 0.4
# "Reads unchanged": the usage API's p50 with the added rows within this factor of the empty table's. The
# best-round medians of the two phases of one run have moved by up to 1.6x (143.8 ms empty, 90.4 ms with
# the rows, bench/README.md), so 1.5x would fail on noise alone; a read that scanned the added rows
# rather than its own customer's would take many times the empty table's.
READS_FACTOR = 2.0
BATCH = 1000
NOW = datetime.now(UTC).replace(microsecond=0)
BASE_TIME = NOW - timedelta(days=2)
# The customer whose usage (c) reads: a Customer the stand-in API server knows, billed manually.
READER_NAME = "bench-reader"
READER_ID = "cust_benchreader1"
READER_INSTANCES = 5
READER_DAYS = 40
FILL_INSTANCES = 1000
FILL_CUSTOMERS = 100
_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
BASELINE_INSERT = (
    f"INSERT INTO usage_reports ({', '.join(COLUMNS)}) VALUES ({_PLACEHOLDERS}) "  # noqa: S608 - constants
    "ON CONFLICT DO NOTHING"
)


def report(report_id: str, instance_id: str = "bench-1") -> dict[str, Any]:
    return {
        "customer_id": CUSTOMER_ID,
        "instance_id": instance_id,
        "report_id": report_id,
        "period_start": BASE_TIME.isoformat(),
        "period_end": (BASE_TIME + timedelta(minutes=5)).isoformat(),
        "active_devices": 42,
        "total_devices": 45,
        "mqtt_messages_published": 150000,
        "mqtt_messages_received": 120000,
        "mqtt_bytes_sent": 1500000,
        "mqtt_bytes_received": 1200000,
        "http_requests": 5000,
        "http_bytes_sent": 500000,
        "http_bytes_received": 300000,
        "postgres_size_mb": 125.5,
        "postgres_row_count": 500000,
    }


# ----- the two servers (each runs as `bench/usage.py --serve product|baseline`) -----


def baseline_app(database_url: str) -> web.Application:
    """One JSON parse and one INSERT: the least a server can do to store a report."""
    pool_key = web.AppKey("pool", asyncpg.Pool)

    async def store(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        await request.app[pool_key].execute(
            BASELINE_INSERT,
            body["customer_id"],
            body["instance_id"],
            body["report_id"],
            datetime.fromisoformat(body["period_start"]),
            datetime.fromisoformat(body["period_end"]),
            *(body[column] for column in COLUMNS[5:14]),
            Decimal(str(body["postgres_size_mb"])),
            body["postgres_row_count"],
        )
        return web.json_response({"accepted": 1, "duplicate": 0}, status=202)

    async def pool(app: web.Application) -> AsyncIterator[None]:
        # The product's pool settings (no per-release reset query), so that only the work differs.
        app[pool_key] = await asyncpg.create_pool(
            plain_url(database_url), min_size=0, max_size=10, reset=keep_session
        )
        yield
        await app[pool_key].close()

    app = web.Application()
    app.router.add_post("/api/usage/report", store)
    app.cleanup_ctx.append(pool)
    return app


def reader_customer() -> dict[str, Any]:
    body = {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {
            "name": READER_NAME,
            "uid": "00000000-0000-4000-8000-000000000001",
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": (NOW - timedelta(days=400)).isoformat().replace("+00:00", "Z"),
        },
        "spec": {
            "customerId": READER_ID,
            "email": "ops@reader.example",
            "companyName": "Reader Ltd",
            "plan": "professional",
            "billing": {"mode": "manual"},
        },
        "status": {"customerId": READER_ID, "plan": "professional", "phase": "Ready"},
    }
    Customer.model_validate(body)  # as the product reads it
    return body


def kube_app() -> web.Application:
    """A stand-in for the API server: the reader's Customer, nothing else (the reports' customer is
    missing, as a customer id no Customer holds)."""
    reader = reader_customer()
    prefix = "/apis/iotistic.io/v1alpha1/customers"

    async def read(request: web.Request) -> web.Response:
        if request.match_info["name"] != READER_NAME:
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound"}
            return web.json_response({**status, "code": 404}, status=404)
        return web.json_response(reader)

    async def list_all(request: web.Request) -> web.Response:
        return web.json_response(
            {"apiVersion": "iotistic.io/v1alpha1", "kind": "CustomerList", "metadata": {}, "items": [reader]}
        )

    app = web.Application()
    app.router.add_get(prefix, list_all)
    app.router.add_get(prefix + "/{name}", read)
    app.router.add_patch(prefix + "/{name}/status", read)
    return app


def product_app(database_url: str, kube_url: str) -> web.Application:
    settings = load_settings(database_url=database_url, admin_api_token=ADMIN_TOKEN)
    # The stand-in API server: reports never wait for it, and the flusher's calls are answered at once.
    configuration = kubernetes.client.Configuration()
    configuration.host = kube_url
    configuration.retries = False
    # The limits are the operator's to set; they must not be what this measures.
    unlimited = RateLimit(per_second=1e9, burst=10**9)
    options: dict[str, Any] = {"rate_per_address": unlimited, "rate_per_key": unlimited, "kube_timeout": 1}
    if "inbox_workers" in {field.name for field in fields(ServerOptions)}:
        # As `python -m iotistic_billing.webhook_server` runs the server: Stripe events are applied by a
        # process of its own, not by the process that answers.
        options["inbox_workers"] = 0
    app = create_app(
        settings,
        kube=kubernetes.client.ApiClient(configuration),
        options=ServerOptions(**options),
        usage=UsageOptions(meter_interval=None),
    )
    app.on_startup.append(freeze_startup_objects)  # as `python -m iotistic_billing.webhook_server` does
    return app


def serve(kind: str, port: int, database_url: str, kube_url: str) -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    apps = {
        "product": lambda: product_app(database_url, kube_url),
        "baseline": lambda: baseline_app(database_url),
        "kube": kube_app,
    }
    web.run_app(apps[kind](), host="127.0.0.1", port=port, access_log=None, print=None)
    return 0


@dataclass
class Server:
    kind: str
    base: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"{self.base}/api/usage/report"

    @classmethod
    def start(cls, kind: str, database_url: str, log: Path, kube_url: str = "") -> Server:
        port = free_port()
        process = subprocess.Popen(
            [
                *(sys.executable, __file__, "--serve", kind, "--port", str(port)),
                *("--database-url", database_url, "--kube-url", kube_url),
            ],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(port, 30, process)
        return cls(kind, f"http://127.0.0.1:{port}", process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


# ----- the load -----


@dataclass
class Round:
    count: int  # reports stored, as the answers say (`accepted`), or COPY's rows
    requests: int
    elapsed: float
    latencies: list[float]

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.elapsed

    @property
    def reports_per_second(self) -> float:
        return self.count / self.elapsed

    def describe(self) -> str:
        cuts = statistics.quantiles(self.latencies, n=100) if len(self.latencies) > 1 else [0.0] * 99
        return (
            f"{self.requests_per_second:9.1f} req/s {self.reports_per_second:10.1f} reports/s   "
            f"p50 {cuts[49] * 1000:6.1f} ms  p99 {cuts[98] * 1000:6.1f} ms"
        )


async def drive(
    url: str,
    bodies: Callable[[], bytes],
    clients: int,
    seconds: float,
    headers: dict[str, str],
) -> Round:
    """`clients` workers posting bodies back to back for `seconds`; every answer must be a 202. The
    reports counted are those the answers say were stored (`accepted`), not those sent: a report the
    server took for a duplicate is not throughput."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    accepted = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while time.perf_counter() < deadline:
            payload = bodies()
            started = time.perf_counter()
            async with session.post(url, data=payload, headers=headers) as response:
                answer = await response.read()
                if response.status != 202:
                    raise SystemExit(f"{url} answered {response.status}: {answer[:300]!r}")
            latencies.append(time.perf_counter() - started)
            accepted += json.loads(answer)["accepted"]

    connector = aiohttp.TCPConnector(limit=clients)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return Round(accepted, len(latencies), elapsed, latencies)


class Ids:
    """Report ids never used before in this run, so every report is stored (no duplicates measured)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.next = 0

    def take(self) -> str:
        self.next += 1
        return f"{self.prefix}-{self.next:09d}"


def single_bodies(ids: Ids) -> Callable[[], bytes]:
    template = json.dumps(report("REPORT_ID_PLACEHOLDER")).encode()
    return lambda: template.replace(b"REPORT_ID_PLACEHOLDER", ids.take().encode())


def batch_bodies(ids: Ids) -> Callable[[], bytes]:
    # One serialised batch, its instance id swapped per request: 1,000 new reports each time.
    template = json.dumps({"reports": [report(f"r-{i:04d}", "INSTANCE_PLACEHOLDER") for i in range(BATCH)]})
    encoded = template.encode()
    return lambda: encoded.replace(b"INSTANCE_PLACEHOLDER", ids.take().encode())


async def copy_rows(database_url: str, connections: int, seconds: float, ids: Ids) -> Round:
    """The same rows as the batch endpoint stores, by COPY from `connections` connections."""
    sample = report("x")
    values = [
        datetime.fromisoformat(sample[c]) if c.startswith("period_") else sample[c] for c in COLUMNS[3:]
    ]
    values[COLUMNS.index("postgres_size_mb") - 3] = Decimal("125.5")
    pool = await asyncpg.create_pool(plain_url(database_url), min_size=connections, max_size=connections)
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    async def worker() -> None:
        async with pool.acquire() as conn:
            while time.perf_counter() < deadline:
                instance = ids.take()
                rows = [(CUSTOMER_ID, instance, f"r-{i:04d}", *values) for i in range(BATCH)]
                started = time.perf_counter()
                await conn.copy_records_to_table("usage_reports", records=rows, columns=list(COLUMNS))
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return Round(len(latencies) * BATCH, len(latencies), elapsed, latencies)


async def stored_reports(database_url: str) -> int:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM usage_reports"))
    finally:
        await conn.close()


async def read_usage(url: str, seconds: float, headers: dict[str, str]) -> Round:
    """One client reading a customer's usage back to back for `seconds`; every answer must be a 200."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() < deadline:
            begun = time.perf_counter()
            async with session.get(url, headers=headers) as response:
                answer = await response.read()
                if response.status != 200:
                    raise SystemExit(f"{url} answered {response.status}: {answer[:300]!r}")
            latencies.append(time.perf_counter() - begun)
    return Round(len(latencies), len(latencies), time.perf_counter() - started, latencies)


@dataclass
class Phase:
    """What one phase measured: the best rounds of (a) and (b), every read of (c)."""

    table: str
    single_ratio: float
    batch_ratio: float
    reads_p50: float  # seconds, over the reads of every round of (c)
    reads_p99: float


async def measure_phase(
    args: argparse.Namespace, database_url: str, product: Server, baseline: Server, table: str
) -> Phase:
    print(f"--- {table}")
    headers = {"X-API-Key": USAGE_KEY, "Content-Type": "application/json"}
    ids = Ids(f"s{table[:1]}")
    warm = single_bodies(ids)
    for server in (baseline, product):  # connections opened, statements prepared, key cached
        await drive(server.url, warm, args.clients, 1.0, headers)

    print(f"(a) single reports, {args.clients} clients, {args.rounds} rounds of {args.seconds:g} s each")
    rounds: dict[str, list[Round]] = {"baseline": [], "product": []}
    for _ in range(args.rounds):
        for server in (baseline, product):
            result = await drive(server.url, single_bodies(ids), args.clients, args.seconds, headers)
            rounds[server.kind].append(result)
            print(f"    {server.kind:<9}{result.describe()}")
    best = {kind: max(r.reports_per_second for r in results) for kind, results in rounds.items()}
    single_ratio = best["product"] / best["baseline"]
    print(
        f"    best: product {best['product']:.1f} reports/s, baseline {best['baseline']:.1f} reports/s "
        f"(one a request, as accepted), ratio {single_ratio:.2f} (target >= {SINGLE_TARGET})"
    )

    print(
        f"(b) batches of {BATCH} reports, {args.batch_clients} clients / connections, "
        f"{args.rounds} rounds of {args.seconds:g} s each"
    )
    batch_ids, copy_ids = Ids(f"b{table[:1]}"), Ids(f"c{table[:1]}")
    await drive(product.url, batch_bodies(batch_ids), args.batch_clients, 1.0, headers)  # warm-up
    before = await stored_reports(database_url)
    endpoints: list[Round] = []
    copies: list[Round] = []
    for _ in range(args.rounds):
        endpoint = await drive(
            product.url, batch_bodies(batch_ids), args.batch_clients, args.seconds, headers
        )
        endpoints.append(endpoint)
        print(f"    endpoint {endpoint.describe()}")
        copied = await copy_rows(database_url, args.batch_clients, args.seconds, copy_ids)
        copies.append(copied)
        print(f"    COPY     {copied.describe()}")
    best_endpoint = max(r.reports_per_second for r in endpoints)
    best_copy = max(r.reports_per_second for r in copies)
    batch_ratio = best_endpoint / best_copy
    print(
        f"    best: endpoint {best_endpoint:.0f} reports/s, COPY {best_copy:.0f} rows/s, "
        f"ratio {batch_ratio:.2f} (target >= {BATCH_TARGET})"
    )
    # Every report the endpoint accepted and COPY wrote in the timed rounds is in the table, and no more.
    stored = await stored_reports(database_url) - before
    counted = sum(r.count for r in [*endpoints, *copies])
    if stored != counted:
        raise SystemExit(f"(b) stored {stored:,} reports, the rounds counted {counted:,}")

    print(f"(c) GET /api/usage/{READER_ID}?days=30, 1 client, {args.rounds} rounds of {args.seconds:g} s")
    reads_url = f"{product.base}/api/usage/{READER_ID}?days=30"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await read_usage(reads_url, 1.0, admin)  # warm-up
    reads: list[Round] = []
    for _ in range(args.rounds):
        read = await read_usage(reads_url, args.seconds, admin)
        reads.append(read)
        print(f"    reads    {read.describe()}")
    p50, p99 = reads_quantiles(reads)
    print(f"    all {sum(r.requests for r in reads)} reads: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    return Phase(table, single_ratio, batch_ratio, p50, p99)


def reads_quantiles(reads: list[Round]) -> tuple[float, float]:
    """p50 and p99 of the reads of every round: a slow round's reads are part of what a user sees."""
    cuts = statistics.quantiles([latency for read in reads for latency in read.latencies], n=100)
    return cuts[49], cuts[98]


async def add_reader(database_url: str, months: int) -> int:
    """The months' partitions, as the usage service made them while the months went by; the reader's
    mirror row and its READER_DAYS days of 5-minute reports (then VACUUM ANALYZE); how many reports."""
    pool = await open_pool(database_url, max_size=1)
    try:
        first = shift_months(month_of(NOW), -(months - 1))
        for offset in range(months):
            await maintain_partitions(pool, shift_months(first, offset), ahead=2, retention_months=months + 1)
        await pool.execute(
            "INSERT INTO customers (customer_id, resource_name, email, company_name, plan)"
            " VALUES ($1, $2, 'ops@reader.example', 'Reader Ltd', 'professional')",
            READER_ID,
            READER_NAME,
        )
        written = _rows(
            await pool.execute(
                GENERATED.format(customer="$1::text", instance="'reader-' || i"),
                READER_ID,
                NOW - timedelta(days=READER_DAYS),
                timedelta(minutes=5),
                0,
                READER_DAYS * 24 * 12 - 1,
                READER_INSTANCES,
            )
        )
        # As after a fill: both phases read a vacuumed, analysed table.
        await pool.execute("VACUUM (ANALYZE) usage_reports")
        return written
    finally:
        await pool.close()


# Reports made by PostgreSQL: instance i (0 .. $6 - 1) reports slot k ($4 .. $5) for [$2 + k x $3, + $3);
# the customer is an expression of $1 and i.
GENERATED = f"""
INSERT INTO usage_reports ({", ".join(COLUMNS)}, reported_at)
SELECT {{customer}}, {{instance}}, 'r-' || k, start, start + $3::interval, (i * 7 + k) % 50, 50,
       k % 1000, k % 900, k * 17 % 100000, k * 13 % 100000, k % 300, k * 11 % 50000, k * 5 % 50000,
       (k % 10000) / 10.0, k % 100000, start + $3::interval
FROM generate_series($4::bigint, $5::bigint) AS k, generate_series(0, $6::int - 1) AS i,
     LATERAL (SELECT $2::timestamptz + k * $3::interval AS start) AS slot
"""  # noqa: S608 - constant column names


def _rows(status: str) -> int:
    return int(status.split()[-1])


async def fill(database_url: str, rows: int, months: int) -> int:
    """About `rows` more reports over the `months` months up to now, FILL_INSTANCES instances of
    FILL_CUSTOMERS customers reporting evenly, written by PostgreSQL a month at a time on two
    connections; then VACUUM ANALYZE. How many were written."""
    first = shift_months(month_of(NOW), -(months - 1))
    slots = -(-rows // FILL_INSTANCES)
    step = (NOW - first) / slots
    # Not the product's pool: its statements time out after 10 s, and a month takes longer.
    pool = await asyncpg.create_pool(plain_url(database_url), min_size=2, max_size=2)
    written = 0

    async def month_chunk(offset: int) -> None:
        nonlocal written
        start, end = shift_months(first, offset), shift_months(first, offset + 1)
        low, high = -(-(start - first) // step), min(slots, -(-(end - first) // step))
        if low >= high:
            return
        statement = GENERATED.format(
            customer=f"$1::text || lpad((i % {FILL_CUSTOMERS})::text, 4, '0')", instance="'fill-' || i"
        )
        status = await pool.execute(statement, "cust_fill", first, step, low, high - 1, FILL_INSTANCES)
        written += _rows(status)

    try:
        began = time.perf_counter()
        queue = list(range(months))

        async def worker() -> None:
            while queue:
                await month_chunk(queue.pop(0))

        await asyncio.gather(worker(), worker())
        print(f"    {written:,} reports written in {time.perf_counter() - began:.0f} s")
        began = time.perf_counter()
        async with pool.acquire() as conn:
            await conn.execute("VACUUM (ANALYZE) usage_reports")
        print(f"    VACUUM ANALYZE in {time.perf_counter() - began:.0f} s")
    finally:
        await pool.close()
    return written


async def measure(args: argparse.Namespace, database_url: str, product: Server, baseline: Server) -> int:
    phases = [await measure_phase(args, database_url, product, baseline, "empty table")]
    if args.rows:
        print(f"--- filling: {args.rows:,} reports over {args.months} months")
        written = await fill(database_url, args.rows, args.months)
        phases.append(await measure_phase(args, database_url, product, baseline, f"{written:,} more reports"))
    print("--- summary")
    for phase in phases:
        print(
            f"    {phase.table:<22} single {phase.single_ratio:.2f}, batch {phase.batch_ratio:.2f}, "
            f"usage API p50 {phase.reads_p50 * 1000:.1f} ms p99 {phase.reads_p99 * 1000:.1f} ms"
        )
    judged = verdicts(phases)
    for name, met in judged:
        print(f"    {name}: {'met' if met else 'MISSED'}")
    ok = all(met for _, met in judged)
    print(f"targets: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


def verdicts(phases: list[Phase]) -> list[tuple[str, bool]]:
    """Each target of each phase, named, and whether it holds; the first phase is the empty table,
    whose reads the later phases' are judged against."""
    found = []
    for phase in phases:
        found += [
            (f"{phase.table}: single reports >= {SINGLE_TARGET}", phase.single_ratio >= SINGLE_TARGET),
            (f"{phase.table}: batches >= {BATCH_TARGET}", phase.batch_ratio >= BATCH_TARGET),
        ]
        if phase is not phases[0]:
            found.append(
                (
                    f"{phase.table}: usage API p50 <= {READS_FACTOR:g}x the {phases[0].table}'s "
                    f"({phase.reads_p50 / phases[0].reads_p50:.2f}x)",
                    phase.reads_p50 <= READS_FACTOR * phases[0].reads_p50,
                )
            )
    return found


async def add_key(database_url: str) -> None:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.execute(
            "INSERT INTO api_keys (customer_id, key_hash, key_prefix, purpose) VALUES ($1, $2, $3, 'usage')",
            CUSTOMER_ID,
            usage_key_hash(USAGE_KEY),
            USAGE_KEY[:12],
        )
    finally:
        await conn.close()


def run(args: argparse.Namespace, run_async: Callable[[Awaitable[int]], int] = asyncio.run) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as folder:
        workdir = Path(folder)
        postgres = EmbeddedPostgres(workdir / "postgres").start()
        servers: list[Server] = []
        try:
            database_url = postgres.create_database("bench")
            migrate.upgrade(database_url)
            run_async(add_key(database_url))
            reader = run_async(add_reader(database_url, args.months))
            kube = Server.start("kube", database_url, workdir / "kube.log")
            servers = [
                Server.start("product", database_url, workdir / "product.log", kube.base),
                Server.start("baseline", database_url, workdir / "baseline.log"),
                kube,
            ]
            print(f"{os.cpu_count()} CPUs; PostgreSQL, both servers and the clients share them")
            print(f"usage_reports: {args.months} months of partitions; the reader's {reader:,} reports")
            return run_async(measure(args, database_url, servers[0], servers[1]))
        finally:
            for server in servers:
                server.stop()
            postgres.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of each side, alternating; the best of (a), (b) counts"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch-clients", type=int, default=4)
    parser.add_argument("--rows", type=int, default=0, help="measure again after this many more reports")
    parser.add_argument("--months", type=int, default=13, help="months of partitions (and of --rows)")
    parser.add_argument("--serve", choices=("product", "baseline", "kube"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--kube-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.months <= UsageOptions().raw_retention_months:
        # The server's partition run at start would drop the oldest months.
        parser.error(f"--months: 1 to the raw retention, {UsageOptions().raw_retention_months}")
    if args.serve:
        return serve(args.serve, args.port, args.database_url, args.kube_url)
    print_machine_speed()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
