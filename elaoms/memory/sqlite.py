"""The embedded memory store: one SQLite file in WAL mode.

Several gunicorn workers may write at once: every write is a short `BEGIN IMMEDIATE`
transaction with a busy timeout, and a call's idempotency rests on its primary key, so a
duplicate delivery racing in another process stores nothing.

The store holds its file (`SQLiteDatabase`) and the tables it shares with the OpenMemory
ledger (`CallTables`: calls, digests, caller profiles and directory, forgotten
conversations, saved indexes); its own are a caller's memories and agent profiles.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Collection, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from elaoms.crypto import PayloadCipher
from elaoms.memory.base import (
    CallDigest,
    CallerPage,
    CallHistory,
    CallReceipt,
    HistoryRead,
    IndexState,
    Memory,
    MemoryStore,
    MemoryVersion,
    ProfileKept,
    SavedIndex,
    StoredCall,
)
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite_calls import CALL_SCHEMA, CallTables
from elaoms.memory.sqlite_database import SQLiteDatabase
from elaoms.memory.units import TRANSCRIPTION

AGENT_PROFILE = "agent_profile"

MEMORY_SCHEMA = """
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
-- An agent's configuration from ElevenLabs (no caller data, in clear), as `profile` JSON.
CREATE TABLE IF NOT EXISTS agent_profiles (
    agent_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    fetched_at REAL NOT NULL
);
"""
SCHEMA = CALL_SCHEMA + MEMORY_SCHEMA
# Present once agent profiles kept as memory rows (before their own table) were moved.
AGENT_PROFILES_MOVED = "agent_profiles_moved"


class MemoryRow(NamedTuple):
    """A row of `memories` as `_list_memories` selects it (content and metadata sealed)."""

    id: str
    user_id: str  # the column: the caller id, or its keyed hash
    content: str
    metadata: str
    created_at: float


class SQLiteStore(MemoryStore):
    name = "sqlite"
    caller_profiles_on_loop = True

    def __init__(
        self,
        path: Path,
        *,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
        cipher: PayloadCipher | None = None,
    ) -> None:
        self.database = SQLiteDatabase(path, file_mode=file_mode, dir_mode=dir_mode, cipher=cipher)
        self.tables = CallTables(self.database, version_table="memories")
        self.database.set_up(
            SCHEMA,
            migrations=[self.tables.add_caller_column, self._move_agent_profiles],
            protections=[self.tables.protect, self._protect_memories],
        )
        self.tables.fill_caller_directory()

    @property
    def cipher(self) -> PayloadCipher:
        return self.database.cipher

    def _move_agent_profiles(self) -> None:
        """Agent profiles an older version kept as rows of `memories` go to their own
        table (they are no caller's memories: they must not count in a caller's version).
        Once per file: a marker saves the scan of every memory at later starts."""
        with self.database.write() as connection:
            if self.database.marked(connection, AGENT_PROFILES_MOVED):
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
            self.database.mark(connection, AGENT_PROFILES_MOVED)

    def _protect_memories(self, connection: sqlite3.Connection, plain: str) -> int:
        """Memories left in clear: caller keys hashed, content and metadata encrypted."""
        changed = 0
        for seq, user_id, content, metadata in connection.execute(
            f"SELECT seq, user_id, content, metadata FROM memories WHERE user_id {plain}"
            " AND (kind IS NULL OR kind != ?)",
            (AGENT_PROFILE,),
        ).fetchall():
            connection.execute(
                "UPDATE memories SET user_id = ?, content = ?, metadata = ? WHERE seq = ?",
                (
                    self.database.key(user_id),
                    self.database.seal(content),
                    self.database.seal(metadata),
                    seq,
                ),
            )
            changed += 1
        return changed

    # Calls -------------------------------------------------------------------------------
    async def add_call(
        self,
        user_id: str,
        call: CallRecord,
        payload: dict[str, Any],
        memories: list[Memory],
        read: HistoryRead | None = None,
    ) -> CallReceipt:
        return await self.database.run(
            lambda: self._add_call(user_id, call, payload, memories, read)
        )

    def _add_call(
        self,
        user_id: str,
        call: CallRecord,
        payload: dict[str, Any],
        memories: list[Memory],
        read: HistoryRead | None,
    ) -> CallReceipt:
        with self.database.write() as connection:
            receipt = self.tables.insert_call(
                connection, user_id, call, payload, f"mem_{uuid.uuid4().hex}"
            )
            if receipt.created:
                self._insert_memories(connection, memories)
        if read is None or receipt.forgotten:
            return receipt
        # In the same trip to the store's thread: the hook's read, without a trip of its own.
        try:
            return replace(receipt, history=self.tables.read_history(user_id, read))
        except sqlite3.Error:  # stored all the same; the hook reads for itself
            return receipt

    async def get_call(
        self, conversation_id: str, event_type: str = TRANSCRIPTION
    ) -> StoredCall | None:
        return await self.tables.get_call(conversation_id, event_type)

    async def list_calls(
        self,
        user_id: str | None = None,
        *,
        agent_id: str | None = None,
        since: int | None = None,
        limit: int | None = None,
    ) -> list[StoredCall]:
        return await self.tables.list_calls(user_id, agent_id=agent_id, since=since, limit=limit)

    async def call_history(
        self, user_id: str, *, recent: int, marks: Collection[str] = ()
    ) -> CallHistory:
        return await self.tables.call_history(user_id, recent=recent, marks=marks)

    async def list_call_digests(
        self, user_id: str, *, limit: int | None = None, offset: int = 0, words: bool = False
    ) -> list[CallDigest]:
        return await self.tables.list_call_digests(user_id, limit=limit, offset=offset, words=words)

    async def calls_per_day(self, user_id: str | None = None, *, since: int) -> dict[int, int]:
        return await self.tables.calls_per_day(user_id, since=since)

    async def list_agent_ids(self) -> list[str]:
        return await self.tables.list_agent_ids()

    async def forget_conversations(self, conversation_ids: Collection[str]) -> None:
        await self.tables.forget_conversations(conversation_ids)

    async def is_forgotten(self, conversation_id: str) -> bool:
        return await self.tables.is_forgotten(conversation_id)

    # Memories ----------------------------------------------------------------------------
    async def add_memory(
        self, user_id: str, content: str, metadata: dict[str, Any] | None = None
    ) -> Memory:
        memory = Memory.new(user_id, content, metadata)

        def insert() -> None:
            with self.database.write() as connection:
                self._insert_memories(connection, [memory])

        await self.database.run(insert)
        return memory

    def _insert_memories(self, connection: sqlite3.Connection, memories: list[Memory]) -> None:
        connection.executemany(
            "INSERT OR IGNORE INTO memories"
            " (id, user_id, kind, content, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [self._memory_row(memory) for memory in memories],
        )

    async def list_memories(self, user_id: str, limit: int | None = None) -> list[Memory]:
        return await self.database.run(lambda: self._list_memories(user_id, limit))

    def _list_memories(
        self, user_id: str, limit: int | None = None, *, after_seq: int = 0
    ) -> list[Memory]:
        sql = (
            "SELECT id, user_id, content, metadata, created_at FROM memories"
            " WHERE user_id = ? AND seq > ? AND (kind IS NULL OR kind != ?) ORDER BY seq"
        )
        parameters: list[Any] = [self.database.key(user_id), after_seq, AGENT_PROFILE]
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(limit)
        rows = self.database.connection().execute(sql, parameters)
        return [self._memory(user_id, MemoryRow._make(row)) for row in rows]

    def _memory(self, user_id: str, row: MemoryRow) -> Memory:
        return Memory(
            id=row.id,
            user_id=user_id,
            content=self.database.open(row.content),
            metadata=json.loads(self.database.open(row.metadata)),
            created_at=row.created_at,
        )

    def _memory_row(self, memory: Memory) -> tuple[Any, ...]:
        return (
            memory.id,
            self.database.key(memory.user_id),
            memory.metadata.get("kind") or memory.metadata.get("type"),
            self.database.seal(memory.content),
            self.database.seal(json.dumps(memory.metadata, separators=(",", ":"))),
            memory.created_at,
        )

    # Search indexes ---------------------------------------------------------------------
    async def index_state(self, user_id: str) -> IndexState:
        # One query: in a thread, one round of GIL hand-offs rather than two.
        return await self.database.run(
            lambda: self.tables.index_state(self.database.connection(), user_id)
        )

    def index_version_now(self, user_id: str) -> MemoryVersion | None:
        return self.tables.version_now(user_id)

    async def memory_version(self, user_id: str) -> MemoryVersion:
        # Asked when the loop's reader was busy: the version alone, in a thread.
        return await self.database.run(
            lambda: self.tables.version(self.database.connection(), user_id)
        )

    async def memories_after(
        self, user_id: str, after_seq: int
    ) -> tuple[MemoryVersion, list[Memory]]:
        def query() -> tuple[MemoryVersion, list[Memory]]:
            with self.database.read() as connection:
                version = self.tables.version(connection, user_id)
                return version, self._list_memories(user_id, after_seq=after_seq)

        return await self.database.run(query)

    async def save_index(self, user_id: str, index: SavedIndex) -> bool:
        return await self.tables.save_index(user_id, index)

    async def delete_user(self, user_id: str) -> int:
        def delete() -> int:
            with self.database.write() as connection:
                deleted = connection.execute(
                    "DELETE FROM memories WHERE user_id = ?", (self.database.key(user_id),)
                ).rowcount
                deleted += self.tables.delete_caller(connection, user_id)
            # The deleted rows' page images stay in the -wal until a checkpoint.
            self.database.flush()
            return deleted

        return await self.database.run(delete)

    # Profiles ----------------------------------------------------------------------------
    async def get_agent_profile(self, agent_id: str) -> dict[str, Any] | None:
        def query() -> dict[str, Any] | None:
            row = (
                self.database.connection()
                .execute(
                    "SELECT profile, fetched_at FROM agent_profiles WHERE agent_id = ?",
                    (agent_id,),
                )
                .fetchone()
            )
            if not row:
                return None
            content, fetched_at = row
            profile: dict[str, Any] = json.loads(content)
            profile["_fetched_at"] = fetched_at
            return profile

        return await self.database.run(query)

    async def put_agent_profile(
        self, agent_id: str, profile: dict[str, Any], fetched_at: float
    ) -> None:
        content = json.dumps({k: v for k, v in profile.items() if k != "_fetched_at"})

        def upsert() -> None:
            with self.database.write() as connection:
                connection.execute(
                    "INSERT INTO agent_profiles VALUES (?, ?, ?) ON CONFLICT (agent_id)"
                    " DO UPDATE SET profile = excluded.profile, fetched_at = excluded.fetched_at",
                    (agent_id, content, fetched_at),
                )

        await self.database.run(upsert)

    def get_caller_profile(self, user_id: str) -> Coroutine[Any, Any, dict[str, Any] | None]:
        # The tables' own coroutine, not one awaiting it: read while the phone rings, on the
        # event loop (`CallTables.get_caller_profile`), with nothing added on the way.
        return self.tables.get_caller_profile(user_id)

    async def put_caller_profile(self, user_id: str, profile: dict[str, Any]) -> None:
        await self.tables.put_caller_profile(user_id, profile)

    async def keep_caller_profile(
        self, user_id: str, profile: dict[str, Any], prepared_from: str, read: HistoryRead
    ) -> ProfileKept:
        return await self.tables.keep_caller_profile(user_id, profile, prepared_from, read)

    async def list_callers(
        self,
        *,
        number: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> CallerPage:
        return await self.tables.list_callers(number=number, name=name, limit=limit, offset=offset)

    # Life cycle --------------------------------------------------------------------------
    async def maintain(self) -> None:
        """Complete a forget's -wal flush that other workers' reads held back."""
        await self.database.maintain()

    async def check(self) -> None:
        await self.database.check("calls")

    async def close(self) -> None:
        self.database.close()
