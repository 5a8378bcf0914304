"""The OpenMemory backend against the stand-in's faults: what is sent, and the defences."""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elaoms.config import MemoryBackend
from elaoms.memory import create_store
from elaoms.memory.base import StoreUnavailableError
from elaoms.memory.openmemory import PROBE_USER, OpenMemoryStore
from elaoms.memory.records import CallRecord
from elaoms.memory.units import call_memories
from elaoms.search.indexes import CallerIndexes

from conftest import make_settings, transcription
from openmemory_standin import (  # noqa: F401 - fixtures by name
    Run,
    StandIn,
    fresh_standin,
    openmemory_store,
    run,
    simhash16,
    standin,
)

MARIA = "+14155550123"
JAMES = "+14155550188"


@pytest.fixture
def server(fresh_standin: StandIn) -> StandIn:
    return fresh_standin


@pytest.fixture
def store(server: StandIn, tmp_path: Path, run: Run[Any]) -> Iterator[OpenMemoryStore]:
    backend = openmemory_store(server, tmp_path)
    yield backend
    run(backend.close())


def add_call(run: Run[Any], store: OpenMemoryStore, conversation_id: str, caller: str, **kw: Any):
    payload = transcription(conversation_id, caller=caller, **kw)
    return payload, run(
        store.add_call(
            caller, CallRecord.from_payload(payload), payload, call_memories(caller, payload)
        )
    )


def requests_to(server: StandIn, method: str, prefix: str) -> int:
    return sum(1 for m, path in server.state.requests if m == method and path.startswith(prefix))


