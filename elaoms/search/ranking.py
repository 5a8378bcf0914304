"""Ranking one caller's memories for a query, in process.

Every backend hands the ranker the memories of exactly one caller, so the work per
search grows with that caller's history, never with the whole store, and no other
caller's words can be scored.

The unit that is scored is one transcript turn: the answer to "what did they say about X"
is usually one sentence, and the 3,000-character context holds about twenty turns but
only six three-turn windows. A turn alone is a poor document, so its score borrows from
its neighbours and from how well its whole call matches (see `CallerIndex.search`).
`docs/search.md` has the measurements behind each choice.
"""

from __future__ import annotations

import calendar
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import snowballstemmer

from elaoms.memory.base import Memory

if TYPE_CHECKING:
    from elaoms.search.embeddings import VectorCache

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STEMMER = snowballstemmer.stemmer("english")

# A generic English stop-word list plus conversational fillers; nothing domain specific.
_STOP_WORDS_TEXT = """
    a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his
    how i if in into is it its itself just me more most my myself no nor not now of off
    on once only or other our ours ourselves out over own same she should so some such
    than that the their theirs them themselves then there these they this those through
    to too under until up very was we were what when where which while who whom why
    will with would you your yours yourself yourselves i'm you're it's that's what's
    let's don't didn't can't won't i've i'd i'll oh yeah yes hey hi okay ok well really
    also
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())

SEPARATOR = "…"  # stands between two non-adjacent turns of one excerpt
DEFAULT = object()  # CallerIndex(vectors=DEFAULT): the process's embeddings, if any

# Words that are capitalised without being anyone's name.
_CALENDAR_WORDS = frozenset(
    name.lower()
    for name in (*calendar.day_name, *calendar.month_name, *calendar.month_abbr)
    if name
)
_CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")
_LOWER_WORD = re.compile(r"\b[a-z]+\b")
_MID_SENTENCE_CAPITALISED = re.compile(r"(?<=[A-Za-z0-9,;:] )[A-Z][a-z]+\b")


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _STEMMER.stemWord(word)


def tokenize(text: str) -> list[str]:
    """Lower-cased, stop words dropped, Snowball-stemmed terms."""
    return [_stem(word) for word in _WORD.findall(text.lower()) if word not in STOP_WORDS]


# Dates named in a query ("in May 2023", "on 8 May", "in 2022"): people talk about an
# event in the calls that follow it, so calls in or shortly after that period rank higher.
_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_name) if name}
_MONTHS |= {
    name.lower(): number
    for number, name in enumerate(calendar.month_abbr)
    if name and name.lower() != "may"  # "may" the verb is far more common
}
_MONTH_PATTERN = "|".join(sorted(_MONTHS, key=len, reverse=True))
_DATE = re.compile(
    rf"\b(?P<month>{_MONTH_PATTERN})\b\.?(?:\s+\d{{1,2}}(?:st|nd|rd|th)?)?,?"
    rf"(?:\s+(?P<year>(?:19|20)\d\d))?|\b(?P<lone_year>(?:19|20)\d\d)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class _Period:
    month: int | None  # None: the whole year
    year: int | None  # None: that month in the year up to the call

    def contains(self, moment: datetime, before: timedelta, after: timedelta) -> bool:
        if self.month is None:
            assert self.year is not None
            start, end = (
                datetime(self.year, 1, 1, tzinfo=UTC),
                datetime(self.year + 1, 1, 1, tzinfo=UTC),
            )
        else:
            year = self.year
            if year is None:
                year = moment.year if moment.month >= self.month else moment.year - 1
            start = datetime(year, self.month, 1, tzinfo=UTC)
            end = datetime(year + self.month // 12, self.month % 12 + 1, 1, tzinfo=UTC)
        return start - before <= moment < end + after


def query_periods(query: str) -> list[_Period]:
    periods = []
    for match in _DATE.finditer(query):
        if match["lone_year"]:
            periods.append(_Period(month=None, year=int(match["lone_year"])))
        else:
            year = match["year"]
            periods.append(
                _Period(month=_MONTHS[match["month"].lower()], year=int(year) if year else None)
            )
    return periods


@dataclass(slots=True)
class _Unit:
    """One scored memory: a transcript turn (in a call) or a standalone memory."""

    memory: Memory
    terms: Counter[str]
    length: int
    chars: int  # rendered size in an excerpt, newline included
    call: int = -1  # index into CallerIndex.calls; -1 for standalone memories
    position: int = 0  # index of the turn within its call


@dataclass(slots=True)
class _Call:
    turns: list[int]
    terms: Counter[str] = field(default_factory=Counter)
    started: datetime | None = None

    @property
    def length(self) -> int:
        return sum(self.terms.values()) or 1


@dataclass(slots=True)
class _Excerpt:
    score: float
    units: set[int]
    chars: int


class CallerIndex:
    """BM25 over one caller's turns, smoothed by neighbouring turns and the whole call.

    The parameters below are generic retrieval knobs; they were set by measuring on the
    LoCoMo bench (docs/search.md), so treat the exact values as tuned, not derived.
    """

    k1 = 1.2
    b = 0.9  # turns vary from "ok" to paragraphs: normalise length almost fully
    call_idf_power = 0.5  # damp terms present in nearly every call (the speakers' names)
    neighbour_weights = (0.6, 0.3)  # share of a turn's score given to turns 1 and 2 away
    call_prior = 1.0  # up to x2 for the turn's call best matching the query as a whole
    date_boost = 1.0  # x2 for calls in or just after a period the query names
    date_before = timedelta(days=7)
    date_after = timedelta(days=45)
    speaker_boost = 1.0  # x2 for the turns of the one speaker the query names
    speaker_name_calls = 0.2  # a name must address a speaker in this share of calls
    dense_weight = 0.5  # embedding similarity next to BM25 (normalised to 1 at best turn)
    dense_floor = 0.2  # cosine below which a turn gets no semantic credit
    dense_power = 2.0
    excerpt_header_chars = 25  # what the context adds per excerpt ("[Call on ...]")
    max_chars = 2800  # excerpt text returned in total; the context's budget minus headers

    def __init__(self, memories: Sequence[Memory], *, vectors: Any = DEFAULT) -> None:
        """`vectors`: a `VectorCache` to add the semantic signal, None for BM25 alone; by
        default the process's (`SEARCH_EMBEDDINGS`, and whether the extra is installed)."""
        self.units: list[_Unit] = []
        self.calls: list[_Call] = []
        turns_by_call: dict[str, list[Memory]] = {}
        summaries: dict[str, Memory] = {}
        standalone: list[Memory] = []
        for memory in memories:
            kind = memory.metadata.get("kind")
            conversation = str(memory.metadata.get("conversation_id", ""))
            if kind == "turn":
                turns_by_call.setdefault(conversation, []).append(memory)
            elif kind == "summary":
                # A paraphrase, not a moment to quote: it only tells how well its call matches.
                summaries[conversation] = memory
            else:
                standalone.append(memory)
        for conversation, turns in turns_by_call.items():
            turns.sort(key=lambda memory: memory.metadata.get("turn_index", 0))
            call = _Call(turns=[], started=_started(turns[0]))
            for position, memory in enumerate(turns):
                unit = self._add(memory, call=len(self.calls), position=position)
                call.turns.append(unit)
                call.terms.update(self.units[unit].terms)
            if conversation in summaries:
                call.terms.update(tokenize(summaries[conversation].content))
            self.calls.append(call)
        standalone += [memory for key, memory in summaries.items() if key not in turns_by_call]
        for memory in standalone:
            self._add(memory)

        self.postings: dict[str, list[tuple[int, int]]] = {}
        for index, unit in enumerate(self.units):
            for term, frequency in unit.terms.items():
                self.postings.setdefault(term, []).append((index, frequency))
        self.call_frequency: Counter[str] = Counter()
        for call in self.calls:
            self.call_frequency.update(call.terms.keys())
        self.average_length = sum(unit.length for unit in self.units) / max(1, len(self.units))
        self.average_call_length = sum(call.length for call in self.calls) / max(1, len(self.calls))
        self.speaker_names = self._speaker_names()

        if vectors is DEFAULT:
            from elaoms.search.embeddings import default_cache

            vectors = default_cache()
        self.vector_cache: VectorCache | None = vectors if self.units else None
        self._texts = [unit.memory.content for unit in self.units]
        self.vectors = None
        if self.vector_cache is not None:
            # Never embed here: a search is waiting. Until the background fill is done the
            # index ranks by BM25 alone, then picks the vectors up (see `rank`).
            self.vectors = self.vector_cache.cached(self._texts)
            if self.vectors is None:
                self.vector_cache.fill_in_background(self._texts)

    def _speaker_names(self) -> dict[str, str]:
        """Name (lower-cased) -> role, learnt from how the speakers address each other.

        People say the other's name ("Thanks, Maria!") and rarely their own, so a
        capitalised word that one role says in many calls, that the other role almost never
        says, that never appears lower-cased (not a common word) and that is capitalised
        inside a sentence at least once (not "Hello.") names the other role.
        A question about that person ("What did Maria paint?") is then about that role's
        turns, while the name itself only occurs in the other role's.
        """
        calls_saying: dict[str, dict[str, set[int]]] = {}
        lower: set[str] = set()
        mid_sentence: set[str] = set()  # "Hi Maria": a name; "Hello." opens a sentence
        for unit in self.units:
            if unit.call < 0:
                continue
            role = str(unit.memory.metadata.get("role") or "")
            said = calls_saying.setdefault(role, {})
            for word in set(_CAPITALISED.findall(unit.memory.content)):
                said.setdefault(word.lower(), set()).add(unit.call)
            lower.update(_LOWER_WORD.findall(unit.memory.content))
            mid_sentence.update(
                word.lower() for word in _MID_SENTENCE_CAPITALISED.findall(unit.memory.content)
            )
        if len(calls_saying) != 2:
            return {}
        needed = max(2, self.speaker_name_calls * len(self.calls))
        names: dict[str, str] = {}
        (role_a, said_a), (role_b, said_b) = calls_saying.items()
        for speaker, said_by_other, said_by_self in (
            (role_a, said_b, said_a),
            (role_b, said_a, said_b),
        ):
            for word, calls in said_by_other.items():
                if (
                    len(calls) >= needed
                    and len(said_by_self.get(word, ())) <= 0.1 * len(calls)
                    and word not in lower
                    and word in mid_sentence
                    and word not in STOP_WORDS
                    and word not in _CALENDAR_WORDS
                ):
                    names[word] = speaker
        return names

    def _named_speaker(self, query: str) -> str | None:
        words = {word.removesuffix("'s") for word in _WORD.findall(query.lower())}
        roles = {self.speaker_names[word] for word in words if word in self.speaker_names}
        return roles.pop() if len(roles) == 1 else None

    def _add(self, memory: Memory, *, call: int = -1, position: int = 0) -> int:
        terms = Counter(tokenize(memory.content))
        self.units.append(
            _Unit(
                memory=memory,
                terms=terms,
                length=sum(terms.values()) or 1,
                chars=len(_speaker_line(memory)) + 1,
                call=call,
                position=position,
            )
        )
        return len(self.units) - 1

    # Scoring -----------------------------------------------------------------------------
    def _idf(self, term: str) -> float:
        n, df = len(self.units), len(self.postings.get(term, ()))
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        calls = len(self.calls)
        if calls > 1 and self.call_idf_power:
            in_calls = self.call_frequency.get(term, 0)
            spread = _bm25_idf(calls, in_calls) / _bm25_idf(calls, 1)
            idf *= spread**self.call_idf_power
        return idf

    def _turn_scores(self, query_terms: Iterable[str]) -> dict[int, float]:
        scores: dict[int, float] = {}
        for term in query_terms:
            postings = self.postings.get(term)
            if not postings:
                continue
            idf = self._idf(term)
            for index, frequency in postings:
                unit = self.units[index]
                norm = self.k1 * (1 - self.b + self.b * unit.length / self.average_length)
                scores[index] = scores.get(index, 0.0) + idf * _saturate(frequency, norm, self.k1)
        return scores

    def _call_scores(self, query_terms: Iterable[str]) -> list[float]:
        """BM25 of each whole call (its turns and summary) against the query."""
        terms = list(query_terms)
        scores = []
        for call in self.calls:
            norm = self.k1 * (1 - 0.75 + 0.75 * call.length / self.average_call_length)
            scores.append(
                sum(
                    _bm25_idf(len(self.calls), self.call_frequency[term])
                    * _saturate(call.terms[term], norm, self.k1)
                    for term in terms
                    if call.terms.get(term)
                )
            )
        return scores

    def _dated_calls(self, query: str) -> set[int]:
        periods = query_periods(query)
        if not periods:
            return set()
        dated = {
            index
            for index, call in enumerate(self.calls)
            if call.started
            and any(p.contains(call.started, self.date_before, self.date_after) for p in periods)
        }
        # A period that covers every call (or none) tells nothing about which one.
        return dated if len(dated) < len(self.calls) else set()

    def rank(self, query: str) -> list[tuple[int, float]]:
        """Every unit with a positive score, best first, as (unit index, score)."""
        query_terms = set(tokenize(query))
        if not query_terms:
            return []
        turn_scores = self._turn_scores(query_terms)
        if self.vectors is None and self.vector_cache is not None:
            self.vectors = self.vector_cache.cached(self._texts)
        if self.vectors is not None and self.vector_cache is not None and self.dense_weight:
            turn_scores = self._fuse(turn_scores, self.vector_cache.query(query))
        dated = self._dated_calls(query)
        combined: dict[int, float] = {}
        for index, score in turn_scores.items():
            unit = self.units[index]
            if unit.call < 0:
                combined[index] = combined.get(index, 0.0) + score
                continue
            if unit.call in dated:
                score *= 1 + self.date_boost
            turns = self.calls[unit.call].turns
            combined[index] = combined.get(index, 0.0) + score
            # The answer is often the turn just before or after the one using the query's
            # words ("What did you paint?" / "A sunset"), so neighbours share the score.
            for distance, weight in enumerate(self.neighbour_weights, start=1):
                for position in (unit.position - distance, unit.position + distance):
                    if 0 <= position < len(turns):
                        neighbour = turns[position]
                        combined[neighbour] = combined.get(neighbour, 0.0) + weight * score
        call_scores = self._call_scores(query_terms)
        best_call = max(call_scores, default=0.0)
        if best_call > 0 and self.call_prior:
            for index in combined:
                call = self.units[index].call
                if call >= 0:
                    combined[index] *= 1 + self.call_prior * call_scores[call] / best_call
        speaker = self._named_speaker(query)
        if speaker is not None and self.speaker_boost:
            for index in combined:
                if self.units[index].memory.metadata.get("role") == speaker:
                    combined[index] *= 1 + self.speaker_boost
        return sorted(
            ((index, score) for index, score in combined.items() if score > 0),
            key=lambda item: (-item[1], item[0]),
        )

    def _fuse(self, turn_scores: dict[int, float], query_vector: Any) -> dict[int, float]:
        """BM25 scaled to 1 at the best turn, plus `dense_weight` x the cosine similarity
        scaled from `dense_floor` (0) to the best turn's (1), raised to `dense_power`."""
        similarity = self.vectors @ query_vector
        best_similarity = float(similarity.max())
        best = max(turn_scores.values(), default=0.0)
        fused = {index: score / best for index, score in turn_scores.items()} if best else {}
        if best_similarity <= self.dense_floor:
            return fused
        scaled = (similarity - self.dense_floor) / (best_similarity - self.dense_floor)
        for index in (scaled > 0).nonzero()[0].tolist():
            credit = self.dense_weight * float(scaled[index]) ** self.dense_power
            fused[index] = fused.get(index, 0.0) + credit
        return fused

    # Selection ---------------------------------------------------------------------------
    def search(self, query: str, limit: int, *, max_chars: int | None = None) -> list[Memory]:
        """Up to `limit` excerpts, best first: each is one call's best turns, in call order.

        Turns are taken best first until about `max_chars` characters of excerpt text are
        chosen; a turn joins its call's excerpt, or opens a new one while fewer than
        `limit` exist. Turns that do not fit are skipped for shorter ones further down.
        """
        budget = self.max_chars if max_chars is None else max_chars
        excerpts: dict[int, _Excerpt] = {}  # keyed by call, or by -1 - unit for standalone
        used = 0
        for index, score in self.rank(query):
            unit = self.units[index]
            key = unit.call if unit.call >= 0 else -1 - index
            excerpt = excerpts.get(key)
            cost = unit.chars + (0 if excerpt else self.excerpt_header_chars)
            if used + cost > budget or (excerpt is None and len(excerpts) >= limit):
                continue
            if excerpt is None:
                excerpts[key] = _Excerpt(score=score, units={index}, chars=cost)
            else:
                excerpt.units.add(index)
                excerpt.chars += cost
            used += cost
        return [self._excerpt(excerpt) for excerpt in excerpts.values()]

    def _excerpt(self, excerpt: _Excerpt) -> Memory:
        units = sorted(excerpt.units, key=lambda index: self.units[index].position)
        members = [self.units[index].memory for index in units]
        first = members[0]
        if len(members) == 1 and first.metadata.get("kind") != "turn":
            return _with_metadata(first, first.content, score=round(excerpt.score, 4))
        lines: list[str] = []
        for previous, current in zip([None, *units], units, strict=False):
            if (
                previous is not None
                and self.units[current].position != self.units[previous].position + 1
            ):
                lines.append(SEPARATOR)
            lines.append(_speaker_line(self.units[current].memory))
        roles = {member.metadata.get("role") for member in members}
        return _with_metadata(
            first,
            "\n".join(lines),
            kind="excerpt",
            role=roles.pop() if len(roles) == 1 else "mixed",
            turn_indexes=[member.metadata.get("turn_index") for member in members],
            score=round(excerpt.score, 4),
        )


def _bm25_idf(documents: int, frequency: int) -> float:
    return math.log(1 + (documents - frequency + 0.5) / (frequency + 0.5))


def _saturate(frequency: int, norm: float, k1: float) -> float:
    return frequency * (k1 + 1) / (frequency + norm)


def _started(memory: Memory) -> datetime | None:
    started = memory.metadata.get("call_started_at")
    return datetime.fromtimestamp(started, UTC) if isinstance(started, int | float) else None


def _with_metadata(memory: Memory, content: str, **metadata: object) -> Memory:
    return Memory(
        id=memory.id,
        user_id=memory.user_id,
        content=content,
        metadata={**memory.metadata, **metadata},
        created_at=memory.created_at,
    )


def _speaker_line(memory: Memory) -> str:
    role = memory.metadata.get("role")
    speaker = "Caller" if role == "user" else "Agent" if role == "agent" else str(role or "")
    return f"{speaker}: {memory.content}" if speaker else memory.content
