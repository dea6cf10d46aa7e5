"""RSA keys of the licences: generation, PEM files, Kubernetes Secret data, key ids (RFC 7638) and JWKS.

cryptography and the standard library only, because the instance-side verifier imports it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ALLOWED_KEY_SIZES: Final = (2048, 3072, 4096)
# Loading accepts any size a verifier can trust; generation offers only the three above.
MINIMUM_KEY_SIZE: Final = 2048
PUBLIC_EXPONENT: Final = 65537
PRIVATE_KEY_FILE: Final = "private-key.pem"
PUBLIC_KEY_FILE: Final = "public-key.pem"
# Extra data keys of a keys Secret such as `public-key-2025-01.pem` hold retired public keys that
# still verify licences during a rotation.
_EXTRA_PUBLIC_PREFIX: Final = "public-key"


class LicenseKeyError(ValueError):
    """A key cannot be generated, read or used; the message names the file, data key or argument, and
    `path` the file whose key failed, for a caller to name the setting it came from."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def generate_private_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    if isinstance(bits, bool) or bits not in ALLOWED_KEY_SIZES:
        raise LicenseKeyError(
            f"RSA key size must be one of {', '.join(map(str, ALLOWED_KEY_SIZES))} bits, got {bits!r}"
        )
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=bits)


