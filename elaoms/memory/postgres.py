"""The PostgreSQL memory store: several replicas, each with its workers, share one database.

The tables mirror the embedded store's (`elaoms.memory.sqlite`, schema in
`elaoms/memory/migrations/`), with the same keyed-hash caller keys and the same encryption
at rest. A call's idempotency rests on its primary key (`INSERT ... ON CONFLICT DO
NOTHING`): a duplicate delivery racing in on another replica stores nothing, whatever any
cache says. Every write is one transaction.

The connection pool is opened, and the schema brought up to date, on first use rather than
at construction: a replica starts, and queues deliveries on disk, while PostgreSQL is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import time
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from elaoms.crypto import (
    KEYED_HASH_PREFIX,
    EncryptionConfigError,
    PayloadCipher,
    keyed_hash,
    new_hash_key,
)
from elaoms.memory.base import (
    NO_MEMORIES,
    CallDigest,
    CallerPage,
    CallerSummary,
    CallHistory,
    CallReceipt,
    ForgetRequest,
    HistoryRead,
    IndexState,
    Memory,
    MemoryStore,
    MemoryVersion,
    ProfileKept,
    SavedIndex,
    StoredCall,
    StoreUnavailableError,
)
from elaoms.memory.batched import BatchedReads
from elaoms.memory.digest import DIGEST_VERSION, digest_call, digest_record
from elaoms.memory.directory import directory_matches, keyed_word, name_key, number_key
from elaoms.memory.postgres_copies import (
    CHANNEL,
    EVERYONE,
    KEEPALIVES,
    Absent,
    CallerCopies,
    ProfiledRead,
    copy_key,
)
from elaoms.memory.records import CallRecord
from elaoms.memory.units import TRANSCRIPTION
from elaoms.payloads import decode, encode

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from elaoms.config import Settings

logger = logging.getLogger(__name__)

CALL_COLUMNS = (
    "event_type, conversation_id, user_id, agent_id, event_timestamp, started_at, memory_id,"
    " payload, stored_at, caller"
)
HASH_KEY = "hash_key"
# Present while encryption is on and every row is encrypted (no start-up scan needed).
ALL_PROTECTED = "all_rows_protected"
# Newest first, as `MemoryStore.call_history` defines it: calls without a start last.
NEWEST_FIRST = "ORDER BY started_at DESC NULLS LAST, conversation_id DESC"
# Advisory lock classes (the two-key form: a space of its own, apart from the schema lock).
CALLER_LOCK = 1  # one caller's memories: their sequence numbers commit in order
PROTECT_LOCK = 2  # the start-up encryption of rows left in clear
FORGET_LOCK = 3  # forget requests commit in the order of their numbers
# Callers whose profile and memory version each process keeps (about 3.5 kB each; the
# setting DATABASE_CALLER_COPIES): the callers of the last days of a busy line.
CALLER_COPIES = 16_384
# As soon as it listens, a process fills its copies with the profiles of the callers who
# called last, newest first, this many to a read: those who called last are the likeliest
# to call again, and a worker just started (a deploy) answers them without a read. Between
# two reads the event loop serves (opening and keeping 256 profiles: a few milliseconds).
WARM_PAGE = 256
PROFILED_BATCH = 10_000
# Search index states in one read at most: each carries a saved index (about 14 kB for
# ten calls), and every caller of a read waits for all of it.
INDEX_STATES_PER_READ = 32
# A caller's memory version: a row the database keeps with their memories (migration
# 0004), not an aggregate over all of them.
VERSION = "SELECT memories, last_seq FROM memory_versions WHERE user_id = %s"
# Memories re-keyed (encryption turned on) in one statement.
REKEY_BATCH = 1_000
# Set while a one-statement read draws its connection: the pool's liveness round trip is
# skipped (the read is asked again on a checked connection if the first one was broken).
UNCHECKED: ContextVar[bool] = ContextVar("elaoms_postgres_unchecked", default=False)


async def _check_connection(connection: AsyncConnection) -> None:
    """The pool's check before handing a connection out. A round trip (about a tenth of a
    delivery's CPU, several per delivery) only when the server said something to the
    idle connection: a server that stopped, restarted or ended the session closes its
    socket or sends the reason, which makes it readable. One that said nothing is used
    as it is, as a round trip would find it; a one-statement read (`_fetch_all`) is not
    checked at all."""
    if UNCHECKED.get() or not _heard_from_server(connection):
        return
    from psycopg_pool import AsyncConnectionPool

    await AsyncConnectionPool.check_connection(connection)


def _heard_from_server(connection: AsyncConnection) -> bool:
    """Whether anything (or the end of the stream) waits unread on an idle connection."""
    try:
        poller = select.poll()
        poller.register(connection.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except Exception:  # closed (psycopg raises), or no socket to look at
        return True  # the round trip decides


def redacted(database_url: str) -> str:
    """DATABASE_URL as it may be logged: without its password."""
    try:
        parts = urlsplit(database_url)
    except ValueError:
        return "postgresql://..."
    if parts.password is None:
        return database_url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _text(value: str) -> str:
    """A value for a text column: PostgreSQL's text refuses the NUL character, which a
    signed payload may still carry in an id (the raw payload keeps it whole)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


@dataclass(frozen=True, slots=True)
class CallOwner:
    """The attempt that stored a call: its row carries the `memory_id` that attempt drew.
    Rows sent in the same round trip as the call's insert (digest, memories) apply only
    if that row is there, i.e. if this attempt, not an earlier one, stored the call."""

    event_type: str
    conversation_id: str
    memory_id: str

    def condition(self) -> tuple[str, list[Any]]:
        return (
            "WHERE EXISTS (SELECT 1 FROM calls WHERE event_type = %s"
            " AND conversation_id = %s AND memory_id = %s)",
            [self.event_type, self.conversation_id, self.memory_id],
        )


