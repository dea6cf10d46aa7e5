"""`make dev`'s own parts: the `.dev/env` a person sources and the ports it names, kept between runs; the
kubeconfig of an existing cluster; a stop or a part too slow during start-up."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from iotistic_billing import processes
from iotistic_billing.db import embedded
from iotistic_billing.devenv import __main__ as runner
from iotistic_billing.devenv.__main__ import KeptPorts, dev_commands, existing_kubeconfig, write_env
from iotistic_billing.devenv.controlplane import REPO_BIN
from iotistic_billing.devenv.pki import CertificateAuthority
from iotistic_billing.devenv.registry import ChartRegistry


def test_env_puts_the_readme_s_commands_on_a_user_s_path(tmp_path: Path) -> None:
    """After `source .dev/env` in a shell with only the system's PATH, `kubectl` is bin/'s and
    `iotistic-billing` the virtual environment's, as the `next:` line and the README have a person type."""
    env = tmp_path / "env"
    write_env(env, {"BILLING_URL": "http://127.0.0.1:3100"}, dev_commands())
    found = subprocess.run(
        ["bash", "-c", f"source {env}; command -v kubectl; command -v iotistic-billing; echo $BILLING_URL"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )

    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines() == [
        str(REPO_BIN / "kubectl"),
        str(Path(sys.executable).parent / "iotistic-billing"),
        "http://127.0.0.1:3100",
    ]
    assert os.stat(env).st_mode & 0o077 == 0


def kubeconfig_file(folder: Path, name: str, server: str, current: bool) -> Path:
    """A kubeconfig of one cluster whose CA and client certificate are files named relative to it."""
    folder.mkdir(parents=True)
    for pem in ("ca.crt", "client.crt", "client.key"):
        (folder / pem).write_text(f"{name} {pem}\n")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": "ca.crt"}}],
        "users": [{"name": name, "user": {"client-certificate": "client.crt", "client-key": "client.key"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    }
    if current:
        config["current-context"] = name
    path = folder / "config"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_existing_cluster_s_kubeconfig_is_the_merged_list_made_self_contained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KUBECONFIG as kubectl documents it, a list of files; their relative certificate paths resolve."""
    first = kubeconfig_file(tmp_path / "work", "work", "https://work.example:6443", current=True)
    second = kubeconfig_file(tmp_path / "lab", "lab", "https://lab.example:6443", current=False)
    monkeypatch.chdir(tmp_path)  # the relative paths are the files' own, not the working directory's

    merged = yaml.safe_load(
        existing_kubeconfig({"KUBECONFIG": f"{first}{os.pathsep}{second}", "HOME": str(tmp_path)})
    )

    assert merged["current-context"] == "work"
    assert sorted(c["name"] for c in merged["contexts"]) == ["lab", "work"]
    clusters = {c["name"]: c["cluster"] for c in merged["clusters"]}
    assert clusters["lab"]["server"] == "https://lab.example:6443"
    assert base64.b64decode(clusters["work"]["certificate-authority-data"]) == b"work ca.crt\n"
    users = {u["name"]: u["user"] for u in merged["users"]}
    assert base64.b64decode(users["lab"]["client-key-data"]) == b"lab client.key\n"
    assert "certificate-authority" not in clusters["work"] and "client-key" not in users["lab"]


def test_an_existing_cluster_without_a_current_context_is_refused_by_name(tmp_path: Path) -> None:
    lab = kubeconfig_file(tmp_path / "lab", "lab", "https://lab.example:6443", current=False)

    with pytest.raises(SystemExit, match=f"KUBECONFIG {lab} sets no current-context"):
        existing_kubeconfig({"KUBECONFIG": str(lab), "HOME": str(tmp_path)})


def test_a_restart_takes_the_ports_of_the_last_start(tmp_path: Path) -> None:
    """Found in review: PostgreSQL, Mailpit, the registry and stripe-mock took new ports on every start,
    so a shell that had sourced .dev/env pointed at dead ports (or at someone else's) after a restart."""
    first = KeptPorts(tmp_path / "ports.json")
    port = first.port("postgres")
    first.keep("postgres", port)

    assert KeptPorts(tmp_path / "ports.json").port("postgres") == port
    # The last run's connections waiting in TIME_WAIT do not make the port taken: servers bind with
    # SO_REUSEADDR.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server's side closes first: its end waits in TIME_WAIT
            client.recv(1)
    assert KeptPorts(tmp_path / "ports.json").port("postgres") == port


def test_a_kept_port_another_process_listens_on_is_refused_by_number(tmp_path: Path) -> None:
    kept = KeptPorts(tmp_path / "ports.json")
    kept.keep("mailpit-smtp", kept.port("mailpit-smtp"))
    port = KeptPorts(tmp_path / "ports.json").port("mailpit-smtp")
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(RuntimeError) as taken:
            KeptPorts(tmp_path / "ports.json").port("mailpit-smtp")
    assert str(taken.value).startswith(
        f"port {port} of mailpit-smtp, kept in {tmp_path / 'ports.json'}, is taken by another process"
    )


class SlowPostgres:
    """A PostgreSQL whose start takes seconds (an initdb on a slow disk), and says whether it was stopped."""

    stopped = False

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.port = port

    def start(self) -> SlowPostgres:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError("the stop request was not seen during start-up")

    def stop(self) -> None:
        SlowPostgres.stopped = True


class StuckPostgres(SlowPostgres):
    def start(self) -> SlowPostgres:
        raise TimeoutError(
            "PostgreSQL on port 5 not ready within 60.0s:\nLOG:  starting\nLOG:  still starting"
        )


@pytest.fixture
def runner_signals() -> Iterator[None]:
    """The runner installs its own SIGINT and SIGTERM handlers: the test process gets its own back."""
    kept = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)


@pytest.mark.usefixtures("runner_signals")
def test_a_stop_during_start_up_stops_what_started_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: Ctrl-C while `make dev` started was noted and ignored until everything was up."""
    monkeypatch.setattr(runner, "EmbeddedPostgres", SlowPostgres)
    SlowPostgres.stopped = False
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()

    began = time.monotonic()
    code = runner.main(["--state", str(tmp_path / "dev"), "--port", str(processes.free_port())])

    assert time.monotonic() - began < 4  # SlowPostgres's start gives up after 5 s
    assert (code, SlowPostgres.stopped) == (128 + signal.SIGINT, True)
    assert capsys.readouterr().err == "make dev: stopped by SIGINT before it was ready\n"


@pytest.mark.usefixtures("runner_signals")
def test_a_part_that_does_not_start_in_time_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: a TimeoutError of a start-up wait ended `make dev` in a traceback."""
    monkeypatch.setattr(runner, "EmbeddedPostgres", StuckPostgres)
    monkeypatch.chdir(tmp_path)

    assert runner.main(["--state", "dev", "--port", str(processes.free_port())]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "make dev: postgres did not start in time (PostgreSQL on port 5 not ready within 60.0s);"
        " see dev/postgres/postgres.log"
    ]


class UnwantedPostgres(SlowPostgres):
    def start(self) -> SlowPostgres:
        raise RuntimeError("PostgreSQL started though the webhook server could not")


class Healthy(http.server.BaseHTTPRequestHandler):
    """A healthy server on this machine (another worktree's webhook server, say)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        return None


def test_a_local_service_is_asked_directly_though_the_environment_names_a_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: with http_proxy set and no no_proxy, urllib sent 127.0.0.1 to the proxy, and
    `make dev` failed after 30 s saying Mailpit did not start (its log showed it running)."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://proxy.invalid:3128")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    local = http.server.HTTPServer(("127.0.0.1", processes.free_port()), Healthy)
    serving = threading.Thread(target=local.serve_forever, daemon=True)
    serving.start()
    try:
        with processes.loopback_open(f"http://127.0.0.1:{local.server_address[1]}/", timeout=5) as answer:
            assert (answer.status, answer.read()) == (200, b"ok")
    finally:
        local.shutdown()
        local.server_close()


@pytest.mark.usefixtures("runner_signals")
def test_a_webhook_port_another_process_serves_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: a second `make dev` (another worktree) whose webhook server could not bind PORT
    printed `ready`, its health check answered by the first one's server. It stops before starting
    anything, as a kept port another process holds does."""
    monkeypatch.setattr(runner, "EmbeddedPostgres", UnwantedPostgres)
    other = http.server.HTTPServer(("127.0.0.1", processes.free_port()), Healthy)
    serving = threading.Thread(target=other.serve_forever, daemon=True)
    serving.start()
    port = other.server_address[1]
    try:
        code = runner.main(["--state", str(tmp_path / "dev"), "--port", str(port)])
    finally:
        other.shutdown()
        other.server_close()

    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"make dev: PORT {port} of webhooks is taken by another process (another `make dev`?); stop it,"
        " or choose another: PORT=<port> make dev"
    ]


def make_venv(venv: Path, python: Path | str, **env: str) -> subprocess.CompletedProcess[str]:
    """The Makefile's virtual environment step, into `venv`, with `python` as the system's python3;
    no package index (the step's installs fail at once, after the venv is made)."""
    return subprocess.run(
        ["make", "--no-print-directory", f"VENV={venv}", f"PYTHON={python}", f"{venv}/.installed"],
        cwd=REPO_BIN.parent,
        env={**os.environ, "PIP_NO_INDEX": "1", **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_a_venv_python3_cannot_make_names_python3_venv_and_one_left_without_pip_is_made_again(
    tmp_path: Path,
) -> None:
    """Found in review: Debian's python3 without python3-venv makes .venv/bin/python, then fails at
    ensurepip; every later `make` took that for the venv and failed at `pip install` ("No module named
    pip") until `rm -rf .venv`."""
    debian = tmp_path / "python3"
    debian.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "-m venv" ] || exec python3 "$@"\n'
        f'{sys.executable} -m venv --without-pip "$3"\n'
        'echo "The virtual environment was not created successfully because ensurepip is not'
        ' available." >&2\n'
        "exit 1\n"
    )
    debian.chmod(0o755)
    venv = tmp_path / "venv"
    for attempt in (1, 2):
        failed = make_venv(venv, debian)
        assert failed.returncode != 0, attempt
        assert "apt-get install python3-venv" in failed.stderr, (attempt, failed.stderr)
        assert not (venv / "bin" / "python").exists(), attempt

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    make_venv(venv, sys.executable)  # its install fails without an index; the venv is made first
    pip = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "--version"], capture_output=True, check=False
    )
    assert pip.returncode == 0, pip.stderr


