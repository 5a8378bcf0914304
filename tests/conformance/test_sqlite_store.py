"""The embedded store's own promises: WAL, several processes writing at once, the saved
search indexes, and reads on the event loop that never wait for a lock."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sqlite3
import zlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from cryptography.fernet import Fernet

from elaoms.crypto import PayloadCipher
from elaoms.memory.base import StoreUnavailableError
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import call_memories
from elaoms.search import embeddings
from elaoms.search.indexes import CallerIndexes
from elaoms.search.ranking import CallerIndex

from conftest import WAIT_BOUND, transcription

T = TypeVar("T")
WORKERS = 4
CALLS_PER_WORKER = 10
SHARED_CALLS = 5  # delivered by every worker: duplicates racing across processes


def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "memory.sqlite3")
    asyncio.run(store.check())

    with sqlite3.connect(tmp_path / "memory.sqlite3") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    asyncio.run(store.close())


def _write_calls(path: str, worker: int, start: multiprocessing.synchronize.Event) -> None:
    async def write() -> None:
        store = SQLiteStore(Path(path))
        calls = [
            (f"conv_w{worker}_{i}", f"+1415555{worker:02d}{i:02d}") for i in range(CALLS_PER_WORKER)
        ]
        calls += [(f"conv_shared_{i}", "+14155559900") for i in range(SHARED_CALLS)]
        for conversation_id, caller in calls:
            payload = transcription(conversation_id, caller=caller)
            await store.add_call(
                caller, CallRecord.from_payload(payload), payload, call_memories(caller, payload)
            )
        await store.close()

    start.wait(WAIT_BOUND)
    asyncio.run(write())


def test_four_processes_writing_at_once_land_every_call_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    SQLiteStore(path)  # the schema exists before the race, as after a deploy
    context = multiprocessing.get_context("spawn")  # no fork of pytest's threads
    start = context.Event()
    workers = [
        context.Process(target=_write_calls, args=(str(path), worker, start))
        for worker in range(WORKERS)
    ]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0

    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT conversation_id, count(*) FROM calls GROUP BY 1")
        counts = dict(rows.fetchall())
        turns = connection.execute("SELECT count(*) FROM memories").fetchone()[0]
    expected = {f"conv_w{w}_{i}" for w in range(WORKERS) for i in range(CALLS_PER_WORKER)}
    expected |= {f"conv_shared_{i}" for i in range(SHARED_CALLS)}
    assert counts == dict.fromkeys(expected, 1)
    one_call = len(call_memories("+14155550000", transcription("conv_x")))
    assert turns == one_call * len(expected)


def _open_new_stores(
    folder: str, rounds: int, barrier: multiprocessing.synchronize.Barrier
) -> None:
    for number in range(rounds):
        barrier.wait(WAIT_BOUND)  # each worker spawned and importing: seconds on a busy host
        SQLiteStore(Path(folder) / f"round-{number}.sqlite3")  # raises if it cannot


def test_workers_starting_together_on_a_new_file_all_start(tmp_path: Path) -> None:
    """gunicorn -w 4 on a first deploy: every worker opens the new file at once. One that
    fails to set it up stops them all (gunicorn halts when a worker cannot boot)."""
    rounds = 25
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    workers = [
        context.Process(target=_open_new_stores, args=(str(tmp_path), rounds, barrier))
        for _ in range(WORKERS)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    assert [process.exitcode for process in workers] == [0] * WORKERS
    for number in range(rounds):
        with sqlite3.connect(tmp_path / f"round-{number}.sqlite3") as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


CALLER = "+14155550123"
VISITS = (
    [("agent", "Hi Maria, how can I help?"), ("user", "My daughter chipped a tooth.")],
    [("agent", "Hi Maria, welcome back."), ("user", "The insurance paid for the crown.")],
)


def _store_call(
    store: SQLiteStore, conversation_id: str, turns: list[tuple[str, str]] | None = None
) -> None:
    payload = transcription(conversation_id, caller=CALLER, turns=turns)
    asyncio.run(
        store.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
    )


def _store_visits(store: SQLiteStore, *, save: bool = True) -> None:
    for number, turns in enumerate(VISITS):
        _store_call(store, f"conv_visit_{number}", turns)
    if save:
        _save_indexes(store)


def _save_indexes(store: SQLiteStore) -> None:
    """What ingestion and the service's upkeep (every second) do after a call."""
    indexes = CallerIndexes(store)
    indexes.changed(CALLER)
    asyncio.run(indexes.maintain())


