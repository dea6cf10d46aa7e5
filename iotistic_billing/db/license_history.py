"""Audit history of licences in PostgreSQL: one row per (customer, jti, action), never the token or a key."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import Table, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.db.models import LICENSE_ACTIONS, LicenseHistory
from iotistic_billing.licensing.minting import LicenseRecord, MintedLicense

# Anything shaped like a JWT or a PEM block: metadata is free-form, so it is the one way a token or a
# key could slip into a row.
_SECRET_SHAPES: Final = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*|-----BEGIN [A-Z ]+-----")


# The reason of the revocation a Customer's deletion records when no other Customer holds its customer id
# (operator/delete.py): when the id was left, for a subscription still billing it (deleted_at).
DELETION_REASON: Final = "Customer deleted"

# Held by a revoke from its history row to its commit (webhook_server/licenses.py), and by the operator
# deciding the notice of the suspension the revoke's patch starts: that decision waits for the revoke's
# row to be committed or rolled back.
REVOCATION_LOCK: Final = 0x7265766B


async def hold_revocations(session: AsyncSession, customer_id: str) -> None:
    """The customer's revocation lock, until the end of `session`'s transaction."""
    await session.execute(select(func.pg_advisory_xact_lock(REVOCATION_LOCK, func.hashtext(customer_id))))


async def revoke_recorded(session: AsyncSession, customer_id: str, jti: str) -> bool:
    """Whether the revoke of the customer's licence `jti` is recorded (its row, and so its notice), once
    any revoke of the customer in flight has committed or rolled back (hold_revocations)."""
    await hold_revocations(session, customer_id)
    found = await session.scalar(
        select(LicenseHistory.id)
        .where(
            LicenseHistory.customer_id == customer_id,
            LicenseHistory.jti == jti,
            LicenseHistory.action == "revoked",
        )
        .limit(1)
    )
    return found is not None


async def deleted_at(session: AsyncSession, customer_ids: Iterable[str]) -> dict[str, datetime]:
    """When each customer id's last Customer was deleted, as its licence's revocation recorded it
    (DELETION_REASON), by customer id; an id whose deletion revoked no licence (none was minted) is absent."""
    wanted = sorted(set(customer_ids))
    if not wanted:
        return {}
    found = await session.execute(
        select(LicenseHistory.customer_id, func.max(LicenseHistory.generated_at))
        .where(
            LicenseHistory.customer_id.in_(wanted),
            LicenseHistory.action == "revoked",
            LicenseHistory.metadata_["reason"].astext == DELETION_REASON,
        )
        .group_by(LicenseHistory.customer_id)
    )
    return {customer_id: at for customer_id, at in found}


# One statement for every row, its values bound: built at each call, SQLAlchemy's statement building,
# cache keys and ORM bulk path took most of a new Customer's database CPU in the operator
# (bench/README.md, reconcile).
_HISTORY = cast(Table, LicenseHistory.__table__)
_HISTORY_ROW: Final = (
    insert(_HISTORY)
    .on_conflict_do_nothing(constraint="uq_license_history_jti_action")
    .returning(_HISTORY.c.id)
)


@dataclass(frozen=True, slots=True)
class LicenseHistoryReport:
    customer_id: str
    history: list[LicenseHistory]  # newest first
    statistics: dict[str, Any]


async def record_license(
    session: AsyncSession,
    license: MintedLicense | LicenseRecord,
    action: str,
    metadata: Mapping[str, Any] | None = None,
) -> bool:
    """Write one history row; False when this (customer, jti, action) was already recorded.

    Idempotent through the table's unique constraint, so a reconcile step retried after a crash
    cannot write the same fact twice. The caller owns the transaction.
    """
    if action not in LICENSE_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(LICENSE_ACTIONS)}, got {action!r}")
    extra = dict(metadata or {})
    if _SECRET_SHAPES.search(json.dumps(extra, default=str)):
        raise ValueError("metadata must not carry a token or a key")
    record = license.record() if isinstance(license, MintedLicense) else license
    row = {**LicenseHistory.columns_of(record), "action": action, "metadata": extra}
    result = await session.execute(_HISTORY_ROW, row)
    return result.scalar_one_or_none() is not None


async def license_history(
    session: AsyncSession,
    customer_id: str,
    limit: int = 100,
    before: tuple[datetime, int] | None = None,
) -> LicenseHistoryReport:
    """The newest `limit` rows of a customer, those after the row at `before` (its generated_at and id:
    a keyset, which rows written since do not move) when given, and the earlier system's statistics
    over all of its rows."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    query = select(LicenseHistory).where(LicenseHistory.customer_id == customer_id)
    if before is not None:
        query = query.where(tuple_(LicenseHistory.generated_at, LicenseHistory.id) < before)
    rows = (
        await session.scalars(
            # Rows written in one transaction share now(): the id breaks the tie in insertion order.
            query.order_by(LicenseHistory.generated_at.desc(), LicenseHistory.id.desc()).limit(limit)
        )
    ).all()
    counts = await session.execute(
        select(LicenseHistory.action, LicenseHistory.plan, func.count())
        .where(LicenseHistory.customer_id == customer_id)
        .group_by(LicenseHistory.action, LicenseHistory.plan)
    )
    by_action: dict[str, int] = {}
    by_plan: dict[str, int] = {}
    for action, plan, count in counts:
        by_action[action] = by_action.get(action, 0) + count
        by_plan[plan] = by_plan.get(plan, 0) + count
    return LicenseHistoryReport(
        customer_id=customer_id,
        history=list(rows),
        statistics={"totalGenerations": sum(by_action.values()), "byAction": by_action, "byPlan": by_plan},
    )


async def recorded_license(
    session: AsyncSession, customer_id: str, jti: str
) -> tuple[LicenseRecord, bool] | None:
    """The customer's licence `jti` as the history recorded it, and whether it is revoked; None when the
    history has no row of it, or when a licence was reinstated after its last row (what happened to it
    then is history, not the state a revoke's retry finds)."""
    rows = (
        await session.scalars(
            select(LicenseHistory)
            .where(LicenseHistory.customer_id == customer_id, LicenseHistory.jti == jti)
            .order_by(LicenseHistory.id)
        )
    ).all()
    if not rows:
        return None
    reinstated = select(LicenseHistory.id).where(
        LicenseHistory.customer_id == customer_id,
        LicenseHistory.action == "reinstated",
        LicenseHistory.id > rows[-1].id,
    )
    if await session.scalar(reinstated.limit(1)) is not None:
        return None
    return rows[0].record(), any(row.action == "revoked" for row in rows)


__all__ = [
    "DELETION_REASON",
    "LicenseHistoryReport",
    "deleted_at",
    "license_history",
    "record_license",
    "recorded_license",
]