@pytest.mark.parametrize(
    ("layer", "tools"),
    [
        ("unit", ["tools/build.sh helm kubectl"]),
        ("integration", ["tools/build.sh", "tools/build.sh e2e", "tools/build.sh chromium"]),
    ],
)
def test_a_layer_s_make_target_makes_the_tools_its_tests_use_first(layer: str, tools: list[str]) -> None:
    """Found in review: `make unit` made only the venv, though the chart tests run helm and the dev
    environment's kubectl; `make integration` lacked the simulated cluster and Chromium its tests use."""
    planned = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", layer],
        cwd=REPO_BIN.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    tests = planned.index(f".venv/bin/pytest tests/{layer} -q")
    assert [tool for tool in tools if tool not in planned[:tests]] == []


def test_free_port_never_gives_a_port_it_gave_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server's PORT and STRIPE_INBOX_PORT are both picked before it binds either: the webhook server
    refused to start (both 16648) when the random pick came up twice."""
    picks = iter([23_456, 23_456, 23_457])
    monkeypatch.setattr(processes.random, "randint", lambda low, high: next(picks))
    monkeypatch.setattr(processes, "_HANDED_OUT", set())
    assert [processes.free_port(), processes.free_port()] == [23_456, 23_457]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_port_served_on_either_family_is_not_free(family: socket.AddressFamily) -> None:
    """The servers listen on IPv4 and IPv6: a port another program holds on one family would fail their
    bind on it."""
    port = processes.free_port()
    assert processes.port_is_free(port)
    with socket.socket(family, socket.SOCK_STREAM) as other:
        if family == socket.AF_INET6:
            other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        other.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        other.listen()
        assert not processes.port_is_free(port)


@pytest.mark.parametrize("listening", [False, True], ids=["its-port-free", "its-port-served"])
def test_a_pid_file_naming_a_live_postgres_is_taken_for_a_running_server_only_when_its_port_is_served(
    tmp_path: Path, listening: bool
) -> None:
    """Found in review: a pid of a crashed server, reused after a restart by another folder's postgres
    (another worktree's or user's, whose working folder cannot be read without ptrace rights), was taken
    for this folder's and stopped every later start. The server it names runs only if its port is taken."""
    proc = tmp_path / "proc" / "4242"
    proc.mkdir(parents=True)
    (proc / "comm").write_text("postgres\n")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        if listening:
            server.listen()
        else:
            server.close()  # the port free again, as after the server's crash
        text = f"4242\n{tmp_path / 'data'}\n1733450000\n{port}\n/tmp\n127.0.0.1\n"
        assert embedded._postmaster_running(text, procfs=tmp_path / "proc") is listening
    # Not a postgres, or a file cut short: no server.
    (proc / "comm").write_text("python3\n")
    assert not embedded._postmaster_running(text, procfs=tmp_path / "proc")
    assert not embedded._postmaster_running("4242\n", procfs=tmp_path / "proc")


