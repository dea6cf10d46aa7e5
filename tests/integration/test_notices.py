"""Notices on the real parts: written in PostgreSQL with their facts, mailed to Mailpit, posted to a real
aiohttp receiver that checks signatures with the standardwebhooks package (not our code), retried with
the same ids, shared by two senders without a double send, re-sent on request."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import kubernetes
import pytest
from aiohttp import web
from kubernetes.client.exceptions import ApiException
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from iotistic_billing.customer import (
    CUSTOMER_ID_LABEL,
    DELETED_NOTIFICATIONS_SECRET_NAME,
    GROUP,
    NOTIFICATIONS_SECRET_KEY,
    NOTIFICATIONS_SECRET_NAME,
    PLURAL,
    VERSION,
    Customer,
    CustomerSpec,
    deletion_mark,
    deletion_running_annotation,
    signs_until_annotation,
)
from iotistic_billing.db import migrate, models
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine, session_factory
from iotistic_billing.db.retention import prune_batch, retention_cutoff
from iotistic_billing.devenv.mailpit import Mailpit
from iotistic_billing.k8s import FieldManager, Kube, KubeApi, KubernetesUnavailable
from iotistic_billing.notices import outbox as outbox_module
from iotistic_billing.notices.content import Channel, NoticeKind, Target, license_changed, message_id
from iotistic_billing.notices.log import notice_to_resend, resend
from iotistic_billing.notices.outbox import Outbox
from iotistic_billing.notices.retention import expired
from iotistic_billing.notices.sender import BACKOFF, NoticeSender, SenderOptions, claim
from iotistic_billing.operator.context import OperatorContext, trial_notices_outage
from iotistic_billing.operator.notices import write_trial_ending
from iotistic_billing.processes import free_port
from iotistic_billing.settings import Settings
from iotistic_billing.webhook_server import notices as notices_route
from iotistic_billing.webhook_server.context import DIRECTORY, NOTICES
from iotistic_billing.webhook_server.options import ServerOptions
from iotistic_billing.workers import Precedence
from tests.conftest import (
    OperatorProcess,
    eventually,
    unique_name,
    wait_until,
    waiting_on_a_row_lock,
    waiting_on_an_advisory_lock,
)
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    admin_headers,
    running_app,
    webhook_settings_fixture,
)

pytestmark = pytest.mark.integration

PLATFORM_SECRET = "whsec_" + base64.b64encode(b"p" * 32).decode()
CUSTOMER_SECRET = "whsec_" + base64.b64encode(b"c" * 32).decode()


@dataclass
class Receiver:
    """An endpoint that verifies each delivery with standardwebhooks and answers `fail` 500s first."""

    secret: str
    fail: int = 0
    seen: list[str] = field(default_factory=list)  # webhook-id of every verified delivery
    bodies: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError as error:
            self.refused.append(str(error))
            return web.Response(status=400)
        self.seen.append(request.headers["webhook-id"])
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=500)
        self.bodies.append(payload)
        return web.Response(status=204)


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    """The platform team's endpoint and a customer's, on one real server."""
    platform, customer = Receiver(PLATFORM_SECRET), Receiver(CUSTOMER_SECRET)
    app = web.Application()
    app.router.add_post("/platform", platform.handle)
    app.router.add_post("/customer", customer.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    platform.url, customer.url = f"http://127.0.0.1:{port}/platform", f"http://127.0.0.1:{port}/customer"
    try:
        yield platform, customer
    finally:
        await runner.cleanup()


AGAIN_SECRET = "whsec_" + base64.b64encode(b"a" * 32).decode()


@asynccontextmanager
async def serving(receiver: Receiver, path: str) -> AsyncIterator[Receiver]:
    """`receiver` on a real server of its own, at `path`."""
    app = web.Application()
    app.router.add_post(path, receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    receiver.url = f"http://127.0.0.1:{port}{path}"
    try:
        yield receiver
    finally:
        await runner.cleanup()


@pytest.fixture
async def again_receiver() -> AsyncIterator[Receiver]:
    """The endpoint of a Customer created again under a deleted one's customer id, with its own secret."""
    async with serving(Receiver(AGAIN_SECRET), "/again") as receiver:
        yield receiver


@pytest.fixture
async def moved_receiver() -> AsyncIterator[Receiver]:
    """The endpoint a customer moves its webhook to, checking the same signing secret."""
    async with serving(Receiver(CUSTOMER_SECRET), "/moved") as receiver:
        yield receiver


class Clock:
    """Real time, moved forward by the test: a retry is due without waiting for it (and webhook
    timestamps stay within the receivers' five minutes)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def sessions(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(db_engine)


@pytest.fixture
def kube(k8s_client: kubernetes.client.ApiClient) -> Kube:
    return Kube(KubeApi(k8s_client, FieldManager.SIGNUP))


def sender(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    clock: Clock,
    smtp_url: str | None,
    max_attempts: int = 8,
    allowed: tuple[IPv4Network | IPv6Network, ...] = (ip_network("127.0.0.0/8"),),
) -> NoticeSender:
    return NoticeSender(
        sessions=sessions,
        kube=kube,
        options=SenderOptions(
            smtp_url=smtp_url,
            mail_from="Iotistic Billing <billing@iotistic.example>",
            platform_webhook_secret=PLATFORM_SECRET,
            max_attempts=max_attempts,
            workers=0,  # the test drives it
            # The receivers listen on 127.0.0.1, which a customer's webhook reaches only when allowed.
            webhook_allowed_networks=allowed,
        ),
        clock=clock,
    )


def one_worker(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    smtp_url: str,
    precedence: Precedence | None = None,
) -> NoticeSender:
    """A sender whose one worker claims and sends on its own once started (mail only), on real time."""
    return NoticeSender(
        sessions=sessions,
        kube=kube,
        options=SenderOptions(
            smtp_url=smtp_url, mail_from="billing@iotistic.example", workers=1, platform_webhook_secret=None
        ),
        clock=lambda: datetime.now(UTC),
        precedence=precedence,
    )


@pytest.fixture
async def started(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit
) -> AsyncIterator[tuple[NoticeSender, Clock]]:
    clock = Clock()
    one = sender(sessions, kube, clock, mailpit.smtp_url)
    await one.start()
    try:
        yield one, clock
    finally:
        await one.stop()


def customer_spec(name: str, webhook_url: str | None = None, **extra: Any) -> CustomerSpec:
    notifications: dict[str, Any] = {"emails": [f"finance@{name}.example"]}
    if webhook_url:
        notifications["webhook"] = {"url": webhook_url, "secretRef": {"name": "hook-secret"}}
    return CustomerSpec.model_validate(
        {"email": f"ops@{name}.example", "companyName": name.title(), "notifications": notifications, **extra}
    )


def customer_id_of(name: str) -> str:
    return f"cust_{name.replace('-', '')[:20]}"


def suspended_notice(name: str, jti: str = "j-1") -> Any:
    return license_changed(
        NoticeKind.LICENSE_SUSPENDED,
        customer_id=customer_id_of(name),
        customer_name=name,
        company=name.title(),
        jti=jti,
        plan="unlicensed",
        reason="suspended by an administrator",
    )


async def enqueue(
    sessions: async_sessionmaker[AsyncSession], outbox: Outbox, notice: Any, spec: CustomerSpec
) -> bool:
    async with sessions() as session, session.begin():
        return await outbox.enqueue(session, notice, spec)


async def enqueue_for_customer(
    sessions: async_sessionmaker[AsyncSession],
    k8s_client: kubernetes.client.ApiClient,
    receivers: tuple[Receiver, Receiver],
    name: str,
) -> tuple[Any, CustomerSpec]:
    """A suspension notice of a Customer with mail and its own webhook (its signing secret written), in
    the outbox with the platform's endpoint: the notice and the spec."""
    platform, customer = receivers
    write_customer_secret(k8s_client, name)
    notice, spec = suspended_notice(name), customer_spec(name, customer.url)
    await enqueue(sessions, Outbox(platform.url), notice, spec)
    return notice, spec


async def resend_at(
    sessions: async_sessionmaker[AsyncSession], notice: Any, now: datetime, spec: CustomerSpec | None
) -> Any:
    """POST /api/notices/{id}/resend's work (notices.log.resend) in a transaction of its own."""
    async with sessions() as session, session.begin():
        return await resend(session, await notice_row(session, notice.key), now, spec)


async def deliveries(sessions: async_sessionmaker[AsyncSession], key: str) -> list[models.NoticeDelivery]:
    async with sessions() as session:
        rows = await session.scalars(
            select(models.NoticeDelivery)
            .join(models.Notice)
            .where(models.Notice.key == key)
            .order_by(models.NoticeDelivery.id)
        )
        return list(rows.all())


async def notice_row(session: AsyncSession, key: str) -> models.Notice:
    found = await session.scalar(select(models.Notice).where(models.Notice.key == key))
    assert found is not None, key
    return found


def mails_to(mailpit: Mailpit, address: str) -> list[dict[str, Any]]:
    return mailpit.messages(f"to:{address}")


def write_customer_secret(k8s_client: kubernetes.client.ApiClient, name: str) -> None:
    """What the operator writes from spec.notifications.webhook.secretRef (its own test is below),
    labelled with the customer id (the sender signs with no other Customer's copy)."""
    core = kubernetes.client.CoreV1Api(k8s_client)
    namespace = f"customer-{name}"
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {
                "name": NOTIFICATIONS_SECRET_NAME,
                "labels": {CUSTOMER_ID_LABEL: customer_id_of(name)},
            },
            "data": {NOTIFICATIONS_SECRET_KEY: base64.b64encode(CUSTOMER_SECRET.encode()).decode()},
        },
    )


