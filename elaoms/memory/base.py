"""The memory store interface every backend implements.

A backend is one new file with a subclass of `MemoryStore`, plus a line in
`elaoms.memory.create_store`; `tests/conformance` says what it must do.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elaoms.memory.records import CallRecord


class StoreUnavailableError(RuntimeError):
    """The backend cannot be reached or refused the operation; the caller may retry."""


@dataclass(frozen=True, slots=True)
class Memory:
    """One searchable unit about a user: a transcript turn, a call summary, a collected fact."""

    id: str
    user_id: str
    content: str
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    @classmethod
    def new(cls, user_id: str, content: str, metadata: dict[str, Any] | None = None) -> Memory:
        """A free-standing memory (`MemoryStore.add_memory`), made now with a new id."""
        return cls(
            id=f"mem_{uuid.uuid4().hex}",
            user_id=user_id,
            content=content,
            metadata=dict(metadata or {}),
            created_at=time.time(),
        )


@dataclass(frozen=True, slots=True)
class StoredCall:
    """A post-call webhook body kept whole, as received."""

    conversation_id: str
    user_id: str
    agent_id: str | None
    event_type: str
    event_timestamp: int | None
    started_at: int | None
    memory_id: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CallDigest:
    """What a caller's profile needs from one finished call (`elaoms.memory.digest`),
    computed when the call is stored and kept beside it, as private as its payload."""

    conversation_id: str
    agent_id: str | None
    started_at: int | None
    facts: dict[str, Any]
    # Labels a store can filter on without reading `facts` (which name sources the call has).
    marks: frozenset[str] = frozenset()
    # Every word of the call a greeting may repeat; read only when asked for (it is large).
    words: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class CallHistory:
    """A caller's finished calls as a profile reads them, from one consistent read."""

    count: int
    first_started_at: int | None
    last_started_at: int | None
    recent: list[CallDigest]  # the newest, newest first
    newest_marked: dict[str, CallDigest]  # per mark asked for: the newest call carrying it


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """What a `call_history` asks for: the `recent` newest calls, and for each of `marks`
    the newest call carrying it."""

    recent: int
    marks: Collection[str] = ()


@dataclass(frozen=True, slots=True)
class ProfileKept:
    """What `MemoryStore.keep_caller_profile` found once the profile was written."""

    call_forgotten: bool  # the call it was prepared from was forgotten meanwhile
    history: CallHistory  # the caller's calls, read after the write


@dataclass(frozen=True, slots=True)
class CallerSummary:
    """One line of the list of callers (the operator console): a caller with a prepared
    profile, as of that profile."""

    user_id: str
    name: str | None
    call_count: int
    last_started_at: int | None


@dataclass(frozen=True, slots=True)
class CallerPage:
    callers: list[CallerSummary]
    total: int  # every caller matching the filter, not only this page


@dataclass(frozen=True, slots=True)
class ForgetRequest:
    """A forget made on one machine, for the others that keep files of their own: the
    caller, their conversations, and when (files written after it are a new call's)."""

    seq: int
    user_id: str
    conversation_ids: tuple[str, ...]
    requested_at: float


@dataclass(frozen=True, slots=True)
class CallReceipt:
    memory_id: str
    created: bool  # False when the same call was already stored (a duplicate delivery)
    # True when the conversation was forgotten with its caller: nothing stored, no memory id.
    forgotten: bool = False
    # The caller's calls read after this one was stored, when `add_call` was asked to.
    history: CallHistory | None = None


@dataclass(frozen=True, slots=True)
class MemoryVersion:
    """Which of a caller's memories an index describes; changes with every insert or delete."""

    count: int  # how many memories the caller has (agent profiles are not memories)
    # The greatest sequence number among them, 0 when none; a store may keep the greatest
    # they have reached after the newest is deleted (the count still tells the change).
    last_seq: int


NO_MEMORIES = MemoryVersion(0, 0)


@dataclass(frozen=True, slots=True)
class SavedIndex:
    """A caller's search index as the search side saved it."""

    version: MemoryVersion
    data: bytes  # search's own format, opaque to the store; the store encrypts it at rest


@dataclass(frozen=True, slots=True)
class IndexState:
    """What a search needs to know before ranking, from one consistent read."""

    version: MemoryVersion  # the caller's memories now
    saved: SavedIndex | None  # the saved index, whatever version it describes


