"""Time to first byte of the admin console's overview and customers pages at 1,000 Customers, against
the JSON API's list of Customers in the same run.

In one run, on this machine's loopback: a fresh local control plane with the CRDs, an embedded
PostgreSQL (migrated by Alembic), stripe-mock, and the webhook server as users run it (`python -m
iotistic_billing.webhook_server`, its Stripe inbox process beside it; the operator does not run).
`--customers` Customers are created from 8 threads and given statuses as the operator writes them
(Ready, Provisioning, Degraded and Failed, with the Ready/Reconciling/Stalled trio, trials ending,
licences minted with a fresh signing key), and the `customers` table has their rows. The bench signs in
once (POST /admin/login, the admin token), warms each URL, then times `--rounds` interleaved rounds
(the order rotates each round) of, over one keep-alive connection (http.client, no event loop):
  - product: GET /admin/ (the overview) and GET /admin/customers (its first page), with the cookie;
  - baseline: GET /api/customers?limit=50 with the admin token (the JSON API's first page);
  - for the record: the list of every Customer from the API server in one GET (what `kubectl get
    customers -o json` fetches), since each of the three lists every Customer; then, in this process,
    its JSON decode, the directory's parse of it (`CustomerRecord.from_body`) and the product's own
    paged list (`KubeApi.list_customers`, 500 a page).
Time to first byte: from before the request is sent to the status line and headers read. Each request
also gets the CPU time the server, kube-apiserver and etcd spent meanwhile (/proc/PID/task/*/schedstat).
Prints median and p90 per URL and each page's median over the API call's; target: each page <= 2x.
Exit 1 when missed. `--usage-days N` first stores N days of 5-minute usage reports of every Customer
(the overview counts the last hour's).
Run: `.venv/bin/python bench/console.py [--customers 1000] [--rounds 30] [--usage-days 0]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import kubernetes
from machine import print_machine_speed

from iotistic_billing.cli import main as cli
from iotistic_billing.customer import (
    GROUP,
    PLURAL,
    VERSION,
    Condition,
    ConditionStatus,
    ConditionType,
    CustomerStatus,
    Phase,
    derived_customer_id,
    namespace_for,
    set_condition,
)
from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import plain_url
from iotistic_billing.devenv.controlplane import ControlPlane, find_binary
from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.directory import CustomerRecord
from iotistic_billing.k8s import FieldManager, KubeApi
from iotistic_billing.licensing.keys import SigningKeys
from iotistic_billing.licensing.minting import (
    LicenseCustomer,
    SubscriptionTerms,
    TrialTerms,
    mint_license,
)
from iotistic_billing.licensing.plans import plan_by_name
from iotistic_billing.operator import constants as c
from iotistic_billing.processes import ManagedProcess, free_port, wait_for_port
from iotistic_billing.settings import load_settings
from iotistic_billing.usage.reports import COLUMNS

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-token-" + "0" * 16
TARGET = 2.0
API = "/api/customers?limit=50"
PAGES = ("/admin/", "/admin/customers")
KUBE_LIST = "Kubernetes list, 1 GET"
# The console's cookie (console/session.py); read from the Set-Cookie of the sign-in.
COOKIE = "iotistic_console"
PRICES = {
    "starter": "price_bench_starter",
    "professional": "price_bench_pro",
    "enterprise": "price_bench_ent",
}
LICENSE_SETTINGS = load_settings()  # the issuer and audience the server mints with (their defaults)
DEPLOYMENTS = ("api", "dashboard", "mqtt", "postgres", "nodered", "exporter")


# ----- the Customers -----


@dataclass(frozen=True)
class Shape:
    """What one bench Customer is: its plan, billing and the phase the operator reported."""

    name: str
    plan: str
    stripe: bool
    phase: Phase
    created: datetime  # when it notionally signed up (the trial runs from it)
    since: datetime  # when its Ready condition last moved
    licence_age: timedelta  # since its licence was minted

    @classmethod
    def draw(cls, i: int, now: datetime, rng: random.Random) -> Shape:
        plan = rng.choices(("trial", "starter", "professional", "enterprise"), (30, 35, 25, 10))[0]
        roll = rng.random()
        phase = (
            Phase.READY
            if roll < 0.78
            else Phase.PROVISIONING
            if roll < 0.88
            else Phase.DEGRADED
            if roll < 0.95
            else Phase.FAILED
        )
        age = timedelta(days=rng.uniform(0, 14) if plan == "trial" else rng.uniform(14, 400))
        since = now - timedelta(minutes=rng.uniform(1, 60 * 24 * 3))
        stripe = plan != "trial" and rng.random() < 0.6
        licence_age = timedelta(days=rng.uniform(0, 24))
        return cls(f"bench-{i:04d}", plan, stripe, phase, now - age, since, licence_age)

    def spec(self, i: int) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "email": f"ops{i}@customer{i}.example.com",
            "companyName": f"Customer {i} GmbH",
            "contactName": f"Contact {i}",
            "plan": self.plan,
        }
        if self.stripe:
            spec["billing"] = {"mode": "stripe", "stripeCustomerId": f"cus_bench{i:06d}"}
            spec["subscription"] = {
                "status": "active",
                "plan": self.plan,
                "stripeSubscriptionId": f"sub_bench{i:06d}",
                "currentPeriodEnd": (self.since + timedelta(days=30)).isoformat(),
                "cancelAtPeriodEnd": False,
                "lastEventCreated": int(self.created.timestamp()),
            }
        return spec


def conditions(shape: Shape, licence_message: str, trial_ends: datetime | None) -> list[Condition]:
    """The conditions a pass writes for this phase (operator/conditions.py: the steps, then the kstatus
    trio), with lastTransitionTimes of their own."""
    waiting = "waiting for Deployments: " + ", ".join(
        f"{d} 0/1" for d in DEPLOYMENTS[: 1 + len(shape.name) % 3]
    )
    failure = "helm: UPGRADE FAILED: values don't meet the specifications of the schema(s)"
    values: list[tuple[str, bool, str, str]] = [
        (ConditionType.LICENSE_ISSUED, True, c.LICENSE_ISSUED, licence_message)
    ]
    if trial_ends is not None:
        values.append(
            (ConditionType.TRIAL_ACTIVE, True, c.TRIAL_ACTIVE, f"trial ends {trial_ends.isoformat()}")
        )
        values.append((ConditionType.SUBSCRIPTION_ACTIVE, False, c.NO_SUBSCRIPTION, "in a trial"))
    else:
        values.append((ConditionType.TRIAL_ACTIVE, False, c.NOT_IN_TRIAL, "not in a trial"))
        reason = c.SUBSCRIPTION_ACTIVE if shape.stripe else c.MANUAL_BILLING
        values.append((ConditionType.SUBSCRIPTION_ACTIVE, True, reason, f"{shape.plan} plan"))
    if shape.stripe:
        values.append((ConditionType.PAYMENT_OVERDUE, False, c.PAYMENTS_CURRENT, "no payment overdue"))
    if shape.phase == Phase.FAILED:
        values += [
            (ConditionType.RELEASE_DEPLOYED, False, c.UPGRADE_FAILED, failure),
            (ConditionType.STALLED, True, c.UPGRADE_FAILED, failure),
            (ConditionType.RECONCILING, False, c.UPGRADE_FAILED, "waiting for a change of the spec"),
            (ConditionType.READY, False, c.UPGRADE_FAILED, failure),
        ]
    elif shape.phase == Phase.READY:
        values += [
            (
                ConditionType.RELEASE_DEPLOYED,
                True,
                c.INSTALL_SUCCEEDED,
                "release instance revision 1 deployed",
            ),
            (ConditionType.STALLED, False, c.RECONCILED, ""),
            (ConditionType.RECONCILING, False, c.RECONCILED, ""),
            (ConditionType.READY, True, c.DEPLOYMENTS_AVAILABLE, f"{len(DEPLOYMENTS)} Deployments available"),
        ]
    else:  # Provisioning, Degraded: deployed, some Deployment not available
        values += [
            (
                ConditionType.RELEASE_DEPLOYED,
                True,
                c.INSTALL_SUCCEEDED,
                "release instance revision 1 deployed",
            ),
            (ConditionType.STALLED, False, c.RECONCILED, ""),
            (ConditionType.RECONCILING, True, c.PROGRESSING, waiting),
            (ConditionType.READY, False, c.DEPLOYMENTS_UNAVAILABLE, waiting),
        ]
    result: list[Condition] | None = None
    for type_, status, reason, message in values:
        at = shape.since if type_ in (ConditionType.READY, ConditionType.STALLED) else shape.created
        result = set_condition(
            result,
            type_=type_,
            status=ConditionStatus.TRUE if status else ConditionStatus.FALSE,
            reason=reason,
            message=message,
            observed_generation=1,
            now=at,
        )
    assert result is not None
    return result


def status(shape: Shape, customer_id: str, keys: SigningKeys, now: datetime) -> dict[str, Any]:
    """The status the operator would have written, with a licence minted for it (the operator renews a
    licence before its last days: issued within the last 24 days, 30 days long)."""
    trial_ends = shape.created + timedelta(days=14) if shape.plan == "trial" else None
    issued = max(shape.created, now - shape.licence_age)
    minted = mint_license(
        customer=LicenseCustomer(customer_id, shape.name),
        plan=plan_by_name(shape.plan),
        trial=TrialTerms(True, trial_ends) if trial_ends else TrialTerms(False),
        subscription=SubscriptionTerms("trialing" if trial_ends else "active"),
        now=issued,
        keys=keys,
        issuer=LICENSE_SETTINGS.license_issuer,
        audience=LICENSE_SETTINGS.license_audience,
    )
    namespace = namespace_for(shape.name)
    body: dict[str, Any] = {
        "customerId": customer_id,
        "phase": str(shape.phase),
        "plan": shape.plan,
        "observedGeneration": 1,
        "trial": {"isTrialMode": trial_ends is not None}
        | ({"endsAt": trial_ends.isoformat()} if trial_ends else {}),
        "license": {
            "secretName": "iotistic-license",
            "jti": minted.jti,
            "keyId": minted.kid,
            "issuedAt": minted.issued_at.isoformat(),
            "expiresAt": minted.expires_at.isoformat(),
            "sha256": minted.sha256,
        },
        "instance": {"namespace": namespace, "url": f"https://{shape.name}.iotistic.cloud"},
    }
    if shape.phase != Phase.FAILED:
        body["release"] = {
            "name": "instance",
            "namespace": namespace,
            "revision": 1,
            "chartVersion": "0.1.0",
            "valuesHash": hashlib.sha256(shape.name.encode()).hexdigest(),
        }
    if shape.phase in (Phase.READY, Phase.DEGRADED):
        body["usage"] = {
            "periodStart": now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).isoformat(),
            "activeDevices": len(shape.name) * 3,
            "lastReportAt": (now - timedelta(minutes=3)).isoformat(),
        }
    licence_message = f"{shape.plan} licence, expires {minted.expires_at.isoformat()}"
    body["conditions"] = [condition.to_k8s() for condition in conditions(shape, licence_message, trial_ends)]
    # What the operator writes parses as the product reads it.
    CustomerStatus.model_validate(body)
    return body


def create_customers(
    kubeconfig: Path, count: int, keys: SigningKeys, now: datetime
) -> list[tuple[Shape, str]]:
    """`count` Customers created from 8 threads, then their statuses patched (the status subresource)
    as the operator would; (shape, customer id) of each."""
    rng = random.Random(1000)  # noqa: S311 - not a secret: the same Customers in every run
    shapes = [Shape.draw(i, now, rng) for i in range(count)]
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    objects = kubernetes.client.CustomObjectsApi(client)
    operator = KubeApi(client, FieldManager.OPERATOR)

    def create(i: int) -> tuple[Shape, str]:
        shape = shapes[i]
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Customer",
            "metadata": {"name": shape.name},
            "spec": shape.spec(i),
        }
        created = json.loads(
            objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, body, _preload_content=False).data
        )
        customer_id = derived_customer_id(created["metadata"]["uid"])
        operator.patch_customer_status(shape.name, status(shape, customer_id, keys, now))
        return shape, customer_id

    try:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(create, range(count)))
    finally:
        client.close()


async def fill_database(database_url: str, customers: list[tuple[Shape, str]], usage_days: float) -> int:
    """The mirror rows of the Customers (the operator's `Directory.remember`), and `usage_days` of
    5-minute usage reports of each (reported at the end of its period); the number of reports."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.executemany(
            "INSERT INTO customers (customer_id, resource_name, email, company_name, plan, phase,"
            " stripe_customer_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                (
                    customer_id,
                    shape.name,
                    f"ops{i}@customer{i}.example.com",
                    f"Customer {i} GmbH",
                    shape.plan,
                    str(shape.phase),
                    f"cus_bench{i:06d}" if shape.stripe else None,
                )
                for i, (shape, customer_id) in enumerate(customers)
            ],
        )
        periods = int(usage_days * 24 * 12)
        end = datetime.now(UTC).replace(second=0, microsecond=0)
        stored = 0
        for p in range(periods):
            period_end = end - timedelta(minutes=5 * p)
            start = period_end - timedelta(minutes=5)
            rows = [
                (
                    customer_id,
                    "instance-1",
                    f"r-{p:06d}",
                    start,
                    period_end,
                    40,
                    45,
                    15000,
                    12000,
                    150000,
                    120000,
                    500,
                    50000,
                    30000,
                    Decimal("125.5"),
                    500000,
                    period_end,
                )
                for _, customer_id in customers
            ]
            await conn.copy_records_to_table("usage_reports", records=rows, columns=[*COLUMNS, "reported_at"])
            stored += len(rows)
        if periods:
            await conn.execute("ANALYZE usage_reports")
        return stored
    finally:
        await conn.close()


