"""What the console's pages show, read from the same places the JSON API reads (the Customers through
the directory, PostgreSQL's records), and its audit of actions. No HTML here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final

from sqlalchemy import ColumnElement, Date, and_, cast, delete, func, or_, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import RETRIED_FAILURE_REASONS, Phase, gitops_manager, shown_phase
from iotistic_billing.db import models
from iotistic_billing.directory import CustomerRecord, LeftBilling, UnreadableCustomer
from iotistic_billing.rollout import TERMINAL_PHASES, RolloutSpec, RolloutStatus, StepStatus
from iotistic_billing.usage.periods import INSTANT, BillingPeriod
from iotistic_billing.usage.reports import earliest_start_reaching

# The phases a person should look at first, and the condition that says why.
FAILING_PHASES: Final = (Phase.FAILED, Phase.DEGRADED)
PAGE_SIZE: Final = 50
# What the Stripe events page filters by: the results the inbox records, and "failed" (pending after a
# failed try).
EVENT_RESULTS: Final = ("pending", "failed", "applied", "unmatched", "stale", "superseded", "ignored")


@dataclass(frozen=True)
class FailingCustomer:
    name: str
    phase: str
    reason: str
    message: str
    since: datetime | None


@dataclass(frozen=True)
class InboxStats:
    pending: int
    retrying: int  # pending, with a failed try (the API server or the database was away)
    unmatched: int
    oldest_pending: datetime | None


@dataclass(frozen=True)
class Overview:
    customers: int
    phases: dict[str, int]
    failing: list[FailingCustomer]
    inbox: InboxStats
    trials_ending: list[tuple[str, datetime]]
    licences_expiring: list[tuple[str, datetime]]
    reports_last_hour: int
    customers_reporting: int
    notices_pending: int
    notices_dead: int
    # Subscriptions Stripe bills for a deleted Customer (Directory.subscriptions_left_billing).
    left_billing: Sequence[LeftBilling] = ()


def phase_of(record: CustomerRecord) -> str:
    return shown_phase(record.customer.status.phase)


def failing(records: Iterable[CustomerRecord]) -> list[FailingCustomer]:
    """Failed and Degraded Customers, any Stalled one, and any whose step fails and is retried (a first
    install the registry refuses, say), longest first."""
    found = []
    for record in records:
        status = record.customer.status
        stalled = status.condition("Stalled")
        is_stalled = stalled is not None and stalled.status == "True"
        ready = status.condition("Ready")
        retried = ready is not None and ready.status == "False" and ready.reason in RETRIED_FAILURE_REASONS
        if not is_stalled and not retried and status.phase not in FAILING_PHASES:
            continue
        why = stalled if is_stalled else status.condition("Ready")
        found.append(
            FailingCustomer(
                name=record.name,
                phase=phase_of(record),
                reason=why.reason if why else "",
                message=why.message if why else "",
                since=why.last_transition_time if why else None,
            )
        )
    return sorted(found, key=lambda f: (f.since is None, f.since or datetime.max))


def unreadable_failing(unreadable: Iterable[UnreadableCustomer]) -> list[FailingCustomer]:
    """Customers this version's models refuse, as ones that need a look: the operator's Stalled
    condition when it wrote one (InvalidSpec), and what the console cannot read."""
    found = []
    for customer in unreadable:
        stalled = next(
            (c for c in customer.conditions if c.get("type") == "Stalled" and c.get("status") == "True"), {}
        )
        since = stalled.get("lastTransitionTime")
        try:
            at = datetime.fromisoformat(since) if isinstance(since, str) else None
        except ValueError:
            at = None
        found.append(
            FailingCustomer(
                name=customer.name,
                phase=customer.phase,
                reason=str(stalled.get("reason") or "Unreadable"),
                message="this console's version cannot read it: " + "; ".join(customer.problems),
                since=at,
            )
        )
    return found


async def inbox_stats(session: AsyncSession) -> InboxStats:
    pending = models.StripeEvent.result == "pending"
    row = (
        await session.execute(
            select(
                func.count().filter(pending),
                func.count().filter(pending & (models.StripeEvent.attempts > 0)),
                func.count().filter(models.StripeEvent.result == "unmatched"),
                func.min(models.StripeEvent.received_at).filter(pending),
            )
        )
    ).one()
    return InboxStats(int(row[0]), int(row[1]), int(row[2]), row[3])


async def overview(
    records: Sequence[CustomerRecord],
    session: AsyncSession,
    now: datetime,
    unreadable: Sequence[UnreadableCustomer] = (),
    left_billing: Sequence[LeftBilling] = (),
) -> Overview:
    soon = now + timedelta(days=7)
    trials = sorted(
        (ends, r.name)
        for r in records
        if (trial := r.customer.status.trial)
        and trial.is_trial_mode
        and (ends := trial.ends_at)
        and now <= ends <= soon
    )
    licences = sorted(
        (expires, r.name)
        for r in records
        if (licence := r.customer.status.license)
        and (expires := licence.expires_at)
        and now <= expires <= soon
    )
    reports = (
        await session.execute(
            select(func.count(), func.count(func.distinct(models.UsageReport.customer_id))).where(
                models.UsageReport.reported_at > now - timedelta(hours=1)
            )
        )
    ).one()
    # Notices, not deliveries (one notice goes to email, the customer's webhook and the platform): as
    # GET /api/notices?status= lists them, a notice is pending while one of its deliveries is, and dead
    # once one is, so one whose email died while its webhook is retried counts in both.
    delivery = models.NoticeDelivery
    notices = (
        await session.execute(
            select(
                func.count(func.distinct(delivery.notice_id)).filter(delivery.status == "pending"),
                func.count(func.distinct(delivery.notice_id)).filter(delivery.status == "dead"),
            ).where(delivery.status.in_(("pending", "dead")))
        )
    ).one()
    return Overview(
        customers=len(records) + len(unreadable),
        phases=dict(Counter([*(phase_of(r) for r in records), *(u.phase for u in unreadable)])),
        failing=sorted(
            failing(records) + unreadable_failing(unreadable),
            key=lambda f: (f.since is None, f.since or datetime.max),
        ),
        inbox=await inbox_stats(session),
        trials_ending=[(name, ends) for ends, name in trials],
        licences_expiring=[(name, expires) for expires, name in licences],
        reports_last_hour=int(reports[0]),
        customers_reporting=int(reports[1]),
        notices_pending=int(notices[0]),
        notices_dead=int(notices[1]),
        left_billing=left_billing,
    )


def matching(
    records: Iterable[CustomerRecord], *, search: str = "", phase: str = "", plan: str = ""
) -> list[CustomerRecord]:
    """Customers whose name, company name, email or customer id holds `search` (in any case), in a phase
    and on a plan; by name."""
    needle = search.strip().lower()
    found = []
    for record in records:
        spec = record.customer.spec
        texts = (record.name, spec.company_name, spec.email, record.customer_id)
        if needle and not any(needle in text.lower() for text in texts):
            continue
        if phase and phase_of(record) != phase:
            continue
        if plan and (record.customer.status.plan or spec.plan) != plan:
            continue
        found.append(record)
    return sorted(found, key=lambda r: r.name)


def _stripe_event_filters(result: str, event_type: str, customer_id: str) -> list[ColumnElement[bool]]:
    event = models.StripeEvent
    filters = []
    if result == "failed":
        filters += [event.result == "pending", event.attempts > 0]
    elif result:
        filters.append(event.result == result)
    if event_type:
        filters.append(event.type == event_type)
    if customer_id:
        filters.append(event.customer_id == customer_id)
    return filters


async def stripe_events(
    session: AsyncSession,
    *,
    result: str = "",
    event_type: str = "",
    customer_id: str = "",
    limit: int = 100,
    before: tuple[datetime, str] | None = None,
    after: tuple[datetime, str] | None = None,
) -> list[models.StripeEvent]:
    """The newest first; the event id orders those received together (one transaction). `before`: those
    older than that (received_at, event_id), `after`: the `limit` just newer than it (still newest first):
    keysets, which events received or replayed meanwhile do not move, so that a page and the next one
    neither repeat nor skip an event (an offset did: a replay on page 1 took a row out of an unmatched
    filter, and page 2 skipped one)."""
    event = models.StripeEvent
    position = tuple_(event.received_at, event.event_id)
    query = select(event).where(*_stripe_event_filters(result, event_type, customer_id)).limit(limit)
    if after is not None:
        query = query.where(position > after).order_by(event.received_at, event.event_id)
        return list(reversed((await session.scalars(query)).all()))
    if before is not None:
        query = query.where(position < before)
    query = query.order_by(event.received_at.desc(), event.event_id.desc())
    return list((await session.scalars(query)).all())


async def count_stripe_events(
    session: AsyncSession, *, result: str = "", event_type: str = "", customer_id: str = ""
) -> int:
    query = select(func.count()).select_from(models.StripeEvent)
    return int(
        await session.scalar(query.where(*_stripe_event_filters(result, event_type, customer_id))) or 0
    )


async def event_types(session: AsyncSession) -> list[str]:
    return list(
        (
            await session.scalars(
                select(models.StripeEvent.type).distinct().order_by(models.StripeEvent.type)
            )
        ).all()
    )


async def audit(
    session: AsyncSession,
    customer_name: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
    *,
    target: str | None = None,
    before: tuple[datetime, int] | None = None,
) -> list[models.ConsoleAction]:
    """The newest actions first, on a Customer or on a `target` (a Stripe event's id, an InstanceRollout's
    name); `since`: none before it. A row names its object only, so a Customer's or a rollout's page
    passes its creationTimestamp: what came before was done to a deleted one of the same name. `before`:
    those after the action of that time and id (a keyset, which actions recorded since do not move)."""
    action = models.ConsoleAction
    # By the time of each, as the page shows them; one transaction's share it: the id breaks ties. A
    # replay's row is written holding its event's lock, after the page its form came from: the newest
    # replay of an event (replay_event's check) is the newest by either.
    query = select(action).order_by(action.at.desc(), action.id.desc()).limit(limit)
    if before is not None:
        query = query.where(tuple_(action.at, action.id) < before)
    if customer_name is not None:
        query = query.where(models.ConsoleAction.customer_name == customer_name)
    if target is not None:
        query = query.where(models.ConsoleAction.target == target)
    if since is not None:
        query = query.where(models.ConsoleAction.at >= since)
    return list((await session.scalars(query)).all())


@dataclass(frozen=True)
class PeriodDay:
    """What a billing period counted on one UTC day: traffic (bytes sent and received) and API calls."""

    day: date
    traffic_bytes: int
    api_calls: int


async def period_days(session: AsyncSession, customer_id: str, period: BillingPeriod) -> list[PeriodDay]:
    """The period's counters by the UTC day they count on, adding up to its totals: as PERIOD_SUMS
    (usage.store) counts a report in the period it ends in (start < period_end <= end), here on the day
    of its end (one ending at midnight, the day before). By the day a report starts (the API's daily
    series), the first day held the period before's reports of that day."""
    report = models.UsageReport
    day = cast(func.timezone("UTC", report.period_end - INSTANT), Date).label("day")
    rows = await session.execute(
        select(
            day,
            func.sum(report.mqtt_bytes_sent)
            + func.sum(report.mqtt_bytes_received)
            + func.sum(report.http_bytes_sent)
            + func.sum(report.http_bytes_received),
            func.sum(report.http_requests),
        )
        .where(
            report.customer_id == customer_id,
            # The partition key's bound, as PERIOD_SUMS: the months before it are not read.
            report.period_start >= earliest_start_reaching(period.start),
            report.period_start < period.end,
            report.period_end > period.start,
            report.period_end <= period.end,
        )
        .group_by(day)
        .order_by(day)
    )
    return [PeriodDay(row[0], int(row[1]), int(row[2])) for row in rows]


