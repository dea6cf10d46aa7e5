"""Usage reports in PostgreSQL through the webhook server's asyncpg pool (db.pool): the exactly-once
batch insert and the queries the views need.

Every function takes a connection or a pool and plain values; an unreachable database is raised as
`DatabaseUnavailable`, which the API turns into a 503.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg

from iotistic_billing.db.pool import (
    CONNECTION_ERRORS,
    Connection,
    DatabaseUnavailable,
    Pool,
    Queryable,
    Record,
    connection,
)
from iotistic_billing.db.pool import open_pool as open_asyncpg_pool
from iotistic_billing.usage.periods import BillingPeriod
from iotistic_billing.usage.pricing import PeriodTotals, UsageSample, device_hours, totals_from_sums
from iotistic_billing.usage.reports import (
    COLUMNS,
    KEY_COLUMNS,
    REPORTED_COLUMNS,
    Difference,
    ResentReportsDiffer,
    earliest_start_reaching,
    repeats_within,
)

# The counters not listed are bigint; the size comes as text (reports.report_rows) and is cast.
_TYPES: Final = {
    "customer_id": "varchar",
    "instance_id": "varchar",
    "report_id": "varchar",
    "period_start": "timestamptz",
    "period_end": "timestamptz",
    "active_devices": "int",
    "total_devices": "int",
    "postgres_size_mb": "text",
}


def _as_column(name: str, value: str) -> str:
    """`value` (a parameter, a staged column) as what the usage_reports column takes."""
    return f"{value}::numeric" if name == "postgres_size_mb" else value


# Batches go in by binary COPY (asyncpg encodes rows without the per-element checks of arrays, the
# cheapest way in): into usage_reports itself, or, for a batch holding a report stored before, into a
# temporary table of the connection and from there with one statement (_insert_batch). The table is
# made when the pool opens the connection and emptied by every commit.
REPORTS_TABLE: Final = "usage_reports"
STAGING_TABLE: Final = "usage_reports_incoming"
CREATE_STAGING_TABLE: Final = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE}
    ({", ".join(f"{c} {_TYPES.get(c, 'bigint')} NOT NULL" for c in COLUMNS)})
    ON COMMIT DELETE ROWS
"""
# Rows are inserted in key order (usage_reports' primary key: customer, instance, report id, period
# start), so that two batches sharing reports take their row locks in the same order and cannot
# deadlock; a report already stored is skipped by the key, and only the rows really inserted are
# counted. ON CONFLICT names no key: the statements work on the table before migration 0007 (a unique
# key without the period start) as after it.
#
# A report skipped is compared in the same statement with the stored one (a retry must repeat it):
# the rows answered are those whose stored report differs, naming the columns, and those whose stored
# report the statement did not see (stored by a transaction that committed after it began), which
# COMPARE_* looks at again. One row with no key when every report was new or repeated its stored one.
_IN_KEY_ORDER: Final = 'customer_id COLLATE "C", instance_id COLLATE "C", report_id COLLATE "C", period_start'
_SAME_KEY: Final = " AND ".join(f"{{stored}}.{c} = {{sent}}.{c}" for c in KEY_COLUMNS)
# The size as the column keeps it (NUMERIC(14, 3) rounds), so that 0.1 + 0.2 sent again is the same.
_AS_STORED: Final = {"postgres_size_mb": "{}::numeric(14, 3)"}
_DIFFERING: Final = (
    "array_remove(ARRAY["
    + ", ".join(
        f"CASE WHEN s.{c} IS DISTINCT FROM {_AS_STORED.get(c, '{}').format(f'k.{c}')} THEN '{c}' END"
        for c in REPORTED_COLUMNS
    )
    + "]::text[], NULL)"
)
_COMPARED: Final = f"""
SELECT {", ".join(f"k.{c}" for c in KEY_COLUMNS)}, s.customer_id IS NOT NULL AS seen,
       {_DIFFERING} AS differing, {", ".join(f"s.{c} AS stored_{c}" for c in REPORTED_COLUMNS)}
FROM {{source}} k {{join}} JOIN usage_reports s ON {_SAME_KEY.format(stored="s", sent="k")}
"""  # noqa: S608 - built from constant column names