# ----- the measurement -----


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of every thread of `pid` (the server's default executor runs the Kubernetes
    calls), from schedstat: clock ticks (10 ms) are too coarse for one request."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that exited meanwhile
    return total


@dataclass
class Series:
    """One URL's timings over the rounds (seconds) and the CPU each request cost the processes."""

    label: str
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    size: int = 0

    def add(self, ttfb: float, total: float, size: int, cpu: dict[str, float]) -> None:
        self.ttfb.append(ttfb)
        self.total.append(total)
        self.size = size
        for name, seconds in cpu.items():
            self.cpu.setdefault(name, []).append(seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.ttfb)

    @property
    def last_byte(self) -> float:
        return statistics.median(self.total)

    @property
    def p90(self) -> float:
        return statistics.quantiles(self.ttfb, n=10)[8] if len(self.ttfb) > 1 else self.ttfb[0]


class Client:
    """One keep-alive HTTP/1.1 connection to the server, timed around each request."""

    def __init__(self, port: int, cpu: dict[str, int]) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.cpu = cpu  # name -> pid whose CPU each request is charged

    def sign_in(self) -> str:
        """The console cookie of an admin session."""
        body = urllib.parse.urlencode({"token": ADMIN_TOKEN})
        self.connection.request(
            "POST",
            "/admin/login",
            body,
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": f"http://127.0.0.1:{self.port}",
            },
        )
        response = self.connection.getresponse()
        response.read()
        if response.status != 303:
            raise SystemExit(f"sign-in answered {response.status}, not 303")
        cookies = SimpleCookie(response.headers.get("Set-Cookie", ""))
        if COOKIE not in cookies or cookies[COOKIE]["path"] != "/admin":
            raise SystemExit(f"sign-in set no {COOKIE} cookie for /admin: {response.headers}")
        return cookies[COOKIE].value

    def get(self, path: str, headers: dict[str, str], series: Series, check: Callable[[bytes], None]) -> None:
        before = {name: cpu_ns(pid) for name, pid in self.cpu.items()}
        started = time.perf_counter()
        self.connection.request("GET", path, headers=headers)
        response = self.connection.getresponse()  # the status line and headers are in
        first = time.perf_counter()
        body = response.read()
        done = time.perf_counter()
        after = {name: cpu_ns(pid) for name, pid in self.cpu.items()}
        if response.status != 200:
            raise SystemExit(f"GET {path} answered {response.status}: {body[:300]!r}")
        check(body)
        cpu = {name: (after[name] - before[name]) / 1e9 for name in self.cpu}
        series.add(first - started, done - started, len(body), cpu)


