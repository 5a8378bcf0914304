"""The embedded store's own promises: WAL, and several processes writing at once."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path

from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import call_memories

from conftest import transcription

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
            await store.add_call(caller, payload, call_memories(caller, payload))
        await store.close()

    start.wait(30)
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
