"""Minting of licences: the claims a customer's plan grants, signed RS256 with the current key.

Pure: time, the key and the jti are inputs, so the operator can compute the licence it wants, compare it
with the one it has, and tests can pin every claim.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import jwt

from iotistic_billing.licensing.keys import SigningKeys
from iotistic_billing.licensing.plans import Plan
from iotistic_billing.licensing.verifier import DEFAULT_LEEWAY

if TYPE_CHECKING:
    from jwt.types import Options  # pyjwt 2.10, the oldest this package takes, has no Options yet

DEFAULT_LIFETIME: Final = timedelta(days=30)
# How far nbf lies before iat: the skew between the operator's clock and an instance's, so an instance
# whose clock is a few minutes behind does not refuse a fresh licence as "not valid before".
NOT_BEFORE_SKEW: Final = timedelta(minutes=5)
# Stripe's subscription statuses; a manually billed customer is `active`.
SUBSCRIPTION_STATUSES: Final = (
    "active",
    "trialing",
    "past_due",
    "canceled",
    "unpaid",
    "incomplete",
    "incomplete_expired",
    "paused",
)
# Claims that change at every minting even when nothing the customer has changed.
VOLATILE_CLAIMS: Final = frozenset({"iat", "nbf", "exp", "jti", "issuedAt", "expiresAt"})
MAX_CUSTOMER_ID_LENGTH: Final = 40  # license_history.customer_id
# jwt.decode's options for a licence read back to ask "is it ours, for instances" (the operator's Secret,
# the admin API): signature and audience only. Its times are judged apart, and a reader whose clock is a
# little behind the minting operator's must not take a fresh licence (iat: now) for a bad one.
SIGNATURE_ONLY: Final[Options] = {"verify_exp": False, "verify_nbf": False, "verify_iat": False}


class MintingError(ValueError):
    """The inputs cannot make a licence; the message names the field."""


@dataclass(frozen=True, slots=True)
class LicenseCustomer:
    customer_id: str
    name: str


@dataclass(frozen=True, slots=True)
class TrialTerms:
    is_trial_mode: bool
    ends_at: datetime | None = None


NO_TRIAL: Final = TrialTerms(is_trial_mode=False)


@dataclass(frozen=True, slots=True)
class SubscriptionTerms:
    status: str
    current_period_ends_at: datetime | None = None
    # Set to cancel at its period's end (Stripe's cancel_at_period_end): the licence ends with the period.
    cancel_at_period_end: bool = False


@dataclass(frozen=True, slots=True)
class LicenseRecord:
    """What the audit history keeps of a licence: its hash and its grants, never the token itself."""

    customer_id: str
    plan: str
    max_devices: int
    license_hash: str
    jti: str
    kid: str
    issued_at: datetime
    expires_at: datetime
    features: Mapping[str, Any]
    limits: Mapping[str, Any]

    @classmethod
    def from_claims(cls, token: str, header: Mapping[str, Any], claims: Mapping[str, Any]) -> LicenseRecord:
        def claim(name: str, kind: type) -> Any:
            value = claims.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise MintingError(f"licence claim {name!r} must be {kind.__name__}, got {value!r}")
            return value

        def time_claim(name: str) -> datetime:
            seconds = claim(name, int)
            try:
                return datetime.fromtimestamp(seconds, UTC)
            except (OverflowError, ValueError, OSError):
                # A token edited into a Secret may hold any integer: unreadable as a licence, not a crash.
                raise MintingError(
                    f"licence claim {name!r} must be a time in the years 1 to 9999, got {seconds!r}"
                ) from None

        features = claim("features", dict)
        max_devices = features.get("maxDevices")
        if not isinstance(max_devices, int) or isinstance(max_devices, bool):
            raise MintingError(f"licence claim 'features.maxDevices' must be int, got {max_devices!r}")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise MintingError(f"licence header 'kid' must be str, got {kid!r}")
        return cls(
            customer_id=claim("customerId", str),
            plan=claim("plan", str),
            max_devices=max_devices,
            license_hash=license_sha256(token),
            jti=claim("jti", str),
            kid=kid,
            issued_at=time_claim("iat"),
            expires_at=time_claim("exp"),
            features=features,
            limits=claim("limits", dict),
        )

    @classmethod
    def from_token(cls, token: str) -> LicenseRecord:
        """The record of a licence read back (e.g. from its Secret) to revoke it; signature unchecked."""
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise MintingError(f"not a licence token ({exc})") from None
        return cls.from_claims(token, header, claims)


@dataclass(frozen=True, slots=True)
class MintedLicense:
    token: str
    claims: Mapping[str, Any]
    sha256: str
    jti: str
    kid: str
    issued_at: datetime
    expires_at: datetime

    @property
    def customer_id(self) -> str:
        return str(self.claims["customerId"])

    @property
    def plan(self) -> str:
        return str(self.claims["plan"])

    def record(self) -> LicenseRecord:
        return LicenseRecord.from_claims(self.token, {"kid": self.kid}, self.claims)


def license_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise MintingError(f"{name} must be timezone-aware, got {value.isoformat()}")
    return value


def _seconds(value: datetime) -> int:
    # Whole seconds, rounded down: JWT NumericDate as every library reads it, and a trial end is never
    # moved later by rounding.
    return int(value.timestamp() // 1)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _capped(expires: int, ends_at: datetime, name: str, now: datetime, lapsed: str) -> int:
    """`expires` (seconds) capped at `ends_at`, the field `name`: the licence stops when what it ends
    does. An end not after `now` is refused, as `lapsed` gets the unlicensed plan, not a licence."""
    end = _seconds(_aware(ends_at, name))
    if end <= _seconds(now):
        raise MintingError(
            f"{name} ({_iso(ends_at)}) is not after now ({_iso(now)}): {lapsed} gets the unlicensed plan"
        )
    return min(expires, end)


def license_claims(
    *,
    customer: LicenseCustomer,
    plan: Plan,
    trial: TrialTerms,
    subscription: SubscriptionTerms,
    now: datetime,
    issuer: str,
    audience: str,
    jti: str,
    lifetime: timedelta = DEFAULT_LIFETIME,
) -> dict[str, Any]:
    """The claims of a licence, unsigned: the earlier system's camelCase claims plus the registered JWT
    claims."""
    if not customer.customer_id or len(customer.customer_id) > MAX_CUSTOMER_ID_LENGTH:
        raise MintingError(
            f"customer.customer_id must be 1 to {MAX_CUSTOMER_ID_LENGTH} characters, "
            f"got {customer.customer_id!r}"
        )
    if not customer.name.strip():
        raise MintingError("customer.name must not be empty")
    if not issuer or not audience:
        raise MintingError("issuer and audience must not be empty")
    if subscription.status not in SUBSCRIPTION_STATUSES:
        raise MintingError(
            f"subscription.status must be one of {', '.join(SUBSCRIPTION_STATUSES)}, "
            f"got {subscription.status!r}"
        )
    if lifetime < timedelta(minutes=1):
        raise MintingError(f"lifetime must be at least one minute, got {lifetime}")
    issued = _seconds(_aware(now, "now"))
    expires = _seconds(now + lifetime)

    trial_claim: dict[str, Any] = {"isTrialMode": trial.is_trial_mode}
    if trial.is_trial_mode:
        if trial.ends_at is None:
            raise MintingError("trial.ends_at is required in trial mode")
        # A trial licence must stop working when the trial does, whatever the renewal schedule.
        expires = _capped(expires, trial.ends_at, "trial.ends_at", now, "a lapsed trial")
        trial_claim["endsAt"] = _iso(trial.ends_at)

    subscription_claim: dict[str, Any] = {"status": subscription.status}
    if subscription.current_period_ends_at is not None:
        period_end = _aware(subscription.current_period_ends_at, "subscription.current_period_ends_at")
        subscription_claim["currentPeriodEndsAt"] = _iso(period_end)
    if subscription.cancel_at_period_end:
        if subscription.current_period_ends_at is None:
            raise MintingError("subscription.current_period_ends_at is required when it cancels at its end")
        # As a trial's: with no pass at the period's end (the operator down, the Customer stalled) the last
        # licence, and every offline copy of it, ran up to a lifetime past the subscription's end. The
        # claim makes a licence minted before the cancellation, or one capped before it was undone,
        # differ from the desired one (claims_differ), so either is minted again at once.
        expires = _capped(
            expires,
            subscription.current_period_ends_at,
            "subscription.current_period_ends_at",
            now,
            "a subscription ended at its period's end",
        )
        subscription_claim["cancelAtPeriodEnd"] = True

    return {
        "iss": issuer,
        "sub": customer.customer_id,
        "aud": audience,
        "iat": issued,
        "nbf": issued - int(NOT_BEFORE_SKEW.total_seconds()),
        "exp": expires,
        "jti": jti,
        "customerId": customer.customer_id,
        "customerName": customer.name,
        "plan": plan.name,
        "features": plan.features.to_claims(),
        "limits": plan.limits.to_claims(),
        "trial": trial_claim,
        "subscription": subscription_claim,
        "issuedAt": issued,
        "expiresAt": expires,
    }


def mint_license(
    *,
    customer: LicenseCustomer,
    plan: Plan,
    trial: TrialTerms,
    subscription: SubscriptionTerms,
    now: datetime,
    keys: SigningKeys,
    issuer: str,
    audience: str,
    lifetime: timedelta = DEFAULT_LIFETIME,
    jti: str | None = None,
) -> MintedLicense:
    """Sign a licence with `keys`' signing key; its `kid` header lets verifiers pick the key."""
    token_id = jti if jti is not None else uuid.uuid4().hex
    claims = license_claims(
        customer=customer,
        plan=plan,
        trial=trial,
        subscription=subscription,
        now=now,
        issuer=issuer,
        audience=audience,
        jti=token_id,
        lifetime=lifetime,
    )
    token = keys.sign_jwt(claims)
    return MintedLicense(
        token=token,
        claims=claims,
        sha256=license_sha256(token),
        jti=token_id,
        kid=keys.kid,
        issued_at=datetime.fromtimestamp(claims["iat"], UTC),
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
    )


