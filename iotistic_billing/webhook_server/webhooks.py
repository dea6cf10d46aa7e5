"""POST /api/webhooks/stripe: verify, store once, acknowledge fast; the Stripe inbox applies it in order.

The 2xx goes out once the verified event is committed to `stripe_events` as `pending` with its payload:
nothing is lost (Stripe retries what got no 2xx, and a crash leaves the row pending for the next run)
and a repeated delivery finds the row and changes nothing. Applying it is stripe_inbox/.
"""

from __future__ import annotations

import logging
import time
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
from iotistic_billing.webhook_server.schemas import WebhookAck, unstorable_text

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "Stripe-Signature"
# Stripe's own default: a signed payload older than this is refused, which bounds replays.
SIGNATURE_TOLERANCE: Final = 300


def verify_event(payload: bytes, header: str | None, secret: str) -> StripeEvent:
    """The event, once its Stripe-Signature checks out against `secret`; otherwise 400."""
    if not header:
        raise BadRequest("Invalid signature", f"the {SIGNATURE_HEADER} header is missing")
    if not header.isascii():
        # Stripe writes hex digests and digits only; stripe's compare_digest raises TypeError on others.
        raise BadRequest("Invalid signature", f"the {SIGNATURE_HEADER} header is not ASCII")
    try:
        text = payload.decode("utf-8")
        stripe.WebhookSignature.verify_header(text, header, secret, SIGNATURE_TOLERANCE)
    except UnicodeDecodeError:
        raise BadRequest("Invalid payload", "the body is not UTF-8") from None
    except stripe.SignatureVerificationError as error:
        # Stripe's messages ("No signatures found matching...", "Timestamp outside the tolerance zone")
        # name no secret.
        raise BadRequest(
            "Invalid signature", str(error.user_message or "signature verification failed")
        ) from None
    signed_at = _signed_at(header)
    if signed_at > time.time() + SIGNATURE_TOLERANCE:
        # Stripe's check bounds the past only: a header dated ahead would stay replayable until then.
        raise BadRequest("Invalid signature", f"Timestamp outside the tolerance zone ({signed_at})")
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


def _signed_at(header: str) -> int:
    """The `t=` of a header verify_header accepted, read as Stripe's SDK reads it (its first `t`)."""
    return int(next(item.split("=", 2)[1] for item in header.split(",") if item.split("=", 2)[0] == "t"))


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
    except BadRequest:
        metrics.webhook_event("unverified", "rejected")
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


__all__ = ["SIGNATURE_HEADER", "receive_stripe_event", "verify_event"]
