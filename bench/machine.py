"""How fast this machine is right now, measured and printed at the start of every bench: its speed moves
by a factor of two between phases here, and every result is read against it."""

from __future__ import annotations

import subprocess
import sys


def machine_speed() -> int:
    """RSA-2048 signatures a second by `openssl speed` (3 s)."""
    out = subprocess.run(
        ["openssl", "speed", "-seconds", "3", "rsa2048"], capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("rsa 2048"))
    return round(float(line.split()[-2]))


def print_machine_speed() -> int:
    """The speed, printed to stderr (the benches that print JSON keep stdout for it); returned for the
    results that carry it."""
    speed = machine_speed()
    print(f"machine: openssl rsa2048 {speed} signs/s", file=sys.stderr, flush=True)
    return speed
