"""The webhook server started on a database its migration has not reached yet (an upgrade: the operator's
init container migrates while the new replicas start): its background work waits for the schema, then
starts."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import kubernetes
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine
from iotistic_billing.db.schema import SchemaGate
from iotistic_billing.processes import free_port
from iotistic_billing.settings import load_settings
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.usage.partitions import month_of, partition_name
from iotistic_billing.usage.periods import shift_months
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.options import ServerOptions
from tests.conftest import eventually

pytestmark = pytest.mark.integration

# The tables the background work claims from or keeps: the inbox's events, the sender's deliveries, the
# meter run's rollups.
WORKED_TABLES = ("stripe_events", "notice_deliveries", "usage_rollups")
CLAIMED_TABLES = ("stripe_events", "notice_deliveries")


@contextmanager
def statements_on(tables: tuple[str, ...]) -> Iterator[list[str]]:
    """The SQL statements every SQLAlchemy engine of the process runs meanwhile that name one of `tables`."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if any(table in statement for table in tables):
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


class Looks:
    """The gate's naps between its looks at the revision, each ended by the test: no time passes."""

    def __init__(self) -> None:
        self.napping = asyncio.Event()
        self._go = asyncio.Event()

    async def nap(self, seconds: float) -> None:
        self.napping.set()
        await self._go.wait()
        self._go.clear()

    async def napped(self) -> None:
        async with asyncio.timeout(30):  # the test's own bound on the server's start
            await self.napping.wait()
        self.napping.clear()

    def look_again(self) -> None:
        self._go.set()


async def test_the_background_work_waits_for_the_migration_and_then_starts(
    postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: a webhook server started during an upgrade, its database one migration behind,
    was kept out of the Service by readiness, but its inbox claimed events, its notice sender deliveries
    and its meter run closed periods at once, on the schema before the migration: with an older one,
    one SQL error after another on a column not there yet (stripe_events.payload_bytes,
    usage_rollups.billed_manually), for as long as the migration ran. Now none of them queries its table
    until the database is at head; then each starts."""
    caplog.set_level(logging.INFO, logger="iotistic_billing")
    url = postgres.create_database(f"schemagate_{uuid.uuid4().hex[:10]}")
    head = migrate.head_revision()
    before = migrate.previous_revision(head)
    assert before is not None
    await asyncio.to_thread(migrate.upgrade, url, before)

    now = datetime.now(UTC)
    # Past the months the migrations made (this one and two ahead): made only by a partition run.
    farthest = partition_name(shift_months(month_of(now), 5))
    settings = load_settings(
        database_url=url,
        stripe_webhook_secret="whsec_schema_gate",
        admin_api_token="admin-token-" + "s" * 20,
        console_session_key="k" * 32,
    )
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there: never reached here
    configuration.retries = False
    unreachable = kubernetes.client.ApiClient(configuration)
    engine = create_engine(url)
    looks = Looks()
    app = create_app(
        settings,
        kube=unreachable,
        clock=lambda: now,
        # Both roles' work in one app: the inbox and the sender (the inbox process's), the meter run (the
        # server's), the partition run and the flush (both's).
        options=ServerOptions(inbox_workers=1, notice_workers=1, kube_timeout=2),
        usage=UsageOptions(meter_initial_delay=0.0, partitions_ahead=5),
        schema=SchemaGate.of(engine, sleep=looks.nap),
    )

    async def partition_made() -> bool:
        async with engine.connect() as connection:
            return bool(await connection.scalar(text(f"SELECT to_regclass('{farthest}') IS NOT NULL")))

    server = TestServer(app, host="127.0.0.1")
    with statements_on(WORKED_TABLES) as seen:
        await server.start_server()
        try:
            await looks.napped()  # the gate looked: the database is before head
            assert seen == []
            assert not await partition_made()
            waiting = [
                r.getMessage() for r in caplog.records if "waiting for the database schema" in r.getMessage()
            ]
            assert waiting == [
                f"waiting for the database schema {head} (at {before}): the operator's migration runs first"
            ]

            await asyncio.to_thread(migrate.upgrade, url)
            looks.look_again()

            async def claimed() -> bool:
                claims = [statement for statement in seen if "FOR UPDATE" in statement]
                return all(any(f"FROM {table}" in claim for claim in claims) for table in CLAIMED_TABLES)

            assert await eventually(claimed, message="the inbox's and the sender's first claims")
            assert await eventually(partition_made, message="the partition run")
        finally:
            await server.close()
            unreachable.close()
            await engine.dispose()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
