"""The PostgreSQL store's schema, versioned by Alembic (revisions in `versions/`).

`upgrade` is what `elaoms db upgrade` and every replica's start-up run: under one advisory
lock, in one transaction, so replicas starting together on an empty database wait for the
first, then find the schema made and do nothing (PostgreSQL's DDL is transactional: a
failed upgrade leaves nothing behind).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent
# pg_advisory_xact_lock's key for schema changes: any constant other locks do not use.
SCHEMA_LOCK = 0x454C414F4D53  # "ELAOMS"


def engine_url(database_url: str) -> str:
    """DATABASE_URL (libpq's `postgresql://` or `postgres://`) in SQLAlchemy's spelling
    for psycopg 3, the driver the store itself uses."""
    for scheme in ("postgresql://", "postgres://"):
        if database_url.startswith(scheme):
            return "postgresql+psycopg://" + database_url[len(scheme) :]
    return database_url


def _config(connection: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def _connect(database_url: str, connect_timeout: float) -> Engine:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(
        engine_url(database_url),
        poolclass=NullPool,
        connect_args={"connect_timeout": max(1, round(connect_timeout))},
    )


def upgrade(database_url: str, revision: str = "head", *, connect_timeout: float = 10.0) -> None:
    """Bring the schema to `revision`, safe to run from several processes at once."""
    from alembic import command
    from sqlalchemy import text

    engine = _connect(database_url, connect_timeout)
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
            command.upgrade(_config(connection), revision)
    finally:
        engine.dispose()


def current(database_url: str, *, connect_timeout: float = 10.0) -> str | None:
    """The revision the database is at, None before the first upgrade."""
    from alembic.runtime.migration import MigrationContext

    engine = _connect(database_url, connect_timeout)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision this version of ELAOMS ships."""
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory(str(HERE)).get_current_head()
    assert revision is not None
    return revision
