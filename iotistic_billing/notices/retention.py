"""The notices' retention: a notice whose deliveries are all finished (sent, or dead after their last
try) and none of them tried, sent or re-sent for NOTICE_RETENTION_DAYS is deleted with its deliveries
(their foreign key cascades), by the sender, in batches of a transaction each.

A batch locks the notices it picked `FOR UPDATE SKIP LOCKED`, so senders of several replicas prune apart,
and decides again on a snapshot taken after its locks: a resend holds its notice `FOR SHARE`
(log.notice_to_resend), so a notice being resent is skipped, and one a resend made pending just before
the lock is seen pending and kept. Nothing else makes a finished delivery pending again."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from iotistic_billing.db import models

# Notices a batch deletes at most: a first prune of years of notices holds no long transaction.
PRUNE_BATCH: Final = 1000
# Seconds between the sender's prunes.
PRUNE_SECONDS: Final = 3600.0


def retention_cutoff(now: datetime, retention: timedelta) -> datetime:
    """The time before which a finished notice's last try (or its writing) makes it prunable."""
    if now.tzinfo is None:
        raise ValueError(f"the prune's clock must give a time with a zone, got {now!r}")
    if retention <= timedelta(0):
        raise ValueError(f"a notice's retention must be positive, got {retention}")
    return now - retention


def _expired(cutoff: datetime) -> ColumnElement[bool]:
    """A notice written before `cutoff` none of whose deliveries is pending, or was due (a try, a resend)
    or sent since: a dead delivery's last try was due at its next_attempt_at, a resend sets it to its time."""
    delivery = models.NoticeDelivery
    live = exists().where(
        delivery.notice_id == models.Notice.id,
        or_(delivery.status == "pending", delivery.next_attempt_at >= cutoff, delivery.sent_at >= cutoff),
    )
    return (models.Notice.created_at < cutoff) & ~live


async def prune_batch(session: AsyncSession, cutoff: datetime, limit: int) -> tuple[int, int]:
    """Delete up to `limit` expired notices, oldest first (the primary key's order), with their
    deliveries, in `session`'s transaction: (deleted, picked). Fewer picked than `limit` means none
    is left that no other transaction holds."""
    picked = (
        await session.scalars(
            select(models.Notice.id)
            .where(_expired(cutoff))
            .order_by(models.Notice.id)
            .limit(limit)
            .with_for_update(of=models.Notice, skip_locked=True)
        )
    ).all()
    if not picked:
        return 0, 0
    # A statement of its own, so its snapshot holds what a resend committed before our locks.
    deleted = await session.execute(
        delete(models.Notice)
        .where(models.Notice.id.in_(picked), _expired(cutoff))
        .returning(models.Notice.id)
    )
    return len(deleted.all()), len(picked)


__all__ = ["PRUNE_BATCH", "PRUNE_SECONDS", "prune_batch", "retention_cutoff"]
