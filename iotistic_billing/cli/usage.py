"""`iotistic-billing usage`: the earlier system's usage viewer, reading PostgreSQL directly (DATABASE_URL).

`--customer cust_x` prints one line per UTC day with reports and the billing period's overage;
`--all` prints one line per customer that reported in the window, with its period's overage in dollars,
and the total of every customer's current period, billed plans only (a trial's overage is not billed).
The billing period is the one the webhook server last rolled up (it knows the Stripe subscription);
once that one has ended, the month anchored at its end, under the plan it was rolled up with (as the
server's next period; no paid plan once the customer's subscription has ended); for a customer it never
rolled up, the UTC calendar month and the plan in the customers table.
`-o json` has the values, not the table's text: counts are numbers; decimals and dollars are decimal
strings, as in the API's usage JSON; `--all`'s is `{"customers": [...], "currentPeriods": {...}}`, the
total's sums and the customers it counts that are not listed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from iotistic_billing.cli import CommandError, ServiceUnavailable
from iotistic_billing.cli.tables import print_table
from iotistic_billing.settings import SettingsError, load_settings

if TYPE_CHECKING:
    # Imported when a command runs: `iotistic-billing --help` loads no database driver.
    from iotistic_billing.db.pool import Connection

MAX_DAYS: Final = 366
MB: Final = Decimal(10**6)
GB: Final = Decimal(10**9)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = subparsers.add_parser(
        "usage",
        help="usage reported by customer instances, per day or per customer (reads PostgreSQL)",
        description="Usage reports per UTC day of one customer, or per customer; reads DATABASE_URL.",
    )
    target = usage.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--customer", metavar="CUSTOMER", help="one customer (its id, or its Customer's name), per day"
    )
    target.add_argument("--all", action="store_true", help="every customer that reported, one line each")
    usage.add_argument("--days", type=int, default=30, help="whole UTC days, today included (default 30)")
    usage.add_argument(
        "--until",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="last day of the window (default today)",
    )
    usage.add_argument("-o", "--output", choices=("table", "json"), default="table")
    usage.set_defaults(handler=_usage)


def _database_url() -> str:
    try:
        url = load_settings().database_url
    except SettingsError as exc:
        raise CommandError(str(exc)) from None
    if url is None:
        raise CommandError(
            "DATABASE_URL is not set; point it at the billing database (make dev writes .dev/env)"
        )
    return url


def _usage(args: argparse.Namespace) -> int:
    from iotistic_billing.usage.reports import EARLIEST

    if not 1 <= args.days <= MAX_DAYS:
        raise CommandError(f"--days: must be between 1 and {MAX_DAYS}, got {args.days}")
    if args.until is not None and args.until < EARLIEST.date():
        raise CommandError(f"--until: no usage is stored before {EARLIEST.date()}, got {args.until}")
    now = datetime.now(UTC)
    if args.until is not None:
        # As of the end of that day, or now when that day is today.
        now = min(
            now,
            datetime(args.until.year, args.until.month, args.until.day, tzinfo=UTC)
            + timedelta(days=1, microseconds=-1),
        )
    url = _database_url()
    import asyncpg

    from iotistic_billing.db.pool import CLI_COMMAND_TIMEOUT, DatabaseUnavailable, database_unreachable

    try:
        return asyncio.run(_show(url, args, now))
    except asyncpg.UndefinedTableError:
        raise CommandError(
            "DATABASE_URL: the database has no billing tables (the operator creates them when it starts)"
        ) from None
    except TimeoutError:  # the pool's command timeout: a table locked by a migration, a year of reports
        raise ServiceUnavailable(
            f"PostgreSQL did not answer within {CLI_COMMAND_TIMEOUT:.0f} s; try fewer --days, or --customer"
        ) from None
    except (DatabaseUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        # Away, or lost mid-query (ConnectionDoesNotExistError is a PostgresError too): try again later;
        # any other PostgresError is the database refusing this URL.
        if database_unreachable(error):
            reason = error if isinstance(error, DatabaseUnavailable) else f"{type(error).__name__}: {error}"
            raise ServiceUnavailable(f"cannot reach PostgreSQL at DATABASE_URL ({reason})") from None
        if isinstance(error, asyncpg.PostgresError):  # no such database, a refused login
            raise CommandError(f"DATABASE_URL: PostgreSQL refused ({error})") from None
        raise


def window_text(start: datetime, days: int) -> str:
    return f"{days} days, {start.date()} .. {(start + timedelta(days=days - 1)).date()} UTC"


def dollars(amount: Decimal | str) -> str:
    return f"${Decimal(amount):,.2f}"


def megabytes(count: int) -> Decimal:
    """Exact: bytes / 10^6 with six decimals."""
    return Decimal(count).scaleb(-6)


def gigabytes(count: int) -> Decimal:
    """Exact: bytes / 10^9 with nine decimals."""
    return Decimal(count).scaleb(-9)


# How the table shows a column's value (others as they are); the JSON output has the values themselves.
_SHOWN: Final[Mapping[str, Callable[[Any], str]]] = {
    **dict.fromkeys(
        ("reports", "peakDevices", "deviceHours", "mqttMessages", "httpRequests", "apiCalls", "databaseMb"),
        lambda value: f"{value:,}",
    ),
    **dict.fromkeys(("mqttMb", "httpMb"), lambda value: f"{value:,.1f}"),
    "trafficGb": lambda value: f"{value:,.3f}",
    "lastReport": lambda value: value.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
    "periodOverage": dollars,
}


def table_rows(rows: Iterable[Mapping[str, object]]) -> list[dict[str, object]]:
    """Rows as the table shows them; a period overage that is not billed says so."""
    shown = []
    for row in rows:
        cells = {
            key: value if value is None or key not in _SHOWN else _SHOWN[key](value)
            for key, value in row.items()
        }
        if row.get("billed") is False:
            cells["periodOverage"] = f"{cells['periodOverage']} (not billed)"
        shown.append(cells)
    return shown


def _json_value(value: object) -> str:
    """Decimals as exact decimal strings, times in ISO 8601."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")  # str() writes 0E-9 and 5.12E-7, scaleb's exponents
    return str(value)


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=_json_value))


