"""Stream: the writing transaction of every ledger row, so readers can resume without gaps.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

from segflow.migrate import run_sql_file

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "0005_stream.sql")


def downgrade() -> None:
    raise NotImplementedError("segflow migrations are forward-only")
