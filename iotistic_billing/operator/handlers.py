"""Kopf registrations: thin handlers that hand over to reconcile(), finalize() and the watches below.
How Kopf itself is tuned is kopf_tuning.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import partial
from typing import Any, cast

import kopf

from iotistic_billing.customer import (
    GROUP,
    KIND,
    PLURAL,
    RECONCILE_REQUESTED_AT,
    VERSION,
    ConditionType,
    Customer,
    InvalidSpecError,
    customer_id_in_use,
    customer_of_namespace,
    namespace_for,
)
from iotistic_billing.k8s import KubernetesUnavailable
from iotistic_billing.operator import constants as c
from iotistic_billing.operator import rollouts
from iotistic_billing.operator.context import OperatorContext, retry_delay
from iotistic_billing.operator.delete import DeletionFailed, finalize
from iotistic_billing.operator.entitlement import trial_started
from iotistic_billing.operator.events import post_events
from iotistic_billing.operator.kopf_tuning import HandledSpecs, configure_kopf
from iotistic_billing.operator.metrics import HOUSEKEEPING_CHECKS, forget_customer
from iotistic_billing.operator.notices import trial_ending_notice, write_trial_ending
from iotistic_billing.operator.reconcile import LeftShard, PassResult, StatusConflict, other_holder, reconcile
from iotistic_billing.operator.state import (
    handled_mark,
    housekeeping_due,
    namespace_freed,
    stalled_on_namespace,
)
from iotistic_billing.operator.trial_history import known_trial_start
from iotistic_billing.operator.watches import (
    INSTANCE_DEPLOYMENTS,
    MANAGED_SECRETS,
    MAX_RETRY_SECONDS,
    RETRY_SECONDS,
    LoopFollower,
)
from iotistic_billing.operator.webhook_secret import WEBHOOK_SECRET_CHECK, webhook_secret_changed
from iotistic_billing.rollout import ROLLOUT_CHART_VERSION, ROLLOUT_RESOURCE, ROLLOUT_UPDATED_AT
from iotistic_billing.workers import backoff, nap

CUSTOMERS = (GROUP, VERSION, PLURAL)
HOUSEKEEPING = "housekeeping"
# Watch events of one Customer arriving within this wait share one pass.
PASS_REQUEST_DELAY = 0.2
log = logging.getLogger(__name__)


def _context(memo: kopf.Memo) -> OperatorContext:
    context: OperatorContext = memo["context"]
    return context


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ctx = _context(memo)
    memo["handled"] = configure_kopf(
        settings, routine=(customer_gone,), customer_selector=ctx.shard.selector()
    )
    # From here on the Deployment watch keeps the operator's view of the instances current.
    ctx.deployments.watched = True
    loop = asyncio.get_running_loop()
    ctx.watches = [
        LoopFollower(ctx.watch_api, INSTANCE_DEPLOYMENTS, loop, partial(deployment_changed, ctx)),
        LoopFollower(ctx.watch_api, MANAGED_SECRETS, loop, partial(managed_secret_changed, ctx)),
    ]
    for watch in ctx.watches:
        watch.start()


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    ctx = _context(memo)
    # First the passes Kopf does not wait for: cancelled, each lets a helm it runs end (helm.py), and
    # none is left to use the clients closed below.
    await ctx.background_passes.stop()
    for watch in ctx.watches:
        watch.stop()
    ctx.customer_view.stop()
    # Calls still queued are cancelled rather than sent while the process exits (its exit waits for
    # the pool's threads), and the connection pools closed.
    ctx.kube.close()
    ctx.kube.api.close()
    ctx.watch_api.close()
    await ctx.engine.dispose()


# Raised out of a pass, failures that a later try mends (the API server away or refusing for load, a
# status that kept changing under the pass): retried after the passes' backoff, one line with the cause.
PASS_FAILURES_RETRIED: tuple[type[Exception], ...] = (KubernetesUnavailable, StatusConflict)


def retry_if_failed(ctx: OperatorContext, name: str, ended: PassResult | Exception) -> None:
    """The one owner of a failed pass's retry, whoever ran the pass (a Kopf handler, the housekeeping, a
    watch): a temporary failure, or an exception, is retried by PassRetries after the backoff of the
    Customer's failures in a row, with a pass of the Customer as it is then, whatever its spec did
    meanwhile; any other end (converged, stalled until something changes) drops a pending retry. One
    warning line a failed try (a traceback only for an error nobody expected)."""
    if isinstance(ended, PassResult) and ended.temporary_error is None:
        ctx.pass_retries.forget(name)
        return
    delay = ctx.pass_retries.failed(name, partial(_retry_pass, ctx, name))
    if isinstance(ended, Exception) and not isinstance(ended, PASS_FAILURES_RETRIED):
        log.error("pass of Customer %s failed; again in %.0f s", name, delay, exc_info=ended)
        return
    cause = ended.temporary_error if isinstance(ended, PassResult) else ended  # an outage is no bug
    log.warning("pass of Customer %s failed temporarily: %s; again in %.0f s", name, cause, delay)


async def _kopf_pass(ctx: OperatorContext, name: str, body: kopf.Body) -> None:
    """A pass a Kopf handler runs. Its failure is retried by retry_if_failed, not by Kopf, so the handler
    ends as handled: Kopf's retry belongs to the spec change it handles, and an edit reverted while the
    retry waited left Kopf no change (the spec as it last handled it) and it dropped the retry, the
    Customer left with the failure's Ready. Only a stall is Kopf's, as a permanent error (no retry)."""
    try:
        result = await reconcile(ctx, name, handed=body)
    except Exception as error:  # the API server or PostgreSQL away, a conflict that went on, a bug
        retry_if_failed(ctx, name, error)
        return
    if isinstance(result, LeftShard):
        await _left_shard(ctx, result)
        return
    if result is None:  # gone or being deleted: nothing to retry
        return
    retry_if_failed(ctx, name, result)
    await post_pass_events(ctx, body, result)
    if result.permanent_error is not None:
        raise kopf.PermanentError(result.permanent_error)


# No backoff of Kopf's: whatever fails a pass is retried by the operator (_kopf_pass).
@kopf.on.resume(*CUSTOMERS)
@kopf.on.create(*CUSTOMERS)
@kopf.on.update(*CUSTOMERS, field="spec")
async def reconcile_customer(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _kopf_pass(_context(memo), name, body)


@kopf.on.field(*CUSTOMERS, field=("metadata", "annotations", RECONCILE_REQUESTED_AT))
async def reconcile_requested(
    name: str, body: kopf.Body, memo: kopf.Memo, new: Any, reason: Any = None, **_: Any
) -> None:
    """A pass now, asked for by the annotation (the console's Reconcile now): also for a Stalled
    Customer, whose spec handler Kopf does not retry until the spec changes."""
    answered = _status_of(body).get("lastHandledReconcileAt") == handled_mark(str(new or ""))
    if new and not (reason == kopf.Reason.CREATE and answered):
        await _kopf_pass(_context(memo), name, body)


def _status_of(body: Any) -> Any:
    return (body.get("status") if body else None) or {}


def _move_read(body: Any, annotations: Any) -> bool:
    """Whether the Customer's last pass installed by this rollout move (status.release names its version
    and updated-at)."""
    release = _status_of(body).get("release") or {}
    version, updated_at = rollout_move(annotations)
    if version is None:
        # Returned to the fleet's version by a rollback (its rollout's name and time kept): read once a
        # pass aimed by the fleet; otherwise every start ran a second pass of it.
        return release.get("versionSource") not in (None, "Rollout")
    return release.get("targetVersion") == version and release.get("rolloutUpdatedAt") == updated_at


def rollout_move(annotations: Any) -> tuple[str | None, str | None]:
    """A Customer's chart-version annotation and the updated-at of the rollout move that set it."""
    annotations = annotations or {}
    return annotations.get(ROLLOUT_CHART_VERSION), annotations.get(ROLLOUT_UPDATED_AT)


