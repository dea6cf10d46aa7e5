"""What every handler needs, built once at start-up and kept in Kopf's memo: no import-time singletons."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from iotistic_billing.customer import customer_id_in_use
from iotistic_billing.k8s import Kube, KubeApi
from iotistic_billing.licensing.keys import SigningKeys
from iotistic_billing.notices.outbox import Outbox
from iotistic_billing.operator.charts import ChartStore
from iotistic_billing.operator.customer_view import CustomerView
from iotistic_billing.operator.deployments import InstanceDeployments
from iotistic_billing.operator.helm import Helm
from iotistic_billing.operator.sharding import Shard
from iotistic_billing.operator.watches import LoopFollower
from iotistic_billing.settings import Settings
from iotistic_billing.workers import Outage, stop_tasks

log = logging.getLogger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


def trial_notices_outage() -> Outage:
    """The housekeeping's writes of the "trial ends soon" notices while PostgreSQL is away
    (operator/notices.py): each trial Customer's next check writes its own."""
    return Outage(
        log,
        "trial-ending notices not written",
        "trial-ending notices written again",
        retried="each trial Customer's next housekeeping check (OPERATOR_TIMER_INTERVAL) writes its own",
    )


class PassRequests:
    """Bursts of watch events (a rollout changes a Deployment many times) coalesced into one pass per
    Customer. A request carries the tick of the Deployment event asking for it, or None for any other
    event: the pass that runs is for the latest tick, or unconditional once any request was None."""

    def __init__(self) -> None:
        self._pending: dict[str, int | None] = {}

    def add(self, name: str, deployment_event: int | None) -> bool:
        """True when no pass of `name` is queued yet: the caller starts one."""
        if name in self._pending:
            queued = self._pending[name]
            self._pending[name] = (
                None if queued is None or deployment_event is None else max(queued, deployment_event)
            )
            return False
        self._pending[name] = deployment_event
        return True

    def take(self, name: str) -> int | None:
        """The queued pass of `name` starts: what it is for. A request after this queues another."""
        return self._pending.pop(name)


def retry_delay(retry: int) -> float:
    """Seconds before the next try of a pass that failed `retry` times before: 5 s doubling, at most 5 min."""
    return float(min(300, 5 * 2**retry))


class PassRetries:
    """The retries of failed passes, whoever ran them (Kopf retries none: handlers.retry_if_failed), one
    pending per Customer, after retry_delay of its failures in a row. `later` schedules a retry (the
    running loop's call_later); tests give their own and fire the retries instead of waiting."""

    def __init__(self, later: Callable[[float, Callable[[], None]], asyncio.Handle] | None = None) -> None:
        self._later = later
        self._failures: dict[str, int] = {}
        self._pending: dict[str, asyncio.Handle] = {}

    def failed(self, name: str, retry: Callable[[], None]) -> float:
        """A pass of `name` failed: `retry` runs after the backoff, in place of a retry still pending.
        Returns the backoff."""
        failures = self._failures.get(name, 0)
        self._failures[name] = failures + 1
        delay = retry_delay(failures)
        self._cancel(name)

        def due() -> None:
            del self._pending[name]
            retry()

        later = self._later or asyncio.get_running_loop().call_later
        self._pending[name] = later(delay, due)
        return delay

    def forget(self, name: str) -> None:
        """A pass of `name` ended without a failure to retry, or the Customer left this operator."""
        self._failures.pop(name, None)
        self._cancel(name)

    def _cancel(self, name: str) -> None:
        pending = self._pending.pop(name, None)
        if pending is not None:
            pending.cancel()


class BackgroundPasses:
    """The passes no Kopf handler runs, while they run. Kopf's stop waits for its handlers only, then
    cancels whatever is left at once, the wait of a helm too (which then kills it, leaving its release
    pending): the operator's stop cancels these first and waits until each has ended (helm.py lets a
    running helm end first)."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._running)

    def start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def stop(self) -> None:
        await stop_tasks(list(self._running))


class CustomerLocks:
    """One pass at a time per Customer. A Customer's lock lives while a pass holds it or waits for it:
    kept for every name ever asked, they grew by one per deleted Customer and per Customer of another
    shard, whose Deployment and Secret events every shard sees."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def busy(self, name: str) -> bool:
        """A pass of `name` holds its lock or waits for it."""
        return name in self._locks

    @contextlib.asynccontextmanager
    async def held(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name) or (asyncio.Lock(), 0)
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            _, users = self._locks[name]
            if users == 1:
                del self._locks[name]  # nobody holds or waits for it: the next pass makes a new one
            else:
                self._locks[name] = (lock, users - 1)


# How old the list behind a best-effort answer of who holds a customer id may be (CustomerIdHolders).
RECENT_LIST_SECONDS = 5.0

