"""Parsing usage reports: one or a batch, strict fields, errors that name the field, period checks."""

from __future__ import annotations

import gc
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from iotistic_billing.errors import MAX_PROBLEMS, ValidationFailed
from iotistic_billing.usage.reports import (
    COLUMNS,
    INT64_MAX,
    Difference,
    InvalidReports,
    Problem,
    as_stored,
    earliest_starts,
    field_path,
    foreign_report,
    parse_reports,
    period_problems,
    repeats_within,
    report_rows,
    retention_problems,
)

NOW = datetime(2026, 11, 17, 12, tzinfo=UTC)
SKEW = timedelta(minutes=5)


def report(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "customer_id": "cust_abc123",
        "instance_id": "prod-1",
        "report_id": "r-0001",
        "period_start": "2026-11-17T10:00:00Z",
        "period_end": "2026-11-17T11:00:00Z",
        "active_devices": 42,
        "total_devices": 45,
        "mqtt_messages_published": 150000,
        "mqtt_messages_received": 120000,
        "mqtt_bytes_sent": 1500000,
        "mqtt_bytes_received": 1200000,
        "http_requests": 5000,
        "http_bytes_sent": 500000,
        "http_bytes_received": 300000,
        "postgres_size_mb": 125.5,
        "postgres_row_count": 500000,
    }
    values.update(fields)
    return {key: value for key, value in values.items() if value is not ...}


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def problems(raw: bytes) -> dict[str, str]:
    with pytest.raises(InvalidReports) as caught:
        parse_reports(raw)
    return {problem.field: problem.message for problem in caught.value.problems}


def test_the_earlier_system_payload_with_an_id_and_a_period_is_one_report() -> None:
    parsed = parse_reports(body(report()))
    assert not parsed.batch and len(parsed.reports) == 1
    stored = parsed.reports[0]
    assert stored.period_start == datetime(2026, 11, 17, 10, tzinfo=UTC)
    assert stored.postgres_size_mb == Decimal("125.500")
    assert stored.mqtt_bytes_sent == 1_500_000


def test_a_batch_holds_up_to_a_thousand_reports() -> None:
    reports = [report(report_id=f"r-{i}") for i in range(1000)]
    parsed = parse_reports(body({"reports": reports}))
    assert parsed.batch and len(parsed.reports) == 1000
    assert problems(body({"reports": [*reports, report(report_id="one-too-many")]})) == {
        "reports": "List should have at most 1000 items after validation, not 1001"
    }
    assert "reports" in problems(body({"reports": []}))


def test_errors_name_the_field_inside_the_batch() -> None:
    reports = [report(report_id=f"r-{i}") for i in range(5)]
    reports[3]["active_devices"] = -1
    reports[1]["mqtt_bytes_sent"] = INT64_MAX + 1
    reports[4]["colour"] = "blue"
    del reports[2]["instance_id"]
    found = problems(body({"reports": reports}))
    assert found == {
        "reports[3].active_devices": "Input should be greater than or equal to 0",
        "reports[1].mqtt_bytes_sent": f"Input should be less than or equal to {INT64_MAX}",
        "reports[4].colour": "unknown field",
        "reports[2].instance_id": "field required",
    }


