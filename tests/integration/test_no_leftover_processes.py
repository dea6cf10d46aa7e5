"""An interrupted run leaves no etcd, kube-apiserver, stripe-mock or postgres process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STARTER = """
import signal, sys, time
from pathlib import Path
# A test run started in the background of a script (`cmd &`) inherits SIGINT ignored, and Python then
# keeps it ignored: this runner takes Ctrl-C as an interactive `make dev` does.
signal.signal(signal.SIGINT, signal.default_int_handler)
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.devenv.controlplane import ControlPlane
from iotistic_billing.devenv.stripe_mock import StripeMock
work = Path(sys.argv[1])
parts = [ControlPlane(work / "cp"), EmbeddedPostgres(work / "pg"), StripeMock(work)]
try:
    for part in parts:
        part.start()
    pids = [parts[0].etcd.pid, parts[0].apiserver.pid, parts[1].process.pid, parts[2].process.pid]
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(600)
finally:
    for part in reversed(parts):
        part.stop()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; only its parent's wait() is missing.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_gone(pids: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


@pytest.mark.parametrize("interrupt", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_run_leaves_no_process(tmp_path: Path, interrupt: signal.Signals) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert runner.stdout is not None
    line = runner.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 4, f"the runner did not start every part: {line!r}"
    assert all(_alive(pid) for pid in pids)
    # SIGINT runs the finally blocks; SIGTERM and SIGKILL end Python without them, so there the
    # kernel's parent-death signal is what stops the children.
    runner.send_signal(interrupt)
    runner.wait(60)
    assert _wait_gone(pids) == [], f"left behind after {interrupt.name}: {pids}"
