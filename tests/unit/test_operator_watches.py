"""What a LoopFollower hands over when its watch breaks, and how the watches and the rollouts' ticks wait
and log while the API server is away, against a fake API server (no cluster here)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing.k8s import Kube, KubeApi, KubernetesUnavailable, Watched
from iotistic_billing.operator import handlers, rollouts, watches
from iotistic_billing.operator.context import BackgroundPasses
from iotistic_billing.operator.watches import INSTANCE_DEPLOYMENTS, MANAGED_SECRETS, Follower, LoopFollower
from iotistic_billing.rollout import ROLLOUT_NAME, ROLLOUT_UPDATED_AT


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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# A watch's steps: an event it sends, seconds that pass on the clock, an exception that breaks it.
Step = dict[str, Any] | float | Exception


class ScriptedApiServer:
    """Each list raises the next of `lists` (None, or none left: it lists nothing, at "10"); each watch
    takes the next of `watches`, plays its steps and ends. The watch after the last waits until the test
    ends."""

    def __init__(self, lists: list[Exception | None], watches: list[list[Step]]) -> None:
        self.lists, self.watches = lists, watches
        self.clock = FakeClock()
        self.listed = 0
        self.waiting, self.ended = threading.Event(), threading.Event()

    def list_at(self, kind: Watched, page_size: int = 500) -> tuple[list[dict[str, Any]], str]:
        self.listed += 1
        failure = self.lists.pop(0) if self.lists else None
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
        if not self.watches:
            self.waiting.set()
            self.ended.wait()
            return
        for step in self.watches.pop(0):
            if isinstance(step, Exception):
                raise step
            if isinstance(step, float):
                self.clock.now += step
            else:
                yield step


def follow(api: ScriptedApiServer, caplog: pytest.LogCaptureFixture) -> tuple[list[float], list[Any]]:
    """Follow the instance Deployments until the script is played: the pauses and the log records
    (level, message, with a traceback)."""
    pauses: list[float] = []
    follower = Follower(
        cast(KubeApi, api),
        INSTANCE_DEPLOYMENTS,
        lambda *_: None,
        lambda *_: None,
        pause=pauses.append,
        clock=api.clock,
    )
    with caplog.at_level(logging.INFO, logger=watches.__name__):
        follower.start()
        try:
            assert api.waiting.wait(10)
        finally:
            follower.stop()
            api.ended.set()
    return pauses, [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]


AWAY = KubernetesUnavailable("the API server cannot be reached (MaxRetryError)")
ADDED = {
    "type": "ADDED",
    "object": {"metadata": {"namespace": "customer-acme", "name": "api", "resourceVersion": "11"}},
}
BOOKMARK = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}
GONE = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}
BROKEN = {
    "type": "ERROR",
    "object": {
        "kind": "Status",
        "code": 500,
        "reason": "InternalError",
        "message": "conversion webhook failed",
    },
}
DEPLOYMENTS = "the watch of instance Deployments"


def test_an_api_server_away_is_one_line_a_try_and_the_tries_back_off_to_30_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: an outage logged a full traceback about once a second per watch thread."""
    api = ScriptedApiServer(
        lists=[AWAY] * 7 + [None, AWAY, ValueError("a body that is no JSON")],
        watches=[[BOOKMARK, GONE]],
    )
    pauses, records = follow(api, caplog)
    # 1 s doubling up to 30 s. A watch that said something starts the count again: it falls behind
    # (410), listed again at once, then the API server is away again.
    assert pauses == [1, 2, 4, 8, 16, 30, 30, 2, 4]
    outage = f"{DEPLOYMENTS} broke: {AWAY}"
    assert records[:7] == [
        ("WARNING", f"{outage}; listing again in {pause:.0f} s", False) for pause in pauses[:7]
    ]
    assert records[7:9] == [
        ("INFO", f"{DEPLOYMENTS} fell behind (410 Expired: too old); listing again", False),
        ("WARNING", f"{outage}; listing again in 2 s", False),
    ]
    # What nobody expected keeps its traceback.
    assert records[9:] == [("ERROR", f"{DEPLOYMENTS} broke; listing again in 4 s", True)]


def test_an_error_event_is_a_failure_that_backs_off_and_says_its_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: a watch answering ERROR (a 500 of a conversion webhook) was listed again at once
    and without a word, over and over: every Deployment handed over each time, a pass request per
    Customer."""
    api = ScriptedApiServer(lists=[], watches=[[BROKEN]] * 4)
    pauses, records = follow(api, caplog)
    assert pauses == [1, 2, 4, 8]
    assert api.listed == 5
    error = "500 InternalError: conversion webhook failed"
    assert records == [
        ("WARNING", f"{DEPLOYMENTS} ended with an error ({error}); listing again in {pause:.0f} s", False)
        for pause in pauses
    ]


def test_a_410_lists_again_at_once_the_first_time_and_backs_off_when_it_repeats(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = ScriptedApiServer(lists=[], watches=[[ADDED, GONE], [GONE], [GONE]])
    pauses, records = follow(api, caplog)
    assert pauses == [2, 4]
    assert api.listed == 4
    assert [level for level, _, _ in records] == ["INFO", "WARNING", "WARNING"]


def test_a_watch_that_ends_at_once_with_nothing_said_is_watched_again_after_a_pause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: a watch the API server ended at once, with no event, was opened again at once:
    10,677 watches in 3 s. One that lasted its time was fine, and starts the count again."""
    api = ScriptedApiServer(lists=[], watches=[[], [], [15.0], []])
    pauses, records = follow(api, caplog)
    assert pauses == [1, 2, 1]
    assert api.listed == 1  # watched again from where it was, not listed
    assert records[0] == ("WARNING", f"{DEPLOYMENTS} ended at once; watching again in 1 s", False)


