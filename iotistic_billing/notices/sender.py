"""The sender: claims due deliveries (`FOR UPDATE SKIP LOCKED`, so several replicas share them without
sending one twice at once), sends each by mail or signed webhook, and records the outcome.

A delivery's row stays locked while it is sent, and is marked sent in the same transaction: a crash
between the send and the commit sends it again, with the same Message-ID or webhook-id, so receivers
can drop the duplicate (at least once; exactly once where the receiver keeps ids). A failure is retried
after BACKOFF, and the delivery is dead after `max_attempts` tries; the admin API sends it again.

Each try of a customer's webhook goes to the URL its Customer names then, read once a try: the one the
notice was written for may have leaked or been decommissioned since, and one the customer took away
ends the delivery at once (dead, naming the removal). Its Customer is the one holding the notice's
customer id then, under whatever name (a rename in Git that kept spec.customerId moves it); a deleted
Customer's keeps the URL it was written for.

A customer's webhook goes only to a public address or one NOTIFY_WEBHOOK_ALLOWED_CIDRS allows (egress.py);
the platform team's NOTIFY_WEBHOOK_URL is the deployment's own setting, posted to wherever it names. A
try that got no answer keeps a generic last error (the detail is logged): the URL's writer must not learn
from it which ports of an address answer.

A deleted Customer's webhooks are signed with the copy of its secret its deletion kept in the billing
namespace, which the sender drops once none of them is pending; never with the copy in the namespace of
its name, once that copy is another Customer's. The kept copy signs only the notices written until its
deletion ended: those of a Customer created again under the same customer id are signed with its own.
A resend of a deleted Customer's webhook asks `signing_secret` under `hold_kept_keys`, so it queues none
that nothing signs, and no key it found is dropped before its commit.

Each sender also prunes, every PRUNE_SECONDS, the finished notices older than its retention (retention.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from sqlalchemy import DateTime, Select, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from iotistic_billing.customer import (
    CUSTOMER_ID_LABEL,
    DELETED_NOTIFICATIONS_SECRET_NAME,
    DELETION_RUNNING_PREFIX,
    NOTIFICATIONS_SECRET_KEY,
    NOTIFICATIONS_SECRET_NAME,
    NotificationsSpec,
    customer_id_in_use,
    deletion_running_annotation,
    marking_customer,
    namespace_for,
    signs_until_annotation,
)
from iotistic_billing.db import models
from iotistic_billing.db.listen import listen
from iotistic_billing.db.pool import DATABASE_UNREACHABLE, database_unreachable
from iotistic_billing.db.retention import PRUNE_BATCH, prune_every, prune_expired, retention_cutoff
from iotistic_billing.db.schema import SchemaGate, after_schema
from iotistic_billing.k8s import FieldManager, Kube, KubernetesUnavailable, SecretData
from iotistic_billing.notices.content import Channel, webhook_url
from iotistic_billing.notices.egress import AddressRefused, Network, webhook_session
from iotistic_billing.notices.mail import (
    MAIL_ERRORS,
    MESSAGE_REFUSALS,
    MailRelay,
    refuses_the_sender,
    without_addresses,
)
from iotistic_billing.notices.outbox import NOTICES_CHANNEL, notices_written_until
from iotistic_billing.notices.render import StoredNotice, email_message, webhook_body
from iotistic_billing.notices.retention import expired
from iotistic_billing.settings import webhook_secret_bytes
from iotistic_billing.workers import Outage, Precedence, nap, stop_tasks

log = logging.getLogger(__name__)

# Seconds before the next try, by the number of tries so far: 3.7 hours to the default 8th try, 11.7
# over the whole table.
BACKOFF: Final = (10, 30, 120, 600, 1800, 3600, 7200, 14400, 14400)
POLL_SECONDS: Final = 1.0
SEND_TIMEOUT: Final = 10.0
# How often the deleted Customers' kept signing secrets are checked, the settled ones dropped.
FORGET_SECONDS: Final = 300.0
# The advisory lock of the kept signing secrets (hold_kept_keys); any bigint of ours, as migrate's.
KEPT_KEYS_LOCK: Final = 0x10715_0008


async def hold_kept_keys(session: AsyncSession) -> None:
    """Hold the deleted Customers' kept signing secrets until `session`'s transaction ends: a drop of the
    settled ones (forget_settled_secrets) and a re-send that finds a key and makes a webhook it signs
    pending take turns, so no key is dropped between the re-send's look and its commit."""
    await session.execute(select(func.pg_advisory_xact_lock(KEPT_KEYS_LOCK)))