def _insert_comparing(source: str, prelude: str = "") -> str:
    return f"""
WITH {prelude}inserted AS (
    INSERT INTO usage_reports ({", ".join(COLUMNS)})
    SELECT {", ".join(_as_column(c, c) for c in COLUMNS)} FROM {source}
    ORDER BY {_IN_KEY_ORDER}
    ON CONFLICT DO NOTHING
    RETURNING {", ".join(KEY_COLUMNS)}
), compared AS (
    {_COMPARED.format(source=source, join="LEFT")}
    WHERE NOT EXISTS (SELECT FROM inserted n WHERE {_SAME_KEY.format(stored="n", sent="k")})
)
SELECT (SELECT count(*) FROM inserted) AS inserted, d.*
FROM (VALUES (1)) AS one (x)
LEFT JOIN (SELECT * FROM compared WHERE NOT seen OR cardinality(differing) > 0) d ON true
"""  # noqa: S608 - built from constant column names


def _compare(source: str, prelude: str = "") -> str:
    return f"""
{f"WITH {prelude.rstrip(', ')}" if prelude else ""}
SELECT * FROM ({_COMPARED.format(source=source, join="")}) compared WHERE cardinality(differing) > 0
"""  # noqa: S608 - built from constant column names


INSERT_REPORTS: Final = _insert_comparing(STAGING_TABLE)
COMPARE_REPORTS: Final = _compare(STAGING_TABLE)

# The commonest request, one report: one statement with the report as its parameters.
_ONE_REPORT: Final = (
    "incoming AS (SELECT "
    + ", ".join(f"${i}::{_TYPES.get(c, 'bigint')} AS {c}" for i, c in enumerate(COLUMNS, 1))
    + "), "
)
INSERT_REPORT: Final = _insert_comparing("incoming", _ONE_REPORT)
COMPARE_REPORT: Final = _compare("incoming", _ONE_REPORT)


# The sums `pricing.roll_up` makes, made by PostgreSQL: counters belong to the reports that end in
# the period (after its start, as all rows here do, and by its end, the FILTERs: a report is sent once
# it has ended, so one across a period's end arrives while the period it ends in is open), storage
# counts the seconds inside the period of every report overlapping it. Those start from $4
# (`reports.earliest_start_reaching`), a bound of the partition key that prunes the months before it;
# the reads of the 31 days before the period are the price of no index on period_end (an index every
# report would pay for). Sums of bigint are numeric: no overflow.
PERIOD_SUMS: Final = """
SELECT coalesce(max(active_devices) FILTER (WHERE period_end <= $3), 0) AS peak_devices,
       coalesce(sum(mqtt_bytes_sent) FILTER (WHERE period_end <= $3), 0)
           + coalesce(sum(mqtt_bytes_received) FILTER (WHERE period_end <= $3), 0) AS mqtt_bytes,
       coalesce(sum(http_bytes_sent) FILTER (WHERE period_end <= $3), 0)
           + coalesce(sum(http_bytes_received) FILTER (WHERE period_end <= $3), 0) AS http_bytes,
       coalesce(sum(http_requests) FILTER (WHERE period_end <= $3), 0) AS api_calls,
       coalesce(sum(postgres_size_mb
                    * floor(extract(epoch FROM least(period_end, $3) - greatest(period_start, $2)))), 0)
           AS storage_mb_seconds,
       count(*) FILTER (WHERE period_end <= $3) AS reports,
       coalesce(sum(active_devices::numeric * floor(extract(epoch FROM period_end - period_start)))
                    FILTER (WHERE period_end <= $3), 0)
           AS device_seconds
FROM usage_reports
WHERE customer_id = $1 AND period_start >= $4 AND period_start < $3 AND period_end > $2
"""

