"""The monthly partitions of usage_reports: made ahead of the reports that go into them, and dropped
whole once older than the raw retention and holding no report of, or reaching into, an open billing
period (docs/architecture.md, "Usage reports over the years").

A report lives in the partition of the UTC month its period_start falls in, `usage_reports_YYYY_MM`;
`usage_reports_default` takes a report of a month that has no partition (older than the oldest kept,
or made late). The decisions (`plan_partitions`) are pure and take `now`; `maintain_partitions` reads
the catalog, asks them, and runs the DDL, one replica at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg

from iotistic_billing.db.models import USAGE_REPORT_PARTITION
from iotistic_billing.db.pool import Connection, Pool, Queryable, connection, session_lock
from iotistic_billing.usage.periods import shift_months
from iotistic_billing.usage.reports import earliest_start_reaching

log = logging.getLogger(__name__)

DEFAULT_PARTITION: Final = "usage_reports_default"
# Any constant of ours, as metering.METER_LOCK_KEY: one partition run at a time across replicas.
PARTITION_LOCK_KEY: Final = 0x10715_0007
# DDL on usage_reports waits this long for its lock, then the run gives up until the next: a long
# query holding the table must not queue every report behind the DDL's lock.
LOCK_TIMEOUT: Final = "2s"


def month_of(moment: datetime) -> datetime:
    """Midnight UTC of the first day of `moment`'s UTC month: where its partition starts."""
    utc = moment.astimezone(UTC)
    return datetime(utc.year, utc.month, 1, tzinfo=UTC)


def partition_name(month: datetime) -> str:
    return f"usage_reports_{month:%Y_%m}"


def month_of_partition(name: str) -> datetime | None:
    """The month of a monthly partition's name; None for the default partition or another table."""
    if not USAGE_REPORT_PARTITION.fullmatch(name) or name == DEFAULT_PARTITION:
        return None
    year, month = name.removeprefix("usage_reports_").split("_")
    return datetime(int(year), int(month), 1, tzinfo=UTC)


def retention_cutoff(now: datetime, retention_months: int, oldest_open_start: datetime | None) -> datetime:
    """Reports that start before this instant may go: `retention_months` before `now`, and never after
    the earliest start of a report that can reach into the oldest billing period still open (its last
    roll-up reads its reports, and storage counts a report started before the period for its part
    inside it)."""
    cutoff = shift_months(now.astimezone(UTC), -retention_months)
    return cutoff if oldest_open_start is None else min(cutoff, earliest_start_reaching(oldest_open_start))


@dataclass(frozen=True)
class PartitionPlan:
    create: tuple[datetime, ...]  # months, oldest first
    drop: tuple[datetime, ...]  # months, oldest first
    cutoff: datetime  # the default partition's reports before it are deleted


def plan_partitions(
    existing: Iterable[datetime],
    now: datetime,
    *,
    ahead: int,
    retention_months: int,
    oldest_open_start: datetime | None,
) -> PartitionPlan:
    """The months to make (`now`'s and `ahead` more, those missing) and to drop (every month that ends
    by the cutoff: a partition goes whole or not at all, so a report is kept up to a month longer)."""
    cutoff = retention_cutoff(now, retention_months, oldest_open_start)
    have = set(existing)
    current = month_of(now)
    wanted = [shift_months(current, offset) for offset in range(ahead + 1)]
    return PartitionPlan(
        create=tuple(month for month in wanted if month not in have and shift_months(month, 1) > cutoff),
        drop=tuple(sorted(month for month in have if shift_months(month, 1) <= cutoff)),
        cutoff=cutoff,
    )


def unmade(existing: Iterable[datetime], now: datetime) -> tuple[str, ...]:
    """The partitions of `now`'s month and the next that `existing` (months) lacks: a run whose DDL never
    had its lock in time (LOCK_TIMEOUT) leaves them so, and their reports go to the default partition,
    which no retention drops by the month."""
    have = set(existing)
    current = month_of(now)
    return tuple(partition_name(month) for month in (current, shift_months(current, 1)) if month not in have)


@dataclass(frozen=True)
class PartitionRun:
    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    deleted: int = 0  # reports of the default partition past the cutoff
    skipped: bool = False  # another replica holds the lock
    missing: tuple[str, ...] = ()  # this month's or the next's partition, still not made (`unmade`)


