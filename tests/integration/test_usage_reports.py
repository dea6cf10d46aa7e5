"""POST /api/usage/report and GET /api/usage/{customerId} against the real server parts: every report
stored once whatever the repeats and races, keys confined to their customer, 400s that name the field,
413, and nothing half-written."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import kubernetes
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.db import migrate
from iotistic_billing.db import pool as db_pool
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine, plain_url
from iotistic_billing.db.models import Notice
from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.settings import Settings
from iotistic_billing.usage import store
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.partitions import PartitionRun
from iotistic_billing.usage.reports import ResentReportsDiffer, parse_reports, report_rows
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.context import USAGE
from iotistic_billing.webhook_server.options import RateLimit, ServerOptions
from tests.conftest import eventually, unique_name
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    Customers,
    add_usage_key,
    admin_headers,
    customer_id_for,
    customers_fixture,
    make_settings,
    running_app,
    webhook_settings_fixture,
)

pytestmark = pytest.mark.integration

# The server's clock in these tests: mid-April 2025, so that March 2025 is a closed billing period.
NOW = datetime(2025, 4, 17, 12, tzinfo=UTC)
GB = 10**9


def usage_options() -> UsageOptions:
    # No timers: the tests flush and run the meter themselves, at the moment they choose.
    return UsageOptions(flush_interval=None, meter_interval=None)


@pytest.fixture(name="usage_api")
async def usage_api_fixture(
    webhook_settings: Settings, kubeconfig: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    """The webhook server on a loopback port at a fixed time; rate limits out of the way of the races."""
    api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    unlimited = RateLimit(per_second=1e6, burst=1_000_000)
    app = create_app(
        webhook_settings,
        kube=api_client,
        clock=lambda: NOW,
        options=ServerOptions(license_wait=0, rate_per_address=unlimited, rate_per_key=unlimited),
        usage=usage_options(),
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        api_client.close()


@pytest.fixture(name="tenant")
def tenant_fixture(customers: Customers) -> Iterator[tuple[str, str]]:
    """A Customer of its own for the test: (resource name, customer id)."""
    name = unique_name("usage")
    customer_id = customer_id_for(name)
    customers.create(name, customerId=customer_id, plan="starter")
    try:
        yield name, customer_id
    finally:
        customers.delete(name)


def report(
    customer_id: str,
    report_id: str,
    *,
    start: datetime = NOW - timedelta(hours=2),
    hours: float = 1,
    instance_id: str = "prod-1",
    **counters: Any,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "customer_id": customer_id,
        "instance_id": instance_id,
        "report_id": report_id,
        "period_start": start.isoformat(),
        "period_end": (start + timedelta(hours=hours)).isoformat(),
        "active_devices": 5,
        "total_devices": 6,
        "mqtt_messages_published": 10,
        "mqtt_messages_received": 20,
        "mqtt_bytes_sent": 1000,
        "mqtt_bytes_received": 2000,
        "http_requests": 3,
        "http_bytes_sent": 300,
        "http_bytes_received": 400,
        "postgres_size_mb": 125.5,
        "postgres_row_count": 1000,
    }
    values.update(counters)
    return values


async def post(
    client: TestClient[Any, Any], body: Any, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    response = await client.post("/api/usage/report", json=body, headers=headers)
    return response.status, await response.json()


async def stored(engine: AsyncEngine, customer_id: str) -> tuple[int, int, int]:
    """(rows, distinct report ids, sum of mqtt_bytes_sent) of the customer's stored reports."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT count(*), count(DISTINCT (instance_id, report_id)),"
                    " coalesce(sum(mqtt_bytes_sent), 0) FROM usage_reports WHERE customer_id = :customer_id"
                ),
                {"customer_id": customer_id},
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


