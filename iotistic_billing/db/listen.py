"""Waking on PostgreSQL's NOTIFY: a worker that polls a table also LISTENs on its channel, so that a row
another process commits is picked up at once; polling stays the fallback when the connection is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from iotistic_billing.db.engine import connect_arguments, keep_alive
from iotistic_billing.db.pool import CONNECTION_ERRORS, DATABASE_UNREACHABLE, database_unreachable
from iotistic_billing.workers import Outage

log = logging.getLogger(__name__)
# How often a listening connection is checked, and how long its check may take: TCP keepalive
# (keep_alive) finds a host gone silent within about 90 s, but not a server whose kernel still answers
# while PostgreSQL does not (a stopped server process, a pooler holding the connection); asking finds both.
CHECK_EVERY = 30.0
CHECK_TIMEOUT = 10.0


async def listen(
    database_url: str,
    channel: str,
    wake: Callable[[], None],
    *,
    notified: Callable[[str], None] | None = None,
) -> None:
    """Call `wake` on every NOTIFY on `channel`, and once on each (re)connection (rows written while no
    one listened); runs until cancelled. `notified`, when given, gets each NOTIFY's payload first (what
    it names: the Stripe inbox's replayed event). While PostgreSQL is away it says so once, connects
    again after 1 s doubling to 30 s, and says when it listens again."""

    def heard(_connection: object, _pid: int, _channel: str, payload: str) -> None:
        if notified is not None:
            notified(payload)
        wake()

    outage = Outage(log, f"not listening on {channel}, polling", f"listening on {channel} again")
    while True:
        listener: Any = None
        try:
            listener = await asyncpg.connect(**connect_arguments(database_url))
            keep_alive(listener)
            lost = asyncio.Event()
            listener.add_termination_listener(lambda *_, lost=lost: lost.set())
            await listener.add_listener(channel, heard)
            outage.succeeded()
            wake()
            await _until_lost(listener, lost)
        # InterfaceError: the connection dropped between connecting and LISTEN; the task must not end.
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            problem = DATABASE_UNREACHABLE if database_unreachable(error) else "PostgreSQL refused it"
            await asyncio.sleep(outage.failed(error, problem))
        finally:
            if listener is not None and not listener.is_closed():
                # Bounded: a connection that died silently answers no Terminate either (then aborted).
                with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                    await listener.close(timeout=CHECK_TIMEOUT)


async def _until_lost(listener: Any, lost: asyncio.Event) -> None:
    """Returns when asyncpg says the connection closed; raises TimeoutError when a check goes unanswered
    (the connection died silently). Timed with asyncio.timeout, not wait_for: Python 3.11's wait_for
    returns an answer that came in with the task's cancellation and drops the cancellation, and the
    listener, stopped just as a check was answered, listened on for ever (a stop that never ended)."""
    while True:
        try:
            async with asyncio.timeout(CHECK_EVERY):
                await lost.wait()
            return
        except TimeoutError:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await listener.fetchval("SELECT 1")


__all__ = ["listen"]
