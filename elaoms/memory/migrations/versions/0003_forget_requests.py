"""Forgets every replica applies to its own disk.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

A caller's webhook files are on whichever replicas received their deliveries, and each
replica's disk is its own: a forget run on one replica deleted PostgreSQL's rows and that
replica's files only. Each forget is now also a row here, which every replica's
maintenance reads after the last one it applied (its cursor is in its data folder) and
applies to its own files. The caller and conversation ids are sealed like the rest of the
store, and a row goes once every file it concerns is past retention anyway.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE forget_requests (
            seq bigserial PRIMARY KEY,
            caller_key text COLLATE "C" NOT NULL,  -- as calls.user_id (keyed hash if sealed)
            caller bytea NOT NULL,  -- the caller id, sealed when encryption is on
            conversations bytea NOT NULL,  -- their conversation ids (JSON), sealed too
            requested_at double precision NOT NULL  -- epoch seconds
        )
        """
    )
    # A delivery of a call made before its caller was forgotten is refused (`add_call`).
    op.execute("CREATE INDEX forget_requests_by_caller ON forget_requests (caller_key)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS forget_requests")
