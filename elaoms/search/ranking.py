"""Ranking one caller's memories for a query, in process.

Every backend hands the ranker the memories of exactly one caller, so the work per
search grows with that caller's history, never with the whole store, and no other
caller's words can be scored.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import snowballstemmer

from elaoms.memory.base import Memory

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STEMMER = snowballstemmer.stemmer("english")

STOP_WORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "i'm",
        "you're",
        "it's",
        "that's",
        "what's",
        "let's",
        "don't",
        "didn't",
        "can't",
        "won't",
        "i've",
        "i'd",
        "i'll",
        "oh",
        "yeah",
        "yes",
        "hey",
        "hi",
        "okay",
        "ok",
        "well",
        "really",
        "so",
        "just",
        "also",
    ]
)


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _STEMMER.stemWord(word)


def tokenize(text: str) -> list[str]:
    """Lower-cased, stop words dropped, Snowball-stemmed terms."""
    return [_stem(word) for word in _WORD.findall(text.lower()) if word not in STOP_WORDS]


@dataclass(slots=True)
class Passage:
    """A stretch of one call (a few consecutive turns) or a standalone memory."""

    members: tuple[Memory, ...]
    terms: Counter[str]
    length: int

    @property
    def conversation_id(self) -> str:
        return str(self.members[0].metadata.get("conversation_id", ""))


class CallerIndex:
    """BM25 over overlapping turn windows of one caller's calls."""

    window = 3
    k1 = 1.2
    b = 0.75

    def __init__(self, memories: Sequence[Memory]) -> None:
        self.passages = list(_passages(memories, self.window))
        self.document_frequency: Counter[str] = Counter()
        for passage in self.passages:
            self.document_frequency.update(passage.terms.keys())
        total = sum(passage.length for passage in self.passages)
        self.average_length = total / len(self.passages) if self.passages else 1.0

    def _idf(self, term: str) -> float:
        n = len(self.passages)
        df = self.document_frequency.get(term, 0)
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def score(self, passage: Passage, query_terms: Iterable[str]) -> float:
        score = 0.0
        norm = self.k1 * (1 - self.b + self.b * passage.length / self.average_length)
        for term in query_terms:
            tf = passage.terms.get(term, 0)
            if tf:
                score += self._idf(term) * tf * (self.k1 + 1) / (tf + norm)
        return score

    def search(self, query: str, limit: int) -> list[Memory]:
        query_terms = set(tokenize(query))
        if not query_terms:
            return []
        scored = [
            (self.score(passage, query_terms), position, passage)
            for position, passage in enumerate(self.passages)
        ]
        scored = [item for item in scored if item[0] > 0]
        scored.sort(key=lambda item: (-item[0], item[1]))
        chosen: list[Memory] = []
        seen: set[str] = set()
        for score, _, passage in scored:
            fresh = [member for member in passage.members if member.id not in seen]
            if not fresh:
                continue
            seen.update(member.id for member in fresh)
            chosen.append(_merge(fresh, score))
            if len(chosen) >= limit:
                break
        return chosen


def _passages(memories: Sequence[Memory], window: int) -> Iterable[Passage]:
    turns_by_call: dict[str, list[Memory]] = {}
    for memory in memories:
        if memory.metadata.get("kind") == "turn":
            turns_by_call.setdefault(str(memory.metadata.get("conversation_id")), []).append(memory)
        else:
            yield _passage((memory,))
    for turns in turns_by_call.values():
        turns.sort(key=lambda memory: memory.metadata.get("turn_index", 0))
        if len(turns) <= window:
            yield _passage(tuple(turns))
            continue
        for start in range(len(turns) - window + 1):
            yield _passage(tuple(turns[start : start + window]))


def _passage(members: tuple[Memory, ...]) -> Passage:
    terms = Counter(term for member in members for term in tokenize(member.content))
    return Passage(members=members, terms=terms, length=sum(terms.values()) or 1)


def _merge(members: list[Memory], score: float) -> Memory:
    first = members[0]
    if len(members) == 1:
        return Memory(
            id=first.id,
            user_id=first.user_id,
            content=first.content,
            metadata={**first.metadata, "score": round(score, 4)},
            created_at=first.created_at,
        )
    return Memory(
        id=first.id,
        user_id=first.user_id,
        content="\n".join(_speaker_line(member) for member in members),
        metadata={
            **first.metadata,
            "kind": "excerpt",
            "turn_indexes": [member.metadata.get("turn_index") for member in members],
            "score": round(score, 4),
        },
        created_at=first.created_at,
    )


def _speaker_line(memory: Memory) -> str:
    role = memory.metadata.get("role")
    speaker = "Caller" if role == "user" else "Agent" if role == "agent" else str(role or "")
    return f"{speaker}: {memory.content}" if speaker else memory.content
