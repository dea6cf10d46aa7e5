"""The processes listen on IPv4 and IPv6, so that they serve an IPv6 or dual-stack cluster as an IPv4 one:
the webhook server and its inbox on both families, the operator's metrics on both, and Kopf's liveness
endpoint (one family) on POD_IP's, the address the kubelet probes."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.processes import free_port
from tests.conftest import OperatorProcess, http_status, wait_until
from tests.integration.webhook_support import ServerProcess, server_env

pytestmark = pytest.mark.integration


def test_the_webhook_server_and_its_inbox_answer_on_ipv4_and_ipv6(
    database_url: str,
    stripe_mock: StripeMock,
    license_keys: tuple[Path, Path],
    kubeconfig: Path,
    tmp_path: Path,
) -> None:
    env = server_env(database_url, stripe_mock, license_keys, kubeconfig, free_port())
    server = ServerProcess(env, tmp_path / "webhooks.log").start()
    try:
        inbox = f"http://127.0.0.1:{env['STRIPE_INBOX_PORT']}/healthz"
        wait_until(lambda: http_status(inbox) == 200, timeout=60, message="the inbox process's /healthz")
        for port in (env["PORT"], env["STRIPE_INBOX_PORT"]):
            for loopback in ("127.0.0.1", "[::1]"):
                assert http_status(f"http://{loopback}:{port}/healthz") == 200, (loopback, port)
        assert http_status(f"http://[::1]:{env['PORT']}/api/licenses/public-key") == 200
    finally:
        server.terminate()


@pytest.mark.parametrize(
    ("pod_ip", "probed", "other"), [("fd00::7", "[::1]", "127.0.0.1"), ("10.0.0.7", "127.0.0.1", "[::1]")]
)
def test_the_operator_s_liveness_listens_on_the_pod_ip_s_family_and_its_metrics_on_both(
    operator_env: dict[str, str], tmp_path: Path, pod_ip: str, probed: str, other: str
) -> None:
    operator = OperatorProcess(operator_env, tmp_path / "operator.log")
    # A shard no Customer is labelled with: this operator reconciles nothing of the session's.
    operator.start(POD_IP=pod_ip, OPERATOR_SHARDS="64", OPERATOR_SHARD="63")
    try:
        liveness = operator.liveness_url.rsplit(":", 1)[1]
        assert http_status(f"http://{probed}:{liveness}") == 200
        # Kopf binds one family: the other is not served (an asyncio "::" socket is IPv6 alone).
        assert http_status(f"http://{other}:{liveness}") == 0
        metrics = operator.metrics_url.rsplit(":", 1)[1]
        for loopback in ("127.0.0.1", "[::1]"):
            assert http_status(f"http://{loopback}:{metrics}") == 200, loopback
    finally:
        operator.kill()
