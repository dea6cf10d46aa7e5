"""The admin console's pure parts: charts, GitOps ownership, time for a person, sessions, the origin
check."""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import re
import time
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any
from xml.etree import ElementTree

import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from iotistic_billing.customer import LAST_APPLIED, RETRIED_FAILURE_REASONS, git_reverts
from iotistic_billing.directory import CustomerRecord, LeftBilling, UnreadableCustomer, read_customer
from iotistic_billing.operator import constants as c
from iotistic_billing.settings import load_settings
from iotistic_billing.webhook_server.console.charts import Series, running_total, svg_chart
from iotistic_billing.webhook_server.console.data import (
    InboxStats,
    Overview,
    PeriodDay,
    failing,
    gitops_manager,
    matching,
    phase_of,
    unreadable_failing,
)
from iotistic_billing.webhook_server.console.pages import (
    TEMPLATES,
    ago,
    epoch,
    pairs,
    render,
    same_origin,
    templates,
    usage_charts,
)
from iotistic_billing.webhook_server.console.session import ConsoleSession, Sessions, SignOuts
from iotistic_billing.webhook_server.context import CLOCK, OPTIONS
from iotistic_billing.webhook_server.options import ServerOptions

ADMIN = "admin-token-" + "a" * 20
VIEWER = "viewer-token-" + "b" * 20
DAY = date(2026, 12, 1)


def test_a_chart_titles_every_bar_and_marks_those_over_the_quota() -> None:
    series = Series("Peak active devices", "devices", [(DAY, 4.0), (DAY + timedelta(days=1), 12.0)], 10.0)
    svg = svg_chart(series)
    root = ElementTree.fromstring(svg)  # noqa: S314 - our own SVG; parsing proves it well-formed
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert [bar.get("class") for bar in bars] == ["bar", "bar over"]
    assert [bar.find("{http://www.w3.org/2000/svg}title").text for bar in bars] == [  # type: ignore[union-attr]
        "2026-12-01: 4 devices",
        "2026-12-02: 12 devices",
    ]
    assert "plan quota 10" in svg
    # The higher bar is the taller one, and the axis top is above the quota and the values.
    heights = [float(bar.get("height", 0)) for bar in bars]
    assert heights[1] > heights[0] > 0


def test_a_chart_escapes_its_words() -> None:
    svg = svg_chart(Series("<script>", "a&b", [(DAY, 1.0)]))
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "a&amp;b" in svg


def test_a_period_total_is_kept_on_every_day_of_the_period() -> None:
    days = [DAY + timedelta(days=offset) for offset in range(4)]
    points = [(DAY, 1.0), (DAY + timedelta(days=2), 2.0)]
    assert running_total(points, days) == [(days[0], 1.0), (days[1], 1.0), (days[2], 3.0), (days[3], 3.0)]


def bars(svg: str) -> list[tuple[str, str]]:
    """(class, title) of every bar of a chart."""
    root = ElementTree.fromstring(svg)  # noqa: S314 - our own SVG
    return [
        (bar.get("class", ""), bar.findtext("{http://www.w3.org/2000/svg}title", ""))
        for bar in root.iter("{http://www.w3.org/2000/svg}rect")
    ]


