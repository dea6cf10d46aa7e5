"""How the one Kubernetes helper talks to an API server that hangs, throttles or refuses: fake API
servers on a local port (no cluster here), short timeouts, nothing left waiting after a test."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from iotistic_billing import k8s
from iotistic_billing.k8s import (
    FieldManager,
    Kube,
    KubeApi,
    KubernetesUnavailable,
    api_client,
)
from iotistic_billing.operator.__main__ import build_context
from iotistic_billing.operator.watches import INSTANCE_DEPLOYMENTS
from iotistic_billing.settings import Settings
from tests.conftest import wait_until

T = TypeVar("T")


def kubeconfig_for(port: int, folder: Path) -> str:
    path = folder / f"kubeconfig-{port}"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f'clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"}}}}]\n'
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    return str(path)


class HungApiServer:
    """Accepts connections and reads each request's first line, and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[str] = []
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.requests.append(connection.recv(65536).split(b"\r\n", 1)[0].decode())

    def close(self) -> None:
        """Refuse new connections and end the open ones: a call still waiting ends at once."""
        for sock in [self.listener, *self._connections]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def hung() -> Iterator[HungApiServer]:
    server = HungApiServer()
    try:
        yield server
    finally:
        server.close()


def within(seconds: float, call: Callable[[], T]) -> T:
    """`call`'s result or exception, failing the test if it has neither after `seconds` (the call goes
    on in a daemon thread until its server closes)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("returned", call()))
        except Exception as error:
            outcome.append(("raised", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting for the API server after {seconds} s"
    how, value = outcome[0]
    if how == "raised":
        raise value
    result: T = value
    return result


def test_the_operators_calls_and_lists_give_up_on_an_api_server_that_never_answers(
    hung: HungApiServer,
    tmp_path: Path,
    license_keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the operator built its clients without a timeout, so a call to a hung API
    server held its pass's lock and slot for ever, and a watch's list again never listed again."""
    monkeypatch.setattr(k8s, "CALL_TIMEOUT", (1.0, 0.5), raising=False)
    private_key, public_key = license_keys
    settings = Settings(license_private_key_path=private_key, license_public_key_path=public_key)
    ctx = build_context(settings, "postgresql://nobody@127.0.0.1:1/none", kubeconfig_for(hung.port, tmp_path))
    for call in (
        lambda: ctx.kube.api.read_customer("acme"),
        lambda: ctx.watch_api.list_at(INSTANCE_DEPLOYMENTS),
    ):
        with pytest.raises(KubernetesUnavailable, match="cannot be reached"):
            within(5, call)


async def test_kube_calls_wait_in_threads_of_their_own_not_in_asyncios_default_pool(
    hung: HungApiServer, tmp_path: Path
) -> None:
    """Found in review: Kube ran its calls in asyncio's default pool (the CPU count + 4 threads), which
    calls to a hung API server filled, so every other call there queued behind them."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))
    api = KubeApi(
        api_client("test", kubeconfig=kubeconfig_for(hung.port, tmp_path)), FieldManager.CLI, (1, 5)
    )
    kube = Kube(api, concurrency=2)
    calls = [asyncio.create_task(kube.read_customer(f"c{i}")) for i in range(4)]
    try:
        await asyncio.sleep(0)  # each call is handed to a thread
        wait_until(lambda: len(hung.requests) >= 2, 5, "two calls at the API server")
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 1) == "free"
        assert len(hung.requests) == 2  # the others wait their turn
    finally:
        hung.close()
        await asyncio.gather(*calls, return_exceptions=True)
        kube.close()
