"""console_actions: the audit of the admin console's actions; usage_reports by reported_at (the
console's overview counts the last hour's reports)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_actions",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("role", sa.String(10), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("customer_name", sa.String(63), nullable=True),
        sa.Column("target", sa.String(255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_console_actions_customer_name", "console_actions", ["customer_name"])
    op.create_index("ix_usage_reports_reported_at", "usage_reports", ["reported_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_reports_reported_at", table_name="usage_reports")
    op.drop_index("ix_console_actions_customer_name", table_name="console_actions")
    op.drop_table("console_actions")
