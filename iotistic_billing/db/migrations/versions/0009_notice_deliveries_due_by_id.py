"""notice_deliveries: the due index ends with the id, so the sender's claim reads one entry

Revision ID: 0009
Revises: 0008

The sender claims the delivery due longest, `ORDER BY next_attempt_at, id LIMIT 1`. The index held
next_attempt_at only, and the deliveries of one transaction share it (its now()), so PostgreSQL read
and sorted every pending delivery for each claim: 6.6 ms a claim at 10,000 pending, most of
PostgreSQL's CPU while a burst of Stripe events wrote a notice each (bench/README.md). With the id in
the index a claim is the index's first entry (0.05 ms). The downgrade puts the index of 0004 back.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.drop_index("ix_notice_deliveries_due", table_name="notice_deliveries")
    op.create_index(
        "ix_notice_deliveries_due", "notice_deliveries", ["next_attempt_at", "id"], postgresql_where=PENDING
    )


def downgrade() -> None:
    op.drop_index("ix_notice_deliveries_due", table_name="notice_deliveries")
    op.create_index(
        "ix_notice_deliveries_due", "notice_deliveries", ["next_attempt_at"], postgresql_where=PENDING
    )
