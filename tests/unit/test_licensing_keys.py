"""Signing keys: sizes, PEM files and their modes, Secret data, RFC 7638 key ids, JWKS and rotation."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from iotistic_billing.licensing.keys import (
    LicenseKeyError,
    SigningKeys,
    generate_private_key,
    jwk_thumbprint,
    jwks_document,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_jwk,
    public_key_from_jwk,
    public_key_pem,
    public_keys_from_jwks,
    read_private_key,
    read_public_key,
    write_key_pair,
)

# RFC 7638 section 3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMst"
    "n64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajr"
    "n1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_E = "AQAB"
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.fixture(scope="module")
def key_a() -> rsa.RSAPrivateKey:
    return generate_private_key()


@pytest.fixture(scope="module")
def key_b() -> rsa.RSAPrivateKey:
    return generate_private_key()


@pytest.fixture
def no_umask() -> Iterator[None]:
    # A permissive umask proves the 0600 comes from our code, not from the environment.
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_default_key_is_rsa_2048_with_exponent_65537(key_a: rsa.RSAPrivateKey) -> None:
    assert key_a.key_size == 2048
    assert key_a.public_key().public_numbers().e == 65537


@pytest.mark.parametrize("bits", [3072, 4096])
def test_larger_key_sizes_are_selectable(bits: int) -> None:
    assert generate_private_key(bits).key_size == bits


@pytest.mark.parametrize("bits", [1024, 2047, 2049, 8192, 0, -2048])
def test_other_key_sizes_are_refused_with_a_clear_error(bits: int) -> None:
    with pytest.raises(
        LicenseKeyError, match=rf"RSA key size must be one of 2048, 3072, 4096 bits, got {bits}"
    ):
        generate_private_key(bits)


def test_rfc7638_example_thumbprint() -> None:
    jwk = {"kty": "RSA", "n": RFC7638_N, "e": RFC7638_E, "alg": "RS256", "kid": "2011-04-29"}
    key = public_key_from_jwk(jwk)
    assert key.key_size == 2048
    assert jwk_thumbprint(key) == RFC7638_THUMBPRINT
    # The members we publish round-trip to the RFC's encoding of the same key.
    published = public_jwk(key)
    assert (published["n"], published["e"], published["kid"]) == (RFC7638_N, RFC7638_E, RFC7638_THUMBPRINT)


def test_key_id_does_not_depend_on_where_the_key_was_loaded_from(key_a: rsa.RSAPrivateKey) -> None:
    from_pem = load_public_key(public_key_pem(key_a.public_key()), "pem")
    from_jwk = public_key_from_jwk(public_jwk(key_a.public_key()))
    assert jwk_thumbprint(from_pem) == jwk_thumbprint(from_jwk) == SigningKeys(key_a).kid


def test_write_key_pair_modes_and_round_trip(
    tmp_path: Path, key_a: rsa.RSAPrivateKey, no_umask: None
) -> None:
    private_path, public_path = write_key_pair(key_a, tmp_path / "keys")
    assert private_path.name == "private-key.pem"
    assert public_path.name == "public-key.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert read_private_key(private_path).private_numbers() == key_a.private_numbers()
    assert read_public_key(public_path).public_numbers() == key_a.public_key().public_numbers()
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # No temporary file is left behind.
    assert sorted(path.name for path in (tmp_path / "keys").iterdir()) == [
        "private-key.pem",
        "public-key.pem",
    ]


def test_write_key_pair_refuses_to_replace_a_key_unless_asked(
    tmp_path: Path, key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey, no_umask: None
) -> None:
    write_key_pair(key_a, tmp_path)
    with pytest.raises(LicenseKeyError, match=r"private-key\.pem already exists"):
        write_key_pair(key_b, tmp_path)
    assert read_private_key(tmp_path / "private-key.pem").private_numbers() == key_a.private_numbers()
    # A replaced key file that was once readable by others ends at 0600 too.
    (tmp_path / "private-key.pem").chmod(0o644)
    write_key_pair(key_b, tmp_path, overwrite=True)
    assert read_private_key(tmp_path / "private-key.pem").private_numbers() == key_b.private_numbers()
    assert stat.S_IMODE((tmp_path / "private-key.pem").stat().st_mode) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["private-key.pem", "public-key.pem"]


def test_a_failed_write_of_the_public_key_leaves_the_old_private_key(
    tmp_path: Path, key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey, no_umask: None
) -> None:
    """Found in review: `keys generate --force` wrote the private key, then the public key; a second
    write that failed (here a directory named public-key.pem) left the new private key beside what was
    there of the old pair, and every licence it signed then failed verification."""
    write_key_pair(key_a, tmp_path)
    (tmp_path / "public-key.pem").unlink()
    (tmp_path / "public-key.pem").mkdir()
    (tmp_path / "public-key.pem" / "kept").write_text("x")

    with pytest.raises(OSError):
        write_key_pair(key_b, tmp_path, overwrite=True)

    assert read_private_key(tmp_path / "private-key.pem").private_numbers() == key_a.private_numbers()
    assert stat.S_IMODE((tmp_path / "private-key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "public-key.pem" / "kept").read_text() == "x"
    # No temporary file nor the old key's copy is left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["private-key.pem", "public-key.pem"]


def test_a_public_key_that_cannot_be_renamed_into_place_leaves_the_old_pair(
    tmp_path: Path,
    key_a: rsa.RSAPrivateKey,
    key_b: rsa.RSAPrivateKey,
    no_umask: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same with a whole old pair there: the rename of the public key fails (as on a disk gone
    read-only between the two), and the old private and public keys stay, a pair."""
    write_key_pair(key_a, tmp_path)
    replace = os.replace

    def refuse_the_public_key(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if Path(target).name == "public-key.pem":
            raise OSError(30, "Read-only file system")
        replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_public_key)
    with pytest.raises(OSError, match="Read-only"):
        write_key_pair(key_b, tmp_path, overwrite=True)
    monkeypatch.setattr(os, "replace", replace)

    private_key = read_private_key(tmp_path / "private-key.pem")
    assert private_key.private_numbers() == key_a.private_numbers()
    assert (
        read_public_key(tmp_path / "public-key.pem").public_numbers()
        == private_key.public_key().public_numbers()
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["private-key.pem", "public-key.pem"]


def test_files_a_killed_run_left_behind_block_no_later_force(
    tmp_path: Path,
    key_a: rsa.RSAPrivateKey,
    key_b: rsa.RSAPrivateKey,
    no_umask: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the temporary files and the old key's copy were named by pid, always 1 in a
    container, and created exclusively: a run killed between writing them and cleaning up left a file
    that failed every later --force with File exists. Each run's names are its own; the leftovers, maybe
    the only copy of an old key, are left alone."""
    write_key_pair(key_a, tmp_path)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    leftovers = {
        ".private-key.pem.1.tmp": b"half a key",
        ".public-key.pem.1.tmp": b"half a key",
        ".private-key.pem.1.old": private_key_pem(key_a),
    }
    for name, content in leftovers.items():
        (tmp_path / name).write_bytes(content)

    write_key_pair(key_b, tmp_path, overwrite=True)

    assert read_private_key(tmp_path / "private-key.pem").private_numbers() == key_b.private_numbers()
    assert (
        read_public_key(tmp_path / "public-key.pem").public_numbers() == key_b.public_key().public_numbers()
    )
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith(".")} == (
        leftovers
    )


def test_loading_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(LicenseKeyError, match=r"^/nonexistent/private-key.pem: cannot read"):
        read_private_key(Path("/nonexistent/private-key.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    with pytest.raises(LicenseKeyError, match=rf"^{garbage}: not an unencrypted PEM private key"):
        read_private_key(garbage)
    with pytest.raises(LicenseKeyError, match=rf"^{garbage}: not a PEM public key"):
        read_public_key(garbage)


def test_non_rsa_and_small_keys_are_refused() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(LicenseKeyError, match="the key must be RSA"):
        load_private_key(ec_pem, "ec.pem")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - must be refused
    with pytest.raises(LicenseKeyError, match=r"small\.pem: RSA key of 1024 bits is too small"):
        load_private_key(private_key_pem(small), "small.pem")
    with pytest.raises(LicenseKeyError, match="RSA key of 1024 bits is too small"):
        load_public_key(public_key_pem(small.public_key()), "small.pub")


def test_keys_load_from_kubernetes_secret_data(key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey) -> None:
    data = {
        "private-key.pem": base64.b64encode(private_key_pem(key_a)).decode(),
        "public-key.pem": base64.b64encode(public_key_pem(key_a.public_key())).decode(),
        "public-key-2025-01.pem": base64.b64encode(public_key_pem(key_b.public_key())).decode(),
    }
    keys = SigningKeys.from_secret_data(data)
    assert keys.kid == jwk_thumbprint(key_a.public_key())
    assert set(keys.verification_keys) == {keys.kid, jwk_thumbprint(key_b.public_key())}
    # secret_data() is the inverse, retired keys included.
    again = SigningKeys.from_secret_data(keys.secret_data())
    assert again.kid == keys.kid
    assert set(again.verification_keys) == set(keys.verification_keys)


def test_secret_data_errors_name_the_data_key(key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey) -> None:
    with pytest.raises(LicenseKeyError, match=r"Secret data has no 'private-key\.pem'"):
        SigningKeys.from_secret_data({"public-key.pem": "AAAA"})
    with pytest.raises(LicenseKeyError, match=r"Secret data 'private-key\.pem' is not base64"):
        SigningKeys.from_secret_data({"private-key.pem": private_key_pem(key_a).decode()})
    mismatched = {
        "private-key.pem": base64.b64encode(private_key_pem(key_a)).decode(),
        "public-key.pem": base64.b64encode(public_key_pem(key_b.public_key())).decode(),
    }
    with pytest.raises(
        LicenseKeyError, match=r"'public-key\.pem': public key does not belong to the private key"
    ):
        SigningKeys.from_secret_data(mismatched)


def test_pem_files_must_be_a_pair(tmp_path: Path, key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey) -> None:
    private_path, public_path = write_key_pair(key_a, tmp_path / "a")
    _, other_public = write_key_pair(key_b, tmp_path / "b")
    keys = SigningKeys.from_pem_files(private_path, public_path, [other_public])
    assert set(keys.verification_keys) == {keys.kid, jwk_thumbprint(key_b.public_key())}
    with pytest.raises(LicenseKeyError, match="does not belong to the private key"):
        SigningKeys.from_pem_files(private_path, other_public)


def test_rotation_keeps_the_old_key_verifying_until_removed(
    key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey
) -> None:
    old = SigningKeys(key_a)
    rotated = old.rotate(key_b)
    assert rotated.kid == jwk_thumbprint(key_b.public_key())
    assert set(rotated.verification_keys) == {old.kid, rotated.kid}
    trimmed = rotated.without_verification_key(old.kid)
    assert set(trimmed.verification_keys) == {rotated.kid}
    with pytest.raises(LicenseKeyError, match="signs new licences"):
        rotated.without_verification_key(rotated.kid)
    with pytest.raises(LicenseKeyError, match="is not a verification key"):
        trimmed.without_verification_key(old.kid)
    assert set(trimmed.with_verification_key(key_a.public_key()).verification_keys) == {old.kid, rotated.kid}


def test_jwks_document_lists_the_signing_key_first(
    key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey
) -> None:
    keys = SigningKeys(key_a).rotate(key_b)
    document = keys.jwks()
    json.dumps(document)  # serialisable as served
    assert [entry["kid"] for entry in document["keys"]] == [keys.kid, jwk_thumbprint(key_a.public_key())]
    for entry in document["keys"]:
        assert set(entry) == {"kty", "n", "e", "kid", "use", "alg"}
        assert (entry["kty"], entry["use"], entry["alg"], entry["e"]) == ("RSA", "sig", "RS256", "AQAB")
    parsed = public_keys_from_jwks(document)
    assert {kid: key.public_numbers() for kid, key in parsed.items()} == {
        kid: key.public_numbers() for kid, key in keys.verification_keys.items()
    }


def test_jwks_parsing_skips_other_uses_and_refuses_an_empty_set(key_a: rsa.RSAPrivateKey) -> None:
    entry = public_jwk(key_a.public_key())
    assert public_keys_from_jwks({"keys": [{**entry, "use": "enc"}, entry]}).keys() == {entry["kid"]}
    without_kid = {key: value for key, value in entry.items() if key != "kid"}
    assert set(public_keys_from_jwks({"keys": [without_kid]})) == {entry["kid"]}
    with pytest.raises(LicenseKeyError, match="holds no RS256 signature key"):
        public_keys_from_jwks({"keys": [{**entry, "alg": "RS512"}]})
    with pytest.raises(LicenseKeyError, match="must have a 'keys' list"):
        public_keys_from_jwks({})
    with pytest.raises(LicenseKeyError, match="JWK member 'n' must be a non-empty base64url string"):
        public_key_from_jwk({"kty": "RSA", "e": "AQAB"})
    assert jwks_document([]) == {"keys": []}