async def test_a_notice_is_mailed_to_each_address_and_posted_signed_once(
    sessions: async_sessionmaker[AsyncSession],
    started: tuple[NoticeSender, Clock],
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    platform, customer = receivers
    name = unique_name("notified")
    write_customer_secret(k8s_client, name)
    spec = customer_spec(name, customer.url)
    notice = suspended_notice(name)
    outbox = Outbox(platform.url)
    assert await enqueue(sessions, outbox, notice, spec)
    assert not await enqueue(sessions, outbox, notice, spec)  # the same fact again: no second notice

    one, _ = started
    await one.send_due()  # (other tests' notices of the session's database go out too)
    sent = await deliveries(sessions, notice.key)
    assert sorted(d.channel for d in sent) == [
        "email",
        "email",
        "platform",
        "webhook",
    ]  # two addresses, two endpoints
    assert {d.status for d in sent} == {"sent"}
    for address in (f"ops@{name}.example", f"finance@{name}.example"):
        (summary,) = mails_to(mailpit, address)
        mail = mailpit.message(summary["ID"])
        assert mail["Subject"] == "Your Iotistic licence is suspended"
        assert "suspended by an administrator" in mail["Text"] and "<p>" in mail["HTML"]
        (sent,) = [d for d in await deliveries(sessions, notice.key) if d.target == address]
        assert mail["MessageID"] == f"{sent.message_id}@iotistic.example"
    for receiver in (platform, customer):
        assert len(receiver.seen) == 1 and not receiver.refused
        assert receiver.bodies[0]["type"] == "license.suspended"
        assert receiver.bodies[0]["data"]["reason"] == "suspended by an administrator"
    assert platform.seen != customer.seen  # each delivery has its own id
    assert {d.status for d in await deliveries(sessions, notice.key)} == {"sent"}


async def test_notices_enqueued_at_once_are_written_as_each_alone_would_be(
    sessions: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's notices in a few statements: a key written before is not written again, a key given
    twice is written once with its first notice's targets, and every statement's rows are there."""
    monkeypatch.setattr(outbox_module, "ROWS_A_STATEMENT", 2)  # several statements of each kind
    names = [unique_name("batched") for _ in range(4)]
    notices = [suspended_notice(name) for name in names]
    outbox = Outbox()
    assert await enqueue(sessions, outbox, notices[0], customer_spec(names[0]))
    async with sessions() as session, session.begin():
        written = await outbox.enqueue_all(
            session,
            [
                (notices[0], customer_spec(names[0])),
                (notices[1], customer_spec(names[1])),
                (notices[1], customer_spec(unique_name("other"))),
                (notices[2], customer_spec(names[2])),
                (notices[3], customer_spec(names[3])),
            ],
        )
    assert written == {notice.key for notice in notices[1:]}
    for name, notice in zip(names, notices, strict=True):
        assert sorted(d.target for d in await deliveries(sessions, notice.key)) == [
            f"finance@{name}.example",
            f"ops@{name}.example",
        ]


async def test_a_claim_reads_the_due_index_s_first_entry_among_thousands_of_one_transaction(
    postgres: EmbeddedPostgres,
) -> None:
    """Found with bench/webhooks.py --backlog-dunning: the deliveries of one transaction share their
    next_attempt_at, and with an index of that column alone PostgreSQL read and sorted all of them for
    each claim (6.6 ms at 10,000). The sender's claim among 3,000 of them is the due index's first
    entry: an index scan, nothing sorted."""
    url = postgres.create_database(f"claims_{uuid.uuid4().hex[:10]}")
    await asyncio.to_thread(migrate.upgrade, url)
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO notices (key, kind, customer_id, customer_name, subject, facts)"
                    " SELECT 'k' || i, 'payment.failed', 'cust_claims', 'claims', 's', '{}'"
                    " FROM generate_series(1, 1500) AS i"
                )
            )
            await connection.execute(
                text(
                    "INSERT INTO notice_deliveries (notice_id, channel, target, message_id)"
                    " SELECT id, 'email', j || '@claims.example', 'msg_' || id || '_' || j"
                    " FROM notices, generate_series(1, 2) AS j"
                )
            )
            await connection.execute(text("ANALYZE notices, notice_deliveries"))
            statement = claim(datetime.now(UTC)).compile(dialect=connection.dialect)
            parameters = tuple(statement.params[name] for name in statement.positiontup or ())
            explained = await connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
            plan = json.dumps(explained.scalar_one())
    finally:
        await engine.dispose()
    assert '"Index Name": "ix_notice_deliveries_due"' in plan, plan
    assert '"Node Type": "Sort"' not in plan, plan


class WatchedPrecedence(Precedence):
    """Precedence, saying when a worker came to wait for its turn and when its turns were given."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()
        self.given: list[tuple[datetime, bool]] = []  # when, and whether the inbox was idle by then
        self.idle_since: datetime | None = None

    def idle(self) -> None:
        self.idle_since = datetime.now(UTC)
        super().idle()

    async def wait_turn(self) -> None:
        self.waiting.set()
        await super().wait_turn()
        self.given.append((datetime.now(UTC), self.idle_since is not None))


async def test_the_sender_s_workers_wait_while_the_inbox_applies_a_burst_then_send(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit
) -> None:
    """Mail and the inbox's applying share the process's event loop: while the inbox is busy the
    sender's workers hold their next delivery (for PRECEDENCE_SECONDS at most), and send it after."""
    name = unique_name("burst")
    notice = suspended_notice(name)
    await enqueue(sessions, Outbox(), notice, customer_spec(name))
    precedence = WatchedPrecedence()
    precedence.busy()
    working = one_worker(sessions, kube, mailpit.smtp_url, precedence)
    await working.start()
    try:
        await asyncio.wait_for(precedence.waiting.wait(), 30)  # the worker waits for its first turn
        assert {d.status for d in await deliveries(sessions, notice.key)} == {"pending"}
        precedence.idle()

        async def sent() -> bool:
            return {d.status for d in await deliveries(sessions, notice.key)} == {"sent"}

        await eventually(sent, within=30, message="the delivery sent once the inbox is idle")
        assert len(mails_to(mailpit, f"ops@{name}.example")) == 1
    finally:
        await working.stop()
    # Sent after the worker's first turn, which it was given once the inbox was idle.
    (first_turn, idle), *_ = precedence.given
    assert idle
    sent_at = [d.sent_at for d in await deliveries(sessions, notice.key)]
    assert all(at is not None and at >= first_turn for at in sent_at), (first_turn, sent_at)


class SmtpTap:
    """A TCP relay in front of Mailpit that keeps what the client said on each connection, and can break
    them as a server's restart or idle timeout does: closed at once, or at the client's next command with
    nothing of it forwarded (a connection the client still thinks is open), answered or not by a 421 first."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.said: list[bytearray] = []  # a connection's commands and messages, in the order they came
        self.open: list[asyncio.StreamWriter] = []
        self._doomed: set[asyncio.StreamWriter] = set()  # clients whose next command breaks the connection
        self.last_words = b""  # what the server says then, before it closes
        self.refused: set[str] = set()  # recipients answered 550 in the server's stead
        self.closing_at: set[str] = set()  # recipients answered 421 and the connection closed, once each
        self.smtputf8 = True  # False: the server's EHLO answer offers no SMTPUTF8 (many relays do not)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def smtp_url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def start(self) -> SmtpTap:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        for writer in self.open:
            writer.close()

    def break_at_next_command(self, last_words: bytes = b"") -> None:
        self._doomed.update(self.open)
        self.last_words = last_words

    @property
    def connections(self) -> int:
        return len(self.said)

    def carrying(self, addresses: set[str]) -> list[int]:
        """The connections that sent mail to any of `addresses`."""
        return [
            number
            for number, said in enumerate(self.said)
            if addresses & {a.decode() for a in re.findall(rb"RCPT TO:<([^>]+)>", bytes(said), re.IGNORECASE)}
        ]

    def quit_on(self, number: int) -> bool:
        return re.search(rb"^QUIT\r$", bytes(self.said[number]), re.MULTILINE) is not None

    def _refuses(self, command: bytes) -> bool:
        """A refused recipient's RCPT (the client sends one command at a time and waits for its answer)."""
        match = re.match(rb"RCPT TO:<([^>]+)>", command, re.IGNORECASE)
        return match is not None and match.group(1).decode() in self.refused

    def _closes_at(self, command: bytes) -> str | None:
        match = re.match(rb"RCPT TO:<([^>]+)>", command, re.IGNORECASE)
        recipient = match.group(1).decode() if match is not None else None
        return recipient if recipient in self.closing_at else None

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        said = bytearray()
        self.said.append(said)
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.open += [client_out, server_out]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, commands: bool) -> None:
            while data := await source.read(65536):
                if commands and client_out in self._doomed:
                    client_out.write(self.last_words)
                    break
                if commands:
                    said.extend(data)
                    if (closing := self._closes_at(data)) is not None:
                        self.closing_at.discard(closing)
                        client_out.write(b"421 4.3.2 too many messages on this connection, closing\r\n")
                        break
                    if self._refuses(data):
                        client_out.write(b"550 5.1.1 no such mailbox here\r\n")
                        continue
                elif not self.smtputf8:
                    data = re.sub(rb"(?m)^250([- ])SMTPUTF8\r$", rb"250\1XNOSMTPUTF8\r", data)
                sink.write(data)
                await sink.drain()
            client_out.close()
            server_out.close()

        try:
            await asyncio.gather(pump(client_in, server_out, True), pump(server_in, client_out, False))
        except ConnectionError:
            pass
        finally:
            self.open = [w for w in self.open if w not in (client_out, server_out)]


@pytest.fixture
async def tap(mailpit: Mailpit) -> AsyncIterator[SmtpTap]:
    relay = await SmtpTap(mailpit.smtp_port).start()
    try:
        yield relay
    finally:
        await relay.stop()


async def test_a_run_of_due_mail_goes_over_one_connection_closed_once_none_is_due(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit, tap: SmtpTap
) -> None:
    """A connection a message cost each mail of a burst a connect, EHLO and QUIT (TLS and AUTH too
    where the URL asks): a worker keeps its connection while deliveries are due, and QUITs it once none is."""
    names = [unique_name("onewire") for _ in range(5)]
    async with sessions() as session, session.begin():
        await Outbox().enqueue_all(session, [(suspended_notice(name), customer_spec(name)) for name in names])
    ours = {f"{who}@{name}.example" for name in names for who in ("ops", "finance")}
    working = one_worker(sessions, kube, tap.smtp_url)
    await working.start()
    try:

        async def all_sent() -> bool:
            statuses = [
                d.status for name in names for d in await deliveries(sessions, suspended_notice(name).key)
            ]
            return statuses == ["sent"] * 10

        await eventually(all_sent, within=30, message="the ten deliveries sent")
        # Mail other tests left due on the shared database may go out too, before or after: over the
        # same connection while it is due with this test's, over another after a QUIT; their webhooks
        # may take the sender's 10 s timeout each before the worker finds none due.
        (number,) = tap.carrying(ours)

        async def quit() -> bool:
            return tap.quit_on(number)

        await eventually(quit, within=30, message="the connection QUIT once none is due")
    finally:
        await working.stop()
    for name in names:
        assert len(mails_to(mailpit, f"ops@{name}.example")) == 1
        assert len(mails_to(mailpit, f"finance@{name}.example")) == 1


@pytest.mark.parametrize(
    "how", ["closed", "broken at the next command", "421 at the next command", "421 at RCPT"]
)
async def test_a_kept_connection_the_server_dropped_is_replaced_and_the_mail_sent_on_its_first_try(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit, tap: SmtpTap, how: str
) -> None:
    clock = Clock()
    one = sender(sessions, kube, clock, tap.smtp_url)
    await one.start()
    try:
        first, second = unique_name("kept"), unique_name("dropped")
        await enqueue(sessions, Outbox(), suspended_notice(first), customer_spec(first))
        assert await one.send_due() >= 2  # and what other tests left due on the shared database
        assert tap.connections == 1 and tap.open  # kept: this sender drives no worker to close it
        if how == "closed":
            tap.cut()
        elif how == "broken at the next command":
            tap.break_at_next_command()
        elif how == "421 at the next command":
            tap.break_at_next_command(b"421 4.3.2 too many messages on this connection, closing\r\n")
        else:  # found in review: aiosmtplib raises a 421 at RCPT as SMTPRecipientsRefused
            tap.closing_at.add(f"ops@{second}.example")
        await enqueue(sessions, Outbox(), suspended_notice(second), customer_spec(second))
        assert await one.send_due() >= 2
        sent = await deliveries(sessions, suspended_notice(second).key)
        assert {(d.status, d.attempts, d.last_error) for d in sent} == {("sent", 1, None)}
        assert tap.connections == 2
        assert len(mails_to(mailpit, f"ops@{second}.example")) == 1
    finally:
        await one.stop()


async def test_a_recipient_the_server_refuses_fails_its_delivery_alone_and_the_connection_serves_the_next(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit, tap: SmtpTap
) -> None:
    """A 550 to RCPT is that mail's failure; aiosmtplib resets the envelope, and the kept connection
    carries the next mail rather than being dropped."""
    name = unique_name("refused")
    notice = suspended_notice(name)
    tap.refused.add(f"ops@{name}.example")
    await enqueue(sessions, Outbox(), notice, customer_spec(name))
    one = sender(sessions, kube, Clock(), tap.smtp_url)
    await one.start()
    try:
        assert await one.send_due() >= 2  # and what other tests left due on the shared database
    finally:
        await one.stop()
    outcome = {d.target: (d.status, d.last_error) for d in await deliveries(sessions, notice.key)}
    assert outcome[f"ops@{name}.example"][0] == "pending"
    assert "550" in (outcome[f"ops@{name}.example"][1] or "")
    assert outcome[f"finance@{name}.example"] == ("sent", None)
    assert tap.connections == 1
    assert len(mails_to(mailpit, f"finance@{name}.example")) == 1


async def test_an_idn_domain_is_mailed_as_punycode(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit, tap: SmtpTap
) -> None:
    """spec.email takes a domain in Unicode; a relay without SMTPUTF8 takes ASCII addresses only (aiosmtplib
    refuses to send otherwise), so the domain goes IDNA-encoded, as DNS knows it. The log keeps the
    address as the spec wrote it."""
    tap.smtputf8 = False
    name = unique_name("idn")
    address, encoded = f"ops@bücher.{name}.example", f"ops@xn--bcher-kva.{name}.example"
    notice = suspended_notice(name)
    await enqueue(
        sessions, Outbox(), notice, CustomerSpec.model_validate({"email": address, "companyName": "Bücher"})
    )
    one = sender(sessions, kube, Clock(), tap.smtp_url)
    await one.start()
    try:
        assert await one.send_due() >= 1  # and what other tests left due on the shared database
    finally:
        await one.stop()
    (delivery,) = await deliveries(sessions, notice.key)
    assert (delivery.target, delivery.status, delivery.last_error) == (address, "sent", None)
    assert len(tap.carrying({encoded})) == 1
    (mail,) = mails_to(mailpit, encoded)
    assert mail["Subject"] == "Your Iotistic licence is suspended"


async def test_a_customer_s_webhook_to_the_server_s_own_address_is_refused_without_the_allow_list(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """Without NOTIFY_WEBHOOK_ALLOWED_CIDRS a Customer's URL on 127.0.0.1 (the webhook server's own port,
    as a metadata service's or the API server's address would be) gets no request, and its last error
    says why; the platform team's endpoint at the same address is the deployment's own and is posted to."""
    platform, customer = receivers
    name = unique_name("loopback")
    notice, _ = await enqueue_for_customer(sessions, k8s_client, receivers, name)
    one = sender(sessions, kube, Clock(), None, allowed=())
    await one.start()
    try:
        await one.send_due()
    finally:
        await one.stop()
    by_channel = {d.channel: d for d in await deliveries(sessions, notice.key) if d.channel != "email"}
    assert by_channel["platform"].status == "sent" and len(platform.bodies) == 1
    refused = by_channel["webhook"]
    assert (refused.status, refused.attempts) == ("pending", 1) and customer.seen == []
    assert refused.last_error == (
        "refused: 127.0.0.1 resolves to a private address (loopback, link-local, private, multicast or "
        "otherwise not public); NOTIFY_WEBHOOK_ALLOWED_CIDRS allows one on purpose"
    )


async def test_nothing_is_sent_for_a_fact_that_was_rolled_back(
    sessions: async_sessionmaker[AsyncSession], started: tuple[NoticeSender, Clock], mailpit: Mailpit
) -> None:
    name = unique_name("rolledback")
    notice = suspended_notice(name)
    with pytest.raises(RuntimeError, match="the fact's transaction fails"):
        async with sessions() as session, session.begin():
            assert await Outbox().enqueue(session, notice, customer_spec(name))
            raise RuntimeError("the fact's transaction fails after the notice was written")
    one, _ = started
    await one.send_due()
    assert await deliveries(sessions, notice.key) == []
    assert mails_to(mailpit, f"ops@{name}.example") == []


async def test_a_receiver_that_fails_three_times_gets_the_same_webhook_id_four_times(
    sessions: async_sessionmaker[AsyncSession],
    started: tuple[NoticeSender, Clock],
    receivers: tuple[Receiver, Receiver],
) -> None:
    platform, _ = receivers
    platform.fail = 3
    name = unique_name("retried")
    notice = suspended_notice(name)
    spec = CustomerSpec.model_validate({"email": f"ops@{name}.example", "companyName": "R"})
    await enqueue(sessions, Outbox(platform.url), notice, spec)
    one, clock = started
    for wait in (0, *BACKOFF[:3]):
        clock.advance(wait)
        await one.send_due()
    assert len(platform.seen) == 4 and len(set(platform.seen)) == 1, platform.seen
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "platform"]
    assert (webhook.status, webhook.attempts, webhook.message_id) == ("sent", 4, platform.seen[0])


async def test_deliveries_to_hosts_the_resolver_refuses_fail_alone_and_hold_up_no_other(
    sessions: async_sessionmaker[AsyncSession],
    started: tuple[NoticeSender, Clock],
    receivers: tuple[Receiver, Receiver],
) -> None:
    """URLs the CRD's pattern and NOTIFY_WEBHOOK_URL once took, whose host aiohttp's resolver cannot
    encode (it raises UnicodeError, no ClientError): once they stopped the sender for every customer."""
    platform, _ = receivers
    one, clock = started
    await one.send_due()  # what other tests left: the bad rows below are the oldest due
    name = unique_name("badhost")
    spec = CustomerSpec.model_validate({"email": f"ops@{name}.example", "companyName": "B"})
    bad = []
    for index, url in enumerate(("https://hooks..example.com/x", f"https://{'a' * 64}.example.com/x")):
        notice = suspended_notice(name, jti=f"bad-{index}")
        await enqueue(sessions, Outbox(url), notice, spec)
        bad.append(notice.key)
    good = suspended_notice(name, jti="good")
    await enqueue(sessions, Outbox(platform.url), good, spec)

    await one.send_due()
    (sent,) = [d for d in await deliveries(sessions, good.key) if d.channel == "platform"]
    assert sent.status == "sent" and len(platform.bodies) == 1
    for key in bad:
        (failed,) = [d for d in await deliveries(sessions, key) if d.channel == "platform"]
        assert (failed.status, failed.attempts) == ("pending", 1)
        assert "UnicodeError" in (failed.last_error or ""), failed.last_error
        assert failed.next_attempt_at > clock() + timedelta(seconds=BACKOFF[0] - 5)
    clock.advance(BACKOFF[0])
    await one.send_due()  # counted again, after its backoff: dead after NOTIFY_MAX_ATTEMPTS like any
    for key in bad:
        (failed,) = [d for d in await deliveries(sessions, key) if d.channel == "platform"]
        assert (failed.status, failed.attempts) == ("pending", 2)


async def test_a_sender_whose_clock_is_behind_postgresql_s_waits_out_each_backoff(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit
) -> None:
    """Found in review: the claim is due by the later of the sender's clock and PostgreSQL's, but a
    failed try's backoff was added to the sender's own: with a clock five minutes behind, the tries after
    10 s, 30 s and 2 min were due at once, four tries of NOTIFY_MAX_ATTEMPTS spent in one second."""
    clock = Clock()
    clock.advance(-300)
    one = sender(sessions, kube, clock, mailpit.smtp_url)
    await one.start()
    try:
        await one.send_due()  # what other tests left
        name = unique_name("behind")
        spec = CustomerSpec.model_validate({"email": f"ops@{name}.example", "companyName": "B"})
        notice = suspended_notice(name, jti="behind")
        await enqueue(sessions, Outbox("https://hooks..example.com/x"), notice, spec)  # refused: fails
        await one.send_due()
    finally:
        await one.stop()
    (failed,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "platform"]
    assert (failed.status, failed.attempts) == ("pending", 1), failed.last_error
    assert failed.next_attempt_at > datetime.now(UTC) + timedelta(seconds=BACKOFF[0] - 5)


async def test_a_signing_secret_the_server_may_not_read_fails_its_delivery_alone(
    sessions: async_sessionmaker[AsyncSession],
    receivers: tuple[Receiver, Receiver],
) -> None:
    """The API server refusing the read (401, 403: RBAC) is that delivery's failure, not the sender's."""
    platform, customer = receivers

    class Refusing:
        async def read_secret_data(self, namespace: str, name: str) -> None:
            raise ApiException(status=403, reason="Forbidden")

    clock = Clock()
    one = sender(sessions, cast(Kube, Refusing()), clock, None)
    await one.start()
    try:
        await one.send_due()  # what other tests left
        name = unique_name("refused")
        spec = CustomerSpec.model_validate(
            {
                "email": f"ops@{name}.example",
                "companyName": "R",
                "notifications": {"webhook": {"url": customer.url, "secretRef": {"name": "hook"}}},
            }
        )
        notice = suspended_notice(name)
        await enqueue(sessions, Outbox(platform.url), notice, spec)
        await one.send_due()
    finally:
        await one.stop()
    by_channel = {d.channel: d for d in await deliveries(sessions, notice.key)}
    assert by_channel["platform"].status == "sent"
    refused = by_channel["webhook"]
    assert (refused.status, refused.attempts) == ("pending", 1)
    # The first Secret it reads: the copies kept of deleted Customers' (the name may be another's now).
    assert refused.last_error == (
        f"the API server refused to read default/{DELETED_NOTIFICATIONS_SECRET_NAME}: 403 Forbidden"
    )


async def test_smtp_down_for_a_minute_delays_mail_and_loses_none(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    tmp_path: Path,
) -> None:
    later = Mailpit(tmp_path)  # not started yet: nothing listens on its SMTP port
    clock = Clock()
    one = sender(sessions, kube, clock, later.smtp_url)
    await one.start()
    try:
        name = unique_name("smtpdown")
        notice = suspended_notice(name)
        await enqueue(sessions, Outbox(), notice, customer_spec(name))
        # What else is due on the shared database (deliveries other tests left) is tried too: this
        # notice's two deliveries are checked by their rows and their mail.
        assert await one.send_due() >= 2
        assert {(d.status, d.attempts) for d in await deliveries(sessions, notice.key)} == {("pending", 1)}
        assert all("SMTP" in (d.last_error or "") for d in await deliveries(sessions, notice.key))
        later.start()
        try:
            clock.advance(60)
            assert await one.send_due() >= 2
            assert {(d.status, d.attempts) for d in await deliveries(sessions, notice.key)} == {("sent", 2)}
            assert len(mails_to(later, f"ops@{name}.example")) == 1
            assert len(mails_to(later, f"finance@{name}.example")) == 1
        finally:
            later.stop()
    finally:
        await one.stop()


async def test_two_senders_share_the_deliveries_and_send_none_twice(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
) -> None:
    platform, _ = receivers
    clock = Clock()
    replicas = [sender(sessions, kube, clock, mailpit.smtp_url) for _ in range(2)]
    for replica in replicas:
        await replica.start()
    await replicas[0].send_due()  # what other tests left: this test's notices alone are shared below
    try:
        name = unique_name("shared")
        keys = []
        for index in range(10):
            notice = suspended_notice(name, jti=f"j-{index}")
            keys.append(notice.key)
            await enqueue(sessions, Outbox(platform.url), notice, customer_spec(name))
        tried = await asyncio.gather(*(replica.send_due() for replica in replicas))
        assert all(tried), tried  # both took part
    finally:
        for replica in replicas:
            await replica.stop()
    assert len(mails_to(mailpit, f"ops@{name}.example")) == 10
    assert len(mails_to(mailpit, f"finance@{name}.example")) == 10
    ids = [webhook_id for webhook_id in platform.seen]
    assert len(ids) == 10 and len(set(ids)) == 10


async def test_a_dead_delivery_is_sent_again_on_request(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    receivers: tuple[Receiver, Receiver],
) -> None:
    from iotistic_billing.notices.log import recent_notices, resend

    platform, _ = receivers
    platform.fail = 2
    clock = Clock()
    one = sender(sessions, kube, clock, None, max_attempts=2)
    await one.start()
    try:
        name = unique_name("dead")
        notice = suspended_notice(name)
        spec = CustomerSpec.model_validate({"email": f"ops@{name}.example", "companyName": "D"})
        await enqueue(sessions, Outbox(platform.url), notice, spec)
        await one.send_due()
        clock.advance(BACKOFF[0])
        await one.send_due()
        statuses = {d.channel: d.status for d in await deliveries(sessions, notice.key)}
        assert statuses == {"email": "dead", "platform": "dead"}  # no SMTP_URL: mail waits, then dies
        async with sessions() as session:
            (logged,) = await recent_notices(session, customer_id=notice.customer_id, status="dead", limit=5)
        async with sessions() as session, session.begin():
            await resend(session, logged.notice, clock(), spec)
        await one.send_due()
        (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "platform"]
        assert (webhook.status, webhook.attempts) == ("sent", 1)
        assert len(platform.seen) == 3 and len(set(platform.seen)) == 1
    finally:
        await one.stop()


async def test_a_sender_whose_clock_is_behind_postgresql_s_sends_a_new_notice_at_once(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, receivers: tuple[Receiver, Receiver]
) -> None:
    """Found in review: a new delivery is due at PostgreSQL's now() (the column's default) and the claim
    compared it with the sender's clock, so a node an hour behind sent every notice an hour late."""
    platform, _ = receivers
    clock = Clock()
    clock.offset = -timedelta(minutes=2)  # within the receivers' five minutes of timestamp
    one = sender(sessions, kube, clock, None)
    name = unique_name("skewed")
    notice = suspended_notice(name)
    spec = CustomerSpec.model_validate({"email": f"ops@{name}.example", "companyName": "S"})
    await enqueue(sessions, Outbox(platform.url), notice, spec)
    await one.start()
    try:
        await one.send_due()
    finally:
        await one.stop()
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "platform"]
    assert (webhook.status, webhook.attempts) == ("sent", 1)


