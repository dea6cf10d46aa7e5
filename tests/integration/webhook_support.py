"""Shared parts of the webhook server's tests: Stripe objects in Stripe's own shapes, the real signing
scheme, the app on a real port against the session's control plane, PostgreSQL and stripe-mock."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from kubernetes.client.exceptions import ApiException
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.api_keys import usage_key_hash
from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.db.models import ApiKey, StripeEvent
from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.k8s import FieldManager, KubeApi
from iotistic_billing.processes import free_port
from iotistic_billing.settings import Settings, load_settings
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.context import SESSIONS
from iotistic_billing.webhook_server.options import ServerOptions
from tests.conftest import unique_name, wait_until

T = TypeVar("T")

# The backends of transactions that wrote a licence history row and wait (on the API server) before
# their commit, each once: a backend that read the history before it wrote holds two locks on it, and
# its second terminate, once it had exited, answered false (found in full runs: [True, False], the
# revoke answered "nothing was changed").
_HISTORY_IN_FLIGHT = text(
    "SELECT pg_terminate_backend(held.pid) FROM (SELECT DISTINCT locks.pid FROM pg_locks locks"
    " JOIN pg_stat_activity activity USING (pid) WHERE locks.relation = 'license_history'::regclass"
    " AND activity.state = 'idle in transaction' AND locks.pid <> pg_backend_pid()) AS held"
)


async def lose_revoke_in_flight(engine: AsyncEngine) -> None:
    """PostgreSQL lost at the commit of a revoke that has suspended the Customer: its backend ended. The
    operator's licence transaction may be in flight too (the suspension makes it mint), and is ended with
    it: the operator retries (found flaky: the test counted exactly one)."""
    async with engine.connect() as connection:
        ended = (await connection.execute(_HISTORY_IN_FLIGHT)).scalars().all()
        await connection.commit()
    # The revoke's, waiting on this very call, is ended; the operator's may have committed meanwhile.
    assert any(ended), ended


def lose_the_database_after_the_patch(
    kube: Any, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Customer patch of `kube` (a revoke's suspension) made, then PostgreSQL lost before the
    revoke's commit (`lose_revoke_in_flight`)."""
    patch_customer = kube.patch_customer

    async def patch_then_lose_the_database(*args: Any, **kwargs: Any) -> dict[str, Any]:
        patched: dict[str, Any] = await patch_customer(*args, **kwargs)
        try:
            await lose_revoke_in_flight(engine)
        except BaseException:
            # Raised into the revoke, whose answer would say only "nothing was changed": the cause is
            # in the test's captured output (the revoke tests failed so in full runs, never alone).
            print("lose_revoke_in_flight failed:\n" + traceback.format_exc(), flush=True)
            raise
        return patched

    monkeypatch.setattr(kube, "patch_customer", patch_then_lose_the_database)


WEBHOOK_SECRET = "whsec_test_" + "a1b2c3d4" * 4
ADMIN_TOKEN = "admin-token-" + "0123456789abcdef" * 2
VIEWER_TOKEN = "viewer-token-" + "fedcba9876543210" * 2
# The console's sealing key: the same for every app a test starts, as for every replica.
SESSION_KEY = "console-session-key-" + "89abcdef01234567" * 2
PRICES = {
    "starter": "price_test_starter",
    "professional": "price_test_professional",
    "enterprise": "price_test_enterprise",
}
API_VERSION = "2025-08-27.basil"
# The session database holds reports of the fixed past clocks of many tests: a server on it whose clock
# is the real one keeps every month (the most Settings allows), or its partition run at start would drop
# another test's months under it. The retention itself is tested on databases of its own.
SHARED_DATABASE_RETENTION = 1200
SHARED_DATABASE_USAGE = UsageOptions(raw_retention_months=SHARED_DATABASE_RETENTION)


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def random_id(prefix: str, length: int = 14) -> str:
    return prefix + secrets.token_hex(length)[:length]


def customer_id_for(name: str) -> str:
    return "cust_" + name.replace("-", "")[:30]


# ----- Stripe objects, as Stripe sends them (API 2025-03 and later: the billing period on the items) -----


