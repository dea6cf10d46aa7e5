"""Offline licence verification for customer instances: signature, validity window, audience, customer,
typed grants.

Needs nothing but cryptography (a test runs it where only pyjwt and cryptography can be imported; orjson
and pybase64 speed it up when present), so it imports nothing from the rest of the package but `plans`
and `keys`. Whatever goes wrong, `verify` answers with the earlier system's unlicensed fallback and the
reason, never an exception: an instance with a bad licence keeps running, small.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from iotistic_billing.licensing.keys import jwk_thumbprint, load_public_key, public_keys_from_jwks
from iotistic_billing.licensing.plans import UNLICENSED, UNLIMITED, Features, Limits

DEVICE_LIMIT_STATUS: Final = 403
DEFAULT_LEEWAY: Final = timedelta(seconds=60)
# Far above any licence we mint (about 1.5 kB): a bigger "token" is refused before any work.
MAX_TOKEN_LENGTH: Final = 16_384

_PKCS1: Final = padding.PKCS1v15()
# What an RS256 signature's block holds after its padding: SHA-256's DER DigestInfo prefix (RFC 8017,
# section 9.2, note 1), then the digest of the signing input.
_SHA256_DIGEST_INFO: Final = bytes.fromhex("3031300d060960864801650304020105000420")
_BOOLEAN_FEATURES: Final = {claim: attribute for attribute, claim, is_bool in Features.spec() if is_bool}
_NUMERIC_GRANTS: Final = {
    **{claim: ("features", attribute) for attribute, claim, is_bool in Features.spec() if not is_bool},
    **{claim: ("limits", attribute) for attribute, claim, _ in Limits.spec()},
}
_HEADER_CACHE_SIZE: Final = 32
_LICENSE_CACHE_SIZE: Final = 16
_GRANTS_CACHE_SIZE: Final = 64
_S = TypeVar("_S", Features, Limits)
_LAST_TIME: Final = 253_402_300_799  # 9999-12-31T23:59:59Z, the last instant a datetime can hold
_FROM_BASE64URL: Final = bytes.maketrans(b"-_", b"+/")
# The last character of a segment whose length leaves 2 or 3 over a multiple of 4 carries 4 or 2 unused
# bits; only the characters with those bits zero are its one spelling (as PyJWT has it).
_CANONICAL_LAST: Final = {2: frozenset(b"AQgw"), 3: frozenset(b"AEIMQUYcgkosw048")}


# Not ASCII-escaped: escaped, a character past U+FFFF and its two surrogates would be one key.
_json_text_std: Final = partial(json.dumps, ensure_ascii=False)


def _decode_base64url_std(segment: bytes) -> bytes:
    return binascii.a2b_base64(
        segment.translate(_FROM_BASE64URL) + b"=" * (-len(segment) % 4), strict_mode=True
    )


# Optional accelerators, each a tenth of a cold verification (bench/README.md); an instance without
# them verifies every licence the minter makes the same way through the standard library. The two
# parsers differ only on JSON no minter of ours writes (NaN, integers past 64 bits, lone surrogates,
# encodings other than UTF-8, nesting near a thousand levels), and only after the signature was checked.
_parse_json: Callable[[bytes], Any]
_json_text: Callable[[object], bytes | str]
_decode_base64url: Callable[[bytes], bytes]
try:
    from orjson import dumps as _json_text
    from orjson import loads as _parse_json
except ImportError:  # pragma: no cover - the interop test runs this branch in a subprocess
    _parse_json, _json_text = json.loads, _json_text_std
try:
    from pybase64 import b64decode as _b64decode
except ImportError:  # pragma: no cover - the interop test runs this branch in a subprocess
    _decode_base64url = _decode_base64url_std
else:

    def _decode_base64url(segment: bytes) -> bytes:
        # The alternative characters decode "+" and "/" too: the caller refuses them first.
        return _b64decode(segment + b"=" * (-len(segment) % 4), b"-_", True)


class InvalidLicense(Exception):
    """Why a token is not a valid licence; caught inside `verify`, whose answer carries the message."""


def _b64url_decode(segment: bytes) -> bytes:
    # The standard alphabet's own "+", "/" and "=", and unused bits set, are refused so that each token
    # has one spelling.
    if b"+" in segment or b"/" in segment or b"=" in segment:
        raise InvalidLicense("licence is not base64url")
    unused = len(segment) % 4
    if unused > 1 and segment[-1] not in _CANONICAL_LAST[unused]:
        raise InvalidLicense("licence is not base64url")
    try:
        return _decode_base64url(segment)
    except binascii.Error:
        raise InvalidLicense("licence is not base64url") from None


def _signed_block(key: rsa.RSAPublicKey, signature: bytes) -> bytes | None:
    """What the signature's PKCS#1 v1.5 block carries under `key`, None when it is no such block.

    Comparing it whole with the expected DigestInfo is RSASSA-PKCS1-v1_5 verification as RFC 8017
    (section 8.2.2) defines it, and costs a microsecond less than cryptography's `verify`, which
    creates a digest context of its own (bench/README.md).
    """
    if len(signature) != (key.key_size + 7) // 8:  # as RSA_verify: one spelling per signature
        return None
    try:
        return key.recover_data_from_signature(signature, _PKCS1, None)
    except InvalidSignature:
        return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _instant(value: int) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat()


def _optional_time(section: Mapping[str, Any], key: str, where: str) -> datetime | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidLicense(f"claim '{where}.{key}' must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidLicense(f"claim '{where}.{key}' is not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _check_customer(claims: Mapping[str, Any], customer_id: str) -> None:
    """Refuses a licence of another customer than `customer_id`. Checked on each call, not kept with the
    cached licence, as one verifier may be asked for several; a licence without `sub` (minted elsewhere)
    is judged by its `customerId` alone, which every licence has."""
    holders = (("customerId", claims.get("customerId")), ("sub", claims.get("sub", customer_id)))
    for claim, holder in holders:
        if holder != customer_id:
            raise InvalidLicense(f"licence is for customer {holder!r} (claim {claim!r}), not {customer_id!r}")


@dataclass(frozen=True, slots=True)
class TrialStatus:
    is_trial_mode: bool
    ends_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionStatus:
    status: str | None
    current_period_ends_at: datetime | None = None
    # Set to cancel at current_period_ends_at: the licence expires then, and no renewal follows.
    cancel_at_period_end: bool = False


class _Grants(NamedTuple):
    """What licences of one plan share, typed once."""

    features: Features
    limits: Limits
    trial: TrialStatus
    subscription: SubscriptionStatus


@dataclass(frozen=True, slots=True)
class License:
    """What an instance may do: the grants of a valid licence, or the unlicensed fallback and why."""

    valid: bool
    reason: str | None
    plan: str
    features: Features
    limits: Limits
    trial: TrialStatus
    subscription: SubscriptionStatus
    kid: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)

    # Who and when are read from the claims when asked: most callers never look, and verify() stays
    # cheap (each field set is a tenth of a microsecond of a frozen dataclass's construction).
    @property
    def customer_id(self) -> str | None:
        return _text(self.claims.get("customerId"))

    @property
    def customer_name(self) -> str | None:
        return _text(self.claims.get("customerName"))

    @property
    def jti(self) -> str | None:
        return _text(self.claims.get("jti"))

    @property
    def issued_at(self) -> datetime | None:
        issued = self.claims.get("iat")
        return (
            datetime.fromtimestamp(issued, UTC) if type(issued) is int and 0 <= issued <= _LAST_TIME else None
        )

    @property
    def expires_at(self) -> datetime | None:
        expires = self.claims.get("exp")
        return datetime.fromtimestamp(expires, UTC) if type(expires) is int else None

    def has_feature(self, name: str) -> bool:
        """Feature guard by the earlier system's claim name, e.g. `has_feature("canScheduleJobs")`."""
        try:
            attribute = _BOOLEAN_FEATURES[name]
        except KeyError:
            raise ValueError(
                f"{name!r} is not a boolean feature; known: {', '.join(_BOOLEAN_FEATURES)}"
            ) from None
        return bool(getattr(self.features, attribute))

    def limit(self, name: str) -> int:
        """A numeric grant by claim name (`maxDevices`, `maxUsers`, ...); -1 is unlimited."""
        try:
            section, attribute = _NUMERIC_GRANTS[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a limit; known: {', '.join(_NUMERIC_GRANTS)}") from None
        return int(getattr(getattr(self, section), attribute))

    def allows_another(self, name: str, current: int) -> bool:
        """Whether one more may be added when `current` exist (e.g. users, alert rules)."""
        maximum = self.limit(name)
        return maximum == UNLIMITED or current < maximum

    def check_device_limit(self, current_devices: int) -> dict[str, Any] | None:
        """None when one more device may be provisioned, else the earlier system's 403 body (also when
        a restricted licence, a payment overdue, provisions none)."""
        maximum = self.features.max_devices
        if not self.features.can_add_devices:
            return {
                "error": "Device limit exceeded",
                "message": (
                    f"Your {self.plan} plan is restricted while a payment is overdue: the devices you have "
                    "keep working, and no device can be added until the payment succeeds."
                ),
                "details": {
                    "currentDevices": current_devices,
                    "maxDevices": maximum,
                    "plan": self.plan,
                    "restricted": True,
                },
            }
        if maximum == UNLIMITED or current_devices < maximum:
            return None
        return {
            "error": "Device limit exceeded",
            "message": (
                f"Your {self.plan} plan allows a maximum of {maximum} devices. "
                f"You currently have {current_devices} active devices. "
                "Please upgrade your plan to add more devices."
            ),
            "details": {"currentDevices": current_devices, "maxDevices": maximum, "plan": self.plan},
        }


def unlicensed(reason: str) -> License:
    """The earlier system's unlicensed mode, carrying why the instance is in it."""
    return License(
        valid=False,
        reason=reason,
        plan=UNLICENSED.name,
        features=UNLICENSED.features,
        limits=UNLICENSED.limits,
        trial=TrialStatus(is_trial_mode=False),
        subscription=SubscriptionStatus(status=None),
    )


class LicenseVerifier:
    """Verifies licences offline against public keys chosen by the token's `kid`.

    Key objects are parsed once here; `verify` does one RSA verification, one JSON parse of the payload
    and typed checks, so an instance may call it per request.
    """

    def __init__(
        self,
        public_keys: Mapping[str, rsa.RSAPublicKey] | Iterable[rsa.RSAPublicKey],
        *,
        audience: str,
        issuer: str | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
        customer_id: str | None = None,
    ) -> None:
        """`customer_id`: the customer the instance serves (the chart's CUSTOMER_ID); a licence of any
        other is refused. Every licence is signed by the same key for the same audience, so without it a
        licence copied from another customer's instance verifies here with that customer's grants."""
        keys = (
            dict(public_keys)
            if isinstance(public_keys, Mapping)
            else {jwk_thumbprint(k): k for k in public_keys}
        )
        if not keys:
            raise ValueError("at least one public key is needed to verify licences")
        if not all(isinstance(key, rsa.RSAPublicKey) for key in keys.values()):
            raise ValueError("licences are RS256: every key that verifies them must be an RSA public key")
        if not audience:
            raise ValueError("audience must not be empty")
        if customer_id is not None and not customer_id:
            raise ValueError("customer_id must not be empty (None verifies a licence of any customer)")
        self._keys = keys
        self._customer_id = customer_id
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway.total_seconds()
        # Every licence from one key has the same header, so its parsing and key lookup are done once.
        self._headers: dict[bytes, tuple[str | None, tuple[rsa.RSAPublicKey, ...]]] = {}
        self._licenses: dict[tuple[str | None, bytes], License] = {}
        self._grants_made: dict[bytes | str, _Grants] = {}

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @classmethod
    def from_pem(
        cls,
        *pems: bytes | str,
        audience: str,
        issuer: str | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
        customer_id: str | None = None,
    ) -> LicenseVerifier:
        keys = [
            load_public_key(pem.encode("ascii") if isinstance(pem, str) else pem, f"public key {index + 1}")
            for index, pem in enumerate(pems)
        ]
        return cls(keys, audience=audience, issuer=issuer, leeway=leeway, customer_id=customer_id)

    @classmethod
    def from_pem_files(
        cls,
        *paths: Path,
        audience: str,
        issuer: str | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
        customer_id: str | None = None,
    ) -> LicenseVerifier:
        keys = []
        for path in paths:
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
            keys.append(load_public_key(pem, str(path)))
        return cls(keys, audience=audience, issuer=issuer, leeway=leeway, customer_id=customer_id)

    @classmethod
    def from_jwks(
        cls,
        document: Mapping[str, Any] | str | bytes,
        *,
        audience: str,
        issuer: str | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
        customer_id: str | None = None,
    ) -> LicenseVerifier:
        if isinstance(document, str | bytes):
            try:
                document = json.loads(document)
            except ValueError as exc:
                raise ValueError(f"JWKS document is not JSON ({exc})") from None
            if not isinstance(document, Mapping):
                raise ValueError("JWKS document must be a JSON object")
        return cls(
            public_keys_from_jwks(document),
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            customer_id=customer_id,
        )

    def verify(
        self, token: str | bytes | None, *, now: datetime | None = None, customer_id: str | None = None
    ) -> License:
        """The licence's grants, or the unlicensed fallback with the reason it was refused; `token` as
        text or as the bytes of a file or an environment read raw (a JWT is ASCII). `customer_id`: the
        customer the licence must be for (its `customerId` and `sub`), default the verifier's own."""
        if not token:
            return unlicensed("no licence")
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                return unlicensed("malformed licence")
        if not isinstance(token, str):
            return unlicensed("malformed licence")
        try:
            license = self._verify(token.strip(), time.time() if now is None else now.timestamp())
            expected = self._customer_id if customer_id is None else customer_id
            if expected is not None:
                _check_customer(license.claims, expected)
            return license
        except InvalidLicense as exc:
            return unlicensed(str(exc))
        except (ValueError, TypeError, binascii.Error, RecursionError):
            return unlicensed("malformed licence")

    def _keys_for(self, header_segment: bytes) -> tuple[str | None, tuple[rsa.RSAPublicKey, ...]]:
        cached = self._headers.get(header_segment)
        if cached is not None:
            return cached
        header = _parse_json(_b64url_decode(header_segment))
        if not isinstance(header, dict):
            raise InvalidLicense("malformed licence header")
        if header.get("alg") != "RS256":
            # Only RS256: never let the token choose a weaker or symmetric algorithm.
            raise InvalidLicense(f"algorithm {header.get('alg')!r} is not RS256")
        if "crit" in header:
            raise InvalidLicense("licence header has critical extensions this verifier does not know")
        kid = header.get("kid")
        if kid is None:
            # Licences from before key ids: any trusted key may have signed it.
            result: tuple[str | None, tuple[rsa.RSAPublicKey, ...]] = (None, tuple(self._keys.values()))
        elif isinstance(kid, str) and kid in self._keys:
            result = (kid, (self._keys[kid],))
        else:
            raise InvalidLicense(f"licence signed with an unknown key {kid!r}")
        if len(self._headers) < _HEADER_CACHE_SIZE:
            self._headers[header_segment] = result
        return result

    def _verify(self, token: str, now: float) -> License:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidLicense("licence is too large")
        encoded = token.encode("ascii")
        header_segment, payload_segment, signature_segment = encoded.split(b".")
        kid, candidates = self._keys_for(header_segment)
        signature = _b64url_decode(signature_segment)
        signing_input = encoded[: len(header_segment) + 1 + len(payload_segment)]
        expected = _SHA256_DIGEST_INFO + hashlib.sha256(signing_input).digest()
        for key in candidates:
            if _signed_block(key, signature) == expected:
                break
        else:
            raise InvalidLicense(
                "signature does not verify: the licence was altered or signed by another key"
            )
        # The signature was checked above, on every call; what follows depends only on the signed
        # payload, so an instance re-verifying the licence it holds parses and types it once.
        cache_key = (kid, payload_segment)
        license = self._licenses.get(cache_key)
        if license is None:
            claims = _parse_json(_b64url_decode(payload_segment))
            if not isinstance(claims, dict):
                raise InvalidLicense("licence payload is not a JSON object")
            license = self._license(claims, kid)
            if len(self._licenses) >= _LICENSE_CACHE_SIZE:
                # The oldest goes. pop() with a default, as another thread may have evicted it already;
                # and if it changed the cache between iter() and next(), this eviction is skipped.
                try:  # noqa: SIM105 - contextlib.suppress costs more than the eviction
                    self._licenses.pop(next(iter(self._licenses)), None)
                except (RuntimeError, StopIteration):
                    pass
            self._licenses[cache_key] = license
        self._check_window(license.claims, now)
        return license

    def _grants(
        self, features: object, limits: object, trial: dict[str, Any], subscription: dict[str, Any]
    ) -> _Grants:
        """A licence's typed sections and states, made once per distinct JSON text of them: the licences
        of one plan share them, and typing them was a third of a cold verification. The text is the key
        because, unlike the values, it tells `true` from `1` (True == 1 in Python)."""
        key: bytes | str | None
        try:
            key = _json_text((features, limits, trial, subscription))
        except (TypeError, ValueError, RecursionError):
            key = None  # deeper than orjson writes (255 levels): typed on each verification
        grants = None if key is None else self._grants_made.get(key)
        if grants is None:
            grants = _Grants(
                self._typed_section(Features, features, UNLICENSED.features),
                self._typed_section(Limits, limits, UNLICENSED.limits),
                TrialStatus(trial.get("isTrialMode", False), _optional_time(trial, "endsAt", "trial")),
                SubscriptionStatus(
                    subscription.get("status"),
                    _optional_time(subscription, "currentPeriodEndsAt", "subscription"),
                    subscription.get("cancelAtPeriodEnd", False),
                ),
            )
            if key is not None and len(self._grants_made) < _GRANTS_CACHE_SIZE:
                self._grants_made[key] = grants
        return grants

    @staticmethod
    def _typed_section(kind: type[_S], claims: object, fallback: _S) -> _S:
        try:
            return kind.from_claims(claims, fallback)
        except ValueError as exc:
            raise InvalidLicense(str(exc)) from None

    def _check_window(self, claims: Mapping[str, Any], now: float) -> None:
        expires, not_before = claims["exp"], claims.get("nbf")
        if now >= expires + self._leeway:
            raise InvalidLicense(f"licence expired at {_instant(expires)}")
        if not_before is not None and now + self._leeway < not_before:
            raise InvalidLicense(f"licence is not valid before {_instant(not_before)}")

    def _license(self, claims: dict[str, Any], kid: str | None) -> License:
        """The typed licence of a verified payload; everything but the validity window is checked."""
        expires = claims.get("exp")
        if type(expires) is not int or not 0 < expires <= _LAST_TIME:
            raise InvalidLicense("claim 'exp' is missing or not a time")
        not_before = claims.get("nbf")
        if not_before is not None and (type(not_before) is not int or not 0 <= not_before <= _LAST_TIME):
            raise InvalidLicense("claim 'nbf' is not a time")
        audience = claims.get("aud")
        if audience != self._audience and not (isinstance(audience, list) and self._audience in audience):
            raise InvalidLicense(f"licence is for audience {audience!r}, not {self._audience!r}")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise InvalidLicense(f"licence is from issuer {claims.get('iss')!r}, not {self._issuer!r}")
        customer_id, plan = claims.get("customerId"), claims.get("plan")
        if not isinstance(customer_id, str) or not customer_id:
            raise InvalidLicense("claim 'customerId' is missing")
        if not isinstance(plan, str) or not plan:
            raise InvalidLicense("claim 'plan' is missing")
        trial = claims.get("trial") or {}
        subscription = claims.get("subscription") or {}
        if not isinstance(trial, dict) or not isinstance(trial.get("isTrialMode", False), bool):
            raise InvalidLicense("claim 'trial' must be an object with a boolean isTrialMode")
        if not isinstance(subscription, dict) or not isinstance(subscription.get("status", ""), str):
            raise InvalidLicense("claim 'subscription' must be an object with a string status")
        if not isinstance(subscription.get("cancelAtPeriodEnd", False), bool):
            raise InvalidLicense("claim 'subscription.cancelAtPeriodEnd' must be a boolean")
        grants = self._grants(claims.get("features"), claims.get("limits"), trial, subscription)
        return License(
            valid=True,
            reason=None,
            plan=plan,
            features=grants.features,
            limits=grants.limits,
            trial=grants.trial,
            subscription=grants.subscription,
            kid=kid,
            claims=claims,
        )


__all__ = [
    "DEVICE_LIMIT_STATUS",
    "InvalidLicense",
    "License",
    "LicenseVerifier",
    "SubscriptionStatus",
    "TrialStatus",
    "unlicensed",
]
