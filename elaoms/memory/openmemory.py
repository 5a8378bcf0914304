"""The OpenMemory backend: a team's OpenMemory (CaviraOSS, v1.3.x) server holds the memories.

What lives where:
- On the server: one readable memory per unit of a call (each spoken turn, the summary,
  each collected fact), free-standing memories, and agent profiles. `user_id` is the
  caller (the agent id for an agent profile); tags and metadata name the conversation,
  agent, event type and time.
- In a local SQLite "ledger" (OPENMEMORY_LEDGER_PATH): every call's whole payload, its
  index and its digest (the server cuts content to 200 characters by default, so it is no
  place for a payload), prepared caller profiles (the server's own user summary never
  updates), and which unit went to which server id, so a retried `add_call` resumes
  instead of duplicating.

Defences against the server's known faults (docs/openmemory.md):
- Its near-duplicate check is global and keeps ~16 bits: every unit starts with a header
  line naming the caller, the conversation and the unit, and every `deduplicated: true`
  answer is read back; if it is not our own earlier add, the unit is added again with a
  distinguishing mark in the header.
- It has returned other users' memories: every memory read is checked against the caller
  asked for and dropped (and counted) if it is someone else's.
- `/memory/query` ranks globally, filters by user afterwards and answers failures with an
  empty list: search reads the caller's own memories and ranks them here, like every
  store's (`elaoms.search.indexes`). A caller's memory version is the ledger's record of
  their units (count and last seq), so their index is saved in the ledger too; memories
  changed on the server directly, behind ELAOMS's back, are not seen by search.
- Its main branch since 2026-04 binds `user_id` to the API key; `check` names the
  versions that work when it sees that, or sees stored content cut short.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from elaoms.config import Settings
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
    SavedIndex,
    StoredCall,
    StoreUnavailableError,
)
from elaoms.memory.metrics import FOREIGN_MEMORIES_DROPPED
from elaoms.memory.openmemory_ledger import Ledger, now_order
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import AGENT_PROFILE
from elaoms.memory.units import TRANSCRIPTION
from elaoms.phone import mask
from elaoms.retries import retryable_status

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = "OpenMemory v1.3.x (CaviraOSS/OpenMemory tags v1.3.0 and later v1.3 releases)"
PROBE_USER = "elaoms-startup-probe"
FREE_MEMORY = "memory"  # the ledger's event type for memories added outside a call

# Our bookkeeping inside each memory's metadata; stripped before a Memory leaves the store.
_OWNER = "elaoms_user"
_UNIT = "elaoms_unit"
_ORDER = "elaoms_order"
_CREATED = "elaoms_created_at"
_PRIVATE = (_OWNER, _UNIT, _ORDER, _CREATED)


class OpenMemoryError(StoreUnavailableError):
    """The server answered, but not with what we asked for."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """An answer `retryable_status` says is worth asking again after a pause."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, httpx.TransportError | _Retryable)


@dataclass(slots=True)
class _CallerView:
    """One caller's memories as last read from the server."""

    version: MemoryVersion
    expires: float
    memories: list[Memory]


