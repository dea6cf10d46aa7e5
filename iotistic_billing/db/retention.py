"""Pruning a table of finished records past their retention (the notices, notices/retention.py; the
Stripe events, stripe_inbox/retention.py), in batches of a transaction each, walking the primary key.

A batch locks the rows it picked `FOR UPDATE SKIP LOCKED`, so the processes of several replicas prune
apart and a row a writer holds (a resend, a replay) is left for the next round, and deletes them in a
second statement that checks `expired` again on a snapshot taken after its locks: a row a writer made
live again (pending) just before is kept."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import ColumnElement

from iotistic_billing.db.pool import database_unreachable

log = logging.getLogger(__name__)

# Rows a batch deletes at most: a first prune of years of records holds no long transaction.
PRUNE_BATCH: Final = 1000
# Seconds between the prunes of a process.
PRUNE_SECONDS: Final = 3600.0


def retention_cutoff(now: datetime, retention: timedelta) -> datetime:
    """The time before which a finished record's last change makes it prunable."""
    if now.tzinfo is None:
        raise ValueError(f"the prune's clock must give a time with a zone, got {now!r}")
    if retention <= timedelta(0):
        raise ValueError(f"a retention must be positive, got {retention}")
    return now - retention


async def prune_batch(
    session: AsyncSession,
    key: InstrumentedAttribute[Any],
    expired: ColumnElement[bool],
    limit: int,
    after: Any = None,
) -> tuple[int, list[Any]]:
    """Delete up to `limit` rows of `key`'s table that are `expired`, in `key`'s order past `after`, in
    `session`'s transaction: (deleted, the keys picked). Fewer picked than `limit` means none is left past
    `after` that no other transaction holds."""
    query = select(key).where(expired)
    if after is not None:
        query = query.where(key > after)
    picked = list(
        (await session.scalars(query.order_by(key).limit(limit).with_for_update(skip_locked=True))).all()
    )
    if not picked:
        return 0, []
    # A statement of its own, so its snapshot holds what a writer committed before our locks.
    deleted = await session.execute(delete(key.class_).where(key.in_(picked), expired).returning(key))
    return len(deleted.all()), picked


async def prune_expired(
    sessions: async_sessionmaker[AsyncSession],
    key: InstrumentedAttribute[Any],
    expired: ColumnElement[bool],
    batch: int = PRUNE_BATCH,
) -> int:
    """Delete the `expired` rows of `key`'s table, `batch` a transaction, each batch going on from the
    last key the one before picked (a round reads the table once, whatever it keeps), until a batch finds
    fewer; how many rows were deleted."""
    pruned, after = 0, None
    while True:
        async with sessions() as session, session.begin():
            deleted, picked = await prune_batch(session, key, expired, batch, after)
        pruned += deleted
        if len(picked) < batch:
            return pruned
        after = picked[-1]


async def prune_every(what: str, prune: Callable[[], Awaitable[int]], seconds: float = PRUNE_SECONDS) -> None:
    """Run `prune` now and every `seconds`, for good; a failed round is logged (one line when PostgreSQL
    is away) and the next one prunes what it left."""
    while True:
        try:
            await prune()
        except Exception as error:  # any: the next round prunes what this one left
            if database_unreachable(error):
                log.warning("cannot prune the %s (%s)", what, type(error).__name__)
            else:
                log.exception("cannot prune the %s", what)
        await asyncio.sleep(seconds)


__all__ = ["PRUNE_BATCH", "PRUNE_SECONDS", "prune_batch", "prune_every", "prune_expired", "retention_cutoff"]
