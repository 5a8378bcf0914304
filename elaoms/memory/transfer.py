"""Copy the embedded store (one SQLite file) into PostgreSQL: `elaoms migrate --to postgres`.

Every table is walked in primary-key order, a batch at a time (never a whole table in
memory); each batch sends only the rows PostgreSQL does not have yet, in one transaction,
with `ON CONFLICT DO NOTHING`. So an interrupted copy (Ctrl-C, SIGKILL, a lost connection)
keeps what it committed and a second run continues; a run over a finished copy writes
nothing; and a run after the service wrote more to SQLite copies only the new rows.

Rows are copied as they are stored, ciphertext included: both stores seal with the same
`PayloadCipher` and key callers by keyed hashes under the store's hash key, which is copied
too. The differences (see `elaoms/memory/migrations/versions/0001_initial.py`) are made
here: memory text becomes bytea, an agent's configuration is sealed like the other tables
(SQLite keeps it as clear JSON), and NUL characters leave text columns as the PostgreSQL
store writes them. Saved search indexes are copied: memories keep their sequence numbers,
so an index still describes its caller's memories.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from elaoms.crypto import EncryptionConfigError, PayloadCipher
from elaoms.memory.postgres import ALL_PROTECTED, HASH_KEY, _text
from elaoms.memory.postgres_copies import CHANNEL, EVERYONE, copy_key

if TYPE_CHECKING:
    import psycopg

DEFAULT_BATCH_SIZE = 500
# Tables whose rows are keyed under the store's hash key: a target holding any of them
# cannot take another key.
KEYED_TABLES = (
    "calls",
    "call_digests",
    "memories",
    "caller_profiles",
    "caller_directory",
    "caller_indexes",
    "forgotten_conversations",
)


class MigrationRefused(Exception):
    """The target cannot take this store (another hash key over data of its own)."""


Row = tuple[Any, ...]


def _nullable_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


@dataclass(frozen=True)
class Table:
    """How one table travels: its columns, primary key, and the change a row needs."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    # A SQLite row (columns in order) as PostgreSQL's store writes it.
    convert: Callable[[Row, PayloadCipher], Row]
    # INSERT needs this for the identity column (memories.seq).
    overriding: bool = False
    # Rows the service rewrites (a caller's profile after each call): a later run brings
    # the copy up to date when this condition on `t` (the copy) and `excluded` (the
    # source's row) holds. None: rows never change once written, so a row already copied
    # is skipped without being sent again.
    refresh: str | None = None
    # Rows that tell running replicas, at their batch's commit, that a caller changed
    # (`elaoms.memory.postgres_copies`): a profile copied in must not be answered "no
    # profile" until the copy ends, or ever if it is interrupted.
    notifies: bool = False

    def key_of(self, row: Row) -> tuple[Any, ...]:
        return tuple(row[self.columns.index(column)] for column in self.key)


def _calls(row: Row, cipher: PayloadCipher) -> Row:
    event_type, conversation_id, user_id, agent_id, event_ts, started, memory_id = row[:7]
    payload, stored_at, caller = row[7:]
    return (
        _text(event_type),
        _text(conversation_id),
        _text(user_id),
        _nullable_text(agent_id),
        event_ts,
        started,
        _text(memory_id),
        bytes(payload),
        stored_at,
        None if caller is None else bytes(caller),
    )


def _digests(row: Row, cipher: PayloadCipher) -> Row:
    event_type, conversation_id, user_id, agent_id, started, version, marks, facts, words = row
    return (
        _text(event_type),
        _text(conversation_id),
        _text(user_id),
        _nullable_text(agent_id),
        started,
        version,
        marks,
        bytes(facts),
        bytes(words),
    )


def _memories(row: Row, cipher: PayloadCipher) -> Row:
    seq, memory_id, user_id, kind, content, metadata, created_at = row
    # SQLite keeps the sealed (or clear) text as TEXT, PostgreSQL as bytea: both read it
    # back with `cipher.decrypt(bytes)`, so its UTF-8 bytes are the same value.
    return (
        seq,
        _text(memory_id),
        _text(user_id),
        _nullable_text(kind),
        _as_bytes(content),
        _as_bytes(metadata),
        created_at,
    )


def _by_caller(row: Row, cipher: PayloadCipher) -> Row:
    return (_text(row[0]), *(bytes(v) if isinstance(v, bytes | memoryview) else v for v in row[1:]))


def _agent_profiles(row: Row, cipher: PayloadCipher) -> Row:
    agent_id, profile, fetched_at = row
    # SQLite keeps an agent's configuration as clear JSON; PostgreSQL seals it like the rest
    # (it may hold the agent's tool credentials).
    return (_text(agent_id), cipher.encrypt(_as_bytes(profile)), fetched_at)


