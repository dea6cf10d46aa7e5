"""The usage-key cache: one lookup per TTL, unknown keys remembered shorter, bounded, hashes only."""

from __future__ import annotations

import asyncio
from typing import Any

from iotistic_billing.api_keys import usage_key_hash
from iotistic_billing.webhook_server.security import UsageKeyCache


class FakeSession:
    """Answers the api_keys lookup from a dict of key hash -> customer id, and counts the queries."""

    def __init__(self, keys: dict[str, str], queries: list[str]) -> None:
        self.keys = keys
        self.queries = queries

    async def __aenter__(self) -> FakeSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def scalar(self, statement: Any) -> str | None:
        digest = statement.compile().params["key_hash_1"]
        self.queries.append(digest)
        return self.keys.get(digest)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_is_looked_up_once_per_ttl() -> None:
    queries: list[str] = []
    keys = {usage_key_hash("iuk_good"): "cust_abc123"}
    clock = Clock()
    cache = UsageKeyCache(lambda: FakeSession(keys, queries), ttl=30, negative_ttl=5, clock=clock)  # type: ignore[arg-type, return-value]
    assert await cache.customer_for("iuk_good") == "cust_abc123"
    assert await cache.customer_for("iuk_good") == "cust_abc123"
    assert len(queries) == 1
    # Revoked meanwhile: still served until the entry expires (the documented price of the cache).
    keys.clear()
    clock.now += 29
    assert await cache.customer_for("iuk_good") == "cust_abc123"
    clock.now += 2
    assert await cache.customer_for("iuk_good") is None
    assert queries == [usage_key_hash("iuk_good")] * 2  # hashes, never keys


async def test_unknown_keys_are_remembered_shorter_and_memory_is_bounded() -> None:
    queries: list[str] = []
    keys: dict[str, str] = {}
    clock = Clock()
    cache = UsageKeyCache(lambda: FakeSession(keys, queries), negative_ttl=5, max_keys=2, clock=clock)  # type: ignore[arg-type, return-value]
    assert await cache.customer_for("iuk_new") is None
    keys[usage_key_hash("iuk_new")] = "cust_abc123"  # created just after a failed attempt
    assert await cache.customer_for("iuk_new") is None
    clock.now += 6
    assert await cache.customer_for("iuk_new") == "cust_abc123"
    for name in ("iuk_a", "iuk_b", "iuk_c"):
        await cache.customer_for(name)
    assert len(cache._entries) == 2
    assert await cache.customer_for("") is None and await cache.customer_for("x" * 600) is None


class SlowSession(FakeSession):
    """A lookup that waits until released, so that requests pile up behind it."""

    def __init__(self, keys: dict[str, str], queries: list[str], release: asyncio.Event) -> None:
        super().__init__(keys, queries)
        self.release = release

    async def scalar(self, statement: Any) -> str | None:
        await self.release.wait()
        return await super().scalar(statement)


async def test_concurrent_misses_share_one_lookup() -> None:
    queries: list[str] = []
    release = asyncio.Event()
    keys = {usage_key_hash("iuk_busy"): "cust_abc123"}
    cache = UsageKeyCache(lambda: SlowSession(keys, queries, release))  # type: ignore[arg-type, return-value]
    waiting = [asyncio.create_task(cache.customer_for("iuk_busy")) for _ in range(16)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == ["cust_abc123"] * 16
    assert len(queries) == 1


async def test_a_failed_lookup_fails_its_waiters_and_caches_nothing() -> None:
    class Down(FakeSession):
        async def scalar(self, statement: Any) -> str | None:
            await asyncio.sleep(0)
            raise ConnectionRefusedError("PostgreSQL is down")

    queries: list[str] = []
    cache = UsageKeyCache(lambda: Down({}, queries))  # type: ignore[arg-type, return-value]
    results = await asyncio.gather(
        cache.customer_for("iuk_x"), cache.customer_for("iuk_x"), return_exceptions=True
    )
    assert all(isinstance(result, ConnectionRefusedError) for result in results)
    assert cache._entries == {} and cache._lookups == {}
