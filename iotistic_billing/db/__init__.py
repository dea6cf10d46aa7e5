"""PostgreSQL records: models, async engine and session factory, embedded server, Alembic migrations."""
