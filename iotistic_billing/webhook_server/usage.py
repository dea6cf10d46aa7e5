"""Usage routes: instances report usage (`POST /api/usage/report`), and the usage of a customer is read
back per report (a page at a time), per UTC day and for the current billing period
(`GET /api/usage/{customerId}`).

The report route is the hot one: the body is read with its own size limit, parsed and validated in one
pass, checked against the caller's key, and stored with one statement (only a request holding a report
older than the raw retention's months asks PostgreSQL for the cutoff first); the Customer's status
follows through the coalescer and the flusher (usage.service), never from the request.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import hdrs, web

from iotistic_billing.db.pool import DatabaseUnavailable, connection
from iotistic_billing.directory import CustomerRecord
from iotistic_billing.errors import (
    ApiError,
    Conflict,
    DependencyUnavailable,
    Forbidden,
    ValidationFailed,
)
from iotistic_billing.usage.options import REPORT_LIST_LIMIT
from iotistic_billing.usage.partitions import kept_since, retention_cutoff
from iotistic_billing.usage.periods import utc_days, window_start
from iotistic_billing.usage.pricing import Overage, PeriodTotals
from iotistic_billing.usage.reports import (
    Difference,
    InvalidReports,
    ParsedReports,
    Problem,
    ResentReportsDiffer,
    as_stored,
    foreign_report,
    parse_reports,
    period_problems,
    retention_problems,
)
from iotistic_billing.usage.rollups import (
    BILLED_PLANS,
    compute_rollup,
    included_usage,
    overage_json,
    priced_plan,
)
from iotistic_billing.usage.service import (
    UsageMetering,
    cancelled_by,
    customer_plan,
    ended_early,
    open_period,
)
from iotistic_billing.usage.status import exceeded
from iotistic_billing.usage.store import (
    DailyUsage,
    ReportPosition,
    daily_usage,
    period_totals,
    recent_reports,
)
from iotistic_billing.webhook_server.context import CLOCK, DIRECTORY, OPTIONS, PRINCIPAL, SESSIONS, USAGE
from iotistic_billing.webhook_server.messages import json_model, read_customer_id, read_query
from iotistic_billing.webhook_server.schemas import (
    BillingPeriodUsage,
    IncludedUsageView,
    OverageView,
    PeriodTotalsView,
    UsageDay,
    UsageHistory,
    UsageQuery,
    UsageReportView,
)


def payload_too_large(limit: int) -> ApiError:
    return ApiError(
        "Payload too large",
        f"the request body is larger than {limit} bytes; send at most 1,000 reports per request",
        {"limit": limit},
        status=413,
    )


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The body, up to `limit` bytes (this route's own limit, above the app's client_max_size), counted
    as aiohttp inflates it when it comes compressed."""
    length = request.content_length
    if length is not None and length > limit:
        raise payload_too_large(limit)
    # A compressed body's Content-Length says nothing of what it inflates to, which read() holds to the
    # app's smaller limit.
    plain = request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() == "identity"
    if plain and length is not None and length <= request.app[OPTIONS].client_max_size:
        return await request.read()  # the common case, a report or a small batch: one read
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise payload_too_large(limit)
    return bytes(body)


def _invalid(problems: list[Problem], more: int = 0) -> ValidationFailed:
    return ValidationFailed([problem.to_json() for problem in problems], more)


async def past_retention(usage: UsageMetering, parsed: ParsedReports, now: datetime) -> list[Problem]:
    """Reports that start before the raw reports kept, which the next partition run would delete. The
    cutoff is never later than the retention's months before `now` (an open billing period holds it
    earlier), so PostgreSQL is asked only for a request holding a report older than those."""
    months = usage.options.raw_retention_months
    if min(report.period_start for report in parsed.reports) >= retention_cutoff(now, months, None):
        return []
    try:
        async with connection(usage.pool) as conn:
            cutoff = await kept_since(conn, now, months)
    except DatabaseUnavailable:
        raise DependencyUnavailable("Database") from None
    return retention_problems(parsed, cutoff, months)