@kopf.on.field(*CUSTOMERS, field=("metadata", "annotations"))
async def rollout_version_changed(
    name: str, body: kopf.Body, memo: kopf.Memo, old: Any, new: Any, reason: Any = None, **_: Any
) -> None:
    """A rollout moved the Customer to another chart version (or back), or one set by hand: a pass
    installs it. By the move's updated-at too: a move and its rollback's return that Kopf sees as one
    change (both came while it handled another) leave the version as it was, and the rollback waits for
    a pass that read the return (rollout_plan.member).

    On a creation (after a start every Customer is one: kopf_tuning.HandledSpecs), not when a pass read
    the move already: Kopf calls field handlers then too, one a cycle after the creation's pass, and this
    one and reconcile_requested ran a second and a third pass of each Customer a rollout had moved. A
    move made between those cycles is not in the status yet, and still runs one."""
    if reason == kopf.Reason.CREATE and _move_read(body, new):
        return
    if rollout_move(old) != rollout_move(new):
        await _kopf_pass(_context(memo), name, body)


def register_rollouts() -> None:
    """The InstanceRollouts' daemon, registered only in the shard that advances them (sharding.py): a
    shard that registered it with a filter saying no would still watch the rollouts, and Kopf there
    removes the finalizer that shard 0's daemon needs and adds back, without end."""
    kopf.daemon(*ROLLOUT_RESOURCE, id="rollout", cancellation_timeout=5.0)(rollout_daemon)


