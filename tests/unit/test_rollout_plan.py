"""The rollout's decisions on a simulated fleet: each tick's moves are applied to the Customers'
annotations and a stand-in operator installs what they ask for, so the steps, maxParallel, the bake,
the health gate, pause, abort, rollback and the overlap rule are checked without a cluster."""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from iotistic_billing.customer import Customer, ReleaseStatus, VersionSource
from iotistic_billing.operator.reconcile import fleet_version
from iotistic_billing.operator.rollout_plan import (
    HEALTH_TIMEOUT,
    SETTLE_AFTER_START,
    Decision,
    OtherRollout,
    Rollout,
    assign_steps,
    decide,
    member,
)
from iotistic_billing.operator.rollouts import settled
from iotistic_billing.operator.state import chart_target
from iotistic_billing.rollout import (
    ROLLOUT_ABORT,
    ROLLOUT_CHART_VERSION,
    ROLLOUT_NAME,
    ROLLOUT_PREVIOUS_VERSION,
    ROLLOUT_UPDATED_AT,
    TERMINAL_PHASES,
    RolloutPhase,
    RolloutSpec,
    RolloutStatus,
    StepStatus,
    settled_version,
)

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def customer(name: str, version: str = "1.0.0", index: int = 0, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": (T0 - timedelta(days=1, seconds=-index)).isoformat(),
            "labels": {"tier": "edge"},
            "annotations": {},
        },
        "spec": {"plan": "starter", **spec},
        "status": {
            "release": {"chartVersion": version, "targetVersion": version, "versionSource": "Fleet"},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "DeploymentsAvailable", "message": ""}
            ],
        },
    }


def aimed_by(release: dict[str, Any], source: VersionSource, updated_at: str | None) -> None:
    release["versionSource"] = source
    release.pop("rolloutUpdatedAt", None)
    if updated_at is not None:
        release["rolloutUpdatedAt"] = updated_at


class Fleet:
    """Customers, and an operator that installs what operator.state.chart_target aims at (the pin, a
    rollout's annotation, what it runs, else the fleet's `version`): `good` ones turn Ready; the `bad`
    version never does; helm refuses any new version for the `broken` Customers (Stalled), and the
    `withdrawn` versions (deleted from the registry) for every Customer not running them already."""

    def __init__(
        self,
        count: int,
        bad: str | None = None,
        broken: Collection[str] = (),
        withdrawn: Collection[str] = (),
    ) -> None:
        self.customers = {f"c{i:02}": customer(f"c{i:02}", index=i) for i in range(count)}
        self.bad = bad
        self.broken = set(broken)
        self.withdrawn = set(withdrawn)
        self.upgrades: dict[str, int] = {}
        # INSTANCE_CHART_VERSION and INSTANCE_CHART_UPGRADE=immediate.
        self.version = "1.0.0"
        self.immediate = False

    def apply(self, decision: Decision) -> None:
        for move in decision.moves:
            annotations = self.customers[move.customer]["metadata"]["annotations"]
            annotations.clear()
            annotations.update(move.annotations)

    def aims(self, body: dict[str, Any]) -> tuple[str, VersionSource]:
        """What a pass of the Customer installs (chart_target reads its pin and annotations alone)."""
        instance = body["spec"].get("instance") or {}
        model = Customer.model_validate(
            {
                "metadata": body["metadata"],
                "spec": {"email": "a@b.cd", "companyName": "C", "instance": instance},
            }
        )
        release = ReleaseStatus.model_validate(body["status"]["release"])
        version, source = chart_target(model, release, self.immediate)
        return version or self.version, source

    def operate(self, names: Collection[str] | None = None) -> None:
        """One pass of every Customer (of `names`) that aims at another version."""
        for name, body in self.customers.items():
            if names is not None and name not in names:
                continue
            wanted, source = self.aims(body)
            release = body["status"]["release"]
            # The annotation the pass aims by, written beside the version as operator.state.next_status does.
            read = body["metadata"]["annotations"].get(ROLLOUT_UPDATED_AT) if source == "Rollout" else None
            new = wanted != release["chartVersion"]
            refused = new and (name in self.broken or wanted in self.withdrawn)
            if release["targetVersion"] == wanted and (release["chartVersion"] == wanted or refused):
                # Nothing to install; a pass a rollout's annotation ran still writes what it aimed by.
                if source == "Rollout" and release.get("rolloutUpdatedAt") != read:
                    aimed_by(release, source, read)
                continue
            self.upgrades[name] = self.upgrades.get(name, 0) + 1
            aimed_by(release, source, read)
            if refused:
                release.update(targetVersion=wanted, versionSource=source)
                reason, message = "UpgradeFailed", "boom"
                if wanted in self.withdrawn:
                    reason, message = "ChartVersionUnavailable", f"{wanted}, which the registry does not have"
                body["status"]["conditions"] = [
                    {"type": "Ready", "status": "False", "reason": reason, "message": message},
                    {"type": "Stalled", "status": "True", "reason": reason, "message": message},
                ]
                continue
            release.update(chartVersion=wanted, targetVersion=wanted, versionSource=source)
            ready = "False" if wanted == self.bad else "True"
            message = "api 0/1" if ready == "False" else ""
            body["status"]["conditions"] = [
                {"type": "Ready", "status": ready, "reason": "DeploymentsAvailable", "message": message}
            ]

    def upgrading(self, target: str) -> int:
        return sum(
            1
            for body in self.customers.values()
            if body["metadata"]["annotations"].get(ROLLOUT_CHART_VERSION) == target
            and body["status"]["release"]["chartVersion"] != target
        )

    def on(self, version: str) -> set[str]:
        return {n for n, b in self.customers.items() if b["status"]["release"]["chartVersion"] == version}


def spec(**fields: Any) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {
            "chartVersion": "2.0.0",
            "steps": [{"customers": ["c05", "c09"]}, {"percent": 25}, {"rest": True}],
            **fields,
        }
    )


def run(
    fleet: Fleet,
    rollout_spec: RolloutSpec,
    ticks: int = 60,
    seconds: float = 1.0,
    operate_every: int = 1,
    before_tick: Callable[[int], None] = lambda i: None,
    start: datetime = T0,
    status: RolloutStatus | None = None,
) -> tuple[RolloutStatus, list[Decision]]:
    """Ticks of `seconds` each from `start`, from `status` (a new rollout's by default); the operator
    runs every `operate_every` ticks (upgrades take time)."""
    status, decisions = status or RolloutStatus(), []
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    for i in range(ticks):
        before_tick(i)
        decision = decide(
            rollout,
            rollout_spec,
            status,
            list(fleet.customers.values()),
            [],
            start + timedelta(seconds=i * seconds),
        )
        decisions.append(decision)
        fleet.apply(decision)
        status = decision.status
        if decision.status.phase in TERMINAL_PHASES:
            # rollouts.advance writes the status before the moves: a finished one must carry none.
            assert not decision.moves
            break
        if i % operate_every == operate_every - 1:
            fleet.operate()
    return status, decisions


def ticker(
    fleet: Fleet, rollout: Rollout, rollout_spec: RolloutSpec
) -> Callable[[RolloutStatus], RolloutStatus]:
    """One tick of `rollout` a second after the one before, from the status given, its moves applied to
    the fleet (the operator's passes are the test's to run, between ticks)."""
    seconds = iter(range(100))

    def tick(status: RolloutStatus) -> RolloutStatus:
        now = T0 + timedelta(seconds=next(seconds))
        decision = decide(rollout, rollout_spec, status, list(fleet.customers.values()), [], now)
        fleet.apply(decision)
        return decision.status

    return tick


def test_a_good_version_reaches_every_customer_step_by_step_never_more_than_max_parallel() -> None:
    fleet = Fleet(30)
    steps = [{"customers": ["c05", "c09"]}, {"percent": 25}, {"rest": True, "maxParallel": 5}]
    status, decisions = run(fleet, spec(steps=steps), ticks=200, operate_every=2)
    assert status.phase == RolloutPhase.SUCCEEDED
    assert fleet.on("2.0.0") == set(fleet.customers)
    assert set(fleet.upgrades.values()) == {1}
    assert [s.selected for s in status.steps or ()] == [2, 8, 20]
    started = [e for d in decisions for e in d.events if e[1] == "StepStarted"]
    assert [m.split(":")[0] for _, _, m in started] == [
        "step 1/3 started",
        "step 2/3 started",
        "step 3/3 started",
    ]
    assert "c05, c09" in started[0][2]
    assert status.condition("Ready") is not None and status.condition("Ready").status == "True"  # type: ignore[union-attr]


def test_max_parallel_bounds_the_upgrades_in_flight() -> None:
    fleet = Fleet(30)
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    status = RolloutStatus()
    most = 0
    for i in range(300):
        decision = decide(
            rollout,
            spec(steps=[{"rest": True, "maxParallel": 5}]),
            status,
            list(fleet.customers.values()),
            [],
            T0 + timedelta(seconds=i),
        )
        fleet.apply(decision)
        status = decision.status
        most = max(most, fleet.upgrading("2.0.0"))
        if decision.status.phase in TERMINAL_PHASES:
            break
        if i % 3 == 2:
            fleet.operate()
    assert status.phase == RolloutPhase.SUCCEEDED
    assert most == 5


def test_the_bake_holds_the_next_step() -> None:
    fleet = Fleet(4)
    rollout_spec = spec(steps=[{"customers": ["c00"], "bakeSeconds": 10}, {"rest": True}])
    status, decisions = run(fleet, rollout_spec, ticks=60)
    completed = next(i for i, d in enumerate(decisions) if any(e[1] == "StepCompleted" for e in d.events))
    healthy = next(i for i, d in enumerate(decisions) if (d.status.steps or [])[0].healthy_at is not None)
    assert completed - healthy == 10
    assert status.phase == RolloutPhase.SUCCEEDED


def test_a_completed_step_starts_the_next_one_s_upgrades_in_the_same_tick() -> None:
    """No tick between two steps: the one that sees a step done moves the next step's first Customers
    (the next tick can be seconds away, since nothing upgrading means no status write to wake it)."""
    fleet = Fleet(10)
    rollout_spec = spec(
        steps=[{"customers": ["c00"]}, {"percent": 30, "maxParallel": 2}, {"rest": True, "maxParallel": 10}]
    )
    status, decisions = run(fleet, rollout_spec, ticks=60)
    boundaries = [d for d in decisions if any(e[1] == "StepCompleted" for e in d.events)]
    assert len(boundaries) == 3  # the last completes the rollout
    first, second = boundaries[0], boundaries[1]
    assert [m.customer for m in first.moves] == ["c01", "c02"]  # step 2's oldest, maxParallel of them
    assert first.status.current_step == 2 and first.status.phase == RolloutPhase.PROGRESSING
    assert [e[1] for e in first.events] == ["StepCompleted", "StepStarted"]
    assert [m.customer for m in second.moves] == [f"c{i:02}" for i in range(4, 10)]  # the rest: all six
    assert status.phase == RolloutPhase.SUCCEEDED
    assert fleet.upgrades == dict.fromkeys(fleet.customers, 1)


def test_a_customer_counts_healthy_only_on_status_written_for_the_target() -> None:
    body = customer("c00", "1.0.0")
    body["metadata"]["annotations"][ROLLOUT_CHART_VERSION] = "2.0.0"
    # Ready=True from before the upgrade, release still 1.0.0: not healthy.
    assert member(body, "2.0.0").health == "updating"
    body["status"]["release"]["chartVersion"] = "2.0.0"
    # Installed, but the pass that wrote it aimed elsewhere (targetVersion): not healthy either.
    assert member(body, "2.0.0").health == "updating"
    body["status"]["release"]["targetVersion"] = "2.0.0"
    assert member(body, "2.0.0").health == "healthy"


@pytest.mark.parametrize("on_failure", ["halt", "rollback"])
def test_a_bad_version_stops_at_the_canaries(on_failure: str) -> None:
    fleet = Fleet(30, bad="2.0.0")
    rollout_spec = spec(healthGate={"timeoutSeconds": 20}, onFailure=on_failure)
    status, _ = run(fleet, rollout_spec, ticks=200)
    wanted = RolloutPhase.HALTED if on_failure == "halt" else RolloutPhase.ROLLED_BACK
    assert status.phase == wanted
    assert [f.customer for f in status.failures or ()] == ["c05", "c09"]
    assert status.failures and status.failures[0].reason == "HealthTimeout"
    assert "api 0/1" in status.failures[0].message
    others = set(fleet.customers) - {"c05", "c09"}
    assert not fleet.upgrades.keys() & others, "a Customer outside the canaries was upgraded"
    if on_failure == "rollback":
        assert fleet.on("1.0.0") == set(fleet.customers)
        back = fleet.customers["c05"]["metadata"]["annotations"]
        assert back[ROLLOUT_CHART_VERSION] == "1.0.0" and back[ROLLOUT_NAME] == "r1"
    else:
        assert fleet.on("2.0.0") == {"c05", "c09"}
    assert (status.condition("Stalled") or None) is not None


def test_paused_starts_no_upgrade_and_resume_continues() -> None:
    fleet = Fleet(10)
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    paused = decide(rollout, spec(paused=True), RolloutStatus(), list(fleet.customers.values()), [], T0)
    assert paused.moves == [] and paused.status.phase == RolloutPhase.PAUSED
    status, decisions = run(fleet, spec(), ticks=100, start=T0 + timedelta(seconds=1), status=paused.status)
    assert decisions[0].status.phase == RolloutPhase.PROGRESSING
    assert [m.customer for m in decisions[0].moves] == ["c05", "c09"]
    assert status.phase == RolloutPhase.SUCCEEDED and fleet.on("2.0.0") == set(fleet.customers)
    # It went on from step 1, which the paused tick started: not started again.
    started = [m.split(":")[0] for d in decisions for _, reason, m in d.events if reason == "StepStarted"]
    assert started == ["step 2/3 started", "step 3/3 started"]


def test_abort_moves_nothing_more() -> None:
    fleet = Fleet(10)
    decision = decide(
        Rollout("r1", 1, T0.isoformat(), {ROLLOUT_ABORT: "true"}),
        spec(),
        RolloutStatus(),
        list(fleet.customers.values()),
        [],
        T0,
    )
    assert decision.status.phase == RolloutPhase.ABORTED and decision.moves == []
    # It stays: a new chartVersion ends Aborted again, saying what to remove.
    stalled = decision.status.condition("Stalled")
    assert stalled is not None and ROLLOUT_ABORT in stalled.message and "chartVersion" in stalled.message
    # Removing the annotation alone runs nothing: an ended rollout runs again for a new chartVersion.
    again = decide(
        Rollout("r1", 1, T0.isoformat(), {}), spec(), decision.status, list(fleet.customers.values()), [], T0
    )
    assert again.status.phase == RolloutPhase.ABORTED and again.moves == []


