"""Where the operator listens: Kopf's /healthz on the family of POD_IP (the address the kubelet probes),
/metrics on both families whatever the host's net.ipv6.bindv6only."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from iotistic_billing.operator.__main__ import liveness_endpoint
from iotistic_billing.settings import Settings


@pytest.mark.parametrize(
    ("pod_ip", "port", "endpoint"),
    [
        (None, 8080, "http://0.0.0.0:8080/healthz"),
        ("10.244.0.7", 8080, "http://0.0.0.0:8080/healthz"),
        ("fd00:10:244::7", 9090, "http://[::]:9090/healthz"),
        ("fd00:10:244::7", 0, None),  # off
    ],
)
def test_kopf_s_liveness_endpoint_listens_on_the_pod_ip_s_family(
    pod_ip: str | None, port: int, endpoint: str | None
) -> None:
    settings = Settings(pod_ip=pod_ip, operator_liveness_port=port, operator_metrics_port=8081)
    assert liveness_endpoint(settings) == endpoint


def test_metrics_answer_on_ipv4_and_ipv6_where_the_host_sets_bindv6only() -> None:
    """A "::" socket follows net.ipv6.bindv6only unless it says otherwise: prometheus_client's served
    IPv6 alone on such a host. Run in a network namespace of its own with the setting on."""
    script = textwrap.dedent(
        """
        import subprocess, urllib.request
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        with open("/proc/sys/net/ipv6/bindv6only", "w") as setting:
            setting.write("1")
        from iotistic_billing.operator.__main__ import serve_metrics
        serve_metrics(19090)
        for host in ("127.0.0.1", "[::1]"):
            with urllib.request.urlopen(f"http://{host}:19090/metrics", timeout=5) as response:
                print(host, response.status)
        """
    )
    ran = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["127.0.0.1", "200", "[::1]", "200"]