async def rollout_daemon(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """An InstanceRollout's ticks (rollouts.advance) while it runs; a finished one is only looked at,
    in Kopf's live body, until its spec asks for a new version."""
    ctx = _context(memo)
    wakeup = asyncio.Event()
    ctx.rollout_wakeups.add(wakeup)
    failures = 0  # ticks failed in a row
    # No Customer's health timeout runs while no operator did: its pass may not have run yet.
    judging_since = ctx.clock()
    try:
        while True:
            # Cleared before the tick: a Customer written during the tick or the quiet time after it
            # (the last of a step turning Ready) starts the next tick as soon as that time is over.
            wakeup.clear()
            if not rollouts.settled(body):
                try:
                    await rollouts.advance(ctx, name, judging_since)
                    failures = 0
                except KubernetesUnavailable as error:  # one line: an outage is no bug of the tick
                    failures += 1
                    log.warning("tick of InstanceRollout %s failed: %s", name, error)
                except Exception:  # a conflict, a bug: the next tick tries again
                    failures += 1
                    log.exception("tick of InstanceRollout %s failed", name)
            # At most a tick per QUIET_SECONDS, however many Customers change; at least one a TICK, or
            # after a failing tick, once its backoff is over (up to MAX_RETRY_SECONDS).
            wait = max(rollouts.TICK_SECONDS, backoff(failures, RETRY_SECONDS, MAX_RETRY_SECONDS))
            await asyncio.sleep(rollouts.QUIET_SECONDS)
            await nap(wakeup, wait - rollouts.QUIET_SECONDS)
    except asyncio.CancelledError:
        return
    finally:
        ctx.rollout_wakeups.discard(wakeup)


@kopf.on.delete(*CUSTOMERS, backoff=5)
async def delete_customer(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """The finalizer (delete.finalize). A step that fails is a Warning Event naming it and why, and the
    deletion is retried after the passes' backoff (every step checks before it acts)."""
    ctx = _context(memo)
    try:
        deletion = await finalize(ctx, dict(body))
    except DeletionFailed as failed:
        # Once a cause: a PostgreSQL outage retried for an hour posted a dozen identical Events.
        if ctx.deletion_failures.get(body.metadata.uid or "") != str(failed):
            ctx.deletion_failures[body.metadata.uid or ""] = str(failed)
            await post_events(ctx.kube, KIND, body, [("Warning", c.DELETION_FAILED, str(failed))])
        raise kopf.TemporaryError(str(failed), delay=retry_delay(retry)) from failed
    ctx.deletion_failures.pop(body.metadata.uid or "", None)
    cast(HandledSpecs, memo["handled"]).forget(body)
    events = [("Normal", c.DELETED, deletion.message())]
    if deletion.uninstall_failed is not None:
        # What was done first: an Event is cut at 1 KiB, and helm says a line per object it cannot build.
        left = f"left to the deletion of namespace {deletion.namespace}: {deletion.uninstall_failed}"
        events.insert(0, ("Warning", c.UNINSTALL_FAILED, left))
    # After the Deleted Event, on the completed deletion only: once, not again for each failed try.
    billing = deletion.subscription_warning()
    if billing is not None:
        events.append(("Warning", c.SUBSCRIPTION_LEFT_ACTIVE, billing))
    await post_events(ctx.kube, KIND, body, events)


async def housekeeping(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Licence renewal, trial end, a lapsed past_due grace: cheap pure checks, a pass only when due;
    the "trial ends soon" notice of the operator's own trials; and for a Customer stalled as
    NamespaceTaken (only), a read of that namespace, as no watch sees it deleted or handed over.

    The Customer is parsed on every check rather than kept parsed between checks (memory over a little
    CPU at idle)."""
    ctx = _context(memo)
    try:
        customer = Customer.model_validate(dict(body))
    except (ValueError, InvalidSpecError):
        return
    now: datetime = ctx.clock()
    # The trial's start its passes read from the licence history, else its status's (none read here: a
    # check costs nothing).
    first_licensed = known_trial_start(ctx, customer, customer_id_in_use(dict(body)))
    created = trial_started(customer.metadata.creation_timestamp or now, first_licensed)
    if not await _trial_notice(ctx, name, customer, body, now, first_licensed):
        return  # another shard's now: dropped here
    restricted_for = timedelta(days=ctx.settings.dunning_restrict_days)
    due = housekeeping_due(
        customer.spec, customer.status, created, now, restricted_for, customer.metadata.generation
    )
    if due is None and stalled_on_namespace(customer.status):
        due = await _taken_namespace_freed(ctx, name, customer.metadata.uid or "")
    if due is None and await _webhook_secret_changed(ctx, customer, now):
        due = c.WEBHOOK_SECRET_CHANGED
    HOUSEKEEPING_CHECKS.labels(due or "nothing").inc()
    if due:
        # A pass the check started finishes even when Kopf stops the daemon meanwhile.
        await asyncio.shield(ctx.background_passes.start(_refresh(ctx, name)))


async def _trial_notice(
    ctx: OperatorContext,
    name: str,
    customer: Customer,
    body: kopf.Body,
    now: datetime,
    first_licensed: datetime | None,
) -> bool:
    """The "trial ends soon" notice, when Kopf's body says it is due, written from the Customer read
    fresh and only while it is this shard's: Kopf's body is as new as the last event Kopf saw, for good
    once the Customer was relabelled away while the watch was down (the re-list makes no DELETED), and a
    trial extended or paid for since was told it ends on the old date by a shard that had left it.
    False when the Customer is another shard's now (dropped here, its housekeeper idle: drop_customer)."""
    notice = trial_ending_notice(customer, dict(body), now, ctx.settings.trial_notice_days, first_licensed)
    if notice is None or notice.key in ctx.noticed:
        return True
    uid = customer.metadata.uid or ""
    try:
        fresh = await ctx.kube.read_customer(name)
    except KubernetesUnavailable as error:  # the next check reads it
        log.warning("Customer %s not read for its trial notice: %s", name, error)
        return True
    meta = fresh["metadata"] if fresh is not None else {}
    if fresh is None or meta.get("uid") != uid or meta.get("deletionTimestamp"):
        return True  # gone or going: its deletion's to handle
    if not ctx.shard.owns(meta.get("labels")):
        await drop_customer(ctx, fresh, uid, fresh, stop_housekeeping=False)
        return False
    try:
        await write_trial_ending(ctx, Customer.model_validate(fresh), fresh, now)
    except (ValueError, InvalidSpecError):
        pass  # a spec refused since: its pass says so
    except Exception:  # a bug (PostgreSQL away is one warning an outage, write_trial_ending's)
        log.exception("trial notice of Customer %s not written", name)
    return True


async def _webhook_secret_changed(ctx: OperatorContext, customer: Customer, now: datetime) -> bool:
    """Whether a Customer whose webhook is signed (NotificationsReady True; a False one is looked at
    every check by housekeeping_due) has had its secretRef's Secret rotated since the copy, looked at
    once every WEBHOOK_SECRET_CHECK."""
    ready = customer.status.condition(ConditionType.NOTIFICATIONS_READY)
    uid = customer.metadata.uid or ""
    if customer.spec.notifications.webhook is None or ready is None or ready.status != "True":
        return False
    last = ctx.webhook_secrets_checked.setdefault(uid, now)
    if now - last < WEBHOOK_SECRET_CHECK:
        return False
    ctx.webhook_secrets_checked[uid] = now
    try:
        return await webhook_secret_changed(ctx, customer.spec, namespace_for(customer.metadata.name or ""))
    except Exception as error:  # the API server away: the next check looks
        log.warning("webhook Secret of Customer %s not read: %s", customer.metadata.name, error)
        return False


async def _taken_namespace_freed(ctx: OperatorContext, name: str, uid: str) -> str | None:
    """Why the namespace someone else's that stalled Customer `name` no longer stalls it (state.
    namespace_freed); None while it does, or when it could not be read (the next check reads it)."""
    namespace = namespace_for(name)
    try:
        found = await ctx.kube.read_namespace(namespace)
    except Exception as error:  # the API server away: the next check reads it
        log.warning("namespace %s of stalled Customer %s not read: %s", namespace, name, error)
        return None
    return namespace_freed(found, name, uid)


# Kopf stops the daemon (deletion, exit, peering pause) by cancelling its sleep right away.
@kopf.daemon(*CUSTOMERS, id=HOUSEKEEPING, cancellation_timeout=5.0)
async def housekeeping_daemon(name: str, body: kopf.Body, memo: kopf.Memo, uid: str, **_: Any) -> None:
    """Licence renewal and trial end, as a daemon per Customer that sleeps between checks.

    A Kopf timer runs Kopf's handler machinery on every tick; a daemon's tick is the check alone. It
    sleeps with asyncio.sleep (Kopf's advice for async daemons), not `stopped.wait(delay)`, whose
    timed-out waits leave cyclic garbage that only the collector's full passes free. `body` is Kopf's
    live view, so each check sees the Customer as it is now.
    """
    ctx = _context(memo)
    interval = ctx.settings.operator_timer_interval
    delay = min(interval, 30.0)
    task = asyncio.current_task()
    assert task is not None
    ctx.housekeepers[uid] = task
    try:
        while True:
            await asyncio.sleep(delay)
            await housekeeping(name=name, body=body, memo=memo)
            delay = interval
    except asyncio.CancelledError:
        return  # how Kopf stops it; returning (not raising) spares a warning per Customer at every exit
    finally:
        if ctx.housekeepers.get(uid) is task:
            del ctx.housekeepers[uid]
            ctx.webhook_secrets_checked.pop(uid, None)


async def _refresh(ctx: OperatorContext, name: str, deployment_event: int | None = None) -> None:
    """A pass the housekeeping, a watch or a retry asked for. No Kopf handler runs it, so its Events are
    posted here; its failures are retried as every pass's (retry_if_failed): the status a failed helm
    leaves holds nothing the housekeeping acts on, and a licence Secret whose rows PostgreSQL refused
    leaves no trace in the status at all."""
    try:
        result = await reconcile(ctx, name, deployment_event=deployment_event)
    except Exception as error:  # the API server or PostgreSQL away, a conflict that went on
        retry_if_failed(ctx, name, error)
        return
    if isinstance(result, LeftShard):  # its retries and housekeeping end here with the rest
        await _left_shard(ctx, result)
        return
    if result is None:
        if deployment_event is None:  # gone or being deleted: nothing to retry
            ctx.pass_retries.forget(name)
        return  # a Deployment event's pass that a later pass covered: a retry pending stays
    retry_if_failed(ctx, name, result)
    await post_pass_events(ctx, {"metadata": {"name": name, "uid": result.uid}}, result)


async def post_pass_events(ctx: OperatorContext, involved: Mapping[str, Any], result: PassResult) -> None:
    """A pass's Events on its Customer `involved`; its CustomerIdNotPinned is counted told (once a
    process) only once posted: counted when the pass found it, a pass that failed after (its status
    patch, the API server away) or an Event refused lost it for the process's life."""
    events, uid = result.events, result.uid
    claimed = False
    if uid and any(reason == c.CUSTOMER_ID_NOT_PINNED for _, reason, _ in events):
        if uid in ctx.told_unpinned:  # told by another pass since this one looked (it waited for the lock)
            events = [event for event in events if event[1] != c.CUSTOMER_ID_NOT_PINNED]
        else:  # claimed while posting, so that a pass racing it posts none
            ctx.told_unpinned.add(uid)
            claimed = True
    posted = await post_events(ctx.kube, KIND, involved, events)
    if claimed and uid and not any(reason == c.CUSTOMER_ID_NOT_PINNED for _, reason, _ in posted):
        ctx.told_unpinned.discard(uid)  # refused: the next pass tells it


def _retry_pass(ctx: OperatorContext, name: str) -> None:
    """A failed pass's retry, due. While Kopf pauses this operator it waits another backoff instead of
    being dropped: no Kopf handler retries the failure after the resume (retry_if_failed)."""
    if not kopf_active(ctx):
        ctx.pass_retries.failed(name, partial(_retry_pass, ctx, name))
        return
    request_pass(ctx, name)


def kopf_active(ctx: OperatorContext) -> bool:
    """Whether Kopf runs this operator now, not paused by its peering for one of higher priority: a
    paused operator's daemons are all stopped, so a running housekeeping daemon is Kopf's word (with no
    Customer here there is none, and nothing for a pass to do either)."""
    return bool(ctx.housekeepers)


def request_pass(ctx: OperatorContext, name: str, deployment_event: int | None = None) -> None:
    """A pass of `name` soon, one for a burst of watch events (see PassRequests); none while Kopf
    pauses this operator, whose watches still see every event (the active one makes the pass)."""
    if not kopf_active(ctx) or not ctx.pass_requests.add(name, deployment_event):
        return

    async def run() -> None:
        await asyncio.sleep(PASS_REQUEST_DELAY)
        await _refresh(ctx, name, ctx.pass_requests.take(name))

    ctx.background_passes.start(run())


@kopf.on.event(*CUSTOMERS)
async def customer_gone(type: str | None, body: kopf.Body, memo: kopf.Memo, uid: str, **_: Any) -> None:
    """A Customer deleted, or relabelled to another shard (the watch's label selector no longer matches:
    the API server says DELETED). Kopf forgets it but does not stop its daemon then (only a deletion
    does), so the housekeeping of a Customer another shard now owns is stopped here, and what this
    process kept of it dropped (drop_customer), its licence expiry metric too (the new shard reports it):
    coming back, it is new here and gets a pass."""
    if type != "DELETED":
        return
    ctx = _context(memo)
    # Kopf's diff base, forgotten with Kopf's own memory of the object (a pass that finds the Customer
    # another shard's leaves it: Kopf, not having seen it go, keeps its memory too).
    cast(HandledSpecs, memo["handled"]).forget(body)
    try:
        now = await ctx.kube.read_customer(body.metadata.name or "")
    except KubernetesUnavailable:
        now = None  # forgotten as before: with the API server away, a new one's may go with it
    await drop_customer(ctx, body, uid, now)


async def drop_customer(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    uid: str,
    now: Mapping[str, Any] | None,
    *,
    stop_housekeeping: bool = True,
) -> None:
    """What this process keeps of Customer `body` (of `uid`) dropped, as it has left this shard: deleted,
    or another shard's now. `now`: the Customer read since (None: gone, or not read). Once any pass of it
    under way has ended: a pass no Kopf worker runs (a housekeeping check's, a watch's, a retry) that
    ended after this set the licence expiry again, and the expiry alert fired weeks later for a licence
    the new shard renews. Its housekeeper is stopped last, as it may be the caller; not when Kopf has not
    seen the Customer go (`stop_housekeeping` False): Kopf starts no daemon again for an object it still
    holds, so a Customer moved back before a restart would get no licence renewal here, while an idle
    housekeeper's checks only read it (its notices and passes are judged on the Customer read fresh)."""
    housekeeper = ctx.housekeepers.pop(uid, None) if stop_housekeeping else None
    ctx.told_unpinned.discard(uid)
    async with ctx.locks.held(body["metadata"].get("name") or ""):
        await _forget_kept(ctx, body, uid, now)
    if housekeeper is not None:
        housekeeper.cancel()


async def _left_shard(ctx: OperatorContext, left: LeftShard) -> None:
    """A pass found its Customer another shard's (its DELETED not handled yet, or never to come after a
    watch outage): dropped here as customer_gone drops it, its housekeeper kept (drop_customer)."""
    uid = left.body["metadata"].get("uid") or ""
    await drop_customer(ctx, left.body, uid, left.body, stop_housekeeping=False)


async def _forget_kept(
    ctx: OperatorContext, body: Mapping[str, Any], uid: str, now: Mapping[str, Any] | None
) -> None:
    name, customer_id = body["metadata"].get("name") or "", customer_id_in_use(body)
    finalized, finalized_holder = ctx.deletion_holders.take(uid)
    # Kopf handles each object's events in a worker of its own, in no order between objects: a Customer
    # made again under the name may have had its passes before this old one's DELETED is handled, and
    # what the process keeps by name (and by customer id, when it kept that) is then the new one's.
    if now is not None and now["metadata"].get("uid") != uid:
        forget_customer(None, customer_id if customer_id_in_use(now) != customer_id else None)
        return
    ctx.applied_namespaces.pop(namespace_for(name), None)
    ctx.written.pop(name, None)
    ctx.pass_retries.forget(name)
    if now is not None and not now["metadata"].get("deletionTimestamp"):
        # Relabelled to another shard, live: it holds its own id there, and no list of the fleet is
        # needed (a relabel of a thousand Customers listed the whole fleet once for each).
        forget_customer(name, customer_id)
        return
    # A rename that kept spec.customerId: the id's expiry series is the Customer holding it now (as the
    # finalizer judged), which may get no pass for days to export it again. A holder this process's
    # finalizer found is taken at its word, not looked for in a list of the fleet again at each deletion.
    # Nobody found is looked at again, in the shared list up to RECENT_LIST_SECONDS old: a foreground
    # deletion's DELETED comes minutes later, and a Customer applied under the id meanwhile has exported
    # its series by then. That list is the finalizer's or a later one, so two Customers of an id deleted
    # together do not find each other live in it (and neither drop the series, alerting weeks later).
    if finalized_holder is not None:
        held = True
    else:
        try:
            if finalized:
                held = await ctx.customer_id_holders.recent_holder(uid, customer_id) is not None
            else:
                held = await other_holder(ctx, body, customer_id) is not None
        except KubernetesUnavailable:
            held = False
    forget_customer(name, None if held else customer_id)


def deployment_changed(ctx: OperatorContext, type: str | None, body: dict[str, Any]) -> None:
    """Readiness follows the instance's Deployments (watches.INSTANCE_DEPLOYMENTS; `type` None: listed)."""
    namespace = body["metadata"].get("namespace")
    customer = customer_of_namespace(namespace)
    if customer and (tick := ctx.deployments.observe(type, namespace, body)) is not None:
        request_pass(ctx, customer, tick)


def managed_secret_changed(ctx: OperatorContext, type: str | None, body: dict[str, Any]) -> None:
    """Drift repair: a deleted licence Secret comes back, and so does an uninstalled release (its
    storage Secret deleted) (watches.MANAGED_SECRETS). Not for the revisions helm prunes itself past
    --history-max: each failed upgrade prunes one, and a pass for it ran helm again at once, for ever,
    past the retries' backoff."""
    name = customer_of_namespace(body["metadata"].get("namespace"))
    if name and type == "DELETED" and not _pruned_by_helm(body):
        request_pass(ctx, name)


# The storage Secrets of revisions helm deletes for its --history-max: history, never the one deployed.
_PRUNED_STATUSES = frozenset({"superseded", "failed"})


def _pruned_by_helm(body: dict[str, Any]) -> bool:
    labels = body["metadata"].get("labels") or {}
    return labels.get("owner") == "helm" and labels.get("status") in _PRUNED_STATUSES