def _saved(path: Path) -> tuple[int, int]:
    """(memories the saved index covers, memories stored) for the caller."""
    with sqlite3.connect(path) as connection:
        row = connection.execute(
            "SELECT memories FROM caller_indexes WHERE user_id = ?", (CALLER,)
        ).fetchone()
        count = connection.execute(
            "SELECT count(*) FROM memories WHERE user_id = ?", (CALLER,)
        ).fetchone()[0]
    return (row[0] if row else 0), count


def _saved_index_data(path: Path, caller_key: str = CALLER) -> bytes:
    """The caller's saved index, as stored (`caller_key`: the caller's `user_id` column)."""
    with sqlite3.connect(path) as connection:
        (data,) = connection.execute(
            "SELECT data FROM caller_indexes WHERE user_id = ?", (caller_key,)
        ).fetchone()
    return bytes(data)


def test_another_worker_searches_with_the_index_saved_by_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "memory.sqlite3"
    writer = SQLiteStore(path)
    _store_visits(writer)
    expected = CallerIndex(asyncio.run(writer.list_memories(CALLER)), vectors=None)

    reader = SQLiteStore(path)  # nothing cached in this one

    def rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the caller's history was re-read instead of the saved index")

    monkeypatch.setattr(reader, "_list_memories", rebuild)
    indexes = CallerIndexes(reader)
    for query in ("daughter tooth", "insurance crown", "Maria"):
        found = asyncio.run(indexes.search(CALLER, query))
        assert found and found == expected.search(query, limit=5)


def test_a_call_stored_after_the_save_is_found_reading_that_call_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path)
    _store_visits(store)
    _store_call(store, "conv_visit_later", [("user", "The root canal went well.")])
    assert _saved(path)[0] < _saved(path)[1]  # the delivery did not wait for the index

    reader = SQLiteStore(path)
    read = reader._list_memories
    reads: list[int] = []

    def newer_only(user_id: str, limit: int | None = None, *, after_seq: int = 0) -> object:
        reads.append(after_seq)
        return read(user_id, limit, after_seq=after_seq)

    monkeypatch.setattr(reader, "_list_memories", newer_only)
    indexes = CallerIndexes(reader)
    (excerpt,) = asyncio.run(indexes.search(CALLER, "root canal"))
    assert "root canal went well" in excerpt.content
    assert reads and all(after > 0 for after in reads)

    asyncio.run(indexes.maintain())  # the search found the index behind: the upkeep saves it
    saved, stored = _saved(path)
    assert saved == stored


def test_an_index_older_than_a_deletion_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    _store_visits(SQLiteStore(path))
    with sqlite3.connect(path) as connection:  # a memory removed behind the index's back
        connection.execute("DELETE FROM memories WHERE content LIKE '%insurance%'")

    indexes = CallerIndexes(SQLiteStore(path))
    assert asyncio.run(indexes.search(CALLER, "insurance crown")) == []
    assert asyncio.run(indexes.search(CALLER, "daughter tooth"))
    asyncio.run(indexes.maintain())
    saved, stored = _saved(path)
    assert saved == stored


def test_an_index_saved_in_an_earlier_format_is_rebuilt_then_saved_anew(tmp_path: Path) -> None:
    """A store from an earlier release (format 5: zlib-compressed JSON) answers as it did,
    and its upkeep saves the index in the current format."""
    path = tmp_path / "memory.sqlite3"
    _store_visits(SQLiteStore(path))
    earlier = zlib.compress(json.dumps({"format": 5, "user_id": CALLER}).encode(), 1)
    with sqlite3.connect(path) as connection:
        connection.execute(
            "UPDATE caller_indexes SET data = ? WHERE user_id = ?", (earlier, CALLER)
        )

    reader = SQLiteStore(path)
    indexes = CallerIndexes(reader)
    expected = CallerIndex(asyncio.run(reader.list_memories(CALLER)), vectors=None)
    assert asyncio.run(indexes.search(CALLER, "daughter tooth")) == expected.search(
        "daughter tooth", limit=5
    )
    asyncio.run(indexes.maintain())
    saved = CallerIndex.from_bytes(_saved_index_data(path), vectors=None)  # this format
    assert saved.search("insurance crown", limit=5) == expected.search("insurance crown", limit=5)


def test_the_saved_index_is_encrypted_and_forgotten_with_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path, cipher=PayloadCipher(Fernet.generate_key().decode(), enabled=True))
    _store_visits(store)
    data = _saved_index_data(path, store.database.key(CALLER))
    assert b"daughter" not in data and b"chipped" not in data
    reader = SQLiteStore(path, cipher=store.cipher)
    assert asyncio.run(CallerIndexes(reader).search(CALLER, "daughter"))

    _store_call(store, "conv_visit_later")
    indexes = CallerIndexes(store)
    indexes.changed(CALLER)
    asyncio.run(store.delete_user(CALLER))
    asyncio.run(indexes.maintain())  # the pass due for the later call saves nothing back

    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM caller_indexes").fetchone()[0] == 0