def test_on_the_last_day_of_a_31_day_period_its_charts_still_start_at_its_first_day() -> None:
    """Found in review: the period charts drew the 31-day window, which on a 31-day period's last day
    no longer holds its first, and counted the first day from midnight."""
    start = datetime(2026, 5, 15, 13, 42, tzinfo=UTC)  # May has 31 days: the period ends June 15, 13:42
    now = datetime(2026, 6, 15, 9, 0, tzinfo=UTC)
    window = [date(2026, 5, 16) + timedelta(days=offset) for offset in range(31)]
    history = SimpleNamespace(
        daily=[
            SimpleNamespace(
                date=day,
                mqtt_bytes=0,
                http_bytes=0,
                http_requests=0,
                peak_active_devices=1,
                postgres_size_mb=None,
                device_hours=0,
            )
            for day in window
        ],
        billing_period=SimpleNamespace(
            period_start=start,
            period_end=datetime(2026, 6, 15, 13, 42, tzinfo=UTC),
            included=SimpleNamespace(devices=10, traffic_gb=1, storage_gb=1, api_calls=1000),
        ),
    )
    counted = [
        PeriodDay(date(2026, 5, 15), traffic_bytes=200_000_000, api_calls=900),
        PeriodDay(date(2026, 6, 15), traffic_bytes=850_000_000, api_calls=50),
    ]
    traffic, calls = (bars(chart) for chart in usage_charts(history, counted, now)[1:3])
    assert len(traffic) == len(calls) == 32  # May 15 to June 15
    assert traffic[0] == ("bar", "2026-05-15 from 13:42 UTC: 200 MB")
    assert traffic[1] == ("bar", "2026-05-16: 200 MB")
    assert traffic[-1] == ("bar over", "2026-06-15: 1,050 MB")
    assert (calls[0], calls[-1]) == (
        ("bar", "2026-05-15 from 13:42 UTC: 900 calls"),
        ("bar", "2026-06-15: 950 calls"),
    )


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (
            {"labels": {"kustomize.toolkit.fluxcd.io/name": "tenants"}},
            "kustomize.toolkit.fluxcd.io/name=tenants",
        ),
        (
            {"managedFields": [{"manager": "argocd-controller", "fieldsV1": {"f:spec": {}}}]},
            "argocd-controller",
        ),
        ({"managedFields": [{"manager": "kubectl-client-side-apply", "fieldsV1": {"f:spec": {}}}]}, None),
        ({"managedFields": [{"manager": "iotistic-console", "fieldsV1": {"f:spec": {}}}]}, None),
        # A controller that writes only the status does not own the spec.
        ({"managedFields": [{"manager": "flux", "fieldsV1": {"f:status": {}}}]}, None),
        ({}, None),
    ],
)
def test_gitops_ownership_is_read_from_labels_and_field_managers(
    metadata: dict[str, object], expected: str | None
) -> None:
    assert gitops_manager({"metadata": metadata}) == expected


def owning(manager: str, *fields: str, operation: str = "Apply") -> dict[str, object]:
    """A managedFields entry of `manager` owning spec.`fields`."""
    spec = {f"f:{field}": {} for field in fields}
    return {"manager": manager, "operation": operation, "fieldsV1": {"f:spec": spec}}


FLUX = {"kustomize.toolkit.fluxcd.io/name": "tenants"}
APPLIED_SUSPENDED = {LAST_APPLIED: json.dumps({"spec": {"email": "ops@acme.example", "suspended": False}})}


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"managedFields": [owning("kustomize-controller", "email", "suspended")]}, "kustomize-controller"),
        ({"labels": FLUX, "managedFields": [owning("kustomize-controller", "email")]}, None),
        (
            {"managedFields": [owning("argocd-controller", "suspended", operation="Update")]},
            "argocd-controller",
        ),
        # Argo CD's client-side apply: what Git sets is in the annotation it diffs on, owned or not.
        (
            {"annotations": APPLIED_SUSPENDED, "managedFields": [owning("argocd-controller", "email")]},
            "argocd-controller",
        ),
        ({"annotations": APPLIED_SUSPENDED, "managedFields": [owning("kubectl-client-side-apply")]}, None),
        # Someone's suspension, owned by them, is not Git's.
        (
            {
                "managedFields": [
                    owning("argocd-controller", "email"),
                    owning("iotistic-console", "suspended"),
                ]
            },
            None,
        ),
        # A label alone (managedFields not read) cannot say which fields Git sets.
        ({"labels": FLUX}, "kustomize.toolkit.fluxcd.io/name=tenants"),
    ],
)
def test_git_reverts_a_spec_field_only_when_git_owns_that_field(
    metadata: dict[str, object], expected: str | None
) -> None:
    """Found in review: Git was taken to revert any spec action on a Customer it applies, but Flux's
    server-side apply and Argo CD's diff put back only the fields the Git manifest sets: a Customer whose
    manifest leaves spec.suspended out keeps a suspension, and warning otherwise cries wolf."""
    assert gitops_manager({"metadata": metadata}, "suspended") == expected


