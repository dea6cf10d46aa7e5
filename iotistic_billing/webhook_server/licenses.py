"""Licence routes: the licence of a customer (admin, or that customer's own instance), its history,
revocation, and the public keys (PEM and JWKS) anyone may fetch to verify licences offline.

Revocation records a `revoked` history row for the licence in force AND sets spec.suspended: true by a
merge patch, so the operator re-mints the licence with the unlicensed feature set and scales the instance
down. A Customer kept in Git must be suspended in Git as well, or GitOps will undo it: when Git owns
spec.suspended the answer names its controller and says so (RevokeResponse.warning). The patch is made
before the commit (a refused patch rolls the row back); should the commit then be lost, the answer says
the Customer was suspended, and the retry records the licence the patch named (REVOKED_LICENSE). A patch
whose answer was lost (RevokeUnanswered) rolls the row and its notice back too: they would tell of a
revocation that may not have been made; the retry records them as it does after a lost commit. A licence
revoked already (a revoke sent twice, or again after the operator's unlicensed licence) is revoked once:
the revoke after it writes, sends and patches nothing, and says so (Revoked.recorded).

A customer id no Customer holds any more (deleted with its finalizer removed by hand, which revokes
nothing: README) is revoked by its records alone (revoke_left_behind): its usage keys, and a `revoked`
row for the last licence its history knows, as the finalizer would have; no Customer is patched and no
notice sent (no Customer, no addresses).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import jwt
from aiohttp import web
from kubernetes.client.exceptions import ApiException
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iotistic_billing.customer import (
    LICENSE_JWT_KEY,
    LICENSE_SECRET_NAME,
    REVOKED_LICENSE,
    git_reverts,
    gitops_manager,
)
from iotistic_billing.db.license_history import (
    hold_revocations,
    license_history,
    record_license,
    recorded_license,
)
from iotistic_billing.db.models import ApiKey, LicenseHistory
from iotistic_billing.db.pool import database_unreachable
from iotistic_billing.directory import CustomerRecord
from iotistic_billing.errors import (
    Conflict,
    DependencyUnavailable,
    Forbidden,
    NotFound,
    Unavailable,
    ValidationFailed,
    customer_not_found,
    re_created_since_shown,
)
from iotistic_billing.k8s import Kube, KubernetesUnavailable, refused_for_its_uid
from iotistic_billing.licensing.minting import LicenseRecord, MintingError
from iotistic_billing.licensing.plans import UNLICENSED_PLAN_NAME
from iotistic_billing.notices.content import NoticeKind, license_changed
from iotistic_billing.webhook_server.context import (
    DIRECTORY,
    KEYRING,
    KUBE,
    OUTBOX,
    PRINCIPAL,
    SESSIONS,
    SETTINGS,
)
from iotistic_billing.webhook_server.messages import json_model, read_body, read_customer_id, read_query
from iotistic_billing.webhook_server.schemas import (
    HistoryQuery,
    Jwks,
    LicenseHistoryItem,
    LicenseHistoryResponse,
    LicenseResponse,
    LicenseStatistics,
    RevokeRequest,
    RevokeResponse,
)

log = logging.getLogger(__name__)


def _keys_not_configured() -> Unavailable:
    return Unavailable(
        "Licence keys are not configured",
        "neither LICENSE_PRIVATE_KEY_PATH nor LICENSE_PUBLIC_KEY_PATH is set on this server",
        {"setting": "LICENSE_PUBLIC_KEY_PATH"},
    )


async def license_token(kube: Kube, namespace: str, customer_id: str, uid: str | None = None) -> str | None:
    """The licence JWT of the Secret the operator wrote for `customer_id` (and for the Customer of `uid`,
    when given), or None while there is none: a licence of another customer id, or owned by another
    Customer, is a deleted predecessor's of the same name, whose namespace is still being deleted (one
    made again from Git keeps its customer id)."""
    secret = await kube.read_secret_data(namespace, LICENSE_SECRET_NAME)
    if secret is None or LICENSE_JWT_KEY not in secret.data:
        return None
    if uid is not None and secret.owner_uids and uid not in secret.owner_uids:
        return None
    data = secret.data
    token = data[LICENSE_JWT_KEY].decode(errors="replace")
    try:
        holder = jwt.decode(token, options={"verify_signature": False}).get("customerId")
    except jwt.PyJWTError:
        return token  # not readable as a licence: shown as it is (the keyring's decode says why)
    return None if isinstance(holder, str) and holder != customer_id else token


async def _issued_token(request: web.Request, record: CustomerRecord) -> str:
    token = await license_token(
        request.app[KUBE], record.namespace, record.customer_id, record.customer.metadata.uid
    )
    if token is None:
        raise NotFound(
            "Licence not issued yet",
            f"the operator has not issued a licence for {record.customer_id} yet",
            {"customer_id": record.customer_id},
        )
    return token


async def get_license(request: web.Request) -> web.Response:
    """The customer's current licence, its claims and whether they verified: unverified claims (a key
    id of no key of ours) must not pass for ours."""
    customer_id = read_customer_id(request)
    principal = request[PRINCIPAL]
    # Checked before any lookup: an instance learns nothing about other customers, not even existence.
    if principal.kind == "instance" and principal.customer_id != customer_id:
        raise Forbidden("a usage key may only read its own customer's licence")
    async with request.app[SESSIONS]() as session:
        record = await request.app[DIRECTORY].existing(session, customer_id)
    token = await _issued_token(request, record)
    claims, verified = request.app[KEYRING].decode(token, request.app[SETTINGS].license_audience)
    return json_model(LicenseResponse(license=token, decoded=claims, verified=verified))


async def get_license_history(request: web.Request) -> web.Response:
    """Every licence issued or revoked for the customer (hashes, never tokens), newest first."""
    customer_id = read_customer_id(request)
    query = read_query(request, HistoryQuery)
    async with request.app[SESSIONS]() as session:
        record = await request.app[DIRECTORY].existing(session, customer_id)
        report = await license_history(session, customer_id, limit=query.limit)
    return json_model(
        LicenseHistoryResponse(
            customer_id=customer_id,
            email=record.customer.spec.email,
            history=[LicenseHistoryItem.model_validate(row, from_attributes=True) for row in report.history],
            statistics=LicenseStatistics.model_validate(report.statistics),
        )
    )


async def revoke_license(request: web.Request) -> web.Response:
    """Revoke the licence in force and suspend the customer (see the module's note)."""
    customer_id = read_customer_id(request)
    body = await read_body(request, RevokeRequest)
    async with revocation(request.app) as revoking:
        try:
            record = await request.app[DIRECTORY].existing(revoking.session, customer_id)
        except NotFound:
            # Under the revocation lock, as the finalizer looks right before its revocations.
            await hold_revocations(revoking.session, customer_id)
            await request.app[DIRECTORY].confirm_gone(customer_id)
            left = await revoke_left_behind(revoking.session, customer_id, body.reason, by="admin")
            return json_model(
                RevokeResponse(
                    customer_id=customer_id,
                    revoked_jti=left.license.jti if left is not None else None,
                    reason=body.reason,
                    suspended=False,
                    already_revoked=left is not None and not left.recorded,
                    customer_deleted=True,
                )
            )
        revoked = await revoking.revoke(record, body.reason, by="admin")
    return json_model(
        RevokeResponse(
            customer_id=customer_id,
            revoked_jti=revoked.license.jti,
            reason=body.reason,
            # Already revoked: only while its revoke still suspends the Customer (revoke_and_suspend).
            suspended=True,
            already_revoked=not revoked.recorded,
            gitops_manager=revoked.gitops_manager,
            warning=revoked.git_reverts,
        )
    )


async def revoke_left_behind(session: AsyncSession, customer_id: str, reason: str, by: str) -> Revoked | None:
    """The revoke of a customer id no Customer holds (see the module's note), in `session`'s transaction:
    its live usage keys revoked, and a `revoked` row for the last licence its history knows, unless that
    one is revoked already (Revoked.recorded False); None when the history knows no licence of it. A 404
    "Customer not found" when neither its history nor its usage keys know the id. The row ends the
    licence as the finalizer's does, for the usage billed under the id (docs/architecture.md, Tables)."""
    await hold_revocations(session, customer_id)
    keys = await session.execute(
        update(ApiKey)
        .where(ApiKey.customer_id == customer_id, ApiKey.purpose == "usage", ApiKey.live())
        .values(revoked_at=func.now())
    )
    last = await session.scalar(
        select(LicenseHistory)
        .where(LicenseHistory.customer_id == customer_id)
        .order_by(LicenseHistory.generated_at.desc(), LicenseHistory.id.desc())
        .limit(1)
    )
    if last is None:
        known = await session.scalar(select(ApiKey.id).where(ApiKey.customer_id == customer_id).limit(1))
        if known is None:
            raise customer_not_found(customer_id)
        log.info("usage keys of %s revoked (%s); no Customer holds it, no licence recorded", customer_id, by)
        return None
    license = last.record()
    try:
        recorded = await record_license(session, license, "revoked", {"reason": reason, "by": by})
    except ValueError as refused:  # a reason shaped like a token or a key is refused by the history
        raise ValidationFailed.single("reason", str(refused)) from None
    log.info(
        "licence %s of %s revoked with %d usage keys; no Customer holds it, none suspended",
        license.jti,
        customer_id,
        int(getattr(keys, "rowcount", 0) or 0),
    )
    return Revoked(license, recorded=recorded)


class RevokeUnanswered(KubernetesUnavailable):
    """A revoke's patch that was sent and not answered: the Customer may be suspended with `license` named
    in REVOKED_LICENSE. Its history row and notice were rolled back (revoke_and_suspend); the retry
    records them. Answered as any write that may have been made (a 503 saying so)."""

    def __init__(self, unanswered: KubernetesUnavailable, license: LicenseRecord) -> None:
        super().__init__(str(unanswered), maybe_applied=True)
        self.license = license


@dataclass(frozen=True)
class Revoked:
    """What a revoke did: the licence it revoked, and whether it recorded it (False: the licence was
    revoked already, and nothing was written, sent or patched; the reason given is not recorded)."""

    license: LicenseRecord
    recorded: bool = True
    # Git's controller owning spec.suspended, and the warning that it puts the suspension back: read on
    # the Customer the revoke decided on (git_reverts), before its patch moved the field's owner to us.
    gitops_manager: str | None = None
    git_reverts: str | None = None


@dataclass
class Revocation:
    """A revoke's transaction (`revocation`): what it revoked, once `revoke` has suspended the Customer,
    or may have (`unanswered`: the patch's answer was lost)."""

    app: web.Application
    session: AsyncSession
    done: tuple[CustomerRecord, LicenseRecord] | None = None
    unanswered: bool = False

    async def revoke(self, record: CustomerRecord, reason: str, by: str, uid: str | None = None) -> Revoked:
        try:
            revoked = await revoke_and_suspend(self.app, self.session, record, reason, by, uid)
        except RevokeUnanswered as lost:
            self.done, self.unanswered = (record, lost.license), True
            raise
        if revoked.recorded:  # one revoked already wrote nothing: a commit lost then changed nothing
            self.done = (record, revoked.license)
        return revoked


@asynccontextmanager
async def revocation(app: web.Application) -> AsyncIterator[Revocation]:
    """The transaction of a revoke (the admin API's route and the console's action). PostgreSQL lost at
    the commit, after the Customer was suspended (or may have been: RevokeUnanswered, which the console
    catches to commit its audit row), is a 503 that says so, not the "nothing was changed" one: its
    retry records the same licence (REVOKED_LICENSE)."""
    async with app[SESSIONS]() as session:
        revoking = Revocation(app, session)
        try:
            async with session.begin():
                yield revoking
        except Exception as error:
            if revoking.done is None or not database_unreachable(error):
                raise
            record, license = revoking.done
            log.warning(
                "licence %s of %s revoked and Customer %s suspended, but PostgreSQL was lost at the"
                " commit (%s)",
                license.jti,
                record.customer_id,
                record.name,
                type(error).__name__,
            )
            suspended = (
                "may have been suspended (the API server's answer was lost)"
                if revoking.unanswered
                else "was suspended"
            )
            raise DependencyUnavailable(
                "Database",
                f"Customer {record.name} {suspended}, but the revocation of licence {license.jti} could"
                " not be recorded: retry to record it (the same licence)",
            ) from None


async def revoke_and_suspend(
    app: web.Application,
    session: AsyncSession,
    record: CustomerRecord,
    reason: str,
    by: str,
    uid: str | None = None,
) -> Revoked:
    """A `revoked` row and its notice for the licence in force, and spec.suspended: true, in `session`'s
    transaction (see `revocation`). The licence in force is the one in the licence Secret, unless an
    earlier revoke suspended the Customer and its record was lost: that one's (REVOKED_LICENSE), by
    the history's record of its issue. Both only while no licence was reinstated since: a Customer
    resumed and suspended again is revoked anew. A licence revoked already is not revoked again
    (Revoked.recorded False: nothing written). A patch whose answer was lost is RevokeUnanswered, its
    history row and notice rolled back (to a savepoint), the caller's transaction kept. `uid`: the patch
    is made on the Customer of that uid only (the API server refuses it on one made again under the
    name: `refused_for_its_uid`). `record` names the Customer; what is decided is read under the
    revocation lock."""
    customer_id = record.customer_id
    # Taken first, and the Customer and its licence read under it, once: the caller's record, read before,
    # only names the Customer (decided on it, one resumed meanwhile was answered "already revoked" and left
    # resumed). Held until the commit: a second revoke at once (a double click) finds this one's row and
    # suspension, and the operator's pass that the patch starts decides its notice on the row.
    await hold_revocations(session, customer_id)
    body = await app[KUBE].read_customer(record.name)
    now = CustomerRecord.from_body(body) if body is not None else None
    # The uid first: one made again without a pinned customerId has another id, derived from its uid.
    if now is not None and uid is not None and now.customer.metadata.uid != uid:
        raise re_created_since_shown("Customer", record.name)
    if now is None or now.customer_id != customer_id:
        raise customer_not_found(customer_id)
    # Decided on the Customer as it is: one made again under the name since the caller read it (GitOps,
    # keeping its customer id) holds the customer id's licence now, owned by it, which the caller's read
    # was answered "No licence to revoke" for.
    record = now
    git_owner, git_warning = gitops_manager(record.body, "suspended"), git_reverts(record.body, "suspended")
    token = await license_token(app[KUBE], record.namespace, customer_id, record.customer.metadata.uid)
    if token is None:
        raise Conflict(
            "No licence to revoke",
            f"the operator has not issued a licence for {customer_id} yet",
            {"customer_id": customer_id},
        )
    try:
        revoked = LicenseRecord.from_token(token)
    except MintingError:
        raise Conflict("No licence to revoke", "the licence Secret holds no readable licence") from None
    earlier = now.customer.metadata.annotations.get(REVOKED_LICENSE)
    if now.customer.spec.suspended and earlier is not None:
        found = await recorded_license(session, customer_id, earlier)
        if found is not None:
            license, recorded = found
            if not recorded:
                revoked = license  # the retry of a revoke whose commit was lost
            elif earlier == revoked.jti or revoked.plan == UNLICENSED_PLAN_NAME:
                # Revoked already (a revoke sent again: its answer lost, a double click, another
                # admin's), its revoke still suspending the Customer: the licence it revoked, in force
                # still or replaced by the operator's unlicensed one (not revoked, nor noticed), nothing
                # twice. One resumed before the operator replaced the licence holds it in force again:
                # revoked anew.
                return Revoked(license, recorded=False, gitops_manager=git_owner, git_reverts=git_warning)
    # A savepoint, rolled back only when the patch's answer is lost: the history row and the notice go,
    # the caller's transaction stays (the console's audit row says the revoke may have been made). Left
    # open otherwise, the commit releases it: PostgreSQL lost after the patch is lost at the commit.
    before_revoking = await session.begin_nested()
    try:
        await record_license(session, revoked, "revoked", {"reason": reason, "by": by})
    except ValueError as refused:  # a reason shaped like a token or a key is refused by the history
        raise ValidationFailed.single("reason", str(refused)) from None
    notice = license_changed(
        NoticeKind.LICENSE_REVOKED,
        customer_id=customer_id,
        customer_name=record.name,
        company=record.customer.spec.company_name,
        jti=revoked.jti,
        plan=revoked.plan,
        reason=reason,
    )
    await app[OUTBOX].enqueue(session, notice, record.customer.spec)
    # Before the commit: if the patch fails, the history row is rolled back with it.
    # On the Customer decided on only (the API server refuses the patch on another uid of the name).
    metadata = {"annotations": {REVOKED_LICENSE: revoked.jti}, "uid": record.customer.metadata.uid}
    try:
        await app[KUBE].patch_customer(record.name, {"metadata": metadata, "spec": {"suspended": True}})
    except ApiException as error:
        if error.status == 404:
            raise customer_not_found(customer_id) from None
        if uid is None and refused_for_its_uid(error):  # the console's caller says "re-created" itself
            raise Conflict(
                "Customer re-created",
                f"Customer {record.name} was deleted and made again during the revoke (another uid):"
                " nothing was done; revoke again to revoke the licence of the new one",
                {"customer_id": customer_id},
            ) from None
        raise
    except KubernetesUnavailable as error:
        if not error.maybe_applied:
            raise
        # Not recorded: the history and the notice would tell of a revocation that may not be in force.
        # The retry finds the licence in REVOKED_LICENSE and records it.
        await before_revoking.rollback()
        log.warning(
            "licence %s of %s: the patch suspending Customer %s got no answer (%s); not recorded",
            revoked.jti,
            customer_id,
            record.name,
            error,
        )
        raise RevokeUnanswered(error, revoked) from None
    log.info("licence %s of %s revoked; Customer %s suspended", revoked.jti, customer_id, record.name)
    return Revoked(revoked, gitops_manager=git_owner, git_reverts=git_warning)


async def get_public_key(request: web.Request) -> web.Response:
    """The PEM public key that verifies licences (the current signing key's)."""
    keyring = request.app[KEYRING]
    if not keyring.configured:
        raise _keys_not_configured()
    response = web.Response(body=keyring.pem(), content_type="text/plain", charset="utf-8")
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


async def get_jwks(request: web.Request) -> web.Response:
    """Every public key that verifies licences, as a JWKS (current key first)."""
    keyring = request.app[KEYRING]
    if not keyring.configured:
        raise _keys_not_configured()
    return json_model(Jwks.model_validate(keyring.jwks()), headers={"Cache-Control": "public, max-age=300"})


__all__ = [
    "Revocation",
    "RevokeUnanswered",
    "Revoked",
    "get_jwks",
    "get_license",
    "get_license_history",
    "get_public_key",
    "license_token",
    "revocation",
    "revoke_and_suspend",
    "revoke_left_behind",
    "revoke_license",
]