class MemoryStore(abc.ABC):
    """Async interface; implementations must be safe for concurrent use by one process and
    for several processes sharing the same backing store (gunicorn workers)."""

    name: str = "abstract"
    # True when `get_caller_profile` answers from a file on this machine without leaving
    # the event loop (tens of microseconds): a copy kept in process memory would save
    # nothing, and would cost memory and freshness.
    caller_profiles_on_loop: bool = False

    # Calls -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_call(
        self,
        user_id: str,
        call: CallRecord,
        payload: dict[str, Any],
        memories: list[Memory],
        read: HistoryRead | None = None,
    ) -> CallReceipt:
        """Keep `payload` whole and add its searchable `memories`, all or nothing.

        `call` is the payload's checked record, built once at ingestion: every column a
        store keeps comes from it (a raw value out of range, an integer beyond 64 bits or an
        object as agent id, would fail the insert on every retry); the payload is not read
        again here.

        Idempotent on (event type, conversation id): a second add of the same call stores
        nothing and returns the first receipt's memory id with `created=False`.

        `read`: what the post-call hook reads next of the caller's calls. A store that
        reads it for less with the call (SQLite: in the same trip to its thread) returns
        it as the receipt's `history`, read after the call was stored; the others, and a
        read that failed, leave it None and the hook reads for itself. A failed read
        must not fail `add_call`: the call is stored, and its retry would find it there
        and not report it new.
        """

    @abc.abstractmethod
    async def get_call(
        self, conversation_id: str, event_type: str = "post_call_transcription"
    ) -> StoredCall | None:
        """The stored call, or None."""

    @abc.abstractmethod
    async def list_calls(
        self,
        user_id: str | None = None,
        *,
        agent_id: str | None = None,
        since: int | None = None,
        limit: int | None = None,
    ) -> list[StoredCall]:
        """Calls newest first, filtered by caller, agent and start time (unix seconds)."""

    @abc.abstractmethod
    async def call_history(
        self, user_id: str, *, recent: int, marks: Collection[str] = ()
    ) -> CallHistory:
        """The digests of the caller's finished calls (`post_call_transcription`): how many,
        the first and last start, the `recent` newest, and for each of `marks` the newest
        call whose digest carries it. Newest means the latest start (calls without one
        come last), then the greatest conversation id, whatever order calls arrived in.

        Its cost must not grow with the caller's history beyond a cheap index scan: it runs
        after every stored call. Calls stored before digests existed (or with a digest of
        another `DIGEST_VERSION`) are digested from their payload on the way."""

    @abc.abstractmethod
    async def list_call_digests(
        self, user_id: str, *, limit: int | None = None, offset: int = 0, words: bool = False
    ) -> list[CallDigest]:
        """The digests of the caller's finished calls, newest first (as `call_history`);
        with `words`, each call's vocabulary too."""

    @abc.abstractmethod
    async def calls_per_day(self, user_id: str | None = None, *, since: int) -> dict[int, int]:
        """How many finished calls (`post_call_transcription`) started on each UTC day from
        `since` on, for one caller or (None) everyone: {unix day number: count}, days
        without calls left out. An index scan: it draws the console's charts."""

    @abc.abstractmethod
    async def list_agent_ids(self) -> list[str]:
        """Every agent id that stored calls name, sorted."""

    # Callers -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def list_callers(
        self,
        *,
        number: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> CallerPage:
        """Callers with a prepared profile, the latest last call first (then the greatest
        user id). `number`: digits the caller id contains (any part of it); `name`: the
        profile's name contains it, case-insensitively (with encryption at rest, whole
        words only: names are kept as keyed hashes there). Must stay fast at 100,000
        callers: it serves a web page."""

    # Memories ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_memory(
        self, user_id: str, content: str, metadata: dict[str, Any] | None = None
    ) -> Memory:
        """Add one free-standing memory for `user_id`."""

    @abc.abstractmethod
    async def list_memories(self, user_id: str, limit: int | None = None) -> list[Memory]:
        """All of one user's memories in the order they were added (oldest first)."""

    # Search indexes (`elaoms.search.indexes` ranks; a store keeps versions and bytes) ----
    @abc.abstractmethod
    async def index_state(self, user_id: str) -> IndexState:
        """The caller's memory version and saved index, from one consistent read (one
        query where the backend can)."""

    def index_version_now(self, user_id: str) -> MemoryVersion | None:
        """The caller's memory version read synchronously on the event loop, for stores
        that can answer in microseconds and never block (an embedded file); None means
        "ask `index_state`". A search of a caller whose index the process holds then
        ranks without leaving the loop."""
        return None

    async def memory_version(self, user_id: str) -> MemoryVersion:
        """The caller's memory version alone: all a search needs when this process holds
        the caller's index. A server-backed store answers it without sending the saved
        index (tens of kilobytes) on every search; by default from `index_state`."""
        return (await self.index_state(user_id)).version

    @abc.abstractmethod
    async def memories_after(
        self, user_id: str, after_seq: int
    ) -> tuple[MemoryVersion, list[Memory]]:
        """The caller's memories with a sequence number above `after_seq`, oldest first,
        and their version as of the same read (one snapshot)."""

    @abc.abstractmethod
    async def save_index(self, user_id: str, index: SavedIndex) -> bool:
        """Keep `index` unless the caller's memories changed since `index.version`
        (compare and set, in one transaction); True when kept. Encrypted at rest like
        the memories it is made of."""

    @abc.abstractmethod
    async def delete_user(self, user_id: str) -> int:
        """Delete every memory, call and profile of `user_id`; return how many items went
        (a call's digest goes with it and is not counted apart)."""

    # Profiles ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def get_agent_profile(self, agent_id: str) -> dict[str, Any] | None:
        """The agent JSON stored with `put_agent_profile`, with `_fetched_at` added."""

    @abc.abstractmethod
    async def put_agent_profile(
        self, agent_id: str, profile: dict[str, Any], fetched_at: float
    ) -> None:
        """Store an agent's configuration (user_id = agent_id, type agent_profile)."""

    @abc.abstractmethod
    async def get_caller_profile(self, user_id: str) -> dict[str, Any] | None:
        """The prepared profile (greeting, user_context, ...) of a caller, or None.

        Read while the phone rings: with `caller_profiles_on_loop`, it must complete without
        suspending whenever the store can answer at once, and never block the event loop
        on a lock."""

    @abc.abstractmethod
    async def put_caller_profile(self, user_id: str, profile: dict[str, Any]) -> None:
        """Replace the prepared profile of a caller."""

    async def keep_caller_profile(
        self, user_id: str, profile: dict[str, Any], prepared_from: str, read: HistoryRead
    ) -> ProfileKept:
        """`put_caller_profile`, then `is_forgotten(prepared_from)` and `call_history`, in
        that order (what the post-call hook does after every call): a store that can do
        the three at once (one transaction, one trip to its thread) does."""
        await self.put_caller_profile(user_id, profile)
        forgotten = await self.is_forgotten(prepared_from)
        history = await self.call_history(user_id, recent=read.recent, marks=read.marks)
        return ProfileKept(forgotten, history)

    # Forgotten conversations -------------------------------------------------------------
    async def forget_conversations(self, conversation_ids: Collection[str]) -> None:
        """Remember that these conversations were forgotten (as keyed hashes): `add_call`
        then stores nothing for them and answers `forgotten=True`. None kept by default."""

    async def is_forgotten(self, conversation_id: str) -> bool:
        """Whether `forget_conversations` was told about this conversation."""
        return False

    # Forgets for the other machines' disks ---------------------------------------------------
    async def share_forget(
        self, user_id: str, conversation_ids: Collection[str], *, keep_for: float
    ) -> None:
        """Tell every process on this store, on whichever machine, that `user_id` was
        forgotten, so each deletes the files it keeps of them (`forgets_after`); requests
        older than `keep_for` seconds go. Nothing by default: a store only one machine
        uses has no other disk to tell."""

    async def forgets_after(self, seq: int) -> list[ForgetRequest]:
        """The requests `share_forget` made after `seq`, oldest first."""
        return []

    # Counters shared by replicas -----------------------------------------------------------
    async def shared_increment(self, name: str, ttl: float) -> int | None:
        """Add one to the counter `name`, which every process on this store shares and
        which starts again from zero `ttl` seconds after its first increment; its new
        value. None when the store has no counter other machines see (an embedded store is
        one machine's: its processes count through Redis or alone)."""
        return None

    # Life cycle --------------------------------------------------------------------------
    async def maintain(self) -> None:
        """The store's own upkeep kept off the request path (the embedded store's -wal
        flush a forget could not finish). The service calls it every second and on
        shutdown, the CLI after a backfill; none by default."""

    async def check(self) -> None:
        """Raise `StoreUnavailableError` when the store cannot serve (start-up, /ready)."""

    async def close(self) -> None:
        """Release connections."""
