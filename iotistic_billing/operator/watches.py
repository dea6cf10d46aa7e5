"""Lists and watches the operator follows itself, each in a thread of its own: the Customer view's
(customer_view.py), the instance Deployments and the operator's Secrets.

Kopf takes every event of a resource it watches through its whole machinery (a worker per object,
its queue, handler invocation) and decodes every body: in a rollout, more than half of the
operator's samples, with the Deployments and helm's storage Secrets (40 KB each, three per upgrade)
among them, though those only feed `InstanceDeployments` or ask for a pass when deleted
(bench/README.md). So Kopf watches the Customers and InstanceRollouts, whose handlers need it, and a
`Follower` the rest: one list, then a watch from where it ended, listing again when the watch breaks
or falls behind (410), and the Secrets as metadata only.

Each list again hands every object over (only a changed Deployment asks for a pass:
deployments.InstanceDeployments.observe), so whatever goes wrong backs off: a broken watch, an ERROR
event (a 410 the first time excepted), a watch that ends at once with nothing said. The count of
failures starts again only once a watch has worked (said something, or lasted STEADY_WATCH_SECONDS): one
that merely opens and fails again does not reset it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from iotistic_billing.k8s import KubeApi, KubernetesUnavailable, Watched, refusal_message
from iotistic_billing.operator import constants as c
from iotistic_billing.workers import MAX_RETRY_SECONDS, RETRY_SECONDS, backoff

log = logging.getLogger(__name__)
# A broken list or watch is tried again after RETRY_SECONDS, doubling while it keeps failing (an API
# server away) up to MAX_RETRY_SECONDS, as every loop whose dependency is away (workers.py), and from
# RETRY_SECONDS again once a watch has worked.

# Each watch asks the API server to end it after this; a watch silent for 30 s longer (a connection
# gone half-open) is given up and listed again.
WATCH_SECONDS = 60
# A watch open this long has worked, events or none.
STEADY_WATCH_SECONDS = 10.0

# The release's Deployments, whose state readiness is judged by (deployments.InstanceDeployments).
INSTANCE_DEPLOYMENTS = Watched(
    "instance Deployments",
    "deployments",
    f"app.kubernetes.io/instance={c.RELEASE_NAME},app.kubernetes.io/managed-by=Helm",
)
# The licence Secrets and helm's storage Secrets (helm labels them for the operator): a deletion asks
# for a pass, which brings the Secret or the uninstalled release back. Names are all that is read.
MANAGED_SECRETS = Watched(
    "the operator's Secrets", "secrets", f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}", metadata_only=True
)

# What a follower hands over: the bodies of a list and its resourceVersion, then each event's type and
# object (bookmarks only move the watch on), and that the watch broke.
Relisted = Callable[[list[dict[str, Any]], str], None]
Changed = Callable[[str, dict[str, Any]], None]


class WatchError(Exception):
    """The watch sent an ERROR event: its Status's code (410: it fell too far behind) and what it said."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.code = status.get("code")
        said = " ".join(str(part) for part in (self.code, status.get("reason")) if part)
        message = status.get("message")
        super().__init__(f"{said}: {message}" if message else said)