def claims_differ(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether two licences grant different things: anything but the times and the jti differs."""
    keys = (current.keys() | desired.keys()) - VOLATILE_CLAIMS
    return any(current.get(key) != desired.get(key) for key in keys)


def renewal_due(expires_at: datetime, issued_at: datetime, now: datetime) -> bool:
    """True once less than a third of the licence's lifetime is left (or it has expired)."""
    remaining = _aware(expires_at, "expires_at") - _aware(now, "now")
    lifetime = expires_at - _aware(issued_at, "issued_at")
    return remaining * 3 < lifetime


def issued_ahead(issued_at: datetime, now: datetime) -> bool:
    """Whether the licence was issued further ahead of `now` than verifiers allow: minted while the
    operator's clock was ahead, it is refused as not valid yet (pyjwt by its iat, ours by its nbf), and
    renewal_due, seeing more time left than ever, would keep it."""
    return _aware(issued_at, "issued_at") > _aware(now, "now") + DEFAULT_LEEWAY


__all__ = [
    "DEFAULT_LIFETIME",
    "NOT_BEFORE_SKEW",
    "NO_TRIAL",
    "SIGNATURE_ONLY",
    "SUBSCRIPTION_STATUSES",
    "VOLATILE_CLAIMS",
    "LicenseCustomer",
    "LicenseRecord",
    "MintedLicense",
    "MintingError",
    "SubscriptionTerms",
    "TrialTerms",
    "claims_differ",
    "issued_ahead",
    "license_claims",
    "license_sha256",
    "mint_license",
    "renewal_due",
]