def test_a_finished_rollout_edited_without_a_new_version_observes_the_edit_and_stays_finished() -> None:
    """Found in review: the finished branch returned the status as it was and the daemon's `settled`
    stopped ticking, so an edit that kept chartVersion (paused, a selector) left observedGeneration
    behind for good, and kstatus (Flux's wait) said InProgress forever."""
    fleet = Fleet(4)
    done, _ = run(fleet, spec(steps=[{"rest": True, "maxParallel": 10}]))
    assert done.phase == RolloutPhase.SUCCEEDED and done.observed_generation == 1
    edited = spec(steps=[{"rest": True, "maxParallel": 10}], paused=True)
    body = {"metadata": {"generation": 2}, "spec": edited.to_k8s(), "status": done.to_k8s()}
    assert not settled(body)  # the daemon ticks once more

    again = decide(Rollout("r1", 2, T0.isoformat(), {}), edited, done, list(fleet.customers.values()), [], T0)
    assert again.moves == [] and again.events == []
    assert again.status.to_k8s() == {**done.to_k8s(), "observedGeneration": 2}  # one patch, nothing else
    assert settled({**body, "status": again.status.to_k8s()})


def test_an_overlapping_newer_rollout_waits_for_the_older() -> None:
    fleet = Fleet(5)
    older = OtherRollout(
        "r0", (T0 - timedelta(hours=1)).isoformat(), spec(steps=[{"rest": True}]), RolloutPhase.PROGRESSING
    )
    decision = decide(
        Rollout("r1", 1, T0.isoformat(), {}),
        spec(steps=[{"rest": True}]),
        RolloutStatus(),
        list(fleet.customers.values()),
        [older],
        T0,
    )
    assert decision.status.phase == RolloutPhase.WAITING and decision.moves == []
    ready = decision.status.condition("Ready")
    assert ready is not None and "r0" in ready.message
    done = OtherRollout("r0", older.created, older.spec, RolloutPhase.SUCCEEDED)
    decision = decide(
        Rollout("r1", 1, T0.isoformat(), {}),
        spec(steps=[{"rest": True}]),
        decision.status,
        list(fleet.customers.values()),
        [done],
        T0,
    )
    assert decision.status.phase == RolloutPhase.PROGRESSING and decision.moves


def test_pinned_and_unselected_customers_are_never_touched() -> None:
    fleet = Fleet(6)
    fleet.customers["c01"]["spec"]["instance"] = {"chartVersion": "1.0.0"}
    fleet.customers["c02"]["metadata"]["labels"] = {"tier": "core"}
    fleet.customers["c03"]["spec"]["plan"] = "enterprise"
    rollout_spec = spec(selector={"matchLabels": {"tier": "edge"}}, plans=["starter"], steps=[{"rest": True}])
    status, _ = run(fleet, rollout_spec)
    assert status.phase == RolloutPhase.SUCCEEDED and status.selected == 3
    assert fleet.on("2.0.0") == {"c00", "c04", "c05"}


def test_plans_select_by_the_effective_plan_the_operator_reports() -> None:
    """Found in review: plans compared spec.plan, the plan of manual billing, so a Stripe-billed
    professional Customer (spec.plan left at its default, trial) was never selected by [professional]."""
    fleet = Fleet(4)
    stripe = fleet.customers["c01"]
    stripe["spec"] = {
        "billing": {"mode": "stripe"},
        "subscription": {"status": "active", "plan": "professional"},
    }
    stripe["status"]["plan"] = "professional"
    suspended = fleet.customers["c02"]
    suspended["spec"].update(plan="professional", suspended=True)
    suspended["status"]["plan"] = "unlicensed"  # what its licence grants now
    fleet.customers["c03"]["spec"]["plan"] = "professional"  # not reported yet: its spec's plan
    status, _ = run(fleet, spec(plans=["professional"], steps=[{"rest": True}]))
    assert status.phase == RolloutPhase.SUCCEEDED and status.selected == 2
    assert fleet.on("2.0.0") == {"c01", "c03"}


def test_steps_take_named_canaries_then_percentages_of_all_then_the_rest() -> None:
    members = [member(customer(f"c{i:02}", index=i), "2.0.0") for i in range(300)]
    rollout_spec = spec(steps=[{"percent": 1}, {"percent": 10}, {"rest": True}])
    assert [len(g) for g in assign_steps(rollout_spec, members)] == [3, 30, 267]
    groups = assign_steps(spec(), members[:30])
    assert [m.name for m in groups[0]] == ["c05", "c09"] and len(groups[1]) == 8 and len(groups[2]) == 20


def test_the_moved_customer_keeps_the_version_it_had_for_a_rollback() -> None:
    fleet = Fleet(1)
    decision = decide(
        Rollout("r1", 1, T0.isoformat(), {}),
        spec(steps=[{"rest": True}]),
        RolloutStatus(),
        list(fleet.customers.values()),
        [],
        T0,
    )
    assert decision.moves[0].annotations[ROLLOUT_PREVIOUS_VERSION] == "1.0.0"


def test_the_settled_version_is_the_newest_succeeded_rollout_selecting_the_customer() -> None:
    def finished(version: str, hours: int, phase: str = "Succeeded", **extra: Any) -> dict[str, Any]:
        return {
            "spec": {"chartVersion": version, "steps": [{"rest": True}], **extra},
            "status": {
                "phase": phase,
                "targetVersion": version,
                "selected": 1,
                "healthy": 1,
                "completedAt": (T0 + timedelta(hours=hours)).isoformat(),
            },
        }

    body = customer("c00")
    rollouts = [
        finished("2.0.0", 1),
        finished("3.0.0", 2, "Halted"),
        finished("2.5.0", 3, plans=["enterprise"]),
    ]
    assert settled_version(rollouts, body) == "2.0.0"
    assert settled_version([], body) is None


def test_a_rollout_that_selected_no_customer_is_not_the_version_of_new_customers() -> None:
    """Found in review: a rollout of a version never pushed (9.9.9) whose selector matched no Customer
    ended Succeeded "0/0 Customers" in its first tick, and settled_version then gave 9.9.9 to every new
    Customer it selects, whose first pass stalled (ChartVersionUnavailable): no health gate had seen
    the version run anywhere."""
    fleet = Fleet(3)
    late = {"matchLabels": {"ring": "late"}}
    nobody = spec(chartVersion="9.9.9", selector=late, steps=[{"customers": ["c00"]}, {"rest": True}])
    status, _ = run(fleet, nobody)
    assert status.phase == RolloutPhase.SUCCEEDED and status.selected == 0
    new = customer("new")
    new["metadata"]["labels"] = {"ring": "late"}
    finished = [{"spec": nobody.to_k8s(), "status": status.to_k8s()}]

    assert settled_version(finished, new) is None
    ready = status.condition("Ready")
    assert ready is not None and "no Customer selected" in ready.message, ready

    # A rollout that ran its version on a Customer it selects is the version of new ones.
    fleet.customers["c00"]["metadata"]["labels"] = {"ring": "late"}
    ran = spec(selector=late, steps=[{"rest": True}])
    done, _ = run(fleet, ran, start=T0 + timedelta(hours=1))
    assert done.phase == RolloutPhase.SUCCEEDED and done.healthy == 1
    assert settled_version([*finished, {"spec": ran.to_k8s(), "status": done.to_k8s()}], new) == "2.0.0"


def test_a_customer_s_chart_version_pin_then_rollout_then_what_it_runs_then_the_fleet() -> None:
    from iotistic_billing.customer import Customer, ReleaseStatus
    from iotistic_billing.operator.state import chart_target

    def of(annotations: dict[str, str], **instance: Any) -> Customer:
        return Customer.model_validate(
            {
                "metadata": {"name": "c", "annotations": annotations},
                "spec": {"email": "a@b.cd", "companyName": "C", "instance": instance},
            }
        )

    runs = ReleaseStatus(chart_version="1.0.0", version_source="Fleet")
    assert chart_target(of({}, chartVersion="0.9.0"), runs, immediate=False) == ("0.9.0", "Pinned")
    assert chart_target(of({ROLLOUT_CHART_VERSION: "2.0.0"}), runs, immediate=False) == ("2.0.0", "Rollout")
    # A new INSTANCE_CHART_VERSION moves nobody: the Customer keeps what it runs from the fleet.
    assert chart_target(of({}), runs, immediate=False) == ("1.0.0", "Fleet")
    # Unpinned again: back to the fleet's version, not the pin it ran.
    pinned = ReleaseStatus(chart_version="0.9.0", version_source="Pinned")
    assert chart_target(of({}), pinned, immediate=False) == (None, "Fleet")
    assert chart_target(of({}), None, immediate=False) == (None, "Fleet")
    # Found in review: a status written before rollouts (no versionSource) was read as no version at all,
    # so the chart upgrade that brought rollouts moved every Customer to the new INSTANCE_CHART_VERSION.
    before_rollouts = ReleaseStatus(chart_version="1.0.0")
    assert chart_target(of({}), before_rollouts, immediate=False) == ("1.0.0", "Fleet")
    # INSTANCE_CHART_UPGRADE=immediate: the setting for every unpinned Customer, rollouts ignored.
    assert chart_target(of({ROLLOUT_CHART_VERSION: "2.0.0"}), runs, immediate=True) == (None, "Fleet")
    assert chart_target(of({}, chartVersion="0.9.0"), runs, immediate=True) == ("0.9.0", "Pinned")


def test_leaving_immediate_mode_keeps_the_version_each_customer_runs() -> None:
    """Found in review: a rollout took the fleet to 2.0.0; INSTANCE_CHART_UPGRADE=immediate then moved
    it to 3.0.0 from the fleet, the annotations left as they were; back in `rollout` mode every Customer
    followed its old annotation down to 2.0.0 at once, with no step and no health gate."""
    fleet = Fleet(3, bad="4.0.0")
    done, _ = run(fleet, spec(steps=[{"rest": True}]))
    assert done.phase == RolloutPhase.SUCCEEDED and fleet.on("2.0.0") == set(fleet.customers)
    fleet.immediate, fleet.version = True, "3.0.0"
    fleet.operate()
    assert fleet.on("3.0.0") == set(fleet.customers)

    fleet.immediate = False
    fleet.upgrades.clear()
    fleet.operate()

    assert fleet.upgrades == {} and fleet.on("3.0.0") == set(fleet.customers)
    assert {fleet.aims(body)[1] for body in fleet.customers.values()} == {"Fleet"}
    # A rollout still moves them from there, and its rollback takes them back.
    bad = spec(
        chartVersion="4.0.0",
        steps=[{"customers": ["c00"]}, {"rest": True}],
        healthGate={"timeoutSeconds": 5},
        onFailure="rollback",
    )
    status, _ = run(fleet, bad, start=T0 + timedelta(days=1))
    assert status.phase == RolloutPhase.ROLLED_BACK and fleet.on("3.0.0") == set(fleet.customers)
    assert fleet.upgrades == {"c00": 2}


def test_leaving_immediate_mode_after_a_rollback_moves_nobody() -> None:
    """Found in review: the rollback wrote c00's `chart-version: 1.0.0` with no previous-chart-version,
    so once INSTANCE_CHART_UPGRADE=immediate had put it on 3.0.0, nothing said 3.0.0 came after the
    annotation: back in `rollout` mode c00 went down to 1.0.0 at once, with no step and no health gate."""
    fleet = Fleet(3, bad="2.0.0")
    bad = spec(
        steps=[{"customers": ["c00"]}, {"rest": True}],
        healthGate={"timeoutSeconds": 5},
        onFailure="rollback",
    )
    status, _ = run(fleet, bad)
    assert status.phase == RolloutPhase.ROLLED_BACK and fleet.on("1.0.0") == set(fleet.customers)
    fleet.immediate, fleet.version = True, "3.0.0"
    fleet.operate()

    fleet.immediate = False
    fleet.upgrades.clear()
    fleet.operate()

    assert fleet.upgrades == {} and fleet.on("3.0.0") == set(fleet.customers)
    # A later rollout records the version it moves c00 from, and its rollback takes c00 back there.
    worse = bad.model_copy(update={"chart_version": "4.0.0"})
    fleet.bad = "4.0.0"
    status, _ = run(fleet, worse, start=T0 + timedelta(days=1))
    assert status.phase == RolloutPhase.ROLLED_BACK and fleet.on("3.0.0") == set(fleet.customers)


# ----- Customers left over from earlier steps -----


@pytest.mark.parametrize("on_failure", ["halt", "rollback"])
def test_a_customer_left_over_from_a_completed_step_is_judged_with_the_current_one(on_failure: str) -> None:
    """Canary `late` is created after its step completed (empty): it is moved with step 2, and its
    failure stops the rollout (rollback returns it) instead of being passed over."""
    fleet = Fleet(4, broken={"late"})

    def create_late(i: int) -> None:
        if i == 2:
            fleet.customers["late"] = customer("late", index=99)

    rollout_spec = spec(
        steps=[{"customers": ["late"]}, {"rest": True, "maxParallel": 1}], onFailure=on_failure
    )
    status, _ = run(fleet, rollout_spec, ticks=100, before_tick=create_late)

    assert status.phase == (RolloutPhase.HALTED if on_failure == "halt" else RolloutPhase.ROLLED_BACK)
    assert [(f.customer, f.step, f.reason) for f in status.failures or ()] == [("late", 2, "UpgradeFailed")]
    assert status.failed == 1 and [s.failed for s in status.steps or ()] == [0, 1]
    late = fleet.customers["late"]["metadata"]["annotations"][ROLLOUT_CHART_VERSION]
    assert late == ("2.0.0" if on_failure == "halt" else "1.0.0")


def test_a_step_waits_for_a_left_over_customer_to_turn_healthy() -> None:
    """c00 joined step 1 after it completed (relabelled into the selector, the oldest) and was moved
    in step 2: step 2 is healthy, c00 still upgrading; the rollout goes on only once c00 is healthy."""
    fleet = Fleet(4)
    for name, body in fleet.customers.items():
        moved_at = T0 - timedelta(seconds=5 if name == "c00" else 20)
        body["metadata"]["annotations"].update(
            {ROLLOUT_CHART_VERSION: "2.0.0", ROLLOUT_NAME: "r1", ROLLOUT_UPDATED_AT: moved_at.isoformat()}
        )
        if name != "c00":
            body["status"]["release"].update(chartVersion="2.0.0", targetVersion="2.0.0")
    started = T0 - timedelta(seconds=10)
    status = RolloutStatus(
        phase=RolloutPhase.PROGRESSING,
        target_version="2.0.0",
        current_step=2,
        started_at=T0 - timedelta(minutes=1),
        steps=[
            StepStatus(started_at=T0 - timedelta(minutes=1), completed_at=started),
            StepStatus(started_at=started),
        ],
    )
    rollout, rollout_spec = (
        Rollout("r1", 1, T0.isoformat(), {}),
        spec(steps=[{"percent": 25}, {"rest": True}]),
    )

    upgrading = decide(rollout, rollout_spec, status, list(fleet.customers.values()), [], T0)
    fleet.operate()
    healthy = decide(rollout, rollout_spec, upgrading.status, list(fleet.customers.values()), [], T0)

    assert upgrading.status.phase == RolloutPhase.PROGRESSING and upgrading.moves == []
    assert not any(e[1] == "StepCompleted" for e in upgrading.events)
    assert healthy.status.phase == RolloutPhase.SUCCEEDED and healthy.status.healthy == 4


