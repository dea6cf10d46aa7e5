"""A rollout's tick (rollouts.advance) against a stand-in API server that can fail between its writes."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest

from iotistic_billing.operator import handlers, rollouts
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.rollout_plan import Decision, Move
from iotistic_billing.rollout import ROLLOUT_CHART_VERSION, ROLLOUT_UPDATED_AT, RolloutPhase, RolloutStatus
from tests.unit.test_rollout_plan import T0, Fleet

BAKE = 3600


def merged(old: Any, patch: Any) -> Any:
    """A JSON merge patch applied, as the API server does."""
    if not isinstance(patch, dict) or not isinstance(old, dict):
        return patch
    result = dict(old)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merged(result.get(key), value)
    return result


class RolloutApi:
    """The rollout and the fleet's Customers; `crash_at_second_write`: a tick dies after its first kind of
    write (the status, or the Customers' annotations) and before the other, whichever comes first."""

    def __init__(self, fleet: Fleet, spec: dict[str, Any]) -> None:
        self.fleet = fleet
        created = (T0 - timedelta(hours=1)).isoformat()
        self.rollout = {
            "metadata": {"name": "r1", "generation": 1, "creationTimestamp": created},
            "spec": spec,
        }
        self.crash_at_second_write = False
        self.written: set[str] = set()
        self.events: list[str] = []  # the reasons of the Events posted, in order

    def _write(self, kind: str) -> None:
        self.written.add(kind)
        if self.crash_at_second_write and len(self.written) == 2:
            raise RuntimeError("killed between the tick's writes")

    async def read_rollout(self, name: str) -> dict[str, Any]:
        return self.rollout

    async def list_rollouts(self) -> list[dict[str, Any]]:
        return [self.rollout]

    async def bodies(self) -> list[dict[str, Any]]:
        return list(self.fleet.customers.values())

    def saw(self, body: Any) -> None:
        pass

    async def apply_customer_annotations(self, name: str, annotations: dict[str, str], manager: Any) -> Any:
        self._write("customers")
        self.fleet.apply(cast(Decision, SimpleNamespace(moves=[Move(name, annotations)])))
        return self.fleet.customers[name]

    async def create_event(
        self, kind: str, involved: Any, *, reason: str, message: str, event_type: str
    ) -> None:
        assert kind == "InstanceRollout" and involved["metadata"]["name"] == "r1"
        self.events.append(reason)

    async def patch_rollout(self, name: str, patch: dict[str, Any], manager: Any, status: bool) -> None:
        self._write("status")
        self.rollout = merged(self.rollout, patch)


async def test_a_tick_that_dies_at_a_step_boundary_does_not_bake_the_ended_step_again() -> None:
    """Found in review: the tick that ended a step moved the next step's first Customers, then died before
    its status write; the next tick ran the ended step again, took those Customers as its own and baked
    another bakeSeconds (an hour here)."""
    fleet = Fleet(4)
    api = RolloutApi(
        fleet,
        {"chartVersion": "2.0.0", "steps": [{"customers": ["c00"], "bakeSeconds": BAKE}, {"rest": True}]},
    )
    now = T0
    ctx = cast(
        OperatorContext,
        SimpleNamespace(kube=api, customer_view=api, clock=lambda: now, fleet_moves_at_once=False),
    )

    async def tick(seconds: float) -> RolloutStatus:
        nonlocal now
        now += timedelta(seconds=seconds)
        api.written.clear()
        await rollouts.advance(ctx, "r1")
        fleet.operate()
        return RolloutStatus.model_validate(api.rollout.get("status") or {})

    for _ in range(3):
        status = await tick(2)
    assert status.steps is not None and status.steps[0].healthy_at is not None  # step 1 bakes

    api.crash_at_second_write = True
    with pytest.raises(RuntimeError, match="killed"):
        await tick(BAKE)
    api.crash_at_second_write = False
    for _ in range(5):
        status = await tick(2)
    assert status.phase == RolloutPhase.SUCCEEDED, status.conditions
    assert fleet.on("2.0.0") == set(fleet.customers)
    # The crashed tick's Events too (found in review: posted only when a tick returned, they were lost).
    assert [r for r in api.events if r.startswith("Step")] == [
        "StepStarted",
        "StepCompleted",
        "StepStarted",
        "StepCompleted",
    ]


@pytest.mark.parametrize(
    ("old", "new", "passes"),
    [
        ({"c": "1.0.0", "u": "t1"}, {"c": "2.0.0", "u": "t2"}, 1),  # a move
        ({"c": "1.0.0", "u": "t1"}, {"c": "1.0.0", "u": "t3"}, 1),  # a move and its return as one change
        ({}, {"c": "2.0.0"}, 1),  # set by hand, no updated-at
        ({"c": "1.0.0", "u": "t1"}, {"c": "1.0.0", "u": "t1", "other": "x"}, 0),  # another annotation
    ],
    ids=["moved", "moved-and-returned", "by-hand", "other-annotation"],
)
async def test_a_rollout_move_runs_a_pass_also_when_its_return_left_the_version_as_it_was(
    monkeypatch: pytest.MonkeyPatch, old: dict[str, str], new: dict[str, str], passes: int
) -> None:
    """Found in review: the pass ran on a change of the chart-version annotation alone; a move and the
    rollback's return that Kopf saw as one change (both came while it handled another) ran none, and the
    rollback waited for a pass that read the return. The move's updated-at counts too."""
    names = {"c": ROLLOUT_CHART_VERSION, "u": ROLLOUT_UPDATED_AT, "other": "example.com/other"}
    ran: list[str] = []

    async def reconcile(ctx: Any, name: str, handed: Any = None) -> None:
        ran.append(name)

    monkeypatch.setattr(handlers, "reconcile", reconcile)
    await handlers.rollout_version_changed(
        name="acme",
        body=cast(Any, {}),
        memo=cast(Any, {"context": SimpleNamespace()}),
        retry=0,
        old={names[k]: v for k, v in old.items()},
        new={names[k]: v for k, v in new.items()},
    )
    assert ran == ["acme"] * passes
    # Kopf calls it for any change of the annotations, not of chart-version alone (which a move and its
    # return seen as one change leave as it was).
    registered = [
        h
        for h in kopf.get_default_registry()._changing.get_all_handlers()
        if h.fn is handlers.rollout_version_changed
    ]
    assert [h.field for h in registered] == [("metadata", "annotations")]


async def test_a_creation_runs_no_second_pass_for_the_rollout_or_reconcile_annotations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: Kopf calls field handlers on a creation too, one a cycle after the creation's
    pass, and after a start every Customer is one (the handled specs live in memory): a Customer a
    rollout had moved, or given a Reconcile now, had a second and a third pass beside the creation's.
    Not when that pass read them (its status says so); a move or a request made between those cycles
    (a later review: skipped, it was never installed) still runs one, and so does every update."""
    ran: list[str] = []

    async def reconcile(ctx: Any, name: str, handed: Any = None) -> None:
        ran.append(name)

    monkeypatch.setattr(handlers, "reconcile", reconcile)
    moved = {ROLLOUT_CHART_VERSION: "2.0.0", ROLLOUT_UPDATED_AT: "t1"}
    memo = cast(Any, {"context": SimpleNamespace()})
    read = {
        "status": {
            "release": {"targetVersion": "2.0.0", "rolloutUpdatedAt": "t1"},
            "lastHandledReconcileAt": "now",
        }
    }
    before = {"status": {"release": {"targetVersion": "1.0.0"}, "lastHandledReconcileAt": "earlier"}}
    for reason, body, passes in [
        (kopf.Reason.CREATE, read, 0),
        (kopf.Reason.CREATE, before, 2),
        (kopf.Reason.UPDATE, read, 2),
    ]:
        ran.clear()
        await handlers.rollout_version_changed(
            name="acme", body=cast(Any, body), memo=memo, retry=0, old=None, new=moved, reason=reason
        )
        await handlers.reconcile_requested(
            name="acme", body=cast(Any, body), memo=memo, retry=0, new="now", reason=reason
        )
        assert ran == ["acme"] * passes, (reason, body)


async def test_an_answered_request_longer_than_the_status_keeps_runs_no_pass_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: status.lastHandledReconcileAt keeps 64 characters of the annotation, and the
    start's CREATE compared it with the whole: every operator start ran a pass for such a Customer."""
    ran: list[str] = []

    async def reconcile(ctx: Any, name: str, handed: Any = None) -> None:
        ran.append(name)

    monkeypatch.setattr(handlers, "reconcile", reconcile)
    memo = cast(Any, {"context": SimpleNamespace()})
    requested = "2026-11-25T12:00:00Z/" + "x" * 80
    body = {"status": {"lastHandledReconcileAt": requested[:64]}}
    await handlers.reconcile_requested(
        name="acme", body=cast(Any, body), memo=memo, retry=0, new=requested, reason=kopf.Reason.CREATE
    )
    assert ran == []