# (uid, name) of each live Customer (not being deleted), by the customer id it goes by.
Holders = dict[str, list[tuple[str | None, str]]]


def live_holders(customers: Iterable[Mapping[str, Any]]) -> Holders:
    """The live Customers of a list (not being deleted), as (uid, name) in its order, by customer id."""
    holders: Holders = {}
    for body in customers:
        meta = body["metadata"]
        if not meta.get("deletionTimestamp"):
            holders.setdefault(customer_id_in_use(body), []).append((meta.get("uid"), str(meta["name"])))
    return holders


def holder_other_than(holders: Holders, uid: str | None, customer_id: str) -> str | None:
    """The name of the first live Customer of `holders` other than `uid` that goes by `customer_id`."""
    return next((name for held_by, name in holders.get(customer_id, ()) if held_by != uid), None)


class CustomerIdHolders:
    """Who holds each customer id, from lists of every Customer shared by the callers that ask meanwhile:
    one list runs at a time, and each caller waits for one that answers as it needs. Found in review: a
    pass waiting for its subscription's restore listed the fleet at each retry (a cluster rebuilt from Git
    with a thousand paying Customers: thousands of lists), and each deletion listed it two or three times
    (`kubectl delete customers --all`). Only the holders are kept between lists, not the bodies."""

    def __init__(
        self,
        list_customers: Callable[[], Awaitable[list[dict[str, Any]]]],
        clock: Callable[[], float] = time.monotonic,
        max_age: float = RECENT_LIST_SECONDS,
    ) -> None:
        self._list_customers = list_customers
        self._clock = clock
        self._max_age = max_age
        self._holders: Holders = {}
        self._listed_at: float | None = None  # when the list behind _holders started
        self._listing: asyncio.Task[Holders] | None = None
        self._started = 0  # lists started so far: the running one is the last

    async def recent_holder(self, uid: str | None, customer_id: str) -> str | None:
        """The name of a live Customer other than `uid` going by `customer_id`, from a list started at
        most `max_age` seconds ago (or the one running): for an answer that may be seconds stale."""
        if self._listed_at is None or self._clock() - self._listed_at > self._max_age:
            await self._shared(self._listing or self._start())
        return holder_other_than(self._holders, uid, customer_id)

    async def fresh_holder(self, uid: str | None, customer_id: str) -> str | None:
        """`recent_holder` from a list started after this call, as a list of its own would be: one
        running already may have missed a Customer applied just before, so the callers arriving while it
        runs share the next."""
        asked = self._started
        while True:
            listing = self._listing or self._start()
            if self._started > asked:
                return holder_other_than(await self._shared(listing), uid, customer_id)
            with contextlib.suppress(Exception):  # its failure is its own callers'
                await self._shared(listing)

    @staticmethod
    async def _shared(listing: asyncio.Task[Holders]) -> Holders:
        # Shielded: a caller given up (cancelled) does not take the list away from the others waiting.
        return await asyncio.shield(listing)

    def _start(self) -> asyncio.Task[Holders]:
        self._started += 1
        self._listing = asyncio.get_running_loop().create_task(self._list())
        return self._listing

    async def _list(self) -> Holders:
        started = self._clock()
        try:
            customers = await self._list_customers()
        finally:
            self._listing = None  # ended: the next caller that needs a list starts one
        self._holders, self._listed_at = live_holders(customers), started
        return self._holders


# How long a finalizer's answer waits for its Customer's DELETED (DeletionHolders): a foreground
# deletion's comes once the Customer's namespace has terminated, minutes later.
DELETION_ANSWER_SECONDS = 600.0