def test_rolled_back_waits_for_a_pass_that_ran_the_returned_version() -> None:
    """Found in review: RolledBack came once each returned Customer's status.release.chartVersion was
    the version it went back to, which it already was before any pass ran the return: c01, which helm
    refused 2.0.0 (Stalled, its failed revision half applied, repaired only by the return's upgrade),
    and c00 and c02, mid-upgrade to 2.0.0, which landed there after the rollout said RolledBack."""
    fleet = Fleet(3, broken={"c01"})
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    rollout_spec = spec(steps=[{"rest": True, "maxParallel": 3}], onFailure="rollback")
    tick = ticker(fleet, rollout, rollout_spec)

    status = tick(RolloutStatus())
    fleet.operate(["c01"])  # helm refuses c01; the upgrades of c00 and c02 to 2.0.0 still run
    status = tick(status)
    assert status.phase == RolloutPhase.ROLLING_BACK
    assert {b["metadata"]["annotations"][ROLLOUT_CHART_VERSION] for b in fleet.customers.values()} == {
        "1.0.0"
    }

    phases = []
    status = tick(status)  # no pass has run the return yet
    phases.append(status.phase)
    fleet.operate(["c01"])  # its return runs 1.0.0 again (c00 and c02: the status from before the rollout)
    status = tick(status)
    phases.append(status.phase)
    for name in ("c00", "c02"):  # their upgrades end on 2.0.0, their statuses written over the return
        body = fleet.customers[name]
        body["status"]["release"].update(chartVersion="2.0.0", targetVersion="2.0.0", versionSource="Rollout")
    status = tick(status)
    phases.append(status.phase)
    fleet.operate()  # their returns
    status = tick(status)
    phases.append(status.phase)

    assert phases == [RolloutPhase.ROLLING_BACK] * 3 + [RolloutPhase.ROLLED_BACK]
    assert fleet.on("1.0.0") == set(fleet.customers)
    assert {fleet.customers[n]["status"]["release"]["versionSource"] for n in fleet.customers} == {"Rollout"}


def test_a_rollback_waits_for_a_customer_still_upgrading_whose_status_names_the_returned_version() -> None:
    """Found in review: c00, put on 1.5.0 by an earlier rollout r0, counted as returned to 1.5.0 the
    moment r1 rolled back, while its upgrade to 2.0.0 still ran: its status.release (targetVersion and
    chartVersion 1.5.0, versionSource Rollout) was r0's pass's, and r1 said RolledBack before a later
    pass took it back from 2.0.0. Only a pass that read the return (its updated-at) counts."""
    fleet = Fleet(2)
    r0_moved_at = (T0 - timedelta(days=1)).isoformat(timespec="seconds")
    for body in fleet.customers.values():
        body["metadata"]["annotations"].update(
            {
                ROLLOUT_CHART_VERSION: "1.5.0",
                ROLLOUT_NAME: "r0",
                ROLLOUT_UPDATED_AT: r0_moved_at,
                ROLLOUT_PREVIOUS_VERSION: "1.0.0",
            }
        )
    fleet.operate()
    assert fleet.on("1.5.0") == {"c00", "c01"}
    fleet.broken.add("c01")
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    rollout_spec = spec(steps=[{"rest": True, "maxParallel": 2}], onFailure="rollback")
    tick = ticker(fleet, rollout, rollout_spec)

    status = tick(RolloutStatus())
    upgrade = dict(fleet.customers["c00"]["metadata"]["annotations"])  # the pass that starts reads these
    fleet.operate(["c01"])  # helm refuses c01; c00's upgrade to 2.0.0 still runs
    status = tick(status)
    assert status.phase == RolloutPhase.ROLLING_BACK
    c00 = member(fleet.customers["c00"], "2.0.0")
    assert (c00.version, c00.annotated_result) == ("1.5.0", "not yet")

    phases = []
    fleet.operate(["c01"])  # c01's return runs 1.5.0
    status = tick(status)
    phases.append(status.phase)
    release = fleet.customers["c00"]["status"]["release"]  # c00's upgrade ends on 2.0.0
    release.update(chartVersion="2.0.0", targetVersion="2.0.0", rolloutUpdatedAt=upgrade[ROLLOUT_UPDATED_AT])
    status = tick(status)
    phases.append(status.phase)
    fleet.operate()  # c00's return
    status = tick(status)
    phases.append(status.phase)

    assert phases == [RolloutPhase.ROLLING_BACK] * 2 + [RolloutPhase.ROLLED_BACK]
    assert fleet.on("1.5.0") == {"c00", "c01"}


def test_a_rollback_counts_a_return_that_an_operator_from_before_rollout_updated_at_ran() -> None:
    """An operator upgraded while a rollout rolls back: a status written before status.release.
    rolloutUpdatedAt existed is judged by its versions alone, as then, so the rollback ends (a pass that
    stalls before its release step, a spec refused, never writes the field)."""
    body = customer("c00", version="1.0.0")
    body["metadata"]["annotations"].update(
        {
            ROLLOUT_CHART_VERSION: "1.0.0",
            ROLLOUT_NAME: "r1",
            ROLLOUT_UPDATED_AT: T0.isoformat(timespec="seconds"),
            ROLLOUT_PREVIOUS_VERSION: "2.0.0",
        }
    )
    body["status"]["release"]["versionSource"] = "Rollout"

    returned = member(body, "2.0.0")
    body["status"]["release"]["rolloutUpdatedAt"] = (T0 - timedelta(minutes=5)).isoformat(timespec="seconds")
    earlier = member(body, "2.0.0")

    assert returned.annotated_result == "ran"
    assert earlier.annotated_result == "not yet"


def test_a_rollback_whose_return_helm_refuses_ends_halted_naming_the_customers_and_why() -> None:
    """Found in review: a Customer's return the operator's helm refused (Stalled: the version it ran
    before deleted from the registry, say) never counted as done, so the rollout stayed RollingBack for
    good and, still moving, kept every rollout selecting the same Customers Waiting."""
    fleet = Fleet(3, broken={"c02"}, withdrawn={"1.0.0"})
    rollout_spec = spec(steps=[{"customers": ["c00", "c01"]}, {"rest": True}], onFailure="rollback")
    status, decisions = run(fleet, rollout_spec, ticks=60)

    assert status.phase == RolloutPhase.HALTED, status.conditions
    stalled = status.condition("Stalled")
    assert stalled is not None and stalled.status == "True" and stalled.reason == "RollbackFailed"
    assert stalled.message == (
        "rolling back after c02 failed: the return of c00 (ChartVersionUnavailable: 1.0.0, which the "
        "registry does not have), c01 (ChartVersionUnavailable: 1.0.0, which the registry does not "
        "have) was refused"
    )
    assert [e for e in decisions[-1].events if e[1] == "RollbackFailed"] == [
        ("Warning", "RollbackFailed", stalled.message)
    ]
    # c02, which helm refused 2.0.0, runs 1.0.0 still; c00 and c01 stay set to 1.0.0, moved there and
    # back once each, and nothing moves them again.
    assert fleet.on("1.0.0") == {"c02"} and fleet.on("2.0.0") == {"c00", "c01"}
    moves = [m.customer for d in decisions for m in d.moves]
    assert sorted(moves) == ["c00", "c00", "c01", "c01", "c02", "c02"]
    again = decide(
        Rollout("r1", 1, T0.isoformat(), {}), rollout_spec, status, list(fleet.customers.values()), [], T0
    )
    assert again.moves == [] and again.status.phase == RolloutPhase.HALTED
    # Finished, it no longer holds up an overlapping rollout.
    other = OtherRollout("r1", T0.isoformat(), rollout_spec, status.phase, status.target_version)
    assert not other.active and not other.moving


def test_rollback_returns_every_customer_the_rollout_moved() -> None:
    """A failure in step 2 rolls back step 1's Customers too: none is left on the version given up on."""
    fleet = Fleet(8, broken={"c06"})
    rollout_spec = spec(steps=[{"customers": ["c01"]}, {"rest": True}], onFailure="rollback")
    status, _ = run(fleet, rollout_spec, ticks=60)

    assert status.phase == RolloutPhase.ROLLED_BACK
    assert [(f.customer, f.step) for f in status.failures or ()] == [("c06", 2)]
    assert fleet.on("1.0.0") == set(fleet.customers)
    assert fleet.upgrades["c01"] == 2  # there and back


# ----- healthGate.maxFailures above 1 -----


def test_failures_below_max_failures_do_not_hold_the_rollout() -> None:
    fleet = Fleet(10, broken={"c00", "c07"})
    rollout_spec = spec(healthGate={"maxFailures": 3}, steps=[{"percent": 50}, {"rest": True}])
    status, _ = run(fleet, rollout_spec, ticks=60)

    assert status.phase == RolloutPhase.SUCCEEDED
    assert [(f.customer, f.step) for f in status.failures or ()] == [("c00", 1), ("c07", 2)]
    assert status.failed == 2 and status.healthy == 8
    # They stay set to the version (the operator keeps trying), and the finish says so.
    assert {
        n
        for n, b in fleet.customers.items()
        if b["metadata"]["annotations"].get(ROLLOUT_CHART_VERSION) == "2.0.0"
    } == set(fleet.customers)
    ready = status.condition("Ready")
    assert ready is not None and ready.status == "True" and "2 failed (c00, c07)" in ready.message


def test_the_failure_count_goes_past_the_listed_hundred_and_halts() -> None:
    """150 fail in step 1 (below 200: the step completes), 150 more in step 2: halted, though only
    100 are listed."""
    fleet = Fleet(300, bad="2.0.0")
    rollout_spec = spec(
        healthGate={"maxFailures": 200, "timeoutSeconds": 5},
        steps=[{"percent": 50, "maxParallel": 1000}, {"rest": True, "maxParallel": 1000}],
    )
    status, _ = run(fleet, rollout_spec, ticks=60)

    assert status.phase == RolloutPhase.HALTED
    assert len(status.failures or ()) == 100
    assert [s.failed for s in status.steps or ()] == [150, 150] and status.failed == 300
    stalled = status.condition("Stalled")
    assert stalled is not None and "and 290 more failed" in stalled.message


# ----- two rollouts and one Customer -----


def run_together(
    fleet: Fleet,
    rollouts: list[tuple[Rollout, RolloutSpec, RolloutStatus]],
    ticks: int,
    before_tick: Callable[[int], None] = lambda i: None,
) -> list[dict[str, Decision]]:
    """Ticks of several rollouts on one fleet, each seeing the others' last status."""
    statuses = {r.name: status for r, _, status in rollouts}
    history = []
    for i in range(ticks):
        before_tick(i)
        decisions = {}
        for rollout, rollout_spec, _ in rollouts:
            others = [
                OtherRollout(r.name, r.created, s, statuses[r.name].phase, statuses[r.name].target_version)
                for r, s, _ in rollouts
                if r.name != rollout.name
            ]
            decision = decide(
                rollout,
                rollout_spec,
                statuses[rollout.name],
                list(fleet.customers.values()),
                others,
                T0 + timedelta(seconds=i),
            )
            fleet.apply(decision)
            decisions[rollout.name], statuses[rollout.name] = decision, decision.status
        history.append(decisions)
        fleet.operate()
    return history


def versions_run(fleet: Fleet, history_of: dict[str, list[str]]) -> None:
    for name, body in fleet.customers.items():
        runs = history_of.setdefault(name, [])
        if not runs or runs[-1] != body["status"]["release"]["chartVersion"]:
            runs.append(body["status"]["release"]["chartVersion"])


def test_a_finished_rollout_started_again_waits_for_one_that_moves_the_same_customers() -> None:
    """r0 (older) set the fleet to 1.0.0 and is edited to 3.0.0 while r1 takes it to 2.0.0: r0 waits
    for r1, then moves each Customer once; none goes back and forth."""
    fleet = Fleet(3)
    for body in fleet.customers.values():
        body["metadata"]["annotations"].update({ROLLOUT_CHART_VERSION: "1.0.0", ROLLOUT_NAME: "r0"})
    r0 = Rollout("r0", 2, (T0 - timedelta(hours=2)).isoformat(), {})
    r1 = Rollout("r1", 1, (T0 - timedelta(hours=1)).isoformat(), {})
    r0_finished = RolloutStatus(phase=RolloutPhase.SUCCEEDED, target_version="1.0.0", current_step=1)
    r1_started = RolloutStatus(phase=RolloutPhase.PROGRESSING, target_version="2.0.0", current_step=1)
    versions: dict[str, list[str]] = {}
    history = run_together(
        fleet,
        [
            (r0, spec(chartVersion="3.0.0", steps=[{"rest": True}]), r0_finished),
            (r1, spec(chartVersion="2.0.0", steps=[{"rest": True, "maxParallel": 10}]), r1_started),
        ],
        ticks=12,
        before_tick=lambda i: versions_run(fleet, versions),
    )

    assert history[0]["r0"].status.phase == RolloutPhase.WAITING and not history[0]["r0"].moves
    assert history[-1]["r0"].status.phase == history[-1]["r1"].status.phase == RolloutPhase.SUCCEEDED
    assert versions == {name: ["1.0.0", "2.0.0", "3.0.0"] for name in fleet.customers}


