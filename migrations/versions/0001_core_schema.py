"""Core schema: clock, profiles, identities, FX, partitioned events, ingest, engine runtime.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

from segflow.migrate import run_sql_file

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    for name in ("0001_core.sql", "0002_ingest.sql", "0003_engine.sql", "0005_rollups.sql"):
        run_sql_file(op.get_bind(), name)
    op.execute("SELECT segflow.maintain_partitions()")


def downgrade() -> None:
    raise NotImplementedError("segflow migrations are forward-only")