def test_a_batch_full_of_bad_fields_names_the_first_hundred_and_counts_the_rest() -> None:
    """Found in review: a batch of 1,000 reports of 200 unknown keys each was refused naming every one
    of its 200,000 bad fields, a 24 MB answer built in 3.4 s of the event loop."""
    unknown = {f"colour_{key}": key for key in range(200)}
    batch = body({"reports": [report(report_id=f"r-{i}", **unknown) for i in range(1000)]})
    with pytest.raises(InvalidReports) as caught:
        parse_reports(batch)
    assert len(caught.value.problems) == MAX_PROBLEMS
    assert caught.value.more == 200_000 - MAX_PROBLEMS
    assert caught.value.problems[0] == Problem("reports[0].colour_0", "unknown field", "extra_forbidden")
    refused = ValidationFailed([problem.to_json() for problem in caught.value.problems], caught.value.more)
    assert len(refused.details) == MAX_PROBLEMS
    assert refused.message.endswith("reports[0].colour_99: unknown field; ... and 199,900 more problems")
    # Every route's 400 is held to it.
    many = ValidationFailed([{"field": "x", "message": "unknown field", "type": "extra_forbidden"}] * 150)
    assert len(many.details) == MAX_PROBLEMS and many.message.endswith("; ... and 50 more problems")
    # One report of them is as bounded, and so is a batch whose own keys are the bad ones.
    with pytest.raises(InvalidReports) as caught:
        parse_reports(body(report(**{f"colour_{key}": key for key in range(100_000)})))
    assert (len(caught.value.problems), caught.value.more) == (MAX_PROBLEMS, 100_000 - MAX_PROBLEMS)
    with pytest.raises(InvalidReports) as caught:
        parse_reports(body({"reports": [report(active_devices=-1)] * 1001, **unknown}))
    # Too long, said first; pydantic looks no further into the reports.
    assert caught.value.problems[0].field == "reports"
    assert (len(caught.value.problems), caught.value.more) == (MAX_PROBLEMS, 1 + 200 - MAX_PROBLEMS)


def test_a_single_report_names_its_fields_without_a_prefix() -> None:
    assert problems(body(report(http_requests=1.5, customer_id="acme"))) == {
        "http_requests": "Input should be a valid integer",
        "customer_id": "String should match pattern '^cust_[a-z0-9]{6,32}$'",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("active_devices", "42"),  # a string is not a count
        ("active_devices", True),
        ("active_devices", 2**31),  # usage_reports.active_devices is an int4
        ("http_requests", 10.0),  # counters are integers, not floats that happen to be whole
        ("period_start", "2026-11-17T10:00:00"),  # no zone
        ("period_start", 1763373600),  # RFC 3339 strings only, not Unix seconds
        # Found in review: pydantic read these as times, though RFC 3339 spells none of them so.
        ("period_start", "1763373600"),  # Unix seconds as a string
        ("period_start", "1763373600000"),  # milliseconds
        ("period_end", "2026-11-17 11:00:00Z"),  # a space for the T
        ("period_start", "2026-11-17t10:00:00z"),
        ("period_start", "2026-11-17T10:00:00+0100"),  # an offset without its colon
        ("period_start", "2026-11-17T10:00Z"),  # no seconds
        ("period_start", "2026-11-17T10:00:00.Z"),
        ("period_start", "\uff12\uff10\uff12\uff16-11-17T10:00:00Z"),  # fullwidth digits
        ("period_start", "2026-11-17"),
        ("period_start", "1999-12-31T23:00:00Z"),  # out of range
        ("postgres_size_mb", -0.5),
        ("postgres_size_mb", "NaN"),
        ("postgres_size_mb", 1e12),
        ("report_id", ""),
        ("report_id", "x" * 101),
        ("instance_id", "prod 1"),  # no spaces or control characters in ids
        ("instance_id", "prod\u00001"),
    ],
)
def test_strict_fields_refuse_what_would_be_guessed(field: str, value: Any) -> None:
    assert field in problems(body(report(**{field: value})))


def test_optional_counters_default_to_zero_and_sizes_are_kept_for_the_column_to_round() -> None:
    minimal = {key: report()[key] for key in ("customer_id", "instance_id", "report_id", "period_start")}
    minimal.update({"period_end": "2026-11-17T11:00:00+01:00", "active_devices": 1, "total_devices": 1})
    parsed = parse_reports(body({**minimal, "postgres_size_mb": 0.30000000000000004}))
    stored = parsed.reports[0]
    assert stored.http_requests == 0 and stored.postgres_row_count == 0
    # Not refused: NUMERIC(14, 3) stores it as 0.300 (tests/integration/test_usage_reports.py).
    assert report_rows([stored])[0][COLUMNS.index("postgres_size_mb")] == "0.30000000000000004"
    # Zones are kept as instants: 11:00+01:00 is 10:00 UTC.
    assert stored.period_end == datetime(2026, 11, 17, 10, tzinfo=UTC)


