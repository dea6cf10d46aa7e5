"""Shared test parts: one control plane, one PostgreSQL, one stripe-mock per session, all real.

A part that cannot start makes the tests that need it error out loudly; nothing here ever skips.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import kubernetes
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine
from iotistic_billing.devenv.controlplane import REPO_BIN, ControlPlane, find_binary
from iotistic_billing.devenv.mailpit import Mailpit
from iotistic_billing.devenv.registry import ChartRegistry
from iotistic_billing.devenv.stripe_mock import StripeMock

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
# `make test` runs two pytest workers (pytest-xdist, --dist loadgroup), each group of tests whole on
# one worker, which starts only the session parts its group uses. One runs the end-to-end tests on the
# simulated cluster, which mostly wait for rollouts and bakes, the dev environment's and the unit tests,
# and, to even the two workers out by `make test`'s --durations, integration tests that need no session
# operator; the other runs the rest on its bare control plane.
END_TO_END_WORKER = (
    "tests/e2e/",
    "tests/unit/",
    "tests/integration/test_dev_environment.py",
    "tests/integration/test_database.py",
    "tests/integration/test_license_history.py",
    "tests/integration/test_no_leftover_processes.py",
    "tests/integration/test_rbac.py",
    "tests/integration/test_stripe_mock.py",
    "tests/integration/test_usage_partitions.py",
    "tests/integration/test_webhook_schemathesis.py",
    "tests/integration/test_stripe_inbox.py",
    "tests/integration/test_usage_billing.py",
    "tests/integration/test_webhook_stripe.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = Path(item.path).relative_to(REPO).as_posix()
        group = "end-to-end" if where.startswith(END_TO_END_WORKER) else "control-plane"
        item.add_marker(pytest.mark.xdist_group(group))


def unique_name(prefix: str) -> str:
    """Names unique per test, so that tests never wait for another test's objects to go away."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def tools_on_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    """helm and kubectl from bin/ first on PATH, for the code under test and for the tests; their
    discovery caches in the session's folder (under ~/.kube/cache, each control plane's port left 1.3 MB
    behind for good)."""
    os.environ["PATH"] = f"{REPO_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["KUBECACHEDIR"] = str(tmp_path_factory.mktemp("kube-cache"))


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    return find_binary("helm")


@pytest.fixture(scope="session")
def kubectl_binary() -> Path:
    return find_binary("kubectl")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane")).start()
    try:
        # Every test of Customers needs them: a crds/ moved or emptied fails here, not as 404s later.
        assert any(CRDS.glob("*.yaml")), f"no CRD in {CRDS}"
        kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(plane.kubeconfig)]
        subprocess.run([*kubectl, "apply", "--server-side", "-f", str(CRDS)], check=True, capture_output=True)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"],
            check=True,
            capture_output=True,
        )
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def k8s_client(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield client
    client.close()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def database_url(postgres: EmbeddedPostgres) -> str:
    """A fresh database for this test session, migrated by Alembic (not create_all)."""
    url = postgres.create_database(f"test_{uuid.uuid4().hex[:12]}")
    migrate.upgrade(url)
    return url


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL of this test's own, so stopping it disturbs no other test."""
    server = EmbeddedPostgres(tmp_path / "pg").start()
    try:
        url = server.create_database(f"outage_{uuid.uuid4().hex[:8]}")
        migrate.upgrade(url)
        yield server, url
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def db_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def db_session(db_engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session whose work, commits included, is rolled back when the test ends."""
    async with db_engine.connect() as connection:
        transaction = await connection.begin()
        session = AsyncSession(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            await session.close()
            await transaction.rollback()


@pytest.fixture(scope="session")
def stripe_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StripeMock]:
    mock = StripeMock(tmp_path_factory.mktemp("stripe-mock")).start()
    try:
        yield mock
    finally:
        mock.stop()


@pytest.fixture(scope="session")
def mailpit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailpit]:
    """The SMTP server of the tests; what was sent is read back through its HTTP API."""
    server = Mailpit(tmp_path_factory.mktemp("mailpit")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def chart_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartRegistry]:
    """The OCI registry of the session, with the customer-instance chart at its own version, 0.1.0."""
    registry = ChartRegistry(tmp_path_factory.mktemp("registry")).start()
    try:
        registry.push(REPO / "charts" / "customer-instance")
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def license_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A licence signing key pair made by the product's own `keys generate`."""
    directory = tmp_path_factory.mktemp("license-keys")
    from iotistic_billing.cli import main as cli

    assert cli(["keys", "generate", "--out", str(directory)]) == 0
    return directory / "private-key.pem", directory / "public-key.pem"


class OperatorProcess:
    """`python -m iotistic_billing.operator` as a user runs it, restartable with other settings."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.base_env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.overrides: dict[str, str] = {}

    def start(self, **overrides: str) -> None:
        # A port free_port picked can be bound by a process of the other test worker before the operator
        # binds it (seen once in a fresh clone's run: "Address already in use" on the metrics port):
        # another pair of ports then, not a failed test.
        for _ in range(3):
            try:
                self._start(**overrides)
                return
            except AssertionError as failed:
                if "Address already in use" not in str(failed):
                    raise
        self._start(**overrides)

    def _start(self, **overrides: str) -> None:
        from iotistic_billing.processes import free_port

        self.overrides = overrides  # a restart after a kill takes the same settings
        env = {
            **self.base_env,
            "OPERATOR_LIVENESS_PORT": str(free_port()),
            "OPERATOR_METRICS_PORT": str(free_port()),
            **overrides,
        }
        # Kopf's endpoint listens on the family of POD_IP alone (IPv4 when unset), the metrics on both.
        loopback = "[::1]" if ":" in env.get("POD_IP", "") else "127.0.0.1"
        self.liveness_url = f"http://{loopback}:{env['OPERATOR_LIVENESS_PORT']}/healthz"
        self.metrics_url = f"http://127.0.0.1:{env['OPERATOR_METRICS_PORT']}/metrics"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "iotistic_billing.operator"],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._live, timeout=60, message=f"operator not live; log: {self.log}")

    def _live(self) -> bool:
        import urllib.request

        assert self.process is not None
        if self.process.poll() is not None:
            # The end of the log in the failure itself: pytest's temporary folders do not outlive a few runs.
            from iotistic_billing.processes import file_tail

            tail = file_tail(self.log, 40)
            raise AssertionError(
                f"operator exited with {self.process.returncode}; the end of {self.log}:\n{tail}"
            )
        try:
            with urllib.request.urlopen(self.liveness_url, timeout=1) as response:  # noqa: S310 - loopback
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """kill -9 of the operator and whatever it had started (helm processes)."""
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def http_status(url: str) -> int:
    """The status of a GET of `url`, 0 when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the tests' own servers
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def wait_until(
    condition: Callable[[], object], timeout: float = 30, message: str = "", interval: float = 0.2
) -> Any:
    """Poll `condition` until it returns something truthy (and return it); fail with `message` on timeout."""
    import time

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message} (last: {last!r})")


