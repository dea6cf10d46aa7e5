"""The admin console driven over HTTP as a browser would: a session cookie, the page's CSRF token, the
console's own Origin on every POST."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from playwright.async_api import Page, async_playwright
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.db.models import ConsoleAction, StripeEvent
from tests.integration.webhook_support import PRICES, deliver, event, random_id, subscription_object

CSRF_INPUT = re.compile(r'name="csrf" value="([^"]+)"')


def origin(client: TestClient[Any, Any]) -> str:
    """The console's origin, as a browser sends it."""
    return str(client.make_url("/")).rstrip("/")


async def sign_in(client: TestClient[Any, Any], token: str) -> str:
    """A session for `token` in the client's cookie jar; the session's CSRF token."""
    answer = await client.post(
        "/admin/login", data={"token": token}, headers={"Origin": origin(client)}, allow_redirects=False
    )
    assert answer.status == 303, await answer.text()
    return await csrf_of(client)


async def csrf_of(client: TestClient[Any, Any], path: str = "/admin/") -> str:
    page = await client.get(path, allow_redirects=False)
    assert page.status == 200, await page.text()
    found = CSRF_INPUT.search(await page.text())
    assert found, "no CSRF field on the page"
    return found.group(1)


async def post_form(
    client: TestClient[Any, Any], path: str, fields: dict[str, str], headers: dict[str, str] | None = None
) -> ClientResponse:
    """A console form's POST, from the console's origin unless `headers` say otherwise."""
    return await client.post(
        path, data=fields, headers={"Origin": origin(client), **(headers or {})}, allow_redirects=False
    )


async def form_fields(client: TestClient[Any, Any], page: str, action: str) -> dict[str, str]:
    """The hidden fields of the form on `page` that posts to `action`, as the page holds them now."""
    html = await (await client.get(page)).text()
    form = re.search(rf'<form[^>]* method="post" action="{re.escape(action)}">(.*?)</form>', html, re.S)
    assert form, f"no form posting to {action} on {page}"
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(1)))


async def replay_form(client: TestClient[Any, Any], event_id: str) -> dict[str, str]:
    """The fields of the event page's Replay form, as the page holds them now."""
    page = f"/admin/stripe-events/{event_id}"
    return await form_fields(client, page, f"{page}/replay")


async def unmatched_event(client: TestClient[Any, Any], customer_id: str) -> dict[str, Any]:
    """A subscription event for `customer_id` delivered before any Customer has that id: unmatched."""
    early = event(
        "customer.subscription.updated",
        subscription_object(
            random_id("sub_"),
            customer=random_id("cus_"),
            price=PRICES["professional"],
            metadata={"customerId": customer_id},
        ),
        created=int(time.time()) - 30,
    )
    status, body = await deliver(client, early)
    assert (status, body["result"]) == (200, "unmatched")
    return early


async def record_predecessor_action(
    engine: AsyncEngine, created: datetime, action: str, detail: str, **subject: str
) -> None:
    """A console action on a deleted object of the same name (`customer_name=` or `target=`), recorded
    five minutes before `created`, the creation of the one that has the name now."""
    async with engine.begin() as connection:
        await connection.execute(
            ConsoleAction.__table__.insert().values(
                at=created - timedelta(minutes=5), role="admin", action=action, detail=detail, **subject
            )
        )


async def event_state(engine: AsyncEngine, event_id: str) -> tuple[str, int]:
    """A stored Stripe event's result and failed tries."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                select(StripeEvent.result, StripeEvent.attempts).where(StripeEvent.event_id == event_id)
            )
        ).one()
    return row[0], row[1]


# ----- a real browser -----

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox: the tests run as root here, where Chromium refuses its sandbox; nothing outside is loaded.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run")


def chromium() -> Path:
    """Debian's Chromium, or an error that says how to install it (never a skip)."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run `tools/build.sh chromium` (make test does)")
    return CHROMIUM


@asynccontextmanager
async def console_page(base_url: str, shots: Path, *, expected: tuple[str, ...] = ()) -> AsyncIterator[Page]:
    """A page in Debian's Chromium (installed by `tools/build.sh chromium`), with every console error of
    the page collected: a test ends by asserting there was none but those holding one of `expected`."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium()), args=list(CHROMIUM_ARGS))
        try:
            context = await browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            errors: list[str] = []
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
            unexpected = [error for error in errors if not any(part in error for part in expected)]
            assert unexpected == [], f"the browser's console reported errors: {unexpected}"
        finally:
            await browser.close()


async def browser_sign_in(page: Page, token: str) -> None:
    """Sign in the way a person does: the console's address, the sign-in form, the overview."""
    await page.goto("/admin/")
    await page.wait_for_url("**/admin/login")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await page.wait_for_url("**/admin/")
