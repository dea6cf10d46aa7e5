"""POST /api/webhooks/stripe: verify, store once, acknowledge fast; the Stripe inbox applies it in order.

The 2xx goes out once the verified event is committed to `stripe_events` as `pending` with its payload:
nothing is lost (Stripe retries what got no 2xx, and a crash leaves the row pending for the next run)
and a repeated delivery finds the row and changes nothing. Applying it is stripe_inbox/.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

import stripe
from aiohttp import web
from pydantic import ValidationError

from iotistic_billing.db.pool import DatabaseUnavailable
from iotistic_billing.errors import BadRequest, DependencyUnavailable, ValidationFailed, stripe_not_configured
from iotistic_billing.stripe_inbox.events import StripeEvent
from iotistic_billing.stripe_inbox.inbox import store_event
from iotistic_billing.webhook_server.context import INBOX, METRICS, POOL, SETTINGS
from iotistic_billing.webhook_server.messages import json_model, parse_json
from iotistic_billing.webhook_server.metrics import RefusalReason
from iotistic_billing.webhook_server.schemas import WebhookAck, unstorable_text

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "Stripe-Signature"
# Stripe's own default: a signed payload older than this is refused, which bounds replays.
SIGNATURE_TOLERANCE: Final = 300


# What on-call reads of each reason a delivery was refused for.
REFUSAL_ADVICE: Final[dict[RefusalReason, str]] = {
    "missing": "not a delivery of Stripe's, or a proxy in front of this server drops the header",
    "malformed": "not a delivery of Stripe's (Stripe writes t=<seconds>,v1=<hex digest>)",
    "mismatch": (
        "the endpoint's signing secret in Stripe and STRIPE_WEBHOOK_SECRET differ (rolled in the"
        " Dashboard?), or the post is not Stripe's"
    ),
    "stale": "this server's clock is ahead of Stripe's (check NTP), or the delivery is a replay",
    "ahead": "this server's clock is behind Stripe's (check NTP)",
    "payload": (
        "Stripe's event is not one this version reads (the 400 names the field): Stripe retries it for"
        " 3 days, then may disable the endpoint"
    ),
}
# A reason's warning is logged once in this many seconds; the refusals between are counted in the next.
REFUSAL_LOG_SECONDS: Final = 300.0


class SignatureRefused(BadRequest):
    """A delivery whose Stripe-Signature does not check out (400 "Invalid signature"); `reason` is which
    check refused it."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__("Invalid signature", message)
        self.reason: RefusalReason = reason


