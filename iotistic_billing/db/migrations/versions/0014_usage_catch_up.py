"""usage_catch_up: when the meter run last flushed the reports no rollup held

Revision ID: 0014
Revises: 0013

Each meter run flushes the customers whose stored reports no rollup holds (a server killed after its
202 took its flush with it), looking back three meter intervals. With every replica down longer than
that, a report stored just before was never looked at again, and a period all of whose reports it held
was billed in no period. The run now notes PostgreSQL's time when it has flushed them all, and looks back
to it. A server from before this revision never reads the row; the downgrade drops the table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_catch_up",
        sa.Column("id", sa.SmallInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("caught_up_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_usage_catch_up_one_row"),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("usage_catch_up")
