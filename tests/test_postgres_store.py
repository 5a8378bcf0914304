"""What the PostgreSQL store adds to the conformance suite: the schema applied safely by
replicas starting together, exactly-once storage across replicas, an outage reported as
such (and survived), the store <-> search contract, and encryption at rest."""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from elaoms.crypto import PayloadCipher, generate_key
from elaoms.memory import migrations, postgres
from elaoms.memory.base import MemoryVersion, SavedIndex, StoreUnavailableError
from elaoms.memory.postgres import PostgresStore, redacted
from elaoms.memory.postgres_copies import CHANNEL, copy_key
from elaoms.memory.records import CallRecord
from elaoms.memory.units import call_memories
from elaoms.search.indexes import CallerIndexes

from conftest import REPO_ROOT, free_port, transcription, wait_until
from openmemory_standin import Run, run  # noqa: F401 - fixture by name
from postgres_server import PostgresServer

MARIA = "+14155550123"
JAMES = "+14155550188"
TABLES = {
    "calls",
    "memories",
    "caller_indexes",
    "caller_profiles",
    "call_digests",
    "store_keys",
    "forgotten_conversations",
    "agent_profiles",
    "caller_directory",
    "forget_requests",
    "memory_versions",
}


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server of this module's own, for the tests that stop it: crash recovery replays
    the WAL of every database created since the last checkpoint (the shared server's
    hundreds), and the other tests' server keeps running."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def store(postgres_url: str, run: Run[Any]) -> Iterator[PostgresStore]:
    backend = PostgresStore(postgres_url)
    yield backend
    run(backend.close())


def add(run: Run[Any], store: PostgresStore, conversation_id: str, caller: str = MARIA) -> Any:
    return run(add_payload(store, transcription(conversation_id, caller=caller), caller))


def add_payload(store: PostgresStore, payload: dict[str, Any], caller: str = MARIA) -> Any:
    """`add_call` as ingestion makes it: the record built once, then handed to the store."""
    return store.add_call(
        caller, CallRecord.from_payload(payload), payload, call_memories(caller, payload)
    )


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {row[0] for row in rows}


def raw_dump(url: str) -> bytes:
    """Every row of every table, as PostgreSQL hands it out (what a stolen backup holds)."""
    parts: list[bytes] = []
    with psycopg.connect(url) as connection:
        for table in sorted(TABLES):
            for row in connection.execute(f"SELECT * FROM {table}").fetchall():
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        parts.append(bytes(value))
                    elif value is not None:
                        parts.append(str(value).encode())
    return b"\n".join(parts)


# Schema ----------------------------------------------------------------------------------
def test_replicas_upgrading_an_empty_database_at_once_all_succeed(postgres_url: str) -> None:
    env = {
        **os.environ,
        "MEMORY_BACKEND": "postgres",
        "DATABASE_URL": postgres_url,
        "PYTHONPATH": str(REPO_ROOT),
    }
    command = [sys.executable, "-m", "elaoms.cli", "db", "upgrade"]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(4)
    ]
    # And threads of this process too, as workers of one replica would.
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def upgrade() -> None:
        try:
            barrier.wait()
            migrations.upgrade(postgres_url)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for thread in threads:
        thread.start()
    outputs = [process.communicate(timeout=120)[0].decode() for process in processes]
    for thread in threads:
        thread.join(120)

    assert [process.returncode for process in processes] == [0] * 4, outputs
    assert errors == []
    assert tables(postgres_url) >= TABLES
    with psycopg.connect(postgres_url) as connection:
        versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions == [(migrations.head(),)]


def test_db_current_tells_an_empty_database_from_an_upgraded_one(postgres_url: str) -> None:
    env = {**os.environ, "MEMORY_BACKEND": "postgres", "DATABASE_URL": postgres_url}

    def current() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "elaoms.cli", "db", "current"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    assert "none (empty)" in current()
    migrations.upgrade(postgres_url)
    assert "up to date" in current()