def subscription_object(
    subscription_id: str,
    *,
    customer: str,
    price: str,
    status: str = "active",
    period_end: int | None = None,
    cancel_at_period_end: bool = False,
    metadata: dict[str, str] | None = None,
    period_on_subscription: bool = False,
    metered: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A subscription on `price`; `metered` prices are items listed before the plan's, as Stripe may."""
    now = int(time.time())
    end = period_end or now + 30 * 86400

    def subscription_item(price: str, usage_type: str) -> dict[str, Any]:
        return {
            "id": random_id("si_"),
            "object": "subscription_item",
            "created": now - 60,
            "metadata": {},
            "price": {
                "id": price,
                "object": "price",
                "active": True,
                "billing_scheme": "per_unit",
                "currency": "usd",
                "product": "prod_" + price[-8:],
                "recurring": {"interval": "month", "interval_count": 1, "usage_type": usage_type},
                "type": "recurring",
                "unit_amount": 9900,
            },
            "subscription": subscription_id,
        }

    items = [subscription_item(metered_price, "metered") for metered_price in metered]
    item = subscription_item(price, "licensed") | {"quantity": 1}
    items.append(item)
    subscription: dict[str, Any] = {
        "id": subscription_id,
        "object": "subscription",
        "billing_cycle_anchor": end - 30 * 86400,
        "cancel_at": end if cancel_at_period_end else None,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": now if status == "canceled" else None,
        "collection_method": "charge_automatically",
        "created": now - 60,
        "currency": "usd",
        "customer": customer,
        "items": {
            "object": "list",
            "data": items,
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={subscription_id}",
        },
        "livemode": False,
        "metadata": metadata or {},
        "start_date": now - 60,
        "status": status,
    }
    if period_on_subscription:  # API versions before 2025-03 kept the period here
        subscription["current_period_start"] = end - 30 * 86400
        subscription["current_period_end"] = end
    else:
        for each in items:
            each["current_period_start"] = end - 30 * 86400
            each["current_period_end"] = end
    return subscription


def stripe_mock_plan_price(stripe_mock: StripeMock) -> str:
    """The price of stripe-mock's subscription fixture, which it answers for any subscription id."""
    client = stripe.StripeClient(
        "sk_test_123", base_addresses={"api": stripe_mock.url}, max_network_retries=0
    )
    return str(client.v1.subscriptions.retrieve("sub_fixture")["items"].data[0].price.id)


def checkout_session_object(
    *,
    customer_id: str,
    customer: str,
    subscription_id: str,
    plan: str,
    payment_status: str = "paid",
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": random_id("cs_test_", 24),
        "object": "checkout.session",
        "amount_subtotal": 9900,
        "amount_total": 9900,
        "cancel_url": "https://app.example.com/cancel",
        "client_reference_id": customer_id,
        "created": now - 120,
        "currency": "usd",
        "customer": customer,
        "customer_details": {"email": "billing@example.com", "name": None},
        "expires_at": now + 86400,
        "livemode": False,
        "metadata": {"customerId": customer_id, "plan": plan},
        "mode": "subscription",
        "payment_status": payment_status,
        "status": "complete",
        "subscription": subscription_id,
        "success_url": "https://app.example.com/success",
    }


def invoice_object(
    *,
    customer: str,
    subscription_id: str,
    price: str,
    paid: bool,
    customer_id: str | None = None,
    billing_reason: str = "subscription_cycle",
    period_end: int | None = None,
) -> dict[str, Any]:
    now = int(time.time())
    end = period_end or now + 30 * 86400
    return {
        "id": random_id("in_"),
        "object": "invoice",
        "amount_due": 9900,
        "amount_paid": 9900 if paid else 0,
        "amount_remaining": 0 if paid else 9900,
        "attempt_count": 1,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "created": now,
        "currency": "usd",
        "customer": customer,
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": random_id("il_"),
                    "object": "line_item",
                    "amount": 9900,
                    "currency": "usd",
                    "parent": {
                        "type": "subscription_item_details",
                        "subscription_item_details": {
                            "proration": False,
                            "subscription": subscription_id,
                            "subscription_item": random_id("si_"),
                        },
                    },
                    "period": {"start": end - 30 * 86400, "end": end},
                    "pricing": {
                        "type": "price_details",
                        "price_details": {"price": price, "product": "prod_" + price[-8:]},
                    },
                    "quantity": 1,
                }
            ],
            "has_more": False,
        },
        "livemode": False,
        "parent": {
            "type": "subscription_details",
            "subscription_details": {
                "metadata": {"customerId": customer_id} if customer_id else {},
                "subscription": subscription_id,
            },
        },
        "status": "paid" if paid else "open",
    }