async def test_the_same_report_sent_again_is_stored_once(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    customer_id = customer_id_for(unique_name("again"))
    key = await add_usage_key(db_engine, customer_id)
    headers = {"X-API-Key": key}
    body = report(customer_id, "r-1", mqtt_bytes_sent=777)
    assert await post(usage_api, body, headers) == (202, {"accepted": 1, "duplicate": 0})
    assert await post(usage_api, body, headers) == (202, {"accepted": 0, "duplicate": 1})
    # The same report id from another instance of the customer is another report.
    assert await post(usage_api, {**body, "instance_id": "prod-2"}, headers) == (
        202,
        {"accepted": 1, "duplicate": 0},
    )
    assert await stored(db_engine, customer_id) == (2, 2, 777 * 2)


async def test_a_server_on_the_real_clock_beside_these_tests_keeps_their_months(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine, webhook_settings: Settings, kubeconfig: Path
) -> None:
    """Found in CI: another test's server on the session database, its clock the real one, ran its
    partition run at start and dropped this module's April 2025 (past 13 months of today) under a test."""
    customer_id = customer_id_for(unique_name("kept"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    assert await post(usage_api, report(customer_id, "r-1"), headers) == (
        202,
        {"accepted": 1, "duplicate": 0},
    )
    async with running_app(webhook_settings, kubeconfig) as beside:

        async def run_once_the_start_run_is_done() -> PartitionRun | None:
            # The run at start holds the partition lock meanwhile (a run then is skipped).
            run = await beside.app[USAGE].maintain_partitions()
            return None if run.skipped else run

        run = await eventually(run_once_the_start_run_is_done, within=30, message="a partition run")
    assert run.dropped == () and run.deleted == 0
    assert await stored(db_engine, customer_id) == (1, 1, 1000)


async def test_a_partly_repeated_batch_stores_only_the_new_reports(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    customer_id = customer_id_for(unique_name("partly"))
    headers = {"Authorization": f"Bearer {await add_usage_key(db_engine, customer_id)}"}  # bearer works too
    first = [report(customer_id, f"r-{i}", mqtt_bytes_sent=i) for i in range(0, 600)]
    second = [report(customer_id, f"r-{i}", mqtt_bytes_sent=i) for i in range(400, 1000)]
    assert await post(usage_api, {"reports": first}, headers) == (202, {"accepted": 600, "duplicate": 0})
    assert await post(usage_api, {"reports": second}, headers) == (202, {"accepted": 400, "duplicate": 200})
    # A report twice inside one batch is one report too.
    twice = [report(customer_id, "r-x", mqtt_bytes_sent=5)] * 2
    assert await post(usage_api, {"reports": twice}, headers) == (202, {"accepted": 1, "duplicate": 1})
    assert await stored(db_engine, customer_id) == (1001, 1001, sum(range(1000)) + 5)


TB = 10**12


async def test_a_report_sent_again_with_other_numbers_is_a_409_naming_them_and_the_stored_one_stays(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: a report sent again under its report_id with other numbers (10 GB for the 10 TB
    of a unit bug) answered {"accepted": 0, "duplicate": 1}, a success, and the 10 TB stayed billed."""
    customer_id = customer_id_for(unique_name("differs"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    wrong = report(customer_id, "r-1", mqtt_bytes_sent=10 * TB)
    assert await post(usage_api, wrong, headers) == (202, {"accepted": 1, "duplicate": 0})
    corrected = {**wrong, "mqtt_bytes_sent": 10 * GB, "active_devices": 4}
    status, answer = await post(usage_api, corrected, headers)
    assert status == 409 and answer["error"] == "Report differs from the one stored"
    assert [(d["field"], d["stored"], d["sent"]) for d in answer["details"]] == [
        ("active_devices", 5, 4),
        ("mqtt_bytes_sent", 10 * TB, 10 * GB),
    ]
    assert "mqtt_bytes_sent: sent 10000000000, but the report stored" in answer["message"]
    # The same report again, its size as the column keeps it (125.5 stored as 125.500), is a duplicate.
    assert await post(usage_api, {**wrong, "postgres_size_mb": 125.5001}, headers) == (
        202,
        {"accepted": 0, "duplicate": 1},
    )
    assert await stored(db_engine, customer_id) == (1, 1, 10 * TB)


async def test_a_batch_holding_a_report_sent_again_with_other_numbers_is_refused_whole(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: a batch re-sending a stored report with other numbers stored its new reports and
    counted the changed one a duplicate; like any bad report of a batch, it now refuses the batch."""
    customer_id = customer_id_for(unique_name("differs-batch"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    first = [report(customer_id, f"r-{i}", mqtt_bytes_sent=i) for i in range(3)]
    assert await post(usage_api, {"reports": first}, headers) == (202, {"accepted": 3, "duplicate": 0})
    later = (NOW - timedelta(hours=1, minutes=30)).isoformat()
    again = [
        report(customer_id, "r-new"),
        first[0],
        {**first[1], "http_requests": 4, "period_end": later},
        *(report(customer_id, f"r-new-{i}") for i in range(100)),
    ]
    status, answer = await post(usage_api, {"reports": again}, headers)
    assert status == 409
    assert [d["field"] for d in answer["details"]] == ["reports[2].period_end", "reports[2].http_requests"]
    assert answer["details"][0]["stored"] == (NOW - timedelta(hours=1)).isoformat()
    # A report twice in one batch with other numbers is refused too, naming the second.
    twice = [report(customer_id, "r-x", mqtt_bytes_sent=5), report(customer_id, "r-x", mqtt_bytes_sent=6)]
    status, answer = await post(usage_api, {"reports": twice}, headers)
    assert status == 409 and [(d["field"], d["stored"], d["sent"]) for d in answer["details"]] == [
        ("reports[1].mqtt_bytes_sent", 5, 6)
    ]
    assert "reports[0].report_id is the same report" in answer["details"][0]["message"]
    assert await stored(db_engine, customer_id) == (3, 3, 0 + 1 + 2)
    # The batch sent again as stored is accepted: its new reports stored, the others duplicates.
    again[2] = first[1]
    assert await post(usage_api, {"reports": again}, headers) == (202, {"accepted": 101, "duplicate": 2})


async def test_a_report_stored_by_a_racing_request_is_compared_once_that_one_commits(
    webhook_settings: Settings, db_engine: AsyncEngine
) -> None:
    """Found in review: the insert's comparison reads the statement's snapshot, which does not hold a
    report another transaction committed while the insert waited for its row lock; compared again."""
    customer_id = customer_id_for(unique_name("differs-race"))
    assert webhook_settings.database_url is not None
    pool = await store.open_pool(webhook_settings.database_url, max_size=1)
    # Connected before the race: a backend that starts while the holder's insert is open waits for it.
    async with pool.acquire():
        pass
    holder = await asyncpg.connect(plain_url(webhook_settings.database_url))
    try:
        parsed = parse_reports(json.dumps(report(customer_id, "r-1", mqtt_bytes_sent=10 * TB)).encode())
        held = holder.transaction()
        await held.start()
        await holder.fetchval(store.INSERT_REPORT, *report_rows(parsed.reports)[0])
        corrected = parse_reports(json.dumps(report(customer_id, "r-1", mqtt_bytes_sent=10 * GB)).encode())
        racing = asyncio.create_task(store.insert_reports(pool, report_rows(corrected.reports)))

        async def waiting_for_the_row_lock() -> bool:
            # Done already: the assertions below say how.
            return racing.done() or bool(
                await holder.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%INSERT INTO usage_reports%' AND pid <> pg_backend_pid()"
                )
            )

        await eventually(waiting_for_the_row_lock, within=10, message="the racing insert waits")
        await held.commit()
        with pytest.raises(ResentReportsDiffer) as differing:
            await racing
        assert [(d.column, d.stored, d.sent) for d in differing.value.differences] == [
            ("mqtt_bytes_sent", 10 * TB, 10 * GB)
        ]
    finally:
        await holder.close()
        await pool.close()
    assert await stored(db_engine, customer_id) == (1, 1, 10 * TB)


async def test_racing_reporters_count_every_report_once(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    customer_id = customer_id_for(unique_name("race"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    shuffler = random.Random(6)  # noqa: S311 - an order for a test, not a secret
    batches = []
    for index in range(40):
        # Overlapping windows of ids, each batch in its own order: rows are locked in key order
        # whatever order a batch comes in, so overlapping batches wait for each other, never deadlock.
        batch = [
            report(customer_id, f"r-{i:04d}", mqtt_bytes_sent=i) for i in range(index * 10, index * 10 + 50)
        ]
        shuffler.shuffle(batch)
        batches.append({"reports": batch})
    # And one single report sent by 20 reporters at once.
    singles = [report(customer_id, "r-single", mqtt_bytes_sent=100_000)] * 20
    answers = await asyncio.gather(
        *(post(usage_api, body, headers) for body in [*batches, *singles]),
    )
    assert {status for status, _ in answers} == {202}
    distinct = 39 * 10 + 50  # ids 0..439
    assert sum(answer["accepted"] for _, answer in answers) == distinct + 1
    assert sum(answer["duplicate"] for _, answer in answers) == 40 * 50 + 20 - distinct - 1
    assert await stored(db_engine, customer_id) == (
        distinct + 1,
        distinct + 1,
        sum(range(distinct)) + 100_000,
    )


async def test_a_single_report_on_a_pool_with_no_free_connection_is_a_503_within_the_wait(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a single report took its pooled connection with no limit on the wait (batches
    and reads wait 5 s), so under a busy pool reports queued for ever instead of a 503 to retry."""
    customer_id = customer_id_for(unique_name("busy"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    # The key is cached: the busy pool meets only the report's insert.
    assert await post(usage_api, report(customer_id, "r-0"), headers) == (
        202,
        {"accepted": 1, "duplicate": 0},
    )
    usage = usage_api.app[USAGE]
    monkeypatch.setattr(db_pool, "POOL_WAIT_SECONDS", 0.3)  # its 5 s, shortened
    async with contextlib.AsyncExitStack() as held:
        for _ in range(usage.options.pool_size):
            await held.enter_async_context(usage.pool.acquire())
        started = time.monotonic()
        status, answer = await asyncio.wait_for(post(usage_api, report(customer_id, "r-1"), headers), 15)
        waited = time.monotonic() - started
    assert status == 503 and answer["error"] == "Database unavailable"
    assert 0.3 <= waited < 2  # the pool's wait (db.pool.connection), not 5 s nor for ever
    assert await post(usage_api, report(customer_id, "r-1"), headers) == (
        202,
        {"accepted": 1, "duplicate": 0},
    )


async def test_a_usage_key_reports_and_reads_only_for_its_own_customer(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine, tenant: tuple[str, str]
) -> None:
    _, customer_id = tenant
    other = customer_id_for(unique_name("other"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    batch = [report(customer_id, f"r-{i}") for i in range(8)]
    batch[5] = report(other, "r-5")
    status, answer = await post(usage_api, {"reports": batch}, headers)
    assert status == 403 and answer["error"] == "Forbidden"
    assert answer["details"] == {"index": 5, "field": "reports[5].customer_id"}
    assert await stored(db_engine, customer_id) == (0, 0, 0)  # nothing of the batch
    status, answer = await post(usage_api, report(other, "r-1"), headers)
    assert status == 403 and answer["details"]["field"] == "customer_id"
    assert (await usage_api.get(f"/api/usage/{other}", headers=headers)).status == 403
    assert (await usage_api.get(f"/api/usage/{customer_id}", headers=headers)).status == 200
    # The admin token reports and reads for anyone; an unknown key for no one.
    assert (await post(usage_api, report(other, "r-admin"), admin_headers()))[0] == 202
    assert (await post(usage_api, report(customer_id, "r-2"), {"X-API-Key": "iuk_unknown"}))[0] == 401
    assert (await post(usage_api, report(customer_id, "r-2"), {}))[0] == 401
    assert await stored(db_engine, other) == (1, 1, 1000)


async def test_validation_names_the_field_and_writes_nothing(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    customer_id = customer_id_for(unique_name("invalid"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    batch = [report(customer_id, f"r-{i}") for i in range(10)]
    batch[3]["active_devices"] = -4
    status, answer = await post(usage_api, {"reports": batch}, headers)
    assert status == 400 and answer["error"] == "Validation failed"
    assert answer["details"] == [
        {
            "field": "reports[3].active_devices",
            "message": "Input should be greater than or equal to 0",
            "type": "greater_than_equal",
        }
    ]
    assert answer["message"] == "reports[3].active_devices: Input should be greater than or equal to 0"
    future = report(customer_id, "r-future", start=NOW, hours=2)
    status, answer = await post(usage_api, {"reports": [batch[0], future]}, headers)
    assert status == 400 and [d["field"] for d in answer["details"]] == ["reports[1].period_end"]
    status, answer = await post(usage_api, {**batch[0], "surprise": 1}, headers)
    assert status == 400 and answer["details"][0] == {
        "field": "surprise",
        "message": "unknown field",
        "type": "extra_forbidden",
    }
    response = await usage_api.post("/api/usage/report", data=b"{oops", headers=headers)
    assert response.status == 400 and (await response.json())["details"][0]["field"] == "body"
    assert await stored(db_engine, customer_id) == (0, 0, 0)


async def test_a_report_older_than_the_raw_reports_kept_is_refused_naming_the_field(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: a report of a month the retention had dropped (the server's partition run at
    start drops those before NOW's 13 months) went into the default partition, was answered 202
    {"accepted": 1}, and was deleted by the next partition run: lost, and "accepted" again when sent
    again."""
    customer_id = customer_id_for(unique_name("retired"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    old = report(customer_id, "old", start=datetime(2023, 6, 10, tzinfo=UTC))
    for body, field in (
        (old, "period_start"),
        ({"reports": [report(customer_id, "recent"), old]}, "reports[1].period_start"),
    ):
        status, answer = await post(usage_api, body, headers)
        assert status == 400, answer
        (problem,) = answer["details"]
        assert (problem["field"], problem["type"]) == (field, "period_past_retention")
        assert problem["message"].startswith(
            "is older than the raw reports kept (USAGE_RAW_RETENTION, 13 months): reports that start before "
        )
    assert await stored(db_engine, customer_id) == (0, 0, 0)
    # 13 months before NOW is March 17, 2024, 12:00: a report from then on is kept.
    kept = report(customer_id, "kept", start=datetime(2024, 3, 17, 12, tzinfo=UTC))
    assert await post(usage_api, kept, headers) == (202, {"accepted": 1, "duplicate": 0})


async def test_an_oversized_body_is_413_and_writes_nothing(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    customer_id = customer_id_for(unique_name("large"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id), "Content-Type": "application/json"}
    # A valid batch of 1,000 reports with long ids fits (about 0.6 MB)...
    fits = [report(customer_id, f"r-{i:04d}-" + "x" * 80, instance_id="i" * 100) for i in range(1000)]
    assert await post(usage_api, {"reports": fits}, headers) == (202, {"accepted": 1000, "duplicate": 0})
    # ...and 2 MiB does not, announced by Content-Length or streamed in chunks without one.
    huge = json.dumps({"reports": [report(customer_id, "r-big", padding="x" * (3 * 1024 * 1024))]}).encode()
    response = await usage_api.post("/api/usage/report", data=huge, headers=headers)
    assert response.status == 413 and (await response.json())["error"] == "Payload too large"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(huge), 64 * 1024):
            yield huge[start : start + 64 * 1024]

    response = await usage_api.post("/api/usage/report", data=chunks(), headers=headers)
    assert response.status == 413
    # Compressed, the batch that fits is read whole (it inflates past the app's own limit), and the
    # 3 MiB that inflate from a few KB are refused.
    gzipped = {**headers, "Content-Encoding": "gzip"}
    batch = gzip.compress(json.dumps({"reports": fits}).encode())
    response = await usage_api.post("/api/usage/report", data=batch, headers=gzipped)
    assert (response.status, await response.json()) == (202, {"accepted": 0, "duplicate": 1000})
    bomb = gzip.compress(huge)
    assert len(bomb) < 64 * 1024
    response = await usage_api.post("/api/usage/report", data=bomb, headers=gzipped)
    assert response.status == 413
    assert await stored(db_engine, customer_id) == (1000, 1000, 1000 * 1000)


async def test_usage_history_lists_reports_days_and_the_billing_period(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine, tenant: tuple[str, str]
) -> None:
    _, customer_id = tenant
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    day = datetime(2025, 4, 15, tzinfo=UTC)
    reports = [
        report(
            customer_id, "a", start=day, hours=6, active_devices=4, mqtt_bytes_sent=GB, postgres_size_mb=10
        ),
        report(
            customer_id, "b", start=day + timedelta(hours=6), hours=6, active_devices=9, postgres_size_mb=12
        ),
        report(customer_id, "c", start=day + timedelta(days=1), hours=6, active_devices=13, http_requests=7),
        # Older than the 3-day window below, but in this billing period (April 2025).
        report(customer_id, "d", start=datetime(2025, 4, 2, tzinfo=UTC), hours=1, active_devices=2),
        # A float as JavaScript sums it: the column rounds it to the thousandth.
        report(customer_id, "e", start=day + timedelta(days=1, hours=7), hours=1, postgres_size_mb=0.1 + 0.2),
    ]
    assert (await post(usage_api, {"reports": reports}, headers))[0] == 202
    response = await usage_api.get(f"/api/usage/{customer_id}?days=3", headers=headers)
    assert response.status == 200
    history = await response.json()
    assert history["window_start"] == "2025-04-15T00:00:00Z" and history["report_count"] == 4
    assert [r["report_id"] for r in history["reports"]] == ["e", "c", "b", "a"]
    assert history["reports"][0]["postgres_size_mb"] == "0.300"
    assert history["reports"][1]["postgres_size_mb"] == "125.500"
    assert [d["date"] for d in history["daily"]] == ["2025-04-15", "2025-04-16", "2025-04-17"]
    first, second, today = history["daily"]
    assert first["reports"] == 2 and first["peak_active_devices"] == 9
    assert first["mqtt_bytes"] == GB + 2000 + 1000 + 2000 and first["postgres_size_mb"] == "12.000"
    assert (
        second["http_requests"] == 7 + 3
        and second["postgres_size_mb"] == "0.300"
        and today
        == {
            "date": "2025-04-17",
            "reports": 0,
            "peak_active_devices": 0,
            "mqtt_messages": 0,
            "mqtt_bytes": 0,
            "http_requests": 0,
            "http_bytes": 0,
            "postgres_size_mb": None,
            "device_hours": "0.000",
        }
    )
    period = history["billing_period"]
    assert (period["plan"], period["period_start"], period["period_end"]) == (
        "starter",
        "2025-04-01T00:00:00Z",
        "2025-05-01T00:00:00Z",
    )
    assert period["totals"]["reports"] == 5 and period["totals"]["peak_devices"] == 13
    assert period["included"] == {"devices": 10, "traffic_gb": 10, "storage_gb": 5, "api_calls": 100_000}
    # 13 devices on a 10-device plan: 3 over at $2.
    assert period["overage"]["lines"] == [
        {"metric": "devices", "quantity": "3", "unit_price": "2.00", "per": 1, "amount": "6.00"}
    ]
    assert period["overage"]["total"] == "6.00" and period["within_limits"] is False
    assert period["exceeded"] == ["devices (peak 13, 10 included)"]
    assert (await usage_api.get(f"/api/usage/{customer_id}?days=0", headers=headers)).status == 400
    assert (await usage_api.get(f"/api/usage/{customer_id}?days=367", headers=headers)).status == 400
    missing = customer_id_for(unique_name("nobody"))
    assert (await usage_api.get(f"/api/usage/{missing}", headers=admin_headers())).status == 404


async def test_usage_history_pages_list_every_report_of_the_window_once_newest_first(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine, tenant: tuple[str, str]
) -> None:
    """Four reports end at each of three times (four instances, of different lengths): pages of 1, 3
    and 5 split those ties, and a walk lists what one page of all lists, in its order."""
    _, customer_id = tenant
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    day = datetime(2025, 4, 16, tzinfo=UTC)
    reports = [
        report(
            customer_id,
            f"r-{end}h-{instance}",
            instance_id=f"prod-{instance}",
            start=day + timedelta(hours=end - hours),
            hours=hours,
        )
        for end in (3, 6, 9)
        for instance, hours in ((1, 1), (2, 2), (3, 3), (4, 0.5))
    ]
    # Before the 2-day window: on no page.
    reports.append(report(customer_id, "r-older", start=datetime(2025, 4, 10, tzinfo=UTC)))
    assert await post(usage_api, {"reports": reports}, headers) == (202, {"accepted": 13, "duplicate": 0})

    async def page(**params: Any) -> dict[str, Any]:
        response = await usage_api.get(
            f"/api/usage/{customer_id}", params={"days": 2, **params}, headers=headers
        )
        assert response.status == 200, await response.text()
        history: dict[str, Any] = await response.json()
        return history

    everything = await page()
    whole = [listed["report_id"] for listed in everything["reports"]]
    assert sorted(whole) == sorted(sent["report_id"] for sent in reports[:-1])
    ends = [listed["period_end"] for listed in everything["reports"]]
    assert ends == sorted(ends, reverse=True)
    assert (everything["reports_truncated"], everything["reports_next_cursor"]) == (False, None)
    for limit in (1, 3, 5):
        walked: list[str] = []
        history = await page(reports_limit=limit)
        while True:
            assert len(history["reports"]) == min(limit, 12 - len(walked))
            # The whole window's numbers on every page.
            assert history["report_count"] == 12 and history["daily"] == everything["daily"]
            assert history["billing_period"] == everything["billing_period"]
            walked += [listed["report_id"] for listed in history["reports"]]
            cursor = history["reports_next_cursor"]
            assert history["reports_truncated"] is (cursor is not None)
            if cursor is None:
                break
            history = await page(reports_limit=limit, reports_before=cursor)
        assert walked == whole, limit
    # A report stored during a walk moves no report of the pages after (as an offset would).
    first = await page(reports_limit=4)
    late = report(customer_id, "r-late", start=day + timedelta(hours=9), hours=1)
    assert await post(usage_api, late, headers) == (202, {"accepted": 1, "duplicate": 0})
    rest = await page(reports_before=first["reports_next_cursor"])
    assert [listed["report_id"] for listed in first["reports"] + rest["reports"]] == whole
    assert (await page(reports_limit=1))["reports"][0]["report_id"] == "r-late"


async def test_a_reports_cursor_no_answer_gave_is_a_400_naming_it(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine, tenant: tuple[str, str]
) -> None:
    _, customer_id = tenant
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    message = "must be the reports_next_cursor of an earlier answer"
    for made_up in (
        "not-a-cursor",
        "a+b/c==",  # base64, not base64url
        "",
        base64.urlsafe_b64encode(b"2025-04-17T12:00:00,7").decode(),  # a time without its zone
        base64.urlsafe_b64encode(b"2025-04-17T12:00:00+00:00,9223372036854775808").decode(),  # past bigint
    ):
        response = await usage_api.get(
            f"/api/usage/{customer_id}", params={"reports_before": made_up}, headers=headers
        )
        assert response.status == 400, made_up
        assert await response.json() == {
            "error": "Validation failed",
            "message": f"reports_before: {message}",
            "details": [{"field": "reports_before", "message": message, "type": "reports_cursor"}],
        }, made_up
    for limit in ("0", "501"):
        response = await usage_api.get(
            f"/api/usage/{customer_id}", params={"reports_limit": limit}, headers=headers
        )
        assert response.status == 400 and (await response.json())["details"][0]["field"] == "reports_limit"


@pytest.fixture(name="own_postgres")
def own_postgres_fixture(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL of this test's own, so that stopping it disturbs no other test."""
    server = EmbeddedPostgres(tmp_path / "pg").start()
    try:
        url = server.create_database("usage_outage")
        migrate.upgrade(url)
        yield server, url
    finally:
        server.stop()


async def test_postgres_down_is_503_and_the_retry_is_stored_once(
    own_postgres: tuple[EmbeddedPostgres, str],
    stripe_mock: StripeMock,
    license_keys: tuple[Path, Path],
    kubeconfig: Path,
) -> None:
    server, url = own_postgres
    settings = make_settings(url, stripe_mock, license_keys)
    customer_id = customer_id_for(unique_name("outage"))
    engine = create_engine(url)
    try:
        key = await add_usage_key(engine, customer_id)
        api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        app = create_app(settings, kube=api_client, clock=lambda: NOW, usage=usage_options())
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            headers = {"X-API-Key": key}
            # The key is cached and the pool holds a connection: both must cope with the loss.
            assert await post(client, report(customer_id, "r-0"), headers) == (
                202,
                {"accepted": 1, "duplicate": 0},
            )
            server.stop()
            status, answer = await post(client, report(customer_id, "r-1"), headers)
            assert status == 503 and answer["error"] == "Database unavailable"
            status, _ = await post(client, report(customer_id, "r-1"), headers)
            assert status == 503
            restarted = EmbeddedPostgres(server.data_dir, port=server.port).start()
            try:
                # The instance retries the same report: stored once, whatever happened before.
                assert await post(client, report(customer_id, "r-1"), headers) == (
                    202,
                    {"accepted": 1, "duplicate": 0},
                )
                assert await post(client, report(customer_id, "r-1"), headers) == (
                    202,
                    {"accepted": 0, "duplicate": 1},
                )
                assert await stored(engine, customer_id) == (2, 2, 2000)
            finally:
                await engine.dispose()
                restarted.stop()
        finally:
            await client.close()
            api_client.close()
    finally:
        await engine.dispose()


async def test_usage_counts_reach_the_metrics(
    usage_api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    customer_id = customer_id_for(unique_name("metrics"))
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    body = {"reports": [report(customer_id, "m-1"), report(customer_id, "m-2")]}
    assert await post(usage_api, body, headers) == (202, {"accepted": 2, "duplicate": 0})
    assert await post(usage_api, body, headers) == (202, {"accepted": 0, "duplicate": 2})
    exposition = await (await usage_api.get("/metrics")).text()
    assert 'iotistic_usage_reports_total{result="accepted"} 2.0' in exposition
    assert 'iotistic_usage_reports_total{result="duplicate"} 2.0' in exposition


async def test_device_usage_crossing_80_then_100_percent_notices_twice_and_replays_none(
    usage_api: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """A starter plan includes 10 devices; an absolute threshold of 9 the Customer set notices too."""
    name = unique_name("quota")
    customer_id = customer_id_for(name)
    customers.create(
        name,
        customerId=customer_id,
        plan="starter",
        notifications={"usageThresholds": [{"metric": "devices", "value": 9}]},
    )
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    usage = usage_api.app[USAGE]

    async def kinds() -> list[tuple[str, str]]:
        async with db_engine.connect() as connection:
            rows = await connection.execute(
                select(Notice.key, Notice.subject)
                .where(Notice.customer_id == customer_id)
                .order_by(Notice.id)
            )
            # usage:<customer>:<period>:<metric>:<threshold>:<limit>
            return [(key.split(":")[4], subject) for key, subject in rows]

    first = [report(customer_id, "r-8", active_devices=8)]
    assert (await post(usage_api, {"reports": first}, headers))[0] == 202
    await usage.flush()
    assert await kinds() == [("80%", "Iotistic usage: devices reached 80%")]
    second = [report(customer_id, "r-10", start=NOW - timedelta(hours=1), active_devices=10)]
    assert (await post(usage_api, {"reports": second}, headers))[0] == 202
    await usage.flush()
    assert [threshold for threshold, _ in await kinds()] == ["80%", "100%", "9"]
    for _ in range(2):  # the same reports again: stored once, noticed once
        await post(usage_api, {"reports": first + second}, headers)
        await usage.flush()
    assert [threshold for threshold, _ in await kinds()] == ["80%", "100%", "9"]


async def test_device_hours_are_active_devices_times_hours_in_the_api_and_the_cli(
    usage_api: TestClient[Any, Any], tenant: tuple[str, str], db_engine: AsyncEngine, database_url: str
) -> None:
    _, customer_id = tenant
    headers = {"X-API-Key": await add_usage_key(db_engine, customer_id)}
    reports = [
        report(customer_id, "dh-1", start=NOW - timedelta(hours=4), hours=1, active_devices=5),
        report(customer_id, "dh-2", start=NOW - timedelta(hours=3), hours=2, active_devices=8),
    ]
    assert (await post(usage_api, {"reports": reports}, headers))[0] == 202
    response = await usage_api.get(f"/api/usage/{customer_id}?days=1", headers=admin_headers())
    history = await response.json()
    assert [day["device_hours"] for day in history["daily"]] == ["21.000"]  # 5 x 1 h + 8 x 2 h
    assert history["billing_period"]["totals"]["device_hours"] == "21.000"
    listed = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "iotistic_billing.cli",
            "usage",
            "--customer",
            customer_id,
            "--days",
            "1",
            "--until",
            NOW.date().isoformat(),
            "-o",
            "json",
        ],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        check=True,
    )
    assert [day["deviceHours"] for day in json.loads(listed.stdout)["days"]] == ["21.000"]
    # A mistyped id is said (found in review: an empty report, exit 0, as for a customer without usage).
    mistyped = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "iotistic_billing.cli", "usage", "--customer", customer_id + "x"],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
    )
    assert (mistyped.returncode, mistyped.stdout) == (2, "")
    assert mistyped.stderr.strip().endswith(
        f"error: --customer: no customer with the id or name {customer_id}x"
    )