PERIOD_SAMPLES: Final = """
SELECT period_start, period_end, active_devices,
       mqtt_bytes_sent::numeric + mqtt_bytes_received AS mqtt_bytes,
       http_bytes_sent::numeric + http_bytes_received AS http_bytes,
       http_requests, postgres_size_mb
FROM usage_reports
WHERE customer_id = $1 AND period_start >= $4 AND period_start < $3 AND period_end > $2
"""

DAILY: Final = """
SELECT (period_start AT TIME ZONE 'UTC')::date AS day,
       count(*) AS reports,
       max(active_devices) AS peak_active_devices,
       coalesce(sum(mqtt_messages_published), 0) + coalesce(sum(mqtt_messages_received), 0) AS mqtt_messages,
       coalesce(sum(mqtt_bytes_sent), 0) + coalesce(sum(mqtt_bytes_received), 0) AS mqtt_bytes,
       coalesce(sum(http_requests), 0) AS http_requests,
       coalesce(sum(http_bytes_sent), 0) + coalesce(sum(http_bytes_received), 0) AS http_bytes,
       (array_agg(postgres_size_mb ORDER BY period_end DESC))[1] AS postgres_size_mb,
       coalesce(sum(active_devices::numeric * floor(extract(epoch FROM period_end - period_start))), 0)
           AS device_seconds
FROM usage_reports
WHERE customer_id = $1 AND period_start >= $2 AND period_start < $3
GROUP BY 1
ORDER BY 1
"""

# The window's reports newest first: by period_end, and of one period_end the last stored first. Every
# `id` is the sequence's (it was the primary key until migration 0007, which kept the values), so the
# order is total: a page goes on after the last report of the page before (its ReportPosition, a keyset)
# and no report is listed twice or left out, ties on period_end among them.
_RECENT: Final = f"""
SELECT id, {", ".join(COLUMNS[1:])}, reported_at
FROM usage_reports
WHERE customer_id = $1 AND period_start >= $2 AND period_start < $3{{before}}
ORDER BY period_end DESC, id DESC
LIMIT $4
"""  # noqa: S608 - built from constant column names
RECENT: Final = _RECENT.format(before="")
# A report ends after it starts (reports.period_problems), so the reports after one ending at $5 started
# before it: a bound of period_start, which ix_usage_reports_customer_period and the partitions serve
# (no index holds period_end, see PERIOD_SUMS), beside the row comparison of the order itself.
RECENT_BEFORE: Final = _RECENT.format(before=" AND period_start < $5 AND (period_end, id) < ($5, $6)")

LATEST: Final = """
SELECT active_devices, period_end FROM usage_reports
WHERE customer_id = $1
ORDER BY period_start DESC, period_end DESC, id DESC
LIMIT 1
"""


async def prepare_session(connection: Connection) -> None:
    """Run on each connection the pool opens: the staging table of batches (INSERT_REPORTS)."""
    await connection.execute(CREATE_STAGING_TABLE)


async def open_pool(database_url: str, max_size: int = 10) -> Pool:
    """The webhook server's asyncpg pool (db.pool), each connection with the staging table of batches."""
    return await open_asyncpg_pool(database_url, max_size, init=prepare_session)


def _differences(rows: Sequence[tuple[Any, ...]], compared: Sequence[Record]) -> list[Difference]:
    """The compared rows of INSERT_REPORT(S) or COMPARE_REPORT(S) whose stored report differs, as
    differences of the reports (their index among `rows`) sent."""
    differing = [row for row in compared if row["differing"]]
    if not differing:
        return []
    index: dict[tuple[Any, ...], int] = {}
    for position, sent in enumerate(rows):
        index.setdefault(sent[: len(KEY_COLUMNS)], position)
    differences: list[Difference] = []
    for stored in differing:
        position = index[tuple(stored[c] for c in KEY_COLUMNS)]
        differences.extend(
            Difference(position, column, stored[f"stored_{column}"], rows[position][COLUMNS.index(column)])
            for column in stored["differing"]
        )
    return sorted(differences, key=lambda difference: difference.index)


