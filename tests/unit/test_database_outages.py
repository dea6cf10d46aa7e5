"""PostgreSQL away under the webhook server's loops: the notice sender's and the Stripe inbox's claims say
so once per outage, in one line without a traceback, back off from 1 s doubling to 30 s, and start
again at once when a claim goes through; an error nobody expected keeps its traceback.

Found in review: a 40 s outage of `make dev`'s PostgreSQL grew the webhook server's log by 960 KB, three
8 KB tracebacks a second (`notice sender: cannot claim a delivery`, `stripe inbox: cannot claim events`),
with no backoff."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import asyncpg
import kopf
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from iotistic_billing.db.engine import create_engine, plain_url, session_factory
from iotistic_billing.db.listen import listen
from iotistic_billing.db.pool import DatabaseUnavailable, Pool, connect, database_unreachable, open_pool
from iotistic_billing.devenv.pki import CertificateAuthority
from iotistic_billing.notices import sender as sender_module
from iotistic_billing.notices.sender import NoticeSender, SenderOptions
from iotistic_billing.operator import handlers
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.processes import free_port
from iotistic_billing.settings import SettingsError, load_settings
from iotistic_billing.stripe_inbox import inbox as inbox_module
from iotistic_billing.stripe_inbox.inbox import EventInbox
from iotistic_billing.usage.metering import send_meter_events
from iotistic_billing.usage.partitions import maintain_partitions
from tests.unit.test_operator_passes import Customers

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

    def __iter__(
        self,
    ) -> Iterator[Any]:  # an insert's RETURNING that wrote nothing (a notice written already)
        return iter([])


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


class NoTlsServer:
    """A PostgreSQL without TLS as far as a client sees before its login: it answers an SSLRequest with
    `N`, and notes a startup message sent in plain text afterwards (a client that went on without TLS)."""

    def __init__(self) -> None:
        self.tls_requests = 0
        self.plaintext_logins = 0
        self.connections = 0
        self.connected = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.connected.set()
        try:
            first = await reader.readexactly(8)
            if first[4:] == SSL_REQUEST_CODE:
                self.tls_requests += 1
                writer.write(b"N")
                await writer.drain()
                first = await reader.readexactly(8)
            self.plaintext_logins += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def connections_reach(self, count: int) -> None:
        while self.connections < count:
            self.connected.clear()
            await self.connected.wait()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


SSL_REQUEST_CODE = (80877103).to_bytes(4, "big")


@pytest.mark.parametrize("tls", ["sslmode=require", "ssl=require", "sslmode=verify-full&sslrootcert={ca}"])
async def test_a_url_requiring_tls_is_refused_by_a_server_without_it_through_every_client(
    tls: str, tmp_path: Path
) -> None:
    """Found in review: `?sslmode=require` (libpq's, managed PostgreSQL's usual URL) crashed SQLAlchemy's
    engine with a TypeError while asyncpg's pool took it; `?ssl=require` (SQLAlchemy's) was sent to the
    server as a setting by asyncpg, which then logged in without TLS. Both now require TLS everywhere."""
    ca = tmp_path / "root.crt"
    ca.write_bytes(CertificateAuthority("database root").cert_pem)
    server = NoTlsServer()
    url = f"postgresql://billing@127.0.0.1:{await server.start()}/billing?{tls.format(ca=ca)}"
    failures: dict[str, BaseException] = {}
    try:
        engine = create_engine(url)
        try:
            async with session_factory(engine)() as session:
                await session.execute(text("SELECT 1"))
        except Exception as error:
            failures["engine"] = error
        finally:
            await engine.dispose()
        pool = await open_pool(url, max_size=1)
        try:
            await pool.fetchval("SELECT 1")
        except Exception as error:
            failures["pool"] = error
        finally:
            await pool.close()
        try:
            await (await connect(url)).close()
        except Exception as error:
            failures["cli"] = error
        listening = asyncio.create_task(listen(url, "billing_test", lambda: None))
        await asyncio.wait_for(server.connections_reach(4), 10)
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    finally:
        await server.stop()

    assert sorted(failures) == ["cli", "engine", "pool"]
    for client, error in failures.items():
        assert "rejected SSL upgrade" in str(error), (client, repr(error))
        assert database_unreachable(error), (client, repr(error))
    assert (server.tls_requests, server.plaintext_logins) == (4, 0)


@pytest.mark.parametrize(
    ("url", "dsn"),
    [
        ("postgresql://u@db:5432/billing", "postgresql://u@db:5432/billing"),
        ("postgres://u@db/billing?sslmode=require", "postgresql://u@db/billing?sslmode=require"),
        ("postgresql+asyncpg://u@db/billing?ssl=prefer", "postgresql://u@db/billing?sslmode=prefer"),
        (
            "postgresql://u:p%40ss@db/billing?ssl=verify-full&sslrootcert=/etc/ssl/rds.pem",
            "postgresql://u:p%40ss@db/billing?sslmode=verify-full&sslrootcert=/etc/ssl/rds.pem",
        ),
        (
            "postgresql://u@db/billing?sslmode=require&ssl=require",
            "postgresql://u@db/billing?sslmode=require",
        ),
    ],
)
def test_a_database_url_s_tls_setting_is_libpq_s_sslmode_for_every_client(url: str, dsn: str) -> None:
    assert plain_url(url) == dsn


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "postgresql://u@db/billing?sslmode=on",
            "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full, got 'on'",
        ),
        (
            "postgresql://u@db/billing?ssl=true",
            "ssl must be one of disable, allow, prefer, require, verify-ca, verify-full, got 'true'",
        ),
        (
            "postgresql://u@db/billing?ssl=require&sslmode=disable",
            "ssl and sslmode differ ('require', 'disable'): give sslmode alone",
        ),
        (
            "postgresql://u:p/ss@db/billing",
            "cannot be read as a URL (Port could not be cast to integer value as 'p'): percent-encode"
            " / ? # @ : [ ] in the user name and password",
        ),
    ],
)
def test_a_database_url_no_client_takes_is_refused_naming_it_at_start(url: str, message: str) -> None:
    """Found in review: such a URL passed the settings and failed at the first connection (the operator's
    migration: a traceback, or `invalid literal for int()` for a password with a `/`)."""
    with pytest.raises(ValueError) as refused_url:
        plain_url(url)
    assert str(refused_url.value) == f"DATABASE_URL: {message}"
    with pytest.raises(SettingsError) as refused_setting:
        load_settings(database_url=url)
    assert f"DATABASE_URL: {message}" in str(refused_setting.value)


class LockingConnection:
    """A pooled connection whose lock call (`fails="lock"`) or release (`fails="unlock"`) times out on
    the client, as asyncpg's command timeout does while PostgreSQL stalls (and may grant it meanwhile)."""

    def __init__(self, fails: str) -> None:
        self.fails = fails
        self.terminated = False

    async def fetchval(self, query: str, *args: Any) -> Any:
        if "pg_try_advisory_lock" not in query:
            return None  # nothing stored
        if self.fails == "lock":
            raise TimeoutError
        return True

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return []

    async def execute(self, query: str, *args: Any) -> str:
        if "pg_advisory_unlock" in query and self.fails == "unlock":
            raise TimeoutError
        return "DELETE 0"

    def terminate(self) -> None:
        self.terminated = True

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


