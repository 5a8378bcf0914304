"""The search side's index cache: what it holds, reads, extends, rebuilds and saves, seen
through the store calls it makes (a real embedded store, counted)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from elaoms.memory.base import IndexState, Memory, MemoryVersion, SavedIndex
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import call_memories
from elaoms.search import embeddings
from elaoms.search.indexes import CallerIndexes, HeldIndexes
from elaoms.search.ranking import CallerIndex

from conftest import transcription

CALLER = "+14155550123"


@pytest.fixture(autouse=True)
def _bm25_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embeddings, "default_cache", lambda: None)


class CountingStore(SQLiteStore):
    """The embedded store, noting every index call the search side makes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[tuple[str, Any]] = []

    async def index_state(self, user_id: str) -> IndexState:
        self.calls.append(("index_state", user_id))
        return await super().index_state(user_id)

    async def memory_version(self, user_id: str) -> MemoryVersion:
        self.calls.append(("memory_version", user_id))
        return await super().memory_version(user_id)

    async def memories_after(
        self, user_id: str, after_seq: int
    ) -> tuple[MemoryVersion, list[Memory]]:
        self.calls.append(("memories_after", after_seq))
        return await super().memories_after(user_id, after_seq)

    async def save_index(self, user_id: str, index: SavedIndex) -> bool:
        self.calls.append(("save_index", index.version))
        return await super().save_index(user_id, index)


def store_call(store: SQLiteStore, conversation_id: str, words: str) -> None:
    payload = transcription(conversation_id, caller=CALLER, turns=[("user", words)])
    memories = call_memories(CALLER, payload)
    asyncio.run(store.add_call(CALLER, CallRecord.from_payload(payload), payload, memories))


def saved_version(store: SQLiteStore) -> MemoryVersion | None:
    saved = asyncio.run(store.index_state(CALLER)).saved
    return saved.version if saved else None


def search(indexes: CallerIndexes, query: str) -> list[str]:
    return [memory.content for memory in asyncio.run(indexes.search(CALLER, query))]


def test_a_held_index_is_reused_while_the_callers_memories_are_unchanged(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "memory.sqlite3")
    store_call(store, "conv_1", "My daughter chipped a tooth.")
    indexes = CallerIndexes(store)

    assert any("chipped" in text for text in search(indexes, "daughter tooth"))
    assert ("memories_after", 0) in store.calls  # nothing saved: built from every memory
    store.calls.clear()
    assert any("chipped" in text for text in search(indexes, "tooth"))
    assert store.calls == []  # checked on the loop (`index_version_now`), ranked there


class ServerLikeStore(CountingStore):
    """As a store on a server sees it: no version read on the loop."""

    def index_version_now(self, user_id: str) -> MemoryVersion | None:
        return None


def test_a_held_index_costs_a_server_backed_store_one_version_read(tmp_path: Path) -> None:
    store = ServerLikeStore(tmp_path / "memory.sqlite3")
    store_call(store, "conv_1", "My daughter chipped a tooth.")
    indexes = CallerIndexes(store)
    search(indexes, "daughter tooth")

    store.calls.clear()
    assert any("chipped" in text for text in search(indexes, "tooth"))
    # Not `index_state`, which sends the saved index along on every search.
    assert [name for name, _ in store.calls] == ["memory_version"]

    store_call(store, "conv_2", "The root canal went well.")  # another replica's write
    store.calls.clear()
    assert any("canal" in text for text in search(indexes, "root canal"))
    assert [name for name, _ in store.calls][:2] == ["memory_version", "index_state"]


def test_new_memories_extend_the_saved_index_reading_only_them(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "memory.sqlite3")
    store_call(store, "conv_1", "My daughter chipped a tooth.")
    writer = CallerIndexes(store)
    writer.changed(CALLER)
    asyncio.run(writer.maintain())
    first = saved_version(store)
    assert first is not None and first.count > 0
    store_call(store, "conv_2", "The root canal went well.")

    store.calls.clear()
    indexes = CallerIndexes(store)
    assert any("root canal" in text for text in search(indexes, "root canal"))
    reads = [argument for name, argument in store.calls if name == "memories_after"]
    assert reads == [first.last_seq]  # the later call's memories alone

    asyncio.run(indexes.maintain())  # the search built an index not saved: the upkeep saves it
    assert saved_version(store) == asyncio.run(store.index_state(CALLER)).version