async def _insert_compared(
    conn: Connection, insert: str, compare: str, rows: Sequence[tuple[Any, ...]], *args: Any
) -> int:
    """Run `insert` (INSERT_REPORT(S)); how many it stored, or ResentReportsDiffer naming the fields of
    reports sent again with other values. A skipped report whose stored one the statement did not see
    (a racing request stored it meanwhile) is compared again by `compare`, which sees it: one more
    round trip for the whole request, only in that race."""
    answer = await conn.fetch(insert, *args)
    compared = [row for row in answer if row["customer_id"] is not None]
    if any(not row["seen"] for row in compared):
        compared = [row for row in compared if row["seen"]] + list(await conn.fetch(compare, *args))
    differences = _differences(rows, compared)
    if differences:
        raise ResentReportsDiffer(differences)
    return int(answer[0]["inserted"])


async def _insert_batch(pool: Pool, rows: Sequence[tuple[Any, ...]]) -> int:
    """A batch of new reports (the common case) is copied straight into usage_reports, as PostgreSQL's
    cheapest write; one holding a report stored before (a retry), or a report twice, fails that COPY as
    a whole on the unique key and goes through the staging table, which skips the stored ones after
    comparing them. Sorted first, the rows take their locks in key order like INSERT_REPORTS, so
    overlapping batches wait, never deadlock."""
    in_key_order = sorted(rows)
    async with connection(pool) as conn:
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(REPORTS_TABLE, records=in_key_order, columns=COLUMNS)
            return len(rows)
        except asyncpg.UniqueViolationError:
            pass  # PostgreSQL logs the duplicate key as an ERROR; nothing of the COPY was kept
        once, repeated = repeats_within(rows)
        if repeated:
            raise ResentReportsDiffer(repeated)
        # All or nothing: a difference raised inside the transaction rolls back the reports it stored.
        async with conn.transaction():
            await conn.copy_records_to_table(STAGING_TABLE, records=once, columns=COLUMNS)
            return await _insert_compared(conn, INSERT_REPORTS, COMPARE_REPORTS, rows)


async def _insert(pool: Pool, rows: Sequence[tuple[Any, ...]]) -> int:
    if len(rows) == 1:
        # Through connection(), as a batch: the pool's own fetchval waits for a free connection for ever.
        async with connection(pool) as conn:
            return await _insert_compared(conn, INSERT_REPORT, COMPARE_REPORT, rows, *rows[0])
    return await _insert_batch(pool, rows)


async def insert_reports(pool: Pool, rows: Sequence[tuple[Any, ...]]) -> int:
    """Store the rows of `reports.report_rows` (one transaction); how many were new (not duplicates).
    Reports sent again with other values than those stored raise ResentReportsDiffer, nothing stored."""
    try:
        try:
            return await _insert(pool, rows)
        except asyncpg.DeadlockDetectedError:
            # Ordered inserts should never deadlock; should one still happen, the retry is safe
            # (exactly-once is the unique constraint's job, not the statement's).
            return await _insert(pool, rows)
    except CONNECTION_ERRORS as error:
        raise DatabaseUnavailable(type(error).__name__) from None


async def period_totals(conn: Queryable, customer_id: str, period: BillingPeriod) -> PeriodTotals:
    """The period's totals summed by PostgreSQL (cheap enough for every status flush and view)."""
    row = await conn.fetchrow(
        PERIOD_SUMS, customer_id, period.start, period.end, earliest_start_reaching(period.start)
    )
    assert row is not None  # an aggregate always returns a row
    return totals_from_sums(
        period.start,
        period.end,
        peak_devices=int(row["peak_devices"]),
        mqtt_bytes=int(row["mqtt_bytes"]),
        http_bytes=int(row["http_bytes"]),
        api_calls=int(row["api_calls"]),
        storage_mb_seconds=Decimal(row["storage_mb_seconds"]),
        reports=int(row["reports"]),
        device_seconds=Decimal(row["device_seconds"]),
    )


