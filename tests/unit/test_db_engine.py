"""Client-side keepalive on the database connections (db/engine.py keep_alive)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from iotistic_billing.db.engine import KEEPALIVE_IDLE, keep_alive


class RefusingSocket:
    """A TCP socket on a kernel (or sandbox) that refuses TCP_USER_TIMEOUT."""

    family = socket.AF_INET

    def __init__(self) -> None:
        self.options: dict[int, int] = {}

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if option == getattr(socket, "TCP_USER_TIMEOUT", None):
            raise OSError(92, "Protocol not available")
        self.options[option] = value


def test_an_option_the_kernel_refuses_is_skipped_not_a_database_away() -> None:
    """Found in review: the OSError of a refused option is one of the errors that read as "PostgreSQL
    cannot be reached", so every connection of such a platform failed as if the database were down."""
    sock = RefusingSocket()
    connection = SimpleNamespace(_transport=SimpleNamespace(get_extra_info=lambda name: sock))
    keep_alive(connection)
    assert sock.options[socket.SO_KEEPALIVE] == 1
    assert sock.options[socket.TCP_KEEPIDLE] == KEEPALIVE_IDLE