def test_the_warning_that_git_reverts_a_change_names_the_customer_the_controller_and_the_field() -> None:
    body = {"metadata": {"name": "acme", "managedFields": [owning("kustomize-controller", "plan")]}}
    assert git_reverts(body, "plan") == (
        "customer/acme's spec is managed by GitOps (kustomize-controller): Git reverts this change of"
        " spec.plan; change it in Git"
    )
    assert git_reverts(body, "suspended") is None


def test_times_read_as_a_person_says_them() -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert ago(now - timedelta(seconds=5), now) == "5 s"
    assert ago(now - timedelta(minutes=3, seconds=5), now) == "3 min"
    assert ago(now - timedelta(hours=3, minutes=20), now) == "3 h 20 min"
    assert ago(now - timedelta(days=2, hours=1), now) == "2 d 1 h"
    assert ago(None, now) == ""
    assert epoch(1796287815) == "2026-12-03 08:50:15 UTC"
    assert pairs({"isTrialMode": True, "endsAt": "2026-12-17"}) == "isTrialMode: yes, endsAt: 2026-12-17"


SESSION_KEY = "console-session-key-" + "e" * 24


def sessions(**settings: str) -> Sessions:
    return Sessions(
        load_settings(
            **{
                "admin_api_token": ADMIN,
                "admin_viewer_token": VIEWER,
                "console_session_key": SESSION_KEY,
                **settings,
            }
        )
    )


def test_a_session_is_sealed_and_read_back_only_with_its_token() -> None:
    keeper = sessions()
    viewer = keeper.sign_in(VIEWER)
    assert viewer is not None and viewer.role == "viewer" and not viewer.may_act
    admin = keeper.sign_in(ADMIN)
    assert admin is not None and admin.may_act and admin.csrf != viewer.csrf
    assert keeper.sign_in(ADMIN + "x") is None and keeper.sign_in("") is None
    sealed = keeper.seal(viewer)
    assert keeper.read(sealed) == viewer
    assert VIEWER not in sealed and viewer.csrf not in sealed  # encrypted, not only signed
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    assert keeper.read(tampered) is None
    # Another replica (the same settings) reads it.
    assert sessions().read(sealed) == viewer
    # A new viewer token ends the viewer's sessions; the admin's stay, and the other way round.
    rotated = sessions(admin_viewer_token="viewer-token-" + "c" * 20)
    assert rotated.read(sealed) is None
    assert rotated.read(keeper.seal(admin)) == admin
    rotated = sessions(admin_api_token="admin-token-" + "d" * 20)
    assert rotated.read(keeper.seal(admin)) is None
    assert rotated.read(sealed) == viewer
    # A new session key ends every session.
    assert sessions(console_session_key="another-session-key-" + "f" * 24).read(sealed) is None