def test_bodies_that_are_not_reports_say_so() -> None:
    assert problems(b"{not json") == {"body": "is not valid JSON"}
    assert problems(b"") == {"body": "is not valid JSON"}
    assert set(problems(b"[1, 2]")) == {"body"}


def test_period_problems_name_the_period_end_of_each_report() -> None:
    reports = [
        report(report_id="fine"),
        report(report_id="backwards", period_end="2026-11-17T09:00:00Z"),
        report(report_id="too-long", period_start="2026-10-01T00:00:00Z", period_end="2026-11-02T00:00:00Z"),
        report(report_id="future", period_end="2026-11-17T12:06:00Z"),
        report(report_id="within-skew", period_end="2026-11-17T12:04:00Z"),
        report(report_id="31-days", period_start="2026-10-17T00:00:00Z", period_end="2026-11-17T00:00:00Z"),
    ]
    found = period_problems(parse_reports(body({"reports": reports})), NOW, SKEW)
    assert [(p.field, p.type) for p in found] == [
        ("reports[1].period_end", "period_order"),
        ("reports[2].period_end", "period_length"),
        ("reports[3].period_end", "period_future"),
    ]
    single = period_problems(parse_reports(body(report(period_end="2026-11-17T10:00:00Z"))), NOW, SKEW)
    assert [p.field for p in single] == ["period_end"]


def test_a_report_that_starts_before_the_raw_reports_kept_is_refused_naming_its_period_start() -> None:
    """Found in review: a report of a month the retention had dropped was stored in the default
    partition, answered "accepted", and deleted by the next partition run."""
    kept_since = datetime(2025, 10, 17, 12, tzinfo=UTC)
    reports = [
        report(period_start="2025-10-17T12:00:00Z", period_end="2025-10-17T13:00:00Z"),
        # Ends after the cutoff, starts before it: the partition run goes by period_start.
        report(report_id="old", period_start="2025-10-17T11:59:59Z", period_end="2025-10-17T13:00:00Z"),
    ]
    found = retention_problems(parse_reports(body({"reports": reports})), kept_since, 13)
    assert [(p.field, p.type) for p in found] == [("reports[1].period_start", "period_past_retention")]
    assert found[0].message == (
        "is older than the raw reports kept (USAGE_RAW_RETENTION, 13 months):"
        " reports that start before 2025-10-17T12:00:00+00:00 are not stored"
    )
    single = retention_problems(parse_reports(body(reports[1])), kept_since, 13)
    assert [p.field for p in single] == ["period_start"]
    assert retention_problems(parse_reports(body(reports[0])), kept_since, 13) == []


def test_foreign_report_finds_the_first_report_of_another_customer() -> None:
    parsed = parse_reports(
        body(
            {"reports": [report(), report(report_id="b"), report(customer_id="cust_other99", report_id="c")]}
        )
    )
    assert foreign_report(parsed, "cust_abc123") == 2
    assert parsed.field(2, "customer_id") == "reports[2].customer_id"
    assert foreign_report(parse_reports(body(report())), "cust_abc123") is None


def test_earliest_starts_give_each_customer_the_oldest_period_its_reports_fall_in() -> None:
    parsed = parse_reports(
        body(
            {
                "reports": [
                    report(),
                    report(report_id="b", period_start="2026-10-31T23:00:00+00:00"),
                    # An hour earlier than it reads: 22:30 UTC.
                    report(report_id="c", period_start="2026-11-01T00:30:00+02:00"),
                    report(customer_id="cust_other99", report_id="d"),
                ]
            }
        )
    )
    assert earliest_starts(parsed.reports) == {
        "cust_abc123": datetime(2026, 10, 31, 22, 30, tzinfo=UTC),
        "cust_other99": datetime(2026, 11, 17, 10, tzinfo=UTC),
    }