def verify_event(payload: bytes, header: str | None, secret: str, now: float | None = None) -> StripeEvent:
    """The event, once its Stripe-Signature checks out against `secret` (at `now`, seconds since the
    epoch); otherwise 400."""
    if not header:
        raise SignatureRefused("missing", f"the {SIGNATURE_HEADER} header is missing")
    if not header.isascii():
        # Stripe writes hex digests and digits only; stripe's compare_digest raises TypeError on others.
        raise SignatureRefused("malformed", f"the {SIGNATURE_HEADER} header is not ASCII")
    signed_at = _signed_at(header)
    if signed_at is None:
        raise SignatureRefused(
            "malformed", f"the {SIGNATURE_HEADER} header has no t=<seconds> and v1=<signature>"
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Invalid payload", "the body is not UTF-8") from None
    try:
        # The times are checked below, both ways, so that a refusal says which way the clocks differ.
        stripe.WebhookSignature.verify_header(text, header, secret, tolerance=None)
    except stripe.SignatureVerificationError:
        raise SignatureRefused(
            "mismatch", "No signatures found matching the expected signature for payload"
        ) from None
    age = (time.time() if now is None else now) - signed_at
    if abs(age) > SIGNATURE_TOLERANCE:
        # Stripe's check bounds the past only: a header dated ahead would stay replayable until then.
        when = f"{age:.0f} s before" if age > 0 else f"{-age:.0f} s after"
        raise SignatureRefused(
            "stale" if age > 0 else "ahead",
            f"Timestamp outside the tolerance zone ({signed_at}): signed {when} this server's clock,"
            f" more than {SIGNATURE_TOLERANCE} s",
        )
    data = parse_json(text)
    try:
        event = StripeEvent.model_validate(data)
    except ValidationError as invalid:
        raise ValidationFailed.from_pydantic(invalid) from None
    # The whole payload is stored (JSONB), not only the fields the model reads.
    problem = unstorable_text(data)
    if problem is not None:
        raise ValidationFailed([problem])
    return event


def _signed_at(header: str) -> int | None:
    """The `t=` of a header as Stripe's SDK reads it (its first `t`), when the header also has a `v1=`;
    else None, as for a bare `t` or `v1` item, which the SDK cannot read either."""
    items = [item.split("=", 2) for item in header.split(",")]
    if any(len(item) < 2 and item[0] in ("t", "v1") for item in items):
        return None
    times = [item[1] for item in items if item[0] == "t"]
    if not times or not any(item[0] == "v1" for item in items):
        return None
    try:
        return int(times[0])
    except ValueError:
        return None


class DeliveryRefusals:
    """What the log says of refused deliveries: a warning with the reason's advice, once in
    REFUSAL_LOG_SECONDS a reason, the next one counting the refusals in between. The 400 alone told
    on-call nothing: a clock 5 minutes off and a rolled signing secret raised the same alert."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._logged_at: dict[RefusalReason, float] = {}
        self._quiet: dict[RefusalReason, int] = {}

    def refused(self, reason: RefusalReason, message: str) -> None:
        now = self.clock()
        logged_at = self._logged_at.get(reason)
        if logged_at is not None and now - logged_at < REFUSAL_LOG_SECONDS:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return
        between = self._quiet.pop(reason, 0)
        self._logged_at[reason] = now
        log.warning(
            "Stripe delivery refused (%s): %s: %s%s",
            reason,
            message,
            REFUSAL_ADVICE[reason],
            f" ({between} more refused so since the last line)" if between else "",
            extra={"reason": reason},
        )


# The app's DeliveryRefusals (set in app.create_app; here, as its class is this module's).
DELIVERY_REFUSALS = web.AppKey("delivery_refusals", DeliveryRefusals)


async def receive_stripe_event(request: web.Request) -> web.Response:
    """Receive a Stripe event."""
    settings, metrics = request.app[SETTINGS], request.app[METRICS]
    if settings.stripe_webhook_secret is None:
        raise stripe_not_configured("STRIPE_WEBHOOK_SECRET")
    payload = await request.read()
    try:
        event = verify_event(
            payload, request.headers.get(SIGNATURE_HEADER), settings.stripe_webhook_secret.get_secret_value()
        )
    except BadRequest as refusal:  # ValidationFailed too: a signed event this version cannot read
        reason: RefusalReason = refusal.reason if isinstance(refusal, SignatureRefused) else "payload"
        metrics.webhook_event("unverified", "rejected")
        metrics.delivery_refused(reason)
        request.app[DELIVERY_REFUSALS].refused(reason, refusal.message)
        raise
    try:
        stored = await store_event(request.app[POOL], event, payload)
    except DatabaseUnavailable:
        raise DependencyUnavailable("Database") from None
    metrics.webhook_event(event.type, "queued" if stored else "duplicate")
    if stored:
        request.app[INBOX].wake()  # this process's own workers, if it has any
    # The id and type only: the payload holds customer data and is never logged.
    log.info("stripe event %s (%s): %s", event.id, event.type, "queued" if stored else "duplicate")
    return json_model(WebhookAck(duplicate=not stored, result="queued" if stored else None))


__all__ = [
    "DELIVERY_REFUSALS",
    "REFUSAL_ADVICE",
    "SIGNATURE_HEADER",
    "DeliveryRefusals",
    "SignatureRefused",
    "receive_stripe_event",
    "verify_event",
]