async def eventually(
    condition: Callable[[], Awaitable[object]], within: float = 30, message: str = "", interval: float = 0.2
) -> Any:
    """wait_until for async conditions (database reads in async tests)."""
    import asyncio
    import time

    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        last = await condition()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within}s: {message} (last: {last!r})")


async def waiting_on_a_row_lock(engine: AsyncEngine, table: str) -> bool:
    """Whether a session waits for a row of `table` another holds (what a test's held row stops)."""
    from sqlalchemy import text

    async with engine.connect() as connection:
        waiting = await connection.scalar(
            text(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND l.locktype IN ('transactionid', 'tuple') "
                "AND a.datname = current_database() AND a.query ILIKE :table"
            ),
            {"table": f"%{table}%"},
        )
    return bool(waiting)


async def waiting_on_an_advisory_lock(engine: AsyncEngine) -> bool:
    """Whether a session of this database waits for an advisory lock another holds."""
    from sqlalchemy import text

    async with engine.connect() as connection:
        waiting = await connection.scalar(
            text(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND l.locktype = 'advisory' AND a.datname = current_database()"
            )
        )
    return bool(waiting)


class Retries:
    """The retries of failed passes an operator schedules (`PassRetries(later=...)`), fired by the test:
    a backoff is time the test moves past, not time it sleeps through."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[float, Callable[[], None]]] = []

    def later(self, delay: float, retry: Callable[[], None]) -> asyncio.Handle:
        entry = (delay, retry)
        self.scheduled.append(entry)
        return cast(asyncio.Handle, SimpleNamespace(cancel=lambda: self.scheduled.remove(entry)))

    @property
    def delays(self) -> list[float]:
        return [delay for delay, _ in self.scheduled]

    def fire(self) -> None:
        """The first retry scheduled is due now."""
        _, retry = self.scheduled.pop(0)
        retry()


@pytest.fixture(scope="session")
def operator_env(kubeconfig: Path, database_url: str, license_keys: tuple[Path, Path]) -> dict[str, str]:
    private_key, public_key = license_keys
    return {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "DATABASE_URL": database_url,
        "LICENSE_PRIVATE_KEY_PATH": str(private_key),
        "LICENSE_PUBLIC_KEY_PATH": str(public_key),
        "INSTANCE_CHART": str(REPO / "charts" / "customer-instance"),
        "PATH": f"{REPO_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "BASE_DOMAIN": "test.iotistic.example",
        # Tests restart the operator (kill -9 included); standalone, a restarted process does not
        # wait for the peering record of the one it replaces to expire.
        "OPERATOR_PEERING": "",
    }


@pytest.fixture(scope="session")
def operator(
    operator_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(operator_env, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
