"""The embedded memory store: one SQLite file in WAL mode.

Several gunicorn workers may write at once: every write is a short `BEGIN IMMEDIATE`
transaction with a busy timeout, and a call's idempotency rests on its primary key, so a
duplicate delivery racing in another process stores nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from elaoms.crypto import KEYED_HASH_PREFIX, PayloadCipher, keyed_hash, new_hash_key
from elaoms.files import ensure_private_dir
from elaoms.memory.base import (
    CallDigest,
    CallerPage,
    CallerSummary,
    CallHistory,
    CallReceipt,
    IndexState,
    Memory,
    MemoryStore,
    MemoryVersion,
    SavedIndex,
    StoredCall,
    StoreUnavailableError,
)
from elaoms.memory.digest import DIGEST_VERSION, digest_call, digest_record
from elaoms.memory.records import CallRecord
from elaoms.memory.units import TRANSCRIPTION
from elaoms.payloads import decode, encode
from elaoms.phone import normalize_caller_id

T = TypeVar("T")
logger = logging.getLogger(__name__)

AGENT_PROFILE = "agent_profile"

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    event_type TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    agent_id TEXT,
    event_timestamp INTEGER,
    started_at INTEGER,
    memory_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    stored_at REAL NOT NULL,
    caller BLOB,  -- the caller id, encrypted, when `user_id` is its keyed hash
    PRIMARY KEY (event_type, conversation_id)
);
CREATE INDEX IF NOT EXISTS calls_by_user ON calls (user_id, started_at);
CREATE INDEX IF NOT EXISTS calls_by_start ON calls (started_at);
CREATE TABLE IF NOT EXISTS memories (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    kind TEXT,
    content TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS memories_by_user ON memories (user_id, seq);
CREATE TABLE IF NOT EXISTS caller_indexes (
    user_id TEXT PRIMARY KEY,
    memories INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS caller_profiles (
    user_id TEXT PRIMARY KEY,
    profile BLOB NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS call_digests (
    event_type TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    agent_id TEXT,
    started_at INTEGER,
    version INTEGER NOT NULL,
    marks TEXT NOT NULL,
    facts BLOB NOT NULL,
    words BLOB NOT NULL,
    PRIMARY KEY (event_type, conversation_id)
);
-- Serves `call_history` (order, counts, marks) and the check that every call has its
-- digest from the index alone: only the few digests returned are read.
CREATE INDEX IF NOT EXISTS call_digests_by_user
    ON call_digests (user_id, event_type, started_at, conversation_id, marks, version);
-- The store's secret for keyed hashes (wrapped with ENCRYPTION_KEY when encryption is on).
CREATE TABLE IF NOT EXISTS store_keys (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- Conversations forgotten with their caller: a keyed hash of the conversation id (never
-- the number), so a replayed or backfilled copy is answered and not stored again.
CREATE TABLE IF NOT EXISTS forgotten_conversations (
    conversation_key TEXT PRIMARY KEY,
    forgotten_at REAL NOT NULL
);
-- Calls per day for everyone (the console's chart) from the index alone.
CREATE INDEX IF NOT EXISTS call_digests_by_start ON call_digests (event_type, started_at);
CREATE INDEX IF NOT EXISTS calls_by_agent ON calls (agent_id);
-- The console's list of callers: one row per prepared profile, written with it, so a page
-- of 100,000 callers is an index range. `name_key` is what a name search matches: the
-- folded name, or with encryption at rest keyed hashes of its words (`_word_key`).
CREATE TABLE IF NOT EXISTS caller_directory (
    user_id TEXT PRIMARY KEY,  -- as in every table: the caller id, or its keyed hash
    name_key TEXT NOT NULL,
    call_count INTEGER NOT NULL,
    last_started_at INTEGER,
    caller BLOB NOT NULL,  -- the caller id as the console shows it, encrypted when asked
    -- With encryption: keyed hashes of the whole number and of its last four digits, what
    -- a number search can match (the caller key is one-way).
    number_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS caller_directory_by_last
    ON caller_directory (last_started_at, user_id);
-- An agent's configuration from ElevenLabs (no caller data, in clear), as `profile` JSON.
CREATE TABLE IF NOT EXISTS agent_profiles (
    agent_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    fetched_at REAL NOT NULL
);
"""
CALL_COLUMNS = (
    "event_type, conversation_id, user_id, agent_id, event_timestamp, started_at, memory_id,"
    " payload, stored_at, caller"
)
HASH_KEY = "hash_key"
# Present while encryption is on and every row is encrypted (no start-up scan needed).
ALL_PROTECTED = "all_rows_protected"
# Present once agent profiles kept as memory rows (before their own table) were moved.
AGENT_PROFILES_MOVED = "agent_profiles_moved"
# Newest first, as `MemoryStore.call_history` defines it (SQLite sorts NULL lowest).
NEWEST_FIRST = "ORDER BY started_at DESC, conversation_id DESC"


