"""The per-caller ranker on small hand-made histories."""

from __future__ import annotations

from datetime import UTC, datetime

from elaoms.memory.base import Memory
from elaoms.search.ranking import SEPARATOR, CallerIndex, query_periods

MAY_2023 = int(datetime(2023, 5, 8, tzinfo=UTC).timestamp())
AUGUST_2023 = int(datetime(2023, 8, 20, tzinfo=UTC).timestamp())


def call(conversation_id: str, started: int, *messages: str) -> list[Memory]:
    return [
        Memory(
            id=f"{conversation_id}#t{index}",
            user_id="+14155550123",
            content=message,
            metadata={
                "kind": "turn",
                "conversation_id": conversation_id,
                "call_started_at": started,
                "role": "user" if index % 2 == 0 else "agent",
                "turn_index": index,
            },
        )
        for index, message in enumerate(messages)
    ]


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


def test_no_words_no_results() -> None:
    index = CallerIndex(call("c1", MAY_2023, "Hello there."))
    assert index.search("the and of", limit=5) == []
    assert CallerIndex([]).search("anything", limit=5) == []