@dataclass(frozen=True)
class RolloutStepView:
    takes: str  # "canaries: a, b", "25%", "the rest"
    max_parallel: int
    bake_seconds: int
    progress: StepStatus


@dataclass(frozen=True)
class RolloutView:
    name: str
    created: str
    spec: RolloutSpec
    status: RolloutStatus
    steps: list[RolloutStepView]
    # Its actions' forms carry it: they act on this rollout, not one made again under its name since.
    uid: str = ""

    @property
    def finished(self) -> bool:
        return self.status.phase in TERMINAL_PHASES

    @property
    def created_at(self) -> datetime | None:
        return datetime.fromisoformat(self.created) if self.created else None


def rollout_view(body: dict[str, Any]) -> RolloutView | None:
    """An InstanceRollout as the console shows it; None when the models refuse it."""
    try:
        spec = RolloutSpec.model_validate(body.get("spec") or {})
        status = RolloutStatus.model_validate(body.get("status") or {})
    except ValueError:
        return None
    progress = status.steps or []
    steps = [
        RolloutStepView(
            takes=f"canaries: {', '.join(step.customers)}"
            if step.customers
            else f"{step.percent}%"
            if step.percent
            else "the rest",
            max_parallel=step.max_parallel,
            bake_seconds=step.bake_seconds,
            progress=progress[i] if i < len(progress) else StepStatus(),
        )
        for i, step in enumerate(spec.steps)
    ]
    meta = body["metadata"]
    created = str(meta.get("creationTimestamp", ""))
    return RolloutView(meta["name"], created, spec, status, steps, uid=str(meta.get("uid", "")))


