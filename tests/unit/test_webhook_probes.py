"""/readyz: one round of checks at a time, its answer reused for READINESS_TTL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from iotistic_billing.webhook_server.context import ENGINE, KUBE
from iotistic_billing.webhook_server.probes import READINESS, READINESS_TTL, ReadinessChecks, readyz


class Dependencies:
    """A database and an API server that count the checks, each answering after `delay`."""

    def __init__(self) -> None:
        self.queries = 0
        self.versions = 0
        self.delay = 0.05
        self.up = True

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Dependencies]:
        yield self

    async def execute(self, *args: Any) -> None:
        self.queries += 1
        await asyncio.sleep(self.delay)
        if not self.up:
            raise ConnectionRefusedError("PostgreSQL is away")

    async def server_version(self) -> dict[str, str]:
        self.versions += 1
        await asyncio.sleep(self.delay)
        return {"gitVersion": "v1.36.3"}


async def test_a_flood_of_readiness_probes_makes_one_round_of_checks() -> None:
    """Found in review: /readyz is public and each call took a database connection and an API server
    call, so a flood of it from outside queued the API's requests behind it."""
    now = [100.0]
    dependencies = Dependencies()
    app = web.Application()
    app[ENGINE] = dependencies  # type: ignore[misc]
    app[KUBE] = dependencies  # type: ignore[misc]
    app[READINESS] = ReadinessChecks(clock=lambda: now[0])
    app.router.add_get("/readyz", readyz)
    async with TestClient(TestServer(app)) as client:
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(50)))
        assert {answer.status for answer in answers} == {200}
        assert (dependencies.queries, dependencies.versions) == (1, 1)

        dependencies.up = False
        now[0] += READINESS_TTL / 2
        assert (await client.get("/readyz")).status == 200  # the last answer, still fresh
        now[0] += READINESS_TTL
        away = await client.get("/readyz")
        assert away.status == 503
        assert (await away.json())["checks"] == {"database": "unavailable", "kubernetes": "ok"}
        assert (dependencies.queries, dependencies.versions) == (2, 2)
