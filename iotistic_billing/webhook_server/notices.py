"""Admin routes of notices: the log (what was sent to whom, what failed and why) and the re-send."""

from __future__ import annotations

import logging

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import DELETED_NOTIFICATIONS_SECRET_NAME
from iotistic_billing.db.pool import database_unreachable
from iotistic_billing.errors import Conflict, DependencyUnavailable, NotFound
from iotistic_billing.k8s import KubernetesUnavailable
from iotistic_billing.notices.log import LoggedNotice, notice_to_resend, recent_notices, resend
from iotistic_billing.notices.render import StoredNotice
from iotistic_billing.notices.sender import DeliveryFailed, NoticeSender, hold_kept_keys
from iotistic_billing.webhook_server.context import CLOCK, DIRECTORY, NOTICES, SESSIONS
from iotistic_billing.webhook_server.messages import json_model, read_notice_id, read_query
from iotistic_billing.webhook_server.schemas import DeliveryView, NoticeList, NoticeQuery, NoticeView

log = logging.getLogger(__name__)


def _view(logged: LoggedNotice) -> NoticeView:
    notice = logged.notice
    return NoticeView(
        id=notice.id,
        key=notice.key,
        kind=notice.kind,
        customer_id=notice.customer_id,
        subject=notice.subject,
        facts=notice.facts,
        created_at=notice.created_at,
        deliveries=[DeliveryView.model_validate(delivery) for delivery in logged.deliveries],
    )


async def list_notices(request: web.Request) -> web.Response:
    """Notices, newest first, with the state of each delivery."""
    query = read_query(request, NoticeQuery)
    async with request.app[SESSIONS]() as session:
        logged = await recent_notices(
            session, customer_id=query.customer_id, status=query.status, limit=query.limit
        )
    return json_model(NoticeList(notices=[_view(entry) for entry in logged]))


async def resend_notice(request: web.Request) -> web.Response:
    """Send again what of a notice did not arrive (a dead delivery, a pending one), or all of it when all
    arrived (a customer says it lost it); the customer's webhook to the URL its Customer names now, and
    not at all when its Customer is gone and no key it kept signs it: a 409 when nothing else is sent.
    PostgreSQL lost at the commit is a 503 saying the resend may have been made (`_resend_in_doubt`), not
    the "nothing was changed" one: a retry after a commit that went through sends every copy again."""
    notice_id = read_notice_id(request)
    sender = request.app[NOTICES]
    committing: str | None = None  # the notice's customer id, once only the commit is left
    try:
        async with request.app[SESSIONS]() as session, session.begin():
            notice = await notice_to_resend(session, notice_id)
            if notice is None:
                raise NotFound("Notice not found", f"no notice with id {notice_id}", {"notice_id": notice_id})
            stored = StoredNotice.of(notice)
            # A re-send takes the URL the Customer names now (fixed since), as each of the sender's tries
            # does; with the API server away, the stored targets (a mail needs PostgreSQL alone).
            try:
                record = await request.app[DIRECTORY].by_customer_id(session, notice.customer_id)
            except KubernetesUnavailable as error:
                log.warning(
                    "resend of notice %s: the Customer not read (%s); to the stored targets", notice_id, error
                )
                record, gone = None, False
            else:
                gone = record is None
            if record is not None and await _kept_key_signs(session, sender, stored):
                # A deleted Customer's notice, its id held again by a Customer created since: the key its
                # deletion kept signs it, for the URL it named, not for the new Customer's receiver.
                record = None
            logged = await resend(
                session,
                notice,
                request.app[CLOCK](),
                record.customer.spec if record is not None else None,
                webhook_signs=not gone or await _signed_after_deletion(session, sender, stored),
            )
            if logged.unsigned and not logged.resent:
                namespace = sender.options.billing_namespace
                raise Conflict(
                    "Webhook cannot be signed",
                    f"nothing of notice {notice_id} was sent again: {sender.deleted_without_key(stored)}",
                    {
                        "notice_id": notice_id,
                        "customer_id": notice.customer_id,
                        "secret": f"{namespace}/{DELETED_NOTIFICATIONS_SECRET_NAME}",
                    },
                )
            # Written before the commit, so that PostgreSQL lost until here changed nothing, as the 503
            # says; only the commit's own answer, once lost, leaves the resend in doubt.
            await session.flush()
            if logged.resent:  # nothing made pending: a commit lost changed nothing
                committing = notice.customer_id
    except Exception as error:
        if committing is None or not database_unreachable(error):
            raise
        raise _resend_in_doubt(notice_id, committing, error) from None
    sender.wake()
    return json_model(_view(logged), status=202)


def _resend_in_doubt(notice_id: int, customer_id: str, error: Exception) -> DependencyUnavailable:
    """The answer to a resend whose commit got no answer: it may have gone through, and then the deliveries
    are due again (or sent since); asked again, every copy would go out once more."""
    log.warning(
        "resend of notice %s: PostgreSQL was lost at its commit (%s); it may have been made",
        notice_id,
        type(error).__name__,
    )
    return DependencyUnavailable(
        "Database",
        f"the resend of notice {notice_id} may have been made (PostgreSQL was lost at its commit): look at"
        f" its deliveries in GET /api/notices?customer_id={customer_id} (or the Customer's console page)"
        " before asking again; pending ones, or ones sent since, are this resend's",
    )


async def _kept_key_signs(session: AsyncSession, sender: NoticeSender, notice: StoredNotice) -> bool:
    """Whether a key a deletion of the notice's Customer kept signs it (kept so until this transaction's
    commit); False when that cannot be read (the Customer's URL, as before the check)."""
    await hold_kept_keys(session)
    try:
        # As the sender's tries decide (_signer): not a key whose deletion still runs.
        kept, running = await sender.kept_key(notice)
        return kept is not None and not running
    except DeliveryFailed as error:
        log.warning("resend of a notice of %s: its kept key not read (%s)", notice.customer_id, error)
        return False


async def _signed_after_deletion(session: AsyncSession, sender: NoticeSender, notice: StoredNotice) -> bool:
    """Whether a key the sender finds signs the webhook of a gone Customer's notice (the one its deletion
    kept), kept so until this transaction's commit; True when that cannot be read (as before the check:
    the sender's tries say why)."""
    await hold_kept_keys(session)
    try:
        return await sender.signing_secret(notice) is not None
    except DeliveryFailed as error:
        log.warning(
            "resend of a notice of %s: its signing secret not read (%s); its webhook sent again as asked",
            notice.customer_id,
            error,
        )
        return True


__all__ = ["list_notices", "resend_notice"]
