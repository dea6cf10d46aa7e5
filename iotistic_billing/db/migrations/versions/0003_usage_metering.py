"""usage metering: rollups remember their plan and closing, Stripe meter events are recorded once

Revision ID: 0003
Revises: 0002

(Planned as 0002 after 0001; the Stripe event inbox took 0002 first, so this one follows it.)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_rollups", sa.Column("plan", sa.String(length=20), nullable=True))
    op.add_column("usage_rollups", sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("usage_rollups", sa.Column("metered_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_usage_rollups_unmetered",
        "usage_rollups",
        ["period_end"],
        postgresql_where=sa.text("metered_at IS NULL"),
    )
    op.create_table(
        "usage_meter_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.String(length=40), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metric", sa.String(length=40), nullable=False),
        sa.Column("identifier", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("stripe_event_identifier", sa.String(length=255), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("identifier"),
    )
    op.create_index(
        "ix_usage_meter_events_period", "usage_meter_events", ["customer_id", "period_start"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_usage_meter_events_period", table_name="usage_meter_events")
    op.drop_table("usage_meter_events")
    op.drop_index("ix_usage_rollups_unmetered", table_name="usage_rollups")
    op.drop_column("usage_rollups", "metered_at")
    op.drop_column("usage_rollups", "closed_at")
    op.drop_column("usage_rollups", "plan")
