"""Request bodies the app cannot read, over HTTP through create_app's middlewares with no database (each
is settled before a handler needs one): the client's mistake is a 400 naming the body, and an upload its
client abandons is counted apart from the server's errors."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from iotistic_billing.settings import load_settings
from iotistic_billing.usage.reports import InvalidReports, parse_reports
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.context import METRICS, USAGE_KEYS
from iotistic_billing.webhook_server.options import ServerOptions
from iotistic_billing.webhook_server.security import UsageKeyCache
from tests.conftest import eventually

ADMIN = "admin-token-" + "a" * 20


def app_without_dependencies() -> web.Application:
    settings = load_settings(
        database_url="postgresql://nobody@127.0.0.1:1/none",
        stripe_webhook_secret="whsec_test",
        admin_api_token=ADMIN,
        console_session_key="k" * 32,
    )
    app = create_app(settings, options=ServerOptions())
    app.cleanup_ctx.clear()  # no database, API server or Stripe: these requests never reach them
    return app


def counted(app: web.Application, route: str) -> dict[str, float]:
    """The requests the app's metrics counted on `route`, by status."""
    (family,) = [m for m in app[METRICS].registry.collect() if m.name == "iotistic_http_requests"]
    return {
        sample.labels["status"]: sample.value
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["route"] == route
    }


# The server reads no further on a connection whose body did not decode: each request on its own.
CLOSE = {"Connection": "close"}


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_inflate_is_a_400_naming_body(
    encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: the read's RequestPayloadError went to the catch-all, a logged traceback and a
    500, so anyone could fire the Stripe webhook's critical alert with one unsigned POST."""
    app = app_without_dependencies()
    async with TestClient(TestServer(app)) as client:
        origin = str(client.make_url("/")).rstrip("/")
        answers = [
            await client.post(
                "/api/webhooks/stripe",
                data=b"not compressed",
                headers={"Content-Encoding": encoding, "Stripe-Signature": "t=1,v1=00", **CLOSE},
            ),
            await client.post(
                "/admin/login",
                data=b"not compressed",
                headers={
                    "Content-Encoding": encoding,
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Origin": origin,
                    **CLOSE,
                },
                allow_redirects=False,
            ),
        ]
        for answer in answers:
            problem = await answer.json()
            assert answer.status == 400, problem
            assert problem["details"][0]["field"] == "body", problem
            assert problem["message"] == "body: does not decode as its Content-Encoding", problem
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert counted(app, "/api/webhooks/stripe") == {"400": 1.0}


@pytest.mark.parametrize(
    "handler_cancellation",
    [pytest.param(False, id="as-run_app"), pytest.param(True, id="as-aiohttp-test-server")],
)
async def test_an_upload_the_client_abandons_is_not_counted_as_a_server_error(
    handler_cancellation: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: a client that closed the connection mid-body was counted as a 500 (a 503 and a
    "database unavailable" warning as run_app serves), though no client got an answer, feeding the
    error-rate alerts."""
    caplog.set_level(logging.WARNING)
    app = app_without_dependencies()
    async with serving(app, handler_cancellation) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /api/webhooks/stripe HTTP/1.1\r\nHost: billing\r\nContent-Length: 1000\r\n"
            b"Stripe-Signature: t=1,v1=00\r\nExpect: 100-continue\r\n\r\n"
        )
        assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"  # the request is being handled
        writer.write(b'{"id": ')
        writer.close()
        await writer.wait_closed()

        async def ended() -> bool:
            return bool(counted(app, "/api/webhooks/stripe"))

        # Ended while the server runs (a request its shutdown cuts off is the server's failure, a 500).
        await eventually(ended, within=10, message="the abandoned request counted")
    # 499: nginx's "client closed request", a status no answer carries and no 5xx alert matches.
    assert counted(app, "/api/webhooks/stripe") == {"499": 1.0}
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


async def test_a_request_cut_off_at_shutdown_is_counted_as_a_server_error() -> None:
    """Found in review: aiohttp closes the connection of a request still running when its shutdown
    timeout runs out, then cancels it, so the request whose client was still there was counted 499."""
    app = app_without_dependencies()
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(60)
        return web.Response(text="late")

    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
    writer.write(b"GET /slow HTTP/1.1\r\nHost: billing\r\n\r\n")
    await started.wait()
    await runner.cleanup()  # the client still connected
    assert await reader.read() == b""  # cut off: no answer
    writer.close()
    assert counted(app, "/slow") == {"500": 1.0}


@asynccontextmanager
async def serving(app: web.Application, handler_cancellation: bool) -> AsyncIterator[int]:
    """The app on a free local port, its handlers cancelled or not when their client goes."""
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    try:
        yield listener.getsockname()[1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"reason": "lost laptop"}'.encode("utf-16"), "body: is not valid JSON: not UTF-8"),
        ('{"reason": "lost laptop"}'.encode("utf-32"), "body: is not valid JSON: not UTF-8"),
        (
            b"\xef\xbb\xbf" + b'{"reason": "lost laptop"}',
            "body: is not valid JSON: a byte order mark before it (UTF-8 without one only)",
        ),
    ],
    ids=["utf-16", "utf-32", "utf-8-bom"],
)
async def test_a_body_is_utf_8_without_a_byte_order_mark_on_every_route(raw: bytes, message: str) -> None:
    """Found in review: json.loads took UTF-16 and UTF-32 bodies, and UTF-8 with a byte order mark, on
    most routes, while the usage reports and Stripe's events refused them."""
    app = app_without_dependencies()
    app[USAGE_KEYS] = UsageKeyCache(None)  # an admin bearer is never looked up in it
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    async with TestClient(TestServer(app)) as client:
        answer = await client.post("/api/licenses/cust_abcdef/revoke", data=raw, headers=headers)
        assert answer.status == 400
        problem = await answer.json()
        assert problem["message"] == message, problem
        assert [detail["field"] for detail in problem["details"]] == ["body"]
    # The rule the usage reports' parser (pydantic-core's) had.
    with pytest.raises(InvalidReports) as refused:
        parse_reports(raw)
    assert [(problem.field, problem.message) for problem in refused.value.problems] == [
        ("body", "is not valid JSON")
    ]


async def test_head_is_answered_wherever_get_is() -> None:
    """Found in review: the GET routes were added without HEAD, so `HEAD /healthz` (a load balancer's or
    an uptime checker's probe) was a 405."""
    app = app_without_dependencies()
    async with TestClient(TestServer(app)) as client:
        # /readyz is registered the same way; its checks need the dependencies this app is without.
        for path in ("/healthz", "/api/licenses/public-key", "/api/openapi.json"):
            got = await client.get(path)
            head = await client.head(path)
            assert head.status == got.status != 405, path
            assert await head.read() == b""
        refused = await client.put("/healthz")
        assert refused.status == 405 and refused.headers["Allow"] == "GET,HEAD"
