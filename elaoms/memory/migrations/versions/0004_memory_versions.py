"""Each caller's memory version, kept in a row by the database itself.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

A search of a caller this process does not hold, and the upkeep's check before saving an
index, asked for the caller's version as `count(*)` and `max(seq)` over all their
memories: about 300 index entries a caller at 100,000 stored calls, two thirds of the
statement that reads 25 callers' saved indexes (3.3 ms against 1.1 without it), and
growing with every call a caller makes. The row here answers in one index lookup.

Triggers keep it, in the transaction that changes the memories, for every statement that
inserts, deletes, moves or truncates them (a call stored, a forget, keys turned into keyed
hashes, a store copied in, an operator's SQL), so no path can leave it behind. `last_seq`
is the greatest sequence number the caller's memories have reached: a delete lowers the
count and leaves it (it is the greatest of those left only until then). The pair still
names one set of memories as long as a caller's memories commit in the order of their
seqs, which the store's per-caller lock makes so (`PostgresStore._caller_transaction`):
every memory at or below `last_seq` was then stored by the time of either of two equal
versions, and the ones still there at the later are all there at the earlier; the same
count makes them the same. (The count and greatest seq over the memories, as before, rest
on the same order.) The row goes with the caller's last memory.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Counts move by increments and decrements of the caller's row, which a concurrent writer
# of the same caller waits for (a count taken from the statement's snapshot could miss
# that writer's rows). Rows are locked in caller order, so two statements that write
# several callers each (a store copied in while the service runs) do not deadlock. An
# update is counted as its rows going and coming back: a key turned into a keyed hash
# moves them to another row; any other update leaves the count. (Triggers fire in name
# order: `moved_in` before `moved_out`, so such an update keeps the greatest seq reached;
# the other order would be as valid a version, the greatest seq of those left.)
COUNT_ADDED = """
CREATE FUNCTION count_added_memories() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO memory_versions AS v (user_id, memories, last_seq)
    SELECT user_id, count(*), max(seq) FROM added GROUP BY user_id ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET memories = v.memories + excluded.memories,
        last_seq = greatest(v.last_seq, excluded.last_seq);
    RETURN NULL;
END
$$
"""
COUNT_REMOVED = """
CREATE FUNCTION count_removed_memories() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM memory_versions
    WHERE user_id IN (SELECT user_id FROM removed) ORDER BY user_id FOR NO KEY UPDATE;
    UPDATE memory_versions AS v SET memories = v.memories - gone.n
    FROM (SELECT user_id, count(*) AS n FROM removed GROUP BY user_id) AS gone
    WHERE v.user_id = gone.user_id;
    DELETE FROM memory_versions
    WHERE memories <= 0 AND user_id IN (SELECT user_id FROM removed);
    RETURN NULL;
END
$$
"""
# TRUNCATE has no rows to count: every count goes with them.
COUNT_NONE = """
CREATE FUNCTION count_no_memories() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM memory_versions;
    RETURN NULL;
END
$$
"""
# (name, event, transition table, function): a trigger with a transition table has one
# event, so an update has one of each.
TRIGGERS = (
    ("memories_added", "INSERT", "REFERENCING NEW TABLE AS added", "count_added_memories"),
    ("memories_moved_in", "UPDATE", "REFERENCING NEW TABLE AS added", "count_added_memories"),
    ("memories_removed", "DELETE", "REFERENCING OLD TABLE AS removed", "count_removed_memories"),
    ("memories_moved_out", "UPDATE", "REFERENCING OLD TABLE AS removed", "count_removed_memories"),
    ("memories_truncated", "TRUNCATE", "", "count_no_memories"),
)


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE memory_versions (
            user_id text COLLATE "C" PRIMARY KEY,  -- as memories.user_id
            memories bigint NOT NULL,  -- how many the caller has
            last_seq bigint NOT NULL  -- the greatest seq they have reached
        )
        """
    )
    for function in (COUNT_ADDED, COUNT_REMOVED, COUNT_NONE):
        op.execute(function)
    for name, event, table, function in TRIGGERS:
        op.execute(
            f"CREATE TRIGGER {name} AFTER {event} ON memories {table}"
            f" FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )
    # In the transaction that made the triggers (which waits for writers of memories and
    # holds them off until it commits): no memory is counted twice or missed.
    op.execute(
        "INSERT INTO memory_versions (user_id, memories, last_seq)"
        " SELECT user_id, count(*), max(seq) FROM memories GROUP BY user_id"
    )
    # The planner's statistics now, not from autovacuum's first pass under load.
    op.execute("ANALYZE memory_versions")


def downgrade() -> None:
    for name, *_ in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON memories")
    for function in dict.fromkeys(function for *_, function in TRIGGERS):
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    op.execute("DROP TABLE IF EXISTS memory_versions")
