"""The OpenMemory backend's local half: a SQLite "ledger" (OPENMEMORY_LEDGER_PATH) with
every call's whole payload, its digest, prepared caller profiles, saved search indexes and
which unit of a call went to which server id (`elaoms.memory.openmemory` says why).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, NamedTuple

from elaoms.crypto import PayloadCipher
from elaoms.memory.base import CallReceipt, IndexState, MemoryVersion
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite_calls import CALL_SCHEMA, CallTables
from elaoms.memory.sqlite_database import SQLiteDatabase

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS openmemory_units (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    unit TEXT NOT NULL,
    openmemory_id TEXT NOT NULL,
    call_order INTEGER NOT NULL,
    UNIQUE (event_type, conversation_id, unit)
);
CREATE INDEX IF NOT EXISTS openmemory_units_by_user ON openmemory_units (user_id, seq);
"""


class Ledger:
    """The local half of the backend: calls (with their digests), caller profiles, saved
    indexes and the unit -> id record, in one SQLite file.

    It holds the file and the call tables as the embedded store does (`SQLiteDatabase`,
    `CallTables`: the same format, WAL, safe across workers), and adds one table of its
    own; a caller's memories are their units on the server, so their version is counted
    over that table.
    """

    def __init__(
        self,
        path: Path,
        *,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
        cipher: PayloadCipher | None = None,
    ) -> None:
        self.database = SQLiteDatabase(path, file_mode=file_mode, dir_mode=dir_mode, cipher=cipher)
        self.tables = CallTables(self.database, version_table="openmemory_units")
        self.database.set_up(
            CALL_SCHEMA + LEDGER_SCHEMA,
            migrations=[self.tables.add_caller_column],
            protections=[self.tables.protect, self._protect_units],
        )
        self.tables.fill_caller_directory()

    def _protect_units(self, connection: sqlite3.Connection, plain: str) -> int:
        changed = 0
        for seq, user_id in connection.execute(
            f"SELECT seq, user_id FROM openmemory_units WHERE user_id {plain}"
        ).fetchall():
            connection.execute(
                "UPDATE openmemory_units SET user_id = ? WHERE seq = ?",
                (self.database.key(user_id), seq),
            )
            changed += 1
        return changed

    async def units(self, event_type: str, conversation_id: str) -> tuple[dict[str, str], int]:
        """The call's units already on the server, and the add order they were given (a
        resumed call keeps it, so its units still list together and in order)."""

        def query() -> tuple[dict[str, str], int]:
            rows = [
                UnitRow._make(row)
                for row in self.database.connection().execute(
                    "SELECT unit, openmemory_id, call_order FROM openmemory_units"
                    " WHERE event_type = ? AND conversation_id = ?",
                    (event_type, conversation_id),
                )
            ]
            order = rows[0].call_order if rows else now_order()
            return {row.unit: row.openmemory_id for row in rows}, order

        return await self.database.run(query)

    async def record_unit(
        self,
        user_id: str,
        event_type: str,
        conversation_id: str,
        unit: str,
        memory_id: str,
        order: int,
    ) -> None:
        key = self.database.key(user_id)

        def insert() -> None:
            with self.database.write() as connection:
                connection.execute(
                    "INSERT OR REPLACE INTO openmemory_units"
                    " (user_id, event_type, conversation_id, unit, openmemory_id, call_order)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (key, event_type, conversation_id, unit, memory_id, order),
                )

        await self.database.run(insert)

    async def receipt(self, event_type: str, conversation_id: str) -> str | None:
        return await self.database.run(
            lambda: self.tables.receipt(self.database.connection(), event_type, conversation_id)
        )

    async def record_call(
        self, user_id: str, call: CallRecord, payload: dict[str, Any], memory_id: str
    ) -> CallReceipt:
        """Index a call whose units are all on the server; a racing twin loses."""

        def insert() -> CallReceipt:
            with self.database.write() as connection:
                return self.tables.insert_call(connection, user_id, call, payload, memory_id)

        return await self.database.run(insert)

    async def version(self, user_id: str) -> MemoryVersion:
        """Changes whenever any worker adds or deletes a memory of `user_id`."""
        return await self.database.run(
            lambda: self.tables.version(self.database.connection(), user_id)
        )

    async def index_state(self, user_id: str) -> IndexState:
        return await self.database.run(
            lambda: self.tables.index_state(self.database.connection(), user_id)
        )

    async def units_after(self, user_id: str, after_seq: int) -> tuple[MemoryVersion, list[str]]:
        """The server ids of the caller's units recorded after `after_seq`, in add order,
        and the caller's version, from one read."""

        def query() -> tuple[MemoryVersion, list[str]]:
            with self.database.read() as connection:
                version = self.tables.version(connection, user_id)
                rows = connection.execute(
                    "SELECT openmemory_id FROM openmemory_units WHERE user_id = ? AND seq > ?"
                    " ORDER BY seq",
                    (self.database.key(user_id), after_seq),
                ).fetchall()
            return version, [memory_id for (memory_id,) in rows]

        return await self.database.run(query)

    async def forget(self, user_id: str) -> int:
        """Remove the caller's calls and profile (counted) and unit records (not counted:
        the server's own count covers those memories)."""

        def delete() -> int:
            with self.database.write() as connection:
                connection.execute(
                    "DELETE FROM openmemory_units WHERE user_id = ?", (self.database.key(user_id),)
                )
                deleted = self.tables.delete_caller(connection, user_id)
            self.database.flush()  # the deleted rows' page images leave the -wal too
            return deleted

        return await self.database.run(delete)


class UnitRow(NamedTuple):
    """A call's unit as `Ledger.units` selects it."""

    unit: str
    openmemory_id: str
    call_order: int


def now_order() -> int:
    """Add order in microseconds: exact as a JSON number even on a JavaScript server."""
    return time.time_ns() // 1000
