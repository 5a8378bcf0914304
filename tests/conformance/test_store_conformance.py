"""What every `MemoryStore` backend must do, run against each backend alike.

A new backend joins by adding a case to the `store` fixture; if it needs to break one of
these rules, the rule belongs in `elaoms.memory.base` first.
"""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elaoms.memory.base import Memory, MemoryStore
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import TRANSCRIPTION, call_memories

from conftest import load_fixture, transcription
from openmemory_standin import (  # noqa: F401 - fixtures by name
    Run,
    StandIn,
    fresh_standin,
    openmemory_store,
    run,
    standin,
)

BACKENDS = ["sqlite", "openmemory"]
MARIA = "+14155550123"
JAMES = "+14155550188"


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path, run: Run[Any]) -> Iterator[MemoryStore]:
    if request.param == "sqlite":
        backend: MemoryStore = SQLiteStore(tmp_path / "memory.sqlite3")
    else:
        server: StandIn = request.getfixturevalue("fresh_standin")
        backend = openmemory_store(server, tmp_path)
    yield backend
    run(backend.close())


def call(
    conversation_id: str,
    caller: str = MARIA,
    *,
    agent_id: str = "agent_front_desk",
    started_at: int = 1_763_760_000,
    turns: list[tuple[str, str]] | None = None,
    summary: str | None = None,
) -> dict[str, Any]:
    payload = transcription(conversation_id, caller=caller, turns=turns)
    payload["data"]["agent_id"] = agent_id
    payload["data"]["metadata"]["start_time_unix_secs"] = started_at
    payload["event_timestamp"] = started_at + 120
    if summary is not None:
        payload["data"]["analysis"]["transcript_summary"] = summary
    return payload


def add(run: Run[Any], store: MemoryStore, payload: dict[str, Any], caller: str = MARIA) -> Any:
    return run(store.add_call(caller, payload, call_memories(caller, payload)))


# Calls -----------------------------------------------------------------------------------
def test_a_call_is_kept_whole_with_its_metadata(store: MemoryStore, run: Run[Any]) -> None:
    payload = call("conv_whole", started_at=1_763_000_000)
    original = copy.deepcopy(payload)

    receipt = add(run, store, payload)

    assert receipt.created is True
    assert receipt.memory_id
    stored = run(store.get_call("conv_whole"))
    assert stored is not None
    assert stored.payload == original
    assert stored.conversation_id == "conv_whole"
    assert stored.user_id == MARIA
    assert stored.agent_id == "agent_front_desk"
    assert stored.event_type == TRANSCRIPTION
    assert stored.event_timestamp == 1_763_000_120
    assert stored.started_at == 1_763_000_000
    assert stored.memory_id == receipt.memory_id


def test_a_second_add_of_the_same_call_stores_nothing(store: MemoryStore, run: Run[Any]) -> None:
    payload = call("conv_twice")
    first = add(run, store, payload)
    units = run(store.list_memories(MARIA))

    second = add(run, store, payload)

    assert second.created is False
    assert second.memory_id == first.memory_id
    assert run(store.list_memories(MARIA)) == units
    assert len(run(store.list_calls(MARIA))) == 1


def test_the_same_conversation_id_is_a_different_call_per_event_type(
    store: MemoryStore, run: Run[Any]
) -> None:
    failure = load_fixture("call_initiation_failure")
    failure["data"]["conversation_id"] = "conv_both"
    add(run, store, call("conv_both"))
    note = Memory(
        id="conv_both#failure",
        user_id=MARIA,
        content="A call could not be connected (busy).",
        metadata={"kind": "call_failure", "conversation_id": "conv_both"},
    )

    receipt = run(store.add_call(MARIA, failure, [note]))

    assert receipt.created is True
    stored = run(store.get_call("conv_both", failure["type"]))
    assert stored is not None and stored.payload == failure
    assert run(store.get_call("conv_both")).event_type == TRANSCRIPTION  # type: ignore[union-attr]


def test_a_call_s_words_become_its_caller_s_memories_verbatim(
    store: MemoryStore, run: Run[Any]
) -> None:
    turns = [("agent", "Brightside Dental, how can I help?"), ("user", "I chipped a molar.")]
    payload = call("conv_units", turns=turns, summary="Caller chipped a molar.")

    add(run, store, payload)

    memories = run(store.list_memories(MARIA))
    expected = call_memories(MARIA, payload)
    assert [memory.content for memory in memories] == [memory.content for memory in expected]
    assert {memory.user_id for memory in memories} == {MARIA}
    for memory, unit in zip(memories, expected, strict=True):
        for key in ("conversation_id", "agent_id", "event_type", "kind"):
            assert memory.metadata[key] == unit.metadata[key]


def test_calls_are_listed_newest_first_and_filtered(store: MemoryStore, run: Run[Any]) -> None:
    add(run, store, call("conv_old", started_at=1_700_000_000))
    add(run, store, call("conv_new", started_at=1_700_000_900, agent_id="agent_billing"))
    add(run, store, call("conv_mid", started_at=1_700_000_500))
    add(run, store, call("conv_james", JAMES, started_at=1_700_000_700), caller=JAMES)

    def ids(**filters: Any) -> list[str]:
        return [item.conversation_id for item in run(store.list_calls(**filters))]

    assert ids() == ["conv_new", "conv_james", "conv_mid", "conv_old"]
    assert ids(user_id=MARIA) == ["conv_new", "conv_mid", "conv_old"]
    assert ids(user_id=MARIA, agent_id="agent_front_desk") == ["conv_mid", "conv_old"]
    assert ids(since=1_700_000_500) == ["conv_new", "conv_james", "conv_mid"]
    assert ids(user_id=MARIA, limit=2) == ["conv_new", "conv_mid"]
    assert ids(user_id="+15550000000") == []