def event(
    event_type: str, obj: dict[str, Any], *, created: int | None = None, event_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": event_id or random_id("evt_", 24),
        "object": "event",
        "api_version": API_VERSION,
        "created": created if created is not None else int(time.time()),
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """Stripe's scheme: v1 is the HMAC-SHA256 of "<timestamp>.<payload>" keyed with the endpoint secret."""
    ts = int(time.time()) if timestamp is None else timestamp
    signature = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={signature}"


async def deliver(
    client: TestClient[Any, Any],
    body: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST a signed event; for a first delivery, also wait until the inbox applied it and report the
    result it recorded (the 2xx itself only says `queued`)."""
    payload = json.dumps(body).encode()
    response = await client.post(
        "/api/webhooks/stripe",
        data=payload,
        headers={"Content-Type": "application/json", "Stripe-Signature": sign(payload, secret, timestamp)},
    )
    answer = await response.json()
    if response.status == 200 and answer.get("result") == "queued":
        assert answer == {"received": True, "duplicate": False, "result": "queued"}
        answer["result"] = await applied_result(client.app, body["id"])
    return response.status, answer


async def applied_result(app: web.Application, event_id: str, within: float = 30) -> str:
    """The result the inbox recorded for `event_id`, once it is no longer pending."""

    async def result() -> str | None:
        async with app[SESSIONS]() as session:
            value = await session.scalar(select(StripeEvent.result).where(StripeEvent.event_id == event_id))
        return value if value not in (None, "pending") else None

    return await eventually(result, within=within, message=f"event {event_id} applied")


# ----- the cluster, from the tests' side -----


class Customers:
    """Customer resources through the admin client (sync: the tests' own view, not the server's)."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.objects = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.kube = KubeApi(api_client, FieldManager.CLI)

    def create(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Customer",
            "metadata": {"name": name},
            "spec": {"email": f"ops@{name}.example.com", "companyName": f"{name.title()} Corp", **spec},
        }
        created: dict[str, Any] = self.objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        return created

    def get(self, name: str) -> dict[str, Any] | None:
        return self.kube.read_customer(name)

    def subscription(self, name: str) -> dict[str, Any] | None:
        body = self.get(name) or {}
        subscription: dict[str, Any] | None = body.get("spec", {}).get("subscription")
        return subscription

    def delete(self, name: str) -> None:
        try:
            self.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as error:
            if error.status != 404:
                raise

    def managers_of_subscription(self, name: str) -> list[tuple[str, str]]:
        """(manager, operation) of every managedFields entry that owns spec.subscription."""
        body = self.get(name) or {}
        return [
            (entry["manager"], entry["operation"])
            for entry in body["metadata"].get("managedFields", [])
            if "f:subscription" in (entry.get("fieldsV1") or {}).get("f:spec", {})
        ]


def stripe_customer(
    customers: Customers,
    prefix: str = "stripe",
    current_period_end: datetime | None = None,
    *,
    current_period_start: datetime | None = None,
    **spec: Any,
) -> tuple[str, str]:
    """A Customer billed through Stripe (resource name, customer id); with `current_period_end`, on an
    active starter subscription whose period ends then (usage is billed by that period), and starts at
    `current_period_start` when given (else a month before its end, as older inboxes wrote)."""
    name = unique_name(prefix)
    customer_id = customer_id_for(name)
    if current_period_end is not None:
        subscription = {
            "status": "active",
            "plan": "starter",
            "currentPeriodEnd": current_period_end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if current_period_start is not None:
            subscription["currentPeriodStart"] = current_period_start.strftime("%Y-%m-%dT%H:%M:%SZ")
        spec = {"plan": "starter", "subscription": subscription, **spec}
    customers.create(name, customerId=customer_id, billing={"mode": "stripe"}, **spec)
    return name, customer_id


async def eventually(probe: Callable[[], Awaitable[T] | T], within: float = 60, message: str = "") -> T:
    """Poll without blocking the loop (the app under test may be serving on it)."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        result = probe()
        last = await result if asyncio.iscoroutine(result) else result
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {within}s: {message} (last: {last!r})")


async def made_again(customers: Customers, name: str, customer_id: str) -> dict[str, Any]:
    """The Customer deleted and applied again under its name (from Git): another uid. Its deletion's
    finalizer has run by then (the operator's revocation of its licence, and that notice, among it)."""
    customers.delete(name)
    await eventually(lambda: customers.get(name) is None, message=f"{name} deleted")
    return customers.create(name, customerId=customer_id)


async def event_rows(engine: AsyncEngine, event_id: str) -> list[tuple[str, str, str | None]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(StripeEvent.event_id, StripeEvent.result, StripeEvent.customer_id).where(
                StripeEvent.event_id == event_id
            )
        )
        return [(row[0], row[1], row[2]) for row in rows]


async def add_usage_key(engine: AsyncEngine, customer_id: str) -> str:
    """A usage key for `customer_id`, stored as the operator stores them: its SHA-256 only."""
    key = "iuk_" + secrets.token_urlsafe(32)
    async with engine.begin() as connection:
        await connection.execute(
            ApiKey.__table__.insert().values(
                customer_id=customer_id, key_hash=usage_key_hash(key), key_prefix=key[:12], purpose="usage"
            )
        )
    return key


# ----- the app -----


def make_settings(
    database_url: str, stripe_mock: StripeMock, license_keys: tuple[Path, Path], **overrides: Any
) -> Settings:
    private_key, public_key = license_keys
    values: dict[str, Any] = {
        "database_url": database_url,
        "stripe_secret_key": "sk_test_webhooks",
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_api_base": stripe_mock.url,
        "stripe_price_starter": PRICES["starter"],
        "stripe_price_professional": PRICES["professional"],
        "stripe_price_enterprise": PRICES["enterprise"],
        "license_private_key_path": private_key,
        "license_public_key_path": public_key,
        "admin_api_token": ADMIN_TOKEN,
        "admin_viewer_token": VIEWER_TOKEN,
        "console_session_key": SESSION_KEY,
        "base_domain": "test.iotistic.example",
        "usage_raw_retention": SHARED_DATABASE_RETENTION,
    }
    values.update(overrides)
    return load_settings(**values)


@asynccontextmanager
async def running_app(
    settings: Settings, kubeconfig: Path, options: ServerOptions | None = None
) -> AsyncIterator[TestClient[Any, Any]]:
    """The app on a free loopback port, with a Kubernetes client of its own from `kubeconfig`."""
    api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    app = create_app(
        settings,
        kube=api_client,
        options=options or ServerOptions(license_wait=0),
        usage=SHARED_DATABASE_USAGE,
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        api_client.close()


# Fixtures are named apart from their functions, so that a test module imports the function and names
# the fixture as a parameter without shadowing an imported name.
@pytest.fixture(scope="session", name="webhook_settings")
def webhook_settings_fixture(
    database_url: str, stripe_mock: StripeMock, license_keys: tuple[Path, Path]
) -> Settings:
    return make_settings(database_url, stripe_mock, license_keys)


@pytest.fixture(name="api")
async def api_fixture(webhook_settings: Settings, kubeconfig: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """The webhook server with every dependency real and configured; signup does not wait for licences."""
    async with running_app(webhook_settings, kubeconfig) as client:
        yield client


@pytest.fixture(scope="session", name="customers")
def customers_fixture(k8s_client: kubernetes.client.ApiClient) -> Customers:
    return Customers(k8s_client)


# ----- the server as a process, as `python -m iotistic_billing.webhook_server` runs it -----


def server_env(
    database_url: str, stripe_mock: StripeMock, license_keys: tuple[Path, Path], kubeconfig: Path, port: int
) -> dict[str, str]:
    private_key, public_key = license_keys
    return {
        **os.environ,
        "PORT": str(port),
        # The inbox beside the server would take PORT + 1, which a free PORT does not make free.
        "STRIPE_INBOX_PORT": str(free_port()),
        "KUBECONFIG": str(kubeconfig),
        "DATABASE_URL": database_url,
        "STRIPE_SECRET_KEY": "sk_test_webhooks",
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_API_BASE": stripe_mock.url,
        "STRIPE_PRICE_STARTER": PRICES["starter"],
        "STRIPE_PRICE_PROFESSIONAL": PRICES["professional"],
        "STRIPE_PRICE_ENTERPRISE": PRICES["enterprise"],
        "LICENSE_PRIVATE_KEY_PATH": str(private_key),
        "LICENSE_PUBLIC_KEY_PATH": str(public_key),
        "ADMIN_API_TOKEN": ADMIN_TOKEN,
        "CONSOLE_SESSION_KEY": SESSION_KEY,
        "USAGE_RAW_RETENTION": str(SHARED_DATABASE_RETENTION),
    }


class ServerProcess:
    """`python -m iotistic_billing.webhook_server` on env's PORT; `role` "inbox": a replica's inbox
    process alone, as its server starts it."""

    def __init__(self, env: dict[str, str], log: Path, role: str | None = None) -> None:
        self.env = env
        self.log = log
        self.role = role
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iotistic_billing.webhook_server",
                *(["--role", self.role] if self.role else []),
            ],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._healthy, timeout=60, message=f"webhook server not healthy; log: {self.log}")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"webhook server exited with {self.process.returncode}; log: {self.log}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:  # noqa: S310 - loopback
                return bool(response.status == 200)
        except OSError:
            return False

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, and the exit code once it has shut down."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, then kill -9 should it not have stopped in 30 s."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
