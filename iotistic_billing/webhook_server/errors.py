"""Every error the API answers, as JSON `{error, message, details}` with the status that says who must act.

Handlers and services raise `ApiError`s (iotistic_billing/errors.py); `error_middleware` turns those,
aiohttp's own HTTP errors (404, 405, 413), the API server's refusals and an unreachable dependency
(PostgreSQL, the API server, Stripe) into that shape. A dependency failure is a 503: the caller retries,
and the transaction that was open has been rolled back, so nothing is half-written. A body that does not
inflate as its Content-Encoding is a 400 naming it; a request whose client left is answered no one (499).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from kubernetes.client.exceptions import ApiException

from iotistic_billing.db.pool import database_unreachable
from iotistic_billing.errors import (
    ApiError,
    BadRequest,
    Conflict,
    DependencyUnavailable,
    NotFound,
    ValidationFailed,
)
from iotistic_billing.k8s import KubernetesUnavailable, refusal_message

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

# nginx's "client closed request": the status of a request whose client left before it was answered, a
# code no answer reaches and no 5xx alert counts (the chart's rules match status=~"5..").
CLIENT_CLOSED_REQUEST: Final = 499


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


def error_body(status: int, error: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": error, "message": message, "details": details}


def json_error(error: ApiError) -> web.Response:
    return web.json_response(
        error_body(error.status, error.error, error.message, error.details),
        status=error.status,
        headers=error.headers,
    )


def kubernetes_refusal(error: ApiException) -> ApiError:
    """The API server's refusal as our answer, with its message: 404 the object is gone, 409 a conflict,
    422 (the object would not validate) a 400; any other refusal (403: this server's RBAC) is ours to
    mend, a 503 naming the API server. A handler that knows which object a 404 means says so itself."""
    message = f"the API server refused it: {refusal_message(error)}"
    details = {"dependency": "Kubernetes API", "kubernetes_status": error.status}
    if error.status == 404:
        return NotFound("Not found", message, details)
    if error.status == 409:
        return Conflict("Refused by the API server", message, details)
    if error.status == 422:
        return BadRequest("Refused by the API server", message, details)
    log.warning("the API server refused a call with %s: %s", error.status, refusal_message(error))
    return DependencyUnavailable("Kubernetes API", f"{message}; nothing was changed")


def problem_of(error: ApiError | KubernetesUnavailable | ApiException) -> ApiError:
    """The answer to an error a handler raised on purpose, or the API server's: away, or refusing."""
    if isinstance(error, KubernetesUnavailable) and error.maybe_applied:
        return DependencyUnavailable(
            "Kubernetes API",
            "the Kubernetes API did not answer a change in time; it may have been made: read before retrying",
        )
    if isinstance(error, KubernetesUnavailable):
        return DependencyUnavailable("Kubernetes API")
    if isinstance(error, ApiException):
        return kubernetes_refusal(error)
    return error


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (ApiError, KubernetesUnavailable, ApiException) as error:
        return json_error(problem_of(error))
    except web.HTTPException as http_error:
        if http_error.status < 400:
            raise
        reason = _REASONS.get(http_error.status, http_error.reason)
        message = _http_message(http_error, request)
        headers = {key: value for key, value in http_error.headers.items() if key in ("Allow", "Retry-After")}
        return json_error(ApiError(reason, message, status=http_error.status, headers=headers))
    except web.RequestPayloadError:
        # aiohttp inflates a gzip or deflate body as it is read: one that does not inflate is the client's
        # mistake. Its rest is never read: ending it here, and the connection after the answer, keeps
        # aiohttp from reading on after the handler and logging the same error as unhandled.
        request.content.feed_eof()
        answer = json_error(ValidationFailed.single("body", "does not decode as its Content-Encoding"))
        answer.force_close()
        return answer
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and request.transport is None:
            # The client closed the connection before its body was read: no one to answer, nothing failed.
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        if database_unreachable(exc):
            # The exception's text can hold connection parameters: log its type only.
            log.warning("%s %s: database unavailable (%s)", request.method, request.path, type(exc).__name__)
            return json_error(DependencyUnavailable("Database"))
        # A pydantic ValidationError too: every request's fields are read into a 400 naming them
        # (messages.read_body, read_query; usage.reports), so one here is an answer the server failed to
        # build, not the client's mistake (a 400 had blamed a response field on the client).
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
    "CLIENT_CLOSED_REQUEST",
    "Handler",
    "error_body",
    "error_middleware",
    "json_error",
    "kubernetes_refusal",
    "method_not_allowed",
    "problem_of",
]
