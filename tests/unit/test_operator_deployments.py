"""Which Deployments a pass judges readiness by: listed after helm ran, kept current by watch events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from iotistic_billing.k8s import Kube
from iotistic_billing.operator import handlers
from iotistic_billing.operator.context import BackgroundPasses, CustomerLocks, OperatorContext, PassRequests
from iotistic_billing.operator.deployments import (
    PROBLEM_LENGTH,
    RESYNC_SECONDS,
    DeploymentState,
    InstanceDeployments,
    instance_health,
)
from iotistic_billing.operator.outcomes import InstanceHealth
from iotistic_billing.operator.reconcile import reconcile

NAMESPACE = "customer-acme"


def deployment(
    name: str, generation: int, observed: int, available: int = 1, uid: str = ""
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "generation": generation,
            "uid": uid or f"uid-{name}",
            "labels": {"a": "b"},
        },
        "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": name}]}}},
        "status": {
            "observedGeneration": observed,
            "replicas": 1,
            "updatedReplicas": available,
            "availableReplicas": available,
        },
    }


class ListedDeployments:
    """What the API server answers to a list of the release's Deployments, and how often it was asked."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.lists = 0
        # Changes made (and their watch events delivered) after the list is answered, before it returns.
        self.while_in_flight: list[Callable[[], None]] = []

    async def list_deployments(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        assert namespace == NAMESPACE and selector == "app.kubernetes.io/instance=instance"
        self.lists += 1
        answer = list(self.items)  # answered now; what happens before the caller resumes comes after
        for happening in self.while_in_flight:
            happening()
        self.while_in_flight = []
        return answer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def view(watched: bool = True, clock: Clock | None = None) -> tuple[InstanceDeployments, ListedDeployments]:
    server = ListedDeployments()
    deployments = InstanceDeployments(cast(Kube, server), clock or Clock())
    deployments.watched = watched
    return deployments, server


def names(states: list[DeploymentState]) -> list[tuple[str, int]]:
    return sorted((state.name, state.generation) for state in states)


def test_the_state_keeps_what_readiness_needs() -> None:
    assert DeploymentState.of(deployment("api", 3, 2)) == DeploymentState(
        name="api",
        uid="uid-api",
        generation=3,
        replicas=1,
        observed_generation=2,
        available=1,
        updated=1,
        current=1,
        rolling=True,  # generation 3 not observed yet
    )
    scaled_to_zero = deployment("api", 1, 1)
    scaled_to_zero["spec"]["replicas"] = 0
    scaled_to_zero["status"] = {"observedGeneration": 1}
    assert DeploymentState.of(scaled_to_zero).replicas == 0 and DeploymentState.of(scaled_to_zero).rolled_out


def rolling(name: str, **status: Any) -> DeploymentState:
    """A Deployment of one replica at generation 2, observed, with `status` as the controller wrote it."""
    body = deployment(name, 2, 2)
    body["status"] = {"observedGeneration": 2, **status}
    return DeploymentState.of(body)


def waiting(*deployments: DeploymentState) -> str:
    health = instance_health(list(deployments), enabled=True)
    assert not health.available
    return health.message


def test_the_wait_names_what_each_rollout_still_needs() -> None:
    """Found in review: the message printed available/desired, `instance-api 1/1` during a stuck rolling
    update (the new pod Pending, the old one still serving), which reads as nothing to wait for."""
    stuck = rolling("instance-api", replicas=2, updatedReplicas=1, availableReplicas=1)
    assert waiting(stuck) == "waiting for Deployments: instance-api 1/1 updated, 1 old replica left"

    starting = rolling("instance-api", replicas=1, updatedReplicas=1, availableReplicas=0)
    not_begun = rolling("instance-redis", replicas=3, updatedReplicas=0, availableReplicas=3)
    unseen = DeploymentState.of(deployment("instance-mqtt", 3, 2))
    assert waiting(starting, not_begun, unseen) == (
        "waiting for Deployments: instance-api 1/1 updated, 0/1 available,"
        " instance-mqtt new spec not observed yet, instance-redis 0/1 updated, 3 old replicas left"
    )


def test_the_wait_names_the_condition_that_says_why_a_rollout_is_stuck() -> None:
    deadline = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "instance-api-7c9d" has timed out progressing.',
    }
    quota = {
        "type": "ReplicaFailure",
        "status": "True",
        "reason": "FailedCreate",
        "message": 'pods "instance-api-7c9d-x" is forbidden: exceeded quota: compute, ' + "x" * 300,
    }
    progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": "m"}
    stuck = rolling("instance-api", replicas=2, updatedReplicas=1, availableReplicas=1, conditions=[deadline])
    assert waiting(stuck) == (
        "waiting for Deployments: instance-api 1/1 updated, 1 old replica left (ProgressDeadlineExceeded:"
        ' ReplicaSet "instance-api-7c9d" has timed out progressing.)'
    )
    # The cause before its consequence, cut short: six of them share one condition message.
    refused = rolling("instance-api", replicas=1, conditions=[deadline, quota])
    assert refused.problem is not None and len(refused.problem) == PROBLEM_LENGTH
    assert refused.problem.startswith('FailedCreate: pods "instance-api-7c9d-x" is forbidden: exceeded quota')
    # A rollout under way is not stuck: nothing kept (the operator keeps thousands of these).
    assert rolling("instance-api", replicas=1, conditions=[progressing]).problem is None


