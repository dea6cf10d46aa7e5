"""The licence step: mint only when the grants changed or renewal is due, write the Secret, record history.

Order matters for crash safety: the Secret is written before the history row and the usage key's row,
and the row's action is kept on the Secret, so a pass that crashed in between (or whose transaction
PostgreSQL refused) records the very same rows later, also when that licence is being replaced by then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, cast

import jwt
from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.api_keys import ROTATION_GRACE, new_usage_key, usage_key_hash
from iotistic_billing.customer import (
    LICENSE_JWT_KEY,
    LICENSE_SECRET_NAME,
    REVOKED_LICENSE,
    USAGE_API_KEY_KEY,
    CustomerSpec,
    LicenseStatus,
)
from iotistic_billing.db.license_history import record_license, revoke_recorded
from iotistic_billing.db.models import LICENSE_ACTIONS, ApiKey, LicenseHistory
from iotistic_billing.directory import remember
from iotistic_billing.k8s import SecretData
from iotistic_billing.licensing.minting import (
    SIGNATURE_ONLY,
    LicenseCustomer,
    LicenseRecord,
    MintedLicense,
    MintingError,
    SubscriptionTerms,
    TrialTerms,
    claims_differ,
    issued_ahead,
    license_claims,
    mint_license,
    renewal_due,
)
from iotistic_billing.licensing.plans import Plan, plan_by_name, restricted
from iotistic_billing.notices.content import (
    Notice,
    NoticeKind,
    access_restricted,
    license_changed,
    trial_ended,
)
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.entitlement import Entitlement, capped_at_end, license_action
from iotistic_billing.operator.manifests import license_secret_manifest
from iotistic_billing.operator.metrics import LICENSE_ENDS_BY_DESIGN, LICENSES_MINTED
from iotistic_billing.operator.refusals import refused_as
from iotistic_billing.operator.state import PassTarget

log = logging.getLogger(__name__)


def _terms(entitlement: Entitlement) -> tuple[TrialTerms, SubscriptionTerms]:
    return (
        TrialTerms(entitlement.trial_active, entitlement.trial_ends_at if entitlement.trial_active else None),
        SubscriptionTerms(
            entitlement.subscription_status,
            entitlement.subscription_period_end,
            entitlement.cancel_at_period_end,
        ),
    )


def licensed_plan(entitlement: Entitlement) -> Plan:
    """The plan the licence carries: the entitlement's, read-only while a payment is overdue."""
    plan = plan_by_name(entitlement.plan, allow_unlicensed=True)
    return restricted(plan) if entitlement.restricted else plan


def desired_claims(ctx: OperatorContext, target: PassTarget) -> dict[str, Any]:
    trial, subscription = _terms(target.entitlement)
    return license_claims(
        customer=LicenseCustomer(target.customer_id, target.spec.company_name),
        plan=licensed_plan(target.entitlement),
        trial=trial,
        subscription=subscription,
        now=target.now,
        issuer=ctx.settings.license_issuer,
        audience=ctx.settings.license_audience,
        jti="desired",
        lifetime=ctx.settings.lifetime,
    )


def verified_claims(ctx: OperatorContext, token: str | None) -> dict[str, Any] | None:
    """The token's claims when it is ours (signed by a key that still verifies, for instances); None when
    it is absent, tampered, malformed or signed by a key no longer trusted."""
    if token is None:
        return None
    try:
        header = jwt.get_unverified_header(token)
        claims: dict[str, Any] = jwt.decode(
            token,
            ctx.keys.verification_keys[header.get("kid", "")],
            algorithms=["RS256"],
            audience=ctx.settings.license_audience,
            # Only "is it ours, for instances" matters here; its times are judged by renewal_due.
            options=SIGNATURE_ONLY,
        )
    except (jwt.InvalidTokenError, KeyError):
        return None
    return claims


def needs_new_license(
    current: dict[str, Any] | None, desired: dict[str, Any], entitlement: Entitlement, now: datetime
) -> bool:
    """`current`: the Secret's licence claims when the token is ours (verified_claims), else None."""
    if current is None:
        return True
    if claims_differ(current, desired):
        return True
    issued, expires = (datetime.fromtimestamp(current[k], now.tzinfo) for k in ("iat", "exp"))
    if issued_ahead(issued, now):
        return True
    return renewal_due(expires, issued, now) and not capped_at_end(entitlement, expires)


