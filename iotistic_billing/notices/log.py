"""The notice log, as the admin API and the console read it, and the re-send of a notice."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.db import models


@dataclass(frozen=True)
class LoggedNotice:
    notice: models.Notice
    deliveries: list[models.NoticeDelivery]


async def recent_notices(
    session: AsyncSession, *, customer_id: str | None, status: str | None, limit: int
) -> list[LoggedNotice]:
    """The newest notices first, with their deliveries; `status`: notices with a delivery in it."""
    query = select(models.Notice).order_by(models.Notice.id.desc()).limit(limit)
    if customer_id is not None:
        query = query.where(models.Notice.customer_id == customer_id)
    if status is not None:
        query = query.where(
            models.Notice.id.in_(
                select(models.NoticeDelivery.notice_id).where(models.NoticeDelivery.status == status)
            )
        )
    notices = list((await session.scalars(query)).all())
    return await _with_deliveries(session, notices)


async def _with_deliveries(session: AsyncSession, notices: list[models.Notice]) -> list[LoggedNotice]:
    deliveries = (
        await session.scalars(
            select(models.NoticeDelivery)
            .where(models.NoticeDelivery.notice_id.in_([notice.id for notice in notices]))
            .order_by(models.NoticeDelivery.id)
        )
    ).all()
    by_notice: dict[int, list[models.NoticeDelivery]] = {}
    for delivery in deliveries:
        by_notice.setdefault(delivery.notice_id, []).append(delivery)
    return [LoggedNotice(notice, by_notice.get(notice.id, [])) for notice in notices]


async def resend(session: AsyncSession, notice_id: int, now: datetime) -> LoggedNotice | None:
    """Every delivery of the notice pending again, due now, with its tries counted anew; the same
    Message-ID and webhook-id, so a receiver that saw it can tell. None when there is no such notice."""
    notice = await session.get(models.Notice, notice_id)
    if notice is None:
        return None
    await session.execute(
        update(models.NoticeDelivery)
        .where(models.NoticeDelivery.notice_id == notice_id)
        .values(status="pending", attempts=0, next_attempt_at=now, last_error=None)
    )
    return (await _with_deliveries(session, [notice]))[0]


__all__ = ["LoggedNotice", "recent_notices", "resend"]