def rollout_views(bodies: list[dict[str, Any]]) -> list[RolloutView]:
    """InstanceRollouts as the console lists them, newest first (one the models refuse is left out)."""
    views = [view for view in map(rollout_view, bodies) if view is not None]
    return sorted(views, key=lambda view: view.created, reverse=True)


async def rollout_actions(
    session: AsyncSession, rollouts: Sequence[RolloutView], limit: int = 20
) -> dict[str, list[models.ConsoleAction]]:
    """The console's newest `limit` actions on each rollout, newest first, in one query: each since its
    creation, as `audit` reads one (not those on a deleted one of the same name)."""
    if not rollouts:
        return {}
    action = models.ConsoleAction
    on_each = [
        and_(action.target == view.name, action.at >= view.created_at)
        if view.created_at is not None
        else action.target == view.name
        for view in rollouts
    ]
    newest = (
        select(
            action.id,
            func.row_number().over(partition_by=action.target, order_by=action.id.desc()).label("rank"),
        )
        .where(or_(*on_each))
        .subquery()
    )
    rows = (
        await session.scalars(
            select(action)
            .join(newest, action.id == newest.c.id)
            .where(newest.c.rank <= limit)
            .order_by(action.id.desc())
        )
    ).all()
    return {view.name: [row for row in rows if row.target == view.name] for view in rollouts}