class KubeSide:
    """The list every one of the three URLs makes, from the API server, timed in this process."""

    def __init__(self, kubeconfig: Path, count: int, cpu: dict[str, int]) -> None:
        self.client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.objects = kubernetes.client.CustomObjectsApi(self.client)
        self.product = KubeApi(self.client, FieldManager.CLI)
        self.count = count
        self.cpu = cpu
        self.decode: list[float] = []
        self.parse: list[float] = []
        self.paged: list[float] = []

    def measure(self, series: Series) -> None:
        before = {name: cpu_ns(pid) for name, pid in self.cpu.items()}
        started = time.perf_counter()
        response = self.objects.list_cluster_custom_object(GROUP, VERSION, PLURAL, _preload_content=False)
        first = time.perf_counter()  # urllib3 returns once the headers are in
        raw = response.data
        done = time.perf_counter()
        after = {name: cpu_ns(pid) for name, pid in self.cpu.items()}
        series.add(
            first - started,
            done - started,
            len(raw),
            {name: (after[name] - before[name]) / 1e9 for name in self.cpu},
        )
        items = json.loads(raw)["items"]
        decoded = time.perf_counter()
        records = [record for body in items if (record := CustomerRecord.from_body(body)) is not None]
        parsed = time.perf_counter()
        if len(records) != self.count:
            raise SystemExit(f"{len(records)} of {len(items)} Customers parse, {self.count} expected")
        self.decode.append(decoded - done)
        self.parse.append(parsed - decoded)
        started = time.perf_counter()
        listed = self.product.list_customers()
        self.paged.append(time.perf_counter() - started)
        if len(listed) != self.count:  # not an assert: `python -O` drops those
            raise SystemExit(f"KubeApi.list_customers listed {len(listed)}, {self.count} expected")

    def close(self) -> None:
        self.client.close()


