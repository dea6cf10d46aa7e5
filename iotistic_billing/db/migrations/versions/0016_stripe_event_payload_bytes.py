"""stripe_events.payload_bytes: the size of an event's JSON as received, so that a batch of the inbox
claims events up to a size, not only a count

Revision ID: 0016
Revises: 0015

A batch of the Stripe inbox holds its events' payloads in memory, parsed (about six times their JSON
text). Up to a count alone, a burst of large events (invoices with many lines) could take a batch past
the webhook server's memory limit; the inbox now stops claiming at a size too (stripe_inbox/inbox.py,
BATCH_BYTES). Rows written before this revision hold NULL: the claim measures their payload instead,
which costs a read of it, on those rows alone. The downgrade drops the column (the older code never
reads it).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("stripe_events", sa.Column("payload_bytes", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("stripe_events", "payload_bytes")
