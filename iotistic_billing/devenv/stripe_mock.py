"""stripe-mock (Stripe's own API mock) on a free loopback port, for tests and `make dev`."""

from __future__ import annotations

from pathlib import Path

from iotistic_billing.devenv.controlplane import find_binary
from iotistic_billing.processes import ManagedProcess, OneProcess, free_port, wait_for_port


class StripeMock(OneProcess):
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> StripeMock:
        for attempt in range(1, attempts + 1):
            # An explicit HTTPS address with an empty port: otherwise it also binds :12112, which a
            # second stripe-mock on the machine already holds.
            argv = [
                str(find_binary("stripe-mock")),
                "-http-addr",
                f"127.0.0.1:{self.port}",
                "-https-addr",
                "127.0.0.1:",
            ]
            self.process = ManagedProcess("stripe-mock", argv, self.workdir / "stripe-mock.log")
            try:
                wait_for_port(self.port, timeout, self.process.process)
                return self
            except RuntimeError as exited:
                # Another process can take a free port between our probe and stripe-mock's bind.
                self.process.stop()
                if attempt == attempts:
                    raise RuntimeError(f"{exited}:\n{self.process.log_tail()}") from None
                self.port = free_port()
        return self
