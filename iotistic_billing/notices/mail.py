"""Mail to SMTP_URL over connections kept from one message to the next while deliveries are due.

A connection a message cost each mail of a burst a TCP connect, the server's greeting, EHLO, STARTTLS's
handshake and AUTH where the URL asks for them, and QUIT (bench/mail.py; bench/README.md). A
worker's connection is kept while it has deliveries to send and closed once none is due, so none sits
idle for a server to drop; one the server closed meanwhile (a restart, its idle timeout during a long
burst, its limit of messages a connection) is noticed by the next message, which is sent again once on
a new connection.
"""

from __future__ import annotations

import contextlib
import re
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit

import aiosmtplib

# Raised by a send that reached no server or broke off: the delivery's failure (sender.py).
MAIL_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)
# A refusal of one message by a server that took the connection, the sender and the login (a recipient
# it does not know, content it will not take): that delivery's failure, not an outage of the server.
MESSAGE_REFUSALS = (
    aiosmtplib.SMTPRecipientsRefused,
    aiosmtplib.SMTPRecipientRefused,
    aiosmtplib.SMTPDataError,
)
# 421: the server closes the connection (RFC 5321 3.8), as one that limits the messages of a connection does.
SERVICE_CLOSING = 421
# 530: the server wants a login (RFC 4954) or STARTTLS (RFC 3207) SMTP_URL does not give.
AUTHENTICATION_REQUIRED = 530
# How relays say they will not relay for this client: Postfix, Exchange, Sendmail, Exim.
_RELAY_REFUSED = re.compile(
    r"relay(ing)? (access )?(denied|not permitted|prohibited|not allowed)|unable to relay|"
    r"not permitted to relay",
    re.IGNORECASE,
)
_QUOTED_ADDRESS = re.compile(r"<[^<>]*>")
# A server that does not answer QUIT holds a stopping sender no longer than this a connection.
QUIT_SECONDS = 2.0


class MailRelay:
    def __init__(self, smtp_url: str, timeout: float) -> None:
        url = urlsplit(smtp_url)
        self._options: dict[str, Any] = {
            "hostname": url.hostname or "localhost",
            "port": url.port or (465 if url.scheme == "smtps" else 25),
            "username": unquote(url.username) if url.username else None,
            "password": unquote(url.password) if url.password else None,
            "use_tls": url.scheme == "smtps",
            # Credentials over smtp:// only after STARTTLS: left to the server's offer, someone on the
            # path who removed STARTTLS from its EHLO answer had the password in clear (None: as offered).
            "start_tls": True if url.scheme == "smtp" and url.username else None,
            "timeout": timeout,
        }
        self._idle: list[aiosmtplib.SMTP] = []  # connected, between two messages

    @property
    def server(self) -> str:
        """The server's host and port, as logs name it (never the URL, which may hold a password)."""
        return f"{self._options['hostname']}:{self._options['port']}"

    async def send(self, message: EmailMessage) -> None:
        """Over a kept connection, or a new one; raises one of MAIL_ERRORS when the server did not take it."""
        while self._idle:
            kept = self._idle.pop()
            if not kept.is_connected:
                kept.close()
                continue
            try:
                await self._send_on(kept, message)
                return
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                break  # closed by the server since its last message: once more, on a new connection
            except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as refused:
                if not _closing(refused):
                    raise
                break  # closing it (its messages a connection, its idle time): the same
        client = aiosmtplib.SMTP(**self._options)
        await client.connect()
        await self._send_on(client, message)

    async def close_idle(self) -> None:
        """QUIT the connections no send is using (none is due, or the sender stops)."""
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(*MAIL_ERRORS):
                await client.quit(timeout=QUIT_SECONDS)
            client.close()

    async def _send_on(self, client: aiosmtplib.SMTP, message: EmailMessage) -> None:
        try:
            await client.send_message(message)
        except aiosmtplib.SMTPException as error:
            # A refusal leaves the connection usable (aiosmtplib resets the envelope); a timeout or a
            # broken connection leaves it in no known state.
            if isinstance(error, (aiosmtplib.SMTPTimeoutError, ConnectionError)) or not client.is_connected:
                client.close()
            else:
                self._idle.append(client)
            raise
        except BaseException:
            client.close()
            raise
        self._idle.append(client)


def refuses_the_sender(refused: aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused) -> bool:
    """Whether a refusal is of this sender rather than of the message: every recipient refused as one
    the server will not relay to (Postfix's "554 5.7.1 Relay access denied", Exchange's "550 5.7.1
    Unable to relay", Sendmail's "550 5.7.1 Relaying denied") or without a login or STARTTLS it wants
    (530). Found in review: such a server refused every mail as a mail of its own, so nothing was said
    until they were dead, 3.7 hours later. The phrase is looked for outside the quoted addresses
    (`<ops@relayhub.example>` is a recipient's)."""
    replies = refused.recipients if isinstance(refused, aiosmtplib.SMTPRecipientsRefused) else [refused]
    return bool(replies) and all(
        reply.code == AUTHENTICATION_REQUIRED or _RELAY_REFUSED.search(without_addresses(reply.message))
        for reply in replies
    )


def without_addresses(reply: str) -> str:
    """A server's reply without the addresses it quotes (`<ops@acme.example>`), which are customers'."""
    return _QUOTED_ADDRESS.sub("<...>", reply)


def _closing(refused: aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused) -> bool:
    """Whether the server answered 421, closing the connection: at any command, or at RCPT, where
    aiosmtplib gathers the refusals into SMTPRecipientsRefused (found in review: that one cost the mail
    a counted try and its backoff)."""
    if isinstance(refused, aiosmtplib.SMTPRecipientsRefused):
        return bool(refused.recipients) and all(r.code == SERVICE_CLOSING for r in refused.recipients)
    return refused.code == SERVICE_CLOSING


__all__ = ["MAIL_ERRORS", "MESSAGE_REFUSALS", "MailRelay", "refuses_the_sender", "without_addresses"]
