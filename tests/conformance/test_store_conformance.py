"""What every `MemoryStore` backend must do, run against each backend alike.

A new backend joins by adding a case to the `store` fixture; if it needs to break one of
these rules, the rule belongs in `elaoms.memory.base` first.
"""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from elaoms.crypto import PayloadCipher, generate_key
from elaoms.memory.base import HistoryRead, Memory, MemoryStore, MemoryVersion, SavedIndex
from elaoms.memory.postgres import PostgresStore
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import TRANSCRIPTION, call_memories
from elaoms.search.indexes import CallerIndexes

from conftest import load_fixture, transcription
from openmemory_standin import (  # noqa: F401 - fixtures by name
    Run,
    StandIn,
    fresh_standin,
    openmemory_store,
    run,
    standin,
)

BACKENDS = ["sqlite", "openmemory", "postgres", "postgres-encrypted"]
MARIA = "+14155550123"
JAMES = "+14155550188"


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], MemoryStore]:
    """Opens the backend's store in this test's directory (again: the same store)."""
    if request.param == "sqlite":
        return lambda: SQLiteStore(tmp_path / "memory.sqlite3")
    if request.param.startswith("postgres"):
        url = request.getfixturevalue("postgres_url")
        # One key for every opening: a reopened store must read what the first one sealed.
        cipher = (
            PayloadCipher(generate_key(), enabled=True)
            if request.param.endswith("-encrypted")
            else None
        )
        return lambda: PostgresStore(url, cipher=cipher)
    server: StandIn = request.getfixturevalue("fresh_standin")
    return lambda: openmemory_store(server, tmp_path)


@pytest.fixture
def store(open_store: Callable[[], MemoryStore], run: Run[Any]) -> Iterator[MemoryStore]:
    backend = open_store()
    yield backend
    run(backend.close())


def search(run: Run[Any], store: MemoryStore, caller: str, query: str, limit: int = 5) -> Any:
    """Ranked as the service ranks: through the search side's index cache."""
    return run(CallerIndexes(store).search(caller, query, limit))


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


def add(
    run: Run[Any],
    store: MemoryStore,
    payload: dict[str, Any],
    caller: str = MARIA,
    read: HistoryRead | None = None,
) -> Any:
    return run(
        store.add_call(
            caller, CallRecord.from_payload(payload), payload, call_memories(caller, payload), read
        )
    )


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

    receipt = run(store.add_call(MARIA, CallRecord.from_payload(failure), failure, [note]))

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


# Call digests ----------------------------------------------------------------------------
def test_a_finished_call_is_digested_when_stored(store: MemoryStore, run: Run[Any]) -> None:
    turns = [
        ("agent", "Thanks for calling Brightside Dental, this is Ava."),
        ("user", "Hi, my name is Jonas Weber, my crown came loose."),
    ]
    payload = call("conv_digest", turns=turns, summary="Jonas needs his crown re-cemented.")
    analysis = payload["data"]["analysis"]
    analysis["call_summary_title"] = "Loose crown"
    analysis["data_collection_results"]["follow_up"]["value"] = "Book Dr. Osei on Friday"
    add(run, store, payload)
    add(run, store, payload)  # a replay adds no second digest
    failure = load_fixture("call_initiation_failure")
    failure["data"]["conversation_id"] = "conv_digest_failed"
    run(store.add_call(MARIA, CallRecord.from_payload(failure), failure, []))

    (digest,) = run(store.list_call_digests(MARIA, words=True))

    assert (digest.conversation_id, digest.agent_id) == ("conv_digest", "agent_front_desk")
    assert digest.started_at == 1_763_760_000
    facts = digest.facts
    assert (facts["title"], facts["summary"]) == (
        "Loose crown",
        "Jonas needs his crown re-cemented.",
    )
    assert facts["names"] == {"data_collection": "Maria Lopez", "transcript": "Jonas Weber"}
    assert digest.marks == {"data_collection", "transcript"}
    assert facts["follow_ups"] == ["Book Dr. Osei on Friday"]
    assert facts["first_agent_message"] == turns[0][1]
    assert facts["language"] == "en"
    assert facts["collected"]["caller_name"] == "Maria Lopez"
    assert digest.words is not None
    assert {"jonas", "crown", "re-cemented", "brightside"} <= digest.words
    assert "osei" not in digest.words  # said in a data-collection value only: kept apart
    assert run(store.list_call_digests(MARIA))[0].words is None  # words only when asked


