"""usage_rollups.billed_manually: an open period flushed while its Customer was billed manually stays
left to manual billing after the Customer moves to Stripe

Revision ID: 0017
Revises: 0016

The meter run decided by the Customer's billing mode when it closed a period. A manual Customer moving
to Stripe billing checks out mid-period: the next flush cuts its calendar-month row at the checkout
(usage.rollups, _CUT_EARLIER), and the run closed that manual-era row with the Customer Stripe-billed,
sending its overage to Stripe before the subscription's first period (on no invoice) while the admin,
seeing no "billed manually" note, invoiced it by hand neither. A flush now records on the open row
that the Customer was billed manually, and the record stays (rollups.save_rollup); the run leaves such
a period to manual billing whatever the Customer's mode at its close. Rows written before this revision
hold false: decided by the Customer's mode at close, as before. A server from before this revision
never writes the column (its rows keep false, or what a newer server wrote); the downgrade drops it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "usage_rollups",
        sa.Column("billed_manually", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("usage_rollups", "billed_manually")
