"""One reconcile pass of a Customer, as a table of contents: namespace, licence, the notifications'
webhook secret, release, health, status.

Every step checks before it acts, so a pass repeated after a crash at any point converges.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar, cast

from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import (
    LICENSE_SECRET_NAME,
    RETRIED_FAILURE_REASONS,
    ConditionType,
    Customer,
    CustomerMetadata,
    CustomerStatus,
    InvalidSpecError,
    Phase,
    customer_id_in_use,
    name_errors,
    namespace_for,
    parse_spec,
    unpinned_customer_id,
)
from iotistic_billing.db.pool import DATABASE_UNREACHABLE, database_unreachable
from iotistic_billing.k8s import SecretData, resource_version
from iotistic_billing.licensing.minting import MintingError
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.deployments import instance_health
from iotistic_billing.operator.entitlement import effective_plan, trial_started
from iotistic_billing.operator.license import ensure_license
from iotistic_billing.operator.manifests import namespace_as_applied, namespace_manifest
from iotistic_billing.operator.metrics import (
    LICENSE_EXPIRY,
    RECONCILE_DURATION,
    RECONCILE_ERRORS,
    RECONCILES,
    report_stall,
)
from iotistic_billing.operator.outcomes import NamespaceRefused, NotificationsOutcome, PassOutcome
from iotistic_billing.operator.refusals import NamespaceGoing, Refused, refused_as
from iotistic_billing.operator.release import ensure_release, log_left_out
from iotistic_billing.operator.state import (
    PassTarget,
    answered_request,
    chart_target,
    namespace_refusal,
    next_status,
    over_current,
    pass_target,
    refused_status,
    stall_of,
    stalled_status,
    waiting_status,
)
from iotistic_billing.operator.trial_history import first_licensed_at, started_as_passed, trial_counts
from iotistic_billing.operator.webhook_secret import ensure_webhook_secret
from iotistic_billing.rollout import settled_version
from iotistic_billing.stripe_inbox.restore import live_on_plan

log = logging.getLogger(__name__)


# A pass whose status patch loses this many races in a row fails, and Kopf retries the pass.
STATUS_CONFLICT_RETRIES = 3


class StatusConflict(Exception):
    """The Customer kept changing between the pass's read and its status patch."""


A = TypeVar("A")
B = TypeVar("B")