def test_db_commands_on_another_backend_say_what_they_are_for(tmp_path: Any) -> None:
    env = {**os.environ, "MEMORY_BACKEND": "sqlite", "SQLITE_PATH": str(tmp_path / "m.db")}

    done = subprocess.run(
        [sys.executable, "-m", "elaoms.cli", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )

    assert done.returncode == 1
    assert "MEMORY_BACKEND=postgres" in done.stderr and "Traceback" not in done.stderr


def test_replicas_opening_a_new_database_together_share_one_hash_key(
    postgres_url: str, run: Run[Any]
) -> None:
    key = generate_key()
    replicas = [
        PostgresStore(postgres_url, cipher=PayloadCipher(key, enabled=True)) for _ in range(4)
    ]

    async def open_all() -> None:
        await asyncio.gather(*(replica.check() for replica in replicas))

    try:
        run(open_all())
        add(run, replicas[0], "conv_shared")
        # Caller columns are keyed hashes: every replica must hash alike to find the call.
        for replica in replicas:
            assert [c.conversation_id for c in run(replica.list_calls(MARIA))] == ["conv_shared"]
    finally:
        for replica in replicas:
            run(replica.close())


# Exactly once ----------------------------------------------------------------------------
def test_one_call_delivered_to_several_replicas_at_once_is_stored_once(
    postgres_url: str, run: Run[Any]
) -> None:
    replicas = [PostgresStore(postgres_url) for _ in range(5)]
    payload = transcription("conv_race", caller=MARIA)
    memories = call_memories(MARIA, payload)
    record = CallRecord.from_payload(payload)

    async def deliver() -> list[Any]:
        await asyncio.gather(*(replica.check() for replica in replicas))
        return await asyncio.gather(
            *(replica.add_call(MARIA, record, payload, memories) for replica in replicas)
        )

    try:
        receipts = run(deliver())
        assert sorted(receipt.created for receipt in receipts) == [False] * 4 + [True]
        assert len({receipt.memory_id for receipt in receipts}) == 1
        assert len(run(replicas[1].list_memories(MARIA))) == len(memories)
        assert len(run(replicas[2].list_calls(MARIA))) == 1
        assert run(replicas[3].call_history(MARIA, recent=5)).count == 1
    finally:
        for replica in replicas:
            run(replica.close())


def test_a_conversation_id_with_a_nul_character_is_stored(
    store: PostgresStore, run: Run[Any]
) -> None:
    payload = transcription("conv_\x00nul", caller=MARIA, turns=[("user", "a\x00b crown")])

    receipt = run(add_payload(store, payload))

    assert receipt.created
    stored = run(store.list_calls(MARIA))
    assert [call.payload for call in stored] == [payload]  # the raw payload, whole
    assert "a\x00b crown" in [memory.content for memory in run(store.list_memories(MARIA))]


# Outages ---------------------------------------------------------------------------------
def test_an_unreachable_database_is_reported_unavailable_without_its_password(
    run: Run[Any],
) -> None:
    url = f"postgresql://elaoms:s3cret-pw@127.0.0.1:{free_port()}/memory"
    store = PostgresStore(url, timeout=1.0)

    with pytest.raises(StoreUnavailableError) as checked:
        run(store.check())
    with pytest.raises(StoreUnavailableError) as adding:
        add(run, store, "conv_down")

    for error in (checked.value, adding.value):
        assert "s3cret-pw" not in str(error)
    assert "s3cret-pw" not in repr(store)
    assert redacted(url) == f"postgresql://elaoms:***@127.0.0.1:{url.split(':')[3]}"
    run(store.close())


def test_the_store_serves_again_once_postgresql_is_back(
    own_server: PostgresServer, run: Run[Any]
) -> None:
    postgres_server = own_server
    store = PostgresStore(own_server.create_database(), timeout=2.0)
    try:
        add(run, store, "conv_before")
        postgres_server.stop()
        try:
            with pytest.raises(StoreUnavailableError):
                add(run, store, "conv_during")
            with pytest.raises(StoreUnavailableError):
                run(store.check())
        finally:
            postgres_server.start()
        add(run, store, "conv_after")
        run(store.check())
        assert {c.conversation_id for c in run(store.list_calls(MARIA))} == {
            "conv_before",
            "conv_after",
        }
    finally:
        run(store.close())


def test_a_crash_of_postgresql_loses_no_committed_call(
    own_server: PostgresServer, run: Run[Any]
) -> None:
    postgres_server = own_server
    store = PostgresStore(own_server.create_database(), timeout=2.0)
    try:
        for number in range(5):
            add(run, store, f"conv_crash{number}")
        postgres_server.stop(signal.SIGKILL)
        postgres_server.start()  # recovers from the WAL
        assert len(run(store.list_calls(MARIA))) == 5
    finally:
        run(store.close())


def test_call_path_reads_skip_the_liveness_round_trip_yet_survive_a_restart(
    own_server: PostgresServer, run: Run[Any]
) -> None:
    """Client-data's and search's reads draw a connection unchecked (one round trip, not
    two); one broken while idle by a restart is replaced and the read asked again."""
    store = PostgresStore(own_server.create_database(), timeout=2.0)
    try:
        add(run, store, "conv_restart")
        run(store.put_caller_profile(MARIA, {"name": "Maria"}))
        assert run(store.get_caller_profile(MARIA)) == {"name": "Maria"}
        own_server.stop(signal.SIGKILL)  # every pooled connection is now broken
        own_server.start()
        assert run(store.get_caller_profile(MARIA)) == {"name": "Maria"}
        assert run(store.index_state(MARIA)).version.count > 0
        assert run(store.is_forgotten("conv_restart")) is False
    finally:
        run(store.close())


def test_a_call_path_read_past_its_caller_s_deadline_finishes_instead_of_being_cancelled(
    postgres_url: str, run: Run[Any]
) -> None:
    """A client-data or search deadline stops the caller waiting, not the read: cancelling
    a query on the server costs a connection for up to seconds, which under load drained
    the pool. The statement here shows whether the server ran it to its end."""
    store = PostgresStore(postgres_url, pool_max_size=1, timeout=5.0)
    slow_write = (
        "INSERT INTO store_keys (name, value) SELECT 'deadline_probe', '\\x01'::bytea"
        " FROM pg_sleep(0.5) RETURNING 1"
    )

    async def past_the_deadline() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store._fetch_one(slow_write, ()), 0.1)
        # The one connection comes back once the read is done: the next read gets it.
        assert await store._fetch_one("SELECT 1", ()) == (1,)

    try:
        run(past_the_deadline())
        with psycopg.connect(postgres_url) as connection:
            found = connection.execute(
                "SELECT 1 FROM store_keys WHERE name = 'deadline_probe'"
            ).fetchone()
        assert found is not None  # not cancelled on the server
    finally:
        run(store.close())