async def period_samples(conn: Queryable, customer_id: str, period: BillingPeriod) -> list[UsageSample]:
    """The reports overlapping the period (those ending in it among them), as `pricing.roll_up` takes
    them."""
    rows = await conn.fetch(
        PERIOD_SAMPLES, customer_id, period.start, period.end, earliest_start_reaching(period.start)
    )
    return [
        UsageSample(
            period_start=row["period_start"],
            period_end=row["period_end"],
            active_devices=row["active_devices"],
            mqtt_bytes=int(row["mqtt_bytes"]),
            http_bytes=int(row["http_bytes"]),
            http_requests=row["http_requests"],
            postgres_size_mb=row["postgres_size_mb"],
        )
        for row in rows
    ]


@dataclass(frozen=True)
class DailyUsage:
    day: date
    reports: int
    peak_active_devices: int
    mqtt_messages: int
    mqtt_bytes: int
    http_requests: int
    http_bytes: int
    postgres_size_mb: Decimal | None  # the last size reported that day
    device_hours: Decimal = Decimal(0)


async def daily_usage(conn: Queryable, customer_id: str, start: datetime, end: datetime) -> list[DailyUsage]:
    rows = await conn.fetch(DAILY, customer_id, start, end)
    return [
        DailyUsage(
            day=row["day"],
            reports=int(row["reports"]),
            peak_active_devices=int(row["peak_active_devices"]),
            mqtt_messages=int(row["mqtt_messages"]),
            mqtt_bytes=int(row["mqtt_bytes"]),
            http_requests=int(row["http_requests"]),
            http_bytes=int(row["http_bytes"]),
            postgres_size_mb=row["postgres_size_mb"],
            device_hours=device_hours(Decimal(row["device_seconds"])),
        )
        for row in rows
    ]


@dataclass(frozen=True)
class ReportPosition:
    """Where a report stands in the order of `recent_reports`."""

    period_end: datetime
    id: int


@dataclass(frozen=True)
class ReportsPage:
    reports: list[dict[str, Any]]  # column -> value, newest first
    more_after: ReportPosition | None  # the last report's position when more follow it, else None


async def recent_reports(
    conn: Queryable,
    customer_id: str,
    start: datetime,
    end: datetime,
    limit: int,
    before: ReportPosition | None = None,
) -> ReportsPage:
    """The window's reports newest first (RECENT), at most `limit` of them, those after `before` when
    given. One more is read, to tell whether another page follows."""
    if before is None:
        rows = await conn.fetch(RECENT, customer_id, start, end, limit + 1)
    else:
        rows = await conn.fetch(
            RECENT_BEFORE, customer_id, start, end, limit + 1, before.period_end, before.id
        )
    reports = [dict(row) for row in rows[:limit]]
    ids = [report.pop("id") for report in reports]
    more_after = ReportPosition(reports[-1]["period_end"], ids[-1]) if len(rows) > limit else None
    return ReportsPage(reports, more_after)


async def latest_report(conn: Queryable, customer_id: str) -> tuple[int, datetime] | None:
    """(active_devices, period_end) of the customer's latest report, or None before the first."""
    row = await conn.fetchrow(LATEST, customer_id)
    return (int(row["active_devices"]), row["period_end"]) if row is not None else None


