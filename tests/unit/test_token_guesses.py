"""Wrong tokens (console sign-ins, admin bearers) are limited per client address apart from requests, over
HTTP through create_app's middlewares with no database: each answer here is settled before a handler
needs one (a 400 for a bad query proves a request got past authentication)."""

from __future__ import annotations

import asyncio
from ipaddress import ip_network
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from iotistic_billing.api_keys import usage_key_hash
from iotistic_billing.settings import load_settings
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.context import TOKEN_GUESSES, USAGE_KEYS
from iotistic_billing.webhook_server.options import RateLimit, ServerOptions
from iotistic_billing.webhook_server.security import TokenGuesses, UsageKeyCache
from tests.unit.test_usage_keys import Clock, FakeSession

ADMIN = "admin-token-" + "a" * 20
VIEWER = "viewer-token-" + "b" * 20
USAGE_KEY = "iuk_" + "k" * 43
# The test client connects from 127.0.0.1: as a trusted proxy, it names each client in X-Forwarded-For.
GUESSER, OTHER = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}
# An admin-only route whose bad query is a 400 once the caller is the admin, before any database.
ADMIN_ROUTE = "/api/customers?limit=0"


def guarded_app(clock: Clock, queries: list[str], options: ServerOptions | None = None) -> web.Application:
    """create_app's middlewares and routes, its wrong-token limit on `clock`, usage keys answered from a
    fake api_keys that records each query in `queries`."""
    settings = load_settings(
        database_url="postgresql://nobody@127.0.0.1:1/none",
        stripe_webhook_secret="whsec_test",
        admin_api_token=ADMIN,
        admin_viewer_token=VIEWER,
        console_session_key="k" * 32,
    )
    options = options or ServerOptions(trusted_proxies=(ip_network("127.0.0.0/8"),))
    app = create_app(settings, options=options)
    app.cleanup_ctx.clear()  # no database, API server or Stripe
    keys = {usage_key_hash(USAGE_KEY): "cust_abcdef123456"}
    app[USAGE_KEYS] = UsageKeyCache(lambda: FakeSession(keys, queries), clock=clock)  # type: ignore[arg-type, return-value]
    app[TOKEN_GUESSES] = TokenGuesses(options.wrong_tokens_per_address, options.wrong_tokens, clock=clock)
    return app


async def sign_in(client: TestClient[Any, Any], token: str, headers: dict[str, str]) -> Any:
    origin = str(client.make_url("/")).rstrip("/")
    return await client.post(
        "/admin/login",
        data={"token": token},
        headers={"Origin": origin, "Accept": "text/html", **headers},
        allow_redirects=False,
    )


async def bearer(client: TestClient[Any, Any], path: str, token: str, headers: dict[str, str]) -> Any:
    return await client.get(path, headers={"Authorization": f"Bearer {token}", **headers})


async def test_the_eleventh_failed_sign_in_in_a_minute_is_a_429() -> None:
    """Found in review: a failed sign-in spent one token of the general limit per address (burst 500, then
    50 a second), so one address could try some 4 million admin or viewer tokens a day."""
    clock = Clock()
    async with TestClient(TestServer(guarded_app(clock, []))) as client:
        failed = [(await sign_in(client, f"guess-{index:016d}", GUESSER)).status for index in range(10)]
        assert failed == [401] * 10
        refused = await sign_in(client, f"guess-{10:016d}", GUESSER)
        page = await refused.text()
        assert (refused.status, refused.content_type) == (429, "text/html"), page
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "too many wrong tokens from this address" in page
        # The right token too, while the address is out of tries: it is not even compared.
        assert (await sign_in(client, ADMIN, GUESSER)).status == 429
        # Another address signs in; its success costs nothing and lifts nothing.
        assert (await sign_in(client, VIEWER, OTHER)).status == 303
        assert (await sign_in(client, ADMIN, OTHER)).status == 303
        # Once the minute has passed, the guesser's address may try again.
        clock.now += 60
        assert (await sign_in(client, ADMIN, GUESSER)).status == 303