# What is stored -------------------------------------------------------------------------
def test_a_call_is_stored_as_readable_units_of_its_caller(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    payload, receipt = add_call(run, store, "conv_units", MARIA)
    units = call_memories(MARIA, payload)

    # Units go up a few at a time, so the server's order is not the call's.
    by_unit = {m["metadata"]["elaoms_unit"]: m for m in server.state.memories.values()}
    assert len(by_unit) == len(units)
    assert receipt.memory_id == by_unit[units[0].id]["id"]  # the call's first unit
    for unit in units:
        memory = by_unit[unit.id]
        header, body = memory["content"].split("\n", 1)
        assert memory["user_id"] == MARIA
        assert header.startswith(f"Caller {MARIA}, call conv_units, ")
        assert body == unit.content
        assert "conversation:conv_units" in memory["tags"]
        assert f"agent:{payload['data']['agent_id']}" in memory["tags"]
        assert "event:post_call_transcription" in memory["tags"]
        assert memory["metadata"]["conversation_id"] == "conv_units"
        assert memory["metadata"]["event_timestamp"] == payload["event_timestamp"]
    assert not requests_to(server, "GET", "/users/" + MARIA + "/summary")


def test_the_whole_payload_survives_a_server_that_truncates(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    server.faults.truncate = True
    long_turn = "I need to explain the whole history of my treatment. " * 20
    payload, _ = add_call(run, store, "conv_long", MARIA, turns=[("user", long_turn)])

    assert run(store.get_call("conv_long")).payload == payload  # type: ignore[union-attr]
    assert all(len(m["content"]) <= 200 for m in server.state.memories.values())


def test_a_call_without_words_still_gets_an_openmemory_id(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    payload = transcription("conv_silent", caller=MARIA, turns=[])
    payload["data"]["analysis"] = {}

    receipt = run(store.add_call(MARIA, CallRecord.from_payload(payload), payload, []))

    assert receipt.memory_id in server.state.memories


def test_agent_profiles_are_memories_of_the_agent(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    run(store.put_agent_profile("agent_a", {"agent_id": "agent_a", "name": "Ava"}, 100.0))
    run(store.put_agent_profile("agent_a", {"agent_id": "agent_a", "name": "Ava 2"}, 200.0))

    (memory,) = server.state.memories.values()
    assert memory["user_id"] == "agent_a"
    assert memory["metadata"] == {
        "type": "agent_profile",
        "agent_id": "agent_a",
        "fetched_at": 200.0,
    }
    assert memory["content"] == '{"agent_id": "agent_a", "name": "Ava 2"}'


# Deduplication ----------------------------------------------------------------------------
def test_a_memory_folded_into_another_caller_s_is_added_again(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    run(store.add_memory(JAMES, "Wants a call back about his crown."))
    # Exactly one fold, into James's memory: the fingerprint check off, so the re-added
    # text (with its random mark) cannot happen to match a 16-bit fingerprint again.
    server.faults.dedup = False
    server.faults.collide_next = 1

    added = run(store.add_memory(MARIA, "Wants a call back about her filling."))

    assert server.state.memories[added.id]["user_id"] == MARIA
    assert [m.content for m in run(store.list_memories(MARIA))] == [
        "Wants a call back about her filling."
    ]
    assert store.dedup_collisions == 1


def test_no_caller_loses_a_unit_to_the_global_fingerprint(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    # Voice calls are full of short turns that look alike across callers and within a call.
    turns = [("agent", "Hello?"), ("user", "Yes."), ("agent", "Okay."), ("user", "Yes, thanks.")]
    callers = [f"+1415555{index:04d}" for index in range(5)]
    for index, caller in enumerate(callers * 3):
        add_call(run, store, f"conv_short_{index}", caller, turns=turns)

    for caller in callers:
        contents = [m.content for m in run(store.list_memories(caller))]
        expected = [
            unit.content
            for index in range(len(callers) * 3)
            if callers[index % len(callers)] == caller
            for unit in call_memories(caller, transcription(f"c{index}", caller, turns=turns))
        ]
        assert contents == expected


def test_a_long_turn_other_callers_also_said_is_stored_for_each(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    # The fingerprint is a vote of every distinct word: a few marker words cannot outvote
    # a long turn's, so a turn folded into another caller's kept folding on every attempt
    # and the call was never stored (OpenMemory lost calls late in a bench run, where more
    # fingerprints are taken). Words whose hash bits are mostly set make every caller's
    # copy of this turn share one fingerprint by a wide margin on each bit.
    words = [
        word
        for word in (f"w{number}" for number in range(2000))
        if simhash16(word).bit_count() >= 12
    ][:40]
    script = " ".join(words)
    callers = [f"+1415555{index:04d}" for index in range(5)]
    for index, caller in enumerate(callers):
        add_call(run, store, f"conv_script_{index}", caller, turns=[("agent", script)])

    for caller in callers:
        assert script in [m.content for m in run(store.list_memories(caller))]
    assert store.dedup_collisions >= 1


def test_a_retried_call_resumes_without_duplicates(
    server: StandIn, tmp_path: Path, run: Run[Any]
) -> None:
    store = openmemory_store(server, tmp_path, max_retries=0, concurrency=1)
    payload = transcription("conv_resume", caller=MARIA)
    units = call_memories(MARIA, payload)
    # The third add fails; the others still land and are recorded.
    original = store._request
    adds = 0

    async def failing_third_add(method: str, path: str, **kwargs: Any) -> Any:
        nonlocal adds
        if path == "/memory/add":
            adds += 1
            if adds == 3:
                server.faults.server_errors = 1
        return await original(method, path, **kwargs)

    store._request = failing_third_add  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailableError):
        run(store.add_call(MARIA, CallRecord.from_payload(payload), payload, units))
    assert run(store.get_call("conv_resume")) is None
    assert len(server.state.of(MARIA)) == len(units) - 1

    receipt = run(store.add_call(MARIA, CallRecord.from_payload(payload), payload, units))

    assert receipt.created is True
    assert len(server.state.of(MARIA)) == len(units)
    assert [m.content for m in run(store.list_memories(MARIA))] == [u.content for u in units]
    run(store.close())


# Foreign memories -------------------------------------------------------------------------
def test_another_user_s_memory_never_reaches_a_caller(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    run(store.add_memory(JAMES, "James's secret: his PIN is 4421, daughter filling."))
    run(store.add_memory(MARIA, "Her daughter needs a filling."))
    server.faults.leak = True

    memories = run(store.list_memories(MARIA))
    results = run(CallerIndexes(store).search(MARIA, "daughter filling PIN"))

    assert [m.content for m in memories] == ["Her daughter needs a filling."]
    assert results and all("James" not in m.content for m in results)
    assert {m.user_id for m in results} == {MARIA}
    assert store.foreign_memories_dropped >= 1


# Faults of the connection ------------------------------------------------------------------
def test_429_and_5xx_are_retried(server: StandIn, store: OpenMemoryStore, run: Run[Any]) -> None:
    server.faults.rate_limit = 2
    server.faults.server_errors = 1

    run(store.add_memory(MARIA, "Prefers mornings."))

    assert requests_to(server, "POST", "/memory/add") == 4


def test_giving_up_raises_store_unavailable(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    server.faults.rate_limit = 10

    with pytest.raises(StoreUnavailableError, match="429"):
        run(store.add_memory(MARIA, "Prefers mornings."))
    assert requests_to(server, "POST", "/memory/add") == store.max_retries + 1


def test_other_4xx_answers_are_not_retried(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    server.faults.bad_requests = 1

    with pytest.raises(StoreUnavailableError, match="400"):
        run(store.add_memory(MARIA, "Prefers mornings."))
    assert requests_to(server, "POST", "/memory/add") == 1


def test_a_slow_server_times_out(server: StandIn, tmp_path: Path, run: Run[Any]) -> None:
    store = openmemory_store(server, tmp_path, timeout=0.2, max_retries=1)
    run(store.add_memory(MARIA, "Her daughter needs a filling."))
    # Two tries of 0.2 s each, against a server that takes 3 s: the bound tells one from
    # the other with room for a loaded host on both sides.
    server.faults.delay = 3.0
    started = time.monotonic()

    with pytest.raises(StoreUnavailableError):  # her memories are read from the server
        run(CallerIndexes(store).search(MARIA, "filling"))

    assert time.monotonic() - started < 2.0
    server.faults.delay = 0
    run(store.close())


def test_a_server_that_is_down_is_unavailable(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    run(store.add_memory(MARIA, "Her daughter needs a filling."))
    server.stop()
    try:
        for operation in (
            store.check(),
            CallerIndexes(store).search(MARIA, "filling"),
            store.add_memory(MARIA, "x"),
            store.get_agent_profile("agent_a"),
        ):
            with pytest.raises(StoreUnavailableError):
                run(operation)
        payload = transcription("conv_down", caller=MARIA)
        with pytest.raises(StoreUnavailableError):
            run(
                store.add_call(
                    MARIA, CallRecord.from_payload(payload), payload, call_memories(MARIA, payload)
                )
            )
    finally:
        server.start()
    assert run(
        store.add_call(
            MARIA, CallRecord.from_payload(payload), payload, call_memories(MARIA, payload)
        )
    ).created


# Start-up check -----------------------------------------------------------------------------
def test_the_startup_check_passes_and_leaves_no_probe(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    run(store.check())

    assert server.state.of(PROBE_USER) == []


def test_the_startup_check_names_a_truncating_server(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    server.faults.truncate = True

    with pytest.raises(StoreUnavailableError, match="OM_USE_SUMMARY_ONLY=false"):
        run(store.check())
    assert server.state.of(PROBE_USER) == []


def test_the_startup_check_names_the_versions_that_work_on_tenant_mismatch(
    server: StandIn, store: OpenMemoryStore, run: Run[Any]
) -> None:
    server.faults.tenant = "tenant-of-this-key"

    with pytest.raises(StoreUnavailableError, match=r"tenant_mismatch.*v1\.3\.x"):
        run(store.check())
    with pytest.raises(StoreUnavailableError, match="tenant_mismatch"):
        run(store.add_memory(MARIA, "Prefers mornings."))
    assert requests_to(server, "POST", "/memory/add") == 1  # a refusal is not retried


def test_the_startup_check_names_a_refused_key(
    server: StandIn, tmp_path: Path, run: Run[Any]
) -> None:
    store = OpenMemoryStore(server.url, "wrong-key", ledger_path=tmp_path / "ledger.sqlite3")

    with pytest.raises(StoreUnavailableError, match="OPENMEMORY_API_KEY"):
        run(store.check())
    run(store.close())


def test_settings_select_the_backend(server: StandIn, tmp_path: Path, run: Run[Any]) -> None:
    settings = make_settings(
        tmp_path,
        memory_backend=MemoryBackend.OPENMEMORY,
        openmemory_url=server.url,
        openmemory_api_key=server.api_key,
        openmemory_ledger_path=tmp_path / "ledger.sqlite3",
    )
    store = create_store(settings)

    assert isinstance(store, OpenMemoryStore)
    run(store.check())
    run(store.close())
