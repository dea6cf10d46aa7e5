"""The instance Deployments a pass judges readiness by: listed after helm ran, then kept by the watch.

Under Kopf every change of an instance Deployment reaches `observe` and then starts a pass (the
`deployment_changed` watch), so a pass sees at least what its trigger saw, and a change it has not seen
yet starts another pass. Before, every pass listed the release's Deployments (about 33 KB of JSON for
six), the thousands of passes that Deployment events start at scale included.

A namespace is listed when a pass runs helm (its patches are not all in the events yet: an upgraded
Deployment would still look rolled out, a new one would be missing) and the first time a pass needs it
(after a restart, say), and again when its list is older than RESYNC_SECONDS, a bound on what a
missed event could leave (as an informer's resync period is); a list after a broken watch reports what
was deleted meanwhile (watches.LoopFollower), so a kept Deployment does not outlive the object. An
event older than what a list saw (a lower generation of the same object) does not overwrite it; events
that arrive while a list is in flight are applied on top of it once it is answered (the list may
predate their changes, and the watch does not send them again: an instance made available during its
first list stayed Provisioning until the resync).
A pass that judged a namespace's readiness covers every event observed before it began to read them:
`observe` returns the event's tick, `mark` the reading pass's, and `judged_since` tells a pass an
event asked for that it has nothing left to see. Without it each instance had a second pass for the
Deployments helm had just created (the first pass lists them after helm), four API calls and a parse of
the Customer for nothing.
Kopf's own index (`kopf.index`) is not used: with a worker limit it deadlocks at start-up when there
are more objects than workers (nolar/kopf#1243), and the operator bounds its workers.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from iotistic_billing.k8s import Kube
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.outcomes import InstanceHealth

RESYNC_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What readiness needs of an instance Deployment, and its identity: the operator keeps one per
    Deployment it watches (six thousand at 1,000 Customers; the object itself is ~5 KB of JSON)."""

    name: str
    uid: str
    generation: int
    replicas: int  # spec.replicas: wanted
    observed_generation: int
    available: int
    updated: int
    current: int  # status.replicas: of every ReplicaSet, old ones included
    # Why the Deployment itself says its rollout is stuck (`Reason: message` of a Progressing False or
    # ReplicaFailure True condition, cut short); None, mostly.
    problem: str | None = None
    # Whether its controller is rolling out (a new spec not observed yet, or Progressing True for a reason
    # other than NewReplicaSetAvailable): its replicas short meanwhile are the rollout's (a Recreate
    # Deployment has none for a moment), not a fault.
    rolling: bool = False

    @classmethod
    def of(cls, deployment: Mapping[str, Any]) -> DeploymentState:
        meta, spec, status = (
            deployment.get("metadata") or {},
            deployment.get("spec") or {},
            deployment.get("status") or {},
        )
        return cls(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            replicas=1 if spec.get("replicas") is None else int(spec["replicas"]),
            observed_generation=int(status.get("observedGeneration") or 0),
            available=int(status.get("availableReplicas") or 0),
            updated=int(status.get("updatedReplicas") or 0),
            current=int(status.get("replicas") or 0),
            problem=_problem(status.get("conditions") or ()),
            rolling=int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0)
            or _rolling(status.get("conditions") or ()),
        )

    @property
    def rolled_out(self) -> bool:
        """As `kubectl rollout status`: the current generation observed, every wanted replica updated and
        available, and no replica of an older ReplicaSet left."""
        return (
            self.observed_generation >= self.generation
            and self.available >= self.replicas
            and self.updated >= self.replicas
            and self.current <= self.updated
        )

    @property
    def waiting_for(self) -> str:
        """What its rollout still waits for, as `kubectl rollout status` judges it: available/desired
        alone read `1/1` during a stuck update, the old replica still serving beside a Pending new one."""
        if self.observed_generation < self.generation:
            waiting = f"{self.name} new spec not observed yet"
        else:
            waiting = f"{self.name} {self.updated}/{self.replicas} updated"
            if (old := self.current - self.updated) > 0:
                waiting += f", {old} old replica{'s' if old > 1 else ''} left"
            if self.available < self.replicas:
                waiting += f", {self.available}/{self.replicas} available"
        return f"{waiting} ({self.problem})" if self.problem else waiting


def instance_health(
    deployments: Sequence[DeploymentState], enabled: bool, expected: Sequence[str] | None = None
) -> InstanceHealth:
    """Available when every Deployment of the release (`expected`: its manifest's, when known) is there
    and has rolled out its current generation."""
    if not enabled:
        return InstanceHealth(True, c.INSTANCE_DISABLED, "instance disabled: scaled to zero")
    if not deployments:
        return InstanceHealth(False, c.DEPLOYMENTS_UNAVAILABLE, "no Deployments of the release yet")
    if missing := sorted(set(expected or ()) - {d.name for d in deployments}):
        return InstanceHealth(False, c.DEPLOYMENTS_UNAVAILABLE, "missing Deployments: " + ", ".join(missing))
    waiting = sorted(d.waiting_for for d in deployments if not d.rolled_out)
    if waiting:
        serving = all(d.problem is None and (d.available >= d.replicas or d.rolling) for d in deployments)
        return InstanceHealth(
            False, c.DEPLOYMENTS_UNAVAILABLE, "waiting for Deployments: " + ", ".join(waiting), serving
        )
    return InstanceHealth(True, c.DEPLOYMENTS_AVAILABLE, f"{len(deployments)} Deployments available")