async def test_a_script_s_sign_in_gets_the_api_s_429_body() -> None:
    clock = Clock()
    async with TestClient(TestServer(guarded_app(clock, []))) as client:
        origin = str(client.make_url("/")).rstrip("/")
        for index in range(11):
            answer = await client.post(
                "/admin/login", data={"token": f"guess-{index:016d}"}, headers={"Origin": origin, **GUESSER}
            )
        body = await answer.json()
        assert answer.status == 429 and set(body) == {"error", "message", "details"}
        assert body["error"] == "Too many requests"
        assert body["message"].startswith("too many wrong tokens from this address; retry in ")
        assert body["details"] == {
            "scope": "wrong tokens per address",
            "retry_after": int(answer.headers["Retry-After"]),
        }


async def test_the_eleventh_wrong_admin_bearer_in_a_minute_is_a_429() -> None:
    """Found in review: a wrong bearer on an admin route was only a 401, under the general limit per
    address (4 million guesses of ADMIN_API_TOKEN a day from one address)."""
    clock = Clock()
    async with TestClient(TestServer(guarded_app(clock, []))) as client:
        wrong = [
            (await bearer(client, ADMIN_ROUTE, "x" * (20 + index), GUESSER)).status for index in range(10)
        ]
        assert wrong == [401] * 10
        refused = await bearer(client, ADMIN_ROUTE, "y" * 20, GUESSER)
        body = await refused.json()
        assert refused.status == 429 and body["error"] == "Too many requests", body
        assert body["message"].startswith("too many wrong tokens from this address; retry in ")
        assert body["details"]["scope"] == "wrong tokens per address"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # The admin token from that address is refused too; from another address it works.
        assert (await bearer(client, ADMIN_ROUTE, ADMIN, GUESSER)).status == 429
        assert (await bearer(client, ADMIN_ROUTE, ADMIN, OTHER)).status == 400
        # Sign-ins and bearers share the address's tries.
        assert (await sign_in(client, ADMIN, GUESSER)).status == 429
        clock.now += 60
        assert (await bearer(client, ADMIN_ROUTE, ADMIN, GUESSER)).status == 400


async def test_right_tokens_cost_no_tries() -> None:
    clock = Clock()
    async with TestClient(TestServer(guarded_app(clock, []))) as client:
        for _ in range(9):
            assert (await bearer(client, ADMIN_ROUTE, "x" * 20, GUESSER)).status == 401
        for _ in range(30):
            assert (await bearer(client, ADMIN_ROUTE, ADMIN, GUESSER)).status == 400
            assert (await sign_in(client, ADMIN, GUESSER)).status == 303
        assert (await bearer(client, ADMIN_ROUTE, "x" * 20, GUESSER)).status == 401
        assert (await bearer(client, ADMIN_ROUTE, "x" * 20, GUESSER)).status == 429


async def test_wrong_tokens_from_every_address_together_are_capped() -> None:
    clock = Clock()
    options = ServerOptions(
        trusted_proxies=(ip_network("127.0.0.0/8"),),
        wrong_tokens_per_address=RateLimit(per_second=10 / 60, burst=10),
        wrong_tokens=RateLimit(per_second=25 / 60, burst=25),
    )
    async with TestClient(TestServer(guarded_app(clock, [], options))) as client:
        statuses = [
            (
                await bearer(client, ADMIN_ROUTE, "x" * 20, {"X-Forwarded-For": f"198.51.100.{index // 10}"})
            ).status
            for index in range(30)
        ]
        assert statuses == [401] * 25 + [429] * 5
        refused = await bearer(client, ADMIN_ROUTE, ADMIN, {"X-Forwarded-For": "203.0.113.9"})
        body = await refused.json()
        assert refused.status == 429 and body["details"]["scope"] == "wrong tokens on this server", body
        assert body["message"].startswith("too many wrong tokens on this server")
        clock.now += 60
        assert (await bearer(client, ADMIN_ROUTE, ADMIN, {"X-Forwarded-For": "203.0.113.9"})).status == 400


