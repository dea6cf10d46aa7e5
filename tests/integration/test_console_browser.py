"""The admin console in a real browser (Debian's Chromium through Playwright), next to the running
operator and the webhook server: what a person on the billing team sees and does. Screenshots of each
page land in the test's temporary folder. What the pages say of the records (usage, actions, notices,
Stripe events) is read over HTTP against the real database."""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import expect
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.customer import REVOKED_LICENSE
from iotistic_billing.db.models import (
    ConsoleAction,
    LicenseHistory,
    Notice,
    NoticeDelivery,
    StripeEvent,
    Subscription,
)
from iotistic_billing.k8s import KubernetesUnavailable
from iotistic_billing.settings import Settings
from iotistic_billing.usage.periods import period_containing, shift_months
from iotistic_billing.webhook_server.context import DIRECTORY, KUBE
from iotistic_billing.webhook_server.options import ServerOptions
from iotistic_billing.webhook_server.security import API_KEY_HEADER
from tests.conftest import OperatorProcess, unique_name
from tests.integration.console_support import (
    browser_sign_in,
    console_page,
    event_state,
    form_fields,
    post_form,
    record_predecessor_action,
    replay_form,
    sign_in,
    unmatched_event,
)
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    ADMIN_TOKEN,
    PRICES,
    VIEWER_TOKEN,
    Customers,
    add_usage_key,
    admin_headers,
    api_fixture,
    customer_id_for,
    customers_fixture,
    deliver,
    event,
    eventually,
    lose_the_database_after_the_patch,
    random_id,
    running_app,
    stripe_customer,
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