def kept_key_signs(kept: SecretData, customer_id: str, written_at: datetime) -> bool:
    """Whether the key kept under `customer_id` signs a notice of that id written at `written_at`: any
    while no time is noted (its deletion runs, or the key was kept before times were noted), else one
    written until then. A later one is a Customer's created again under the id (a company signing up
    again, a GitOps re-create), whose receiver knows only its own key. ValueError for a time that is none."""
    annotation = signs_until_annotation(customer_id)
    noted = kept.annotations.get(annotation)
    if noted is None:
        return True
    try:
        until = datetime.fromisoformat(noted)
    except ValueError:
        until = None
    if until is None or until.tzinfo is None:
        raise ValueError(f"annotation {annotation} is not a time with a zone: {noted!r}")
    return written_at <= until


def _still_signs(kept: SecretData, customer_id: str, written_at: datetime) -> bool:
    """kept_key_signs for the drop of settled keys: a time that is none keeps the key (its deliveries
    fail naming the annotation), and the other keys are dropped all the same."""
    try:
        return kept_key_signs(kept, customer_id, written_at)
    except ValueError:
        return True


def _webhook_key(value: bytes) -> bytes:
    """A copy's value as the key it is; DeliveryFailed naming the field when it is none."""
    try:
        return webhook_secret_bytes(value.decode(errors="replace"))
    except ValueError as error:
        raise DeliveryFailed(f"spec.notifications.webhook.secretRef: {error}") from None


def _holds(customer: dict[str, Any], customer_id: str) -> bool:
    """Whether `customer` (as read) is `customer_id`'s now: it goes by that id and is not being deleted."""
    return "deletionTimestamp" not in customer["metadata"] and customer_id_in_use(customer) == customer_id


@dataclass(frozen=True)
class _Signer:
    """What signs a customer's webhook now (NoticeSender._signer): `key`, a copy's value, None when none
    does; `customer`, the Customer holding the notice's customer id now, whose URL the webhook goes to,
    None when it goes to the URL it was written for (a deleted Customer's)."""

    key: bytes | None
    customer: dict[str, Any] | None


