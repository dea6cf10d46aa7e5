"""The outbox: a notice and its deliveries are rows written in the caller's transaction, so a fact that
is rolled back leaves no notice, and a fact written twice (a retried step) leaves one."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import CustomerSpec
from iotistic_billing.db import models
from iotistic_billing.notices.content import Notice, message_id, targets_for

# NOTIFY'd at commit when a notice is written: the sender wakes at once instead of at its next poll.
NOTICES_CHANNEL = "notices"


@dataclass(frozen=True)
class Outbox:
    """Where notices go besides the Customer's own addresses: the platform team's endpoint."""

    platform_webhook_url: str | None = None

    async def enqueue(self, session: AsyncSession, notice: Notice, spec: CustomerSpec) -> bool:
        """Write `notice` and one delivery per target in `session`'s transaction; False when a notice
        with its key exists already (nothing is written then)."""
        notice_id = await session.scalar(
            insert(models.Notice)
            .values(
                key=notice.key,
                kind=str(notice.kind),
                customer_id=notice.customer_id,
                customer_name=notice.customer_name,
                subject=notice.subject,
                facts=notice.to_facts(),
            )
            .on_conflict_do_nothing(index_elements=[models.Notice.key])
            .returning(models.Notice.id)
        )
        if notice_id is None:
            return False
        targets = targets_for(spec, self.platform_webhook_url)
        if targets:
            await session.execute(
                insert(models.NoticeDelivery).values(
                    [
                        {
                            "notice_id": notice_id,
                            "channel": str(target.channel),
                            "target": target.target,
                            "message_id": message_id(notice.key, target),
                        }
                        for target in targets
                    ]
                )
            )
            await session.execute(select(func.pg_notify(NOTICES_CHANNEL, str(notice_id))))
        return True


__all__ = ["NOTICES_CHANNEL", "Outbox"]
