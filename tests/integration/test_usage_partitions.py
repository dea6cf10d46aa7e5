"""usage_reports partitioned by month: migration 0007 moves an existing table over without losing a
row (and back), partitions are made ahead by the usage service, and the raw retention drops whole
months, never one holding a billing period still open, never a rollup. Each test has a database of
its own (the partitions are the database's); `now` is always given."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine, plain_url, session_factory
from iotistic_billing.db.pool import Pool, connection
from iotistic_billing.directory import Directory
from iotistic_billing.k8s import Kube
from iotistic_billing.usage.metrics import UsageMetrics
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.partitions import (
    create_partition,
    kept_since,
    maintain_partitions,
    month_of,
    partition_name,
)
from iotistic_billing.usage.periods import BillingPeriod, shift_months
from iotistic_billing.usage.reports import UsageReport, earliest_start_reaching, report_rows
from iotistic_billing.usage.service import UsageMetering
from iotistic_billing.usage.store import PERIOD_SAMPLES, PERIOD_SUMS, insert_reports, open_pool
from tests.conftest import eventually

pytestmark = pytest.mark.integration

# Every column of the table, id and reported_at included: what "the same rows" means below.
ALL_COLUMNS = (
    "id, customer_id, instance_id, report_id, period_start, period_end, active_devices, total_devices,"
    " mqtt_messages_published, mqtt_messages_received, mqtt_bytes_sent, mqtt_bytes_received, http_requests,"
    " http_bytes_sent, http_bytes_received, postgres_size_mb, postgres_row_count, reported_at"
)
NOW = datetime(2026, 12, 3, 13, 30, tzinfo=UTC)


def month(year: int, number: int) -> datetime:
    return datetime(year, number, 1, tzinfo=UTC)


def report(
    customer_id: str, report_id: str, start: datetime, instance_id: str = "prod-1", **counters: Any
) -> UsageReport:
    return UsageReport(
        customer_id=customer_id,
        instance_id=instance_id,
        report_id=report_id,
        period_start=start,
        period_end=start + timedelta(hours=1),
        active_devices=counters.pop("active_devices", 3),
        total_devices=4,
        **counters,
    )


async def new_database(postgres: EmbeddedPostgres, revision: str = "head") -> str:
    url = postgres.create_database(f"partitions_{uuid.uuid4().hex[:10]}")
    await migrated(url, revision)
    return url


async def migrated(url: str, revision: str = "head", *, down: bool = False) -> None:
    # Alembic runs its own event loop (db/migrations/env.py): in a thread of its own.
    await asyncio.to_thread(migrate.downgrade if down else migrate.upgrade, url, revision)


@pytest.fixture(name="pool")
async def pool_fixture(postgres: EmbeddedPostgres) -> AsyncIterator[Pool]:
    pool = await open_pool(await new_database(postgres))
    try:
        yield pool
    finally:
        await pool.close()


async def snapshot(url: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = await conn.fetch(f"SELECT {ALL_COLUMNS} FROM usage_reports ORDER BY id")  # noqa: S608
        return [tuple(row) for row in rows]
    finally:
        await conn.close()


async def partitions(conn: Any) -> dict[str, str]:
    """partition name -> its bound, as PostgreSQL prints it."""
    rows = await conn.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'usage_reports'::regclass"
    )
    return {row["relname"]: row["bound"] for row in rows}


async def where_each_row_is(conn: Any) -> dict[str, str]:
    """report id -> the partition that holds it."""
    rows = await conn.fetch("SELECT report_id, tableoid::regclass::text AS partition FROM usage_reports")
    return {row["report_id"]: row["partition"] for row in rows}


async def fill_version_0006(url: str) -> None:
    """Reports as 0006 stored them: several customers, months (one in 2001), and the current month."""
    this_month = month_of(datetime.now(UTC))
    starts = [
        datetime(2001, 5, 5, tzinfo=UTC),
        month(2025, 1),
        month(2025, 2) + timedelta(days=27),
        this_month,
    ]
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = [
            (
                f"cust_migrated{customer}",
                f"inst-{instance}",
                f"r-{index}",
                start + timedelta(hours=index),
                start + timedelta(hours=index + 1),
                index % 7,
                10,
                index,
                index * 2,
                index * 3,
                index * 4,
                index * 5,
                index * 6,
                index * 7,
                f"{index}.{index % 1000:03d}",
                index * 9,
            )
            for customer in range(3)
            for instance in range(2)
            for index, start in enumerate(starts * 25)
        ]
        await conn.executemany(
            "INSERT INTO usage_reports (customer_id, instance_id, report_id, period_start, period_end,"
            " active_devices, total_devices, mqtt_messages_published, mqtt_messages_received,"
            " mqtt_bytes_sent, mqtt_bytes_received, http_requests, http_bytes_sent, http_bytes_received,"
            " postgres_size_mb, postgres_row_count)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::numeric, $16)",
            rows,
        )
    finally:
        await conn.close()


async def test_the_partition_migration_keeps_every_row_up_down_and_up_again(
    postgres: EmbeddedPostgres,
) -> None:
    url = await new_database(postgres, "0006")
    await fill_version_0006(url)
    before = await snapshot(url)
    assert len(before) == 3 * 2 * 100

    await migrated(url, "0007")  # the revision under test; later ones have downgrades of their own
    assert await snapshot(url) == before
    conn = await asyncpg.connect(plain_url(url))
    try:
        made = await partitions(conn)
        this_month = month_of(datetime.now(UTC))
        # A partition per month that held rows, this month and the next two, and the default one.
        assert set(made) == {
            "usage_reports_2001_05",
            "usage_reports_2025_01",
            "usage_reports_2025_02",
            "usage_reports_2025_03",  # Feb 28 + up to 99 hours
            *(partition_name(shift_months(this_month, ahead)) for ahead in range(3)),
            "usage_reports_default",
        }
        assert made["usage_reports_2025_02"] == (
            "FOR VALUES FROM ('2025-02-01 00:00:00+00') TO ('2025-03-01 00:00:00+00')"
        )
        placed = await conn.fetch(
            "SELECT DISTINCT tableoid::regclass::text AS partition,"
            " to_char(period_start AT TIME ZONE 'UTC', 'YYYY_MM') AS month FROM usage_reports"
        )
        assert all(row["partition"] == f"usage_reports_{row['month']}" for row in placed)

        # The key holds the period start now: the same report id of another period is another report.
        pool = await open_pool(url)
        try:
            again = report("cust_migrated0", "r-0", month(2025, 4), instance_id="inst-0")
            assert await insert_reports(pool, report_rows([again])) == 1
            assert await insert_reports(pool, report_rows([again])) == 0
        finally:
            await pool.close()
        # The id sequence went along: new rows come after the old ones.
        assert await conn.fetchval("SELECT max(id) FROM usage_reports") == before[-1][0] + 1
    finally:
        await conn.close()

    # 0006's key holds (customer, instance, report id) once: the downgrade refuses to discard the
    # later report of r-0, changing nothing, until it is deleted on purpose.
    with pytest.raises(RuntimeError, match=r"1 usage reports repeat the .* discard them. Nothing changed"):
        await migrated(url, "0006", down=True)
    conn = await asyncpg.connect(plain_url(url))
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == "0007"
        assert len(await snapshot(url)) == len(before) + 1
        await conn.execute("DELETE FROM usage_reports WHERE period_start = $1", month(2025, 4))
    finally:
        await conn.close()
    await migrated(url, "0006", down=True)
    assert await snapshot(url) == before
    conn = await asyncpg.connect(plain_url(url))
    try:
        assert (
            await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'usage_reports'") == "r"
        )
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_class WHERE relname LIKE 'usage_reports_20%'") == 0
        )
    finally:
        await conn.close()

    await migrated(url)
    assert await snapshot(url) == before


async def test_retention_drops_old_months_whole_but_no_open_period_and_no_rollup(pool: Pool) -> None:
    # Sixteen months of reports, their partitions made month after month as the service makes them
    # (June 2026 was never made: its report waits in the default partition).
    months = [shift_months(month(2025, 9), offset) for offset in range(16)]
    for current in months:
        if current != month(2026, 6):
            await maintain_partitions(pool, current, ahead=0, retention_months=1200)
    reports = [report("cust_retention01", f"m-{start:%Y-%m}", start + timedelta(days=9)) for start in months]
    # Customer 02's period Oct 15 .. Nov 15, 2025 is still open (never closed), and its storage counts
    # a report of 30 days that started in September; 01's September is closed.
    reaching = report("cust_retention02", "reaching", datetime(2025, 9, 20, tzinfo=UTC))
    reports += [
        reaching.model_copy(update={"period_end": datetime(2025, 10, 20, tzinfo=UTC)}),
        report("cust_retention02", "open-1", datetime(2025, 10, 20, tzinfo=UTC)),
        report("cust_retention02", "open-2", datetime(2025, 11, 10, tzinfo=UTC)),
        report("cust_retention01", "ancient", datetime(2001, 5, 5, tzinfo=UTC)),
    ]
    assert await insert_reports(pool, report_rows(reports)) == len(reports)
    await pool.execute(
        "INSERT INTO usage_rollups (customer_id, period_start, period_end, totals, overage,"
        " overage_amount_cents, closed_at) VALUES"
        " ('cust_retention01', '2025-09-01Z', '2025-10-01Z', '{}', '{}', 0, '2025-10-01 01:00Z'),"
        " ('cust_retention02', '2025-10-15Z', '2025-11-15Z', '{}', '{}', 0, NULL)"
    )
    rollups = await pool.fetch("SELECT * FROM usage_rollups ORDER BY id")
    async with pool.acquire() as conn:
        located = await where_each_row_is(conn)
    assert located["m-2026-06"] == located["ancient"] == "usage_reports_default"

    # Dec 3, 2026, 13 months: October holds the open period's first report, and September one that
    # runs into it: both stay.
    run = await maintain_partitions(pool, NOW, ahead=2, retention_months=13)
    assert run.dropped == ()
    assert run.deleted == 1  # the default partition's report of 2001
    async with pool.acquire() as conn:
        left = await where_each_row_is(conn)
        assert set(left) == {r.report_id for r in reports} - {"ancient"}
        assert left["reaching"] == "usage_reports_2025_09"
        assert left["m-2026-06"] == "usage_reports_default"  # in the retention, kept
        made = await partitions(conn)
    # December and the two months ahead exist, whoever made them (the migration makes the months of
    # the day it runs).
    assert {"usage_reports_2026_12", "usage_reports_2027_01", "usage_reports_2027_02"} <= set(made)
    assert await pool.fetch("SELECT * FROM usage_rollups ORDER BY id") == rollups

    # Once the period is closed, September and October go; November (ends Dec 1, after Nov 3, 2025)
    # stays.
    await pool.execute("UPDATE usage_rollups SET closed_at = '2025-11-15 01:00Z' WHERE closed_at IS NULL")
    run = await maintain_partitions(pool, NOW, ahead=2, retention_months=13)
    assert (run.dropped, run.deleted) == (("usage_reports_2025_09", "usage_reports_2025_10"), 0)
    async with pool.acquire() as conn:
        left = await where_each_row_is(conn)
        made = await partitions(conn)
    assert "usage_reports_2025_09" not in made and "usage_reports_2025_10" not in made
    assert set(left) == {r.report_id for r in reports} - {
        "m-2025-09",
        "m-2025-10",
        "ancient",
        "open-1",
        "reaching",
    }
    assert left["open-2"] == "usage_reports_2025_11"
    assert await pool.fetchval("SELECT count(*) FROM usage_rollups") == 2
    # Nothing more to do at the same moment.
    assert await maintain_partitions(pool, NOW, ahead=2, retention_months=13) == type(run)()


async def test_reports_are_refused_from_where_the_partition_run_deletes_never_inside_an_open_period(
    pool: Pool,
) -> None:
    """The cutoff the report route refuses by (kept_since) is the partition run's: a report of the
    default partition before it is deleted by the run, one at it is kept; and an open billing period
    holds it back to the earliest report that can reach into the period."""
    await pool.execute(
        "INSERT INTO usage_rollups (customer_id, period_start, period_end, totals, overage,"
        " overage_amount_cents, closed_at) VALUES"
        " ('cust_keptsince1', '2025-10-15Z', '2025-11-15Z', '{}', '{}', 0, NULL)"
    )
    async with connection(pool) as conn:
        assert await kept_since(conn, NOW, 13) == datetime(2025, 9, 14, tzinfo=UTC)  # Oct 15 - 31 days
    await pool.execute("UPDATE usage_rollups SET closed_at = '2025-11-15 01:00Z'")
    async with connection(pool) as conn:
        cutoff = await kept_since(conn, NOW, 13)
    assert cutoff == datetime(2025, 11, 3, 13, 30, tzinfo=UTC)
    # No partition of November 2025: both wait in the default partition.
    reports = [
        report("cust_keptsince1", "before", cutoff - timedelta(microseconds=1)),
        report("cust_keptsince1", "at", cutoff),
    ]
    assert await insert_reports(pool, report_rows(reports)) == 2
    run = await maintain_partitions(pool, NOW, ahead=2, retention_months=13)
    assert run.deleted == 1
    async with pool.acquire() as conn:
        assert await where_each_row_is(conn) == {"at": "usage_reports_default"}


def scanned_tables(plan: Any) -> set[str]:
    """The relations an EXPLAIN (FORMAT JSON) plan reads."""
    if isinstance(plan, list):
        return set().union(*map(scanned_tables, plan))
    if not isinstance(plan, dict):
        return set()
    found = {plan["Relation Name"]} if "Relation Name" in plan else set()
    return found.union(*map(scanned_tables, plan.values()))


async def test_a_billing_period_reads_its_months_and_the_31_days_before_and_no_other(pool: Pool) -> None:
    """The reports that start in a period, and those started up to 31 days before that can run into it
    (storage counts their part inside): PostgreSQL prunes every other partition."""
    for current in [shift_months(month(2030, 11), offset) for offset in range(7)]:
        await maintain_partitions(pool, current, ahead=0, retention_months=1200)
    march = BillingPeriod(month(2031, 3), month(2031, 4))
    arguments = ("cust_pruning01", march.start, march.end, earliest_start_reaching(march.start))
    async with pool.acquire() as conn:
        for statement in (PERIOD_SUMS, PERIOD_SAMPLES):
            plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", *arguments))
            # January 29 is 31 days before March 1.
            assert scanned_tables(plan) == {
                "usage_reports_2031_01",
                "usage_reports_2031_02",
                "usage_reports_2031_03",
            }


async def test_a_month_made_late_takes_its_reports_out_of_the_default_partition(pool: Pool) -> None:
    late = [report("cust_latemonth1", f"r-{day}", datetime(2031, 3, day, tzinfo=UTC)) for day in (1, 15, 31)]
    assert await insert_reports(pool, report_rows(late)) == 3
    before = await pool.fetch(f"SELECT {ALL_COLUMNS} FROM usage_reports ORDER BY id")  # noqa: S608
    async with pool.acquire() as conn:
        assert set((await where_each_row_is(conn)).values()) == {"usage_reports_default"}

    run = await maintain_partitions(pool, datetime(2031, 3, 5, tzinfo=UTC), ahead=1, retention_months=13)
    assert run.created == ("usage_reports_2031_03", "usage_reports_2031_04")
    assert await pool.fetch(f"SELECT {ALL_COLUMNS} FROM usage_reports ORDER BY id") == before  # noqa: S608
    async with pool.acquire() as conn:
        assert set((await where_each_row_is(conn)).values()) == {"usage_reports_2031_03"}
    # Still stored once.
    assert await insert_reports(pool, report_rows(late)) == 0


async def waiting_for_locks(pool: Pool, backends: int) -> bool:
    waiting = await pool.fetchval("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted")
    return bool(waiting >= backends)


async def test_a_read_while_its_month_is_made_sees_the_month_s_reports(pool: Pool) -> None:
    """Found in a full run (a test counted 0 of its 2 reports): a read of the parent planned before the
    month's partition was attached, then waited for the default partition the making held, and read it
    empty once the reports had moved out: a status flush or a meter run closing a period read nothing."""
    march = month(2031, 3)
    late = [report("cust_readmonth1", f"r-{day}", march + timedelta(days=day)) for day in (1, 2)]
    assert await insert_reports(pool, report_rows(late)) == 2
    count = "SELECT count(*) FROM usage_reports WHERE customer_id = 'cust_readmonth1'"
    async with pool.acquire() as holder, pool.acquire() as maker, pool.acquire() as reader:
        async with holder.transaction():
            await holder.execute("LOCK TABLE usage_reports_default IN ACCESS SHARE MODE")  # a long read
            making = asyncio.create_task(create_partition(maker, march))
            await eventually(lambda: waiting_for_locks(pool, 1), within=5, message="the maker waits")
            reading = asyncio.create_task(reader.fetchval(count))
            await eventually(lambda: waiting_for_locks(pool, 2), within=5, message="the read waits")
        assert await making == "usage_reports_2031_03"
        assert await reading == 2


async def test_a_report_sent_while_its_month_is_made_goes_into_that_month(pool: Pool) -> None:
    # The order that broke it: the month's partition is being made (waiting here for the default
    # partition, which another transaction holds) when a report of that month arrives; the report must
    # wait for the partition and go into it, not fail the default partition's new constraint.
    march = month(2031, 3)
    async with pool.acquire() as holder, pool.acquire() as maker:
        async with holder.transaction():
            await holder.execute("LOCK TABLE usage_reports_default IN SHARE MODE")
            making = asyncio.create_task(create_partition(maker, march))
            await eventually(lambda: waiting_for_locks(pool, 1), within=5, message="the maker waits")
            sending = asyncio.create_task(
                insert_reports(
                    pool, report_rows([report("cust_racemonth1", "r-1", march + timedelta(days=2))])
                )
            )
            # The insert waits too: for the maker (or, before the fix, for the default partition).
            await eventually(lambda: waiting_for_locks(pool, 2), within=5, message="the insert waits")
        assert await making == "usage_reports_2031_03"
        assert await sending == 1
    async with pool.acquire() as conn:
        assert await where_each_row_is(conn) == {"r-1": "usage_reports_2031_03"}


async def test_usage_metering_makes_the_months_ahead_at_start_and_on_its_timer(pool: Pool) -> None:
    clock = [datetime(2031, 1, 10, tzinfo=UTC)]
    engine = create_engine("postgresql://unused@127.0.0.1:1/unused")
    metering = UsageMetering(
        pool=pool,
        options=UsageOptions(flush_interval=None, meter_interval=None, partition_interval=0.05),
        session_factory=session_factory(engine),
        # Neither is called: no flush, no meter run in this test.
        directory=cast(Directory, None),
        kube=cast(Kube, None),
        stripe=None,
        metrics=UsageMetrics(CollectorRegistry()),
        clock=lambda: clock[0],
    )

    async def made(*months: str) -> bool:
        async with pool.acquire() as conn:
            return {f"usage_reports_{name}" for name in months} <= set(await partitions(conn))

    metering.start()
    try:
        # This month and the next two, made at start.
        await eventually(lambda: made("2031_01", "2031_02", "2031_03"), within=10, message="at start")
        clock[0] = datetime(2031, 4, 2, tzinfo=UTC)  # the clock moves on; the timer follows
        await eventually(lambda: made("2031_04", "2031_05", "2031_06"), within=10, message="by the timer")
    finally:
        await metering.stop()
        await engine.dispose()
