"""Every error the API answers, as JSON `{error, message, details}` with the status that says who must act.

Handlers raise `ApiError`s; `error_middleware` turns those, aiohttp's own HTTP errors (404, 405, 413) and
an unreachable dependency (PostgreSQL, the API server, Stripe) into that shape. A dependency failure is a
503: the caller retries, and the transaction that was open has been rolled back, so nothing is half-written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REASONS: Final = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}


class ApiError(Exception):
    """An error answer; `error` is the short title, `message` the sentence a person reads."""

    status = 500

    def __init__(
        self,
        error: str,
        message: str,
        details: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.error = error
        self.message = message
        self.details = details
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(
            "Unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="iotistic-billing"'}
        )


class Forbidden(ApiError):
    status = 403

    def __init__(self, message: str) -> None:
        super().__init__("Forbidden", message)


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class TooManyRequests(ApiError):
    status = 429


class Unavailable(ApiError):
    """A dependency is down or not configured: 503, retry later."""

    status = 503


class DependencyUnavailable(Unavailable):
    def __init__(self, dependency: str, message: str | None = None) -> None:
        super().__init__(
            f"{dependency} unavailable",
            message or f"{dependency} cannot be reached; nothing was changed, retry later",
            {"dependency": dependency},
            headers={"Retry-After": "5"},
        )


def customer_not_found(customer_id: str) -> NotFound:
    return NotFound(
        "Customer not found", f"no customer with id {customer_id!r}", {"customer_id": customer_id}
    )


def stripe_not_configured(what: str = "STRIPE_SECRET_KEY") -> Unavailable:
    return Unavailable("Stripe is not configured", f"{what} is not set on this server", {"setting": what})


def method_not_allowed(allowed: list[str]) -> Handler:
    """The answer of a path to the methods the route table does not give it, with a true Allow."""
    allow = ",".join(allowed)

    async def refuse(request: web.Request) -> web.StreamResponse:
        raise ApiError(
            "Method not allowed",
            f"{request.method} is not allowed on {request.path}; allowed: {allow}",
            {"allowed": allowed},
            status=405,
            headers={"Allow": allow},
        )

    return refuse


def stripe_refused_key(status: int) -> Unavailable:
    """Stripe answered the configured key with 401/403: set, but wrong (revoked, another account's, a
    key stripe-mock's pattern refuses), which "not configured" would hide. Stripe's own text is left
    out: stripe-mock's quotes the key."""
    return Unavailable(
        "Stripe refused the API key",
        f"Stripe answered {status} to this server's STRIPE_SECRET_KEY: revoked, of another account, "
        "or not a key Stripe accepts",
        {"setting": "STRIPE_SECRET_KEY", "stripe_status": status},
    )


class ValidationFailed(BadRequest):
    """400 naming each field: message `email: value is not a valid email address`, details per field."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        super().__init__("Validation failed", message, problems)

    @classmethod
    def from_pydantic(cls, exc: ValidationError, prefix: str = "") -> ValidationFailed:
        return cls([_problem(error, prefix) for error in exc.errors()])

    @classmethod
    def single(cls, field: str, message: str) -> ValidationFailed:
        return cls([{"field": field, "message": message, "type": "value_error"}])


def _problem(error: ErrorDetails, prefix: str) -> dict[str, Any]:
    field = ".".join(str(part) for part in error["loc"]) or "body"
    if prefix:
        field = f"{prefix}.{field}" if error["loc"] else prefix
    message = error["msg"]
    if error["type"] == "missing":
        message = "field required"
    elif error["type"] == "extra_forbidden":
        message = "unknown field"
    return {"field": field, "message": message, "type": error["type"]}


def error_body(status: int, error: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": error, "message": message, "details": details}


def json_error(error: ApiError) -> web.Response:
    return web.json_response(
        error_body(error.status, error.error, error.message, error.details),
        status=error.status,
        headers=error.headers,
    )


def _is_database_down(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    # asyncpg reports a dropped connection as a DBAPI error flagged as invalidating the connection.
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _is_connection_failure(exc: BaseException) -> bool:
    # asyncpg raises OSError (connection refused) straight from connect, outside SQLAlchemy's wrapping.
    return isinstance(exc, OSError | asyncio.TimeoutError | ConnectionError)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return json_error(error)
    except web.HTTPException as http_error:
        if http_error.status < 400:
            raise
        reason = _REASONS.get(http_error.status, http_error.reason)
        message = _http_message(http_error, request)
        headers = {key: value for key, value in http_error.headers.items() if key in ("Allow", "Retry-After")}
        return json_error(ApiError(reason, message, status=http_error.status, headers=headers))
    except ValidationError as invalid:
        return json_error(ValidationFailed.from_pydantic(invalid))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if _is_database_down(exc) or _is_connection_failure(exc):
            # The exception's text can hold connection parameters: log its type only.
            log.warning("%s %s: database unavailable (%s)", request.method, request.path, type(exc).__name__)
            return json_error(DependencyUnavailable("Database"))
        log.exception("%s %s failed", request.method, request.path)
        return json_error(
            ApiError("Internal server error", "the server failed to answer; it has been logged")
        )


def _http_message(error: web.HTTPException, request: web.Request) -> str:
    if error.status == 404:
        return f"no route {request.path}"
    if error.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if error.status == 413:
        return "the request body is larger than this server accepts"
    return error.text or error.reason


__all__ = [
    "ApiError",
    "BadRequest",
    "Conflict",
    "DependencyUnavailable",
    "Forbidden",
    "NotFound",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "customer_not_found",
    "error_body",
    "error_middleware",
    "json_error",
    "method_not_allowed",
    "stripe_not_configured",
    "stripe_refused_key",
]
