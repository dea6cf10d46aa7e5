"""subscriptions.stripe_created: of a customer's live subscriptions the newest wins

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("subscriptions", sa.Column("stripe_created", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("subscriptions", "stripe_created")
