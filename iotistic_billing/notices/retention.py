"""The notices' retention: a notice whose deliveries are all finished (sent, or dead after their last
try) and none of them tried, sent or re-sent for NOTICE_RETENTION_DAYS is deleted with its deliveries
(their foreign key cascades), by the sender, in batches of a transaction each (db/retention.py).

A batch locks the notices it picked `FOR UPDATE SKIP LOCKED`, so senders of several replicas prune apart,
and decides again on a snapshot taken after its locks: a resend holds its notice `FOR SHARE`
(log.notice_to_resend), so a notice being resent is skipped, and one a resend made pending just before
the lock is seen pending and kept. Nothing else makes a finished delivery pending again."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import exists, or_
from sqlalchemy.sql.elements import ColumnElement

from iotistic_billing.db import models


def expired(cutoff: datetime) -> ColumnElement[bool]:
    """A notice written before `cutoff` none of whose deliveries is pending, or was due (a try, a resend)
    or sent since: a dead delivery's last try was due at its next_attempt_at, a resend sets it to its time."""
    delivery = models.NoticeDelivery
    live = exists().where(
        delivery.notice_id == models.Notice.id,
        or_(delivery.status == "pending", delivery.next_attempt_at >= cutoff, delivery.sent_at >= cutoff),
    )
    return (models.Notice.created_at < cutoff) & ~live


__all__ = ["expired"]