class InstanceDeployments:
    def __init__(self, kube: Kube, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.clock = clock
        # False outside Kopf (a pass run by a test): no events arrive, so every pass lists.
        self.watched = False
        # namespace -> Deployment name -> state, for the namespaces events keep current.
        self._namespaces: dict[str, dict[str, DeploymentState]] = {}
        self._listed_at: dict[str, float] = {}
        # namespace -> the events that arrived while its list was in flight, applied on top of the list:
        # the list may have been answered before their changes, and they are not sent again.
        self._in_flight: dict[str, list[tuple[str, DeploymentState | None]]] = {}
        # Ticks order events and readings; namespace -> the tick of the last completed pass's reading.
        self._ticks = itertools.count()
        self._judged: dict[str, int] = {}

    async def of(self, namespace: str, helm_ran: bool) -> list[DeploymentState]:
        """The release's Deployments in `namespace`; `helm_ran`: the pass has just installed or upgraded."""
        known = self._namespaces.get(namespace)
        fresh = self.clock() - self._listed_at.get(namespace, 0.0) < RESYNC_SECONDS
        if known is not None and fresh and not helm_ran:
            return list(known.values())
        selector = f"app.kubernetes.io/instance={c.RELEASE_NAME}"
        if not self.watched:
            return [DeploymentState.of(d) for d in await self.kube.list_deployments(namespace, selector)]
        arrived = self._in_flight.setdefault(namespace, [])
        try:
            listed = await self.kube.list_deployments(namespace, selector)
        finally:
            self._in_flight.pop(namespace, None)
        kept = {state.name: state for state in map(DeploymentState.of, listed)}
        for name, state in arrived:
            _apply(kept, name, state)
        self._namespaces[namespace] = kept
        self._listed_at[namespace] = self.clock()
        return list(kept.values())

    def mark(self) -> int:
        """The tick of a reading about to start: what `of` returns next includes every earlier event."""
        return next(self._ticks)

    def judged(self, namespace: str, tick: int) -> None:
        """A pass that read the Deployments at `tick` (from `mark`) has written its outcome."""
        self._judged[namespace] = max(tick, self._judged.get(namespace, -1))

    def judged_since(self, namespace: str, event: int) -> bool:
        """Whether a completed pass read the namespace's Deployments after the event of tick `event`."""
        return self._judged.get(namespace, -1) > event

    def observe(self, event: str | None, namespace: str, body: Mapping[str, Any]) -> int | None:
        """A watch event of an instance Deployment (`event` None: listed); its tick, or None when it
        changes nothing kept: a list after a broken watch hands every Deployment over again, and each
        asked for a pass (a thousand passes at 1,000 Customers for nothing new)."""
        name = body["metadata"]["name"]
        state = None if event == "DELETED" else DeploymentState.of(body)
        arrived = self._in_flight.get(namespace)
        if arrived is not None:
            arrived.append((name, state))
        known = self._namespaces.get(namespace)
        if known is not None and known.get(name) == state:
            return None
        if known is not None:  # else not listed yet: the next pass that needs it lists it
            _apply(known, name, state)
            if not known:
                del self._namespaces[namespace]  # a deleted instance leaves nothing behind
                self._listed_at.pop(namespace, None)
                self._judged.pop(namespace, None)
        return next(self._ticks)


# A condition's message cut to this: six Deployments' problems in one condition message of the Customer.
PROBLEM_LENGTH = 160


def _problem(conditions: Sequence[Mapping[str, Any]]) -> str | None:
    """`Reason: message` of the condition that says why a rollout is stuck: ReplicaFailure True (its
    cause: FailedCreate of a quota or an admission webhook), else Progressing False (the consequence:
    ProgressDeadlineExceeded)."""
    stuck = {
        condition.get("type"): condition
        for condition in conditions
        if (condition.get("type"), condition.get("status"))
        in (("ReplicaFailure", "True"), ("Progressing", "False"))
    }
    condition = stuck.get("ReplicaFailure") or stuck.get("Progressing")
    if condition is None:
        return None
    reason = str(condition.get("reason") or condition["type"])
    message = str(condition.get("message") or "").strip()
    said = f"{reason}: {message}" if message else reason
    return said if len(said) <= PROBLEM_LENGTH else said[: PROBLEM_LENGTH - 3] + "..."


def _rolling(conditions: Sequence[Mapping[str, Any]]) -> bool:
    return any(
        condition.get("type") == "Progressing"
        and condition.get("status") == "True"
        and condition.get("reason") != "NewReplicaSetAvailable"
        for condition in conditions
    )


def _apply(kept: dict[str, DeploymentState], name: str, state: DeploymentState | None) -> None:
    """One event on the kept Deployments of a namespace (`state` None: deleted)."""
    if state is None:
        kept.pop(name, None)
        return
    current = kept.get(name)
    if current is not None and current.uid == state.uid and state.generation < current.generation:
        return  # queued before the list that saw the upgrade
    kept[name] = state
