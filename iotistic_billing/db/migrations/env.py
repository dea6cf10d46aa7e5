"""Alembic environment: runs migrations through the async engine of iotistic_billing.db.engine."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from iotistic_billing.db.engine import create_engine
from iotistic_billing.db.migrate import MIGRATION_LOCK, MIGRATION_LOCK_TIMEOUT, compared
from iotistic_billing.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata, compare_type=True, include_name=compared
    )
    with context.begin_transaction():
        # The operator shards' pods that start together each upgrade the database (their migrate init
        # containers): one at a time, the later ones finding it at head (without it, all but one crashed).
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        # After the lock above, which waits for another shard's whole migration: each statement of this
        # one waits for a table's lock that long at most (migrate.MIGRATION_LOCK_TIMEOUT).
        lock_timeout = str(config.attributes.get("lock_timeout") or MIGRATION_LOCK_TIMEOUT)
        connection.execute(
            text("SELECT set_config('lock_timeout', :timeout, true)"), {"timeout": lock_timeout}
        )
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