def test_a_customer_relabelled_into_a_second_running_rollout_waits_for_the_first() -> None:
    fleet = Fleet(4)
    for name, labels in {"c00": {"ring": "a"}, "c01": {"ring": "a"}, "c02": {"zone": "b"}}.items():
        fleet.customers[name]["metadata"]["labels"] = labels
    fleet.customers["c03"]["metadata"]["labels"] = {"zone": "b"}
    ra = Rollout("ra", 1, (T0 - timedelta(hours=2)).isoformat(), {})
    rb = Rollout("rb", 1, (T0 - timedelta(hours=1)).isoformat(), {})
    a_spec = spec(
        selector={"matchLabels": {"ring": "a"}},
        steps=[{"customers": ["c00"], "bakeSeconds": 40}, {"rest": True}],
    )
    b_spec = spec(
        chartVersion="3.0.0",
        selector={"matchLabels": {"zone": "b"}},
        steps=[{"customers": ["c03"], "bakeSeconds": 5}, {"rest": True}],
    )

    def relabel(i: int) -> None:
        versions_run(fleet, versions)
        if i == 3:  # ra has moved c00; now rb selects it too
            fleet.customers["c00"]["metadata"]["labels"] = {"ring": "a", "zone": "b"}

    versions: dict[str, list[str]] = {}
    history = run_together(
        fleet, [(ra, a_spec, RolloutStatus()), (rb, b_spec, RolloutStatus())], ticks=60, before_tick=relabel
    )

    assert versions["c00"] == ["1.0.0", "2.0.0", "3.0.0"]
    held = history[20]["rb"].status
    ready = held.condition("Ready")
    assert held.phase == RolloutPhase.PROGRESSING and ready is not None
    assert ready.reason == "WaitingForRollout" and "1 waiting for InstanceRollout ra" in ready.message
    # Each moves c00 once: ra first, rb in the tick that sees ra finished.
    moved_by = {
        name: [i for i, d in enumerate(history) if any(m.customer == "c00" for m in d[name].moves)]
        for name in ("ra", "rb")
    }
    assert moved_by["ra"] == [0]
    finished_a = next(i for i, d in enumerate(history) if d["ra"].status.phase == RolloutPhase.SUCCEEDED)
    assert moved_by["rb"] == [finished_a]
    assert history[-1]["rb"].status.phase == RolloutPhase.SUCCEEDED


def test_two_running_rollouts_holding_each_other_s_customers_both_finish() -> None:
    """Each moved a Customer the other then selects: the older does not wait for the newer, so the
    two never wait for each other."""
    fleet = Fleet(2)
    fleet.customers["c00"]["metadata"]["annotations"].update(
        {ROLLOUT_CHART_VERSION: "2.0.0", ROLLOUT_NAME: "ra"}
    )
    fleet.customers["c01"]["metadata"]["annotations"].update(
        {ROLLOUT_CHART_VERSION: "3.0.0", ROLLOUT_NAME: "rb"}
    )
    fleet.operate()
    fleet.upgrades.clear()
    ra = Rollout("ra", 1, (T0 - timedelta(hours=2)).isoformat(), {})
    rb = Rollout("rb", 1, (T0 - timedelta(hours=1)).isoformat(), {})
    running = {
        v: RolloutStatus(phase=RolloutPhase.PROGRESSING, target_version=v, current_step=1)
        for v in ("2.0.0", "3.0.0")
    }
    history = run_together(
        fleet,
        [
            (ra, spec(steps=[{"rest": True}]), running["2.0.0"]),
            (rb, spec(chartVersion="3.0.0", steps=[{"rest": True}]), running["3.0.0"]),
        ],
        ticks=10,
    )

    assert history[-1]["ra"].status.phase == history[-1]["rb"].status.phase == RolloutPhase.SUCCEEDED
    assert fleet.on("3.0.0") == set(fleet.customers)
    # c01 taken by the older first (rb waits for it meanwhile), then by rb again; c00 by rb once.
    assert fleet.upgrades == {"c00": 1, "c01": 2}


def test_a_customer_moved_by_the_step_that_a_smaller_fleet_puts_in_a_later_step_is_waited_for() -> None:
    """Step 1 moved c00-c02 (10% of 21); c20 is deleted, 10% of 20 is 2, and c02, still upgrading,
    now falls in step 2: step 1 still waits for it, and step 2 starts no upgrade meanwhile."""
    fleet = Fleet(21)
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    rollout_spec = spec(steps=[{"percent": 10, "bakeSeconds": 0}, {"rest": True, "maxParallel": 5}])
    first = decide(rollout, rollout_spec, RolloutStatus(), list(fleet.customers.values()), [], T0)
    fleet.apply(first)
    fleet.operate()
    fleet.customers["c02"]["status"]["release"].update(chartVersion="1.0.0")  # its upgrade still runs
    del fleet.customers["c20"]

    later = T0 + timedelta(seconds=5)
    second = decide(rollout, rollout_spec, first.status, list(fleet.customers.values()), [], later)

    assert sorted(move.customer for move in first.moves) == ["c00", "c01", "c02"]
    assert second.moves == [] and not any(e[1] == "StepCompleted" for e in second.events)
    assert second.status.current_step == 1 and second.status.phase == RolloutPhase.PROGRESSING


def test_a_rollback_returns_a_moved_customer_whose_plan_took_it_out_of_the_selection() -> None:
    """`plans` selects by the effective plan, which changes by itself (a trial ending, a suspension): the
    canary c01 lapses once on 2.0.0, and a failure in step 2 still brings it back."""
    fleet = Fleet(8, broken={"c06"})
    for body in fleet.customers.values():
        body["spec"]["plan"] = body["status"]["plan"] = "professional"

    def lapse(tick: int) -> None:
        c01 = fleet.customers["c01"]
        if c01["status"]["release"]["chartVersion"] == "2.0.0":
            c01["status"]["plan"] = "unlicensed"

    rollout_spec = spec(
        plans=["professional"], steps=[{"customers": ["c01"]}, {"rest": True}], onFailure="rollback"
    )
    status, _ = run(fleet, rollout_spec, ticks=80, before_tick=lapse)

    assert fleet.customers["c01"]["status"]["plan"] == "unlicensed"
    assert status.phase == RolloutPhase.ROLLED_BACK
    assert [(f.customer, f.step) for f in status.failures or ()] == [("c06", 2)]
    assert fleet.on("2.0.0") == set() and fleet.upgrades["c01"] == 2  # there and back


def test_a_customer_relabelled_out_while_its_step_upgrades_it_is_still_judged() -> None:
    """c01, moved in step 1, leaves the selector while helm refuses it: the step records its failure."""
    fleet = Fleet(6, broken={"c01"})

    def relabel(tick: int) -> None:
        c01 = fleet.customers["c01"]
        if c01["metadata"]["annotations"].get(ROLLOUT_CHART_VERSION) == "2.0.0":
            c01["metadata"]["labels"] = {"tier": "core"}

    rollout_spec = spec(
        selector={"matchLabels": {"tier": "edge"}}, steps=[{"customers": ["c01"]}, {"rest": True}]
    )
    status, _ = run(fleet, rollout_spec, ticks=80, before_tick=relabel)

    assert status.phase == RolloutPhase.HALTED
    assert [(f.customer, f.step) for f in status.failures or ()] == [("c01", 1)]


def test_a_customer_deleted_while_its_step_upgrades_it_is_no_longer_judged() -> None:
    """Found in review: c01, moved in step 1, is deleted and its finalizer keeps retrying (PostgreSQL
    away), Ready False with reason Terminating. It held the step's one slot, failed the health gate
    after timeoutSeconds and rolled back the whole rollout, itself included."""
    fleet = Fleet(6)

    def delete_c01(tick: int) -> None:
        if tick == 1:
            c01 = fleet.customers["c01"]
            c01["metadata"]["deletionTimestamp"] = (T0 + timedelta(seconds=1)).isoformat()
            c01["status"]["conditions"] = [
                {"type": "Ready", "status": "False", "reason": "Terminating", "message": "DeletionFailed"}
            ]

    rollout_spec = spec(
        healthGate={"timeoutSeconds": 20},
        onFailure="rollback",
        steps=[{"customers": ["c01", "c02"], "maxParallel": 1}, {"rest": True}],
    )
    status, decisions = run(fleet, rollout_spec, ticks=100, before_tick=delete_c01)

    assert [m.customer for m in decisions[1].moves] == ["c02"]  # c01's slot is free
    assert status.phase == RolloutPhase.SUCCEEDED and status.failures is None and status.failed == 0
    assert [i for i, d in enumerate(decisions) if any(m.customer == "c01" for m in d.moves)] == [0]
    assert fleet.on("2.0.0") == set(fleet.customers)


def test_a_customer_pinned_while_its_step_runs_is_not_judged_nor_waited_for_by_the_rollback() -> None:
    """Found in review: c00, moved in step 1, is pinned to 0.9.0 (spec.instance.chartVersion) while the
    step bakes. It was still judged as the step's (HealthTimeout, not Ready on 2.0.0, failing the whole
    rollout), and the rollback wrote its annotations and waited for it to run 1.0.0, for good. The
    rollback still returns its annotation (a later review: else it goes to 2.0.0 once unpinned)."""
    fleet = Fleet(6, broken={"c03"})

    def pin_c00(tick: int) -> None:
        if tick == 3:
            fleet.customers["c00"]["spec"]["instance"] = {"chartVersion": "0.9.0"}

    rollout_spec = spec(
        steps=[{"customers": ["c00", "c01"], "bakeSeconds": 30}, {"rest": True}],
        healthGate={"timeoutSeconds": 20},
        onFailure="rollback",
    )
    status, decisions = run(fleet, rollout_spec, ticks=200, before_tick=pin_c00)

    assert [(f.customer, f.step) for f in status.failures or ()] == [("c03", 2)]
    assert status.phase == RolloutPhase.ROLLED_BACK
    c00_moves = [m for d in decisions for m in d.moves if m.customer == "c00"]
    assert [m.annotations[ROLLOUT_CHART_VERSION] for m in c00_moves] == ["2.0.0", "1.0.0"]
    assert fleet.on("0.9.0") == {"c00"} and fleet.on("1.0.0") == set(fleet.customers) - {"c00"}


def leave_c00_on_1_5_0_from_an_earlier_run(fleet: Fleet) -> None:
    """c00 set to 1.5.0 by this rollout's run before (a version helm refuses it: Stalled on it)."""
    fleet.broken.add("c00")
    fleet.customers["c00"]["metadata"]["annotations"].update(
        {
            ROLLOUT_CHART_VERSION: "1.5.0",
            ROLLOUT_NAME: "r1",
            ROLLOUT_UPDATED_AT: (T0 - timedelta(hours=1)).isoformat(timespec="seconds"),
            ROLLOUT_PREVIOUS_VERSION: "1.0.0",
        }
    )
    fleet.operate()


@pytest.mark.parametrize("left", ["pinned", "by an earlier run"])
def test_a_rollback_finishes_though_a_customer_it_cannot_move_never_returns(left: str) -> None:
    """Found in review: RollingBack waited for every Customer whose annotation names the rollout to run
    the annotated version, also for one it does not move back: pinned (to a version other than the one
    before), or left on another version by an earlier run. It never ended, and as a moving rollout it
    kept every overlapping one Waiting."""
    fleet = Fleet(4, broken={"c02"})

    def pin_c00(tick: int) -> None:
        if left == "pinned" and tick == 2:
            fleet.customers["c00"]["spec"]["instance"] = {"chartVersion": "0.9.0"}

    if left == "pinned":
        steps: list[dict[str, Any]] = [{"customers": ["c00"]}, {"rest": True}]
    else:
        leave_c00_on_1_5_0_from_an_earlier_run(fleet)
        steps = [{"customers": ["c01", "c02"]}, {"rest": True}]
    status, _ = run(fleet, spec(steps=steps, onFailure="rollback"), ticks=30, before_tick=pin_c00)

    assert status.phase == RolloutPhase.ROLLED_BACK, status.conditions
    assert [f.customer for f in status.failures or ()] == ["c02"]
    assert fleet.on("2.0.0") == set()
    c00 = fleet.customers["c00"]["metadata"]["annotations"][ROLLOUT_CHART_VERSION]
    # Pinned: its annotation goes back too (found in review: left on 2.0.0, the version the health gate
    # rejected, c00 went there once unpinned). An earlier run's version is left alone.
    assert c00 == ("1.0.0" if left == "pinned" else "1.5.0")
    if left == "pinned":
        fleet.customers["c00"]["spec"]["instance"] = {}
        fleet.operate()
        assert fleet.on("1.0.0") >= {"c00"}


@pytest.mark.parametrize("change", ["the fleet shrinks", "the steps are cut"])
def test_a_customer_moved_then_left_out_of_every_step_is_still_judged(change: str) -> None:
    """Found in review: step 2 (50%: c01-c05) moved c05, which helm refuses, and then no step held it:
    two Customers it did not take were deleted (50% is c01-c04, and no `rest` step follows), or
    spec.steps was edited down to fewer steps than the current one. c05 was neither judged nor rolled
    back, and the rollout Succeeded with 0 failed."""
    fleet = Fleet(10, broken={"c05"})
    rollout_spec = spec(
        steps=[{"customers": ["c00"]}, {"percent": 50, "maxParallel": 5}],
        healthGate={"timeoutSeconds": 60, "maxFailures": 1},
        onFailure="rollback",
    )

    def leave_c05_out(tick: int) -> None:
        if fleet.customers["c05"]["metadata"]["annotations"].get(ROLLOUT_CHART_VERSION) != "2.0.0":
            return
        if change == "the fleet shrinks" and "c08" in fleet.customers:
            del fleet.customers["c07"], fleet.customers["c08"]
        if change == "the steps are cut":
            rollout_spec.steps = rollout_spec.steps[:1]

    status, _ = run(fleet, rollout_spec, ticks=100, before_tick=leave_c05_out)

    assert status.phase == RolloutPhase.ROLLED_BACK, status.conditions
    assert [(f.customer, f.reason) for f in status.failures or ()] == [("c05", "UpgradeFailed")]
    assert status.failed == 1 and fleet.on("2.0.0") == set()
    assert fleet.customers["c05"]["metadata"]["annotations"][ROLLOUT_CHART_VERSION] == "1.0.0"


def test_cutting_the_running_step_does_not_rejudge_the_last_step_s_customers() -> None:
    """Found in review: while step 3 ran, c01 (step 2's, healthy when step 2 ended) went not Ready and
    spec.steps was cut to two. Step 2 ran again from its old start and judged all of its Customers
    again: c01 failed it (HealthTimeout) and halted a rollout that, uncut, Succeeds. It judges only what
    was moved since step 3 started."""
    fleet = Fleet(10)
    rollout_spec = spec(
        steps=[{"customers": ["c00"]}, {"percent": 50}, {"rest": True, "bakeSeconds": 100}],
        healthGate={"timeoutSeconds": 5, "maxFailures": 1},
        onFailure="halt",
    )

    def cut_while_step_3_bakes(tick: int) -> None:
        if fleet.on("2.0.0") == set(fleet.customers) and len(rollout_spec.steps) == 3:
            fleet.customers["c01"]["status"]["conditions"] = [
                {"type": "Ready", "status": "False", "reason": "DeploymentsUnavailable", "message": "api 0/1"}
            ]
            rollout_spec.steps = rollout_spec.steps[:2]

    status, _ = run(fleet, rollout_spec, ticks=100, before_tick=cut_while_step_3_bakes)

    assert len(rollout_spec.steps) == 2
    assert status.phase == RolloutPhase.SUCCEEDED, status.conditions
    assert status.failures is None and status.failed == 0 and status.current_step == 2


