"""The OpenAPI 3.1 document of the route table, with JSON schemas generated from the pydantic models, and
the two routes that serve it (JSON, and a plain page).

Errors every route may answer follow from its entry: 400 and 413 with a body or query, 401/403 behind a
token, 429 when rate limited, 503 when it needs a dependency; the entry adds its own (404, 409, ...).
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from iotistic_billing.customer import CUSTOMER_ID_PATTERN
from iotistic_billing.webhook_server.context import OPENAPI
from iotistic_billing.webhook_server.messages import (
    IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENCY_KEY_HEADER_MAX,
    IDEMPOTENCY_KEY_MAX,
    IDEMPOTENCY_KEY_PATTERN,
    NOTICE_ID_MAX,
    NOTICE_ID_PARAMETER,
)
from iotistic_billing.webhook_server.route import Route
from iotistic_billing.webhook_server.schemas import ErrorBody

TITLE: Final = "Iotistic billing API"
VERSION: Final = "1.0.0"
_REF: Final = "#/components/schemas/{model}"
_DESCRIPTIONS: Final = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Validation failed; details name each field",
    401: "No valid admin token or usage key",
    403: "Authenticated, but not allowed here",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "The Idempotency-Key was sent before with another request; send a new one",
    429: "Rate limited; see Retry-After",
    503: "A dependency is down or not configured; retry later",
}
_PATH_PARAMETERS: Final = {
    "customerId": {
        "type": "string",
        "pattern": CUSTOMER_ID_PATTERN,
        "maxLength": 37,
        "description": "The customer id (spec.customerId or status.customerId of the Customer).",
    },
    NOTICE_ID_PARAMETER: {
        "type": "integer",
        "minimum": 1,
        "maximum": NOTICE_ID_MAX,
        "description": "The id of a notice (GET /api/notices).",
    },
}


def _path_parameters(operation: Route) -> list[str]:
    return [name for name in _PATH_PARAMETERS if f"{{{name}}}" in operation.path]


def _error_statuses(operation: Route) -> list[int]:
    statuses = set(operation.errors)
    # A path parameter is checked against its pattern (routing.read_customer_id).
    if operation.body is not None or operation.query is not None or _path_parameters(operation):
        statuses.add(400)
    if operation.body is not None:
        statuses.add(413)
    if operation.access in ("admin", "instance"):
        statuses.update((401, 403, 503))
    if operation.rate_limited:
        statuses.add(429)
    return sorted(statuses)


def _models(operations: Iterable[Route]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    seen: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(ErrorBody, "serialization"): None}
    for operation in operations:
        if operation.body is not None:
            seen[(operation.body, "validation")] = None
        for response in operation.responses.values():
            if isinstance(response, type):
                seen[(response, "serialization")] = None
    return list(seen)


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(mode="validation")
    required = set(schema.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": property_schema}
        for name, property_schema in schema.get("properties", {}).items()
    ]


def _security(access: Literal["public", "admin", "instance", "stripe"]) -> list[dict[str, list[str]]] | None:
    if access == "admin":
        return [{"adminToken": []}]
    if access == "instance":
        return [{"adminToken": []}, {"usageKey": []}]
    return None


def build_document(operations: Iterable[Route]) -> dict[str, Any]:
    operations = list(operations)
    refs, definitions = models_json_schema(_models(operations), ref_template=_REF)

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    error_ref = ref(ErrorBody, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        responses: dict[str, Any] = {}
        for status, body in operation.responses.items():
            content: dict[str, Any] = (
                {"application/json": {"schema": ref(body, "serialization")}}
                if isinstance(body, type)
                else {body: {"schema": {"type": "object" if body == "application/json" else "string"}}}
            )
            responses[str(status)] = {"description": _DESCRIPTIONS.get(status, "OK"), "content": content}
            if operation.headers and status in (201, 202):
                responses[str(status)]["headers"] = dict(operation.headers)
        for status in _error_statuses(operation):
            responses.setdefault(
                str(status),
                {
                    "description": _DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": error_ref}},
                },
            )
        entry: dict[str, Any] = {
            "operationId": operation.operation_id,
            "summary": operation.summary,
            "tags": [operation.tag],
            "responses": responses,
        }
        if operation.description:
            entry["description"] = operation.description
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": _PATH_PARAMETERS[name]}
            for name in _path_parameters(operation)
        ]
        if operation.query is not None:
            parameters += _query_parameters(operation.query)
        if operation.access == "stripe":
            parameters.append(
                {
                    "name": "Stripe-Signature",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "t=<unix time>,v1=<HMAC-SHA256 of '<t>.<body>' with the endpoint secret>",
                }
            )
        if operation.idempotency_key:
            parameters.append(
                {
                    "name": IDEMPOTENCY_KEY_HEADER,
                    "in": "header",
                    "required": False,
                    # The server's own rule (messages.read_idempotency_key): a client, and Schemathesis,
                    # can tell from the document alone which keys are taken.
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": IDEMPOTENCY_KEY_HEADER_MAX,
                        "pattern": IDEMPOTENCY_KEY_PATTERN,
                    },
                    "description": (
                        f"1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters, bare (as Stripe's) or a"
                        ' quoted String (the IETF draft\'s, `"..."`); a retry sending the same key is the'
                        " same request. Any other value is a 400 naming the header."
                    ),
                }
            )
        if parameters:
            entry["parameters"] = parameters
        if operation.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(operation.body, "validation")}},
            }
        security = _security(operation.access)
        entry["security"] = security if security is not None else []
        paths.setdefault(operation.path, {})[operation.method.lower()] = entry

    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": (
                "The webhook server of iotistic-billing: Stripe webhooks, the admin API (bearer "
                "ADMIN_API_TOKEN) and the routes customer instances call with their usage key. "
                "Errors are JSON {error, message, details}."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_API_TOKEN"},
                "usageKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-API-Key",
                    "description": (
                        "An instance's usage key (its Secret's usage-api-key); also accepted as "
                        "`Authorization: Bearer <key>`"
                    ),
                },
            },
        },
    }


async def get_openapi(request: web.Request) -> web.Response:
    """This document."""
    response = web.json_response(request.app[OPENAPI])
    response.headers["Cache-Control"] = "no-cache"
    return response


async def get_docs(request: web.Request) -> web.Response:
    """A page listing every route of the OpenAPI document; no script, no style, no CDN."""
    document: dict[str, Any] = request.app[OPENAPI]
    rows = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            rows.append(
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>".format(
                    html.escape(method.upper()),
                    html.escape(path),
                    html.escape(operation.get("summary", "")),
                    html.escape(", ".join(sorted(str(code) for code in operation.get("responses", {})))),
                )
            )
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(document['info']['title'])}</title></head><body>"
        f"<h1>{html.escape(document['info']['title'])} {html.escape(document['info']['version'])}</h1>"
        '<p>The machine-readable document: <a href="/api/openapi.json">/api/openapi.json</a>.</p>'
        "<table><thead><tr><th>Method</th><th>Path</th><th>Summary</th><th>Statuses</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


__all__ = ["build_document", "get_docs", "get_openapi"]
