"""subscriptions.own_event_created: a subscription's own events ordered apart from its invoices'

Revision ID: 0010
Revises: 0009

Stripe sends an upgrade's customer.subscription.updated and the invoice events of the same moment in no
set order. The row's last_event_created is the newest of both kinds, so an invoice applied first made
the upgrade stale and the Customer kept its old plan until the subscription's next event. The row now
keeps the time of the newest of its own events too (stripe_inbox.events._own_event_under_invoices).
Rows written before this revision hold NULL, read as unknown: a late own event is stale there, as
before, until the subscription's next own event writes the column. An inbox from before this revision
writes no such column, so a row it moves on keeps a value now too old (docs/architecture.md: do not run
inboxes of both sides together); the downgrade drops it (the older code never reads it).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("subscriptions", sa.Column("own_event_created", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("subscriptions", "own_event_created")