async def test_resend_leaves_sent_deliveries_alone(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """A customer's webhook died, its mails and the platform's webhook arrived: a re-send makes the dead
    one due again and sends nothing that arrived a second time."""
    platform, customer = receivers
    customer.fail = 1
    name = unique_name("halfdead")
    notice, spec = await enqueue_for_customer(sessions, k8s_client, receivers, name)
    clock = Clock()
    one = sender(sessions, kube, clock, mailpit.smtp_url, max_attempts=1)
    await one.start()
    try:
        await one.send_due()
        before = {d.target: (d.status, d.attempts) for d in await deliveries(sessions, notice.key)}
        assert before[customer.url] == ("dead", 1)
        assert sorted(before.values()) == [("dead", 1)] + [("sent", 1)] * 3
        logged = await resend_at(sessions, notice, clock(), spec)
        resent = {d.target: (d.status, d.attempts) for d in logged.deliveries}
        assert resent == {**before, customer.url: ("pending", 0)}
        await one.send_due()
    finally:
        await one.stop()
    assert {d.status for d in await deliveries(sessions, notice.key)} == {"sent"}
    assert len(customer.seen) == 2 and len(set(customer.seen)) == 1  # the same webhook-id, on request
    assert len(platform.seen) == 1
    assert len(mails_to(mailpit, f"ops@{name}.example")) == 1
    assert len(mails_to(mailpit, f"finance@{name}.example")) == 1


async def test_a_notice_resent_after_every_copy_arrived_mails_under_a_new_message_id(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """Found in review: a customer who lost the mail asks for it again, and a mailbox that holds (or
    held) its Message-ID drops the copy, as Gmail does. The mail gets a Message-ID of its own; the
    webhooks keep their webhook-id, the receivers' idempotency key."""
    platform, customer = receivers
    name = unique_name("lostmail")
    notice, spec = await enqueue_for_customer(sessions, k8s_client, receivers, name)
    clock = Clock()
    one = sender(sessions, kube, clock, mailpit.smtp_url)
    await one.start()
    try:
        await one.send_due()
        first = {d.target: d.message_id for d in await deliveries(sessions, notice.key)}
        assert {d.status for d in await deliveries(sessions, notice.key)} == {"sent"}
        clock.advance(60)
        await resend_at(sessions, notice, clock(), spec)
        await one.send_due()
    finally:
        await one.stop()
    after = {d.target: d.message_id for d in await deliveries(sessions, notice.key)}
    assert {d.status for d in await deliveries(sessions, notice.key)} == {"sent"}
    address = f"ops@{name}.example"
    assert after[address] != first[address] and after[address].startswith(first[address] + ".r")
    mails = {mail["MessageID"] for mail in mails_to(mailpit, address)}
    assert mails == {f"{first[address]}@iotistic.example", f"{after[address]}@iotistic.example"}
    assert after[customer.url] == first[customer.url] and after[platform.url] == first[platform.url]
    assert len(customer.seen) == 2 and len(set(customer.seen)) == 1


async def test_a_resend_waiting_on_a_send_that_goes_through_sends_nothing_again(
    sessions: async_sessionmaker[AsyncSession],
    db_engine: AsyncEngine,
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """Found in review: a resend asked for the one delivery not sent, waited on its lock while a sender
    sent it, then found every delivery sent and sent all of them again (the rule for a notice a customer
    says it lost)."""

    name = unique_name("racing")
    notice, spec = suspended_notice(name), customer_spec(name, "https://hooks.racing.example/x")
    await enqueue(sessions, Outbox(), notice, spec)
    async with sessions() as session, session.begin():
        row = await notice_row(session, notice.key)
        rows = (
            await session.scalars(
                select(models.NoticeDelivery).where(models.NoticeDelivery.notice_id == row.id)
            )
        ).all()
        for delivery in rows:  # the mails went out; the webhook is still to send
            delivery.status = "sent" if delivery.channel == "email" else "pending"
    async with sessions() as sending, sending.begin():
        webhook = await sending.scalar(
            select(models.NoticeDelivery)
            .where(models.NoticeDelivery.notice_id == row.id, models.NoticeDelivery.channel == "webhook")
            .with_for_update()
        )
        assert webhook is not None

        async def resend_now() -> list[str]:
            logged = await resend_at(sessions, notice, datetime.now(UTC), spec)
            return sorted(delivery.status for delivery in logged.deliveries)

        resending = asyncio.create_task(resend_now())
        await eventually(
            lambda: waiting_on_a_row_lock(db_engine, "notice_deliveries"), message="the resend at the lock"
        )
        assert not resending.done()
        webhook.status = "sent"  # the sender's send went through
    assert await asyncio.wait_for(resending, 10) == ["sent", "sent", "sent"]


def lose_the_database_at_the_resend_s_commit(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The route's resend written (flushed), then its backend ended from another connection before its
    commit: the COMMIT fails as one whose answer was lost does, which the route cannot tell apart."""
    resend_of_the_route = notices_route.resend

    async def resend_then_lose_the_database(session: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        logged = await resend_of_the_route(session, *args, **kwargs)
        await session.flush()
        backend = await session.scalar(text("SELECT pg_backend_pid()"))
        async with engine.connect() as connection:
            # With a timeout, it answers once the backend is gone: the COMMIT cannot reach it before.
            ended = await connection.scalar(
                text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": backend}
            )
        assert ended, f"backend {backend} not ended"
        return logged

    monkeypatch.setattr(notices_route, "resend", resend_then_lose_the_database)


async def test_a_resend_lost_at_its_commit_says_it_may_have_been_made(
    sessions: async_sessionmaker[AsyncSession],
    db_engine: AsyncEngine,
    webhook_settings: Settings,
    kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a resend whose connection was lost at its COMMIT answered "nothing was changed,
    retry later"; when that commit had gone through, the admin's retry made every delivery due again,
    sent meanwhile or not: the customer got the notice twice more, each mail under a new Message-ID."""
    name = unique_name("indoubt")
    notice = suspended_notice(name)
    await enqueue(sessions, Outbox(), notice, customer_spec(name))
    async with sessions() as session, session.begin():
        notice_id = (await notice_row(session, notice.key)).id
        await session.execute(
            update(models.NoticeDelivery)
            .where(models.NoticeDelivery.notice_id == notice_id)
            .values(status="dead", attempts=1)
        )
    lose_the_database_at_the_resend_s_commit(db_engine, monkeypatch)
    async with running_app(
        webhook_settings, kubeconfig, ServerOptions(license_wait=0, inbox_workers=0)
    ) as api:
        answer = await api.post(f"/api/notices/{notice_id}/resend", headers=admin_headers())
        problem = await answer.json()
    assert answer.status == 503, problem
    assert problem["details"] == {"dependency": "Database"}
    assert f"the resend of notice {notice_id} may have been made" in problem["message"], problem
    assert f"GET /api/notices?customer_id={customer_id_of(name)}" in problem["message"]
    assert "nothing was changed" not in problem["message"]
    # Here the backend ended before the COMMIT, so nothing was made: what the answer cannot know.
    assert {d.status for d in await deliveries(sessions, notice.key)} == {"dead"}


async def test_a_resent_webhook_goes_to_the_url_its_customer_names_now(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
    webhook_settings: Settings,
    kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /api/notices/{id}/resend: a webhook that died at a URL the customer has fixed since goes to
    the fixed one; once the customer took its webhook away, a re-send of the whole notice leaves it be.
    With the API server away, a resend goes to the stored targets (a mail needs PostgreSQL alone)."""
    _, customer = receivers
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    name = unique_name("movedhook")
    write_customer_secret(k8s_client, name)
    gone = f"http://127.0.0.1:{free_port()}/gone"  # nothing listens: the first try is the last
    spec = customer_spec(name, gone)
    body = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    create_customer(objects, name, {**body, "customerId": customer_id_of(name)})
    notice = suspended_notice(name)
    await enqueue(sessions, Outbox(), notice, spec)
    clock = Clock()
    one = sender(sessions, kube, clock, mailpit.smtp_url, max_attempts=1)
    await one.start()
    # The app's own sender sends nothing (no inbox workers): this test's sender does, after each request.
    app = running_app(webhook_settings, kubeconfig, ServerOptions(license_wait=0, inbox_workers=0))
    try:
        async with app as api:
            await one.send_due()
            assert {d.target: d.status for d in await deliveries(sessions, notice.key)}[gone] == "dead"
            async with sessions() as session:
                resend_path = f"/api/notices/{(await notice_row(session, notice.key)).id}/resend"

            async def api_server_away(*args: Any, **kwargs: Any) -> None:
                raise KubernetesUnavailable("the API server cannot be reached")

            monkeypatch.setattr(api.app[DIRECTORY], "by_customer_id", api_server_away)
            answer = await api.post(resend_path, headers=admin_headers())
            assert answer.status == 202, await answer.text()
            assert ("webhook", "pending", gone) in shown(await answer.json())
            monkeypatch.undo()
            await one.send_due()
            fixed = {**body["notifications"]["webhook"], "url": customer.url}
            objects.patch_cluster_custom_object(
                GROUP, VERSION, PLURAL, name, {"spec": {"notifications": {"webhook": fixed}}}
            )
            async with sessions() as session:
                resend_path = f"/api/notices/{(await notice_row(session, notice.key)).id}/resend"
            answer = await api.post(resend_path, headers=admin_headers())
            assert answer.status == 202, await answer.text()
            assert shown(await answer.json()) == [
                ("email", "sent", f"finance@{name}.example"),
                ("email", "sent", f"ops@{name}.example"),
                ("webhook", "pending", customer.url),  # the dead one alone, to the URL fixed since
            ]
            await one.send_due()
            (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
            assert (webhook.target, webhook.status) == (customer.url, "sent")
            assert len(customer.bodies) == 1 and not customer.refused

            objects.patch_cluster_custom_object(
                GROUP, VERSION, PLURAL, name, {"spec": {"notifications": {"webhook": None}}}
            )
            answer = await api.post(resend_path, headers=admin_headers())
            assert answer.status == 202, await answer.text()
            assert shown(await answer.json()) == [
                ("email", "pending", f"finance@{name}.example"),
                ("email", "pending", f"ops@{name}.example"),
                ("webhook", "sent", customer.url),
            ]
            await one.send_due()
    finally:
        await one.stop()
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    assert {(d.status, d.attempts) for d in await deliveries(sessions, notice.key)} == {("sent", 1)}
    for address in (f"ops@{name}.example", f"finance@{name}.example"):
        assert len(mails_to(mailpit, address)) == 2  # all of it asked for again: the mails
    assert len(customer.bodies) == 1  # not the webhook its customer took away


async def test_a_resend_mails_the_address_its_customer_fixed_and_leaves_the_typo_s_dead(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    k8s_client: kubernetes.client.ApiClient,
    webhook_settings: Settings,
    kubeconfig: Path,
) -> None:
    """Found in review: a customer's spec.email had a typo and its notice's mail died there; the admin
    fixed spec.email and pressed resend, and the mail went to the typo again, to die again. The resend
    mails the address the Customer names now, a new delivery its answer lists, and leaves the typo's."""
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    name = unique_name("typo")
    typo, fixed, finance = f"ops@{name}.exmaple", f"ops@{name}.example", f"finance@{name}.example"
    spec = customer_spec(name, email=typo)
    body = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    create_customer(objects, name, {**body, "customerId": customer_id_of(name)})
    notice = suspended_notice(name)
    await enqueue(sessions, Outbox(), notice, spec)
    clock = Clock()
    nomail = sender(sessions, kube, clock, None, max_attempts=1)  # every mail fails: SMTP_URL not set
    mailer = sender(sessions, kube, clock, mailpit.smtp_url, max_attempts=1)
    await nomail.start()
    await mailer.start()
    app = running_app(webhook_settings, kubeconfig, ServerOptions(license_wait=0, inbox_workers=0))
    try:
        async with app as api:
            await nomail.send_due()
            assert {d.status for d in await deliveries(sessions, notice.key)} == {"dead"}
            objects.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"spec": {"email": fixed}})

            answer = await resend_by_api(api, sessions, notice.key)
            assert answer.status == 202, await answer.text()
            assert shown(await answer.json()) == [
                ("email", "dead", typo),
                ("email", "pending", finance),
                ("email", "pending", fixed),
            ]
            await mailer.send_due()
    finally:
        await nomail.stop()
        await mailer.stop()
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    after = {d.target: d for d in await deliveries(sessions, notice.key)}
    assert (after[fixed].status, after[typo].status, after[finance].status) == ("sent", "dead", "sent")
    assert after[fixed].message_id == message_id(notice.key, Target(Channel.EMAIL, fixed))
    assert len(mails_to(mailpit, fixed)) == 1 and not mails_to(mailpit, typo)


async def test_a_resend_does_not_mail_an_address_its_customer_removed(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit
) -> None:
    """Found in review: a resend mailed every address the notice was written for, one the customer had
    taken out of spec.notifications.emails since too (someone who left, a list closed). That delivery is
    left as it is; the addresses the Customer still names are mailed."""
    name = unique_name("leftlist")
    ops, finance = f"ops@{name}.example", f"finance@{name}.example"
    notice = suspended_notice(name)
    await enqueue(sessions, Outbox(), notice, customer_spec(name))
    clock = Clock()
    nomail = sender(sessions, kube, clock, None, max_attempts=1)
    mailer = sender(sessions, kube, clock, mailpit.smtp_url, max_attempts=1)
    await nomail.start()
    await mailer.start()
    try:
        await nomail.send_due()
        assert {d.status for d in await deliveries(sessions, notice.key)} == {"dead"}
        now_named = customer_spec(name, notifications={"emails": []})
        logged = await resend_at(sessions, notice, clock(), now_named)
        assert [(d.target, d.status) for d in logged.resent] == [(ops, "pending")]
        await mailer.send_due()
    finally:
        await nomail.stop()
        await mailer.stop()
    assert {d.target: d.status for d in await deliveries(sessions, notice.key)} == {
        ops: "sent",
        finance: "dead",
    }
    assert len(mails_to(mailpit, ops)) == 1 and not mails_to(mailpit, finance)


async def test_a_resend_of_a_deleted_customer_s_notice_mails_the_stored_addresses(
    sessions: async_sessionmaker[AsyncSession], kube: Kube, mailpit: Mailpit
) -> None:
    """With no Customer (deleted: no spec now) there are no addresses it names now: a resend mails those
    the notice was written for, as before, and writes no delivery."""
    name = unique_name("goneaddr")
    typo, finance = f"ops@{name}.exmaple", f"finance@{name}.example"
    notice = suspended_notice(name)
    await enqueue(sessions, Outbox(), notice, customer_spec(name, email=typo))
    clock = Clock()
    nomail = sender(sessions, kube, clock, None, max_attempts=1)
    mailer = sender(sessions, kube, clock, mailpit.smtp_url, max_attempts=1)
    await nomail.start()
    await mailer.start()
    try:
        await nomail.send_due()
        logged = await resend_at(sessions, notice, clock(), None)
        assert sorted(d.target for d in logged.resent) == [finance, typo]
        await mailer.send_due()
    finally:
        await nomail.stop()
        await mailer.stop()
    assert {d.target: d.status for d in await deliveries(sessions, notice.key)} == {
        typo: "sent",
        finance: "sent",
    }
    assert len(mails_to(mailpit, typo)) == 1 and len(mails_to(mailpit, finance)) == 1


def create_customer(objects: kubernetes.client.CustomObjectsApi, name: str, spec: dict[str, Any]) -> None:
    objects.create_cluster_custom_object(
        GROUP,
        VERSION,
        PLURAL,
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Customer", "metadata": {"name": name}, "spec": spec},
    )


def create_hooked_customer(
    k8s_client: kubernetes.client.ApiClient, name: str, customer_id: str, receiver: Receiver
) -> None:
    """Customer `name` under `customer_id`, its webhook posted to `receiver` and signed with its secret (the
    secretRef's Secret in a namespace handed to it, as a GitOps repository does), licensed and hooked."""
    core, objects = kubernetes.client.CoreV1Api(k8s_client), kubernetes.client.CustomObjectsApi(k8s_client)
    namespace = f"customer-{name}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {"iotistic.io/customer": name}}})
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "hook"}, "data": {"k": base64.b64encode(receiver.secret.encode()).decode()}},
    )
    spec = customer_spec(name, receiver.url)
    create_customer(
        objects,
        name,
        {
            **spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
            "customerId": customer_id,
            "notifications": {"webhook": {"url": receiver.url, "secretRef": {"name": "hook", "key": "k"}}},
        },
    )

    def licensed_and_hooked() -> bool:
        body = objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        status = body.get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return bool(status.get("license")) and conditions.get("NotificationsReady") == "True"

    wait_until(licensed_and_hooked, timeout=90, message=f"Customer {name} licensed, its webhook ready")