def _as_is(row: Row, cipher: PayloadCipher) -> Row:
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)


TABLES = (
    Table(
        "agent_profiles",
        ("agent_id", "profile", "fetched_at"),
        ("agent_id",),
        _agent_profiles,
        # Sealed anew at each copy (a new ciphertext): fetched again is what tells.
        refresh="excluded.fetched_at > t.fetched_at",
    ),
    # Before the calls: a conversation forgotten is never copied back by a later run.
    Table(
        "forgotten_conversations",
        ("conversation_key", "forgotten_at"),
        ("conversation_key",),
        _as_is,
    ),
    Table(
        "calls",
        (
            "event_type",
            "conversation_id",
            "user_id",
            "agent_id",
            "event_timestamp",
            "started_at",
            "memory_id",
            "payload",
            "stored_at",
            "caller",
        ),
        ("event_type", "conversation_id"),
        _calls,
    ),
    Table(
        "call_digests",
        (
            "event_type",
            "conversation_id",
            "user_id",
            "agent_id",
            "started_at",
            "version",
            "marks",
            "facts",
            "words",
        ),
        ("event_type", "conversation_id"),
        _digests,
    ),
    Table(
        "memories",
        ("seq", "id", "user_id", "kind", "content", "metadata", "created_at"),
        ("seq",),
        _memories,
        overriding=True,
    ),
    Table(
        "caller_profiles",
        ("user_id", "profile", "updated_at"),
        ("user_id",),
        _by_caller,
        refresh="(t.profile, t.updated_at) IS DISTINCT FROM (excluded.profile, excluded.updated_at)",
        notifies=True,
    ),
    Table(
        "caller_directory",
        ("user_id", "name_key", "call_count", "last_started_at", "caller", "number_key"),
        ("user_id",),
        _by_caller,
        refresh="(t.name_key, t.call_count, t.last_started_at, t.caller, t.number_key)"
        " IS DISTINCT FROM (excluded.name_key, excluded.call_count, excluded.last_started_at,"
        " excluded.caller, excluded.number_key)",
    ),
    Table(
        "caller_indexes",
        ("user_id", "memories", "last_seq", "data"),
        ("user_id",),
        _by_caller,
        refresh="(t.memories, t.last_seq, t.data)"
        " IS DISTINCT FROM (excluded.memories, excluded.last_seq, excluded.data)",
    ),
)


class Progress(Protocol):
    def start(self, table: str, total: int) -> None: ...

    def advance(self, table: str, rows: int) -> None: ...


@dataclass
class TableCount:
    table: str
    source: int
    target: int
    copied: int = 0

    @property
    def matches(self) -> bool:
        return self.source == self.target


@dataclass
class MigrationReport:
    counts: list[TableCount] = field(default_factory=list)
    hash_key: str = ""  # "copied", "same", "replaced" (an empty target's own key)
    dry_run: bool = False

    @property
    def verified(self) -> bool:
        return all(count.matches for count in self.counts)

    @property
    def copied(self) -> int:
        return sum(count.copied for count in self.counts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "verified": None if self.dry_run else self.verified,
            "hash_key": self.hash_key,
            "copied": self.copied,
            "tables": {
                count.table: {
                    "sqlite": count.source,
                    "postgres": count.target,
                    "copied": count.copied,
                }
                for count in self.counts
            },
        }


