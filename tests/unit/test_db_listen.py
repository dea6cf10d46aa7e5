"""Waking on NOTIFY (db/listen.py): a connection lost at any point is retried, never the end of the
listening task (the workers would fall back to polling for the rest of the process)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from iotistic_billing.db import listen as listen_module


class Connection:
    """What listen() uses of an asyncpg connection; `fail` raised from LISTEN."""

    def __init__(self, fail: BaseException | None) -> None:
        self.fail, self.closed = fail, False
        self.on_lost: Callable[..., None] | None = None

    def add_termination_listener(self, callback: Callable[..., None]) -> None:
        self.on_lost = callback

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None:
        if self.fail is not None:
            raise self.fail

    def is_closed(self) -> bool:
        return self.closed

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InterfaceError("connection is closed"),
        ConnectionResetError(),
        asyncpg.exceptions.AdminShutdownError(),
    ],
)
async def test_a_connection_lost_before_listen_is_retried(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    connections = [Connection(error), Connection(None)]
    handed: list[Connection] = []

    async def connect(*args: Any, **kwargs: Any) -> Connection:
        handed.append(connections.pop(0))
        return handed[-1]

    real_sleep = asyncio.sleep
    monkeypatch.setattr(listen_module.asyncpg, "connect", connect)
    monkeypatch.setattr(listen_module.asyncio, "sleep", lambda seconds: real_sleep(0))
    woken = asyncio.Event()
    task = asyncio.create_task(listen_module.listen("postgresql://x/y", "inbox", woken.set))
    await asyncio.wait_for(woken.wait(), 5)
    assert not task.done() and len(handed) == 2 and handed[0].closed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
