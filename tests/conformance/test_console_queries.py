"""What the operator console asks every store: a page of callers, calls per day, agents.

Run on each backend alike, and on the embedded store with encryption at rest on (names are
then kept as keyed hashes, so a name search matches whole words).
"""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elaoms.crypto import PayloadCipher, generate_key
from elaoms.memory.base import MemoryStore
from elaoms.memory.postgres import PostgresStore
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import call_memories

from conftest import transcription
from openmemory_standin import (  # noqa: F401 - fixtures by name
    Run,
    StandIn,
    fresh_standin,
    openmemory_store,
    run,
    standin,
)

DAY = 86_400
MARIA = "+14155550123"
JAMES = "+14155550188"
WEI = "+442071838750"


@pytest.fixture(
    params=["sqlite", "sqlite-encrypted", "openmemory", "postgres", "postgres-encrypted"]
)
def store(request: pytest.FixtureRequest, tmp_path: Path, run: Run[Any]) -> Iterator[MemoryStore]:
    if request.param == "sqlite":
        backend: MemoryStore = SQLiteStore(tmp_path / "memory.sqlite3")
    elif request.param == "sqlite-encrypted":
        cipher = PayloadCipher(generate_key(), enabled=True)
        backend = SQLiteStore(tmp_path / "memory.sqlite3", cipher=cipher)
    elif request.param.startswith("postgres"):
        encrypted = request.param.endswith("-encrypted")
        backend = PostgresStore(
            request.getfixturevalue("postgres_url"),
            cipher=PayloadCipher(generate_key(), enabled=True) if encrypted else None,
        )
    else:
        server: StandIn = request.getfixturevalue("fresh_standin")
        backend = openmemory_store(server, tmp_path)
    yield backend
    run(backend.close())


def add_call(
    run: Run[Any], store: MemoryStore, caller: str, conversation_id: str, started_at: int
) -> None:
    payload = transcription(conversation_id, caller=caller)
    payload["data"]["agent_id"] = f"agent_{conversation_id[-1]}"
    payload["data"]["metadata"]["start_time_unix_secs"] = started_at
    run(
        store.add_call(
            caller, CallRecord.from_payload(payload), payload, call_memories(caller, payload)
        )
    )


def profile(name: str | None, calls: int, last: int) -> dict[str, Any]:
    return {"name": name, "call_count": calls, "last_call_at": last, "greeting": "Hi"}


def test_callers_are_listed_latest_call_first_a_page_at_a_time(
    store: MemoryStore, run: Run[Any]
) -> None:
    run(store.put_caller_profile(MARIA, profile("Maria Lopez", 3, 1_700_000_300)))
    run(store.put_caller_profile(JAMES, profile("James Okafor", 1, 1_700_000_900)))
    run(store.put_caller_profile(WEI, profile(None, 2, 1_700_000_100)))

    first = run(store.list_callers(limit=2))
    second = run(store.list_callers(limit=2, offset=2))

    assert first.total == second.total == 3
    assert [c.user_id for c in first.callers] == [JAMES, MARIA]
    assert [c.user_id for c in second.callers] == [WEI]
    maria = first.callers[1]
    assert (maria.name, maria.call_count, maria.last_started_at) == (
        "Maria Lopez",
        3,
        1_700_000_300,
    )
    assert second.callers[0].name is None


def test_callers_are_found_by_digits_of_their_number_or_by_name(
    store: MemoryStore, run: Run[Any]
) -> None:
    run(store.put_caller_profile(MARIA, profile("Maria Lopez", 3, 1_700_000_300)))
    run(store.put_caller_profile(JAMES, profile("James Okafor", 1, 1_700_000_900)))

    by_last_digits = run(store.list_callers(number="0188"))
    by_formatted_number = run(store.list_callers(number="(415) 555-0123"))
    by_name = run(store.list_callers(name="lopez"))
    by_both_words = run(store.list_callers(name="MARIA  lopez"))
    nobody = run(store.list_callers(name="Smith"))

    assert [c.user_id for c in by_last_digits.callers] == [JAMES]
    assert [c.user_id for c in by_formatted_number.callers] == [MARIA]
    assert [c.user_id for c in by_name.callers] == [MARIA]
    assert [c.user_id for c in by_both_words.callers] == [MARIA]
    assert (nobody.total, nobody.callers) == (0, [])


