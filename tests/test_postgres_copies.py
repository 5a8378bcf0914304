"""A PostgreSQL store's copies of callers' rows: served only while they are current.

Two stores on one database stand for two replicas: what one writes, the other stops
serving from its copy as soon as PostgreSQL tells it (LISTEN/NOTIFY), and neither serves
a copy while it cannot hear about changes."""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_postgres_store import MARIA, add_payload

from elaoms.crypto import EncryptionConfigError
from elaoms.memory import postgres
from elaoms.memory.base import MemoryVersion
from elaoms.memory.postgres import PostgresStore
from elaoms.memory.postgres_copies import (
    ABSENT,
    APPLICATION_NAME,
    BUCKETS,
    CHANNEL,
    EVERYONE,
    RECENT_CHANGES,
    CallerCopies,
    DeafListenerError,
    ProfiledCallers,
    ProfiledRead,
    copy_key,
)
from elaoms.payloads import decode, encode
from elaoms.search.indexes import CallerIndexes

from conftest import WAIT_BOUND, make_settings, transcription
from openmemory_standin import Run, run  # noqa: F401 - fixture by name

WAIT = WAIT_BOUND  # what a condition may take on a loaded machine (met in milliseconds)


async def until(condition: Callable[[], Any], what: str) -> None:
    """Wait until `condition()` holds (the listener runs meanwhile, on this loop)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT:.0f} s: {what}")
        await asyncio.sleep(0.01)


async def until_async(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT:.0f} s: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def replicas(postgres_url: str, run: Run[Any]) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    first, second = PostgresStore(postgres_url), PostgresStore(postgres_url)

    async def listening() -> None:
        for store in (first, second):
            await store.check()  # opens the pool, which starts listening
            await until(lambda store=store: store.copies.listening, "listening")

    run(listening())
    yield first, second
    run(first.close())
    run(second.close())


def profile(greeting: str) -> dict[str, Any]:
    return {"user_id": MARIA, "call_count": 1, "greeting": greeting}


def stored(greeting: str) -> bytes:
    return encode(profile(greeting))


# One process's bookkeeping -------------------------------------------------------------
def listening_copies(size: int = 8) -> CallerCopies:
    copies = CallerCopies(size)
    copies._begin_session()  # as the listener does once LISTEN is in place
    return copies


def test_a_read_that_raced_a_change_of_its_caller_is_not_kept() -> None:
    copies = listening_copies()
    token = copies.token()
    copies.changed("maria")
    copies.keep_profile("maria", token, stored("old"))
    assert copies.profile("maria") is ABSENT
    token = copies.token()
    copies.changed("james")  # another caller's change leaves this read alone
    copies.keep_profile("maria", token, stored("current"))
    assert copies.profile("maria") == stored("current")


def test_everyone_changing_or_too_many_changes_keep_nothing() -> None:
    copies = listening_copies()
    copies.keep_version("maria", copies.token(), MemoryVersion(3, 30))
    copies.notified(EVERYONE)
    assert copies.version("maria") is None
    token = copies.token()
    copies.notified(EVERYONE)
    copies.keep_version("maria", token, MemoryVersion(3, 30))
    assert copies.version("maria") is None
    token = copies.token()
    for number in range(RECENT_CHANGES + 1):
        copies.changed(f"caller {number}")
    copies.keep_version("maria", token, MemoryVersion(3, 30))
    assert copies.version("maria") is None  # one forgotten change may have been Maria's


def test_nothing_is_kept_or_served_unless_listening() -> None:
    copies = CallerCopies(8)
    copies.keep_profile("maria", copies.token(), stored("hello"))
    assert copies.profile("maria") is ABSENT
    copies._begin_session()
    token = copies.token()
    copies.keep_profile("maria", token, None)  # "no profile" is a copy too
    assert copies.profile("maria") is None
    copies._end_session()
    assert copies.profile("maria") is ABSENT
    copies._begin_session()
    copies.keep_profile("maria", token, stored("from the last session"))
    assert copies.profile("maria") is ABSENT


def test_copies_are_bounded() -> None:
    copies = listening_copies(size=2)
    for caller in ("maria", "james", "ana"):
        copies.keep_profile(caller, copies.token(), stored(caller))
    assert copies.profile("maria") is ABSENT
    assert copies.profile("ana") == stored("ana")


def test_copies_filled_at_start_go_first_and_never_push_a_copy_out() -> None:
    """Filling the copies (oldest callers last) keeps what requests read meanwhile, and
    where the requests left it: the callers filled in are the first to go."""
    copies = listening_copies(size=3)
    token = copies.token()
    copies.keep_profile("ana", copies.token(), stored("read by a request"))
    assert copies.keep_older_profile("ana", token, stored("older read"))
    copies.changed("james")  # changed after the fill's read began: its row is stale
    for caller in ("maria", "james", "lee"):  # newest first
        assert copies.keep_older_profile(caller, token, stored(caller))
    assert not copies.keep_older_profile("chen", token, stored("chen"))  # full
    assert copies.profile("ana") == stored("read by a request")
    assert copies.profile("james") is ABSENT and copies.profile("chen") is ABSENT
    copies.keep_profile("tom", copies.token(), stored("tom"))  # one more: the oldest goes
    assert copies.profile("lee") is ABSENT
    assert copies.profile("maria") == stored("maria")


def test_the_copies_hold_as_many_callers_as_the_setting_says(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, database_url="postgresql://elaoms@db.internal/elaoms", database_caller_copies=5
    )
    assert PostgresStore.from_settings(settings).copies.size == 5


def profiled(*callers: str) -> ProfiledRead:
    read = ProfiledRead()
    for caller in callers:
        read.add(caller)
    return read


def test_a_stranger_is_answered_without_a_read_once_every_profiled_caller_is_known() -> None:
    copies = listening_copies()
    assert copies.profile("stranger") is ABSENT  # the profiled callers not read yet
    token = copies.token()
    copies.changed("james")  # got a profile while the read was in flight
    asyncio.run(copies.keep_profiled(token, profiled("maria")))
    assert copies.profile("stranger") is None
    assert copies.profile("maria") is ABSENT  # has a profile: read from the store
    assert copies.profile("james") is ABSENT
    copies.changing("ana")  # a newcomer's first profile, before its commit
    assert copies.profile("ana") is ABSENT


def test_strangers_are_not_answered_from_a_read_that_everyone_changing_made_stale() -> None:
    copies = listening_copies()
    token = copies.token()
    copies.notified(EVERYONE)  # keys rewritten, or a store copied in
    asyncio.run(copies.keep_profiled(token, profiled("maria")))
    assert copies.profile("stranger") is ABSENT
    asyncio.run(copies.keep_profiled(copies.token(), profiled("maria")))
    assert copies.profile("stranger") is None
    copies.notified(EVERYONE)
    assert copies.profile("stranger") is ABSENT  # read again before trusted
    asyncio.run(copies.keep_profiled(copies.token(), profiled("maria")))
    copies._end_session()
    copies._begin_session()
    assert copies.profile("stranger") is ABSENT  # a new session reads them again


def test_profiled_callers_hold_each_caller_once_in_order() -> None:
    callers = ProfiledCallers()
    read = profiled(*(f"caller {number}" for number in range(0, 20_000, 2)))
    for bucket in range(BUCKETS):
        callers.merge(read, bucket)
    for _ in range(2):  # a regular caller's every call: held once
        for number in range(20_000):
            callers.changed(copy_key(f"caller {number}"))
    held = [number for bucket in callers._buckets for number in bucket]
    assert held == sorted(set(held)) and len(held) == 20_000
    assert copy_key("caller 0") in callers and copy_key("caller 19999") in callers
    assert copy_key("stranger") not in callers


# Two replicas on one database ----------------------------------------------------------
def test_a_profile_written_by_one_replica_replaces_the_others_copy(
    replicas: tuple[PostgresStore, PostgresStore], run: Run[Any]
) -> None:
    first, second = replicas

    async def scenario() -> None:
        assert await second.get_caller_profile(MARIA) is None  # "none" kept as a copy
        await first.put_caller_profile(MARIA, profile("Hello Maria"))
        await until_async(
            lambda: _greets(second, "Hello Maria"), "the other replica sees the profile"
        )
        await first.put_caller_profile(MARIA, profile("Welcome back Maria"))
        # The writer's own copy goes at once, before any notification.
        assert (await first.get_caller_profile(MARIA) or {})["greeting"] == "Welcome back Maria"
        await until_async(
            lambda: _greets(second, "Welcome back Maria"), "the other replica sees the change"
        )
        await first.delete_user(MARIA)
        await until_async(lambda: _absent(second), "the other replica sees the caller forgotten")

    run(scenario())


async def _greets(store: PostgresStore, greeting: str) -> bool:
    return ((await store.get_caller_profile(MARIA)) or {}).get("greeting") == greeting


async def _copied(store: PostgresStore, greeting: str) -> bool:
    """Read (a read the last change's notification overtook is not kept), then look at
    the copy itself."""
    await store.get_caller_profile(MARIA)
    copy = store.copies.profile(store._key(MARIA))
    return isinstance(copy, bytes) and decode(copy)["greeting"] == greeting


async def _absent(store: PostgresStore) -> bool:
    return await store.get_caller_profile(MARIA) is None


def test_a_call_stored_by_one_replica_is_searched_on_the_other(
    replicas: tuple[PostgresStore, PostgresStore], run: Run[Any]
) -> None:
    first, second = replicas

    async def scenario() -> None:
        await add_payload(first, transcription("conv_copies_1", caller=MARIA))
        version = await second.memory_version(MARIA)

        async def copied() -> bool:
            # A read the change's notification overtook is not kept: read again.
            await second.memory_version(MARIA)
            return second.index_version_now(MARIA) == version  # held: no round trip

        await until_async(copied, "the version copied")
        await add_payload(first, transcription("conv_copies_2", caller=MARIA))
        await until(
            lambda: second.index_version_now(MARIA) is None, "the other replica's copy goes"
        )
        newer = await second.memory_version(MARIA)
        assert newer.count > version.count and newer.last_seq > version.last_seq

    run(scenario())


def test_no_copy_is_served_while_not_listening(
    replicas: tuple[PostgresStore, PostgresStore], postgres_url: str, run: Run[Any]
) -> None:
    first, second = replicas

    async def scenario() -> None:
        await first.put_caller_profile(MARIA, profile("Hello Maria"))
        await until_async(lambda: _copied(second, "Hello Maria"), "copied")
        # The listening connections dropped (as by a network cut or a restart): whatever
        # changes until they are back would go unheard, so nothing is served meanwhile.
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (APPLICATION_NAME,),
            )
        await until(lambda: not second.copies.listening, "the loss noticed")
        assert second.copies.profile(second._key(MARIA)) is ABSENT
        await first.put_caller_profile(MARIA, profile("Changed while deaf"))
        assert await _greets(second, "Changed while deaf")  # read from the database
        await until(lambda: second.copies.listening, "listening again")
        await until_async(lambda: _copied(second, "Changed while deaf"), "copied again")

    run(scenario())


def test_a_replica_that_starts_listening_copies_the_callers_who_called_last(
    postgres_url: str, run: Run[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker just started (a deploy) answers the callers of the last days without a
    read: as soon as it listens, its copies are filled with their profiles, newest callers
    first, a page at a time, and the oldest of them are the first to go."""
    monkeypatch.setattr(postgres, "WARM_PAGE", 2)
    callers = [f"+1415555018{number}" for number in range(5)]  # the last called last

    async def scenario() -> None:
        writer = PostgresStore(postgres_url)
        reader = PostgresStore(postgres_url, caller_copies=3)
        try:
            for number, caller in enumerate(callers):
                await writer.put_caller_profile(
                    caller,
                    {
                        "user_id": caller,
                        "call_count": 1,
                        "last_call_at": 1_000 + number,
                        "greeting": f"Hello {number}",
                    },
                )
            await reader.check()  # opens the pool, which starts listening

            def copied(caller: str) -> bool:
                return isinstance(reader.copies.profile(reader._key(caller)), bytes)

            await until(lambda: all(map(copied, callers[2:])), "the three newest copied")
            assert not copied(callers[1]) and not copied(callers[0])  # bounded
            reads = count_reads(reader, monkeypatch)
            assert (await reader.get_caller_profile(callers[4]) or {})["greeting"] == "Hello 4"
            assert reads == []
            assert (await reader.get_caller_profile(callers[0]) or {})["greeting"] == "Hello 0"
            assert len(reads) == 1
            assert not copied(callers[2])  # the oldest copy made room
            assert copied(callers[3]) and copied(callers[4]) and copied(callers[0])
        finally:
            await writer.close()
            await reader.close()

    run(scenario())


def test_a_listener_that_hears_nothing_is_not_trusted(postgres_url: str) -> None:
    """Through a pooler in transaction mode LISTEN is accepted and nothing another session
    sends is heard: the listener has a notification sent from another connection first
    (and again whenever it has been quiet), and without it keeps and serves nothing. A
    connection that never listened stands for one."""

    async def scenario() -> None:
        copies = CallerCopies(8)
        sender = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
        deaf = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
        hearing = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)

        async def send(channel: str, payload: str) -> None:
            await sender.execute("SELECT pg_notify(%s, %s)", (channel, payload))

        try:
            with pytest.raises(DeafListenerError):
                await copies._hear_probe(deaf, 1.0, send)
            await hearing.execute(f"LISTEN {CHANNEL}")
            await copies._hear_probe(hearing, WAIT, send)
        finally:
            for connection in (sender, deaf, hearing):
                await connection.close()

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def two_stores(url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two replicas, neither listening yet."""
    first, second = PostgresStore(url), PostgresStore(url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def no_warming(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores that start listening copy no profile before one is asked for."""

    async def nothing(store: PostgresStore) -> None:
        pass

    monkeypatch.setattr(PostgresStore, "_copy_newest_callers", nothing)


def count_reads(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements the store's reads send from now on (each passes `_read_rows`)."""
    statements: list[str] = []
    read_rows = store._read_rows

    async def counted(query: str, params: Any, **options: Any) -> list[tuple[Any, ...]]:
        statements.append(query)
        return await read_rows(query, params, **options)

    monkeypatch.setattr(store, "_read_rows", counted)
    return statements


def test_a_replica_answers_strangers_without_a_read_and_hears_of_newcomers(
    postgres_url: str, run: Run[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Most numbers that ring have never called: once a replica knows every caller with a
    profile, a stranger costs no read, and a newcomer's profile stored by another replica
    is found within a notification."""
    no_warming(monkeypatch)  # every profile is then a read
    known, newcomer = "+14155550191", "+14155550192"

    async def scenario() -> None:
        async with two_stores(postgres_url) as (writer, reader):
            await writer.put_caller_profile(known, {"user_id": known, "greeting": "Hi"})
            await reader.check()  # opens the pool, which starts listening
            await until(lambda: reader.copies.profiled.complete, "the profiled callers read")
            reads = count_reads(reader, monkeypatch)
            assert await reader.get_caller_profile("+14155550199") is None
            assert reads == []
            assert (await reader.get_caller_profile(known) or {})["greeting"] == "Hi"
            assert len(reads) == 1

            await writer.put_caller_profile(newcomer, {"user_id": newcomer, "greeting": "Yo"})
            await until_async(
                lambda: _greeted(reader, newcomer, "Yo"), "the newcomer found on the reader"
            )

            heard = reader.copies._everyone_at
            await writer._notify(CHANNEL, EVERYONE)  # as a store copied in says
            await until(lambda: reader.copies._everyone_at > heard, "EVERYONE heard")
            await until(lambda: reader.copies.profiled.complete, "the profiled callers read again")
            reads.clear()
            assert await reader.get_caller_profile("+14155550199") is None
            assert reads == []
            assert (await reader.get_caller_profile(newcomer) or {})["greeting"] == "Yo"

    run(scenario())


def test_callers_asked_together_are_read_in_one_statement(
    postgres_url: str, run: Run[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of client-data requests for callers this worker has no copy of (each asked
    for the first time here) takes one pooled connection, not one each: ten a worker
    queued under load. Each caller still gets their own profile, or none."""
    no_warming(monkeypatch)  # every profile is then a read
    callers = [f"+1415555{number:04d}" for number in range(40)]
    profiled = callers[::2]

    async def scenario() -> None:
        async with two_stores(postgres_url) as (writer, reader):
            for caller in profiled:
                await writer.put_caller_profile(caller, {"user_id": caller, "greeting": caller})
            await reader.check()
            await until(lambda: reader.copies.profiled.complete, "the profiled callers read")
            # Not yet among the profiled callers of the reader: a read each, as a newcomer.
            reader.copies.profiled.clear()
            statements = count_reads(reader, monkeypatch)
            answers = await asyncio.gather(*(reader.get_caller_profile(c) for c in callers))
            assert [(a or {}).get("greeting") for a in answers] == [
                caller if caller in profiled else None for caller in callers
            ]
            assert len(statements) == 1
            statements.clear()  # now copies: no read at all
            again = await asyncio.gather(*(reader.get_caller_profile(c) for c in profiled))
            assert [(a or {})["greeting"] for a in again] == profiled
            assert statements == []

    run(scenario())


def test_a_profile_that_cannot_be_opened_fails_only_its_own_caller(
    postgres_url: str, run: Run[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers read together share a statement, not a failure: a profile sealed with a
    key this replica lacks fails its caller's read, and the caller asked with it is
    answered."""
    no_warming(monkeypatch)
    broken, fine = "+14155557001", "+14155557002"

    async def scenario() -> None:
        async with two_stores(postgres_url) as (writer, reader):
            for caller in (broken, fine):
                await writer.put_caller_profile(caller, {"user_id": caller, "greeting": "Hi"})
            with psycopg.connect(postgres_url, autocommit=True) as connection:
                connection.execute(
                    "UPDATE caller_profiles SET profile = %s WHERE user_id = %s",
                    (b"gAAAAA-sealed-with-another-key", broken),
                )
            await reader.check()
            await until(lambda: reader.copies.profiled.complete, "the profiled callers read")
            statements = count_reads(reader, monkeypatch)
            answers = await asyncio.gather(
                reader.get_caller_profile(broken),
                reader.get_caller_profile(fine),
                return_exceptions=True,
            )
            assert isinstance(answers[0], EncryptionConfigError)
            assert answers[1] == {"user_id": fine, "greeting": "Hi"}
            assert len(statements) == 1

    run(scenario())


def test_searches_asked_together_read_their_index_states_in_one_statement(
    postgres_url: str, run: Run[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Searches of callers whose index this worker does not hold read each caller's
    memory version and saved index: asked together, in one statement, each caller still
    getting their own (a caller with nothing stored: an empty version, no index)."""
    callers = [f"+1415556{number:04d}" for number in range(12)]
    called = callers[::3]

    async def scenario() -> None:
        async with two_stores(postgres_url) as (writer, reader):
            for number, caller in enumerate(called):
                for call in range(number + 1):
                    await add_payload(
                        writer, transcription(f"conv_batch_{number}_{call}", caller), caller
                    )
            await CallerIndexes(writer).save(called[1])  # one saved index among them
            alone = [await reader.index_state(caller) for caller in callers]
            statements = count_reads(reader, monkeypatch)
            together = await asyncio.gather(*(reader.index_state(c) for c in callers))
            assert together == alone
            assert len(statements) == 1
            assert [state.version.count > 0 for state in together] == [
                caller in called for caller in callers
            ]
            assert [state.saved is not None for state in together] == [
                caller == called[1] for caller in callers
            ]

    run(scenario())


async def _greeted(store: PostgresStore, caller: str, greeting: str) -> bool:
    return ((await store.get_caller_profile(caller)) or {}).get("greeting") == greeting


def test_a_store_closed_while_it_warms_closes_quietly(
    postgres_url: str, run: Run[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A one-shot command (the CLI) closes the store while its copies are still being
    warmed: the read is cancelled once and waited for, so psycopg cancels the query on
    the server instead of dropping the connection with a warning."""

    async def seed() -> None:
        store = PostgresStore(postgres_url)
        await store.check()
        async with await psycopg.AsyncConnection.connect(postgres_url) as connection:
            await connection.execute(
                "INSERT INTO caller_profiles (user_id, profile, updated_at)"
                " SELECT '+1415' || lpad(n::text, 7, '0'), convert_to('{}', 'UTF8'), 0"
                " FROM generate_series(1, 50000) AS n ON CONFLICT DO NOTHING"
            )
        await store.close()

    async def open_and_close(moment: int) -> None:
        store = PostgresStore(postgres_url)
        await store.check()
        await until(lambda: store.copies.listening, "listening")
        for _ in range(moment):  # closed at a different point of the warm each time
            await asyncio.sleep(0)
        await store.close()

    run(seed())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for moment in range(0, 60, 3):
            run(open_and_close(moment))
    warned = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.getMessage() for record in warned] == []
