"""Licence minting and verification per second on one core, against `openssl speed rsa2048` in the same run.

Targets: minting at least 0.8 of OpenSSL's RSA-2048 sign/s, verification at least 0.5 of its verify/s.
Exits 1 when one is missed. Run: `.venv/bin/python bench/license.py [--seconds 3] [--cpu 0]`.

Verification is measured twice. "steady" re-verifies the handful of licences an instance holds, which is
how instances use the verifier (the RSA signature is checked on every call; the decoded claims of a known
payload are reused). "cold" cycles through more distinct licences than the verifier remembers, so every
call also decodes and types the claims; it is reported, not held to the target.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from iotistic_billing.licensing.keys import SigningKeys, generate_private_key
from iotistic_billing.licensing.minting import (
    NO_TRIAL,
    LicenseCustomer,
    SubscriptionTerms,
    TrialTerms,
    mint_license,
)
from iotistic_billing.licensing.plans import PLANS
from iotistic_billing.licensing.verifier import LicenseVerifier

MINT_TARGET = 0.8
VERIFY_TARGET = 0.5
AUDIENCE = "iotistic-instance"
ISSUER = "https://billing.iotistic.cloud"
COLD_POOL = 512  # far more than the verifier's cache of decoded licences
_OPENSSL_LINE = re.compile(r"^rsa\s+2048\s+bits\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)\s*$", re.MULTILINE)


def openssl_speed(seconds: int, cpu: int) -> tuple[float, float]:
    """sign/s and verify/s from the final table line `rsa 2048 bits 0.000266s 0.000019s 3762.0 53395.3`."""
    command = ["openssl", "speed", "-seconds", str(seconds), "rsa2048"]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    match = _OPENSSL_LINE.search(result.stdout)
    if match is None:
        raise SystemExit(
            f"cannot find the rsa 2048 line in the output of {' '.join(command)}:\n{result.stdout}"
        )
    return float(match.group(1)), float(match.group(2))


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Calls per second of `operation`, in batches so that the clock is read rarely."""
    operation()  # warm caches and lazy imports outside the measurement
    calls, batch = 0, 16
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            operation()
        calls += batch
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - start)


def cycling(tokens: Sequence[str], verifier: LicenseVerifier) -> Callable[[], object]:
    index = 0
    count = len(tokens)

    def verify_next() -> object:
        nonlocal index
        index = (index + 1) % count
        return verifier.verify(tokens[index])

    return verify_next


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=3, help="seconds per measurement (default 3)")
    parser.add_argument("--cpu", type=int, default=0, help="the core to pin to (default 0)")
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, {args.cpu})
    keys = SigningKeys(generate_private_key(2048))
    customer = LicenseCustomer("cust_bench0001", "Bench Corp")
    now = datetime.now(UTC)

    def mint(plan: str = "professional", name: LicenseCustomer = customer) -> str:
        trial = TrialTerms(True, now + timedelta(days=14)) if plan == "trial" else NO_TRIAL
        return mint_license(
            customer=name,
            plan=PLANS[plan],
            trial=trial,
            subscription=SubscriptionTerms("trialing" if plan == "trial" else "active"),
            now=now,
            keys=keys,
            issuer=ISSUER,
            audience=AUDIENCE,
        ).token

    verifier = LicenseVerifier([keys.public_key], audience=AUDIENCE, issuer=ISSUER)
    held = [mint(plan) for plan in PLANS]
    plans = list(PLANS)
    cold = [
        mint(plans[i % len(plans)], LicenseCustomer(f"cust_bench{i:04d}", "Bench")) for i in range(COLD_POOL)
    ]
    for token in (*held, *cold[:8]):
        license = verifier.verify(token)
        if not license.valid:
            raise SystemExit(f"a benchmark licence does not verify: {license.reason}")

    print(f"one core (cpu {args.cpu}), {args.seconds} s per measurement, RSA-2048", flush=True)
    openssl_sign, openssl_verify = openssl_speed(args.seconds, args.cpu)
    mint_rate = rate(mint, args.seconds)
    steady_rate = rate(cycling(held, verifier), args.seconds)
    cold_rate = rate(cycling(cold, verifier), args.seconds)

    mint_ratio = mint_rate / openssl_sign
    verify_ratio = steady_rate / openssl_verify
    rows = [
        ("openssl speed rsa2048 sign", openssl_sign, None, None),
        ("openssl speed rsa2048 verify", openssl_verify, None, None),
        ("mint_license", mint_rate, mint_ratio, MINT_TARGET),
        ("LicenseVerifier.verify, steady", steady_rate, verify_ratio, VERIFY_TARGET),
        ("LicenseVerifier.verify, cold", cold_rate, cold_rate / openssl_verify, None),
    ]
    for label, per_second, ratio, target in rows:
        line = f"{label:34s} {per_second:10.1f}/s"
        if ratio is not None:
            line += f"   {ratio:5.2f} of openssl"
            if target is not None:
                line += f" (target >= {target}: {'met' if ratio >= target else 'MISSED'})"
        print(line)
    missed = mint_ratio < MINT_TARGET or verify_ratio < VERIFY_TARGET
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
