"""Pure decisions of an InstanceRollout: which Customers each step takes, how far each is, and what one
tick of the rollout does next (the Customers to move, the status, the Events). No I/O here: the tick in
rollouts.py reads the rollout and the Customers, calls `decide`, and writes what it says.

A Customer counts healthy only on the status the operator wrote after installing the target: its
rollout annotation, status.release.targetVersion and status.release.chartVersion all the target, and
Ready True; a pass writes these together, after judging the Deployments helm has just changed, so an
earlier Ready=True of the old version never counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from iotistic_billing.customer import ConditionType
from iotistic_billing.operator.conditions import ConditionValue, stalled, with_conditions
from iotistic_billing.operator.constants import (
    INSTANCE_DISABLED,
    INVALID_SPEC,
    LICENSE_FAILED,
    NAMESPACE_TAKEN,
)
from iotistic_billing.rollout import (
    MAX_LISTED_FAILURES,
    ROLLOUT_ABORT,
    ROLLOUT_CHART_VERSION,
    ROLLOUT_NAME,
    ROLLOUT_PREVIOUS_VERSION,
    ROLLOUT_UPDATED_AT,
    TERMINAL_PHASES,
    RolloutFailure,
    RolloutPhase,
    RolloutSpec,
    RolloutStatus,
    StepStatus,
    selects,
)

Health = Literal["pending", "updating", "healthy", "failed"]
# What a Customer's last finished pass did with a version (_last_pass).
PassResult = Literal["ran", "refused", "not yet"]
HEALTH_TIMEOUT = "HealthTimeout"
# Stalled before any step that reads the version (its spec refused, its namespace someone else's): the
# release status is an earlier pass's, and every version is refused until the Customer is repaired.
STALLED_BEFORE_RELEASE = frozenset({INVALID_SPEC, NAMESPACE_TAKEN})
# Stalled with no helm run: those, and a licence that cannot be minted, whose pass still writes the
# version it aimed at (status.release.targetVersion). None is helm refusing the target, so the health
# gate leaves them to the timeout, failed with their own reason.
STALLED_BEFORE_HELM = STALLED_BEFORE_RELEASE | {LICENSE_FAILED}
# After the operator that runs the rollouts started, how long a Customer whose pass had run its move
# before is not failed by its timeout: the restarted operator's passes read its readiness again first
# (_Tick._timed_out).
SETTLE_AFTER_START = timedelta(seconds=120)
# How far ahead of this clock an updated-at may be and still be a move's time (the rollout wrote it on a
# clock a little ahead); further ahead it is no time at all (_moved_at).
CLOCK_SKEW = timedelta(seconds=60)
WAITING_FOR_ROLLOUT = "WaitingForRollout"


@dataclass(frozen=True)
class Member:
    """A selected Customer as the rollout sees it."""

    name: str
    created: str
    annotations: Mapping[str, str]
    health: Health
    reason: str = ""
    message: str = ""
    # What it runs now (status.release.chartVersion): recorded when it is moved, for a rollback.
    running: str | None = None
    # What the last pass aimed at the version its annotation names, by that annotation (its updated-at),
    # did with it (`ran` when it has none): a rollback's return of it is done once it ran, failed once
    # refused.
    annotated_result: PassResult = "not yet"
    # Healthy with an instance running: Ready because scaled to zero (suspended, or its instance
    # disabled) passes its step but is no evidence the version runs, so it is not counted healthy.
    proven: bool = True
    # A pass has read the annotation's move (status.release.rolloutUpdatedAt): its unreadiness since is
    # the version's, not an operator that was away (_Tick._timed_out).
    move_read: bool = False

    @property
    def version(self) -> str | None:
        return self.annotations.get(ROLLOUT_CHART_VERSION)

    @property
    def rollout(self) -> str | None:
        """The rollout that last set its version."""
        return self.annotations.get(ROLLOUT_NAME)

    @property
    def moved_at(self) -> datetime | None:
        return _time(self.annotations.get(ROLLOUT_UPDATED_AT))


@dataclass(frozen=True)
class Move:
    """A Customer's rollout annotations, applied whole under the rollout's field manager."""

    customer: str
    annotations: dict[str, str]


@dataclass(frozen=True)
class Decision:
    status: RolloutStatus
    moves: list[Move] = field(default_factory=list)
    # (type, reason, message) of the Events to post on the rollout.
    events: list[tuple[str, str, str]] = field(default_factory=list)


def _time(value: str | None) -> datetime | None:
    """An annotation's time; one without a UTC offset (set by hand: `2026-12-03T11:00:00`, a date
    alone) is UTC, as a rollout writes them: compared with the aware times of the status, it raised
    TypeError in every tick."""
    try:
        parsed = datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed is not None and parsed.tzinfo is None else parsed


def _moved_at(m: Member, now: datetime) -> datetime | None:
    """When `m` was moved, for the health gate; None (no time, as an annotation set by hand without
    one) for an updated-at ahead of `now` by more than CLOCK_SKEW: local time east of UTC typed without
    an offset (read as UTC), or a mistyped year, postponed the Customer's timeout by as much, for
    decades. Not capped at `now`: a time read as now at every tick never times out."""
    moved_at = m.moved_at
    return moved_at if moved_at is not None and moved_at <= now + CLOCK_SKEW else None


def _moved_since(m: Member, rollout: str, since: datetime, now: datetime) -> datetime | None:
    """When `rollout` moved `m`, if at `since` or later (updated-at has whole seconds); None for another
    rollout's move, an earlier one, or one with no time (_moved_at)."""
    moved_at = _moved_at(m, now) if m.rollout == rollout else None
    return moved_at if moved_at is not None and moved_at >= since.replace(microsecond=0) else None


