"""A stored notice as its mail (plain text and HTML, Jinja2 templates of the package) and as the body of
a webhook (the Standard Webhooks payload shape: type, timestamp, data)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape


@dataclass(frozen=True)
class StoredNotice:
    """A notices row, as the sender reads it."""

    kind: str
    customer_id: str
    customer_name: str
    subject: str
    facts: dict[str, Any]
    created_at: datetime


@cache
def _templates() -> Environment:
    return Environment(
        loader=PackageLoader("iotistic_billing.notices", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        keep_trailing_newline=True,
    )


def _context(notice: StoredNotice, message_id: str) -> dict[str, Any]:
    facts = dict(notice.facts)
    return {
        "subject": notice.subject,
        "customer_id": notice.customer_id,
        "lines": facts.pop("lines", []),
        "links": facts.pop("links", {}),
        "facts": facts,
        "message_id": message_id,
    }


def email_message(
    notice: StoredNotice, *, sender: str, to: str, message_id: str, now: datetime
) -> EmailMessage:
    """The mail of one delivery. Its Message-ID is the delivery's, the same on every try, so that a
    mail sent again after a crash can be told a duplicate."""
    context = _context(notice, message_id)
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = notice.subject
    message["Date"] = format_datetime(now.astimezone(UTC))
    domain = parseaddr(sender)[1].rpartition("@")[2] or "iotistic.cloud"
    message["Message-ID"] = f"<{message_id}@{domain}>"
    message.set_content(_templates().get_template("email.txt.j2").render(context))
    message.add_alternative(_templates().get_template("email.html.j2").render(context), subtype="html")
    return message


def webhook_body(notice: StoredNotice) -> bytes:
    """The same bytes on every try: `timestamp` is when the notice was written, not when it is sent."""
    facts = dict(notice.facts)
    facts.pop("lines", None)
    data = {"customer_id": notice.customer_id, "subject": notice.subject, **facts}
    body = {"type": notice.kind, "timestamp": notice.created_at.astimezone(UTC).isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


__all__ = ["StoredNotice", "email_message", "webhook_body"]