# Memories --------------------------------------------------------------------------------
def test_memories_are_listed_in_the_order_they_were_added(
    store: MemoryStore, run: Run[Any]
) -> None:
    contents = ["Prefers morning appointments.", "Allergic to penicillin.", "Pays by card."]
    added = [run(store.add_memory(MARIA, text, {"kind": "note"})) for text in contents]

    listed = run(store.list_memories(MARIA))

    assert [memory.content for memory in listed] == contents
    assert [memory.id for memory in listed] == [memory.id for memory in added]
    assert all(memory.metadata["kind"] == "note" for memory in listed)
    assert [memory.content for memory in run(store.list_memories(MARIA, limit=2))] == contents[:2]


def test_identical_memories_of_one_caller_are_both_kept(store: MemoryStore, run: Run[Any]) -> None:
    run(store.add_memory(MARIA, "Called about billing."))
    run(store.add_memory(MARIA, "Called about billing."))

    assert len(run(store.list_memories(MARIA))) == 2


def test_search_finds_the_relevant_memory_of_that_caller_only(
    store: MemoryStore, run: Run[Any]
) -> None:
    run(store.add_memory(MARIA, "Her daughter Sofia needs a filling next month."))
    run(store.add_memory(MARIA, "Prefers appointments on Tuesday mornings."))
    run(store.add_memory(MARIA, "Pays with a Visa card ending 4242."))
    run(store.add_memory(JAMES, "His daughter needs a filling, root canal and a filling again."))

    results = run(store.search(MARIA, "daughter filling", limit=5))

    assert results, "the relevant memory must be found"
    assert "Her daughter Sofia needs a filling next month." in results[0].content
    assert {memory.user_id for memory in results} == {MARIA}
    assert run(store.search("+15550000000", "daughter filling")) == []


def test_search_sees_a_call_added_after_an_earlier_search(
    store: MemoryStore, run: Run[Any]
) -> None:
    run(store.add_memory(MARIA, "Prefers appointments on Tuesday mornings."))
    assert run(store.search(MARIA, "crown fitting")) == []

    add(run, store, call("conv_crown", turns=[("user", "When is my crown fitting?")]))

    results = run(store.search(MARIA, "crown fitting"))
    assert len(results) == 1
    assert "When is my crown fitting?" in results[0].content


def test_an_unknown_caller_has_nothing(store: MemoryStore, run: Run[Any]) -> None:
    assert run(store.list_memories("+15550000000")) == []
    assert run(store.list_calls("+15550000000")) == []
    assert run(store.get_call("conv_unknown")) is None
    assert run(store.get_caller_profile("+15550000000")) is None
    assert run(store.get_agent_profile("agent_unknown")) is None


def test_deleting_a_caller_removes_everything_of_theirs_only(
    store: MemoryStore, run: Run[Any]
) -> None:
    maria_call = call("conv_maria_gone", turns=[("user", "Cancel my cleaning.")])
    add(run, store, maria_call)
    run(store.add_memory(MARIA, "Prefers mornings."))
    run(store.put_caller_profile(MARIA, {"greeting": "Hi Maria"}))
    add(run, store, call("conv_james_kept", JAMES), caller=JAMES)
    run(store.put_caller_profile(JAMES, {"greeting": "Hi James"}))
    james_memories = run(store.list_memories(JAMES))

    deleted = run(store.delete_user(MARIA))

    units = len(call_memories(MARIA, maria_call)) + 1
    assert deleted == units + 1 + 1  # memories, the call, the profile
    assert run(store.list_memories(MARIA)) == []
    assert run(store.list_calls(MARIA)) == []
    assert run(store.get_call("conv_maria_gone")) is None
    assert run(store.get_caller_profile(MARIA)) is None
    assert run(store.search(MARIA, "cleaning")) == []
    assert run(store.list_memories(JAMES)) == james_memories
    assert run(store.get_caller_profile(JAMES)) == {"greeting": "Hi James"}
    assert [c.conversation_id for c in run(store.list_calls(JAMES))] == ["conv_james_kept"]
    assert run(store.delete_user(MARIA)) == 0


# Profiles --------------------------------------------------------------------------------
def test_an_agent_profile_round_trips_with_its_fetch_time(
    store: MemoryStore, run: Run[Any]
) -> None:
    agent = load_fixture("agent")
    agent_id = agent["agent_id"]

    run(store.put_agent_profile(agent_id, agent, fetched_at=1_763_760_000.5))
    first = run(store.get_agent_profile(agent_id))
    run(store.put_agent_profile(agent_id, {**agent, "name": "Ava v2"}, fetched_at=1_763_763_600.0))
    second = run(store.get_agent_profile(agent_id))

    assert first == {**agent, "_fetched_at": 1_763_760_000.5}
    assert second == {**agent, "name": "Ava v2", "_fetched_at": 1_763_763_600.0}
    assert run(store.list_memories(agent_id)) == []  # not a caller's memory


def test_a_caller_profile_is_replaced_whole(store: MemoryStore, run: Run[Any]) -> None:
    run(store.put_caller_profile(MARIA, {"greeting": "Hi Maria", "user_context": "Cleaning"}))
    assert run(store.get_caller_profile(MARIA)) == {
        "greeting": "Hi Maria",
        "user_context": "Cleaning",
    }

    run(store.put_caller_profile(MARIA, {"greeting": "Welcome back"}))

    assert run(store.get_caller_profile(MARIA)) == {"greeting": "Welcome back"}
    assert run(store.get_caller_profile(JAMES)) is None


def test_the_store_reports_itself_usable(store: MemoryStore, run: Run[Any]) -> None:
    run(store.check())
