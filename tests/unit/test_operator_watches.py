"""What a LoopFollower hands over when its watch breaks, against a fake API server (no cluster here)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from iotistic_billing.k8s import KubeApi, KubernetesUnavailable, Watched
from iotistic_billing.operator import watches
from iotistic_billing.operator.watches import MANAGED_SECRETS, LoopFollower


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