def opens(cookie: str, secret: str) -> bool:
    """Whether `cookie` opens with the Fernet key HKDF derives from `secret`, as the console's once did."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"iotistic-console-session").derive(
        secret.encode()
    )
    try:
        Fernet(base64.urlsafe_b64encode(key)).decrypt(cookie.encode())
    except InvalidToken:
        return False
    return True


def test_a_viewer_s_cookie_tests_no_guess_of_the_admin_token() -> None:
    keeper = sessions()
    viewer = keeper.sign_in(VIEWER)
    assert viewer is not None
    cookie = keeper.seal(viewer)
    # A viewer holding their own cookie tries admin tokens offline: none opens it, the right one neither.
    assert not [guess for guess in ("admin-token-" + "0" * 20, ADMIN, VIEWER) if opens(cookie, guess)]
    assert opens(cookie, SESSION_KEY)  # the key of its own seals it


def test_without_a_session_key_a_process_seals_with_a_key_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(admin_api_token=ADMIN, admin_viewer_token=VIEWER)
    with caplog.at_level(logging.WARNING):
        keeper, other = Sessions(settings), Sessions(settings)
    viewer = keeper.sign_in(VIEWER)
    assert viewer is not None
    sealed = keeper.seal(viewer)
    assert keeper.read(sealed) == viewer
    assert other.read(sealed) is None  # another replica, or this one restarted
    assert not opens(sealed, ADMIN)
    assert "CONSOLE_SESSION_KEY is not set" in caplog.text


def test_a_forged_role_does_not_read() -> None:
    keeper = sessions()
    forged = ConsoleSession("admin", "csrf", "0" * 16, int(time.time()))  # a tag no token has
    assert keeper.read(keeper.seal(forged)) is None


def test_a_session_s_id_and_end_are_read_back_from_its_cookie() -> None:
    keeper = sessions()
    viewer = keeper.sign_in(VIEWER)
    assert viewer is not None
    read = keeper.read(keeper.seal(viewer))
    assert read is not None and (read.id, read.expires_at) == (viewer.id, viewer.expires_at)
    assert viewer.expires_at == datetime.fromtimestamp(viewer.issued_at + 8 * 3600, UTC)
    other = keeper.sign_in(VIEWER)
    assert other is not None and other.id != viewer.id and viewer.csrf not in viewer.id


class SignOutTable:
    """console_signouts as SignOuts reads it: rows, a count of reads, PostgreSQL up or away."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.reads = 0
        self.failure: Exception | None = None

    async def load(self) -> set[str]:
        self.reads += 1
        if self.failure is not None:
            raise self.failure
        return set(self.ids)


async def test_sign_outs_are_read_once_per_interval_and_the_last_read_stands_with_postgresql_away() -> None:
    table, now = SignOutTable(), [0.0]
    sign_outs = SignOuts(table.load, max_age=5.0, clock=lambda: now[0])
    table.ids.add("elsewhere")  # signed out on another replica
    assert await sign_outs.includes("elsewhere") and not await sign_outs.includes("open")
    assert table.reads == 1  # the second request read nothing
    sign_outs.add("here")  # this replica's own: at once
    table.ids.add("later")
    assert await sign_outs.includes("here") and not await sign_outs.includes("later")
    now[0] = 5.0
    assert await sign_outs.includes("later") and table.reads == 2
    # PostgreSQL away: the last read stands, and it is asked again only an interval later.
    table.failure = ConnectionRefusedError("PostgreSQL is away")
    now[0] = 10.0
    assert await sign_outs.includes("later") and await sign_outs.includes("elsewhere")
    assert table.reads == 3
    # Anything else is a bug, not an outage.
    table.failure = KeyError("session_id")
    now[0] = 15.0
    with pytest.raises(KeyError):
        await sign_outs.includes("later")


async def test_a_sign_out_during_a_read_is_kept_and_no_request_waits_on_a_read() -> None:
    """Found in review: a read whose SELECT ran before this replica's sign-out committed replaced the set
    and lost that sign-out until the next read; every page waited on a read in progress; and a
    PostgreSQL that never answers held them all."""
    rows, gate = {"elsewhere"}, asyncio.Event()

    async def load() -> set[str]:
        selected = set(rows)  # the SELECT, before the sign-out below commits
        await gate.wait()
        return selected

    now = [0.0]
    sign_outs = SignOuts(load, max_age=5.0, clock=lambda: now[0], timeout=0.5)
    gate.set()
    assert await sign_outs.includes("elsewhere")
    gate.clear()
    now[0] = 5.0
    reading = asyncio.create_task(sign_outs.includes("mine"))
    await asyncio.sleep(0)
    # Another page meanwhile answers from the last read, at once.
    assert await asyncio.wait_for(sign_outs.includes("elsewhere"), 0.05)
    sign_outs.add("mine")
    gate.set()
    await reading
    assert await sign_outs.includes("mine") and await sign_outs.includes("elsewhere")
    # A read that gets no answer ends at the timeout; the last read stands.
    gate.clear()
    now[0] = 10.0
    assert await asyncio.wait_for(sign_outs.includes("mine"), 2.0)
    assert await asyncio.wait_for(sign_outs.includes("elsewhere"), 0.05)  # not read again at once