class OpenMemoryStore(MemoryStore):
    name = "openmemory"
    caller_profiles_on_loop = True  # profiles live in the local ledger, not on the server

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        ledger_path: Path,
        timeout: float = 5.0,
        max_retries: int = 3,
        retry_base_delay: float = 0.2,
        cipher: PayloadCipher | None = None,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
        cache_seconds: float = 60.0,
        cache_size: int = 256,
        page_size: int = 100,
        concurrency: int = 4,
        distinct_attempts: int = 6,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.ledger = Ledger(ledger_path, file_mode=file_mode, dir_mode=dir_mode, cipher=cipher)
        self.max_retries = max_retries
        self.retry_base_delay = retry_base_delay
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self.page_size = page_size
        self.distinct_attempts = distinct_attempts
        # A real server takes 400-800 ms per add; a call's units go a few at a time.
        self._add_slots = asyncio.Semaphore(concurrency)
        self._views: OrderedDict[str, _CallerView] = OrderedDict()
        self._probed = False
        self.foreign_memories_dropped = 0
        self.dedup_collisions = 0
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"x-api-key": api_key} if api_key else {},
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            transport=transport,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, cipher: PayloadCipher | None = None
    ) -> OpenMemoryStore:
        return cls(
            settings.openmemory_url,
            settings.openmemory_api_key,
            ledger_path=settings.openmemory_ledger_path,
            timeout=settings.openmemory_timeout_seconds,
            max_retries=settings.max_retries,
            retry_base_delay=settings.openmemory_retry_base_delay_seconds,
            cipher=cipher,
            file_mode=settings.file_permissions_mode,
            dir_mode=settings.directory_permissions_mode,
        )

    # HTTP ----------------------------------------------------------------------------------
    async def _request(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        """One API call: JSON answer, None for 404; retried on transport errors, 5xx, 429."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.max_retries + 1),
                wait=wait_exponential(multiplier=self.retry_base_delay, max=10),
                retry=retry_if_exception(_is_retryable),
                reraise=True,
            ):
                with attempt:
                    response = await self._client.request(
                        method, path, json=json_body, params=params
                    )
                    if retryable_status(response.status_code):
                        raise _Retryable(response)
        except _Retryable as error:
            raise OpenMemoryError(
                f"OpenMemory {method} {path}: HTTP {error.response.status_code} after "
                f"{self.max_retries + 1} attempts",
                error.response.status_code,
            ) from error
        except httpx.HTTPError as error:
            raise StoreUnavailableError(
                f"OpenMemory at {self.base_url} unreachable ({method} {path}): "
                f"{type(error).__name__} {error}"
            ) from error
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise _refusal(method, path, response)
        try:
            return response.json()
        except ValueError as error:
            raise OpenMemoryError(f"OpenMemory {method} {path}: answer is not JSON") from error

    async def _add(
        self,
        user_id: str,
        content: Callable[[str], str],
        accept: Callable[[dict[str, Any], str], bool],
        tags: list[str],
        metadata: dict[str, Any],
    ) -> str:
        """Add a memory and return its id, never settling for someone else's memory.

        `content(mark)` renders the text with a distinguishing mark ("" at first);
        `accept(existing, text)` says whether a memory the server deduplicated us into is
        our own earlier add of the same thing (a retried request), which is fine to keep.
        """
        mark = ""
        for attempt in range(1, self.distinct_attempts + 1):
            text = content(mark)
            async with self._add_slots:
                answer = await self._request(
                    "POST",
                    "/memory/add",
                    json_body={
                        "content": text,
                        "tags": tags,
                        "metadata": metadata,
                        "user_id": user_id,
                    },
                )
            if not isinstance(answer, dict) or not answer.get("id"):
                raise OpenMemoryError(f"OpenMemory /memory/add answered {answer!r}")
            memory_id = str(answer["id"])
            if not answer.get("deduplicated"):
                return memory_id
            existing = await self._request("GET", f"/memory/{memory_id}")
            if isinstance(existing, dict) and accept(existing, text):
                return memory_id
            self.dedup_collisions += 1
            logger.warning(
                "OpenMemory folded a memory of %s into another memory (%s); adding it again",
                mask(user_id),
                "another user's" if existing and _owner(existing) != user_id else "different",
            )
            mark = _mark(attempt, text)
        raise OpenMemoryError(
            f"OpenMemory kept deduplicating a memory of {mask(user_id)} into others"
        )

    # Calls -------------------------------------------------------------------------------
    async def add_call(
        self,
        user_id: str,
        call: CallRecord,
        payload: dict[str, Any],
        memories: list[Memory],
        read: HistoryRead | None = None,
    ) -> CallReceipt:
        # `read` is not read here: the hook's own read costs the same.
        event_type, conversation_id = call.event_type, call.conversation_id
        existing = await self.ledger.receipt(event_type, conversation_id)
        if existing:
            return CallReceipt(memory_id=existing, created=False)
        if await self.ledger.tables.is_forgotten(conversation_id):  # nothing goes to the server
            return CallReceipt(memory_id="", created=False, forgotten=True)
        units = memories or [_placeholder(user_id, call)]
        done, order = await self.ledger.units(event_type, conversation_id)
        missing = [(position, unit) for position, unit in enumerate(units) if unit.id not in done]
        # Every finished add is recorded even when a sibling fails, so a retry only adds
        # what is still missing.
        results = await asyncio.gather(
            *(
                self._add_unit(user_id, event_type, unit, order, position)
                for position, unit in missing
            ),
            return_exceptions=True,
        )
        self._views.pop(user_id, None)
        for (_, unit), result in zip(missing, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            done[unit.id] = result
        return await self.ledger.record_call(user_id, call, payload, done[units[0].id])

    async def _add_unit(
        self, user_id: str, event_type: str, unit: Memory, order: int, position: int
    ) -> str:
        conversation_id = str(unit.metadata.get("conversation_id") or "")
        header = _call_header(user_id, unit)
        memory_id = await self._add_text(user_id, unit, order + position, header)
        await self.ledger.record_unit(
            user_id, event_type, conversation_id, unit.id, memory_id, order
        )
        return memory_id

    async def _add_text(
        self, user_id: str, unit: Memory, order: int, header: Callable[[str], str]
    ) -> str:
        metadata = {
            **unit.metadata,
            _OWNER: user_id,
            _UNIT: unit.id,
            _ORDER: order,
            _CREATED: unit.created_at,
        }

        def accept(existing: dict[str, Any], text: str) -> bool:
            return _owner(existing) == user_id and _first_line(existing) == text.split("\n")[0]

        return await self._add(
            user_id,
            lambda mark: f"{header(mark)}\n{unit.content}",
            accept,
            _tags(unit.metadata),
            metadata,
        )

    async def get_call(
        self, conversation_id: str, event_type: str = TRANSCRIPTION
    ) -> StoredCall | None:
        return await self.ledger.tables.get_call(conversation_id, event_type)

    async def list_calls(
        self,
        user_id: str | None = None,
        *,
        agent_id: str | None = None,
        since: int | None = None,
        limit: int | None = None,
    ) -> list[StoredCall]:
        return await self.ledger.tables.list_calls(
            user_id, agent_id=agent_id, since=since, limit=limit
        )

    async def call_history(
        self, user_id: str, *, recent: int, marks: Collection[str] = ()
    ) -> CallHistory:
        return await self.ledger.tables.call_history(user_id, recent=recent, marks=marks)

    async def calls_per_day(self, user_id: str | None = None, *, since: int) -> dict[int, int]:
        return await self.ledger.tables.calls_per_day(user_id, since=since)

    async def list_agent_ids(self) -> list[str]:
        return await self.ledger.tables.list_agent_ids()

    async def list_callers(
        self,
        *,
        number: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> CallerPage:
        return await self.ledger.tables.list_callers(
            number=number, name=name, limit=limit, offset=offset
        )

    async def list_call_digests(
        self, user_id: str, *, limit: int | None = None, offset: int = 0, words: bool = False
    ) -> list[CallDigest]:
        return await self.ledger.tables.list_call_digests(
            user_id, limit=limit, offset=offset, words=words
        )

    # Memories ----------------------------------------------------------------------------
    async def add_memory(
        self, user_id: str, content: str, metadata: dict[str, Any] | None = None
    ) -> Memory:
        key = f"note_{uuid.uuid4().hex[:12]}"
        unit = Memory(
            id=key,
            user_id=user_id,
            content=content,
            metadata=dict(metadata or {}),
            created_at=time.time(),
        )
        order = now_order()
        memory_id = await self._add_text(
            user_id, unit, order, _header(user_id, f"note {key}", "note")
        )
        await self.ledger.record_unit(user_id, FREE_MEMORY, "", key, memory_id, order)
        self._views.pop(user_id, None)
        return Memory(
            id=memory_id,
            user_id=user_id,
            content=content,
            metadata=unit.metadata,
            created_at=unit.created_at,
        )

    async def list_memories(self, user_id: str, limit: int | None = None) -> list[Memory]:
        memories = (await self._view(user_id)).memories
        return memories[:limit] if limit is not None else list(memories)

    # Search indexes: versions and saved indexes live in the ledger -----------------------
    async def index_state(self, user_id: str) -> IndexState:
        return await self.ledger.index_state(user_id)

    def index_version_now(self, user_id: str) -> MemoryVersion | None:
        return self.ledger.tables.version_now(user_id)

    async def memories_after(
        self, user_id: str, after_seq: int
    ) -> tuple[MemoryVersion, list[Memory]]:
        version, ids = await self.ledger.units_after(user_id, after_seq)
        if not ids:
            return version, []
        on_server = {memory.id: memory for memory in (await self._view(user_id)).memories}
        # A unit deleted on the server directly is left out (the count then says so).
        return version, [on_server[memory_id] for memory_id in ids if memory_id in on_server]

    async def save_index(self, user_id: str, index: SavedIndex) -> bool:
        return await self.ledger.tables.save_index(user_id, index)

    async def _view(self, user_id: str) -> _CallerView:
        """The caller's memories, reread when any worker's ledger says they changed or the
        cache is old (someone may have changed them on the server directly)."""
        version = await self.ledger.version(user_id)
        view = self._views.get(user_id)
        if view and view.version == version and view.expires > time.monotonic():
            self._views.move_to_end(user_id)
            return view
        items = [item for item in await self._user_items(user_id) if _type(item) != AGENT_PROFILE]
        memories = sorted(
            (_memory(item, user_id) for item in items),
            key=lambda memory: memory[0],
        )
        view = _CallerView(
            version=version,
            expires=time.monotonic() + self.cache_seconds,
            memories=[memory for _, memory in memories],
        )
        self._views[user_id] = view
        while len(self._views) > self.cache_size:
            self._views.popitem(last=False)
        return view

    async def _user_items(self, user_id: str) -> list[dict[str, Any]]:
        """Every memory the server lists for `user_id`, minus any that is not theirs."""
        items: list[dict[str, Any]] = []
        offset = 0
        while True:
            answer = await self._request(
                "GET",
                f"/users/{_quote(user_id)}/memories",
                params={"l": self.page_size, "u": offset},
            )
            page = (answer or {}).get("items") or [] if isinstance(answer, dict) else []
            for item in page:
                if isinstance(item, dict) and _owner(item) == user_id:
                    items.append(item)
                else:
                    self.foreign_memories_dropped += 1
                    FOREIGN_MEMORIES_DROPPED.inc()
                    logger.warning(
                        "OpenMemory returned a memory of %s when asked for %s's; dropped",
                        mask(_owner(item) if isinstance(item, dict) else None),
                        mask(user_id),
                    )
            if len(page) < self.page_size:
                return items
            offset += len(page)

    async def delete_user(self, user_id: str) -> int:
        # The server first: if it fails nothing local is gone and the request can be retried.
        answer = await self._request("DELETE", f"/users/{_quote(user_id)}/memories")
        deleted = answer.get("deleted") if isinstance(answer, dict) else None
        if not isinstance(deleted, int):
            deleted = (await self.ledger.version(user_id)).count
        self._views.pop(user_id, None)
        return deleted + await self.ledger.forget(user_id)

    async def forget_conversations(self, conversation_ids: Collection[str]) -> None:
        await self.ledger.tables.forget_conversations(conversation_ids)

    async def is_forgotten(self, conversation_id: str) -> bool:
        return await self.ledger.tables.is_forgotten(conversation_id)

    # Profiles ----------------------------------------------------------------------------
    async def _agent_item(self, agent_id: str) -> dict[str, Any] | None:
        profiles = [
            item for item in await self._user_items(agent_id) if _type(item) == AGENT_PROFILE
        ]
        return max(profiles, key=_server_time, default=None)

    async def get_agent_profile(self, agent_id: str) -> dict[str, Any] | None:
        item = await self._agent_item(agent_id)
        if item is None:
            return None
        try:
            profile = json.loads(item.get("content") or "")
        except ValueError:
            logger.warning("agent profile of %s on OpenMemory is cut short; ignoring it", agent_id)
            return None
        if not isinstance(profile, dict):
            return None
        profile.pop("_elaoms_mark", None)
        profile["_fetched_at"] = (item.get("metadata") or {}).get("fetched_at", 0.0)
        return profile

    async def put_agent_profile(
        self, agent_id: str, profile: dict[str, Any], fetched_at: float
    ) -> None:
        fields = {k: v for k, v in profile.items() if k != "_fetched_at"}
        metadata = {"type": AGENT_PROFILE, "agent_id": agent_id, "fetched_at": fetched_at}
        existing = await self._agent_item(agent_id)
        if existing is not None:
            updated = await self._request(
                "PATCH",
                f"/memory/{existing['id']}",
                json_body={"content": json.dumps(fields), "metadata": metadata},
            )
            if updated is not None:
                return

        def content(mark: str) -> str:
            return json.dumps({**fields, "_elaoms_mark": mark} if mark else fields)

        def accept(existing: dict[str, Any], text: str) -> bool:
            return _owner(existing) == agent_id and existing.get("content") == text

        await self._add(agent_id, content, accept, ["type:agent_profile"], metadata)

    def get_caller_profile(self, user_id: str) -> Coroutine[Any, Any, dict[str, Any] | None]:
        # The ledger's own coroutine: read on the event loop, nothing added on the way.
        return self.ledger.tables.get_caller_profile(user_id)

    async def put_caller_profile(self, user_id: str, profile: dict[str, Any]) -> None:
        await self.ledger.tables.put_caller_profile(user_id, profile)

    # Life cycle --------------------------------------------------------------------------
    async def maintain(self) -> None:
        """The ledger's upkeep: a forget's -wal checkpoint that readers held back."""
        await self.ledger.database.maintain()

    async def check(self) -> None:
        """Reachable, key accepted, user ids not bound to the key, content kept whole."""
        try:
            health = await self._client.get("/health")
        except httpx.HTTPError as error:
            raise StoreUnavailableError(
                f"OpenMemory at {self.base_url} is not reachable: {type(error).__name__} {error}"
            ) from error
        if health.status_code != 200:
            raise StoreUnavailableError(
                f"OpenMemory at {self.base_url}/health answered HTTP {health.status_code}"
            )
        await self._request("GET", f"/users/{PROBE_USER}/memories", params={"l": 1, "u": 0})
        await self.ledger.database.check("calls")
        if not self._probed:
            await self._check_content_kept_whole()
            self._probed = True

    async def _check_content_kept_whole(self) -> None:
        probe = (
            f"ELAOMS start-up probe {uuid.uuid4().hex}: checks that the server stores a "
            "memory's whole content. A server running with OM_USE_SUMMARY_ONLY=true keeps "
            "only a summary of about 200 characters, which would cut every stored turn of "
            "a call. This probe is deleted right after it is read back."
        )
        answer = await self._request(
            "POST",
            "/memory/add",
            json_body={"content": probe, "tags": [], "metadata": {}, "user_id": PROBE_USER},
        )
        memory_id = str((answer or {}).get("id") or "")
        if not memory_id:
            raise OpenMemoryError(f"OpenMemory /memory/add answered {answer!r}")
        try:
            stored = await self._request("GET", f"/memory/{memory_id}") or {}
        finally:
            if not (answer or {}).get("deduplicated"):
                await self._request("DELETE", f"/memory/{memory_id}")
        kept = str(stored.get("content") or "")
        if not answer.get("deduplicated") and kept != probe:
            raise OpenMemoryError(
                f"OpenMemory at {self.base_url} cut a {len(probe)}-character memory to "
                f"{len(kept)} characters: start the server with OM_USE_SUMMARY_ONLY=false "
                "(whole calls stay intact in ELAOMS's ledger either way, but search and "
                "the server's own view only see what it keeps)"
            )

    async def close(self) -> None:
        await self._client.aclose()
        self.ledger.database.close()


# Rendering and reading memories ------------------------------------------------------------
def _refusal(method: str, path: str, response: httpx.Response) -> OpenMemoryError:
    status = response.status_code
    text = response.text[:300]
    if status == 403 and "tenant_mismatch" in text:
        return OpenMemoryError(
            f"OpenMemory refused a caller's user_id (403 tenant_mismatch): this server binds "
            f"user_id to its API key (its main branch since 2026-04), which ELAOMS does not "
            f"support because every caller is a user. Use {SUPPORTED_VERSIONS}.",
            status,
        )
    if status in (401, 403):
        return OpenMemoryError(
            f"OpenMemory refused the API key (HTTP {status}): set OPENMEMORY_API_KEY to the "
            "server's OM_API_KEY",
            status,
        )
    return OpenMemoryError(f"OpenMemory {method} {path}: HTTP {status} {text}", status)


def _date(timestamp: float) -> str:
    if not timestamp:
        return "an unknown date"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def _call_header(user_id: str, unit: Memory) -> Callable[[str], str]:
    metadata = unit.metadata
    kind = metadata.get("kind")
    if kind == "turn":
        role = str(metadata.get("role"))
        speaker = {"user": "caller"}.get(role, role)
        part = f"turn {metadata.get('turn_index')} ({speaker})"
    elif kind == "data_collection":
        part = f"collected {metadata.get('field')}"
    else:
        part = str(kind or "note")
    return _header(user_id, f"call {metadata.get('conversation_id')}", part)


def _header(user_id: str, reference: str, part: str) -> Callable[[str], str]:
    """The first line of every memory: whose it is and which part of what.

    It makes every caller's text distinct for the server's global deduplication while
    staying short: the fingerprint is a vote of all words, and words shared by every unit
    of a call would otherwise outvote a short turn's own. A mark (random words, more on
    each retry) is added only when the server still folded the memory into another one.
    """
    line = f"Caller {user_id}, {reference}, {part}"
    return lambda mark: f"{line} [ref {mark}]:" if mark else f"{line}:"


def _mark(attempt: int, text: str) -> str:
    """Random words, twice as many per attempt as `text` has words.

    The server's fingerprint is a vote of the distinct words: a fixed handful of extra
    words cannot outvote a long turn's, so the same fingerprint came back on every
    attempt and the call was never stored (OpenMemory lost calls late in a bench run,
    where more fingerprints are taken). Words in proportion to the text move the vote.
    """
    words = max(4, len(set(text.lower().split())))
    return " ".join(uuid.uuid4().hex[:4] for _ in range(2 * attempt * words))


def _placeholder(user_id: str, record: CallRecord) -> Memory:
    """The server-side trace of a call with nothing to search, so it still has an id."""
    started = record.started_at  # checked values: NaN is not JSON
    return Memory(
        id=f"{record.conversation_id}#call",
        user_id=user_id,
        content="A call took place; nothing searchable was said.",
        metadata={
            "kind": "call",
            "conversation_id": record.conversation_id,
            "agent_id": record.agent_id,
            "event_type": record.event_type,
            "event_timestamp": record.event_timestamp,
            "call_started_at": started,
        },
        created_at=float(started or 0),
    )


def _tags(metadata: dict[str, Any]) -> list[str]:
    tags = [
        f"{name}:{metadata[key]}"
        for name, key in (
            ("conversation", "conversation_id"),
            ("agent", "agent_id"),
            ("event", "event_type"),
            ("kind", "kind"),
        )
        if metadata.get(key)
    ]
    started = metadata.get("call_started_at")
    if isinstance(started, int | float):
        tags.append(f"date:{_date(started)}")
    return tags


def _owner(item: dict[str, Any]) -> str | None:
    """Whose memory the server says this is; our own tag speaks when it stays silent."""
    owner = item.get("user_id")
    tagged = (item.get("metadata") or {}).get(_OWNER)
    if owner and tagged and owner != tagged:
        return None  # contradicts itself: trust neither
    return owner or tagged


def _type(item: dict[str, Any]) -> str | None:
    return (item.get("metadata") or {}).get("type")


def _first_line(item: dict[str, Any]) -> str:
    return str(item.get("content") or "").split("\n", 1)[0]


def _server_time(item: dict[str, Any]) -> float:
    value = item.get("updated_at") or item.get("created_at") or 0
    return float(value) if isinstance(value, int | float) else 0.0


def _memory(item: dict[str, Any], user_id: str) -> tuple[tuple[int, float], Memory]:
    """A server item as our Memory (header line stripped), with its add-order sort key."""
    metadata = dict(item.get("metadata") or {})
    content = str(item.get("content") or "")
    if _UNIT in metadata:
        content = content.split("\n", 1)[1] if "\n" in content else ""
    order = metadata.get(_ORDER)
    created = metadata.get(_CREATED)
    for key in _PRIVATE:
        metadata.pop(key, None)
    created_at = float(created) if isinstance(created, int | float) else _server_time(item) / 1000
    sort_key = (int(order) if isinstance(order, int | float) else 0, _server_time(item))
    return sort_key, Memory(
        id=str(item.get("id")),
        user_id=user_id,
        content=content,
        metadata=metadata,
        created_at=created_at,
    )


def _quote(user_id: str) -> str:
    return quote(user_id, safe="")
