"""Which Deployments a pass judges readiness by: a list per namespace, kept current by watch events."""

from __future__ import annotations

from typing import Any, cast

from iotistic_billing.operator.deployments import InstanceDeployments
from iotistic_billing.operator.kube import Kube
from iotistic_billing.operator.state import deployment_summary, instance_health

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

    async def list_deployments(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        assert namespace == NAMESPACE and selector == "app.kubernetes.io/instance=instance"
        self.lists += 1
        return self.items


def view(watched: bool = True) -> tuple[InstanceDeployments, ListedDeployments]:
    server = ListedDeployments()
    deployments = InstanceDeployments(cast(Kube, server))
    deployments.watched = watched
    return deployments, server


def names(summaries: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return sorted((s["metadata"]["name"], s["metadata"]["generation"]) for s in summaries)


def test_summary_keeps_what_readiness_needs() -> None:
    full = deployment("api", 3, 2)
    summary = deployment_summary(full)
    assert summary == {
        "metadata": {"name": "api", "uid": "uid-api", "generation": 3},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 2, "availableReplicas": 1, "updatedReplicas": 1, "replicas": 1},
    }
    assert instance_health([summary], enabled=True) == instance_health([full], enabled=True)


async def test_without_the_watch_every_pass_lists() -> None:
    deployments, server = view(watched=False)
    server.items = [deployment("api", 1, 1)]
    deployments.expect_new(NAMESPACE)
    assert await deployments.of(NAMESPACE, upgraded=False) == [deployment_summary(server.items[0])]
    assert await deployments.of(NAMESPACE, upgraded=False) == [deployment_summary(server.items[0])]
    assert server.lists == 2


async def test_a_namespace_is_listed_once_then_events_keep_it_current() -> None:
    deployments, server = view()
    deployments.observe(None, NAMESPACE, deployment("api", 1, 0, available=0))  # not listed yet: ignored
    server.items = [deployment("api", 1, 1), deployment("mqtt", 1, 0, available=0)]
    first = await deployments.of(NAMESPACE, upgraded=False)
    assert not instance_health(first, enabled=True).available

    deployments.observe("MODIFIED", NAMESPACE, deployment("mqtt", 1, 1))
    ready = await deployments.of(NAMESPACE, upgraded=False)
    assert instance_health(ready, enabled=True).available
    deployments.observe("DELETED", NAMESPACE, deployment("mqtt", 1, 1))
    assert names(await deployments.of(NAMESPACE, upgraded=False)) == [("api", 1)]
    assert server.lists == 1

    deployments.observe("DELETED", NAMESPACE, deployment("api", 1, 1))  # the instance is gone: forgotten
    server.items = []
    assert await deployments.of(NAMESPACE, upgraded=False) == []
    assert server.lists == 2


async def test_a_namespace_the_pass_created_needs_no_list() -> None:
    deployments, server = view()
    deployments.expect_new(NAMESPACE)
    assert await deployments.of(NAMESPACE, upgraded=False) == []  # helm's Deployments: events on the way
    deployments.observe("ADDED", NAMESPACE, deployment("api", 1, 0, available=0))
    assert names(await deployments.of(NAMESPACE, upgraded=False)) == [("api", 1)]
    assert server.lists == 0


async def test_after_an_upgrade_the_list_wins_over_events_queued_before_it() -> None:
    deployments, server = view()
    server.items = [deployment("api", 1, 1), deployment("mqtt", 1, 1)]
    assert instance_health(await deployments.of(NAMESPACE, upgraded=False), enabled=True).available

    # helm upgrade patched both Deployments and added one; their events are still on the way.
    server.items = [
        deployment("api", 2, 1),
        deployment("mqtt", 2, 1),
        deployment("worker", 1, 0, available=0),
    ]
    assert not instance_health(await deployments.of(NAMESPACE, upgraded=True), enabled=True).available
    # An event from before the upgrade (generation 1, rolled out) must not make it look rolled out.
    deployments.observe("MODIFIED", NAMESPACE, deployment("mqtt", 1, 1))
    later = await deployments.of(NAMESPACE, upgraded=False)
    assert names(later) == [("api", 2), ("mqtt", 2), ("worker", 1)]
    assert not instance_health(later, enabled=True).available

    for name, generation in (("api", 2), ("mqtt", 2), ("worker", 1)):
        deployments.observe("MODIFIED", NAMESPACE, deployment(name, generation, generation))
    assert instance_health(await deployments.of(NAMESPACE, upgraded=False), enabled=True).available
    # A Deployment deleted and created again starts at generation 1: a new object, not an old event.
    deployments.observe("ADDED", NAMESPACE, deployment("api", 1, 0, available=0, uid="uid-api-2"))
    assert ("api", 1) in names(await deployments.of(NAMESPACE, upgraded=False))
    assert server.lists == 2
