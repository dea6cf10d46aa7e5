"""Schemathesis hooks of test_webhook_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Some rules of the API are stated in the OpenAPI document's words but cannot be written in JSON Schema,
so a generated request can satisfy the schema and still break them. A refusal is dropped only when
every problem its 400 names is one of those rules; every other failure of every check stands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData

PERIOD_FIELD = re.compile(r"(reports\[\d+\]\.)?period_(start|end)")
NUMBER_FIELD = re.compile(r"(reports\[(?P<index>\d+)\]\.)?(?P<name>[a-z_]+)")


def _sent(body: Any, field: str) -> Any:
    """The value the case sent for an error's field (`reports[2].active_devices`, `total_devices`)."""
    match = NUMBER_FIELD.fullmatch(field)
    if match is None or not isinstance(body, dict):
        return None
    if match["index"] is not None:
        reports = body.get("reports")
        index = int(match["index"])
        body = reports[index] if isinstance(reports, list) and index < len(reports) else {}
    return body.get(match["name"]) if isinstance(body, dict) else None


def _usage_rule(case: Any, problem: dict[str, Any]) -> bool:
    kind, field = problem.get("type"), str(problem.get("field"))
    # period_end's description: after period_start, at most 31 days later.
    if kind in ("period_order", "period_length"):
        return True
    # The timestamps' description: from 2000-01-01T00:00:00Z, before 9000 (a zone offset moves a time
    # that a pattern on the text would pass).
    if kind in ("greater_than_equal", "less_than") and PERIOD_FIELD.fullmatch(field):
        return True
    # period_start's description: not before the raw reports kept (USAGE_RAW_RETENTION months).
    if kind == "period_past_retention" and field.endswith("period_start"):
        return True
    # The counters' and levels' description: written without a fraction (JSON Schema's integer
    # includes 42.0).
    sent = _sent(case.body, field)
    return kind == "int_type" and isinstance(sent, float) and sent.is_integer()


def _reports_cursor_rule(case: Any, problem: dict[str, Any]) -> bool:
    # reports_before's description: the reports_next_cursor of an earlier answer (a generated text that
    # fits its pattern is none).
    return problem.get("field") == "reports_before" and problem.get("type") == "reports_cursor"


def _stripe_rule(case: Any, body: dict[str, Any]) -> bool:
    # The Stripe-Signature header's description: an HMAC of the body with the endpoint secret. A
    # generated header never verifies (Stripe's advice for that is a 400).
    return body.get("error") == "Invalid signature"


def _per_problem(rule: Callable[[Any, dict[str, Any]], bool]) -> Callable[[Any, dict[str, Any]], bool]:
    def every(case: Any, body: dict[str, Any]) -> bool:
        details = body.get("details")
        return isinstance(details, list) and bool(details) and all(rule(case, p) for p in details)

    return every


# (method, path) -> whether a 400 answer is a rule stated in words.
STATED_RULES: dict[tuple[str, str], Callable[[Any, dict[str, Any]], bool]] = {
    ("POST", "/api/webhooks/stripe"): _stripe_rule,
    ("POST", "/api/usage/report"): _per_problem(_usage_rule),
    ("GET", "/api/usage/{customerId}"): _per_problem(_reports_cursor_rule),
}


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """True keeps the failure."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
        return True
    rule = STATED_RULES.get((case.method.upper(), case.operation.path))
    if rule is None:
        return True
    try:
        body = json.loads(response.content)
    except ValueError:
        return True
    return not (isinstance(body, dict) and rule(case, body))
