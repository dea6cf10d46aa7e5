"""The instance Deployments a pass judges readiness by: listed once per namespace, then kept by the watch.

Under Kopf every change of an instance Deployment reaches `observe` and then starts a pass (the
`deployment_changed` watch), so a pass sees at least what its trigger saw, and a change it has not seen
yet starts another pass. Before, every pass listed the release's Deployments (about 33 KB of JSON for
six, on each of the thousands of passes that Deployment events start at scale).

A namespace is listed the first time a pass needs it (after a restart, say), and again right after every
upgrade: helm has just patched the Deployments and their events are still on the way. A namespace the
pass has just created needs no list: it holds only what helm is about to create, and those events follow.
An event older than what a list saw (a lower generation of the same object) does not overwrite it.
Kopf's own index (`kopf.index`) is not used: with a worker limit it deadlocks at start-up when there are
more objects than workers (nolar/kopf#1243), and the operator bounds its workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iotistic_billing.operator import constants as c
from iotistic_billing.operator.kube import Kube
from iotistic_billing.operator.state import deployment_summary

Summary = dict[str, Any]


def _generation(summary: Mapping[str, Any]) -> int:
    return int(summary["metadata"].get("generation") or 0)


class InstanceDeployments:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        # False outside Kopf (a pass run by a test): no events arrive, so every pass lists.
        self.watched = False
        # namespace -> Deployment name -> summary, for the namespaces events keep current.
        self._namespaces: dict[str, dict[str, Summary]] = {}

    def expect_new(self, namespace: str) -> None:
        """The pass has just created `namespace`: no Deployment is in it but those events will bring."""
        if self.watched:
            self._namespaces[namespace] = {}

    async def of(self, namespace: str, upgraded: bool) -> list[Summary]:
        """The release's Deployments in `namespace`; `upgraded`: the pass has just run an upgrade."""
        known = self._namespaces.get(namespace)
        if known is not None and not upgraded:
            return list(known.values())
        selector = f"app.kubernetes.io/instance={c.RELEASE_NAME}"
        listed = [deployment_summary(d) for d in await self.kube.list_deployments(namespace, selector)]
        if self.watched:
            self._namespaces[namespace] = {summary["metadata"]["name"]: summary for summary in listed}
        return listed

    def observe(self, event: str | None, namespace: str, body: Mapping[str, Any]) -> None:
        """A watch event of an instance Deployment (`event` None: Kopf's initial listing)."""
        known = self._namespaces.get(namespace)
        if known is None:
            return  # not listed yet: the next pass that needs it lists it
        name = body["metadata"]["name"]
        if event == "DELETED":
            known.pop(name, None)
            if not known:
                del self._namespaces[namespace]  # a deleted instance leaves nothing behind
            return
        summary = deployment_summary(body)
        current = known.get(name)
        if (
            current is not None
            and current["metadata"]["uid"] == summary["metadata"]["uid"]
            and _generation(summary) < _generation(current)
        ):
            return  # queued before the list that saw the upgrade
        known[name] = summary
