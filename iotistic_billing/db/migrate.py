"""Alembic, driven from code: `upgrade(url)` is what the operator's start, `make dev` and the tests call;
`python -m iotistic_billing.db.migrate` is the deployed step (the chart's init container) before it."""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from iotistic_billing.db.engine import create_engine
from iotistic_billing.db.models import USAGE_REPORT_PARTITION
from iotistic_billing.settings import SettingsError, load_settings

_HERE = Path(__file__).parent
# The advisory lock every migration run holds (db/migrations/env.py); any bigint no other lock uses.
MIGRATION_LOCK = 0x10715_0001
PROGRAM = "iotistic-billing migrate"


def compared(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's `include_name`: what autogenerate compares with the models; not the partitions of
    usage_reports, which usage metering makes and drops."""
    return not (type_ == "table" and name is not None and USAGE_REPORT_PARTITION.fullmatch(name))


def alembic_config(database_url: str) -> Config:
    config = Config(str(_HERE / "alembic.ini"))
    config.set_main_option("script_location", str(_HERE / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """The newest migration of this version: the schema its code reads and writes."""
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None, "the migrations have one head"
    return head


def known_revisions() -> frozenset[str]:
    """Every migration of this version; a revision not among them is a newer version's."""
    return frozenset(
        script.revision for script in ScriptDirectory.from_config(alembic_config("")).walk_revisions()
    )


def current_revision(database_url: str) -> str | None:
    """The revision the database is at; None when it was never migrated."""

    async def read() -> str | None:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_revision()
                )
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _reason(error: BaseException) -> str:
    """The driver's own message when SQLAlchemy wraps one (its wrapper adds a link and the statement)."""
    return str(getattr(error, "orig", None) or error).strip().splitlines()[0]


def main() -> int:
    """Bring the database to the newest migration; exit 0 when it is already there, 1 when the migration
    fails (rolled back: all of it runs in one transaction), 2 without DATABASE_URL."""
    try:
        settings = load_settings()
        if settings.database_url is None:
            raise SettingsError("DATABASE_URL: required to migrate the database")
    except SettingsError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    url = settings.database_url
    scripts = ScriptDirectory.from_config(alembic_config(url))
    head = head_revision()
    try:
        before = current_revision(url)
    except Exception as error:
        print(f"{PROGRAM}: cannot read the database of DATABASE_URL: {_reason(error)}", file=sys.stderr)
        return 1
    if before == head:
        print(f"{PROGRAM}: the database is at {head}, the newest migration: nothing to do", flush=True)
        return 0
    try:
        if before is not None:
            scripts.get_revision(before)
    except CommandError:  # a revision of a newer version: upgrading from it would fail the same way
        print(
            f"{PROGRAM}: the database is at revision {before}, which this version does not know"
            f" (its newest is {head}): a newer version migrated it; run that version",
            file=sys.stderr,
        )
        return 1
    print(f"{PROGRAM}: migrating the database from {before or 'empty'} to {head}", flush=True)
    # Alembic's "Running upgrade a -> b" lines, so that a long migration shows where it is.
    logging.basicConfig(format="%(levelname)s [%(name)s] %(message)s", stream=sys.stderr)
    logging.getLogger("alembic.runtime.migration").setLevel(logging.INFO)
    try:
        upgrade(url)
    except Exception as error:
        traceback.print_exc()
        print(
            f"{PROGRAM}: the migration from {before or 'empty'} to {head} failed and was rolled back:"
            f" {_reason(error)}",
            file=sys.stderr,
        )
        return 1
    print(f"{PROGRAM}: the database is at {head} (was {before or 'empty'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