def private_key_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(public_key: rsa.RSAPublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_temporary(path: Path, content: bytes, mode: int, suffix: str = ".tmp") -> Path:
    """`content` in a new file beside `path`, for a rename onto it: mkstemp makes it 0600 under a name no
    other run holds, so the private key is never readable by others, and a file a killed run left behind
    blocks no later one (found in review: names by pid, always 1 in a container, did); a crash never
    leaves half a key under the real name."""
    descriptor, name = tempfile.mkstemp(suffix=suffix, prefix=f".{path.name}.", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def write_key_pair(
    private_key: rsa.RSAPrivateKey, directory: Path, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write `private-key.pem` (mode 0600) and `public-key.pem` (0644); refuse to replace a key unasked.
    A write that fails leaves the pair that was there: never a private key beside another's public one."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise LicenseKeyError(
                    f"{path} already exists; replacing a signing key invalidates every licence"
                )
    # Both written in full before either is renamed, so a full disk changes nothing. Two renames are
    # not one atomic step, so a copy of the old private key is kept aside until the public one is in
    # place, and put back when that fails (found in review: a directory named public-key.pem left the new
    # private key without its public one, beside the old pair's copies elsewhere). A copy of its bytes,
    # not a hard link: FAT, exFAT, CIFS, some FUSE file systems and fs.protected_hardlinks refuse link(2)
    # where writing works (found in review). The private key goes first because it is the one not made
    # again from the other: a process killed between the renames leaves the old one beside it as
    # .private-key.pem.<random>.old.
    made = [_write_temporary(private_path, private_key_pem(private_key), 0o600)]
    try:
        made.append(_write_temporary(public_path, public_key_pem(private_key.public_key()), 0o644))
        private_temporary, public_temporary = made
        kept = None
        if private_path.exists():
            kept = _write_temporary(private_path, private_path.read_bytes(), 0o600, suffix=".old")
            made.append(kept)
        os.replace(private_temporary, private_path)
        try:
            os.replace(public_temporary, public_path)
        except BaseException:
            if kept is not None:
                os.replace(kept, private_path)
            else:
                private_path.unlink()
            raise
    finally:
        for path in made:
            path.unlink(missing_ok=True)
    return private_path, public_path


def _check_size(key_size: int, source: str) -> None:
    if key_size < MINIMUM_KEY_SIZE:
        raise LicenseKeyError(
            f"{source}: RSA key of {key_size} bits is too small (at least {MINIMUM_KEY_SIZE})"
        )


def load_private_key(pem: bytes, source: str) -> rsa.RSAPrivateKey:
    """Parse an unencrypted PEM private key; `source` (a path or data key) names it in errors."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise LicenseKeyError(f"{source}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise LicenseKeyError(f"{source}: licences are signed with RS256, so the key must be RSA")
    _check_size(key.key_size, source)
    return key


def load_public_key(pem: bytes, source: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise LicenseKeyError(f"{source}: not a PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise LicenseKeyError(f"{source}: licences are signed with RS256, so the key must be RSA")
    _check_size(key.key_size, source)
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LicenseKeyError(f"{path}: cannot read ({exc.strerror})", path) from None


def read_private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        return load_private_key(_read(path), str(path))
    except LicenseKeyError as error:
        raise LicenseKeyError(str(error), path) from None


def read_public_key(path: Path) -> rsa.RSAPublicKey:
    try:
        return load_public_key(_read(path), str(path))
    except LicenseKeyError as error:
        raise LicenseKeyError(str(error), path) from None


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _uint_from_b64url(text: object, member: str) -> int:
    if not isinstance(text, str) or not text:
        raise LicenseKeyError(f"JWK member {member!r} must be a non-empty base64url string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise LicenseKeyError(f"JWK member {member!r} is not base64url") from None
    return int.from_bytes(raw, "big")


def jwk_thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): the key id, the same wherever the key is loaded from."""
    numbers = public_key.public_numbers()
    # RFC 7638 section 3: the required members only, in lexicographic order, no whitespace.
    canonical = json.dumps(
        {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)},
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    return {
        "kty": "RSA",
        "n": _b64url_uint(numbers.n),
        "e": _b64url_uint(numbers.e),
        "kid": jwk_thumbprint(public_key),
        "use": "sig",
        "alg": "RS256",
    }


def jwks_document(public_keys: Iterable[rsa.RSAPublicKey]) -> dict[str, list[dict[str, str]]]:
    return {"keys": [public_jwk(key) for key in public_keys]}


def public_key_from_jwk(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    if jwk.get("kty") != "RSA":
        raise LicenseKeyError(f"JWK kty must be 'RSA', got {jwk.get('kty')!r}")
    numbers = rsa.RSAPublicNumbers(_uint_from_b64url(jwk.get("e"), "e"), _uint_from_b64url(jwk.get("n"), "n"))
    try:
        key = numbers.public_key()
    except ValueError as exc:
        raise LicenseKeyError(f"JWK is not a valid RSA public key ({exc})") from None
    _check_size(key.key_size, f"JWK {jwk.get('kid')!r}")
    return key


def public_keys_from_jwks(document: Mapping[str, Any]) -> dict[str, rsa.RSAPublicKey]:
    """Signature keys of a JWKS document by key id; keys for other uses or algorithms are left out."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise LicenseKeyError("JWKS document must have a 'keys' list")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise LicenseKeyError(f"JWKS keys[{index}] must be an object")
        if (
            entry.get("use", "sig") != "sig"
            or entry.get("alg", "RS256") != "RS256"
            or entry.get("kty") != "RSA"
        ):
            continue
        key = public_key_from_jwk(entry)
        kid = entry.get("kid")
        keys[kid if isinstance(kid, str) and kid else jwk_thumbprint(key)] = key
    if not keys:
        raise LicenseKeyError("JWKS document holds no RS256 signature key")
    return keys


_PKCS1: Final = padding.PKCS1v15()
_SHA256: Final = hashes.SHA256()


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _decode_secret_value(data: Mapping[str, str], name: str) -> bytes:
    try:
        return base64.b64decode(data[name], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise LicenseKeyError(f"Secret data {name!r} is not base64 (Secret.data values are)") from None


@dataclass(frozen=True)
class SigningKeys:
    """One key that signs new licences and every public key that still verifies them.

    Rotation: `rotate(new_key)` signs with the new key while the old public key keeps verifying the
    licences already handed out, until `without_verification_key(old_kid)` once they are all renewed.
    """

    private_key: rsa.RSAPrivateKey
    kid: str = field(init=False)
    verification_keys: Mapping[str, rsa.RSAPublicKey] = field(init=False)
    extra_public_keys: tuple[rsa.RSAPublicKey, ...] = ()
    _header_segment: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        public = self.private_key.public_key()
        kid = jwk_thumbprint(public)
        verification = {jwk_thumbprint(key): key for key in self.extra_public_keys}
        verification[kid] = public
        object.__setattr__(self, "kid", kid)
        object.__setattr__(self, "verification_keys", MappingProxyType(verification))
        # pyjwt's header for the same key, byte for byte (it sorts the keys; these are in that order).
        header = {"alg": "RS256", "kid": kid, "typ": "JWT"}
        object.__setattr__(self, "_header_segment", _b64url(_compact_json(header)))

    def sign_jwt(self, claims: Mapping[str, Any]) -> str:
        """An RS256 JWT (JWS compact serialization, RFC 7515) of `claims` with this key's `kid`.

        Written out rather than through `jwt.encode`: the header is the same for every licence of a key,
        and pyjwt's per-call preparation was a tenth of a mint (bench/README.md, bench/license.py).
        """
        signing_input = self._header_segment + b"." + _b64url(_compact_json(claims))
        signature = self.private_key.sign(signing_input, _PKCS1, _SHA256)
        return (signing_input + b"." + _b64url(signature)).decode("ascii")

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.verification_keys[self.kid]

    def _others(self, exclude: str | None = None) -> tuple[rsa.RSAPublicKey, ...]:
        return tuple(key for kid, key in self.verification_keys.items() if kid not in (self.kid, exclude))

    def rotate(self, new_private_key: rsa.RSAPrivateKey) -> SigningKeys:
        return SigningKeys(new_private_key, extra_public_keys=(*self._others(), self.public_key))

    def with_verification_key(self, public_key: rsa.RSAPublicKey) -> SigningKeys:
        return SigningKeys(self.private_key, extra_public_keys=(*self._others(), public_key))

    def without_verification_key(self, kid: str) -> SigningKeys:
        if kid == self.kid:
            raise LicenseKeyError(f"key {kid} signs new licences; rotate to another key before removing it")
        if kid not in self.verification_keys:
            raise LicenseKeyError(f"key {kid} is not a verification key")
        return SigningKeys(self.private_key, extra_public_keys=self._others(exclude=kid))

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        # The signing key first: clients that take the first key get the one in use.
        return jwks_document((self.public_key, *self._others()))

    def public_key_pem(self) -> bytes:
        return public_key_pem(self.public_key)

    @classmethod
    def from_pem_files(
        cls,
        private_key_path: Path,
        public_key_path: Path | None = None,
        extra_public_key_paths: Iterable[Path] = (),
    ) -> SigningKeys:
        """Load the signing key; a given public key file must be its public half."""
        private_key = read_private_key(private_key_path)
        if public_key_path is not None:
            _check_pair(private_key, read_public_key(public_key_path), public_key_path)
        return cls(
            private_key, extra_public_keys=tuple(read_public_key(path) for path in extra_public_key_paths)
        )

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str]) -> SigningKeys:
        """Load from a Kubernetes Secret's `data` (base64 values), as the operator reads it.

        `private-key.pem` signs; `public-key.pem`, when present, must be its public half; any other
        `public-key*.pem` is a retired key that still verifies.
        """
        if PRIVATE_KEY_FILE not in data:
            raise LicenseKeyError(f"Secret data has no {PRIVATE_KEY_FILE!r}")
        private_key = load_private_key(
            _decode_secret_value(data, PRIVATE_KEY_FILE), f"Secret data {PRIVATE_KEY_FILE!r}"
        )
        if PUBLIC_KEY_FILE in data:
            public = load_public_key(
                _decode_secret_value(data, PUBLIC_KEY_FILE), f"Secret data {PUBLIC_KEY_FILE!r}"
            )
            _check_pair(private_key, public, f"Secret data {PUBLIC_KEY_FILE!r}")
        extra = tuple(
            load_public_key(_decode_secret_value(data, name), f"Secret data {name!r}")
            for name in sorted(data)
            if name != PUBLIC_KEY_FILE and name.startswith(_EXTRA_PUBLIC_PREFIX) and name.endswith(".pem")
        )
        return cls(private_key, extra_public_keys=extra)

    def secret_data(self) -> dict[str, str]:
        """The inverse of `from_secret_data`: base64 values for a Secret's `data`."""

        def encoded(pem: bytes) -> str:
            return base64.b64encode(pem).decode("ascii")

        data = {
            PRIVATE_KEY_FILE: encoded(private_key_pem(self.private_key)),
            PUBLIC_KEY_FILE: encoded(self.public_key_pem()),
        }
        for kid, key in self.verification_keys.items():
            if kid != self.kid:
                data[f"{_EXTRA_PUBLIC_PREFIX}-{kid}.pem"] = encoded(public_key_pem(key))
        return data


def _check_pair(private_key: rsa.RSAPrivateKey, public_key: rsa.RSAPublicKey, source: str | Path) -> None:
    """Refuse a public key (`source`: its file or data key) that is not `private_key`'s half."""
    if private_key.public_key().public_numbers() != public_key.public_numbers():
        raise LicenseKeyError(
            f"{source}: public key does not belong to the private key",
            source if isinstance(source, Path) else None,
        )


__all__ = [
    "ALLOWED_KEY_SIZES",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "LicenseKeyError",
    "SigningKeys",
    "generate_private_key",
    "jwk_thumbprint",
    "jwks_document",
    "load_private_key",
    "load_public_key",
    "private_key_pem",
    "public_jwk",
    "public_key_from_jwk",
    "public_key_pem",
    "public_keys_from_jwks",
    "read_private_key",
    "read_public_key",
    "write_key_pair",
]
