"""What the meter run's look for reports no rollup holds (`rollups.unheld_arrivals`) costs on a big table.

Each meter run, before it closes periods, asks PostgreSQL for the reports stored in the last
`UsageOptions.catch_up_window` (three hours) that no rollup holds, and flushes their customers
(`UsageMetering.flush_unheld`): a server stopped between its 202 and its flush took its coalescer with
it. The query runs every hour whatever the fleet does, so it must cost what the window holds, not what
the table or the years of rollups hold; a longer look (after an outage) is that window's statement once
a span (`rollups.catch_up_spans`).

On an embedded PostgreSQL migrated by Alembic: `--months` monthly partitions holding `--rows` reports of
`--instances` instances (instance i reports for customer i modulo `--customers`) spread over them,
each stored when it ended, and the last `--recent-hours` at one report a minute per instance; a rollup
per customer and calendar month over `--rollup-years` (closed, the current one open), as the flushes and
meter runs leave them; three customers whose last month has no rollup and whose reports of its last ten
minutes were stored half an hour ago (what the query must find). Then, warm, the median of `--repeats`
runs of:
- product: `unheld_arrivals` with the service's window and start bound (UsageMetering.flush_unheld);
- baseline: a count of the same window's reports through the same index and bound, holding checked for
  none: what reading the window costs at all.
Prints both, their ratio, the partitions each read (EXPLAIN ANALYZE), and exits 1 unless the product
finds exactly the three customers.
Run: `.venv/bin/python bench/usage_catch_up.py [--rows 5000000] [--instances 1000] [--customers 1000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from machine import print_machine_speed
from usage import GENERATED

from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import plain_url
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.partitions import maintain_partitions, month_of
from iotistic_billing.usage.periods import shift_months
from iotistic_billing.usage.rollups import (  # the statement, for its plan
    _UNHELD_ARRIVALS,
    unheld_arrivals,
    unheld_starts_from,
)
from iotistic_billing.usage.store import open_pool

NOW = datetime.now(UTC).replace(microsecond=0)
LATE = ("cust_bench0001", "cust_bench0002", "cust_bench0003")

BASELINE = """
SELECT count(*) FROM usage_reports
WHERE reported_at >= $1 AND reported_at < $2 AND period_start >= $3
"""
# One rollup per customer (0 .. $3 - 1) and calendar month from $1 to $2: closed an hour after it ended,
# or open.
ROLLUPS = """
INSERT INTO usage_rollups (customer_id, period_start, period_end, totals, overage, overage_amount_cents,
                           plan, closed_at, updated_at)
SELECT 'cust_bench' || lpad(c::text, 4, '0'), m, m + interval '1 month', '{}'::jsonb, '{}'::jsonb, 0,
       'starter', CASE WHEN m < $2 THEN m + interval '1 month 1 hour' END, now()
FROM generate_series(0, $3::int - 1) AS c,
     generate_series($1::timestamptz, $2::timestamptz, interval '1 month') AS m