def test_a_deleted_memory_makes_the_index_rebuilt_from_every_memory(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "memory.sqlite3")
    store_call(store, "conv_1", "My daughter chipped a tooth.")
    store_call(store, "conv_2", "The insurance paid for the crown.")
    indexes = CallerIndexes(store)
    indexes.changed(CALLER)
    asyncio.run(indexes.maintain())
    assert search(indexes, "insurance crown")
    store.calls.clear()

    connection = store.database.connection()  # a memory removed behind the index's back
    connection.execute("DELETE FROM memories WHERE content LIKE '%insurance%'")

    assert search(indexes, "insurance crown") == []
    assert ("memories_after", 0) in store.calls
    assert search(indexes, "daughter tooth")


def test_the_upkeep_saves_each_changed_caller_once_and_only_if_current(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "memory.sqlite3")
    store_call(store, "conv_1", "My daughter chipped a tooth.")
    indexes = CallerIndexes(store)
    asyncio.run(indexes.maintain())
    assert saved_version(store) is None  # nobody said the caller changed

    indexes.changed(CALLER)
    indexes.changed(CALLER)
    asyncio.run(indexes.maintain())
    now = asyncio.run(store.index_state(CALLER)).version
    assert [argument for name, argument in store.calls if name == "save_index"] == [now]
    saved = asyncio.run(store.index_state(CALLER)).saved
    assert saved is not None
    assert CallerIndex.from_bytes(saved.data, vectors=None).search("tooth", limit=5)

    store.calls.clear()
    indexes.changed(CALLER)
    asyncio.run(indexes.maintain())  # already current: nothing written
    assert [name for name, _ in store.calls if name == "save_index"] == []


def test_a_failed_save_is_tried_again_at_the_next_pass(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "memory.sqlite3")
    store_call(store, "conv_1", "My daughter chipped a tooth.")
    indexes = CallerIndexes(store)
    indexes.changed(CALLER)
    original = store.save_index

    async def failing(user_id: str, index: SavedIndex) -> bool:
        raise OSError("disk full (injected)")

    store.save_index = failing  # type: ignore[method-assign]
    with pytest.raises(OSError):
        asyncio.run(indexes.maintain())
    store.save_index = original  # type: ignore[method-assign]
    asyncio.run(indexes.maintain())
    assert saved_version(store) == asyncio.run(store.index_state(CALLER)).version


def test_the_least_recently_used_index_goes_first_and_a_version_must_match() -> None:
    held = HeldIndexes(2)
    first, second, third = (CallerIndex(vectors=None) for _ in range(3))
    held.put("+1", MemoryVersion(1, 1), first)
    held.put("+2", MemoryVersion(1, 2), second)
    assert held.get("+1", MemoryVersion(1, 1)) is first  # now the most recently used
    held.put("+3", MemoryVersion(1, 3), third)

    assert not held.holds("+2")
    assert held.get("+1", MemoryVersion(1, 1)) is first
    assert held.get("+3", MemoryVersion(1, 3)) is third
    assert held.get("+1", MemoryVersion(2, 4)) is None  # the caller's memories changed since
    held.drop("+1")
    assert not held.holds("+1")


def test_callers_to_save_are_taken_once_and_can_be_put_back() -> None:
    held = HeldIndexes(2)
    held.mark_unsaved("+1")
    held.mark_unsaved("+1")
    held.mark_unsaved("+2")

    assert sorted(held.take_unsaved()) == ["+1", "+2"]
    assert held.take_unsaved() == []
    held.remark_unsaved(["+2"])
    assert held.take_unsaved() == ["+2"]
