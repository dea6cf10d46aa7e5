"""usage_reports partitioned by the month of period_start; a report's key holds its period start

Revision ID: 0007
Revises: 0006

Each UTC month of period_start is a partition `usage_reports_YYYY_MM`; `usage_reports_default` takes
the reports of a month without one. Usage metering makes the months ahead and drops those past the raw
retention (iotistic_billing.usage.partitions; docs/architecture.md, "Usage reports over the years").
A unique key of a partitioned table must hold the partition key, so a report is now stored once per
(customer, instance, report id, period start), the primary key; `id` stays (it orders the reports of
one instant), without an index of its own.

The upgrade moves the rows inside the migration's transaction: the old table steps aside, the
partitioned one is made with a partition for every month that holds rows, for this month and the next
two, and the default one; the rows are copied, counted against the old table, and the old table is
dropped. Reports wait for its commit (the usage pool's statements give up after 10 s: a 503, which
instances retry); the webhook server's inserts name no key since this migration, so they work before and
after it (a server from before it named the old constraint: docs/architecture.md). The
downgrade does the reverse, and refuses (changing nothing) while reports share a (customer, instance,
report id) in different periods, which 0006's key holds once: it would have to discard billed reports.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The columns in the table's order; both tables have them, with the same types.
COLUMNS = (
    "id",
    "customer_id",
    "instance_id",
    "report_id",
    "period_start",
    "period_end",
    "active_devices",
    "total_devices",
    "mqtt_messages_published",
    "mqtt_messages_received",
    "mqtt_bytes_sent",
    "mqtt_bytes_received",
    "http_requests",
    "http_bytes_sent",
    "http_bytes_received",
    "postgres_size_mb",
    "postgres_row_count",
    "reported_at",
)
# Months made ahead of the current one (usage metering keeps making them; these cover the first days).
MONTHS_AHEAD = 2


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column(
            "id",
            sa.BigInteger(),
            server_default=sa.text("nextval('usage_reports_id_seq'::regclass)"),
            nullable=False,
        ),
        sa.Column("customer_id", sa.String(length=40), nullable=False),
        sa.Column("instance_id", sa.String(length=100), nullable=False),
        sa.Column("report_id", sa.String(length=100), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("active_devices", sa.Integer(), nullable=False),
        sa.Column("total_devices", sa.Integer(), nullable=False),
        sa.Column("mqtt_messages_published", sa.BigInteger(), nullable=False),
        sa.Column("mqtt_messages_received", sa.BigInteger(), nullable=False),
        sa.Column("mqtt_bytes_sent", sa.BigInteger(), nullable=False),
        sa.Column("mqtt_bytes_received", sa.BigInteger(), nullable=False),
        sa.Column("http_requests", sa.BigInteger(), nullable=False),
        sa.Column("http_bytes_sent", sa.BigInteger(), nullable=False),
        sa.Column("http_bytes_received", sa.BigInteger(), nullable=False),
        sa.Column("postgres_size_mb", sa.Numeric(precision=14, scale=3), nullable=False),
        sa.Column("postgres_row_count", sa.BigInteger(), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    ]


def _next_month(month: datetime) -> datetime:
    return month.replace(year=month.year + month.month // 12, month=month.month % 12 + 1)


def _copy_rows(source: str, target: str) -> None:
    """Every row of `source` into `target`, counted: a migration that would lose a row fails."""
    columns = ", ".join(COLUMNS)
    bind = op.get_bind()
    # Table names and columns are this module's constants.
    bind.execute(sa.text(f"INSERT INTO {target} ({columns}) SELECT {columns} FROM {source} ORDER BY id"))  # noqa: S608
    expected = bind.execute(sa.text(f"SELECT count(*) FROM {source}")).scalar_one()  # noqa: S608
    copied = bind.execute(sa.text(f"SELECT count(*) FROM {target}")).scalar_one()  # noqa: S608
    if copied != expected:
        raise RuntimeError(f"{target} holds {copied} rows after the copy, {expected} expected from {source}")


def upgrade() -> None:
    bind = op.get_bind()
    op.rename_table("usage_reports", "usage_reports_0006")
    # Index names are the schema's: those the new table takes go with the old table's keys.
    op.drop_constraint("usage_reports_pkey", "usage_reports_0006", type_="primary")
    op.drop_index("ix_usage_reports_customer_period", table_name="usage_reports_0006")
    op.drop_index("ix_usage_reports_reported_at", table_name="usage_reports_0006")

    op.create_table("usage_reports", *_columns(), postgresql_partition_by="RANGE (period_start)")
    months = bind.execute(
        sa.text(
            "SELECT DISTINCT date_trunc('month', period_start AT TIME ZONE 'UTC') FROM usage_reports_0006"
            " UNION SELECT date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => ahead)"
            " FROM generate_series(0, :ahead) AS ahead"
        ),
        {"ahead": MONTHS_AHEAD},
    ).scalars()
    for naive in sorted(months):
        month = naive.replace(tzinfo=UTC)
        # Named and bounded as iotistic_billing.usage.partitions makes them.
        op.execute(
            f"CREATE TABLE usage_reports_{month:%Y_%m} PARTITION OF usage_reports"
            f" FOR VALUES FROM ('{month.isoformat()}') TO ('{_next_month(month).isoformat()}')"
        )
    op.execute("CREATE TABLE usage_reports_default PARTITION OF usage_reports DEFAULT")
    _copy_rows("usage_reports_0006", "usage_reports")

    # Keys and indexes after the copy: each partition's built once, in bulk.
    op.create_primary_key(
        "usage_reports_pkey", "usage_reports", ["customer_id", "instance_id", "report_id", "period_start"]
    )
    op.create_index("ix_usage_reports_customer_period", "usage_reports", ["customer_id", "period_start"])
    op.create_index("ix_usage_reports_reported_at", "usage_reports", ["reported_at"])
    op.execute("ALTER SEQUENCE usage_reports_id_seq OWNED BY usage_reports.id")
    op.drop_table("usage_reports_0006")


def downgrade() -> None:
    repeated = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT count(*) - count(DISTINCT (customer_id, instance_id, report_id)) FROM usage_reports"
            )
        )
        .scalar_one()
    )
    if repeated:
        raise RuntimeError(
            f"{repeated} usage reports repeat the (customer_id, instance_id, report_id) of another in an"
            " earlier period; revision 0006 holds each once, so downgrading would discard them. Nothing"
            " changed; delete those rows first if that is what you mean"
        )
    op.rename_table("usage_reports", "usage_reports_0007")
    op.drop_constraint("usage_reports_pkey", "usage_reports_0007", type_="primary")
    op.drop_index("ix_usage_reports_customer_period", table_name="usage_reports_0007")
    op.drop_index("ix_usage_reports_reported_at", table_name="usage_reports_0007")

    op.create_table(
        "usage_reports",
        *_columns(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("customer_id", "instance_id", "report_id", name="uq_usage_reports_report"),
    )
    _copy_rows("usage_reports_0007", "usage_reports")
    op.create_index("ix_usage_reports_customer_period", "usage_reports", ["customer_id", "period_start"])
    op.create_index("ix_usage_reports_reported_at", "usage_reports", ["reported_at"])
    op.execute("ALTER SEQUENCE usage_reports_id_seq OWNED BY usage_reports.id")
    # The partitioned table goes with its partitions, those usage metering made too.
    op.drop_table("usage_reports_0007")
