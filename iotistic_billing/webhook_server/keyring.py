"""The licence public keys the server publishes (PEM and JWKS) and verifies licences with.

LICENSE_PRIVATE_KEY_PATH when set (its public half signs), else LICENSE_PUBLIC_KEY_PATH alone: the
webhook server never signs, so it can run without the private key. Retired keys come from
LICENSE_EXTRA_PUBLIC_KEY_PATHS.
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
    """The current public key first, then the retired ones that still verify."""

    public_keys: tuple[rsa.RSAPublicKey, ...] = ()
    by_kid: Mapping[str, rsa.RSAPublicKey] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_kid", {jwk_thumbprint(key): key for key in self.public_keys})

    @classmethod
    def from_settings(cls, settings: Settings) -> LicenseKeyring:
        """Raises SettingsError naming the variable whose key file cannot be read."""
        variable = "LICENSE_EXTRA_PUBLIC_KEY_PATHS"
        try:
            extra = tuple(read_public_key(path) for path in settings.license_extra_public_key_paths)
            if settings.license_private_key_path is not None:
                variable = "LICENSE_PRIVATE_KEY_PATH"
                signing = SigningKeys.from_pem_files(
                    settings.license_private_key_path, settings.license_public_key_path, ()
                )
                return cls((signing.public_key, *extra))
            if settings.license_public_key_path is not None:
                variable = "LICENSE_PUBLIC_KEY_PATH"
                return cls((read_public_key(settings.license_public_key_path), *extra))
        except LicenseKeyError as error:
            raise SettingsError(f"{variable}: {error}") from None
        return cls(extra)

    @property
    def configured(self) -> bool:
        return bool(self.public_keys)

    def pem(self) -> bytes:
        return public_key_pem(self.public_keys[0])

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