def why_not_billed(plans: str) -> str:
    return f"plan {plans}: only paid plans are billed"


def overage_rows(overage: dict[str, Any]) -> list[dict[str, object]]:
    return [
        {
            "metric": line["metric"],
            "over": line["quantity"],
            "price": f"{dollars(line['unit_price'])} / {line['per']:,}",
            "amount": dollars(line["amount"]),
        }
        for line in overage.get("lines", ())
    ]


async def _show(url: str, args: argparse.Namespace, now: datetime) -> int:
    from iotistic_billing.db.pool import connect

    conn = await connect(url)
    try:
        if args.all:
            return await _all(conn, args, now)
        return await _customer(conn, args, now)
    finally:
        await conn.close()


# The customer's newest Stripe subscription by its events, when it has ended: no period after its
# rollups holds a paid plan (the server's customer_plan, from spec.subscription, says the same).
_ENDED_SUBSCRIPTION: Final = """
SELECT status FROM subscriptions WHERE customer_id = $1 AND status IN ('canceled', 'incomplete_expired')
  AND last_event_created = (SELECT max(last_event_created) FROM subscriptions WHERE customer_id = $1)
"""
# The customer's latest period the meter run found ended with its subscription (metering.not_invoiced).
_NOT_INVOICED: Final = """
SELECT period_start, period_end, meter_refusal FROM usage_rollups
WHERE customer_id = $1 AND meter_refusal LIKE 'not invoiced:%'
ORDER BY period_start DESC LIMIT 1
"""


async def _period(conn: Connection, customer_id: str, plan: str | None, now: datetime) -> dict[str, Any]:
    """The billing period holding `now` as the server rolled it up; after that rollup ended, the month
    anchored at its end under its plan (no paid plan once the customer's subscription has ended); for a
    customer never rolled up, the calendar month. `not_invoiced` names the latest period whose meter
    events came after its subscription ended, which no invoice carries."""
    period = await _current_period(conn, customer_id, plan, now)
    for row in await conn.fetch(_NOT_INVOICED, customer_id):
        period["not_invoiced"] = {
            "period_start": row["period_start"].isoformat(),
            "period_end": row["period_end"].isoformat(),
            "reason": row["meter_refusal"],
        }
    return period


