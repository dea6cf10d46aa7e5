"""The webhook server's asyncpg pool: its hot paths (usage reports, Stripe deliveries) and the usage
queries skip SQLAlchemy's engine, whose checkout ping, transaction and ORM cost several round trips a
request; a statement here is one.

Every helper takes a connection or a pool; an unreachable database is raised as `DatabaseUnavailable`,
which the API turns into a 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Protocol

# asyncpg ships no type information; the Protocols below say what this package uses of it.
import asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from iotistic_billing.db.engine import connect_arguments, keep_alive

Record = Mapping[str, Any]


class Queryable(Protocol):
    """What a connection and a pool both offer (the pool runs each call on a connection of its own)."""

    async def fetch(self, query: str, *args: Any) -> list[Record]: ...
    async def fetchrow(self, query: str, *args: Any) -> Record | None: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


class Connection(Queryable, Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Any]: ...
    async def copy_records_to_table(
        self, table_name: str, *, records: Iterable[Sequence[Any]], columns: Sequence[str]
    ) -> str: ...
    async def close(self) -> None: ...
    def terminate(self) -> None: ...


class Pool(Queryable, Protocol):
    def acquire(self, *, timeout: float | None = None) -> AbstractAsyncContextManager[Connection]: ...
    async def close(self) -> None: ...


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (or dropped the connection): nothing was written, retry later."""


# Connection lost or refused, the server shutting down or starting up, out of connections: retry later.
CONNECTION_ERRORS: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    OSError,
    asyncio.TimeoutError,
)


# How a log line or a condition names that: the problem of every error database_unreachable accepts.
DATABASE_UNREACHABLE: Final = "PostgreSQL cannot be reached"


def database_unreachable(error: BaseException) -> bool:
    """Whether `error` says PostgreSQL cannot be reached (refused, dropped, shutting down, out of
    connections or slots, timed out), raised by asyncpg, by SQLAlchemy's sessions or as
    DatabaseUnavailable: a dependency away, to retry, not a bug to log with its traceback."""
    if any(_client_bug(cause) for cause in _causes(error)):
        return False
    # asyncpg raises OSError (a refused connection) from connect straight through SQLAlchemy's pool.
    if isinstance(error, (DatabaseUnavailable, *CONNECTION_ERRORS)):
        return True
    if isinstance(error, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    # asyncpg reports a dropped connection as a DBAPI error flagged as invalidating the connection.
    return isinstance(error, DBAPIError) and error.connection_invalidated


def _causes(error: BaseException) -> list[BaseException]:
    """`error`, what SQLAlchemy wrapped in it, and what that was raised from."""
    found = [error]
    for _ in range(3):
        inner = getattr(found[-1], "orig", None) or found[-1].__cause__
        if not isinstance(inner, BaseException) or inner in found:
            break
        found.append(inner)
    return found


def _client_bug(error: BaseException) -> bool:
    """asyncpg's InterfaceErrors of our own making, not of the connection: an argument it cannot encode
    (DataError), a second query on a connection in use. Found in review: reported as "PostgreSQL cannot
    be reached", once an outage, they went quiet."""
    if isinstance(error, asyncpg.exceptions.DataError):
        return True
    return isinstance(error, asyncpg.InterfaceError) and "another operation is in progress" in str(error)


async def keep_session(connection: Connection) -> None:
    """The pool's reset: nothing. asyncpg's default runs `RESET ALL; UNLISTEN *; CLOSE ALL; SELECT
    pg_advisory_unlock_all()` on every release, a second round trip per statement; our sessions set
    nothing, listen to nothing and hold no cursors, and a session's advisory lock (usage metering's,
    the partition run's) is released by its holder. An open transaction is still rolled back by asyncpg
    before this runs."""


async def open_pool(
    database_url: str, max_size: int = 10, init: Callable[[Connection], Awaitable[None]] | None = None
) -> Pool:
    """A pool that connects on first use (min_size 0), so the server starts while PostgreSQL is down
    and answers 503 until it is back, as the rest of the API does. `init` runs on each new connection,
    after its TCP keepalive is set (keep_alive)."""

    async def prepare(connection: Connection) -> None:
        keep_alive(connection)
        if init is not None:
            await init(connection)

    pool: Pool = await asyncpg.create_pool(
        **connect_arguments(database_url),
        min_size=0,
        max_size=max_size,
        init=prepare,
        reset=keep_session,
        # A statement that hangs (locks, an overloaded server) fails the request rather than holding it.
        command_timeout=10,
        # Idle connections are dropped, so a restarted PostgreSQL costs one failed request at most.
        max_inactive_connection_lifetime=60,
    )
    return pool


# The CLI's statements: a year of every customer's reports takes a while, a locked table longer.
CLI_COMMAND_TIMEOUT: Final = 60.0


async def connect(database_url: str) -> Connection:
    """One connection of its own (the CLI's); DatabaseUnavailable when PostgreSQL cannot be reached."""
    try:
        conn: Connection = await asyncpg.connect(
            **connect_arguments(database_url), command_timeout=CLI_COMMAND_TIMEOUT
        )
        keep_alive(conn)
    except CONNECTION_ERRORS as error:
        # Its words too: the CLI prints them, and "rejected SSL upgrade" says what a class name does not.
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise DatabaseUnavailable(reason) from None
    return conn


# How long a request waits for a free pooled connection before it is DatabaseUnavailable (a 503 to
# retry); read at each call, so a test sets it short rather than waiting for it.
POOL_WAIT_SECONDS = 5.0


@asynccontextmanager
async def connection(pool: Pool) -> AsyncIterator[Connection]:
    """A pooled connection, waited for POOL_WAIT_SECONDS at most; connection failures become
    DatabaseUnavailable."""
    try:
        async with pool.acquire(timeout=POOL_WAIT_SECONDS) as conn:
            yield conn
    except CONNECTION_ERRORS as error:
        raise DatabaseUnavailable(type(error).__name__) from None


@asynccontextmanager
async def session_lock(conn: Connection, key: int) -> AsyncIterator[bool]:
    """PostgreSQL's session advisory lock `key` on `conn` when no one holds it (False: another does),
    released at the end. The pool's reset keeps a session's locks (keep_session), so a lock call or
    release that fails (its command timeout, while the server went on and granted it) ends the connection
    instead of handing it back holding the lock: every replica's run skipped, silently, for as long as that
    pooled connection lived (found in review)."""
    try:
        held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
    except BaseException:
        conn.terminate()
        raise
    if not held:
        yield False
        return
    try:
        yield True
    except BaseException:
        await _release(conn, key, quiet=True)  # the run's own error stands
        raise
    await _release(conn, key)


async def _release(conn: Connection, key: int, *, quiet: bool = False) -> None:
    try:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
    except BaseException:
        conn.terminate()  # the server releases the lock with the backend
        if not quiet:
            raise


__all__ = [
    "CONNECTION_ERRORS",
    "DATABASE_UNREACHABLE",
    "POOL_WAIT_SECONDS",
    "Connection",
    "DatabaseUnavailable",
    "Pool",
    "Queryable",
    "Record",
    "connect",
    "connection",
    "database_unreachable",
    "keep_session",
    "open_pool",
    "session_lock",
]