def _status(record: LicenseRecord) -> LicenseStatus:
    return LicenseStatus(
        secret_name=LICENSE_SECRET_NAME,
        jti=record.jti,
        key_id=record.kid,
        issued_at=record.issued_at,
        expires_at=record.expires_at,
        sha256=record.license_hash,
    )


async def ensure_license(
    ctx: OperatorContext, target: PassTarget, existing: SecretData | None
) -> LicenseStatus:
    """`existing`: the current licence Secret (None when there is none). The Secret's write refused by
    the API server (an admission policy, RBAC) raises refusals.Refused, nothing recorded."""
    data, annotations = (existing.data, existing.annotations) if existing is not None else ({}, {})
    # An edited value that is not UTF-8 is as good as a tampered token: replaced, not retried forever.
    token = data[LICENSE_JWT_KEY].decode(errors="replace") if LICENSE_JWT_KEY in data else None
    previous = _readable(token)
    if previous is not None and previous.customer_id != target.customer_id:
        # Another customer's Secret (a Customer made again under a new id over its predecessor's): its
        # licence is not this Customer's previous one, nor its usage key or suspension this Customer's.
        data, annotations, token, previous = {}, {}, None, None
    stored_key = data.get(USAGE_API_KEY_KEY, b"").decode(errors="replace")
    usage_key = stored_key or new_usage_key()
    current = verified_claims(ctx, token)
    reported = target.customer.status.license
    # Ours, in the Secret, and not what the last completed pass reported: its pass may have ended before
    # its history row and its usage key's row were written (a crash, PostgreSQL away).
    unrecorded = (
        current is not None and previous is not None and (reported is None or reported.jti != previous.jti)
    )
    written_action = annotations.get(c.ANNOTATION_LICENSE_ACTION, "generated")

    # A Secret whose usage key was taken out (by hand) gets a new licence and key, as a deleted one does:
    # the exporter's Pod, which takes the key by secretKeyRef, could not start again without it.
    if (
        previous is not None
        and stored_key
        and not needs_new_license(current, desired_claims(ctx, target), target.entitlement, target.now)
    ):
        if unrecorded:
            # Both inserts are idempotent: written now if that pass did not.
            async with ctx.sessions() as session, session.begin():
                await _record(ctx, session, target, previous, written_action)
                if stored_key:
                    await _record_usage_key(session, target.customer_id, target.name, stored_key)
        if target.customer_id not in ctx.mirrored:
            await _mirror(ctx, target)
        return _reported(target, _status(previous))

    if unrecorded:
        assert previous is not None
        # Being replaced (the spec changed meanwhile, or renewal came due): recorded first, so that the
        # history holds every licence an instance may have held.
        async with ctx.sessions() as session, session.begin():
            await _record(ctx, session, target, previous, written_action)
    action = license_action(
        previous.plan if previous else None,
        previous_suspended(annotations),
        target.entitlement,
        previous_restricted=previous is not None and _read_only(previous),
    )
    trial, subscription = _terms(target.entitlement)
    minted: MintedLicense = mint_license(
        customer=LicenseCustomer(target.customer_id, target.spec.company_name),
        plan=licensed_plan(target.entitlement),
        trial=trial,
        subscription=subscription,
        now=target.now,
        keys=ctx.keys,
        issuer=ctx.settings.license_issuer,
        audience=ctx.settings.license_audience,
        lifetime=ctx.settings.lifetime,
    )
    with refused_as(f"to apply Secret {target.namespace}/{LICENSE_SECRET_NAME}"):
        await ctx.kube.apply(
            license_secret_manifest(
                namespace=target.namespace,
                name=target.name,
                customer_id=target.customer_id,
                owner=target.owner,
                action=action,
                suspended=target.entitlement.suspended,
                token=minted.token,
                public_key_pem=ctx.keys.public_key_pem(),
                usage_key=usage_key,
            )
        )
    metadata = {
        "oldPlan": previous.plan if previous else None,
        "newPlan": minted.plan,
        "reason": target.entitlement.reason,
    }
    async with ctx.sessions() as session, session.begin():
        await _record(ctx, session, target, minted.record(), action, metadata, replaced=previous)
        LICENSES_MINTED.labels(action).inc()
        await _record_usage_key(session, target.customer_id, target.name, usage_key)
        # The directory's mirror row: the Stripe inbox and usage metering then find a Customer made by
        # kubectl or GitOps by its ids with one GET, not a list of the fleet (directory.py).
        await remember(session, target.customer, target.customer_id)
    ctx.mirrored.add(target.customer_id)
    return _reported(target, _status(minted.record()))