def checks(count: int) -> dict[str, Callable[[bytes], None]]:
    """What each answer must hold, so that a redirect to the sign-in page or an empty list is not timed."""

    def api(body: bytes) -> None:
        answer = json.loads(body)
        if len(answer["customers"]) != 50 or answer["pagination"]["total"] != count:
            raise SystemExit(f"the API listed {len(answer['customers'])} of {answer['pagination']}")

    def overview(body: bytes) -> None:
        if f'<p class="big">{count}</p>'.encode() not in body or b'class="failing"' not in body:
            raise SystemExit(f"the overview does not show {count} Customers and failing ones")

    def customers(body: bytes) -> None:
        if f"<p>{count} customers".encode() not in body or body.count(b"<tr>") < min(count, 50):
            raise SystemExit(f"the customers page does not show the first 50 of {count}")

    return {API: api, PAGES[0]: overview, PAGES[1]: customers}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def report(series: dict[str, Series], kube: KubeSide, rounds: int) -> dict[str, Any]:
    names = list(next(iter(series.values())).cpu)
    print(f"{rounds} interleaved rounds; ms; CPU ms per request (median) of " + ", ".join(names))
    print(
        f"{'':<42}{'TTFB med':>9}{'p90':>9}{'last byte':>10}{'bytes':>11}"
        + "".join(f"{name:>16}" for name in names)
    )
    for s in series.values():
        print(
            f"{s.label:<42} {ms(s.median)} {ms(s.p90)}  {ms(s.last_byte)} {s.size:10,d}"
            + "".join(f"{ms(statistics.median(s.cpu[name])):>16}" for name in names)
        )
    print(
        f"in this process, median: JSON decode of the list {ms(statistics.median(kube.decode)).strip()} ms, "
        f"CustomerRecord.from_body x {kube.count} {ms(statistics.median(kube.parse)).strip()} ms, "
        f"KubeApi.list_customers (500 a page, decoded) {ms(statistics.median(kube.paged)).strip()} ms"
    )
    api = series[API].median
    result: dict[str, Any] = {
        "ttfb_ms": {
            key: {"median": round(s.median * 1000, 1), "p90": round(s.p90 * 1000, 1)}
            for key, s in series.items()
        },
        "server_cpu_ms": {
            key: round(statistics.median(s.cpu["server"]) * 1000, 1)
            for key, s in series.items()
            if key != KUBE_LIST
        },
        "in_process_ms": {
            "json_decode": round(statistics.median(kube.decode) * 1000, 1),
            "customer_records": round(statistics.median(kube.parse) * 1000, 1),
            "kubeapi_list_customers": round(statistics.median(kube.paged) * 1000, 1),
        },
        "ratios": {},
    }
    for page in PAGES:
        ratio = series[page].median / api
        result["ratios"][page] = round(ratio, 2)
        print(f"GET {page} ratio {ratio:.2f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'missed'})")
    return result