def test_rows_are_laid_out_in_insert_order() -> None:
    parsed = parse_reports(
        body(
            {
                "reports": [
                    report(report_id="a"),
                    report(report_id="b", active_devices=7, postgres_size_mb=1e-05),
                ]
            }
        )
    )
    rows = report_rows(parsed.reports)
    assert [len(row) for row in rows] == [len(COLUMNS)] * 2 == [16, 16]
    for row, stored in zip(rows, parsed.reports, strict=True):
        by_name = dict(zip(COLUMNS, row, strict=True))
        # Every column is the report's field, the size as the text of its float (PostgreSQL reads it).
        assert {name: value for name, value in by_name.items() if name != "postgres_size_mb"} == {
            name: getattr(stored, name) for name in COLUMNS if name != "postgres_size_mb"
        }
        assert Decimal(by_name["postgres_size_mb"]) == Decimal(repr(stored.postgres_size_mb))
    assert [row[COLUMNS.index("report_id")] for row in rows] == ["a", "b"]
    assert [row[COLUMNS.index("postgres_size_mb")] for row in rows] == ["125.5", "1e-05"]


def test_field_path_reads_like_the_body() -> None:
    assert field_path(("reports", 3, "active_devices")) == "reports[3].active_devices"
    assert field_path(("period_end",)) == "period_end"
    assert field_path(()) == "body"


def test_a_body_with_a_reports_key_is_a_batch_wherever_the_key_is() -> None:
    one = report()
    spaced = b'  {\n  "reports" : ' + body([one]) + b"}"
    assert parse_reports(spaced).batch
    assert parse_reports(body({"reports": [one]})).batch
    # "reports" not first: still a batch, and the other key is what is wrong with it.
    assert problems(body({"customer_id": "cust_abc123", "reports": [one]})) == {
        "customer_id": "unknown field"
    }
    assert problems(body({"reports": "all of them"})) == {"reports": "Input should be a valid array"}


def test_numbers_are_json_numbers_as_the_document_says() -> None:
    # The document says number for the size and integer for the counts: a string is refused (a Decimal
    # field took "=" and the document then allowed any string), and so is a count with a fraction,
    # which the document's descriptions state (JSON Schema's integer includes 42.0).
    assert set(problems(body(report(postgres_size_mb="125.5")))) == {"postgres_size_mb"}
    assert set(problems(body(report(active_devices=42.0)))) == {"active_devices"}
    assert parse_reports(body(report(postgres_size_mb=125))).reports[0].postgres_size_mb == 125


def test_a_batch_is_validated_with_the_collector_paused_and_left_as_it_was() -> None:
    batch = body({"reports": [report(report_id=f"r-{i}") for i in range(3)]})
    assert len(parse_reports(batch).reports) == 3
    assert gc.isenabled()
    with pytest.raises(InvalidReports):
        parse_reports(body({"reports": [report(active_devices=-1)]}))
    assert gc.isenabled()
    gc.disable()  # whoever paused it before keeps it paused
    try:
        parse_reports(batch)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_report_twice_in_a_batch_is_kept_once_and_its_other_numbers_are_named() -> None:
    """Found in review: a report sent twice under one key with other numbers was dropped as a duplicate,
    whichever of the two PostgreSQL happened to keep."""
    parsed = parse_reports(
        body(
            {
                "reports": [
                    report(report_id="a", mqtt_bytes_sent=10**13),
                    report(report_id="b"),
                    # The same instant in another zone, and a size the column keeps as the same 125.500.
                    report(report_id="b", period_end="2026-11-17T12:00:00+01:00", postgres_size_mb=125.5001),
                    report(report_id="a", mqtt_bytes_sent=10**10, postgres_size_mb=125.4),
                ]
            }
        )
    )
    rows = report_rows(parsed.reports)
    kept, differences = repeats_within(rows)
    assert kept == rows[:2]
    assert differences == [
        Difference(3, "mqtt_bytes_sent", 10**13, 10**10, earlier=0),
        Difference(3, "postgres_size_mb", "125.5", "125.4", earlier=0),
    ]
    assert as_stored("postgres_size_mb", "0.30000000000000004") == Decimal("0.300")
    assert as_stored("postgres_size_mb", "0.0005") == Decimal("0.001")  # half away from zero, as NUMERIC
