"""Our licences against code that is not ours: OpenSSL checks the signature, and the verifier runs
in a Python that can import nothing but the standard library, pyjwt and cryptography."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from iotistic_billing.licensing.keys import SigningKeys, generate_private_key
from iotistic_billing.licensing.minting import NO_TRIAL, LicenseCustomer, SubscriptionTerms, mint_license
from iotistic_billing.licensing.plans import PLANS

AUDIENCE = "iotistic-instance"


@pytest.fixture(scope="module")
def keys() -> SigningKeys:
    return SigningKeys(generate_private_key())


@pytest.fixture(scope="module")
def token(keys: SigningKeys) -> str:
    return mint_license(
        customer=LicenseCustomer("cust_abc123", "Acme Corp"),
        plan=PLANS["professional"],
        trial=NO_TRIAL,
        subscription=SubscriptionTerms("active"),
        now=datetime.now(UTC),
        keys=keys,
        issuer="https://billing.iotistic.cloud",
        audience=AUDIENCE,
        lifetime=timedelta(days=1),
    ).token


def _openssl_verify(
    public_pem: Path, signing_input: bytes, signature: bytes, work: Path
) -> subprocess.CompletedProcess[str]:
    data, sig = work / "signing-input.txt", work / "sig.bin"
    data.write_bytes(signing_input)
    sig.write_bytes(signature)
    return subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(public_pem), "-signature", str(sig), str(data)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_openssl_verifies_the_licence_signature(keys: SigningKeys, token: str, tmp_path: Path) -> None:
    public_pem = tmp_path / "public.pem"
    public_pem.write_bytes(keys.public_key_pem())
    header, payload, signature = token.split(".")
    raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    assert len(raw_signature) == 256  # RSA-2048, PKCS#1 v1.5

    result = _openssl_verify(public_pem, f"{header}.{payload}".encode(), raw_signature, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Verified OK"

    tampered = _openssl_verify(public_pem, f"{header}.{payload}x".encode(), raw_signature, tmp_path)
    assert tampered.returncode != 0
    assert "Verification failure" in tampered.stdout + tampered.stderr


# Imports from anywhere but the standard library, jwt and cryptography (and our three modules) fail.
_ISOLATED_VERIFY = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    STARTUP = set(sys.modules)
    # `_openssl` is the binding module inside the cryptography wheel.
    ALLOWED_THIRD_PARTY = {"jwt", "cryptography", "_openssl", "_cffi_backend", "cffi"}
    ALLOWED_OURS = {
        "iotistic_billing",
        "iotistic_billing.licensing",
        "iotistic_billing.licensing.verifier",
        "iotistic_billing.licensing.keys",
        "iotistic_billing.licensing.plans",
    }

    class OnlyVerifierDependencies(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY or name in ALLOWED_OURS:
                return None
            raise ImportError(f"blocked import of {name}")

    sys.meta_path.insert(0, OnlyVerifierDependencies())

    for blocked in ("pydantic", "sqlalchemy", "kopf", "aiohttp", "kubernetes", "iotistic_billing.settings"):
        try:
            __import__(blocked)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the blocker let {blocked} through")

    from iotistic_billing.licensing.verifier import LicenseVerifier

    verifier = LicenseVerifier.from_pem(os.environ["PUBLIC_KEY_PEM"], audience=os.environ["AUDIENCE"])
    license = verifier.verify(os.environ["TOKEN"])
    print(json.dumps({
        "valid": license.valid,
        "reason": license.reason,
        "plan": license.plan,
        "maxDevices": license.features.max_devices,
        "full": license.check_device_limit(50),
        "tampered": verifier.verify(os.environ["TOKEN"][:-4] + "AAAA").reason,
        "imported": sorted({name.partition(".")[0] for name in set(sys.modules) - STARTUP}),
    }))
    """
)


def test_verifier_runs_with_only_pyjwt_and_cryptography(keys: SigningKeys, token: str) -> None:
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "PUBLIC_KEY_PEM": keys.public_key_pem().decode(),
        "AUDIENCE": AUDIENCE,
        "TOKEN": token,
    }
    result = subprocess.run(
        [sys.executable, "-c", _ISOLATED_VERIFY], capture_output=True, text=True, env=environment, check=False
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["valid"] is True, outcome["reason"]
    assert (outcome["plan"], outcome["maxDevices"]) == ("professional", 50)
    assert outcome["full"]["error"] == "Device limit exceeded"
    assert "signature does not verify" in outcome["tampered"]
    third_party = {name for name in outcome["imported"] if name not in sys.stdlib_module_names}
    assert third_party <= {"jwt", "cryptography", "_openssl", "_cffi_backend", "cffi", "iotistic_billing"}
    assert {"cryptography", "iotistic_billing"} <= third_party
