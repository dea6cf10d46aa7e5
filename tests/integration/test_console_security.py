"""The admin console's guard: sessions, roles, CSRF and origin, cookie flags, the CSP, and no secret on
any page; every refused request changes nothing."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from aiohttp.test_utils import TestClient
from kubernetes.client.exceptions import ApiException
from pydantic import SecretStr
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.db.models import ConsoleAction, ConsoleSignout, LicenseHistory, Notice
from iotistic_billing.licensing.keys import jwk_thumbprint, read_public_key
from iotistic_billing.settings import Settings
from iotistic_billing.webhook_server.console.pages import PAGES
from iotistic_billing.webhook_server.console.session import COOKIE
from iotistic_billing.webhook_server.context import DIRECTORY
from iotistic_billing.webhook_server.options import RateLimit, ServerOptions
from iotistic_billing.webhook_server.security import CONSOLE_CSP
from tests.conftest import unique_name
from tests.integration.console_support import (
    event_state,
    form_fields,
    origin,
    post_form,
    sign_in,
    unmatched_event,
)
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    ADMIN_TOKEN,
    VIEWER_TOKEN,
    WEBHOOK_SECRET,
    Customers,
    add_usage_key,
    api_fixture,
    customer_id_for,
    customers_fixture,
    deliver,
    event,
    eventually,
    made_again,
    random_id,
    running_app,
    subscription_object,
    webhook_settings_fixture,
)

pytestmark = pytest.mark.integration

ACTIONS = ("reconcile", "suspend", "resume", "revoke")
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def sample_path(path: str, name: str, event_id: str) -> str:
    return (
        path.replace("{name}", name)
        .replace("{event_id}", event_id)
        .replace("{file}", "console.css")
        .replace("{action}", "suspend")
    )


async def audit_rows(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as connection:
        count = await connection.scalar(
            select(func.count()).select_from(ConsoleAction).where(ConsoleAction.customer_name == name)
        )
    return int(count or 0)


@pytest.fixture
def customer(customers: Customers) -> str:
    name = unique_name("guarded")
    customers.create(name, customerId=customer_id_for(name))
    return name


async def test_every_page_sends_a_stranger_to_sign_in(api: TestClient[Any, Any], customer: str) -> None:
    event_id = (await unmatched_event(api, "cust_" + random_id("", 12)))["id"]
    for page in PAGES:
        if page.method != "GET" or page.role == "public":
            continue
        for cookie in (None, "not-a-sealed-cookie", ""):
            api.session.cookie_jar.clear()
            if cookie is not None:
                api.session.cookie_jar.update_cookies({COOKIE: cookie})
            path = sample_path(page.path, customer, event_id)
            answer = await api.get(path, allow_redirects=False)
            # Back to the page once signed in (the overview is where a sign-in lands anyway).
            login = "/admin/login" + ("" if path == "/admin/" else "?" + urlencode({"next": path}))
            assert (answer.status, answer.headers.get("Location")) == (303, login), page.path
            assert answer.headers["Content-Security-Policy"] == CONSOLE_CSP


async def test_a_wrong_token_opens_no_session(api: TestClient[Any, Any]) -> None:
    answer = await post_form(api, "/admin/login", {"token": ADMIN_TOKEN[:-1] + "x"})
    assert answer.status == 401
    assert "That token opens no session" in await answer.text()
    assert COOKIE not in {cookie.key for cookie in api.session.cookie_jar}


async def test_the_viewer_looks_but_cannot_act(
    api: TestClient[Any, Any], customers: Customers, customer: str, db_engine: AsyncEngine
) -> None:
    event_id = (await unmatched_event(api, "cust_" + random_id("", 12)))["id"]
    csrf = await sign_in(api, VIEWER_TOKEN)
    page = await api.get(f"/admin/customers/{customer}")
    assert page.status == 200
    assert "Reconcile now" not in await page.text(), "the viewer is shown no action"
    before = customers.get(customer)
    for action in ACTIONS:
        answer = await post_form(api, f"/admin/customers/{customer}/{action}", {"csrf": csrf})
        assert answer.status == 403, action
        assert "the viewer role may look, not act" in await answer.text()
    replay = await post_form(api, f"/admin/stripe-events/{event_id}/replay", {"csrf": csrf})
    assert replay.status == 403
    after = customers.get(customer)
    assert before and after
    assert after["spec"] == before["spec"]
    assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
    assert await audit_rows(db_engine, customer) == 0
    assert await event_state(db_engine, event_id) == ("unmatched", 0)


async def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(
    api: TestClient[Any, Any], customers: Customers, customer: str, db_engine: AsyncEngine
) -> None:
    csrf = await sign_in(api, ADMIN_TOKEN)
    path = f"/admin/customers/{customer}/suspend"
    refused = [
        await post_form(api, path, {}),
        await post_form(api, path, {"csrf": csrf[:-2] + "xx"}),
        await post_form(api, path, {"csrf": csrf}, {"Origin": "https://evil.example"}),
        await post_form(api, path, {"csrf": csrf}, {"Origin": origin(api) + ".evil.example"}),
        await post_form(api, path, {"csrf": csrf}, {"Origin": "null"}),
    ]
    no_origin = await api.post(path, data={"csrf": csrf}, allow_redirects=False)
    for answer in [*refused, no_origin]:
        assert answer.status == 403, await answer.text()
    assert (customers.get(customer) or {})["spec"].get("suspended") in (None, False)
    assert await audit_rows(db_engine, customer) == 0
    # The same form from the console itself goes through: the refusals were the guard's.
    done = await post_form(api, path, {"csrf": csrf, "confirm": "yes"})
    assert done.status == 303
    assert (customers.get(customer) or {})["spec"]["suspended"] is True
    assert await audit_rows(db_engine, customer) == 1


async def test_the_session_cookie_carries_its_flags(webhook_settings: Settings, kubeconfig: Path) -> None:
    options = ServerOptions(license_wait=0, trusted_proxies=(ip_network("127.0.0.1/32"),))
    async with running_app(webhook_settings, kubeconfig, options) as client:
        plain = await post_form(client, "/admin/login", {"token": ADMIN_TOKEN})
        over_tls = await post_form(
            client,
            "/admin/login",
            {"token": ADMIN_TOKEN},
            {"X-Forwarded-Proto": "https", "Origin": origin(client).replace("http://", "https://")},
        )
    for answer, secure in ((plain, False), (over_tls, True)):
        assert answer.status == 303
        cookie = answer.cookies[COOKIE]
        assert cookie["httponly"] is True
        # Lax: a link from another site (a ticket, a chat) opens the page signed in; no GET writes, and
        # every write is a POST, which Lax does not send from another site (and the guard checks its
        # Origin and CSRF token).
        assert cookie["samesite"] == "Lax"
        assert cookie["path"] == "/admin"
        assert bool(cookie["secure"]) is secure
        assert int(cookie["max-age"]) == 8 * 3600


async def test_sign_in_guesses_are_limited_per_address_as_the_api_is(
    webhook_settings: Settings, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The test client connects from 127.0.0.1: as a trusted proxy, it names each client.
    options = ServerOptions(
        license_wait=0,
        rate_per_address=RateLimit(per_second=0.01, burst=3),
        trusted_proxies=(ip_network("127.0.0.0/8"),),
    )
    guesser, other = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}
    caplog.set_level(logging.INFO, logger="iotistic_billing.webhook_server.console.pages")
    async with running_app(webhook_settings, kubeconfig, options) as client:
        guesses = [
            await post_form(client, "/admin/login", {"token": f"guess-{index:016d}"}, guesser)
            for index in range(3)
        ]
        assert [answer.status for answer in guesses] == [401, 401, 401]
        # The right token too, once the address is out of tokens: the limit comes before any check.
        throttled = await post_form(client, "/admin/login", {"token": ADMIN_TOKEN}, guesser)
        assert throttled.status == 429
        assert int(throttled.headers["Retry-After"]) >= 1
        assert throttled.content_type == "text/html"
        assert throttled.headers["Content-Security-Policy"] == CONSOLE_CSP
        assert "Try again in" in await throttled.text()
        assert COOKIE not in throttled.cookies
        # One bucket per address for the console's forms and the API.
        assert (await post_form(client, "/admin/logout", {}, guesser)).status == 429
        assert (await client.get("/.well-known/jwks.json", headers=guesser)).status == 429
        # Another address signs in.
        assert (await post_form(client, "/admin/login", {"token": ADMIN_TOKEN}, other)).status == 303
    failed = [record.getMessage() for record in caplog.records if "sign-in" in record.getMessage()]
    assert failed == ["console: a sign-in from 198.51.100.1 failed: the token opens no session"] * 3
    signed_in = [record.getMessage() for record in caplog.records if "signed in" in record.getMessage()]
    assert signed_in == ["console: admin signed in from 198.51.100.2"]


async def test_an_untrusted_peer_cannot_claim_tls(api: TestClient[Any, Any]) -> None:
    answer = await post_form(api, "/admin/login", {"token": ADMIN_TOKEN}, {"X-Forwarded-Proto": "https"})
    assert answer.status == 303
    assert not answer.cookies[COOKIE]["secure"]


def signed_licence(license_keys: tuple[Path, Path], customer_id: str) -> str:
    """A licence as the operator signs it (with the test keys), to look for on the pages."""
    private_key, public_key = license_keys
    now = int(time.time())
    claims = {
        "iss": "iotistic-billing",
        "aud": "iotistic-instance",
        "sub": customer_id,
        "customerId": customer_id,
        "plan": "starter",
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 86400,
        "issuedAt": now,
        "expiresAt": now + 86400,
        "features": {"maxDevices": 10},
        "limits": {},
    }
    kid = jwk_thumbprint(read_public_key(public_key))
    return jwt.encode(claims, private_key.read_bytes(), algorithm="RS256", headers={"kid": kid})


def put_licence(customers: Customers, namespace: str, licence: str) -> None:
    """The licence Secret as the operator writes it; the operator, when it runs, may be first."""
    try:
        customers.core.create_namespace({"metadata": {"name": namespace}})
    except ApiException as error:
        if error.status != 409:
            raise
    secret = {"metadata": {"name": "iotistic-license"}, "stringData": {"license.jwt": licence}}
    try:
        customers.core.create_namespaced_secret(namespace, secret)
    except ApiException as error:
        if error.status != 409:
            raise
        customers.core.patch_namespaced_secret("iotistic-license", namespace, secret)


def stored_licence(customers: Customers, namespace: str) -> str:
    data = customers.core.read_namespaced_secret("iotistic-license", namespace).data
    return base64.b64decode(data["license.jwt"]).decode()


async def test_no_page_embeds_a_token_a_licence_or_a_usage_key(
    api: TestClient[Any, Any],
    customers: Customers,
    db_engine: AsyncEngine,
    webhook_settings: Settings,
    license_keys: tuple[Path, Path],
) -> None:
    name = unique_name("secretive")
    customer_id = customer_id_for(name)
    customers.create(name, customerId=customer_id)
    usage_key = await add_usage_key(db_engine, customer_id)
    licence = signed_licence(license_keys, customer_id)
    put_licence(customers, f"customer-{name}", licence)
    event_id = (await unmatched_event(api, "cust_" + random_id("", 12)))["id"]
    await sign_in(api, ADMIN_TOKEN)
    stripe_key = webhook_settings.stripe_secret_key
    assert stripe_key is not None
    secrets = [ADMIN_TOKEN, VIEWER_TOKEN, WEBHOOK_SECRET, licence, licence.split(".")[2], usage_key]
    secrets.append(stripe_key.get_secret_value())
    paths = [
        sample_path(page.path, name, event_id)
        for page in PAGES
        if page.method == "GET" and page.path not in ("/admin/static/{file}", "/admin")
    ] + [f"/admin/customers?q={name}", "/admin/stripe-events?result=unmatched", "/admin/?fragment=1"]
    assert "unsafe-inline" not in CONSOLE_CSP and "script-src 'self'" in CONSOLE_CSP
    for path in paths:
        # The operator of the session (when it runs) may have put its own licence there meanwhile.
        secrets.append(stored_licence(customers, f"customer-{name}"))
        answer = await api.get(path, allow_redirects=False)
        assert answer.status == 200, path
        assert answer.headers["Content-Security-Policy"] == CONSOLE_CSP, path
        body = await answer.text()
        assert "<script>" not in body and " onclick=" not in body, path
        for secret in secrets:
            assert secret not in body, f"{path} embeds a secret"

    # The licence is there, decoded: its claims without the token.
    async def shows_the_stored_licence() -> str | None:
        stored = jwt.decode(
            stored_licence(customers, f"customer-{name}"), options={"verify_signature": False}
        )
        body = await (await api.get(f"/admin/customers/{name}")).text()
        return body if stored["jti"] in body else None

    body = await eventually(shows_the_stored_licence, within=20, message="the stored licence's claims")
    assert "Verifies with this server's keys." in body and customer_id in body


async def test_rotating_a_token_ends_its_sessions(webhook_settings: Settings, kubeconfig: Path) -> None:
    async with running_app(webhook_settings, kubeconfig) as client:
        await sign_in(client, VIEWER_TOKEN)
        sealed = {cookie.key: cookie.value for cookie in client.session.cookie_jar}[COOKIE]
    rotated = webhook_settings.model_copy(update={"admin_viewer_token": SecretStr("viewer-" + "9" * 30)})
    async with running_app(rotated, kubeconfig) as client:
        client.session.cookie_jar.update_cookies({COOKIE: sealed})
        answer = await client.get("/admin/", allow_redirects=False)
        assert (answer.status, answer.headers["Location"]) == (303, "/admin/login")


async def test_a_session_spans_replicas_and_ends_with_its_key(
    webhook_settings: Settings, kubeconfig: Path
) -> None:
    async with running_app(webhook_settings, kubeconfig) as client:
        await sign_in(client, VIEWER_TOKEN)
        sealed = {cookie.key: cookie.value for cookie in client.session.cookie_jar}[COOKIE]
    # Another replica, or this one restarted: the same CONSOLE_SESSION_KEY reads the cookie.
    async with running_app(webhook_settings, kubeconfig) as client:
        client.session.cookie_jar.update_cookies({COOKIE: sealed})
        assert (await client.get("/admin/", allow_redirects=False)).status == 200
    rotated = webhook_settings.model_copy(
        update={"console_session_key": SecretStr("rotated-key-" + "5" * 32)}
    )
    async with running_app(rotated, kubeconfig) as client:
        client.session.cookie_jar.update_cookies({COOKIE: sealed})
        answer = await client.get("/admin/", allow_redirects=False)
        assert (answer.status, answer.headers["Location"]) == (303, "/admin/login")


async def test_a_signed_out_session_opens_nothing_on_any_replica_even_from_a_copied_cookie(
    webhook_settings: Settings, kubeconfig: Path, db_engine: AsyncEngine
) -> None:
    """Sign out ends the session on the server: a copy of its cookie (a shared machine, a proxy's log)
    opened the console for the rest of its 8 hours."""
    async with running_app(webhook_settings, kubeconfig) as other:
        await sign_in(other, VIEWER_TOKEN)  # another person's session, open on a replica
        kept = {cookie.key: cookie.value for cookie in other.session.cookie_jar}[COOKIE]
        async with running_app(webhook_settings, kubeconfig) as client:
            csrf = await sign_in(client, VIEWER_TOKEN)
            copied = {cookie.key: cookie.value for cookie in client.session.cookie_jar}[COOKIE]
            answer = await post_form(client, "/admin/logout", {"csrf": csrf})
            assert (answer.status, answer.headers["Location"]) == (303, "/admin/login")
            client.session.cookie_jar.update_cookies({COOKIE: copied})
            answer = await client.get("/admin/", allow_redirects=False)
            assert (answer.status, answer.headers["Location"]) == (303, "/admin/login")
            refused = await post_form(client, "/admin/logout", {"csrf": csrf})
            assert refused.status == 401
        # The replica that already held a read of the sign-outs reads them again within 5 s.
        other.session.cookie_jar.clear()
        other.session.cookie_jar.update_cookies({COOKIE: copied})

        async def refused_there() -> bool:
            return (await other.get("/admin/", allow_redirects=False)).status == 303

        await eventually(refused_there, within=10, message="the sign-out on the other replica")
    # A replica started since refuses it at once; the other person's session stays open.
    async with running_app(webhook_settings, kubeconfig) as fresh:
        fresh.session.cookie_jar.update_cookies({COOKIE: copied})
        assert (await fresh.get("/admin/", allow_redirects=False)).status == 303
        fresh.session.cookie_jar.update_cookies({COOKIE: kept})
        assert (await fresh.get("/admin/", allow_redirects=False)).status == 200
    async with db_engine.connect() as connection:
        ends = (await connection.execute(select(ConsoleSignout.expires_at))).scalars().all()
    assert ends and all(end > datetime.now(UTC) + timedelta(hours=7) for end in ends)


async def test_a_sign_out_clears_the_sign_outs_past_their_session_s_end(
    api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    ended = "ended-" + uuid.uuid4().hex
    async with db_engine.begin() as connection:
        await connection.execute(
            insert(ConsoleSignout).values(
                session_id=ended, expires_at=datetime.now(UTC) - timedelta(minutes=1)
            )
        )
    csrf = await sign_in(api, VIEWER_TOKEN)
    assert (await post_form(api, "/admin/logout", {"csrf": csrf})).status == 303
    async with db_engine.connect() as connection:
        left = await connection.scalar(select(func.count()).where(ConsoleSignout.session_id == ended))
    assert left == 0


async def test_odd_values_in_the_stripe_events_path_and_filters_are_answered_not_a_500(
    api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    event_id = (await unmatched_event(api, "cust_" + random_id("", 12)))["id"]
    csrf = await sign_in(api, ADMIN_TOKEN)
    # NUL, which PostgreSQL text cannot hold, names no event.
    for path in ("/admin/stripe-events/evt%00x", f"/admin/stripe-events/{event_id}%00"):
        answer = await api.get(path, allow_redirects=False)
        assert (answer.status, answer.content_type) == (404, "text/html"), path
        assert "<h1>Stripe event not found</h1>" in await answer.text(), path
    # Found in review: a page's error was the API's JSON in the browser; it is a page of the console.
    missing = await api.get("/admin/customers/nosuch", allow_redirects=False)
    assert (missing.status, missing.content_type) == (404, "text/html")
    assert "no Customer named &#39;nosuch&#39;" in await missing.text()
    replay = await post_form(api, f"/admin/stripe-events/{event_id}%00/replay", {"csrf": csrf})
    assert replay.status == 404, await replay.text()
    assert await event_state(db_engine, event_id) == ("unmatched", 0)
    # A filter the page cannot offer is a 400 naming it.
    for query, field in (("type=a%00b", "type"), ("result=a%00b", "result"), ("result=bogus", "result")):
        answer = await api.get(f"/admin/stripe-events?{query}", allow_redirects=False)
        page = await answer.text()
        assert (answer.status, answer.content_type) == (400, "text/html"), (query, page)
        assert f'<p class="error" role="alert">{field}: ' in page, (query, page)
    for query in (
        "result=unmatched",
        "result=failed",
        "type=customer.subscription.updated",
        "type=" + "x" * 300,
    ):
        answer = await api.get(f"/admin/stripe-events?{query}", allow_redirects=False)
        assert answer.status == 200, (query, await answer.text())
    shown = await api.get(f"/admin/stripe-events/{event_id}", allow_redirects=False)
    assert shown.status == 200


# ----- an action acts on the object its page showed -----

CUSTOMER_ACTIONS = ("reconcile", "suspend", "resume", "revoke")


async def customer_forms(api: TestClient[Any, Any], name: str) -> dict[str, dict[str, str]]:
    """The fields of each action's form on the Customer's page, as the page holds them now (the page
    offers Suspend or Resume: Resume's are Suspend's, sent to its action), Suspend's confirmation
    checked and Revoke's reason given."""
    page = f"/admin/customers/{name}"
    forms = {
        action: await form_fields(api, page, f"{page}/{action}")
        for action in ("reconcile", "suspend", "revoke")
    }
    forms["resume"] = forms["suspend"]
    forms["suspend"]["confirm"] = "yes"
    forms["revoke"]["reason"] = "fraud"
    return forms


async def revocations_and_notices(db_engine: AsyncEngine, customer_id: str) -> tuple[int, int]:
    async with db_engine.connect() as connection:
        revoked = await connection.scalar(
            select(func.count()).where(
                LicenseHistory.customer_id == customer_id, LicenseHistory.action == "revoked"
            )
        )
        notices = await connection.scalar(select(func.count()).where(Notice.customer_id == customer_id))
    return int(revoked or 0), int(notices or 0)


async def untouched(
    customers: Customers, db_engine: AsyncEngine, name: str, customer_id: str, before: tuple[int, int]
) -> None:
    """Nothing done to the Customer of `name`: no suspension, no annotation of an action, no audit row,
    no revocation or notice beyond `before` (its predecessor's deletion's, when the operator got to it)."""
    body = customers.get(name) or {}
    assert not body["spec"].get("suspended"), body["spec"]
    assert set(body["metadata"].get("annotations") or {}).isdisjoint(
        {"reconcile.iotistic.io/requested-at", "iotistic.io/revoked-license"}
    ), body["metadata"]
    assert await audit_rows(db_engine, name) == 0
    assert await revocations_and_notices(db_engine, customer_id) == before


async def test_an_action_from_the_page_of_a_deleted_customer_leaves_the_one_made_again_alone(
    api: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine, license_keys: tuple[Path, Path]
) -> None:
    """Found in review: actions named the Customer only, so a page left open on it (typing a Revoke reason
    holds its refresh) acted on a Customer deleted and applied again under its name since: the click
    revoked the new one's licence and suspended it."""
    name = unique_name("reborn")
    customer_id = customer_id_for(name)
    created = customers.create(name, customerId=customer_id)
    await sign_in(api, ADMIN_TOKEN)
    forms = await customer_forms(api, name)
    assert forms["suspend"]["uid"] == created["metadata"]["uid"]
    await made_again(customers, name, customer_id)
    # No licence of its own needed: the action is refused on the uid before it reads one (the old
    # namespace may still be terminating, where no Secret can be made).
    before = await revocations_and_notices(db_engine, customer_id)

    for action in CUSTOMER_ACTIONS:
        answer = await post_form(api, f"/admin/customers/{name}/{action}", forms[action], BROWSER)
        page = await answer.text()
        assert (answer.status, answer.content_type) == (409, "text/html"), (action, page)
        assert "re-created since this page was shown" in page, (action, page)
    await untouched(customers, db_engine, name, customer_id, before)


async def test_an_action_read_before_its_customer_was_made_again_is_refused_by_the_api_server(
    api: TestClient[Any, Any],
    customers: Customers,
    db_engine: AsyncEngine,
    license_keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read and the patch are apart: the patch names the uid read (a merge patch's metadata.uid the
    API server refuses on another object), so a Customer made again between them is left alone too."""
    name = unique_name("between")
    customer_id = customer_id_for(name)
    customers.create(name, customerId=customer_id)
    put_licence(customers, f"customer-{name}", signed_licence(license_keys, customer_id))
    await sign_in(api, ADMIN_TOKEN)
    forms = await customer_forms(api, name)
    directory = api.app[DIRECTORY]
    read_before = await directory.by_name(name)
    await made_again(customers, name, customer_id)
    before = await revocations_and_notices(db_engine, customer_id)

    async def read_before_the_re_creation(_: str) -> Any:
        return read_before

    monkeypatch.setattr(directory, "by_name", read_before_the_re_creation)
    for action in CUSTOMER_ACTIONS:
        answer = await post_form(api, f"/admin/customers/{name}/{action}", forms[action])
        problem = await answer.json()
        assert answer.status == 409, (action, problem)
        assert "re-created since this page was shown" in problem["message"], (action, problem)
    await untouched(customers, db_engine, name, customer_id, before)


# ----- signing in from a link -----


async def test_a_link_to_a_page_leads_through_sign_in_to_that_page(
    api: TestClient[Any, Any], customer: str
) -> None:
    """Found in review: a link to a Customer's page (from a ticket, a chat) sent a person to sign in,
    and then to the overview, not to the page it named."""
    path = f"/admin/customers?q={customer}"
    answer = await api.get(path, allow_redirects=False)
    login = "/admin/login?" + urlencode({"next": path})
    assert (answer.status, answer.headers["Location"]) == (303, login)
    form = await form_fields(api, login, "/admin/login")
    assert form == {"next": path}
    signed_in = await post_form(api, "/admin/login", {"token": ADMIN_TOKEN, **form})
    assert (signed_in.status, signed_in.headers["Location"]) == (303, path)
    # The overview's own sign-in carries no return: it is where a sign-in lands.
    api.session.cookie_jar.clear()
    answer = await api.get("/admin/", allow_redirects=False)
    assert answer.headers["Location"] == "/admin/login"


@pytest.mark.parametrize(
    "next_page",
    [
        "https://evil.example/admin/",
        "//evil.example/admin/",
        "/\\evil.example/admin/",
        "/admin/\\\\evil.example",
        "/api/customers",
        "/admin",
        "javascript:alert(1)",
        "/admin/customers\r\nSet-Cookie: x=1",
    ],
)
async def test_a_sign_in_returns_only_to_a_page_of_the_console(
    api: TestClient[Any, Any], next_page: str
) -> None:
    form = await api.get("/admin/login", params={"next": next_page}, allow_redirects=False)
    page = await form.text()
    assert form.status == 400, page
    assert "next: must be a page of the console" in page, page
    answer = await post_form(api, "/admin/login", {"token": ADMIN_TOKEN, "next": next_page})
    problem = await answer.json()
    assert answer.status == 400 and problem["details"][0]["field"] == "next", problem
    assert COOKIE not in answer.cookies


async def test_admin_without_its_slash_is_the_console(api: TestClient[Any, Any]) -> None:
    """Found in review: /admin, typed without its slash, was the API's JSON 404."""
    answer = await api.get("/admin", allow_redirects=False)
    assert (answer.status, answer.headers["Location"]) == (303, "/admin/")