@pytest.fixture
async def quick_console(webhook_settings: Settings, kubeconfig: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """The webhook server with its pages refreshing every 0.2 s, not 2 s: the tests of the refresh wait
    for several."""
    options = ServerOptions(license_wait=0, console_refresh=0.2)
    async with running_app(webhook_settings, kubeconfig, options) as client:
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


def usage_report(customer_id: str, start: datetime, active_devices: int, **counters: int) -> dict[str, Any]:
    """An hour's report from `start`; `counters` replace the report's own."""
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
        **counters,
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
        licence = (customers.get(name) or {})["status"]["license"]
        await expect(claims).to_contain_text(licence["jti"], timeout=30_000)
        await expect(claims).to_contain_text("maxDevices")
        secret = customers.core.read_namespaced_secret("iotistic-license", f"customer-{name}")
        token = base64.b64decode(secret.data["license.jwt"]).decode()
        trial = jwt.decode(token, options={"verify_signature": False})["trial"]
        assert trial["isTrialMode"] is True
        # The trial claim's value, not the row's own label "trial".
        trial_row = claims.locator("tr", has=page.locator("th", has_text=re.compile("^trial$")))
        await expect(trial_row.locator("td")).to_have_text(f"isTrialMode: yes, endsAt: {trial['endsAt']}")
        devices = page.locator("svg.chart", has_text="Peak active devices")
        await expect(
            devices.locator("rect.bar title", has_text=f"{today.date().isoformat()}: 7 devices")
        ).to_have_count(1)
        yesterday = (today - timedelta(days=1)).date().isoformat()
        await expect(devices.locator("rect.bar title", has_text=f"{yesterday}: 4 devices")).to_have_count(1)
        await expect(page.locator(".overage")).to_have_text("$0.00")
        html = await page.content()
        # The JWT as the Secret holds it (its data is base64), whole or its signature alone.
        assert token not in html and token.rsplit(".", 1)[1] not in html
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
    # Once applied, it is not replayed again: a form of a page that showed its replay is refused, one of
    # a page from before it lands on its page.
    csrf = await sign_in(console, ADMIN_TOKEN)
    async with db_engine.connect() as connection:
        replay = await connection.scalar(select(ConsoleAction.id).where(ConsoleAction.target == early["id"]))
    path = f"/admin/stripe-events/{early['id']}/replay"
    again = await post_form(console, path, {"csrf": csrf, "last_replay": str(replay)})
    assert again.status == 409, await again.text()
    stale = await post_form(console, path, {"csrf": csrf, "last_replay": "0"})
    assert stale.status == 303, await stale.text()
    assert await event_state(db_engine, early["id"]) == ("applied", 0)  # no failed try


# ----- what the pages say of the records -----

BAR = re.compile(r'<rect class="(bar[^"]*)"[^>]*><title>([^<]*)</title>')


def chart_bars(page: str, title: str) -> list[tuple[str, str]]:
    """(class, title) of every bar of the page's chart titled `title`."""
    found = re.search(rf'<svg class="chart"[^>]*aria-label="{re.escape(title)}">.*?</svg>', page)
    assert found, f"no chart {title!r} on the page"
    return BAR.findall(found.group(0))


async def test_period_charts_match_the_period_totals_when_the_period_starts_mid_day(
    api: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """Found in review: for a period starting at 13:42 UTC, the traffic and API-call charts added the
    reports of that day before 13:42 (the period before's) and read 11,500 MB over the 10 GB quota,
    while the page said overage $0.00."""
    yesterday = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    today = yesterday + timedelta(days=1)
    period_start = yesterday.replace(hour=13, minute=42)
    # Stripe's own start: a month back from the end would move it (Jan 30 + 1 month ends Feb 28).
    name, customer_id = stripe_customer(
        customers, "midday", shift_months(period_start, 1), current_period_start=period_start
    )
    key = await add_usage_key(db_engine, customer_id)
    plain = {"mqtt_bytes_received": 0, "http_bytes_sent": 0, "http_bytes_received": 0}
    # 12:00-13:00 counts in the period before; 13:00-14:00 ends in this one, so counts here whole.
    for hour, megabytes, calls in ((12, 9_000, 90_000), (13, 1_000, 10_000), (20, 1_500, 15_000)):
        report = usage_report(
            customer_id,
            yesterday.replace(hour=hour),
            3,
            mqtt_bytes_sent=megabytes * 1_000_000,
            http_requests=calls,
            **plain,
        )
        answer = await api.post("/api/usage/report", json=report, headers={API_KEY_HEADER: key})
        assert answer.status == 202, await answer.text()

    usage = await (await api.get(f"/api/usage/{customer_id}", headers=admin_headers())).json()
    period = usage["billing_period"]
    assert datetime.fromisoformat(period["period_start"]) == period_start
    totals = period["totals"]
    assert (totals["mqtt_bytes"] + totals["http_bytes"], totals["api_calls"]) == (2_500_000_000, 25_000)
    await sign_in(api, ADMIN_TOKEN)
    page = await (await api.get(f"/admin/customers/{name}")).text()
    assert '<strong class="overage">$0.00</strong>' in page
    first, second = f"{yesterday.date().isoformat()} from 13:42 UTC", today.date().isoformat()
    # Every day of the period so far, the first from its start; the last is the period's totals.
    assert chart_bars(page, "Traffic this period") == [
        ("bar", f"{first}: 2,500 MB"),
        ("bar", f"{second}: 2,500 MB"),
    ]
    assert chart_bars(page, "API calls this period") == [
        ("bar", f"{first}: 25,000 calls"),
        ("bar", f"{second}: 25,000 calls"),
    ]


async def test_a_trials_period_overage_is_marked_not_billed(
    api: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """Found in review: the API and the customer page showed a trial's overage as dollars owed, while
    the meter run bills none (Rollup.billed). The would-be lines stay visible, marked; a paid plan's
    overage is billed."""
    now = datetime.now(UTC)
    # The last full hour, but in this calendar month (the trial's period): in a month's first hour, the
    # hour so far (an hour ending at the month's start would be billed in the month before).
    hour = max(
        now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1), period_containing(now).start
    )
    shown: dict[str, dict[str, Any]] = {}
    for plan in ("trial", "starter"):
        name = unique_name(f"billed-{plan}")
        customer_id = customer_id_for(name)
        customers.create(name, customerId=customer_id, plan=plan)
        key = await add_usage_key(db_engine, customer_id)
        # 13 devices on 10 included (both plans): 3 over at $2.
        report = {
            **usage_report(customer_id, hour, 13),
            "period_end": min(hour + timedelta(hours=1), now).isoformat(),
        }
        answer = await api.post("/api/usage/report", json=report, headers={API_KEY_HEADER: key})
        assert answer.status == 202, await answer.text()
        usage = await (await api.get(f"/api/usage/{customer_id}", headers=admin_headers())).json()
        shown[plan] = usage["billing_period"]
        await sign_in(api, ADMIN_TOKEN)
        page = await (await api.get(f"/admin/customers/{name}")).text()
        period_line = re.search(r"<p>Billing period .*?</p>", page)
        assert period_line, "no billing period on the page"
        shown[plan]["page"] = period_line.group(0)
    trial, starter = shown["trial"], shown["starter"]
    assert (trial["plan"], trial["billed"], trial["overage"]["total"]) == ("trial", False, "6.00")
    assert trial["overage"]["total_cents"] == 600 and len(trial["overage"]["lines"]) == 1
    assert (
        '<strong class="overage">$6.00</strong> <span class="not-billed">not billed</span> (' in trial["page"]
    )
    assert (starter["plan"], starter["billed"], starter["overage"]["total"]) == ("starter", True, "6.00")
    assert (
        '<strong class="overage">$6.00</strong> (' in starter["page"] and "not billed" not in starter["page"]
    )


async def test_console_actions_of_a_predecessor_are_not_shown(
    api: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """Found in review: console actions name the Customer only, so a new Customer showed the actions
    taken on a deleted one of the same name."""
    name = unique_name("reborn")
    created = customers.create(name, customerId=customer_id_for(name))
    born = datetime.fromisoformat(created["metadata"]["creationTimestamp"])
    # The predecessor's, recorded before this Customer was created.
    await record_predecessor_action(
        db_engine, born, "suspend", "suspended the deleted one", customer_name=name
    )
    csrf = await sign_in(api, ADMIN_TOKEN)
    assert (await post_form(api, f"/admin/customers/{name}/reconcile", {"csrf": csrf})).status == 303
    page = await (await api.get(f"/admin/customers/{name}")).text()
    actions = page.partition("<h3>Console actions</h3>")[2]
    assert "reconcile requested at" in actions
    assert "suspended the deleted one" not in actions


def flux_apply(kubectl: Path, kubeconfig: Path, manifest: dict[str, Any]) -> None:
    """As Flux's kustomize-controller applies a manifest from Git: server-side, under its field manager."""
    subprocess.run(
        [
            str(kubectl),
            "--kubeconfig",
            str(kubeconfig),
            "apply",
            "--server-side",
            "--field-manager=kustomize-controller",
            "-f",
            "-",
        ],
        input=json.dumps(manifest).encode(),
        check=True,
        capture_output=True,
    )


async def test_a_console_suspension_git_puts_back_is_said_on_the_page_after_it(
    api: TestClient[Any, Any], kubectl_binary: Path, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: the API server moves spec.suspended's ownership to the console once its patch
    changes the value, so the page the Suspend redirected to found Flux owning other spec fields only and
    said "Customer suspended." without its GitOps banner, while Flux put suspended: false back."""
    name = unique_name("fluxed")
    flux_apply(kubectl_binary, kubeconfig, customer_manifest(name, suspended=False))
    csrf = await sign_in(api, ADMIN_TOKEN)
    page = await (await api.get(f"/admin/customers/{name}")).text()
    assert 'class="gitops"' in page and "kustomize-controller" in page, page
    answer = await post_form(api, f"/admin/customers/{name}/suspend", {"csrf": csrf, "confirm": "yes"})
    assert answer.status == 303, await answer.text()
    # What made the banner go: the console owns spec.suspended now, Flux the rest of the spec.
    owners = {
        entry["manager"]: set((entry.get("fieldsV1") or {}).get("f:spec", {}))
        for entry in (customers.get(name) or {})["metadata"]["managedFields"]
    }
    assert "f:suspended" in owners["iotistic-console"] and "f:suspended" not in owners["kustomize-controller"]
    after = await (await api.get(answer.headers["Location"])).text()
    assert "Customer suspended, but Git sets spec.suspended" in after, after


async def test_a_console_revoke_git_puts_back_is_said_on_the_page_after_it(
    console: TestClient[Any, Any], kubectl_binary: Path, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: as a Suspend, a revoke's suspension moved spec.suspended to the console, and the
    page after it said nothing of Flux lifting it again (the revoke route's warning was judged before)."""
    name = unique_name("fluxrev")
    manifest = customer_manifest(name, customerId=customer_id_for(name), suspended=False)
    flux_apply(kubectl_binary, kubeconfig, manifest)
    await eventually(
        lambda: bool(((customers.get(name) or {}).get("status") or {}).get("license")), message="licence"
    )
    csrf = await sign_in(console, ADMIN_TOKEN)
    answer = await post_form(console, f"/admin/customers/{name}/revoke", {"csrf": csrf, "reason": "fraud"})
    assert (answer.status, answer.headers["Location"]) == (
        303,
        f"/admin/customers/{name}?done=revoke-git-reverts",
    ), await answer.text()
    after = await (await console.get(answer.headers["Location"])).text()
    assert "Licence revoked and Customer suspended, but Git sets spec.suspended" in after


async def test_a_console_revoke_tells_the_customer_the_admins_reason(
    console: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """Found in review: the console's revoke told the customer (mail, webhook) and the licence history
    the fixed reason "revoked in the admin console", never the admin's."""
    name = unique_name("revoked")
    customer_id = customer_id_for(name)
    customers.create(name, customerId=customer_id)

    def licensed() -> bool:
        return bool(((customers.get(name) or {}).get("status") or {}).get("license"))

    await eventually(licensed, message="licence")
    jti = licence_jti(customers, name)
    csrf = await sign_in(console, ADMIN_TOKEN)
    reason = "chargeback on invoice 2026-0042"
    answer = await post_form(console, f"/admin/customers/{name}/revoke", {"csrf": csrf, "reason": reason})
    assert answer.status == 303, await answer.text()
    # The operator's pass on the suspension (its licence's row and notice committed before the status).
    await eventually(
        lambda: (found := licence_jti(customers, name)) is not None and found != jti, message="unlicensed"
    )
    async with db_engine.connect() as connection:
        history = await connection.scalars(
            select(LicenseHistory.metadata_).where(
                LicenseHistory.customer_id == customer_id, LicenseHistory.action == "revoked"
            )
        )
        assert history.all() == [{"reason": reason, "by": "console"}]
        notices = await connection.execute(
            select(Notice.kind, Notice.facts)
            .where(Notice.customer_id == customer_id, Notice.kind.like("license.%"))
            .order_by(Notice.id)
        )
        # One notice, the revoke's: the suspension it made says nothing of its own (found in review:
        # a second `license.suspended` "suspended by an administrator", without the reason).
        assert [(kind, facts["reason"]) for kind, facts in notices.all()] == [("license.revoked", reason)]
    page = await (await console.get(f"/admin/customers/{name}")).text()
    assert reason in page.partition("<h3>Console actions</h3>")[2]


def licence_jti(customers: Customers, name: str) -> str | None:
    """The jti of the licence the operator last reported on the Customer."""
    jti: str | None = (((customers.get(name) or {}).get("status") or {}).get("license") or {}).get("jti")
    return jti


async def test_a_console_revoke_whose_patch_answer_was_lost_keeps_its_record(
    console: TestClient[Any, Any],
    customers: Customers,
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a revoke whose patch got no answer (which the API server may have made) rolled
    back its audit row and posted no Event, while the Customer could be suspended with the licence named
    in iotistic.io/revoked-license: nothing said who had done it."""
    name = unique_name("unanswered")
    customer_id = customer_id_for(name)
    created = customers.create(name, customerId=customer_id)

    jti = await eventually(lambda: licence_jti(customers, name), message="licence")
    kube = console.app[KUBE]
    patch_customer = kube.patch_customer

    async def patch_without_an_answer(*args: Any, **kwargs: Any) -> dict[str, Any]:
        await patch_customer(*args, **kwargs)
        raise KubernetesUnavailable("the API server did not answer in time", maybe_applied=True)

    monkeypatch.setattr(kube, "patch_customer", patch_without_an_answer)
    csrf = await sign_in(console, ADMIN_TOKEN)
    revoke = f"/admin/customers/{name}/revoke"
    lost = await post_form(console, revoke, {"csrf": csrf, "reason": "card reported stolen"})
    problem = await lost.json()
    assert (lost.status, problem["error"]) == (503, "Kubernetes API unavailable"), problem
    assert "may have been made" in problem["message"] and "nothing was changed" not in problem["message"]
    monkeypatch.undo()
    body = customers.get(name) or {}
    assert body["spec"]["suspended"] is True and body["metadata"]["annotations"][REVOKED_LICENSE] == jti

    async def records() -> tuple[list[str], list[str | None], list[str]]:
        """The Customer's console actions, its revoked licences and its revocation notices."""
        async with db_engine.connect() as connection:
            actions = await connection.scalars(
                select(ConsoleAction.detail)
                .where(ConsoleAction.customer_name == name)
                .order_by(ConsoleAction.id)
            )
            revoked = await connection.scalars(
                select(LicenseHistory.jti).where(
                    LicenseHistory.customer_id == customer_id, LicenseHistory.action == "revoked"
                )
            )
            notices = await connection.scalars(
                select(Notice.key).where(Notice.customer_id == customer_id, Notice.kind == "license.revoked")
            )
            return list(actions.all()), list(revoked.all()), list(notices.all())

    # Its audit row and its Event say it may not have been made. The licence history and the customer's
    # notice say only what was done: the retry, finding the licence named on the Customer, records them.
    actions, revoked, notices = await records()
    assert len(actions) == 1 and jti in actions[0] and "may not have been made" in actions[0], actions
    events = await kube.list_customer_events(name, created["metadata"]["uid"])
    told = [posted["message"] for posted in events if posted["reason"] == "ConsoleRevoke"]
    assert len(told) == 1 and jti in told[0] and "may not have been made" in told[0], told
    assert (revoked, notices) == ([], [])

    # Retried once the operator has replaced the licence (unlicensed), and sent again: that licence,
    # recorded once.
    await eventually(
        lambda: (found := licence_jti(customers, name)) is not None and found != jti, message="unlicensed"
    )
    for _ in range(2):
        again = await post_form(console, revoke, {"csrf": csrf, "reason": "card reported stolen"})
        assert again.status == 303, await again.text()
    actions, revoked, notices = await records()
    assert revoked == [jti] and len(notices) == 1 and jti in notices[0], (revoked, notices)
    assert [jti in action and "may not" not in action for action in actions] == [False, True, True], actions


async def test_a_console_revoke_whose_commit_is_lost_is_told_on_the_customer(
    console: TestClient[Any, Any],
    customers: Customers,
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: PostgreSQL lost at the commit of a console revoke, after the Customer was
    suspended, answered a 503 saying so but posted no Event, so nothing but the annotation said who had
    done it (the console's other actions post theirs then)."""
    name = unique_name("revlost")
    created = customers.create(name, customerId=customer_id_for(name))

    jti = await eventually(lambda: licence_jti(customers, name), message="licence")
    kube = console.app[KUBE]
    lose_the_database_after_the_patch(kube, db_engine, monkeypatch)
    csrf = await sign_in(console, ADMIN_TOKEN)
    lost = await post_form(console, f"/admin/customers/{name}/revoke", {"csrf": csrf, "reason": "fraud"})
    problem = await lost.json()
    assert (lost.status, problem["error"]) == (503, "Database unavailable"), problem
    assert f"{name} was suspended" in problem["message"], problem
    monkeypatch.undo()
    events = await kube.list_customer_events(name, created["metadata"]["uid"])
    told = [posted["message"] for posted in events if posted["reason"] == "ConsoleRevoke"]
    assert len(told) == 1 and jti in told[0] and "PostgreSQL was lost" in told[0], told


async def test_customer_events_are_those_of_its_uid(api: TestClient[Any, Any], customers: Customers) -> None:
    """Found in review: a Customer's page listed the Events of a deleted one of the same name (the Events
    were selected by kind and name, not by the Customer's uid)."""
    name = unique_name("evented")
    created = customers.create(name, customerId=customer_id_for(name))
    kube = api.app[KUBE]
    predecessor = {"metadata": {"name": name, "uid": str(uuid.uuid4())}}
    await kube.create_event("Customer", predecessor, reason="Deleted", message="an Event of the deleted one")
    await kube.create_event("Customer", created, reason="Current", message="an Event of this Customer")
    await sign_in(api, VIEWER_TOKEN)
    page = await (await api.get(f"/admin/customers/{name}")).text()
    events = page.partition("<h2>Kubernetes Events</h2>")[2].partition("</section>")[0]
    assert "an Event of this Customer" in events
    assert "an Event of the deleted one" not in events


async def test_the_replay_of_an_unmatched_event_is_shown_on_its_page(
    api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: the audit row of a replay of an event no Customer matched was shown nowhere."""
    early = await unmatched_event(api, "cust_" + random_id("", 12))
    csrf = await sign_in(api, ADMIN_TOKEN)
    answer = await post_form(api, f"/admin/stripe-events/{early['id']}/replay", {"csrf": csrf})
    assert answer.status == 303, await answer.text()
    page = await (await api.get(f"/admin/stripe-events/{early['id']}")).text()
    actions = page.partition("<h2>Console actions</h2>")[2]
    assert f"Stripe event {early['id']} ({early['type']}) replayed" in actions, page


async def test_the_replay_of_an_event_deleted_after_its_retention_is_still_shown_on_its_page(
    api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: once the inbox deleted a replayed unmatched event (STRIPE_EVENT_RETENTION_DAYS),
    its page was a 404 and who replayed it was shown nowhere (its audit row names no Customer)."""
    early = await unmatched_event(api, "cust_" + random_id("", 12))
    csrf = await sign_in(api, ADMIN_TOKEN)
    answer = await post_form(api, f"/admin/stripe-events/{early['id']}/replay", {"csrf": csrf})
    assert answer.status == 303, await answer.text()
    async with db_engine.begin() as conn:  # as the inbox's prune deletes it
        await conn.execute(text("DELETE FROM stripe_events WHERE event_id = :e"), {"e": early["id"]})

    shown = await api.get(f"/admin/stripe-events/{early['id']}")
    page = await shown.text()
    assert shown.status == 404 and "STRIPE_EVENT_RETENTION_DAYS" in page
    assert (
        f"Stripe event {early['id']} ({early['type']}) replayed"
        in page.partition("<h2>Console actions</h2>")[2]
    )
    never = await api.get(f"/admin/stripe-events/evt_{random_id('', 14)}")
    assert never.status == 404 and "Console actions" not in await never.text()


async def test_a_replay_sent_again_after_it_was_applied_lands_on_the_event_page(
    api: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """Found in review: the replay's NOTIFY wakes the inbox, which applies the event within milliseconds,
    so the second POST of a double-clicked Replay found it applied and answered the API's JSON 409."""
    name = unique_name("twice")
    customer_id = customer_id_for(name)
    early = await unmatched_event(api, customer_id)
    customers.create(name, customerId=customer_id, billing={"mode": "stripe"})
    await eventually(lambda: api.app[DIRECTORY].by_name(name), message="the Customer in the directory")
    await sign_in(api, ADMIN_TOKEN)
    page = f"/admin/stripe-events/{early['id']}"
    form = await replay_form(api, early["id"])
    first = await post_form(api, f"{page}/replay", form)
    assert (first.status, first.headers["Location"]) == (303, f"{page}?done=replay")

    async def applied() -> bool:
        return await event_state(db_engine, early["id"]) == ("applied", 0)

    await eventually(applied, message="the replay applied")
    again = await post_form(api, f"{page}/replay", form)
    assert (again.status, again.headers.get("Location")) == (303, f"{page}?done=replay-sent-again"), (
        await again.text()
    )
    shown = await (await api.get(again.headers["Location"])).text()
    assert "Not replayed again: this event was replayed after the page" in shown
    assert 'data-result="applied"' in shown
    async with db_engine.connect() as connection:
        replays = await connection.scalars(
            select(ConsoleAction.id).where(ConsoleAction.target == early["id"])
        )
        assert len(replays.all()) == 1
    assert await event_state(db_engine, early["id"]) == ("applied", 0)


NOTICE_COUNTS = re.compile(r"<li>pending (\d+)</li><li>dead (\d+)</li>")


async def notice_counts(api: TestClient[Any, Any]) -> tuple[int, int]:
    """The overview's Notices card: (pending, dead)."""
    found = NOTICE_COUNTS.search(await (await api.get("/admin/?fragment=1")).text())
    assert found, "no Notices card"
    return int(found.group(1)), int(found.group(2))


async def test_overview_counts_one_pending_notice_once(
    api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: the Notices card counted deliveries, so one notice to email, the customer's
    webhook and the platform read "pending 3"."""
    await sign_in(api, ADMIN_TOKEN)
    later = datetime.now(UTC) + timedelta(days=1)  # not due: no sender takes them meanwhile
    notices = {
        "waiting": ("pending", "pending", "pending"),
        "given up": ("dead", "dead", "sent"),
        "partly given up": ("pending", "dead", "sent"),
    }

    async def deliveries_of_others(ours: Sequence[int] = ()) -> set[tuple[int, str, str]]:
        async with db_engine.connect() as connection:
            rows = await connection.execute(
                select(NoticeDelivery.notice_id, NoticeDelivery.channel, NoticeDelivery.status).where(
                    NoticeDelivery.notice_id.not_in(ours)
                )
            )
            return {(row[0], row[1], row[2]) for row in rows}

    async def counted_change() -> tuple[int, int] | None:
        """The card's change over our three notices; None when another notice was written or changed
        state meanwhile (the session operator's for an earlier test's short trial), which the card
        counts too."""
        others = await deliveries_of_others()
        before = await notice_counts(api)
        ours = []
        async with db_engine.begin() as connection:
            for subject, states in notices.items():
                notice_id = (
                    await connection.execute(
                        Notice.__table__.insert()
                        .values(
                            key=random_id("test:"),
                            kind="license.suspended",
                            customer_id="cust_" + random_id("", 12),
                            customer_name=unique_name("noticed"),
                            subject=subject,
                            facts={},
                        )
                        .returning(Notice.id)
                    )
                ).scalar_one()
                ours.append(notice_id)
                await connection.execute(
                    NoticeDelivery.__table__.insert(),
                    [
                        {
                            "notice_id": notice_id,
                            "channel": channel,
                            "target": f"{channel}-target",
                            "message_id": random_id("msg-", 32),
                            "status": state,
                            "next_attempt_at": later,
                        }
                        for channel, state in zip(("email", "webhook", "platform"), states, strict=True)
                    ],
                )
        after = await notice_counts(api)
        if await deliveries_of_others(ours) != others:
            return None
        return after[0] - before[0], after[1] - before[1]

    # A notice is pending while a delivery is, and dead once one is: the last one is both.
    assert await eventually(counted_change, within=30, message="no other notice meanwhile") == (2, 2)


async def test_the_overview_lists_a_subscription_still_billing_a_deleted_customer_and_not_a_held_one(
    api: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """Found in review: a Customer deleted with its subscription open (a GitOps prune at night) left a
    Warning Event the API server dropped within the hour, and Stripe billed on with nothing to say so."""
    gone, held = "cust_" + random_id("", 12), unique_name("held")
    held_id = customer_id_for(held)
    customers.create(held, customerId=held_id, billing={"mode": "stripe"})
    gone_subscription, held_subscription = (f"sub_{random_id('', 14)}" for _ in range(2))
    ours = {gone_subscription: gone, held_subscription: held_id}
    async with db_engine.begin() as connection:
        await connection.execute(
            Subscription.__table__.insert(),
            [
                {
                    "customer_id": customer_id,
                    "stripe_subscription_id": subscription_id,
                    "status": "active",
                    "plan": "starter",
                    "cancel_at_period_end": False,
                    "last_event_created": 1,
                }
                for subscription_id, customer_id in ours.items()
            ],
        )
    try:
        await sign_in(api, ADMIN_TOKEN)
        page = await (await api.get("/admin/?fragment=1")).text()
        listed = re.findall(r'<tr data-subscription="([^"]+)"><td>([^<]*)</td>', page)
        assert [(s, c) for s, c in listed if s in ours] == [(gone_subscription, gone)]
        assert f"&#34;subscription_id&#34;: &#34;{gone_subscription}&#34;" in page
    finally:
        async with db_engine.begin() as connection:
            await connection.execute(
                Subscription.__table__.delete().where(Subscription.stripe_subscription_id.in_(list(ours)))
            )


async def test_the_stripe_events_list_says_or_pages_past_200(
    api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: the list stopped at 200 events, with no count and no way to older ones, while
    the overview could say "unmatched 250"."""
    event_type = f"test.paging.{random_id('', 12)}"
    ids = [f"evt_{event_type[-12:]}_{index:03}" for index in range(250)]
    async with db_engine.begin() as connection:
        await connection.execute(
            StripeEvent.__table__.insert(),
            [
                {"event_id": event_id, "type": event_type, "created": index, "result": "unmatched"}
                for index, event_id in enumerate(ids)
            ],
        )
    await sign_in(api, ADMIN_TOKEN)
    shown: list[str] = []
    path = f"/admin/stripe-events?result=unmatched&type={event_type}"
    while path:
        page = await (await api.get(path)).text()
        listed = re.findall(rf"<code>(evt_{event_type[-12:]}_\d+)</code>", page)
        assert "250 events, newest first" in page, f"{path} lists {len(listed)} and does not count 250"
        shown += listed
        older = re.search(r'<a href="([^"]+)">older</a>', page)
        path = "/admin/stripe-events" + older.group(1).replace("&amp;", "&") if older else ""
    assert sorted(shown) == ids and len(shown) == 250


def event_ids_on(page: str, marker: str) -> list[str]:
    """The ids of the test's events (their ids hold `marker`) a Stripe events page lists, in its order."""
    return re.findall(rf"<code>(evt_{marker}_\d+)</code>", page)


async def test_the_stripe_events_pages_go_on_from_the_last_event_shown(
    api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: the list paged by offset, so replaying events of page 1 of ?result=unmatched took
    them out of the filter and page 2 skipped as many rows, and events received meanwhile made it repeat
    rows. The older link goes on after the last event shown, by (received_at, event_id)."""
    marker = random_id("", 12)
    customer_id = f"cust_{marker}"
    ids = [f"evt_{marker}_{index:03}" for index in range(130)]
    start = datetime.now(UTC) - timedelta(hours=1)

    async def receive(event_ids: Sequence[str], at: datetime) -> None:
        # Three to a moment, received together (one transaction's received_at): the id orders them.
        async with db_engine.begin() as connection:
            await connection.execute(
                StripeEvent.__table__.insert(),
                [
                    {
                        "event_id": event_id,
                        "type": "customer.subscription.updated",
                        "created": index,
                        "customer_id": customer_id,
                        "result": "unmatched",
                        "received_at": at + timedelta(microseconds=index // 3),
                    }
                    for index, event_id in enumerate(event_ids)
                ],
            )

    await receive(ids, start)
    newest_first = sorted(ids, key=lambda event_id: (int(event_id[-3:]) // 3, event_id), reverse=True)
    await sign_in(api, ADMIN_TOKEN)
    path = f"/admin/stripe-events?result=unmatched&customer={customer_id}"
    page = await (await api.get(path)).text()
    read = event_ids_on(page, marker)
    assert read == newest_first[:50], page
    # Meanwhile ten of page 1 are replayed (no longer unmatched), and five more events arrive.
    async with db_engine.begin() as connection:
        await connection.execute(
            StripeEvent.__table__.update()
            .where(StripeEvent.event_id.in_(read[:10]))
            .values(result="pending", attempts=0)
        )
    arrived = [f"evt_{marker}_{index:03}" for index in range(900, 905)]
    await receive(arrived, datetime.now(UTC))
    while older := re.search(r'<a href="([^"]+)">older</a>', page):
        page = await (await api.get("/admin/stripe-events" + html.unescape(older.group(1)))).text()
        read += event_ids_on(page, marker)
    assert read == newest_first, "each event once, in order, on the pages after the first"

    # Back from the oldest page, newer after newer, to the newest page: every event unmatched now.
    unmatched = set(newest_first[10:]) | set(arrived)
    seen = set(event_ids_on(page, marker))
    while newer := re.search(r'<a href="([^"]+)">newer</a>', page):
        page = await (await api.get("/admin/stripe-events" + html.unescape(newer.group(1)))).text()
        seen |= set(event_ids_on(page, marker))
    assert seen == unmatched
    assert event_ids_on(page, marker) == event_ids_on(await (await api.get(path)).text(), marker)
    # A value no link gave is a 400 naming the parameter.
    for field, value in (("before", "bogus"), ("after", "eA"), ("before", "MjAyNi0wMy0wMVQwMDowMCwx")):
        answer = await api.get(f"{path}&{field}={value}", allow_redirects=False)
        assert answer.status == 400, (field, value)
        assert f'<p class="error" role="alert">{field}: ' in await answer.text(), (field, value)


# Each capped list of the customer page: its Older link's parameter, how many rows a page shows, and
# the pattern of one of the test's rows as the page shows it (its index).
CUSTOMER_LISTS = {
    "history_before": (20, re.compile(r"<code>hist(\d{3})")),
    "notices_before": (20, re.compile(r"paged notice (\d{3})")),
    "actions_before": (50, re.compile(r"paged action (\d{3})")),
}


async def write_list_rows(
    engine: AsyncEngine, customer_id: str, name: str, index: int, at: datetime | None
) -> dict[str, int]:
    """A licence history row, a notice and a console action of the Customer, marked `index`, written at
    `at` (None: now, as the server writes them); the id of each by its list's parameter."""
    when = {} if at is None else {"generated_at": at}
    async with engine.begin() as connection:
        history = (
            await connection.execute(
                LicenseHistory.__table__.insert()
                .values(
                    customer_id=customer_id,
                    action="renewed",
                    plan="starter",
                    max_devices=10,
                    license_hash="0" * 64,
                    jti=f"hist{index:03}-{random_id('', 12)}",
                    kid="test",
                    issued_at=datetime.now(UTC),
                    expires_at=datetime.now(UTC) + timedelta(days=30),
                    features={},
                    limits={},
                    metadata={},
                    **when,
                )
                .returning(LicenseHistory.id)
            )
        ).scalar_one()
        notice = (
            await connection.execute(
                Notice.__table__.insert()
                .values(
                    key=random_id("test:"),
                    kind="license.suspended",
                    customer_id=customer_id,
                    customer_name=name,
                    subject=f"paged notice {index:03}",
                    facts={},
                    **({} if at is None else {"created_at": at}),
                )
                .returning(Notice.id)
            )
        ).scalar_one()
        action = (
            await connection.execute(
                ConsoleAction.__table__.insert()
                .values(
                    role="admin",
                    action="reconcile",
                    customer_name=name,
                    detail=f"paged action {index:03}",
                    **({} if at is None else {"at": at}),
                )
                .returning(ConsoleAction.id)
            )
        ).scalar_one()
    return {"history_before": history, "notices_before": notice, "actions_before": action}


async def test_the_customer_page_s_capped_lists_page_back_to_their_first_row(
    api: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """Found in review: the customer page showed the newest 20 licence history rows, 20 notices and 50
    console actions with no way to older ones, so what happened to a customer months ago could not be
    read there. Each list's older link goes on after its last row by (time, id): rows written while a
    person pages neither repeat a row nor skip one, rows of one moment included."""
    name = unique_name("paged")
    customer_id = customer_id_for(name)
    created = customers.create(name, customerId=customer_id)
    born = datetime.fromisoformat(created["metadata"]["creationTimestamp"])
    # Written out of time order (ids do not follow the times), three rows to a moment; after the
    # Customer's creation (its actions since then are its own), before now.
    written = [(step * 37) % 130 for step in range(130)]
    place: dict[str, dict[int, tuple[datetime, int]]] = {field: {} for field in CUSTOMER_LISTS}
    for index in written:
        at = born + timedelta(microseconds=index // 3)
        for field, row_id in (await write_list_rows(db_engine, customer_id, name, index, at)).items():
            place[field][index] = (at, row_id)
    await sign_in(api, ADMIN_TOKEN)

    first = await api.get(f"/admin/customers/{name}")
    assert first.status == 200
    first_page = await first.text()
    # Rows written after the first page are newer than every page after it: none of them is listed.
    await write_list_rows(db_engine, customer_id, name, 999, None)
    for field, (shown, row) in CUSTOMER_LISTS.items():
        expected = sorted(place[field], key=lambda index: place[field][index], reverse=True)
        page, pages = first_page, 0
        read: list[int] = []
        while True:
            listed = [int(found) for found in row.findall(page)]
            # At most a page's rows of ours: the session operator's licence of the Customer is its own.
            assert 0 < len(listed) <= shown, (field, pages, listed)
            read += listed
            pages += 1
            # The list's own older link: the others' keep its place, its own names its position last.
            older = re.search(rf'<a href="(\?(?:[^"]*&amp;)?{field}=[^"&]+)">older</a>', page)
            if older is None:
                break
            answer = await api.get(f"/admin/customers/{name}" + older.group(1).replace("&amp;", "&"))
            page = await answer.text()
            assert answer.status == 200, (field, page)
        assert read == expected, field
        assert pages >= -(-len(expected) // shown), field

    # A value no older link gave is a 400 naming the parameter, as the Stripe events page's filters.
    for field in CUSTOMER_LISTS:
        for value in ("bogus", "MjAyNi0wMy0wMVQwMDowMDowMCswMDowMCwx=", "eA", "%00"):
            answer = await api.get(f"/admin/customers/{name}?{field}={value}", allow_redirects=False)
            page = await answer.text()
            assert (answer.status, answer.content_type) == (400, "text/html"), (field, value, page)
            assert f'<p class="error" role="alert">{field}: ' in page, (field, value, page)


async def refreshed(page: Any, times: int = 1) -> None:
    """The page's refresh answered `times` times more, each answer's swap made or not: console.js counts
    the answers it handled in #main's data-refreshed once it swapped one in or left it."""
    count = "() => Number(document.getElementById('main').dataset.refreshed || 0)"
    handled = await page.evaluate(count)
    await page.wait_for_function(f"n => ({count})() >= n", arg=handled + times)


async def test_a_refreshing_page_keeps_the_reader_s_place_and_leaves_once_the_session_ends(
    quick_console: TestClient[Any, Any], tmp_path: Path
) -> None:
    """Found in review: the 2 s refresh put a Stripe event's payload box back to its top while someone
    read it, took a button reached with the keyboard from under them, and once the session ended put the
    sign-in page inside the old page, under a header still offering its actions; and (a review of the
    fix) a link a mouse clicked, keeping the focus, stopped the refresh for good."""
    early = await unmatched_event(quick_console, customer_id_for(unique_name("reader")))

    async with console_page(base_url(quick_console), tmp_path) as page:
        await browser_sign_in(page, ADMIN_TOKEN)
        # A link the mouse clicked keeps the focus (one opened in a new tab): the page goes on refreshing.
        # The link is marked as it takes the focus: at 0.2 s, a refresh between marking it and the click (or
        # between the click and a look at the focus) could put another link in its place.
        pending = "#main a[href='/admin/stripe-events?result=pending']"
        await page.evaluate(
            """pending => document.addEventListener("focusin", event => {
                if (!event.target.matches(pending)) { return; }
                event.target.dataset.shown = "before";
                window.clicked = true;
            })""",
            pending,
        )
        await page.locator(pending).click(button="right")
        assert await page.evaluate("window.clicked === true")
        await expect(page.locator("#main a[data-shown]")).to_have_count(0)

        await page.goto(f"/admin/stripe-events/{early['id']}")
        payload = page.locator("pre.payload")
        # Scrolled in the page itself, the box there at that moment: a refresh that swapped it between
        # finding the box and scrolling it left a detached box that scrolls nowhere.
        await page.wait_for_function(
            """() => {
                const box = document.querySelector("pre.payload");
                box.scrollTop = 120;
                box.dataset.shown = "before";
                return box.isConnected && box.scrollTop === 120;
            }"""
        )
        await expect(page.locator("pre.payload[data-shown]")).to_have_count(0)  # swapped
        assert await payload.evaluate("box => box.scrollTop") == 120

        replay = page.locator("button:has-text('Replay')")
        await replay.evaluate("button => { button.dataset.shown = 'before'; button.focus(); }")
        await refreshed(page, times=2)
        assert (
            await replay.evaluate(
                "button => button.dataset.shown + ':' + (document.activeElement === button)"
            )
            == "before:true"
        )
        await replay.blur()
        await expect(page.locator("main button[data-shown]")).to_have_count(0)

        # Text selected to copy (the event's id, say) stays selected.
        await payload.evaluate(
            "box => { box.dataset.shown = 'before'; getSelection().selectAllChildren(box); }"
        )
        await refreshed(page, times=2)
        assert await payload.evaluate(
            "box => box.dataset.shown + ':' + (getSelection().toString() !== '')"
        ) == ("before:true")
        await payload.evaluate("box => getSelection().removeAllRanges()")
        await expect(page.locator("pre.payload[data-shown]")).to_have_count(0)

        await page.context.clear_cookies()
        # The sign-in page, returning to this one.
        await page.wait_for_url(f"**/admin/login?next=%2Fadmin%2Fstripe-events%2F{early['id']}")
        assert await page.locator("main").count() == 1
        await page.screenshot(path=tmp_path / "signed-out-by-refresh.png", full_page=True)


@asynccontextmanager
async def customer_page(
    console: TestClient[Any, Any], customers: Customers, name: str, shots: Path, **page: Any
) -> AsyncIterator[Any]:
    """Customer `name` made, and its console page opened by an admin signed in (console_page's checks)."""
    customers.create(name, customerId=customer_id_for(name))
    async with console_page(base_url(console), shots, **page) as opened:
        await browser_sign_in(opened, ADMIN_TOKEN)
        await opened.goto(f"/admin/customers/{name}")
        yield opened


async def test_a_reason_typed_and_left_is_kept_by_the_refresh(
    quick_console: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: the 2 s refresh waits while a form has the focus, so a Revoke reason half typed
    was wiped once the focus left its field (a click elsewhere on the page, to read it)."""
    name = unique_name("typed")
    async with customer_page(quick_console, customers, name, tmp_path) as page:
        reason = page.locator("input[name=reason]")
        await reason.fill("chargeback on inv")
        await page.locator("#main h1").evaluate("title => { title.dataset.shown = 'before'; }")
        await page.locator("#main h1").click()  # the focus leaves the field
        assert await reason.evaluate("field => document.activeElement !== field")
        await refreshed(page, times=2)
        assert await reason.input_value() == "chargeback on inv"
        await expect(page.locator("#main h1[data-shown]")).to_have_count(1)
        # Back to what the page showed: it refreshes again.
        await reason.fill("")
        await page.locator("#main h1").click()
        await expect(page.locator("#main h1[data-shown]")).to_have_count(0)


async def test_a_refreshing_page_with_nothing_new_keeps_its_nodes_and_a_pressed_link(
    quick_console: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: the refresh replaced the content on every answer, as its "Updated 14:02:11 UTC"
    always differs, so a screen reader's place, the browser's find and a selection went every 2 s; and a
    click on a link was lost when a swap came between the press of the mouse button and its release."""
    name = unique_name("still")
    async with customer_page(quick_console, customers, name, tmp_path) as page:
        # A mark that is no attribute (an attribute is a change the refresh puts right): a node replaced
        # loses it.
        title = page.locator("#main h1")
        await title.evaluate("title => { title.kept = true; }")
        clock = page.locator("#main p.updated")
        shown = await clock.inner_text()
        await expect(clock).not_to_have_text(shown)  # the clock goes on, in place
        assert await title.evaluate("title => title.kept === true")

        await page.goto("/admin/")
        pending = page.locator("#main a[href='/admin/stripe-events?result=pending']")
        await pending.hover()
        await page.mouse.down()
        # A change for a swap to put right, while the button is down.
        await pending.evaluate("link => { link.dataset.shown = 'before'; }")
        await refreshed(page, times=2)
        await page.mouse.up()
        await page.wait_for_url("**/admin/stripe-events?result=pending", timeout=5_000)


async def test_live_updates_pause_for_the_tab_until_pressed_again(
    quick_console: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: WCAG 2.2.2, which the refresh cites, asks for a way to pause the updates; there
    was none."""
    name = unique_name("paused")
    customers.create(name, customerId=customer_id_for(name))
    path = f"/admin/customers/{name}"
    count = "() => document.getElementById('main').dataset.refreshed || '0'"
    async with console_page(base_url(quick_console), tmp_path) as page:
        await browser_sign_in(page, ADMIN_TOKEN)
        await page.goto(path)
        toggle = page.get_by_role("button", name="Pause live updates")
        await expect(toggle).to_have_attribute("aria-pressed", "false")
        await toggle.focus()
        await page.keyboard.press("Space")
        await expect(toggle).to_have_attribute("aria-pressed", "true")
        await page.screenshot(path=tmp_path / "paused.png", full_page=True)
        # Another tab of the page is not paused: its refreshes tell the time that passes meanwhile.
        witness = await page.context.new_page()
        await witness.goto(path)
        await refreshed(witness)
        await page.locator("#main h1").evaluate("title => { title.dataset.shown = 'before'; }")
        before = (await page.evaluate(count), await page.locator("#main p.updated").inner_text())
        await refreshed(witness, times=5)
        assert (await page.evaluate(count), await page.locator("#main p.updated").inner_text()) == before
        await expect(page.locator("#main h1[data-shown]")).to_have_count(1)

        # Kept for the tab: its pages open paused.
        await page.reload()
        await expect(toggle).to_have_attribute("aria-pressed", "true")
        await refreshed(witness, times=5)
        assert await page.evaluate(count) == "0"

        await toggle.click()
        await expect(toggle).to_have_attribute("aria-pressed", "false")
        await refreshed(page)
        await witness.close()


async def sign_in_elsewhere(page: Any) -> None:
    """Signed in again in another tab of the page's browser, which then closes."""
    other = await page.context.new_page()
    await browser_sign_in(other, ADMIN_TOKEN)
    await other.close()


async def suspend_from(page: Any) -> None:
    """The Customer page's Suspend, its confirmation ticked, and the banner that says it was done."""
    await page.check("form[action$='/suspend'] input[name=confirm]")
    await page.click("button:has-text('Suspend')")
    await expect(page.locator("p.done[role=status]")).to_have_text("Customer suspended.")


async def test_a_form_held_when_the_session_ends_is_kept_and_sent_once_signed_in_again(
    quick_console: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: once the session ended, the refresh reloaded the page at once (the sign-in page),
    throwing away a Revoke reason half typed."""
    name = unique_name("held")
    async with customer_page(quick_console, customers, name, tmp_path) as page:
        reason = page.locator("input[name=reason]")
        await reason.fill("chargeback on inv")
        await page.context.clear_cookies()
        notice = page.locator("body > p[role=alert]")
        await expect(notice).to_have_text(
            "Your session has ended: sign in again in another tab, then submit."
        )
        await page.screenshot(path=tmp_path / "session-ended.png", full_page=True)
        assert page.url.endswith(f"/admin/customers/{name}")
        assert await reason.input_value() == "chargeback on inv"

        await sign_in_elsewhere(page)
        # The page's forms take the new session's CSRF token: sent with the old one, they were refused.
        await expect(notice).to_have_text("Signed in again: you may submit.")
        assert await reason.input_value() == "chargeback on inv"
        await suspend_from(page)
    assert (customers.get(name) or {})["spec"]["suspended"] is True


async def test_a_form_kept_through_a_sign_in_its_page_never_saw_end_takes_the_new_session_s_token(
    quick_console: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: the new session's CSRF token went to the forms only after the page itself saw the
    session end, and a paused page (or a background tab, whose timer runs once a minute) signed in again
    elsewhere before its next update never did: its forms were refused as not this session's."""
    name = unique_name("resigned")
    async with customer_page(quick_console, customers, name, tmp_path) as page:
        toggle = page.get_by_role("button", name="Pause live updates")
        await toggle.click()
        await expect(toggle).to_have_attribute("aria-pressed", "true")
        reason = page.locator("input[name=reason]")
        await reason.fill("chargeback on inv")
        await page.context.clear_cookies()
        await sign_in_elsewhere(page)
        await toggle.click()
        await refreshed(page)
        assert await reason.input_value() == "chargeback on inv"
        await suspend_from(page)
    assert (customers.get(name) or {})["spec"]["suspended"] is True


async def test_a_confirmation_ticked_and_left_is_not_unticked_by_an_update(
    quick_console: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: a form being filled counted only text typed, not a box ticked, so Suspend's
    confirmation ticked and left (the focus elsewhere, as Safari leaves it) was taken away by the next
    update that changed more than texts."""
    name = unique_name("ticked")
    async with customer_page(quick_console, customers, name, tmp_path) as page:
        confirm = page.locator("form[action$='/suspend'] input[name=confirm]")
        await confirm.check()
        await page.evaluate("() => document.activeElement.blur()")
        # Suspended meanwhile (another admin): the page's actions change, not only its texts.
        customers.objects.patch_cluster_custom_object(
            "iotistic.io", "v1alpha1", "customers", name, {"spec": {"suspended": True}}
        )
        await refreshed(page, times=3)
        assert await confirm.count() == 1 and await confirm.is_checked()


async def test_a_form_held_on_a_page_that_is_gone_stays_and_says_so(
    quick_console: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: while someone typed in it, a page whose Customer was deleted answered 404 at each
    update and said nothing, showing the old Customer until its form was sent."""
    name = unique_name("gone")
    # Each update of the page gone is a 404, which the browser's console reports.
    async with customer_page(quick_console, customers, name, tmp_path, expected=("404 (Not Found)",)) as page:
        reason = page.locator("input[name=reason]")
        await reason.fill("chargeback on inv")
        customers.delete(name)
        notice = page.locator("body > p[role=alert]")
        await expect(notice).to_contain_text("This page is gone", timeout=60_000)
        assert page.url.endswith(f"/admin/customers/{name}")
        assert await reason.input_value() == "chargeback on inv"


async def test_an_action_s_banner_is_not_said_again_by_a_reload(
    quick_console: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: the banner's code stayed in the address (`?done=suspend`), so a reload or a link
    copied from the address bar said "Customer suspended." again, out of its moment."""
    name = unique_name("banner")
    async with customer_page(quick_console, customers, name, tmp_path) as page:
        await suspend_from(page)
        await page.wait_for_url(re.compile(rf"/admin/customers/{name}$"), timeout=5_000)
        await page.reload()
        await expect(page.locator("#main h1")).to_contain_text(name)
        await expect(page.locator("p.done")).to_have_count(0)


async def test_a_link_from_another_site_opens_the_page_it_names(
    api: TestClient[Any, Any], customers: Customers, tmp_path: Path
) -> None:
    """Found in review: the session cookie was SameSite=Strict, so a support engineer following a link
    to a Customer's page from a ticket or a chat was sent to sign in, signed in, and landed on the
    overview instead of the page."""
    name = unique_name("linked")
    customers.create(name, customerId=customer_id_for(name))
    target = f"{base_url(api)}/admin/customers/{name}"
    async with console_page(base_url(api), tmp_path) as page:
        # A ticket on another site, linking to the Customer's page.
        await page.route(
            "http://tickets.example/**",
            lambda route: route.fulfill(content_type="text/html", body=f'<a href="{target}">{name}</a>'),
        )
        await page.goto("http://tickets.example/ISSUE-1")
        await page.click(f"text={name}")
        await page.wait_for_url("**/admin/login?next=*")
        await page.fill("#token", ADMIN_TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_url(target)
        await expect(page.locator("#main h1")).to_contain_text(name)
        # Signed in, the link opens the page at once.
        await page.goto("http://tickets.example/ISSUE-1")
        await page.click(f"text={name}")
        await page.wait_for_url(target)
        await expect(page.locator("#main h1")).to_contain_text(name)


async def test_revoking_a_licence_revoked_already_says_so_and_records_nothing(
    console: TestClient[Any, Any], customers: Customers, db_engine: AsyncEngine
) -> None:
    """Found in review: revoking a Customer whose licence was revoked already (a double click; or again,
    with another reason, once the operator had issued the unlicensed licence) said "Licence revoked and
    Customer suspended.", and its audit row and Event "licence X revoked (fraud)", while nothing was
    recorded: the licence history and the customer's notice kept the first reason."""
    name = unique_name("twice")
    customer_id = customer_id_for(name)
    created = customers.create(name, customerId=customer_id)
    jti = await eventually(lambda: licence_jti(customers, name), message="licence")
    await sign_in(console, ADMIN_TOKEN)
    page = f"/admin/customers/{name}"
    form = await form_fields(console, page, f"{page}/revoke")
    first = await post_form(console, f"{page}/revoke", {**form, "reason": "chargeback"})
    assert (first.status, first.headers["Location"]) == (303, f"{page}?done=revoke"), await first.text()
    # A double click: the same form again, at once.
    double = await post_form(console, f"{page}/revoke", {**form, "reason": "chargeback"})
    assert (double.status, double.headers["Location"]) == (303, f"{page}?done=already-revoked")
    # Again with another reason, once the operator has issued the unlicensed licence.
    await eventually(
        lambda: (found := licence_jti(customers, name)) is not None and found != jti, message="unlicensed"
    )
    form = await form_fields(console, page, f"{page}/revoke")
    again = await post_form(console, f"{page}/revoke", {**form, "reason": "fraud"})
    assert (again.status, again.headers["Location"]) == (303, f"{page}?done=already-revoked")
    shown = await (await console.get(again.headers["Location"])).text()
    assert '<p class="done" role="status">Already revoked: nothing sent.' in shown, shown

    async with db_engine.connect() as connection:
        history = await connection.scalars(
            select(LicenseHistory.metadata_).where(
                LicenseHistory.customer_id == customer_id, LicenseHistory.action == "revoked"
            )
        )
        assert history.all() == [{"reason": "chargeback", "by": "console"}]
        notices = await connection.scalars(
            select(Notice.facts).where(Notice.customer_id == customer_id, Notice.kind == "license.revoked")
        )
        assert [facts["reason"] for facts in notices.all()] == ["chargeback"]
        actions = await connection.execute(
            select(ConsoleAction.action, ConsoleAction.detail)
            .where(ConsoleAction.customer_name == name)
            .order_by(ConsoleAction.id)
        )
        rows = actions.all()
    assert [row[0] for row in rows] == ["revoke", "already-revoked", "already-revoked"], rows
    assert f"already revoked (licence {jti}): nothing sent" in rows[2][1] and "fraud" in rows[2][1], rows
    events = await console.app[KUBE].list_customer_events(name, created["metadata"]["uid"])
    told = sorted(
        (posted["reason"], posted["message"]) for posted in events if posted["reason"].startswith("Console")
    )
    assert [reason for reason, _ in told] == [
        "ConsoleAlreadyRevoked",
        "ConsoleAlreadyRevoked",
        "ConsoleRevoke",
    ]
    assert all(f"already revoked (licence {jti}): nothing sent" in message for _, message in told[:2]), told

    # The API's revoke says the same: that licence, revoked already, nothing recorded.
    answer = await console.post(
        f"/api/licenses/{customer_id}/revoke", json={"reason": "fraud"}, headers=admin_headers()
    )
    body = await answer.json()
    assert answer.status == 200, body
    assert (body["revoked_jti"], body["already_revoked"], body["suspended"]) == (jti, True, True), body