# The store <-> search contract -----------------------------------------------------------
@pytest.mark.parametrize("encrypted", [False, True])
def test_saved_indexes_follow_the_caller_s_memory_version(
    postgres_url: str, run: Run[Any], encrypted: bool
) -> None:
    cipher = PayloadCipher(generate_key(), enabled=True) if encrypted else None
    store = PostgresStore(postgres_url, cipher=cipher)
    try:
        empty = run(store.index_state(MARIA))
        assert (empty.version, empty.saved) == (MemoryVersion(0, 0), None)
        assert not run(store.save_index(MARIA, SavedIndex(MemoryVersion(0, 0), b"nothing")))

        add(run, store, "conv_index")
        state = run(store.index_state(MARIA))
        memories = run(store.list_memories(MARIA))
        assert state.version.count == len(memories) > 0
        version, after = run(store.memories_after(MARIA, 0))
        assert version == state.version
        assert [memory.id for memory in after] == [memory.id for memory in memories]
        assert run(store.memories_after(MARIA, version.last_seq)) == (version, [])

        assert run(store.save_index(MARIA, SavedIndex(version, b"index-bytes")))
        assert run(store.index_state(MARIA)).saved == SavedIndex(version, b"index-bytes")
        if encrypted:
            assert b"index-bytes" not in raw_dump(postgres_url)

        note = run(store.add_memory(MARIA, "Prefers mornings."))
        newer, extra = run(store.memories_after(MARIA, version.last_seq))
        assert [memory.id for memory in extra] == [note.id]
        assert newer == MemoryVersion(version.count + 1, newer.last_seq)
        assert newer.last_seq > version.last_seq
        # An index of the old version is not kept once the memories changed.
        assert not run(store.save_index(MARIA, SavedIndex(version, b"stale")))
        now = run(store.index_state(MARIA))
        assert now.version == newer
        assert now.saved == SavedIndex(version, b"index-bytes")
        assert run(store.index_state(JAMES)).version == MemoryVersion(0, 0)

        run(store.delete_user(MARIA))
        assert run(store.index_state(MARIA)) == type(now)(MemoryVersion(0, 0), None)
    finally:
        run(store.close())


def kept_versions(url: str) -> dict[str, tuple[int, int]]:
    """The memory versions the database keeps, by caller key."""
    return caller_pairs(url, "SELECT user_id, memories, last_seq FROM memory_versions")


def counted_versions(url: str) -> dict[str, tuple[int, int]]:
    """The versions as the memories themselves say: their count and greatest seq."""
    return caller_pairs(url, "SELECT user_id, count(*), max(seq) FROM memories GROUP BY user_id")


