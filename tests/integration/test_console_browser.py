"""The admin console in a real browser (Debian's Chromium through Playwright), next to the running
operator and the webhook server: what a person on the billing team sees and does. Screenshots of each
page land in the test's temporary folder."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import expect
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.settings import Settings
from iotistic_billing.webhook_server.security import API_KEY_HEADER
from tests.conftest import OperatorProcess, unique_name
from tests.integration.console_support import (
    browser_sign_in,
    console_page,
    event_state,
    post_form,
    sign_in,
    unmatched_event,
)
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    ADMIN_TOKEN,
    PRICES,
    Customers,
    add_usage_key,
    customer_id_for,
    customers_fixture,
    deliver,
    event,
    eventually,
    random_id,
    running_app,
    subscription_object,
    webhook_settings_fixture,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def console(
    webhook_settings: Settings, kubeconfig: Path, operator: OperatorProcess
) -> AsyncIterator[TestClient[Any, Any]]:
    """The webhook server (console, API, Stripe inbox) beside the running operator."""
    async with running_app(webhook_settings, kubeconfig) as client:
        yield client


def base_url(client: TestClient[Any, Any]) -> str:
    return str(client.make_url("/")).rstrip("/")


def kubectl_apply(kubectl: Path, kubeconfig: Path, manifest: dict[str, Any]) -> None:
    """As a platform engineer does it."""
    subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), "apply", "-f", "-"],
        input=json.dumps(manifest).encode(),
        check=True,
        capture_output=True,
    )


def customer_manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": {"name": name},
        "spec": {"email": f"ops@{name}.example.com", "companyName": f"{name.title()} Corp", **spec},
    }


def usage_report(customer_id: str, start: datetime, active_devices: int) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "instance_id": "prod-1",
        "report_id": random_id("r-"),
        "period_start": start.isoformat(),
        "period_end": (start + timedelta(hours=1)).isoformat(),
        "active_devices": active_devices,
        "total_devices": active_devices + 1,
        "mqtt_messages_published": 10,
        "mqtt_messages_received": 20,
        "mqtt_bytes_sent": 4_000_000,
        "mqtt_bytes_received": 1_000_000,
        "http_requests": 300,
        "http_bytes_sent": 300,
        "http_bytes_received": 400,
        "postgres_size_mb": 125.5,
        "postgres_row_count": 1000,
    }


async def test_a_customer_applied_with_kubectl_appears_and_its_usage_is_charted(
    console: TestClient[Any, Any],
    kubectl_binary: Path,
    kubeconfig: Path,
    db_engine: AsyncEngine,
    customers: Customers,
    tmp_path: Path,
) -> None:
    name = unique_name("watched")
    customer_id = customer_id_for(name)
    async with console_page(base_url(console), tmp_path) as page:
        await browser_sign_in(page, ADMIN_TOKEN)
        await page.screenshot(path=tmp_path / "overview-before.png", full_page=True)
        # A mark on the document: it survives the in-place refresh, not a reload.
        await page.evaluate("window.notReloaded = true")

        kubectl_apply(
            kubectl_binary, kubeconfig, customer_manifest(name, customerId=customer_id, trial={"days": 3})
        )
        await expect(page.locator(f'#main a[href="/admin/customers/{name}"]').first).to_be_visible(
            timeout=30_000
        )
        assert await page.evaluate("window.notReloaded") is True
        await page.screenshot(path=tmp_path / "overview.png", full_page=True)

        key = await add_usage_key(db_engine, customer_id)
        today = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        for start, devices in ((today - timedelta(days=1), 4), (today, 7)):
            answer = await console.post(
                "/api/usage/report",
                json=usage_report(customer_id, start, devices),
                headers={API_KEY_HEADER: key},
            )
            assert (answer.status, await answer.json()) == (202, {"accepted": 1, "duplicate": 0})

        await page.click(f'#main a[href="/admin/customers/{name}"]')
        await page.wait_for_url(f"**/admin/customers/{name}")
        claims = page.locator("table.claims")
        await expect(claims).to_contain_text("trial", timeout=30_000)
        await expect(claims).to_contain_text("maxDevices")
        licence = (customers.get(name) or {})["status"]["license"]
        await expect(claims).to_contain_text(licence["jti"])
        devices = page.locator("svg.chart", has_text="Peak active devices")
        await expect(
            devices.locator("rect.bar title", has_text=f"{today.date().isoformat()}: 7 devices")
        ).to_have_count(1)
        yesterday = (today - timedelta(days=1)).date().isoformat()
        await expect(devices.locator("rect.bar title", has_text=f"{yesterday}: 4 devices")).to_have_count(1)
        await expect(page.locator(".overage")).to_have_text("$0.00")
        html = await page.content()
        secret = customers.core.read_namespaced_secret("iotistic-license", f"customer-{name}")
        assert secret.data["license.jwt"] not in html
        await page.screenshot(path=tmp_path / "customer.png", full_page=True)

        await page.click("nav >> text=Customers")
        await page.fill("input[name=q]", name)
        await page.press("input[name=q]", "Enter")
        await expect(page.locator(f'a[href="/admin/customers/{name}"]')).to_have_count(1)
        await page.screenshot(path=tmp_path / "customers.png", full_page=True)


async def test_reconcile_now_retries_a_stalled_customer(
    console: TestClient[Any, Any],
    kubectl_binary: Path,
    kubeconfig: Path,
    customers: Customers,
    tmp_path: Path,
) -> None:
    name = unique_name("stalled")
    # A chart version this operator does not have: retrying cannot help until the spec changes.
    kubectl_apply(kubectl_binary, kubeconfig, customer_manifest(name, instance={"chartVersion": "9.9.9"}))

    def stalled() -> dict[str, Any] | None:
        body = customers.get(name) or {}
        conditions = {c["type"]: c for c in body.get("status", {}).get("conditions", [])}
        return body if conditions.get("Stalled", {}).get("status") == "True" else None

    await eventually(stalled, message="Stalled")
    async with console_page(base_url(console), tmp_path) as page:
        await browser_sign_in(page, ADMIN_TOKEN)
        failing = page.locator("table.failing tr", has_text=name)
        await expect(failing).to_contain_text("ChartVersionUnavailable")
        await failing.locator("a").click()
        await page.wait_for_url(f"**/admin/customers/{name}")
        await expect(page.locator("h1 .phase")).to_have_text("Failed")
        await page.click("button:has-text('Reconcile now')")
        await expect(page.locator("p.done")).to_have_text(
            "Reconcile requested: the operator answers it with a pass."
        )
        requested = (customers.get(name) or {})["metadata"]["annotations"][
            "reconcile.iotistic.io/requested-at"
        ]
        # The operator answers the request: the page (refreshing itself) shows which request it answered.
        await expect(page.locator(f'[data-handled="{requested}"]')).to_be_visible(timeout=30_000)
        await expect(page.locator("section", has_text="Console actions")).to_contain_text(
            f"reconcile requested at {requested}"
        )
        await page.screenshot(path=tmp_path / "customer-stalled.png", full_page=True)
    body = customers.get(name) or {}
    assert body["status"]["lastHandledReconcileAt"] == requested


async def test_replaying_an_unmatched_event_applies_it_once_its_customer_exists(
    console: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine, tmp_path: Path
) -> None:
    name = unique_name("late")
    customer_id = customer_id_for(name)
    early = await unmatched_event(console, customer_id)
    subscription_id = early["data"]["object"]["id"]
    customers.create(name, customerId=customer_id, billing={"mode": "stripe"})

    async with console_page(base_url(console), tmp_path) as page:
        await browser_sign_in(page, ADMIN_TOKEN)
        await page.click("nav >> text=Stripe events")
        await page.select_option("select[name=result]", "unmatched")
        await page.click("form.filters button[type=submit]")
        await page.click(f"a:has-text('{early['id']}')")
        await page.wait_for_url(f"**/admin/stripe-events/{early['id']}")
        await expect(page.locator("td.result")).to_have_text("unmatched")
        await page.screenshot(path=tmp_path / "stripe-event-unmatched.png", full_page=True)
        await page.click("button:has-text('Replay')")
        await expect(page.locator("p.done")).to_have_text("Stripe event replayed: see its result below.")
        await expect(page.locator("td.result")).to_have_text("applied", timeout=30_000)
        await expect(page.locator("button:has-text('Replay')")).to_have_count(0)
        await page.screenshot(path=tmp_path / "stripe-event-applied.png", full_page=True)

    assert await event_state(db_engine, early["id"]) == ("applied", 0)  # no failed try
    subscription = customers.subscription(name) or {}
    assert (subscription.get("stripeSubscriptionId"), subscription.get("plan")) == (
        subscription_id,
        "professional",
    )
    # Once applied, it is not replayed again.
    csrf = await sign_in(console, ADMIN_TOKEN)
    again = await post_form(console, f"/admin/stripe-events/{early['id']}/replay", {"csrf": csrf})
    assert again.status == 409
    assert await event_state(db_engine, early["id"]) == ("applied", 0)  # no failed try
