"""Kopf registrations: thin handlers that hand over to reconcile(), finalize() and the watches below."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, cast

import kopf

from iotistic_billing.customer import GROUP, PLURAL, VERSION, Customer, InvalidSpecError, Phase
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.delete import finalize
from iotistic_billing.operator.metrics import HOUSEKEEPING_CHECKS
from iotistic_billing.operator.reconcile import PassResult, reconcile
from iotistic_billing.operator.state import housekeeping_due

CUSTOMERS = (GROUP, VERSION, PLURAL)
HOUSEKEEPING = "housekeeping"
log = logging.getLogger(__name__)
# Customer -> the tick of the latest Deployment event its coming pass is for (None: another watch's event).
_pending: dict[str, int | None] = {}


def _context(memo: kopf.Memo) -> OperatorContext:
    context: OperatorContext = memo["context"]
    return context


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # From here on the Deployment watch below keeps the operator's view of the instances current.
    _context(memo).deployments.watched = True
    logging.getLogger("kopf.objects").addFilter(QuietRoutineSuccesses())
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = TransientProgressStorage(prefix="iotistic.io")
    handled = HandledSpecs(prefix="iotistic.io", key="last-handled-configuration")
    settings.persistence.diffbase_storage = memo["handled"] = handled
    # Our own Events carry the transitions; Kopf's per-log-line Events would drown them.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # Kopf waits this long for more events of an object before handling it; at its default (0.1 s) a
    # creation pays it twice (the event, then the one of adding the finalizer).
    settings.batching.batch_window = 0.02
    settings.networking.request_timeout = 60
    # Kopf starts a worker per object with events, unbounded by default: a thousand Customers applied at
    # once would each hold a worker, a body and a handler state while helm works through them (most of
    # the operator's peak memory). Bounded, the rest wait as queued events, and a worker that saw no
    # event for 0.1 s makes room: at 1 s the 6,000 Deployments of 1,000 instances turning available
    # queued their bodies faster than the workers freed up (about +250 MiB, measured; Kopf's default is 5 s).
    settings.queueing.worker_limit = c.WORKER_LIMIT
    settings.queueing.idle_timeout = 0.1
    # The label filters of the handlers below, applied by the API server: without them Kopf lists and
    # watches every Secret and Deployment of the cluster and filters them here.
    settings.watching.label_selectors["v1", "secrets"] = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
    settings.watching.label_selectors["apps", "v1", "deployments"] = (
        f"app.kubernetes.io/instance={c.RELEASE_NAME},app.kubernetes.io/managed-by=Helm"
    )


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await _context(memo).engine.dispose()


def _report(result: PassResult | None, body: kopf.Body, retry: int) -> None:
    """Events for transitions, and Kopf's retry semantics for the pass's outcome."""
    if result is None:
        return
    phase = result.status.phase
    if phase != result.previous_phase and phase is not None:
        kind = "Warning" if phase in (Phase.FAILED, Phase.DEGRADED, Phase.EXPIRED) else "Normal"
        kopf.event(
            body, type=kind, reason=str(phase), message=f"phase {result.previous_phase or 'none'} -> {phase}"
        )
    if result.permanent_error is not None:
        kopf.warn(body, reason="ReconcileFailed", message=result.permanent_error)
        raise kopf.PermanentError(result.permanent_error)
    if result.temporary_error is not None:
        raise kopf.TemporaryError(result.temporary_error, delay=min(300, 5 * 2**retry))


# An unexpected error is mostly an API server or database away for a moment: retry soon, not in Kopf's
# default minute. Expected failures back off exponentially in _report.
@kopf.on.resume(*CUSTOMERS, backoff=5)
@kopf.on.create(*CUSTOMERS, backoff=5)
@kopf.on.update(*CUSTOMERS, field="spec", backoff=5)
async def reconcile_customer(name: str, body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    _report(await reconcile(_context(memo), name), body, retry)


@kopf.on.delete(*CUSTOMERS)
async def delete_customer(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await finalize(_context(memo), dict(body))
    cast(HandledSpecs, memo["handled"]).forget(body)
    kopf.info(
        body, reason="Deleted", message="release uninstalled, licence revoked, namespace deletion requested"
    )


async def housekeeping(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Licence renewal, trial end, a lapsed past_due grace: cheap pure checks, a pass only when due.

    The Customer is parsed on every check: keeping the parsed Customer between checks measured 15.6 MiB
    for 1,000 (tracemalloc), for about 0.4% of a core at idle."""
    ctx = _context(memo)
    try:
        customer = Customer.model_validate(dict(body))
    except (ValueError, InvalidSpecError):
        return
    now: datetime = ctx.clock()
    created = customer.metadata.creation_timestamp or now
    due = housekeeping_due(customer.spec, customer.status, created, now)
    HOUSEKEEPING_CHECKS.labels(due or "nothing").inc()
    if due:
        # A pass the check started finishes even when Kopf stops the daemon meanwhile.
        await asyncio.shield(_refresh(ctx, name))


