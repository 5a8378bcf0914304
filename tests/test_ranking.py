"""The per-caller ranker on small hand-made histories."""

from __future__ import annotations

from datetime import UTC, datetime
from unittest.mock import ANY

import orjson
import pytest
import zstandard

from elaoms.memory.base import Memory
from elaoms.search import embeddings
from elaoms.search.ranking import (
    INDEX_FORMAT,
    SEPARATOR,
    CallerIndex,
    _capitalised_mid_sentence,
    _said_lower_cased,
    query_periods,
)

from conftest import turn_memories

MAY_2023 = int(datetime(2023, 5, 8, tzinfo=UTC).timestamp())
AUGUST_2023 = int(datetime(2023, 8, 20, tzinfo=UTC).timestamp())


@pytest.fixture(autouse=True)
def _bm25_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lexical ranker alone, whether or not the embeddings extra is installed
    (tests/test_embeddings.py covers the fused scorer)."""
    monkeypatch.setattr(embeddings, "default_cache", lambda: None)


call = turn_memories  # (conversation_id, started, *messages)


def test_the_answer_next_to_the_question_is_found() -> None:
    index = CallerIndex(
        call(
            "c1",
            MAY_2023,
            "Lovely weather today.",
            "What did you paint last week?",
            "A sunset over the lake, in orange and purple.",
            "Anything else new?",
            "Not much, work is busy.",
        )
    )
    (excerpt,) = index.search("what did she paint", limit=5, max_chars=150)
    assert "Caller: A sunset over the lake, in orange and purple." in excerpt.content
    assert excerpt.metadata["conversation_id"] == "c1"
    assert excerpt.metadata["kind"] == "excerpt"


def test_one_excerpt_per_call_with_gaps_marked() -> None:
    turns = ["The boiler leaks.", "Since when?", "Filler one.", "Filler two.", "The boiler again."]
    (excerpt,) = CallerIndex(call("c1", MAY_2023, *turns)).search("boiler leaks", limit=5)
    lines = excerpt.content.split("\n")
    assert lines[0] == "Caller: The boiler leaks." and lines[-1] == "Caller: The boiler again."
    assert SEPARATOR in lines or len(lines) == 5
    assert excerpt.metadata["turn_indexes"] == sorted(excerpt.metadata["turn_indexes"])


def test_limit_counts_calls_and_budget_counts_characters() -> None:
    memories = [m for n in range(6) for m in call(f"c{n}", MAY_2023 + n, f"Roses number {n}.")]
    assert len(CallerIndex(memories).search("roses", limit=3)) == 3
    assert len(CallerIndex(memories).search("roses", limit=50, max_chars=100)) == 2


def test_a_named_month_favours_calls_from_then() -> None:
    memories = call("may", MAY_2023, "We went camping by the river.") + call(
        "august", AUGUST_2023, "We went camping in the hills."
    )
    index = CallerIndex(memories)
    assert (
        index.search("camping in August 2023", limit=1)[0].metadata["conversation_id"] == "august"
    )
    assert index.search("camping in May", limit=1)[0].metadata["conversation_id"] == "may"
    assert [(p.month, p.year) for p in query_periods("on 8 May, 2023 or in 2022")] == [
        (5, 2023),
        (None, 2022),
    ]


def test_a_question_in_the_summary_s_words_finds_the_turn_the_summary_recounts() -> None:
    memories = call(
        "c1",
        MAY_2023,
        "Hello again.",
        "Hi Maria, how are you?",
        "I finally finished Charlotte's Web last night, what a story.",
        "Oh I loved it as a kid.",
        "My dentist appointment is on Tuesday.",
        "Good luck with that.",
    )
    memories.append(
        Memory(
            id="c1#summary",
            user_id="+14155550123",
            content="Maria finished reading the novel Charlotte's Web. "
            "She has a dentist appointment on Tuesday.",
            metadata={"kind": "summary", "conversation_id": "c1"},
        )
    )
    index = CallerIndex(memories)
    question = "Which novel did she read?"
    # "novel" and "read" are only in the summary, whose first sentence recounts turn 2.
    assert index.texts[index.rank(question)[0][0]] == memories[2].content
    assert CallerIndex.from_bytes(index.to_bytes()).rank(question) == index.rank(question)
    # The summary itself is never quoted; without its field nothing said matches.
    assert all("novel" not in m.content for m in index.search(question, limit=5))
    index.summary_weight = 0
    assert index.rank(question) == []


def test_no_words_no_results() -> None:
    index = CallerIndex(call("c1", MAY_2023, "Hello there."))
    assert index.search("the and of", limit=5) == []
    assert CallerIndex([]).search("anything", limit=5) == []


def greeted_calls(*pairs: tuple[str, str]) -> list[Memory]:
    """Calls in which the agent greets the caller as Maria, then one exchange."""
    memories: list[Memory] = []
    for number, (caller_line, agent_line) in enumerate(pairs):
        memories += call(
            f"c{number}",
            MAY_2023 + number * 86400,
            "Hello, it's me again.",
            "Hi Maria, good to hear from you!",
            caller_line,
            agent_line,
        )
    return memories


def test_a_question_about_a_named_speaker_favours_that_speakers_turns() -> None:
    memories = greeted_calls(
        ("I want to buy a red bike.", "Maria, my brother will buy a boat."),
        ("The weather is lovely.", "It is, enjoy it."),
        ("Work is busy this week.", "Take care on Friday."),
    )
    index = CallerIndex(memories)
    # "Maria" is how the agent addresses the caller; "Friday" is capitalised, not a name.
    assert index.speaker_names == {"maria": "user"}
    best = index.rank("What will Maria buy?")[0][0]
    assert index.texts[best] == "I want to buy a red bike."
    # Words alone prefer the agent's turn, which says both "Maria" and "buy".
    index.speaker_boost = 0
    best = index.rank("What will Maria buy?")[0][0]
    assert index.texts[best] == "Maria, my brother will buy a boat."


def test_no_speaker_name_from_too_few_calls_or_common_words() -> None:
    memories = greeted_calls(("Fine.", "Good."))  # one call: not enough to learn a name
    memories += call("c9", MAY_2023 + 9 * 86400, "Hello.", "Great news, great.")
    memories += call("c10", MAY_2023 + 10 * 86400, "Hello.", "Great to hear.")
    # "great" is said lower-cased too; "Maria" in one call of three is below the share.
    assert CallerIndex(memories).speaker_names == {}


def test_a_name_is_a_whole_word_never_lower_cased_and_capitalised_after_a_word() -> None:
    assert _said_lower_cased("maria", "so maria said") and _said_lower_cased("maria", "maria.")
    assert not _said_lower_cased("maria", "Maria mariam amaria maria_x maria2 Mariana")
    assert _capitalised_mid_sentence("maria", "Thanks, Maria!")
    assert _capitalised_mid_sentence("maria", "Hi Maria")
    assert not _capitalised_mid_sentence("maria", "Maria here. Hello. Maria, hi Mariana")
    assert not _capitalised_mid_sentence("maria", "Hi  Maria")  # a word, then one space


QUERIES = ("What will Maria buy?", "weather picnic", "busy Friday", "red bike in May 2023", "boat")


def answers(index: CallerIndex) -> list[list[tuple[str, str, dict[str, object]]]]:
    return [
        [(m.id, m.content, m.metadata) for m in index.search(query, limit=3)] for query in QUERIES
    ]


def test_an_index_grown_call_by_call_ranks_like_one_built_at_once() -> None:
    memories = greeted_calls(
        ("I want to buy a red bike.", "Maria, my brother will buy a boat."),
        ("The weather is lovely.", "It is, enjoy it."),
        ("Work is busy this week.", "Take care on Friday."),
    )
    memories.append(
        Memory(id="note", user_id="+14155550123", content="Prefers a boat trip on Friday.")
    )
    memories.append(  # a summary stored after its call's turns, as a later batch
        Memory(
            id="c1#summary",
            user_id="+14155550123",
            content="Talked about the weather and a picnic.",
            metadata={"kind": "summary", "conversation_id": "c1"},
        )
    )
    whole = CallerIndex(memories)
    grown = CallerIndex([])
    for start in range(0, 12, 4):  # one call (four turns) at a time, the note, the summary
        grown.extend(memories[start : start + 4])
    grown.extend(memories[12:13])
    grown.extend(memories[13:])

    assert grown.speaker_names == whole.speaker_names == {"maria": "user"}
    assert answers(grown) == answers(whole)
    assert any(answer for answer in answers(whole))


def test_a_saved_index_answers_like_the_one_saved() -> None:
    memories = greeted_calls(
        ("I want to buy a red bike.", "Maria, my brother will buy a boat."),
        ("The weather is lovely.", "It is, enjoy it."),
    )
    original = CallerIndex(memories)
    data = original.to_bytes()

    assert answers(CallerIndex.from_bytes(data)) == answers(original)
    assert b"red bike" not in data  # compressed: fewer pages to read back


def test_an_index_of_another_format_or_incomplete_is_refused() -> None:
    saved = zstandard.decompress(CallerIndex(call("c1", MAY_2023, "Hi.", "Hi!")).to_bytes())
    for data in (
        b'{"format": 0}',  # not even compressed
        zstandard.compress(orjson.dumps({"format": 0})),
        zstandard.compress(orjson.dumps({"format": INDEX_FORMAT})),
        zstandard.compress(saved[:-1]),  # the last record cut short
    ):
        with pytest.raises(ValueError):
            CallerIndex.from_bytes(data)


def test_a_quoted_memory_keeps_its_own_metadata_saved_or_not() -> None:
    """The metadata a call's memories share is kept once: each quote still carries
    exactly the metadata its memory was stored with."""
    memories = call("c1", MAY_2023, "The boiler leaks.", "Since when?", "Since Monday.")
    memories.append(
        Memory(
            id="c1#name",
            user_id="+14155550123",
            content="Maria",
            metadata={"kind": "data_collection", "conversation_id": "c1", "field": "name"},
            created_at=12.5,
        )
    )
    for memory in memories:
        memory.metadata["flag"] = True
    memories[2].metadata["flag"] = 1  # equal to True in Python, not in JSON
    memories.append(Memory(id="note", user_id="+14155550123", content="Maria likes boilers."))
    original = CallerIndex(memories)
    for index in (original, CallerIndex.from_bytes(original.to_bytes())):
        quoted = {m.id: m for m in index.search("boiler since Maria", limit=5)}
        assert set(quoted) == {"c1#t0", "c1#name", "note"}
        assert quoted["c1#name"].metadata == {**memories[3].metadata, "score": ANY}
        assert quoted["c1#name"].created_at == 12.5
        assert quoted["note"].metadata == {"score": ANY}
        excerpt = quoted["c1#t0"]
        assert excerpt.content.count("\n") == 2  # the whole call, in order
        extra = {"kind": "excerpt", "role": "mixed", "turn_indexes": [0, 1, 2], "score": ANY}
        assert excerpt.metadata == {**memories[0].metadata, **extra}
        assert index._memory(2).metadata == memories[2].metadata
        assert type(index._memory(2).metadata["flag"]) is int
        assert index._memory(1).metadata["flag"] is True


def test_a_counting_question_favours_the_turn_that_states_a_number() -> None:
    memories = call(
        "c1",
        MAY_2023,
        "Hiking again today, I do love hiking, hiking is my thing.",
        "Enjoy the trails.",
        "Weather is grey.",
        "Stay dry.",
    ) + call(
        "c2",
        AUGUST_2023,
        "That was my third hike this summer, up the ridge.",
        "Well done.",
        "The kids are at camp.",
        "Lovely.",
    )
    index = CallerIndex(memories)
    question = "How many times has she been hiking?"
    # The words alone prefer the turn that says "hiking" three times...
    index.number_boost = 0
    assert index.texts[index.rank(question)[0][0]] == memories[0].content
    # ...the count is in the turn that states a number ("third").
    index.number_boost = CallerIndex.number_boost
    assert index.texts[index.rank(question)[0][0]] == memories[4].content
    # Only a question asking for a count or an amount: the same words without one do not.
    assert index.texts[index.rank("She has been hiking")[0][0]] == memories[0].content
    assert CallerIndex.from_bytes(index.to_bytes()).rank(question) == index.rank(question)