_PARTITIONS: Final = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_reports'::regclass
"""
# Every open rollup's reports are read again when it closes (rollups.close_periods).
_OLDEST_OPEN: Final = "SELECT min(period_start) FROM usage_rollups WHERE closed_at IS NULL"


async def oldest_open_start(conn: Queryable) -> datetime | None:
    start: datetime | None = await conn.fetchval(_OLDEST_OPEN)
    return start


async def kept_since(conn: Queryable, now: datetime, retention_months: int) -> datetime:
    """The cutoff of a partition run at `now`: a report that starts before it goes with its month, or
    from the default partition. The report route refuses such a report rather than store it to lose
    it (usage.reports.retention_problems)."""
    return retention_cutoff(now, retention_months, await oldest_open_start(conn))


def _bound(moment: datetime) -> str:
    return f"'{moment.isoformat()}'"


async def create_partition(conn: Connection, month: datetime) -> str:
    """The month's partition, in one transaction: an empty table with the parent's columns, the
    month's reports the default partition took meanwhile moved into it, then attached (PostgreSQL
    refuses a partition whose rows the default partition still holds)."""
    name = partition_name(month)
    bounds = f"FROM ({_bound(month)}) TO ({_bound(shift_months(month, 1))})"
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # Inserts and reads wait at the parent until the commit. An insert that had already seen the
        # parent's partitions would route a report of this month to the default partition and then fail
        # its new constraint ("violates partition constraint"), as ATTACH alone allows; a read planned
        # before the attach, then waiting for the default partition below, read it empty once the
        # month's reports had moved out (a meter run closing a period would have billed nothing). ONLY:
        # the other months' partitions stay free for whoever reads them alone.
        await conn.execute("LOCK TABLE ONLY usage_reports IN ACCESS EXCLUSIVE MODE")
        # Then no report reaches the default partition between the move and the attach.
        await conn.execute(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE")
        await conn.execute(f"CREATE TABLE {name} (LIKE usage_reports INCLUDING DEFAULTS)")
        await conn.execute(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE period_start >= $1 AND period_start < $2"  # noqa: S608 - names and bounds are ours
            f" RETURNING *) INSERT INTO {name} SELECT * FROM moved",
            month,
            shift_months(month, 1),
        )
        await conn.execute(f"ALTER TABLE usage_reports ATTACH PARTITION {name} FOR VALUES {bounds}")
    return name


async def drop_partition(conn: Connection, month: datetime) -> str:
    name = partition_name(month)
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute(f"DROP TABLE {name}")
    return name


async def _locked(
    step: Callable[[Connection, datetime], Awaitable[str]], conn: Connection, month: datetime
) -> str | None:
    """The step's partition name, or None when it could not have its lock in time (next run)."""
    try:
        return await step(conn, month)
    except asyncpg.LockNotAvailableError:
        log.warning(
            "%s of %s waited %s for its lock; tried again next run", step.__name__, month, LOCK_TIMEOUT
        )
        return None


async def maintain_partitions(
    pool: Pool, now: datetime, *, ahead: int, retention_months: int
) -> PartitionRun:
    """Make the months ahead, drop the months past the retention, and delete the default partition's
    reports past it (`plan_partitions`). Rollups are never touched."""
    async with connection(pool) as conn, session_lock(conn, PARTITION_LOCK_KEY) as held:
        if not held:
            return PartitionRun(skipped=True)
        names = [row["relname"] for row in await conn.fetch(_PARTITIONS)]
        existing = [month for month in map(month_of_partition, names) if month is not None]
        plan = plan_partitions(
            existing,
            now,
            ahead=ahead,
            retention_months=retention_months,
            oldest_open_start=await oldest_open_start(conn),
        )
        made = [month for month in plan.create if await _locked(create_partition, conn, month)]
        dropped = [name for month in plan.drop if (name := await _locked(drop_partition, conn, month))]
        status = await conn.execute(
            f"DELETE FROM {DEFAULT_PARTITION} WHERE period_start < $1",  # noqa: S608 - a constant name
            plan.cutoff,
        )
        return PartitionRun(
            tuple(map(partition_name, made)),
            tuple(dropped),
            int(status.split()[-1]),
            missing=unmade([*existing, *made], now),
        )


__all__ = [
    "DEFAULT_PARTITION",
    "PartitionPlan",
    "PartitionRun",
    "create_partition",
    "drop_partition",
    "kept_since",
    "maintain_partitions",
    "month_of",
    "month_of_partition",
    "oldest_open_start",
    "partition_name",
    "plan_partitions",
    "retention_cutoff",
    "unmade",
]
