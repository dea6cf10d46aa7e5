"""Every Customer's latest body in memory, from one list and a watch, for the InstanceRollouts' ticks.

A tick used to list the fleet from the API server, several times a second while a rollout runs, each list
paid for in the API server's CPU and the operator's (bench/README.md, bench/rollout.py's fleet_list_ms).
The view lists once and then follows a watch of its own, unfiltered by shard since a rollout spans
shards. What this process wrote itself (a rollout's annotations) is taken from the write's answer at
once, so a tick never decides on a view older than its own last moves. Bodies are kept without their
managedFields, which no decision reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from iotistic_billing.k8s import CUSTOMERS, KubeApi, KubernetesUnavailable, resource_version
from iotistic_billing.operator.watches import Follower

# The first list must arrive within this; else the tick fails and the next one waits again.
FIRST_LIST_SECONDS = 30.0


def _lean(body: dict[str, Any]) -> dict[str, Any]:
    metadata = {key: value for key, value in body["metadata"].items() if key != "managedFields"}
    return {**body, "metadata": metadata}


class CustomerView:
    def __init__(self, api: KubeApi, first_list_seconds: float = FIRST_LIST_SECONDS) -> None:
        self._first_list_seconds = first_list_seconds
        self._bodies: dict[str, dict[str, Any]] = {}
        # The resourceVersion each deleted Customer was deleted at: an older body of it is not kept.
        self._deleted: dict[str, int] = {}
        self._lock = threading.Lock()
        self._following = threading.Event()  # listed, and the watch not broken since
        self._follower = Follower(api, CUSTOMERS, self._relisted, self._changed, self._following.clear)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def bodies(self) -> list[dict[str, Any]]:
        """Every Customer as last seen (the first call starts the view and waits for its list). Raises
        KubernetesUnavailable while the view is not following the API server (its watch broke and the
        list again has not succeeded yet): a tick on an old view could time out healthy Customers."""
        self._follower.start()
        if not self._following.is_set():
            ready = asyncio.Event()
            with self._lock:
                self._waiters.append((asyncio.get_running_loop(), ready))
            if not self._following.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._first_list_seconds):
                        await ready.wait()
            if not self._following.is_set():
                raise KubernetesUnavailable("the Customer view is not following the API server")
        with self._lock:
            return list(self._bodies.values())

    def saw(self, body: dict[str, Any]) -> None:
        """A Customer as this process's own write returned it: newer than or as new as the watch. Not
        kept before the view has started (no rollout has ticked): its list will have it."""
        if self._follower.started:
            self._keep(_lean(body))

    def stop(self) -> None:
        self._follower.stop()

    def _changed(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._forget(body)
        else:
            self._keep(_lean(body))

    def _keep(self, body: dict[str, Any]) -> None:
        name, version = body["metadata"]["name"], resource_version(body)
        with self._lock:
            known = self._bodies.get(name)
            if version <= self._deleted.get(name, -1):
                return
            if known is None or version >= resource_version(known):
                self._bodies[name] = body

    def _forget(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        with self._lock:
            self._bodies.pop(name, None)
            self._deleted[name] = max(resource_version(body), self._deleted.get(name, -1))

    def _relisted(self, items: list[dict[str, Any]], list_version: str) -> None:
        """The list's bodies, except what this process saw newer meanwhile (its own writes)."""
        listed_at = int(list_version) if list_version.isdigit() else 0
        fresh = {item["metadata"]["name"]: _lean(item) for item in items}
        with self._lock:
            for name, known in self._bodies.items():
                listed = fresh.get(name)
                if resource_version(known) > (listed_at if listed is None else resource_version(listed)):
                    fresh[name] = known
            self._bodies = fresh
            self._deleted = {name: at for name, at in self._deleted.items() if at > listed_at}
            waiters, self._waiters = self._waiters, []
        self._following.set()
        for loop, ready in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(ready.set)


__all__ = ["CustomerView"]
