"""/readyz: one round of checks at a time, its answer reused for READINESS_TTL; ready on PostgreSQL at
this version's schema, whatever the API server says."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from iotistic_billing.k8s import KubernetesUnavailable
from iotistic_billing.webhook_server import probes
from iotistic_billing.webhook_server.context import DIRECTORY, ENGINE, KUBE, METRICS, SESSIONS
from iotistic_billing.webhook_server.metrics import Metrics
from iotistic_billing.webhook_server.probes import (
    LEFT_BILLING,
    LEFT_BILLING_TIMEOUT,
    LEFT_BILLING_TTL,
    READINESS,
    READINESS_TTL,
    LeftBillingCount,
    ReadinessChecks,
    metrics,
    readyz,
)


class Dependencies:
    """A database (at `revision`) and an API server that count the checks, each answering after
    `delay`."""

    def __init__(self) -> None:
        self.queries = 0
        self.versions = 0
        self.delay = 0.05
        self.up = True
        self.kube_up = True
        self.revision: str | None = HEAD

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Dependencies]:
        yield self

    async def scalar(self, statement: Any) -> str | bool | None:
        if "to_regclass" in str(statement):  # whether alembic_version is there: a round's first query
            self.queries += 1
            await asyncio.sleep(self.delay)
            if not self.up:
                raise ConnectionRefusedError("PostgreSQL is away")
            return self.revision is not None
        return self.revision

    async def server_version(self) -> dict[str, str]:
        self.versions += 1
        await asyncio.sleep(self.delay)
        if not self.kube_up:
            raise KubernetesUnavailable("the API server cannot be reached")
        return {"gitVersion": "v1.36.3"}


HEAD = "0017"


@asynccontextmanager
async def probed(
    dependencies: Dependencies, now: list[float], left: LeftBillingSource | None = None
) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application()
    if left is not None:
        app[SESSIONS] = left  # type: ignore[misc]
        app[DIRECTORY] = left  # type: ignore[misc]
        app[LEFT_BILLING] = LeftBillingCount(clock=lambda: now[0])
        app.on_shutdown.append(app[LEFT_BILLING].close)
    app[ENGINE] = dependencies  # type: ignore[misc]
    app[KUBE] = dependencies  # type: ignore[misc]
    app[READINESS] = ReadinessChecks(clock=lambda: now[0], head=HEAD, known=frozenset({"0010", HEAD}))
    app[METRICS] = Metrics()
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_a_flood_of_readiness_probes_makes_one_round_of_checks() -> None:
    """Found in review: /readyz is public and each call took a database connection and an API server
    call, so a flood of it from outside queued the API's requests behind it."""
    now = [100.0]
    dependencies = Dependencies()
    async with probed(dependencies, now) as client:
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(50)))
        assert {answer.status for answer in answers} == {200}
        assert (dependencies.queries, dependencies.versions) == (1, 1)

        dependencies.up = False
        now[0] += READINESS_TTL / 2
        assert (await client.get("/readyz")).status == 200  # the last answer, still fresh
        now[0] += READINESS_TTL
        away = await client.get("/readyz")
        assert away.status == 503
        assert (await away.json())["checks"] == {
            "database": "unavailable",
            "schema": "unavailable",
            "kubernetes": "ok",
        }
        assert (dependencies.queries, dependencies.versions) == (2, 2)


async def test_ready_needs_the_schema_of_this_version_and_not_the_api_server() -> None:
    """Found in review: a new replica was Ready against the schema before its migrations (every write of
    a new column failed), and with the API server away every replica left the Service, refusing Stripe
    events and usage reports that need PostgreSQL alone. A newer version's schema keeps it ready, or the
    next upgrade's migration would take every running replica out before its new ones are up."""
    now = [100.0]
    dependencies = Dependencies()
    dependencies.revision = "0010"
    async with probed(dependencies, now) as client:
        behind = await client.get("/readyz")
        assert behind.status == 503
        assert (await behind.json())["checks"] == {
            "database": "ok",
            "schema": "unavailable",
            "kubernetes": "ok",
        }

        # Not migrated at all (the first migration under way): PostgreSQL answers, the schema is not there.
        dependencies.revision = None
        now[0] += READINESS_TTL
        fresh = await client.get("/readyz")
        assert fresh.status == 503
        assert (await fresh.json())["checks"] == {
            "database": "ok",
            "schema": "unavailable",
            "kubernetes": "ok",
        }

        # A newer version's migration (the next upgrade's, before this replica is replaced): still ready.
        dependencies.revision = "0014"
        now[0] += READINESS_TTL
        assert (await client.get("/readyz")).status == 200

        dependencies.revision, dependencies.kube_up = HEAD, False
        now[0] += READINESS_TTL
        ready = await client.get("/readyz")
        assert ready.status == 200
        assert await ready.json() == {
            "status": "ready",
            "checks": {"database": "ok", "schema": "ok", "kubernetes": "unavailable"},
        }