class PostgresStore(MemoryStore):
    name = "postgres"
    caller_profiles_on_loop = False

    def __init__(
        self,
        database_url: str,
        *,
        cipher: PayloadCipher | None = None,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        timeout: float = 5.0,
        upgrade_schema: bool = True,
        caller_copies: int = CALLER_COPIES,
        listen: bool = True,
    ) -> None:
        if not database_url:
            raise StoreUnavailableError(
                "MEMORY_BACKEND=postgres needs DATABASE_URL (postgresql://user:password@host/db)"
            )
        self.database_url = database_url
        self.cipher = cipher or PayloadCipher()
        self.pool_min_size = pool_min_size
        self.pool_max_size = max(pool_max_size, pool_min_size, 1)
        self.timeout = timeout
        self.upgrade_schema = upgrade_schema
        self._pool: AsyncConnectionPool | None = None
        self._opening: asyncio.Lock | None = None
        self._hash_key = b""
        self.copies = CallerCopies(caller_copies)
        # Profiles missing from the copies, and search index states, read together when
        # asked together.
        self._profile_reads: BatchedReads[str, bytes] = BatchedReads(self._read_profiles)
        self._index_reads: BatchedReads[str, tuple[Any, ...]] = BatchedReads(
            self._read_index_states, limit=INDEX_STATES_PER_READ
        )
        # Copies are trusted only while listening for other replicas' changes. A one-shot
        # command reads instead: listening would also read every profiled caller for it.
        self.listen = listen

    @classmethod
    def from_settings(
        cls, settings: Settings, cipher: PayloadCipher | None = None, *, listen: bool = True
    ) -> PostgresStore:
        return cls(
            settings.database_url,
            cipher=cipher,
            pool_min_size=settings.database_pool_min_size,
            pool_max_size=settings.database_pool_max_size,
            timeout=settings.database_timeout_seconds,
            caller_copies=settings.database_caller_copies,
            listen=listen,
        )

    def __repr__(self) -> str:
        return f"PostgresStore({redacted(self.database_url)!r})"

    # Connections -------------------------------------------------------------------------
    async def _ready(self) -> AsyncConnectionPool:
        """The open pool, opening it (and upgrading the schema) on first use. A failure is
        tried again at the next use."""
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is not None:
                return self._pool
            from psycopg_pool import AsyncConnectionPool

            try:
                if self._hash_key:
                    # Opened before, then dropped in an outage: one connection first, so
                    # that a database still down fails at once, not after the pool's wait.
                    import psycopg

                    probe = await psycopg.AsyncConnection.connect(
                        self.database_url, connect_timeout=max(1, round(self.timeout))
                    )
                    await probe.close()
                elif self.upgrade_schema:
                    from elaoms.memory import migrations

                    await asyncio.to_thread(
                        migrations.upgrade, self.database_url, connect_timeout=self.timeout
                    )
                pool = AsyncConnectionPool(
                    self.database_url,
                    min_size=self.pool_min_size,
                    max_size=self.pool_max_size,
                    timeout=self.timeout,
                    open=False,
                    # A connection broken while idle (PostgreSQL restarted) is replaced
                    # before use instead of failing the request that drew it.
                    check=_check_connection,
                    kwargs={"connect_timeout": max(1, round(self.timeout)), **KEEPALIVES},
                )
                await pool.open(wait=False)
                try:
                    async with pool.connection() as connection:
                        self._hash_key = await self._load_hash_key(connection)
                    await self._protect_plain_rows(pool)
                except BaseException:
                    await pool.close()
                    raise
            except EncryptionConfigError:
                raise  # a key that cannot read the store: said as such, not as an outage
            except Exception as error:
                raise storage_error(error, self.database_url) from error
            self._pool = pool
            if self.listen:
                self.copies.start(self.database_url, self.timeout, self._notify, self._warm_copies)
            return pool

    @asynccontextmanager
    async def _transaction(
        self, *, snapshot: bool = False, single: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """One transaction on a pooled connection, committed at the end (rolled back on an
        error). `snapshot`: several reads that must agree (REPEATABLE READ, read only).
        `single`: one statement, run on its own (autocommit), without the BEGIN and
        COMMIT round trips (see `_fetch_all`)."""
        pool = await self._ready()
        try:
            async with pool.connection() as connection:
                if single:
                    await connection.set_autocommit(True)
                    try:
                        yield connection
                    finally:
                        # The pool hands connections out in transaction mode.
                        with contextlib.suppress(Exception):
                            await connection.set_autocommit(False)
                    return
                if snapshot:
                    async with _snapshot(connection):
                        yield connection
                    return
                yield connection
        except Exception as error:
            if not _transient(error):
                raise
            if _no_connection(error) and self._pool is pool:
                # The pool backs off between reconnections (seconds, growing): a new one
                # at the next use reconnects as soon as PostgreSQL is back.
                self._pool = None
                await pool.close(timeout=1.0)
            raise storage_error(error, self.database_url) from error

    async def _fetch_one(self, query: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        """One statement's first row (see `_fetch_all`)."""
        rows = await self._fetch_all(query, params)
        return rows[0] if rows else None

    async def _fetch_all(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """One statement's rows, as on the call path (client-data, search): without BEGIN
        and COMMIT, and on a connection not checked first, so one round trip instead of
        four. A connection broken while idle (PostgreSQL restarted) fails it: it is then
        asked once more on a checked connection.

        Shielded from the caller's deadline: cancelled mid-query, psycopg would cancel
        the query on the server, holding the connection for up to seconds and opening
        another to send the cancel; under load the call path's deadlines then drained the
        pool (every read waiting 5 s for a connection; docs/scaling.md). The read
        finishes, in milliseconds, and gives its connection back; only the caller stops
        waiting."""
        read = asyncio.ensure_future(self._read_rows(query, params))
        read.add_done_callback(_retrieve)
        return await asyncio.shield(read)

    async def _read_rows(
        self, query: str, params: Sequence[Any], *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        """`binary`: the rows in PostgreSQL's binary format, for reads of blobs: bytea then
        comes as its bytes, not as hex text twice its size that the server writes and the
        worker parses (25 search index states: 0.5 to 0.7 ms of the worker's CPU instead
        of 1.2 to 1.6, and 2.7 ms instead of 4.3 from query to rows)."""
        for checked in (False, True):
            token = UNCHECKED.set(not checked)
            try:
                async with self._transaction(single=True) as connection:
                    found = await connection.execute(query, params, binary=binary)
                    return await found.fetchall()
            except StoreUnavailableError as error:
                # Asked again only for a broken connection: not after waiting for one.
                if checked or _no_connection(error.__cause__):
                    raise
            finally:
                UNCHECKED.reset(token)
        return []  # not reached: the second attempt returns or raises

    @asynccontextmanager
    async def _caller_transaction(
        self, key: str, *, changes: bool = True, pipeline: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """A transaction on one caller's rows.

        Writers of one caller take turns: sequence numbers are drawn at insert time, so
        without the lock a reader could see seq 11 committed before seq 10 (a saved
        index's `last_seq` would then skip 10). Other callers are not held up. When it
        `changes` the caller's memories or profile, the same statement tells every
        process, at commit, to drop its copies of the caller
        (`elaoms.memory.postgres_copies`); this one drops its own at once. (PostgreSQL
        commits notifying transactions one at a time: docs/scaling.md.)

        `pipeline`: statements are sent without waiting for each answer, and the server
        runs them in order (psycopg's pipeline mode); a result is waited for only when
        read."""
        notice = copy_key(key)
        if changes:
            self.copies.changing(key)
        try:
            async with self._transaction() as connection, _pipelined(connection, pipeline):
                if changes:
                    await connection.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s)), pg_notify(%s, %s)",
                        (CALLER_LOCK, key, CHANNEL, notice),
                    )
                else:
                    await connection.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (CALLER_LOCK, key)
                    )
                yield connection
        finally:
            if changes:
                self.copies.changed(key)

    async def _notify(self, channel: str, payload: str) -> None:
        async with self._transaction(single=True) as connection:
            await connection.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    async def _load_hash_key(self, connection: AsyncConnection) -> bytes:
        """The store's keyed-hash secret, made by whichever replica comes first (the others
        read it). With encryption on it is re-wrapped with the first ENCRYPTION_KEY at every
        start, so after a rotation the old key can go."""
        await connection.execute(
            "INSERT INTO store_keys (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (HASH_KEY, self.cipher.encrypt(new_hash_key())),
        )
        row = await (
            await connection.execute(
                "SELECT value FROM store_keys WHERE name = %s FOR UPDATE", (HASH_KEY,)
            )
        ).fetchone()
        assert row is not None
        key = self.cipher.decrypt(bytes(row[0]))
        if self.cipher.enabled:
            await connection.execute(
                "UPDATE store_keys SET value = %s WHERE name = %s",
                (self.cipher.encrypt(key), HASH_KEY),
            )
        return key

    async def _protect_plain_rows(self, pool: AsyncConnectionPool) -> None:
        """Encrypt what was written in clear (encryption turned on since): caller keys become
        keyed hashes, text is sealed, saved indexes dropped. One replica does it (the
        others wait on the lock, then find it done); a no-op once done."""
        async with pool.connection() as connection:
            if not self.cipher.enabled:
                # Rows written from now on are in clear: look again when it is turned on.
                await connection.execute("DELETE FROM store_keys WHERE name = %s", (ALL_PROTECTED,))
                return
            if await self._marked(connection):
                return
            await connection.execute("SELECT pg_advisory_xact_lock(%s, 0)", (PROTECT_LOCK,))
            if await self._marked(connection):  # done by another replica meanwhile
                return
            plain = f"NOT LIKE '{KEYED_HASH_PREFIX}%%'"
            seal = self.cipher.encrypt
            rows = await connection.execute(
                f"SELECT event_type, conversation_id, user_id, payload FROM calls WHERE user_id {plain}"
            )
            for event_type, conversation_id, user_id, payload in await rows.fetchall():
                await connection.execute(
                    "UPDATE calls SET user_id = %s, caller = %s, payload = %s"
                    " WHERE event_type = %s AND conversation_id = %s",
                    (
                        self._key(user_id),
                        seal(user_id.encode()),
                        seal(self.cipher.decrypt(bytes(payload))),
                        event_type,
                        conversation_id,
                    ),
                )
            rows = await connection.execute(
                f"SELECT seq, user_id, content, metadata FROM memories WHERE user_id {plain}"
            )
            found = await rows.fetchall()
            # A statement per batch, not per row: each statement runs the memory-version
            # triggers, and a row's updates in one transaction pile up (quadratic).
            for start in range(0, len(found), REKEY_BATCH):
                batch = found[start : start + REKEY_BATCH]
                await connection.execute(
                    "UPDATE memories SET user_id = row.user_id, content = row.content,"
                    " metadata = row.metadata FROM unnest(%b::bigint[], %b::text[],"
                    " %b::bytea[], %b::bytea[]) AS row (seq, user_id, content, metadata)"
                    " WHERE memories.seq = row.seq",
                    [
                        [seq for seq, *_ in batch],
                        [self._key(user_id) for _, user_id, *_ in batch],
                        [seal(self.cipher.decrypt(bytes(content))) for *_, content, _ in batch],
                        [seal(self.cipher.decrypt(bytes(metadata))) for *_, metadata in batch],
                    ],
                )
            await connection.execute(f"DELETE FROM caller_indexes WHERE user_id {plain}")
            await connection.execute(f"DELETE FROM caller_directory WHERE user_id {plain}")
            rows = await connection.execute(
                f"SELECT user_id, profile FROM caller_profiles WHERE user_id {plain}"
            )
            for user_id, profile in await rows.fetchall():
                plain_profile = self.cipher.decrypt(bytes(profile))
                await connection.execute(
                    "UPDATE caller_profiles SET user_id = %s, profile = %s WHERE user_id = %s",
                    (self._key(user_id), seal(plain_profile), user_id),
                )
                await self._put_directory_entry(connection, user_id, decode(plain_profile))
            rows = await connection.execute(
                "SELECT event_type, conversation_id, user_id, facts, words FROM call_digests"
                f" WHERE user_id {plain}"
            )
            for event_type, conversation_id, user_id, facts, words in await rows.fetchall():
                await connection.execute(
                    "UPDATE call_digests SET user_id = %s, facts = %s, words = %s"
                    " WHERE event_type = %s AND conversation_id = %s",
                    (
                        self._key(user_id),
                        seal(self.cipher.decrypt(bytes(facts))),
                        seal(self.cipher.decrypt(bytes(words))),
                        event_type,
                        conversation_id,
                    ),
                )
            rows = await connection.execute(
                f"SELECT seq, caller, conversations FROM forget_requests WHERE caller_key {plain}"
            )
            for seq, caller, conversations in await rows.fetchall():
                plain_caller = self.cipher.decrypt(bytes(caller))
                await connection.execute(
                    "UPDATE forget_requests SET caller_key = %s, caller = %s, conversations = %s"
                    " WHERE seq = %s",
                    (
                        self._key(plain_caller.decode()),
                        seal(plain_caller),
                        seal(self.cipher.decrypt(bytes(conversations))),
                        seq,
                    ),
                )
            await connection.execute(
                "INSERT INTO store_keys (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (ALL_PROTECTED, b"1"),
            )
            # Every caller's key changed: copies other processes keep are of no one now.
            await connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, EVERYONE))

    async def _marked(self, connection: AsyncConnection) -> bool:
        found = await connection.execute(
            "SELECT 1 FROM store_keys WHERE name = %s", (ALL_PROTECTED,)
        )
        return await found.fetchone() is not None

    # Caller keys and sealed text ----------------------------------------------------------
    def _key(self, user_id: str) -> str:
        """The `user_id` column's value: the caller id itself, or with encryption on its
        keyed hash (the number is then kept only encrypted, in `calls.caller`)."""
        return keyed_hash(self._hash_key, user_id) if self.cipher.enabled else _text(user_id)

    async def _caller_key(self, user_id: str) -> str:
        """`_key` before a transaction is open (the hash key is read when the pool opens)."""
        await self._ready()
        return self._key(user_id)

    def _word_key(self, word: str) -> str:
        """As `SQLiteDatabase.word_key`: a word the caller directory is searched by."""
        if not self.cipher.enabled:
            return _text(word)
        return keyed_word(self._hash_key, word)

    def _seal(self, text: str) -> bytes:
        return self.cipher.encrypt(text.encode())

    def _open(self, value: bytes | memoryview) -> str:
        return self.cipher.decrypt(bytes(value)).decode()

    # Calls -------------------------------------------------------------------------------
    async def add_call(
        self,
        user_id: str,
        call: CallRecord,
        payload: dict[str, Any],
        memories: list[Memory],
        read: HistoryRead | None = None,
    ) -> CallReceipt:
        memory_id = f"mem_{uuid.uuid4().hex}"
        event_type, conversation_id = _text(call.event_type), _text(call.conversation_id)
        # `read` is not read here: in this transaction it cost more than the hook's own
        # read after it (bench/ingest.py, docs/scaling.md).
        key = await self._caller_key(user_id)
        async with self._caller_transaction(key, pipeline=True) as connection:
            # The primary key decides: a copy stored meanwhile by another replica makes
            # this insert do nothing (it waits for that transaction, then sees its row).
            # Refused: a forgotten conversation, or a call its caller made before they
            # were forgotten (kept on some replica's disk while the forget ran).
            inserted = await connection.execute(
                f"INSERT INTO calls ({CALL_COLUMNS})"
                " SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s WHERE NOT EXISTS"
                " (SELECT 1 FROM forgotten_conversations WHERE conversation_key = %s)"
                " AND NOT EXISTS (SELECT 1 FROM forget_requests WHERE caller_key = %s"
                " AND requested_at > %s)"
                " ON CONFLICT (event_type, conversation_id) DO NOTHING RETURNING memory_id",
                (
                    event_type,
                    conversation_id,
                    key,
                    _text(call.agent_id) if call.agent_id is not None else None,
                    call.event_timestamp,
                    call.started_at,
                    memory_id,
                    self.cipher.encrypt(encode(payload)),
                    time.time(),
                    self.cipher.encrypt(user_id.encode()) if self.cipher.enabled else None,
                    self._conversation_key(call.conversation_id),
                    key,
                    call.event_timestamp if call.event_timestamp is not None else call.started_at,
                ),
            )
            # Sent with the insert, not after its answer (one round trip, not four): each
            # applies only if the row holding this attempt's own `memory_id` is there.
            ours = CallOwner(event_type, conversation_id, memory_id)
            await self._put_digest(connection, user_id, event_type, digest_record(call), ours)
            await self._insert_memories(connection, memories, ours)
            if await inserted.fetchone() is None:
                existing = await (
                    await connection.execute(
                        "SELECT memory_id FROM calls WHERE event_type = %s AND conversation_id = %s",
                        (event_type, conversation_id),
                    )
                ).fetchone()
                if existing is not None:
                    return CallReceipt(memory_id=existing[0], created=False)
                return CallReceipt(memory_id="", created=False, forgotten=True)
        return CallReceipt(memory_id=memory_id, created=True)

    async def _insert_memories(
        self, connection: AsyncConnection, memories: list[Memory], owner: CallOwner | None = None
    ) -> None:
        """One statement for the call's memories (a dozen rows each), not one per row;
        ordered, so their sequence numbers follow the call. With `owner`, only if that
        attempt stored the call. The arrays go in binary (`%b`): in text, each element
        is escaped, bytes in hex (a tenth of a delivery's CPU)."""
        if not memories:
            return
        columns = [list(column) for column in zip(*map(self._memory_row, memories), strict=True)]
        condition, parameters = owner.condition() if owner else ("", [])
        await connection.execute(
            "INSERT INTO memories (id, user_id, kind, content, metadata, created_at)"
            " SELECT id, user_id, kind, content, metadata, created_at FROM unnest("
            "%b::text[], %b::text[], %b::text[], %b::bytea[], %b::bytea[], %b::float8[])"
            " WITH ORDINALITY AS row (id, user_id, kind, content, metadata, created_at, n)"
            f" {condition} ORDER BY n ON CONFLICT (id) DO NOTHING",
            [*columns, *parameters],
        )

    async def get_call(
        self, conversation_id: str, event_type: str = TRANSCRIPTION
    ) -> StoredCall | None:
        async with self._transaction() as connection:
            found = await connection.execute(
                f"SELECT {CALL_COLUMNS} FROM calls WHERE event_type = %s AND conversation_id = %s",
                (_text(event_type), _text(conversation_id)),
            )
            row = await found.fetchone()
        return self._call(row) if row else None

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
            ("user_id", None if user_id is None else await self._caller_key(user_id), "="),
            ("agent_id", None if agent_id is None else _text(agent_id), "="),
            ("started_at", since, ">="),
        ):
            if value is not None:
                clauses.append(f"{column} {operator} %s")
                parameters.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT {CALL_COLUMNS} FROM calls {where}"
            " ORDER BY started_at DESC NULLS LAST, stored_at DESC"
        )
        if limit is not None:
            sql += " LIMIT %s"
            parameters.append(limit)
        async with self._transaction() as connection:
            rows = await (await connection.execute(sql, parameters)).fetchall()
        return [self._call(row) for row in rows]

    def _call(self, row: Sequence[Any]) -> StoredCall:
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
            user_id=self._open(caller) if caller is not None else key,
            agent_id=agent_id,
            event_type=event_type,
            event_timestamp=event_ts,
            started_at=started,
            memory_id=memory_id,
            payload=decode(self.cipher.decrypt(bytes(blob))),
        )

    async def list_agent_ids(self) -> list[str]:
        async with self._transaction() as connection:
            # One index seek per agent (a loose index scan), where DISTINCT would walk
            # every call's entry: a handful of agents among 100,000 calls.
            rows = await (
                await connection.execute(
                    "WITH RECURSIVE agents(id) AS ("
                    " SELECT min(agent_id) FROM calls"
                    " UNION ALL SELECT (SELECT min(agent_id) FROM calls"
                    " WHERE agent_id > agents.id) FROM agents WHERE agents.id IS NOT NULL)"
                    " SELECT id FROM agents WHERE id IS NOT NULL"
                )
            ).fetchall()
        return [str(row[0]) for row in rows]

    # Call digests ------------------------------------------------------------------------
    async def call_history(
        self, user_id: str, *, recent: int, marks: Collection[str] = ()
    ) -> CallHistory:
        key = await self._caller_key(user_id)
        history = await self._call_history(key, user_id, recent, marks, digests_checked=False)
        if history is None:  # digests missing or out of date: made, then read again
            await self._complete_digests(user_id)
            history = await self._call_history(key, user_id, recent, marks, digests_checked=True)
        assert history is not None
        return history

    async def _call_history(
        self,
        key: str,
        user_id: str,
        recent: int,
        marks: Collection[str],
        *,
        digests_checked: bool,
    ) -> CallHistory | None:
        """The history in one statement (one snapshot, one round trip: it is read twice
        per delivery); None when the caller's digests do not match their calls
        (`_complete_digests`' check, made in the same statement)."""
        query, parameters = self._history_query(key, recent, marks)
        return self._history(await self._fetch_all(query, parameters), digests_checked)

    def _history_query(
        self, key: str, recent: int, marks: Collection[str]
    ) -> tuple[str, list[Any]]:
        """Rows: first the counts, then the newest digests, then per mark the newest
        digest carrying it (found among the recent ones, or older)."""
        digest = "conversation_id, agent_id, started_at, marks, facts"
        branches = [
            "SELECT '' AS slot, 0::bigint AS n,"
            " count(*) FILTER (WHERE event_type = %s) AS count,"
            " min(started_at) FILTER (WHERE event_type = %s) AS first,"
            " max(started_at) FILTER (WHERE event_type = %s) AS last,"
            " count(*) FILTER (WHERE version = %s) AS current,"
            " (SELECT count(*) FROM calls WHERE user_id = %s) AS calls,"
            " NULL::text AS conversation_id, NULL::text AS agent_id,"
            " NULL::bigint AS started_at, NULL::text AS marks, NULL::bytea AS facts"
            " FROM call_digests WHERE user_id = %s"
        ]
        parameters: list[Any] = [TRANSCRIPTION, TRANSCRIPTION, TRANSCRIPTION, DIGEST_VERSION]
        parameters += [key, key]
        empty = "NULL, NULL, NULL, NULL, NULL"
        for slot, mark, limit in [("recent", None, recent), *((m, m, 1) for m in marks)]:
            branch = (
                f"SELECT %s, row_number() OVER ({NEWEST_FIRST}), {empty}, {digest}"
                " FROM call_digests WHERE user_id = %s AND event_type = %s"
            )
            parameters += [f"mark {slot}" if mark else slot, key, TRANSCRIPTION]
            if mark is not None:
                branch += " AND strpos(' ' || marks || ' ', %s) > 0"
                parameters.append(f" {mark} ")
            branches.append(f"({branch} {NEWEST_FIRST} LIMIT %s)")
            parameters.append(limit)
        return " UNION ALL ".join(branches), parameters

    def _history(
        self, found: Sequence[tuple[Any, ...]], digests_checked: bool
    ) -> CallHistory | None:
        """The rows of `_history_query` as a history (None: digests to complete first)."""
        counts = next(row for row in found if row[0] == "")
        _, _, count, first, last, current, calls = counts[:7]
        if not digests_checked and current != calls:
            return None
        # Branches of a UNION ALL come in order in practice, not by promise: sorted here.
        rows = sorted((row for row in found if row[0] != ""), key=lambda row: (row[0], row[1]))
        newest = [self._digest(row[7:]) for row in rows if row[0] == "recent"]
        by_id = {digest.conversation_id: digest for digest in newest}
        newest_marked = {
            row[0].removeprefix("mark "): by_id.get(row[7]) or self._digest(row[7:])
            for row in rows
            if row[0].startswith("mark ")
        }
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
        await self._complete_digests(user_id)
        async with self._transaction() as connection:
            return await self._digests(connection, user_id, limit=limit, offset=offset, words=words)

    async def _digests(
        self,
        connection: AsyncConnection,
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
        sql += " FROM call_digests WHERE user_id = %s AND event_type = %s"
        parameters: list[Any] = [self._key(user_id), TRANSCRIPTION]
        if mark is not None:
            sql += " AND strpos(' ' || marks || ' ', %s) > 0"
            parameters.append(f" {mark} ")
        sql += f" {NEWEST_FIRST} LIMIT %s OFFSET %s"
        parameters += [limit, max(0, offset)]
        rows = await (await connection.execute(sql, parameters)).fetchall()
        return [self._digest(row) for row in rows]

    def _digest(self, row: Sequence[Any]) -> CallDigest:
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

    async def _put_digest(
        self,
        connection: AsyncConnection,
        user_id: str,
        event_type: str,
        digest: CallDigest,
        owner: CallOwner | None = None,
    ) -> None:
        """Keep `digest` beside its call, in the writer's transaction; encrypted like the
        payload (names, summaries and words are personal data). With `owner`, only if
        that attempt stored the call."""
        condition, parameters = owner.condition() if owner else ("", [])
        await connection.execute(
            "INSERT INTO call_digests (event_type, conversation_id, user_id, agent_id,"
            " started_at, version, marks, facts, words)"
            f" SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s {condition}"
            " ON CONFLICT (event_type, conversation_id) DO UPDATE SET"
            " user_id = excluded.user_id, agent_id = excluded.agent_id,"
            " started_at = excluded.started_at, version = excluded.version,"
            " marks = excluded.marks, facts = excluded.facts, words = excluded.words",
            (
                event_type,
                _text(digest.conversation_id),
                self._key(user_id),
                _text(digest.agent_id) if digest.agent_id is not None else None,
                digest.started_at,
                DIGEST_VERSION,
                " ".join(sorted(digest.marks)),
                self.cipher.encrypt(encode(digest.facts)),
                self.cipher.encrypt(" ".join(digest.words or ()).encode()),
                *parameters,
            ),
        )

    async def _complete_digests(self, user_id: str) -> None:
        """Make the caller's digests match their calls (as `CallTables._complete_digests`):
        two counts over indexes, and only after a `DIGEST_VERSION` change some work."""
        key = await self._caller_key(user_id)
        async with self._transaction() as connection:
            found = await connection.execute(
                "SELECT (SELECT count(*) FROM calls WHERE user_id = %s),"
                " (SELECT count(*) FROM call_digests WHERE user_id = %s AND version = %s)",
                (key, key, DIGEST_VERSION),
            )
            row = await found.fetchone()
            assert row is not None
            if row[0] == row[1]:
                return
        # Under the caller's lock: a caller forgotten meanwhile gets no digests back.
        # Digests are neither memories nor the profile: no copy to drop.
        async with self._caller_transaction(key, changes=False) as connection:
            rows = await connection.execute(
                "SELECT c.event_type, c.payload FROM calls c LEFT JOIN call_digests d"
                " ON d.event_type = c.event_type AND d.conversation_id = c.conversation_id"
                " AND d.version = %s WHERE c.user_id = %s AND d.conversation_id IS NULL",
                (DIGEST_VERSION, key),
            )
            for event_type, payload in await rows.fetchall():
                digest = digest_call(decode(self.cipher.decrypt(bytes(payload))))
                await self._put_digest(connection, user_id, event_type, digest)
            await connection.execute(
                "DELETE FROM call_digests WHERE user_id = %s AND NOT EXISTS (SELECT 1 FROM calls"
                " WHERE calls.event_type = call_digests.event_type"
                " AND calls.conversation_id = call_digests.conversation_id)",
                (key,),
            )

    async def calls_per_day(self, user_id: str | None = None, *, since: int) -> dict[int, int]:
        sql = (
            "SELECT started_at / 86400, count(*) FROM call_digests"
            " WHERE event_type = %s AND started_at >= %s"
        )
        parameters: list[Any] = [TRANSCRIPTION, since]
        if user_id is not None:
            await self._ready()
            sql += " AND user_id = %s"
            parameters.append(self._key(user_id))
        sql += " GROUP BY 1"
        async with self._transaction() as connection:
            rows = await (await connection.execute(sql, parameters)).fetchall()
        return {int(day): int(count) for day, count in rows}

    # Memories ----------------------------------------------------------------------------
    async def add_memory(
        self, user_id: str, content: str, metadata: dict[str, Any] | None = None
    ) -> Memory:
        memory = Memory.new(user_id, content, metadata)
        async with self._caller_transaction(await self._caller_key(user_id)) as connection:
            await self._insert_memories(connection, [memory])
        return memory

    async def list_memories(self, user_id: str, limit: int | None = None) -> list[Memory]:
        async with self._transaction() as connection:
            return await self._memories(connection, user_id, limit=limit)

    async def _memories(
        self,
        connection: AsyncConnection,
        user_id: str,
        *,
        limit: int | None = None,
        after_seq: int = 0,
    ) -> list[Memory]:
        rows = await (
            await connection.execute(
                "SELECT id, content, metadata, created_at FROM memories"
                " WHERE user_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (self._key(user_id), after_seq, limit),
            )
        ).fetchall()
        return [self._memory(user_id, row) for row in rows]

    def _memory(self, user_id: str, row: Sequence[Any]) -> Memory:
        memory_id, content, metadata, created_at = row
        return Memory(
            id=memory_id,
            user_id=user_id,
            content=self._open(content),
            metadata=json.loads(self._open(metadata)),
            created_at=created_at,
        )

    def _memory_row(self, memory: Memory) -> tuple[Any, ...]:
        kind = memory.metadata.get("kind") or memory.metadata.get("type")
        return (
            _text(memory.id),
            self._key(memory.user_id),
            _text(str(kind)) if kind is not None else None,
            self._seal(memory.content),
            self._seal(json.dumps(memory.metadata, separators=(",", ":"))),
            memory.created_at,
        )

    # Search indexes (the store <-> search contract) ---------------------------------------
    async def index_state(self, user_id: str) -> IndexState:
        key = await self._caller_key(user_id)
        token = self.copies.token()  # before the read: a change meanwhile is not kept
        row = await self._index_reads.get(key)
        assert row is not None
        count, last, saved_count, saved_last, data = row
        saved = None
        if data is not None:
            saved = SavedIndex(
                version=MemoryVersion(count=saved_count, last_seq=saved_last),
                data=self.cipher.decrypt(bytes(data)),
            )
        version = MemoryVersion(count=count, last_seq=last)
        self.copies.keep_version(key, token, version)
        return IndexState(version=version, saved=saved)

    async def _read_index_states(self, keys: list[str]) -> dict[str, tuple[Any, ...]]:
        """Each caller's memory version and saved index, in one statement (one snapshot
        for both). In a task of its own (`BatchedReads`): no caller's deadline cancels it."""
        rows = await self._read_rows(
            "SELECT k.user_id, coalesce(v.memories, 0), coalesce(v.last_seq, 0),"
            " i.memories, i.last_seq, i.data FROM unnest(%b::text[]) AS k (user_id)"
            " LEFT JOIN memory_versions AS v ON v.user_id = k.user_id"
            " LEFT JOIN caller_indexes AS i ON i.user_id = k.user_id",
            (keys,),
            binary=True,
        )
        return {row[0]: row[1:] for row in rows}

    def index_version_now(self, user_id: str) -> MemoryVersion | None:
        # The version copied here, while no process has said the caller changed since.
        return self.copies.version(self._key(user_id)) if self._hash_key else None

    async def memory_version(self, user_id: str) -> MemoryVersion:
        # What a search of a held index needs: without the saved index's bytes.
        key = await self._caller_key(user_id)
        if (copy := self.copies.version(key)) is not None:
            return copy
        token = self.copies.token()
        row = await self._fetch_one(VERSION, (key,))
        version = MemoryVersion(*row) if row else NO_MEMORIES
        self.copies.keep_version(key, token, version)
        return version

    async def memories_after(
        self, user_id: str, after_seq: int
    ) -> tuple[MemoryVersion, list[Memory]]:
        key = await self._caller_key(user_id)
        token = self.copies.token()
        async with self._transaction(snapshot=True) as connection:
            row = await (await connection.execute(VERSION, (key,))).fetchone()
            memories = await self._memories(connection, user_id, after_seq=after_seq)
        version = MemoryVersion(*row) if row else NO_MEMORIES
        self.copies.keep_version(key, token, version)
        return version, memories

    async def save_index(self, user_id: str, index: SavedIndex) -> bool:
        if index.version.count == 0:
            return False  # nothing to index (a caller forgotten meanwhile)
        key = await self._caller_key(user_id)
        data = self.cipher.encrypt(index.data)
        async with self._transaction() as connection:
            # Compare and set in one statement: kept only if no memory came or went since
            # the index was built. The version row is locked against its deletion: a
            # forget committing meanwhile is waited for, then seen (a snapshot's count
            # alone let the forgotten caller's index be written back).
            saved = await connection.execute(
                "INSERT INTO caller_indexes (user_id, memories, last_seq, data)"
                " SELECT %(key)s, %(count)s, %(last)s, %(data)s"
                " WHERE EXISTS (SELECT 1 FROM memory_versions WHERE user_id = %(key)s"
                " AND memories = %(count)s AND last_seq = %(last)s FOR KEY SHARE)"
                " ON CONFLICT (user_id) DO UPDATE SET memories = excluded.memories,"
                " last_seq = excluded.last_seq, data = excluded.data RETURNING 1",
                {
                    "key": key,
                    "count": index.version.count,
                    "last": index.version.last_seq,
                    "data": data,
                },
            )
            return await saved.fetchone() is not None

    # Counters shared by replicas -----------------------------------------------------------
    async def shared_increment(self, name: str, ttl: float) -> int:
        now = time.time()
        async with self._transaction() as connection:
            # One statement: concurrent increments queue on the row, and each returns its
            # own value, so exactly one of them sees any given count.
            found = await connection.execute(
                "INSERT INTO shared_counters AS c (name, count, expires_at)"
                " VALUES (%(name)s, 1, %(expires)s)"
                " ON CONFLICT (name) DO UPDATE SET"
                " count = CASE WHEN c.expires_at <= %(now)s THEN 1 ELSE c.count + 1 END,"
                " expires_at = CASE WHEN c.expires_at <= %(now)s THEN excluded.expires_at"
                " ELSE c.expires_at END RETURNING count",
                {"name": _text(name), "expires": now + max(ttl, 1.0), "now": now},
            )
            row = await found.fetchone()
            assert row is not None
            if row[0] == 1:
                # A new counter (a new window): the few expired ones go with it.
                await connection.execute(
                    "DELETE FROM shared_counters WHERE expires_at <= %s", (now,)
                )
        return int(row[0])

    async def delete_user(self, user_id: str) -> int:
        key = await self._caller_key(user_id)
        async with self._caller_transaction(key) as connection:
            deleted = 0
            for table in ("memories", "calls", "caller_profiles"):
                removed = await connection.execute(
                    f"DELETE FROM {table} WHERE user_id = %s", (key,)
                )
                deleted += removed.rowcount
            # Derived from what went (words, digests, the console's line): not counted.
            for table in ("caller_directory", "caller_indexes", "call_digests"):
                await connection.execute(f"DELETE FROM {table} WHERE user_id = %s", (key,))
        return deleted

    # Forgotten conversations -------------------------------------------------------------
    def _conversation_key(self, conversation_id: str) -> str:
        return keyed_hash(self._hash_key, f"conversation:{conversation_id}")

    async def forget_conversations(self, conversation_ids: Collection[str]) -> None:
        await self._ready()
        rows = [(self._conversation_key(cid), time.time()) for cid in conversation_ids]
        if not rows:
            return
        async with self._transaction() as connection, connection.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO forgotten_conversations (conversation_key, forgotten_at)"
                " VALUES (%s, %s) ON CONFLICT DO NOTHING",
                rows,
            )

    async def share_forget(
        self, user_id: str, conversation_ids: Collection[str], *, keep_for: float
    ) -> None:
        await self._ready()
        now = time.time()
        async with self._transaction() as connection:
            # One forget at a time (they are rare): numbers then commit in order, so a
            # replica reading after the last number it applied never skips one.
            await connection.execute("SELECT pg_advisory_xact_lock(%s, 0)", (FORGET_LOCK,))
            await connection.execute(
                "INSERT INTO forget_requests (caller_key, caller, conversations, requested_at)"
                " VALUES (%s, %s, %s, %s)",
                (
                    self._key(user_id),
                    self.cipher.encrypt(user_id.encode()),
                    self.cipher.encrypt(encode(sorted(conversation_ids))),
                    now,
                ),
            )
            await connection.execute(
                "DELETE FROM forget_requests WHERE requested_at < %s", (now - keep_for,)
            )

    async def forgets_after(self, seq: int) -> list[ForgetRequest]:
        async with self._transaction() as connection:
            rows = await connection.execute(
                # A number past every one kept is another database's (moved, recreated):
                # then everything here is new to the asker.
                "SELECT seq, caller, conversations, requested_at FROM forget_requests"
                " WHERE seq > CASE WHEN %(seq)s > (SELECT coalesce(max(seq), 0)"
                " FROM forget_requests) THEN 0 ELSE %(seq)s END ORDER BY seq",
                {"seq": seq},
            )
            found = await rows.fetchall()
        requests = []
        for number, caller, conversations, requested_at in found:
            try:
                user_id = self._open(caller)
                conversation_ids = tuple(decode(self.cipher.decrypt(bytes(conversations))))
            except Exception as error:
                # Sealed with a key no longer given: it must not hold up every later one.
                logger.error("forget request %d not readable (%s): skipped", number, error)
                continue
            requests.append(ForgetRequest(number, user_id, conversation_ids, requested_at))
        return requests

    async def is_forgotten(self, conversation_id: str) -> bool:
        await self._ready()
        found = await self._fetch_one(
            "SELECT 1 FROM forgotten_conversations WHERE conversation_key = %s",
            (self._conversation_key(conversation_id),),
        )
        return found is not None

    # Profiles ----------------------------------------------------------------------------
    async def get_agent_profile(self, agent_id: str) -> dict[str, Any] | None:
        row = await self._fetch_one(
            "SELECT profile, fetched_at FROM agent_profiles WHERE agent_id = %s",
            (_text(agent_id),),
        )
        if row is None:
            return None
        profile: dict[str, Any] = decode(self.cipher.decrypt(bytes(row[0])))
        profile["_fetched_at"] = row[1]
        return profile

    async def put_agent_profile(
        self, agent_id: str, profile: dict[str, Any], fetched_at: float
    ) -> None:
        # Sealed like the rest: an agent's configuration may hold its tools' credentials.
        blob = self.cipher.encrypt(encode({k: v for k, v in profile.items() if k != "_fetched_at"}))
        async with self._transaction() as connection:
            await connection.execute(
                "INSERT INTO agent_profiles (agent_id, profile, fetched_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (agent_id) DO UPDATE SET profile = excluded.profile,"
                " fetched_at = excluded.fetched_at",
                (_text(agent_id), blob, fetched_at),
            )

    async def get_caller_profile(self, user_id: str) -> dict[str, Any] | None:
        key = await self._caller_key(user_id)
        copy = self.copies.profile(key)
        if not isinstance(copy, Absent):
            return decode(copy) if copy is not None else None
        token = self.copies.token()  # before the read: a change meanwhile is not kept
        sealed = await self._profile_reads.get(key)
        # Opened here, not in the shared read: a row that fails to open fails its caller.
        plain = self.cipher.decrypt(sealed) if sealed is not None else None
        self.copies.keep_profile(key, token, plain)
        return decode(plain) if plain is not None else None

    async def _read_profiles(self, keys: list[str]) -> dict[str, bytes]:
        """The stored (sealed) profiles of these callers (keys), in one statement. In a
        task of its own (`BatchedReads`): no caller's deadline cancels it."""
        rows = await self._read_rows(
            "SELECT user_id, profile FROM caller_profiles WHERE user_id = ANY(%b::text[])",
            (keys,),
            binary=True,
        )
        return {key: bytes(blob) for key, blob in rows}

    async def _warm_copies(self) -> None:
        """Fill the copies with the profiles of the callers who called last, then note
        every caller who has a profile (`ProfiledCallers`). A failure of one does not stop
        the other: reads make up for either."""
        for warm in (self._copy_newest_callers, self._note_profiled_callers):
            try:
                await warm()
            except Exception as error:
                logger.warning(
                    "caller copies: %s failed (%s); read from the store meanwhile",
                    warm.__name__,
                    type(error).__name__,
                )

    async def _copy_newest_callers(self) -> None:
        token = self.copies.token()
        began, read = time.monotonic(), 0
        async with (
            self._transaction() as connection,
            # Read WARM_PAGE rows at a time: the copies' worth never held twice.
            connection.cursor(name="elaoms_newest_callers") as cursor,
        ):
            await cursor.execute(
                "SELECT d.user_id, p.profile FROM caller_directory d"
                " JOIN caller_profiles p ON p.user_id = d.user_id"
                " ORDER BY d.last_started_at DESC NULLS LAST, d.user_id DESC LIMIT %s",
                (self.copies.size,),
            )
            full = False
            while not full and (rows := await cursor.fetchmany(WARM_PAGE)):
                for key, blob in rows:
                    profile = self.cipher.decrypt(bytes(blob))
                    if not self.copies.keep_older_profile(key, token, profile):
                        full = True  # callers read meanwhile filled the rest
                        break
                    read += 1
        # Read, not all copied: a caller a request copied meanwhile keeps that copy.
        logger.info(
            "caller copies: filled from the %d callers who called last in %.1f s",
            read,
            time.monotonic() - began,
        )

    async def _note_profiled_callers(self) -> None:
        token = self.copies.token()
        found = ProfiledRead()
        async with (
            self._transaction() as connection,
            # On the server, read in batches: a million callers never held at once.
            connection.cursor(name="elaoms_profiled_callers") as cursor,
        ):
            await cursor.execute("SELECT user_id FROM caller_profiles")
            while rows := await cursor.fetchmany(PROFILED_BATCH):
                for (key,) in rows:
                    found.add(key)
        await self.copies.keep_profiled(token, found)

    async def put_caller_profile(self, user_id: str, profile: dict[str, Any]) -> None:
        key = await self._caller_key(user_id)
        async with self._caller_transaction(key, pipeline=True) as connection:
            await self._put_caller_profile(connection, key, user_id, profile)

    async def keep_caller_profile(
        self, user_id: str, profile: dict[str, Any], prepared_from: str, read: HistoryRead
    ) -> ProfileKept:
        # One round trip, not three: the write, the forget check and the history go
        # together (read in the writer's transaction: they see what committed before them,
        # as reads after the commit would, and the caller's writers wait their turn).
        key = await self._caller_key(user_id)
        query, parameters = self._history_query(key, read.recent, read.marks)
        async with self._caller_transaction(key, pipeline=True) as connection:
            await self._put_caller_profile(connection, key, user_id, profile)
            forgotten = await connection.execute(
                "SELECT 1 FROM forgotten_conversations WHERE conversation_key = %s",
                (self._conversation_key(prepared_from),),
            )
            found = await connection.execute(query, parameters)
        # Fetched once the pipeline has ended with the commit: their rows came with it.
        call_forgotten = await forgotten.fetchone() is not None
        history = self._history(await found.fetchall(), digests_checked=False)
        if history is None:  # digests to complete first (calls stored by an older version)
            history = await self.call_history(user_id, recent=read.recent, marks=read.marks)
        return ProfileKept(call_forgotten, history)

    async def _put_caller_profile(
        self, connection: AsyncConnection, key: str, user_id: str, profile: dict[str, Any]
    ) -> None:
        await connection.execute(
            "INSERT INTO caller_profiles (user_id, profile, updated_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (user_id) DO UPDATE SET profile = excluded.profile,"
            " updated_at = excluded.updated_at",
            (key, self.cipher.encrypt(encode(profile)), time.time()),
        )
        await self._put_directory_entry(connection, user_id, profile)

    # Callers -----------------------------------------------------------------------------
    async def _put_directory_entry(
        self, connection: AsyncConnection, user_id: str, profile: dict[str, Any]
    ) -> None:
        last = profile.get("last_call_at")
        await connection.execute(
            "INSERT INTO caller_directory"
            " (user_id, name_key, call_count, last_started_at, caller, number_key)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (user_id) DO UPDATE"
            " SET name_key = excluded.name_key, call_count = excluded.call_count,"
            " last_started_at = excluded.last_started_at",
            (
                self._key(user_id),
                name_key(profile.get("name"), self._word_key),
                int(profile.get("call_count") or 0),
                int(last) if isinstance(last, int | float) else None,
                self._seal(user_id),
                number_key(user_id, self._word_key, encrypted=self.cipher.enabled),
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
        await self._ready()
        matches = directory_matches(number, name, self._word_key, encrypted=self.cipher.enabled)
        clauses = [f"strpos({match.column}, %s) > 0" for match in matches]
        parameters: list[Any] = [_text(match.term) for match in matches]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        page = [max(0, limit), max(0, offset)]
        async with self._transaction(snapshot=True) as connection:
            if where:
                # One pass over the table for the matches and their count; the few
                # matches are then sorted.
                found = await (
                    await connection.execute(
                        "SELECT user_id, call_count, last_started_at, count(*) OVER (), caller"
                        f" FROM caller_directory {where}"
                        # `+ 0`: not the index's order, so the planner scans the table once
                        # and sorts the few matches, instead of walking the index in order
                        # (a random heap read per caller: 56 ms at 100,000 callers, not 20).
                        " ORDER BY last_started_at + 0 DESC NULLS LAST, user_id DESC"
                        " LIMIT %s OFFSET %s",
                        [*parameters, *page],
                    )
                ).fetchall()
                if found:
                    total = found[0][3]
                elif offset:  # past the last page: count the matches
                    total = await self._count_callers(connection, where, parameters)
                else:
                    total = 0
            else:
                # The page from the index, then only its callers' rows.
                found = await (
                    await connection.execute(
                        "SELECT user_id, call_count, last_started_at, NULL, caller"
                        " FROM caller_directory"
                        " ORDER BY last_started_at DESC NULLS LAST, user_id DESC"
                        " LIMIT %s OFFSET %s",
                        page,
                    )
                ).fetchall()
                total = await self._count_callers(connection, "", [])
            profiles: dict[str, Any] = {}
            if found:
                rows = await connection.execute(
                    "SELECT user_id, profile FROM caller_profiles WHERE user_id = ANY(%s)",
                    ([row[0] for row in found],),
                )
                profiles = {key: blob for key, blob in await rows.fetchall()}
        callers = []
        for key, call_count, last_started_at, _, caller in found:
            blob = profiles.get(key)
            profile = decode(self.cipher.decrypt(bytes(blob))) if blob else {}
            callers.append(
                CallerSummary(
                    user_id=self._open(caller),
                    name=profile.get("name") or None,
                    call_count=call_count,
                    last_started_at=last_started_at,
                )
            )
        return CallerPage(callers=callers, total=int(total))

    async def _count_callers(
        self, connection: AsyncConnection, where: str, parameters: list[Any]
    ) -> int:
        found = await connection.execute(
            f"SELECT count(*) FROM caller_directory {where}", parameters
        )
        row = await found.fetchone()
        return int(row[0]) if row else 0

    # Life cycle --------------------------------------------------------------------------
    async def check(self) -> None:
        async with self._transaction() as connection:
            await connection.execute("SELECT 1 FROM calls LIMIT 1")

    async def close(self) -> None:
        await self.copies.close()
        await self._profile_reads.close()
        await self._index_reads.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


@asynccontextmanager
async def _pipelined(connection: AsyncConnection, pipeline: bool) -> AsyncIterator[None]:
    if not pipeline:
        yield
        return
    async with connection.pipeline():
        yield


@asynccontextmanager
async def _snapshot(connection: AsyncConnection) -> AsyncIterator[None]:
    """A REPEATABLE READ, READ ONLY transaction, said in its BEGIN (psycopg adds it from
    the connection's settings): no round trip of its own. The settings are the pool's
    defaults again after it; a connection whose settings cannot be restored is closed,
    so that the pool never hands it out read-only."""
    from psycopg import IsolationLevel

    try:
        await connection.set_isolation_level(IsolationLevel.REPEATABLE_READ)
        await connection.set_read_only(True)
        async with connection.transaction():
            yield
    finally:
        try:
            await connection.set_isolation_level(None)
            await connection.set_read_only(None)
        except Exception:
            await connection.close()


def _retrieve(read: asyncio.Future[Any]) -> None:
    """A shielded read whose caller stopped waiting: its error is retrieved here (the
    caller got its own), not reported as never retrieved."""
    if not read.cancelled():
        read.exception()


def _transient(error: BaseException) -> bool:
    """A failure of the connection or the server, not of what was asked: worth retrying."""
    import psycopg
    from psycopg_pool import PoolTimeout

    return isinstance(
        error, psycopg.OperationalError | psycopg.InterfaceError | PoolTimeout | OSError
    )


def _no_connection(error: BaseException | None) -> bool:
    from psycopg_pool import PoolTimeout

    return isinstance(error, PoolTimeout)


def storage_error(error: BaseException, database_url: str) -> StoreUnavailableError:
    """The error as the service reports it, the URL's password masked (libpq's messages
    name the host, never the password; the URL passed in may hold one)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    url = redacted(database_url)
    if database_url and database_url != url:
        message = message.replace(database_url, url)
    return StoreUnavailableError(f"postgres: {message}")