def caller_pairs(url: str, query: str) -> dict[str, tuple[int, int]]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(query).fetchall()
    return {user_id: (count, last) for user_id, count, last in rows}


def test_the_database_keeps_each_caller_s_memory_version_through_every_change(
    store: PostgresStore, postgres_url: str, run: Run[Any]
) -> None:
    """Versions come from a row triggers keep, not from counting every memory of the
    caller: whatever changes the memories (a call, a note, a delete by hand, a forget),
    the row changes in the same transaction, and a version never comes back."""
    add(run, store, "conv_1")
    add(run, store, "conv_james", caller=JAMES)
    # Calls of one caller stored at once by two replicas: counts are not lost.
    other = PostgresStore(postgres_url)

    async def at_once() -> None:
        replicas = [store, other] * 3
        await asyncio.gather(
            *(
                add_payload(replica, transcription(f"conv_{n}", caller=MARIA))
                for n, replica in enumerate(replicas, start=2)
            )
        )

    try:
        run(at_once())
    finally:
        run(other.close())
    run(store.add_memory(MARIA, "Prefers mornings."))
    assert kept_versions(postgres_url) == counted_versions(postgres_url)
    seen = [run(store.index_state(MARIA)).version]
    assert seen[0] == MemoryVersion(*counted_versions(postgres_url)[MARIA])
    held = CallerIndexes(store)
    assert [m.content for m in run(held.search(MARIA, "mornings"))][:1] == ["Prefers mornings."]

    # The newest memory deleted (by hand: no code path deletes one memory), telling the
    # processes as every writer of a caller does: the count goes down, the greatest seq
    # reached stays, and the held index is not used again.
    with psycopg.connect(postgres_url) as connection:
        connection.execute("DELETE FROM memories WHERE content = %s", (b"Prefers mornings.",))
        connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, copy_key(MARIA)))
    now = wait_until(lambda: (v := run(store.memory_version(MARIA))) != seen[0] and v)
    assert now == MemoryVersion(seen[0].count - 1, seen[0].last_seq)
    assert run(store.memories_after(MARIA, 0))[0] == now
    assert "Prefers mornings." not in [m.content for m in run(held.search(MARIA, "mornings"))]
    seen.append(now)
    run(store.add_memory(MARIA, "Prefers evenings."))
    seen.append(run(store.index_state(MARIA)).version)
    assert len(set(seen)) == 3 and seen[2].count == seen[0].count

    run(store.delete_user(MARIA))
    assert list(kept_versions(postgres_url)) == [JAMES]
    assert run(store.index_state(MARIA)).version == MemoryVersion(0, 0)
    assert kept_versions(postgres_url) == counted_versions(postgres_url)


def test_an_index_saved_while_its_caller_is_forgotten_is_not_kept(
    store: PostgresStore, postgres_url: str, run: Run[Any]
) -> None:
    """A save that checked the version before a forget committed must not leave the
    forgotten caller's index behind: it waits for the forget, then finds no version."""
    add(run, store, "conv_forgotten")
    version = run(store.memory_version(MARIA))
    assert run(store.save_index(MARIA, SavedIndex(version, b"index of old memories")))
    forgetting = psycopg.connect(postgres_url)
    try:
        for table in ("caller_indexes", "memories"):  # as delete_user, not yet committed
            forgetting.execute(f"DELETE FROM {table} WHERE user_id = %s", (MARIA,))
        saved: list[bool] = []
        saver = threading.Thread(
            target=lambda: saved.append(
                asyncio.run(save_once(postgres_url, SavedIndex(version, b"forgotten")))
            )
        )
        saver.start()
        with psycopg.connect(postgres_url, autocommit=True) as watcher:
            wait_until(
                lambda: watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'INSERT INTO caller_indexes%%'"
                ).fetchone()
            )
        forgetting.commit()
        saver.join(60)
    finally:
        forgetting.close()
    assert saved == [False]
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM caller_indexes").fetchone() == (0,)


async def save_once(url: str, index: SavedIndex) -> bool:
    store = PostgresStore(url, listen=False)
    try:
        return await store.save_index(MARIA, index)
    finally:
        await store.close()


def test_emptying_the_memories_table_empties_the_versions(
    store: PostgresStore, postgres_url: str, run: Run[Any]
) -> None:
    add(run, store, "conv_1")
    with psycopg.connect(postgres_url) as connection:
        connection.execute("TRUNCATE memories")
    assert kept_versions(postgres_url) == {}