async def scraped_checks(client: TestClient[Any, Any]) -> dict[str, float]:
    """iotistic_readiness_check of a scrape of /metrics, by check."""
    text = await (await client.get("/metrics")).text()
    return {
        sample.labels["check"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "iotistic_readiness_check"
        for sample in family.samples
    }


async def test_metrics_say_which_readiness_check_fails_without_a_readiness_probe() -> None:
    """Found in review: a PostgreSQL outage fired no alert. Every replica failed /readyz and left the
    Service, so no request reached the server (its 5xx alerts saw nothing), and `up` stayed 1 (the
    ServiceMonitor scrapes unready endpoints). The checks are on /metrics now, checked at the scrape
    itself: nobody probes the Stripe inbox process's /readyz."""
    now = [100.0]
    dependencies = Dependencies()
    async with probed(dependencies, now) as client:
        dependencies.up = False
        assert await scraped_checks(client) == {"database": 0.0, "schema": 0.0, "kubernetes": 1.0}
        assert dependencies.queries == 1

        # Back: the next round, whoever asks for it, sets them again.
        dependencies.up, dependencies.kube_up = True, False
        now[0] += READINESS_TTL
        assert (await client.get("/readyz")).status == 200
        assert await scraped_checks(client) == {"database": 1.0, "schema": 1.0, "kubernetes": 0.0}
        assert dependencies.queries == 2  # the scrape within READINESS_TTL reused the probe's round


class LeftBillingSource:
    """The sessions and the directory a count reads: `left` subscriptions left billing after `delay`, or
    `refusal` raised; `counts` the counts made."""

    def __init__(self) -> None:
        self.left: list[str] = []
        self.refusal: Exception | None = None
        self.counts = 0
        self.delay = 0.05

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[LeftBillingSource]:
        yield self

    async def left_billing(self, session: Any, statuses: Any) -> list[str]:
        self.counts += 1
        await asyncio.sleep(self.delay)
        if self.refusal is not None:
            raise self.refusal
        return list(self.left)


async def scraped_left_billing(client: TestClient[Any, Any]) -> float:
    text = await (await client.get("/metrics")).text()
    [value] = [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "iotistic_subscriptions_left_billing"
        for sample in family.samples
    ]
    return value


async def counted(client: TestClient[Any, Any]) -> None:
    """The count a scrape started, finished (a scrape does not wait for it)."""
    round_ = client.app[LEFT_BILLING].refresh(client.app)
    if round_ is not None:
        await round_


async def test_subscriptions_left_billing_are_counted_after_a_scrape_at_most_once_a_ttl(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: a deleted Customer's subscription left billing had a Warning Event alone, which the
    API server drops within the hour, and nothing for an alert to read. The gauge counts what the
    database and the Customers say, a count started by a scrape at most once a LEFT_BILLING_TTL however
    many scrape; a count that fails keeps the last, and says why."""
    now = [100.0]
    source = LeftBillingSource()
    source.left = ["sub_gone1", "sub_gone2"]
    async with probed(Dependencies(), now, source) as client:
        assert set(await asyncio.gather(*(scraped_left_billing(client) for _ in range(20)))) == {0.0}
        await counted(client)
        assert await scraped_left_billing(client) == 2.0
        assert source.counts == 1

        source.left = ["sub_gone2"]  # one cancelled
        now[0] += LEFT_BILLING_TTL / 2
        assert await scraped_left_billing(client) == 2.0  # the last count, still fresh
        await counted(client)
        assert source.counts == 1
        now[0] += LEFT_BILLING_TTL
        assert await scraped_left_billing(client) == 2.0  # a count started, the last one shown meanwhile
        await counted(client)
        assert await scraped_left_billing(client) == 1.0
        assert source.counts == 2

        source.refusal = ConnectionRefusedError("PostgreSQL is away")
        now[0] += LEFT_BILLING_TTL
        with caplog.at_level(logging.WARNING):
            assert await scraped_left_billing(client) == 1.0
            await counted(client)
            assert await scraped_left_billing(client) == 1.0  # not counted again until the TTL is past
            await counted(client)
        assert source.counts == 3
        assert "subscriptions left billing not counted" in caplog.text and "PostgreSQL is away" in caplog.text


async def test_a_scrape_does_not_wait_for_the_count_of_subscriptions_left_billing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: with PostgreSQL or the API server not answering, a scrape waited for the readiness
    checks (READINESS_TIMEOUT) and then for the count (LEFT_BILLING_TIMEOUT), 13 s, past Prometheus's
    default 10 s scrape timeout: the target went down, and with it iotistic_readiness_check, which the
    alerts on that outage read. The scrape shows the last count; one count at a time runs behind it."""
    monkeypatch.setattr(probes, "READINESS_TIMEOUT", 0.1)  # the readiness checks' wait is not this test's
    now = [100.0]
    dependencies, source = Dependencies(), LeftBillingSource()
    source.left = ["sub_gone1"]
    async with probed(dependencies, now, source) as client:
        await scraped_left_billing(client)
        await counted(client)
        dependencies.delay = source.delay = 60.0  # neither answers any more
        now[0] += LEFT_BILLING_TTL
        async with asyncio.timeout(LEFT_BILLING_TIMEOUT / 2):
            assert await scraped_checks(client) == {"database": 0.0, "schema": 0.0, "kubernetes": 0.0}
            now[0] += READINESS_TTL
            assert await scraped_left_billing(client) == 1.0
        assert source.counts == 2  # the one count under way, not one per scrape


def test_the_stripe_inbox_process_does_not_count_the_subscriptions_left_billing_again() -> None:
    """Its server counts them; each count is a query and a LIST of the Customers."""
    from iotistic_billing.settings import load_settings
    from iotistic_billing.webhook_server.app import create_app
    from iotistic_billing.webhook_server.options import ServerOptions

    settings = load_settings(database_url="postgresql://nobody@127.0.0.1:1/none")
    assert LEFT_BILLING in create_app(settings, options=ServerOptions())
    assert LEFT_BILLING not in create_app(settings, options=ServerOptions(probes_only=True))