def _last_pass(
    release: Mapping[str, Any], conditions: Mapping[Any, Mapping[str, Any]], version: str | None
) -> PassResult:
    """What the Customer's last finished pass did with `version`, as its status says: installed it
    (`ran`: status.release.targetVersion and chartVersion both `version`, not Stalled), or helm refused
    it (`refused`: Stalled, aiming at it); `not yet` while no pass aimed at it has finished (the status
    is an earlier pass's, whatever chartVersion it names) or one that failed is retried."""
    if version is None or release.get("targetVersion") != version:
        return "not yet"
    if (conditions.get(ConditionType.STALLED) or {}).get("status") == "True":
        return "refused"
    return "ran" if release.get("chartVersion") == version else "not yet"


def _returned(
    release: Mapping[str, Any], conditions: Mapping[Any, Mapping[str, Any]], version: str | None
) -> PassResult:
    """What the last pass did with the version a rollback returns the Customer to (_last_pass), where a
    licence that cannot be minted (a stall before the release step) refuses nothing when it runs that
    version already: the rollback ended RollbackFailed for a Customer back where it was sent."""
    stuck = conditions.get(ConditionType.STALLED) or {}
    if stuck.get("status") == "True" and stuck.get("reason") == LICENSE_FAILED:
        return "ran" if version is not None and release.get("chartVersion") == version else "refused"
    return _last_pass(release, conditions, version)


