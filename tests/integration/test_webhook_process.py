"""`python -m iotistic_billing.webhook_server` as it is deployed: start-up checks and graceful shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.processes import free_port
from tests.conftest import OperatorProcess, unique_name, wait_until
from tests.integration.webhook_support import ADMIN_TOKEN, ServerProcess, server_env

pytestmark = pytest.mark.integration


@pytest.fixture
def env(
    database_url: str, stripe_mock: StripeMock, license_keys: tuple[Path, Path], kubeconfig: Path
) -> dict[str, str]:
    return server_env(database_url, stripe_mock, license_keys, kubeconfig, free_port())


def run_briefly(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iotistic_billing.webhook_server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"PORT": "not-a-port"}, "PORT"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"ADMIN_API_TOKEN": "short-secret"}, "ADMIN_API_TOKEN"),
        ({"LICENSE_PRIVATE_KEY_PATH": "/nonexistent/private-key.pem"}, "LICENSE_PRIVATE_KEY_PATH"),
        # The Stripe inbox process listens on STRIPE_INBOX_PORT, by default PORT + 1.
        ({"PORT": "65535", "STRIPE_INBOX_PORT": "0"}, "STRIPE_INBOX_PORT: unset, it is PORT + 1 = 65536"),
        ({"PORT": "3999", "STRIPE_INBOX_PORT": "3999"}, "STRIPE_INBOX_PORT: must differ from PORT"),
    ],
)
def test_a_bad_setting_stops_the_start_with_its_name(
    env: dict[str, str], change: dict[str, str], variable: str
) -> None:
    environment = {**env, **change}
    if change.get("DATABASE_URL") == "":
        del environment["DATABASE_URL"]
    result = run_briefly(environment)
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr
    assert "short-secret" not in result.stderr  # a secret's value is never echoed


def test_sigterm_lets_the_request_in_flight_finish(
    env: dict[str, str], tmp_path: Path, operator: OperatorProcess
) -> None:
    """Signup waits for the operator's licence; a SIGTERM meanwhile still gets it its answer."""
    server = ServerProcess(env, tmp_path / "webhooks.log").start()
    answer: dict[str, Any] = {}

    def signup() -> None:
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{server.url}/api/customers",
            data=json.dumps(
                {"email": f"ops@{unique_name('term')}.example.com", "company_name": unique_name("Sigterm")}
            ).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
            answer["status"] = response.status
            answer["body"] = json.loads(response.read())

    caller = threading.Thread(target=signup)
    try:
        caller.start()
        time.sleep(0.3)  # the request is in flight: the Customer is being created or its licence awaited
        started = time.monotonic()
        assert server.terminate(timeout=40) == 0
        caller.join(30)
        assert answer["status"] in (201, 202)
        assert answer["body"]["customer"]["customer_id"].startswith("cust_")
        assert time.monotonic() - started < 35
    finally:
        server.kill()
    log = (tmp_path / "webhooks.log").read_text()
    assert ADMIN_TOKEN not in log


def test_the_stripe_inbox_port_serves_probes_and_metrics_only(env: dict[str, str], tmp_path: Path) -> None:
    """The inbox process beside the server answers the kubelet and Prometheus on its port, not the API
    (which stays on the server's port, behind its rate limits)."""
    server = ServerProcess(env, tmp_path / "webhooks.log").start()
    inbox = f"http://127.0.0.1:{env['STRIPE_INBOX_PORT']}"

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    try:
        wait_until(lambda: status(f"{inbox}/healthz") == 200, timeout=60, message="inbox /healthz")
        assert status(f"{inbox}/metrics") == 200
        assert status(f"{inbox}/api/openapi.json") == 404
        assert status(f"{inbox}/api/licenses/public-key") == 404
        assert status(f"{server.url}/api/licenses/public-key") == 200
    finally:
        server.terminate()