# Kopf stops the daemon (deletion, exit, peering pause) by cancelling its sleep right away.
@kopf.daemon(*CUSTOMERS, id=HOUSEKEEPING, cancellation_timeout=5.0)
async def housekeeping_daemon(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The timer of DESIGN (renewal, trial end), as a daemon per Customer that sleeps between checks.

    A Kopf timer runs Kopf's handler machinery on every tick; a daemon's tick is the check alone. It
    sleeps with asyncio.sleep (Kopf's advice for async daemons), not `stopped.wait(delay)`: each timed-out
    wait leaves about 26 objects of cyclic garbage (its task and TimeoutError), a minute old by then, so
    only the collector's full passes free them; at 1,000 idle Customers one full pass took 0.4 s of CPU,
    about 40% of that minute's idle cost (py-spy). `body` is Kopf's live view, so each check sees the
    Customer as it is now.
    """
    interval = _context(memo).settings.operator_timer_interval
    delay = min(interval, 30.0)
    try:
        while True:
            await asyncio.sleep(delay)
            await housekeeping(name=name, body=body, memo=memo)
            delay = interval
    except asyncio.CancelledError:
        return  # how Kopf stops it; returning (not raising) spares a warning per Customer at every exit


async def _refresh(ctx: OperatorContext, name: str, deployment_event: int | None = None) -> None:
    try:
        await reconcile(ctx, name, deployment_event=deployment_event)
    except Exception:  # a watch-triggered pass; the next event or timer tries again
        log.exception("pass of Customer %s failed", name)


def request_pass(ctx: OperatorContext, name: str, deployment_event: int | None = None) -> None:
    """Coalesce bursts of watch events (a rollout changes a Deployment many times) into one pass;
    `deployment_event`: the tick of the Deployment event asking, for a pass that may be covered already."""
    if name in _pending:
        queued = _pending[name]
        _pending[name] = None if queued is None or deployment_event is None else max(queued, deployment_event)
        return
    _pending[name] = deployment_event

    async def run() -> None:
        await asyncio.sleep(0.2)
        await _refresh(ctx, name, _pending.pop(name))

    asyncio.get_running_loop().create_task(run())


def _customer_of_namespace(namespace: str | None) -> str | None:
    if namespace and namespace.startswith(c.NAMESPACE_PREFIX):
        return namespace[len(c.NAMESPACE_PREFIX) :]
    return None


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/instance": c.RELEASE_NAME})
async def deployment_changed(
    type: str | None, namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    """Readiness follows the instance's Deployments."""
    customer = _customer_of_namespace(namespace)
    if customer:
        assert namespace is not None
        ctx = _context(memo)
        request_pass(ctx, customer, ctx.deployments.observe(type, namespace, body))


@kopf.on.event("", "v1", "secrets", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
async def license_secret_changed(type: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Drift repair: a deleted licence Secret comes back."""
    name = _customer_of_namespace(namespace)
    if name and type == "DELETED":
        request_pass(_context(memo), name)


# Helm's storage Secrets carry the operator's label too: it is passed to helm as a release label.
@kopf.on.event("", "v1", "secrets", labels={"owner": "helm", "name": c.RELEASE_NAME})
async def release_storage_changed(type: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Drift repair: an uninstalled release (its storage Secret deleted) comes back."""
    name = _customer_of_namespace(namespace)
    if name and type == "DELETED":
        request_pass(_context(memo), name)


class QuietRoutineSuccesses(logging.Filter):
    """Kopf logs each handler's success at INFO. For the watch handlers (every Deployment and Secret
    event) that is thousands of lines when 1,000 instances roll out, formatted and written for nothing;
    failures are still logged."""

    ROUTINE = tuple(
        f"Handler {cast(Callable[..., Any], handler).__name__!r} succeeded."
        for handler in (deployment_changed, license_secret_changed, release_storage_changed)
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.msg in self.ROUTINE)


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """Kopf's annotation diff-base storage, building the same essence from less.

    On every Customer event Kopf builds the object's essence (spec, labels, annotations) by deep-copying
    the whole body, managedFields and status included, and then dropping them: about a tenth of the
    operator's GIL samples while 300 Customers were provisioned (py-spy). Handed only the parts it keeps,
    it copies those alone. When a handler watches a field outside them (Kopf's extra fields: the status,
    metadata other than labels and annotations), Kopf gets the whole body as before.

    Kopf builds an essence for the events of every watched resource, the instance Deployments and the
    Secrets included, though only change and daemon handlers use it, and the operator has those for
    Customers alone (a unit test holds it to that): for other objects the essence is empty. A
    Deployment's essence cost 200-400 us an event (timeit), five Deployments a Customer.
    """

    KEPT_METADATA = ("labels", "annotations")

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        if str(body.get("apiVersion", f"{GROUP}/")).partition("/")[0] != GROUP:
            return cast(kopf.BodyEssence, {})
        paths = [tuple(f.split(".")) if isinstance(f, str) else tuple(f or ()) for f in extra_fields or ()]
        if any(self._dropped(path) for path in paths):
            return super().build(body=body, extra_fields=extra_fields)
        metadata = body.get("metadata") or {}
        lean = {key: value for key, value in body.items() if key not in ("metadata", "status")}
        lean["metadata"] = {key: metadata[key] for key in self.KEPT_METADATA if key in metadata}
        return super().build(body=kopf.Body(cast(kopf.RawBody, lean)), extra_fields=extra_fields)

    @classmethod
    def _dropped(cls, path: tuple[str, ...]) -> bool:
        """A field the lean body leaves out (the reconcile handler's `spec` is kept)."""
        if path[:1] == ("status",):
            return True
        return path[:1] == ("metadata",) and path[1:2] not in [(key,) for key in cls.KEPT_METADATA]


class HandledSpecs(LeanDiffBaseStorage):
    """The configuration Kopf last handled of each Customer, in the operator's memory.

    Kopf's annotation storage writes it to the Customer after every handled change: one more PATCH of
    the Customer per creation and per spec change (a CR write cost the API server 5.5-6.3 ms of CPU here),
    and one more watch event for Kopf to process. Nothing needs it to outlive the process: after a start
    a Customer without it is a creation to Kopf, and creation, update and resume run the same idempotent
    pass, as every Customer has one at start-up anyway (resume). The annotation written by earlier
    versions is ignored (and left out of the essence, as before).
    """

    def __init__(self, *, prefix: str, key: str) -> None:
        super().__init__(prefix=prefix, key=key)
        self._handled: dict[str, str] = {}  # uid -> the essence as compact JSON (a tenth of the dict's size)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        encoded = self._handled.get(body.metadata.uid or "")
        return cast(kopf.BodyEssence, json.loads(encoded)) if encoded is not None else None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        uid = body.metadata.uid or ""
        if body.metadata.deletion_timestamp:
            self._handled.pop(uid, None)
            return
        self._handled[uid] = json.dumps(essence, separators=(",", ":"))

    def forget(self, body: kopf.Body) -> None:
        """A deleted Customer's (its deletion handler has finished)."""
        self._handled.pop(body.metadata.uid or "", None)


class TransientProgressStorage(kopf.AnnotationsProgressStorage):
    """Kopf's annotation progress storage, without its marker when no progress annotation stays.

    Storing a handler's progress adds the marker `iotistic.io/kopf-managed` (it tells other Kopf-based
    operators that the prefix is Kopf's) even when the progress is purged in the same cycle, as it is for
    a pass that succeeds at once: the marker alone was a PATCH of every new Customer. It is still written
    beside progress that stays (a handler Kopf will retry), and is never removed once written.
    """

    MARKER = "kopf-managed"

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        super().purge(key=key, body=body, patch=patch)
        annotations = patch.get("metadata", {}).get("annotations", {})
        marker = f"{self.prefix}/{self.MARKER}"
        if marker not in annotations or marker in body.metadata.annotations:
            return
        staying = [k for k, v in annotations.items() if k.startswith(f"{self.prefix}/") and k != marker and v]
        if not staying:
            del annotations[marker]
            if not annotations:
                del patch["metadata"]["annotations"]
                if not patch["metadata"]:
                    del patch["metadata"]
