"""The async engine and session factory; the one place that turns DATABASE_URL into connections."""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from iotistic_billing.settings import database_url_problem


def async_url(database_url: str) -> str:
    """`postgresql://` as users write it, with the asyncpg driver SQLAlchemy needs."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+asyncpg://" + database_url[len(prefix) :]
    raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got {database_url.split('://')[0]}://")


def plain_url(database_url: str) -> str:
    """The URL as libpq and asyncpg take it (no SQLAlchemy driver suffix), every client's one source:
    its TLS setting is libpq's `sslmode`, with `sslrootcert` and the rest passed on as libpq reads them;
    `ssl=` (SQLAlchemy's spelling) becomes `sslmode=`, which asyncpg would send the server as a setting.
    ValueError for a URL the clients cannot read (database_url_problem)."""
    problem = database_url_problem(database_url)
    if problem is not None:
        raise ValueError(f"DATABASE_URL: {problem}")
    parts = urlsplit("postgresql://" + async_url(database_url).removeprefix("postgresql+asyncpg://"))
    query = parse_qsl(parts.query, keep_blank_values=True)
    ssl = [value for name, value in query if name == "ssl"]
    if not ssl:
        return parts.geturl()
    rest = [(name, value) for name, value in query if name not in ("ssl", "sslmode")]
    return parts._replace(query=urlencode([("sslmode", ssl[0]), *rest], safe="/")).geturl()


# TCP keepalive, both ends of every connection: probes after 60 s idle, every 10 s, given up after 3.
KEEPALIVE_IDLE: Final = 60
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 3

# Every session's TCP keepalives, PostgreSQL's side: a client whose node died (no FIN, no RST) left its
# backend idle in transaction, holding its advisory locks (the Stripe inbox's batch lock, every replica
# waiting on it) until the kernel's default of about two hours; now about a minute and a half.
SESSION_SETTINGS: Final = {
    "tcp_keepalives_idle": str(KEEPALIVE_IDLE),
    "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL),
    "tcp_keepalives_count": str(KEEPALIVE_COUNT),
}

# The client's side (keep_alive): as long for data sent and never acknowledged, which keepalive, probing
# only an idle connection, leaves to the kernel's retransmissions (about 15 minutes).
USER_TIMEOUT_MS: Final = (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000
_CLIENT_OPTIONS: Final = (
    (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
    (socket.IPPROTO_TCP, "TCP_KEEPIDLE", KEEPALIVE_IDLE),
    (socket.IPPROTO_TCP, "TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
    (socket.IPPROTO_TCP, "TCP_KEEPCNT", KEEPALIVE_COUNT),
    (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", USER_TIMEOUT_MS),
)


def keep_alive(connection: Any) -> None:
    """Client-side TCP keepalive on a new asyncpg connection's socket (asyncpg sets only TCP_NODELAY):
    a server gone silent without a reset (a partition, a frozen VM, a failover moving its address) left
    a statement, the inbox's claim or a session's, awaiting its answer for ever; now the connection is
    lost within about 90 s and the await raises. Options this platform lacks, or its kernel refuses, are
    skipped; a Unix-domain socket has none of them."""
    # asyncpg's Connection keeps its transport as `_transport` (0.30 to 0.32 alike; the protocol's copy
    # is not reachable from Python), and a TLS transport answers with the TCP socket beneath it.
    sock = connection._transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, name, value in _CLIENT_OPTIONS:
        option = getattr(socket, name, None)
        if option is not None:
            # A kernel or sandbox refusing one (ENOPROTOOPT) is no database away: the OSError would read
            # as "PostgreSQL cannot be reached" to every caller.
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


# An unreachable database is a fast 503, not asyncpg's 60 s default.
CONNECT_TIMEOUT: Final = 5.0


def connect_arguments(database_url: str) -> dict[str, Any]:
    """How every asyncpg connection here is opened (the engine's, the pool's, LISTEN's, the CLI's):
    the URL read once, a fast failure when PostgreSQL is away, the sessions' keepalives (and each
    connection, once open, its own: keep_alive)."""
    return {"dsn": plain_url(database_url), "timeout": CONNECT_TIMEOUT, "server_settings": SESSION_SETTINGS}


def create_engine(database_url: str, pool_size: int = 10) -> AsyncEngine:
    arguments = connect_arguments(database_url)

    async def connect() -> Any:
        # asyncpg reads the URL as the pool and LISTEN do (sslmode and the rest); SQLAlchemy's dialect
        # would pass each query parameter as a keyword, and asyncpg's connect takes no `sslmode`.
        connection = await asyncpg.connect(**arguments)
        keep_alive(connection)
        return connection

    return create_async_engine(
        async_url(database_url),
        async_creator=connect,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # No SQL parameters (customer data, key hashes) in error messages and logs.
        hide_parameters=True,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
