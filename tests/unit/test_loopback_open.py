"""Services on this machine are asked directly, whatever proxy the environment names."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from iotistic_billing.processes import loopback_open


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def local_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz"
    finally:
        server.shutdown()
        server.server_close()


def test_a_local_service_is_asked_directly_though_the_environment_names_a_proxy(
    local_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: with http_proxy set and no no_proxy, urllib sent 127.0.0.1 to the proxy, and
    `make dev` failed after 30 s saying Mailpit did not start (its log showed it running)."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://proxy.invalid:3128")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with loopback_open(local_url, timeout=5) as answer:
        assert (answer.status, answer.read()) == (200, b"ok")