class Follower:
    """One kind (k8s.Watched) listed and watched in a thread; `relisted` and `changed` run there.
    `pause(seconds)` waits before a retry (by default until stop(), at most that long; tests record);
    `clock` tells how long a watch lasted."""

    def __init__(
        self,
        api: KubeApi,
        kind: Watched,
        relisted: Relisted,
        changed: Changed,
        broke: Callable[[], None] = lambda: None,
        pause: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self.kind = kind
        self._relisted, self._changed, self._broke = relisted, changed, broke
        self._stopped = threading.Event()
        self._pause = pause or self._stopped.wait
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._response: Any = None
        # Lists and watches that failed in a row, since a watch last worked (the watch thread's).
        self._failures = 0

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name=f"watch {self.kind.what}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._interrupt(self._response)

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
            watched_since: float | None = None  # when the watch opened: a list that fails has none
            try:
                if resource_version is None:
                    items, resource_version = self._api.list_at(self.kind)
                    self._relisted(items, resource_version)
                watched_since = self._clock()
                resource_version, said = self._watch(resource_version)
            except Exception as error:  # list again later
                self._broke()
                if self._stopped.is_set():
                    return
                resource_version = None
                self._pause_after(error, self._failed(watched_since))
                continue
            if self._clock() - watched_since >= STEADY_WATCH_SECONDS:
                self._failures = 0
            elif not said and not self._stopped.is_set():
                # Ended at once with nothing said: reopened without a pause, 10,000 watches in 3 s.
                delay = backoff(self._failed(watched_since), RETRY_SECONDS, MAX_RETRY_SECONDS)
                log.warning("the watch of %s ended at once; watching again in %.0f s", self.kind.what, delay)
                self._pause(delay)

    def _watch(self, resource_version: str) -> tuple[str, bool]:
        """Follow one watch until it ends: the resourceVersion to go on from, and whether it said
        anything (the first event, a bookmark too, shows the API server answers: failures start again)."""
        said = False
        for event in self._api.watch(
            self.kind, resource_version, timeout_seconds=WATCH_SECONDS, opened=self._opened
        ):
            kind, body = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                raise WatchError(body)
            if not said:
                said, self._failures = True, 0
            resource_version = body.get("metadata", {}).get("resourceVersion", resource_version)
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._changed(kind, body)
        return resource_version, said

    def _failed(self, watched_since: float | None) -> int:
        """One more failure in a row, unless the watch that ended had lasted long enough to count as
        working: then the first."""
        if watched_since is not None and self._clock() - watched_since >= STEADY_WATCH_SECONDS:
            self._failures = 0
        self._failures += 1
        return self._failures

    def _pause_after(self, error: Exception, failures: int) -> None:
        """One line about what broke the list or the watch (a traceback only for what nobody expected),
        then the backoff's pause."""
        what = self.kind.what
        delay = backoff(failures, RETRY_SECONDS, MAX_RETRY_SECONDS)
        if isinstance(error, WatchError) and error.code == 410 and failures == 1:
            # Fallen behind once (the API server keeps a few minutes of history): list again now.
            log.info("the watch of %s fell behind (%s); listing again", what, error)
            return
        if isinstance(error, WatchError):
            log.warning(
                "the watch of %s ended with an error (%s); listing again in %.0f s", what, error, delay
            )
        elif isinstance(error, KubernetesUnavailable):
            # One line: an outage logged a traceback per watch every second.
            log.warning("the watch of %s broke: %s; listing again in %.0f s", what, error, delay)
        elif isinstance(error, ApiException):
            # Refused: RBAC (403) or a rotated token (401) until someone mends it, so it keeps trying.
            log.error(
                "the watch of %s was refused: %s %s; listing again in %.0f s",
                what,
                error.status,
                refusal_message(error),
                delay,
            )
        else:
            log.exception("the watch of %s broke; listing again in %.0f s", what, delay)
        self._pause(delay)


class LoopFollower:
    """A Follower whose events go to `handle(type, body)` on an asyncio loop, in the order they came:
    the bodies of each list as type None (as Kopf hands over its listings), then each event. A list
    after a broken watch is followed by a DELETED for each object gone meanwhile (its body the namespace
    and name alone), as client-go's Replace does: the watch that would have said so never did, and a
    licence Secret deleted then was not restored."""

    def __init__(
        self,
        api: KubeApi,
        kind: Watched,
        loop: asyncio.AbstractEventLoop,
        handle: Callable[[str | None, dict[str, Any]], None],
    ) -> None:
        self._loop, self._handle = loop, handle
        self.follower = Follower(api, kind, self._listed, self._changed)
        # The objects the last list and the events since have, by namespace and name (the watch
        # thread's alone: it reads and writes them in the order the API server said).
        self._known: set[tuple[str, str]] = set()

    def start(self) -> None:
        self.follower.start()

    def stop(self) -> None:
        self.follower.stop()

    def _listed(self, items: list[dict[str, Any]], _resource_version: str) -> None:
        listed = {_identity(item) for item in items}
        gone = [{"metadata": {"namespace": ns, "name": name}} for ns, name in sorted(self._known - listed)]
        self._known = listed
        with contextlib.suppress(RuntimeError):  # the loop has closed: the operator is stopping
            self._loop.call_soon_threadsafe(self._each, items, gone)

    def _each(self, items: list[dict[str, Any]], gone: list[dict[str, Any]]) -> None:
        for item in items:
            self._safely(None, item)
        for body in gone:
            self._safely("DELETED", body)

    def _changed(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._known.discard(_identity(body))
        else:
            self._known.add(_identity(body))
        with contextlib.suppress(RuntimeError):  # the loop has closed: the operator is stopping
            self._loop.call_soon_threadsafe(self._safely, kind, body)

    def _safely(self, kind: str | None, body: dict[str, Any]) -> None:
        try:
            self._handle(kind, body)
        except Exception:  # one bad event must not stop the ones after it
            log.exception("handling a %s event of %s failed", kind or "listed", self.follower.kind.what)


def _identity(body: dict[str, Any]) -> tuple[str, str]:
    """An object's namespace and name, interned: a namespace's objects share one string and the names
    recur in every namespace (measured: 1.5 MB instead of 3.8 for 17,000 objects in 1,000 namespaces)."""
    metadata = body.get("metadata") or {}
    return sys.intern(metadata.get("namespace") or ""), sys.intern(metadata.get("name") or "")


__all__ = [
    "INSTANCE_DEPLOYMENTS",
    "MANAGED_SECRETS",
    "MAX_RETRY_SECONDS",
    "RETRY_SECONDS",
    "STEADY_WATCH_SECONDS",
    "WATCH_SECONDS",
    "Follower",
    "LoopFollower",
    "WatchError",
]