async def test_a_request_cancelled_as_its_sign_out_read_ends_is_cancelled() -> None:
    """Found in review: Python 3.11's wait_for returned a read of the sign-outs that came in with the
    request's cancellation (its client gone) and dropped the cancellation, so the page went on."""
    task: asyncio.Task[bool] | None = None

    async def load() -> set[str]:
        assert task is not None
        task.cancel()  # the cancellation arrives as the read's answer does
        return {"elsewhere"}

    sign_outs = SignOuts(load, max_age=5.0, clock=lambda: 0.0)
    task = asyncio.create_task(sign_outs.includes("elsewhere"))
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task


def rollouts_page(options: ServerOptions) -> str:
    request = make_mocked_request("GET", "/admin/rollouts")
    request.app[OPTIONS] = options
    request.app[TEMPLATES] = templates()
    request.app[CLOCK] = lambda: datetime(2026, 12, 1, tzinfo=UTC)
    text = render(request, "rollouts.html.j2", rollouts=[], audit=[]).text
    assert text is not None
    return text


def test_a_refreshing_page_refreshes_at_the_server_s_interval() -> None:
    """Found in review: every refreshing page said data-refresh="2000" in its own template, so the browser
    tests of the refresh waited a real 2 s for each one."""
    assert '<main id="main" data-refresh="2000">' in rollouts_page(ServerOptions())
    assert '<main id="main" data-refresh="200">' in rollouts_page(ServerOptions(console_refresh=0.2))


def page_of(template: str, **context: Any) -> str:
    """A console page as `render` makes it for a request at 2026-02-27 00:00 UTC."""
    request = make_mocked_request("GET", "/admin/")
    request.app[OPTIONS] = ServerOptions()
    request.app[TEMPLATES] = templates()
    request.app[CLOCK] = lambda: datetime(2026, 2, 27, tzinfo=UTC)
    text = render(request, template, **context).text
    assert text is not None
    return text


def test_a_trial_s_end_given_with_an_offset_is_shown_in_utc() -> None:
    """Found in review: status.trial.endsAt keeps spec.trial.endsAt's offset, and the overview printed
    2026-03-01T02:00:00+05:00 as "2026-03-01 02:00 UTC" (it is 2026-02-28 21:00 UTC), the Customers
    list as 2026-03-01; a licence's expiry the same."""
    body = {
        "metadata": {"name": "acme", "uid": "uid-acme", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"email": "ops@acme.example", "companyName": "Acme"},
        "status": {
            "trial": {"isTrialMode": True, "endsAt": "2026-03-01T02:00:00+05:00"},
            "license": {"expiresAt": "2026-03-02T01:30:00+04:00"},
        },
    }
    record = CustomerRecord.from_body(body)
    assert record is not None and record.customer.status.trial and record.customer.status.license
    ends, expires = record.customer.status.trial.ends_at, record.customer.status.license.expires_at
    assert ends is not None and expires is not None
    summary = Overview(
        customers=1,
        phases={},
        failing=[],
        inbox=InboxStats(0, 0, 0, None),
        trials_ending=[("acme", ends)],
        licences_expiring=[("acme", expires)],
        reports_last_hour=0,
        customers_reporting=0,
        notices_pending=0,
        notices_dead=0,
    )
    overview = page_of("overview.html.j2", overview=summary, phases=[], ago=str)
    assert '<a href="/admin/customers/acme">acme</a> 2026-02-28 21:00:00 UTC</li>' in overview
    assert '<a href="/admin/customers/acme">acme</a> 2026-03-01 21:30:00 UTC</li>' in overview
    listed = page_of(
        "customers.html.j2",
        customers=[record],
        total=1,
        previous=None,
        next=None,
        search="",
        phase="",
        plan="",
        phases=[],
        plans=[],
        phase_of=phase_of,
    )
    assert "<td>2026-02-28 21:00:00 UTC</td>" in listed, listed


