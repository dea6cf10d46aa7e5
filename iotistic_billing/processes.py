"""Child processes that never outlive their parent: the local control plane, PostgreSQL, stripe-mock.

Each child gets PR_SET_PDEATHSIG, so the kernel stops it even when the parent is killed with SIGKILL,
and runs in its own process group, so a stop reaches whatever it spawned. The signal fires when the
spawning *thread* exits, so start them from the main thread or from a thread that lives as long.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent(uid: int | None = None, gid: int | None = None) -> Callable[[], None]:
    def prepare() -> None:
        os.setpgid(0, 0)
        if gid is not None:
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
        # After setuid: a change of credentials clears the parent-death signal.
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return prepare


def _bindable(port: int, reuse_address: bool) -> bool:
    """Whether `port` is free on each family, as the servers listen (0.0.0.0 and ::, IPv6 alone)."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # noqa: S104 - a probe
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # a kernel without IPv6
            continue
        with sock:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


# Ports free_port gave this process: not bound yet when the next is asked for (a server's PORT and its
# STRIPE_INBOX_PORT, both picked before it starts), so never given twice.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing is bound to, below the kernel's ephemeral range: a port the kernel hands out for
    `bind(0)` comes from that range, where an outgoing connection can take it as its source port
    before the server binds it (a restarted operator failed on its liveness port that way). Never one
    it gave this process before."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randint(10_000, low - 1)  # noqa: S311 - not a secret
        if port not in _HANDED_OUT and _bindable(port, reuse_address=False):
            _HANDED_OUT.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _HANDED_OUT.add(port)
    return port


def port_is_free(port: int) -> bool:
    """Whether a server can listen on `port` now. Probed with SO_REUSEADDR, as servers bind: a port whose
    server stopped a moment ago, its connections still in TIME_WAIT, is free; one another listens on is
    not."""
    return _bindable(port, reuse_address=True)


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return max(low, 20_000)


class StartTimeout(TimeoutError):
    """A process that runs but was not ready in time; `log_path` is the log that says why."""

    def __init__(self, message: str, log_path: Path | None) -> None:
        super().__init__(message)
        self.log_path = log_path


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def file_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ManagedProcess:
    """A started child process with its log file; `stop()` is idempotent and waits for the exit."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | None,
        env: dict[str, str] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        # No log file: the child writes to our stdout and stderr (a sidecar process of a server).
        self._log: IO[bytes] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            preexec_fn=_die_with_parent(uid, gid),
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def processes(self) -> list[ManagedProcess]:
        """Itself: a part made of one process is watched as one made of several (OneProcess)."""
        return [self]

    def ended(self) -> str:
        """How it ended, in words ("exited with 1", "was killed by SIGKILL"); "" while it runs."""
        code = self.process.poll()
        if code is None:
            return ""
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with {code}"

    def log_tail(self, lines: int = 30) -> str:
        return "" if self.log_path is None else file_tail(self.log_path, lines)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        # Anything the child left in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()

    def kill(self) -> None:
        self.stop(timeout=5.0, sig=signal.SIGKILL)


class OneProcess:
    """A service of the local set-up (PostgreSQL, stripe-mock, Mailpit, the registry) that runs one
    ManagedProcess once started; `stop()` is idempotent."""

    process: ManagedProcess | None = None

    def processes(self) -> list[ManagedProcess]:
        return [self.process] if self.process is not None else []

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def loopback_open(
    url: str | urllib.request.Request, *, timeout: float, context: ssl.SSLContext | None = None
) -> Any:
    """`urllib.request.urlopen` of a service on this machine, never through a proxy: with `http_proxy`
    set and no `no_proxy`, urllib sent 127.0.0.1 to the proxy, and `make dev` failed naming Mailpit."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(url, timeout=timeout)


def wait_for_http(
    url: str,
    process: ManagedProcess,
    timeout: float,
    ok: Callable[[bytes], bool] = lambda body: True,
    context: ssl.SSLContext | None = None,
) -> None:
    """Poll `url` until it answers 2xx with a body `ok` accepts; fail early, with the log, if the
    process serving it exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not process.running():
            raise RuntimeError(f"{process.name} {process.ended()}:\n{process.log_tail()}")
        try:
            with loopback_open(url, context=context, timeout=5) as response:
                body = response.read()
                if ok(body):
                    return
                last = body.decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise StartTimeout(
        f"{url} not healthy within {timeout}s ({last}):\n{process.log_tail()}", process.log_path
    )