# Reads on the event loop ---------------------------------------------------------------------
def _at_once(coroutine: Coroutine[Any, Any, T]) -> T:
    """The coroutine's result if, run on an event loop, it answers without suspending once
    (no thread, no wait)."""

    async def one_step() -> T:
        try:
            coroutine.send(None)
        except StopIteration as answered:
            return cast(T, answered.value)
        coroutine.close()
        raise AssertionError("suspended: left the event loop")

    return asyncio.run(one_step())


def test_the_loop_reads_only_what_it_read_moments_ago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's saved index is read in a thread (the read may wait for the disk); once
    this process holds it, their next searches never leave the loop."""
    monkeypatch.setattr(embeddings, "default_cache", lambda: None)  # a query embedding would
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path)
    _store_visits(store)
    reader = CallerIndexes(SQLiteStore(path))
    with pytest.raises(AssertionError, match="suspended"):
        _at_once(reader.search(CALLER, "daughter tooth"))

    asyncio.run(reader.search(CALLER, "daughter tooth"))
    (excerpt, *_) = _at_once(reader.search(CALLER, "daughter tooth"))
    assert "daughter chipped a tooth" in excerpt.content

    _store_call(store, "conv_visit_later", [("user", "Root canal.")])
    with pytest.raises(AssertionError, match="suspended"):  # changed: read again
        _at_once(reader.search(CALLER, "root canal"))
    (excerpt, *_) = asyncio.run(reader.search(CALLER, "root canal"))
    assert "Root canal" in excerpt.content


def test_reads_the_loop_cannot_make_at_once_are_made_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path)
    _store_visits(store)
    asyncio.run(store.put_caller_profile(CALLER, {"greeting": "Hi Maria"}))
    # A reader that answers busy, as SQLite does when another connection holds the whole
    # file (exclusive locking mode, recovery): a file held exclusively in rollback mode.
    holder = sqlite3.connect(tmp_path / "held.sqlite3", isolation_level=None)
    holder.execute("CREATE TABLE held (x)")
    holder.execute("BEGIN EXCLUSIVE")
    busy = sqlite3.connect(tmp_path / "held.sqlite3", timeout=0, check_same_thread=False)
    monkeypatch.setattr(store.database, "reader", lambda: busy)
    indexes = CallerIndexes(store)
    asyncio.run(indexes.search(CALLER, "daughter"))  # held: the next search asks the loop
    in_threads: list[object] = []
    run_in_thread = store.database.run

    async def counted(function: Callable[[], T]) -> T:
        in_threads.append(function)
        return await run_in_thread(function)

    monkeypatch.setattr(store.database, "run", counted)

    assert asyncio.run(store.get_caller_profile(CALLER)) == {"greeting": "Hi Maria"}
    found = asyncio.run(indexes.search(CALLER, "insurance crown"))
    assert found and "insurance" in found[0].content
    assert len(in_threads) == 2
    holder.close()


def test_profiles_written_as_standard_json_are_still_read(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path)
    profile = {"name": "José", "call_count": 2, "recent_summaries": [{"title": "Crown"}]}
    with sqlite3.connect(path) as connection:  # as earlier versions wrote them
        connection.execute(
            "INSERT INTO caller_profiles VALUES (?, ?, 0)", (CALLER, json.dumps(profile).encode())
        )
    assert asyncio.run(store.get_caller_profile(CALLER)) == profile


def test_a_read_failing_for_another_reason_than_a_lock_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path)
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE caller_profiles")
    with pytest.raises(StoreUnavailableError):
        asyncio.run(store.get_caller_profile(CALLER))


def test_agent_profiles_kept_as_memories_by_an_older_version_move_to_their_table(
    tmp_path: Path,
) -> None:
    path = tmp_path / "memory.sqlite3"
    asyncio.run(SQLiteStore(path).close())
    with sqlite3.connect(path) as connection:  # as versions before the agent_profiles table
        connection.execute("DELETE FROM store_keys WHERE name = 'agent_profiles_moved'")
        connection.execute(
            "INSERT INTO memories (id, user_id, kind, content, metadata, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                "agent_profile:agent_a",
                "agent_a",
                "agent_profile",
                json.dumps({"name": "Front desk"}),
                json.dumps({"type": "agent_profile", "agent_id": "agent_a", "fetched_at": 12.5}),
                12.5,
            ),
        )

    store = SQLiteStore(path)
    assert asyncio.run(store.get_agent_profile("agent_a")) == {
        "name": "Front desk",
        "_fetched_at": 12.5,
    }
    assert asyncio.run(store.index_state("agent_a")).version.count == 0
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM memories").fetchone()[0] == 0
    asyncio.run(store.close())
