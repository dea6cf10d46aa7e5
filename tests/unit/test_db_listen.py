"""Waking on NOTIFY (db/listen.py): a connection lost at any point is retried, never the end of the
listening task (the workers would fall back to polling for the rest of the process)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from iotistic_billing.db import listen as listen_module


class Transport:
    """asyncpg's transport, with no socket to set keepalive on (db.engine.keep_alive skips it)."""

    def get_extra_info(self, name: str) -> None:
        return None


class Connection:
    """What listen() uses of an asyncpg connection; `fail` raised from LISTEN; `silent`: the connection
    died without a word (no reset), so a query never answers."""

    _transport = Transport()

    def __init__(self, fail: BaseException | None, silent: bool = False) -> None:
        self.fail, self.closed, self.silent = fail, False, silent
        self.on_lost: Callable[..., None] | None = None
        self.on_notify: Callable[..., None] | None = None
        self.checks = 0

    async def fetchval(self, query: str) -> int:
        self.checks += 1
        if self.silent:
            await asyncio.Event().wait()
        return 1

    def add_termination_listener(self, callback: Callable[..., None]) -> None:
        self.on_lost = callback

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None:
        if self.fail is not None:
            raise self.fail
        self.on_notify = callback

    def is_closed(self) -> bool:
        return self.closed

    async def close(self, **options: Any) -> None:  # asyncpg's timeout=
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


async def test_postgresql_away_is_one_warning_an_outage_the_reconnects_back_off_and_listening_again_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: `not listening on ... polling` every 5 s per channel while PostgreSQL was away,
    and nothing said when it listened again."""
    # Refused three times, then connected; once that connection is lost, refused twice; then the end.
    script: list[BaseException | Connection] = [
        *(ConnectionRefusedError(111, "Connect call failed") for _ in range(3)),
        Connection(None),
        *(ConnectionRefusedError(111, "Connect call failed") for _ in range(2)),
        asyncio.CancelledError(),
    ]
    handed: list[Connection] = []

    async def connect(*args: Any, **kwargs: Any) -> Connection:
        step = script.pop(0)
        if isinstance(step, BaseException):
            raise step
        handed.append(step)
        return step

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(listen_module.asyncpg, "connect", connect)
    monkeypatch.setattr(listen_module.asyncio, "sleep", sleep)
    woken = asyncio.Event()
    with caplog.at_level(logging.INFO, logger=listen_module.__name__):
        task = asyncio.create_task(listen_module.listen("postgresql://x/y", "inbox", woken.set))
        await asyncio.wait_for(woken.wait(), 5)
        assert waits == [1, 2, 4]
        assert handed[0].on_lost is not None
        handed[0].on_lost()  # PostgreSQL stopped
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

    assert waits == [1, 2, 4, 1, 2]  # from 1 s again: a new outage
    said = [
        (r.levelname, r.getMessage(), r.exc_info) for r in caplog.records if r.name == listen_module.__name__
    ]
    warning = (
        "WARNING",
        "not listening on inbox, polling: PostgreSQL cannot be reached (ConnectionRefusedError);"
        " trying again in 1 s, backing off up to 30 s",
        None,
    )
    assert said == [warning, ("INFO", "listening on inbox again after 3 failed tries", None), warning]


async def test_a_connection_that_died_silently_is_found_by_its_check_and_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a node gone without a reset (a partition, a failover keeping the address) left the
    LISTEN connection "established" for ever, asyncpg keeping no TCP keepalive of its own, and the
    workers polled for the rest of the process."""
    healthy, silent, replacement = Connection(None), Connection(None, silent=True), Connection(None)
    connections = [healthy, silent, replacement]

    async def connect(*args: Any, **kwargs: Any) -> Connection:
        return connections.pop(0)

    real_sleep = asyncio.sleep
    monkeypatch.setattr(listen_module.asyncpg, "connect", connect)
    monkeypatch.setattr(listen_module.asyncio, "sleep", lambda seconds: real_sleep(0))
    monkeypatch.setattr(listen_module, "CHECK_EVERY", 0.01)
    monkeypatch.setattr(listen_module, "CHECK_TIMEOUT", 0.01)
    wakes = 0

    def wake() -> None:
        nonlocal wakes
        wakes += 1

    task = asyncio.create_task(listen_module.listen("postgresql://x/y", "inbox", wake))
    await real_sleep(0.2)
    # A connection that answers its checks is kept, however many.
    assert (healthy.checks > 3, healthy.closed, wakes) == (True, False, 1)
    assert healthy.on_lost is not None
    healthy.on_lost()  # then it drops, and the next one dies silently
    await real_sleep(0.2)
    assert (silent.checks, silent.closed, replacement.closed, wakes) == (1, True, False, 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_a_listener_stopped_as_its_check_is_answered_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in a CI run (a full run's worker hung 300 s on the test above): Python 3.11's wait_for
    returned a check's answer that came in with the task's cancellation and dropped the cancellation, so
    a listener stopped just then listened on for ever."""
    task: asyncio.Task[None] | None = None

    class StoppedAtItsCheck(Connection):
        async def fetchval(self, query: str) -> int:
            assert task is not None
            task.cancel()  # the stop arrives as the answer does
            return 1

    connections = [StoppedAtItsCheck(None)]

    async def connect(*args: Any, **kwargs: Any) -> Connection:
        return connections.pop(0)

    monkeypatch.setattr(listen_module.asyncpg, "connect", connect)
    monkeypatch.setattr(listen_module, "CHECK_EVERY", 0.01)
    task = asyncio.create_task(listen_module.listen("postgresql://x/y", "inbox", lambda: None))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_each_notify_s_payload_is_passed_on_before_the_wake(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: the console's replay NOTIFYs the Stripe event's id, which the listener dropped,
    so the inbox kept the event in its backoff for up to a minute. The callers that only wake still do."""
    with_payloads, plain = Connection(None), Connection(None)
    connections = [with_payloads, plain]

    async def connect(*args: Any, **kwargs: Any) -> Connection:
        return connections.pop(0)

    monkeypatch.setattr(listen_module.asyncpg, "connect", connect)
    heard: list[str] = []
    woken: list[str] = []
    tasks = [
        asyncio.create_task(
            listen_module.listen(
                "postgresql://x/y", "inbox", lambda: heard.append("wake"), notified=heard.append
            )
        ),
        asyncio.create_task(listen_module.listen("postgresql://x/y", "inbox", lambda: woken.append("wake"))),
    ]
    for _ in range(10):
        await asyncio.sleep(0)
    assert heard == woken == ["wake"]  # once on connecting: rows written while no one listened
    for connection in (with_payloads, plain):
        assert connection.on_notify is not None
        connection.on_notify(connection, 4242, "inbox", "evt_replayed")
        connection.on_notify(connection, 4242, "inbox", "")
    assert heard == ["wake", "evt_replayed", "wake", "", "wake"]
    assert woken == ["wake", "wake", "wake"]
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
