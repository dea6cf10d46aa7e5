"""SQLAlchemy models of the records the Customer resource does not hold (docs/architecture.md, "Tables")."""

from __future__ import annotations

import re
from dataclasses import fields
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    Sequence,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    or_,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from iotistic_billing.licensing.minting import LicenseRecord

LICENSE_ACTIONS = ("generated", "renewed", "upgraded", "downgraded", "suspended", "revoked", "reinstated")


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


class Customer(Base):
    """Mirror of the Customer resources, for queries the API server cannot answer (lists, joins)."""

    __tablename__ = "customers"

    customer_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # NULL: the Customer was deleted and its name is another customer id's now; the row stays, as the
    # meter run reads its Stripe customer for the periods still owed (migration 0018).
    resource_name: Mapped[str | None] = mapped_column(String(253), unique=True)
    email: Mapped[str] = mapped_column(String(320))
    company_name: Mapped[str] = mapped_column(String(200))
    contact_name: Mapped[str | None] = mapped_column(String(200))
    plan: Mapped[str] = mapped_column(String(20))
    phase: Mapped[str | None] = mapped_column(String(20))
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class Subscription(Base):
    """Last known Stripe subscription state per customer; `last_event_created` orders webhook events."""

    __tablename__ = "subscriptions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(40), index=True)
    stripe_subscription_id: Mapped[str] = mapped_column(String(255), unique=True)
    status: Mapped[str] = mapped_column(String(40))
    plan: Mapped[str | None] = mapped_column(String(20))
    current_period_end: Mapped[datetime | None]
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    last_event_created: Mapped[int] = mapped_column(BigInteger)
    # When Stripe created the subscription (its `created`): of a customer's live ones the newest wins.
    stripe_created: Mapped[int | None] = mapped_column(BigInteger)
    # The pastDueSince this row's state carries (spec.subscription's, when the Customer holds it): what a
    # lost batch of the Stripe inbox is decided again from (stripe_inbox.events.committed_subscription).
    past_due_since: Mapped[datetime | None]
    # The `created` of the newest of the subscription's own events, and of its invoices' (0: none yet):
    # a plan change delivered after a newer invoice still applies (stripe_inbox.events, migration 0010).
    own_event_created: Mapped[int | None] = mapped_column(BigInteger)
    invoice_event_created: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class LicenseHistory(Base):
    """Audit trail of every licence issued or revoked: the JWT's SHA-256, never the JWT or a key."""

    __tablename__ = "license_history"
    __table_args__ = (
        CheckConstraint(
            "action IN (" + ", ".join(f"'{a}'" for a in LICENSE_ACTIONS) + ")", name="license_history_action"
        ),
        Index("ix_license_history_customer_generated", "customer_id", "generated_at"),
        # One row per (customer, jti, action): a retried step cannot write the same fact twice.
        UniqueConstraint("customer_id", "jti", "action", name="uq_license_history_jti_action"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(20))
    plan: Mapped[str] = mapped_column(String(20))
    max_devices: Mapped[int] = mapped_column(Integer)
    license_hash: Mapped[str] = mapped_column(String(64))
    jti: Mapped[str] = mapped_column(String(64))
    kid: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    features: Mapped[dict[str, Any]]
    limits: Mapped[dict[str, Any]]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
    generated_at: Mapped[datetime] = mapped_column(server_default=func.now())

    # A row is a LicenseRecord (its columns carry the record's field names) plus the action and when.
    @staticmethod
    def columns_of(record: LicenseRecord) -> dict[str, Any]:
        columns = {field.name: getattr(record, field.name) for field in fields(LicenseRecord)}
        return {**columns, "features": dict(record.features), "limits": dict(record.limits)}

    def record(self) -> LicenseRecord:
        return LicenseRecord(**{field.name: getattr(self, field.name) for field in fields(LicenseRecord)})


class UsageReport(Base):
    """One usage report of an instance, stored once: its key is (customer, instance, report id, period
    start). Partitioned by the UTC month of period_start (`usage_reports_YYYY_MM`, and
    `usage_reports_default` for a month without one): usage metering makes and drops the partitions
    (usage.partitions; docs/architecture.md, "Usage reports over the years")."""

    __tablename__ = "usage_reports"
    __table_args__ = (
        # A partitioned table's unique keys hold its partition key: a report sent again is the same
        # report, period included (the report id alone was the key before migration 0007).
        PrimaryKeyConstraint(
            "customer_id", "instance_id", "report_id", "period_start", name="usage_reports_pkey"
        ),
        Index("ix_usage_reports_customer_period", "customer_id", "period_start"),
        # The console's overview counts the last hour's reports: without it, a scan of every report.
        Index("ix_usage_reports_reported_at", "reported_at"),
        {"postgresql_partition_by": "RANGE (period_start)"},
    )

    # Orders the reports of one instant (newest first); no index of its own.
    id: Mapped[int] = mapped_column(BigInteger, Sequence("usage_reports_id_seq"))
    customer_id: Mapped[str] = mapped_column(String(40))
    instance_id: Mapped[str] = mapped_column(String(100))
    report_id: Mapped[str] = mapped_column(String(100))
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    active_devices: Mapped[int] = mapped_column(Integer, default=0)
    total_devices: Mapped[int] = mapped_column(Integer, default=0)
    mqtt_messages_published: Mapped[int] = mapped_column(BigInteger, default=0)
    mqtt_messages_received: Mapped[int] = mapped_column(BigInteger, default=0)
    mqtt_bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    mqtt_bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    http_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    http_bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    http_bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    postgres_size_mb: Mapped[Decimal] = mapped_column(Numeric(14, 3), default=Decimal(0))
    postgres_row_count: Mapped[int] = mapped_column(BigInteger, default=0)
    reported_at: Mapped[datetime] = mapped_column(server_default=func.now())


# The partitions of usage_reports, which the models do not declare (Alembic's comparisons leave them out).
USAGE_REPORT_PARTITION: Final = re.compile(r"usage_reports_(?:\d{4}_\d{2}|default)")


class UsageRollup(Base):
    """Usage summed per customer and billing period, with the overage computed from it."""

    __tablename__ = "usage_rollups"
    __table_args__ = (
        UniqueConstraint("customer_id", "period_start", name="uq_usage_rollups_period"),
        # The meter run's work list: closed periods whose Stripe meter events are not all recorded.
        Index("ix_usage_rollups_unmetered", "period_end", postgresql_where=text("metered_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(40))
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    totals: Mapped[dict[str, Any]]
    overage: Mapped[dict[str, Any]]
    overage_amount_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())
    # The plan whose included usage the overage is computed against: the effective plan when last rolled
    # up, or the paid plan the period held before a lapse to a plan not billed (rollups.period_plan).
    plan: Mapped[str | None] = mapped_column(String(20))
    # Set once the period has ended and was rolled up for the last time; a closed rollup never changes.
    closed_at: Mapped[datetime | None]
    # Set once the meter run is done with the period: every meter event recorded, nothing to send, or
    # the rest past Stripe's 35 days (given up; meter_refusal says what was not billed).
    metered_at: Mapped[datetime | None]
    # When Stripe last refused one of the period's meter events: the meter run takes the periods never
    # refused first, then the one refused longest ago, so refused periods never hold up the others.
    meter_refused_at: Mapped[datetime | None]
    # What Stripe said last (metric, HTTP status, message), or what was given up; NULL once all recorded.
    meter_refusal: Mapped[str | None] = mapped_column(Text)
    # Whether a flush of the open period saw its Customer billed manually (spec.billing.mode: manual):
    # the period is then never sent to Stripe, even once the Customer bills through Stripe (a checkout
    # cuts the manual-era row short). Never cleared; false on rows from before migration 0017.
    billed_manually: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class UsageCatchUp(Base):
    """One row: PostgreSQL's time up to which meter runs flushed every customer whose stored reports no
    rollup held, a span at a time (usage.rollups.catch_up_spans); the next run looks back to it."""

    __tablename__ = "usage_catch_up"
    __table_args__ = (CheckConstraint("id = 1", name="ck_usage_catch_up_one_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default=text("1"))
    caught_up_at: Mapped[datetime]


class UsageMeterEvent(Base):
    """A Stripe Billing meter event Stripe accepted: one per customer, period and metric, written only
    after Stripe's answer, so a crash in between re-sends the same identifier (Stripe deduplicates it)."""

    __tablename__ = "usage_meter_events"
    __table_args__ = (Index("ix_usage_meter_events_period", "customer_id", "period_start"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(40))
    period_start: Mapped[datetime]
    metric: Mapped[str] = mapped_column(String(40))
    # `<customer id>:<period start>:<metric>` (metering.meter_identifier): the event's identifier at Stripe.
    identifier: Mapped[str] = mapped_column(String(200), unique=True)
    value: Mapped[str] = mapped_column(Text)
    # The identifier as Stripe echoed it.
    stripe_event_identifier: Mapped[str | None] = mapped_column(String(255))
    sent_at: Mapped[datetime] = mapped_column(server_default=func.now())


class StripeEvent(Base):
    """Every Stripe event id seen, once: a repeated delivery finds its row and changes nothing.

    It is also the inbox: a verified event is stored `pending` with its payload before the 2xx, and
    applied after it; `result` then says what applying it did.
    """

    __tablename__ = "stripe_events"
    __table_args__ = (
        Index(
            "ix_stripe_events_pending", "created", "received_at", postgresql_where=text("result = 'pending'")
        ),
    )

    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    created: Mapped[int] = mapped_column(BigInteger)
    customer_id: Mapped[str | None] = mapped_column(String(40))
    result: Mapped[str] = mapped_column(String(40))
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    payload: Mapped[dict[str, Any] | None]
    # Of the JSON text as received (NULL for rows stored before migration 0016): a batch's size.
    payload_bytes: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    applied_at: Mapped[datetime | None]


class Notice(Base):
    """A notice to a customer (and the platform team): one row per idempotency key, written in the
    transaction of the fact that causes it (the outbox); its deliveries carry the sending state."""

    __tablename__ = "notices"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    customer_id: Mapped[str] = mapped_column(String(40), index=True)
    # The Customer resource's name: its namespace holds the customer's webhook secret.
    customer_name: Mapped[str] = mapped_column(String(63))
    subject: Mapped[str] = mapped_column(Text)
    # What the templates and the webhook body say: the facts of the notice, as JSON.
    facts: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class NoticeDelivery(Base):
    """One notice to one target (an address, an endpoint): pending until sent, dead after the last try.
    `message_id` is the email's Message-ID and the webhook's webhook-id, the same on every try (a mail
    sent again after it arrived gets one of its own: notices/log.py)."""

    __tablename__ = "notice_deliveries"
    __table_args__ = (
        UniqueConstraint("notice_id", "channel", "target", name="uq_notice_deliveries_target"),
        CheckConstraint("status IN ('pending', 'sent', 'dead')", name="notice_deliveries_status"),
        # The sender's claim order, so a claim reads the first entry (migration 0009).
        Index(
            "ix_notice_deliveries_due", "next_attempt_at", "id", postgresql_where=text("status = 'pending'")
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    notice_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("notices.id", ondelete="CASCADE"))
    # email, webhook (the customer's endpoint) or platform (NOTIFY_WEBHOOK_URL).
    channel: Mapped[str] = mapped_column(String(20))
    target: Mapped[str] = mapped_column(Text)
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(10), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]


class ConsoleAction(Base):
    """Who did what, when, in the admin console (one on a Customer also an Event on it)."""

    __tablename__ = "console_actions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    role: Mapped[str] = mapped_column(String(10))
    action: Mapped[str] = mapped_column(String(40))
    customer_name: Mapped[str | None] = mapped_column(String(63), index=True)
    target: Mapped[str | None] = mapped_column(String(255), index=True)
    detail: Mapped[str] = mapped_column(Text)


class ConsoleSignout(Base):
    """A console session signed out before its end: its cookie, copied or not, opens nothing any more.
    Kept until the session's own end (console/session.py), then deleted by a later sign-out."""

    __tablename__ = "console_signouts"

    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ApiKey(Base):
    """Instance usage keys, stored as SHA-256 hashes only."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(40), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    purpose: Mapped[str] = mapped_column(String(20), default="usage")
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # Set ahead of now for a key replaced by a new one (api_keys.ROTATION_GRACE): it works until then.
    revoked_at: Mapped[datetime | None]

    @classmethod
    def live(cls) -> ColumnElement[bool]:
        """The keys that still work: never revoked, or revoked at a time still to come."""
        return or_(cls.revoked_at.is_(None), cls.revoked_at > func.now())


__all__ = [
    "LICENSE_ACTIONS",
    "USAGE_REPORT_PARTITION",
    "ApiKey",
    "Base",
    "ConsoleAction",
    "ConsoleSignout",
    "Customer",
    "LicenseHistory",
    "Notice",
    "NoticeDelivery",
    "StripeEvent",
    "Subscription",
    "UsageMeterEvent",
    "UsageReport",
    "UsageRollup",
]
