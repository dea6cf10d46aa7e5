"""The probes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from iotistic_billing.db.migrate import database_revision, head_revision, known_revisions, schema_current
from iotistic_billing.stripe_inbox.events import OPEN_STATUSES
from iotistic_billing.webhook_server.context import DIRECTORY, ENGINE, KUBE, METRICS, SESSIONS
from iotistic_billing.webhook_server.messages import json_model
from iotistic_billing.webhook_server.schemas import Health, Readiness

log = logging.getLogger(__name__)
READINESS_TIMEOUT: Final = 3.0
# How long a readiness answer is reused (kubelet probes every 10 s).
READINESS_TTL: Final = 1.0
# How long a count of the subscriptions left billing is reused, and how long one may take: each is a
# query, and a LIST of every Customer when a subscription is open, and each scrape of each replica would
# make one. No scrape waits for it (LeftBillingCount).
LEFT_BILLING_TTL: Final = 60.0
LEFT_BILLING_TIMEOUT: Final = 10.0
# The checks readiness needs; the others are reported only.
GATING: Final = frozenset({"database", "schema"})


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving (nothing else is checked: a dependency down is not our restart)."""
    return json_model(Health(status="ok"))


async def _check(name: str, probe: Any) -> tuple[str, bool]:
    try:
        async with asyncio.timeout(READINESS_TIMEOUT):  # not wait_for: see workers.py
            await probe
    except asyncio.CancelledError:
        raise
    except Exception as error:
        log.warning("readiness: %s unavailable (%s)", name, type(error).__name__)
        return name, False
    return name, True


class ReadinessChecks:
    """The checks' last results, kept READINESS_TTL seconds, and one round of checks at a time: /readyz is
    public (kubelet, load balancers), and every call took a pooled database connection and an API
    server call, so a flood of it queued the API's own requests behind it.

    Ready means PostgreSQL answers at the schema this version's code needs (its newest migration, or a
    newer version's, which keeps what this one reads and writes: docs/architecture.md, "Tables"; the
    operator's init container migrates during an upgrade, and a new replica serving an older schema
    failed every write of a new column). The API server is checked and reported, but does
    not make the server unready: Stripe events, usage reports and the keys need PostgreSQL alone, and
    every replica leaving the Service while the control plane was away refused them all.

    Readiness holds back requests only: the background work (the Stripe inbox, the notice sender, usage
    metering) waits for the same schema itself before its first query (db/schema.py, SchemaGate)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        head: str | None = None,
        known: frozenset[str] | None = None,
    ) -> None:
        self._clock = clock
        self._head, self._known = head, known
        self._results: list[tuple[str, bool]] = []
        self._checked_at = -READINESS_TTL
        self._round: asyncio.Future[list[tuple[str, bool]]] | None = None

    async def results(self, app: web.Application) -> list[tuple[str, bool]]:
        if self._clock() - self._checked_at < READINESS_TTL:
            return self._results
        if self._round is None or self._round.done():
            self._round = asyncio.ensure_future(self._check_all(app))
        return await asyncio.shield(self._round)  # a caller that goes away does not cancel the others'

    async def _check_all(self, app: web.Application) -> list[tuple[str, bool]]:
        revision: list[str | None] = []

        async def database() -> None:
            async with app[ENGINE].connect() as connection:
                # None (the first migration not committed): PostgreSQL answers, the schema is not there.
                revision.append(await database_revision(connection))

        results = list(
            await asyncio.gather(
                _check("database", database()), _check("kubernetes", app[KUBE].server_version())
            )
        )
        head = self._head = self._head or head_revision()
        known = self._known = self._known or known_revisions()
        at = revision[0] if revision else None
        current = schema_current(at, head, known)
        if revision and not current:
            log.warning("readiness: the database is at %s, this version needs %s (migrating?)", at, head)
        results.insert(1, ("schema", current))
        self._results, self._checked_at = results, self._clock()
        return results


READINESS = web.AppKey("readiness", ReadinessChecks)


async def readiness(app: web.Application) -> list[tuple[str, bool]]:
    """The checks' results (ReadinessChecks), also set on /metrics (iotistic_readiness_check): the alert
    on PostgreSQL down reads them there, since no request reaches a replica out of the Service."""
    results = await app[READINESS].results(app)
    app[METRICS].readiness_checked(results)
    return results


async def readyz(request: web.Request) -> web.Response:
    """Ready when PostgreSQL answers at this version's schema (as checked at most READINESS_TTL ago); the
    API server's answer is reported beside (see ReadinessChecks)."""
    results = await readiness(request.app)
    checks = {name: "ok" if ok else "unavailable" for name, ok in results}
    ready = all(ok for name, ok in results if name in GATING)
    return json_model(
        Readiness.model_validate({"status": "ready" if ready else "unavailable", "checks": checks}),
        status=200 if ready else 503,
    )


class LeftBillingCount:
    """iotistic_subscriptions_left_billing, counted (Directory.left_billing) at most once a
    LEFT_BILLING_TTL, one count at a time, a failed one too: the state is what lasts (a deletion's Warning
    Event is gone within the hour, and a counter would start again with each pod). A scrape finding the
    count stale starts one in the background and shows the last: found in review, a scrape waited for it,
    up to LEFT_BILLING_TIMEOUT after the readiness checks' READINESS_TIMEOUT, past Prometheus's 10 s
    scrape timeout with PostgreSQL or the API server away, so the target went down and with it the
    readiness series the outage's alerts read. A count that fails or takes over LEFT_BILLING_TIMEOUT keeps
    the last one, and says why in the log."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counted_at: float | None = None
        self._round: asyncio.Task[None] | None = None

    def refresh(self, app: web.Application) -> asyncio.Task[None] | None:
        """Start a count when the last is stale and none is under way; the one under way, if any."""
        if self._round is not None and not self._round.done():
            return self._round
        if self._counted_at is not None and self._clock() - self._counted_at < LEFT_BILLING_TTL:
            return None
        self._round = asyncio.create_task(self._count(app))
        return self._round

    async def close(self, app: web.Application) -> None:
        """A count under way is cancelled at shutdown, before the pools it reads are closed."""
        if self._round is not None and not self._round.done():
            self._round.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._round

    async def _count(self, app: web.Application) -> None:
        try:
            async with asyncio.timeout(LEFT_BILLING_TIMEOUT), app[SESSIONS]() as session:
                left = await app[DIRECTORY].left_billing(session, OPEN_STATUSES)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning(
                "subscriptions left billing not counted, iotistic_subscriptions_left_billing keeps its last"
                " count: %s",
                str(error) or type(error).__name__,
            )
        else:
            app[METRICS].left_billing.set(len(left))
        finally:
            self._counted_at = self._clock()


LEFT_BILLING = web.AppKey("left_billing", LeftBillingCount)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of this process, the readiness checks' checked at the scrape: kubelet probes the
    server's /readyz alone, not its Stripe inbox process's, which its own metrics report. The server
    counts the subscriptions left billing too (LeftBillingCount, in the background: the scrape shows the
    last count), its inbox process not again."""
    await readiness(request.app)
    if LEFT_BILLING in request.app:
        request.app[LEFT_BILLING].refresh(request.app)
    return request.app[METRICS].exposition()


__all__ = [
    "LEFT_BILLING",
    "LEFT_BILLING_TIMEOUT",
    "LEFT_BILLING_TTL",
    "READINESS",
    "READINESS_TTL",
    "LeftBillingCount",
    "ReadinessChecks",
    "healthz",
    "metrics",
    "readiness",
    "readyz",
]