class SQLiteStore(MemoryStore):
    name = "sqlite"
    caller_profiles_on_loop = True
    schema = SCHEMA
    _hash_key = b""
    _flush_due = False  # a forget's -wal checkpoint still to complete
    checkpoint_timeout = 10.0  # how long a forget waits for other workers' reads to end
    # The table whose rows are the caller's memories (the ledger's: its units on the server).
    version_table = "memories"

    def __init__(
        self,
        path: Path,
        *,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
        cipher: PayloadCipher | None = None,
    ) -> None:
        self.path = Path(path)
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.cipher = cipher or PayloadCipher()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._initialize()

    # Connections -------------------------------------------------------------------------
    def _initialize(self) -> None:
        ensure_private_dir(self.path.parent, self.dir_mode)
        if not self.path.exists():
            # Create the file with our mode before SQLite does, so it is never world-readable.
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, self.file_mode)
            os.close(fd)
        os.chmod(self.path, self.file_mode)
        connection = self._connection()

        # WAL is a lasting property of the file, set once here. Workers starting together
        # on a new file: switching it to WAL, or two of them creating the schema, can fail
        # "database is locked" at once (SQLite answers at once rather than wait where
        # waiting could deadlock); one in 12 such starts failed a worker, and gunicorn
        # then stops every worker. So the setup is tried again until the lock is free.
        @retry(
            retry=retry_if_exception(_busy),
            wait=wait_random_exponential(multiplier=0.01, max=0.5),
            stop=stop_after_delay(30),
            reraise=True,
        )
        def set_up() -> None:
            connection.execute("PRAGMA journal_mode=WAL")
            # executescript manages its own transaction: a schema made meanwhile is kept.
            connection.executescript(self.schema)
            with self._write() as writing:  # one worker adds the column, the others see it
                columns = {row[1] for row in writing.execute("PRAGMA table_info(calls)")}
                if "caller" not in columns:  # a file made before callers were hashed
                    writing.execute("ALTER TABLE calls ADD COLUMN caller BLOB")
            self._hash_key = self._load_hash_key()
            self._move_agent_profiles()
            self._protect_plain_rows()

        set_up()
        self._fill_caller_directory()

    def _fill_caller_directory(self) -> None:
        """Profiles without a directory entry (files from before the directory existed, or
        rows the start-up encryption re-keyed): one pass over those profiles."""
        missing = (
            "SELECT user_id, profile FROM caller_profiles AS p WHERE NOT EXISTS"
            " (SELECT 1 FROM caller_directory AS d WHERE d.user_id = p.user_id)"
        )
        if not self._connection().execute(missing + " LIMIT 1").fetchone():
            return
        with self._write() as writer:
            for key, blob in writer.execute(missing).fetchall():
                caller = self._caller_of_key(writer, key)
                try:
                    profile = decode(self.cipher.decrypt(bytes(blob)))
                except Exception:  # a profile we cannot read is rebuilt after the next call
                    continue
                if caller is not None:
                    self._put_directory_entry(writer, caller, profile)

    def _caller_of_key(self, connection: sqlite3.Connection, key: str) -> str | None:
        """The caller id a `user_id` column value stands for (its keyed hash is one-way:
        the encrypted copy kept with the caller's calls says it)."""
        if not key.startswith(KEYED_HASH_PREFIX):
            return key
        row = connection.execute(
            "SELECT caller FROM calls WHERE user_id = ? AND caller IS NOT NULL LIMIT 1", (key,)
        ).fetchone()
        return self._open(bytes(row[0])) if row else None

    def _move_agent_profiles(self) -> None:
        """Agent profiles an older version kept as rows of `memories` go to their own
        table (they are no caller's memories: they must not count in a caller's version).
        Once per file: a marker saves the scan of every memory at later starts."""
        with self._write() as connection:
            if connection.execute(
                "SELECT 1 FROM store_keys WHERE name = ?", (AGENT_PROFILES_MOVED,)
            ).fetchone():
                return
            rows = connection.execute(
                "SELECT user_id, content, metadata, created_at FROM memories WHERE kind = ?",
                (AGENT_PROFILE,),
            ).fetchall()
            for agent_id, content, metadata, created_at in rows:
                fetched_at = json.loads(metadata).get("fetched_at", created_at)
                connection.execute(
                    "INSERT OR IGNORE INTO agent_profiles VALUES (?, ?, ?)",
                    (agent_id, content, fetched_at),
                )
            connection.execute("DELETE FROM memories WHERE kind = ?", (AGENT_PROFILE,))
            connection.execute("INSERT INTO store_keys VALUES (?, ?)", (AGENT_PROFILES_MOVED, b"1"))

    def _load_hash_key(self) -> bytes:
        """The store's keyed-hash secret, made on first use. With encryption on it is kept
        wrapped with ENCRYPTION_KEY and re-wrapped at every start (one small write), so
        after a rotation it is under the new key and the old one can go."""
        with self._write() as connection:
            row = connection.execute(
                "SELECT value FROM store_keys WHERE name = ?", (HASH_KEY,)
            ).fetchone()
            key = self.cipher.decrypt(bytes(row[0])) if row else new_hash_key()
            stored = self.cipher.encrypt(key)
            if row is None or self.cipher.enabled:
                connection.execute(
                    "INSERT OR REPLACE INTO store_keys VALUES (?, ?)", (HASH_KEY, stored)
                )
        return key

    def _protect_plain_rows(self) -> None:
        """Encrypt what an older version (or this one with encryption off) left in clear:
        caller keys become keyed hashes, words are encrypted, saved indexes rebuilt. Runs at
        start-up when encryption is on; a no-op once done. Old page images are then flushed
        from the -wal and the file is rebuilt (VACUUM), so no copy in clear remains."""
        marked = (
            self._connection()
            .execute("SELECT 1 FROM store_keys WHERE name = ?", (ALL_PROTECTED,))
            .fetchone()
        )
        if not self.cipher.enabled:
            if marked:  # rows written from now on are in clear: look again next time
                with self._write() as connection:
                    connection.execute("DELETE FROM store_keys WHERE name = ?", (ALL_PROTECTED,))
            return
        if marked:  # every row is protected: skip the scans (a second or so on a big store)
            return
        plain = f"NOT LIKE '{KEYED_HASH_PREFIX}%'"
        seal = self.cipher.encrypt
        with self._write() as connection:
            changed = 0
            for rowid, user_id, payload in connection.execute(
                f"SELECT rowid, user_id, payload FROM calls WHERE user_id {plain}"
            ).fetchall():
                connection.execute(
                    "UPDATE calls SET user_id = ?, caller = ?, payload = ? WHERE rowid = ?",
                    (
                        self._key(user_id),
                        seal(user_id.encode()),
                        seal(self.cipher.decrypt(bytes(payload))),
                        rowid,
                    ),
                )
                changed += 1
            for seq, user_id, content, metadata in connection.execute(
                f"SELECT seq, user_id, content, metadata FROM memories WHERE user_id {plain}"
                " AND (kind IS NULL OR kind != ?)",
                (AGENT_PROFILE,),
            ).fetchall():
                connection.execute(
                    "UPDATE memories SET user_id = ?, content = ?, metadata = ? WHERE seq = ?",
                    (self._key(user_id), self._seal(content), self._seal(metadata), seq),
                )
                changed += 1
            changed += connection.execute(
                f"DELETE FROM caller_indexes WHERE user_id {plain}"
            ).rowcount
            # Re-filled from the re-keyed profiles right after (`_fill_caller_directory`).
            changed += connection.execute(
                f"DELETE FROM caller_directory WHERE user_id {plain}"
            ).rowcount
            for user_id, profile in connection.execute(
                f"SELECT user_id, profile FROM caller_profiles WHERE user_id {plain}"
            ).fetchall():
                connection.execute(
                    "UPDATE caller_profiles SET user_id = ?, profile = ? WHERE user_id = ?",
                    (self._key(user_id), seal(self.cipher.decrypt(bytes(profile))), user_id),
                )
                changed += 1
            for rowid, user_id, facts, words in connection.execute(
                f"SELECT rowid, user_id, facts, words FROM call_digests WHERE user_id {plain}"
            ).fetchall():
                connection.execute(
                    "UPDATE call_digests SET user_id = ?, facts = ?, words = ? WHERE rowid = ?",
                    (
                        self._key(user_id),
                        seal(self.cipher.decrypt(bytes(facts))),
                        seal(self.cipher.decrypt(bytes(words))),
                        rowid,
                    ),
                )
                changed += 1
            changed += self._protect_more_rows(connection, plain)
            connection.execute(
                "INSERT OR REPLACE INTO store_keys VALUES (?, ?)", (ALL_PROTECTED, b"1")
            )
        if changed:
            self.flush()
            self._connection().execute("VACUUM")
            self.flush()

    def _protect_more_rows(self, connection: sqlite3.Connection, plain: str) -> int:
        """Tables a subclass adds (the OpenMemory ledger's): their caller keys hashed."""
        return 0

    def flush(self, timeout: float | None = None) -> bool:
        """Copy the -wal into the file and empty it: with `secure_delete`, deleted or
        replaced rows are then gone from both (a forget, the start-up encryption). Another
        worker's read in progress holds the -wal back: tried again until `timeout`.
        True when the -wal is empty."""
        deadline = time.monotonic() + (self.checkpoint_timeout if timeout is None else timeout)
        while True:
            busy, _, _ = self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                self._flush_due = False
                return True
            if time.monotonic() > deadline:
                logger.warning("the -wal could not be emptied (readers busy): retried later")
                self._flush_due = True  # `maintain` tries again every second
                return False
            time.sleep(0.05)

    # Caller keys and sealed text ----------------------------------------------------------
    def _key(self, user_id: str) -> str:
        """The `user_id` column's value: the caller id itself, or with encryption on its
        keyed hash (the number is then kept only encrypted, in `calls.caller`)."""
        return keyed_hash(self._hash_key, user_id) if self.cipher.enabled else user_id

    def _word_key(self, word: str) -> str:
        """A word or number the caller directory is searched by: itself, or with encryption
        on its keyed hash (an equal word finds it; the column alone does not reveal it).
        Under the store's hash key, which a rotation of ENCRYPTION_KEY leaves as it is, so
        callers stay found; shortened, as the directory holds several per caller."""
        if not self.cipher.enabled:
            return word
        return keyed_hash(self._hash_key, f"word:{word}")[len(KEYED_HASH_PREFIX) :][:20]

    def _seal(self, text: str) -> str:
        return self.cipher.encrypt(text.encode()).decode() if self.cipher.enabled else text

    def _open(self, value: str | bytes) -> str:
        data = value if isinstance(value, bytes) else value.encode()
        return self.cipher.decrypt(data).decode()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=30000")
            # Deleted rows are overwritten, so a forgotten caller is gone from the file too.
            connection.execute("PRAGMA secure_delete=ON")
            # Sorts and VACUUM's copy stay in memory: a temporary file in /tmp would hold
            # rows in clear outside the data directory.
            connection.execute("PRAGMA temp_store=MEMORY")
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection with a busy timeout of 0: it answers at once
        or fails busy, never waiting for a lock. Reads on the event loop use it (a busy one
        is redone in a thread). In WAL mode
        readers do not wait for writers: busy is rare (see `_busy`)."""
        connection = getattr(self._local, "loop_reader", None)
        if connection is None:
            connection = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA query_only=ON")
            self._local.loop_reader = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Several queries seeing one snapshot (in WAL mode writers go on meanwhile)."""
        connection = self._connection()
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        else:
            connection.execute("COMMIT")

    async def _run(self, function: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(function)
        except sqlite3.Error as error:
            raise StoreUnavailableError(f"sqlite: {error}") from error

    # Calls -------------------------------------------------------------------------------
    async def add_call(
        self, user_id: str, call: CallRecord, payload: dict[str, Any], memories: list[Memory]
    ) -> CallReceipt:
        return await self._run(lambda: self._add_call(user_id, call, payload, memories))

    def _add_call(
        self, user_id: str, call: CallRecord, payload: dict[str, Any], memories: list[Memory]
    ) -> CallReceipt:
        with self._write() as connection:
            receipt = self._insert_call(
                connection, user_id, call, payload, f"mem_{uuid.uuid4().hex}"
            )
            if receipt.created:
                self._insert_memories(connection, user_id, memories)
        return receipt

    def _insert_memories(
        self, connection: sqlite3.Connection, user_id: str, memories: list[Memory]
    ) -> None:
        connection.executemany(
            "INSERT OR IGNORE INTO memories"
            " (id, user_id, kind, content, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [self._memory_row(memory) for memory in memories],
        )

    def _insert_call(
        self,
        connection: sqlite3.Connection,
        user_id: str,
        record: CallRecord,
        payload: dict[str, Any],
        memory_id: str,
    ) -> CallReceipt:
        """Insert the call row inside the caller's write transaction, unless the same call
        (event type, conversation id) is already there: then its first receipt."""
        event_type, conversation_id = record.event_type, record.conversation_id
        existing = connection.execute(
            "SELECT memory_id FROM calls WHERE event_type = ? AND conversation_id = ?",
            (event_type, conversation_id),
        ).fetchone()
        if existing:
            return CallReceipt(memory_id=existing[0], created=False)
        if self._is_forgotten(connection, conversation_id):
            return CallReceipt(memory_id="", created=False, forgotten=True)
        connection.execute(
            f"INSERT INTO calls ({CALL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event_type,
                conversation_id,
                self._key(user_id),
                record.agent_id,
                record.event_timestamp,
                record.started_at,
                memory_id,
                self.cipher.encrypt(encode(payload)),
                time.time(),
                self.cipher.encrypt(user_id.encode()) if self.cipher.enabled else None,
            ),
        )
        self._put_digest(connection, user_id, event_type, digest_record(record))
        return CallReceipt(memory_id=memory_id, created=True)

    async def get_call(
        self, conversation_id: str, event_type: str = TRANSCRIPTION
    ) -> StoredCall | None:
        def query() -> StoredCall | None:
            row = (
                self._connection()
                .execute(
                    f"SELECT {CALL_COLUMNS} FROM calls WHERE event_type = ? AND conversation_id = ?",
                    (event_type, conversation_id),
                )
                .fetchone()
            )
            return self._call(row) if row else None

        return await self._run(query)

    async def list_calls(
        self,
        user_id: str | None = None,
        *,
        agent_id: str | None = None,
        since: int | None = None,
        limit: int | None = None,
    ) -> list[StoredCall]:
        clauses, parameters = [], []
        for column, value, operator in (
            ("user_id", None if user_id is None else self._key(user_id), "="),
            ("agent_id", agent_id, "="),
            ("started_at", since, ">="),
        ):
            if value is not None:
                clauses.append(f"{column} {operator} ?")
                parameters.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {CALL_COLUMNS} FROM calls {where} ORDER BY started_at DESC, stored_at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(limit)

        def query() -> list[StoredCall]:
            return [self._call(row) for row in self._connection().execute(sql, parameters)]

        return await self._run(query)

    def _call(self, row: tuple[Any, ...]) -> StoredCall:
        (
            event_type,
            conversation_id,
            key,
            agent_id,
            event_ts,
            started,
            memory_id,
            blob,
            _,
            caller,
        ) = row
        return StoredCall(
            conversation_id=conversation_id,
            user_id=self._open(bytes(caller)) if caller is not None else key,
            agent_id=agent_id,
            event_type=event_type,
            event_timestamp=event_ts,
            started_at=started,
            memory_id=memory_id,
            payload=decode(self.cipher.decrypt(bytes(blob))),
        )

    # Call digests ------------------------------------------------------------------------
    async def call_history(
        self, user_id: str, *, recent: int, marks: Collection[str] = ()
    ) -> CallHistory:
        return await self._run(lambda: self._call_history(user_id, recent, marks))

    def _call_history(self, user_id: str, recent: int, marks: Collection[str]) -> CallHistory:
        self._complete_digests(user_id)
        with self._read() as connection:
            count, first, last = connection.execute(
                "SELECT count(*), min(started_at), max(started_at) FROM call_digests"
                " WHERE user_id = ? AND event_type = ?",
                (self._key(user_id), TRANSCRIPTION),
            ).fetchone()
            newest = self._digests(connection, user_id, limit=recent)
            newest_marked: dict[str, CallDigest] = {}
            for mark in marks:
                found = next((digest for digest in newest if mark in digest.marks), None)
                if found is None and count > len(newest):
                    found = next(iter(self._digests(connection, user_id, limit=1, mark=mark)), None)
                if found is not None:
                    newest_marked[mark] = found
        return CallHistory(
            count=count,
            first_started_at=first,
            last_started_at=last,
            recent=newest,
            newest_marked=newest_marked,
        )

    async def list_call_digests(
        self, user_id: str, *, limit: int | None = None, offset: int = 0, words: bool = False
    ) -> list[CallDigest]:
        def query() -> list[CallDigest]:
            self._complete_digests(user_id)
            return self._digests(
                self._connection(), user_id, limit=limit, offset=offset, words=words
            )

        return await self._run(query)

    def _digests(
        self,
        connection: sqlite3.Connection,
        user_id: str,
        *,
        limit: int | None = None,
        offset: int = 0,
        mark: str | None = None,
        words: bool = False,
    ) -> list[CallDigest]:
        """Digests of the caller's finished calls, newest first."""
        sql = "SELECT conversation_id, agent_id, started_at, marks, facts"
        sql += ", words" if words else ""
        sql += " FROM call_digests WHERE user_id = ? AND event_type = ?"
        parameters: list[Any] = [self._key(user_id), TRANSCRIPTION]
        if mark is not None:
            sql += " AND instr(' ' || marks || ' ', ?) > 0"
            parameters.append(f" {mark} ")
        sql += f" {NEWEST_FIRST} LIMIT ? OFFSET ?"
        parameters += [-1 if limit is None else limit, offset]
        return [self._digest(row) for row in connection.execute(sql, parameters)]

    def _digest(self, row: tuple[Any, ...]) -> CallDigest:
        conversation_id, agent_id, started_at, marks, facts, *words = row
        return CallDigest(
            conversation_id=conversation_id,
            agent_id=agent_id,
            started_at=started_at,
            facts=decode(self.cipher.decrypt(bytes(facts))),
            marks=frozenset(marks.split()),
            words=frozenset(self.cipher.decrypt(bytes(words[0])).decode().split())
            if words
            else None,
        )

    def _put_digest(
        self, connection: sqlite3.Connection, user_id: str, event_type: str, digest: CallDigest
    ) -> None:
        """Keep `digest` beside its call, in the writer's transaction; encrypted like the
        payload (names, summaries and words are personal data)."""
        connection.execute(
            "INSERT OR REPLACE INTO call_digests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event_type,
                digest.conversation_id,
                self._key(user_id),
                digest.agent_id,
                digest.started_at,
                DIGEST_VERSION,
                " ".join(sorted(digest.marks)),
                self.cipher.encrypt(encode(digest.facts)),
                self.cipher.encrypt(" ".join(digest.words or ()).encode()),
            ),
        )

    def _complete_digests(self, user_id: str) -> None:
        """Make the caller's digests match their calls: every call stored since digests
        exist has its digest from the same transaction, so this is two counts over indexes
        (the calls' pages, 12 KB a call, are not read). Calls stored before digests existed,
        or digested at another `DIGEST_VERSION`, are digested from their payload; digests
        whose call is gone (forgotten by an older version of the code) are deleted."""
        calls, digests = (
            self._connection()
            .execute(
                "SELECT (SELECT count(*) FROM calls WHERE user_id = ?),"
                " (SELECT count(*) FROM call_digests WHERE user_id = ? AND version = ?)",
                (self._key(user_id), self._key(user_id), DIGEST_VERSION),
            )
            .fetchone()
        )
        if calls == digests:
            return
        # In the write transaction from the first read: a caller forgotten meanwhile must
        # not get digests back. Rare (once per caller after an upgrade), so the lock may
        # be held while payloads are digested.
        with self._write() as connection:
            rows = connection.execute(
                "SELECT c.event_type, c.payload FROM calls c LEFT JOIN call_digests d"
                " ON d.event_type = c.event_type AND d.conversation_id = c.conversation_id"
                " AND d.version = ? WHERE c.user_id = ? AND d.conversation_id IS NULL",
                (DIGEST_VERSION, self._key(user_id)),
            ).fetchall()
            for event_type, payload in rows:
                digest = digest_call(decode(self.cipher.decrypt(bytes(payload))))
                self._put_digest(connection, user_id, event_type, digest)
            connection.execute(
                "DELETE FROM call_digests WHERE user_id = ? AND NOT EXISTS (SELECT 1 FROM calls"
                " WHERE calls.event_type = call_digests.event_type"
                " AND calls.conversation_id = call_digests.conversation_id)",
                (self._key(user_id),),
            )

    def _delete_digests(self, connection: sqlite3.Connection, user_id: str) -> None:
        # Derived from the calls: gone with them, and not counted apart.
        connection.execute("DELETE FROM call_digests WHERE user_id = ?", (self._key(user_id),))

    # Memories ----------------------------------------------------------------------------
    async def add_memory(
        self, user_id: str, content: str, metadata: dict[str, Any] | None = None
    ) -> Memory:
        memory = Memory(
            id=f"mem_{uuid.uuid4().hex}",
            user_id=user_id,
            content=content,
            metadata=dict(metadata or {}),
            created_at=time.time(),
        )

        def insert() -> None:
            with self._write() as connection:
                self._insert_memories(connection, user_id, [memory])

        await self._run(insert)
        return memory

    async def list_memories(self, user_id: str, limit: int | None = None) -> list[Memory]:
        return await self._run(lambda: self._list_memories(user_id, limit))

    def _list_memories(
        self, user_id: str, limit: int | None = None, *, after_seq: int = 0
    ) -> list[Memory]:
        sql = (
            "SELECT id, user_id, content, metadata, created_at FROM memories"
            " WHERE user_id = ? AND seq > ? AND (kind IS NULL OR kind != ?) ORDER BY seq"
        )
        parameters: list[Any] = [self._key(user_id), after_seq, AGENT_PROFILE]
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(limit)
        return [self._memory(user_id, row) for row in self._connection().execute(sql, parameters)]

    # Search indexes ---------------------------------------------------------------------
    async def index_state(self, user_id: str) -> IndexState:
        # One query: in a thread, one round of GIL hand-offs rather than two.
        return await self._run(lambda: self._index_state(self._connection(), user_id))

    def _index_state(self, connection: sqlite3.Connection, user_id: str) -> IndexState:
        key = self._key(user_id)
        count, last, memories, last_seq, data = connection.execute(
            "SELECT m.count, m.last, i.memories, i.last_seq, i.data FROM"
            f" (SELECT count(*) AS count, coalesce(max(seq), 0) AS last FROM {self.version_table}"
            "  WHERE user_id = ?) AS m LEFT JOIN caller_indexes AS i ON i.user_id = ?",
            (key, key),
        ).fetchone()
        saved = None
        if data is not None:
            try:
                saved = SavedIndex(MemoryVersion(memories, last_seq), self.cipher.decrypt(data))
            except ValueError:  # under a key no longer configured: rebuilt, saved again
                saved = None
        return IndexState(MemoryVersion(count, last), saved)

    def index_version_now(self, user_id: str) -> MemoryVersion | None:
        # The loop's reader: microseconds, and it answers at once or fails busy.
        try:
            return self._version(self._reader(), user_id)
        except sqlite3.Error as error:
            if not _busy(error):
                raise StoreUnavailableError(f"sqlite: {error}") from error
            return None

    async def memory_version(self, user_id: str) -> MemoryVersion:
        # Asked when the loop's reader was busy: the version alone, in a thread.
        return await self._run(lambda: self._version(self._connection(), user_id))

    def _version(self, connection: sqlite3.Connection, user_id: str) -> MemoryVersion:
        """Count and last seq of the caller's memories: changes with every insert or
        delete, one indexed aggregate over the caller's own rows, so a worker sees another
        worker's writes without any shared cache."""
        count, last = connection.execute(
            f"SELECT count(*), coalesce(max(seq), 0) FROM {self.version_table} WHERE user_id = ?",
            (self._key(user_id),),
        ).fetchone()
        return MemoryVersion(count, last)

    async def memories_after(
        self, user_id: str, after_seq: int
    ) -> tuple[MemoryVersion, list[Memory]]:
        def query() -> tuple[MemoryVersion, list[Memory]]:
            with self._read() as connection:
                version = self._version(connection, user_id)
                return version, self._list_memories(user_id, after_seq=after_seq)

        return await self._run(query)

    async def save_index(self, user_id: str, index: SavedIndex) -> bool:
        data = self.cipher.encrypt(index.data)

        def save() -> bool:
            with self._write() as connection:
                # Only if no memory came or went meanwhile: the index describes its version.
                if self._version(connection, user_id) != index.version:
                    return False
                connection.execute(
                    "INSERT INTO caller_indexes VALUES (?, ?, ?, ?) ON CONFLICT (user_id)"
                    " DO UPDATE SET memories = excluded.memories,"
                    " last_seq = excluded.last_seq, data = excluded.data",
                    (self._key(user_id), index.version.count, index.version.last_seq, data),
                )
                return True

        return await self._run(save)

    async def maintain(self) -> None:
        """Complete a forget's -wal flush that other workers' reads held back."""
        if self._flush_due:
            await self._run(lambda: self.flush(timeout=0))

    async def delete_user(self, user_id: str) -> int:
        def delete() -> int:
            with self._write() as connection:
                deleted = 0
                for table in ("memories", "calls", "caller_profiles"):
                    deleted += connection.execute(
                        f"DELETE FROM {table} WHERE user_id = ?", (self._key(user_id),)
                    ).rowcount
                self._delete_directory_entry(connection, user_id)
                # Derived from the memories (their words): gone with them, not counted.
                connection.execute(
                    "DELETE FROM caller_indexes WHERE user_id = ?", (self._key(user_id),)
                )
                self._delete_digests(connection, user_id)
            # The deleted rows' page images stay in the -wal until a checkpoint.
            self.flush()
            return deleted

        return await self._run(delete)

    def _memory(self, user_id: str, row: tuple[Any, ...]) -> Memory:
        return Memory(
            id=row[0],
            user_id=user_id,
            content=self._open(row[2]),
            metadata=json.loads(self._open(row[3])),
            created_at=row[4],
        )

    def _memory_row(self, memory: Memory) -> tuple[Any, ...]:
        return (
            memory.id,
            self._key(memory.user_id),
            memory.metadata.get("kind") or memory.metadata.get("type"),
            self._seal(memory.content),
            self._seal(json.dumps(memory.metadata, separators=(",", ":"))),
            memory.created_at,
        )

    # Forgotten conversations -------------------------------------------------------------
    def _conversation_key(self, conversation_id: str) -> str:
        return keyed_hash(self._hash_key, f"conversation:{conversation_id}")

    def _is_forgotten(self, connection: sqlite3.Connection, conversation_id: str) -> bool:
        return (
            connection.execute(
                "SELECT 1 FROM forgotten_conversations WHERE conversation_key = ?",
                (self._conversation_key(conversation_id),),
            ).fetchone()
            is not None
        )

    async def forget_conversations(self, conversation_ids: Collection[str]) -> None:
        def insert() -> None:
            with self._write() as connection:
                connection.executemany(
                    "INSERT OR IGNORE INTO forgotten_conversations VALUES (?, ?)",
                    [(self._conversation_key(cid), time.time()) for cid in conversation_ids],
                )

        await self._run(insert)

    async def is_forgotten(self, conversation_id: str) -> bool:
        return await self._run(lambda: self._is_forgotten(self._connection(), conversation_id))

    # Profiles ----------------------------------------------------------------------------
    async def get_agent_profile(self, agent_id: str) -> dict[str, Any] | None:
        def query() -> dict[str, Any] | None:
            row = (
                self._connection()
                .execute(
                    "SELECT profile, fetched_at FROM agent_profiles WHERE agent_id = ?",
                    (agent_id,),
                )
                .fetchone()
            )
            if not row:
                return None
            profile: dict[str, Any] = json.loads(row[0])
            profile["_fetched_at"] = row[1]
            return profile

        return await self._run(query)

    async def put_agent_profile(
        self, agent_id: str, profile: dict[str, Any], fetched_at: float
    ) -> None:
        content = json.dumps({k: v for k, v in profile.items() if k != "_fetched_at"})

        def upsert() -> None:
            with self._write() as connection:
                connection.execute(
                    "INSERT INTO agent_profiles VALUES (?, ?, ?) ON CONFLICT (agent_id)"
                    " DO UPDATE SET profile = excluded.profile, fetched_at = excluded.fetched_at",
                    (agent_id, content, fetched_at),
                )

        await self._run(upsert)

    async def get_caller_profile(self, user_id: str) -> dict[str, Any] | None:
        # Read on the event loop: a primary-key lookup takes microseconds, less than the
        # hop to a thread, whose GIL hand-offs also stretch every other request in flight.
        # Only a lock could make it wait, and the loop's connection never waits for one.
        try:
            return self._caller_profile(self._reader(), user_id)
        except sqlite3.Error as error:
            if not _busy(error):
                raise StoreUnavailableError(f"sqlite: {error}") from error
        # Busy: another connection holds the whole file (exclusive locking mode, WAL
        # recovery). A thread waits for it with the usual busy timeout.
        return await self._run(lambda: self._caller_profile(self._connection(), user_id))

    def _caller_profile(
        self, connection: sqlite3.Connection, user_id: str
    ) -> dict[str, Any] | None:
        row = connection.execute(
            "SELECT profile FROM caller_profiles WHERE user_id = ?", (self._key(user_id),)
        ).fetchone()
        return decode(self.cipher.decrypt(bytes(row[0]))) if row else None

    async def put_caller_profile(self, user_id: str, profile: dict[str, Any]) -> None:
        # Compact UTF-8 (orjson), the cheapest form to decode while the phone rings.
        blob = self.cipher.encrypt(encode(profile))

        def upsert() -> None:
            with self._write() as connection:
                connection.execute(
                    "INSERT INTO caller_profiles VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE"
                    " SET profile = excluded.profile, updated_at = excluded.updated_at",
                    (self._key(user_id), blob, time.time()),
                )
                self._put_directory_entry(connection, user_id, profile)

        await self._run(upsert)

    # Callers -----------------------------------------------------------------------------
    def _put_directory_entry(
        self, connection: sqlite3.Connection, user_id: str, profile: dict[str, Any]
    ) -> None:
        last = profile.get("last_call_at")
        connection.execute(
            "INSERT INTO caller_directory VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE"
            " SET name_key = excluded.name_key, call_count = excluded.call_count,"
            " last_started_at = excluded.last_started_at",
            (
                self._key(user_id),
                self._name_key(profile.get("name")),
                int(profile.get("call_count") or 0),
                int(last) if isinstance(last, int | float) else None,
                self._seal(user_id).encode(),
                self._number_key(user_id),
            ),
        )

    def _number_key(self, user_id: str) -> str:
        if not self.cipher.enabled:
            return ""  # a number search reads the caller key itself
        digits = "".join(ch for ch in user_id if ch.isdigit())
        return f" {self._word_key(user_id)} {self._word_key('#' + digits[-4:])} "

    def _delete_directory_entry(self, connection: sqlite3.Connection, user_id: str) -> None:
        connection.execute("DELETE FROM caller_directory WHERE user_id = ?", (self._key(user_id),))

    def _name_key(self, name: object) -> str:
        words = str(name or "").casefold().split()
        # Spaces around every word: a word search is then one LIKE '% word %'.
        return f" {' '.join(self._word_key(word) for word in words)} " if words else ""

    async def list_callers(
        self,
        *,
        number: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> CallerPage:
        clauses: list[str] = []
        parameters: list[Any] = []
        # instr, not LIKE '%...%': the same match on text already folded, several times
        # faster over 100,000 rows.
        digits = "".join(ch for ch in number or "" if ch.isdigit())
        if digits and self.cipher.enabled:
            # Keyed hashes match a whole number or its last four digits (as names match
            # whole words), not any run of digits.
            whole = normalize_caller_id(number or "") if len(digits) > 4 else None
            clauses.append("instr(number_key, ?) > 0")
            parameters.append(f" {self._word_key(whole or '#' + digits[-4:])} ")
        elif digits:
            clauses.append("instr(user_id, ?) > 0")
            parameters.append(digits)
        words = (name or "").casefold().split()
        if words and self.cipher.enabled:
            for word in words:
                clauses.append("instr(name_key, ?) > 0")
                parameters.append(f" {self._word_key(word)} ")
        elif words:
            clauses.append("instr(name_key, ?) > 0")
            parameters.append(" ".join(words))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        page = [max(0, limit), max(0, offset)]

        def query() -> CallerPage:
            with self._read() as connection:
                if where:
                    # One pass over the table for the matches and their count; the few
                    # matches are then sorted (walking the index in order would visit every
                    # row out of order).
                    found = connection.execute(
                        "SELECT user_id, call_count, last_started_at, COUNT(*) OVER (), caller"
                        f" FROM caller_directory {where}"
                        " ORDER BY +last_started_at DESC, user_id DESC LIMIT ? OFFSET ?",
                        [*parameters, *page],
                    ).fetchall()
                    if found:
                        total = found[0][3]
                    else:  # past the last page, or no match at all (no second scan)
                        total = self._count_callers(connection, where, parameters) if offset else 0
                else:
                    # The page from the index, then only its callers' rows.
                    found = connection.execute(
                        "SELECT user_id, call_count, last_started_at, NULL, caller"
                        " FROM caller_directory"
                        " ORDER BY last_started_at DESC, user_id DESC LIMIT ? OFFSET ?",
                        page,
                    ).fetchall()
                    total = self._count_callers(connection, "", [])
                profiles = (
                    dict(
                        connection.execute(
                            "SELECT user_id, profile FROM caller_profiles WHERE user_id IN"
                            f" ({','.join('?' * len(found))})",
                            [row[0] for row in found],
                        ).fetchall()
                    )
                    if found
                    else {}
                )
            callers = []
            for key, call_count, last_started_at, _, caller in found:
                blob = profiles.get(key)
                profile = decode(self.cipher.decrypt(bytes(blob))) if blob else {}
                callers.append(
                    CallerSummary(
                        user_id=self._open(bytes(caller)),
                        name=profile.get("name") or None,
                        call_count=call_count,
                        last_started_at=last_started_at,
                    )
                )
            return CallerPage(callers=callers, total=total)

        return await self._run(query)

    def _count_callers(
        self, connection: sqlite3.Connection, where: str, parameters: list[Any]
    ) -> int:
        row = connection.execute(f"SELECT COUNT(*) FROM caller_directory {where}", parameters)
        return int(row.fetchone()[0])

    async def calls_per_day(self, user_id: str | None = None, *, since: int) -> dict[int, int]:
        sql = (
            "SELECT started_at / 86400, COUNT(*) FROM call_digests"
            " WHERE event_type = ? AND started_at >= ?"
        )
        parameters: list[Any] = [TRANSCRIPTION, since]
        if user_id is not None:
            sql += " AND user_id = ?"
            parameters.append(self._key(user_id))
        sql += " GROUP BY 1"

        def query() -> dict[int, int]:
            return {
                int(day): int(count) for day, count in self._connection().execute(sql, parameters)
            }

        return await self._run(query)

    async def list_agent_ids(self) -> list[str]:
        def query() -> list[str]:
            # One index seek per agent (a loose index scan), where DISTINCT would walk
            # every call's entry: a handful of agents among 100,000 calls.
            rows = self._connection().execute(
                "WITH RECURSIVE agents(id) AS ("
                " SELECT MIN(agent_id) FROM calls"
                " UNION ALL SELECT (SELECT MIN(agent_id) FROM calls WHERE agent_id > agents.id)"
                " FROM agents WHERE agents.id IS NOT NULL)"
                " SELECT id FROM agents WHERE id IS NOT NULL"
            )
            return [str(row[0]) for row in rows]

        return await self._run(query)

    # Life cycle --------------------------------------------------------------------------
    async def check(self) -> None:
        await self._run(
            lambda: self._connection().execute("SELECT 1 FROM calls LIMIT 1").fetchall()
        )

    async def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()


def _busy(error: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, extended codes included: the lock, not the store, is
    what failed."""
    if not isinstance(error, sqlite3.Error):
        return False
    primary = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
