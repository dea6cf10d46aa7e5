"""Mailpit (an SMTP server with an HTTP API and a web page) on free (or given) loopback ports, for `make
dev` and the tests: notices are mailed to its SMTP port, and read back through its API or seen on its page."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from iotistic_billing.devenv.controlplane import find_binary
from iotistic_billing.processes import ManagedProcess, OneProcess, free_port, loopback_open, wait_for_http


class Mailpit(OneProcess):
    def __init__(
        self,
        workdir: Path,
        options: tuple[str, ...] = (),
        http_port: int | None = None,
        smtp_port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.options = options  # more of Mailpit's flags (bench/mail.py: STARTTLS and AUTH required)
        self.http_port = http_port or free_port()
        self.smtp_port = smtp_port or free_port()
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Its web page and API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def smtp_url(self) -> str:
        return f"smtp://127.0.0.1:{self.smtp_port}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> Mailpit:
        for attempt in range(1, attempts + 1):
            argv = [
                str(find_binary("mailpit")),
                "--listen",
                f"127.0.0.1:{self.http_port}",
                "--smtp",
                f"127.0.0.1:{self.smtp_port}",
                "--database",
                str(self.workdir / "mailpit.db"),
                # No look for a newer release (there is no internet), no banner on the page.
                "--disable-version-check",
                "--quiet",
                *self.options,
            ]
            self.process = ManagedProcess("mailpit", argv, self.workdir / "mailpit.log")
            try:
                wait_for_http(f"{self.url}/readyz", self.process, timeout)
                return self
            except RuntimeError:
                # Another process can take a free port between our probe and Mailpit's bind.
                self.process.stop()
                if attempt == attempts:
                    raise
                self.http_port, self.smtp_port = free_port(), free_port()
        return self

    def messages(self, query: str = "") -> list[dict[str, Any]]:
        """The summaries of the messages that match a Mailpit search (`to:someone@example.com`)."""
        path = (
            f"/api/v1/search?query={urllib.parse.quote(query)}&limit=500"
            if query
            else "/api/v1/messages?limit=500"
        )
        with loopback_open(self.url + path, timeout=10) as answer:
            found: list[dict[str, Any]] = json.loads(answer.read())["messages"]
        return found

    def message(self, message_id: str) -> dict[str, Any]:
        """One message whole: headers, Text, HTML (by Mailpit's own id)."""
        with loopback_open(f"{self.url}/api/v1/message/{message_id}", timeout=10) as answer:
            found: dict[str, Any] = json.loads(answer.read())
        return found


__all__ = ["Mailpit"]