def _reported(target: PassTarget, status: LicenseStatus) -> LicenseStatus:
    """`status`, its licence's end exported as by design or not: the expiry alert is for a licence the
    operator failed to renew, not one that ends with a trial or a subscription set to cancel."""
    capped = status.expires_at is not None and capped_at_end(target.entitlement, status.expires_at)
    LICENSE_ENDS_BY_DESIGN.labels(target.customer_id).set(1 if capped else 0)
    return status


def previous_suspended(annotations: Mapping[str, str]) -> bool:
    """Whether the licence Secret with these annotations holds a licence minted under a suspension (one
    written before ANNOTATION_LICENSE_SUSPENDED says so by its action)."""
    return (
        annotations.get(c.ANNOTATION_LICENSE_SUSPENDED) == "true"
        or annotations.get(c.ANNOTATION_LICENSE_ACTION) == "suspended"
    )


async def _mirror(ctx: OperatorContext, target: PassTarget) -> None:
    """The directory's mirror row of a Customer whose licence is current, once per process: an earlier
    operator version minted without writing it. Not a step the pass fails on: with PostgreSQL away the
    Customer stays as it is, and the next pass writes it."""
    try:
        async with ctx.sessions() as session, session.begin():
            await remember(session, target.customer, target.customer_id)
    except (SQLAlchemyError, OSError) as error:
        log.warning("mirror row of Customer %s not written: %s", target.name, error)
        return
    ctx.mirrored.add(target.customer_id)


async def _record(
    ctx: OperatorContext,
    session: AsyncSession,
    target: PassTarget,
    record: LicenseRecord,
    action: str,
    metadata: dict[str, Any] | None = None,
    replaced: LicenseRecord | None = None,
) -> None:
    """The history row of a licence, and in the same transaction the notice its action gives (so a
    crash that loses the row loses the notice with it, and the pass that records it later sends it).
    `replaced`: the licence it replaces (license_notice)."""
    if not await record_license(session, record, action, metadata):
        # Its row, and so its notice or the decision to send none, committed already: a retry does not
        # know the replaced licence and would send what that pass held back.
        return
    revoke_told = False
    if action == "suspended" and revoked_before(target, replaced):
        # The revoke's own notice tells it, if its record was committed: one lost (PostgreSQL at its
        # commit, its patch's answer) left the customer told nothing unless an admin retried.
        revoked = target.customer.metadata.annotations[REVOKED_LICENSE]
        revoke_told = await revoke_recorded(session, target.customer_id, revoked)
    notice = license_notice(target, record, action, replaced, revoke_told)
    if notice is not None:
        await ctx.outbox.enqueue(session, notice, target.spec)


