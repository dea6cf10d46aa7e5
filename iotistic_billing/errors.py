"""The problems any part can answer with: each an error, a sentence, details and the HTTP status that
says who must act (400 names the field; 503 a dependency away, retry). The webhook server renders them
as JSON `{error, message, details}` (webhook_server/errors.py); services raise them."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from iotistic_billing.customer import pattern_rule


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


# How the 503 of a dependency away ends its sentence.
NOTHING_CHANGED = "nothing was changed, retry later"


class DependencyUnavailable(Unavailable):
    def __init__(self, dependency: str, message: str | None = None) -> None:
        super().__init__(
            f"{dependency} unavailable",
            message or f"{dependency} cannot be reached; {NOTHING_CHANGED}",
            {"dependency": dependency},
            headers={"Retry-After": "5"},
        )


def customer_not_found(customer_id: str) -> NotFound:
    return NotFound(
        "Customer not found", f"no customer with id {customer_id!r}", {"customer_id": customer_id}
    )


def customer_not_gone(customer_id: str, name: str, why: str) -> Conflict:
    """An action on a customer id no Customer we read holds, which a Customer the API server lists still
    (or again) holds: one this version's models refuse, or one applied since the lookup."""
    return Conflict(
        "Customer not gone",
        f"Customer {name} holds {customer_id} ({why}): nothing was done; it is no deleted customer's",
        {"customer_id": customer_id, "resource_name": name},
    )


def re_created_since_shown(kind: str, name: str) -> Conflict:
    """An action of a page on an object deleted and made again under its name since (another uid)."""
    return Conflict(
        f"{kind} re-created",
        f"{kind} {name} was deleted and re-created since this page was shown (another uid): nothing was"
        " done; look at the new one before acting on it",
    )


def stripe_not_configured(what: str = "STRIPE_SECRET_KEY") -> Unavailable:
    return Unavailable("Stripe is not configured", f"{what} is not set on this server", {"setting": what})


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


# The problems a 400 names; the rest are counted. A batch of bad fields held 200,000 of them: a 24 MB
# answer, built in seconds of the event loop.
MAX_PROBLEMS = 100


class ValidationFailed(BadRequest):
    """400 naming each field: message `email: value is not a valid email address`, details per field
    (the first MAX_PROBLEMS; the message counts the `more` left out)."""

    def __init__(self, problems: list[dict[str, Any]], more: int = 0) -> None:
        more += max(len(problems) - MAX_PROBLEMS, 0)
        problems = problems[:MAX_PROBLEMS]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        if more:
            message += f"; ... and {more:,} more problems"
        super().__init__("Validation failed", message, problems)

    @classmethod
    def from_pydantic(cls, exc: ValidationError, prefix: str = "") -> ValidationFailed:
        # A body of these routes is at most client_max_size (256 KiB): pydantic's errors of it are few
        # enough to make; only the first are named.
        errors = exc.errors(include_url=False)[:MAX_PROBLEMS]
        return cls([_problem(error, prefix) for error in errors], exc.error_count() - len(errors))

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
    elif error["type"] == "string_pattern_mismatch":
        # The rule in words where there is one: a blank reason said `String should match pattern '...'`.
        message = pattern_rule(error.get("ctx", {}).get("pattern")) or message
    return {"field": field, "message": message, "type": error["type"]}


__all__ = [
    "MAX_PROBLEMS",
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
    "stripe_not_configured",
    "stripe_refused_key",
]
