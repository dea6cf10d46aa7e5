"""`python -m iotistic_billing.webhook_server` as it is deployed: start-up checks and graceful shutdown."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import kubernetes
import pytest

from iotistic_billing.customer import resource_name_for
from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.processes import free_port
from tests.conftest import OperatorProcess, http_status, unique_name, wait_until
from tests.integration.webhook_support import ADMIN_TOKEN, Customers, ServerProcess, server_env

pytestmark = pytest.mark.integration


@pytest.fixture
def env(
    database_url: str, stripe_mock: StripeMock, license_keys: tuple[Path, Path], kubeconfig: Path
) -> dict[str, str]:
    # Room for a busy machine's operator: a signup waiting for its licence answers 201 (SIGNUP_LICENSE_WAIT).
    return {
        **server_env(database_url, stripe_mock, license_keys, kubeconfig, free_port()),
        "SIGNUP_LICENSE_WAIT": "25",
    }


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
        ({"SIGNUP_LICENSE_WAIT": "-1"}, "SIGNUP_LICENSE_WAIT"),
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


def signup_in_thread(server_url: str, company_name: str, answer: dict[str, Any]) -> threading.Thread:
    """POST /api/customers as an admin in a thread of its own, which puts the answer's `status` and
    `body` (or its `error`) into `answer`."""

    def call() -> None:
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{server_url}/api/customers",
            data=json.dumps(
                {"email": f"ops@{unique_name('signup')}.example.com", "company_name": company_name}
            ).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
                answer["status"], answer["body"] = response.status, json.loads(response.read())
        except Exception as error:  # the test asserts on it
            answer["error"] = repr(error)

    caller = threading.Thread(target=call)
    caller.start()
    return caller


@contextmanager
def signup_waiting_for_its_licence(
    server: ServerProcess, operator: OperatorProcess, company: str
) -> Iterator[tuple[threading.Thread, dict[str, Any]]]:
    """A signup of `company` in a thread of its own (signup_in_thread) and its answer, while the
    operator is stopped (SIGSTOP) for the block and once the server logged that the signup created its
    Customer: the server is then waiting for a licence that comes only after the block, however fast the
    operator would have been."""
    assert operator.process is not None
    name, answer = resource_name_for(company), {}
    operator.process.send_signal(signal.SIGSTOP)
    try:
        caller = signup_in_thread(server.url, company, answer)
        wait_until(
            lambda: f"signup created Customer {name} " in server.log.read_text(),
            timeout=30,
            interval=0.05,
            message=f"signup of {name} created its Customer; log: {server.log}",
        )
        yield caller, answer
    finally:
        operator.process.send_signal(signal.SIGCONT)


def licence_claims(token: str, license_keys: tuple[Path, Path]) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, license_keys[1].read_bytes(), algorithms=["RS256"], audience="iotistic-instance"
    )
    return claims


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_sigterm_lets_the_request_in_flight_finish(
    env: dict[str, str],
    tmp_path: Path,
    operator: OperatorProcess,
    k8s_client: kubernetes.client.ApiClient,
    license_keys: tuple[Path, Path],
) -> None:
    """A signup waiting for its licence at the SIGTERM gets its full answer after it: the licence the
    operator issued once the server had stopped listening."""
    log = tmp_path / "webhooks.log"
    server = ServerProcess(env, log).start()
    company = unique_name("Sigterm")
    name = resource_name_for(company)
    try:
        with signup_waiting_for_its_licence(server, operator, company) as (caller, answer):
            assert answer == {}, "signup answered before its licence existed"
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            wait_until(
                lambda: not accepting(server.port), timeout=10, interval=0.05, message="listener closed"
            )
        caller.join(30)
        assert answer.get("status") == 201, answer
        claims = licence_claims(answer["body"]["license"]["jwt"], license_keys)
        assert claims["customerId"] == answer["body"]["customer"]["customer_id"]
        assert server.process.wait(30) == 0
    finally:
        server.kill()
        Customers(k8s_client).delete(name)
    assert ADMIN_TOKEN not in log.read_text()


def test_the_server_process_answers_a_signup_with_201_and_its_licence(
    env: dict[str, str],
    tmp_path: Path,
    operator: OperatorProcess,
    k8s_client: kubernetes.client.ApiClient,
    license_keys: tuple[Path, Path],
) -> None:
    """The server waits for the operator's licence (SIGNUP_LICENSE_WAIT), which comes after the
    Customer, and answers with it."""
    server = ServerProcess(env, tmp_path / "webhooks.log").start()
    company = unique_name("Licensed")
    try:
        with signup_waiting_for_its_licence(server, operator, company) as (caller, answer):
            pass
        caller.join(30)
    finally:
        server.stop()
        Customers(k8s_client).delete(resource_name_for(company))
    assert answer.get("status") == 201, answer
    claims = licence_claims(answer["body"]["license"]["jwt"], license_keys)
    assert claims["customerId"] == claims["sub"] == answer["body"]["customer"]["customer_id"]


def test_a_signup_that_waits_for_no_licence_answers_202_at_once(
    env: dict[str, str], tmp_path: Path, operator: OperatorProcess, k8s_client: kubernetes.client.ApiClient
) -> None:
    """SIGNUP_LICENSE_WAIT=0: the Customer is created and the answer says where its licence will be,
    at once (the default would hold it 10 s for the stopped operator's licence)."""
    server = ServerProcess({**env, "SIGNUP_LICENSE_WAIT": "0"}, tmp_path / "webhooks.log").start()
    company = unique_name("Unwaited")
    try:
        with signup_waiting_for_its_licence(server, operator, company) as (caller, answer):
            caller.join(5)
            assert answer.get("status") == 202, answer
    finally:
        server.stop()
        Customers(k8s_client).delete(resource_name_for(company))
    assert answer["body"]["license"] is None, answer
    assert answer["body"]["customer"]["resource_name"] == resource_name_for(company)


def test_the_stripe_inbox_port_serves_probes_and_metrics_only(env: dict[str, str], tmp_path: Path) -> None:
    """The inbox process beside the server answers the kubelet and Prometheus on its port, not the API
    (which stays on the server's port, behind its rate limits)."""
    server = ServerProcess(env, tmp_path / "webhooks.log").start()
    inbox = f"http://127.0.0.1:{env['STRIPE_INBOX_PORT']}"

    try:
        wait_until(lambda: http_status(f"{inbox}/healthz") == 200, timeout=60, message="inbox /healthz")
        assert http_status(f"{inbox}/metrics") == 200
        assert http_status(f"{inbox}/api/openapi.json") == 404
        assert http_status(f"{inbox}/api/licenses/public-key") == 404
        assert http_status(f"{server.url}/api/licenses/public-key") == 200
    finally:
        server.terminate()