def test_a_replaced_profile_updates_the_caller_s_line(store: MemoryStore, run: Run[Any]) -> None:
    run(store.put_caller_profile(MARIA, profile(None, 1, 1_700_000_300)))
    run(store.put_caller_profile(MARIA, profile("Maria", 2, 1_700_000_600)))

    page = run(store.list_callers(name="maria"))

    assert page.total == 1
    assert (page.callers[0].call_count, page.callers[0].last_started_at) == (2, 1_700_000_600)


def test_a_forgotten_caller_leaves_the_list(store: MemoryStore, run: Run[Any]) -> None:
    add_call(run, store, MARIA, "conv_a1", 1_700_000_000)
    run(store.put_caller_profile(MARIA, profile("Maria Lopez", 1, 1_700_000_000)))
    run(store.put_caller_profile(JAMES, profile("James", 1, 1_700_000_000)))

    run(store.delete_user(MARIA))

    page = run(store.list_callers())
    assert [c.user_id for c in page.callers] == [JAMES]
    assert run(store.list_callers(name="maria")).total == 0


def test_calls_are_counted_per_day_for_everyone_or_one_caller(
    store: MemoryStore, run: Run[Any]
) -> None:
    day = 19_700
    add_call(run, store, MARIA, "conv_m1", day * DAY + 100)
    add_call(run, store, MARIA, "conv_m2", day * DAY + 5_000)
    add_call(run, store, JAMES, "conv_j3", day * DAY + 200)
    add_call(run, store, JAMES, "conv_j4", (day + 2) * DAY + 10)
    add_call(run, store, JAMES, "conv_j5", (day - 5) * DAY)  # before `since`

    everyone = run(store.calls_per_day(since=(day - 1) * DAY))
    maria = run(store.calls_per_day(MARIA, since=(day - 1) * DAY))

    assert everyone == {day: 3, day + 2: 1}
    assert maria == {day: 2}


def test_the_agents_stored_calls_name_are_listed_once_each(
    store: MemoryStore, run: Run[Any]
) -> None:
    add_call(run, store, MARIA, "conv_m1", 1_700_000_000)
    add_call(run, store, JAMES, "conv_j1", 1_700_000_000)
    add_call(run, store, JAMES, "conv_j2", 1_700_000_000)

    assert run(store.list_agent_ids()) == ["agent_1", "agent_2"]


def test_a_store_from_before_the_caller_list_lists_its_callers_when_opened(
    tmp_path: Path, run: Run[Any]
) -> None:
    path = tmp_path / "memory.sqlite3"
    old = SQLiteStore(path)
    run(old.put_caller_profile(MARIA, profile("Maria Lopez", 2, 1_700_000_300)))
    run(old.close())
    with sqlite3.connect(path) as connection:  # as a file written by an earlier version
        connection.execute("DROP TABLE caller_directory")

    reopened = SQLiteStore(path)
    try:
        page = run(reopened.list_callers(name="maria"))
    finally:
        run(reopened.close())

    assert [(c.user_id, c.call_count) for c in page.callers] == [(MARIA, 2)]


def test_a_page_past_the_last_is_empty_but_still_counts_the_callers(
    store: MemoryStore, run: Run[Any]
) -> None:
    run(store.put_caller_profile(MARIA, profile("Maria Lopez", 3, 1_700_000_300)))
    run(store.put_caller_profile(JAMES, profile("James Lopez", 1, 1_700_000_900)))

    everyone = run(store.list_callers(limit=50, offset=50))
    lopez = run(store.list_callers(name="lopez", limit=1, offset=5))

    assert (everyone.callers, everyone.total) == ([], 2)
    assert (lopez.callers, lopez.total) == ([], 2)
