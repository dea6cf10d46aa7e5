"""console_actions.target indexed: the Stripe event's and the rollouts page's actions are read by it

Revision ID: 0012
Revises: 0011

The console shows the actions on a Stripe event (its replays) and on each rollout (pause, resume,
abort), read by `target`; the rollouts page reads them every 2 s while it is open, and the table only
grows, so without an index each read scanned it. A server from before this revision never reads by
target and is unaffected; the downgrade drops the index.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_console_actions_target", "console_actions", ["target"])


def downgrade() -> None:
    op.drop_index("ix_console_actions_target", table_name="console_actions")
