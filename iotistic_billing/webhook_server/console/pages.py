"""The console's pages and actions, and the table that routes them with the role each needs: as the
API's route table, a page cannot exist without its guard.

Pages are GETs any signed-in person may see; actions are POSTs only the admin role may make, each with
the session's CSRF token from the same origin, each recorded (who, what, when) and shown on the page of
what it acted on; one on a Customer is also told to it as a Kubernetes Event.
"""

from __future__ import annotations

import json
import logging
import re
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, Final, Literal, overload
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from aiohttp.http import HttpProcessingError
from jinja2 import Environment, PackageLoader, select_autoescape
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import (
    CUSTOMER_ID_PATTERN,
    DNS_NAME_PATTERN,
    KIND,
    PLAN_NAMES,
    RECONCILE_REQUESTED_AT,
    Phase,
    git_reverts,
)
from iotistic_billing.db import models
from iotistic_billing.db.license_history import license_history
from iotistic_billing.db.pool import database_unreachable
from iotistic_billing.directory import CustomerRecord, UnreadableCustomer
from iotistic_billing.errors import (
    ApiError,
    Conflict,
    DependencyUnavailable,
    Forbidden,
    NotFound,
    ValidationFailed,
    re_created_since_shown,
)
from iotistic_billing.k8s import FieldManager, KubernetesUnavailable, refused_for_its_uid
from iotistic_billing.notices.content import Channel
from iotistic_billing.notices.log import recent_notices
from iotistic_billing.rollout import ROLLOUT_ABORT, ROLLOUT_KIND
from iotistic_billing.settings import Settings
from iotistic_billing.stripe_inbox.events import OPEN_STATUSES
from iotistic_billing.stripe_inbox.inbox import INBOX_CHANNEL, PENDING
from iotistic_billing.usage.periods import INSTANT, BillingPeriod, utc_days
from iotistic_billing.usage.reports import INT64_MAX
from iotistic_billing.webhook_server.console import data
from iotistic_billing.webhook_server.console.charts import Series, running_total, svg_chart
from iotistic_billing.webhook_server.console.session import (
    COOKIE,
    LIFETIME_SECONDS,
    SIGN_OUT_MARGIN,
    ConsoleSession,
    Sessions,
    SignOuts,
)
from iotistic_billing.webhook_server.context import (
    CLOCK,
    DIRECTORY,
    KEYRING,
    KUBE,
    OPTIONS,
    SESSIONS,
    SETTINGS,
    TOKEN_GUESSES,
    address_wait,
    client_bucket,
    request_address,
)
from iotistic_billing.webhook_server.errors import problem_of
from iotistic_billing.webhook_server.licenses import Revoked, RevokeUnanswered, license_token, revocation
from iotistic_billing.webhook_server.messages import read_decimal
from iotistic_billing.webhook_server.schemas import (
    NUL_MESSAGE,
    RevokeRequest,
    position_cursor,
    read_position_cursor,
)
from iotistic_billing.webhook_server.security import admin_not_configured, is_trusted_proxy, throttled
from iotistic_billing.webhook_server.usage import usage_history

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Role = Literal["public", "viewer", "admin"]
CSRF_FIELD: Final = "csrf"
# The Replay form's newest replay of its event when the page was shown (shown_replay).
LAST_REPLAY_FIELD: Final = "last_replay"
# An action form's Customer or InstanceRollout, by its uid when the page was shown (as_shown).
UID_FIELD: Final = "uid"
# The page a sign-in returns to (return_to).
NEXT_FIELD: Final = "next"
# The checkbox of an action that cannot be taken back (confirmed), and what its form's label says it does.
CONFIRM_FIELD: Final = "confirm"
CONFIRMED: Final = "yes"
CANNOT_UNDO: Final = {
    "suspend": "the customer is emailed that their licence is suspended",
    "rollout-abort": "an aborted rollout cannot be resumed",
}
STATIC_FILES: Final = {
    "console.css": "text/css",
    "console.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
# What an action did, by the code its redirect carries (`?done=suspend`): the link names one of these
# texts, never a text of its own, so that nobody can put words in the console's banner with a link.
DONE: Final = {
    "reconcile": "Reconcile requested: the operator answers it with a pass.",
    "suspend": "Customer suspended.",
    "resume": "Suspension lifted.",
    "revoke": "Licence revoked and Customer suspended.",
    "already-revoked": "Already revoked: nothing sent. The licence history and the customer's notice keep"
    " the earlier revoke and its reason.",
    "replay": "Stripe event replayed: see its result below.",
    "replay-sent-again": "Not replayed again: this event was replayed after the page that sent this Replay"
    " was shown (a Replay sent twice is made once). See its result below.",
    # Git sets spec.suspended (git_reverts, judged on the Customer as read before the action: the action's
    # patch makes the console its owner, and the page after it can no longer tell).
    "suspend-git-reverts": "Customer suspended, but Git sets spec.suspended: its GitOps controller lifts the"
    " suspension again within seconds; change it in Git.",
    "resume-git-reverts": "Suspension lifted, but Git sets spec.suspended: its GitOps controller suspends"
    " the Customer again within seconds; change it in Git.",
    "revoke-git-reverts": "Licence revoked and Customer suspended, but Git sets spec.suspended: its GitOps"
    " controller lifts the suspension within seconds, and the operator licenses the Customer again; change"
    " it in Git.",
    "rollout-pause": "InstanceRollout paused.",
    "rollout-resume": "InstanceRollout resumed.",
    "rollout-abort": "InstanceRollout aborted.",
}
# An action's audit row and Event when the API server's answer to its write was lost.
UNANSWERED: Final = " (the API server's answer was lost: it may not have been made)"
# The customer page's newest Stripe events; the rest are on the Stripe events page (?customer=).
CUSTOMER_STRIPE_EVENTS: Final = 20
# The customer page's other capped lists: the query parameter of each one's older link (the position of
# its last row shown, position_cursor) and the rows it shows at a time.
CUSTOMER_LISTS: Final = {"history_before": 20, "notices_before": 20, "actions_before": 50}
SESSION = web.RequestKey("console_session", ConsoleSession)
SIGN_OUTS = web.AppKey("console_sign_outs", SignOuts)
TEMPLATES = web.AppKey("console_templates", Environment)
SESSIONS_KEY = web.AppKey("console_sessions", Sessions)


@dataclass(frozen=True)
class Page:
    """A console route and who may reach it."""

    method: str
    path: str
    handler: Handler
    role: Role


def templates() -> Environment:
    environment = Environment(
        loader=PackageLoader("iotistic_billing.webhook_server.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["epoch"] = epoch
    environment.filters["pairs"] = pairs
    environment.filters["when"] = when
    environment.filters["delivery_target"] = delivery_target
    # The confirmation of an action that cannot be taken back, as its form's checkbox says it.
    environment.globals["confirm_field"] = CONFIRM_FIELD
    environment.globals["confirmed"] = CONFIRMED
    environment.globals["cannot_undo"] = CANNOT_UNDO
    return environment


def epoch(seconds: Any) -> str:
    """A JWT's NumericDate as a person reads it; one no date can be (NaN, past datetime's years) as it is."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "" if seconds is None else str(seconds)
    try:
        return when(datetime.fromtimestamp(seconds, UTC))
    except (OverflowError, ValueError, OSError):
        # An unverified token's claims are anyone's: the page shows them, it does not fail on them.
        return f"{seconds} (not a readable time)"


def when(moment: datetime | None) -> str:
    """A moment as the console shows it: date, time and zone (a step's start showed 14:02:11, which
    read as today's though it began yesterday)."""
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def delivery_target(delivery: models.NoticeDelivery) -> str:
    """Where a notice's delivery goes, as the console shows it: the address, or a webhook's host and port
    only, as the notice sender logs the platform's (a URL's credentials, path or query may hold a token)."""
    if delivery.channel == Channel.EMAIL:
        return delivery.target
    try:
        url = urlsplit(delivery.target)
        # The host and port as parsed, not the netloc's text: a password with "/" or "?" ends the netloc
        # early, and its start read as a host ("user:pa"); there the port is no number (ValueError).
        host, port = url.hostname or "", url.port
    except ValueError:  # not a URL urlsplit reads ("https://[::1"): nothing of it is shown
        return "(not a readable URL)"
    if not host:
        return "(not a readable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port is not None else host


def pairs(value: Any) -> str:
    """A claim that is an object as `key: value, ...` (not Python's repr)."""
    if not isinstance(value, dict):
        return "" if value is None else str(value)
    return ", ".join(
        f"{key}: {'yes' if item is True else 'no' if item is False else item}" for key, item in value.items()
    )


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    session = request.get(SESSION)
    fragment = request.query.get("fragment") == "1"
    html = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            session=session,
            csrf=session.csrf if session else "",
            fragment=fragment,
            # A refreshing page's data-refresh, in milliseconds as console.js reads it.
            refresh_ms=round(request.app[OPTIONS].console_refresh * 1000),
            now=request.app[CLOCK](),
            # Only for a session: an action's banner has no place on the sign-in page.
            done=DONE.get(request.query.get("done", "")) if session else None,
            **context,
        )
    )
    return web.Response(text=html, content_type="text/html", status=status)


def see_other(location: str) -> web.Response:
    """After a form, the page to show (303: the browser GETs it), as a response that keeps its cookies."""
    return web.Response(status=303, headers={"Location": location})


def ago(moment: datetime | None, now: datetime) -> str:
    """`3 h 20 min`: how long ago, for a person."""
    if moment is None:
        return ""
    seconds = max(0, int((now - moment).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min" if minutes else f"{seconds} s"


async def read_form(request: web.Request) -> Mapping[str, object]:
    """The POSTed form, or a 400 naming the body when it does not decode (bytes that are not UTF-8, a
    charset Python does not know, a broken multipart body; one that does not inflate as its
    Content-Encoding is error_middleware's 400, as on every route)."""
    try:
        return await request.post()
    except (ValueError, LookupError, HttpProcessingError):  # UnicodeDecodeError is a ValueError
        raise ValidationFailed.single("body", "is not a form whose text decodes; send UTF-8") from None


# ----- signing in -----


# What a sign-in may return to: a page of the console, its path and query as a browser sends them (printable
# ASCII). Not another host (`//host`, a scheme, a backslash, which browsers read as a slash), nor what a
# Location header cannot hold.
_CONSOLE_PAGE: Final = re.compile(r"/admin/[!-\[\]-~]*")


def return_to(value: object) -> str | None:
    """The page a sign-in returns to (`next`: the page a link opened before its sign-in); None: none
    given, the overview."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _CONSOLE_PAGE.fullmatch(value):
        raise ValidationFailed.single(
            NEXT_FIELD, "must be a page of the console: a path starting with /admin/, on this host"
        )
    return value


def sign_in_page(request: web.Request) -> str:
    """The sign-in page, returning to the page asked for (a link from a ticket or a chat) once signed in."""
    if request.raw_path == "/admin/":
        return "/admin/login"
    return "/admin/login?" + urlencode({NEXT_FIELD: request.raw_path})


async def login_form(request: web.Request) -> web.Response:
    """The sign-in page."""
    return render(request, "login.html.j2", failed=False, next=return_to(request.query.get(NEXT_FIELD)))


async def login(request: web.Request) -> web.StreamResponse:
    """A token opens a session: the admin token may act, the viewer token may look. A wrong one costs a
    try of the client address's (and the server's) few, shared with the API's bearers; out of tries, no
    token is compared: a 429 saying when to try again."""
    sessions = request.app[SESSIONS_KEY]
    form = await read_form(request)
    back = return_to(form.get(NEXT_FIELD))
    address, guesses = client_bucket(request), request.app[TOKEN_GUESSES]
    refusal = guesses.attempt(address)
    if refusal is not None:
        raise refusal
    session = sessions.sign_in(str(form.get("token", "")))
    if session is None:
        log.warning("console: a sign-in from %s failed: the token opens no session", request_address(request))
        return render(request, "login.html.j2", status=401, failed=True, next=back)
    guesses.proved_right(address)
    response = see_other(back or "/admin/")
    # Lax, not Strict: a link from another site (a ticket, a chat) opens the page signed in. It gives
    # nothing up: no GET of the console writes, and a POST from another site carries no Lax cookie (each
    # is checked for this origin and the session's CSRF token besides: console_guard).
    response.set_cookie(
        COOKIE,
        sessions.seal(session),
        max_age=LIFETIME_SECONDS,
        path="/admin",
        httponly=True,
        samesite="Lax",
        secure=_secure(request),
    )
    log.info("console: %s signed in from %s", session.role, request_address(request))
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """The session ends: recorded first (a copy of its cookie opens nothing either), then its cookie goes.
    PostgreSQL away, it is a 503 and the cookie stays, so that signing out again ends it."""
    session = request[SESSION]
    async with request.app[SESSIONS]() as db, db.begin():
        await data.record_sign_out(db, session.id, session.expires_at + SIGN_OUT_MARGIN)
    request.app[SIGN_OUTS].add(session.id)
    log.info("console: %s signed out from %s", session.role, request_address(request))
    response = see_other("/admin/login")
    response.del_cookie(COOKIE, path="/admin")
    return response


def _secure(request: web.Request) -> bool:
    """Over TLS: directly, or as X-Forwarded-Proto says when a trusted proxy (TRUSTED_PROXIES) sent it."""
    if request.secure:
        return True
    if not is_trusted_proxy(request.remote, request.app[OPTIONS].trusted_proxies):
        return False
    forwarded = request.headers.get("X-Forwarded-Proto", "")
    return forwarded.rsplit(",", 1)[-1].strip() == "https"


# ----- pages -----


async def overview_page(request: web.Request) -> web.Response:
    """Customers by phase, the failing ones first, subscriptions still billing a deleted customer, the
    Stripe inbox, trials and licences ending soon."""
    now = request.app[CLOCK]()
    async with request.app[SESSIONS]() as session:
        # The Customers listed once, after the subscriptions were read (a Customer applied meanwhile holds
        # its id), for the counts too.
        left, listing = await request.app[DIRECTORY].subscriptions_left_billing(session, OPEN_STATUSES)
        summary = await data.overview(listing.records, session, now, listing.unreadable, left)
    # A Customer this version cannot read, and whose status names no phase, is counted as Unreadable.
    phases = [*Phase, *(["Unreadable"] if "Unreadable" in summary.phases else [])]
    return render(request, "overview.html.j2", overview=summary, phases=phases, ago=lambda t: ago(t, now))


def customer_name_cursor(request: web.Request, field: str) -> str | None:
    """The name a Customers list's next (`after`) or previous (`before`) link gave; a value no
    Customer's name can be is a 400 naming the parameter."""
    value = request.query.get(field)
    if value is not None and (len(value) > 253 or not re.fullmatch(DNS_NAME_PATTERN, value)):
        raise ValidationFailed.single(field, "must be the name of a Customer a next or previous link gave")
    return value


def name_page(
    found: Sequence[CustomerRecord], after: str | None, before: str | None
) -> tuple[Sequence[CustomerRecord], bool, bool]:
    """The page of `found` (by name) after the name `after`, or before the name `before`, or the first;
    whether a previous and a next page follow. A keyset: Customers made or deleted meanwhile neither skip
    nor repeat one on the next page, as an offset did. Back at the start, the first page, full."""
    names = [record.name for record in found]
    if before is not None:
        end = bisect_left(names, before)
        if end > data.PAGE_SIZE:
            return found[end - data.PAGE_SIZE : end], True, len(found) > end
        return found[: data.PAGE_SIZE], False, len(found) > data.PAGE_SIZE
    start = 0 if after is None else bisect_right(names, after)
    if start >= len(found) > 0:
        # Those after `after` left meanwhile (deleted, out of the filter): the last page, not an empty one.
        start = max(len(found) - data.PAGE_SIZE, 0)
    return found[start : start + data.PAGE_SIZE], start > 0, len(found) > start + data.PAGE_SIZE


async def customers_page(request: web.Request) -> web.Response:
    """Every Customer, searched and filtered, a page at a time."""
    query = request.query
    search, phase, plan = query.get("q", ""), query.get("phase", ""), query.get("plan", "")
    after, before = customer_name_cursor(request, "after"), customer_name_cursor(request, "before")
    listing = await request.app[DIRECTORY].listing()
    found = data.matching(listing.records, search=search, phase=phase, plan=plan)
    # Those this version cannot read, above the table: by name and phase as the overview counts them (no
    # plan is read of them).
    needle = search.strip().lower()
    unreadable = [
        u for u in listing.unreadable if needle in u.name.lower() and phase in ("", u.phase) and not plan
    ]
    shown, previous, more = name_page(found, after, before)

    def link(**cursor: str) -> str:
        return "?" + urlencode(
            {k: v for k, v in (("q", search), ("phase", phase), ("plan", plan), *cursor.items()) if v}
        )

    # The phases the overview links to (Unreadable, one a newer operator wrote) and the one asked for,
    # so that the next Filter keeps it.
    asked = [phase] if phase else []
    phases = list(dict.fromkeys([*Phase, *sorted(u.phase for u in listing.unreadable if u.phase), *asked]))
    return render(
        request,
        "customers.html.j2",
        customers=shown,
        unreadable=sorted(unreadable, key=lambda u: u.name),
        total=len(found),
        previous=link(before=shown[0].name) if previous and shown else None,
        next=link(after=shown[-1].name) if more and shown else None,
        search=search,
        phase=phase,
        plan=plan,
        phases=phases,
        plans=[*PLAN_NAMES, "unlicensed"],
        phase_of=data.phase_of,
    )


@overload
def cursor_position(request: web.Request, field: str, of: type[int] = ...) -> tuple[datetime, int] | None: ...
@overload
def cursor_position(request: web.Request, field: str, of: type[str]) -> tuple[datetime, str] | None: ...
def cursor_position(
    request: web.Request, field: str, of: type[int] | type[str] = int
) -> tuple[datetime, int | str] | None:
    """Where the list of `field` (CUSTOMER_LISTS; the Stripe events page's, whose ids are `str`) goes on
    from: the row its older (or newer) link named; None, from the newest. A value no link gave is a 400
    naming the parameter."""
    value = request.query.get(field)
    if value is None:
        return None
    position = read_position_cursor(value, of)
    if position is None:
        raise ValidationFailed.single(field, "must be the value an older or newer link of this page gave")
    return position


def older_links(request: web.Request, last: Mapping[str, tuple[datetime, int] | None]) -> dict[str, str]:
    """The older link of each list that goes on past its last row shown (`last`: that row's position,
    None when none follows), keeping the place of the others; and each paged list's link back to its
    newest rows (`newest:` the parameter). As the Stripe events page's links: a query of this page."""
    kept = {field: value for field in CUSTOMER_LISTS if (value := request.query.get(field)) is not None}

    def link(field: str, position: tuple[datetime, int] | None) -> str:
        query = {name: value for name, value in kept.items() if name != field}
        if position is not None:
            query[field] = position_cursor(*position)
        return "?" + urlencode(query)

    links = {field: link(field, position) for field, position in last.items() if position is not None}
    links |= {f"newest:{field}": link(field, None) for field in kept}
    return links


def _no_customer(name: str) -> NotFound:
    return NotFound("Customer not found", f"no Customer named {name!r}")


async def _record(request: web.Request) -> CustomerRecord:
    record = await request.app[DIRECTORY].by_name(request.match_info["name"])
    if record is None:
        raise _no_customer(request.match_info["name"])
    return record


def usage_charts(history: Any, counted: Sequence[data.PeriodDay], now: datetime) -> list[str]:
    """One SVG per metric. A day's values (peak devices, database size, device-hours) over the 31 days'
    window; the period's totals so far (traffic, API calls) over every day of the period up to today,
    from `counted` (data.period_days), so that they add up what the period's totals and overage do."""
    days = history.daily
    period = history.billing_period
    start = period.period_start.astimezone(UTC)
    period_days = utc_days(start, min(now, period.period_end - INSTANT))
    included = period.included

    def quota(value: int, scale: float = 1.0) -> float | None:
        return None if value == -1 else value * scale

    def points(pick: Callable[[Any], float]) -> list[tuple[Any, float]]:
        return [(day.date, pick(day)) for day in days]

    traffic_mb = running_total([(c.day, c.traffic_bytes / 1e6) for c in counted], period_days)
    api_calls = running_total([(c.day, float(c.api_calls)) for c in counted], period_days)
    series = [
        Series(
            "Peak active devices",
            "devices",
            points(lambda d: float(d.peak_active_devices)),
            quota(included.devices),
        ),
        Series(
            "Traffic this period",
            "MB",
            traffic_mb,
            quota(included.traffic_gb, 1000.0),
            cumulative=True,
            since=start,
        ),
        Series(
            "API calls this period",
            "calls",
            api_calls,
            quota(included.api_calls),
            cumulative=True,
            since=start,
        ),
        Series(
            "Database size",
            "MB",
            points(lambda d: float(d.postgres_size_mb or 0)),
            quota(included.storage_gb, 1000.0),
        ),
        Series("Device-hours", "device-hours", points(lambda d: float(d.device_hours))),
    ]
    return [svg_chart(s) for s in series]


def licence_claims(request: web.Request, token: str | None) -> dict[str, Any] | None:
    """The licence's claims, decoded; never the JWT itself."""
    if token is None:
        return None
    claims, verified = request.app[KEYRING].decode(token, request.app[SETTINGS].license_audience)
    # An unverified token's claims are anyone's: features or limits that are no object are shown as
    # they are, not iterated (a list there made the whole page a 500, its Revoke button with it).
    listed = {name: claims[name] for name in ("features", "limits") if isinstance(claims.get(name), dict)}
    return {**claims, "_verified": verified, "_listed": listed}


async def customer_page(request: web.Request) -> web.Response:
    """One Customer: its spec, status, licence, history, subscription, Events, Stripe events, notices,
    usage, and the actions."""
    read = await request.app[DIRECTORY].named(request.match_info["name"])
    if read is None:
        raise _no_customer(request.match_info["name"])
    if isinstance(read, UnreadableCustomer):
        return render(
            request,
            "unreadable.html.j2",
            customer=read,
            body=json.dumps(read.body.get("spec"), indent=2, sort_keys=True, default=str),
        )
    record = read
    before = {field: cursor_position(request, field) for field in CUSTOMER_LISTS}
    now = request.app[CLOCK]()
    kube = request.app[KUBE]
    try:
        events = await kube.list_customer_events(record.name, record.customer.metadata.uid)
    except KubernetesUnavailable:
        events = []
    claims = licence_claims(
        request, await license_token(kube, record.namespace, record.customer_id, record.customer.metadata.uid)
    )
    usage = await usage_history(request, record, 31, now)
    period = BillingPeriod(usage.billing_period.period_start, usage.billing_period.period_end)
    async with request.app[SESSIONS]() as session:
        counted = await data.period_days(session, record.customer_id, period)
        # One more of each list than shown: whether an older link goes on past it.
        shown = CUSTOMER_LISTS
        history = await license_history(
            session,
            record.customer_id,
            limit=shown["history_before"] + 1,
            before=before["history_before"],
        )
        subscriptions = (
            await session.scalars(
                select(models.Subscription)
                .where(models.Subscription.customer_id == record.customer_id)
                .order_by(models.Subscription.updated_at.desc())
            )
        ).all()
        # One more than shown: whether the table links to the rest (the Stripe events page, ?customer=).
        stripe = await data.stripe_events(
            session, customer_id=record.customer_id, limit=CUSTOMER_STRIPE_EVENTS + 1
        )
        notices = await recent_notices(
            session,
            customer_id=record.customer_id,
            status=None,
            limit=shown["notices_before"] + 1,
            before=before["notices_before"],
        )
        audit = await data.audit(
            session,
            record.name,
            since=record.customer.metadata.creation_timestamp,
            limit=shown["actions_before"] + 1,
            before=before["actions_before"],
        )

    def last(rows: Sequence[Any], field: str, position: Callable[[Any], tuple[datetime, int]]) -> Any:
        """The list's rows shown, and the position its older link names (None: none follows)."""
        page = rows[: shown[field]]
        return page, position(page[-1]) if len(rows) > shown[field] else None

    history_rows, history_last = last(history.history, "history_before", lambda h: (h.generated_at, h.id))
    notice_rows, notices_last = last(notices, "notices_before", lambda n: (n.notice.created_at, n.notice.id))
    audit_rows, actions_last = last(audit, "actions_before", lambda a: (a.at, a.id))
    return render(
        request,
        "customer.html.j2",
        record=record,
        spec=json.dumps(record.customer.spec.to_k8s(), indent=2, sort_keys=True),
        conditions=record.customer.status.conditions or [],
        claims=claims,
        history=history_rows,
        subscriptions=subscriptions,
        events=events,
        stripe_events=stripe[:CUSTOMER_STRIPE_EVENTS],
        more_stripe_events=len(stripe) > CUSTOMER_STRIPE_EVENTS,
        notices=notice_rows,
        audit=audit_rows,
        older=older_links(
            request,
            {"history_before": history_last, "notices_before": notices_last, "actions_before": actions_last},
        ),
        usage=usage,
        charts=usage_charts(usage, counted, now),
        gitops=data.gitops_manager(record.body, "suspended"),
        phase=data.phase_of(record),
        ago=lambda t: ago(t, now),
    )


async def stripe_events_page(request: web.Request) -> web.Response:
    """The Stripe inbox's log, filtered by result, type and customer id, newest first, a page at a time:
    older and newer links by keyset (data.stripe_events), so that a replay or a new event meanwhile
    neither skips nor repeats a row of the next page."""
    query = request.query
    result, event_type = query.get("result", ""), query.get("type", "")
    # As the Customers search: an id pasted with a space or in capitals is the id.
    customer = query.get("customer", "").strip().lower()
    if result and result not in data.EVENT_RESULTS:
        raise ValidationFailed.single("result", f"must be one of {', '.join(data.EVENT_RESULTS)}")
    if "\x00" in event_type:  # PostgreSQL text cannot hold NUL: no event has such a type
        raise ValidationFailed.single("type", NUL_MESSAGE)
    if customer and not re.fullmatch(CUSTOMER_ID_PATTERN, customer):
        raise ValidationFailed.single("customer", "must be a customer id (cust_ and 6 to 32 a-z or 0-9)")
    before, after = cursor_position(request, "before", str), cursor_position(request, "after", str)
    if before is not None and after is not None:
        raise ValidationFailed.single("after", "must not be given with before: a link gives one of them")
    filters = {"result": result, "event_type": event_type, "customer_id": customer}
    async with request.app[SESSIONS]() as session:
        total = await data.count_stripe_events(session, **filters)

        async def listed(
            before: tuple[datetime, str] | None = None, after: tuple[datetime, str] | None = None
        ) -> list[models.StripeEvent]:
            # One more than shown: whether a link goes on past the page.
            return await data.stripe_events(
                session, **filters, limit=data.PAGE_SIZE + 1, before=before, after=after
            )

        rows = await listed(after=after) if after else []
        newer = len(rows) > data.PAGE_SIZE
        if newer:
            rows, older = rows[-data.PAGE_SIZE :], True
        else:
            # Nothing newer past them (or no `after`): the newest page, full, rather than a short one.
            rows = await listed(before=None if after else before)
            newer, older = after is None and before is not None, len(rows) > data.PAGE_SIZE
            rows = rows[: data.PAGE_SIZE]
        types = await data.event_types(session)

    def link(**cursor: str) -> str:
        shown = (("result", result), ("type", event_type), ("customer", customer), *cursor.items())
        return "?" + urlencode({k: v for k, v in shown if v})

    # Past an empty page (all older than a link's row gone), newer goes back from that row.
    first = (rows[0].received_at, rows[0].event_id) if rows else before
    return render(
        request,
        "stripe_events.html.j2",
        events=rows,
        total=total,
        newer=link(after=position_cursor(*first)) if newer and first else None,
        newest=link() if newer else None,
        older=link(before=position_cursor(rows[-1].received_at, rows[-1].event_id)) if older else None,
        result=result,
        event_type=event_type,
        customer=customer,
        types=types,
        results=data.EVENT_RESULTS,
    )


def _event_id(request: web.Request) -> str:
    """The `{event_id}` of the path; one with NUL, which PostgreSQL text cannot hold, names no event."""
    event_id = request.match_info["event_id"]
    if "\x00" in event_id:
        raise _no_event(event_id)
    return event_id


def _no_event(event_id: str) -> NotFound:
    return NotFound("Stripe event not found", f"no Stripe event {event_id!r}")


async def stripe_event_page(request: web.Request) -> web.Response:
    """One Stripe event: what it said (its payload) and what applying it did."""
    event_id = _event_id(request)
    async with request.app[SESSIONS]() as session:
        row = await session.get(models.StripeEvent, event_id)
        # Its replays: one of an event no Customer matched is on no Customer's page.
        audit = await data.audit(session, target=event_id)
    if row is None and not audit:
        raise _no_event(event_id)
    if row is None:
        # Deleted after STRIPE_EVENT_RETENTION_DAYS (stripe_inbox/retention.py): who replayed it is
        # shown nowhere else (an unmatched event's replay names no Customer).
        return render(request, "stripe_event.html.j2", status=404, event=None, event_id=event_id, audit=audit)
    return render(
        request,
        "stripe_event.html.j2",
        event=row,
        payload=json.dumps(row.payload, indent=2, sort_keys=True) if row.payload else "",
        replayable=replayable(row),
        audit=audit,
    )


async def to_overview(request: web.Request) -> web.Response:
    """`/admin`, typed without its slash: the console."""
    return see_other("/admin/")


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in STATIC_FILES:
        raise NotFound("Not found", f"no file {name}")
    body = files("iotistic_billing.webhook_server.console").joinpath("static", name).read_bytes()
    response = web.Response(body=body, content_type=STATIC_FILES[name])
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


# ----- actions -----


def replayable(row: models.StripeEvent) -> bool:
    """Unmatched (its Customer may exist now), or pending after failed tries (retried at once)."""
    return row.result == "unmatched" or (row.result == PENDING and row.attempts > 0)


async def _audit(
    request: web.Request,
    db: AsyncSession,
    action: str,
    detail: str,
    *,
    customer: str | None = None,
    target: str | None = None,
) -> models.ConsoleAction:
    """The action's audit row, in the transaction of its write: written before the write (a database
    that is away stops the action there), committed with it, rolled back when the write fails."""
    return await data.record_action(
        db, role=request[SESSION].role, action=action, customer_name=customer, target=target, detail=detail
    )


async def _tell(request: web.Request, record: CustomerRecord, action: str, detail: str) -> bool:
    """The Event on the Customer, once the action is committed: an Event that cannot be written is
    logged (False), the action stays done."""
    try:
        await request.app[KUBE].create_event(
            KIND,
            record.body,
            reason=f"Console{action.title().replace('-', '')}",
            message=f"{detail} (by the {request[SESSION].role})",
        )
    except (KubernetesUnavailable, ApiException) as error:
        log.warning("console: the Event of %s on %s was not written (%s)", action, record.name, error)
        return False
    return True


# An action's Event when PostgreSQL was lost at its commit: the Event is then its one record.
UNRECORDED: Final = "; not in the console's records: PostgreSQL was lost"


async def _recorded_write(
    request: web.Request,
    action: str,
    detail: str,
    write: Callable[[], Awaitable[object]],
    *,
    record: CustomerRecord | None = None,
    target: str | None = None,
) -> None:
    """An action other than revoke: its audit row (`_audit`), its write, the commit, then the Event on
    its Customer (`record`). Once the API server may have made the write, the answer never says nothing
    was changed (as `customer_action` and `revocation` for revoke): a write whose answer was lost keeps its
    row, saying so, and answers the API's "may have been made" 503; PostgreSQL lost at the commit is a 503
    saying what was changed, and the Event (the action's one record then) is posted anyway."""
    unsure: KubernetesUnavailable | None = None
    row: models.ConsoleAction | None = None
    written = False
    try:
        async with request.app[SESSIONS]() as db, db.begin():
            customer = record.name if record else None
            row = await _audit(request, db, action, detail, customer=customer, target=target)
            try:
                await write()
            except KubernetesUnavailable as error:
                if not error.maybe_applied:
                    raise
                unsure = error
                row.detail = detail + UNANSWERED
            written = True
    except Exception as error:
        if row is None or not written or not database_unreachable(error):
            raise
        subject = f"Customer {record.name}: {detail}" if record else detail
        log.warning(
            "console: %s (by the %s), but PostgreSQL was lost at the commit (%s)",
            subject,
            request[SESSION].role,
            type(error).__name__,
        )
        told = record is not None and await _tell(request, record, action, row.detail + UNRECORDED)
        happened = "was made" if unsure is None else "may have been made (the API server's answer was lost)"
        raise DependencyUnavailable(
            "Database",
            f"the change ({subject}) {happened}, but PostgreSQL was lost before the console recorded it"
            + ("; the Event on the Customer records it" if told else ""),
        ) from None
    if record is not None and row is not None:
        await _tell(request, record, action, row.detail)
    if unsure is not None:
        raise unsure


def _customer_patch(action: str, now: datetime) -> tuple[dict[str, Any], str] | None:
    """The merge patch of a Customer action other than revoke, and what it did; None: no such action."""
    if action == "reconcile":
        stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"metadata": {"annotations": {RECONCILE_REQUESTED_AT: stamp}}}
        return patch, f"reconcile requested at {stamp}"
    if action in ("suspend", "resume"):
        done = "suspended" if action == "suspend" else "suspension lifted"
        return {"spec": {"suspended": action == "suspend"}}, done
    return None


def as_shown(kind: str, name: str, form: Mapping[str, object], uid: str) -> str:
    """`uid`, that of the object of `name` read now, when it is the one the action's page showed (its
    form's `uid`), else the 409 saying it was made again since; a form without the field (from a page
    older than it) acts on the one there now, as it did."""
    shown = form.get(UID_FIELD)
    if shown is None:
        return uid
    if not isinstance(shown, str) or not shown:
        raise ValidationFailed.single(UID_FIELD, f"must be the uid of the {kind} the page showed")
    if shown != uid:
        raise re_created_since_shown(kind, name)
    return uid


def confirmed(action: str, form: Mapping[str, object]) -> None:
    """An action that cannot be taken back (CANNOT_UNDO) made only with its form's checkbox checked, as
    Revoke only with its reason: else a 400 naming the field, before anything is written."""
    if action in CANNOT_UNDO and form.get(CONFIRM_FIELD) != CONFIRMED:
        raise ValidationFailed.single(
            CONFIRM_FIELD, f"must be checked: {CANNOT_UNDO[action]}; nothing was done"
        )


def on_uid(patch: dict[str, Any], uid: str) -> dict[str, Any]:
    """A merge patch made on the object of `uid` only: the API server refuses it on another one of the
    name (refused_for_its_uid)."""
    return {**patch, "metadata": {**patch.get("metadata", {}), "uid": uid}}


async def customer_action(request: web.Request) -> web.StreamResponse:
    """Reconcile now, suspend, resume, revoke the licence: on the Customer the page showed."""
    action = request.match_info["action"]
    record = await _record(request)
    change = _customer_patch(action, request.app[CLOCK]())
    if change is None and action != "revoke":
        raise NotFound("Not found", f"no action {action!r}")
    form = await read_form(request)
    uid = as_shown(KIND, record.name, form, record.customer.metadata.uid or "")
    confirmed(action, form)
    try:
        if change is None:
            done = await _revoke(request, record, revoke_reason(form), uid)
        else:
            patch, detail = change
            # Judged before the patch, which moves the field's ownership from Git's controller to ours.
            reverted = "suspended" in patch.get("spec", {}) and git_reverts(record.body, "suspended")
            done = f"{action}-git-reverts" if reverted else action
            await _patch_customer(request, record, action, patch, detail, uid)
    except ApiException as error:
        if refused_for_its_uid(error):  # made again between the read and the patch
            raise re_created_since_shown(KIND, record.name) from None
        raise
    return see_other(f"/admin/customers/{record.name}?" + urlencode({"done": done}))


async def _patch_customer(
    request: web.Request, record: CustomerRecord, action: str, patch: dict[str, Any], detail: str, uid: str
) -> None:
    async def write() -> None:
        try:
            await request.app[KUBE].patch_customer(record.name, on_uid(patch, uid), FieldManager.CONSOLE)
        except ApiException as error:
            if error.status == 404:
                raise _no_customer(record.name) from None
            raise

    await _recorded_write(request, action, detail, write, record=record)


async def _revoke(request: web.Request, record: CustomerRecord, reason: str, uid: str) -> str:
    """The revoke route's history row, notice and patch in its transaction, which the audit row joins;
    what it did (`revoke`, or `already-revoked`: nothing recorded, the audit row and Event say so), its
    banner's code (`revoke-git-reverts` when Git sets spec.suspended, judged before the patch)."""
    action = "revoke"
    unsure: RevokeUnanswered | None = None
    detail: str | None = None
    try:
        async with revocation(request.app) as revoking:
            try:
                revoked = await revoking.revoke(record, reason, by="console", uid=uid)
            except RevokeUnanswered as lost:
                # As _recorded_write: the Customer may be suspended, so the audit row and the Event say
                # who may have done it (the history row and notice wait for the retry, which records them).
                revoked, unsure = Revoked(lost.license), lost
            jti = revoked.license.jti
            if revoked.recorded:
                detail = f"licence {jti} revoked ({reason}), Customer suspended"
            else:
                action = "already-revoked"
                detail = (
                    f"already revoked (licence {jti}): nothing sent, the reason given ({reason}) not recorded"
                )
            if unsure is not None:
                detail += UNANSWERED
            await _audit(request, revoking.session, action, detail, customer=record.name)
    except DependencyUnavailable:
        # PostgreSQL lost once the Customer was suspended (revocation's 503 says so): as _recorded_write.
        if detail is not None:
            await _tell(request, record, action, detail + UNRECORDED)
        raise
    await _tell(request, record, action, detail)
    if unsure is not None:
        raise unsure
    return f"{action}-git-reverts" if revoked.recorded and revoked.git_reverts else action


def revoke_reason(form: Mapping[str, object]) -> str:
    """The revoke form's reason, required as the API's revoke requires it (RevokeRequest): the customer's
    notice and the licence history say it."""
    try:
        return RevokeRequest.model_validate({"reason": form["reason"]} if "reason" in form else {}).reason
    except ValidationError as invalid:
        raise ValidationFailed.from_pydantic(invalid) from None


async def rollouts_page(request: web.Request) -> web.Response:
    """The InstanceRollouts with their steps, counts and failed Customers, and the console's actions on
    each (since its creation: not those on a deleted one of the same name) while PostgreSQL answers."""
    rollouts = data.rollout_views(await request.app[KUBE].list_rollouts())
    audit: dict[str, list[models.ConsoleAction]] | None
    try:
        async with request.app[SESSIONS]() as session:
            audit = await data.rollout_actions(session, rollouts)
    except Exception as error:
        # The rollouts are the API server's: PostgreSQL away leaves out their actions only (the page says
        # so), as a customer's page leaves out its Events while the API server is away.
        if not database_unreachable(error):
            raise
        audit = None
    return render(request, "rollouts.html.j2", rollouts=rollouts, audit=audit)


def _no_rollout(name: str) -> NotFound:
    return NotFound("InstanceRollout not found", f"no InstanceRollout {name!r}")


async def rollout_action(request: web.Request) -> web.StreamResponse:
    """Pause (spec.paused), resume, abort (the annotation that ends a rollout where it is): of the
    rollout the page showed, while it runs."""
    name, action = request.match_info["name"], request.match_info["action"]
    now = request.app[CLOCK]().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    patches: dict[str, tuple[dict[str, Any], str]] = {
        "pause": ({"spec": {"paused": True}}, "paused"),
        "resume": ({"spec": {"paused": False}}, "resumed"),
        "abort": ({"metadata": {"annotations": {ROLLOUT_ABORT: now}}}, "aborted"),
    }
    if action not in patches:
        raise NotFound("Not found", f"no action {action!r}")
    # A name Kubernetes cannot hold names no rollout, and its audit row (NUL, past String(255)) would be
    # PostgreSQL's error, a 500: refused before that row is written.
    if len(name) > 253 or not re.fullmatch(DNS_NAME_PATTERN, name):
        raise _no_rollout(name)
    patch, done = patches[action]
    body = await request.app[KUBE].read_rollout(name)
    if body is None:
        raise _no_rollout(name)
    form = await read_form(request)
    uid = as_shown(ROLLOUT_KIND, name, form, str(body["metadata"].get("uid", "")))
    view = data.rollout_view(body)
    if view is not None and view.finished:
        # A page shown before it finished: an abort left on it would end at once the run a new
        # chartVersion starts (operator.rollout_plan.decide).
        phase = view.status.phase
        raise Conflict(
            f"InstanceRollout already {phase}",
            f"InstanceRollout {name} is {phase}: nothing was done (only a running rollout is paused, resumed"
            " or aborted; a new chartVersion runs it again)",
        )
    confirmed(f"rollout-{action}", form)

    async def write() -> None:
        try:
            await request.app[KUBE].patch_rollout(name, on_uid(patch, uid), FieldManager.CONSOLE)
        except ApiException as error:
            if error.status == 404:
                raise _no_rollout(name) from None
            if refused_for_its_uid(error):  # made again between the read and the patch
                raise re_created_since_shown(ROLLOUT_KIND, name) from None
            raise

    await _recorded_write(request, f"rollout-{action}", f"InstanceRollout {name} {done}", write, target=name)
    return see_other("/admin/rollouts?" + urlencode({"done": f"rollout-{action}"}))


def shown_replay(form: Mapping[str, object]) -> int:
    """The newest replay the event's page showed when its Replay form was sent (the id of its audit row,
    0: none); a form without the field (from a page older than it) as one that showed none."""
    text = form.get(LAST_REPLAY_FIELD, "0")
    shown = read_decimal(text, INT64_MAX) if isinstance(text, str) else None
    if shown is None:
        raise ValidationFailed.single(
            LAST_REPLAY_FIELD, "must be the id of the event's newest replay, in digits"
        )
    return shown


async def replay_event(request: web.Request) -> web.StreamResponse:
    """An unmatched or failing Stripe event applied again, once: it goes back to the inbox. A Replay sent
    from a page shown before the event's newest replay (a double click, a form sent again, another
    admin's replay meanwhile) is not made again: it lands on the event's page, which says so."""
    event_id = _event_id(request)
    shown = shown_replay(await read_form(request))
    async with request.app[SESSIONS]() as session, session.begin():
        seen = await session.get(models.StripeEvent, event_id)
        if seen is None:
            raise _no_event(event_id)
        # Asked of the API server before the row is locked: the inbox's claim waits for a locked row, and
        # with every replica's batch behind it, a slow API server held every apply for as long.
        record = None
        if seen.customer_id:
            record = await request.app[DIRECTORY].by_customer_id(session, seen.customer_id)
        row = await session.get(models.StripeEvent, event_id, with_for_update=True, populate_existing=True)
        if row is None:
            raise _no_event(event_id)
        newest = await data.audit(session, target=event_id, limit=1)
        if (newest[0].id if newest else 0) != shown:
            # Not the event's state: the replay's NOTIFY wakes the inbox, which applies it within
            # milliseconds, so a double click's second POST finds it applied, or unmatched again.
            done = urlencode({"done": "replay-sent-again"})
            return see_other(f"/admin/stripe-events/{event_id}?{done}")
        if not replayable(row):
            raise ApiError(
                "Not replayable",
                f"event {event_id} is {row.result}: only unmatched or failing events replay",
                status=409,
            )
        detail = f"Stripe event {event_id} ({row.type}) replayed"
        await _audit(
            request, session, "replay", detail, customer=record.name if record else None, target=event_id
        )
        await session.execute(
            update(models.StripeEvent)
            .where(models.StripeEvent.event_id == event_id)
            .values(result=PENDING, attempts=0, last_error=None, applied_at=None)
        )
        await session.execute(select(func.pg_notify(INBOX_CHANNEL, event_id)))
    if record is not None:
        await _tell(request, record, "replay", detail)
    return see_other(f"/admin/stripe-events/{event_id}?" + urlencode({"done": "replay"}))


# ----- the table -----

PAGES: Final[tuple[Page, ...]] = (
    Page("GET", "/admin/login", login_form, "public"),
    Page("POST", "/admin/login", login, "public"),
    Page("GET", "/admin", to_overview, "public"),
    Page("GET", "/admin/static/{file}", static_file, "public"),
    Page("POST", "/admin/logout", logout, "viewer"),
    Page("GET", "/admin/", overview_page, "viewer"),
    Page("GET", "/admin/customers", customers_page, "viewer"),
    Page("GET", "/admin/customers/{name}", customer_page, "viewer"),
    Page("POST", "/admin/customers/{name}/{action}", customer_action, "admin"),
    Page("GET", "/admin/stripe-events", stripe_events_page, "viewer"),
    Page("GET", "/admin/stripe-events/{event_id}", stripe_event_page, "viewer"),
    Page("POST", "/admin/stripe-events/{event_id}/replay", replay_event, "admin"),
    Page("GET", "/admin/rollouts", rollouts_page, "viewer"),
    Page("POST", "/admin/rollouts/{name}/{action}", rollout_action, "admin"),
)

PAGES_KEY: web.AppKey[dict[web.AbstractRoute, Page]] = web.AppKey("console_pages")


def _form_source(request: web.Request) -> str:
    return request.headers.get("Origin") or request.headers.get("Referer") or ""


def _is_from(source: str, origin: str) -> bool:
    return source == origin or source.startswith(origin + "/")


def same_origin(request: web.Request) -> bool:
    """A POST from this origin: Origin (or, without it, Referer) names this host. Browsers send Origin
    on every POST; a request with neither is not a browser's form and is refused too."""
    source = _form_source(request)
    scheme = "https" if _secure(request) else "http"
    return bool(source) and _is_from(source, f"{scheme}://{request.host}")


def origin_refusal(request: web.Request) -> Forbidden:
    """Why a form's origin is refused. A page of this host over TLS that reached the server as plain
    HTTP came through a proxy that ends TLS and that TRUSTED_PROXIES does not list: still refused (this
    server would set its cookie without Secure, and believes X-Forwarded-Proto only from a trusted
    proxy), but told what to set, as no form, sign-in included, can pass until then."""
    if not _secure(request) and _is_from(_form_source(request), f"https://{request.host}"):
        log.warning(
            "console: a form sent over TLS reached this server as plain HTTP from %s, which is not in "
            "TRUSTED_PROXIES: refused",
            request.remote,
        )
        return Forbidden(
            f"a console form must come from this console (Origin): it was sent from https://{request.host}, "
            "which reached this server as plain HTTP through a proxy that is not trusted; list the proxy "
            "that ends TLS in TRUSTED_PROXIES so that its X-Forwarded-Proto is believed"
        )
    return Forbidden("a console form must come from this console (Origin)")


def throttled_page(request: web.Request, wait: float) -> web.Response:
    """The API's 429 (its Retry-After) as a page of the console, which says when to try again."""
    refusal = throttled(wait, "address")
    response = render(
        request, "throttled.html.j2", status=refusal.status, retry_after=refusal.details["retry_after"]
    )
    response.headers.update(refusal.headers)
    return response


@web.middleware
async def console_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A session for every page but the public ones (else to the sign-in page), the admin role for
    actions, and for every POST the limit per client address, the same origin and the session's CSRF
    token. What goes wrong is a page of the console for a page and for a form a browser sent (an action
    refused, a session ended, PostgreSQL away): the browser showed the API's JSON, with no way back; a
    script's POST keeps the API's JSON problem."""
    pages = request.app.get(PAGES_KEY)
    page = pages.get(request.match_info.route) if pages is not None else None
    if page is None:
        return await handler(request)
    if request.method != "GET" and not _from_a_browser(request):
        return await _guarded(request, handler, page)
    try:
        return await _guarded(request, handler, page)
    except (ApiError, KubernetesUnavailable, ApiException) as error:
        return problem_page(request, error)
    except Exception as error:
        # A browser gone while its form was read is error_middleware's (no one to answer), not PostgreSQL.
        gone = isinstance(error, ConnectionResetError) and request.transport is None
        if gone or not database_unreachable(error):
            raise
        # The exception's text can hold connection parameters: its type only, as error_middleware.
        log.warning("%s %s: database unavailable (%s)", request.method, request.path, type(error).__name__)
        return problem_page(request, DependencyUnavailable("Database"))


def _from_a_browser(request: web.Request) -> bool:
    """A form a person sent from a console page: the browser asks for HTML."""
    return "text/html" in request.headers.get("Accept", "")


async def _guarded(request: web.Request, handler: Handler, page: Page) -> web.StreamResponse:
    if not request.app[SESSIONS_KEY].configured and page.handler is not static_file:
        # No token opens a session: a sign-in form would only wait for one that cannot work.
        return problem_page(request, admin_not_configured("Console", "its pages"))
    if request.method == "POST":
        # The API's limit per client address, so that the sign-in form is no faster way to guess tokens.
        wait = address_wait(request)
        if wait is not None:
            return throttled_page(request, wait)
        if not same_origin(request):
            raise origin_refusal(request)
    if page.role == "public":
        return await handler(request)
    session = request.app[SESSIONS_KEY].read(request.cookies.get(COOKIE))
    if session is not None and await request.app[SIGN_OUTS].includes(session.id):
        session = None  # signed out: a copy of its cookie opens nothing either
    if session is None:
        if request.method == "GET":
            return see_other(sign_in_page(request))
        raise ApiError("Unauthorized", "sign in to the console first", status=401)
    request[SESSION] = session
    if request.method == "POST":
        form = await read_form(request)
        if form.get(CSRF_FIELD) != session.csrf:
            raise Forbidden("the form's CSRF token is missing or not this session's")
    if page.role == "admin" and not session.may_act:
        raise Forbidden("the viewer role may look, not act")
    return await handler(request)


def problem_page(
    request: web.Request, error: ApiError | KubernetesUnavailable | ApiException
) -> web.Response:
    """An error as a page of the console (a Customer not found, the API server away, an action refused),
    with the status and headers the API would answer with, and the way back to the page a form was sent
    from (the browser's Back keeps what was typed in it)."""
    problem = problem_of(error)
    back = urlsplit(request.headers.get("Referer", "")).path if request.method == "POST" else ""
    response = render(
        request,
        "problem.html.j2",
        status=problem.status,
        problem=problem,
        back=back if back.startswith("/admin/") else "",
    )
    response.headers.update(problem.headers)
    return response


async def _read_sign_outs(app: web.Application) -> set[str]:
    async with app[SESSIONS]() as db:
        return await data.signed_out(db)


def register(app: web.Application, settings: Settings) -> None:
    """The console's routes on `app`, for console_guard to find with the role each needs."""
    app[TEMPLATES] = templates()
    app[SESSIONS_KEY] = Sessions(settings)
    app[SIGN_OUTS] = SignOuts(lambda: _read_sign_outs(app))
    app[PAGES_KEY] = {app.router.add_route(page.method, page.path, page.handler): page for page in PAGES}


__all__ = ["PAGES", "Page", "console_guard", "register", "same_origin"]
