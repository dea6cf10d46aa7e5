"""subscriptions.own_event_created, invoice_event_created: a subscription's own events ordered apart
from its invoices'

Revision ID: 0010
Revises: 0009

Stripe sends an upgrade's customer.subscription.updated and the invoice events of the same moment in no
set order. The row's last_event_created is the newest of both kinds, so an invoice applied first made
the upgrade stale and the Customer kept its old plan until the subscription's next event. The row now
keeps the time of the newest of its own events and of its invoices' too
(stripe_inbox.events._own_event_under_invoices). Rows written before this revision hold NULL, read as
unknown: a late own event is stale there, as before, until the subscription's next events write the
columns. An inbox from before this revision writes neither, so a row it moves on has a newest state
that is neither time, and is read as unknown too: inboxes of both sides may run together during an
upgrade. The downgrade drops them (the older code never reads them).
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
    op.add_column("subscriptions", sa.Column("invoice_event_created", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("subscriptions", "invoice_event_created")
    op.drop_column("subscriptions", "own_event_created")
