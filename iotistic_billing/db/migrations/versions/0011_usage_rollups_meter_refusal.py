"""usage_rollups.meter_refused_at, meter_refusal: a period Stripe refuses no longer holds up the others

Revision ID: 0011
Revises: 0010

The meter run took the closed periods that still owed meter events oldest first, 500 a run, and sent
a period Stripe refused again on every run, with a stack trace: a meter never created, a Stripe
customer deleted, or events past the 35 days Stripe takes (Stripe not configured for a while, a
manual customer's old periods once a checkout linked it). Once 500 such periods existed no newer one
was sent. A row now keeps when Stripe last refused one of its events and what it said; the run takes
the periods never refused first, then the one refused longest ago (usage.metering), and gives a period
up once its events are past Stripe's 35 days (metered_at set, meter_refusal naming what was not
billed). Rows written before this revision hold NULL, read as never refused. A server from before this
revision writes neither column and takes the oldest first, as before; the downgrade drops them (the
older code never reads them, and leaves a given-up row alone: its metered_at is set).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_rollups", sa.Column("meter_refused_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("usage_rollups", sa.Column("meter_refusal", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("usage_rollups", "meter_refusal")
    op.drop_column("usage_rollups", "meter_refused_at")
