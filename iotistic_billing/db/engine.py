"""The async engine and session factory; the one place that turns DATABASE_URL into connections."""

from __future__ import annotations

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


def create_engine(database_url: str, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        async_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # No SQL parameters (customer data, key hashes) in error messages and logs.
        hide_parameters=True,
        # An unreachable database is a fast 503, not asyncpg's 60 s default.
        connect_args={"timeout": 5},
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
