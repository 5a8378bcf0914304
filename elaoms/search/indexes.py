"""Callers' search indexes: held in this process, saved in the store, ranked here.

A store keeps memories, their version and opaque saved-index bytes (`MemoryStore`'s
index protocol); what an index is, when it is built, extended, held or saved is decided
here, the same way for every backend. One `CallerIndexes` per process, made in the
composition root (`elaoms.services`).

Reading the store may mean the disk: a store larger than the page cache is read at
random, and a disk read can take a second when the disk is busy. So a search reads
nothing it has not read moments ago on the event loop: a caller whose index this process
holds is checked (`index_version_now`, where the store can answer on the loop) and ranked
there, a few hundred microseconds with no thread hop (whose GIL hand-offs under load cost
milliseconds); any other caller's saved index is read in one store call and loaded and
ranked back on the loop; an index to build or extend is built in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from elaoms.memory.base import IndexState, Memory, MemoryStore, MemoryVersion, SavedIndex
from elaoms.search.ranking import DEFAULT, CallerIndex

logger = logging.getLogger(__name__)


class HeldIndexes:
    """The caller indexes one process holds (least recently used dropped beyond `size`)
    and the callers whose saved index is behind. Bookkeeping only, shared by the event
    loop and threads (hence the lock)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._held: OrderedDict[str, tuple[MemoryVersion, CallerIndex]] = OrderedDict()
        self._unsaved: set[str] = set()
        self._lock = threading.Lock()

    def holds(self, user_id: str) -> bool:
        with self._lock:
            return user_id in self._held

    def get(self, user_id: str, version: MemoryVersion) -> CallerIndex | None:
        """The caller's index if it describes `version` of their memories."""
        with self._lock:
            held = self._held.get(user_id)
            if held is None or held[0] != version:
                return None
            self._held.move_to_end(user_id)
            return held[1]

    def put(self, user_id: str, version: MemoryVersion, index: CallerIndex) -> None:
        with self._lock:
            self._held[user_id] = (version, index)
            self._held.move_to_end(user_id)
            while len(self._held) > self.size:
                self._held.popitem(last=False)

    def drop(self, user_id: str) -> None:
        with self._lock:
            self._held.pop(user_id, None)

    def mark_unsaved(self, user_id: str) -> None:
        with self._lock:
            self._unsaved.add(user_id)

    def take_unsaved(self) -> list[str]:
        """The callers marked since the last call, unmarked."""
        with self._lock:
            callers, self._unsaved = self._unsaved, set()
        return list(callers)

    def remark_unsaved(self, callers: Iterable[str]) -> None:
        with self._lock:
            self._unsaved.update(callers)


def load_index(
    saved: SavedIndex | None, version: MemoryVersion | None = None
) -> CallerIndex | None:
    """The saved index (without vectors) if it describes `version` (any, when None), or
    None when there is none or it is of another format."""
    if saved is None or (version is not None and saved.version != version):
        return None
    try:
        return CallerIndex.from_bytes(saved.data, vectors=None)
    except ValueError:
        return None


class CallerIndexes:
    """The search side of every store: ranks a caller's memories through their index."""

    def __init__(self, store: MemoryStore, size: int = 128, *, vectors: Any = DEFAULT) -> None:
        """`vectors`: the `VectorCache` indexes rank with (None: BM25 alone), as the
        service's settings ask (`embeddings.vector_cache`); by default the environment's."""
        self.store = store
        self.held = HeldIndexes(size)
        self.vectors = vectors

    async def search(
        self, user_id: str, query: str, limit: int = 5, *, max_chars: int | None = None
    ) -> list[Memory]:
        """The caller's memories that best answer `query`, best first. Never another
        caller's. `max_chars`: about how much text the answer may hold in total (the
        search tool's context budget); None leaves it to the ranker's default."""
        if self.held.holds(user_id):
            version = self.store.index_version_now(user_id)
            if version is None:
                version = await self.store.memory_version(user_id)
            if (index := self.held.get(user_id, version)) is not None:
                return await self._rank(index, query, limit, max_chars)
        state = await self.store.index_state(user_id)
        if state.version.count == 0:
            return []  # a caller we know nothing about
        index = self.held.get(user_id, state.version)
        if index is None and (index := load_index(state.saved, state.version)) is not None:
            index.attach_vectors(self.vectors)
            self.held.put(user_id, state.version, index)
        if index is None:
            index = await self._build(user_id, state)
        return await self._rank(index, query, limit, max_chars)

    @staticmethod
    async def _rank(
        index: CallerIndex, query: str, limit: int, max_chars: int | None
    ) -> list[Memory]:
        if index.vector_cache is None:
            return index.search(query, limit, max_chars=max_chars)
        # Embeddings: the query is embedded and the vectors scored, a thread's work.
        return await asyncio.to_thread(index.search, query, limit, max_chars=max_chars)

    async def _build(self, user_id: str, state: IndexState) -> CallerIndex:
        """The index of the caller's memories now, held, and marked for saving."""
        version, index = await self._current(user_id, state)
        await asyncio.to_thread(index.attach_vectors, self.vectors)
        self.held.put(user_id, version, index)
        # The upkeep saves it, off the search's path and once for several searches.
        self.held.mark_unsaved(user_id)
        return index

    async def _current(self, user_id: str, state: IndexState) -> tuple[MemoryVersion, CallerIndex]:
        """An index of the caller's memories (not the saved one as is) and the version it
        describes. The saved index is extended with the memories stored after it
        (tokenizing those alone); with none saved, or memories deleted since, every
        memory is read and tokenized."""
        saved = state.saved
        if saved is not None:
            version, newer = await self.store.memories_after(user_id, saved.version.last_seq)
            if saved.version.count + len(newer) == version.count:  # nothing deleted since
                index = await asyncio.to_thread(load_index, saved)
                if index is not None:
                    await asyncio.to_thread(index.extend, newer)
                    return version, index
        version, memories = await self.store.memories_after(user_id, 0)
        index = await asyncio.to_thread(CallerIndex, memories, vectors=None)
        return version, index

    def changed(self, user_id: str) -> None:
        """A caller's memories changed (a call or a memory added): their saved index is
        behind, and the next `maintain` brings it up to date."""
        self.held.mark_unsaved(user_id)

    def forget(self, user_id: str) -> None:
        """A caller was deleted: their index leaves this process's memory too."""
        self.held.drop(user_id)

    async def maintain(self) -> None:
        """Save the index of every caller whose memories changed (or whose saved index a
        search found behind) since the last pass. The service runs it every second and on
        shutdown, the CLI after a backfill."""
        callers = self.held.take_unsaved()
        for number, user_id in enumerate(callers):
            try:
                await self.save(user_id)
            except Exception:
                self.held.remark_unsaved(callers[number:])
                raise

    async def save(self, user_id: str) -> bool:
        """Save the caller's current index unless the saved one is current; True when a
        new one was kept (a writer meanwhile makes the store refuse it, and marked the
        caller for the next pass)."""
        state = await self.store.index_state(user_id)
        if state.version.count == 0:  # forgotten meanwhile: nothing to index
            return False
        # Current, unless of another format (an earlier release's): then saved anew.
        if load_index(state.saved, state.version) is not None:
            return False
        index = self.held.get(user_id, state.version)
        version = state.version
        if index is None:
            version, index = await self._current(user_id, state)
        data = await asyncio.to_thread(index.to_bytes)
        return await self.store.save_index(user_id, SavedIndex(version, data))