def test_a_rollout_whose_old_replicas_serve_is_serving_a_stuck_or_short_one_is_not() -> None:
    """A Ready instance stays Ready while it rolls out (state.phase_for). Found in review of that: the
    exporter is a Recreate singleton, with no replica available while its new pod starts after each
    renewal; its controller's Progressing condition says it rolls out."""

    def health(*deployments: DeploymentState) -> InstanceHealth:
        return instance_health(list(deployments), enabled=True)

    old_serving = rolling("instance-api", replicas=2, updatedReplicas=1, availableReplicas=1)
    done = rolling("instance-mqtt", replicas=1, updatedReplicas=1, availableReplicas=1)
    assert health(old_serving, done).serving
    progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
    restarting = rolling("instance-exporter", replicas=1, updatedReplicas=1, conditions=[progressing])
    assert health(restarting, done).serving
    # Its rollout done (NewReplicaSetAvailable), a replica lost later is a fault, whatever the strategy.
    rolled = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
    crashed = rolling("instance-exporter", replicas=1, updatedReplicas=1, conditions=[rolled])
    assert not health(crashed, done).serving
    short = rolling("instance-api", replicas=1, updatedReplicas=1, availableReplicas=0)
    assert not health(short, done).serving
    deadline = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": "m",
    }
    stuck = rolling("instance-api", replicas=2, updatedReplicas=1, availableReplicas=1, conditions=[deadline])
    assert not health(stuck, done).serving


async def test_without_the_watch_every_pass_lists() -> None:
    deployments, server = view(watched=False)
    server.items = [deployment("api", 1, 1)]
    assert await deployments.of(NAMESPACE, helm_ran=False) == [DeploymentState.of(server.items[0])]
    assert await deployments.of(NAMESPACE, helm_ran=False) == [DeploymentState.of(server.items[0])]
    assert server.lists == 2


async def test_a_namespace_is_listed_once_then_events_keep_it_current() -> None:
    deployments, server = view()
    deployments.observe(None, NAMESPACE, deployment("api", 1, 0, available=0))  # not listed yet: ignored
    server.items = [deployment("api", 1, 1), deployment("mqtt", 1, 0, available=0)]
    first = await deployments.of(NAMESPACE, helm_ran=False)
    assert not instance_health(first, enabled=True).available

    deployments.observe("MODIFIED", NAMESPACE, deployment("mqtt", 1, 1))
    ready = await deployments.of(NAMESPACE, helm_ran=False)
    assert instance_health(ready, enabled=True).available
    deployments.observe("DELETED", NAMESPACE, deployment("mqtt", 1, 1))
    assert names(await deployments.of(NAMESPACE, helm_ran=False)) == [("api", 1)]
    assert server.lists == 1

    deployments.observe("DELETED", NAMESPACE, deployment("api", 1, 1))  # the instance is gone: forgotten
    server.items = []
    assert await deployments.of(NAMESPACE, helm_ran=False) == []
    assert server.lists == 2