def delete_customer(k8s_client: kubernetes.client.ApiClient, name: str) -> None:
    """Customer `name` deleted, its finalizer (the session operator's) done."""
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)

    def gone() -> bool:
        try:
            objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as error:
            return error.status == 404
        return False

    wait_until(gone, timeout=90, message=f"Customer {name} finalized")


def shown(notice: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A NoticeView's deliveries as (channel, status, target), sorted."""
    return sorted((d["channel"], d["status"], d["target"]) for d in notice["deliveries"])


class CustomerReads(Kube):
    """The API client, noting the name of each Customer read."""

    def __init__(self, api: KubeApi) -> None:
        super().__init__(api)
        self.read: list[str] = []

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        self.read.append(name)
        return await super().read_customer(name)


async def test_a_webhook_retried_after_its_customer_moved_it_goes_to_the_new_url_alone(
    sessions: async_sessionmaker[AsyncSession],
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    moved_receiver: Receiver,
    k8s_client: kubernetes.client.ApiClient,
    operator: OperatorProcess,
) -> None:
    """Found in review: a webhook delivery kept the URL it was written with for all its tries (3.7 hours
    to the 8th): a customer that moved its webhook off a URL (it leaked, or was decommissioned) had the
    retries posted there, signed with its current key. Each try goes to the URL its Customer names then,
    read once a try (a mail's try reads no Customer)."""
    _, old = receivers
    old.fail = 100  # down: each try fails
    kube = CustomerReads(KubeApi(k8s_client, FieldManager.SIGNUP))
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    clock = Clock()
    one = sender(sessions, kube, clock, mailpit.smtp_url)
    await one.start()
    name = unique_name("movedon")
    try:
        await one.send_due()  # what other tests left
        create_hooked_customer(k8s_client, name, customer_id_of(name), old)
        notice = suspended_notice(name)
        await enqueue(sessions, Outbox(), notice, customer_spec(name, old.url))
        await one.send_due()
        by_channel = {d.channel: d for d in await deliveries(sessions, notice.key)}
        webhook = by_channel["webhook"]
        assert (webhook.target, webhook.status, webhook.attempts) == (old.url, "pending", 1)
        assert old.seen.count(webhook.message_id) == 1 and by_channel["email"].status == "sent"
        reads_by_the_first_try = kube.read.count(name)

        objects.patch_cluster_custom_object(
            GROUP,
            VERSION,
            PLURAL,
            name,
            {"spec": {"notifications": {"webhook": {"url": moved_receiver.url}}}},
        )
        clock.advance(BACKOFF[0])
        await one.send_due()
    finally:
        await one.stop()
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert (webhook.target, webhook.status, webhook.attempts) == (moved_receiver.url, "sent", 2)
    assert moved_receiver.seen == [webhook.message_id] and not moved_receiver.refused  # its key signs it
    assert old.seen.count(webhook.message_id) == 1  # nothing more at the URL the customer left
    assert (reads_by_the_first_try, kube.read.count(name)) == (1, 2)


async def test_a_webhook_retried_after_its_customer_removed_it_is_dead_at_its_next_try_unposted(
    sessions: async_sessionmaker[AsyncSession],
    started: tuple[NoticeSender, Clock],
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
    operator: OperatorProcess,
) -> None:
    """Found in review: the operator's pass after a webhook is removed from the spec deletes the copy of
    its signing secret, and its NotificationsReady with it; the deliveries still retrying went on failing
    for hours, "no signing secret yet ... see the Customer's NotificationsReady condition" (and posted to
    the withdrawn URL while the copy was there). The next try is the last, dead naming the removal."""
    _, old = receivers
    old.fail = 100  # down: each try fails
    one, clock = started
    await one.send_due()  # what other tests left
    core, objects = kubernetes.client.CoreV1Api(k8s_client), kubernetes.client.CustomObjectsApi(k8s_client)
    name = unique_name("unhooked")
    create_hooked_customer(k8s_client, name, customer_id_of(name), old)
    try:
        notice = suspended_notice(name)
        await enqueue(sessions, Outbox(), notice, customer_spec(name, old.url))
        await one.send_due()
        (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
        assert (webhook.status, webhook.attempts) == ("pending", 1)

        objects.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, name, {"spec": {"notifications": {"webhook": None}}}
        )

        def copy_deleted() -> bool:
            try:
                core.read_namespaced_secret(NOTIFICATIONS_SECRET_NAME, f"customer-{name}")
            except ApiException as error:
                return error.status == 404
            return False

        wait_until(copy_deleted, timeout=60, message=f"the copy of {name}'s signing secret deleted")
        clock.advance(BACKOFF[0])
        await one.send_due()
    finally:
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert (webhook.status, webhook.attempts) == ("dead", 2), webhook.last_error
    assert f"spec.notifications.webhook was removed from Customer {name}" in (webhook.last_error or "")
    assert old.seen.count(webhook.message_id) == 1  # no post after the removal


async def test_a_webhook_retried_after_its_customer_was_renamed_goes_to_the_new_customer_s_url_and_key(
    sessions: async_sessionmaker[AsyncSession],
    started: tuple[NoticeSender, Clock],
    receivers: tuple[Receiver, Receiver],
    again_receiver: Receiver,
    k8s_client: kubernetes.client.ApiClient,
    operator: OperatorProcess,
) -> None:
    """Found in review: a Customer renamed in Git (the new one applied under another name with the same
    spec.customerId, the old one pruned) left its pending webhooks reading the Customer by the notice's
    name: gone, so their retries kept the URL the notice was written for. The customer is its id: the
    retry goes to the URL the Customer holding the id names, signed with that Customer's key."""
    _, old = receivers
    old.fail = 100  # down: each try fails
    one, clock = started
    await one.send_due()  # what other tests left
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    name, new_name = unique_name("renamed"), unique_name("renamedto")
    customer_id = customer_id_of(name)
    create_hooked_customer(k8s_client, name, customer_id, old)
    try:
        notice = suspended_notice(name)
        await enqueue(sessions, Outbox(), notice, customer_spec(name, old.url))
        await one.send_due()
        (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
        assert (webhook.target, webhook.status, webhook.attempts) == (old.url, "pending", 1)

        # The rename: the new Customer applied before the old one is pruned, whose deletion leaves the id
        # with it (no license.revoked, no key kept).
        create_hooked_customer(k8s_client, new_name, customer_id, again_receiver)
        delete_customer(k8s_client, name)
        clock.advance(BACKOFF[0])
        await one.send_due()
    finally:
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, new_name)
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert (webhook.target, webhook.status, webhook.attempts) == (again_receiver.url, "sent", 2)
    assert again_receiver.seen == [webhook.message_id] and not again_receiver.refused  # its key signs it
    assert old.seen.count(webhook.message_id) == 1  # nothing more at the URL the old name had


async def test_a_deleted_customer_s_webhook_is_signed_on_its_retries_then_its_kept_secret_dropped(
    sessions: async_sessionmaker[AsyncSession],
    started: tuple[NoticeSender, Clock],
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
    operator: OperatorProcess,
) -> None:
    """The operator's deletion writes `license.revoked` and deletes the namespace, and the signing
    secret's copy with it, at once: a first try that failed left the retries nothing to sign with. The
    deletion keeps the copy in the billing namespace (the session operator's: `default`) until no
    webhook of the Customer is pending; after that a webhook of it says the Customer was deleted."""
    from iotistic_billing.notices.log import recent_notices, resend

    _, receiver = receivers
    receiver.fail = 1  # the first try of the revoke notice fails
    one, clock = started
    await one.send_due()  # what other tests left
    core = kubernetes.client.CoreV1Api(k8s_client)
    name = unique_name("gone")
    customer_id, namespace = f"cust_{name.replace('-', '')}", f"customer-{name}"
    create_hooked_customer(k8s_client, name, customer_id, receiver)
    delete_customer(k8s_client, name)
    kept = core.read_namespaced_secret(DELETED_NOTIFICATIONS_SECRET_NAME, "default")
    assert base64.b64decode(kept.data[customer_id]).decode() == CUSTOMER_SECRET

    await one.send_due()
    async with sessions() as session:
        (revoked,) = await recent_notices(session, customer_id=customer_id, status=None, limit=5)
    assert revoked.notice.kind == "license.revoked"
    (webhook,) = [d for d in await deliveries(sessions, revoked.notice.key) if d.channel == "webhook"]
    assert (webhook.status, webhook.attempts) == ("pending", 1) and len(receiver.seen) == 1
    # No controller-manager here: what the namespace controller does to a deleted namespace's Secrets.
    core.delete_collection_namespaced_secret(namespace)
    # Its webhook is pending: kept (another test's settled key may go meanwhile; the Secret is shared).
    assert customer_id not in await one.forget_settled_secrets()
    kept = core.read_namespaced_secret(DELETED_NOTIFICATIONS_SECRET_NAME, "default")
    assert customer_id in kept.data

    clock.advance(BACKOFF[0])
    await one.send_due()
    (webhook,) = [d for d in await deliveries(sessions, revoked.notice.key) if d.channel == "webhook"]
    assert (webhook.status, webhook.attempts, webhook.last_error) == ("sent", 2, None)
    assert receiver.bodies[-1]["type"] == "license.revoked" and not receiver.refused  # signed as before
    assert customer_id in await one.forget_settled_secrets()
    kept = core.read_namespaced_secret(DELETED_NOTIFICATIONS_SECRET_NAME, "default")
    assert customer_id not in (kept.data or {})

    # Sent again on request, with nothing left to sign it: the reason is the deletion.
    async with sessions() as session, session.begin():
        await resend(session, revoked.notice, clock(), None)  # no Customer: the stored URL stands
    await one.send_due()
    (webhook,) = [d for d in await deliveries(sessions, revoked.notice.key) if d.channel == "webhook"]
    assert webhook.status == "pending"
    assert f"Customer {name} ({customer_id}) was deleted" in (webhook.last_error or ""), webhook.last_error


async def resend_by_api(api: Any, sessions: async_sessionmaker[AsyncSession], key: str) -> Any:
    """POST /api/notices/{id}/resend of the notice `key`, as an admin: the answer."""
    async with sessions() as session:
        notice_id = (await notice_row(session, key)).id
    return await api.post(f"/api/notices/{notice_id}/resend", headers=admin_headers())


async def deleted_with_a_dying_webhook(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    k8s_client: kubernetes.client.ApiClient,
    receiver: Receiver,
) -> tuple[NoticeSender, str, str]:
    """A started sender of one try, and a Customer hooked to `receiver` and deleted: its deletion's
    `license.revoked` webhook fails its one try (dead) at the sender's next `send_due`, its key kept. The
    sender, the Customer's name and its customer id."""
    receiver.fail = 1
    one = sender(sessions, kube, Clock(), mailpit.smtp_url, max_attempts=1)
    await one.start()
    await one.send_due()  # what other tests left
    name = unique_name("deadhook")
    customer_id = f"cust_{name.replace('-', '')}"
    create_hooked_customer(k8s_client, name, customer_id, receiver)
    delete_customer(k8s_client, name)
    # No controller-manager here: what the namespace controller does to a deleted namespace's Secrets.
    kubernetes.client.CoreV1Api(k8s_client).delete_collection_namespaced_secret(f"customer-{name}")
    return one, name, customer_id


async def test_a_deleted_customer_s_dead_webhook_is_resent_while_its_kept_key_signs_then_refused(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
    webhook_settings: Settings,
    kubeconfig: Path,
    operator: OperatorProcess,
) -> None:
    """Found in review: a resend of a deleted Customer's dead webhook answered 202 and queued it after
    the key its deletion kept was dropped, and every try then failed saying the Customer was deleted.
    While the kept key signs it, it is sent again (202, pending) and signed with that key; once the key
    is dropped, a resend with nothing else to send is a 409 naming the customer and the Secret, and the
    webhook stays dead."""
    from iotistic_billing.notices.log import recent_notices

    _, receiver = receivers
    one, name, customer_id = await deleted_with_a_dying_webhook(sessions, kube, mailpit, k8s_client, receiver)
    app = running_app(webhook_settings, kubeconfig, ServerOptions(license_wait=0, inbox_workers=0))
    try:
        async with app as api:
            await one.send_due()
            async with sessions() as session:
                (revoked,) = await recent_notices(session, customer_id=customer_id, status=None, limit=5)
            key = revoked.notice.key
            assert {(d.channel, d.status) for d in revoked.deliveries} == {
                ("email", "sent"),
                ("webhook", "dead"),
            }

            answer = await resend_by_api(api, sessions, key)
            assert answer.status == 202, await answer.text()
            assert ("webhook", "pending", receiver.url) in shown(await answer.json())
            receiver.fail = 1  # verified with the kept key, and failed again: dead
            await one.send_due()
            assert len(receiver.seen) == 2 and not receiver.refused
            dropped: list[str] = []
            for _ in range(5):  # the Secret is shared: a drop refused by another test's write is retried
                dropped = await one.forget_settled_secrets()
                if customer_id in dropped:
                    break
            assert customer_id in dropped  # nothing of it pending any more

            answer = await resend_by_api(api, sessions, key)
            assert answer.status == 409, await answer.text()
            problem = await answer.json()
            assert problem["error"] == "Webhook cannot be signed"
            assert f"Customer {name} ({customer_id}) was deleted" in problem["message"]
            assert f"default/{DELETED_NOTIFICATIONS_SECRET_NAME}" in problem["message"]
            assert problem["details"] == {
                "notice_id": revoked.notice.id,
                "customer_id": customer_id,
                "secret": f"default/{DELETED_NOTIFICATIONS_SECRET_NAME}",
            }
            await one.send_due()
    finally:
        await one.stop()
    (webhook,) = [d for d in await deliveries(sessions, key) if d.channel == "webhook"]
    assert (webhook.status, webhook.attempts) == ("dead", 1) and len(receiver.seen) == 2


async def test_a_resend_of_a_deleted_customer_s_webhook_goes_where_its_kept_key_signs_not_to_a_new_holder(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
    webhook_settings: Settings,
    kubeconfig: Path,
    operator: OperatorProcess,
) -> None:
    """Found in review: a resend of a deleted Customer's dead webhook, its customer id held again by a
    Customer created since (the company signed up again, another receiver, another key), went to the new
    Customer's URL signed with the key the deletion kept, which that receiver refused on every try. The
    kept key signs it for the URL it was written for."""
    from iotistic_billing.notices.log import recent_notices

    newer, receiver = receivers  # the platform team's endpoint stands in for the new Customer's receiver
    one, name, customer_id = await deleted_with_a_dying_webhook(sessions, kube, mailpit, k8s_client, receiver)
    create_hooked_customer(k8s_client, unique_name("newhook"), customer_id, newer)
    app = running_app(webhook_settings, kubeconfig, ServerOptions(license_wait=0, inbox_workers=0))
    try:
        async with app as api:
            await one.send_due()
            async with sessions() as session:
                logged = await recent_notices(session, customer_id=customer_id, status=None, limit=10)
            (revoked,) = [entry for entry in logged if entry.notice.customer_name == name]
            assert ("webhook", "dead") in {(d.channel, d.status) for d in revoked.deliveries}

            answer = await resend_by_api(api, sessions, revoked.notice.key)
            assert answer.status == 202, await answer.text()
            assert ("webhook", "pending", receiver.url) in shown(await answer.json())
            await one.send_due()
    finally:
        await one.stop()
    assert len(receiver.seen) == 2 and not receiver.refused  # verified with the key the deletion kept
    assert not newer.refused


async def test_a_resend_while_the_deletion_that_kept_the_key_runs_goes_to_the_id_s_holder(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
    webhook_settings: Settings,
    kubeconfig: Path,
    operator: OperatorProcess,
) -> None:
    """Found in review: while the deletion that kept a key still ran (its mark on) and a Customer held
    the id again (a rename whose old Customer went first), the sender's tries went to the holder with its
    key, but a resend still took the kept key's side: its answer named the old URL the delivery never
    went to. Both decide alike: the resend shows, and the try posts to, the holder's URL with its key."""
    from iotistic_billing.notices.log import recent_notices

    newer, receiver = receivers  # the platform team's endpoint stands in for the new Customer's receiver
    one, name, customer_id = await deleted_with_a_dying_webhook(sessions, kube, mailpit, k8s_client, receiver)
    create_hooked_customer(k8s_client, unique_name("newhook"), customer_id, newer)
    app = running_app(webhook_settings, kubeconfig, ServerOptions(license_wait=0, inbox_workers=0))
    try:
        async with app as api:
            await one.send_due()
            async with sessions() as session:
                logged = await recent_notices(session, customer_id=customer_id, status=None, limit=10)
            (revoked,) = [entry for entry in logged if entry.notice.customer_name == name]
            assert ("webhook", "dead") in {(d.channel, d.status) for d in revoked.deliveries}
            # The deletion's mark put back on, its time taken off: as while the deletion ran.
            kubernetes.client.CoreV1Api(k8s_client).patch_namespaced_secret(
                DELETED_NOTIFICATIONS_SECRET_NAME,
                "default",
                {
                    "metadata": {
                        "annotations": {
                            deletion_running_annotation(customer_id): f"{name}/u-gone",
                            signs_until_annotation(customer_id): None,
                        }
                    }
                },
            )

            answer = await resend_by_api(api, sessions, revoked.notice.key)
            assert answer.status == 202, await answer.text()
            assert ("webhook", "pending", newer.url) in shown(await answer.json())
            await one.send_due()
    finally:
        await one.stop()
    assert len(receiver.seen) == 1  # the dead try alone
    assert len(newer.seen) == 1 and not newer.refused  # verified with the holder's key


async def test_a_gone_customer_s_unsignable_webhook_stays_dead_while_its_mail_is_resent(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    webhook_settings: Settings,
    kubeconfig: Path,
) -> None:
    """A Customer gone with no key kept for it (none kept, or dropped): a resend of its notice sends the
    dead mail again (202) and leaves the dead webhook as it is, its last error saying why; a resend of
    that webhook alone, the mail sent, is a 409 and changes nothing."""
    _, receiver = receivers
    name = unique_name("nokey")  # no Customer of that name, nor of its id
    notice = suspended_notice(name)
    await enqueue(sessions, Outbox(), notice, customer_spec(name, receiver.url))
    clock = Clock()
    nomail = sender(sessions, kube, clock, None, max_attempts=1)  # every mail fails: SMTP_URL not set
    mailer = sender(sessions, kube, clock, mailpit.smtp_url, max_attempts=1)
    await nomail.start()
    await mailer.start()
    app = running_app(webhook_settings, kubeconfig, ServerOptions(license_wait=0, inbox_workers=0))
    try:
        async with app as api:
            await nomail.send_due()
            assert {d.status for d in await deliveries(sessions, notice.key)} == {"dead"}

            answer = await resend_by_api(api, sessions, notice.key)
            assert answer.status == 202, await answer.text()
            assert shown(await answer.json()) == [
                ("email", "pending", f"finance@{name}.example"),
                ("email", "pending", f"ops@{name}.example"),
                ("webhook", "dead", receiver.url),
            ]
            await mailer.send_due()

            answer = await resend_by_api(api, sessions, notice.key)
            assert answer.status == 409, await answer.text()
            problem = await answer.json()
            assert problem["error"] == "Webhook cannot be signed"
            assert f"Customer {name} ({customer_id_of(name)}) was deleted" in problem["message"]
    finally:
        await nomail.stop()
        await mailer.stop()
    assert sorted((d.channel, d.status, d.attempts) for d in await deliveries(sessions, notice.key)) == [
        ("email", "sent", 1),
        ("email", "sent", 1),
        ("webhook", "dead", 1),
    ]
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert f"Customer {name} ({customer_id_of(name)}) was deleted" in (webhook.last_error or "")
    assert not receiver.seen


async def test_a_kept_key_a_resend_finds_is_not_dropped_before_the_resend_commits(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    webhook_settings: Settings,
    kubeconfig: Path,
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender drops a kept key once none of its webhooks is pending, and a resend makes one pending:
    a drop that looked at the deliveries after the resend found the key, and before the resend
    committed, lost the key of a webhook the resend had answered 202 for. The two take turns."""
    _, receiver = receivers
    name = unique_name("racing")  # gone, its key kept
    customer_id = customer_id_of(name)
    notice = suspended_notice(name)
    await enqueue(sessions, Outbox(), notice, customer_spec(name, receiver.url))
    clock = Clock()
    one = sender(sessions, kube, clock, mailpit.smtp_url, max_attempts=1)
    await one.start()
    await kube.merge_secret_data(
        "default", DELETED_NOTIFICATIONS_SECRET_NAME, {customer_id: CUSTOMER_SECRET.encode()}
    )
    receiver.fail = 1
    app = running_app(webhook_settings, kubeconfig, ServerOptions(license_wait=0, inbox_workers=0))
    forgetting: list[asyncio.Task[list[str]]] = []
    try:
        async with app as api:
            await one.send_due()
            (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
            assert webhook.status == "dead" and len(receiver.seen) == 1

            server_kube = api.app[NOTICES].kube
            read = server_kube.read_secret_data

            async def read_then_a_drop_looks(namespace: str, secret_name: str) -> Any:
                found = await read(namespace, secret_name)
                if secret_name == DELETED_NOTIFICATIONS_SECRET_NAME and not forgetting:
                    # The resend found the key; a sender's drop looks at the deliveries now.
                    forgetting.append(asyncio.create_task(one.forget_settled_secrets()))

                    async def waits_or_done() -> bool:
                        return forgetting[0].done() or await waiting_on_an_advisory_lock(db_engine)

                    await eventually(waits_or_done, message="the drop at the lock, or done")
                return found

            monkeypatch.setattr(server_kube, "read_secret_data", read_then_a_drop_looks)
            answer = await resend_by_api(api, sessions, notice.key)
            assert answer.status == 202, await answer.text()
            assert ("webhook", "pending", receiver.url) in shown(await answer.json())
            monkeypatch.undo()
            assert forgetting, "the resend did not look for the kept key"
            assert customer_id not in await asyncio.wait_for(forgetting[0], 10)
            await one.send_due()
    finally:
        await one.stop()
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert (webhook.status, webhook.last_error) == ("sent", None)
    assert len(receiver.bodies) == 1 and not receiver.refused  # signed with the kept key
    dropped: list[str] = []
    for _ in range(5):
        dropped = await one.forget_settled_secrets()
        if customer_id in dropped:
            break
    assert customer_id in dropped


async def test_a_customer_created_again_under_a_deleted_one_s_id_gets_webhooks_signed_with_its_own_key(
    sessions: async_sessionmaker[AsyncSession],
    started: tuple[NoticeSender, Clock],
    receivers: tuple[Receiver, Receiver],
    again_receiver: Receiver,
    k8s_client: kubernetes.client.ApiClient,
    operator: OperatorProcess,
) -> None:
    """Found in review: the key a deletion kept signed every webhook of its customer id, so a Customer
    created again under the id (a GitOps re-create, a company signing up again) with a new webhook secret
    had its webhooks refused by its receiver until the deleted Customer's settled. The kept key signs the
    deleted Customer's pending webhook; the new Customer's are signed with its own key, and, pending,
    do not hold the old key once the old webhook is sent."""
    from iotistic_billing.notices.log import recent_notices

    _, old_receiver = receivers
    old_receiver.fail = 1  # the first try of the deleted Customer's license.revoked fails
    one, clock = started
    await one.send_due()  # what other tests left
    name, again = unique_name("first"), unique_name("again")
    customer_id = f"cust_{name.replace('-', '')}"
    create_hooked_customer(k8s_client, name, customer_id, old_receiver)
    delete_customer(k8s_client, name)
    await one.send_due()
    async with sessions() as session:
        (revoked,) = await recent_notices(session, customer_id=customer_id, status=None, limit=5)
    assert revoked.notice.kind == "license.revoked" and len(old_receiver.seen) == 1

    # Created again under the id, under another name (the old namespace still terminating here).
    create_hooked_customer(k8s_client, again, customer_id, again_receiver)
    notice = license_changed(
        NoticeKind.LICENSE_SUSPENDED,
        customer_id=customer_id,
        customer_name=again,
        company=again.title(),
        jti="j-again",
        plan="unlicensed",
        reason="suspended by an administrator",
    )
    await enqueue(sessions, Outbox(), notice, customer_spec(again, again_receiver.url))
    again_receiver.fail = 2  # pending while the old webhook is sent
    await one.send_due()
    assert again_receiver.refused == [] and len(again_receiver.seen) == 1  # verified with its own key

    clock.advance(BACKOFF[0])
    await one.send_due()
    (old_webhook,) = [d for d in await deliveries(sessions, revoked.notice.key) if d.channel == "webhook"]
    assert (old_webhook.status, old_webhook.attempts) == ("sent", 2)
    assert old_receiver.bodies[-1]["type"] == "license.revoked" and not old_receiver.refused
    (new_webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert (new_webhook.status, new_webhook.attempts) == ("pending", 2)
    # The new Customer's pending webhook does not hold the old key: it was never the old one's to sign.
    assert customer_id in await one.forget_settled_secrets()

    clock.advance(BACKOFF[1])
    await one.send_due()
    (new_webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert (new_webhook.status, new_webhook.attempts, new_webhook.last_error) == ("sent", 3, None)
    assert again_receiver.bodies[-1]["type"] == "license.suspended" and not again_receiver.refused

    # Its own deletion keeps its own key for its license.revoked.
    delete_customer(k8s_client, again)
    await one.send_due()
    assert again_receiver.bodies[-1]["type"] == "license.revoked" and not again_receiver.refused


async def test_a_kept_secret_is_not_dropped_while_its_deletion_runs_nor_as_the_deletion_ends(
    started: tuple[NoticeSender, Clock],
    k8s_client: kubernetes.client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the finalizer keeps a deleted Customer's signing secret before its notice is
    written (a foreground deletion deletes the copy meanwhile) and again after; a sender that found
    nothing pending in between dropped the key (a retry of the finalizer then had nothing to keep). The
    key is marked while the deletion runs, and a drop decided before the mark was lifted is refused."""
    one, _ = started
    core = kubernetes.client.CoreV1Api(k8s_client)
    customer_id = f"cust_{unique_name('kept').replace('-', '')}"
    secret, mark = b"whsec_kept", deletion_running_annotation(customer_id)
    name = DELETED_NOTIFICATIONS_SECRET_NAME
    await one.kube.merge_secret_data("default", name, {customer_id: secret}, annotations={mark: "true"})
    assert customer_id not in await one.forget_settled_secrets()  # its deletion runs

    read = one.kube.read_secret_data

    async def read_then_mark_lifted(namespace: str, secret_name: str) -> Any:
        found = await read(namespace, secret_name)
        # The finalizer's last keep, the same key, its notice committed after the sender's look (here:
        # none pending) and before its drop.
        await one.kube.merge_secret_data(
            namespace, secret_name, {customer_id: secret}, annotations={mark: None}
        )
        return found

    monkeypatch.setattr(one.kube, "read_secret_data", read_then_mark_lifted)
    await one.forget_settled_secrets()
    kept = core.read_namespaced_secret(name, "default")
    assert base64.b64decode(kept.data[customer_id]) == secret and mark not in (
        kept.metadata.annotations or {}
    )

    async def read_then_marked_again(namespace: str, secret_name: str) -> Any:
        found = await read(namespace, secret_name)
        # A retried finalizer (its last try crashed before the namespace went) marks the key again
        # between the sender's look, unmarked with nothing pending, and its drop: the drop is refused.
        await one.kube.merge_secret_data(namespace, secret_name, {}, annotations={mark: "true"})
        return found

    monkeypatch.setattr(one.kube, "read_secret_data", read_then_marked_again)
    assert customer_id not in await one.forget_settled_secrets()
    kept = core.read_namespaced_secret(name, "default")
    assert base64.b64decode(kept.data[customer_id]) == secret

    monkeypatch.undo()
    await one.kube.merge_secret_data("default", name, {}, annotations={mark: None})
    # Looked at again next time (another test's finalizer may write the Secret meanwhile: a few tries).
    dropped: list[str] = []
    for _ in range(5):
        dropped = await one.forget_settled_secrets()
        if customer_id in dropped:
            break
    assert customer_id in dropped


async def test_a_mark_whose_customer_went_without_its_deletion_ending_is_lifted_by_the_sender(
    sessions: async_sessionmaker[AsyncSession],
    started: tuple[NoticeSender, Clock],
    receivers: tuple[Receiver, Receiver],
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """A finalizer dropped by hand (README.md, "Customers in `kubectl`") left its deletion's mark on the
    kept key for good: the key signed every later notice of the id, a Customer's created again under it
    included, and was never dropped. The sender lifts a mark whose Customer is gone or replaced under its
    name, noting PostgreSQL's time: the key signs the webhooks written until then, and goes once none is
    pending. A mark of a Customer still there, or one naming no Customer, stays."""
    _, receiver = receivers
    one, clock = started
    core = kubernetes.client.CoreV1Api(k8s_client)
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    running = unique_name("running")
    create_customer(objects, running, {"email": f"ops@{running}.example", "companyName": "Running"})
    uid = objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, running)["metadata"]["uid"]
    pending_name = unique_name("handdropped")
    marks = {
        customer_id_of(pending_name): deletion_mark(pending_name, str(uuid.uuid4())),  # gone
        customer_id_of(unique_name("gone")): deletion_mark(unique_name("gone"), str(uuid.uuid4())),
        customer_id_of(unique_name("replaced")): deletion_mark(running, str(uuid.uuid4())),
        customer_id_of(running): deletion_mark(running, uid),  # its deletion runs
        customer_id_of(unique_name("older")): "true",  # names no Customer
    }
    pending_id, gone_id, replaced_id, running_id, older_id = marks
    # The hand-dropped Customer's license.revoked is pending (its receiver failed the first try).
    receiver.fail = 1
    notice = suspended_notice(pending_name)
    await enqueue(sessions, Outbox(), notice, customer_spec(pending_name, receiver.url))
    secret = DELETED_NOTIFICATIONS_SECRET_NAME
    await one.kube.merge_secret_data(
        "default",
        secret,
        dict.fromkeys(marks, CUSTOMER_SECRET.encode()),
        annotations={deletion_running_annotation(customer_id): mark for customer_id, mark in marks.items()},
    )
    await one.send_due()
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert (webhook.status, webhook.attempts) == ("pending", 1)

    async with sessions() as session:
        before = await session.scalar(select(text("now()")))
    # The Secret is shared with other tests' deletions: a drop refused by a write meanwhile is retried.
    kept = core.read_namespaced_secret(secret, "default")
    for _ in range(5):
        await one.forget_settled_secrets()
        kept = core.read_namespaced_secret(secret, "default")
        if gone_id not in (kept.data or {}):
            break
    annotations = kept.metadata.annotations or {}
    assert gone_id not in kept.data and replaced_id not in kept.data  # nothing pending: dropped
    assert deletion_running_annotation(gone_id) not in annotations
    assert deletion_running_annotation(replaced_id) not in annotations
    assert annotations[deletion_running_annotation(running_id)] == deletion_mark(running, uid)
    assert annotations[deletion_running_annotation(older_id)] == "true"
    assert running_id in kept.data and older_id in kept.data
    # Pending: kept, signing what was written until the mark was lifted.
    assert pending_id in kept.data and deletion_running_annotation(pending_id) not in annotations
    assert datetime.fromisoformat(annotations[signs_until_annotation(pending_id)]) >= before

    clock.advance(BACKOFF[0])
    await one.send_due()
    (webhook,) = [d for d in await deliveries(sessions, notice.key) if d.channel == "webhook"]
    assert (webhook.status, webhook.last_error) == ("sent", None) and not receiver.refused
    dropped: list[str] = []
    for _ in range(5):
        dropped = await one.forget_settled_secrets()
        if pending_id in dropped:
            break
    assert pending_id in dropped
    await one.kube.merge_secret_data(
        "default",
        secret,
        {running_id: None, older_id: None},
        annotations={
            deletion_running_annotation(running_id): None,
            deletion_running_annotation(older_id): None,
        },
    )


async def test_a_four_day_trial_gets_one_trial_ends_notice_across_restarts_and_replicas(
    sessions: async_sessionmaker[AsyncSession],
    kube: Kube,
    mailpit: Mailpit,
    receivers: tuple[Receiver, Receiver],
    db_engine: AsyncEngine,
) -> None:
    """The operator writes the notice on its clock, is killed before anything is sent (a new process
    checks again), and two webhook-server replicas send: one mail to each address, one webhook."""
    platform, _ = receivers
    name = unique_name("trial4")
    created = datetime.now(UTC) - timedelta(days=1, hours=12)  # a 4-day trial ending in 2.5 days
    body = {
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created.isoformat()},
        "spec": {"email": f"ops@{name}.example", "companyName": "Four", "trial": {"days": 4}},
    }
    customer = Customer.model_validate(body)

    def operator_process() -> OperatorContext:
        return cast(
            OperatorContext,
            SimpleNamespace(
                settings=SimpleNamespace(trial_notice_days=3),
                sessions=sessions,
                outbox=Outbox(platform.url),
                noticed=set(),
                first_licences={},
                trial_notices=trial_notices_outage(),
            ),
        )

    first = operator_process()
    now = datetime.now(UTC)
    assert await write_trial_ending(first, customer, body, now)
    assert not await write_trial_ending(first, customer, body, now)  # remembered: no second write
    restarted = operator_process()  # the first was killed before the notice went out
    assert not await write_trial_ending(restarted, customer, body, now + timedelta(minutes=1))

    clock = Clock()
    replicas = [sender(sessions, kube, clock, mailpit.smtp_url) for _ in range(2)]
    for replica in replicas:
        await replica.start()
    try:
        await asyncio.gather(*(replica.send_due() for replica in replicas))
    finally:
        for replica in replicas:
            await replica.stop()
    (mail,) = mails_to(mailpit, f"ops@{name}.example")
    assert mail["Subject"].startswith("Your Iotistic trial ends on")
    (webhook,) = platform.bodies  # this test's receiver: one webhook in all
    # 2.5 days left: the third day has begun (notices/content.py counts days begun, as a calendar does).
    assert webhook["type"] == "trial.ending" and webhook["data"]["days_left"] == 3
    assert len(platform.seen) == 1
    async with sessions() as session:
        notices = (
            await session.scalars(select(models.Notice).where(models.Notice.customer_name == name))
        ).all()
    assert [n.kind for n in notices] == ["trial.ending"]


def test_a_bad_webhook_url_is_refused_by_the_api_server_naming_the_field(
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    body = {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": unique_name("badhook")},
        "spec": {
            "email": "ops@bad.example",
            "companyName": "Bad",
            "notifications": {"webhook": {"url": "ftp://hooks.example/x", "secretRef": {"name": "s"}}},
        },
    }
    with pytest.raises(ApiException) as refused:
        objects.create_cluster_custom_object("iotistic.io", "v1alpha1", "customers", body)
    assert refused.value.status == 422
    assert "spec.notifications.webhook.url" in json.loads(refused.value.body)["message"]


async def age(
    sessions: async_sessionmaker[AsyncSession], key: str, written: datetime, *tries: tuple[str, datetime]
) -> list[int]:
    """Make notice `key` written at `written`, its deliveries (in id order) in the status given, last due
    (and sent, when sent) at the time given: the notice's and its deliveries' ids."""
    async with sessions() as session, session.begin():
        notice = await notice_row(session, key)
        notice.created_at = written
        rows = (
            await session.scalars(
                select(models.NoticeDelivery)
                .where(models.NoticeDelivery.notice_id == notice.id)
                .order_by(models.NoticeDelivery.id)
            )
        ).all()
        for row, (status, at) in zip(rows, tries, strict=True):
            row.status, row.next_attempt_at, row.sent_at = status, at, at if status == "sent" else None
        return [notice.id, *(row.id for row in rows)]


async def kept_of(sessions: async_sessionmaker[AsyncSession], ids: dict[str, list[int]]) -> set[str]:
    """Which of the notices (by label: their notice's and deliveries' ids) are still there, each checked
    whole: a notice without all its deliveries, or deliveries without their notice, fail the test."""
    async with sessions() as session:
        notices = set((await session.scalars(select(models.Notice.id))).all())
        delivered = set((await session.scalars(select(models.NoticeDelivery.id))).all())
    kept = set()
    for label, (notice_id, *delivery_ids) in ids.items():
        there = [notice_id in notices, *(delivery_id in delivered for delivery_id in delivery_ids)]
        assert all(there) or not any(there), (label, there)
        if all(there):
            kept.add(label)
    return kept


async def give_up(sessions: async_sessionmaker[AsyncSession], name: str) -> None:
    """Mark dead the pending deliveries of Customer `name`'s notices: a later test's sender would claim
    them first (the longest due)."""
    async with sessions() as session, session.begin():
        await session.execute(
            update(models.NoticeDelivery)
            .where(
                models.NoticeDelivery.status == "pending",
                models.NoticeDelivery.notice_id.in_(
                    select(models.Notice.id).where(models.Notice.customer_name == name)
                ),
            )
            .values(status="dead")
        )


async def test_finished_notices_past_the_retention_are_pruned_with_their_deliveries_in_batches(
    sessions: async_sessionmaker[AsyncSession], kube: Kube
) -> None:
    clock = Clock()
    pruner = sender(sessions, kube, clock, None)  # the default retention: 90 days
    name = unique_name("pruned")
    spec = customer_spec(name)  # two addresses: two deliveries a notice
    now = clock()
    long_ago, lately, within = now - timedelta(days=100), now - timedelta(days=10), now - timedelta(days=89)
    aged = {
        # Finished past the retention: pruned, oldest first.
        "sent": (long_ago, ("sent", long_ago), ("sent", long_ago)),
        "dead": (long_ago, ("dead", long_ago), ("dead", long_ago)),
        "sent and dead": (long_ago, ("sent", long_ago), ("dead", long_ago)),
        "sent again": (long_ago, ("sent", long_ago), ("sent", long_ago)),
        "dead again": (long_ago, ("dead", long_ago), ("dead", long_ago)),
        # Still being tried (a retry due long ago, the sender away): kept, whatever its age.
        "retrying": (long_ago, ("sent", long_ago), ("pending", long_ago)),
        # Written long ago, resent 10 days ago and dead again: within the retention of its last try.
        "resent lately": (long_ago, ("sent", long_ago), ("dead", lately)),
        # Sent 89 days ago: kept, until the clock is two days on.
        "within": (within, ("sent", within), ("sent", within)),
    }
    ids = {}
    for label, (written, *tries) in aged.items():
        notice = suspended_notice(name, jti=label.replace(" ", "-"))
        assert await enqueue(sessions, Outbox(), notice, spec)
        ids[label] = await age(sessions, notice.key, written, *tries)
    kept_always = {"retrying", "resent lately"}

    # One batch takes `limit` notices at most, the oldest.
    async with sessions() as session, session.begin():
        deleted, picked = await prune_batch(
            session, models.Notice.id, expired(retention_cutoff(clock(), timedelta(days=90))), 2
        )
        assert (deleted, len(picked)) == (2, 2)
    assert await kept_of(sessions, ids) == set(aged) - {"sent", "dead"}

    # The sender's prune goes on batch after batch while a batch is full.
    assert await pruner.prune_finished(batch=2) == 3
    assert await kept_of(sessions, ids) == kept_always | {"within"}
    assert await pruner.prune_finished(batch=2) == 0

    clock.advance(timedelta(days=2).total_seconds())
    assert await pruner.prune_finished() == 1
    assert await kept_of(sessions, ids) == kept_always
    await give_up(sessions, name)


async def test_a_notice_being_resent_is_left_by_the_prune(
    sessions: async_sessionmaker[AsyncSession], kube: Kube
) -> None:
    """The resend holds its notice (notice_to_resend) from its look to its commit: a prune meanwhile
    skips it rather than deleting the deliveries the resend makes pending (or waiting for it)."""
    clock = Clock()
    pruner = sender(sessions, kube, clock, None)
    name = unique_name("resentold")
    spec = customer_spec(name)
    notice = suspended_notice(name)
    assert await enqueue(sessions, Outbox(), notice, spec)
    long_ago = clock() - timedelta(days=100)
    ids = {"dead": await age(sessions, notice.key, long_ago, ("dead", long_ago), ("dead", long_ago))}
    async with sessions() as session, session.begin():
        held = await notice_to_resend(session, ids["dead"][0])
        assert held is not None
        await asyncio.wait_for(pruner.prune_finished(), 10)
        assert await kept_of(sessions, ids) == {"dead"}
        logged = await resend(session, held, clock(), spec)
        assert [delivery.status for delivery in logged.resent] == ["pending", "pending"]
    await pruner.prune_finished()
    assert await kept_of(sessions, ids) == {"dead"}
    await give_up(sessions, name)
