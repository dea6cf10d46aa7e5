"""Dependencies down: PostgreSQL stopped or the API server unreachable is a 503 with nothing written,
and the same event delivered after the recovery is applied exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine
from iotistic_billing.db.models import StripeEvent as StripeEventRow
from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.processes import free_port
from iotistic_billing.settings import Settings
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.options import ServerOptions
from iotistic_billing.webhook_server.probes import READINESS_TTL
from tests.conftest import eventually, unique_name
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    PRICES,
    SHARED_DATABASE_USAGE,
    Customers,
    api_fixture,
    customer_id_for,
    customers_fixture,
    deliver,
    event,
    event_rows,
    make_settings,
    random_id,
    running_app,
    sign,
    subscription_object,
    webhook_settings_fixture,
)

pytestmark = pytest.mark.integration


async def unready(client: TestClient[Any, Any]) -> dict[str, str]:
    """/readyz's checks once it says unavailable (it reuses an answer for up to READINESS_TTL)."""

    async def answer() -> dict[str, str] | None:
        ready = await client.get("/readyz")
        checks: dict[str, str] = (await ready.json())["checks"]
        return checks if ready.status == 503 else None

    found: dict[str, str] = await eventually(answer, within=READINESS_TTL + 5, message="/readyz unavailable")
    return found


async def test_postgres_down_is_503_and_the_retry_applies_once(
    own_postgres: tuple[EmbeddedPostgres, str],
    stripe_mock: StripeMock,
    license_keys: tuple[Path, Path],
    kubeconfig: Path,
    customers: Customers,
) -> None:
    server, url = own_postgres
    settings = make_settings(url, stripe_mock, license_keys)
    name = unique_name("outage")
    customer_id = customer_id_for(name)
    customers.create(name, customerId=customer_id, billing={"mode": "stripe"})
    body = event(
        "customer.subscription.updated",
        subscription_object(
            random_id("sub_"),
            customer=random_id("cus_"),
            price=PRICES["professional"],
            metadata={"customerId": customer_id},
        ),
    )
    engine = create_engine(url)
    try:
        async with running_app(settings, kubeconfig) as client:
            # Warm the pool first: a dead pooled connection must be noticed, not only a refused new one.
            assert (await client.get("/readyz")).status == 200
            server.stop()

            payload_status, answer = await deliver(client, body)
            assert payload_status == 503 and answer["error"] == "Database unavailable"
            assert customers.subscription(name) is None
            assert await unready(client) == {
                "database": "unavailable",
                "schema": "unavailable",
                "kubernetes": "ok",
            }

            # Same data directory, same port: what a restarted database looks like to the server.
            restarted = EmbeddedPostgres(server.data_dir, port=server.port).start()
            try:
                assert await deliver(client, body) == (
                    200,
                    {"received": True, "duplicate": False, "result": "applied"},
                )
                assert await deliver(client, body) == (
                    200,
                    {"received": True, "duplicate": True, "result": None},
                )
                assert await event_rows(engine, body["id"]) == [(body["id"], "applied", customer_id)]
                assert (customers.subscription(name) or {})["plan"] == "professional"
            finally:
                await engine.dispose()
                restarted.stop()
    finally:
        await engine.dispose()


async def test_api_server_unreachable_keeps_the_event_pending_and_the_server_ready(
    webhook_settings: Settings, db_engine: AsyncEngine
) -> None:
    """The event is stored before the 2xx, so Stripe stops retrying and nothing is lost: the inbox keeps
    it pending, with the error, and tries again until the API server answers."""
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    configuration.retries = False
    unreachable = kubernetes.client.ApiClient(configuration)
    app = create_app(
        webhook_settings,
        kube=unreachable,
        options=ServerOptions(license_wait=0, kube_timeout=2),
        usage=SHARED_DATABASE_USAGE,
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        body = event(
            "customer.subscription.updated",
            subscription_object(
                random_id("sub_"),
                customer=random_id("cus_"),
                price=PRICES["starter"],
                metadata={"customerId": "cust_unreachable01"},
            ),
        )
        payload = json.dumps(body).encode()
        response = await client.post(
            "/api/webhooks/stripe",
            data=payload,
            headers={"Content-Type": "application/json", "Stripe-Signature": sign(payload)},
        )
        assert response.status == 200
        assert await response.json() == {"received": True, "duplicate": False, "result": "queued"}

        async def failed_attempt() -> tuple[str, int, str | None] | None:
            async with db_engine.connect() as connection:
                row = (
                    await connection.execute(
                        select(
                            StripeEventRow.result, StripeEventRow.attempts, StripeEventRow.last_error
                        ).where(StripeEventRow.event_id == body["id"])
                    )
                ).first()
            return tuple(row) if row is not None and row.attempts >= 1 else None  # type: ignore[return-value]

        result, attempts, error = await eventually(failed_attempt, within=30, message="a failed attempt")
        assert result == "pending" and attempts >= 1 and error

        # Still ready: accepting Stripe's events needs PostgreSQL alone; the API server is reported.
        async def reported() -> tuple[int, dict[str, str]] | None:
            ready = await client.get("/readyz")
            checks: dict[str, str] = (await ready.json())["checks"]
            return (ready.status, checks) if checks["kubernetes"] == "unavailable" else None

        assert await eventually(
            reported, within=READINESS_TTL + 5, message="the API server reported away"
        ) == (
            200,
            {"database": "ok", "schema": "ok", "kubernetes": "unavailable"},
        )
    finally:
        await client.close()
        unreachable.close()
