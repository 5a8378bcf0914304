"""Objects shared by threads: the same answers from 8 threads at once as from one."""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import snowballstemmer

from elaoms.memory.base import Memory
from elaoms.search import ranking
from elaoms.search.ranking import CallerIndex

T = TypeVar("T")

THREADS = 8

# Words whose stems take the stemmer through its longer paths (several suffixes each).
_ROOTS = ["connect", "nation", "general", "operat", "relat", "condition", "hope", "sens"]
_SUFFIXES = ["", "s", "ing", "ed", "ion", "ional", "ization", "fulness", "ively", "ousness"]
WORDS = [
    f"{root}{suffix}{extra}"
    for root, suffix, extra in itertools.product(_ROOTS, _SUFFIXES, ["", "al", "ly", "ness"])
]


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Threads switch as often as the interpreter allows: a race shows on every run."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def in_threads(work: Callable[[int], T], threads: int = THREADS) -> list[T | BaseException]:
    """`work(n)` in `threads` threads started together; each one's result or exception."""
    results: list[T | BaseException] = [RuntimeError("did not run")] * threads
    barrier = threading.Barrier(threads)

    def run(number: int) -> None:
        barrier.wait()
        try:
            results[number] = work(number)
        except BaseException as error:  # reported by the test
            results[number] = error

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    return results


def test_eight_threads_stem_every_word_as_one_thread_does_and_the_cache_keeps_right_stems(
    busy_switching: None,
) -> None:
    expected = {word: snowballstemmer.stemmer("english").stemWord(word) for word in WORDS}
    for _ in range(5):  # each round starts with an empty cache, so every word is stemmed
        ranking._stem.cache_clear()

        def stem_all(number: int) -> dict[str, str]:
            words = WORDS[number:] + WORDS[:number]  # each thread in its own order
            return {word: ranking._stem(word) for word in words}

        results = in_threads(stem_all)
        errors = [result for result in results if isinstance(result, BaseException)]
        assert not errors, f"{len(errors)} threads failed, e.g. {errors[0]!r}"
        for result in results:
            wrong = {w: s for w, s in result.items() if s != expected[w]}  # type: ignore[union-attr]
            assert not wrong, f"{len(wrong)} wrong stems, e.g. {list(wrong.items())[:3]}"
        cached = {word: ranking._stem(word) for word in WORDS}
        assert cached == expected


def test_eight_threads_searching_one_shared_index_get_the_single_thread_answers(
    busy_switching: None,
) -> None:
    memories = [
        Memory(
            id=f"conv_{call}#t{turn}",
            user_id="+14155550123",
            content=" ".join(WORDS[(call * 7 + turn * 3 + k) % len(WORDS)] for k in range(12)),
            metadata={
                "kind": "turn",
                "conversation_id": f"conv_{call}",
                "call_started_at": 1_700_000_000 + call * 86_400,
                "role": "user" if turn % 2 else "agent",
                "turn_index": turn,
            },
        )
        for call in range(30)
        for turn in range(10)
    ]
    index = CallerIndex(memories, vectors=None)
    queries = [" ".join(WORDS[q : q + 3]) for q in range(0, len(WORDS), 5)]
    ranking._stem.cache_clear()
    expected = {query: _answer(index, query) for query in queries}
    ranking._stem.cache_clear()

    def search_all(number: int) -> dict[str, Any]:
        return {query: _answer(index, query) for query in queries[number:] + queries[:number]}

    for result in in_threads(search_all):
        assert not isinstance(result, BaseException), repr(result)
        assert result == expected


def _answer(index: CallerIndex, query: str) -> list[tuple[str, str]]:
    return [(memory.id, memory.content) for memory in index.search(query, 5)]
