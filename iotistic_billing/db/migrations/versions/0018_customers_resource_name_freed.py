"""customers.resource_name may be NULL: the mirror row of a customer id whose resource name another
customer id now holds stays, its name freed

Revision ID: 0018
Revises: 0017

A Customer deleted and applied again (a new uid, so a new customer id), or a signup given a deleted
Customer's name, deleted the old customer id's mirror row when the new one was remembered; the meter run
reads a period's Stripe customer from that row (usage.metering, _UNMETERED), so the old id's last
periods were never sent, with nothing said. The row now stays with a NULL resource_name (directory,
remember_all), which no lookup by name finds. A server from before this revision never writes NULL; the
downgrade deletes the rows that hold it (as that server would have) and makes the column NOT NULL again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("customers", "resource_name", existing_type=sa.String(length=253), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM customers WHERE resource_name IS NULL")
    op.alter_column("customers", "resource_name", existing_type=sa.String(length=253), nullable=False)
