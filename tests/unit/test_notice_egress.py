"""Where a customer's webhook may go: public addresses, or those NOTIFY_WEBHOOK_ALLOWED_CIDRS allows;
checked on the addresses a connection is made to, with a real receiver on 127.0.0.1 standing for the
webhook server's own port, the API server's and the cloud's metadata service."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from ipaddress import ip_address, ip_network
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from iotistic_billing.customer import CUSTOMER_ID_LABEL, NOTIFICATIONS_SECRET_KEY
from iotistic_billing.db import models
from iotistic_billing.k8s import SecretData
from iotistic_billing.notices.content import NoticeKind, license_changed
from iotistic_billing.notices.egress import AddressRefused, Network, PublicResolver, may_post_to
from iotistic_billing.notices.render import StoredNotice
from iotistic_billing.notices.sender import DeliveryFailed, NoticeSender, SenderOptions
from iotistic_billing.processes import free_port

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
LOOPBACK = [ip_network("127.0.0.0/8")]


@pytest.mark.parametrize(
    ("address", "allowed", "may"),
    [
        ("93.184.215.14", [], True),
        ("2606:4700:4700::1111", [], True),
        ("169.254.169.254", [], False),  # the cloud's metadata service
        ("127.0.0.1", [], False),
        ("10.96.0.1", [], False),  # an API server's ClusterIP
        ("172.16.5.4", [], False),
        ("192.168.1.1", [], False),
        ("100.64.0.10", [], False),  # shared address space (some clusters' pods)
        ("0.0.0.0", [], False),  # noqa: S104 (the unspecified address: refused)
        ("224.0.0.251", [], False),
        ("255.255.255.255", [], False),
        ("::1", [], False),
        ("::", [], False),
        ("fe80::1", [], False),
        ("fd00::1", [], False),
        # Found in review: not globally reachable, but is_global to Python 3.11.
        ("fec0::1", [], False),  # site-local (deprecated, still routed inside some sites)
        ("3fff::1", [], False),  # documentation
        ("192.0.0.8", [], False),  # the IPv4 dummy address
        ("::ffff:192.0.0.8", [], False),
        ("fec0::1", [ip_network("fec0::/10")], True),  # allowed on purpose
        ("ff02::1", [], False),
        ("::ffff:169.254.169.254", [], False),  # IPv4-mapped
        ("64:ff9b::a9fe:a9fe", [], False),  # NAT64 to 169.254.169.254
        ("2002:a9fe:a9fe::1", [], False),  # 6to4 of 169.254.169.254
        ("::ffff:93.184.215.14", [], True),
        ("127.0.0.1", LOOPBACK, True),
        ("::ffff:127.0.0.1", LOOPBACK, True),
        ("10.96.0.1", LOOPBACK, False),
        ("10.20.30.40", [ip_network("10.20.0.0/16")], True),
    ],
)
def test_only_public_addresses_or_allowed_ones_take_webhooks(
    address: str, allowed: list[Network], may: bool
) -> None:
    assert may_post_to(ip_address(address), allowed) is may


class AnswersResolver(AbstractResolver):
    """A DNS server under the URL writer's control: each lookup answers the next list of addresses."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.answers.pop(0)
        ]

    async def close(self) -> None:
        pass


async def test_a_name_keeps_its_public_addresses_and_a_rebound_one_is_refused() -> None:
    """Checked at each connection's lookup: a name that resolved to a public address when its URL was
    written, and resolves to the metadata service now, gets no connection."""
    resolver = PublicResolver([], AnswersResolver(["93.184.215.14", "10.0.0.5"], ["169.254.169.254"]))
    kept = await resolver.resolve("hooks.acme.example", 443)
    assert [result["host"] for result in kept] == ["93.184.215.14"]
    with pytest.raises(AddressRefused) as refused:
        await resolver.resolve("hooks.acme.example", 443)
    assert "169.254" not in str(refused.value) and "hooks.acme.example" in str(refused.value)