def _shown(value: Any) -> Any:
    """A stored or sent value as JSON: times in RFC 3339, sizes as decimal strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value) if isinstance(value, Decimal) else value


def resent_differs(parsed: ParsedReports, differences: list[Difference]) -> Conflict:
    """The 409 of reports sent again under their key with other values, naming each field."""
    problems = []
    for difference in differences:
        field = parsed.field(difference.index, difference.column)
        sent = _shown(difference.sent)
        if difference.earlier is None:
            stored = _shown(difference.stored)
            message = f"sent {sent}, but the report stored under this report_id and period_start has {stored}"
        else:
            stored = _shown(as_stored(difference.column, difference.stored))
            earlier = parsed.field(difference.earlier, "report_id")
            message = f"sent {sent}, but {earlier} is the same report with {stored}"
        problems.append(
            {"field": field, "message": message, "type": "report_differs", "stored": stored, "sent": sent}
        )
    return Conflict(
        "Report differs from the one stored",
        "a report sent again must repeat the one stored under its report_id and period_start, which is"
        " kept; nothing of the request was stored: "
        + "; ".join(f"{problem['field']}: {problem['message']}" for problem in problems),
        problems,
    )


async def report_usage(request: web.Request) -> web.Response:
    """Store one report or a batch, each exactly once; 202 with how many were new, 409 naming the fields of
    a report sent again with other values than those stored."""
    usage = request.app[USAGE]
    raw = await read_limited(request, usage.options.max_body)
    now = request.app[CLOCK]()
    try:
        parsed = parse_reports(raw)
    except InvalidReports as invalid:
        raise _invalid(invalid.problems, invalid.more) from None
    problems = period_problems(parsed, now, usage.options.clock_skew) or await past_retention(
        usage, parsed, now
    )
    if problems:
        raise _invalid(problems)
    principal = request[PRINCIPAL]
    if principal.kind == "instance":
        assert principal.customer_id is not None
        index = foreign_report(parsed, principal.customer_id)
        if index is not None:
            field = parsed.field(index, "customer_id")
            # Nothing of the request is stored: a batch is all or nothing.
            raise ApiError(
                "Forbidden",
                f"{field} is {parsed.reports[index].customer_id}; this usage key reports for "
                f"{principal.customer_id} only",
                {"index": index, "field": field},
                status=403,
            )
    try:
        stored = await usage.store(parsed, now)
    except DatabaseUnavailable:
        raise DependencyUnavailable("Database") from None
    except ResentReportsDiffer as differing:
        # A correction under the same key would otherwise read as a duplicate, while the stored numbers
        # stay billed: refused, all or nothing as every other problem of a batch.
        raise resent_differs(parsed, differing.differences) from None
    return web.json_response({"accepted": stored.accepted, "duplicate": stored.duplicate}, status=202)


# ----- reading usage back -----


def report_view(row: dict[str, Any]) -> UsageReportView:
    return UsageReportView.model_validate({**row, "postgres_size_mb": str(row["postgres_size_mb"])})


def daily_views(days: list[date], rows: list[DailyUsage]) -> list[UsageDay]:
    """One entry per day of the window; a day without reports is all zeros."""
    by_day = {row.day: row for row in rows}
    views = []
    for day in days:
        row = by_day.get(day)
        views.append(
            UsageDay(
                date=day,
                reports=row.reports if row else 0,
                peak_active_devices=row.peak_active_devices if row else 0,
                mqtt_messages=row.mqtt_messages if row else 0,
                mqtt_bytes=row.mqtt_bytes if row else 0,
                http_requests=row.http_requests if row else 0,
                http_bytes=row.http_bytes if row else 0,
                postgres_size_mb=str(row.postgres_size_mb)
                if row and row.postgres_size_mb is not None
                else None,
                device_hours=str(row.device_hours) if row else "0.000",
            )
        )
    return views


def not_billed_reason(plan: str, period_start: datetime, ended: datetime | None) -> str | None:
    """Why the period's overage is not billed, for a person; None when it is."""
    if plan in BILLED_PLANS:
        return None
    if ended is not None and period_start >= ended:
        return (
            f"the subscription ended at {ended.isoformat()}: usage from then on is on no paid plan, and"
            " the overage before it was the ended period's"
        )
    return f"plan {plan}: only paid plans are billed"


