"""The notice log, as the admin API and the console read it, and the re-send of a notice."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import CustomerSpec
from iotistic_billing.db import models
from iotistic_billing.notices.content import Channel, Target, message_id, targets_for, webhook_url


@dataclass(frozen=True)
class LoggedNotice:
    notice: models.Notice
    deliveries: list[models.NoticeDelivery]


@dataclass(frozen=True)
class ResentNotice(LoggedNotice):
    """A notice after a re-send: the deliveries it made due again, and the customer's webhooks asked for
    that it left as they were, as nothing signs them (`webhook_signs` False)."""

    resent: list[models.NoticeDelivery]
    unsigned: list[models.NoticeDelivery]


async def recent_notices(
    session: AsyncSession,
    *,
    customer_id: str | None,
    status: str | None,
    limit: int,
    before: tuple[datetime, int] | None = None,
) -> list[LoggedNotice]:
    """The newest notices first, with their deliveries; `status`: notices with a delivery in it;
    `before`: those after the notice of that created_at and id (a keyset, which notices written since
    do not move)."""
    notice = models.Notice
    # By the time it was written, as a person reads them; one transaction's share it: the id breaks ties.
    query = select(notice).order_by(notice.created_at.desc(), notice.id.desc()).limit(limit)
    if before is not None:
        query = query.where(tuple_(notice.created_at, notice.id) < before)
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


async def notice_to_resend(session: AsyncSession, notice_id: int) -> models.Notice | None:
    """The notice of a resend, held `FOR SHARE` until the transaction ends, so the prune (retention.py)
    leaves it and the deliveries the resend makes pending; None when there is none (or it was pruned)."""
    return await session.get(models.Notice, notice_id, with_for_update={"read": True})


async def resend(
    session: AsyncSession,
    notice: models.Notice,
    now: datetime,
    spec_now: CustomerSpec | None,
    *,
    webhook_signs: bool = True,
) -> ResentNotice:
    """The deliveries of the notice that did not arrive (dead, or pending) due now, their tries counted
    anew, and those that arrived left alone; when every one arrived (a customer says it lost the notice),
    all of them sent again. The same webhook-id, so a receiver that saw one can tell; a mail sent again
    after it arrived gets a Message-ID of its own, as a mailbox drops one whose Message-ID it holds
    (Gmail does, the deleted one's too), which would lose the copy asked for.

    The customer's webhook goes to the URL its Customer names now (`spec_now`), as a dead one's URL may
    have been fixed since; one whose Customer names no webhook any more is left as it is; with no
    Customer (None: deleted) the stored URL stands; one no key signs any more (`webhook_signs` False: a
    deleted Customer's, its kept key dropped) is left as it is, its tries failing for ever otherwise. Mail
    goes to the addresses the Customer names now (`targets_for`), as a dead one's may have been a typo
    fixed since: a delivery to an address it no longer names is left as it is (the customer took that
    address away), and an address it names that has no delivery of the notice gets a new one, pending;
    with no Customer the stored addresses stand. One that was not sent when the resend came but is by the
    time its lock is free (a sender was sending it) is what was asked for: nothing is sent again (an
    address with no delivery still gets its first). The caller holds `notice` (notice_to_resend), so no
    prune deletes it under the deliveries made pending."""
    of_notice = (
        select(models.NoticeDelivery)
        .where(models.NoticeDelivery.notice_id == notice.id)
        .order_by(models.NoticeDelivery.id)
    )
    asked = any(delivery.status != "sent" for delivery in (await session.scalars(of_notice)).all())
    deliveries = list(
        (
            await session.scalars(
                # A delivery a sender is sending is locked: its outcome decides whether it arrived.
                of_notice.with_for_update().execution_options(populate_existing=True)
            )
        ).all()
    )
    webhook_now = webhook_url(spec_now.notifications) if spec_now is not None else None
    mail_now = _mail_targets(spec_now) if spec_now is not None else None
    undelivered = [delivery for delivery in deliveries if delivery.status != "sent"]
    resent: list[models.NoticeDelivery] = []
    unsigned: list[models.NoticeDelivery] = []
    sent_meanwhile = asked and not undelivered  # by a sender while the resend waited: what was asked for
    for delivery in [] if sent_meanwhile else undelivered or deliveries:
        if delivery.channel == Channel.WEBHOOK and not webhook_signs:
            unsigned.append(delivery)
            continue
        if delivery.channel == Channel.WEBHOOK and spec_now is not None:
            if webhook_now is None:
                continue  # the customer took its webhook away: no URL it still wants posted to
            delivery.target = webhook_now
        if (
            delivery.channel == Channel.EMAIL
            and mail_now is not None
            and delivery.target.lower() not in mail_now
        ):
            continue  # the customer took that address away (or fixed it): no copy it no longer wants
        if delivery.channel == Channel.EMAIL and delivery.status == "sent":
            delivery.message_id = resent_message_id(delivery.message_id, now)
        delivery.status = "pending"
        delivery.attempts = 0
        delivery.next_attempt_at = now
        delivery.last_error = None
        resent.append(delivery)
    if mail_now is None:
        return ResentNotice(notice, deliveries, resent, unsigned)
    mailed = {delivery.target.lower() for delivery in deliveries if delivery.channel == Channel.EMAIL}
    new = [target for address, target in mail_now.items() if address not in mailed]
    if new:
        added = await session.scalars(
            insert(models.NoticeDelivery)
            .values(
                [
                    {
                        "notice_id": notice.id,
                        "channel": str(target.channel),
                        "target": target.target,
                        "message_id": message_id(notice.key, target),
                        "status": "pending",
                        "attempts": 0,
                        "next_attempt_at": now,
                    }
                    for target in new
                ]
            )
            # A resend of the same notice at the same time (its FOR SHARE lets one in) may have written it.
            .on_conflict_do_nothing()
            .returning(models.NoticeDelivery)
        )
        resent.extend(added.all())
        # Those written by the other resend too, as the answer lists the notice's deliveries.
        deliveries = list((await session.scalars(of_notice)).all())
    return ResentNotice(notice, deliveries, resent, unsigned)


def _mail_targets(spec: CustomerSpec) -> dict[str, Target]:
    """The mail targets of the notice's Customer now, by address (lowercased, as `targets_for` writes)."""
    return {
        target.target: target
        for target in targets_for(spec, platform_webhook_url=None)
        if target.channel == Channel.EMAIL
    }


def resent_message_id(message_id: str, now: datetime) -> str:
    """The Message-ID of a mail sent again after it arrived: the first one's, and the time of the resend."""
    return f"{message_id.split('.', 1)[0]}.r{int(now.timestamp())}"


__all__ = [
    "LoggedNotice",
    "ResentNotice",
    "notice_to_resend",
    "recent_notices",
    "resend",
    "resent_message_id",
]