class DeletionHolders:
    """Each finalizer's answer that completed here, by the deleted Customer's uid: the Customer holding
    its customer id then, or None. Its DELETED event (handlers.customer_gone) goes by it instead of
    listing the fleet again. Kept `max_age` seconds: found in review, the answer of a Customer whose
    DELETED this process never handles (a watch re-listed after a 410, the operator paused by a peer)
    was kept for good."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_age: float = DELETION_ANSWER_SECONDS
    ) -> None:
        self._clock = clock
        self._max_age = max_age
        # Oldest first (a recorded uid moves to the end), so the pruning stops at the first young one.
        self._answers: dict[str, tuple[str | None, float]] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def record(self, uid: str, holder: str | None) -> None:
        now = self._clock()
        self._answers.pop(uid, None)
        while self._answers:
            oldest = next(iter(self._answers))
            if now - self._answers[oldest][1] <= self._max_age:
                break
            del self._answers[oldest]
        self._answers[uid] = (holder, now)

    def take(self, uid: str) -> tuple[bool, str | None]:
        """Whether the finalizer of `uid` answered here within `max_age` seconds, and its answer."""
        holder, at = self._answers.pop(uid, (None, None))
        if at is None or self._clock() - at > self._max_age:
            return False, None
        return True, holder


@dataclass
class OperatorContext:
    settings: Settings
    keys: SigningKeys
    kube: Kube
    helm: Helm
    # The customer-instance chart's versions (a directory, or pulled from an OCI registry).
    charts: ChartStore
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    # The instance Deployments readiness is judged by: listed after helm runs, kept by the watch.
    deployments: InstanceDeployments
    # Passes in flight at most: a thousand Customers applied at once wait here as cheap coroutines
    # instead of each holding a read body, a minted licence and rendered values while helm is busy.
    pass_slots: asyncio.Semaphore
    # Every Customer as the API server last said, for the rollouts' ticks (started by the first).
    customer_view: CustomerView
    # The client of the lists and watches the operator follows itself (watches.py), apart from the
    # connection pool the passes share: each watch holds a connection open.
    watch_api: KubeApi
    # Notices written with the facts that cause them (licence suspended, trial ending, ...).
    outbox: Outbox = field(default_factory=Outbox)
    # Time is an input: tests move this clock instead of sleeping until a timer fires.
    clock: Callable[[], datetime] = utc_now
    # One pass at a time per Customer, whichever handler or watch started it.
    locks: CustomerLocks = field(default_factory=CustomerLocks)
    pass_requests: PassRequests = field(default_factory=PassRequests)
    pass_retries: PassRetries = field(default_factory=PassRetries)
    # Each Customer's housekeeping daemon, by uid: stopped when the Customer leaves this shard. Kopf
    # stops them all while it pauses the operator, so none running means paused (handlers.kopf_active).
    housekeepers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # The namespace manifest this process last applied, per namespace (reconcile.py).
    applied_namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The resourceVersion of the last status this process wrote, per Customer: a body Kopf hands over
    # that is older is read again (reconcile.py).
    written: dict[str, int] = field(default_factory=dict)
    # The customer ids whose directory mirror row this process wrote (license.py).
    mirrored: set[str] = field(default_factory=set)
    # The uids of the Customers Git manages without spec.customerId whose Warning was posted (reconcile.py).
    told_unpinned: set[str] = field(default_factory=set)
    # customer id -> when the licence history's first licence of it was issued (trial_history.py).
    first_licences: dict[str, datetime] = field(default_factory=dict)
    # uid -> when the housekeeping last compared the Customer's webhook Secret with its copy.
    webhook_secrets_checked: dict[str, datetime] = field(default_factory=dict)
    # Keys of the notices the housekeeping wrote since the start: not written (or tried) again.
    noticed: set[str] = field(default_factory=set)
    # Those writes failing while PostgreSQL is away, one warning an outage: found in review, a traceback
    # for each trial Customer at each check (50 trials, 50 a minute).
    trial_notices: Outage = field(default_factory=trial_notices_outage)
    # One per running InstanceRollout's daemon: set when a pass wrote a Customer's status, so the
    # rollout looks again now rather than at its next tick.
    rollout_wakeups: set[asyncio.Event] = field(default_factory=set)
    # uid -> the last DeletionFailed posted of a Customer whose finalizer is retried.
    deletion_failures: dict[str, str] = field(default_factory=dict)
    # The Customer holding a deleted one's customer id as its completed finalizer found it, for its DELETED.
    deletion_holders: DeletionHolders = field(default_factory=DeletionHolders)
    # The Customers this operator owns (OPERATOR_SHARD of OPERATOR_SHARDS).
    shard: Shard = field(default_factory=Shard)
    # Why a pending revision could not be judged by the Pod that ran its helm (release.py), each logged
    # once: said on every pass, it would be said for every stuck Customer until HELM_TIMEOUT.
    pod_checks_skipped: set[str] = field(default_factory=set)
    # Who holds each customer id, from lists shared by the passes and deletions that ask meanwhile.
    customer_id_holders: CustomerIdHolders = field(init=False)
    # The Deployment and Secret watches, started with Kopf (handlers.configure).
    watches: list[LoopFollower] = field(default_factory=list)
    # The passes no Kopf handler runs (the housekeeping's and the watches'), stopped by handlers.close.
    background_passes: BackgroundPasses = field(default_factory=BackgroundPasses)

    def __post_init__(self) -> None:
        self.customer_id_holders = CustomerIdHolders(self.kube.list_customers)

    @property
    def fleet_moves_at_once(self) -> bool:
        """Every unpinned Customer follows INSTANCE_CHART_VERSION at once (no rollouts): as the
        platform said (INSTANCE_CHART_UPGRADE), or because a chart directory holds one version only."""
        return self.settings.instance_chart_upgrade == "immediate" or not self.charts.oci
