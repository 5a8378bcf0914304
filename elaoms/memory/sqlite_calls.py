"""What the embedded store and the OpenMemory ledger both keep in their SQLite file: calls
(whole payloads) and their digests, callers' profiles and the console's caller directory,
forgotten conversations and saved search indexes.

`CallTables` works on a `SQLiteDatabase` its holder shares; every `user_id` column holds
`database.key(caller)`. Methods taking a connection run inside the holder's transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from typing import Any, NamedTuple

from elaoms.crypto import KEYED_HASH_PREFIX
from elaoms.memory.base import (
    CallDigest,
    CallerPage,
    CallerSummary,
    CallHistory,
    CallReceipt,
    HistoryRead,
    IndexState,
    MemoryVersion,
    ProfileKept,
    SavedIndex,
    StoredCall,
    StoreUnavailableError,
)
from elaoms.memory.digest import DIGEST_VERSION, digest_call, digest_record
from elaoms.memory.directory import directory_matches, name_key, number_key
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite_database import SQLiteDatabase, busy
from elaoms.memory.units import TRANSCRIPTION
from elaoms.payloads import decode, encode

CALL_SCHEMA = """
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
-- folded name, or with encryption at rest keyed hashes of its words (`word_key`).
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
"""
CALL_COLUMNS = (
    "event_type, conversation_id, user_id, agent_id, event_timestamp, started_at, memory_id,"
    " payload, stored_at, caller"
)
# Newest first, as `MemoryStore.call_history` defines it (SQLite sorts NULL lowest).
NEWEST_FIRST = "ORDER BY started_at DESC, conversation_id DESC"


class CallRow(NamedTuple):
    """A row of `calls` as CALL_COLUMNS selects it."""

    event_type: str
    conversation_id: str
    user_id: str  # the column: the caller id, or its keyed hash
    agent_id: str | None
    event_timestamp: int | None
    started_at: int | None
    memory_id: str
    payload: bytes
    stored_at: float
    caller: bytes | None


class DigestRow(NamedTuple):
    """A row of `call_digests` as `CallTables.digests` selects it (`words` when asked)."""

    conversation_id: str
    agent_id: str | None
    started_at: int | None
    marks: str
    facts: bytes
    words: bytes | None = None


class DirectoryRow(NamedTuple):
    """A caller of the directory as `list_callers` selects it."""

    user_id: str  # the column
    call_count: int
    last_started_at: int | None
    total: int | None  # the count of every match, from a filtered query
    caller: bytes


class CallTables:
    """Calls, digests, caller profiles and directory, forgotten conversations and saved
    indexes in `database`.

    A caller's memory version (what a saved index describes) is counted over
    `version_table`: the holder's record of that caller's memories, with `user_id` and an
    increasing `seq`.
    """

    def __init__(self, database: SQLiteDatabase, *, version_table: str) -> None:
        self.database = database
        self.version_table = version_table

    # Set-up ------------------------------------------------------------------------------
    def add_caller_column(self) -> None:
        """A file made before callers were hashed has no `calls.caller`: one worker adds it,
        the others see it."""
        with self.database.write() as connection:
            columns = {row[1] for row in connection.execute("PRAGMA table_info(calls)")}
            if "caller" not in columns:
                connection.execute("ALTER TABLE calls ADD COLUMN caller BLOB")

    def protect(self, connection: sqlite3.Connection, plain: str) -> int:
        """Encrypt this part's rows left in clear (`SQLiteDatabase.set_up`); saved indexes
        and directory entries under a plain key are dropped (the directory is filled again
        by `fill_caller_directory`, indexes saved again after the next search)."""
        database, cipher = self.database, self.database.cipher
        changed = 0
        for rowid, user_id, payload in connection.execute(
            f"SELECT rowid, user_id, payload FROM calls WHERE user_id {plain}"
        ).fetchall():
            connection.execute(
                "UPDATE calls SET user_id = ?, caller = ?, payload = ? WHERE rowid = ?",
                (
                    database.key(user_id),
                    cipher.encrypt(user_id.encode()),
                    cipher.encrypt(cipher.decrypt(bytes(payload))),
                    rowid,
                ),
            )
            changed += 1
        changed += connection.execute(f"DELETE FROM caller_indexes WHERE user_id {plain}").rowcount
        changed += connection.execute(
            f"DELETE FROM caller_directory WHERE user_id {plain}"
        ).rowcount
        for user_id, profile in connection.execute(
            f"SELECT user_id, profile FROM caller_profiles WHERE user_id {plain}"
        ).fetchall():
            connection.execute(
                "UPDATE caller_profiles SET user_id = ?, profile = ? WHERE user_id = ?",
                (database.key(user_id), cipher.encrypt(cipher.decrypt(bytes(profile))), user_id),
            )
            changed += 1
        for rowid, user_id, facts, words in connection.execute(
            f"SELECT rowid, user_id, facts, words FROM call_digests WHERE user_id {plain}"
        ).fetchall():
            connection.execute(
                "UPDATE call_digests SET user_id = ?, facts = ?, words = ? WHERE rowid = ?",
                (
                    database.key(user_id),
                    cipher.encrypt(cipher.decrypt(bytes(facts))),
                    cipher.encrypt(cipher.decrypt(bytes(words))),
                    rowid,
                ),
            )
            changed += 1
        return changed

    def fill_caller_directory(self) -> None:
        """Profiles without a directory entry (files from before the directory existed, or
        rows the start-up encryption re-keyed): one pass over those profiles."""
        missing = (
            "SELECT user_id, profile FROM caller_profiles AS p WHERE NOT EXISTS"
            " (SELECT 1 FROM caller_directory AS d WHERE d.user_id = p.user_id)"
        )
        if not self.database.connection().execute(missing + " LIMIT 1").fetchone():
            return
        with self.database.write() as writer:
            for key, blob in writer.execute(missing).fetchall():
                caller = self._caller_of_key(writer, key)
                try:
                    profile = decode(self.database.cipher.decrypt(bytes(blob)))
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
        return self.database.open(bytes(row[0])) if row else None

    def delete_caller(self, connection: sqlite3.Connection, user_id: str) -> int:
        """Every row of the caller in these tables, in the holder's forget transaction;
        counts their calls and profile (digests, directory entry and saved index are
        derived: gone with them, not counted apart)."""
        key = self.database.key(user_id)
        deleted = 0
        for table in ("calls", "caller_profiles"):
            deleted += connection.execute(f"DELETE FROM {table} WHERE user_id = ?", (key,)).rowcount
        for table in ("caller_directory", "caller_indexes", "call_digests"):
            connection.execute(f"DELETE FROM {table} WHERE user_id = ?", (key,))
        return deleted

    # Calls -------------------------------------------------------------------------------
    def receipt(
        self, connection: sqlite3.Connection, event_type: str, conversation_id: str
    ) -> str | None:
        """The memory id the call was stored under, None while it is not."""
        row = connection.execute(
            "SELECT memory_id FROM calls WHERE event_type = ? AND conversation_id = ?",
            (event_type, conversation_id),
        ).fetchone()
        return str(row[0]) if row else None

    def insert_call(
        self,
        connection: sqlite3.Connection,
        user_id: str,
        record: CallRecord,
        payload: dict[str, Any],
        memory_id: str,
    ) -> CallReceipt:
        """Insert the call row inside the caller's write transaction, unless the same call
        (event type, conversation id) is already there: then its first receipt."""
        database, cipher = self.database, self.database.cipher
        event_type, conversation_id = record.event_type, record.conversation_id
        existing = self.receipt(connection, event_type, conversation_id)
        if existing is not None:
            return CallReceipt(memory_id=existing, created=False)
        if self.is_forgotten_in(connection, conversation_id):
            return CallReceipt(memory_id="", created=False, forgotten=True)
        connection.execute(
            f"INSERT INTO calls ({CALL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event_type,
                conversation_id,
                database.key(user_id),
                record.agent_id,
                record.event_timestamp,
                record.started_at,
                memory_id,
                cipher.encrypt(encode(payload)),
                time.time(),
                cipher.encrypt(user_id.encode()) if cipher.enabled else None,
            ),
        )
        self._put_digest(connection, user_id, event_type, digest_record(record))
        return CallReceipt(memory_id=memory_id, created=True)

    async def get_call(
        self, conversation_id: str, event_type: str = TRANSCRIPTION
    ) -> StoredCall | None:
        def query() -> StoredCall | None:
            row = (
                self.database.connection()
                .execute(
                    f"SELECT {CALL_COLUMNS} FROM calls WHERE event_type = ? AND conversation_id = ?",
                    (event_type, conversation_id),
                )
                .fetchone()
            )
            return self._call(CallRow._make(row)) if row else None

        return await self.database.run(query)

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
            ("user_id", None if user_id is None else self.database.key(user_id), "="),
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
            rows = self.database.connection().execute(sql, parameters)
            return [self._call(CallRow._make(row)) for row in rows]

        return await self.database.run(query)

    def _call(self, row: CallRow) -> StoredCall:
        return StoredCall(
            conversation_id=row.conversation_id,
            user_id=self.database.open(bytes(row.caller))
            if row.caller is not None
            else row.user_id,
            agent_id=row.agent_id,
            event_type=row.event_type,
            event_timestamp=row.event_timestamp,
            started_at=row.started_at,
            memory_id=row.memory_id,
            payload=decode(self.database.cipher.decrypt(bytes(row.payload))),
        )

    async def calls_per_day(self, user_id: str | None = None, *, since: int) -> dict[int, int]:
        sql = (
            "SELECT started_at / 86400, COUNT(*) FROM call_digests"
            " WHERE event_type = ? AND started_at >= ?"
        )
        parameters: list[Any] = [TRANSCRIPTION, since]
        if user_id is not None:
            sql += " AND user_id = ?"
            parameters.append(self.database.key(user_id))
        sql += " GROUP BY 1"

        def query() -> dict[int, int]:
            rows = self.database.connection().execute(sql, parameters)
            return {int(day): int(count) for day, count in rows}

        return await self.database.run(query)

    async def list_agent_ids(self) -> list[str]:
        def query() -> list[str]:
            # One index seek per agent (a loose index scan), where DISTINCT would walk
            # every call's entry: a handful of agents among 100,000 calls.
            rows = self.database.connection().execute(
                "WITH RECURSIVE agents(id) AS ("
                " SELECT MIN(agent_id) FROM calls"
                " UNION ALL SELECT (SELECT MIN(agent_id) FROM calls WHERE agent_id > agents.id)"
                " FROM agents WHERE agents.id IS NOT NULL)"
                " SELECT id FROM agents WHERE id IS NOT NULL"
            )
            return [str(row[0]) for row in rows]

        return await self.database.run(query)

    # Call digests ------------------------------------------------------------------------
    async def call_history(
        self, user_id: str, *, recent: int, marks: Collection[str] = ()
    ) -> CallHistory:
        return await self.database.run(lambda: self._call_history(user_id, recent, marks))

    def read_history(self, user_id: str, read: HistoryRead) -> CallHistory:
        """`call_history`, in the store's thread."""
        return self._call_history(user_id, read.recent, read.marks)

    def _call_history(self, user_id: str, recent: int, marks: Collection[str]) -> CallHistory:
        self._complete_digests(user_id)
        with self.database.read() as connection:
            count, first, last = connection.execute(
                "SELECT count(*), min(started_at), max(started_at) FROM call_digests"
                " WHERE user_id = ? AND event_type = ?",
                (self.database.key(user_id), TRANSCRIPTION),
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
                self.database.connection(), user_id, limit=limit, offset=offset, words=words
            )

        return await self.database.run(query)

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
        parameters: list[Any] = [self.database.key(user_id), TRANSCRIPTION]
        if mark is not None:
            sql += " AND instr(' ' || marks || ' ', ?) > 0"
            parameters.append(f" {mark} ")
        sql += f" {NEWEST_FIRST} LIMIT ? OFFSET ?"
        parameters += [-1 if limit is None else limit, offset]
        return [self._digest(DigestRow(*row)) for row in connection.execute(sql, parameters)]

    def _digest(self, row: DigestRow) -> CallDigest:
        cipher = self.database.cipher
        return CallDigest(
            conversation_id=row.conversation_id,
            agent_id=row.agent_id,
            started_at=row.started_at,
            facts=decode(cipher.decrypt(bytes(row.facts))),
            marks=frozenset(row.marks.split()),
            words=frozenset(cipher.decrypt(bytes(row.words)).decode().split())
            if row.words is not None
            else None,
        )

    def _put_digest(
        self, connection: sqlite3.Connection, user_id: str, event_type: str, digest: CallDigest
    ) -> None:
        """Keep `digest` beside its call, in the writer's transaction; encrypted like the
        payload (names, summaries and words are personal data)."""
        cipher = self.database.cipher
        connection.execute(
            "INSERT OR REPLACE INTO call_digests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event_type,
                digest.conversation_id,
                self.database.key(user_id),
                digest.agent_id,
                digest.started_at,
                DIGEST_VERSION,
                " ".join(sorted(digest.marks)),
                cipher.encrypt(encode(digest.facts)),
                cipher.encrypt(" ".join(digest.words or ()).encode()),
            ),
        )

    def _complete_digests(self, user_id: str) -> None:
        """Make the caller's digests match their calls: every call stored since digests
        exist has its digest from the same transaction, so this is two counts over indexes
        (the calls' pages, 12 KB a call, are not read). Calls stored before digests existed,
        or digested at another `DIGEST_VERSION`, are digested from their payload; digests
        whose call is gone (forgotten by an older version of the code) are deleted."""
        key = self.database.key(user_id)
        calls, digests = (
            self.database.connection()
            .execute(
                "SELECT (SELECT count(*) FROM calls WHERE user_id = ?),"
                " (SELECT count(*) FROM call_digests WHERE user_id = ? AND version = ?)",
                (key, key, DIGEST_VERSION),
            )
            .fetchone()
        )
        if calls == digests:
            return
        # In the write transaction from the first read: a caller forgotten meanwhile must
        # not get digests back. Rare (once per caller after an upgrade), so the lock may
        # be held while payloads are digested.
        with self.database.write() as connection:
            rows = connection.execute(
                "SELECT c.event_type, c.payload FROM calls c LEFT JOIN call_digests d"
                " ON d.event_type = c.event_type AND d.conversation_id = c.conversation_id"
                " AND d.version = ? WHERE c.user_id = ? AND d.conversation_id IS NULL",
                (DIGEST_VERSION, key),
            ).fetchall()
            for event_type, payload in rows:
                digest = digest_call(decode(self.database.cipher.decrypt(bytes(payload))))
                self._put_digest(connection, user_id, event_type, digest)
            connection.execute(
                "DELETE FROM call_digests WHERE user_id = ? AND NOT EXISTS (SELECT 1 FROM calls"
                " WHERE calls.event_type = call_digests.event_type"
                " AND calls.conversation_id = call_digests.conversation_id)",
                (key,),
            )

    # Forgotten conversations -------------------------------------------------------------
    def _conversation_key(self, conversation_id: str) -> str:
        return self.database.hashed(f"conversation:{conversation_id}")

    def is_forgotten_in(self, connection: sqlite3.Connection, conversation_id: str) -> bool:
        return (
            connection.execute(
                "SELECT 1 FROM forgotten_conversations WHERE conversation_key = ?",
                (self._conversation_key(conversation_id),),
            ).fetchone()
            is not None
        )

    async def forget_conversations(self, conversation_ids: Collection[str]) -> None:
        def insert() -> None:
            with self.database.write() as connection:
                connection.executemany(
                    "INSERT OR IGNORE INTO forgotten_conversations VALUES (?, ?)",
                    [(self._conversation_key(cid), time.time()) for cid in conversation_ids],
                )

        await self.database.run(insert)

    async def is_forgotten(self, conversation_id: str) -> bool:
        return await self.database.run(
            lambda: self.is_forgotten_in(self.database.connection(), conversation_id)
        )

    # Caller profiles ---------------------------------------------------------------------
    async def get_caller_profile(self, user_id: str) -> dict[str, Any] | None:
        # Read on the event loop: a primary-key lookup takes microseconds, less than the
        # hop to a thread, whose GIL hand-offs also stretch every other request in flight.
        # Only a lock could make it wait, and the loop's connection never waits for one.
        try:
            return self.caller_profile(self.database.reader(), user_id)
        except sqlite3.Error as error:
            if not busy(error):
                raise StoreUnavailableError(f"sqlite: {error}") from error
        # Busy: another connection holds the whole file (exclusive locking mode, WAL
        # recovery). A thread waits for it with the usual busy timeout.
        return await self.database.run(
            lambda: self.caller_profile(self.database.connection(), user_id)
        )

    def caller_profile(self, connection: sqlite3.Connection, user_id: str) -> dict[str, Any] | None:
        row = connection.execute(
            "SELECT profile FROM caller_profiles WHERE user_id = ?", (self.database.key(user_id),)
        ).fetchone()
        return decode(self.database.cipher.decrypt(bytes(row[0]))) if row else None

    async def put_caller_profile(self, user_id: str, profile: dict[str, Any]) -> None:
        await self.database.run(lambda: self._put_caller_profile(user_id, profile))

    async def keep_caller_profile(
        self, user_id: str, profile: dict[str, Any], prepared_from: str, read: HistoryRead
    ) -> ProfileKept:
        def keep() -> ProfileKept:  # one hop to the store's thread, not three
            self._put_caller_profile(user_id, profile)
            forgotten = self.is_forgotten_in(self.database.connection(), prepared_from)
            return ProfileKept(forgotten, self.read_history(user_id, read))

        return await self.database.run(keep)

    def _put_caller_profile(self, user_id: str, profile: dict[str, Any]) -> None:
        # Compact UTF-8 (orjson), the cheapest form to decode while the phone rings.
        blob = self.database.cipher.encrypt(encode(profile))
        with self.database.write() as connection:
            connection.execute(
                "INSERT INTO caller_profiles VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE"
                " SET profile = excluded.profile, updated_at = excluded.updated_at",
                (self.database.key(user_id), blob, time.time()),
            )
            self._put_directory_entry(connection, user_id, profile)

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
                self.database.key(user_id),
                name_key(profile.get("name"), self.database.word_key),
                int(profile.get("call_count") or 0),
                int(last) if isinstance(last, int | float) else None,
                self.database.seal(user_id).encode(),
                number_key(user_id, self.database.word_key, encrypted=self.database.cipher.enabled),
            ),
        )

    async def list_callers(
        self,
        *,
        number: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> CallerPage:
        database = self.database
        matches = directory_matches(
            number, name, database.word_key, encrypted=database.cipher.enabled
        )
        # instr, not LIKE '%...%': the same match on text already folded, several times
        # faster over 100,000 rows.
        clauses = [f"instr({match.column}, ?) > 0" for match in matches]
        parameters: list[Any] = [match.term for match in matches]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        page = [max(0, limit), max(0, offset)]

        def query() -> CallerPage:
            with database.read() as connection:
                if where:
                    # One pass over the table for the matches and their count; the few
                    # matches are then sorted (walking the index in order would visit every
                    # row out of order).
                    found = [
                        DirectoryRow._make(row)
                        for row in connection.execute(
                            "SELECT user_id, call_count, last_started_at, COUNT(*) OVER (), caller"
                            f" FROM caller_directory {where}"
                            " ORDER BY +last_started_at DESC, user_id DESC LIMIT ? OFFSET ?",
                            [*parameters, *page],
                        )
                    ]
                    if found:
                        total = found[0].total or 0
                    else:  # past the last page, or no match at all (no second scan)
                        total = self._count_callers(connection, where, parameters) if offset else 0
                else:
                    # The page from the index, then only its callers' rows.
                    found = [
                        DirectoryRow._make(row)
                        for row in connection.execute(
                            "SELECT user_id, call_count, last_started_at, NULL, caller"
                            " FROM caller_directory"
                            " ORDER BY last_started_at DESC, user_id DESC LIMIT ? OFFSET ?",
                            page,
                        )
                    ]
                    total = self._count_callers(connection, "", [])
                profiles = (
                    dict(
                        connection.execute(
                            "SELECT user_id, profile FROM caller_profiles WHERE user_id IN"
                            f" ({','.join('?' * len(found))})",
                            [row.user_id for row in found],
                        ).fetchall()
                    )
                    if found
                    else {}
                )
            callers = []
            for row in found:
                blob = profiles.get(row.user_id)
                profile = decode(database.cipher.decrypt(bytes(blob))) if blob else {}
                callers.append(
                    CallerSummary(
                        user_id=database.open(bytes(row.caller)),
                        name=profile.get("name") or None,
                        call_count=row.call_count,
                        last_started_at=row.last_started_at,
                    )
                )
            return CallerPage(callers=callers, total=total)

        return await database.run(query)

    def _count_callers(
        self, connection: sqlite3.Connection, where: str, parameters: list[Any]
    ) -> int:
        row = connection.execute(f"SELECT COUNT(*) FROM caller_directory {where}", parameters)
        return int(row.fetchone()[0])

    # Saved search indexes ----------------------------------------------------------------
    def index_state(self, connection: sqlite3.Connection, user_id: str) -> IndexState:
        """The caller's version and saved index in one query."""
        key = self.database.key(user_id)
        count, last, memories, last_seq, data = connection.execute(
            "SELECT m.count, m.last, i.memories, i.last_seq, i.data FROM"
            f" (SELECT count(*) AS count, coalesce(max(seq), 0) AS last FROM {self.version_table}"
            "  WHERE user_id = ?) AS m LEFT JOIN caller_indexes AS i ON i.user_id = ?",
            (key, key),
        ).fetchone()
        saved = None
        if data is not None:
            try:
                saved = SavedIndex(
                    MemoryVersion(memories, last_seq), self.database.cipher.decrypt(data)
                )
            except ValueError:  # under a key no longer configured: rebuilt, saved again
                saved = None
        return IndexState(MemoryVersion(count, last), saved)

    def version_now(self, user_id: str) -> MemoryVersion | None:
        """The caller's version read on the event loop (`MemoryStore.index_version_now`):
        microseconds, and the loop's reader answers at once or fails busy (then None)."""
        try:
            return self.version(self.database.reader(), user_id)
        except sqlite3.Error as error:
            if not busy(error):
                raise StoreUnavailableError(f"sqlite: {error}") from error
            return None

    def version(self, connection: sqlite3.Connection, user_id: str) -> MemoryVersion:
        """Count and last seq of the caller's memories: changes with every insert or
        delete, one indexed aggregate over the caller's own rows, so a worker sees another
        worker's writes without any shared cache."""
        count, last = connection.execute(
            f"SELECT count(*), coalesce(max(seq), 0) FROM {self.version_table} WHERE user_id = ?",
            (self.database.key(user_id),),
        ).fetchone()
        return MemoryVersion(count, last)

    async def save_index(self, user_id: str, index: SavedIndex) -> bool:
        data = self.database.cipher.encrypt(index.data)

        def save() -> bool:
            with self.database.write() as connection:
                # Only if no memory came or went meanwhile: the index describes its version.
                if self.version(connection, user_id) != index.version:
                    return False
                connection.execute(
                    "INSERT INTO caller_indexes VALUES (?, ?, ?, ?) ON CONFLICT (user_id)"
                    " DO UPDATE SET memories = excluded.memories,"
                    " last_seq = excluded.last_seq, data = excluded.data",
                    (
                        self.database.key(user_id),
                        index.version.count,
                        index.version.last_seq,
                        data,
                    ),
                )
                return True

        return await self.database.run(save)