def overview_with(**fields: Any) -> Overview:
    return Overview(
        **{
            "customers": 0,
            "phases": {},
            "failing": [],
            "inbox": InboxStats(0, 0, 0, None),
            "trials_ending": [],
            "licences_expiring": [],
            "reports_last_hour": 0,
            "customers_reporting": 0,
            "notices_pending": 0,
            "notices_dead": 0,
            **fields,
        }
    )


def test_the_overview_lists_subscriptions_still_billing_a_deleted_customer_with_the_cancel_to_send() -> None:
    """Found in review: a Customer deleted with its Stripe subscription open (a GitOps prune at night) left
    one Warning Event, dropped by the API server within the hour, and nothing else: Stripe billed on for
    an instance that was gone, and no page said so. Each is listed with the cancel naming it."""
    updated = datetime(2026, 2, 20, 8, 0, tzinfo=UTC)
    left = [
        LeftBilling(
            "cust_gone01",
            "sub_gone1",
            "professional",
            "past_due",
            datetime(2026, 2, 26, 3, 0, tzinfo=UTC),
            updated,
        ),
        LeftBilling("cust_old01", "sub_old1", "starter", "paused", None, updated),
    ]

    page = page_of("overview.html.j2", overview=overview_with(left_billing=left), phases=[], ago=str)

    assert "<h2>Subscriptions still billing a deleted customer</h2>" in page
    words = " ".join(page.split())
    assert "cancel it in Stripe's Dashboard, or with <code>POST /api/subscriptions/cancel</code>" in words
    rows = re.findall(r'<tr data-subscription="([^"]+)">(.*?)</tr>', page, re.S)
    cells = {sub: re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for sub, row in rows}
    assert cells["sub_gone1"] == [
        "cust_gone01",
        "sub_gone1",
        "professional",
        "past_due",
        "deleted 2026-02-26 03:00:00 UTC",
        "<code>{&#34;customer_id&#34;: &#34;cust_gone01&#34;, &#34;subscription_id&#34;: &#34;sub_gone1&#34;,"
        " &#34;immediately&#34;: true}</code>",
    ]
    assert cells["sub_old1"][4] == "unknown (last Stripe change 2026-02-20 08:00:00 UTC)"
    assert json.loads(html.unescape(cells["sub_old1"][5]).removeprefix("<code>").removesuffix("</code>")) == {
        "customer_id": "cust_old01",
        "subscription_id": "sub_old1",
        "immediately": True,
    }

    none = page_of("overview.html.j2", overview=overview_with(), phases=[], ago=str)
    words = " ".join(none.split())
    assert '<h2>Subscriptions still billing a deleted customer</h2> <p class="ok">None.</p>' in words


def origin_request(headers: dict[str, str]) -> bool:
    request = make_mocked_request("POST", "/admin/logout", headers={"Host": "billing.example", **headers})
    request.app[OPTIONS] = ServerOptions()
    return same_origin(request)


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"Origin": "http://billing.example"}, True),
        ({"Referer": "http://billing.example/admin/customers"}, True),
        ({"Origin": "http://billing.example.evil.example"}, False),
        ({"Referer": "http://billing.example.evil.example/admin/"}, False),
        ({"Origin": "https://billing.example"}, False),  # not the scheme this request came over
        ({"Origin": "null"}, False),
        ({}, False),
    ],
)
def test_a_form_must_come_from_the_console_itself(headers: dict[str, str], allowed: bool) -> None:
    assert origin_request(headers) is allowed


