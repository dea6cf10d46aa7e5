"""Alembic, driven from code: `upgrade(url)` is what the operator's start, `make dev` and the tests call;
`python -m iotistic_billing.db.migrate` is the deployed step (the chart's init container) before it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from iotistic_billing.db.engine import create_engine
from iotistic_billing.db.models import USAGE_REPORT_PARTITION
from iotistic_billing.settings import SettingsError, load_settings

_HERE = Path(__file__).parent
# The advisory lock every migration run holds (db/migrations/env.py); any bigint no other lock uses.
MIGRATION_LOCK = 0x10715_0001
# How long a migration's statement waits for a table's lock. Without a bound an ALTER queued behind an
# open transaction (an idle psql session) waited for ever, and every write to the table queued behind
# it: the servers' inserts timed out as "database unavailable" while the migration said nothing. Below
# their statement timeout (db/pool.py, 10 s), so the writes queued behind a waiting ALTER wait less than
# that. Past it the migration fails and is rolled back; the init container's next start tries again.
MIGRATION_LOCK_TIMEOUT = "5s"
LOCK_NOT_AVAILABLE = "55P03"
PROGRAM = "iotistic-billing migrate"


def compared(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's `include_name`: what autogenerate compares with the models; not the partitions of
    usage_reports, which usage metering makes and drops."""
    return not (type_ == "table" and name is not None and USAGE_REPORT_PARTITION.fullmatch(name))


def alembic_config(database_url: str, lock_timeout: str | None = None) -> Config:
    config = Config(str(_HERE / "alembic.ini"))
    config.set_main_option("script_location", str(_HERE / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["lock_timeout"] = lock_timeout or MIGRATION_LOCK_TIMEOUT  # read by migrations/env.py
    return config


def upgrade(database_url: str, revision: str = "head", lock_timeout: str | None = None) -> None:
    command.upgrade(alembic_config(database_url, lock_timeout), revision)


def downgrade(database_url: str, revision: str, lock_timeout: str | None = None) -> None:
    command.downgrade(alembic_config(database_url, lock_timeout), revision)


def migration_order() -> list[str]:
    """This version's migrations, oldest first (they are one line: no branches)."""
    scripts = ScriptDirectory.from_config(alembic_config(""))
    return [script.revision for script in reversed(list(scripts.walk_revisions()))]


def head_revision() -> str:
    """The newest migration of this version: the schema its code reads and writes."""
    return migration_order()[-1]


def known_revisions() -> frozenset[str]:
    """Every migration of this version; a revision not among them is a newer version's."""
    return frozenset(migration_order())


def schema_current(at: str | None, head: str, known: frozenset[str]) -> bool:
    """Whether a database at revision `at` has the schema this version's code needs: `head`, its newest
    migration, or a revision not among `known`, a newer version's (migrated before this replica was
    replaced, or kept by a rollback), which keeps what this one reads and writes (docs/architecture.md,
    "Tables"); not an older one, nor none. Readiness and the background work's wait (db/schema.py) ask
    this one question."""
    return at is not None and (at == head or at not in known)


async def database_revision(connection: AsyncConnection) -> str | None:
    """The revision the database is at; None when it was never migrated (no alembic_version: the first
    migration not committed yet)."""
    if not await connection.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL")):
        return None
    revision: str | None = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    return revision


def current_revision(database_url: str) -> str | None:
    """The revision the database of `database_url` is at; None when it was never migrated."""

    async def read() -> str | None:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as connection:
                return await database_revision(connection)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _reason(error: BaseException) -> str:
    """The driver's own message when SQLAlchemy wraps one (its wrapper adds a link and the statement)."""
    return str(getattr(error, "orig", None) or error).strip().splitlines()[0]


def _lock_not_available(error: BaseException) -> bool:
    """A statement that waited MIGRATION_LOCK_TIMEOUT for a lock (PostgreSQL's lock_not_available)."""
    return getattr(getattr(error, "orig", None), "sqlstate", None) == LOCK_NOT_AVAILABLE


def previous_revision(revision: str) -> str | None:
    """The migration before `revision`; None for the first."""
    order = migration_order()
    index = order.index(revision)
    return order[index - 1] if index else None


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m iotistic_billing.db.migrate",
        description="Bring the database of DATABASE_URL to this version's newest migration (what the"
        " chart's init container runs), or with --to to one of its migrations: a rollback to an older"
        " version takes the database back to that version's newest first, run by this version.",
    )
    parser.add_argument(
        "--to", metavar="REVISION", help="a migration of this version, older or newer than the database's"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Bring the database to the newest migration, or to `--to`'s; exit 0 when it is already there, 1
    when the migration fails (rolled back: all of it runs in one transaction), 2 without DATABASE_URL
    or with a `--to` this version does not have."""
    arguments = _arguments(argv)
    try:
        settings = load_settings()
        if settings.database_url is None:
            raise SettingsError("DATABASE_URL: required to migrate the database")
    except SettingsError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    url = settings.database_url
    order = migration_order()
    head = order[-1]
    target = head if arguments.to is None else arguments.to
    if target not in order:
        print(
            f"{PROGRAM}: --to: this version has no migration {target!r} (its migrations: {', '.join(order)})",
            file=sys.stderr,
        )
        return 2
    try:
        before = current_revision(url)
    except Exception as error:
        print(f"{PROGRAM}: cannot read the database of DATABASE_URL: {_reason(error)}", file=sys.stderr)
        return 1
    newest = ", the newest migration" if target == head else ""
    if before == target:
        print(f"{PROGRAM}: the database is at {target}{newest}: nothing to do", flush=True)
        return 0
    if before is not None and before not in order:
        # A revision of a newer version: upgrading from it would fail the same way.
        print(
            f"{PROGRAM}: the database is at revision {before}, which this version does not know"
            f" (its newest is {head}): a newer version migrated it; run that version, or, to roll back"
            f" to this one, that version's `python -m iotistic_billing.db.migrate --to {head}` first",
            file=sys.stderr,
        )
        return 1
    print(f"{PROGRAM}: migrating the database from {before or 'empty'} to {target}", flush=True)
    # Alembic's "Running upgrade a -> b" lines, so that a long migration shows where it is.
    logging.basicConfig(format="%(levelname)s [%(name)s] %(message)s", stream=sys.stderr)
    logging.getLogger("alembic.runtime.migration").setLevel(logging.INFO)
    try:
        if before is None or order.index(before) < order.index(target):
            upgrade(url, target)
        else:
            downgrade(url, target)
    except Exception as error:
        traceback.print_exc()
        waited = (
            f": a table it changes was held by another session for over {MIGRATION_LOCK_TIMEOUT} (an open"
            " transaction: see pg_stat_activity, pg_locks); the next start tries again"
            if _lock_not_available(error)
            else ""
        )
        print(
            f"{PROGRAM}: the migration from {before or 'empty'} to {target} failed and was rolled back:"
            f" {_reason(error)}{waited}",
            file=sys.stderr,
        )
        return 1
    print(f"{PROGRAM}: the database is at {target}{newest} (was {before or 'empty'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