def license_notice(
    target: PassTarget,
    record: LicenseRecord,
    action: str,
    replaced: LicenseRecord | None = None,
    revoke_told: bool = False,
) -> Notice | None:
    """Suspended (not when a revoke suspended and its `license.revoked` was recorded: `revoke_told`,
    revoked_before), reinstated, or the state the licence
    enters: the end of the operator's own trial, a restriction or suspension of the dunning ladder
    (docs/architecture.md, "Notices"); nothing else while the Customer is suspended. `replaced`: the
    licence this one replaces; None when there was none, or when it is not known (a licence recorded
    after a crash): then the action alone says whether this licence entered its state."""
    about = {
        "customer_id": target.customer_id,
        "customer_name": target.name,
        "company": target.spec.company_name,
    }
    entitlement = target.entitlement
    if action == "suspended":
        if revoke_told:
            return None  # the revoke's own `license.revoked`, with the admin's reason, said it
        return license_changed(
            NoticeKind.LICENSE_SUSPENDED,
            **about,
            jti=record.jti,
            plan=record.plan,
            reason="suspended by an administrator",
        )
    if entitlement.suspended:
        # While a suspension lasts only its own licence speaks. Another one recorded now is a renewal under
        # it, or one whose pass lost its commit (a reinstatement) and that the suspension's licence
        # replaces: its "back on the plan", written after the revoke's or the suspension's word, would be
        # the customer's last word while cut off. What it would have told that still holds (a trial's end)
        # comes with the licence that lifts the suspension.
        return None
    if action == "reinstated" and not (entitlement.lapsed or entitlement.restricted):
        return license_changed(
            NoticeKind.LICENSE_REINSTATED,
            **about,
            jti=record.jti,
            plan=record.plan,
            reason=f"back on the {record.plan} plan",
        )
    # A state's notice comes with the licence that enters it (a lower one, or the one lifting a
    # suspension: the state may have come meanwhile), never with a renewal or a change within it.
    entered = action in ("downgraded", "reinstated")
    if entitlement.restricted and entitlement.next_step_at is not None:
        if not entered or (replaced is not None and _read_only(replaced)):
            return None
        return access_restricted(
            **about, jti=record.jti, plan=record.plan, suspended_at=entitlement.next_step_at
        )
    # Paused (a Stripe trial that ended without a payment method) cuts access as a lapse does, and no
    # Stripe event's notice says so.
    paused = entitlement.lapsed and entitlement.subscription_status == "paused"
    if (entitlement.payment_step == c.PAYMENT_SUSPENDED or paused) and entered:
        return license_changed(
            NoticeKind.LICENSE_SUSPENDED,
            **about,
            jti=record.jti,
            plan=record.plan,
            reason=entitlement.message,
        )
    ends_at = entitlement.trial_ends_at
    if entitlement.reason != c.TRIAL_EXPIRED or ends_at is None:
        return None
    created = target.customer.metadata.creation_timestamp
    if created is not None and ends_at < created:
        # Ended before this Customer was made (one made again, its trial counted from its customer id's
        # first licence): the object it replaced told it, or it was paid for before its end.
        return None
    # The trial ends from the trial's licence: not from a paid one whose subscription went over to one
    # never paid (the expired trial is then what is left), nor from a renewal months after.
    from_trial = replaced is None or replaced.plan == "trial"
    if action == "reinstated" or (action in ("generated", "downgraded") and from_trial):
        return trial_ended(**about, ends_at=ends_at)
    return None


def revoked_before(target: PassTarget, replaced: LicenseRecord | None) -> bool:
    """Whether the suspension is the one a revoke made: the Customer's REVOKED_LICENSE names the licence
    it replaces. A licence recorded after a crash does not know what it replaced: the licence the last
    completed pass reported is taken for it (the revoke's, unless that pass crashed as well)."""
    revoked = target.customer.metadata.annotations.get(REVOKED_LICENSE)
    if revoked is None:
        return False
    if replaced is not None:
        return replaced.jti == revoked
    reported = target.customer.status.license
    return reported is not None and reported.jti == revoked


def _read_only(record: LicenseRecord) -> bool:
    """Whether `record` is a restricted licence (licensing.plans.restricted)."""
    return record.features.get("canAddDevices") is False


def _readable(token: str | None) -> LicenseRecord | None:
    """The licence record of `token`, signature unchecked; None when it cannot be read as one."""
    if token is None:
        return None
    try:
        return LicenseRecord.from_token(token)
    except MintingError:
        return None


# Built once, their values bound (as license_history's row): built at each pass, they cost more CPU than
# the round trips (bench/README.md, reconcile). The names are not the columns': SQLAlchemy keeps those
# for the values of an INSERT or UPDATE.
_KEYS = cast(Table, ApiKey.__table__)
_STORE_USAGE_KEY: Final = (
    insert(_KEYS)
    .values(
        customer_id=bindparam("owner"),
        key_hash=bindparam("digest"),
        key_prefix=bindparam("prefix"),
        purpose="usage",
        description=bindparam("about"),
    )
    .on_conflict_do_update(
        index_elements=["key_hash"],
        set_={"revoked_at": None},
        where=(_KEYS.c.customer_id == bindparam("owner")) & _KEYS.c.revoked_at.is_not(None),
    )
)
_RETIRE_OTHER_USAGE_KEYS: Final = (
    update(_KEYS)
    .where(
        _KEYS.c.customer_id == bindparam("owner"),
        _KEYS.c.purpose == "usage",
        _KEYS.c.key_hash != bindparam("digest"),
        _KEYS.c.revoked_at.is_(None),
    )
    .values(revoked_at=func.now() + ROTATION_GRACE)
)


