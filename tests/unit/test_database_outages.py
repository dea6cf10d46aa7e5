"""PostgreSQL away under the webhook server's loops: the notice sender's and the Stripe inbox's claims say
so once per outage, in one line without a traceback, back off from 1 s doubling to 30 s, and start
again at once when a claim goes through; an error nobody expected keeps its traceback.

Found in review: a 40 s outage of `make dev`'s PostgreSQL grew the webhook server's log by 960 KB, three
8 KB tracebacks a second (`notice sender: cannot claim a delivery`, `stripe inbox: cannot claim events`),
with no backoff."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, cast

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from iotistic_billing.db.engine import create_engine, session_factory
from iotistic_billing.db.pool import DatabaseUnavailable, database_unreachable
from iotistic_billing.notices import sender as sender_module
from iotistic_billing.notices.sender import NoticeSender, SenderOptions
from iotistic_billing.processes import free_port
from iotistic_billing.stripe_inbox import inbox as inbox_module
from iotistic_billing.stripe_inbox.inbox import EventInbox

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def refused() -> ConnectionRefusedError:
    """What asyncpg's connect raises, and SQLAlchemy's session passes on, for a stopped PostgreSQL."""
    return ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 14416)")


class Nothing:
    """A claim's result when nothing is due."""

    def first(self) -> None:
        return None

    def all(self) -> list[Any]:
        return []


class Session:
    """What the loops use of a SQLAlchemy session (and of its transaction): its statements fail with
    `error` while PostgreSQL is away, and find nothing due while it is there."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def begin(self) -> Session:
        return self

    async def execute(self, statement: object) -> Nothing:
        if self.error is not None:
            raise self.error
        return Nothing()


class Sessions:
    """A session factory following a script: an error is a claim that fails with it, None one that goes
    through; the script's end cancels the loop."""

    def __init__(self, script: list[BaseException | None]) -> None:
        self.script = list(script)

    def __call__(self) -> Session:
        if not self.script:
            raise asyncio.CancelledError
        return Session(self.script.pop(0))


async def run_loop(monkeypatch: pytest.MonkeyPatch, module: ModuleType, loop: Any) -> list[float]:
    """Run a worker loop to the end of its script; the waits it took (its `nap`s), none slept."""
    waits: list[float] = []

    async def nap(wakeup: asyncio.Event, seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(module, "nap", nap)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(loop(), 10)
    return waits


def sender(sessions: Sessions) -> NoticeSender:
    return NoticeSender(
        sessions=cast(Any, sessions),
        kube=cast(Any, None),
        options=SenderOptions(None, "billing@x.example", None),
        clock=lambda: NOW,
    )


def inbox(sessions: Sessions) -> EventInbox:
    return EventInbox(sessions=cast(Any, sessions), applier=cast(Any, None), count=lambda *_: None, poll=1.0)


LOOPS = [
    pytest.param(sender_module, lambda s: sender(s)._work, "notice sender", "deliveries", id="sender"),
    pytest.param(inbox_module, lambda s: inbox(s)._work, "stripe inbox", "events", id="inbox"),
]


@pytest.mark.parametrize(("module", "make", "who", "what"), LOOPS)
async def test_postgresql_away_is_one_warning_an_outage_and_the_claims_back_off_until_one_goes_through(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    module: ModuleType,
    make: Any,
    who: str,
    what: str,
) -> None:
    # Away for 7 claims, one goes through (nothing due), then away again for 2.
    sessions = Sessions([refused() for _ in range(7)] + [None] + [refused(), refused()])
    with caplog.at_level(logging.INFO, logger=module.__name__):
        waits = await run_loop(monkeypatch, module, make(sessions))

    # 1 s doubling to 30 s; the poll's 1 s after the claim that went through; from 1 s again after it.
    assert waits == [1, 2, 4, 8, 16, 30, 30, 1.0, 1, 2]
    told = [r for r in caplog.records if r.name == module.__name__ and r.levelno >= logging.WARNING]
    assert [r.levelname for r in told] == ["WARNING", "WARNING"], [r.getMessage() for r in told]
    for record in told:
        assert record.exc_info is None  # no traceback
        message = record.getMessage()
        assert message.startswith(f"{who}: cannot claim")
        assert "PostgreSQL cannot be reached (ConnectionRefusedError); trying again in 1 s" in message
    back = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and "again after" in r.getMessage()
    ]
    assert back == [f"{who}: claiming {what} again after 7 failed tries"]


@pytest.mark.parametrize(("module", "make", "who", "what"), LOOPS)
async def test_an_error_nobody_expected_keeps_its_traceback_and_backs_off_too(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    module: ModuleType,
    make: Any,
    who: str,
    what: str,
) -> None:
    sessions = Sessions([RuntimeError("a bug"), RuntimeError("a bug"), None])
    with caplog.at_level(logging.INFO, logger=module.__name__):
        waits = await run_loop(monkeypatch, module, make(sessions))

    assert waits == [1, 2, 1.0]
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in errors] == ["ERROR", "ERROR"]
    assert all(r.exc_info is not None and isinstance(r.exc_info[1], RuntimeError) for r in errors)


async def test_a_refused_connection_is_postgresql_unreachable_through_sqlalchemy_and_asyncpg() -> None:
    engine = create_engine(f"postgresql://billing@127.0.0.1:{free_port()}/billing")  # nothing listens
    try:
        with pytest.raises(Exception) as raised:  # whatever the driver raises: classified below
            async with session_factory(engine)() as session, session.begin():
                await session.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert database_unreachable(raised.value), repr(raised.value)

    for error in (
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        asyncpg.InterfaceError("connection is closed"),
        OperationalError("SELECT 1", {}, Exception("server closed the connection")),
        DatabaseUnavailable("ConnectionRefusedError"),
        TimeoutError(),
    ):
        assert database_unreachable(error), repr(error)
    # Found in review: asyncpg's client-side InterfaceErrors are bugs of ours, not an outage.
    encoding = asyncpg.exceptions.DataError("invalid input for query argument $1: 'x' (an int is required)")
    wrapped = DBAPIError("SELECT $1", {}, encoding)
    in_use = asyncpg.InterfaceError("cannot perform operation: another operation is in progress")
    for error in (
        RuntimeError("a bug"),
        ValueError("bad"),
        asyncpg.exceptions.UndefinedTableError("x"),
        encoding,
        wrapped,
        in_use,
    ):
        assert not database_unreachable(error), repr(error)
