"""Counters every replica shares (failed-authentication bursts, for the anomaly alert).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Without Redis each process counted alone: N replicas behind a load balancer each saw a
burst split N ways, so it had to be N times the threshold before any alerted. A row per
counter, incremented by an upsert, gives one count and exactly one increment crossing the
threshold, whichever replica makes it.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE shared_counters (
            name text COLLATE "C" PRIMARY KEY,  -- never personal data (a window's name)
            count bigint NOT NULL,
            expires_at double precision NOT NULL  -- epoch seconds
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS shared_counters")
