"""notices: a usage threshold's key names the quota it was reached against

Revision ID: 0015
Revises: 0014

A usage-threshold notice's key now ends with its quota (notices/content.usage_threshold), so that
reaching 100% of a new plan's quota within the billing period is a notice of its own. The keys written
before are given the quota their notice's facts hold: else every threshold already reached this period
would be a new key at the first flush after the upgrade, and noticed a second time. The downgrade takes
the quota off again, from one notice of each threshold (the notice key is unique); the others keep it,
a key the version before never writes.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# usage:<customer id>:<period start>:<metric>:<threshold>, and :<quota> after it since this revision.
_WITHOUT_QUOTA = r"^usage:[^:]+:[^:]+:[^:]+:[^:]+$"
_WITH_QUOTA = r"^usage:[^:]+:[^:]+:[^:]+:[^:]+:[^:]+$"


def upgrade() -> None:
    op.execute(
        f"""
        UPDATE notices SET key = key || ':' || (facts ->> 'limit')
        WHERE kind = 'usage.threshold' AND facts ? 'limit' AND key ~ '{_WITHOUT_QUOTA}'
        """  # noqa: S608 - constant patterns
    )


def downgrade() -> None:
    op.execute(
        f"""
        UPDATE notices AS notice SET key = shorter.key
        FROM (
            SELECT id, regexp_replace(key, ':[^:]+$', '') AS key,
                   row_number() OVER (PARTITION BY regexp_replace(key, ':[^:]+$', '') ORDER BY id) AS nth
            FROM notices WHERE kind = 'usage.threshold' AND key ~ '{_WITH_QUOTA}'
        ) AS shorter
        WHERE notice.id = shorter.id AND shorter.nth = 1
          AND NOT EXISTS (SELECT 1 FROM notices AS other WHERE other.key = shorter.key)
        """  # noqa: S608 - constant patterns
    )