async def test_after_helm_ran_the_list_wins_over_events_queued_before_it() -> None:
    deployments, server = view()
    server.items = [deployment("api", 1, 1), deployment("mqtt", 1, 1)]
    assert instance_health(await deployments.of(NAMESPACE, helm_ran=False), enabled=True).available

    # helm upgrade patched both Deployments and added one; their events are still on the way.
    server.items = [
        deployment("api", 2, 1),
        deployment("mqtt", 2, 1),
        deployment("worker", 1, 0, available=0),
    ]
    assert not instance_health(await deployments.of(NAMESPACE, helm_ran=True), enabled=True).available
    # An event from before the upgrade (generation 1, rolled out) must not make it look rolled out.
    deployments.observe("MODIFIED", NAMESPACE, deployment("mqtt", 1, 1))
    later = await deployments.of(NAMESPACE, helm_ran=False)
    assert names(later) == [("api", 2), ("mqtt", 2), ("worker", 1)]
    assert not instance_health(later, enabled=True).available

    for name, generation in (("api", 2), ("mqtt", 2), ("worker", 1)):
        deployments.observe("MODIFIED", NAMESPACE, deployment(name, generation, generation))
    assert instance_health(await deployments.of(NAMESPACE, helm_ran=False), enabled=True).available
    # A Deployment deleted and created again starts at generation 1: a new object, not an old event.
    deployments.observe("ADDED", NAMESPACE, deployment("api", 1, 0, available=0, uid="uid-api-2"))
    assert ("api", 1) in names(await deployments.of(NAMESPACE, helm_ran=False))
    assert server.lists == 2


async def test_a_kept_namespace_is_listed_again_after_the_resync_period() -> None:
    """Kopf re-lists after a broken watch without reporting deletions: a kept Deployment may be gone."""
    clock = Clock()
    deployments, server = view(clock=clock)
    server.items = [deployment("api", 1, 1), deployment("mqtt", 1, 0, available=0)]
    await deployments.of(NAMESPACE, helm_ran=False)
    server.items = [deployment("api", 1, 1)]  # mqtt deleted while the watch was down: no event
    clock.now += RESYNC_SECONDS - 1
    assert names(await deployments.of(NAMESPACE, helm_ran=False)) == [("api", 1), ("mqtt", 1)]
    clock.now += 1
    listed = await deployments.of(NAMESPACE, helm_ran=False)
    assert names(listed) == [("api", 1)] and instance_health(listed, enabled=True).available
    assert server.lists == 2


async def test_events_that_arrive_while_the_first_list_is_in_flight_are_not_lost() -> None:
    """The list was answered before the Deployments turned available; their events, the only ones the
    watch sends, arrived before the pass had the answer."""
    deployments, server = view()
    server.items = [deployment("api", 1, 0, available=0), deployment("mqtt", 1, 0, available=0)]
    server.while_in_flight = [
        lambda: deployments.observe("MODIFIED", NAMESPACE, deployment("api", 1, 1)),
        lambda: deployments.observe("MODIFIED", NAMESPACE, deployment("mqtt", 1, 1)),
    ]
    assert instance_health(await deployments.of(NAMESPACE, helm_ran=False), enabled=True).available
    assert instance_health(await deployments.of(NAMESPACE, helm_ran=False), enabled=True).available
    assert server.lists == 1


async def test_a_relist_keeps_the_events_of_its_flight_and_the_generation_rule() -> None:
    deployments, server = view()
    server.items = [deployment("api", 1, 1), deployment("mqtt", 1, 1)]
    await deployments.of(NAMESPACE, helm_ran=False)
    # helm upgraded both; the list is answered before mqtt rolls out and before worker is deleted, and
    # an event from before the upgrade (generation 1) arrives in flight too.
    server.items = [deployment("api", 2, 2), deployment("mqtt", 2, 1), deployment("worker", 1, 1)]
    server.while_in_flight = [
        lambda: deployments.observe("MODIFIED", NAMESPACE, deployment("api", 1, 1)),
        lambda: deployments.observe("MODIFIED", NAMESPACE, deployment("mqtt", 2, 2)),
        lambda: deployments.observe("DELETED", NAMESPACE, deployment("worker", 1, 1)),
    ]
    kept = await deployments.of(NAMESPACE, helm_ran=True)
    assert names(kept) == [("api", 2), ("mqtt", 2)]
    assert instance_health(kept, enabled=True).available


