"""The schema gate: the webhook server's background work (the Stripe inbox, the notice sender, usage
metering) waits before its first query until the database is at a schema this version knows and needs.

During an upgrade the operator's init container migrates while the new webhook servers start, for
minutes or hours; their readiness holds back requests (webhook_server/probes.py), and this holds back
their workers, which queried columns not there yet: an SQL error and a retry each, for as long as the
migration ran.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.db.migrate import database_revision, head_revision, known_revisions, schema_current
from iotistic_billing.db.pool import DATABASE_UNREACHABLE, database_unreachable
from iotistic_billing.workers import Outage

log = logging.getLogger(__name__)

# Seconds between the looks at the database's revision while it is older than this version's.
SCHEMA_POLL_SECONDS: Final = 5.0

Revision = Callable[[], Awaitable[str | None]]
Sleep = Callable[[float], Awaitable[None]]


class SchemaGate:
    """Open once the database's revision (`revision`, read every `poll` seconds) is one `schema_current`
    takes, as readiness does; open, it stays open. Every worker of a process waits at the one gate:
    one look at a time, and one line while the migration runs, not one a look and worker."""

    def __init__(
        self,
        revision: Revision,
        *,
        poll: float = SCHEMA_POLL_SECONDS,
        sleep: Sleep = asyncio.sleep,
        head: str | None = None,
        known: frozenset[str] | None = None,
    ) -> None:
        self._revision = revision
        self.poll = poll
        self._sleep = sleep
        self.head = head or head_revision()
        self.known = known or known_revisions()
        self._open = False
        self._told = False  # the waiting line is logged
        # One look at a time: a waiter cancelled while it looks lets the next one go on looking.
        self._looking = asyncio.Lock()
        self._reads = Outage(
            log, "schema gate: cannot read the database's revision", "schema gate: reading the revision again"
        )

    @classmethod
    def of(
        cls, engine: AsyncEngine, *, poll: float = SCHEMA_POLL_SECONDS, sleep: Sleep = asyncio.sleep
    ) -> SchemaGate:
        """The gate of the database `engine` connects to."""

        async def revision() -> str | None:
            async with engine.connect() as connection:
                return await database_revision(connection)

        return cls(revision, poll=poll, sleep=sleep)

    async def wait(self) -> None:
        """Until the database is at a current schema; at once when it was seen so before. A failed read
        (PostgreSQL away) is told once and read again after a backoff."""
        if self._open:
            return
        async with self._looking:
            while not self._open:
                try:
                    at = await self._revision()
                except Exception as error:
                    problem = DATABASE_UNREACHABLE if database_unreachable(error) else None
                    await self._sleep(self._reads.failed(error, problem))
                    continue
                self._reads.succeeded()
                if schema_current(at, self.head, self.known):
                    self._open = True
                    if self._told:
                        log.info("the database schema is at %s: the background work starts", at)
                    return
                if not self._told:
                    self._told = True
                    log.info(
                        "waiting for the database schema %s (at %s): the operator's migration runs first",
                        self.head,
                        at or "none",
                    )
                await self._sleep(self.poll)


async def after_schema(schema: SchemaGate | None, work: Callable[[], Awaitable[None]]) -> None:
    """`work`, once `schema` is open; at once without a gate (the tests and tools that migrate first)."""
    if schema is not None:
        await schema.wait()
    await work()


__all__ = ["SCHEMA_POLL_SECONDS", "SchemaGate", "after_schema"]