def measure(args: argparse.Namespace, port: int, kubeconfig: Path, cpu: dict[str, int]) -> dict[str, Any]:
    client = Client(port, cpu)
    cookie = client.sign_in()
    console = {"Cookie": f"{COOKIE}={cookie}"}
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    check = checks(args.customers)
    kube = KubeSide(kubeconfig, args.customers, cpu)
    series = {
        API: Series(f"GET {API} (baseline)"),
        PAGES[0]: Series(f"GET {PAGES[0]}"),
        PAGES[1]: Series(f"GET {PAGES[1]}"),
        KUBE_LIST: Series(f"{KUBE_LIST} ({args.customers:,})"),
    }

    def one(key: str, into: Series) -> None:
        if key == KUBE_LIST:
            kube.measure(into)
        else:
            client.get(key, bearer if key == API else console, into, check[key])

    try:
        for key in series:  # connections, pools, templates, imports: none of it timed
            for _ in range(args.warm):
                one(key, Series("warm-up"))
        order = list(series)
        for round_ in range(args.rounds):
            shift = round_ % len(order)
            for key in order[shift:] + order[:shift]:
                one(key, series[key])
        return report(series, kube, args.rounds)
    finally:
        kube.close()
        client.connection.close()


# ----- the stack -----


def server_env(
    database_url: str, stripe: StripeMock, keys: Path, kubeconfig: Path, port: int
) -> dict[str, str]:
    """As tests/integration/webhook_support.py's server_env: every dependency configured."""
    return {
        **os.environ,
        "PORT": str(port),
        "STRIPE_INBOX_PORT": str(free_port()),
        "KUBECONFIG": str(kubeconfig),
        "DATABASE_URL": database_url,
        "STRIPE_SECRET_KEY": "sk_test_bench",
        "STRIPE_WEBHOOK_SECRET": "whsec_bench_" + "0" * 24,
        "STRIPE_API_BASE": stripe.url,
        "STRIPE_PRICE_STARTER": PRICES["starter"],
        "STRIPE_PRICE_PROFESSIONAL": PRICES["professional"],
        "STRIPE_PRICE_ENTERPRISE": PRICES["enterprise"],
        "LICENSE_PRIVATE_KEY_PATH": str(keys / "private-key.pem"),
        "LICENSE_PUBLIC_KEY_PATH": str(keys / "public-key.pem"),
        "ADMIN_API_TOKEN": ADMIN_TOKEN,
        "CONSOLE_SESSION_KEY": "bench-console-session-key-" + "0" * 24,
        "LOG_FORMAT": "json",
    }


