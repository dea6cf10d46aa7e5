"""`make dev`'s runner: prints `ready`, writes .dev/env and .dev/kubeconfig, stops everything on Ctrl-C,
and starts again from the kept data."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from iotistic_billing.processes import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

ENV_NAMES = {
    "KUBECONFIG",
    "DATABASE_URL",
    "ADMIN_API_TOKEN",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_PRICE_STARTER",
    "STRIPE_PRICE_PROFESSIONAL",
    "STRIPE_PRICE_ENTERPRISE",
    "BILLING_URL",
}


def _start(state: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "iotistic_billing.devenv", "--state", str(state), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"dev runner exited early:\n{''.join(lines)}")
        lines.append(line)
        if line.strip() == "ready":
            return process, lines
    raise AssertionError(f"no `ready` line:\n{''.join(lines)}")


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = shlex.split(value)[0]
    return values


def _kubectl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *args],
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        capture_output=True,
        text=True,
    )


def _stop(process: subprocess.Popen[str], burst: bool = False) -> None:
    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "the dev runner started no child process"
    process.send_signal(signal.SIGINT)
    if burst:
        # More signals while it stops, as a double Ctrl-C or `timeout` (the process and its group) send:
        # a handler that took a lock deadlocked in a run of it (5 of 20 runs of a model of it).
        deadline = time.monotonic() + 1
        while process.poll() is None and time.monotonic() < deadline:
            for _ in range(100):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
    # A SIGTERM that lands once Python has restored the default handlers on its way out ends it as -15.
    assert process.wait(60) in ((0, -signal.SIGTERM) if burst else (0,))
    _, alive = psutil.wait_procs(children, timeout=30)
    assert [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def test_dev_runner_ready_env_clean_stop_and_restart(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    process, _ = _start(state, free_port())
    try:
        env = _read_env(state / "env")
        assert set(env) >= ENV_NAMES
        assert Path(env["KUBECONFIG"]) == state / "kubeconfig"
        assert Path(env["KUBECACHEDIR"]) == state / "kube-cache"
        assert _kubectl(env, "get", "namespace", "default").returncode == 0
        created = _kubectl(env, "create", "configmap", "kept-between-runs", "--from-literal=a=b")
        assert created.returncode == 0, created.stderr
        # The webhook server answers on BILLING_URL with the admin token of .dev/env.
        import json
        import urllib.request

        request = urllib.request.Request(  # noqa: S310 - loopback
            env["BILLING_URL"] + "/api/queue/stats",
            headers={"Authorization": f"Bearer {env['ADMIN_API_TOKEN']}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            assert isinstance(json.loads(response.read()), dict)
        # The operator runs and reconciles the sample Customers of manifests/samples.
        for sample in ("acme", "globex"):
            wait_until(
                lambda name=sample: (
                    _kubectl(env, "get", "cust", name, "-o", "jsonpath={.status.release.revision}").stdout
                    == "1"
                ),
                timeout=90,
                message=f"sample Customer {sample} provisioned",
            )
        # The dev runner's kubectl (and the operator's helm) cache discovery in the dev state, not in ~/.kube.
        assert list((state / "kube-cache" / "discovery").iterdir())
    finally:
        _stop(process)

    process, _ = _start(state, free_port())
    try:
        again = _read_env(state / "env")
        assert again["ADMIN_API_TOKEN"] == env["ADMIN_API_TOKEN"]
        kept = _kubectl(again, "get", "configmap", "kept-between-runs", "-o", "jsonpath={.data.a}")
        assert kept.stdout == "b", kept.stderr
    finally:
        _stop(process, burst=True)
