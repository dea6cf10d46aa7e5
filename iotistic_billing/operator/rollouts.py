"""One tick of an InstanceRollout: read it and the Customers, let rollout_plan.decide, then write the
Customers' annotations (server-side apply under the rollout's field manager) and the rollout's status.

Everything a tick needs is in the API server (the status, and each Customer's annotations), so a tick
after a crash, or on another replica, goes on where the last one stopped (the status is written before
the Customers, see `advance`); a Customer whose annotation
already names the version is never written again, so none is upgraded twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from iotistic_billing.k8s import FieldManager
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.events import post_events
from iotistic_billing.operator.reconcile import merge_patch, together
from iotistic_billing.operator.rollout_plan import Decision, Move, OtherRollout, Rollout, decide
from iotistic_billing.rollout import ROLLOUT_KIND, TERMINAL_PHASES, RolloutSpec, RolloutStatus

log = logging.getLogger(__name__)

# Seconds between the ticks of a running rollout at most (a pass that wrote a Customer's status wakes
# it sooner), and at least (a thousand Customers changing at once cost one tick, not a thousand); a
# finished rollout is only looked at (no API call).
TICK_SECONDS = 2.0
QUIET_SECONDS = 0.5
FLEET_MOVES_AT_ONCE = (
    "INSTANCE_CHART_UPGRADE is immediate, or INSTANCE_CHART is a chart directory: every unpinned "
    "Customer runs INSTANCE_CHART_VERSION, so rollouts do not run"
)


def settled(body: Mapping[str, Any]) -> bool:
    """A finished rollout whose spec asks for nothing new and whose status says so of its generation
    (Kopf's live body: no API call); an edit that keeps the version gets a tick to observe it."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    return (
        status.get("phase") in TERMINAL_PHASES
        and status.get("targetVersion") == spec.get("chartVersion")
        and status.get("observedGeneration") == generation
    )


def _other(body: Mapping[str, Any]) -> OtherRollout:
    meta = body.get("metadata") or {}
    try:
        spec: RolloutSpec | None = RolloutSpec.model_validate(body.get("spec") or {})
    except ValueError:
        spec = None
    status = body.get("status") or {}
    return OtherRollout(
        str(meta.get("name")),
        str(meta.get("creationTimestamp") or ""),
        spec,
        status.get("phase"),
        status.get("targetVersion"),
    )


async def _move(ctx: OperatorContext, move: Move) -> None:
    applied = await ctx.kube.apply_customer_annotations(move.customer, move.annotations, FieldManager.ROLLOUT)
    ctx.customer_view.saw(applied)


async def advance(ctx: OperatorContext, name: str, judging_since: datetime | None = None) -> Decision | None:
    """One tick of rollout `name`, its Events posted; None when it is gone or being deleted.
    `judging_since`: when this process's daemon of it started (rollout_plan.decide)."""
    body = await ctx.kube.read_rollout(name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    meta = body["metadata"]
    spec = RolloutSpec.model_validate(body.get("spec") or {})
    previous = RolloutStatus.model_validate(body.get("status") or {})
    customers, rollouts = await together(ctx.customer_view.bodies(), ctx.kube.list_rollouts())
    decision = decide(
        Rollout(
            name,
            int(meta.get("generation", 1)),
            str(meta.get("creationTimestamp") or ""),
            meta.get("annotations") or {},
        ),
        spec,
        previous,
        customers,
        [_other(other) for other in rollouts if other["metadata"]["name"] != name],
        ctx.clock(),
        disabled=FLEET_MOVES_AT_ONCE if ctx.fleet_moves_at_once else None,
        judging_since=judging_since,
    )
    # The status first: a crash before the Customers' moves leaves them pending, and the next tick moves
    # them. Moved first, a tick that ended a step and moved the next one's first Customers, then died,
    # had the old step take them as its own and bake again. No finished status comes with moves
    # (rollout_plan), so none is left for a tick that would not come.
    if decision.status.to_k8s() != previous.to_k8s():
        patch = merge_patch(previous.to_k8s(), decision.status.to_k8s())
        await ctx.kube.patch_rollout(name, {"status": patch}, FieldManager.ROLLOUT, status=True)
    # The Events of the transitions the status now holds, before the moves: a move that fails ends the
    # tick, and the next one starts from this status, so they would never be posted.
    await post_events(ctx.kube, ROLLOUT_KIND, body, decision.events)
    await asyncio.gather(*(_move(ctx, move) for move in decision.moves))
    for move in decision.moves:
        log.info(
            "rollout %s: Customer %s set to %s",
            name,
            move.customer,
            move.annotations or "the fleet's version",
        )
    return decision


__all__ = ["FLEET_MOVES_AT_ONCE", "QUIET_SECONDS", "TICK_SECONDS", "advance", "settled"]