# ----- spec.paused holds a rollback too -----


def canaries_moved(rollout_spec: RolloutSpec) -> tuple[Fleet, Decision]:
    """c01 and c02 moved as step 1's canaries; the operator then installs c01 and helm refuses c02."""
    fleet = Fleet(6, broken={"c02"})
    first = decide(
        Rollout("r1", 1, T0.isoformat(), {}),
        rollout_spec,
        RolloutStatus(),
        list(fleet.customers.values()),
        [],
        T0,
    )
    fleet.apply(first)
    fleet.operate()
    return fleet, first


CANARIES = spec(steps=[{"customers": ["c01", "c02"]}, {"rest": True}], onFailure="rollback")


def test_a_failure_noticed_while_paused_moves_no_customer_and_the_rollback_starts_on_resume() -> None:
    """Found in review: a failure over healthGate.maxFailures seen while spec.paused switched the
    rollout to RollingBack and moved its Customers back, though a paused rollout starts no upgrade."""
    fleet, first = canaries_moved(CANARIES)
    rollout, later = Rollout("r1", 1, T0.isoformat(), {}), T0 + timedelta(seconds=1)
    paused_spec = CANARIES.model_copy(update={"paused": True})

    paused = decide(rollout, paused_spec, first.status, list(fleet.customers.values()), [], later)

    assert paused.status.phase == RolloutPhase.PAUSED and paused.moves == []
    assert [(f.customer, f.reason) for f in paused.status.failures or ()] == [("c02", "UpgradeFailed")]
    assert paused.status.failed == 1 and [e[1] for e in paused.events] == ["CustomerFailed"]
    ready = paused.status.condition("Ready")
    assert ready is not None and ready.reason == "Paused" and "c02 failed" in ready.message

    resumed = decide(rollout, CANARIES, paused.status, list(fleet.customers.values()), [], later)

    assert resumed.status.phase == RolloutPhase.ROLLING_BACK
    assert sorted(m.customer for m in resumed.moves) == ["c01", "c02"]
    assert {m.annotations[ROLLOUT_CHART_VERSION] for m in resumed.moves} == {"1.0.0"}


def test_a_paused_rollback_moves_no_customer_until_resumed() -> None:
    """RollingBack, its moves not made yet (the status is written first), when spec.paused is set."""
    fleet, first = canaries_moved(CANARIES)
    rollout, later = Rollout("r1", 1, T0.isoformat(), {}), T0 + timedelta(seconds=1)
    rolling_back = decide(rollout, CANARIES, first.status, list(fleet.customers.values()), [], later)
    assert rolling_back.status.phase == RolloutPhase.ROLLING_BACK and rolling_back.moves

    paused_spec = CANARIES.model_copy(update={"paused": True})
    paused = decide(rollout, paused_spec, rolling_back.status, list(fleet.customers.values()), [], later)

    assert paused.moves == [] and paused.status.phase == RolloutPhase.ROLLING_BACK
    ready = paused.status.condition("Ready")
    assert ready is not None and ready.reason == "Paused"

    resumed = decide(rollout, CANARIES, paused.status, list(fleet.customers.values()), [], later)
    assert sorted(m.customer for m in resumed.moves) == ["c01", "c02"]
    fleet.apply(resumed)
    fleet.operate()
    done = decide(rollout, CANARIES, resumed.status, list(fleet.customers.values()), [], later)
    assert done.status.phase == RolloutPhase.ROLLED_BACK and fleet.on("2.0.0") == set()


@pytest.mark.parametrize("reason", ["InvalidSpec", "NamespaceTaken"])
def test_a_return_to_a_customer_stalled_before_its_release_step_counts_as_refused(reason: str) -> None:
    """Found in review: a Customer whose spec is refused (or whose namespace is someone else's) stalls
    before its release step, so its release status, rolloutUpdatedAt too, stays an earlier pass's; its
    return waited for a pass that read it, for good, and the rollback with it. Stalled so, every version
    is refused: the rollback ends RollbackFailed naming it, unless it runs the version it is returned to
    (a later review: stalled before the upgrade, it never left it)."""
    body = customer("c00", "2.0.0")
    aimed_by(body["status"]["release"], "Rollout", (T0 - timedelta(days=2)).isoformat(timespec="seconds"))
    body["metadata"]["annotations"].update(
        {ROLLOUT_CHART_VERSION: "1.0.0", ROLLOUT_UPDATED_AT: T0.isoformat(timespec="seconds")}
    )
    body["status"]["conditions"] = [
        {"type": "Stalled", "status": "True", "reason": reason, "message": "spec.email: refused"},
        {"type": "Ready", "status": "False", "reason": reason, "message": "spec.email: refused"},
    ]
    returned = member(body, "2.0.0")
    assert (returned.annotated_result, returned.reason) == ("refused", reason)
    body["status"]["release"]["chartVersion"] = "1.0.0"
    assert member(body, "2.0.0").annotated_result == "ran"


def not_ready(body: dict[str, Any], message: str = "waiting for Deployments: api 0/1") -> None:
    body["status"]["conditions"] = [
        {"type": "Ready", "status": "False", "reason": "DeploymentsUnavailable", "message": message}
    ]


def on_by_another_rollout(body: dict[str, Any], rollout: str, ago: timedelta) -> None:
    """`body` moved to 2.0.0 by `rollout` `ago`, installed by that move, and not Ready now."""
    moved_at = (T0 - ago).isoformat(timespec="seconds")
    body["metadata"]["annotations"] = {
        ROLLOUT_CHART_VERSION: "2.0.0",
        ROLLOUT_NAME: rollout,
        ROLLOUT_UPDATED_AT: moved_at,
    }
    release = {"chartVersion": "2.0.0", "targetVersion": "2.0.0", "versionSource": "Rollout"}
    body["status"]["release"] = {**release, "rolloutUpdatedAt": moved_at}
    not_ready(body)


@pytest.mark.parametrize("ready_again", [True, False], ids=["ready again", "never ready"])
def test_a_customer_another_rollout_moved_is_timed_from_its_step_s_start(ready_again: bool) -> None:
    """Found in review: the health gate's timeout ran from the Customer's updated-at, whichever rollout
    wrote it, so a second rollout of a version (the ring after `early`) failed at once a Customer the
    first had moved days ago, not Ready for a moment (a Deployment rolling), and halted on it. A Customer
    this run did not move has timeoutSeconds from when its step started."""
    fleet = Fleet(6)
    c00 = fleet.customers["c00"]
    on_by_another_rollout(c00, "early", timedelta(days=3))

    def recover(tick: int) -> None:
        if ready_again and tick == 20:
            c00["status"]["conditions"][0].update(status="True", message="")

    rollout_spec = spec(
        steps=[{"customers": ["c03"]}, {"rest": True}],
        healthGate={"timeoutSeconds": 30, "maxFailures": 1},
        onFailure="halt",
    )
    status, decisions = run(fleet, rollout_spec, ticks=120, before_tick=recover)
    if ready_again:
        assert status.phase == RolloutPhase.SUCCEEDED and not status.failures
        return
    assert status.phase == RolloutPhase.HALTED
    [failure] = status.failures or []
    assert (failure.customer, failure.step, failure.reason) == ("c00", 2, "HealthTimeout")
    step_two = (status.steps or [])[1].started_at
    halted = next(i for i, d in enumerate(decisions) if d.status.phase == RolloutPhase.HALTED)
    assert step_two is not None and T0 + timedelta(seconds=halted) - step_two == timedelta(seconds=31)
    assert "api 0/1" in failure.message


def test_an_annotation_set_by_hand_without_a_time_is_timed_from_its_step_s_start() -> None:
    """Found in review: a version annotation set with kubectl, no updated-at beside it, had no timeout at
    all: the rollout waited on the Customer, and held a maxParallel slot, for good."""
    fleet = Fleet(4, bad="2.0.0")
    fleet.customers["c01"]["metadata"]["annotations"] = {ROLLOUT_CHART_VERSION: "2.0.0"}
    fleet.operate()
    rollout_spec = spec(
        steps=[{"customers": ["c01"]}, {"rest": True}], healthGate={"timeoutSeconds": 5, "maxFailures": 1}
    )
    status, _ = run(fleet, rollout_spec, ticks=60, seconds=10)
    assert status.phase == RolloutPhase.HALTED
    assert [(f.customer, f.reason) for f in status.failures or ()] == [("c01", "HealthTimeout")]