class OneConnectionPool:
    def __init__(self, conn: LockingConnection) -> None:
        self.conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self, **options: Any) -> Any:
        yield self.conn


@pytest.mark.parametrize("fails", ["lock", "unlock"])
@pytest.mark.parametrize("run", ["meter", "partitions"])
async def test_a_lock_call_that_times_out_ends_its_connection_rather_than_pool_it_holding_the_lock(
    fails: str, run: str
) -> None:
    """Found in review: the pool keeps a session's advisory locks (its reset runs nothing), so a lock call
    that timed out on the client after the server granted it, or a release that timed out, handed the
    connection back still holding the meter (or partition) lock: every replica's run skipped, silently,
    for as long as that connection lived. It is ended instead, and the server releases the lock."""
    conn = LockingConnection(fails)
    pool = cast(Pool, OneConnectionPool(conn))
    with pytest.raises(DatabaseUnavailable):
        if run == "meter":
            await send_meter_events(pool, None, NOW, close_grace=timedelta(hours=1))
        else:
            await maintain_partitions(pool, NOW, ahead=1, retention_months=1200)
    assert conn.terminated


def housekeeping_context(sessions: Sessions) -> SimpleNamespace:
    """The operator's context as it starts (each default of OperatorContext), on `sessions`."""
    defaults = {
        field.name: field.default_factory()
        for field in dataclasses.fields(OperatorContext)
        if field.default_factory is not dataclasses.MISSING
    }
    settings = SimpleNamespace(dunning_restrict_days=14, trial_notice_days=3)
    return SimpleNamespace(**defaults | {"clock": lambda: NOW, "settings": settings, "sessions": sessions})


def trial_customer(name: str) -> kopf.Body:
    """A Customer on the operator's own trial, which ends in 2 days: its "trial ends soon" notice is due."""
    created = (NOW - timedelta(days=12)).isoformat()
    return kopf.Body(
        {
            "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
            "spec": {"email": f"ops@{name}.example", "companyName": name.title(), "trial": {"days": 14}},
        }
    )


async def test_postgresql_away_is_one_warning_for_the_trial_notices_not_a_traceback_a_customer_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: with PostgreSQL away the housekeeping logged a traceback for each trial Customer
    whose "trial ends soon" notice it could not write, every OPERATOR_TIMER_INTERVAL (50 trials, 50
    tracebacks a minute), though the next check writes it. One warning an outage, without a traceback,
    and a line once one is written; an error nobody expected keeps its traceback."""

    async def no_pass(ctx: Any, name: str, deployment_event: int | None = None) -> None:
        return None  # the passes a check starts (its licence is due): not this test's

    monkeypatch.setattr(handlers, "_refresh", no_pass)
    trials = [trial_customer(name) for name in ("acme", "globex", "initech")]
    # Two checks of each trial with PostgreSQL away, then one with it back, which writes the notice.
    ctx = housekeeping_context(Sessions([refused() for _ in range(6)] + [None, None, None]))
    ctx.kube = Customers(*map(dict, trials))  # each notice written from the Customer read fresh
    memo = kopf.Memo(context=ctx)
    with caplog.at_level(logging.INFO):
        for _check in range(2):
            for body in trials:
                await handlers.housekeeping(name=body["metadata"]["name"], body=body, memo=memo)
        told = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [(r.levelname, r.exc_info) for r in told] == [("WARNING", None)], [
            r.getMessage() for r in told
        ]
        assert "PostgreSQL cannot be reached (ConnectionRefusedError)" in told[0].getMessage()

        caplog.clear()
        for body in trials:
            await handlers.housekeeping(name=body["metadata"]["name"], body=body, memo=memo)
        back = [r.getMessage() for r in caplog.records if "again" in r.getMessage()]
        assert len(back) == 1 and back[0].endswith("again after 6 failed tries"), back
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    ctx = housekeeping_context(Sessions([RuntimeError("a bug")]))
    ctx.kube = Customers(*map(dict, trials))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        await handlers.housekeeping(name="acme", body=trials[0], memo=kopf.Memo(context=ctx))
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in errors] == ["trial notice of Customer acme not written"]
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], RuntimeError)
