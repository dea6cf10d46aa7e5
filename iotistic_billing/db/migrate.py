"""Alembic, driven from code: `upgrade(url)` is what start-up, `make dev` and the tests call."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from iotistic_billing.db.models import USAGE_REPORT_PARTITION

_HERE = Path(__file__).parent
# The advisory lock every migration run holds (db/migrations/env.py); any bigint no other lock uses.
MIGRATION_LOCK = 0x10715_0001


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