def test_a_customer_stalled_before_its_release_step_fails_for_its_own_reason_and_its_return_is_done() -> None:
    """Found in review: a Customer whose spec is refused before the rollout moved it failed, after the
    timeout, as if an upgrade had run ("not Ready ... after the upgrade"), and its return to the version
    it never left ended the rollback RollbackFailed. It fails with its own reason, and, running the
    version it is returned to, is back. Not at once (a later review): the Stalled a tick reads may be from
    before the move, its repair on the way."""

    class Fleet_(Fleet):
        def operate(self, names: Collection[str] | None = None) -> None:
            super().operate([n for n in self.customers if n != "c02"])  # its spec is refused

    fleet = Fleet_(6)
    refused = "spec.email: not an address"
    fleet.customers["c02"]["status"]["conditions"] = [
        {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": refused},
        {"type": "Stalled", "status": "True", "reason": "InvalidSpec", "message": refused},
    ]
    rollout_spec = spec(
        steps=[{"customers": ["c00"]}, {"rest": True, "maxParallel": 1}],
        healthGate={"timeoutSeconds": 60, "maxFailures": 1},
        onFailure="rollback",
    )
    status, _ = run(fleet, rollout_spec, ticks=60, seconds=5)
    assert status.phase == RolloutPhase.ROLLED_BACK, status.conditions
    [failure] = status.failures or []
    assert (failure.customer, failure.reason) == ("c02", "InvalidSpec")
    assert failure.message == f"InvalidSpec 60 s after it was moved to 2.0.0, no upgrade run: {refused}"
    assert fleet.on("2.0.0") == set()


def test_a_customer_failed_in_an_earlier_step_holds_no_upgrade_slot_in_a_later_one() -> None:
    """Found in review: each step judged every Customer from its own start, so one on the version by an
    earlier rollout's move that had failed in step 1 counted upgrading again when step 2 started, and
    step 2 (maxParallel 1) moved nobody for another timeout."""
    fleet = Fleet(4)
    on_by_another_rollout(fleet.customers["c00"], "r0", timedelta(days=1))
    rollout_spec = spec(
        steps=[{"customers": ["c00"]}, {"rest": True, "maxParallel": 1}],
        healthGate={"timeoutSeconds": 30, "maxFailures": 2},
    )
    status, decisions = run(fleet, rollout_spec, ticks=120)
    assert status.phase == RolloutPhase.SUCCEEDED
    assert [f.customer for f in status.failures or ()] == ["c00"]
    second = next(i for i, d in enumerate(decisions) if d.status.current_step == 2)
    first_move = next(i for i, d in enumerate(decisions) if d.moves)
    assert first_move == second  # moved in the tick step 2 starts, not a timeout later


def test_a_customer_with_no_instance_running_passes_its_step_but_is_not_counted_healthy() -> None:
    """Found in review: a suspended Customer (or one whose instance is disabled) is Ready scaled to zero,
    so as the canary it passed the health gate on a version that crash-loops, and a rollout of such
    Customers alone succeeded healthy: new Customers then started on a version no instance had run."""

    class Suspended(Fleet):
        def operate(self, names: Collection[str] | None = None) -> None:
            super().operate(names)
            for body in self.customers.values():
                if body["spec"].get("suspended"):
                    body["status"]["conditions"][0].update(status="True", reason="InstanceDisabled")

    fleet = Suspended(4)
    fleet.customers["c00"]["spec"]["suspended"] = True
    status, decisions = run(fleet, spec(steps=[{"customers": ["c00"]}, {"rest": True}]), ticks=30)
    assert status.phase == RolloutPhase.SUCCEEDED and fleet.on("2.0.0") == set(fleet.customers)
    assert [s.healthy for s in status.steps or ()] == [0, 3] and status.healthy == 3
    assert "3/4 Customers on 2.0.0 and 1 with no instance running" in decisions[-1].events[-1][2]

    alone = Suspended(2)
    for body in alone.customers.values():
        body["spec"]["suspended"] = True
    status, decisions = run(alone, spec(steps=[{"rest": True}]), ticks=30)
    assert status.phase == RolloutPhase.SUCCEEDED and status.healthy == 0
    assert "new Customers do not start on 2.0.0" in decisions[-1].events[-1][2]


def test_a_named_step_that_holds_nobody_warns() -> None:
    """Found in review: a mistyped canary (`customers: [c0o]`) made its step pass at once and the next
    run with no canary before it, the only sign an Event saying `0 Customers (none)`."""
    status, decisions = run(Fleet(4), spec(steps=[{"customers": ["c0o"]}, {"rest": True}]), ticks=30)
    assert status.phase == RolloutPhase.SUCCEEDED
    warnings = [e for d in decisions for e in d.events if e[0] == "Warning"]
    assert warnings == [("Warning", "StepEmpty", "step 1 names no selected Customer (c0o): it holds nobody")]


def test_a_rollback_leaves_a_customer_that_ran_the_target_before_its_move_and_ends() -> None:
    """Found in review: c00, new since INSTANCE_CHART_VERSION became 2.0.0, ran 2.0.0 from the fleet when
    the rollout to 2.0.0 moved it (previous-chart-version 2.0.0): the rollback moved it to 2.0.0 again,
    a new updated-at each tick, and stayed RollingBack for good."""
    fleet = Fleet(4, broken={"c03"})
    fleet.version = "2.0.0"
    fleet.customers["c00"]["status"]["release"].update(chartVersion="2.0.0", targetVersion="2.0.0")
    status, decisions = run(
        fleet, spec(steps=[{"rest": True}], onFailure="rollback", healthGate={"maxFailures": 1}), ticks=40
    )

    assert status.phase == RolloutPhase.ROLLED_BACK
    assert fleet.on("2.0.0") == {"c00"} and fleet.on("1.0.0") == {"c01", "c02", "c03"}
    assert sum(move.customer == "c00" for d in decisions for move in d.moves) == 1  # its forward move


def rolling_back_after_moving_c01_before_its_first_pass() -> tuple[
    Fleet, Callable[[RolloutStatus], RolloutStatus], RolloutStatus
]:
    """c01, created during the rollout, is moved before its first pass wrote status.release (no version
    to go back to); that pass runs 2.0.0 by the annotation, c02's upgrade is refused, and the rollout
    rolls back: the fleet, its ticker and the status two ticks later."""
    fleet = Fleet(3, broken={"c02"})
    new = fleet.customers["c01"]
    new["status"] = {}
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    tick = ticker(
        fleet, rollout, spec(steps=[{"rest": True}], onFailure="rollback", healthGate={"maxFailures": 1})
    )
    status = tick(RolloutStatus())
    new["status"] = {"release": {"chartVersion": "1.0.0", "targetVersion": "1.0.0", "versionSource": "Fleet"}}
    fleet.operate()
    assert fleet.on("2.0.0") == {"c00", "c01"}
    return fleet, tick, tick(tick(status))


def test_a_rollback_waits_for_a_customer_moved_before_its_first_pass_to_leave_the_target() -> None:
    """Found in review: c01's return dropped every rollout annotation, its own name too, so the rollout
    said RolledBack while it still ran 2.0.0. Its return keeps the name, and the rollback waits for the
    pass that runs the fleet's version."""
    fleet, tick, status = rolling_back_after_moving_c01_before_its_first_pass()
    assert status.phase == RolloutPhase.ROLLING_BACK
    assert fleet.customers["c01"]["metadata"]["annotations"].get(ROLLOUT_NAME) == "r1"
    fleet.operate()
    status = tick(status)

    assert status.phase == RolloutPhase.ROLLED_BACK
    assert fleet.on("1.0.0") == set(fleet.customers)


def five_moved_then_an_outage(
    fleet: Fleet, passes_ran: bool
) -> tuple[RolloutStatus, Callable[[RolloutStatus, float], RolloutStatus]]:
    """A step moves five of `fleet` (timeout 600 s, one failure rolls back), their passes run or not,
    then the operator is away 11 minutes: the status after the moves, and a tick of the restarted
    operator `seconds` after its start (its moves applied)."""
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    rollout_spec = spec(
        steps=[{"rest": True, "maxParallel": 5}],
        onFailure="rollback",
        healthGate={"maxFailures": 1, "timeoutSeconds": 600},
    )
    moved = decide(rollout, rollout_spec, RolloutStatus(), list(fleet.customers.values()), [], T0)
    fleet.apply(moved)
    assert len(moved.moves) == 5
    if passes_ran:
        fleet.operate()
    restarted = T0 + timedelta(seconds=660)

    def tick(status: RolloutStatus, seconds: float) -> RolloutStatus:
        at = restarted + timedelta(seconds=seconds)
        customers = list(fleet.customers.values())
        decision = decide(rollout, rollout_spec, status, customers, [], at, judging_since=restarted)
        fleet.apply(decision)
        return decision.status

    return moved.status, tick


def test_no_upgrade_in_flight_times_out_before_a_restarted_operator_s_passes_could_run() -> None:
    """Found in review: moved, then the operator away for 11 minutes (a lost node), each of the five
    upgrades in flight was HealthTimeout at the restarted operator's first tick, and a healthy version
    was rolled back. The timeout counts from when this process began judging at the earliest."""
    moved, tick = five_moved_then_an_outage(Fleet(10), passes_ran=False)

    first = tick(moved, 0)
    still_not_ready = tick(first, 600)
    timed_out = tick(still_not_ready, 601)

    assert first.phase == still_not_ready.phase == RolloutPhase.PROGRESSING and not first.failed
    assert timed_out.phase == RolloutPhase.ROLLING_BACK
    assert {f.reason for f in timed_out.failures or ()} == {"HealthTimeout"}


async def test_a_new_customer_starts_on_the_version_settled_for_the_plan_its_first_pass_gives_it() -> None:
    """Found in review: the fleet's version of a Customer's first pass was chosen by spec.plan (no status
    yet), so a Stripe-billed professional Customer (re-created from Git: spec.plan at its default,
    trial) started on the version the trial Customers' rollout settled."""

    def settled(version: str, plans: list[str]) -> dict[str, Any]:
        ran = spec(chartVersion=version, plans=plans, steps=[{"rest": True}])
        status = {"phase": "Succeeded", "targetVersion": version, "selected": 1, "healthy": 1}
        return {"spec": ran.to_k8s(), "status": {**status, "completedAt": T0.isoformat()}}

    rollouts = [settled("2.0.0", ["trial"]), settled("3.0.0", ["professional"])]

    async def list_rollouts() -> list[dict[str, Any]]:
        return rollouts

    ctx: Any = SimpleNamespace(
        fleet_moves_at_once=False,
        kube=SimpleNamespace(list_rollouts=list_rollouts),
        charts=SimpleNamespace(fleet_version="1.0.0"),
        settings=SimpleNamespace(dunning_restrict_days=14),
    )
    body = {
        "metadata": {"name": "acme", "creationTimestamp": T0.isoformat(), "annotations": {}},
        "spec": {
            "email": "a@b.cd",
            "companyName": "Acme",
            "billing": {"mode": "stripe"},
            "subscription": {"status": "active", "plan": "professional"},
        },
    }
    customer = Customer.model_validate(body)

    assert await fleet_version(ctx, body, customer, T0) == "3.0.0"


def test_a_rollback_whose_return_to_the_fleet_s_version_helm_refuses_ends_halted() -> None:
    """Found in review of 02cf4a3: c01, moved before its first pass, returned to the fleet's version,
    whose upgrade helm refused: its status (versionSource Fleet, chartVersion still 2.0.0) counted as
    returned, and the rollout said RolledBack while it ran 2.0.0."""
    fleet, tick, status = rolling_back_after_moving_c01_before_its_first_pass()
    assert status.phase == RolloutPhase.ROLLING_BACK
    fleet.broken.add("c01")  # helm refuses its return
    fleet.operate()
    status = tick(status)

    assert fleet.customers["c01"]["status"]["release"]["chartVersion"] == "2.0.0"
    assert status.phase == RolloutPhase.HALTED
    ready = status.condition("Ready")
    assert ready is not None and ready.reason == "RollbackFailed" and "c01" in ready.message


def test_an_operator_restarting_more_often_than_the_timeout_still_fails_a_version_whose_pass_ran() -> None:
    """Found in review of 02cf4a3: the timeout counted from the daemon's start for every Customer, so an
    operator restarting every 8 minutes kept a bad version from ever failing its 10-minute gate. Only a
    Customer whose pass has not read its move waits for the restarted operator."""
    fleet = Fleet(2, bad="2.0.0")
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    rollout_spec = spec(steps=[{"rest": True}], onFailure="rollback", healthGate={"timeoutSeconds": 600})
    moved = decide(rollout, rollout_spec, RolloutStatus(), list(fleet.customers.values()), [], T0)
    fleet.apply(moved)
    fleet.operate(["c00"])  # c00's pass ran 2.0.0, not Ready; c01's has not run yet
    restarted = T0 + timedelta(seconds=480)
    decision = decide(
        rollout,
        rollout_spec,
        moved.status,
        list(fleet.customers.values()),
        [],
        T0 + timedelta(seconds=601),
        judging_since=restarted,
    )

    assert [f.customer for f in decision.status.failures or ()] == ["c00"]


def test_upgrades_whose_passes_ran_are_given_a_settle_after_a_long_outage_then_judged() -> None:
    """Found in review of 17a8393: the grace left out Customers whose pass had run the move (helm done,
    the pods still rolling out), so an 11-minute outage failed them all at the restarted operator's
    first tick though their pods turned Ready meanwhile. They get SETTLE_AFTER_START (the passes read
    readiness again), not the whole timeout (a crash-looping operator would hold a bad version off)."""
    moved, tick = five_moved_then_an_outage(Fleet(10, bad="2.0.0"), passes_ran=True)
    # Helm ran 2.0.0 for the five moved, not Ready when their passes wrote the status.
    settling = [tick(moved, 0), tick(moved, 120)]
    assert [status.phase for status in settling] == [RolloutPhase.PROGRESSING] * 2 and not settling[1].failed
    judged = tick(moved, 121)
    assert judged.phase == RolloutPhase.ROLLING_BACK and judged.failed == 5


def test_a_return_stalled_on_its_licence_is_done_when_it_runs_the_version_it_was_sent_to() -> None:
    """Found in review of 17a8393: a Customer returned to the fleet's 1.0.0, which it ran, whose pass
    stalled on LicenseFailed (before its release step), counted as a refused return: RollbackFailed."""
    body = {
        "metadata": {"name": "c01", "annotations": {ROLLOUT_NAME: "r1", ROLLOUT_UPDATED_AT: T0.isoformat()}},
        "status": {
            "release": {"chartVersion": "1.0.0", "targetVersion": "1.0.0", "versionSource": "Fleet"},
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "LicenseFailed", "message": "cannot mint"},
                {"type": "Stalled", "status": "True", "reason": "LicenseFailed", "message": "cannot mint"},
            ],
        },
    }
    assert member(body, "2.0.0").annotated_result == "ran"
    body["status"]["release"]["chartVersion"] = "2.0.0"  # still on the version it is returned from
    assert member(body, "2.0.0").annotated_result == "refused"


@pytest.mark.parametrize("updated_at", ["2026-12-03T11:00:00", "2026-12-03"])
def test_an_updated_at_set_by_hand_without_an_offset_is_read_as_utc(updated_at: str) -> None:
    """Found in review: an updated-at set with kubectl without a UTC offset (or a date alone) was read as
    a naive time, and every tick raised TypeError comparing it with the status's aware times: the
    rollout never moved on. It is UTC, as the rollout writes it."""
    fleet = Fleet(3)
    fleet.customers["c01"]["metadata"]["annotations"] = {
        ROLLOUT_CHART_VERSION: "2.0.0",
        ROLLOUT_UPDATED_AT: updated_at,
    }
    not_ready(fleet.customers["c01"])
    read = member(fleet.customers["c01"], "2.0.0").moved_at

    status, _ = run(fleet, spec(steps=[{"rest": True}]), ticks=20)
    assert status.phase == RolloutPhase.SUCCEEDED
    assert fleet.on("2.0.0") == set(fleet.customers)
    assert read == datetime.fromisoformat(updated_at).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("updated_at", "rollout"),
    [("2026-12-03T13:00:00", None), ("2062-12-03", None), ("2026-12-03T13:00:00+00:00", "r1")],
    ids=["local time east of UTC", "mistyped year", "naming the rollout"],
)
def test_an_updated_at_in_the_future_does_not_put_off_the_timeout(
    updated_at: str, rollout: str | None
) -> None:
    """Found in review: an updated-at ahead of the clock (local time typed without an offset by someone
    east of UTC, read as UTC; a mistyped year) put the health gate's timeout off by as much: a Customer
    not Ready on a bad version was judged an hour later, or decades. It is no time: the Customer is judged
    from its step's start, as one annotated without updated-at."""
    fleet = Fleet(3, bad="2.0.0")
    body = fleet.customers["c01"]
    body["metadata"]["annotations"] = {ROLLOUT_CHART_VERSION: "2.0.0", ROLLOUT_UPDATED_AT: updated_at}
    if rollout is not None:
        body["metadata"]["annotations"][ROLLOUT_NAME] = rollout
    fleet.operate()  # 2.0.0 installed, not Ready
    assert body["status"]["release"]["rolloutUpdatedAt"] == updated_at

    rollout_spec = spec(
        steps=[{"customers": ["c01"]}, {"rest": True}], healthGate={"timeoutSeconds": 60, "maxFailures": 1}
    )
    status, _ = run(fleet, rollout_spec, ticks=200)

    assert status.phase == RolloutPhase.HALTED
    assert [(f.customer, f.reason) for f in status.failures or ()] == [("c01", HEALTH_TIMEOUT)]
    assert status.completed_at is not None and status.completed_at - T0 <= timedelta(seconds=61)
    assert fleet.on("2.0.0") == {"c01"}


def test_an_updated_at_in_the_future_does_not_make_a_later_step_s_customer_one_the_step_moved() -> None:
    """Found in review: the clock-skew guard on updated-at (_moved_at) timed the health gate but not which
    Customers the running step judges: c03, of the rest step, annotated for this rollout by hand with a
    mistyped year, counted moved since step 1 started, and step 1 waited for it (its upgrade not run)
    until it timed out. Such a time is no time there too: step 1 ends with its canary."""
    fleet = Fleet(4)
    fleet.customers["c03"]["metadata"]["annotations"] = {
        ROLLOUT_CHART_VERSION: "2.0.0",
        ROLLOUT_NAME: "r1",
        ROLLOUT_UPDATED_AT: "2062-12-03T12:00:00+00:00",
    }
    rollout_spec = spec(steps=[{"customers": ["c00"]}, {"rest": True, "maxParallel": 1}])
    tick = ticker(fleet, Rollout("r1", 1, T0.isoformat(), {}), rollout_spec)

    first = tick(RolloutStatus())
    fleet.operate(["c00"])
    second = tick(first)

    assert first.current_step == 1 and second.current_step == 2
    assert second.steps is not None and second.steps[0].completed_at is not None


CANNOT_MINT = "no signing key"


class UnmintedFleet(Fleet):
    """A Fleet whose c02 cannot get a licence (until `licence_fails` is False): its pass aims at the
    version, writes it, and stops at its licence, Stalled LicenseFailed; no helm runs."""

    licence_fails = True

    def operate(self, names: Collection[str] | None = None) -> None:
        super().operate([n for n in self.customers if n != "c02" or not self.licence_fails])
        if not self.licence_fails:
            return
        body = self.customers["c02"]
        wanted, source = self.aims(body)
        read = body["metadata"]["annotations"].get(ROLLOUT_UPDATED_AT) if source == "Rollout" else None
        aimed_by(body["status"]["release"], source, read)
        body["status"]["release"]["targetVersion"] = wanted
        body["status"]["conditions"] = [
            {"type": "Ready", "status": "False", "reason": "LicenseFailed", "message": CANNOT_MINT},
            {"type": "Stalled", "status": "True", "reason": "LicenseFailed", "message": CANNOT_MINT},
        ]


@pytest.mark.parametrize("repaired", [False, True], ids=["never minted", "minted in time"])
def test_a_customer_stalled_on_its_licence_is_left_to_the_timeout_and_fails_for_that_reason(
    repaired: bool,
) -> None:
    """Found in review: a Customer Stalled LicenseFailed before the rollout failed the health gate at
    once: its move's pass stops at the licence, before helm, and writes the target as targetVersion
    beside the Stalled, which read as helm refusing the version, and the rollout halted. Like the other
    stalls before the release step, the timeout decides, and the failure names its reason."""
    cannot_mint = CANNOT_MINT
    fleet = UnmintedFleet(4)
    fleet.operate()

    def mint(tick: int) -> None:
        if repaired and tick == 30:
            fleet.licence_fails = False

    rollout_spec = spec(
        steps=[{"customers": ["c02"]}, {"rest": True}],
        healthGate={"timeoutSeconds": 60, "maxFailures": 1},
        onFailure="halt",
    )
    status, decisions = run(fleet, rollout_spec, ticks=120, before_tick=mint)

    if repaired:
        assert status.phase == RolloutPhase.SUCCEEDED and not status.failures
        assert fleet.on("2.0.0") == set(fleet.customers)
        return
    assert status.phase == RolloutPhase.HALTED
    [failure] = status.failures or []
    assert (failure.customer, failure.reason) == ("c02", "LicenseFailed")
    assert failure.message == f"LicenseFailed 60 s after it was moved to 2.0.0, no upgrade run: {cannot_mint}"
    halted = next(i for i, d in enumerate(decisions) if d.status.phase == RolloutPhase.HALTED)
    assert halted == 61