class Receiver:
    """An endpoint on 127.0.0.1: what a URL naming the server's own port or an in-cluster one reaches."""

    def __init__(self) -> None:
        self.posts: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append(request.headers["webhook-id"])
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    endpoint = Receiver()
    app = web.Application()
    app.router.add_post("/hook", endpoint.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        assert server.port is not None
        yield endpoint, server.port


class CopyKube:
    """The customer's signing secret, as the operator copies it into its namespace."""

    async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
        if namespace != "customer-acme":
            return None
        return SecretData({NOTIFICATIONS_SECRET_KEY: SECRET.encode()}, {}, {CUSTOMER_ID_LABEL: "cust_acme01"})

    async def read_customer(self, name: str) -> dict[str, Any] | None:
        return None  # none to compare with: each try goes to the URL the test wrote

    async def list_customers(self) -> list[dict[str, Any]]:
        return []  # nor under another name


def notice() -> StoredNotice:
    suspended = license_changed(
        NoticeKind.LICENSE_SUSPENDED,
        customer_id="cust_acme01",
        customer_name="acme",
        company="Acme",
        jti="j-1",
        plan="unlicensed",
        reason="r",
    )
    return StoredNotice(
        suspended.kind,
        suspended.customer_id,
        suspended.customer_name,
        suspended.subject,
        suspended.to_facts(),
        NOW,
    )


def delivery(channel: str, url: str) -> models.NoticeDelivery:
    return cast(
        models.NoticeDelivery,
        SimpleNamespace(channel=channel, target=url, message_id="msg_1", attempts=1, status="pending"),
    )


@pytest.fixture
async def senders() -> AsyncIterator[dict[str, NoticeSender]]:
    """A sender as the chart starts it (no allow-list), and one allowing loopback."""
    started = {}
    for name, allowed in (("default", ()), ("loopback allowed", tuple(LOOPBACK))):
        started[name] = NoticeSender(
            sessions=cast(Any, None),
            kube=cast(Any, CopyKube()),
            options=SenderOptions(None, "b@x.example", SECRET, workers=0, webhook_allowed_networks=allowed),
            clock=lambda: NOW,
        )
        await started[name].start()
    yield started
    for sender in started.values():
        await sender.stop()


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1:{port}/hook", "127.0.0.1"),
        ("http://localhost:{port}/hook", "localhost"),  # a name: refused after its lookup
        ("http://[::ffff:127.0.0.1]:{port}/hook", "::ffff:7f00:1"),  # as yarl writes it
        ("http://127.1:{port}/hook", "127.1"),  # a short form the socket reads as 127.0.0.1
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ],
)
async def test_a_customer_s_webhook_to_a_private_address_is_refused_unless_allowed(
    senders: dict[str, NoticeSender], receiver: tuple[Receiver, int], url: str, host: str
) -> None:
    endpoint, port = receiver
    target = delivery("webhook", url.format(port=port))
    with pytest.raises(DeliveryFailed) as refused:
        await senders["default"]._deliver(target, notice(), NOW)
    assert str(refused.value) == (
        f"refused: {host} resolves to a private address (loopback, link-local, private, multicast or "
        "otherwise not public); NOTIFY_WEBHOOK_ALLOWED_CIDRS allows one on purpose"
    )
    assert endpoint.posts == []

    if host in ("127.0.0.1", "localhost"):
        await senders["loopback allowed"]._deliver(target, notice(), NOW)
        assert endpoint.posts == ["msg_1"]


async def test_the_platform_s_own_webhook_goes_where_its_setting_says(
    senders: dict[str, NoticeSender], receiver: tuple[Receiver, int]
) -> None:
    """NOTIFY_WEBHOOK_URL is the deployment's setting, not a Customer's: an in-cluster receiver is fine."""
    endpoint, port = receiver
    await senders["default"]._deliver(delivery("platform", f"http://127.0.0.1:{port}/hook"), notice(), NOW)
    assert endpoint.posts == ["msg_1"]


async def test_a_failed_connection_keeps_a_last_error_that_tells_no_port_state(
    senders: dict[str, NoticeSender], caplog: pytest.LogCaptureFixture
) -> None:
    """A closed port and an open one that is not HTTP fail alike in the delivery's last error (which a
    Customer's writer may come to read); the log keeps what happened."""
    sender = senders["loopback allowed"]

    async def ssh_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    closed = delivery("webhook", f"http://127.0.0.1:{free_port()}/hook")
    listening = await asyncio.start_server(ssh_banner, "127.0.0.1", 0)
    try:
        not_http = delivery("webhook", f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}/hook")
        errors = []
        for target in (closed, not_http):
            with pytest.raises(DeliveryFailed) as failed:
                await sender._deliver(target, notice(), NOW)
            errors.append(failed.value)
    finally:
        listening.close()
        await listening.wait_closed()

    generic = (
        "no answer from 127.0.0.1: the connection failed, timed out or broke off (the webhook server's "
        "log has the detail)"
    )
    with caplog.at_level(logging.INFO, logger="iotistic_billing.notices.sender"):
        for target, error in zip((closed, not_http), errors, strict=True):
            sender._count_failure(target, notice(), error, NOW)
            assert target.last_error == generic
    assert "ClientConnectorError" in caplog.text  # the closed port, in the log only
