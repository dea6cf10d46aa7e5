"""What a handler reads from a request (the JSON body, the query, the `{customerId}` of the path) and
how it answers in JSON; a bad input is a 400 naming the field."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from iotistic_billing.customer import CustomerId
from iotistic_billing.errors import ApiError, ValidationFailed

M = TypeVar("M", bound=BaseModel)
CUSTOMER_ID_PARAMETER = "customerId"
NOTICE_ID_PARAMETER = "noticeId"
NOTICE_ID_MAX = 2**63 - 1
_CUSTOMER_ID: TypeAdapter[str] = TypeAdapter(CustomerId)
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
# Stripe's own limit of its Idempotency-Key: a client's key made for Stripe fits ours.
IDEMPOTENCY_KEY_MAX = 255
# The draft "The Idempotency-Key HTTP Header Field" sends a structured-field String (quoted, `\"` and
# `\\` escaped); Stripe's clients send the bare key. Either is read, as printable ASCII; one starting
# with a quote is a String. Their lengths are the key's (an escape is one character of it), so the one
# pattern is both the rule and the OpenAPI document's, and Schemathesis draws no key the server refuses.
_QUOTED_KEY = rf'"(?:[ !#-\[\]-~]|\\["\\]){{1,{IDEMPOTENCY_KEY_MAX}}}"'
_BARE_KEY = rf"[!#-~](?:[ -~]{{0,{IDEMPOTENCY_KEY_MAX - 2}}}[!-~])?"
# ECMA-262 as JSON Schema reads it, and Python's alike.
IDEMPOTENCY_KEY_PATTERN = f"^(?:{_BARE_KEY}|{_QUOTED_KEY})$"
# The longest header: a quoted key of escapes alone.
IDEMPOTENCY_KEY_HEADER_MAX = 2 * IDEMPOTENCY_KEY_MAX + 2
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def parse_json(raw: str | bytes) -> object:
    """A request body as JSON (RFC 8259: NaN and Infinity, which json.loads takes and neither the
    models nor JSONB do, refused), or a 400 naming the body. UTF-8 without a byte order mark only, as
    the usage reports' parser reads them: json.loads takes UTF-16 and UTF-32 bytes too, and drops a
    BOM."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationFailed.single("body", "is not valid JSON: not UTF-8") from None
    if raw.startswith("\ufeff"):
        raise ValidationFailed.single(
            "body", "is not valid JSON: a byte order mark before it (UTF-8 without one only)"
        )
    try:
        return json.loads(raw, parse_constant=_not_json)
    # RecursionError: nested deeper than the parser's recursion limit (~1,000 levels).
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValidationFailed.single("body", "is not valid JSON") from None


async def read_body(request: web.Request, model: type[M]) -> M:
    """The JSON body as `model`, or a 400 naming each bad field (413 beyond client_max_size). Validated
    as JSON, where a strict model (schemas.Request) takes each type as JSON writes it: an RFC 3339
    string for a time, only true and false for a boolean."""
    raw = await request.read()
    data = parse_json(raw) if raw else None
    if not isinstance(data, dict):
        raise ValidationFailed.single("body", "must be a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as invalid:
        raise ValidationFailed.from_pydantic(invalid) from None


def read_query(request: web.Request, model: type[M]) -> M:
    """The query as `model`, or a 400 naming each bad parameter. One the model reads given twice is
    refused, rather than its first taken (?limit=1&limit=500); unknown ones are ignored."""
    repeated = [name for name in model.model_fields if len(request.query.getall(name, [])) > 1]
    if repeated:
        raise ValidationFailed(
            [{"field": name, "message": "must be given once", "type": "query_repeated"} for name in repeated]
        )
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as invalid:
        raise ValidationFailed.from_pydantic(invalid) from None


def read_customer_id(request: web.Request) -> str:
    """The `{customerId}` of the path, or a 400 naming it: the CRD's pattern, which every id in use
    (spec.customerId, status.customerId, the operator's derived ids) matches."""
    try:
        return _CUSTOMER_ID.validate_python(request.match_info[CUSTOMER_ID_PARAMETER])
    except ValidationError as invalid:
        raise ValidationFailed.from_pydantic(invalid, prefix=CUSTOMER_ID_PARAMETER) from None


def read_idempotency_key(request: web.Request) -> str | None:
    """The client's Idempotency-Key, or None without one; a 400 naming the header when it is given twice,
    empty, longer than IDEMPOTENCY_KEY_MAX or not printable ASCII. A retry sending the same key is the
    same request: what it makes is derived from the key (see `key_digest`)."""
    given = request.headers.getall(IDEMPOTENCY_KEY_HEADER, [])
    if not given:
        return None
    if len(given) > 1:
        raise ValidationFailed.single(IDEMPOTENCY_KEY_HEADER, "must be given once")
    # As given: the HTTP parser has dropped the spaces and tabs around it (RFC 9110's OWS).
    raw = given[0]
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        raise ValidationFailed.single(
            IDEMPOTENCY_KEY_HEADER,
            f"must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters, bare or as a quoted string",
        )
    return re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw


def idempotency_key_reused(message: str, **facts: str) -> ApiError:
    """The IETF draft's answer to an Idempotency-Key sent again with another request: 422 naming it (here
    Stripe's idempotency_error, to the key derived from it, surfaced as the client's)."""
    return ApiError(
        "Idempotency-Key reused",
        message,
        [
            {
                "field": IDEMPOTENCY_KEY_HEADER,
                "message": "was sent with another request",
                "type": "idempotency_key_reused",
                **facts,
            }
        ],
        status=422,
    )


def key_digest(*scope: str) -> str:
    """A digest of a client's idempotency key with the route and customer it was sent for (`scope`, the
    key last): what is sent to Stripe or named in a Customer, never the client's key itself, and one
    client's key cannot stand for another customer's or another route's request."""
    return hashlib.sha256("\0".join(scope).encode()).hexdigest()


def read_decimal(text: str, limit: int) -> int | None:
    """A path's or query's number: None unless `text` is ASCII digits alone (str.isdigit takes "²"); a
    number past `limit` reads as limit + 1, as int() refuses 4,300 digits and more (a ValueError)."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(limit)):
        return limit + 1
    return min(int(digits), limit + 1)


def read_notice_id(request: web.Request) -> int:
    """The `{noticeId}` of the path (a notices.id), or a 400 naming it."""
    notice_id = read_decimal(request.match_info[NOTICE_ID_PARAMETER], NOTICE_ID_MAX)
    if notice_id is None or not 1 <= notice_id <= NOTICE_ID_MAX:
        raise ValidationFailed.single(NOTICE_ID_PARAMETER, f"must be an integer from 1 to {NOTICE_ID_MAX}")
    return notice_id


def json_model(model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(
        model.model_dump(mode="json", by_alias=True), status=status, headers=dict(headers or {})
    )


__all__ = [
    "CUSTOMER_ID_PARAMETER",
    "IDEMPOTENCY_KEY_HEADER",
    "IDEMPOTENCY_KEY_HEADER_MAX",
    "IDEMPOTENCY_KEY_MAX",
    "IDEMPOTENCY_KEY_PATTERN",
    "NOTICE_ID_MAX",
    "NOTICE_ID_PARAMETER",
    "idempotency_key_reused",
    "json_model",
    "key_digest",
    "read_body",
    "read_customer_id",
    "read_decimal",
    "read_idempotency_key",
    "read_notice_id",
    "read_query",
]