@pytest.mark.parametrize("restarts", [1, 3])
def test_a_customer_stalled_on_its_licence_fails_by_its_timeout_after_an_operator_start(
    restarts: int,
) -> None:
    """Found in review: a Customer Stalled LicenseFailed counted as one whose pass had not read its move,
    though that pass writes rolloutUpdatedAt: an operator start 500 s after the move gave it the whole
    timeout again (failed 1100 s after the move, not 600), and with starts more often than the timeout
    it never failed. Like one not Ready whose pass read the move, it gets SETTLE_AFTER_START at most."""
    fleet = UnmintedFleet(4)
    fleet.operate()
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    rollout_spec = spec(
        steps=[{"customers": ["c02"]}, {"rest": True}],
        healthGate={"timeoutSeconds": 600, "maxFailures": 1},
        onFailure="halt",
    )
    status = RolloutStatus()
    for seconds in range(0, 2000, 10):
        # The operator starts 500 s after the move, then every 500 s `restarts` times.
        starts = [T0 + timedelta(seconds=500 * (n + 1)) for n in range(restarts)]
        now = T0 + timedelta(seconds=seconds)
        judging_since = max((start for start in starts if start <= now), default=None)
        decision = decide(
            rollout,
            rollout_spec,
            status,
            list(fleet.customers.values()),
            [],
            now,
            judging_since=judging_since,
        )
        fleet.apply(decision)
        status = decision.status
        if status.phase in TERMINAL_PHASES:
            break
        fleet.operate()

    assert status.phase == RolloutPhase.HALTED
    [failure] = status.failures or []
    assert (failure.customer, failure.reason) == ("c02", "LicenseFailed")
    assert status.completed_at is not None
    assert status.completed_at - T0 <= timedelta(seconds=600) + SETTLE_AFTER_START


def rollout_of_the_version_again(
    fleet: Fleet,
    rollout_spec: dict[str, Any],
    others: list[OtherRollout],
    pushed: bool,
    moved_at_once: bool = False,
) -> None:
    """r2 of 2.0.0, an hour after T0, over a fleet whose c05 a pass refused the version: no failure at
    its first two ticks (the pass of its move has not run; `moved_at_once`: c05 moved at the first);
    then, the chart pushed, c05 upgraded once and
    r2 Succeeded; still missing, c05 refused by the pass of r2's move and failed once (it ends: c05 is
    not moved again and again)."""
    r2 = Rollout("r2", 1, (T0 + timedelta(hours=1)).isoformat(), {})
    status, upgrades = RolloutStatus(), fleet.upgrades.get("c05", 0)

    def tick(seconds: int) -> RolloutStatus:
        at = T0 + timedelta(hours=1, seconds=seconds)
        decision = decide(r2, rollout_spec, status, list(fleet.customers.values()), others, at)
        fleet.apply(decision)
        return decision.status

    for seconds in range(2):  # no pass since the rollout started
        status = tick(seconds)
        assert status.phase == RolloutPhase.PROGRESSING and not status.failures
        if moved_at_once:
            assert fleet.customers["c05"]["metadata"]["annotations"][ROLLOUT_NAME] == "r2"
    for seconds in range(2, 60):
        fleet.operate()
        status = tick(seconds)
        if status.phase in TERMINAL_PHASES:
            break
    if pushed:
        assert fleet.upgrades["c05"] == upgrades + 1
        assert status.phase == RolloutPhase.SUCCEEDED and not status.failures
        assert fleet.on("2.0.0") == set(fleet.customers)
    else:
        assert status.phase == RolloutPhase.HALTED
        assert [(f.customer, f.reason) for f in status.failures or ()] == [("c05", "ChartVersionUnavailable")]
        assert fleet.customers["c05"]["metadata"]["annotations"][ROLLOUT_NAME] == "r2"


@pytest.mark.parametrize("pushed", [True, False], ids=["chart pushed", "still missing"])
def test_a_new_rollout_moves_again_a_customer_a_halted_rollout_of_the_version_left_refused(
    pushed: bool,
) -> None:
    """Found in review: r1 rolled out 2.0.0 before the chart was pushed, so its canary c05 stalled
    ChartVersionUnavailable and r1 halted. With the chart pushed, r2 of 2.0.0 read c05's annotation (the
    version, r1's move) and its Stalled status as helm refusing it: failed at its first tick, never moved
    again, and r2 halted. A refusal from a pass before this run is no failure of it: the Customer is moved
    again, and judged by the pass that move starts (a tick before that pass runs waits for it)."""
    fleet = Fleet(10, withdrawn={"2.0.0"})
    rollout_spec = spec(steps=[{"customers": ["c05"]}, {"rest": True}])
    first, _ = run(fleet, rollout_spec, ticks=20)
    assert first.phase == RolloutPhase.HALTED
    assert [(f.customer, f.reason) for f in first.failures or ()] == [("c05", "ChartVersionUnavailable")]
    if pushed:
        fleet.withdrawn.clear()
    others = [OtherRollout("r1", T0.isoformat(), rollout_spec, first.phase, first.target_version)]
    rollout_of_the_version_again(fleet, rollout_spec, others, pushed, moved_at_once=True)
    if not pushed:
        assert fleet.on("2.0.0") == set()


@pytest.mark.parametrize("pushed", [True, False], ids=["chart pushed", "still missing"])
@pytest.mark.parametrize("refusal", ["no rolloutUpdatedAt", "annotation by hand", "aimed by the fleet"])
def test_a_refusal_by_no_pass_of_the_move_waits_for_the_pass_of_the_new_rollouts_move(
    refusal: str, pushed: bool
) -> None:
    """Found in review: only a refusal whose status named another updated-at waited for the new move's
    pass. One with no rolloutUpdatedAt (written by an operator from before it, or read from an annotation
    set by hand without updated-at) or by a pass aimed by the fleet (INSTANCE_CHART_VERSION set before
    the chart was pushed) counted as the move's: the new rollout moved c05 again and failed it at the
    next tick, before that move's pass ran, and halted. A refusal counts only from the pass of the
    annotation as it is; the timeout bounds the wait for it."""
    fleet = Fleet(10, withdrawn={"2.0.0"})
    rollout_spec = spec(steps=[{"customers": ["c05"]}, {"rest": True}])
    body = fleet.customers["c05"]
    if refusal == "no rolloutUpdatedAt":
        first, _ = run(fleet, rollout_spec, ticks=20)
        assert first.phase == RolloutPhase.HALTED
        body["status"]["release"].pop("rolloutUpdatedAt")
    elif refusal == "annotation by hand":
        body["metadata"]["annotations"] = {ROLLOUT_CHART_VERSION: "2.0.0"}
        fleet.operate()
    else:  # a signup's first pass, INSTANCE_CHART_VERSION set to 2.0.0
        fleet.version = "2.0.0"
        body["status"] = {"release": {"chartVersion": None, "targetVersion": None}, "conditions": []}
        fleet.operate(["c05"])
        assert body["status"]["release"]["versionSource"] == "Fleet"
    assert body["status"]["release"]["targetVersion"] == "2.0.0"
    assert body["status"]["conditions"][1]["reason"] == "ChartVersionUnavailable"
    if pushed:
        fleet.withdrawn.clear()
    rollout_of_the_version_again(fleet, rollout_spec, [], pushed)


def growing(fleet: Fleet, every: int, broken: bool = False) -> Callable[[int], None]:
    """Ticks of 10 s: a Customer signs up every `every` ticks (created then, on the fleet's version; one
    helm refuses every new version for when `broken`)."""

    def sign_up(tick: int) -> None:
        if tick % every == every - 1:
            name = f"n{tick:04}"
            body = customer(name)
            body["metadata"]["creationTimestamp"] = (T0 + timedelta(seconds=tick * 10)).isoformat()
            fleet.customers[name] = body
            if broken:
                fleet.broken.add(name)

    return sign_up


@pytest.mark.parametrize("own_unready", [False, True], ids=["signups only", "one of its own not Ready"])
def test_customers_signing_up_during_the_bake_do_not_start_it_again(own_unready: bool) -> None:
    """Found in review: each tick a Customer of the step was not yet healthy set the bake's start aside,
    and a new Customer sorts last, into the rest step: with a signup every 400 s and bakeSeconds 600 the
    rollout stayed Progressing for good. A Customer the step takes after its bake began is moved and
    judged, and the step ends only once it is, but the bake's clock runs on; one of its own that turns
    not Ready still starts the bake again."""
    fleet = Fleet(5)
    sign_up = growing(fleet, every=40)

    def before_tick(tick: int) -> None:
        sign_up(tick)
        if own_unready and tick in (30, 31):  # c04, taken by the rest step, not Ready for 10 s
            ready = fleet.customers["c04"]["status"]["conditions"][0]
            ready.update(status="False" if tick == 30 else "True")

    rollout_spec = spec(steps=[{"percent": 40}, {"rest": True, "bakeSeconds": 600}])
    status, _ = run(fleet, rollout_spec, ticks=300, seconds=10, before_tick=before_tick)

    assert status.phase == RolloutPhase.SUCCEEDED, status.conditions
    assert len(fleet.customers) > 5 and fleet.on("2.0.0") == set(fleet.customers)
    rest = (status.steps or [])[1]
    assert rest.healthy_at is not None and rest.completed_at is not None and rest.started_at is not None
    assert rest.completed_at - rest.healthy_at == timedelta(seconds=600)
    healthy_at = rest.started_at + (timedelta(seconds=300) if own_unready else timedelta(seconds=10))
    assert rest.healthy_at == healthy_at


def test_a_customer_signing_up_during_the_bake_is_still_judged() -> None:
    """Found in review: signups during the bake started it again (the test above); the Customer the step
    takes after its bake began, which no longer does, is still judged: helm refuses its upgrade and the
    rollout halts on it."""
    fleet = Fleet(5)
    rollout_spec = spec(
        steps=[{"percent": 40}, {"rest": True, "bakeSeconds": 600}], healthGate={"maxFailures": 1}
    )
    status, _ = run(fleet, rollout_spec, ticks=300, seconds=10, before_tick=growing(fleet, 40, broken=True))

    assert status.phase == RolloutPhase.HALTED
    assert [(f.customer, f.reason, f.step) for f in status.failures or ()] == [("n0039", "UpgradeFailed", 2)]


def upgrades_taking(fleet: Fleet, seconds: int, slow: Collection[str] = ()) -> Callable[[datetime], None]:
    """An operator whose pass of a moved Customer ends `seconds` after its move (120 for the `slow`)."""

    def operate(now: datetime) -> None:
        due = [
            name
            for name, body in fleet.customers.items()
            if (moved := body["metadata"]["annotations"].get(ROLLOUT_UPDATED_AT))
            and datetime.fromisoformat(moved) <= now - timedelta(seconds=120 if name in slow else seconds)
        ]
        fleet.operate(due)

    return operate


def annotated(fleet: Fleet, version: str = "2.0.0") -> set[str]:
    return {
        name
        for name, body in fleet.customers.items()
        if body["metadata"]["annotations"].get(ROLLOUT_CHART_VERSION) == version
    }


def signups_every_20_s(fleet: Fleet, upgrade_seconds: int = 60) -> Callable[[int], None]:
    """Ticks of 10 s: a signup every other tick, and upgrades taking `upgrade_seconds`."""
    sign_up, operate = growing(fleet, every=2), upgrades_taking(fleet, upgrade_seconds)

    def before_tick(tick: int) -> None:
        operate(T0 + timedelta(seconds=tick * 10))
        sign_up(tick)

    return before_tick


@pytest.mark.parametrize(
    "steps",
    [
        [{"percent": 40}, {"rest": True, "bakeSeconds": 60}],
        [{"percent": 50, "bakeSeconds": 60}, {"rest": True}],
    ],
    ids=["signups into the rest step", "older Customers a growing percentage takes"],
)
def test_customers_taken_while_the_step_runs_do_not_hold_its_bake(steps: list[dict[str, Any]]) -> None:
    """Found in review: a step baked only once every Customer it took was healthy; with a signup every
    20 s and upgrades of 60 s one of them was always upgrading, so the rest step (where signups sort),
    or a percentage step taking one more older Customer every other signup, never baked and the rollout
    stayed Progressing for good. The bake waits for the Customers moved by the first tick that found
    none left to move; those taken since are moved and judged."""
    fleet = Fleet(5)
    status, _ = run(
        fleet,
        spec(steps=steps),
        ticks=200,
        seconds=10,
        operate_every=10**6,
        before_tick=signups_every_20_s(fleet),
    )

    assert status.phase == RolloutPhase.SUCCEEDED, status.conditions
    assert len(fleet.customers) > 5 and annotated(fleet) == set(fleet.customers)
    baked = next(s for s, step in zip(status.steps or [], steps, strict=True) if step.get("bakeSeconds"))
    assert baked.started_at and baked.all_moved_at and baked.healthy_at and baked.completed_at
    # Its own (a backlog of signups first, maxParallel at a time) moved, then healthy: one upgrade.
    assert baked.all_moved_at - baked.started_at <= timedelta(seconds=300)
    assert baked.healthy_at - baked.all_moved_at <= timedelta(seconds=70)
    # Then those moved before the bake was over, one upgrade at most, and a tick that moves nobody.
    assert timedelta(seconds=60) <= baked.completed_at - baked.healthy_at <= timedelta(seconds=140)


def test_the_last_step_ends_once_the_customers_moved_before_its_bake_was_over_are_judged() -> None:
    """Found in review: the bake does not wait for a Customer the step takes after it had none left to
    move (a signup), but its end does while the Customer was moved before the bake was over: s1, moved
    20 s before the end of the rest step's bake, refused 60 s after its move, halts the rollout (it
    ended Succeeded with s1's upgrade under way, never judged)."""
    fleet = Fleet(5)
    operate = upgrades_taking(fleet, 60)

    def before_tick(tick: int) -> None:
        operate(T0 + timedelta(seconds=tick * 10))
        if tick == 40:  # the rest step healthy at 120 s, baked at 420 s
            body = customer("s1")
            body["metadata"]["creationTimestamp"] = (T0 + timedelta(seconds=tick * 10)).isoformat()
            fleet.customers["s1"] = body
            fleet.broken.add("s1")

    rollout_spec = spec(
        steps=[{"percent": 40}, {"rest": True, "bakeSeconds": 300}], healthGate={"maxFailures": 1}
    )
    status, _ = run(fleet, rollout_spec, ticks=100, seconds=10, operate_every=10**6, before_tick=before_tick)

    assert (status.steps or [])[1].healthy_at == T0 + timedelta(seconds=120)
    assert status.phase == RolloutPhase.HALTED
    assert [(f.customer, f.reason, f.step) for f in status.failures or ()] == [("s1", "UpgradeFailed", 2)]