def test_a_customer_whose_step_fails_and_is_retried_needs_a_look() -> None:
    """Found in review: a first install the registry refused (phase Provisioning, retried) was not in
    "Needs a look", which said "Nothing failing"."""

    def with_ready(name: str, phase: str, reason: str) -> CustomerRecord:
        body: dict[str, Any] = {
            "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"email": f"a@{name}.example", "companyName": name.title()},
            "status": {
                "phase": phase,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "False",
                        "reason": reason,
                        "message": "connection refused",
                        "lastTransitionTime": "2026-01-02T00:00:00Z",
                    }
                ],
            },
        }
        found = CustomerRecord.from_body(body)
        assert found is not None
        return found

    listed = failing(
        [
            with_ready("noreg", "Provisioning", "ChartPullFailed"),
            with_ready("new", "Provisioning", "Progressing"),
        ]
    )
    assert [(f.name, f.reason) for f in listed] == [("noreg", "ChartPullFailed")]
    retried = {c.CHART_PULL_FAILED, c.INSTALL_FAILED, c.UPGRADE_FAILED}
    assert retried | {c.NAMESPACE_REFUSED, c.LICENSE_SECRET_REFUSED} == RETRIED_FAILURE_REASONS


def test_a_customer_our_models_refuse_needs_a_look_with_the_operator_s_reason_and_the_field() -> None:
    """Found in review: a Customer our models refuse (a spec a later CRD rule refuses, kept by the API
    server's ratcheting) was skipped by every console list, so the overview said "Nothing failing" while
    the operator had it Stalled as InvalidSpec."""
    body = {
        "metadata": {"name": "old", "uid": "uid-old", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"email": "ops@old.example", "companyName": "Old", "trial": {"days": 120}},
        "status": {
            "phase": "Failed",
            "conditions": [
                {
                    "type": "Stalled",
                    "status": "True",
                    "reason": "InvalidSpec",
                    "message": "spec.trial.days: at most 90",
                    "lastTransitionTime": "2026-01-02T00:00:00Z",
                }
            ],
        },
    }
    unreadable = read_customer(body)
    assert isinstance(unreadable, UnreadableCustomer)
    (listed,) = unreadable_failing([unreadable])
    assert (listed.name, listed.phase, listed.reason) == ("old", "Failed", "InvalidSpec")
    assert listed.message == (
        "this console's version cannot read it: spec.trial.days: Input should be less than or equal to 90"
    )
    assert listed.since == datetime(2026, 1, 2, tzinfo=UTC)
    # One without a status yet: unreadable, not failing for a reason it was never given.
    (fresh,) = unreadable_failing([UnreadableCustomer({"metadata": {"name": "new"}}, ["spec: ..."])])
    assert (fresh.phase, fresh.reason, fresh.since) == ("Unreadable", "Unreadable", None)


def test_search_finds_a_customer_by_company_name() -> None:
    """Found in review: the Customers list shows each one's company, and its search ignored it."""

    def customer(name: str, company: str) -> CustomerRecord:
        body = {
            "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"email": f"ops@{name}.example", "companyName": company},
        }
        found = CustomerRecord.from_body(body)
        assert found is not None
        return found

    listed = [customer("c-0001", "Acme Rockets GmbH"), customer("c-0002", "Globex Corporation")]
    assert [r.name for r in matching(listed, search="rockets")] == ["c-0001"]
    assert [r.name for r in matching(listed, search=" GLOBEX ")] == ["c-0002"]
    assert [r.name for r in matching(listed, search="c-000")] == ["c-0001", "c-0002"]


@pytest.mark.parametrize("seconds", [10**20, -(10**13), 1e300, float("nan"), float("inf")])
def test_epoch_of_an_out_of_range_time_is_shown_not_raised(seconds: float) -> None:
    """Found in review: an unverified licence's issuedAt or expiresAt out of datetime's range (or NaN)
    raised OverflowError or ValueError, and the customer's page was a 500."""
    assert epoch(seconds) == f"{seconds} (not a readable time)"
    assert epoch(True) == "True"  # JSON's true is no time either, not 1970-01-01 00:00:01