async def _current_period(
    conn: Connection, customer_id: str, plan: str | None, now: datetime
) -> dict[str, Any]:
    from iotistic_billing.usage.periods import billing_period
    from iotistic_billing.usage.rollups import BILLED_PLANS, compute_rollup, overage_json
    from iotistic_billing.usage.store import current_rollups, period_totals

    row = (await current_rollups(conn, [customer_id], now)).get(customer_id)
    if row is not None and row["period_end"] > now:
        return {
            "period_start": row["period_start"].isoformat(),
            "period_end": row["period_end"].isoformat(),
            "plan": row["plan"],
            # As the meter run has it (Rollup.billed): a trial's overage, or the unlicensed plan's, is free.
            "billed": row["plan"] in BILLED_PLANS,
            "source": "closed rollup" if row["closed_at"] else "open rollup",
            "overage": json.loads(row["overage"]),
        }
    if row is None:
        period, chosen, source = billing_period(now, None), plan or "trial", "calendar month, computed now"
    else:
        # As the server's open_period: the period after an ended one is the month anchored at its end
        # (a Stripe period's, or a calendar month's), never reaching back over what it billed; priced
        # against the plan it was rolled up under, the effective one, which the mirror's spec.plan is not.
        period = billing_period(now, row["period_end"])
        chosen = row["plan"] or plan or "trial"
        source = "following the last rollup, computed now"
        if await conn.fetch(_ENDED_SUBSCRIPTION, customer_id):
            chosen, source = "unlicensed", f"{source}; the subscription has ended"
    rollup = compute_rollup(customer_id, period, chosen, await period_totals(conn, customer_id, period))
    return {
        "period_start": period.start.isoformat(),
        "period_end": period.end.isoformat(),
        "plan": chosen,
        "billed": chosen in BILLED_PLANS,
        "source": source,
        "overage": overage_json(rollup.overage),
    }


async def _customer_id(conn: Connection, given: str) -> tuple[str, str | None]:
    """The customer id `--customer` names (an id, or a Customer's resource name, as `customer upgrade
    --id` takes) and its plan in the customers mirror, None for a customer the mirror does not hold; a
    mistyped one is said, not shown as a customer without usage."""
    known = await conn.fetchrow(
        "SELECT customer_id, plan FROM customers WHERE customer_id = $1 OR resource_name = $1"
        " ORDER BY customer_id = $1 DESC LIMIT 1",
        given,
    )
    if known is not None:
        return str(known["customer_id"]), known["plan"]
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM usage_reports WHERE customer_id = $1)", given):
        return given, None  # reports of a customer the mirror does not hold
    raise CommandError(f"--customer: no customer with the id or name {given}")


async def _customer(conn: Connection, args: argparse.Namespace, now: datetime) -> int:
    from iotistic_billing.usage.periods import window_start
    from iotistic_billing.usage.store import customer_summaries, daily_usage

    # The mirror's plan, not the window's summary's: a customer silent in the window has none.
    args.customer, mirror_plan = await _customer_id(conn, args.customer)
    start = window_start(now, args.days)
    end = start + timedelta(days=args.days)
    days = await daily_usage(conn, args.customer, start, end)
    summaries = await customer_summaries(conn, start, end, args.customer)
    summary = summaries[0] if summaries else None
    period = await _period(conn, args.customer, mirror_plan, now)
    rows: list[dict[str, object]] = [
        {
            "date": day.day.isoformat(),
            "reports": day.reports,
            "peakDevices": day.peak_active_devices,
            "deviceHours": day.device_hours,
            "mqttMessages": day.mqtt_messages,
            "mqttMb": megabytes(day.mqtt_bytes),
            "httpRequests": day.http_requests,
            "httpMb": megabytes(day.http_bytes),
            "databaseMb": day.postgres_size_mb,
        }
        for day in days
    ]
    if args.output == "json":
        print_json({"customer_id": args.customer, "days": rows, "billing_period": period})
        return 0
    company = f" ({summary.company_name})" if summary and summary.company_name else ""
    print(f"Usage of {args.customer}{company}: {window_text(start, args.days)}")
    print()
    print_table(
        table_rows(rows),
        [
            "date",
            "reports",
            "peakDevices",
            "deviceHours",
            "mqttMessages",
            "mqttMb",
            "httpRequests",
            "httpMb",
            "databaseMb",
        ],
    )
    print()
    print(
        f"Billing period {period['period_start'][:10]} .. {period['period_end'][:10]}, plan {period['plan']} "
        f"({period['source']})"
    )
    print_table(overage_rows(period["overage"]), ["metric", "over", "price", "amount"])
    overage = dollars(period["overage"]["total"])
    print(
        f"Overage: {overage}"
        if period["billed"]
        else f"Overage: {overage}, not billed ({why_not_billed(period['plan'])})"
    )
    if "not_invoiced" in period:
        missed = period["not_invoiced"]
        print(f"Period {missed['period_start'][:10]} .. {missed['period_end'][:10]}: {missed['reason']}")
    return 0