_SUMMARIES: Final = """
SELECT r.customer_id,
       count(*) AS reports,
       max(r.active_devices) AS peak_active_devices,
       sum(r.mqtt_bytes_sent::numeric + r.mqtt_bytes_received + r.http_bytes_sent + r.http_bytes_received)
           AS traffic_bytes,
       sum(r.http_requests) AS http_requests,
       (array_agg(r.postgres_size_mb ORDER BY r.period_end DESC))[1] AS postgres_size_mb,
       max(r.reported_at) AS last_report_at,
       sum(r.active_devices::numeric * floor(extract(epoch FROM r.period_end - r.period_start)))
           AS device_seconds,
       c.company_name, c.plan AS mirror_plan
FROM usage_reports r LEFT JOIN customers c ON c.customer_id = r.customer_id
WHERE r.period_start >= $1 AND r.period_start < $2 AND ($3::varchar IS NULL OR r.customer_id = $3)
GROUP BY r.customer_id, c.company_name, c.plan
ORDER BY r.customer_id
"""

# The rollup of the period holding `now` (or the latest before it) per customer.
_CURRENT_ROLLUPS: Final = """
SELECT DISTINCT ON (customer_id) customer_id, period_start, period_end, plan, overage::text AS overage,
       overage_amount_cents, closed_at
FROM usage_rollups
WHERE customer_id = ANY($1::varchar[]) AND period_start <= $2
ORDER BY customer_id, period_start DESC
"""


@dataclass(frozen=True)
class CustomerSummary:
    """A customer's usage over a window, with what the customers mirror knows of it."""

    customer_id: str
    reports: int
    peak_active_devices: int
    traffic_bytes: int
    http_requests: int
    postgres_size_mb: Decimal | None
    last_report_at: datetime
    company_name: str | None
    mirror_plan: str | None
    device_hours: Decimal = Decimal(0)


async def customer_summaries(
    conn: Queryable, start: datetime, end: datetime, customer_id: str | None = None
) -> list[CustomerSummary]:
    rows = await conn.fetch(_SUMMARIES, start, end, customer_id)
    return [
        CustomerSummary(
            customer_id=row["customer_id"],
            reports=int(row["reports"]),
            peak_active_devices=int(row["peak_active_devices"]),
            traffic_bytes=int(row["traffic_bytes"]),
            http_requests=int(row["http_requests"]),
            postgres_size_mb=row["postgres_size_mb"],
            last_report_at=row["last_report_at"],
            company_name=row["company_name"],
            mirror_plan=row["mirror_plan"],
            device_hours=device_hours(Decimal(row["device_seconds"])),
        )
        for row in rows
    ]


# The flush keeps a rollup for each customer that reported in its current period, silent since or not.
_CURRENT_PERIOD_CUSTOMERS: Final = """
SELECT customer_id FROM usage_rollups WHERE period_start <= $1 AND period_end > $1 ORDER BY customer_id
"""


async def current_period_customers(conn: Queryable, now: datetime) -> list[str]:
    """Every customer with a rollup of the period holding `now`."""
    return [str(row["customer_id"]) for row in await conn.fetch(_CURRENT_PERIOD_CUSTOMERS, now)]


async def current_rollups(conn: Queryable, customer_ids: Sequence[str], now: datetime) -> dict[str, Record]:
    """customer id -> its rollup row of the period holding `now` or the latest before (overage as text)."""
    return {row["customer_id"]: row for row in await conn.fetch(_CURRENT_ROLLUPS, list(customer_ids), now)}


__all__ = [
    "COMPARE_REPORT",
    "COMPARE_REPORTS",
    "CREATE_STAGING_TABLE",
    "INSERT_REPORT",
    "INSERT_REPORTS",
    "STAGING_TABLE",
    "CustomerSummary",
    "DailyUsage",
    "ReportPosition",
    "ReportsPage",
    "current_period_customers",
    "current_rollups",
    "customer_summaries",
    "daily_usage",
    "insert_reports",
    "latest_report",
    "open_pool",
    "period_samples",
    "period_totals",
    "prepare_session",
    "recent_reports",
]
