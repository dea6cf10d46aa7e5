"""The usage report an instance sends (the earlier system's payload plus an idempotency key and its
period), and the pure steps between the request body and the database: parse, check the periods, lay
out columns.

Counters are DELTAS: what happened in [period_start, period_end), not running totals since the
instance started, so that reports sum to a billing period and a lost report loses only its own
interval. active_devices and total_devices are levels at the end of the period (the billing counts
the peak of active devices); postgres_size_mb is the database size over the period (billed in
GB-months, weighted by the report's time inside each billing period).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from operator import attrgetter
from typing import Annotated, Any, Final

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import CoreSchema, ErrorDetails, core_schema, from_json, to_json

from iotistic_billing.customer import CUSTOMER_ID_PATTERN
from iotistic_billing.errors import MAX_PROBLEMS

MAX_BATCH: Final = 1000
MAX_PERIOD: Final = timedelta(days=31)
INT32_MAX: Final = 2**31 - 1
INT64_MAX: Final = 2**63 - 1
# usage_reports.postgres_size_mb is NUMERIC(14, 3): anything up to this rounds into it.
SIZE_MAX: Final = Decimal("99999999999.999")
EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(9000, 1, 1, tzinfo=UTC)
# Printable ASCII without spaces: ids end up in logs, tables and Stripe identifiers.
PRINTABLE_ID_PATTERN: Final = r"^[!-~]+$"


# Every check below is a constraint pydantic-core runs itself: a Python validator per field would make
# a batch of 1,000 reports three times slower to validate.
_TIMESTAMP = "RFC 3339 with a zone, e.g. 2026-11-01T10:00:00Z; from 2000-01-01T00:00:00Z, before 9000"
# RFC 3339's date-time (upper case T and Z, an offset with its colon): pydantic alone also reads
# "1767225600" (Unix seconds as a string), "2026-01-01 00:00:00Z" and "+0100" as times.
RFC3339_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
)


def _rfc3339(_source: Any, _handler: GetCoreSchemaHandler) -> CoreSchema:
    """A string of RFC 3339's shape, then a time: both checked by pydantic-core, one regex match more
    a timestamp. A report the code builds (the tests', the benches') may give a datetime itself."""
    must_be = f"must be {_TIMESTAMP.split(';')[0]}"
    # Bounded, so that times far outside ours never reach arithmetic that would overflow.
    bounded = core_schema.datetime_schema(ge=EARLIEST, lt=LATEST, tz_constraint="aware")
    text = core_schema.chain_schema(
        [
            core_schema.custom_error_schema(
                core_schema.str_schema(pattern=RFC3339_PATTERN, strict=True),
                custom_error_type="datetime_format",
                custom_error_message=must_be,
            ),
            bounded,
        ]
    )
    instance = core_schema.datetime_schema(ge=EARLIEST, lt=LATEST, tz_constraint="aware", strict=True)
    return core_schema.json_or_python_schema(
        json_schema=text,
        python_schema=core_schema.union_schema(
            [instance, text], custom_error_type="datetime_format", custom_error_message=must_be
        ),
    )


Timestamp = Annotated[
    AwareDatetime,
    GetPydanticSchema(_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}),
    Field(description=_TIMESTAMP),
]
# Strict: "42" is refused as the document says, and so is 42.0, which JSON Schema calls an integer too.
_WHOLE = "A whole number written without a fraction (42, not 42.0)."
Counter = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX, description=_WHOLE)]
Level = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX, description=_WHOLE)]
PrintableId = Annotated[str, Field(min_length=1, max_length=100, pattern=PRINTABLE_ID_PATTERN)]


class UsageReport(BaseModel):
    """One report of one instance; (customer_id, instance_id, report_id, period_start) is stored once (the
    key of usage_reports, partitioned by period_start)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_id: Annotated[str, Field(pattern=CUSTOMER_ID_PATTERN, max_length=37)]
    instance_id: PrintableId
    report_id: Annotated[
        PrintableId,
        Field(
            description=(
                "The idempotency key: a report sent again with it (and the same period_start) is stored"
                " once, and must repeat the report stored: one that differs in any field is a 409 naming"
                " them, and the stored report is kept."
            )
        ),
    ]
    period_start: Annotated[
        Timestamp,
        Field(
            # A description of its own replaces Timestamp's: both are said.
            description=(
                f"{_TIMESTAMP}; not before the raw reports kept (USAGE_RAW_RETENTION months, 13 by default,"
                " and never inside a billing period still open): an older report is refused, not stored."
            )
        ),
    ]
    period_end: Annotated[Timestamp, Field(description="After period_start, at most 31 days later.")]
    active_devices: Level
    total_devices: Level
    mqtt_messages_published: Counter = 0
    mqtt_messages_received: Counter = 0
    mqtt_bytes_sent: Counter = 0
    mqtt_bytes_received: Counter = 0
    http_requests: Counter = 0
    http_bytes_sent: Counter = 0
    http_bytes_received: Counter = 0
    # Numbers as reporters send them (125.5, or 0.30000000000000004): the NUMERIC(14, 3) column rounds
    # them to the thousandth, rather than this refusing them. A JSON number only, as the document says
    # (a Decimal field took strings too, and the document then said any string).
    postgres_size_mb: Annotated[float, Field(strict=True, ge=0, le=float(SIZE_MAX), allow_inf_nan=False)] = (
        0.0
    )
    postgres_row_count: Counter = 0


class UsageReportBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reports: Annotated[list[UsageReport], Field(min_length=1, max_length=MAX_BATCH)]


class _BatchShell(BaseModel):
    """A batch with its reports unread: what is wrong around them (InvalidReports' first problems)."""

    model_config = ConfigDict(extra="forbid")

    reports: Annotated[list[Any], Field(min_length=1, max_length=MAX_BATCH)]


# The body is one report or {"reports": [...]}. What the OpenAPI document shows:
ReportBody = UsageReportBatch | UsageReport
# Built once; validate_json parses and validates the raw body in one pass in pydantic-core, without
# Python dicts in between. (A union, or a callable discriminator, would build those dicts first.)
BATCH: Final = TypeAdapter(UsageReportBatch)
REPORT: Final = TypeAdapter(UsageReport)
# How batches are serialised in practice: the "reports" key first. Only a shortcut: any other body is
# tried as one report, and becomes a batch too when it turns out to have a "reports" key.
_BATCH_START: Final = re.compile(rb'\A\s*\{\s*"reports"\s*:')
_SHELL: Final = TypeAdapter(_BatchShell)
_REPORT_FIELDS: Final = frozenset(UsageReport.model_fields)


@dataclass(frozen=True)
class Problem:
    """One bad field: `reports[3].active_devices`, why, and pydantic's error type."""

    field: str
    message: str
    type: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message, "type": self.type}


class InvalidReports(ValueError):
    """The first MAX_PROBLEMS bad fields, and how many `more` there are."""

    def __init__(self, problems: Sequence[Problem], more: int = 0) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = list(problems)
        self.more = more


@dataclass(frozen=True)
class ParsedReports:
    reports: list[UsageReport]
    batch: bool

    def field(self, index: int, name: str) -> str:
        """How a field of report `index` is named in errors: as the caller wrote the body."""
        return f"reports[{index}].{name}" if self.batch else name