"""


async def fill(database_url: str, args: argparse.Namespace) -> int:
    """The partitions, the reports, the rollups and the three late customers (see the module's note);
    then VACUUM ANALYZE. How many reports were written."""
    first = shift_months(month_of(NOW), -(args.months - 1))
    pool = await open_pool(database_url, max_size=1)
    try:
        for offset in range(args.months):
            await maintain_partitions(
                pool, shift_months(first, offset), ahead=2, retention_months=args.months + 1
            )
    finally:
        await pool.close()
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        began = time.perf_counter()
        recent_start = NOW - timedelta(hours=args.recent_hours)
        slots = max(1, -(-args.rows // args.instances))
        customer = f"$1::text || lpad((i % {args.customers})::text, 4, '0')"
        written = 0
        for start, every, count in (
            (first, (recent_start - first) / slots, slots),
            (recent_start, timedelta(minutes=1), args.recent_hours * 60),
        ):
            status = await conn.execute(
                GENERATED.format(customer=customer, instance="'bench-' || i"),
                "cust_bench",
                start,
                every,
                0,
                count - 1,
                args.instances,
            )
            written += int(status.split()[-1])
        oldest = shift_months(month_of(NOW), -12 * args.rollup_years)
        await conn.execute(ROLLUPS, oldest, month_of(NOW), args.customers)
        last_month = shift_months(month_of(NOW), -1)
        await conn.execute(
            "DELETE FROM usage_rollups WHERE customer_id = ANY($1::varchar[]) AND period_start = $2",
            list(LATE),
            last_month,
        )
        for customer_id in LATE:
            # Two instances' last two 5-minute reports of last month, stored 30 minutes ago.
            await conn.execute(
                GENERATED.format(customer="$1::text", instance="'late-' || i"),
                customer_id,
                month_of(NOW) - timedelta(minutes=10),
                timedelta(minutes=5),
                0,
                1,
                2,
            )
        await conn.execute(
            "UPDATE usage_reports SET reported_at = now() - interval '30 minutes'"
            " WHERE instance_id LIKE 'late-%'"
        )
        print(f"    {written:,} reports written in {time.perf_counter() - began:.0f} s")
        began = time.perf_counter()
        await conn.execute("VACUUM (ANALYZE) usage_reports")
        await conn.execute("VACUUM (ANALYZE) usage_rollups")
        print(f"    VACUUM ANALYZE in {time.perf_counter() - began:.0f} s")
        return written
    finally:
        await conn.close()


async def timed(repeats: int, run: Callable[[], Awaitable[Any]]) -> tuple[list[float], Any]:
    """The seconds of `repeats` runs after a warm-up, and the last result."""
    result = await run()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = await run()
        seconds.append(time.perf_counter() - began)
    return seconds, result


def partitions_read(plan: list[str]) -> list[str]:
    """The partitions of usage_reports an EXPLAIN ANALYZE plan read rows or index entries of."""
    names = set()
    for line in plan:
        if " on usage_reports_" in line and "never executed" not in line:
            name = line.split(" on ")[1].split()[0]
            names.add(name.removesuffix("_reported_at_idx"))
    return sorted(names)


async def measure(database_url: str, repeats: int) -> int:
    options = UsageOptions()
    window = options.catch_up_window
    # As UsageMetering.flush_unheld bounds it.
    starts_from = unheld_starts_from(NOW, window, timedelta(seconds=options.close_grace))
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        # The look's one span, as catch_up_look_back and catch_up_spans bound it: PostgreSQL's times.
        until = await conn.fetchval("SELECT now()")
        span = (until - window, until, starts_from)
        product, found = await timed(repeats, lambda: unheld_arrivals(conn, *span))
        baseline, reports = await timed(repeats, lambda: conn.fetchval(BASELINE, *span))
        plans = {}
        for name, statement in (("product", _UNHELD_ARRIVALS), ("baseline", BASELINE)):
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", *span)
            plans[name] = [row[0] for row in rows]
        rollups = await conn.fetchval("SELECT count(*) FROM usage_rollups")
        total = await conn.fetchval("SELECT count(*) FROM usage_reports")
    finally:
        await conn.close()
    print(
        f"usage_reports {total:,}, usage_rollups {rollups:,}; window {window}, reports from"
        f" {starts_from:%Y-%m-%d %H:%M}: {reports:,} reports stored in it"
    )
    for name, seconds in (("product  unheld_arrivals", product), ("baseline count(*)       ", baseline)):
        print(
            f"    {name} median {statement_ms(seconds)}, partitions read:"
            f" {', '.join(partitions_read(plans[name.split()[0]]))}"
        )
    ratio = statistics.median(product) / statistics.median(baseline)
    per_report = statistics.median(product) / max(reports, 1) * 1e6
    print(f"    ratio {ratio:.2f}; {per_report:.2f} us a report in the window")
    print(f"    found: {[(u.customer_id, str(u.last_age)) for u in found]}")
    ok = sorted(u.customer_id for u in found) == sorted(LATE)
    print(f"found exactly the three late customers: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def statement_ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.1f} ms (of {', '.join(f'{s * 1000:.0f}' for s in seconds)})"


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-catch-up-") as folder:
        postgres = EmbeddedPostgres(Path(folder) / "postgres").start()
        try:
            database_url = postgres.create_database("bench")
            migrate.upgrade(database_url)
            print(
                f"--- filling: {args.rows:,} reports of {args.instances:,} instances ({args.customers:,}"
                f" customers) over {args.months} months, then {args.recent_hours} h at one a minute;"
                f" {args.rollup_years} years of rollups"
            )
            asyncio.run(fill(database_url, args))
            return asyncio.run(measure(database_url, args.repeats))
        finally:
            postgres.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=5_000_000, help="reports spread over the months")
    parser.add_argument("--months", type=int, default=13, help="months of partitions (and of --rows)")
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--recent-hours", type=int, default=6, help="hours at one report a minute each")
    parser.add_argument("--rollup-years", type=int, default=5, help="years of monthly rollups per customer")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if not 1 <= args.months <= UsageOptions().raw_retention_months:
        parser.error(f"--months: 1 to the raw retention, {UsageOptions().raw_retention_months}")
    if not 4 <= args.customers <= 10_000 or args.recent_hours < 4:
        parser.error("--customers: 4 to 10,000 (ids of four digits, three late); --recent-hours: 4 or more")
    print_machine_speed()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