def test_the_call_history_is_the_same_whatever_order_calls_arrive_in(
    store: MemoryStore, run: Run[Any]
) -> None:
    starts = [1_700_000_000 + day * 86_400 for day in range(7)]
    payloads = [call(f"conv_h{day}", started_at=start) for day, start in enumerate(starts)]
    for payload in payloads:
        payload["data"]["analysis"]["data_collection_results"].pop("caller_name")
        payload["data"]["transcript"] = [{"role": "user", "message": "I need a cleaning."}]
    # Only the oldest call tells the caller's name, in the transcript.
    payloads[0]["data"]["transcript"] = [{"role": "user", "message": "This is Ana Ortiz."}]
    payloads[3]["data"]["conversation_initiation_client_data"]["dynamic_variables"][
        "caller_name"
    ] = "Ana"
    for payload in [payloads[4], payloads[0], payloads[6], payloads[2], payloads[5]]:
        add(run, store, payload)
    add(run, store, payloads[3])
    add(run, store, payloads[1])  # a backfilled older call arrives last
    add(run, store, call("conv_other", JAMES, started_at=starts[-1] + 5), caller=JAMES)

    history = run(
        store.call_history(MARIA, recent=3, marks=("transcript", "dynamic_variable", "absent"))
    )

    assert history.count == 7
    assert (history.first_started_at, history.last_started_at) == (starts[0], starts[-1])
    assert [digest.conversation_id for digest in history.recent] == [
        "conv_h6",
        "conv_h5",
        "conv_h4",
    ]
    assert history.newest_marked["transcript"].conversation_id == "conv_h0"
    assert history.newest_marked["transcript"].facts["names"]["transcript"] == "Ana Ortiz"
    assert history.newest_marked["dynamic_variable"].conversation_id == "conv_h3"
    assert "absent" not in history.newest_marked
    everything = run(store.call_history(MARIA, recent=10))
    assert [digest.conversation_id for digest in everything.recent] == [
        f"conv_h{day}" for day in reversed(range(7))
    ]
    assert run(store.call_history("+15550000000", recent=3)).count == 0


def test_call_digests_are_listed_newest_first_a_page_at_a_time(
    store: MemoryStore, run: Run[Any]
) -> None:
    for day in range(5):
        add(run, store, call(f"conv_page{day}", started_at=1_700_000_000 + day * 86_400))

    def page(offset: int) -> list[str]:
        digests = run(store.list_call_digests(MARIA, limit=2, offset=offset, words=True))
        assert all(digest.words for digest in digests)
        return [digest.conversation_id for digest in digests]

    assert [page(0), page(2), page(4)] == [
        ["conv_page4", "conv_page3"],
        ["conv_page2", "conv_page1"],
        ["conv_page0"],
    ]


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

    results = search(run, store, MARIA, "daughter filling", limit=5)

    assert results, "the relevant memory must be found"
    assert "Her daughter Sofia needs a filling next month." in results[0].content
    assert {memory.user_id for memory in results} == {MARIA}
    assert search(run, store, "+15550000000", "daughter filling") == []


def test_search_sees_a_call_added_after_an_earlier_search(
    store: MemoryStore, run: Run[Any]
) -> None:
    indexes = CallerIndexes(store)
    run(store.add_memory(MARIA, "Prefers appointments on Tuesday mornings."))
    assert run(indexes.search(MARIA, "crown fitting")) == []

    add(run, store, call("conv_crown", turns=[("user", "When is my crown fitting?")]))

    results = run(indexes.search(MARIA, "crown fitting"))
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
    assert search(run, store, MARIA, "cleaning") == []
    assert run(store.list_memories(JAMES)) == james_memories
    assert run(store.get_caller_profile(JAMES)) == {"greeting": "Hi James"}
    assert [c.conversation_id for c in run(store.list_calls(JAMES))] == ["conv_james_kept"]
    assert run(store.list_call_digests(MARIA)) == []
    assert [d.conversation_id for d in run(store.list_call_digests(JAMES))] == ["conv_james_kept"]
    assert run(store.delete_user(MARIA)) == 0


