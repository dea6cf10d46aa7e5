"""How the one Kubernetes helper talks to an API server that hangs, throttles or refuses: fake API
servers on a local port (no cluster here), short timeouts, nothing left waiting after a test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing import k8s
from iotistic_billing.cli import main as cli
from iotistic_billing.cli.customer import _api_error
from iotistic_billing.k8s import (
    KUBE_CONCURRENCY,
    FieldManager,
    Kube,
    KubeApi,
    KubernetesUnavailable,
    api_client,
    refusal_message,
)
from iotistic_billing.operator.__main__ import build_context
from iotistic_billing.operator.watches import INSTANCE_DEPLOYMENTS
from iotistic_billing.settings import Settings
from iotistic_billing.webhook_server.errors import problem_of
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


class AnsweringApiServer:
    """Answers every request with `status`, a Status body saying `message`, and `headers`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = json.dumps({"kind": "Status", "code": status, "message": message}).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PATCH(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.do_GET()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def answering(
    status: int, message: str, headers: dict[str, str] | None = None
) -> Iterator[AnsweringApiServer]:
    server = AnsweringApiServer(status, message, headers)
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
        with pytest.raises(KubernetesUnavailable, match="did not answer in time"):
            within(5, call)


def test_a_read_that_times_out_is_not_tried_again(hung: HungApiServer, tmp_path: Path) -> None:
    """Found in review: urllib3's default retries made a GET wait four times its timeout."""
    api = KubeApi(api_client("test", kubeconfig=kubeconfig_for(hung.port, tmp_path)), FieldManager.CLI, 0.5)
    with pytest.raises(KubernetesUnavailable) as unavailable:
        within(5, lambda: api.read_customer("acme"))
    assert hung.requests == ["GET /apis/iotistic.io/v1alpha1/customers/acme HTTP/1.1"]  # no second try
    assert str(unavailable.value) == "the API server did not answer in time"
    assert not unavailable.value.maybe_applied


def test_a_write_left_unanswered_may_have_been_made(hung: HungApiServer, tmp_path: Path) -> None:
    """Found in review: a patch whose answer timed out was reported as "nothing was changed", though the
    server may have made it (a retry then met it, a 409 for a create)."""
    api = KubeApi(api_client("test", kubeconfig=kubeconfig_for(hung.port, tmp_path)), FieldManager.CLI, 0.5)
    with pytest.raises(KubernetesUnavailable) as unavailable:
        within(5, lambda: api.patch_customer("acme", {"spec": {"plan": "starter"}}))
    assert unavailable.value.maybe_applied
    with pytest.raises(KubernetesUnavailable) as listing:
        within(5, api.list_customers)  # a read, through a bound partial
    assert not listing.value.maybe_applied


@pytest.mark.parametrize(("status", "maybe_applied"), [(500, True), (504, True), (503, False), (429, False)])
def test_which_failed_answers_leave_a_write_in_doubt(
    status: int, maybe_applied: bool, tmp_path: Path
) -> None:
    with answering(status, "failed") as server:
        api = KubeApi(
            api_client("test", kubeconfig=kubeconfig_for(server.port, tmp_path)), FieldManager.CLI, 5
        )
        with pytest.raises(KubernetesUnavailable) as written:
            within(10, lambda: api.patch_customer("acme", {"spec": {"plan": "starter"}}))
        with pytest.raises(KubernetesUnavailable) as read:
            within(10, lambda: api.read_customer("acme"))
    assert (written.value.maybe_applied, read.value.maybe_applied) == (maybe_applied, False)


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_is_the_callers_to_wait_not_the_clients(status: int, tmp_path: Path) -> None:
    """Found in review: urllib3 slept through Retry-After three times before the caller heard of it."""
    with answering(status, "too many requests", {"Retry-After": "1"}) as server:
        api = KubeApi(
            api_client("test", kubeconfig=kubeconfig_for(server.port, tmp_path)), FieldManager.CLI, 5
        )
        started = time.monotonic()
        with pytest.raises(KubernetesUnavailable, match=f"the API server answered {status}"):
            within(10, lambda: api.read_customer("acme"))
        with pytest.raises(KubernetesUnavailable, match=f"cannot watch instance Deployments: .* {status}"):
            within(10, lambda: next(api.watch(INSTANCE_DEPLOYMENTS, "10")))
        # Below the two seconds one wait per call would take (a loaded machine answers well within it).
        assert time.monotonic() - started < 2
        assert len(server.requests) == 2


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_watch_keeps_its_code_and_message(status: int, tmp_path: Path) -> None:
    """Found in review: a watch refused by RBAC (403) or for a rotated token (401) was reported as an
    API server away, its code and message lost."""
    said = 'deployments.apps is forbidden: User "system:serviceaccount:billing:operator" cannot watch'
    with answering(status, said) as server:
        api = KubeApi(
            api_client("test", kubeconfig=kubeconfig_for(server.port, tmp_path)), FieldManager.CLI, 5
        )
        with pytest.raises(ApiException) as refused:
            within(10, lambda: next(api.watch(INSTANCE_DEPLOYMENTS, "10")))
    assert not isinstance(refused.value, KubernetesUnavailable)
    assert refused.value.status == status
    assert refusal_message(refused.value) == said


def test_the_clients_sockets_keep_alive(tmp_path: Path) -> None:
    """A watch's connection a load balancer dropped while it was quiet is noticed by the kernel."""
    client = api_client("test", kubeconfig=kubeconfig_for(1, tmp_path))
    options = client.rest_client.pool_manager.connection_pool_kw["socket_options"]
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
    # Found in review: urllib3's pool held 5 connections a CPU (10 here) for Kube's 16 threads, and
    # dropped the others after each call with a warning, a new connection every time.
    assert client.rest_client.pool_manager.connection_pool_kw["maxsize"] >= KUBE_CONCURRENCY


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


def test_a_change_in_doubt_is_not_reported_as_nothing_changed() -> None:
    doubt = KubernetesUnavailable("the API server did not answer in time", maybe_applied=True)
    away = KubernetesUnavailable("the API server cannot be reached (NewConnectionError)")
    assert str(_api_error(doubt)) == (
        "the API server did not answer in time; the change may have been made: running the same command"
        " again is safe (it makes the same change, or finds it made)"
    )
    assert str(_api_error(away)).endswith("; nothing was changed, try again")
    assert "may have been made" in problem_of(doubt).message
    assert "nothing was changed" in problem_of(away).message


@pytest.mark.parametrize(("status", "exit_code"), [(503, 1), (504, 1), (403, 2)])
def test_the_cli_exits_1_for_an_api_server_away_and_2_for_a_refusal(
    status: int,
    exit_code: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found in review: every failure of `iotistic-billing customer` exited 2, the code of a bad
    argument, so a cron job could not tell "try again later" from "fix the command"."""
    with answering(status, "said by the API server") as server:
        monkeypatch.setenv("KUBECONFIG", kubeconfig_for(server.port, tmp_path))
        code = within(10, lambda: cli(["customer", "deactivate", "--id", "acme"]))
    assert code == exit_code, capsys.readouterr().err


def test_an_event_on_a_kind_the_operator_posts_none_about_is_refused_naming_it() -> None:
    api = KubeApi(cast(Any, None), FieldManager.CLI)
    with pytest.raises(ValueError, match="kind must be one of Customer, InstanceRollout, got 'Namespace'"):
        api.create_event(cast(Any, "Namespace"), {"metadata": {"name": "acme"}}, reason="X", message="y")


def test_a_name_is_one_path_segment_and_the_query_is_the_api_servers(tmp_path: Path) -> None:
    """KubeApi builds the REST paths itself (not the client's typed classes): a name typed on a command
    line (`customer upgrade --id a/../b`) must not reach another path."""
    with answering(404, "not found") as server:
        api = KubeApi(api_client("test", kubeconfig=kubeconfig_for(server.port, tmp_path)), FieldManager.CLI)
        assert api.read_customer("a/../b") is None
        assert api.list_deployments("customer-acme", "app=x,tier in (a,b)") == []
    assert server.requests == [
        "/apis/iotistic.io/v1alpha1/customers/a%2F..%2Fb",
        "/apis/apps/v1/namespaces/customer-acme/deployments?labelSelector=app%3Dx%2Ctier%20in%20%28a%2Cb%29",
    ]