def test_upgrading_a_database_counts_the_memories_it_already_holds(
    postgres_url: str, run: Run[Any]
) -> None:
    migrations.upgrade(postgres_url, "0003")
    with psycopg.connect(postgres_url) as connection:
        for number, caller in enumerate([MARIA, MARIA, JAMES, MARIA]):
            connection.execute(
                "INSERT INTO memories (id, user_id, kind, content, metadata, created_at)"
                " VALUES (%s, %s, 'note', %s, %s, 1.0)",
                (f"mem_{number}", caller, b"content", b"{}"),
            )
    migrations.upgrade(postgres_url)
    assert kept_versions(postgres_url) == counted_versions(postgres_url)
    assert {caller: count for caller, (count, _) in kept_versions(postgres_url).items()} == {
        MARIA: 3,
        JAMES: 1,
    }
    store = PostgresStore(postgres_url)
    try:
        run(store.add_memory(JAMES, "Calls on Fridays."))
        assert run(store.memory_version(JAMES)) == MemoryVersion(
            *counted_versions(postgres_url)[JAMES]
        )
    finally:
        run(store.close())


def test_search_ranks_the_caller_s_memories(store: PostgresStore, run: Run[Any]) -> None:
    run(store.add_memory(MARIA, "Her daughter Sofia needs a filling next month."))
    run(store.add_memory(JAMES, "His daughter needs a filling."))

    results = run(CallerIndexes(store).search(MARIA, "daughter filling"))

    assert [memory.user_id for memory in results] == [MARIA]


# Encryption at rest ----------------------------------------------------------------------
def test_with_encryption_no_number_or_word_is_kept_in_clear(
    postgres_url: str, run: Run[Any]
) -> None:
    store = PostgresStore(postgres_url, cipher=PayloadCipher(generate_key(), enabled=True))
    try:
        payload = transcription("conv_secret", caller=MARIA, turns=[("user", "My molar aches.")])
        run(add_payload(store, payload))
        run(store.put_caller_profile(MARIA, {"name": "Maria Lopez", "call_count": 1}))
        run(store.put_agent_profile("agent_x", {"name": "Ava"}, fetched_at=1.0))
        run(store.share_forget(JAMES, ["conv_of_james"], keep_for=3600))
        dump = raw_dump(postgres_url)
        for secret in (b"4155550123", b"4155550188", b"conv_of_james", b"molar", b"Maria"):
            assert secret not in dump, secret
        assert [c.user_id for c in run(store.list_callers(name="lopez")).callers] == [MARIA]
        (forget,) = run(store.forgets_after(0))
        assert (forget.user_id, forget.conversation_ids) == (JAMES, ("conv_of_james",))
    finally:
        run(store.close())


def test_forgets_are_read_in_order_after_a_number_and_kept_for_a_while(
    store: PostgresStore, run: Run[Any]
) -> None:
    run(store.share_forget(MARIA, ["conv_b", "conv_a"], keep_for=3600))
    run(store.share_forget(JAMES, [], keep_for=3600))
    first, second = run(store.forgets_after(0))
    assert (first.user_id, first.conversation_ids) == (MARIA, ("conv_a", "conv_b"))
    assert second.user_id == JAMES and second.seq > first.seq
    assert run(store.forgets_after(first.seq)) == [second]
    assert run(store.forgets_after(second.seq)) == []
    # Past their time (every file they concern is past retention), they go.
    run(store.share_forget(MARIA, [], keep_for=0.0))
    assert [forget.seq for forget in run(store.forgets_after(0))] == [second.seq + 1]


def test_a_call_its_caller_made_before_being_forgotten_is_refused(
    store: PostgresStore, run: Run[Any]
) -> None:
    """A delivery kept on some replica's disk while the forget ran (PostgreSQL was down
    there) is not its caller's new memory: its call was made before the forget."""
    before = transcription("conv_before_forget", caller=MARIA)
    run(store.share_forget(MARIA, [], keep_for=3600))
    after = transcription("conv_after_forget", caller=MARIA)
    after["event_timestamp"] = int(time.time()) + 5
    assert run(add_payload(store, before)).forgotten
    assert run(add_payload(store, after)).created
    assert [c.conversation_id for c in run(store.list_calls(MARIA))] == ["conv_after_forget"]
    # Another caller's calls are not held up.
    assert run(add_payload(store, transcription("conv_james", caller=JAMES), JAMES)).created


