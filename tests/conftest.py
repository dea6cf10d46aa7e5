"""Shared test parts: one control plane, one PostgreSQL, one stripe-mock per session, all real.

A part that cannot start makes the tests that need it error out loudly; nothing here ever skips.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import kubernetes
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine
from iotistic_billing.devenv.controlplane import REPO_BIN, ControlPlane, find_binary
from iotistic_billing.devenv.stripe_mock import StripeMock

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"


def unique_name(prefix: str) -> str:
    """Names unique per test, so that tests never wait for another test's objects to go away."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def tools_on_path() -> None:
    """helm and kubectl from bin/ first on PATH, for the code under test and for the tests."""
    os.environ["PATH"] = f"{REPO_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


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
        if CRDS.is_dir() and any(CRDS.glob("*.yaml")):
            kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(plane.kubeconfig)]
            subprocess.run(
                [*kubectl, "apply", "--server-side", "-f", str(CRDS)], check=True, capture_output=True
            )
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