# Search indexes: the store's half (versions, memories in order, saved bytes) ------------
def test_the_memory_version_changes_with_every_insert_and_delete(
    store: MemoryStore, run: Run[Any]
) -> None:
    empty = run(store.index_state(MARIA))
    assert empty.version == MemoryVersion(0, 0) and empty.saved is None

    run(store.add_memory(MARIA, "Prefers mornings."))
    one = run(store.index_state(MARIA)).version
    assert one.count == 1 and one.last_seq > 0
    payload = call("conv_version", turns=[("user", "My crown came loose.")])
    add(run, store, payload)
    more = run(store.index_state(MARIA)).version
    assert more.count == 1 + len(call_memories(MARIA, payload)) and more.last_seq > one.last_seq
    run(store.put_agent_profile("agent_front_desk", {"name": "Front desk"}, 1.0))
    run(store.put_caller_profile(MARIA, {"greeting": "Hi Maria"}))
    assert run(store.index_state(MARIA)).version == more  # profiles are not memories
    assert run(store.index_state(JAMES)).version == MemoryVersion(0, 0)
    now = store.index_version_now(MARIA)
    assert now is None or now == more  # the loop's answer, where the store has one
    assert run(store.memory_version(MARIA)) == more  # the version alone says the same
    assert run(store.memory_version(JAMES)) == MemoryVersion(0, 0)

    run(store.delete_user(MARIA))
    assert run(store.index_state(MARIA)).version == MemoryVersion(0, 0)
    assert run(store.memory_version(MARIA)) == MemoryVersion(0, 0)
    run(store.add_memory(MARIA, "Prefers mornings."))
    again = run(store.index_state(MARIA)).version
    assert again.count == 1 and again != one  # never mistaken for the first one


def test_memories_after_a_sequence_number_come_oldest_first_with_their_version(
    store: MemoryStore, run: Run[Any]
) -> None:
    for number in range(3):
        run(store.add_memory(MARIA, f"Note number {number}."))
    run(store.add_memory(JAMES, "Someone else's note."))

    version, memories = run(store.memories_after(MARIA, 0))
    assert [memory.content for memory in memories] == [f"Note number {n}." for n in range(3)]
    assert version == run(store.index_state(MARIA)).version
    assert version.count == 3 and {memory.user_id for memory in memories} == {MARIA}

    first = run(store.index_state(MARIA)).version  # as an index saved now would record it
    run(store.add_memory(MARIA, "Note number 3."))
    run(store.add_memory(MARIA, "Note number 4."))
    version, newer = run(store.memories_after(MARIA, first.last_seq))
    assert [memory.content for memory in newer] == ["Note number 3.", "Note number 4."]
    assert version.count == 5 and version.last_seq > first.last_seq
    assert run(store.memories_after(MARIA, version.last_seq)) == (version, [])
    assert run(store.memories_after("+15550000000", 0)) == (MemoryVersion(0, 0), [])


def test_a_saved_index_is_kept_only_for_the_version_it_describes(
    store: MemoryStore, run: Run[Any]
) -> None:
    run(store.add_memory(MARIA, "Prefers mornings."))
    version = run(store.index_state(MARIA)).version

    assert run(store.save_index(MARIA, SavedIndex(version, b"index of one memory"))) is True
    state = run(store.index_state(MARIA))
    assert state.saved == SavedIndex(version, b"index of one memory")

    run(store.add_memory(MARIA, "Pays by card."))
    stale = SavedIndex(version, b"stale")
    assert run(store.save_index(MARIA, stale)) is False  # a memory came meanwhile
    state = run(store.index_state(MARIA))
    assert state.saved == SavedIndex(version, b"index of one memory")  # kept, though behind
    assert state.version != version
    assert run(store.save_index(MARIA, SavedIndex(state.version, b"two"))) is True
    assert run(store.index_state(JAMES)).saved is None


def test_a_saved_index_outlives_the_store_and_goes_with_its_caller(
    open_store: Callable[[], MemoryStore], store: MemoryStore, run: Run[Any]
) -> None:
    run(store.add_memory(MARIA, "Prefers mornings."))
    version = run(store.index_state(MARIA)).version
    assert run(store.save_index(MARIA, SavedIndex(version, b"\x00saved bytes\xff")))
    run(store.close())

    reopened = open_store()
    try:
        state = run(reopened.index_state(MARIA))
        assert state.saved == SavedIndex(version, b"\x00saved bytes\xff")
        assert state.version == version
        run(reopened.delete_user(MARIA))
        assert run(reopened.index_state(MARIA)).saved is None
    finally:
        run(reopened.close())


