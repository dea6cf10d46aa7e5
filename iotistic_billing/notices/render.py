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

import aiosmtplib.email
import idna
from jinja2 import Environment, PackageLoader, select_autoescape

from iotistic_billing.db import models


@dataclass(frozen=True)
class StoredNotice:
    """A notices row, as the sender reads it."""

    kind: str
    customer_id: str
    customer_name: str
    subject: str
    facts: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: models.Notice) -> StoredNotice:
        return cls(
            kind=row.kind,
            customer_id=row.customer_id,
            customer_name=row.customer_name,
            subject=row.subject,
            facts=row.facts,
            created_at=row.created_at,
        )


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


def _mailable_address(address: str) -> str:
    """`address` with its domain IDNA-encoded (`ops@bücher.example` -> `ops@xn--bcher-kva.example`): a
    relay without SMTPUTF8 takes ASCII addresses only, and DNS knows the domain by that name. A local
    part that is not ASCII still needs SMTPUTF8: it has no such spelling."""
    local, _, domain = address.rpartition("@")
    if domain.isascii():
        return address
    try:
        # As yarl encodes a webhook URL's host: IDNA 2008 (UTS 46), IDNA 2003 for what only it takes.
        try:
            encoded = idna.encode(domain, uts46=True).decode("ascii")
        except UnicodeError:
            encoded = domain.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise ValueError(f"cannot mail {address}: its domain is no name IDNA can encode ({error})") from None
    return f"{local}@{encoded}"


def email_message(
    notice: StoredNotice, *, sender: str, to: str, message_id: str, now: datetime
) -> EmailMessage:
    """The mail of one delivery. Its Message-ID is the delivery's, the same on every try, so that a
    mail sent again after a crash can be told a duplicate."""
    context = _context(notice, message_id)
    message = EmailMessage()
    message["From"] = sender
    address = _mailable_address(to)
    message["To"] = address
    # The relay takes the recipients from To: an address the email pattern lets through with a comma
    # (`ops@hooli.example,ceo`) was mail to two, one of them of the relay's own domain.
    if aiosmtplib.email.extract_recipients(message) != [address]:
        raise ValueError(f"cannot mail {to}: it is not one address")
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
