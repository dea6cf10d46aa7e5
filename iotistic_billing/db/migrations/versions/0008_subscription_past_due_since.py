"""subscriptions.past_due_since: a lost batch of the Stripe inbox is decided again from what it was

Revision ID: 0008
Revises: 0007

The inbox writes a Customer's spec.subscription before its batch commits; a batch lost after that
write is decided again from the subscriptions' rows (stripe_inbox.events.committed_subscription), and
the Customer's pastDueSince is the lost batch's by then. The row now keeps its own, written in the
batch's transaction with the rest of the row. Rows written before this revision hold NULL: an overdue
one is read as before (the Customer's pastDueSince while it is still overdue), until its next event
writes the column. An inbox from before this revision writes no such column, so a row it updates keeps
the value before (docs/architecture.md, "Tables": upgrade the webhook servers with it). The downgrade
drops the column; the older code never reads it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("subscriptions", sa.Column("past_due_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("subscriptions", "past_due_since")
