"""Delivery: destinations, segment actions, deliveries written with the ledger, claim/outcome
functions for the worker.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

from segflow.migrate import run_sql_file

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "0004_delivery.sql")


def downgrade() -> None:
    raise NotImplementedError("segflow migrations are forward-only")
