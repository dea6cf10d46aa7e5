"""The instance Deployments a pass judges readiness by: listed after helm ran, then kept by the watch.

Under Kopf every change of an instance Deployment reaches `observe` and then starts a pass (the
`deployment_changed` watch), so a pass sees at least what its trigger saw, and a change it has not seen
yet starts another pass. Before, every pass listed the release's Deployments (about 33 KB of JSON for
six), the thousands of passes that Deployment events start at scale included.

A namespace is listed when a pass runs helm (its patches are not all in the events yet: an upgraded
Deployment would still look rolled out, a new one would be missing) and the first time a pass needs it
(after a restart, say), and again when its list is older than RESYNC_SECONDS: Kopf re-lists after a
broken watch without reporting what was deleted meanwhile, so a kept Deployment could outlive the object
(as an informer's resync period bounds that). An event older than what a list saw (a lower generation
of the same object) does not overwrite it. Kopf's own index (`kopf.index`) is not used: with a worker
limit it deadlocks at start-up when there are more objects than workers (nolar/kopf#1243), and the
operator bounds its workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from iotistic_billing.operator import constants as c
from iotistic_billing.operator.kube import Kube
from iotistic_billing.operator.state import DeploymentState

RESYNC_SECONDS = 600.0


class InstanceDeployments:
    def __init__(self, kube: Kube, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.clock = clock
        # False outside Kopf (a pass run by a test): no events arrive, so every pass lists.
        self.watched = False
        # namespace -> Deployment name -> state, for the namespaces events keep current.
        self._namespaces: dict[str, dict[str, DeploymentState]] = {}
        self._listed_at: dict[str, float] = {}

    async def of(self, namespace: str, helm_ran: bool) -> list[DeploymentState]:
        """The release's Deployments in `namespace`; `helm_ran`: the pass has just installed or upgraded."""
        known = self._namespaces.get(namespace)
        fresh = self.clock() - self._listed_at.get(namespace, 0.0) < RESYNC_SECONDS
        if known is not None and fresh and not helm_ran:
            return list(known.values())
        selector = f"app.kubernetes.io/instance={c.RELEASE_NAME}"
        listed = [DeploymentState.of(d) for d in await self.kube.list_deployments(namespace, selector)]
        if self.watched:
            self._namespaces[namespace] = {state.name: state for state in listed}
            self._listed_at[namespace] = self.clock()
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
                self._listed_at.pop(namespace, None)
            return
        state = DeploymentState.of(body)
        current = known.get(name)
        if current is not None and current.uid == state.uid and state.generation < current.generation:
            return  # queued before the list that saw the upgrade
        known[name] = state
