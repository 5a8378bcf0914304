"""One SQLite file in WAL mode, as the embedded store and the OpenMemory ledger both keep it:
connections per thread, short transactions, the set-up retried while workers start
together, encryption at rest and the keyed hashes that stand for callers.

Several gunicorn workers may write at once: every write is a short `BEGIN IMMEDIATE`
transaction with a busy timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from elaoms.crypto import KEYED_HASH_PREFIX, PayloadCipher, keyed_hash, new_hash_key
from elaoms.files import ensure_private_dir
from elaoms.memory.base import StoreUnavailableError
from elaoms.memory.directory import keyed_word

T = TypeVar("T")
logger = logging.getLogger(__name__)

# The store's secret for keyed hashes (wrapped with ENCRYPTION_KEY when encryption is on)
# and its markers.
KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_keys (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""
HASH_KEY = "hash_key"
# Present while encryption is on and every row is encrypted (no start-up scan needed).
ALL_PROTECTED = "all_rows_protected"
# The condition selecting a `user_id` still in clear (not yet a keyed hash).
PLAIN = f"NOT LIKE '{KEYED_HASH_PREFIX}%'"

# Encrypts a part's rows left in clear (caller keys hashed) inside the start-up
# transaction; given the connection and PLAIN, returns how many rows it changed.
Protection = Callable[[sqlite3.Connection, str], int]


class SQLiteDatabase:
    """The file and how to reach it; knows no table but `store_keys`."""

    checkpoint_timeout = 10.0  # how long a forget waits for other workers' reads to end

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
        self.hash_key = b""
        self.flush_due = False  # a forget's -wal checkpoint still to complete
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()

    # Set-up ------------------------------------------------------------------------------
    def set_up(
        self,
        schema: str,
        *,
        migrations: Sequence[Callable[[], None]] = (),
        protections: Sequence[Protection] = (),
    ) -> None:
        """Create the file (private), switch it to WAL, create `schema`, load the hash key,
        then run the holder's `migrations` and, with encryption on, its `protections`."""
        ensure_private_dir(self.path.parent, self.dir_mode)
        if not self.path.exists():
            # Create the file with our mode before SQLite does, so it is never world-readable.
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, self.file_mode)
            os.close(fd)
        os.chmod(self.path, self.file_mode)
        connection = self.connection()

        # WAL is a lasting property of the file, set once here. Workers starting together
        # on a new file: switching it to WAL, or two of them creating the schema, can fail
        # "database is locked" at once (SQLite answers at once rather than wait where
        # waiting could deadlock); one in 12 such starts failed a worker, and gunicorn
        # then stops every worker. So the setup is tried again until the lock is free.
        @retry(
            retry=retry_if_exception(busy),
            wait=wait_random_exponential(multiplier=0.01, max=0.5),
            stop=stop_after_delay(30),
            reraise=True,
        )
        def attempt() -> None:
            connection.execute("PRAGMA journal_mode=WAL")
            # executescript manages its own transaction: a schema made meanwhile is kept.
            connection.executescript(KEYS_SCHEMA + schema)
            self.hash_key = self._load_hash_key()
            for migrate in migrations:
                migrate()
            self._protect_plain_rows(protections)

        attempt()

    def _load_hash_key(self) -> bytes:
        """The store's keyed-hash secret, made on first use. With encryption on it is kept
        wrapped with ENCRYPTION_KEY and re-wrapped at every start (one small write), so
        after a rotation it is under the new key and the old one can go."""
        with self.write() as connection:
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

    def marked(self, connection: sqlite3.Connection, name: str) -> bool:
        """Whether the marker `name` is set in `store_keys`."""
        row = connection.execute("SELECT 1 FROM store_keys WHERE name = ?", (name,)).fetchone()
        return row is not None

    def mark(self, connection: sqlite3.Connection, name: str) -> None:
        connection.execute("INSERT OR REPLACE INTO store_keys VALUES (?, ?)", (name, b"1"))

    def _protect_plain_rows(self, protections: Sequence[Protection]) -> None:
        """Encrypt what an older version (or this one with encryption off) left in clear:
        caller keys become keyed hashes, words are encrypted, saved indexes dropped (they
        are rebuilt). Runs at start-up when encryption is on; a no-op once done. Old page
        images are then flushed from the -wal and the file is rebuilt (VACUUM), so no copy
        in clear remains."""
        marked = self.marked(self.connection(), ALL_PROTECTED)
        if not self.cipher.enabled:
            if marked:  # rows written from now on are in clear: look again next time
                with self.write() as connection:
                    connection.execute("DELETE FROM store_keys WHERE name = ?", (ALL_PROTECTED,))
            return
        if marked:  # every row is protected: skip the scans (a second or so on a big store)
            return
        with self.write() as connection:
            changed = sum(protect(connection, PLAIN) for protect in protections)
            self.mark(connection, ALL_PROTECTED)
        if changed:
            self.flush()
            self.connection().execute("VACUUM")
            self.flush()

    # Caller keys and sealed text ----------------------------------------------------------
    def key(self, user_id: str) -> str:
        """The `user_id` column's value: the caller id itself, or with encryption on its
        keyed hash (the number is then kept only encrypted, in `calls.caller`)."""
        return keyed_hash(self.hash_key, user_id) if self.cipher.enabled else user_id

    def hashed(self, text: str) -> str:
        """`text`'s keyed hash under the store's hash key, whether encryption is on or off."""
        return keyed_hash(self.hash_key, text)

    def word_key(self, word: str) -> str:
        """A word or number the caller directory is searched by: itself, or with encryption
        on its keyed hash (an equal word finds it; the column alone does not reveal it).
        Under the store's hash key, which a rotation of ENCRYPTION_KEY leaves as it is, so
        callers stay found; shortened, as the directory holds several per caller."""
        if not self.cipher.enabled:
            return word
        return keyed_word(self.hash_key, word)

    def seal(self, text: str) -> str:
        return self.cipher.encrypt(text.encode()).decode() if self.cipher.enabled else text

    def open(self, value: str | bytes) -> str:
        data = value if isinstance(value, bytes) else value.encode()
        return self.cipher.decrypt(data).decode()

    # Connections and transactions --------------------------------------------------------
    def connection(self) -> sqlite3.Connection:
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

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection with a busy timeout of 0: it answers at once
        or fails busy, never waiting for a lock. Reads on the event loop use it (a busy one
        is redone in a thread). In WAL mode readers do not wait for writers: busy is rare
        (see `busy`)."""
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
    def read(self) -> Iterator[sqlite3.Connection]:
        """Several queries seeing one snapshot (in WAL mode writers go on meanwhile)."""
        connection = self.connection()
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        connection = self.connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        else:
            connection.execute("COMMIT")

    async def run(self, function: Callable[[], T]) -> T:
        """`function` in a thread; an SQLite error is the store being unavailable."""
        try:
            return await asyncio.to_thread(function)
        except sqlite3.Error as error:
            raise StoreUnavailableError(f"sqlite: {error}") from error

    # Upkeep ------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Copy the -wal into the file and empty it: with `secure_delete`, deleted or
        replaced rows are then gone from both (a forget, the start-up encryption). Another
        worker's read in progress holds the -wal back: tried again until `timeout`.
        True when the -wal is empty."""
        deadline = time.monotonic() + (self.checkpoint_timeout if timeout is None else timeout)
        while True:
            busy_, _, _ = self.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy_:
                self.flush_due = False
                return True
            if time.monotonic() > deadline:
                logger.warning("the -wal could not be emptied (readers busy): retried later")
                self.flush_due = True  # `maintain` tries again every second
                return False
            time.sleep(0.05)

    async def maintain(self) -> None:
        """Complete a forget's -wal flush that other workers' reads held back."""
        if self.flush_due:
            await self.run(lambda: self.flush(timeout=0))

    async def check(self, table: str) -> None:
        await self.run(
            lambda: self.connection().execute(f"SELECT 1 FROM {table} LIMIT 1").fetchall()
        )

    def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()


def busy(error: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, extended codes included: the lock, not the store, is
    what failed."""
    if not isinstance(error, sqlite3.Error):
        return False
    primary = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