async def test_an_admin_route_looks_no_bearer_up_as_a_usage_key() -> None:
    """Found in review: a wrong bearer on an admin-only route was looked up in PostgreSQL as a usage key
    before its 401, a query per guess."""
    queries: list[str] = []
    clock = Clock()
    async with TestClient(TestServer(guarded_app(clock, queries))) as client:
        wrong = await bearer(client, ADMIN_ROUTE, "x" * 20, OTHER)
        # A usage key as the bearer is no admin token either: not looked up, a wrong token.
        usage_key = await bearer(client, ADMIN_ROUTE, USAGE_KEY, OTHER)
        assert queries == []
        assert (wrong.status, usage_key.status) == (401, 401)
        assert (await wrong.json())[
            "message"
        ] == "the bearer token is not the admin token, which this route needs"


async def test_a_route_that_takes_usage_keys_still_looks_the_bearer_up() -> None:
    """The usage routes take the admin token or the customer's usage key as the bearer: a usage key there
    is no wrong token, and an instance behind an address out of tries still reaches them."""
    queries: list[str] = []
    clock = Clock()
    async with TestClient(TestServer(guarded_app(clock, queries))) as client:
        other_customer = "/api/usage/cust_someoneelse01"
        # A usage key as the bearer is the instance: reading another customer's usage is its 403.
        assert (await bearer(client, other_customer, USAGE_KEY, GUESSER)).status == 403
        assert queries == [usage_key_hash(USAGE_KEY)]
        for index in range(10):
            assert (await bearer(client, other_customer, f"guess-{index:016d}", GUESSER)).status == 401
        assert (await bearer(client, other_customer, "guess-" + "x" * 16, GUESSER)).status == 429
        assert (await bearer(client, other_customer, ADMIN, GUESSER)).status == 429
        # The instance's key is still its key (cached, or looked up again), from the same address.
        assert (await bearer(client, other_customer, USAGE_KEY, GUESSER)).status == 403
        assert (await client.get(other_customer, headers={"X-API-Key": USAGE_KEY, **GUESSER})).status == 403
        # The admin token from elsewhere: the admin (a 400 for the bad query, before any database).
        assert (await bearer(client, "/api/usage/cust_someoneelse01?days=0", ADMIN, OTHER)).status == 400


class HeldSession(FakeSession):
    """A lookup that waits until `release` is set; each waiting lookup's statement is in `waiting`."""

    def __init__(self, queries: list[str], waiting: list[Any], release: asyncio.Event) -> None:
        super().__init__({}, queries)
        self.waiting, self.release = waiting, release

    async def scalar(self, statement: Any) -> str | None:
        self.waiting.append(statement)
        await self.release.wait()
        return await super().scalar(statement)


async def until(condition: Any) -> None:
    """Let the server's tasks run until `condition()` holds (no clock involved: only turns of the loop)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the server never got there")


async def test_guesses_sent_at_once_are_not_all_compared() -> None:
    """A try is spent before its token is compared: on a usage route, whose lookup of a bearer waits for
    PostgreSQL, guesses sent together would all be compared with the admin token before the first of them
    had failed, were the try spent after."""
    clock, queries = Clock(), list[str]()
    waiting: list[Any] = []
    release = asyncio.Event()
    app = guarded_app(clock, queries)
    app[USAGE_KEYS] = UsageKeyCache(lambda: HeldSession(queries, waiting, release), clock=clock)  # type: ignore[arg-type, return-value]
    path = "/api/usage/cust_someoneelse01"
    async with TestClient(TestServer(app)) as client:
        guesses = [asyncio.create_task(bearer(client, path, f"guess-{i:016d}", GUESSER)) for i in range(20)]
        await until(lambda: len(waiting) == 20)
        # Twenty guesses wait for PostgreSQL and none has failed yet, but the address's ten tries are
        # spent: the admin token is not compared (only looked up as a usage key, which it is not).
        admin = asyncio.create_task(bearer(client, path, ADMIN, GUESSER))
        await until(lambda: admin.done() or len(waiting) == 21)
        release.set()
        assert (await admin).status == 429
        answers = await asyncio.gather(*guesses)
        assert sorted(answer.status for answer in answers) == [401] * 10 + [429] * 10