async def test_a_pass_covers_the_events_observed_before_it_read_the_deployments() -> None:
    """helm creates the Deployments during the first pass, whose list after helm sees them: their events
    need no pass of their own. An event after the reading does, and so does one while no pass completed."""
    deployments, server = view()
    server.items = [deployment("api", 1, 0, available=0)]
    created = deployments.observe("ADDED", NAMESPACE, deployment("api", 1, 0, available=0))
    read_at = deployments.mark()
    await deployments.of(NAMESPACE, helm_ran=True)
    during = deployments.observe("MODIFIED", NAMESPACE, deployment("api", 1, 1))
    assert not deployments.judged_since(NAMESPACE, created)  # the pass has not written its outcome yet
    deployments.judged(NAMESPACE, read_at)
    assert deployments.judged_since(NAMESPACE, created)
    assert not deployments.judged_since(NAMESPACE, during)
    assert not deployments.judged_since("customer-other", created)
    later = deployments.mark()
    deployments.judged(NAMESPACE, read_at)  # an older pass finishing late does not move coverage back
    deployments.judged(NAMESPACE, later)
    deployments.judged(NAMESPACE, read_at)
    assert deployments.judged_since(NAMESPACE, during)


async def test_a_deleted_instance_forgets_what_was_judged() -> None:
    deployments, server = view()
    server.items = [deployment("api", 1, 1)]
    read_at = deployments.mark()
    await deployments.of(NAMESPACE, helm_ran=True)
    deployments.judged(NAMESPACE, read_at)
    gone = deployments.observe("DELETED", NAMESPACE, deployment("api", 1, 1))
    assert not deployments.judged_since(NAMESPACE, gone) and not deployments.judged_since(NAMESPACE, -1)


class NoKube:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a covered pass called the API server ({name})")


async def test_a_pass_asked_for_by_a_covered_event_calls_nothing() -> None:
    deployments, server = view()
    server.items = [deployment("api", 1, 1)]
    event = deployments.observe("ADDED", NAMESPACE, deployment("api", 1, 1))
    read_at = deployments.mark()
    await deployments.of(NAMESPACE, helm_ran=True)
    deployments.judged(NAMESPACE, read_at)
    ctx = cast(
        OperatorContext,
        SimpleNamespace(
            deployments=deployments,
            kube=NoKube(),
            locks=CustomerLocks(),
            pass_slots=asyncio.Semaphore(1),
        ),
    )
    assert await reconcile(ctx, "acme", deployment_event=event) is None
    with pytest.raises(AssertionError, match="read_customer"):
        await reconcile(
            ctx, "acme", deployment_event=deployments.observe("MODIFIED", NAMESPACE, deployment("api", 2, 1))
        )


