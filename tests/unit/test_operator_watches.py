"""What a LoopFollower hands over when its watch breaks, and how the watches and the rollouts' ticks wait
and log while the API server is away, against a fake API server (no cluster here)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest

from iotistic_billing.k8s import KubeApi, KubernetesUnavailable, Watched
from iotistic_billing.operator import handlers, rollouts, watches
from iotistic_billing.operator.watches import INSTANCE_DEPLOYMENTS, MANAGED_SECRETS, Follower, LoopFollower


def secret(namespace: str, name: str) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": "7"}}


class BreakingApiServer:
    """Answers each list with the next of `lists`; each watch sends the next of `streams` and then
    breaks, and the watch after the last stream waits until the test ends."""

    def __init__(self, lists: list[list[dict[str, Any]]], streams: list[list[dict[str, Any]]]) -> None:
        self.lists, self.streams = lists, streams
        self.waiting, self.ended = threading.Event(), threading.Event()

    def list_at(self, kind: Watched, page_size: int = 500) -> tuple[list[dict[str, Any]], str]:
        return self.lists.pop(0), "10"

    def watch(
        self,
        kind: Watched,
        resource_version: str,
        timeout_seconds: int = 300,
        opened: Callable[[Any], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        if not self.streams:
            self.waiting.set()
            self.ended.wait()
            return
        yield from self.streams.pop(0)
        raise KubernetesUnavailable("the API server went away")


async def test_a_list_after_a_broken_watch_hands_over_what_was_deleted_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a licence Secret deleted while the watch was broken was never restored, since
    the list again only handed over what still exists."""
    monkeypatch.setattr(watches, "RETRY_SECONDS", 0)
    release = secret("customer-acme", "sh.helm.release.v1.instance.v1")
    api = BreakingApiServer(
        lists=[
            [secret("customer-acme", "iotistic-license"), secret("customer-globex", "iotistic-license")],
            [],
        ],
        # Seen by the watch before it broke: a release's Secret added, globex's licence deleted.
        streams=[
            [
                {"type": "ADDED", "object": release},
                {"type": "DELETED", "object": secret("customer-globex", "iotistic-license")},
            ]
        ],
    )
    seen: list[tuple[str | None, str, str]] = []

    def handle(kind: str | None, body: dict[str, Any]) -> None:
        seen.append((kind, body["metadata"]["namespace"], body["metadata"]["name"]))

    follower = LoopFollower(cast(KubeApi, api), MANAGED_SECRETS, asyncio.get_running_loop(), handle)
    follower.start()
    try:
        # The last watch has begun: everything before it is on the loop, ahead of this wake-up.
        await asyncio.wait_for(asyncio.to_thread(api.waiting.wait), 10)
    finally:
        follower.stop()
        api.ended.set()
    assert seen == [
        (None, "customer-acme", "iotistic-license"),
        (None, "customer-globex", "iotistic-license"),
        ("ADDED", "customer-acme", "sh.helm.release.v1.instance.v1"),
        ("DELETED", "customer-globex", "iotistic-license"),
        # The second list is empty: what the first list and the watch left is gone, each said once.
        ("DELETED", "customer-acme", "iotistic-license"),
        ("DELETED", "customer-acme", "sh.helm.release.v1.instance.v1"),
    ]


class AwayApiServer:
    """Fails as `failures` says, one entry per list: an exception raised by the list, or None for a
    list that works and a watch that opens and falls behind at once (410: list again). After the last,
    the watch waits until the test ends."""

    def __init__(self, failures: list[Exception | None]) -> None:
        self.failures = failures
        self.waiting, self.ended = threading.Event(), threading.Event()

    def list_at(self, kind: Watched, page_size: int = 500) -> tuple[list[dict[str, Any]], str]:
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        return [], "10"

    def watch(
        self,
        kind: Watched,
        resource_version: str,
        timeout_seconds: int = 300,
        opened: Callable[[Any], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        if opened is not None:
            opened(None)
        if self.failures:
            return iter([{"type": "ERROR", "object": {"kind": "Status", "code": 410}}])
        self.waiting.set()
        self.ended.wait()
        return iter(())


def test_an_api_server_away_is_one_line_a_try_and_the_tries_back_off_to_30_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: an outage logged a full traceback about once a second per watch thread."""
    away = KubernetesUnavailable("the API server cannot be reached (MaxRetryError)")
    api = AwayApiServer([away] * 7 + [None, away, ValueError("a body that is no JSON")])
    pauses: list[float] = []
    follower = Follower(
        cast(KubeApi, api), INSTANCE_DEPLOYMENTS, lambda *_: None, lambda *_: None, pause=pauses.append
    )
    with caplog.at_level(logging.INFO, logger=watches.__name__):
        follower.start()
        try:
            assert api.waiting.wait(10)
        finally:
            follower.stop()
            api.ended.set()
    # 1 s doubling up to 30 s; a watch that opened starts again from 1 s.
    assert pauses == [1, 2, 4, 8, 16, 30, 30, 1, 2]
    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    outage = "the watch of instance Deployments broke: the API server cannot be reached (MaxRetryError)"
    assert records[:8] == [
        ("WARNING", f"{outage}; listing again in {pause:.0f} s", False) for pause in pauses[:8]
    ]
    # What nobody expected keeps its traceback.
    assert records[8:] == [("ERROR", "the watch of instance Deployments broke; listing again in 2 s", True)]


async def test_a_rollout_tick_the_api_server_away_fails_is_one_line_and_the_ticks_back_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: every running rollout logged a traceback every 2 s while the API server was away."""
    away = KubernetesUnavailable("the API server cannot be reached (MaxRetryError)")
    ticks: list[Exception | None] = [away] * 7 + [None, RuntimeError("a bug")]

    async def advance(ctx: Any, name: str) -> None:
        outcome = ticks.pop(0)
        if outcome is not None:
            raise outcome

    waits: list[float] = []

    async def nap(wakeup: asyncio.Event, seconds: float) -> None:
        waits.append(seconds)
        if not ticks:
            raise asyncio.CancelledError  # how Kopf stops the daemon

    monkeypatch.setattr(rollouts, "advance", advance)
    monkeypatch.setattr(rollouts, "QUIET_SECONDS", 0)
    monkeypatch.setattr(handlers, "nap", nap)
    running = kopf.Body({"metadata": {"name": "r1"}, "spec": {"chartVersion": "2.0.0"}, "status": {}})
    memo = kopf.Memo(context=SimpleNamespace(rollout_wakeups=set()))
    with caplog.at_level(logging.INFO, logger=handlers.__name__):
        await handlers.rollout_daemon(name="r1", body=running, memo=memo)

    # A tick every 2 s (TICK_SECONDS), and after failing ticks 1 s doubling up to 30 s; a good tick resets.
    assert waits == [2, 2, 4, 8, 16, 30, 30, 2, 2]
    outage = "tick of InstanceRollout r1 failed: the API server cannot be reached (MaxRetryError)"
    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert records == [("WARNING", outage, False)] * 7 + [
        ("ERROR", "tick of InstanceRollout r1 failed", True)
    ]
