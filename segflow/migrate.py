"""Applies segflow's alembic migrations (`segflow db upgrade`)."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.config import Config

from segflow.paths import MIGRATIONS_DIR, SCHEMA_DIR


def sqlalchemy_url(url: str) -> str:
    """The same server, spoken to by SQLAlchemy through psycopg 3."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise ValueError(f"not a PostgreSQL URL: {url!r}")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would read % in passwords.
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Brings the database at `url` to `revision`; a second run is a no-op."""
    command.upgrade(alembic_config(url), revision)


def run_sql_file(connection: Any, name: str) -> None:
    """Runs one schema file verbatim through the psycopg cursor with no parameters, so
    `%` in format() strings is not taken for a placeholder."""
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        cursor.execute((SCHEMA_DIR / name).read_text())
    finally:
        cursor.close()