class CrashingOperator:
    """`make dev` started as far as `ready`, its operator a process that crashes a moment later."""

    def start(self: runner.DevEnvironment) -> dict[str, str]:
        self.state.mkdir(parents=True, exist_ok=True)
        argv = ["sh", "-c", "echo 'Traceback: the operator crashed'; sleep 0.5; exit 3"]
        operator = processes.ManagedProcess("operator", argv, self.state / "operator.log")
        self.stops.append(("operator", operator))
        return {}


@pytest.mark.usefixtures("runner_signals")
def test_a_process_that_ends_after_ready_stops_make_dev_naming_it_and_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: an operator that crashed after `ready` left the terminal saying ready, and every
    kubectl apply waited for a pass that never came. Without the watch this test's Ctrl-C ends it (0)."""
    monkeypatch.setattr(runner.DevEnvironment, "start", CrashingOperator.start)
    monkeypatch.chdir(tmp_path)
    interrupt = threading.Timer(10, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    try:
        code = runner.main(["--state", "dev", "--port", str(processes.free_port())])
    finally:
        interrupt.cancel()

    out, err = capsys.readouterr()
    assert (code, out.splitlines()[-2:]) == (1, ["ready", "stopping operator"])
    assert err.splitlines() == ["make dev: operator exited with 3; see dev/operator.log; stopping the rest"]
    assert "the operator crashed" in (tmp_path / "dev" / "operator.log").read_text()


def test_a_cluster_too_slow_to_start_names_the_log_of_its_slow_component(tmp_path: Path) -> None:
    """Found in review: a simulated cluster whose kube-scheduler never answered said `see .dev`, a folder
    of a dozen logs."""
    log = tmp_path / "dev" / "kube-scheduler.log"
    scheduler = processes.ManagedProcess("kube-scheduler", ["sleep", "30"], log)
    dev = runner.DevEnvironment(tmp_path / "dev", use_existing_cluster=False, port=processes.free_port())
    url = f"http://127.0.0.1:{processes.free_port()}/healthz"

    def start() -> None:
        processes.wait_for_http(url, scheduler, timeout=0.5)

    try:
        with pytest.raises(RuntimeError) as slow:
            dev._start_part("cluster", scheduler, start, tmp_path / "dev")
    finally:
        dev.stop()
    assert str(slow.value) == (
        f"cluster did not start in time ({url} not healthy within 0.5s ({_refused(url)})); see {log}"
    )


def _refused(url: str) -> str:
    """What urllib says of a loopback port nothing listens on."""
    try:
        processes.loopback_open(url, timeout=5)
    except OSError as error:
        return str(error)
    raise AssertionError(f"{url} answered")


def test_a_database_a_newer_checkout_migrated_is_an_error_naming_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a `.dev/postgres` migrated by a newer checkout (a switch back to an older branch)
    ended `make dev` in alembic's traceback, "Can't locate revision identified by '0099'"."""
    monkeypatch.setattr(runner.migrate, "current_revision", lambda url: "0099")
    monkeypatch.chdir(tmp_path)
    dev = runner.DevEnvironment(Path("dev"), use_existing_cluster=False, port=processes.free_port())
    head = runner.migrate.head_revision()

    with pytest.raises(RuntimeError) as refused:
        dev._migrate("postgresql://postgres@127.0.0.1:5/billing")
    assert str(refused.value) == (
        f"the database in dev/postgres is at migration 0099, which this checkout does not know (its newest"
        f" is {head}): a newer checkout migrated it. Take it back from that checkout: with its `make dev`"
        f" running, `source dev/env; python -m iotistic_billing.db.migrate --to {head}` in another shell; or"
        " delete dev/postgres to start with an empty database"
    )


def test_a_chart_helm_cannot_package_is_an_error_in_helm_s_words(tmp_path: Path) -> None:
    """Found in review: a chart broken in the working tree ended `make dev` in a CalledProcessError's
    traceback, without helm's message."""
    chart = tmp_path / "customer-instance"
    chart.mkdir()
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: customer-instance\n")  # no version
    registry = ChartRegistry(tmp_path)

    with pytest.raises(RuntimeError) as refused:
        registry.push(chart)
    assert str(refused.value).startswith(f"helm package of {chart} failed: Error: ")
    assert "version" in str(refused.value)


def test_make_dev_on_an_existing_cluster_builds_none_of_the_local_cluster_s_tools() -> None:
    """Found in review: `USE_EXISTING_CLUSTER=true make dev` built kube-apiserver, etcd and the simulated
    cluster's tools first (minutes on a fresh machine) and ran none of them."""

    def planned(*settings: str) -> list[str]:
        return [
            line
            for line in subprocess.run(
                ["make", "--dry-run", "--no-print-directory", "dev", *settings],
                cwd=REPO_BIN.parent,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()
            if line.startswith("tools/build.sh")
        ]

    assert planned("USE_EXISTING_CLUSTER=true") == [
        "tools/build.sh stripe-mock mailpit registry helm kubectl"
    ]
    assert planned() == ["tools/build.sh", "tools/build.sh e2e"]


def test_the_local_control_plane_s_certificates_outlast_a_dev_environment_left_running_for_months() -> None:
    ca = CertificateAuthority("test-ca")
    serving = x509.load_pem_x509_certificate(ca.issue("kube-apiserver", server=True).cert_pem)
    month_ahead = dt.datetime.now(dt.UTC) + dt.timedelta(days=90)
    assert ca.cert.not_valid_after_utc > month_ahead and serving.not_valid_after_utc > month_ahead
