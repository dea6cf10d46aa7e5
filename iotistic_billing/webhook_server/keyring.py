"""The licence public keys the server publishes (PEM and JWKS) and verifies licences with.

LICENSE_PRIVATE_KEY_PATH when set (its public half signs), else LICENSE_PUBLIC_KEY_PATH alone: the
webhook server never signs, so it can run without the private key. A verifier (the CLI) takes
LICENSE_PUBLIC_KEY_PATH first. Retired keys come from LICENSE_EXTRA_PUBLIC_KEY_PATHS; alone they still
verify, but are no current key to publish.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from iotistic_billing.licensing.keys import (
    LicenseKeyError,
    SigningKeys,
    jwk_thumbprint,
    jwks_document,
    public_key_pem,
    read_public_key,
)
from iotistic_billing.licensing.minting import SIGNATURE_ONLY
from iotistic_billing.settings import Settings, SettingsError


@dataclass(frozen=True)
class LicenseKeyring:
    """The current public key (None when neither key path is set), then the retired ones that still
    verify; `public_keys` lists each key once, the current one first."""

    current: rsa.RSAPublicKey | None = None
    retired: tuple[rsa.RSAPublicKey, ...] = ()
    public_keys: tuple[rsa.RSAPublicKey, ...] = field(init=False)
    by_kid: Mapping[str, rsa.RSAPublicKey] = field(init=False)

    def __post_init__(self) -> None:
        # A retired key's path may name the current key too, and a JWK Set should give each key a
        # distinct kid (RFC 7517, 4.5): each is kept once, as the operator's SigningKeys does.
        ordered = self.retired if self.current is None else (self.current, *self.retired)
        by_kid: dict[str, rsa.RSAPublicKey] = {}
        for key in ordered:
            by_kid.setdefault(jwk_thumbprint(key), key)
        object.__setattr__(self, "by_kid", by_kid)
        object.__setattr__(self, "public_keys", tuple(by_kid.values()))

    @classmethod
    def from_settings(cls, settings: Settings, *, verifier: bool = False) -> LicenseKeyring:
        """Raises SettingsError naming the variable whose key file cannot be read or used.

        The server takes the public half of LICENSE_PRIVATE_KEY_PATH and refuses a LICENSE_PUBLIC_KEY_PATH
        of another pair: what it publishes must be the key the operator signs with. A `verifier` (the
        CLI's `license verify`) needs public keys only: LICENSE_PUBLIC_KEY_PATH when set, the private key
        then neither read nor checked, so that a shell that cannot read it still verifies.
        """
        try:
            extra = tuple(read_public_key(path) for path in settings.license_extra_public_key_paths)
            private_path, public_path = settings.license_private_key_path, settings.license_public_key_path
            if private_path is None or (verifier and public_path is not None):
                # With neither path set, retired keys alone name no current signing key: the key routes
                # answer 503 naming the setting (serving a retired key as the current one's would fail
                # every new licence), yet they verify.
                return cls(None if public_path is None else read_public_key(public_path), extra)
            signing = SigningKeys.from_pem_files(private_path, public_path)
        except LicenseKeyError as error:
            raise SettingsError(f"{settings.key_path_setting(error.path)}: {error}") from None
        return cls(signing.public_key, extra)

    @property
    def configured(self) -> bool:
        """Whether the current signing key's public half is known (LICENSE_PRIVATE_KEY_PATH or
        LICENSE_PUBLIC_KEY_PATH), not only retired keys."""
        return self.current is not None

    def pem(self) -> bytes:
        if self.current is None:
            raise LicenseKeyError("no current licence key: LICENSE_PUBLIC_KEY_PATH is not set")
        return public_key_pem(self.current)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return jwks_document(self.public_keys)

    def decode(self, token: str, audience: str) -> tuple[dict[str, Any], bool]:
        """The licence's claims and whether one of our keys verified its signature (its times not
        checked: the caller shows what the Secret holds, expired or minted by a clock ahead of ours)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.by_kid.get(kid) if isinstance(kid, str) else None
            if key is not None:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=["RS256"], audience=audience, options=SIGNATURE_ONLY
                )
                return claims, True
            unverified: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return {}, False
        return unverified, False


__all__ = ["LicenseKeyring"]
