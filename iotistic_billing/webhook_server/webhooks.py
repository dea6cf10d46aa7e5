"""POST /api/webhooks/stripe: verify, store once, acknowledge fast; the inbox applies it in order.

The 2xx goes out once the verified event is committed to `stripe_events` as `pending` with its payload:
nothing is lost (Stripe retries what got no 2xx, and a crash leaves the row pending for the next run)
and a repeated delivery finds the row and changes nothing. Applying an event (inbox.py) is one
transaction: the subscription row and the mirror row are written in it and the Customer's
spec.subscription is applied before it commits, so a failure leaves the event pending to be tried again.

An event whose customer cannot be found is acknowledged (200) and recorded as `unmatched` with a warning:
answering an error would make Stripe retry it for days without any chance of success, and the row keeps
it for an operator to look at.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Final

import stripe
from aiohttp import web
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.db import models
from iotistic_billing.webhook_server.context import (
    CATALOG,
    CLUSTER,
    DIRECTORY,
    INBOX,
    METRICS,
    SESSIONS,
    SETTINGS,
)
from iotistic_billing.webhook_server.directory import CustomerRecord
from iotistic_billing.webhook_server.errors import BadRequest, ValidationFailed, stripe_not_configured
from iotistic_billing.webhook_server.routing import json_model
from iotistic_billing.webhook_server.schemas import StripeEvent, WebhookAck, unstorable_text
from iotistic_billing.webhook_server.stripe_events import (
    CHECKOUT_COMPLETED,
    HANDLED_EVENT_TYPES,
    Decision,
    SubscriptionFacts,
    decide,
    lookup_hints,
    subscription_facts,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "Stripe-Signature"
PENDING: Final = "pending"
INBOX_CHANNEL: Final = "stripe_inbox"
# Stripe's own default: a signed payload older than this is refused, which bounds replays.
SIGNATURE_TOLERANCE: Final = 300


@dataclass(frozen=True)
class Outcome:
    result: str
    customer_id: str | None = None


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
    try:
        data = json.loads(text)
    # RecursionError: nested deeper than the parser's recursion limit (~1,000 levels).
    except (ValueError, RecursionError):
        raise ValidationFailed.single("body", "is not valid JSON") from None
    try:
        event = StripeEvent.model_validate(data)
    except ValidationError as invalid:
        raise ValidationFailed.from_pydantic(invalid) from None
    # The whole payload is stored (JSONB), not only the fields the model reads.
    problem = unstorable_text(data)
    if problem is not None:
        raise ValidationFailed([problem])
    return event


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
    stored = await store_event(request.app, event, json.loads(payload))
    metrics.webhook_event(event.type, "queued" if stored else "duplicate")
    if stored:
        request.app[INBOX].wake()  # this process's own workers, if it has any
    # The id and type only: the payload holds customer data and is never logged.
    log.info("stripe event %s (%s): %s", event.id, event.type, "queued" if stored else "duplicate")
    return json_model(WebhookAck(duplicate=not stored, result="queued" if stored else None))


async def store_event(app: web.Application, event: StripeEvent, payload: dict[str, object]) -> bool:
    """Commit the verified event as pending; False when its id was already there (a redelivery)."""
    async with app[SESSIONS]() as session, session.begin():
        first = await session.scalar(
            insert(models.StripeEvent)
            .values(
                event_id=event.id, type=event.type, created=event.created, result=PENDING, payload=payload
            )
            # A concurrent delivery of the same id waits here for this transaction, then sees the row.
            .on_conflict_do_nothing(index_elements=[models.StripeEvent.event_id])
            .returning(models.StripeEvent.event_id)
        )
        if first is not None:
            # Delivered at commit to every inbox LISTENing, in whichever process or replica.
            await session.execute(select(func.pg_notify(INBOX_CHANNEL, event.id)))
    return first is not None


async def apply_event(app: web.Application, session: AsyncSession, event: StripeEvent) -> Outcome:
    """What the event does to its Customer, inside the caller's transaction (see inbox.py)."""
    if event.type not in HANDLED_EVENT_TYPES:
        log.info("stripe event %s: type %s is not handled; recorded", event.id, event.type)
        return Outcome("ignored")
    obj = event.data.object
    hints = lookup_hints(event.type, obj)
    directory = app[DIRECTORY]
    found = await directory.resolve(session, hints)
    if found is None:
        log.warning(
            "stripe event %s (%s) matches no Customer; acknowledged and recorded as unmatched",
            event.id,
            event.type,
        )
        return Outcome("unmatched")
    # One event at a time per Customer, across replicas: read, decide and apply must not interleave.
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"customer:{found.name}"))))
    record = await directory.by_name(found.name)
    if record is None:
        log.warning("stripe event %s: Customer %s is gone; recorded as unmatched", event.id, found.name)
        return Outcome("unmatched")

    link = hints.stripe_customer_id
    if (
        link is not None
        and event.type != CHECKOUT_COMPLETED
        and await directory.stripe_customer_id(session, record)
    ):
        link = None  # only a completed checkout moves an existing link to another Stripe customer
    await directory.remember(session, record, link)

    facts = subscription_facts(event.type, obj, app[CATALOG])
    if facts is None:
        return Outcome("ignored", record.customer_id)
    row = await session.scalar(
        select(models.Subscription)
        .where(models.Subscription.stripe_subscription_id == facts.subscription_id)
        .with_for_update()
    )
    decision = decide(
        record.customer.spec.subscription, row.last_event_created if row else None, facts, event.created
    )
    if decision.record_row:
        await _write_row(session, record, row, facts, decision, event.created)
    if decision.action == "apply" and decision.subscription is not None:
        try:
            await app[CLUSTER].apply_subscription(record.name, decision.subscription.to_k8s())
        except ApiException as error:
            if error.status != 404:
                raise
            log.warning("stripe event %s: Customer %s deleted meanwhile; unmatched", event.id, record.name)
            return Outcome("unmatched", record.customer_id)
        return Outcome("applied", record.customer_id)
    if decision.action == "stale":
        log.info(
            "stripe event %s is older than the state applied for %s; not applied",
            event.id,
            facts.subscription_id,
        )
    return Outcome(decision.action, record.customer_id)


async def _write_row(
    session: AsyncSession,
    record: CustomerRecord,
    row: models.Subscription | None,
    facts: SubscriptionFacts,
    decision: Decision,
    created: int,
) -> None:
    """The subscription's row holds its newest known state, whether or not the Customer took it."""
    applied = decision.subscription
    values = {
        "customer_id": record.customer_id,
        "status": facts.status,
        "plan": applied.plan if applied else (facts.plan or (row.plan if row else None)),
        "current_period_end": (
            applied.current_period_end
            if applied
            else (facts.current_period_end or (row.current_period_end if row else None))
        ),
        "cancel_at_period_end": bool(
            applied.cancel_at_period_end
            if applied
            else (
                facts.cancel_at_period_end
                if facts.cancel_at_period_end is not None
                else (row.cancel_at_period_end if row else False)
            )
        ),
        "last_event_created": created,
    }
    statement = insert(models.Subscription).values(stripe_subscription_id=facts.subscription_id, **values)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[models.Subscription.stripe_subscription_id],
            set_={**values, "updated_at": func.now()},
        )
    )


__all__ = [
    "INBOX_CHANNEL",
    "PENDING",
    "SIGNATURE_HEADER",
    "Outcome",
    "apply_event",
    "receive_stripe_event",
    "store_event",
    "verify_event",
]
