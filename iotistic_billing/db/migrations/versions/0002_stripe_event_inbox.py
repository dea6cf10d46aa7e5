"""stripe_events becomes an inbox: the verified payload is stored and applied after the 2xx

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("stripe_events", sa.Column("payload", postgresql.JSONB(), nullable=True))
    op.add_column("stripe_events", sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
    op.add_column("stripe_events", sa.Column("last_error", sa.Text(), nullable=True))
    op.add_column("stripe_events", sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_stripe_events_pending",
        "stripe_events",
        ["created", "received_at"],
        postgresql_where=sa.text("result = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_stripe_events_pending", table_name="stripe_events")
    op.drop_column("stripe_events", "applied_at")
    op.drop_column("stripe_events", "last_error")
    op.drop_column("stripe_events", "attempts")
    op.drop_column("stripe_events", "payload")