def field_path(loc: Sequence[int | str]) -> str:
    """('reports', 3, 'active_devices') -> 'reports[3].active_devices'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or "body"


def _problem(error: ErrorDetails) -> Problem:
    loc = error["loc"]
    kind = error["type"]
    message = error["msg"]
    if kind == "json_invalid":
        return Problem("body", "is not valid JSON", kind)
    if kind == "model_type" and not loc:
        return Problem("body", 'must be a JSON object: one report or {"reports": [...]}', kind)
    if kind == "missing":
        message = "field required"
    elif kind == "extra_forbidden":
        message = "unknown field"
    return Problem(field_path(loc), message, kind)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic collector held off while a batch is validated. A batch makes some 3,000 tracked
    objects (1,000 models, their dicts and field sets) that live on while the batch is stored: collected
    as they are made, every 700 allocations, they were carried into the old generation, and the full
    collections that followed (each walks the server's ~235,000 objects) took a quarter of the server's
    CPU under a stream of batches (bench/README.md). Paused, the batch is looked at once, afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _errors(adapter: TypeAdapter[Any], value: object) -> list[ErrorDetails]:
    try:
        adapter.validate_json(to_json(value))
    except ValidationError as invalid:
        return invalid.errors(include_url=False)
    return []


def _trimmed(value: object, known: frozenset[str]) -> object:
    """An object with its known fields and its first MAX_PROBLEMS unknown ones: what its first problems
    need."""
    if not isinstance(value, dict):
        return value
    unknown = [key for key in value if key not in known][:MAX_PROBLEMS]
    return {key: value[key] for key in (*(key for key in value if key in known), *unknown)}


def _first_errors(raw: bytes, batch: bool) -> list[ErrorDetails]:
    """The first bad fields of a body with more than MAX_PROBLEMS, found again on trimmed copies of its
    parts, report by report until there are enough: pydantic-core counts all of a body's errors cheaply,
    but makes each a Python dict only all at once (200,000 of them for a batch of unknown keys, seconds
    of the event loop)."""
    data = from_json(raw)
    if not batch:
        return _errors(REPORT, _trimmed(data, _REPORT_FIELDS))
    reports = data.get("reports") if isinstance(data, dict) else None
    shell = _trimmed(data, frozenset({"reports"}))
    if isinstance(reports, list):
        # Only its length matters to the shell: the reports themselves are checked one by one below.
        shell = {**shell, "reports": [0] * len(reports)}  # type: ignore[dict-item]
    errors = _errors(_SHELL, shell)
    if any(error["loc"] == ("reports",) for error in errors):
        return errors  # as pydantic does, reports too many (or not a list) are not looked into
    for index, report in enumerate(reports if isinstance(reports, list) else ()):
        if len(errors) >= MAX_PROBLEMS:
            break
        errors += [
            {**error, "loc": ("reports", index, *error["loc"])}
            for error in _errors(REPORT, _trimmed(report, _REPORT_FIELDS))
        ]
    return errors


def _invalid(raw: bytes, invalid: ValidationError, batch: bool) -> InvalidReports:
    count = invalid.error_count()
    errors = invalid.errors(include_url=False) if count <= MAX_PROBLEMS else _first_errors(raw, batch)
    problems = [_problem(error) for error in errors[:MAX_PROBLEMS]]
    return InvalidReports(problems, count - len(problems))


def _has_reports_key(raw: bytes, invalid: ValidationError) -> bool:
    """Whether a body tried as one report is a batch after all, its "reports" key not the first."""
    if invalid.error_count() > MAX_PROBLEMS:  # valid JSON: a body that is not has one error
        data = from_json(raw)
        return isinstance(data, dict) and "reports" in data
    return any(
        error["type"] == "extra_forbidden" and error["loc"] == ("reports",)
        for error in invalid.errors(include_url=False)
    )


def _batch(raw: bytes) -> ParsedReports:
    try:
        with _collector_paused():
            return ParsedReports(BATCH.validate_json(raw).reports, batch=True)
    except ValidationError as invalid:
        raise _invalid(raw, invalid, batch=True) from None


def parse_reports(raw: bytes) -> ParsedReports:
    """The reports of a request body, or InvalidReports naming its first MAX_PROBLEMS bad fields. A
    body with a "reports" key is a batch; any other is one report."""
    if _BATCH_START.match(raw):
        return _batch(raw)
    try:
        return ParsedReports([REPORT.validate_json(raw)], batch=False)
    except ValidationError as invalid:
        single = invalid
    if _has_reports_key(raw, single):
        return _batch(raw)
    raise _invalid(raw, single, batch=False)


def period_problems(parsed: ParsedReports, now: datetime, skew: timedelta) -> list[Problem]:
    """Periods that cannot be billed: ending before they start, longer than 31 days, in the future."""
    problems = []
    latest = now + skew
    for index, report in enumerate(parsed.reports):
        start, end = report.period_start, report.period_end
        if end <= start:
            problem = ("must be after period_start", "period_order")
        elif end - start > MAX_PERIOD:
            problem = ("must be at most 31 days after period_start", "period_length")
        elif end > latest:
            problem = (f"is in the future (this server's time is {now.isoformat()})", "period_future")
        else:
            continue
        problems.append(Problem(parsed.field(index, "period_end"), *problem))
    return problems


def retention_problems(parsed: ParsedReports, kept_since: datetime, retention_months: int) -> list[Problem]:
    """Reports that start before `kept_since`, the partition run's cutoff (usage.partitions.kept_since):
    stored, one would wait in the default partition for the next run to delete it, answered as
    accepted, and be accepted again when sent again."""
    message = (
        f"is older than the raw reports kept (USAGE_RAW_RETENTION, {retention_months} months):"
        f" reports that start before {kept_since.isoformat()} are not stored"
    )
    return [
        Problem(parsed.field(index, "period_start"), message, "period_past_retention")
        for index, report in enumerate(parsed.reports)
        if report.period_start < kept_since
    ]


def foreign_report(parsed: ParsedReports, customer_id: str) -> int | None:
    """The index of the first report of another customer than `customer_id`, if any."""
    return next(
        (index for index, report in enumerate(parsed.reports) if report.customer_id != customer_id), None
    )


def earliest_start_reaching(moment: datetime) -> datetime:
    """The earliest period_start of a report that can run past `moment`: a report is at most MAX_PERIOD
    long, so a query of the reports overlapping a billing period reads from here (and prunes the
    partitions before it), and retention keeps them."""
    return moment - MAX_PERIOD


def earliest_starts(reports: Sequence[UsageReport]) -> dict[str, datetime]:
    """Customer id -> the earliest period_start among its reports: the oldest billing period they
    fall in, which the status flush rolls up even when it has ended (usage.service)."""
    earliest: dict[str, datetime] = {}
    for report in reports:
        known = earliest.get(report.customer_id)
        if known is None or report.period_start < known:
            earliest[report.customer_id] = report.period_start
    return earliest


# The column order of usage.store's statements and its COPY; one tuple per report in this order.
COLUMNS: Final = (
    "customer_id",
    "instance_id",
    "report_id",
    "period_start",
    "period_end",
    "active_devices",
    "total_devices",
    "mqtt_messages_published",
    "mqtt_messages_received",
    "mqtt_bytes_sent",
    "mqtt_bytes_received",
    "http_requests",
    "http_bytes_sent",
    "http_bytes_received",
    "postgres_size_mb",
    "postgres_row_count",
)
# One C call per report reads the columns before the size.
_BEFORE_SIZE: Final = attrgetter(*COLUMNS[: COLUMNS.index("postgres_size_mb")])


def report_rows(reports: Sequence[UsageReport]) -> list[tuple[Any, ...]]:
    """The reports as rows in COLUMNS order, the size as the text of its shortest float (0.1 + 0.2 is
    "0.30000000000000004", not the binary float's 55 digits), which PostgreSQL reads as a numeric."""
    return [
        (*_BEFORE_SIZE(report), repr(report.postgres_size_mb), report.postgres_row_count)
        for report in reports
    ]


# A report's key (usage_reports' primary key), and what a report sent again under it must repeat.
KEY_COLUMNS: Final = COLUMNS[:4]
REPORTED_COLUMNS: Final = COLUMNS[4:]
_STORED_SIZE: Final = Decimal("0.001")  # NUMERIC(14, 3): what a size is once stored


def as_stored(column: str, value: Any) -> Any:
    """A row's value as usage_reports keeps it: the size (text, report_rows) rounded to the thousandth
    as the column rounds it (half away from zero), so that 0.1 + 0.2 sent again as 0.3 is the same."""
    return (
        Decimal(value).quantize(_STORED_SIZE, rounding=ROUND_HALF_UP)
        if column == "postgres_size_mb"
        else value
    )


@dataclass(frozen=True)
class Difference:
    """A field of report `index` sent under the key of a report stored (or of report `earlier` of the
    same request) with another value."""

    index: int
    column: str
    stored: Any
    sent: Any
    earlier: int | None = None


class ResentReportsDiffer(Exception):
    """Reports sent again under their key with other numbers: refused, as the stored report is kept
    (a retry must repeat it; a correction sent under the same key would otherwise be dropped as a
    duplicate while the wrong numbers stay billed)."""

    def __init__(self, differences: Sequence[Difference]) -> None:
        super().__init__(", ".join(f"report {d.index}: {d.column}" for d in differences))
        self.differences = list(differences)


def repeats_within(rows: Sequence[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], list[Difference]]:
    """The rows (report_rows) with each key once, its first, and the fields in which a later row under
    a key differs from its first."""
    first: dict[tuple[Any, ...], int] = {}
    kept = []
    differences: list[Difference] = []
    for index, row in enumerate(rows):
        at = first.setdefault(row[: len(KEY_COLUMNS)], index)
        if at == index:
            kept.append(row)
            continue
        earlier = rows[at]
        differences.extend(
            Difference(index, column, earlier[position], row[position], earlier=at)
            for position, column in enumerate(REPORTED_COLUMNS, len(KEY_COLUMNS))
            if as_stored(column, row[position]) != as_stored(column, earlier[position])
        )
    return kept, differences


@dataclass(frozen=True)
class Accepted:
    accepted: int
    duplicate: int


__all__ = [
    "BATCH",
    "COLUMNS",
    "KEY_COLUMNS",
    "MAX_BATCH",
    "REPORT",
    "REPORTED_COLUMNS",
    "Accepted",
    "Difference",
    "InvalidReports",
    "ParsedReports",
    "Problem",
    "ReportBody",
    "ResentReportsDiffer",
    "UsageReport",
    "UsageReportBatch",
    "as_stored",
    "earliest_start_reaching",
    "earliest_starts",
    "field_path",
    "foreign_report",
    "parse_reports",
    "period_problems",
    "repeats_within",
    "report_rows",
    "retention_problems",
]