async def together(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both awaited at once; the first failure is raised once both have ended."""
    one, two = await asyncio.gather(first, second, return_exceptions=True)
    for outcome in (one, two):
        if isinstance(outcome, BaseException):
            raise outcome
    return cast(A, one), cast(B, two)


@dataclass(frozen=True)
class PassResult:
    """How a pass ended, for the handler to turn into Kopf's retry semantics and Events."""

    status: CustomerStatus
    previous_phase: str | None
    permanent_error: str | None = None
    temporary_error: str | None = None
    # The dunning step before the pass (PaymentOverdue's reason), for the Event of a step change.
    previous_payment_step: str | None = None
    # Why the Customer was stalled before the pass (state.stall_of), for the Event of a new stall.
    previous_stall: tuple[str, str] | None = None
    # Ready's reason and message before the pass, for the Event of a retried failure that starts or
    # changes (a refusal's by its message too: REFUSED_ONCE_A_MESSAGE).
    previous_ready_reason: str | None = None
    previous_ready_message: str | None = None
    # The Customer's, for the Events of a pass no Kopf handler ran (`kubectl describe` matches the uid).
    uid: str | None = None
    # Warning Events of what the pass went on without (reason, message): a refused apply of the
    # Customer's own namespace, a copy of a withdrawn signing key that could not be deleted.
    warnings: tuple[tuple[str, str], ...] = ()
    # The Customer's labels as its status patch answered them (None: nothing patched, or gone), so that a
    # relabel to another shard while the pass ran is seen before the pass's metrics are set (reconcile).
    labels: Mapping[str, str] | None = None

    @property
    def payment_step_changed(self) -> bool:
        now = self.status.condition(ConditionType.PAYMENT_OVERDUE)
        if now is None or now.reason == self.previous_payment_step:
            return False
        return self.previous_payment_step is not None or now.status == "True"  # not a first "current"

    @property
    def events(self) -> list[tuple[str, str, str]]:
        """The Events of the pass (type, reason, message): a new phase, a new dunning step, why it stalled
        (once per reason and message, not on every pass that finds it so); the same whichever handler,
        daemon or watch started the pass."""
        events: list[tuple[str, str, str]] = []
        phase = self.status.phase
        if phase != self.previous_phase and phase is not None:
            kind = "Warning" if phase in (Phase.FAILED, Phase.DEGRADED, Phase.EXPIRED) else "Normal"
            events.append((kind, str(phase), f"phase {self.previous_phase or 'none'} -> {phase}"))
        if self.payment_step_changed:
            overdue = self.status.condition(ConditionType.PAYMENT_OVERDUE)
            assert overdue is not None
            kind = "Normal" if overdue.status == "False" else "Warning"
            events.append((kind, f"Payment{overdue.reason}", overdue.message))
        if self.permanent_error is not None and stall_of(self.status) != self.previous_stall:
            events.append(("Warning", "ReconcileFailed", self.permanent_error))
        ready = self.status.condition(ConditionType.READY)
        if (
            self.temporary_error is not None
            and ready is not None
            and ready.reason in RETRIED_FAILURE_REASONS
            and (
                ready.reason != self.previous_ready_reason
                or (ready.reason in REFUSED_ONCE_A_MESSAGE and ready.message != self.previous_ready_message)
            )
        ):
            events.append(("Warning", ready.reason, f"{self.temporary_error} (retried)"))
        events.extend(("Warning", reason, message) for reason, message in self.warnings)
        return events


# Ready's reasons whose Event is posted once a cause, the API server's words in its message (another
# policy refusing, or RBAC after the policy was mended, is told); not helm's failures, whose messages
# differ from try to try.
REFUSED_ONCE_A_MESSAGE = frozenset({c.NAMESPACE_REFUSED, c.LICENSE_SECRET_REFUSED})


@dataclass(frozen=True)
class LeftShard:
    """How a pass ends when the Customer is another shard's now: `body`, the Customer as the pass read
    it, for the handler to drop what this process keeps of it (handlers.drop_customer)."""

    body: dict[str, Any]


async def reconcile(
    ctx: OperatorContext,
    name: str,
    now: datetime | None = None,
    deployment_event: int | None = None,
    handed: Mapping[str, Any] | None = None,
) -> PassResult | LeftShard | None:
    """Bring Customer `name` to its desired state; None when it is gone or being deleted, or when the
    pass was asked for by the Deployment event of tick `deployment_event` and a pass since saw it;
    LeftShard when it is another shard's, found so at the start or in the status patch's answer.
    `handed`: the Customer as Kopf handed it to the handler starting the pass."""
    # Kopf's copy is as new as the last event Kopf saw only if the pass starts at once: one that waited
    # behind another pass or for a slot (a thousand Customers applied together) reads the Customer, or
    # a spec changed meanwhile would be licensed and installed twice, once as it was.
    prompt = not ctx.locks.busy(name) and not ctx.pass_slots.locked()
    async with ctx.locks.held(name):
        covered = deployment_event is not None and ctx.deployments.judged_since(
            namespace_for(name), deployment_event
        )
        if covered:
            return None
        async with ctx.pass_slots:
            body = await current_customer(ctx, name, handed if prompt else None)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            if not ctx.shard.owns(body["metadata"].get("labels")):
                # A Deployment or Secret event of another shard's Customer, or a Customer relabelled away
                # whose DELETED this shard missed (a re-list after a watch outage makes none).
                return LeftShard(body)
            with RECONCILE_DURATION.time():
                try:
                    result = await _reconcile(ctx, body, now or ctx.clock())
                except Exception as error:
                    RECONCILES.labels("error").inc()
                    RECONCILE_ERRORS.labels(type(error).__name__).inc()
                    raise
            if result.labels is not None and not ctx.shard.owns(result.labels):
                # Relabelled while the pass ran: its licence expiry and stall are the new shard's to
                # export, and set here they outlived customer_gone's removal (a false expiry alert weeks on).
                return LeftShard(body)
            _count(name, result)
            return result


async def current_customer(
    ctx: OperatorContext, name: str, handed: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The Customer a pass (or the finalizer) starts from: the body Kopf handed over, unless this process
    has written the Customer since (a GET saved), else read. A write of someone else's since then fails
    the conditional status patch, which reads again."""
    if handed is not None and resource_version(handed) >= ctx.written.get(name, 0):
        return dict(handed)
    return await ctx.kube.read_customer(name)


def _count(name: str, result: PassResult) -> None:
    status = result.status
    if status.customer_id and status.license and status.license.expires_at:
        LICENSE_EXPIRY.labels(status.customer_id).set(status.license.expires_at.timestamp())
    # A stall under its own reason: an invalid spec marks no step's condition (an earlier failure's stays).
    stall = stall_of(status) if result.permanent_error is not None else None
    report_stall(name, stall[0] if stall is not None else None)
    if result.permanent_error is None and result.temporary_error is None:
        RECONCILES.labels("success").inc()
        return
    RECONCILES.labels("stalled" if result.permanent_error is not None else "retry").inc()
    if stall is not None:
        failing = stall[0]
    else:
        # A step that failed; else what the pass waited for before any step (NamespaceTerminating).
        failing = next(
            (
                condition.reason
                for condition in status.conditions or ()
                if condition.type in (ConditionType.LICENSE_ISSUED, ConditionType.RELEASE_DEPLOYED)
                and condition.status == "False"
            ),
            None,
        ) or _waiting_reason(status)
    RECONCILE_ERRORS.labels(failing).inc()


def _waiting_reason(status: CustomerStatus) -> str:
    reconciling = status.condition(ConditionType.RECONCILING)
    waits = (c.NAMESPACE_TERMINATING, c.NAMESPACE_REFUSED, c.SUBSCRIPTION_RESTORE_PENDING)
    if reconciling is not None and reconciling.reason in waits:
        return reconciling.reason
    return "Unknown"


async def _reconcile(ctx: OperatorContext, body: dict[str, Any], now: datetime) -> PassResult:
    meta: dict[str, Any] = body["metadata"]
    previous = CustomerStatus.model_validate(body.get("status") or {})
    generation = int(meta.get("generation", 1))
    try:
        # A name the CRD refuses today, on a Customer created before the rule: its namespace cannot exist.
        if problems := name_errors(str(meta.get("name", ""))):
            raise InvalidSpecError(problems)
        spec = parse_spec(body.get("spec") or {})
        customer = Customer(metadata=CustomerMetadata.model_validate(meta), spec=spec, status=previous)
    except InvalidSpecError as invalid:
        status = stalled_status(previous, generation, c.INVALID_SPEC, str(invalid), now)
        status = answered_request(status, meta.get("annotations") or {})
        return await write_status(ctx, body, previous, status, permanent=str(invalid))
    restricted_for = timedelta(days=ctx.settings.dunning_restrict_days)
    first_licensed, unread = await _first_licensed(ctx, customer, customer_id_in_use(body), now)
    version, source = chart_target(customer, previous.release, ctx.fleet_moves_at_once)
    target = pass_target(
        body,
        customer,
        ctx.settings.base_domain,
        now,
        (version or await fleet_version(ctx, body, customer, now, first_licensed), source),
        restricted_for,
        first_licensed,
    )

    warnings: list[tuple[str, str]] = []
    uid = str(meta.get("uid") or "")
    if uid not in ctx.told_unpinned and (unpinned := unpinned_customer_id(body)) is not None:
        # Once a process (not each pass): what it says holds until Git pins the id, which ends it. Counted
        # told once its Event is posted (handlers.post_pass_events): a pass that fails drops it.
        warnings.append((c.CUSTOMER_ID_NOT_PINNED, unpinned))
    if (pending := await _subscription_to_restore(ctx, body, target, first_licensed)) is not None:
        status = answered_request(
            # In the phase it had (Pending, new): Expired would say the lapse it waits to learn is none.
            waiting_status(
                previous,
                target,
                c.SUBSCRIPTION_RESTORE_PENDING,
                pending,
                generation,
                phase=Phase(previous.phase) if previous.phase else Phase.PENDING,
            ),
            meta.get("annotations") or {},
        )
        return await write_status(ctx, body, previous, status, temporary=pending, warnings=warnings)
    try:
        secret = await _namespace_and_secret(
            ctx, target, made_before=previous.instance is not None, warnings=warnings
        )
        if not isinstance(secret, NamespaceRefused):
            outcome = await _licence_and_notifications(ctx, target, secret, unread)
    except Refused as refused:
        # A read of the namespace or its Secret refused (an admission policy, RBAC): said in Ready and
        # Reconciling, retried (it raised into the handler's traceback, and a new Customer had no status
        # and no Event at all). The namespace is there, and an instance that served runs on: Degraded.
        secret = NamespaceRefused(c.NAMESPACE_REFUSED, str(refused), permanent=False, runs_on=True)
    except NamespaceGoing as going:
        # A write into a namespace being deleted or gone (403 NamespaceTerminating, 404): no policy's
        # refusal. The next pass reads the namespace (not trusted as applied) and waits or makes it again.
        ctx.applied_namespaces.pop(target.namespace, None)
        secret = NamespaceRefused(c.NAMESPACE_TERMINATING, str(going), permanent=False)
    if isinstance(secret, NamespaceRefused):
        status = answered_request(
            refused_status(previous, target, secret, generation), meta.get("annotations") or {}
        )
        if secret.permanent:
            return await write_status(
                ctx, body, previous, status, permanent=secret.message, warnings=warnings
            )
        return await write_status(ctx, body, previous, status, temporary=secret.message, warnings=warnings)
    notifications = outcome.notifications
    if notifications is not None and notifications.copy_kept:
        was = previous.condition(ConditionType.NOTIFICATIONS_READY)
        if was is None or (was.reason, was.message) != (notifications.reason, notifications.message):
            warnings.append((notifications.reason, notifications.message))  # once a cause, as Ready's

    read_at: int | None = None
    if outcome.license is not None:
        release = await ensure_release(
            ctx, target, outcome.license, previous.release, may_exist=secret is not None
        )
        log_left_out(target.name, release, previous.condition(ConditionType.RELEASE_DEPLOYED))
        outcome = replace(outcome, release=release)
        if release.deployed:
            read_at = ctx.deployments.mark()
            deployments = await ctx.deployments.of(target.namespace, helm_ran=release.result != "unchanged")
            enabled = spec.instance.enabled and not spec.suspended
            expected = release.release.deployments if release.release is not None else None
            outcome = replace(outcome, health=instance_health(deployments, enabled, expected))

    status = answered_request(
        next_status(previous, target, outcome, generation), meta.get("annotations") or {}
    )
    if outcome.stalled_reason is not None:
        result = await write_status(ctx, body, previous, status, permanent=outcome.failure, warnings=warnings)
    else:
        result = await write_status(ctx, body, previous, status, temporary=outcome.failure, warnings=warnings)
    if read_at is not None:
        ctx.deployments.judged(target.namespace, read_at)
    return result


async def _first_licensed(
    ctx: OperatorContext, customer: Customer, customer_id: str, now: datetime
) -> tuple[datetime | None, str | None]:
    """The first licence the history holds of the Customer's customer id (trial_history.py), read only
    when trial.days decides its licence. With PostgreSQL away, where an earlier pass of the object
    counted from (its status.trial.endsAt: after a restart every trial's first pass reads the history,
    and failing it left current licences LicenseIssued False for the whole outage); without one, None
    and why, for the licence step to issue none: a trial counted from the object's creation would be a
    new one for a Customer made again."""
    if not trial_counts(customer, now, timedelta(days=ctx.settings.dunning_restrict_days)):
        return None, None
    try:
        return await first_licensed_at(ctx, customer_id), None
    except Exception as error:
        if not database_unreachable(error):
            raise
        if (counted := started_as_passed(customer)) is not None:
            return counted, None
        return None, (
            f"{DATABASE_UNREACHABLE} ({type(error).__name__}): the licence history, where a Customer"
            " made again finds its trial's start, cannot be read; retried until it is back"
        )


# How long after its creation a Stripe-billed Customer made again waits for the inbox to give its
# subscription back (every RESTORE_SECONDS, a minute), rather than be installed on what its trial left.
# Bounded: a restore that never comes (its customer id another Customer's too) leaves it waiting no longer.
SUBSCRIPTION_RESTORE_WAIT = timedelta(minutes=10)


async def other_holder(ctx: OperatorContext, body: Mapping[str, Any], customer_id: str) -> str | None:
    """The name of another live Customer (not being deleted) whose customer id in use is `customer_id`,
    if any, for a deletion, which revokes the id's licences by the answer: from a list of the Customers
    started after this asks (shared with the deletions asking meanwhile), none older. Nothing cheaper can
    tell: the directory's mirror keeps one name per customer id, whichever Customer minted last."""
    return await ctx.customer_id_holders.fresh_holder(body["metadata"].get("uid"), customer_id)


def _made_again(target: PassTarget, created: datetime, first_licensed: datetime | None) -> bool:
    """Whether the Customer replaces an earlier object of its customer id: its first licence is older
    than it, or, a signup's trial (trial.endsAt, for which no history is read), that trial ended first."""
    if first_licensed is not None:
        return first_licensed < created
    ends_at = target.spec.trial.ends_at
    return ends_at is not None and ends_at < created


async def _subscription_to_restore(
    ctx: OperatorContext, body: Mapping[str, Any], target: PassTarget, first_licensed: datetime | None
) -> str | None:
    """Why the pass waits for the inbox's restore (stripe_inbox/restore.py), or None: a Stripe-billed
    Customer without spec.subscription (a manifest never has it), made again (_made_again) within
    SUBSCRIPTION_RESTORE_WAIT, whose trial ended, while a live subscription row on a plan names its
    customer id. Its first pass installed it unlicensed (a paying customer whose trial ended months
    ago), up to a minute before the restore upgraded it. With PostgreSQL away, None: the inbox cannot
    restore meanwhile either, and the pass goes on as its licence step can."""
    customer = target.customer
    created = customer.metadata.creation_timestamp
    if (
        target.spec.billing.mode != "stripe"
        or target.spec.subscription is not None
        or not target.entitlement.lapsed
        or created is None
        or not _made_again(target, created, first_licensed)
        or target.now - created > SUBSCRIPTION_RESTORE_WAIT
    ):
        return None
    try:
        async with ctx.sessions() as session:
            live = (await live_on_plan(session, [target.customer_id])).get(target.customer_id)
    except Exception as error:
        if not database_unreachable(error):
            raise
        # Its start known from its status (an earlier pass licensed it so): the restore cannot run either.
        return None
    # The restore hands over none to a customer id two Customers hold (restore.unsubscribed). Asked of a
    # list seconds old, shared: this runs at each retry of each Customer waiting, and the wait is bounded.
    if live is None:
        return None
    if (
        await ctx.customer_id_holders.recent_holder(body["metadata"].get("uid"), target.customer_id)
        is not None
    ):
        return None
    return (
        f"customer id {target.customer_id} has live Stripe subscription {live}, which the Stripe inbox"
        " gives back to a Customer made again within a minute; waiting for it rather than installing the"
        " instance on the unlicensed plan its trial left"
    )


async def _licence_and_notifications(
    ctx: OperatorContext, target: PassTarget, secret: SecretData | None, unread: str | None = None
) -> PassOutcome:
    """The licence step, then the notifications step, each failure its condition's. `unread`: why the
    trial's start is not known (_first_licensed), and so no licence is issued."""
    try:
        if unread is not None:
            outcome = PassOutcome(license_unavailable=unread)
        else:
            outcome = PassOutcome(license=await ensure_license(ctx, target, secret))
    except MintingError as error:
        outcome = PassOutcome(license_error=str(error))
    except Refused as refused:
        # The licence in force stays in status.license; LicenseIssued and Ready say the new one is not
        # written (a refused renewal left them True with the old expiry until it ran out).
        outcome = PassOutcome(license_refused=str(refused))
    except Exception as error:
        if not database_unreachable(error):
            raise
        # A dependency away, not a bug: said in LicenseIssued and by one line of Kopf's retry, no traceback.
        outcome = PassOutcome(license_unavailable=license_unrecorded(error))
    try:
        notifications = await ensure_webhook_secret(ctx, target)
    except Refused as refused:
        # Ready does not wait on it; the housekeeping looks again every minute while it is False.
        notifications = NotificationsOutcome(False, c.NOTIFICATIONS_SECRET_REFUSED, str(refused))
    return replace(outcome, notifications=notifications)


def license_unrecorded(error: BaseException) -> str:
    """LicenseIssued's message while PostgreSQL is away: a licence is issued only once its history row
    and usage key are written (a Secret written before them is recorded by the retry, license.py)."""
    return (
        f"{DATABASE_UNREACHABLE} ({type(error).__name__}): the licence's history and usage key cannot be"
        " written; retried until it is back"
    )


async def _namespace_and_secret(
    ctx: OperatorContext,
    target: PassTarget,
    made_before: bool,
    warnings: list[tuple[str, str]] | None = None,
) -> SecretData | NamespaceRefused | None:
    """The Customer's namespace made, or found to be its own, and its licence Secret read (None: none
    yet); or why the pass may not work there (manifests.namespace_holder): someone else's namespace is
    never written to, and one being deleted is waited for, nothing in it reused.

    A first pass creates the namespace: the API server answers 409 when one exists, and only then is it
    read, so a new Customer costs one request here (a new namespace holds no Secret to read). A Customer
    whose earlier pass made it (`made_before`: its status reports it) has it read beside its Secret and
    applied only when it lacks the operator's labels or owner. A namespace this process applied as it is
    now is not looked at again while its Secret is there: applying it again was one of the three API
    calls of every pass a Deployment event starts. Labels someone edits on the namespace are therefore
    put back at the operator's next start, not at the next pass.

    A read the API server refuses (4xx) raises Refused naming it; a create it refuses is NamespaceRefused
    when no namespace of the name is there (so nothing runs on: not runs_on). Its refusal of the apply of
    the Customer's own namespace (a policy on UPDATE the operator's labels do not pass) is a Warning
    Event in `warnings` and the pass goes on: the namespace is usable as it is, and ending there left the
    licence unrenewed until it ran out. It is tried again at the operator's next start, as labels someone
    edits are."""
    namespace = target.namespace
    manifest = namespace_manifest(namespace, target.name, target.customer_id, target.owner)
    read_secret = partial(_asked, f"to read Secret {namespace}/{LICENSE_SECRET_NAME}")
    if ctx.applied_namespaces.get(namespace) == manifest:
        secret = await read_secret(ctx.kube.read_secret_data(namespace, LICENSE_SECRET_NAME))
        if secret is not None:
            return secret
        # The Secret deleted, or the namespace with it (and someone else's made since): looked at again.
        del ctx.applied_namespaces[namespace]
        made_before = True
    refused_create: NamespaceRefused | None = None
    if not made_before:
        created = await _created(ctx, manifest)
        if isinstance(created, NamespaceRefused):
            # RBAC and admission answer before the API server finds one of the name exists: a namespace
            # handed over (made by GitOps with the labels a policy on create asks for) is read all the same.
            refused_create = created
        elif created:
            ctx.applied_namespaces[namespace] = manifest
            return None
    existing, secret = await together(
        _asked(f"to read namespace {namespace}", ctx.kube.read_namespace(namespace)),
        read_secret(ctx.kube.read_secret_data(namespace, LICENSE_SECRET_NAME)),
    )
    if existing is None and refused_create is not None:
        return refused_create
    if existing is None:  # gone since the Customer's last pass
        created = await _created(ctx, manifest)
        if isinstance(created, NamespaceRefused):
            return created
        if created:
            ctx.applied_namespaces[namespace] = manifest
            return None
        return NamespaceRefused(  # by someone else between the read and the create: judged next time
            c.NAMESPACE_TERMINATING,
            f"namespace {namespace} was just created by someone else; looked at again",
            False,
        )
    if (refused := namespace_refusal(existing, target)) is not None:
        return refused
    if not namespace_as_applied(existing, manifest):
        try:
            await _asked(f"to apply namespace {namespace}", ctx.kube.apply(manifest))
        except Refused as refused:
            said = f"{refused}; the namespace is used as it is"
            log.warning("Customer %s: %s", target.name, said, extra={"customer": target.name})
            if warnings is not None:
                warnings.append((c.NAMESPACE_REFUSED, said))
    ctx.applied_namespaces[namespace] = manifest
    return secret


async def _created(ctx: OperatorContext, manifest: dict[str, Any]) -> bool | NamespaceRefused:
    """The namespace created (False: one of its name exists), or the API server's refusal of it."""
    try:
        return await _asked(
            f"to create namespace {manifest['metadata']['name']}", ctx.kube.create_namespace(manifest)
        )
    except Refused as refused:
        return NamespaceRefused(c.NAMESPACE_REFUSED, str(refused), permanent=False)


async def _asked(doing: str, request: Awaitable[A]) -> A:
    """`request`'s answer; its refusal (4xx) as Refused, saying `doing`."""
    with refused_as(doing):
        return await request


async def fleet_version(
    ctx: OperatorContext,
    body: dict[str, Any],
    customer: Customer,
    now: datetime,
    first_licensed: datetime | None = None,
) -> str:
    """The version the fleet has settled on for a Customer that runs none of its own yet: the newest
    Succeeded InstanceRollout selecting it, else INSTANCE_CHART_VERSION. Listed only for such
    Customers (new ones), so a thousand Ready Customers list no rollouts.

    Selected by the plan this pass gives it, as rollouts select by the status's: before its first status
    a Stripe-billed professional Customer (re-created from Git, say) has spec.plan's default, trial, and
    started on the trial fleet's version."""
    if ctx.fleet_moves_at_once:
        return ctx.charts.fleet_version
    created = trial_started(customer.metadata.creation_timestamp or now, first_licensed)
    restricted_for = timedelta(days=ctx.settings.dunning_restrict_days)
    plan = effective_plan(customer.spec, created, now, restricted_for).plan
    as_passed = {**body, "status": {**(body.get("status") or {}), "plan": plan}}
    return settled_version(await ctx.kube.list_rollouts(), as_passed) or ctx.charts.fleet_version


async def write_status(
    ctx: OperatorContext,
    body: dict[str, Any],
    previous: CustomerStatus,
    status: CustomerStatus,
    permanent: str | None = None,
    temporary: str | None = None,
    warnings: Sequence[tuple[str, str]] = (),
) -> PassResult:
    """The one status patch of the pass, only when something changed.

    A merge patch replaces the conditions list, so the patch is conditional on the resourceVersion the
    pass read: when usage metering wrote status.usage or WithinLimits meanwhile, the API server answers
    409 and the pass's status is laid over the Customer as it is now (their fields kept) and sent again.
    """
    name: str = body["metadata"]["name"]
    read_version: str = body["metadata"]["resourceVersion"]
    overdue = previous.condition(ConditionType.PAYMENT_OVERDUE)
    ended = partial(
        PassResult,
        previous_phase=previous.phase,
        permanent_error=permanent,
        temporary_error=temporary,
        previous_payment_step=overdue.reason if overdue is not None else None,
        previous_stall=stall_of(previous),
        previous_ready_reason=ready.reason if (ready := previous.condition(ConditionType.READY)) else None,
        previous_ready_message=ready.message if ready is not None else None,
        uid=body["metadata"].get("uid"),
        warnings=tuple(warnings),
    )
    if status.to_k8s() != previous.to_k8s():
        log.info(
            "Customer %s: phase %s, plan %s",
            name,
            status.phase,
            status.plan,
            extra={"customer": name, "customer_id": status.customer_id, "error": permanent or temporary},
        )
    for _attempt in range(STATUS_CONFLICT_RETRIES):
        if status.to_k8s() == previous.to_k8s():
            return ended(status)
        patched = await _patched(ctx, name, merge_patch(previous.to_k8s(), status.to_k8s()), read_version)
        if patched is not None:
            for wakeup in ctx.rollout_wakeups:
                wakeup.set()
            return ended(status, labels=(patched["metadata"].get("labels") or {}) if patched else None)
        current = await ctx.kube.read_customer(name)
        if current is None or current["metadata"].get("uid") != body["metadata"].get("uid"):
            # Gone, or deleted and created again under its name: the new Customer's status is not this
            # pass's to write (the old customer id, licence and release would stay on it for good).
            return ended(status)
        previous = CustomerStatus.model_validate(current.get("status") or {})
        status = over_current(status, previous)
        read_version = current["metadata"]["resourceVersion"]
    raise StatusConflict(f"the status of Customer {name} kept changing under the pass")


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` as a JSON merge patch over `old`: a field `old` has and `new` lacks is patched to null, since
    a merge patch leaves the fields it does not name as they are (status.trial.endsAt of a trial that
    became a paid plan stayed, and every later pass patched again to remove it)."""
    patch = dict(new)
    for key, value in old.items():
        if key not in new:
            patch[key] = None
        elif isinstance(value, dict) and isinstance(new[key], dict):
            patch[key] = merge_patch(value, new[key])
    return patch


async def _patched(
    ctx: OperatorContext, name: str, patch: dict[str, Any], read_version: str
) -> dict[str, Any] | None:
    """The Customer as patched; None when it changed since `read_version` (409); a Customer gone counts
    as done ({}). The patched Customer goes into the Customer view at once: the rollout tick this write
    wakes reads the view, and the watch's copy of the write can come after the tick (it then waited a
    whole tick)."""
    try:
        patched = await ctx.kube.patch_customer_status(name, patch, read_version)
    except ApiException as error:
        if error.status == 409:
            return None
        if error.status != 404:
            raise
        return {}
    ctx.written[name] = resource_version(patched)
    ctx.customer_view.saw(patched)
    return patched