def test_search_ranks_every_backend_through_a_saved_index(
    store: MemoryStore, run: Run[Any]
) -> None:
    add(run, store, call("conv_saved", turns=[("user", "My daughter chipped a tooth.")]))
    indexes = CallerIndexes(store)
    indexes.changed(MARIA)
    run(indexes.maintain())
    state = run(store.index_state(MARIA))
    assert state.saved is not None and state.saved.version == state.version

    found = search(run, store, MARIA, "daughter tooth")  # a new process: loads it
    assert found and "daughter chipped a tooth" in found[0].content


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


def test_a_kept_profile_comes_with_the_calls_read_after_it_and_whether_its_call_was_forgotten(
    store: MemoryStore, run: Run[Any]
) -> None:
    add(run, store, call("conv_kept_1", started_at=1_700_000_000))
    add(run, store, call("conv_kept_2", started_at=1_700_086_400))
    read = HistoryRead(recent=1, marks=("data_collection", "transcript"))

    kept = run(store.keep_caller_profile(MARIA, {"greeting": "Hi Maria"}, "conv_kept_2", read))

    assert run(store.get_caller_profile(MARIA)) == {"greeting": "Hi Maria"}
    assert kept.call_forgotten is False
    assert kept.history == run(store.call_history(MARIA, recent=1, marks=read.marks))
    assert kept.history.count == 2
    assert [digest.conversation_id for digest in kept.history.recent] == ["conv_kept_2"]

    run(store.forget_conversations(["conv_kept_2"]))
    kept = run(store.keep_caller_profile(MARIA, {"greeting": "Hello"}, "conv_kept_2", read))
    assert kept.call_forgotten is True
    assert run(store.get_caller_profile(MARIA)) == {"greeting": "Hello"}  # kept, then checked


def test_a_call_stored_with_a_read_comes_with_the_calls_read_after_it_or_none(
    store: MemoryStore, run: Run[Any]
) -> None:
    read = HistoryRead(recent=2, marks=("data_collection", "transcript"))
    add(run, store, call("conv_read_1", started_at=1_700_000_000))
    assert add(run, store, call("conv_read_2", started_at=1_700_086_400)).history is None

    receipt = add(run, store, call("conv_read_3", started_at=1_700_172_800), read=read)
    again = add(run, store, call("conv_read_3", started_at=1_700_172_800), read=read)
    run(store.forget_conversations(["conv_read_4"]))
    forgotten = add(run, store, call("conv_read_4"), read=read)

    assert receipt.created and not again.created
    assert forgotten.forgotten and forgotten.history is None  # nothing stored, nothing read
    if store.name != "sqlite":  # left to the hook: it reads for itself
        assert receipt.history is None and again.history is None
        return
    assert receipt.history == run(store.call_history(MARIA, recent=2, marks=read.marks))
    assert receipt.history.count == 3
    assert [digest.conversation_id for digest in receipt.history.recent] == [
        "conv_read_3",
        "conv_read_2",
    ]
    assert again.history == receipt.history  # a duplicate's hook prepares the profile too


def test_a_caller_profile_read_on_the_loop_never_suspends(
    store: MemoryStore, run: Run[Any]
) -> None:
    if not store.caller_profiles_on_loop:
        pytest.skip(f"{store.name} reads caller profiles off the loop")
    profile = {
        "name": "José Núñez",
        "call_count": 3,
        "last_call_at": 1_763_760_000,
        "updated_at": 1_763_760_123.25,
        "recent_summaries": [{"title": "Cleaning", "summary": "Moved to Tuesday ☀"}],
        "open_follow_ups": [],
        "language": None,
    }
    run(store.put_caller_profile(MARIA, profile))

    async def read_in_one_step(user_id: str) -> Any:
        # One send() runs the coroutine up to its first suspension: StopIteration means
        # it answered without giving the event loop back (no thread, no I/O wait).
        reading = store.get_caller_profile(user_id)
        try:
            reading.send(None)
        except StopIteration as answered:
            return answered.value
        reading.close()
        pytest.fail("get_caller_profile suspended")

    assert run(read_in_one_step(MARIA)) == profile
    assert run(read_in_one_step(JAMES)) is None


def test_the_store_reports_itself_usable(store: MemoryStore, run: Run[Any]) -> None:
    run(store.check())