async def _record_usage_key(session: AsyncSession, customer_id: str, name: str, usage_key: str) -> None:
    """The usage key of the licence Secret, stored (hashed) so that the instance's reports are accepted,
    as the customer's one key: any other stops working ROTATION_GRACE from now (a deleted Secret got a
    new key, and the old one, wherever it was copied, must not work for ever). A key already stored for
    this customer and revoked since is valid again (its licence Secret restored); a Customer made again
    under its name never reuses its predecessor's (reconcile._namespace_and_secret)."""
    key = {
        "owner": customer_id,
        "digest": usage_key_hash(usage_key),
        "prefix": usage_key[:12],
        "about": f"usage key of {name}",
    }
    await session.execute(_STORE_USAGE_KEY, key)
    await session.execute(_RETIRE_OTHER_USAGE_KEYS, key)


async def revoke_license(
    ctx: OperatorContext,
    customer_id: str,
    secret: SecretData | None,
    reason: str,
    notify: tuple[str, CustomerSpec] | None = None,
    held_by: str | None = None,
    reported_jti: str | None = None,
) -> bool:
    """A `revoked` row for a deleted Customer's licence: the one in its licence Secret (`secret`, None when
    it or the Customer's namespace is gone, or the namespace is not the Customer's), else the last licence
    the history knows of the customer id; False when there is none. `held_by`: the live Customer that
    holds the customer id too (a rename that kept spec.customerId): only this Customer's own licence is
    revoked, the one it reported last (`reported_jti`) when its Secret is gone, and the row names who
    holds the id now. `notify`: the Customer's name and spec, when its addresses are known (a spec that
    no longer validates has none)."""
    async with ctx.sessions() as session, session.begin():
        raw = secret[0].get(LICENSE_JWT_KEY) if secret is not None else None
        token = raw.decode(errors="replace") if raw is not None else None
        readable = _readable(token) if verified_claims(ctx, token) is not None else None
        if readable is not None and readable.customer_id == customer_id and secret is not None:
            record = readable
            # Its issue too, when the pass that wrote it lost its row (PostgreSQL away) and no retry came
            # before the deletion: the history holds every licence an instance held (idempotent).
            action = secret.annotations.get(c.ANNOTATION_LICENSE_ACTION, "generated")
            # An annotation edited by hand into no action would block the deletion: the revocation goes on.
            await record_license(session, record, action if action in LICENSE_ACTIONS else "generated")
        else:
            # The Secret (or its namespace) is already gone, or its token is not one of ours (edited,
            # signed by a retired key): revoke the last licence the history knows (of this Customer's),
            # unless that is revoked already: a finalizer retried after its namespace went had revoked
            # the Secret's licence, and revoked the one before it too, with a second notice.
            query = select(LicenseHistory).where(LicenseHistory.customer_id == customer_id)
            if held_by is not None:
                query = query.where(LicenseHistory.jti == reported_jti)
            last = await session.scalar(
                query.order_by(LicenseHistory.generated_at.desc(), LicenseHistory.id.desc()).limit(1)
            )
            if last is None:
                return False
            record = last.record()
        revoked_already = select(LicenseHistory.id).where(
            LicenseHistory.customer_id == customer_id,
            LicenseHistory.jti == record.jti,
            LicenseHistory.action == "revoked",
        )
        if await session.scalar(revoked_already.limit(1)) is not None:
            return True  # a retry of a finalizer that got this far: nothing twice
        held = {"customerIdHeldBy": held_by} if held_by is not None else {}
        await record_license(session, record, "revoked", {"reason": reason, **held})
        if notify is not None:
            customer_name, spec = notify
            notice = license_changed(
                NoticeKind.LICENSE_REVOKED,
                customer_id=customer_id,
                customer_name=customer_name,
                company=spec.company_name,
                jti=record.jti,
                plan=record.plan,
                reason=reason,
            )
            await ctx.outbox.enqueue(session, notice, spec)
    return True


async def revoke_usage_keys(ctx: OperatorContext, customer_id: str, only: str | None = None) -> int:
    """The customer's usage keys stop working (a deleted Customer's instance reports nothing more), or
    only the key `only` (a deleted Customer's own, when another one holds the customer id); how many were
    revoked. Again after a crash: none left to revoke."""
    query = update(ApiKey).where(ApiKey.customer_id == customer_id, ApiKey.purpose == "usage", ApiKey.live())
    if only is not None:
        query = query.where(ApiKey.key_hash == usage_key_hash(only))
    async with ctx.sessions() as session, session.begin():
        result = await session.execute(query.values(revoked_at=func.now()))
    return int(getattr(result, "rowcount", 0) or 0)