def test_the_failures_start_again_only_once_a_watch_has_worked(caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: the count started again whenever a watch opened, so a watch that opened and
    broke at once was retried every second for ever. Now only one that said something or lasted
    STEADY_WATCH_SECONDS starts it again."""
    api = ScriptedApiServer(
        lists=[],
        watches=[[AWAY], [AWAY], [AWAY], [ADDED, AWAY], [20.0, AWAY], [AWAY]],
    )
    pauses, _ = follow(api, caplog)
    assert pauses == [1, 2, 4, 1, 1, 2]


def test_a_refused_list_or_watch_is_one_clear_error_and_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 403 (RBAC) or 401 (a rotated token) says so with the API server's message, without a traceback,
    and the follower keeps trying: RBAC may be mended."""
    forbidden = ApiException(status=403, reason="Forbidden")
    forbidden.body = json.dumps({"message": 'deployments.apps is forbidden: User "op" cannot list'})
    api = ScriptedApiServer(lists=[forbidden], watches=[[ApiException(status=401, reason="Unauthorized")]])
    pauses, records = follow(api, caplog)
    assert pauses == [1, 2]
    assert records == [
        (
            "ERROR",
            f'{DEPLOYMENTS} was refused: 403 deployments.apps is forbidden: User "op" cannot list; '
            "listing again in 1 s",
            False,
        ),
        ("ERROR", f"{DEPLOYMENTS} was refused: 401 Unauthorized; listing again in 2 s", False),
    ]


async def test_a_rollout_tick_the_api_server_away_fails_is_one_line_and_the_ticks_back_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: every running rollout logged a traceback every 2 s while the API server was away."""
    away = KubernetesUnavailable("the API server cannot be reached (MaxRetryError)")
    ticks: list[Exception | None] = [away] * 7 + [None, RuntimeError("a bug")]

    async def advance(ctx: Any, name: str, judging_since: Any) -> None:
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
    memo = kopf.Memo(context=SimpleNamespace(rollout_wakeups=set(), clock=lambda: None))
    with caplog.at_level(logging.INFO, logger=handlers.__name__):
        await handlers.rollout_daemon(name="r1", body=running, memo=memo)

    # A tick every 2 s (TICK_SECONDS), and after failing ticks 1 s doubling up to 30 s; a good tick resets.
    assert waits == [2, 2, 4, 8, 16, 30, 30, 2, 2]
    outage = "tick of InstanceRollout r1 failed: the API server cannot be reached (MaxRetryError)"
    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert records == [("WARNING", outage, False)] * 7 + [
        ("ERROR", "tick of InstanceRollout r1 failed", True)
    ]


class ClosedApi:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


async def test_the_operators_cleanup_closes_its_kubernetes_clients() -> None:
    """The operator's cleanup closed no client: a call still queued behind a busy pool was sent while
    the process exited, and the exit waited for it."""
    busy, release = threading.Event(), threading.Event()
    api, watch_api = ClosedApi(), ClosedApi()
    kube = Kube(cast(KubeApi, api), concurrency=1)
    running = asyncio.ensure_future(kube.run(lambda: (busy.set(), release.wait(5))))
    queued = asyncio.ensure_future(kube.run(lambda: "sent"))
    await asyncio.to_thread(busy.wait, 5)

    async def dispose() -> None:
        pass

    context = SimpleNamespace(
        background_passes=BackgroundPasses(),
        watches=[],
        customer_view=SimpleNamespace(stop=lambda: None),
        kube=kube,
        watch_api=watch_api,
        engine=SimpleNamespace(dispose=dispose),
    )
    await handlers.close(memo=kopf.Memo(context=context))
    release.set()
    await running  # a call under way ends as it would have
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (api.closed, watch_api.closed) == (1, 1)


async def test_a_customer_a_rollback_returned_to_the_fleet_s_version_gets_one_pass_at_a_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review of 02cf4a3: its return keeps the rollout's name and time with no version, which
    the start's creation took for a move no pass had read: a second pass beside reconcile_customer's."""
    passes: list[str] = []

    async def kopf_pass(ctx: Any, name: str, body: Any) -> None:
        passes.append(name)

    monkeypatch.setattr(handlers, "_kopf_pass", kopf_pass)
    monkeypatch.setattr(handlers, "_context", lambda memo: None)
    returned = {ROLLOUT_NAME: "r1", ROLLOUT_UPDATED_AT: "2026-12-03T12:00:01+00:00"}

    def body(source: str) -> kopf.Body:
        release = {"chartVersion": "1.0.0", "targetVersion": "1.0.0", "versionSource": source}
        return kopf.Body(
            {"metadata": {"name": "c01", "annotations": returned}, "status": {"release": release}}
        )

    for source in ("Fleet", "Rollout"):  # its return read by a pass; not yet
        await handlers.rollout_version_changed(
            name="c01", body=body(source), memo=None, old=None, new=returned, reason=kopf.Reason.CREATE
        )
    assert passes == ["c01"]