def _all_rows(summaries: Sequence[Any], periods: Mapping[str, Mapping[str, Any]]) -> list[dict[str, object]]:
    return [
        {
            "customerId": summary.customer_id,
            "company": summary.company_name or "",
            "plan": periods[summary.customer_id]["plan"],
            "reports": summary.reports,
            "peakDevices": summary.peak_active_devices,
            "deviceHours": summary.device_hours,
            "trafficGb": gigabytes(summary.traffic_bytes),
            "apiCalls": summary.http_requests,
            "databaseMb": summary.postgres_size_mb,
            "lastReport": summary.last_report_at,
            "periodOverage": Decimal(periods[summary.customer_id]["overage"]["total"]),
            "billed": periods[summary.customer_id]["billed"],
        }
        for summary in summaries
    ]


def period_totals_of(periods: Iterable[Mapping[str, Any]]) -> tuple[Decimal, Decimal, list[str]]:
    """The overage owed for the periods (billed plans only), what is over the quotas of the plans that are
    not billed, and those plans."""
    billed, unbilled, plans = Decimal("0.00"), Decimal("0.00"), set()
    for period in periods:
        amount = Decimal(period["overage"]["total"])
        if period["billed"]:
            billed += amount
        elif amount:
            unbilled += amount
            plans.add(str(period["plan"]))
    return billed, unbilled, sorted(plans)


def total_lines(periods: Iterable[Mapping[str, Any]], unlisted: int) -> list[str]:
    """The total's lines under `--all`'s table."""
    billed, unbilled, plans = period_totals_of(periods)
    note = f" ({unlisted} customer{'s' if unlisted != 1 else ''} not listed: no report in the window)"
    lines = [
        f"Overage of every customer's current billing period: {dollars(billed)}{note if unlisted else ''}"
    ]
    if unbilled:
        lines.append(f"Not billed ({why_not_billed(', '.join(plans))}): {dollars(unbilled)}")
    return lines


async def _all(conn: Connection, args: argparse.Namespace, now: datetime) -> int:
    from iotistic_billing.usage.periods import window_start
    from iotistic_billing.usage.store import current_period_customers, customer_summaries

    start = window_start(now, args.days)
    end = start + timedelta(days=args.days)
    summaries = await customer_summaries(conn, start, end)
    periods = {s.customer_id: await _period(conn, s.customer_id, s.mirror_plan, now) for s in summaries}
    rows = _all_rows(summaries, periods)
    # The total is of the current periods, whatever the window: a customer silent in it still owes.
    current = await current_period_customers(conn, now)
    unlisted = [customer_id for customer_id in current if customer_id not in periods]
    for customer_id in unlisted:
        periods[customer_id] = await _period(conn, customer_id, None, now)
    if args.output == "json":
        billed, unbilled, _ = period_totals_of(periods.values())
        total = {"overage": billed, "notBilled": unbilled, "customersNotListed": unlisted}
        print_json({"customers": rows, "currentPeriods": total})
        return 0
    print(
        f"Usage of every customer: {args.days} days, {start.date()} .. {(end - timedelta(days=1)).date()} UTC"
    )
    print()
    print_table(
        table_rows(rows),
        [
            "customerId",
            "company",
            "plan",
            "reports",
            "peakDevices",
            "deviceHours",
            "trafficGb",
            "apiCalls",
            "databaseMb",
            "lastReport",
            "periodOverage",
        ],
    )
    print()
    for line in total_lines(periods.values(), len(unlisted)):
        print(line)
    return 0