class DeliveryFailed(Exception):
    """The target did not take it (refused, unreachable, an error status): try again later. `detail` is
    logged with it, never kept as the delivery's last error."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.detail = detail


class ChannelDown(DeliveryFailed):
    """The server every delivery of its channel goes to failed the try, not this delivery (the SMTP server
    unreachable, or refusing the sender or the login; the platform team's endpoint): counted as any try,
    and the channel's outage is told once (NoticeSender._outage), not once a delivery."""


class DeliveryWithdrawn(DeliveryFailed):
    """Its target is gone from the Customer (the webhook removed from the spec): no later try has anywhere
    to go, so the delivery is dead at once, whatever tries it has left."""


@dataclass(frozen=True)
class SenderOptions:
    smtp_url: str | None  # unset: each mail try fails saying so (counted, as any failed try)
    mail_from: str
    platform_webhook_secret: str | None
    max_attempts: int = 8
    workers: int = 2
    # BILLING_NAMESPACE: where a deleted Customer's signing secret is kept while its webhooks are pending.
    billing_namespace: str = "default"
    # NOTIFY_WEBHOOK_ALLOWED_CIDRS: the non-public addresses customers' webhooks may go to.
    webhook_allowed_networks: tuple[Network, ...] = ()
    # NOTICE_RETENTION_DAYS: how long a finished notice is kept after its last try (retention.py).
    retention: timedelta = timedelta(days=90)


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature: HMAC-SHA256 of `id.timestamp.body`, base64, version v1."""
    signed = hmac.new(secret, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(signed).decode()


def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=BACKOFF[min(attempts, len(BACKOFF)) - 1])


def claim(now: datetime) -> Select[models.NoticeDelivery, models.Notice, datetime]:
    """The delivery due longest that no other sender holds, locked, with its notice and the time it was
    due by: the first entry of the due index (`ix_notice_deliveries_due`, in this order). Due by this
    sender's clock or by PostgreSQL's, whichever is later: a new delivery's time is PostgreSQL's (the
    column's default), and a sender whose clock is behind it waited that long for every notice (found in
    review). Its retry is timed from the same later time (send_one)."""
    due_by = func.greatest(literal(now, DateTime(timezone=True)), func.now())
    return (
        select(models.NoticeDelivery, models.Notice, due_by)
        .join(models.Notice, models.Notice.id == models.NoticeDelivery.notice_id)
        .where(models.NoticeDelivery.status == "pending", models.NoticeDelivery.next_attempt_at <= due_by)
        .order_by(models.NoticeDelivery.next_attempt_at, models.NoticeDelivery.id)
        .limit(1)
        .with_for_update(of=models.NoticeDelivery, skip_locked=True)
    )


class NoticeSender:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        kube: Kube,
        options: SenderOptions,
        clock: Callable[[], datetime],
        database_url: str = "",
        precedence: Precedence | None = None,
        schema: SchemaGate | None = None,
    ) -> None:
        self.sessions = sessions
        # What the workers, the drop of settled keys and the prunes wait for before their first query.
        self.schema = schema
        self.precedence = precedence  # what the workers wait for before each delivery
        self.kube = kube
        self.options = options
        self.clock = clock
        self.database_url = database_url
        self._http: aiohttp.ClientSession | None = None  # customers' webhooks: public addresses
        self._platform_http: aiohttp.ClientSession | None = None
        self._mail_relay = MailRelay(options.smtp_url, SEND_TIMEOUT) if options.smtp_url else None
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The workers' claims failing in a row, shared: one warning per outage for the sender, not per worker.
        self._claims = Outage(
            log, "notice sender: cannot claim a delivery", "notice sender: claiming deliveries again"
        )
        # The outages of the SMTP server and of the platform team's endpoint, by server: found in review,
        # a relay that was down logged each try at INFO, and its first WARNING came 3.7 hours later.
        self._outages: dict[str, Outage] = {}

    def wake(self) -> None:
        self._wakeup.set()

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=SEND_TIMEOUT)
        self._http = webhook_session(self.options.webhook_allowed_networks, timeout)
        self._platform_http = aiohttp.ClientSession(timeout=timeout)
        if self.options.workers == 0:
            return
        if self._mail_relay is None:
            # Said once where the mail goes out: otherwise only each try's failure told of it (found in
            # review), and the notices' mail is left to NOTIFY_MAX_ATTEMPTS with no word at start.
            log.warning("notice sender: SMTP_URL is not set: mail notices fail until it is")
        self._tasks = [
            asyncio.create_task(after_schema(self.schema, self._work), name=f"notice-sender-{i}")
            for i in range(self.options.workers)
        ]
        self._tasks.append(
            asyncio.create_task(after_schema(self.schema, self._forget_settled), name="notice-sender-forget")
        )
        self._tasks.append(
            asyncio.create_task(
                after_schema(self.schema, lambda: prune_every("finished notices", self.prune_finished)),
                name="notice-sender-prune",
            )
        )
        if self.database_url:
            self._tasks.append(asyncio.create_task(listen(self.database_url, NOTICES_CHANNEL, self.wake)))

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks = []
        for http in (self._http, self._platform_http):
            if http is not None:
                await http.close()
        self._http = self._platform_http = None
        if self._mail_relay is not None:
            await self._mail_relay.close_idle()

    async def _work(self) -> None:
        while True:
            if self.precedence is not None:
                await self.precedence.wait_turn()
            try:
                sent = await self.send_one()
            except Exception as error:
                # The deliveries stay pending; the listener's wake once PostgreSQL is back ends the wait.
                problem = DATABASE_UNREACHABLE if database_unreachable(error) else None
                delay = self._claims.failed(error, problem)
                self._wakeup.clear()
                await nap(self._wakeup, delay)
                continue
            self._claims.succeeded()
            if sent:
                continue
            if self._mail_relay is not None:
                await self._mail_relay.close_idle()
            self._wakeup.clear()
            await nap(self._wakeup, POLL_SECONDS)

    async def _forget_settled(self) -> None:
        while True:
            try:
                await self.forget_settled_secrets()
            except Exception as error:  # the API server or the database is away: the next round tries again
                if isinstance(error, KubernetesUnavailable) or database_unreachable(error):
                    log.warning(
                        "notice sender: cannot drop the settled signing secrets of deleted Customers (%s)",
                        type(error).__name__,
                    )
                else:
                    log.exception(
                        "notice sender: cannot drop the settled signing secrets of deleted Customers"
                    )
            await asyncio.sleep(FORGET_SECONDS)

    async def prune_finished(self, batch: int = PRUNE_BATCH) -> int:
        """Delete the notices finished before the retention (retention.py) with their deliveries, `batch`
        a transaction, until a batch finds fewer; how many notices were deleted."""
        cutoff = retention_cutoff(self.clock(), self.options.retention)
        pruned = await prune_expired(self.sessions, models.Notice.id, expired(cutoff), batch)
        if pruned:
            log.info("pruned %d notices finished before %s", pruned, cutoff.isoformat())
        return pruned

    async def forget_settled_secrets(self) -> list[str]:
        """Drop the kept signing secret of each deleted Customer none of whose webhooks (those the key
        signs: kept_key_signs) is pending any more; the customer ids dropped, with their times. A
        deletion still running marks its key (it keeps the key before it writes its last notice) and
        lifts the mark after that notice, noting its time in the same write, so a Customer kept here
        unmarked with nothing pending will have nothing more to sign; the drop applies only to the
        Secret as read (one whose mark was lifted since, its notice committed after our look at the
        deliveries, keeps its key: looked at again next time). A re-send does not write the Secret, so
        the look and the drop hold the kept keys (hold_kept_keys) against one that makes a webhook
        pending. A mark whose Customer is gone (`_abandoned_deletions`) is lifted here, in the same
        write, noting PostgreSQL's time now."""
        namespace = self.options.billing_namespace
        kept = await self.kube.read_secret_data(namespace, DELETED_NOTIFICATIONS_SECRET_NAME)
        if kept is None or not kept[0]:
            return []
        abandoned = await self._abandoned_deletions(kept)
        async with self.sessions() as session, session.begin():
            # From the look at the pending webhooks to the drop: a re-send makes one pending meanwhile.
            await hold_kept_keys(session)
            oldest_pending = await session.execute(
                select(models.Notice.customer_id, func.min(models.Notice.created_at))
                .join(models.NoticeDelivery, models.NoticeDelivery.notice_id == models.Notice.id)
                .where(
                    models.NoticeDelivery.channel == str(Channel.WEBHOOK),
                    models.NoticeDelivery.status == "pending",
                    models.Notice.customer_id.in_(sorted(kept[0])),
                )
                .group_by(models.Notice.customer_id)
            )
            # Only the deleted Customer's own pending webhooks hold its key: not those of a Customer
            # created again under its id (signed with that one's key), which may stay pending for hours.
            pending = {
                customer_id
                for customer_id, written_at in oldest_pending
                if _still_signs(kept, customer_id, written_at)
            }
            running = {
                customer_id
                for customer_id in kept[0]
                if kept.annotations.get(deletion_running_annotation(customer_id))
            } - set(abandoned)
            settled = sorted(set(kept[0]) - pending - running)
            if not settled and not abandoned:
                return []
            annotations: dict[str, str | None] = {
                signs_until_annotation(customer_id): None for customer_id in settled
            }
            if abandoned:
                # Its pending webhooks (any of the id, as while it was marked) are signed until now, then
                # not; until a Customer holding the id now was created, when one does (its notices are
                # its own).
                now = await notices_written_until(self.sessions)
                for customer_id, successor_created in abandoned.items():
                    annotations[deletion_running_annotation(customer_id)] = None
                    if customer_id in kept[0] and customer_id not in settled:
                        until = min(now, successor_created) if successor_created is not None else now
                        annotations[signs_until_annotation(customer_id)] = until.isoformat()
            try:
                await self.kube.merge_secret_data(
                    namespace,
                    DELETED_NOTIFICATIONS_SECRET_NAME,
                    {customer_id: None for customer_id in settled},
                    manager=FieldManager.NOTICES,
                    resource_version=kept.resource_version,
                    annotations=annotations,
                )
            except ApiException as error:
                if error.status != 409:
                    raise
                return []
        if abandoned:
            log.warning(
                "lifted the deletion marks of customer ids %s: their Customers went without their"
                " deletions ending (a finalizer dropped by hand); their kept keys sign only the notices"
                " written until now",
                ", ".join(sorted(abandoned)),
            )
        if settled:
            log.info("dropped the kept signing secrets of deleted Customers %s", ", ".join(settled))
        return settled

    async def _abandoned_deletions(self, kept: SecretData) -> dict[str, datetime | None]:
        """The customer ids whose deletion mark names a Customer that is gone, or replaced under its name
        (another uid): its finalizer was dropped by hand, so its deletion never lifts the mark, and a
        marked key signs every notice of the id, a Customer's created again under it included. With
        each, when the first Customer holding the id now was created (what it wrote is its own; a list
        of the Customers, on this rare path), or None. A mark that names no Customer (written before
        marks did) is its deletion's to lift."""
        abandoned: dict[str, datetime | None] = {}
        for annotation, mark in kept.annotations.items():
            if not annotation.startswith(DELETION_RUNNING_PREFIX) or not mark:
                continue
            marker = marking_customer(mark)
            if marker is None:
                continue
            name, uid = marker
            found = await self.kube.read_customer(name)
            if found is None or found["metadata"].get("uid") != uid:
                abandoned[annotation.removeprefix(DELETION_RUNNING_PREFIX)] = None
        if abandoned:
            for body in await self.kube.list_customers():
                holds, created = customer_id_in_use(body), body["metadata"].get("creationTimestamp")
                if holds in abandoned and isinstance(created, str):
                    at, earlier = datetime.fromisoformat(created), abandoned[holds]
                    abandoned[holds] = at if earlier is None else min(at, earlier)
        return abandoned

    async def send_due(self) -> int:
        """Try every delivery that is due now, once (tests, and a drain at shutdown)."""
        tried = 0
        while await self.send_one():
            tried += 1
        return tried

    async def send_one(self) -> bool:
        """Claim the delivery that has been due longest and try it; False when none is due."""
        now = self.clock()
        async with self.sessions() as session, session.begin():
            row = (await session.execute(claim(now))).first()
            if row is None:
                return False
            # The try's time is the one it was claimed by (the later of this clock and PostgreSQL's):
            # from a clock behind, each retry shorter than the gap was due at once (found in review: four
            # tries in a second), and its webhook-timestamp was as old.
            delivery, notice_row, now = row
            notice = StoredNotice.of(notice_row)
            delivery.attempts += 1
            started = time.monotonic()
            try:
                await self._deliver(delivery, notice, now)
            except Exception as error:  # any error is this delivery's failure: it must never block the others
                self._count_failure(delivery, notice, error, now)
                return True
            if (outage := self._outage(delivery)) is not None:
                outage.succeeded()
            delivery.status = "sent"
            delivery.sent_at = now
            delivery.last_error = None
            log.info(
                "notice %s (%s) sent by %s in %.0f ms",
                delivery.message_id,
                notice.kind,
                delivery.channel,
                (time.monotonic() - started) * 1000,
                extra={"customer_id": notice.customer_id},
            )
        return True

    def _count_failure(
        self, delivery: models.NoticeDelivery, notice: StoredNotice, error: Exception, now: datetime
    ) -> None:
        """The try counts: its error kept, the next try after the backoff, dead after the last. Logged
        once, under its notice's customer id, with the traceback when the error is not one the sender
        expects (a bug, or a URL the client cannot even resolve); a try its channel's server failed
        (ChannelDown) is also a warning, once that server's outage (_outage)."""
        expected = isinstance(error, DeliveryFailed)
        reason = str(error) if expected else f"{type(error).__name__}: {error}"
        # PostgreSQL's text holds no NUL: an error quoting one must not fail the commit of this row.
        delivery.last_error = reason.replace("\x00", "\\x00")[:1000]
        dead = isinstance(error, DeliveryWithdrawn) or delivery.attempts >= self.options.max_attempts
        if dead:
            delivery.status = "dead"
        else:
            delivery.next_attempt_at = now + backoff(delivery.attempts)
        detail = error.detail if isinstance(error, DeliveryFailed) else None
        if isinstance(error, ChannelDown) and (outage := self._outage(delivery)) is not None:
            outage.failed(error, f"{reason} ({detail})" if detail else reason)
        log.log(
            logging.WARNING if dead or not expected else logging.INFO,
            "notice %s to %s %s: %s",
            delivery.message_id,
            delivery.channel,
            f"is dead after {delivery.attempts} tries" if dead else "failed, retried later",
            f"{reason} ({detail})" if detail else reason,
            exc_info=None if expected else error,
            extra={"customer_id": notice.customer_id},
        )

    def _outage(self, delivery: models.NoticeDelivery) -> Outage | None:
        """The outage a failed try of `delivery` is part of when its channel is one server (the SMTP
        server, the platform team's endpoint): one WARNING when its first try fails, however many
        deliveries are due, and a line once one goes through. None for a customer's webhook: its
        receiver failing is that customer's, logged with each delivery."""
        if delivery.channel == Channel.EMAIL and self._mail_relay is not None:
            server = self._mail_relay.server
            what, back = (
                f"mail to the SMTP server {server} fails",
                f"the SMTP server {server} takes mail again",
            )
        elif delivery.channel == Channel.PLATFORM:
            # Its host and port alone: NOTIFY_WEBHOOK_URL's path or query may hold a token.
            server = urlsplit(delivery.target).netloc.rpartition("@")[2]
            what = f"posts to the platform team's webhook {server} fail"
            back = f"the platform team's webhook {server} takes notices again"
        else:
            return None
        key = f"{delivery.channel} {server}"
        if key not in self._outages:
            self._outages[key] = Outage(
                log,
                f"notice sender: {what}",
                f"notice sender: {back}",
                retried=(
                    "each delivery is retried after its own backoff (its tries logged at INFO) and dead "
                    f"after NOTIFY_MAX_ATTEMPTS ({self.options.max_attempts}) tries"
                ),
            )
        return self._outages[key]

    async def _deliver(self, delivery: models.NoticeDelivery, notice: StoredNotice, now: datetime) -> None:
        if delivery.channel == Channel.EMAIL:
            await self._mail(delivery, notice, now)
        elif delivery.channel == Channel.WEBHOOK:
            assert self._http is not None, "start() first"
            await self._post(self._http, delivery, notice, await self._customer_key(delivery, notice), now)
        elif delivery.channel == Channel.PLATFORM:
            if self.options.platform_webhook_secret is None:
                raise DeliveryFailed("NOTIFY_WEBHOOK_SECRET is not set")
            assert self._platform_http is not None, "start() first"
            secret = webhook_secret_bytes(self.options.platform_webhook_secret)
            try:
                await self._post(self._platform_http, delivery, notice, secret, now)
            except DeliveryFailed as failed:  # the one endpoint every platform notice goes to
                raise ChannelDown(str(failed), failed.detail) from None
        else:
            raise DeliveryFailed(f"unknown channel {delivery.channel!r}")

    async def _mail(self, delivery: models.NoticeDelivery, notice: StoredNotice, now: datetime) -> None:
        if self._mail_relay is None:
            raise DeliveryFailed("SMTP_URL is not set")
        try:
            message = email_message(
                notice,
                sender=self.options.mail_from,
                to=delivery.target,
                message_id=delivery.message_id,
                now=now,
            )
        except ValueError as error:  # an address no mail can go to (render.email_message): said, no traceback
            raise DeliveryFailed(str(error)) from None
        try:
            await self._mail_relay.send(message)
        except MESSAGE_REFUSALS as error:  # this message's, unless the server refuses any mail of ours
            if refuses_the_sender(error):
                # The server's outage line names no customer's address.
                reply = error.recipients[0] if isinstance(error, aiosmtplib.SMTPRecipientsRefused) else error
                raise ChannelDown(f"SMTP: {reply.code} {without_addresses(reply.message)}") from None
            raise DeliveryFailed(f"SMTP: {type(error).__name__}: {error}") from None
        except MAIL_ERRORS as error:
            raise ChannelDown(f"SMTP: {type(error).__name__}: {error}") from None

    async def _customer_key(self, delivery: models.NoticeDelivery, notice: StoredNotice) -> bytes:
        """signing_secret's key (_signer) for the customer's webhook `delivery`, retargeted here to the URL
        the Customer holding its customer id names now (as a re-send does), unless a deletion's kept key
        signs it. DeliveryWithdrawn when that Customer names no webhook any more; DeliveryFailed when the
        Customers cannot be read, or no key signs the delivery (_why_no_secret)."""
        signer = await self._signer(notice)
        if signer.customer is not None:
            self._retarget(delivery, notice, signer.customer)
        if signer.key is None:
            raise DeliveryFailed(self._why_no_secret(notice, signer.customer))
        return _webhook_key(signer.key)

    async def _signer(self, notice: StoredNotice) -> _Signer:
        """Who signs the customer's webhook of `notice` now, looked up in this order (signing_secret's
        and the tries'): the copy a deletion of the notice's Customer kept, when it signs the notice
        (kept_key_signs: not for one written after the deletion ended, a Customer's created again under
        the id), for the URL the notice was written for, no Customer read (while that deletion still runs,
        only when no Customer holds the id); else the Customer holding the
        notice's customer id now (_holder), with the copy the operator made in its namespace; else, none
        holding it (deleted, or being deleted), the copy still in the namespace of the notice's name.
        A copy counts only when labelled with the notice's customer id: the name, and so the namespace,
        may already be another customer's (a company signed up again), whose key would sign the old
        customer's notice for a receiver that is not the new customer's."""
        kept, running = await self.kept_key(notice)
        if kept is not None and not running:
            return _Signer(kept, None)
        holder = await self._holder(notice)
        if kept is not None and holder is None:
            return _Signer(kept, None)
        # A key whose deletion still runs yields to a Customer holding the id: one applied since the
        # deletion looked (a rename whose old Customer went first), whose receiver knows its own key.
        name = str(holder["metadata"]["name"]) if holder is not None else notice.customer_name
        return _Signer(await self._copy_of(name, notice.customer_id), holder)

    async def _holder(self, notice: StoredNotice) -> dict[str, Any] | None:
        """The Customer holding the notice's customer id now, whose webhook the notice's is: the customer
        is its id, and a rename in Git that kept spec.customerId (the old Customer deleted, a new one
        created under another name) moves it. The one under the notice's name while it holds the id, else
        the one that does (a list of the Customers, on this rare path); None when none does. A Customer
        being deleted holds none: its spec is not the customer's any more. DeliveryFailed when the
        Customers cannot be read: a try must not go to a URL the customer may have withdrawn."""
        try:
            body = await self.kube.read_customer(notice.customer_name)
            if body is not None and _holds(body, notice.customer_id):
                return body
            return next(
                (other for other in await self.kube.list_customers() if _holds(other, notice.customer_id)),
                None,
            )
        except KubernetesUnavailable as error:
            raise DeliveryFailed(
                f"the Customer holding {notice.customer_id} cannot be read (its webhook goes where it "
                f"names): {error}"
            ) from None
        except ApiException as error:  # 401, 403: this server's account may not read it (the chart's RBAC)
            raise DeliveryFailed(
                f"the API server refused to read the Customer holding {notice.customer_id}: "
                f"{error.status} {error.reason}"
            ) from None

    def _retarget(
        self, delivery: models.NoticeDelivery, notice: StoredNotice, customer: dict[str, Any]
    ) -> None:
        """`delivery` to the URL `customer` names now (content.webhook_url); DeliveryWithdrawn when it names
        none, DeliveryFailed when its spec does not parse (its URL unknown)."""
        name = customer["metadata"]["name"]  # the notice's, or the one its customer id is held under now
        # Its notifications alone: a spec refused for another field (a newer CRD's, read by an older
        # replica) still says where its webhook goes.
        notifications = (customer.get("spec") or {}).get("notifications") or {}
        try:
            url = webhook_url(NotificationsSpec.model_validate(notifications))
        except ValidationError as error:
            raise DeliveryFailed(
                f"Customer {name}'s spec.notifications does not validate, so where its"
                f" webhook goes now is unknown: {error.errors()[0].get('msg', error)}"
            ) from None
        if url is None:
            raise DeliveryWithdrawn(
                f"spec.notifications.webhook was removed from Customer {name}: its notices "
                "are not posted any more (a re-send once it names a webhook again posts there)"
            )
        if url != delivery.target:
            log.info(
                "notice %s to webhook: retargeted from %s to %s, the URL its Customer names now",
                delivery.message_id,
                urlsplit(delivery.target).hostname,
                urlsplit(url).hostname,
                extra={"customer_id": notice.customer_id},
            )
            delivery.target = url

    async def signing_secret(self, notice: StoredNotice) -> bytes | None:
        """The key that signs the customer's webhook of `notice` now (_signer), None when none does (the
        sender's tries fail, _why_no_secret; a re-send of a deleted Customer's leaves it). DeliveryFailed
        when a copy or the Customers cannot be read, or a copy is no key."""
        signer = await self._signer(notice)
        return _webhook_key(signer.key) if signer.key is not None else None

    async def kept_key(self, notice: StoredNotice) -> tuple[bytes | None, bool]:
        """The copy of the signing secret a deletion of the notice's Customer kept, when it signs this
        notice (kept_key_signs: not one written after the deletion ended, a Customer's created again
        under the id), else None; and whether that deletion still runs (its mark is on), when the key
        yields to a Customer holding the id (_signer). DeliveryFailed when the Secret cannot be read."""
        namespace = self.options.billing_namespace
        kept = await self._read_secret(namespace, DELETED_NOTIFICATIONS_SECRET_NAME)
        value = kept.data.get(notice.customer_id) if kept is not None else None
        if kept is None or value is None:
            return None, False
        try:
            signs = kept_key_signs(kept, notice.customer_id, notice.created_at)
        except ValueError as error:
            raise DeliveryFailed(f"{namespace}/{DELETED_NOTIFICATIONS_SECRET_NAME}: {error}") from None
        running = bool(kept.annotations.get(deletion_running_annotation(notice.customer_id)))
        return (value if signs else None), running

    async def _copy_of(self, name: str, customer_id: str) -> bytes | None:
        """The signing secret's copy in Customer `name`'s namespace, when it is `customer_id`'s."""
        copy = await self._read_secret(namespace_for(name), NOTIFICATIONS_SECRET_NAME)
        if copy is None or copy.labels.get(CUSTOMER_ID_LABEL) != customer_id:
            return None
        return copy.data.get(NOTIFICATIONS_SECRET_KEY)

    async def _read_secret(self, namespace: str, name: str) -> SecretData | None:
        try:
            return await self.kube.read_secret_data(namespace, name)
        except KubernetesUnavailable as error:
            raise DeliveryFailed(str(error)) from None
        except ApiException as error:  # 401, 403: this server's account may not read it (the chart's RBAC)
            raise DeliveryFailed(
                f"the API server refused to read {namespace}/{name}: {error.status} {error.reason}"
            ) from None

    def _why_no_secret(self, notice: StoredNotice, customer: dict[str, Any] | None) -> str:
        """A deleted Customer's webhook (`customer` None: _holder) cannot be signed any more; a
        Customer's that is still there, not yet (the operator has not copied it: its condition says why)."""
        if customer is None:
            return self.deleted_without_key(notice)
        return (
            f"no signing secret yet: the operator writes {NOTIFICATIONS_SECRET_NAME} from "
            "spec.notifications.webhook.secretRef (see the Customer's NotificationsReady condition)"
        )

    def deleted_without_key(self, notice: StoredNotice) -> str:
        """Why the webhook of a deleted Customer's notice cannot be signed (its tries, a re-send's 409)."""
        return (
            f"Customer {notice.customer_name} ({notice.customer_id}) was deleted and no copy of its "
            f"signing secret is kept in {self.options.billing_namespace}/"
            f"{DELETED_NOTIFICATIONS_SECRET_NAME} (its deletion keeps one only while its webhooks "
            "are pending, and only when it had one)"
        )

    async def _post(
        self,
        http: aiohttp.ClientSession,
        delivery: models.NoticeDelivery,
        notice: StoredNotice,
        secret: bytes,
        now: datetime,
    ) -> None:
        body = webhook_body(notice)
        timestamp = int(now.timestamp())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "iotistic-billing-notices",
            "webhook-id": delivery.message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.message_id, timestamp, body),
        }
        host = urlsplit(delivery.target).hostname
        try:
            async with http.post(
                delivery.target, data=body, headers=headers, allow_redirects=False
            ) as answer:
                if not 200 <= answer.status < 300:
                    raise DeliveryFailed(f"HTTP {answer.status}")
        except AddressRefused as refused:
            raise DeliveryFailed(str(refused)) from None
        except aiohttp.ClientConnectorDNSError as error:
            raise DeliveryFailed(f"cannot resolve {host}", f"{type(error).__name__}: {error}") from None
        except (aiohttp.ClientError, TimeoutError) as error:
            # Refused, timed out, reset, not HTTP, TLS: told apart, they would map an address's ports.
            raise DeliveryFailed(
                f"no answer from {host}: the connection failed, timed out or broke off (the webhook "
                "server's log has the detail)",
                f"{type(error).__name__}: {error}",
            ) from None


__all__ = [
    "BACKOFF",
    "ChannelDown",
    "DeliveryFailed",
    "DeliveryWithdrawn",
    "NoticeSender",
    "SenderOptions",
    "backoff",
    "claim",
    "hold_kept_keys",
    "kept_key_signs",
    "sign",
]
