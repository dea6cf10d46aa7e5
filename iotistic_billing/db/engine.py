"""The async engine and session factory; the one place that turns DATABASE_URL into connections."""

from __future__ import annotations

from typing import Final

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def async_url(database_url: str) -> str:
    """`postgresql://` as users write it, with the asyncpg driver SQLAlchemy needs."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+asyncpg://" + database_url[len(prefix) :]
    raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got {database_url.split('://')[0]}://")


def plain_url(database_url: str) -> str:
    """The URL as libpq and asyncpg take it (no SQLAlchemy driver suffix)."""
    return "postgresql://" + async_url(database_url).removeprefix("postgresql+asyncpg://")


# Every session's TCP keepalives, PostgreSQL's side: a client whose node died (no FIN, no RST) left its
# backend idle in transaction, holding its advisory locks (the Stripe inbox's batch lock, every replica
# waiting on it) until the kernel's default of about two hours; now about a minute and a half.
SESSION_SETTINGS: Final = {
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}


def create_engine(database_url: str, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        async_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # No SQL parameters (customer data, key hashes) in error messages and logs.
        hide_parameters=True,
        # An unreachable database is a fast 503, not asyncpg's 60 s default.
        connect_args={"timeout": 5, "server_settings": SESSION_SETTINGS},
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