async def test_a_relist_of_deployments_kept_as_they_are_asks_for_no_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a list after a broken watch hands over every Deployment again, and each Customer
    had a pass for it (a thousand at 1,000 Customers), though nothing had changed."""
    deployments, server = view()
    server.items = [deployment("api", 1, 1), deployment("mqtt", 1, 1)]
    await deployments.of(NAMESPACE, helm_ran=True)
    requested: list[tuple[str, int | None]] = []
    monkeypatch.setattr(handlers, "request_pass", lambda ctx, name, tick=None: requested.append((name, tick)))
    ctx = cast(OperatorContext, SimpleNamespace(deployments=deployments))
    for item in server.items:
        handlers.deployment_changed(
            ctx, None, {**item, "metadata": {**item["metadata"], "namespace": NAMESPACE}}
        )
    handlers.deployment_changed(ctx, "DELETED", {"metadata": {"namespace": NAMESPACE, "name": "worker"}})
    assert requested == []  # the same two, and one never kept gone again

    rolled = {
        **deployment("mqtt", 2, 1),
        "metadata": {**deployment("mqtt", 2, 1)["metadata"], "namespace": NAMESPACE},
    }
    handlers.deployment_changed(ctx, None, rolled)  # changed while the watch was down: a pass
    handlers.deployment_changed(ctx, "DELETED", {"metadata": {"namespace": NAMESPACE, "name": "api"}})
    assert [name for name, tick in requested] == ["acme", "acme"] and None not in [t for _, t in requested]
    assert names(await deployments.of(NAMESPACE, helm_ran=False)) == [("mqtt", 2)]


def test_a_revision_helm_prunes_asks_for_no_pass_a_deleted_release_or_licence_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: each failed upgrade past --history-max has helm delete its oldest revision's
    storage Secret; the watch asked for a pass for it, which ran helm again at once, for ever, past the
    retries' backoff. Helm never prunes the deployed revision: a release uninstalled still comes back."""
    requested: list[str] = []
    monkeypatch.setattr(handlers, "request_pass", lambda ctx, name, tick=None: requested.append(name))
    ctx = cast(OperatorContext, SimpleNamespace())

    def deleted(name: str, labels: dict[str, str] | None = None) -> None:
        metadata = {"namespace": NAMESPACE, "name": name, "labels": labels or {}}
        handlers.managed_secret_changed(ctx, "DELETED", {"metadata": metadata})

    deleted("sh.helm.release.v1.instance.v1", {"owner": "helm", "status": "superseded"})
    deleted("sh.helm.release.v1.instance.v2", {"owner": "helm", "status": "failed"})
    assert requested == []
    deleted("sh.helm.release.v1.instance.v6", {"owner": "helm", "status": "deployed"})
    deleted("sh.helm.release.v1.instance.v6", {"owner": "helm", "status": "uninstalling"})
    deleted("iotistic-license")
    assert requested == ["acme"] * 3


def test_watch_events_coalesce_into_one_pass_for_the_latest_of_them() -> None:
    requests = PassRequests()
    assert requests.add("acme", 3)  # the first request starts a pass
    assert not requests.add("acme", 7) and not requests.add("acme", 5)
    assert requests.add("globex", 4)
    assert not requests.add("globex", None)  # a Secret's event: the pass must run whatever it covers
    assert not requests.add("globex", 9)
    assert (requests.take("acme"), requests.take("globex")) == (7, None)
    assert requests.add("acme", 8)  # after the pass started: a pass of its own
    assert requests.take("acme") == 8


async def test_a_requested_pass_runs_once_for_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[tuple[str, int | None]] = []
    started = asyncio.Event()

    async def pass_(ctx: Any, name: str, now: Any = None, deployment_event: int | None = None) -> None:
        passes.append((name, deployment_event))
        started.set()

    monkeypatch.setattr(handlers, "reconcile", pass_)
    monkeypatch.setattr(handlers, "PASS_REQUEST_DELAY", 0)
    housekeeping = asyncio.get_running_loop().create_future()
    ctx = cast(
        OperatorContext,
        SimpleNamespace(
            pass_requests=PassRequests(),
            housekeepers={"uid-1": housekeeping},
            background_passes=BackgroundPasses(),
        ),
    )
    for tick in (3, 7, 5):
        handlers.request_pass(ctx, "acme", tick)
    await asyncio.wait_for(started.wait(), 5)
    assert passes == [("acme", 7)]


async def test_an_operator_kopf_pauses_requests_no_pass() -> None:
    """Found in review: an operator paused by its peering (Kopf stops every daemon) ran the passes its
    own watches asked for, beside the active one's."""
    ctx = cast(OperatorContext, SimpleNamespace(pass_requests=PassRequests(), housekeepers={}))
    handlers.request_pass(ctx, "acme", 3)
    handlers.request_pass(ctx, "acme")
    assert not handlers.kopf_active(ctx)
    assert ctx.pass_requests.add("acme", None)  # nothing was queued, nor a pass started