def period_view(
    plan: str, totals: PeriodTotals, bill: Overage, ended: datetime | None = None
) -> BillingPeriodUsage:
    included = included_usage(plan)
    over = exceeded(totals, included)
    return BillingPeriodUsage(
        plan=plan,
        period_start=totals.period_start,
        period_end=totals.period_end,
        included=IncludedUsageView(
            devices=included.devices,
            traffic_gb=included.traffic_gb,
            storage_gb=included.storage_gb,
            api_calls=included.api_calls,
        ),
        totals=PeriodTotalsView(
            peak_devices=totals.peak_devices,
            mqtt_bytes=totals.mqtt_bytes,
            http_bytes=totals.http_bytes,
            api_calls=totals.api_calls,
            storage_gb_months=str(totals.storage_gb_months),
            reports=totals.reports,
            device_hours=str(totals.device_hours),
        ),
        overage=OverageView.model_validate(overage_json(bill)),
        # As the meter run has it (Rollup.billed): the totals stay, so that a trial sees what it would owe.
        billed=plan in BILLED_PLANS,
        not_billed_reason=not_billed_reason(plan, totals.period_start, ended),
        within_limits=not over,
        exceeded=over,
    )


async def usage_history(
    request: web.Request,
    record: CustomerRecord,
    days: int,
    now: datetime,
    *,
    reports_before: ReportPosition | None = None,
    reports_limit: int = REPORT_LIST_LIMIT,
) -> UsageHistory:
    usage = request.app[USAGE]
    start = window_start(now, days)
    end = start + timedelta(days=days)
    async with connection(usage.pool) as conn:
        # The period the flush and the rollups use (never reaching back into an ended one).
        period = await open_period(conn, record.customer_id, record.customer, now)
        # Priced as the flush prices it: a lapse keeps the paid plan the period held.
        plan = await priced_plan(
            conn,
            record.customer_id,
            period,
            customer_plan(record.customer, period),
            lapsed=cancelled_by(record.customer, period.start),
        )
        daily = await daily_usage(conn, record.customer_id, start, end)
        page = await recent_reports(
            conn,
            record.customer_id,
            start,
            end,
            min(reports_limit, usage.options.report_list_limit),
            reports_before,
        )
        totals = await period_totals(conn, record.customer_id, period)
    count = sum(day.reports for day in daily)
    rollup = compute_rollup(record.customer_id, period, plan, totals)
    return UsageHistory(
        customer_id=record.customer_id,
        days=days,
        window_start=start,
        window_end=end,
        report_count=count,
        reports=[report_view(row) for row in page.reports],
        reports_truncated=page.more_after is not None,
        reports_next_cursor=page.more_after,
        daily=daily_views(utc_days(start, end - timedelta(microseconds=1)), daily),
        billing_period=period_view(plan, totals, rollup.overage, ended_early(record.customer)),
    )


async def get_usage(request: web.Request) -> web.Response:
    """A customer's reports (a page), daily series and current billing period with its overage."""
    customer_id = read_customer_id(request)
    principal = request[PRINCIPAL]
    # Checked before any lookup: a usage key learns nothing about other customers, not even existence.
    if principal.kind == "instance" and principal.customer_id != customer_id:
        raise Forbidden("a usage key may only read its own customer's usage")
    query = read_query(request, UsageQuery)
    async with request.app[SESSIONS]() as session:
        record = await request.app[DIRECTORY].existing(session, customer_id)
    try:
        history = await usage_history(
            request,
            record,
            query.days,
            request.app[CLOCK](),
            reports_before=query.reports_before,
            reports_limit=query.reports_limit,
        )
    except DatabaseUnavailable:
        raise DependencyUnavailable("Database") from None
    return json_model(history)


__all__ = [
    "daily_views",
    "get_usage",
    "not_billed_reason",
    "past_retention",
    "period_view",
    "read_limited",
    "report_usage",
    "report_view",
    "resent_differs",
]
