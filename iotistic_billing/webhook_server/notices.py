"""Admin routes of notices: the log (what was sent to whom, what failed and why) and the re-send."""

from __future__ import annotations

import logging

from aiohttp import web

from iotistic_billing.db import models
from iotistic_billing.errors import NotFound
from iotistic_billing.k8s import KubernetesUnavailable
from iotistic_billing.notices.log import LoggedNotice, recent_notices, resend
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
    arrived (a customer says it lost it); the customer's webhook to the URL its Customer names now."""
    notice_id = read_notice_id(request)
    async with request.app[SESSIONS]() as session, session.begin():
        notice = await session.get(models.Notice, notice_id)
        if notice is None:
            raise NotFound("Notice not found", f"no notice with id {notice_id}", {"notice_id": notice_id})
        # The sender posts to the stored URL: a re-send takes the one the Customer names now (fixed since);
        # with the API server away, the stored targets (a mail needs PostgreSQL alone).
        try:
            record = await request.app[DIRECTORY].by_customer_id(session, notice.customer_id)
        except KubernetesUnavailable as error:
            log.warning(
                "resend of notice %s: the Customer not read (%s); to the stored targets", notice_id, error
            )
            record = None
        logged = await resend(
            session, notice, request.app[CLOCK](), record.customer.spec if record is not None else None
        )
    request.app[NOTICES].wake()
    return json_model(_view(logged), status=202)


__all__ = ["list_notices", "resend_notice"]
