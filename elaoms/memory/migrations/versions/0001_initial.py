"""Every table of the PostgreSQL store, as the embedded store's (elaoms/memory/sqlite.py).

Revision ID: 0001
Revises:
Create Date: 2026-11-30

Differences from SQLite, and why:
- Keys and ids sort in byte order (COLLATE "C"), as SQLite's do, whatever the database's
  locale: "the greatest conversation id" means the same on both stores.
- Newest first puts calls without a start last (SQLite sorts NULL lowest; PostgreSQL's
  DESC puts NULL first unless told): indexes are built in that order.
- Memory text is bytea (UTF-8, or sealed with ENCRYPTION_KEY): a transcript may hold a NUL
  character, which PostgreSQL's text refuses.
- Agent configurations have their own table, not rows among the memories.
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = (
    "caller_directory",
    "agent_profiles",
    "forgotten_conversations",
    "store_keys",
    "call_digests",
    "caller_profiles",
    "caller_indexes",
    "memories",
    "calls",
)

SCHEMA = [
    """
    CREATE TABLE calls (
        event_type text COLLATE "C" NOT NULL,
        conversation_id text COLLATE "C" NOT NULL,
        user_id text COLLATE "C" NOT NULL,  -- the caller id, or its keyed hash
        agent_id text COLLATE "C",
        event_timestamp bigint,
        started_at bigint,
        memory_id text NOT NULL,
        payload bytea NOT NULL,  -- the body as received (sealed with encryption at rest)
        stored_at double precision NOT NULL,
        caller bytea,  -- the caller id, encrypted, when `user_id` is its keyed hash
        PRIMARY KEY (event_type, conversation_id)
    )
    """,
    "CREATE INDEX calls_by_user ON calls (user_id, started_at DESC NULLS LAST)",
    "CREATE INDEX calls_by_start ON calls (started_at DESC NULLS LAST)",
    "CREATE INDEX calls_by_agent ON calls (agent_id)",
    """
    CREATE TABLE memories (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text COLLATE "C" NOT NULL UNIQUE,
        user_id text COLLATE "C" NOT NULL,
        kind text,
        content bytea NOT NULL,
        metadata bytea NOT NULL,  -- JSON
        created_at double precision NOT NULL
    )
    """,
    "CREATE INDEX memories_by_user ON memories (user_id, seq)",
    # A caller's saved search index (search's own format, sealed) and the version of their
    # memories it describes.
    """
    CREATE TABLE caller_indexes (
        user_id text COLLATE "C" PRIMARY KEY,
        memories bigint NOT NULL,
        last_seq bigint NOT NULL,
        data bytea NOT NULL
    )
    """,
    """
    CREATE TABLE caller_profiles (
        user_id text COLLATE "C" PRIMARY KEY,
        profile bytea NOT NULL,
        updated_at double precision NOT NULL
    )
    """,
    """
    CREATE TABLE call_digests (
        event_type text COLLATE "C" NOT NULL,
        conversation_id text COLLATE "C" NOT NULL,
        user_id text COLLATE "C" NOT NULL,
        agent_id text COLLATE "C",
        started_at bigint,
        version integer NOT NULL,
        marks text NOT NULL,
        facts bytea NOT NULL,
        words bytea NOT NULL,
        PRIMARY KEY (event_type, conversation_id)
    )
    """,
    # Serves `call_history` (order, counts, marks) from the index alone: only the few
    # digests returned are read.
    """
    CREATE INDEX call_digests_by_user ON call_digests
        (user_id, event_type, started_at DESC NULLS LAST, conversation_id DESC)
        INCLUDE (marks, version)
    """,
    # Calls per day for everyone (the console's chart) from the index alone.
    "CREATE INDEX call_digests_by_start ON call_digests (event_type, started_at)",
    # The store's secret for keyed hashes (wrapped with ENCRYPTION_KEY when encryption is on).
    """
    CREATE TABLE store_keys (
        name text COLLATE "C" PRIMARY KEY,
        value bytea NOT NULL
    )
    """,
    # Conversations forgotten with their caller: a keyed hash of the conversation id (never
    # the number), so a replayed or backfilled copy is answered and not stored again.
    """
    CREATE TABLE forgotten_conversations (
        conversation_key text COLLATE "C" PRIMARY KEY,
        forgotten_at double precision NOT NULL
    )
    """,
    """
    CREATE TABLE agent_profiles (
        agent_id text COLLATE "C" PRIMARY KEY,
        profile bytea NOT NULL,
        fetched_at double precision NOT NULL
    )
    """,
    # The console's list of callers: one row per prepared profile, written with it, so a
    # page of 100,000 callers is an index range. `name_key`: the folded name, or with
    # encryption at rest keyed hashes of its words; `number_key`: with encryption, keyed
    # hashes of the whole number and of its last four digits (the caller key is one-way).
    """
    CREATE TABLE caller_directory (
        user_id text COLLATE "C" PRIMARY KEY,
        name_key text NOT NULL,
        call_count bigint NOT NULL,
        last_started_at bigint,
        caller bytea NOT NULL,  -- the caller id as the console shows it (sealed)
        number_key text NOT NULL
    )
    """,
    """
    CREATE INDEX caller_directory_by_last
        ON caller_directory (last_started_at DESC NULLS LAST, user_id DESC)
    """,
]


def upgrade() -> None:
    for statement in SCHEMA:
        op.execute(statement)


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"DROP TABLE IF EXISTS {table}")