class StoreMigration:
    """One copy of `sqlite_path` into `database_url` (see the module's docstring)."""

    def __init__(
        self,
        sqlite_path: Path,
        database_url: str,
        cipher: PayloadCipher,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        connect_timeout: float = 10.0,
    ) -> None:
        self.sqlite_path = Path(sqlite_path)
        self.database_url = database_url
        self.cipher = cipher
        self.batch_size = max(1, batch_size)
        self.connect_timeout = connect_timeout

    # Connections -------------------------------------------------------------------------
    def _source(self) -> sqlite3.Connection:
        """A read-only connection: the copy never writes to the store it reads."""
        uri = f"{self.sqlite_path.resolve().as_uri()}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)
        connection.execute("PRAGMA busy_timeout=30000")
        return connection

    def _target(self) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(
            self.database_url, connect_timeout=max(1, round(self.connect_timeout))
        )

    # The steps ---------------------------------------------------------------------------
    def prepare_source(self) -> None:
        """Open the file once as the service would: a file from an older version is brought
        to the current form (agent profiles in their table, rows sealed when encryption is
        on, the caller directory filled), which is what the copy reads."""
        import asyncio

        from elaoms.memory.sqlite import SQLiteStore

        if not self.sqlite_path.is_file():
            raise MigrationRefused(f"no SQLite store at {self.sqlite_path}")
        # The file and its folder keep the modes they have.
        store = SQLiteStore(
            self.sqlite_path,
            file_mode=self.sqlite_path.stat().st_mode & 0o777,
            dir_mode=self.sqlite_path.parent.stat().st_mode & 0o777,
            cipher=self.cipher,
        )
        asyncio.run(store.close())

    def plan(self) -> MigrationReport:
        """What a copy would do, writing nothing anywhere (`--dry-run`)."""
        import psycopg

        report = MigrationReport(dry_run=True)
        source = self._source()
        try:
            with self._target() as target:
                try:
                    report.hash_key = self._check_hash_key(source, target, write=False)
                    targets = {t.name: _count(target, t.name) for t in TABLES}
                except psycopg.errors.UndefinedTable:  # no schema yet: nothing there
                    target.rollback()
                    report.hash_key = "copied"
                    targets = {t.name: 0 for t in TABLES}
            for table in TABLES:
                report.counts.append(
                    TableCount(table.name, _sqlite_count(source, table.name), targets[table.name])
                )
        finally:
            source.close()
        return report

    def run(self, progress: Progress | None = None) -> MigrationReport:
        """Copy what PostgreSQL lacks, then count both sides."""
        from elaoms.memory import migrations

        migrations.upgrade(self.database_url, connect_timeout=self.connect_timeout)
        report = MigrationReport()
        source = self._source()
        try:
            with self._target() as target:
                report.hash_key = self._check_hash_key(source, target, write=True)
                totals = {table.name: _sqlite_count(source, table.name) for table in TABLES}
                copied = {}
                for table in TABLES:
                    if progress is not None:
                        progress.start(table.name, totals[table.name])
                    copied[table.name] = self._copy(source, target, table, progress)
                self._advance_sequence(source, target)
                # Replicas already running on this database drop what they copied of it.
                target.execute("SELECT pg_notify(%s, %s)", (CHANNEL, EVERYONE))
                for table in TABLES:
                    report.counts.append(
                        TableCount(
                            table.name,
                            _sqlite_count(source, table.name),
                            _count(target, table.name),
                            copied[table.name],
                        )
                    )
                target.commit()
        finally:
            source.close()
        return report

    def _check_hash_key(
        self, source: sqlite3.Connection, target: psycopg.Connection[Any], *, write: bool
    ) -> str:
        """Give the target the store's hash key: caller keys and tombstones are keyed
        hashes under it, so PostgreSQL must use the same one to find them. A target with
        another key and rows of its own is refused (they would become unreadable)."""
        found = source.execute(
            "SELECT value FROM store_keys WHERE name = ?", (HASH_KEY,)
        ).fetchone()
        if found is None:
            raise MigrationRefused(
                f"{self.sqlite_path} has no hash key: it is not an ELAOMS store (or was never "
                "opened by the service)"
            )
        wrapped = bytes(found[0])
        ours = self.cipher.decrypt(wrapped)
        row = target.execute("SELECT value FROM store_keys WHERE name = %s", (HASH_KEY,)).fetchone()
        outcome = "copied"
        if row is not None:
            try:
                theirs: bytes | None = self.cipher.decrypt(bytes(row[0]))
            except EncryptionConfigError:  # sealed with an ENCRYPTION_KEY we do not have
                theirs = None
            if theirs == ours:
                outcome = "same"
            else:
                holding = [table for table in KEYED_TABLES if _has_rows(target, table)]
                if holding:
                    raise MigrationRefused(
                        "the PostgreSQL store already holds data under another hash key "
                        f"({', '.join(holding)}): its callers would no longer be found. "
                        "Migrate into an empty database (or one this store was migrated "
                        "into before)"
                    )
                outcome = "replaced"  # the key an empty store made on its first start
        if write:
            if outcome != "same":
                target.execute(
                    "INSERT INTO store_keys (name, value) VALUES (%s, %s)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (HASH_KEY, wrapped),
                )
            # Only a source whose every row is sealed lets the target skip its start-up scan.
            if _has_key(source, ALL_PROTECTED):
                target.execute(
                    "INSERT INTO store_keys (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (ALL_PROTECTED, b"1"),
                )
            else:
                target.execute("DELETE FROM store_keys WHERE name = %s", (ALL_PROTECTED,))
            target.commit()
        return outcome

    def _copy(
        self,
        source: sqlite3.Connection,
        target: psycopg.Connection[Any],
        table: Table,
        progress: Progress | None,
    ) -> int:
        """Copy one table a batch at a time; the rows copied."""
        columns = ", ".join(table.columns)
        values = ", ".join(["%s"] * len(table.columns))
        overriding = " OVERRIDING SYSTEM VALUE" if table.overriding else ""
        insert = f"INSERT INTO {table.name} AS t ({columns}){overriding} VALUES ({values})"
        if table.refresh is None:
            insert += " ON CONFLICT DO NOTHING"
        else:
            updates = ", ".join(f"{c} = excluded.{c}" for c in table.columns if c not in table.key)
            insert += (
                f" ON CONFLICT ({', '.join(table.key)}) DO UPDATE SET {updates}"
                f" WHERE {table.refresh}"
            )
        copied = 0
        for batch in self._batches(source, table):
            rows = [table.convert(row, self.cipher) for row in batch]
            if table.refresh is None:
                present = self._present(target, table, [table.key_of(row) for row in rows])
                rows = [row for row in rows if table.key_of(row) not in present]
            if rows:
                with target.cursor() as cursor:
                    cursor.executemany(insert, rows)
                    written = max(0, cursor.rowcount)
                    if table.notifies:
                        cursor.execute(
                            "SELECT pg_notify(%s, notice) FROM unnest(%s::text[]) AS notice",
                            (CHANNEL, [copy_key(table.key_of(row)[0]) for row in rows]),
                        )
                if table.overriding:
                    # In the same transaction: the service's next memory never takes a
                    # copied number, even if the copy stops right after this batch.
                    self._advance_sequence(source, target)
                target.commit()
                copied += written
            after_batch(table.name)
            if progress is not None:
                progress.advance(table.name, len(batch))
        return copied

    def _batches(self, source: sqlite3.Connection, table: Table) -> Iterator[list[Row]]:
        """The table in primary-key order, `batch_size` rows at a time (keyset pagination:
        each query starts after the last key seen, so none reads what came before)."""
        columns = ", ".join(table.columns)
        key = ", ".join(table.key)
        after: tuple[Any, ...] | None = None
        while True:
            if after is None:
                where, parameters = "", []
            else:
                marks = ", ".join("?" * len(table.key))
                where, parameters = f"WHERE ({key}) > ({marks})", list(after)
            batch = source.execute(
                f"SELECT {columns} FROM {table.name} {where} ORDER BY {key} LIMIT ?",
                [*parameters, self.batch_size],
            ).fetchall()
            if not batch:
                return
            yield batch
            after = table.key_of(batch[-1])
            if len(batch) < self.batch_size:
                return

    def _present(
        self, target: psycopg.Connection[Any], table: Table, keys: Sequence[tuple[Any, ...]]
    ) -> set[tuple[Any, ...]]:
        """Which of `keys` the target already holds (one indexed lookup for the batch)."""
        if len(table.key) == 1:
            rows = target.execute(
                f"SELECT {table.key[0]} FROM {table.name} WHERE {table.key[0]} = ANY(%s)",
                ([key[0] for key in keys],),
            ).fetchall()
        else:
            columns = ", ".join(table.key)
            arrays = ", ".join("%s::text[]" for _ in table.key)
            rows = target.execute(
                f"SELECT {columns} FROM {table.name} WHERE ({columns}) IN"
                f" (SELECT * FROM unnest({arrays}))",
                [[key[i] for key in keys] for i in range(len(table.key))],
            ).fetchall()
        return {tuple(row) for row in rows}

    def _advance_sequence(
        self, source: sqlite3.Connection, target: psycopg.Connection[Any]
    ) -> None:
        """Set the target's memory numbering past every number the source used (its
        AUTOINCREMENT counter too: a deleted memory's number is not handed out again)."""
        used = source.execute("SELECT seq FROM sqlite_sequence WHERE name = 'memories'").fetchone()
        highest = target.execute("SELECT coalesce(max(seq), 0) FROM memories").fetchone()
        floor = max(int(used[0]) if used else 0, int(highest[0]) if highest else 0)
        if floor <= 0:
            return
        target.execute(
            "SELECT setval(s, greatest(%s, coalesce(pg_sequence_last_value(s::regclass), 0)))"
            " FROM pg_get_serial_sequence('memories', 'seq') AS s",
            (floor,),
        )


def after_batch(table: str) -> None:
    """Called after each batch is committed (tests stop a copy here, as a crash would)."""


def _sqlite_count(connection: sqlite3.Connection, table: str) -> int:
    return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _count(connection: psycopg.Connection[Any], table: str) -> int:
    row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _has_rows(connection: psycopg.Connection[Any], table: str) -> bool:
    return connection.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None


def _has_key(connection: sqlite3.Connection, name: str) -> bool:
    found = connection.execute("SELECT 1 FROM store_keys WHERE name = ?", (name,)).fetchone()
    return found is not None