async def record_action(
    session: AsyncSession,
    *,
    role: str,
    action: str,
    customer_name: str | None,
    target: str | None,
    detail: str,
) -> models.ConsoleAction:
    row = models.ConsoleAction(
        role=role, action=action, customer_name=customer_name, target=target, detail=detail
    )
    session.add(row)
    # Written now, not at the commit: a database that is away stops the action before its write.
    await session.flush()
    return row


async def record_sign_out(session: AsyncSession, session_id: str, expires_at: datetime) -> None:
    """The session ends on the server too (its copies with it); the sign-outs of sessions past their own
    end go, as they open nothing anyway."""
    await session.execute(delete(models.ConsoleSignout).where(models.ConsoleSignout.expires_at < func.now()))
    await session.execute(
        insert(models.ConsoleSignout)
        .values(session_id=session_id, expires_at=expires_at)
        .on_conflict_do_nothing(index_elements=[models.ConsoleSignout.session_id])
    )


async def signed_out(session: AsyncSession) -> set[str]:
    """The ids of the sessions signed out before their end, still within it."""
    rows = await session.scalars(
        select(models.ConsoleSignout.session_id).where(models.ConsoleSignout.expires_at > func.now())
    )
    return set(rows.all())


__all__ = [
    "EVENT_RESULTS",
    "PAGE_SIZE",
    "FailingCustomer",
    "InboxStats",
    "Overview",
    "PeriodDay",
    "RolloutStepView",
    "RolloutView",
    "audit",
    "count_stripe_events",
    "event_types",
    "failing",
    "gitops_manager",
    "inbox_stats",
    "matching",
    "overview",
    "period_days",
    "phase_of",
    "record_action",
    "record_sign_out",
    "rollout_actions",
    "rollout_view",
    "rollout_views",
    "signed_out",
    "stripe_events",
]
