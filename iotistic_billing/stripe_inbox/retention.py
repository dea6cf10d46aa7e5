"""The Stripe events' retention: an event whose result is final (applied, ignored, stale, superseded)
and that was created by Stripe, received and recorded more than STRIPE_EVENT_RETENTION_DAYS ago is
deleted by the inbox, in batches of a transaction each (db/retention.py).

Kept whatever its age: a pending event (due, or failing and retried), and an unmatched one, which the
console can replay at any age (its Customer may exist now) and which Stripe no longer holds after 30
days. A replay locks its row and makes it pending, so a batch skips it or, deciding again after its
locks, keeps it. A pruned event's row no longer stops a redelivery of it: Stripe delivers an event again
only within the 30 days it keeps it (STRIPE_EVENT_RETENTION_MIN_DAYS), and even then `events.decide`
refuses it as older (`created`) than the state its subscription's row and the Customer hold."""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import or_
from sqlalchemy.sql.elements import ColumnElement

from iotistic_billing.db import models

# The results that never change again (the console replays only unmatched and failing events).
FINAL_RESULTS: Final = ("applied", "ignored", "stale", "superseded")


def expired(cutoff: datetime) -> ColumnElement[bool]:
    """An event of a final result created, received and last recorded (a replay records it again)
    before `cutoff`."""
    event = models.StripeEvent
    return (
        event.result.in_(FINAL_RESULTS)
        & (event.created < int(cutoff.timestamp()))
        & (event.received_at < cutoff)
        & or_(event.applied_at.is_(None), event.applied_at < cutoff)
    )


__all__ = ["FINAL_RESULTS", "expired"]