def test_the_last_step_ends_only_once_every_customer_it_takes_is_moved() -> None:
    """Found in review of 9ec4f39: 20 Customers applied at once from Git while the rest step baked: it
    moved maxParallel of them, and the next tick, which moved nobody (every slot taken), ended it:
    Succeeded with 15 left on the old version for good. A step ends only with none left to move."""
    fleet = Fleet(5)
    operate = upgrades_taking(fleet, 60)
    most = 0

    def before_tick(tick: int) -> None:
        nonlocal most
        operate(T0 + timedelta(seconds=tick * 10))
        most = max(most, fleet.upgrading("2.0.0"))
        if tick == 12:
            for i in range(20):
                body = customer(f"g{i:02}")
                body["metadata"]["creationTimestamp"] = (T0 + timedelta(seconds=tick * 10)).isoformat()
                fleet.customers[f"g{i:02}"] = body

    rollout_spec = spec(steps=[{"percent": 40}, {"rest": True}])
    status, _ = run(fleet, rollout_spec, ticks=200, seconds=10, operate_every=10**6, before_tick=before_tick)

    assert status.phase == RolloutPhase.SUCCEEDED
    assert annotated(fleet) == set(fleet.customers) and len(fleet.customers) == 25
    assert most == 5


def test_the_last_step_does_not_end_with_a_signup_it_had_no_slot_for() -> None:
    """Found in review of 9ec4f39: two signups in one tick after the rest step's own were healthy, with
    maxParallel 1: s1 was moved, and the tick after, which moved nobody (s1 upgrading), ended the
    rollout Succeeded with s2 never moved."""
    fleet = Fleet(3)
    operate = upgrades_taking(fleet, 60)

    def before_tick(tick: int) -> None:
        operate(T0 + timedelta(seconds=tick * 10))
        if tick == 24:  # the bake (healthy at 180 s) just over, s1 is moved after it: not waited for
            for name in ("s1", "s2"):
                body = customer(name)
                body["metadata"]["creationTimestamp"] = (T0 + timedelta(seconds=tick * 10)).isoformat()
                fleet.customers[name] = body

    rollout_spec = spec(steps=[{"rest": True, "maxParallel": 1, "bakeSeconds": 55}])
    status, _ = run(fleet, rollout_spec, ticks=100, seconds=10, operate_every=10**6, before_tick=before_tick)

    assert status.phase == RolloutPhase.SUCCEEDED
    assert annotated(fleet) == {"c00", "c01", "c02", "s1", "s2"}


@pytest.mark.parametrize("broken", [True, False], ids=["refused", "slow"])
@pytest.mark.parametrize("deleted", ["n1", "c00"])
def test_a_customer_the_step_ended_without_is_judged_by_the_next_wherever_it_lands(
    deleted: str, broken: bool
) -> None:
    """Found in review of 9ec4f39: the Customers a step ended without were worked out again from the
    fleet as it is; a deletion moved c02 (which 50% took once n1 signed up, moved after the bake was
    over, its upgrade slow) out of them: helm refused it and no step judged it (it held a maxParallel
    slot for good). The next step judges it by its annotation, whichever step holds it now: the rollout
    halts on it, or ends with every Customer moved."""
    fleet = Fleet(4, broken={"c02"} if broken else ())
    operate = upgrades_taking(fleet, 10, slow={"c02"})
    upgrading: list[int] = []

    def before_tick(tick: int) -> None:
        operate(T0 + timedelta(seconds=tick * 10))
        upgrading.append(fleet.upgrading("2.0.0"))
        if tick == 4:  # after step 1's bake (healthy at 10 s, 25 s) was over
            body = customer("n1")
            body["metadata"]["creationTimestamp"] = (T0 + timedelta(seconds=tick * 10)).isoformat()
            fleet.customers["n1"] = body
        if tick == 7:
            del fleet.customers[deleted]

    rollout_spec = spec(
        steps=[{"percent": 50, "bakeSeconds": 25}, {"rest": True, "maxParallel": 1}],
        healthGate={"maxFailures": 1},
    )
    status, decisions = run(
        fleet, rollout_spec, ticks=100, seconds=10, operate_every=10**6, before_tick=before_tick
    )

    moved_at = next(i for i, d in enumerate(decisions) if any(m.customer == "c02" for m in d.moves))
    assert decisions[moved_at].status.current_step == 1 and decisions[moved_at + 1].status.current_step == 2
    if broken:
        assert status.phase == RolloutPhase.HALTED
        assert [(f.customer, f.reason, f.step) for f in status.failures or ()] == [
            ("c02", "UpgradeFailed", 2)
        ]
    else:
        assert status.phase == RolloutPhase.SUCCEEDED
        assert annotated(fleet) == set(fleet.customers) == fleet.on("2.0.0")
    # c02 held step 2's one slot (maxParallel 1) until it was judged, then gave it up.
    in_step_2 = [*upgrading[moved_at + 1 :], fleet.upgrading("2.0.0")]
    assert max(in_step_2) == 1 and in_step_2[-1] == (1 if broken else 0)


def test_creation_times_ahead_of_the_operator_s_clock_do_not_skip_the_health_gate() -> None:
    """Found in review of 9ec4f39: it compared creationTimestamps (the API server's clock) with the
    steps' starts (the operator's): 90 s of skew made every Customer one a step took late, not waited
    for, and a bad version went past the canary to the whole fleet. Only the operator's own times
    decide now."""
    fleet = Fleet(10, bad="2.0.0")
    for i, body in enumerate(fleet.customers.values()):
        created = T0 + timedelta(seconds=60, milliseconds=i)
        body["metadata"]["creationTimestamp"] = created.isoformat()
    operate = upgrades_taking(fleet, 20)
    rollout_spec = spec(
        steps=[{"customers": ["c00"]}, {"percent": 50}, {"rest": True}], healthGate={"timeoutSeconds": 300}
    )
    status, _ = run(
        fleet,
        rollout_spec,
        ticks=200,
        seconds=2,
        operate_every=10**6,
        before_tick=lambda tick: operate(T0 + timedelta(seconds=tick * 2)),
    )

    assert status.phase == RolloutPhase.HALTED
    assert annotated(fleet) == {"c00"}


def test_moves_a_crash_lost_are_still_waited_for_by_the_bake() -> None:
    """Found in review: the time a step first has nothing left to move decides which Customers its
    bake waits for. Taken from the tick's moves, a crash between the status write and the annotations
    (rollouts.advance writes the status first) made the canary's move, made again next tick, one taken
    since: the bake went on without it and the bad version reached the rest. It is taken from the
    Customers a tick reads."""
    fleet = Fleet(5, bad="2.0.0")
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    rollout_spec = spec(steps=[{"customers": ["c00"]}, {"rest": True}], healthGate={"timeoutSeconds": 30})
    status = RolloutStatus()
    for tick in range(60):
        decision = decide(
            rollout, rollout_spec, status, list(fleet.customers.values()), [], T0 + timedelta(seconds=tick)
        )
        if tick != 0:  # the first tick's status is written, its moves lost
            fleet.apply(decision)
        status = decision.status
        fleet.operate()
        if status.phase in TERMINAL_PHASES:
            break

    assert status.phase == RolloutPhase.HALTED
    assert annotated(fleet) == {"c00"}


def test_a_restarted_operator_goes_on_from_the_status_it_wrote() -> None:
    """Found in review: which Customers a bake waits for is a persisted fact (status.steps[].allMovedAt,
    the annotations' updated-at), not one kept in memory: a tick from the status as the API server
    keeps it (the CRD's schema, read back) decides what a tick from the status in hand does."""
    decisions = []
    for restarts in (False, True):
        fleet = Fleet(5)
        before_tick = signups_every_20_s(fleet)
        rollout = Rollout("r1", 1, T0.isoformat(), {})
        rollout_spec = spec(steps=[{"percent": 40}, {"rest": True, "bakeSeconds": 60}])
        status, seen = RolloutStatus(), []
        for tick in range(200):
            before_tick(tick)
            if restarts:
                written = status.model_dump(by_alias=True, exclude_none=True, mode="json")
                status = RolloutStatus.model_validate(written)
            decision = decide(
                rollout,
                rollout_spec,
                status,
                list(fleet.customers.values()),
                [],
                T0 + timedelta(seconds=tick * 10),
            )
            fleet.apply(decision)
            status = decision.status
            seen.append((status.phase, status.current_step, [m.customer for m in decision.moves]))
            if status.phase in TERMINAL_PHASES:
                break
        assert status.phase == RolloutPhase.SUCCEEDED
        decisions.append((seen, status.model_dump(mode="json")))
    assert decisions[0] == decisions[1]


def c02_moved_after_step_1_s_bake(
    broken: bool, edit: Callable[[RolloutSpec], None]
) -> tuple[RolloutStatus, int]:
    """c02, which 50% takes once n1 signs up after step 1's bake (healthy at 10 s, 25 s) was over, is
    moved by step 1 at 40 s and ends its upgrade 120 s later (refused when `broken`); at 60 s, with
    step 2 running, the spec is edited. The status, and the most upgrading at once after step 1."""
    fleet = Fleet(4, broken={"c02"} if broken else ())
    operate = upgrades_taking(fleet, 10, slow={"c02"})
    rollout_spec = spec(
        steps=[{"percent": 50, "bakeSeconds": 25}, {"rest": True, "maxParallel": 1}],
        healthGate={"maxFailures": 1},
    )
    upgrading: list[int] = []

    def before_tick(tick: int) -> None:
        if tick > 5:  # what the tick before left upgrading
            upgrading.append(fleet.upgrading("2.0.0"))
        operate(T0 + timedelta(seconds=tick * 10))
        if tick == 4:
            body = customer("n1")
            body["metadata"]["creationTimestamp"] = (T0 + timedelta(seconds=tick * 10)).isoformat()
            fleet.customers["n1"] = body
        if tick == 6:
            edit(rollout_spec)

    status, decisions = run(
        fleet, rollout_spec, ticks=500, seconds=10, operate_every=10**6, before_tick=before_tick
    )
    moved_at = next(i for i, d in enumerate(decisions) if any(m.customer == "c02" for m in d.moves))
    assert moved_at == 4 and decisions[5].status.current_step == 2
    if not broken:
        assert status.phase == RolloutPhase.SUCCEEDED, status.conditions
        assert "c02" in fleet.on("2.0.0")
    return status, max(upgrading)


def raise_every_bake(rollout_spec: RolloutSpec) -> None:
    for step in rollout_spec.steps:
        step.bake_seconds = 3600


@pytest.mark.parametrize("broken", [True, False], ids=["refused", "slow"])
def test_a_finished_step_s_bake_raised_later_still_carries_what_it_moved_after_its_bake(broken: bool) -> None:
    """Found in review of c5deebc: the Customers the step before moved after its bake the next step
    judged from that step's bakeSeconds as the spec is now: raised after the step ended, its bake
    ended after the step, nobody was carried, and the refused c02 went uncounted (Succeeded, 0
    failed). The bake's end is the step's status (bakedAt)."""
    status, most_upgrading = c02_moved_after_step_1_s_bake(broken, raise_every_bake)

    if broken:
        assert status.phase == RolloutPhase.HALTED
        assert [(f.customer, f.reason, f.step) for f in status.failures or ()] == [
            ("c02", "UpgradeFailed", 2)
        ]
    # c02 held step 2's one slot (maxParallel 1) until it was judged.
    assert most_upgrading == 1
    step_1 = (status.steps or [])[0]
    assert step_1.baked_at == T0 + timedelta(seconds=35) and step_1.completed_at == T0 + timedelta(seconds=50)


def remove_step_2(rollout_spec: RolloutSpec) -> None:
    rollout_spec.steps = rollout_spec.steps[:1]


@pytest.mark.parametrize("broken", [True, False], ids=["refused", "slow"])
def test_a_step_running_again_judges_what_it_moved_after_its_bake(broken: bool) -> None:
    """Found in review of c5deebc: with the running step 2 edited away, step 1 ran again from step 2's
    start: c02, which it moved after its bake was over and step 2 carried, was neither its move since
    then nor carried (the step before step 1 is none), and step 1's own were not judged again: the
    rollout Succeeded with c02 upgrading, and refused it went uncounted. It runs again from the end of
    the bake of the step before the running one."""
    status, _ = c02_moved_after_step_1_s_bake(broken, remove_step_2)

    assert status.current_step == 1 and len(status.steps or []) == 1
    if broken:
        assert status.phase == RolloutPhase.HALTED
        assert [(f.customer, f.reason, f.step) for f in status.failures or ()] == [
            ("c02", "UpgradeFailed", 1)
        ]


def test_a_bake_after_a_restart_on_a_clock_behind_still_waits_for_the_step_s_moves() -> None:
    """Found in review of c5deebc: the operator restarted on a node whose clock is 20 s behind, after
    the canary's move and before the first tick that found nothing left to move: allMovedAt (the new
    clock's now) was before the canary's updated-at (the old clock's), so the bake waited for nobody,
    and step 2 started 76 s after the canary was healthy, of bakeSeconds 300. allMovedAt is no earlier
    than the newest move the tick read."""
    fleet = Fleet(5)
    operate = upgrades_taking(fleet, 240)
    rollout = Rollout("r1", 1, T0.isoformat(), {})
    rollout_spec = spec(
        steps=[{"customers": ["c00"], "bakeSeconds": 300}, {"rest": True}], healthGate={"timeoutSeconds": 900}
    )
    status, canary_healthy = RolloutStatus(), None
    for tick in range(400):
        real = T0 + timedelta(seconds=tick * 2)
        if 1 <= tick <= 7:  # the operator restarting, 14 s
            continue
        operate(real)
        if canary_healthy is None and fleet.on("2.0.0") == {"c00"}:
            canary_healthy = real
        clock = real - timedelta(seconds=20 if tick else 0)
        decision = decide(rollout, rollout_spec, status, list(fleet.customers.values()), [], clock)
        fleet.apply(decision)
        status = decision.status
        if status.current_step == 2:
            break

    assert canary_healthy == T0 + timedelta(seconds=240)
    assert real - canary_healthy >= timedelta(seconds=300)
    assert annotated(fleet) - {"c00"}
