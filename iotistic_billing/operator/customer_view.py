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
import logging
import threading
from typing import Any

from iotistic_billing.k8s import KubeApi

log = logging.getLogger(__name__)
# Seconds before a broken list or watch is tried again.
RETRY_SECONDS = 1.0
# The first list must arrive within this; else the tick fails and the next one waits again.
FIRST_LIST_SECONDS = 30.0


def _version(body: dict[str, Any]) -> int:
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return 0


def _lean(body: dict[str, Any]) -> dict[str, Any]:
    metadata = {key: value for key, value in body["metadata"].items() if key != "managedFields"}
    return {**body, "metadata": metadata}


class CustomerView:
    def __init__(self, api: KubeApi) -> None:
        self._api = api
        self._bodies: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._listed = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: Any = None

    async def bodies(self) -> list[dict[str, Any]]:
        """Every Customer as last seen (the first call starts the view and waits for its list)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="customer-view", daemon=True)
            self._thread.start()
        if not self._listed.is_set() and not await asyncio.to_thread(self._listed.wait, FIRST_LIST_SECONDS):
            raise TimeoutError(f"no list of the Customers within {FIRST_LIST_SECONDS:.0f} s")
        with self._lock:
            return list(self._bodies.values())

    def saw(self, body: dict[str, Any]) -> None:
        """A Customer as this process's own write returned it: newer than or as new as the watch."""
        self._keep(_lean(body))

    def stop(self) -> None:
        self._stopped.set()
        self._interrupt(self._response)

    def _keep(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        with self._lock:
            known = self._bodies.get(name)
            if known is None or _version(body) >= _version(known):
                self._bodies[name] = body

    def _opened(self, response: Any) -> None:
        # Set before the flag is read, as stop() sets the flag before it reads this: one of them stops it.
        self._response = response
        if self._stopped.is_set():
            self._interrupt(response)

    @staticmethod
    def _interrupt(response: Any) -> None:
        """End the watch thread's blocking read (the response may be finished already)."""
        if response is not None:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                response.shutdown()

    def _follow(self) -> None:
        resource_version: str | None = None
        while not self._stopped.is_set():
            try:
                if resource_version is None:
                    items, resource_version = self._api.list_customers_at()
                    fresh = {item["metadata"]["name"]: _lean(item) for item in items}
                    with self._lock:
                        self._bodies = fresh
                    self._listed.set()
                for event in self._api.watch_customers(resource_version, opened=self._opened):
                    kind, body = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":  # 410 Gone: the watch fell too far behind; list again
                        resource_version = None
                        break
                    resource_version = body.get("metadata", {}).get("resourceVersion", resource_version)
                    if kind == "DELETED":
                        with self._lock:
                            self._bodies.pop(body["metadata"]["name"], None)
                    elif kind in ("ADDED", "MODIFIED"):
                        self._keep(_lean(body))
            except Exception:  # the API server away: list again after a pause
                if self._stopped.is_set():
                    return
                log.exception("the Customer view's watch broke; listing again")
                resource_version = None
                self._stopped.wait(RETRY_SECONDS)


__all__ = ["CustomerView"]
