"""The route table's entries: one `Operation` per route says who may call it and what it takes and answers.

The same entries register the aiohttp routes, drive the authentication middleware and write the OpenAPI
document, so a route cannot exist undocumented or unguarded.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from iotistic_billing.customer import CustomerId
from iotistic_billing.webhook_server.errors import ValidationFailed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# public: anyone; admin: the bearer token; instance: the bearer token or the customer's own usage key;
# stripe: anyone, but the handler verifies Stripe's signature.
Access = Literal["public", "admin", "instance", "stripe"]
M = TypeVar("M", bound=BaseModel)
CUSTOMER_ID_PARAMETER = "customerId"
_CUSTOMER_ID: TypeAdapter[str] = TypeAdapter(CustomerId)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    access: Access
    # Status -> the model of the JSON body, or a media type for a body that is not JSON.
    responses: Mapping[int, type[BaseModel] | str]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    # Error statuses the route can answer besides those implied by access, body and rate limiting.
    errors: tuple[int, ...] = ()
    description: str = ""
    headers: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    # Probes and metrics must answer whatever the load.
    rate_limited: bool = True

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


async def read_body(request: web.Request, model: type[M]) -> M:
    """The JSON body as `model`, or a 400 naming each bad field (413 beyond client_max_size)."""
    raw = await request.read()
    try:
        data = json.loads(raw) if raw else None
    # RecursionError: nested deeper than the parser's recursion limit (~1,000 levels).
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValidationFailed.single("body", "is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValidationFailed.single("body", "must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as invalid:
        raise ValidationFailed.from_pydantic(invalid) from None


def read_query(request: web.Request, model: type[M]) -> M:
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


def json_model(model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(
        model.model_dump(mode="json", by_alias=True), status=status, headers=dict(headers or {})
    )


__all__ = [
    "CUSTOMER_ID_PARAMETER",
    "Access",
    "Handler",
    "Operation",
    "json_model",
    "read_body",
    "read_customer_id",
    "read_query",
]