def test_a_replica_whose_cursor_is_past_every_forget_reads_them_all(
    store: PostgresStore, run: Run[Any]
) -> None:
    """A number past every kept one is another database's (the store was moved): every
    forget here is new to that replica."""
    run(store.share_forget(MARIA, [], keep_for=3600))
    assert [forget.user_id for forget in run(store.forgets_after(1000))] == [MARIA]


def test_turning_encryption_on_seals_what_was_kept_in_clear(
    postgres_url: str, run: Run[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "REKEY_BATCH", 7)  # memories re-keyed over several batches
    plain = PostgresStore(postgres_url)
    payload = transcription("conv_clear", caller=MARIA, turns=[("user", "My molar aches.")])
    run(add_payload(plain, payload))
    run(plain.put_caller_profile(MARIA, {"name": "Maria Lopez", "call_count": 1}))
    run(plain.share_forget(JAMES, ["conv_of_james"], keep_for=3600))
    run(plain.close())
    assert b"4155550123" in raw_dump(postgres_url)
    assert b"4155550188" in raw_dump(postgres_url)

    sealed = PostgresStore(postgres_url, cipher=PayloadCipher(generate_key(), enabled=True))
    try:
        run(sealed.check())
        dump = raw_dump(postgres_url)
        for secret in (b"4155550123", b"4155550188", b"conv_of_james", b"molar", b"Lopez"):
            assert secret not in dump, secret
        (forget,) = run(sealed.forgets_after(0))
        assert (forget.user_id, forget.conversation_ids) == (JAMES, ("conv_of_james",))
        assert [c.conversation_id for c in run(sealed.list_calls(MARIA))] == ["conv_clear"]
        assert run(sealed.get_caller_profile(MARIA)) == {"name": "Maria Lopez", "call_count": 1}
        assert [c.user_id for c in run(sealed.list_callers(name="maria")).callers] == [MARIA]
        assert run(CallerIndexes(sealed).search(MARIA, "molar"))
        # The callers' memory versions moved to their keyed hashes with their memories.
        assert kept_versions(postgres_url) == counted_versions(postgres_url)
        assert not any(key.startswith("+") for key in kept_versions(postgres_url))
        assert run(sealed.memory_version(MARIA)).count == len(run(sealed.list_memories(MARIA)))
    finally:
        run(sealed.close())


# Counters shared by replicas -------------------------------------------------------------
def test_a_shared_counter_gives_each_increment_of_any_replica_its_own_count(
    postgres_url: str, run: Run[Any]
) -> None:
    replicas = [PostgresStore(postgres_url) for _ in range(4)]

    async def increment_all() -> list[int]:
        return await asyncio.gather(
            *(replicas[n % 4].shared_increment("burst", 300) for n in range(20))
        )

    try:
        # Exactly one increment sees any given count: one replica crosses a threshold.
        assert sorted(run(increment_all())) == list(range(1, 21))
        with psycopg.connect(postgres_url) as connection:
            connection.execute(
                "INSERT INTO shared_counters VALUES ('old window', 7, 1.0)"
                " ON CONFLICT (name) DO NOTHING"
            )
            connection.execute("UPDATE shared_counters SET expires_at = 1.0 WHERE name = 'burst'")
        # An expired counter starts again; a new one takes expired ones away.
        assert run(replicas[0].shared_increment("burst", 300)) == 1
        assert run(replicas[1].shared_increment("next window", 300)) == 1
        with psycopg.connect(postgres_url) as connection:
            names = connection.execute("SELECT name FROM shared_counters").fetchall()
        assert sorted(name for (name,) in names) == ["burst", "next window"]
    finally:
        for replica in replicas:
            run(replica.close())


def test_a_pooled_connection_is_checked_only_once_the_server_said_something(
    postgres_url: str,
) -> None:
    """The liveness round trip before each transaction is skipped for a connection the
    server has been silent on; one the server ended (a restart, a terminated backend)
    has the reason or the end of its stream waiting, and is checked (then replaced)."""
    from elaoms.memory.postgres import _heard_from_server

    async def scenario() -> None:
        connection = await psycopg.AsyncConnection.connect(postgres_url)
        try:
            await connection.execute("SELECT 1")
            await connection.commit()
            assert not _heard_from_server(connection)
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (connection.info.backend_pid,))
            deadline = asyncio.get_running_loop().time() + 20
            while not _heard_from_server(connection):
                assert asyncio.get_running_loop().time() < deadline, "the end never arrived"
                await asyncio.sleep(0.01)
        finally:
            await connection.close()
        assert _heard_from_server(connection)  # closed: the round trip decides

    asyncio.run(scenario())
