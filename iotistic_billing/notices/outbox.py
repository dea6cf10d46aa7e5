"""The outbox: a notice and its deliveries are rows written in the caller's transaction, so a fact that
is rolled back leaves no notice, and a fact written twice (a retried step) leaves one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from iotistic_billing.customer import CustomerSpec
from iotistic_billing.db import models
from iotistic_billing.notices.content import Notice, message_id, targets_for

# NOTIFY'd at commit when a notice is written: the sender wakes at once instead of at its next poll.
NOTICES_CHANNEL = "notices"
# Rows of one INSERT at most: PostgreSQL takes 32,767 parameters a statement, a notice row has six.
ROWS_A_STATEMENT: Final = 1000


@dataclass(frozen=True)
class Outbox:
    """Where notices go besides the Customer's own addresses: the platform team's endpoint."""

    platform_webhook_url: str | None = None

    async def enqueue(self, session: AsyncSession, notice: Notice, spec: CustomerSpec) -> bool:
        """Write `notice` and one delivery per target in `session`'s transaction; False when a notice
        with its key exists already (nothing is written then)."""
        return notice.key in await self.enqueue_all(session, [(notice, spec)])

    async def enqueue_all(
        self, session: AsyncSession, notices: Iterable[tuple[Notice, CustomerSpec]]
    ) -> set[str]:
        """`enqueue` for many notices (each with its Customer's spec): a statement for each thousand
        notices and each thousand deliveries, and one NOTIFY (a batch of the Stripe inbox); the keys
        of those written. A key given twice is written once, as its first notice."""
        unique: dict[str, tuple[Notice, CustomerSpec]] = {}
        for notice, spec in notices:
            unique.setdefault(notice.key, (notice, spec))
        written: dict[str, int] = {}
        for chunk in _chunks(list(unique.values())):
            rows = await session.execute(
                insert(models.Notice)
                .values(
                    [
                        {
                            "key": notice.key,
                            "kind": str(notice.kind),
                            "customer_id": notice.customer_id,
                            "customer_name": notice.customer_name,
                            "subject": notice.subject,
                            "facts": notice.to_facts(),
                        }
                        for notice, _ in chunk
                    ]
                )
                .on_conflict_do_nothing(index_elements=[models.Notice.key])
                .returning(models.Notice.key, models.Notice.id)
            )
            written.update((key, notice_id) for key, notice_id in rows)
        deliveries = [
            {
                "notice_id": notice_id,
                "channel": str(target.channel),
                "target": target.target,
                "message_id": message_id(key, target),
            }
            for key, notice_id in written.items()
            for target in targets_for(unique[key][1], self.platform_webhook_url)
        ]
        for chunk in _chunks(deliveries):
            await session.execute(insert(models.NoticeDelivery).values(chunk))
        if deliveries:
            await session.execute(select(func.pg_notify(NOTICES_CHANNEL, str(deliveries[0]["notice_id"]))))
        return set(written)


def _chunks(rows: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), ROWS_A_STATEMENT):
        yield rows[start : start + ROWS_A_STATEMENT]


async def notices_written_until(sessions: async_sessionmaker[AsyncSession]) -> datetime:
    """PostgreSQL's time now: a notice's created_at is PostgreSQL's time too (its transaction's start),
    so no clock of another host decides whether a notice was written before a moment (the time until
    which a deleted Customer's kept key signs its notices)."""
    async with sessions() as session:
        now: datetime | None = await session.scalar(select(func.now()))
    assert now is not None, "SELECT now() gave no row"
    return now


__all__ = ["NOTICES_CHANNEL", "Outbox", "notices_written_until"]