def run(args: argparse.Namespace, work: Path) -> int:
    os.environ["KUBECACHEDIR"] = str(work / "kube-cache")  # kubectl's, gone with the folder
    plane = ControlPlane(work / "control-plane").start()
    postgres = EmbeddedPostgres(work / "postgres").start()
    stripe = StripeMock(work).start()
    server: ManagedProcess | None = None
    try:
        database = postgres.create_database("bench")
        migrate.upgrade(database)
        kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(plane.kubeconfig)]
        subprocess.run(
            [*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")], check=True, capture_output=True
        )
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd", "--all"], check=True, capture_output=True
        )
        keys = work / "keys"
        cli(["keys", "generate", "--out", str(keys)])
        started = time.monotonic()
        now = datetime.now(UTC)
        customers = create_customers(
            plane.kubeconfig, args.customers, SigningKeys.from_pem_files(keys / "private-key.pem"), now
        )
        reports = asyncio.run(fill_database(database, customers, args.usage_days))
        phases = {str(p): sum(1 for s, _ in customers if s.phase == p) for p in Phase}
        print(
            f"{args.customers:,} Customers created with their status in {time.monotonic() - started:.1f} s "
            f"({', '.join(f'{p} {n}' for p, n in phases.items() if n)}); {reports:,} usage reports",
            flush=True,
        )

        port = free_port()
        server = ManagedProcess(
            "webhooks",
            [sys.executable, "-m", "iotistic_billing.webhook_server"],
            work / "webhooks.log",
            env=server_env(database, stripe, keys, plane.kubeconfig, port),
        )
        wait_for_port(port, 60, server.process)
        assert plane.apiserver is not None and plane.etcd is not None
        cpu = {"server": server.pid, "kube-apiserver": plane.apiserver.pid, "etcd": plane.etcd.pid}
        print(
            f"{os.cpu_count()} CPUs shared by the server, its inbox process, PostgreSQL, the control plane "
            f"and this client; load average {os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        result = measure(args, port, plane.kubeconfig, cpu)
        result |= {"customers": args.customers, "usage_reports": reports, "load_after": os.getloadavg()[0]}
        print(json.dumps(result), flush=True)
        met = all(ratio <= TARGET for ratio in result["ratios"].values())
        print(f"targets: {'met' if met else 'MISSED'}")
        return 0 if met else 1
    finally:
        if server is not None:
            server.stop()
        stripe.stop()
        postgres.stop()
        plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds, one request per URL each")
    parser.add_argument("--warm", type=int, default=3, help="untimed requests per URL first")
    parser.add_argument(
        "--usage-days", type=float, default=0, help="days of 5-minute usage reports of every Customer"
    )
    args = parser.parse_args(argv)
    print_machine_speed()
    with tempfile.TemporaryDirectory(prefix="bench-console-") as folder:
        return run(args, Path(folder))


if __name__ == "__main__":
    sys.exit(main())