def member(body: Mapping[str, Any], target: str) -> Member:
    """How far the Customer is with `target`; one still `updating` carries its Ready message, for the
    health gate's timeout (_Tick._timed_out, which knows when its step started)."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    release = status.get("release") or {}
    annotations = dict(meta.get("annotations") or {})
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    name, created = str(meta.get("name")), str(meta.get("creationTimestamp") or "")
    running = release.get("chartVersion")
    annotated = annotations.get(ROLLOUT_CHART_VERSION)
    # By the annotation (versionSource Rollout) as it is now (rolloutUpdatedAt its updated-at): the
    # status from before the rollout's move (Fleet, or an earlier rollout's) names the version a rollback
    # returns to as well, while the upgrade the move started may still run. A status without
    # rolloutUpdatedAt (an operator's from before it) is judged by its versions alone, as then: a pass
    # that ends before its release step (a spec refused) keeps it so, and the rollback would wait for good.
    read = release.get("rolloutUpdatedAt")
    stuck = conditions.get(ConditionType.STALLED) or {}
    stalled_before_release = stuck.get("status") == "True" and stuck.get("reason") in STALLED_BEFORE_RELEASE
    by_annotation: PassResult = "not yet"
    source = release.get("versionSource")
    if annotated is None:
        # Returned to the fleet's version by a rollback (_back): done once a pass aimed by the fleet ran
        # its version, refused once helm refused it, or the Customer stalled before any pass read it.
        if stalled_before_release:
            by_annotation = "refused" if source == "Rollout" else "ran"
        elif source == "Rollout":
            by_annotation = "not yet"
        elif source is None:
            by_annotation = "ran"
        else:
            by_annotation = _returned(release, conditions, release.get("targetVersion"))
    elif stalled_before_release:
        # No version is read until it is repaired: the one it runs is where a return to it is done.
        by_annotation = "ran" if running == annotated else "refused"
    elif source == "Rollout" and read in (None, annotations.get(ROLLOUT_UPDATED_AT)):
        by_annotation = _returned(release, conditions, annotated)
    if annotated != target:
        # Why helm refused the version it is returned to, for the rollback's message.
        why = stuck if by_annotation == "refused" else {}
        return Member(
            name,
            created,
            annotations,
            "pending",
            why.get("reason", ""),
            why.get("message", ""),
            running=running,
            annotated_result=by_annotation,
        )
    result = _last_pass(release, conditions, target)
    ready = conditions.get(ConditionType.READY) or {}
    if result == "ran" and ready.get("status") == "True":
        proven = ready.get("reason") != INSTANCE_DISABLED
        return Member(name, created, annotations, "healthy", running=running, proven=proven)
    stalled_before_helm = stuck.get("status") == "True" and stuck.get("reason") in STALLED_BEFORE_HELM
    # The status is of a pass that aimed by the annotation as it is now (both without a time for one set
    # by hand without updated-at).
    by_this_move = source == "Rollout" and read == annotations.get(ROLLOUT_UPDATED_AT)
    move_read = by_this_move and read is not None
    if result == "refused" and not by_this_move:
        # Refused by a pass before the move (one that read an earlier move, a status with no
        # rolloutUpdatedAt, a pass aimed by the fleet): a new run moved again a Customer left refused,
        # and failed it at the next tick, before the move's own pass ran. The timeout bounds the wait.
        result = "not yet"
    if result == "refused" and not stalled_before_helm:
        why = stuck.get("reason", ""), stuck.get("message", "")
        return Member(name, created, annotations, "failed", *why, running=running)
    if stalled_before_helm:
        # No pass installs the target until it is repaired; a Stalled from before its move (the repair
        # and the move in one minute) may still go, so the timeout decides, with the stall's reason. A
        # licence that cannot be minted too: its pass names the target, but helm never ran it. That pass
        # read the move (it writes rolloutUpdatedAt): after every operator start it got the whole
        # timeout again, and with restarts more often than the timeout it never failed.
        return Member(
            name,
            created,
            annotations,
            "updating",
            stuck.get("reason", ""),
            stuck.get("message", ""),
            running=running,
            move_read=move_read and stuck.get("reason") == LICENSE_FAILED,
        )
    return Member(
        name,
        created,
        annotations,
        "updating",
        message=ready.get("message") or "not Ready",
        running=running,
        move_read=move_read,
    )


def assign_steps(spec: RolloutSpec, members: Sequence[Member]) -> list[list[Member]]:
    """The Customers of each step: named ones as listed, a percentage of all selected (rounded up,
    oldest first), or the rest. A Customer is in one step at most; created later, it joins the end."""
    left = sorted(members, key=lambda m: (m.created, m.name))
    by_name = {m.name: m for m in left}
    groups: list[list[Member]] = []
    for step in spec.steps:
        if step.customers is not None:
            group = [by_name[n] for n in dict.fromkeys(step.customers) if n in by_name]
        elif step.percent is not None:
            group = [m for m in left if m.name in by_name][: math.ceil(step.percent * len(members) / 100)]
        else:
            group = [m for m in left if m.name in by_name]
        for taken in group:
            del by_name[taken.name]
        groups.append(group)
    return groups


def moved(customer: Member, version: str, previous: str | None, rollout: str, now: datetime) -> Move:
    annotations = {
        ROLLOUT_CHART_VERSION: version,
        ROLLOUT_NAME: rollout,
        ROLLOUT_UPDATED_AT: now.isoformat(timespec="seconds"),
    }
    if previous:
        annotations[ROLLOUT_PREVIOUS_VERSION] = previous
    return Move(customer.name, annotations)


def _back(
    customer: Member, target: str, failure: RolloutFailure | None, rollout: str, now: datetime
) -> Move | None:
    """The move that returns a Customer this rollout moved to the version it had; None when this
    rollout did not move it, it is back already, or it ran the target before the move. Without a
    recorded version its version annotations are dropped (the fleet's version applies again).

    Its previous-chart-version becomes the target it leaves, the version it is moved from: without it,
    operator.state.chart_target cannot tell that a version INSTANCE_CHART_UPGRADE=immediate installs
    later came after the annotation, and leaving that mode would take the Customer back down."""
    if customer.annotations.get(ROLLOUT_NAME) != rollout or customer.version != target:
        return None
    if _stays(customer, target, failure):
        # It ran the target before the move (a new Customer on the fleet's version): it stays, and a
        # move to the same version, a new updated-at each tick, kept the rollback going for good.
        return None
    previous = _returns_to(customer, failure)
    if not previous:
        # Its annotations but the rollout's name and the time go: the rollback waits for the pass that
        # reads the return (member: versionSource no longer Rollout), not dropping it from `mine`.
        return Move(
            customer.name, {ROLLOUT_NAME: rollout, ROLLOUT_UPDATED_AT: now.isoformat(timespec="seconds")}
        )
    return moved(customer, previous, target, rollout, now)


def _stays(customer: Member, target: str, failure: RolloutFailure | None) -> bool:
    """Moved to `target` from `target` itself: a rollback has nothing to return, nor to wait for."""
    return customer.version == target and _returns_to(customer, failure) == target


def _returns_to(customer: Member, failure: RolloutFailure | None) -> str | None:
    """The version a rollback returns the Customer to: the one it ran when this rollout moved it."""
    return (
        customer.annotations.get(ROLLOUT_PREVIOUS_VERSION) or (failure and failure.previous_version) or None
    )


@dataclass(frozen=True)
class Rollout:
    """The rollout's own facts: name, generation, when it was created, its annotations."""

    name: str
    generation: int
    created: str
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class OtherRollout:
    name: str
    created: str
    spec: RolloutSpec | None
    phase: str | None
    # The version its status was written for: not spec.chartVersion, it is starting again.
    target_version: str | None = None

    @property
    def restarting(self) -> bool:
        """A rollout whose chartVersion was edited: its status (phase too) is of the run before."""
        return (
            self.spec is not None
            and self.target_version is not None
            and self.target_version != self.spec.chart_version
        )

    @property
    def active(self) -> bool:
        """It may still move Customers: not finished, or finished and started again."""
        return self.spec is not None and (self.phase not in TERMINAL_PHASES or self.restarting)

    @property
    def moving(self) -> bool:
        """Past its wait: it moves Customers (or holds them paused, or returns them)."""
        return self.active and not self.restarting and self.phase in MOVING_PHASES


# The phases of a rollout that has started moving Customers and not finished.
MOVING_PHASES = frozenset({RolloutPhase.PROGRESSING, RolloutPhase.PAUSED, RolloutPhase.ROLLING_BACK})


def _ranked(rollout: Rollout | OtherRollout) -> tuple[str, str]:
    """Older first: creation time, then name."""
    return (rollout.created, rollout.name)


def decide(
    rollout: Rollout,
    spec: RolloutSpec,
    previous: RolloutStatus,
    customers: Sequence[Mapping[str, Any]],
    others: Sequence[OtherRollout],
    now: datetime,
    disabled: str | None = None,
    judging_since: datetime | None = None,
) -> Decision:
    """One tick. `disabled`: why rollouts cannot run here (the fleet moves at once), or None.
    `judging_since`: when this operator process began ticking the rollout (_Tick._timed_out)."""
    if previous.phase in TERMINAL_PHASES and previous.target_version == spec.chart_version:
        # Finished: an edit that keeps the version changes nothing but is observed (kstatus, Flux's wait).
        return Decision(previous.model_copy(update={"observed_generation": rollout.generation}))
    fresh = previous.target_version != spec.chart_version
    status = RolloutStatus(target_version=spec.chart_version) if fresh else previous.model_copy(deep=True)
    status.observed_generation = rollout.generation
    tick = _Tick(rollout, spec, status, now, judging_since)
    if disabled is not None:
        return tick.stall(RolloutPhase.PENDING, "RolloutsDisabled", disabled)
    if ROLLOUT_ABORT in rollout.annotations:
        return tick.finish(
            RolloutPhase.ABORTED,
            "Aborted",
            f"aborted: no further Customer is moved (to run again: remove the annotation {ROLLOUT_ABORT}"
            " and set a new chartVersion)",
        )

    selected = [c for c in customers if selects(spec, c)]
    run_started = status.started_at or now
    members = [_refused_in_run(member(c, spec.chart_version), rollout, run_started, now) for c in selected]
    groups = assign_steps(spec, members)
    if status.phase in (None, RolloutPhase.PENDING, RolloutPhase.WAITING):
        blocking = _blocking(rollout, {c["metadata"]["name"] for c in selected}, others, customers)
        if blocking:
            return tick.wait(blocking)
    # Moved by this rollout and held by no step: no longer selected (relabelled, or a plan that changed
    # by itself: a trial that ended, a suspension), or selected and left out of every step (a percentage
    # shrunk with the fleet and no `rest` after it, steps edited away): still judged while its step
    # runs, and returned by a rollback. One being deleted is not: it stays Ready False (Terminating)
    # while its finalizer retries, and it goes anyway. One pinned runs its pin (Git's word): not judged
    # nor waited for, but a rollback still returns its annotation, which applies once it is unpinned.
    in_steps = {m.name for group in groups for m in group}
    gone = [
        c
        for c in customers
        if not selects(spec, c)
        and not c["metadata"].get("deletionTimestamp")
        and (c["metadata"].get("annotations") or {}).get(ROLLOUT_NAME) == rollout.name
    ]
    departed = [m for m in members if m.name not in in_steps and m.rollout == rollout.name]
    pinned: list[Member] = []
    for c in gone:
        is_pinned = ((c.get("spec") or {}).get("instance") or {}).get("chartVersion")
        (pinned if is_pinned else departed).append(member(c, spec.chart_version))
    return tick.run(groups, len(members), _held(rollout, members, others), departed, pinned)


def _refused_in_run(m: Member, rollout: Rollout, run_started: datetime, now: datetime) -> Member:
    """`m`, or pending again when the refusal it failed on is from a pass before this run: another
    rollout's move (a halted one of the same version, before the chart was pushed) or this rollout's
    earlier run, as the timeout tells them (_Tick._timed_out). Moved again, a new updated-at starts a
    pass; a new rollout of the version failed the Customer at once and never retried it."""
    if m.health != "failed" or _moved_since(m, rollout.name, run_started, now) is not None:
        return m
    return replace(m, health="pending", reason="", message="")


def _blocking(
    rollout: Rollout, mine: set[str], others: Sequence[OtherRollout], customers: Sequence[Mapping[str, Any]]
) -> str | None:
    """A rollout selecting some of the same Customers that this one, not started yet, waits for: an
    older active one, or any that already moves Customers (one started again after it finished waits
    for those that started meanwhile)."""
    for other in sorted(others, key=_ranked):
        if not other.active or other.spec is None:
            continue
        if _ranked(other) >= _ranked(rollout) and not other.moving:
            continue
        shared = [c for c in customers if c["metadata"]["name"] in mine and selects(other.spec, c)]
        if shared:
            return (
                f"waits for InstanceRollout {other.name}, which selects {len(shared)} of the same Customers"
            )
    return None


def _held(rollout: Rollout, members: Sequence[Member], others: Sequence[OtherRollout]) -> dict[str, str]:
    """Customers to move that an older rollout, still moving, has set to its version: name -> that
    rollout. Left alone until it finishes, so two rollouts never take a Customer back and forth (one
    relabelled into both, say); a newer one's Customers are not held, so two never wait for each other."""
    holders = {o.name for o in others if o.moving and _ranked(o) < _ranked(rollout)}
    return {
        m.name: m.rollout
        for m in members
        if m.health == "pending" and m.rollout is not None and m.rollout in holders
    }


class _Tick:
    def __init__(
        self,
        rollout: Rollout,
        spec: RolloutSpec,
        status: RolloutStatus,
        now: datetime,
        judging_since: datetime | None = None,
    ) -> None:
        self.rollout, self.spec, self.status, self.now = rollout, spec, status, now
        self.judging_since = judging_since
        self.events: list[tuple[str, str, str]] = []
        self.moves: list[Move] = []
        self.unproven = 0  # on the version, Ready with no instance running (_count)

    def _conditions(self, values: list[ConditionValue]) -> None:
        self.status.conditions = with_conditions(
            self.status.conditions, values, generation=self.rollout.generation, now=self.now
        )

    def _decision(self) -> Decision:
        return Decision(self.status, self.moves, self.events)

    def stall(self, phase: RolloutPhase, reason: str, message: str) -> Decision:
        if self.status.phase != phase:
            self.events.append(("Warning", reason, message))
        self.status.phase = phase
        self._conditions(stalled(reason, message))
        return self._decision()

    def finish(self, phase: RolloutPhase, reason: str, message: str) -> Decision:
        self.status.completed_at = self.now
        if phase == RolloutPhase.SUCCEEDED:
            self.status.phase = phase
            self.events.append(("Normal", reason, message))
            self._conditions(
                [
                    ConditionValue(ConditionType.STALLED, False, reason, ""),
                    ConditionValue(ConditionType.RECONCILING, False, reason, ""),
                    ConditionValue(ConditionType.READY, True, reason, message),
                ]
            )
            return self._decision()
        return self.stall(phase, reason, message)

    def wait(self, why: str) -> Decision:
        if self.status.phase != RolloutPhase.WAITING:
            self.events.append(("Normal", "Waiting", why))
        self.status.phase = RolloutPhase.WAITING
        self._progressing(WAITING_FOR_ROLLOUT, why, reconciling=True)
        return self._decision()

    def _paused(self, phase: RolloutPhase, message: str) -> Decision:
        self.status.phase = phase
        self._progressing("Paused", message, False)
        return self._decision()

    def _progressing(self, reason: str, message: str, reconciling: bool) -> None:
        self._conditions(
            [
                ConditionValue(ConditionType.STALLED, False, reason, ""),
                ConditionValue(ConditionType.RECONCILING, reconciling, reason, message),
                ConditionValue(ConditionType.READY, False, reason, message),
            ]
        )

    def _timed_out(self, m: Member, step_started: datetime) -> Member:
        """`m` failed when still not Ready on the target `healthGate.timeoutSeconds` after this run moved
        it; one it did not move (on the version by an earlier rollout's move, or an annotation set by
        hand) from when its step started judging it, at the earliest: another rollout's move of days
        ago failed it at once for a moment's unreadiness, and an annotation with no time never did.
        Never a timeout before this process began judging while no pass has read the move, nor within
        SETTLE_AFTER_START of it for one whose pass did: after an operator outage longer than the
        timeout (a lost node), every upgrade in flight failed at the first tick, before the passes could
        read their readiness. The short settle for the second keeps an operator restarting more often
        than the timeout from holding off a bad version for good."""
        if m.health != "updating":
            return m
        moved_at = _moved_at(m, self.now)
        since = self._moved_since(m, self.status.started_at or self.now) or max(
            moved_at or step_started, step_started.replace(microsecond=0)
        )
        timeout = timedelta(seconds=self.spec.health_gate.timeout_seconds)
        if self.judging_since is not None:
            settle = timeout if not m.move_read else min(timeout, SETTLE_AFTER_START)
            since = max(since, self.judging_since - timeout + settle)
        if self.now - since <= timeout:
            return m
        seconds, version = int(timeout.total_seconds()), self.spec.chart_version
        if m.reason:  # Stalled before its release step all along: no upgrade ran
            waited = f"{m.reason} {seconds} s after it was moved to {version}, no upgrade run"
            return replace(m, health="failed", message=f"{waited}: {m.message}"[:1024])
        waited = f"not Ready on {version} {seconds} s after the upgrade"
        return replace(m, health="failed", reason=HEALTH_TIMEOUT, message=f"{waited}: {m.message}"[:1024])

    def _moved_since(self, m: Member, since: datetime) -> datetime | None:
        return _moved_since(m, self.rollout.name, since, self.now)

    def _steps(self, groups: list[list[Member]]) -> list[StepStatus]:
        steps = list(self.status.steps or [])[: len(groups)]
        steps += [StepStatus() for _ in range(len(groups) - len(steps))]
        self.status.steps = steps
        return steps

    def _watched(self, groups: list[list[Member]], current: int, departed: list[Member]) -> list[Member]:
        """The Customers the current step judges: its own; those of earlier steps left over (a canary
        created after its step, a Customer relabelled in, a percentage grown with the fleet) not moved
        yet; any this rollout moved since the step started, whichever step holds it now, if any (a
        fleet grown or shrunk moves the percentages' boundaries); and any the step before moved after
        its bake was over, which it ended without judging (_carried). Customers an earlier step of this
        run moved otherwise were healthy (or failed and counted) when their step ended and are not
        judged again, also when the current step holds them now (a boundary moved, or the last step
        running again after the running one was edited away: its own were judged when it ended)."""
        since = (self.status.steps or [])[current].started_at or self.now
        run_started = self.status.started_at or self.now
        carried = self._carried(current)

        def moved_in_step(m: Member) -> bool:
            return self._moved_since(m, since) is not None or carried(m)

        def moved_before(m: Member) -> bool:
            return (
                m.health != "pending"
                and self._moved_since(m, run_started) is not None
                and not moved_in_step(m)
            )

        leftovers = [
            m for group in groups[:current] for m in group if m.health == "pending" or moved_in_step(m)
        ]
        own = [m for m in groups[current] if not moved_before(m)]
        strays = [m for group in [*groups[current + 1 :], departed] for m in group if moved_in_step(m)]
        return leftovers + own + strays

    def _carried(self, current: int) -> Callable[[Member], bool]:
        """Whether the step before moved a Customer after its bake was over (status.steps[].bakedAt,
        against its updated-at, on this operator's clock like the step's times in the status): a step
        ends without waiting for those (with a signup more often than an upgrade takes, one is always
        upgrading), so the next judges them wherever the fleet puts them now, from their annotations
        alone: recomputed from the fleet as it is, a deletion moved a failing one out of every step's
        reach."""
        steps = self.status.steps or []
        before = steps[current - 1] if 0 < current <= len(steps) else None
        baked_at = _bake_end(before) if before is not None else None
        ended = before.completed_at if before is not None else None
        if baked_at is None or ended is None:
            return lambda m: False

        def carried(m: Member) -> bool:
            moved_at = self._moved_since(m, baked_at)
            return moved_at is not None and baked_at < moved_at <= ended

        return carried

    def _moved_by(self, watched: list[Member], until: datetime) -> list[Member]:
        """The Customers of `watched` moved by `until`: all but those this run moved later and those
        still to move (a signup since). One this run did not move (on the version by another rollout,
        or by hand), or whose updated-at is no time (_moved_at), counts as moved before."""
        run_started = self.status.started_at or self.now
        return [
            m
            for m in watched
            if m.health != "pending"
            and ((moved_at := self._moved_since(m, run_started)) is None or moved_at <= until)
        ]

    def _count(self, groups: list[list[Member]], total: int, watched: list[Member], current: int) -> None:
        """The counts, in total and per step. A step's `failed` is the Customers that failed while it
        ran: those listed in status.failures with its number, and while it runs, failing ones past the
        list's 100 too (kept as the most seen, so the count the health gate compares is not capped)."""
        target = self.spec.chart_version
        steps = self.status.steps or []
        failures = self.status.failures or []
        listed = {f.customer for f in failures}
        for index, (step, group) in enumerate(zip(steps, groups, strict=True)):
            step.selected = len(group)
            step.updated = sum(m.version == target for m in group)
            step.healthy = sum(m.health == "healthy" and m.proven for m in group)
            failed = sum(f.step == index + 1 for f in failures)
            if index == current:
                failed += sum(m.health == "failed" and m.name not in listed for m in watched)
            step.failed = failed if index > current else max(step.failed or 0, failed)
        everyone = [m for group in groups for m in group]
        self.status.selected = total
        self.status.updated = sum(m.version == target for m in everyone)
        self.status.healthy = sum(m.health == "healthy" and m.proven for m in everyone)
        self.unproven = sum(m.health == "healthy" and not m.proven for m in everyone)
        self.status.failed = max(sum(s.failed or 0 for s in steps), len(failures))

    def run(
        self,
        groups: list[list[Member]],
        total: int,
        held: Mapping[str, str],
        departed: list[Member],
        pinned: list[Member],
    ) -> Decision:
        spec, status, now = self.spec, self.status, self.now
        if status.started_at is None:
            status.started_at = now
        current = max(0, (status.current_step or 1) - 1)
        if status.current_step is None:
            status.current_step = 1
            self._step_started(0, groups)
        running = (status.steps or [])[current] if current < len(status.steps or []) else None
        # Read before _steps drops the steps edited away (below).
        known = status.steps or []
        before_running = _bake_end(known[current - 1]) if 0 < current <= len(known) else None
        steps = self._steps(groups)
        everyone = [m for group in groups for m in group] + departed
        if status.phase == RolloutPhase.ROLLING_BACK:
            self._count(groups, total, [], current)
            return self._rolling_back(everyone, pinned)
        if current >= len(groups):
            # The running step was edited away: the last one left runs again from the end of the bake
            # of the step before the running one, so the Customers moved since are judged before the
            # rollout can succeed (those the running step moved, and those it carried: from its start,
            # one this step moved after its own bake was judged by no step), and those moved before,
            # judged when their step ended, are not judged again (_watched).
            current = len(groups) - 1
            status.current_step = current + 1
            again = steps[current]
            again.started_at = before_running or (running and running.started_at) or again.started_at
            again.all_moved_at = again.healthy_at = again.baked_at = again.completed_at = None
        if steps[current].started_at is None:
            steps[current].started_at = now
        # Each step's Customers judged from that step's start (a next step started in this tick judges its
        # own afresh); an earlier step's from its own, or one failed then would count upgrading again.
        step_started = steps[current].started_at or now
        raw_groups, raw_departed = groups, departed
        groups = [
            [self._timed_out(m, (index < current and steps[index].started_at) or step_started) for m in group]
            for index, group in enumerate(groups)
        ]
        departed = [self._timed_out(m, step_started) for m in departed]

        watched = self._watched(groups, current, departed)
        self._record_failures(watched, current)
        self._count(groups, total, watched, current)
        over_budget = (status.failed or 0) >= spec.health_gate.max_failures
        # spec.paused holds a rollback's moves (each a helm upgrade) until resumed; a halt moves nothing.
        if over_budget and not (spec.paused and spec.on_failure == "rollback"):
            return self._failed(everyone, pinned, current)

        step = spec.steps[current]
        earlier = [m for g in groups[:current] for m in g]
        # Not moved yet: the step ends with none (a Customer held by an older rollout included, as before).
        unmoved = [m for m in watched if m.health == "pending"]
        pending = [m for m in unmoved if m.name not in held]
        watched_names = {m.name for m in watched}
        updating = sum(
            m.health == "updating" for m in watched + [m for m in earlier if m.name not in watched_names]
        )
        if spec.paused:
            message = f"paused at step {current + 1}: no new upgrade starts"
            if over_budget:
                message += f"; {self._failed_names()} failed, rolling back once resumed"
            return self._paused(RolloutPhase.PAUSED, message)
        for waiting in pending[: max(0, step.max_parallel - updating)]:
            self.moves.append(moved(waiting, spec.chart_version, waiting.running, self.rollout.name, now))
        status.phase = RolloutPhase.PROGRESSING
        step_status = steps[current]
        if step_status.all_moved_at is None and not unmoved:
            # From the Customers this tick read, not from its moves: the status is written before them,
            # and moves a crash lost in between were made again as a signup's. No earlier than the newest
            # move read: after a restart on a node whose clock is behind, the step's own moves (the old
            # clock's updated-at) were later than now, and the bake waited for none of them. (A clock
            # behind by more than CLOCK_SKEW reads them as no time, _moved_at, until it catches up.)
            run_started = status.started_at or now
            times = [self._moved_since(m, run_started) for m in watched if m.health != "pending"]
            step_status.all_moved_at = max([now, *(t for t in times if t is not None)])
        # A failure below maxFailures does not hold the step: the Customer stays on the version, listed.
        listed = {f.customer for f in status.failures or ()}

        def judged(customers: list[Member]) -> bool:
            return all(m.health in ("healthy", "failed") or m.name in listed for m in customers)

        # The bake waits for the Customers moved by the first tick that found none left to move; those
        # moved since (signups, older ones a percentage takes as the fleet grows) are moved and judged,
        # but a new one always upgrading (a signup more often than an upgrade takes) kept it from ever
        # starting. One it waits for not healthy any more starts it again.
        all_moved_at = step_status.all_moved_at
        if all_moved_at is None or not judged(self._moved_by(watched, all_moved_at)):
            step_status.healthy_at = None
            only_held = not self.moves and not updating and any(m.name in held for m in watched)
            reason = WAITING_FOR_ROLLOUT if only_held else "Progressing"
            self._progressing(reason, self._progress(groups, current, watched, held), True)
            return self._decision()
        if step_status.healthy_at is None:
            step_status.healthy_at = now
        baked_at = step_status.healthy_at + timedelta(seconds=step.bake_seconds)
        if now < baked_at:
            self._progressing(
                "Baking", f"step {current + 1}/{len(groups)} healthy, baking until {baked_at}", True
            )
            return self._decision()
        # It ends in a tick that moves nobody and finds nobody to move (a finished rollout's tick carries
        # no move, and a signup left unmoved kept the version it had), once the Customers moved before
        # the bake was over are judged too; those moved since, the next step judges (_carried), and
        # after the last step nobody, as Customers created after the rollout.
        if self.moves or unmoved or not judged(self._moved_by(watched, baked_at)):
            only_held = not self.moves and not updating and any(m.name in held for m in watched)
            reason = WAITING_FOR_ROLLOUT if only_held else "Progressing"
            message = f"{self._progress(groups, current, watched, held)}; baked"
            self._progressing(reason, message, True)
            return self._decision()
        step_status.baked_at, step_status.completed_at = baked_at, now
        self.events.append(("Normal", "StepCompleted", f"step {current + 1}/{len(groups)} completed"))
        if current + 1 >= len(groups):
            status.current_step = len(groups)
            return self._succeeded(groups)
        status.current_step = current + 2
        steps[current + 1].started_at = now
        self._step_started(current + 1, groups)
        # The next step's first upgrades start in this tick: the next tick may be TICK_SECONDS away,
        # since no pass writes a status while nothing upgrades (a step boundary cost 3.5 s, bench/README.md).
        return self.run(raw_groups, total, held, raw_departed, pinned)

    def _step_started(self, index: int, groups: list[list[Member]]) -> None:
        names = [m.name for m in groups[index]] if index < len(groups) else []
        message = (
            f"step {index + 1}/{len(groups)} started: {len(names)} Customers ({_few(names, 0) or 'none'})"
        )
        self.events.append(("Normal", "StepStarted", message))
        listed = self.spec.steps[index].customers if index < len(self.spec.steps) else None
        if listed and not names:
            # A mistyped canary: the step passes at once, and the next runs with no canary before it.
            why = (
                f"step {index + 1} names no selected Customer ({_few(listed, len(listed))}): it holds nobody"
            )
            self.events.append(("Warning", "StepEmpty", why))

    def _progress(
        self, groups: list[list[Member]], current: int, watched: list[Member], held: Mapping[str, str]
    ) -> str:
        status = self.status
        message = (
            f"step {current + 1}/{len(groups)}: {status.updated}/{status.selected} updated, "
            f"{status.healthy} healthy, {status.failed} failed"
        )
        holders: dict[str, int] = {}
        for m in watched:
            if m.name in held:
                holders[held[m.name]] = holders.get(held[m.name], 0) + 1
        for holder, count in sorted(holders.items()):
            message += f"; {count} waiting for InstanceRollout {holder}, which moves them"
        return message

    def _record_failures(self, watched: list[Member], current: int) -> None:
        failures = list(self.status.failures or ())
        known = {f.customer for f in failures}
        for m in watched:
            # The list keeps the first 100 (the object's size); the count goes on (_count).
            if m.health == "failed" and m.name not in known and len(failures) < MAX_LISTED_FAILURES:
                previous = m.annotations.get(ROLLOUT_PREVIOUS_VERSION)
                failures.append(
                    RolloutFailure(
                        customer=m.name,
                        step=current + 1,
                        reason=(m.reason or "Failed")[:128],
                        message=m.message[:1024],
                        previous_version=previous,
                    )
                )
                self.events.append(("Warning", "CustomerFailed", f"{m.name}: {m.reason}: {m.message}"[:1024]))
        self.status.failures = failures or None

    def _failed_names(self) -> str:
        return _few([f.customer for f in self.status.failures or ()], self.status.failed or 0)

    def _failed(self, everyone: list[Member], pinned: list[Member], current: int) -> Decision:
        names = self._failed_names()
        if self.spec.on_failure == "halt":
            return self.finish(
                RolloutPhase.HALTED, "HealthGateFailed", f"halted at step {current + 1}: {names} failed"
            )
        self.status.phase = RolloutPhase.ROLLING_BACK
        self.events.append(("Warning", "RollingBack", f"step {current + 1}: {names} failed, rolling back"))
        return self._rolling_back(everyone, pinned)

    def _rolling_back(self, everyone: list[Member], pinned: list[Member]) -> Decision:
        """Every Customer this rollout set to its version goes back to the one it had; a pinned one's
        annotation too, not waited for (it runs its pin)."""
        failures = {f.customer: f for f in self.status.failures or ()}
        mine = [m for m in everyone if m.rollout == self.rollout.name]
        backs = [
            _back(m, self.spec.chart_version, failures.get(m.name), self.rollout.name, self.now)
            for m in mine + pinned
        ]
        names = self._failed_names()
        if self.spec.paused and any(back is not None for back in backs):
            # Returning a Customer is a helm upgrade like any other: paused, none starts (phase kept).
            message = f"paused while rolling back after {names} failed: no Customer moves until resumed"
            return self._paused(RolloutPhase.ROLLING_BACK, message)
        self.moves += [back for back in backs if back is not None]
        # Only Customers this run set (there, then back) are waited for: one an earlier run left on
        # another version is not moved back, and would be waited for forever.
        since = self.status.started_at or self.now
        returning = [
            m
            for m in mine
            if self._moved_since(m, since) is not None
            and not _stays(m, self.spec.chart_version, failures.get(m.name))
        ]
        # Each waits for the pass that runs its return, not for what it ran before: a Customer whose
        # upgrade is still running, or which helm refused (its failed revision half applied), runs the
        # old version already.
        if self.moves or any(m.annotated_result == "not yet" for m in returning):
            self._progressing("RollingBack", f"rolling back after {names} failed", True)
            return self._decision()
        # A return helm refused (Stalled: the old version deleted from the registry, say) ends the wait
        # too, failed: only a repair makes it run (its annotation stays), and a rollout left RollingBack
        # for good kept every rollout selecting the same Customers Waiting.
        refused = [
            f"{m.name} ({m.reason[:128]}: {m.message[:256]})"
            for m in returning
            if m.annotated_result == "refused"
        ]
        if refused:
            why = (
                f"rolling back after {names} failed: the return of {_few(refused, len(refused))} was refused"
            )
            return self.finish(RolloutPhase.HALTED, "RollbackFailed", why)
        return self.finish(RolloutPhase.ROLLED_BACK, "RolledBack", f"rolled back after {names} failed")

    def _succeeded(self, groups: list[list[Member]]) -> Decision:
        self.status.current_step = len(groups)
        status = self.status
        version = self.spec.chart_version
        on = f"{status.healthy}/{status.selected} Customers on {version}"
        message = on if status.selected else "no Customer selected"
        if self.unproven:
            message += f" and {self.unproven} with no instance running (suspended or disabled)"
        if status.failed:
            # Below healthGate.maxFailures: they stay on the version, listed in status.failures.
            message += f", {status.failed} failed ({self._failed_names()})"
        if not status.healthy:
            # rollout.settled_version: no Customer has run it healthy, so new ones do not start on it.
            message += f"; new Customers do not start on {version}"
        return self.finish(RolloutPhase.SUCCEEDED, "Succeeded", message)


def _bake_end(step: StepStatus) -> datetime | None:
    """When a finished step's bake was over, as it wrote it (status.steps[].bakedAt: worked out from
    bakeSeconds as the spec is now, one raised since put it after the step's end); for a step an
    operator before bakedAt ended, its bake's start, a wider window (those moved during the bake, judged
    when it ended, are judged again). None for a step not finished."""
    if step.completed_at is None:
        return None
    return step.baked_at or step.healthy_at


def _few(names: Sequence[str], total: int, shown: int = 10) -> str:
    """The first names, and how many more of `total` (at least the names) there are."""
    more = max(total, len(names)) - min(shown, len(names))
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


__all__ = [
    "Decision",
    "Member",
    "Move",
    "OtherRollout",
    "Rollout",
    "assign_steps",
    "decide",
    "member",
]
