"""console_signouts: a console session signed out ends on the server, not only in its browser

Revision ID: 0013
Revises: 0012

A console session is a sealed cookie no server keeps; signing out deleted the browser's cookie only, so
a copy of it stayed good for the rest of its 8 hours. A sign-out now writes the session's id here until
that end, and the console refuses a cookie whose id it finds. A server from before this revision never
reads the table (its sign-out stays the browser's only); the downgrade drops it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_signouts",
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_index("ix_console_signouts_expires_at", "console_signouts", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_console_signouts_expires_at", table_name="console_signouts")
    op.drop_table("console_signouts")
