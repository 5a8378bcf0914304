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
import heapq
import math
import re
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import accumulate
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import orjson
import snowballstemmer
import zstandard

from elaoms.memory.base import Memory
from elaoms.memory.records import MAX_CALL_CHARS, MAX_TURNS, clamp_timestamp, finite
from elaoms.payloads import decode, encode

if TYPE_CHECKING:
    from elaoms.search.embeddings import VectorCache

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# A Snowball stemmer keeps the word it works on in the object: one used by two threads at
# once raised IndexErrors and returned wrong stems, which the cache below then kept for
# the life of the process. So one stemmer per thread.
_stemmers = threading.local()

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

# A question asking for a count or an amount is answered by a turn that states a number.
_COUNTING_QUESTION = re.compile(r"\bhow\s+(?:many|much|often)\b", re.IGNORECASE)
_NUMBER = re.compile(
    r"\b(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|"
    r"thirty|forty|fifty|hundred|thousand|dozen|once|twice|first|second|third)\b",
    re.IGNORECASE,
)

SEPARATOR = "…"  # stands between two non-adjacent turns of one excerpt
# Bounds on one search's work. A query is a few keywords (the agent's LLM writes it), and
# the answer quotes a few turns: the best few thousand by BM25 hold them.
MAX_QUERY_CHARS = 1_000
MAX_QUERY_TERMS = 32
MAX_CANDIDATES = 5_000
DEFAULT = object()  # CallerIndex(vectors=DEFAULT): the process's embeddings, if any

# Words that are capitalised without being anyone's name.
_CALENDAR_WORDS = frozenset(
    name.lower()
    for name in (*calendar.day_name, *calendar.month_name, *calendar.month_abbr)
    if name
)
_CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=65536)  # thread-safe, and it only ever holds a stemmer's whole answer
def _stem(word: str) -> str:
    stemmer = getattr(_stemmers, "stemmer", None)
    if stemmer is None:
        stemmer = _stemmers.stemmer = snowballstemmer.stemmer("english")
    return str(stemmer.stemWord(word))


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


# Of `CallerIndex.to_bytes`: an index saved in another format is rebuilt, never misread.
INDEX_FORMAT = 8


class Postings:
    """term -> posting ("number frequency number frequency ..."). A dict while an index
    grows; once saved and loaded, one text that a search looks its few terms up in: loading
    then makes one string, not thousands of keys and values to build and later free."""

    __slots__ = ("_terms", "_text")

    def __init__(self, text: str = "") -> None:
        self._text = text  # "\nterm\tposting\n..." as `text()` writes it
        self._terms: dict[str, str] | None = None if text else {}

    def get(self, term: str) -> str:
        if self._terms is not None:
            return self._terms.get(term, "")
        start = self._text.find(f"\n{term}\t")  # terms hold neither tabs nor newlines
        if start < 0:
            return ""
        start += len(term) + 2
        return self._text[start : self._text.index("\n", start)]

    def terms(self) -> dict[str, str]:
        """The postings to change (the text, if loaded, is parsed once)."""
        if self._terms is None:
            lines = self._text.split("\n")
            self._terms = dict(line.split("\t", 1) for line in lines if line)
        return self._terms

    def text(self) -> str:
        if self._terms is None:
            return self._text
        return "\n" + "".join(f"{term}\t{posting}\n" for term, posting in self._terms.items())


class UnitRecords:
    """What an answer quotes of each unit: its text, and its id, time and metadata.

    The texts are a list while an index grows; once loaded, one string with the offset
    where each text ends. The rest is one JSON line per unit (`[id, created, shared
    metadata entry, own metadata]`), all in one byte string with the offset where each
    line ends. A search slices out the texts it quotes and decodes the lines of its
    excerpts' first units: building, then freeing, these values for every unit of every
    index loaded was about half of what loading an index used to cost.
    """

    __slots__ = ("_joined", "_lines", "_text_ends", "_texts", "line_ends")

    def __init__(
        self,
        joined: str = "",
        text_ends: list[int] | None = None,
        lines: bytes = b"",
        line_ends: list[int] | None = None,
    ) -> None:
        self._joined = joined
        self._text_ends = text_ends or []
        self._texts: list[str] | None = None if self._text_ends else []
        self._lines: bytes | bytearray = lines
        self.line_ends = line_ends or []

    def append(self, memory: Memory, shared: int, own_metadata: dict[str, Any]) -> None:
        self.texts().append(memory.content)
        if not isinstance(self._lines, bytearray):
            self._lines = bytearray(self._lines)
        created = finite(memory.created_at) or 0.0  # NaN would come back as null
        self._lines += encode([memory.id, created, shared, own_metadata])
        self.line_ends.append(len(self._lines))

    def text(self, unit: int) -> str:
        if self._texts is not None:
            return self._texts[unit]
        return self._joined[self._text_ends[unit - 1] if unit else 0 : self._text_ends[unit]]

    def texts(self) -> list[str]:
        """Every unit's text (for learning speaker names and for embeddings)."""
        if self._texts is None:
            self._texts = [self.text(unit) for unit in range(len(self._text_ends))]
        return self._texts

    def line(self, unit: int) -> tuple[str, float, int, dict[str, Any]]:
        start = self.line_ends[unit - 1] if unit else 0
        memory_id, created, shared, own_metadata = decode(self._lines[start : self.line_ends[unit]])
        return memory_id, created, shared, own_metadata

    def saved(self) -> tuple[dict[str, Any], bytes]:
        """The state `to_bytes` saves, and the lines."""
        texts = self.texts()
        state = {
            "texts": "".join(texts),
            "text_ends": list(accumulate(map(len, texts))),
            "line_ends": self.line_ends,
        }
        return state, bytes(self._lines)

    @classmethod
    def loaded(cls, state: dict[str, Any], lines: bytes) -> UnitRecords:
        """The records `saved` returned. Raises ValueError if any is missing."""
        try:
            joined, text_ends, line_ends = state["texts"], state["text_ends"], state["line_ends"]
        except KeyError as error:
            raise ValueError(f"caller index without {error}") from None
        if len(text_ends) != len(line_ends) or (line_ends[-1] if line_ends else 0) != len(lines):
            raise ValueError("caller index with records missing")
        return cls(joined, text_ends, lines, line_ends)


@dataclass(slots=True)
class _Excerpt:
    score: float
    units: set[int]
    chars: int


class CallerIndex:
    """BM25 over one caller's turns, smoothed by neighbouring turns and the whole call.

    The parameters below are generic retrieval knobs; they were set by measuring on the
    LoCoMo bench (docs/search.md), so treat the exact values as tuned, not derived.

    Everything the ranking needs is plain lists and dicts, and what an answer quotes is
    one JSON line per unit (`UnitRecords`), so an index is saved with `to_bytes` after a
    call is stored and loaded with `from_bytes` by a search: one compressed read of a few
    pages, in about a tenth of a millisecond, instead of re-reading and re-tokenizing the
    caller's history. `extend` adds a call to it in time proportional to that call (and a
    re-read of the turns' capitalised words).
    """

    k1 = 1.2
    b = 0.9  # turns vary from "ok" to paragraphs: normalise length almost fully
    call_idf_power = 0.5  # damp terms present in nearly every call (the speakers' names)
    neighbour_weights = (0.6, 0.3)  # share of a turn's score given to turns 1 and 2 away
    call_prior = 1.0  # up to x2 for the turn's call best matching the query as a whole
    date_boost = 1.0  # x2 for calls in or just after a period the query names
    date_before = timedelta(days=7)
    date_after = timedelta(days=45)
    speaker_boost = 2.0  # x3 for the turns of the one speaker the query names
    speaker_name_calls = 0.2  # a name must address a speaker in this share of calls
    dense_weight = 1.0  # embedding similarity next to BM25 (normalised to 1 at best turn)
    dense_floor = 0.2  # cosine below which a turn gets no semantic credit
    dense_power = 2.0
    # Pseudo-relevance feedback in the model's space (`_fuse`), off: +0.004 on left-out
    # files, within noise (docs/search.md, fifth round). `bench/recall.py --leave-one-out`
    # tries it at 0.6 over 8 turns (with `dense_power` 3, where it was best).
    dense_feedback = 0.0  # the query vector moves this far toward its best turns' mean ...
    dense_feedback_turns = 8  # ... of this many turns, best by the first fused score
    summary_weight = 0.3  # a summary sentence's words, credited to the turn it recounts
    number_boost = 1.0  # x2 for turns stating a number, when the query asks "how many"
    excerpt_header_chars = 25  # what the context adds per excerpt ("[Call on ...]")
    max_chars = 2800  # excerpt text returned in total; the context's budget minus headers

    # The saved state besides the records. Units (turns, and memories outside any call)
    # are parallel lists.
    _STATE = (
        "user_id", "roles", "turn_numbers", "lengths", "chars", "unit_calls", "positions",
        "postings", "total_length", "call_keys", "call_turns", "call_started",
        "call_postings", "call_lengths", "speaker_names", "shared_metadata",
        "recounted_postings", "recounted_lengths", "recounted_length", "numbers",
    )  # fmt: skip

    def __init__(self, memories: Sequence[Memory] = (), *, vectors: Any = DEFAULT) -> None:
        """`vectors`: a `VectorCache` to add the semantic signal, None for BM25 alone; by
        default the process's (`SEARCH_EMBEDDINGS`, and whether the extra is installed)."""
        self.user_id = ""  # the caller (every memory of an index is theirs)
        self.records = UnitRecords()
        # The metadata every memory of one call repeats, as JSON, kept once per call.
        self.shared_metadata: list[str] = []
        self.roles: list[str | None] = []
        self.turn_numbers: list[int | None] = []  # the turn's `turn_index` in its call
        self.lengths: list[int] = []  # terms
        self.chars: list[int] = []  # rendered size in an excerpt, newline included
        self.unit_calls: list[int] = []  # index into the call lists; -1 outside any call
        self.positions: list[int] = []  # order of the turn within its call
        # term -> "unit frequency unit frequency ...", the turns using it.
        self.postings = Postings()
        self.total_length = 0
        self.call_keys: list[str] = []  # conversation ids
        self.call_turns: list[list[int]] = []
        self.call_started: list[float | None] = []
        # term -> "call frequency ...", counting each call's turns and summary.
        self.call_postings = Postings()
        self.call_lengths: list[int] = []  # terms
        self.speaker_names: dict[str, str] = {}
        # term -> "unit frequency ...": the words of the summary sentences recounting each
        # turn (`_recount`), a second, weaker field of the turn.
        self.recounted_postings = Postings()
        self.recounted_lengths: dict[str, int] = {}  # unit (as JSON keys are) -> terms
        self.recounted_length = 0  # their sum
        self.numbers = ""  # per unit, "1" if it states a number (`number_boost`), else "0"
        self.vector_cache: VectorCache | None = None
        self.vectors: Any = None
        self.extend(memories)
        self.attach_vectors(vectors)

    # Saving and loading ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The state as one line of JSON, then the records, compressed."""
        state = {name: getattr(self, name) for name in self._STATE}
        state["postings"] = self.postings.text()
        state["call_postings"] = self.call_postings.text()
        state["recounted_postings"] = self.recounted_postings.text()
        records, lines = self.records.saved()
        # JSON escapes newlines inside strings: the first newline ends the state.
        text = orjson.dumps({"format": INDEX_FORMAT, **state, **records}) + b"\n" + lines
        # Compressed: the JSON shrinks about sevenfold, so a search that loads the index
        # from a store larger than the page cache reads that much less from disk, and
        # zstd decompresses it about six times faster than zlib.
        return zstandard.compress(text, 3)

    @classmethod
    def from_bytes(cls, data: bytes, *, vectors: Any = DEFAULT) -> CallerIndex:
        """An index saved by `to_bytes`. Raises ValueError for data of another format."""
        try:
            text = _decompress(data)
        except zstandard.ZstdError as error:
            raise ValueError(f"not a caller index: {error}") from None
        state_end = text.find(b"\n")
        try:
            state = orjson.loads(memoryview(text)[: max(0, state_end)])
        except orjson.JSONDecodeError as error:
            raise ValueError(f"not a caller index: {error}") from None
        if not isinstance(state, dict) or state.get("format") != INDEX_FORMAT:
            raise ValueError("not a caller index of this format")
        index = cls.__new__(cls)
        try:
            for name in cls._STATE:
                setattr(index, name, state[name])
        except KeyError as error:
            raise ValueError(f"caller index without {error}") from None
        index.records = UnitRecords.loaded(state, text[state_end + 1 :])
        if len(index.records.line_ends) != index.units:
            raise ValueError("caller index with records missing")
        index.postings = Postings(str(index.postings))
        index.call_postings = Postings(str(index.call_postings))
        index.recounted_postings = Postings(str(index.recounted_postings))
        index.attach_vectors(vectors)
        return index

    @property
    def units(self) -> int:
        return len(self.roles)

    @property
    def texts(self) -> list[str]:
        """Every unit's text, in unit order."""
        return self.records.texts()

    def attach_vectors(self, vectors: Any) -> None:
        """Rank with `vectors` too (as for `__init__`); the texts' vectors are looked up,
        or their computation is started in the background."""
        if vectors is DEFAULT:
            from elaoms.search.embeddings import default_cache

            vectors = default_cache()
        self.vector_cache = vectors if self.units else None
        self.vectors = None
        if self.vector_cache is not None:
            # Never embed here: a search is waiting. Until the background fill is done the
            # index ranks by BM25 alone, then picks the vectors up (see `rank`).
            self.vectors = self.vector_cache.cached(self.texts)
            if self.vectors is None:
                self.vector_cache.fill_in_background(self.texts)

    # Building ----------------------------------------------------------------------------
    def extend(self, memories: Iterable[Memory]) -> None:
        """Add memories, in the order they were stored. Adding a caller's memories in any
        number of batches gives the index built from all of them at once, as long as a
        call's turns are stored in one batch (a stored call always is)."""
        memories = list(memories)
        shared = self._share_metadata(memories)
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
        call_of = {key: call for call, key in enumerate(self.call_keys)}
        added: dict[int, Counter[str]] = {}  # call -> terms it gains
        new_calls: set[int] = set()
        for conversation, turns in turns_by_call.items():
            turns.sort(key=_turn_number)
            # One call's share of the work is bounded, for calls stored before ingestion
            # capped them too (`elaoms.memory.records`): its first turns, as ingestion keeps.
            turns = _within_call_caps(turns)
            call = call_of.get(conversation)
            if call is None:
                call = call_of[conversation] = len(self.call_keys)
                self.call_keys.append(conversation)
                self.call_turns.append([])
                self.call_started.append(_started(turns[0]))
                self.call_lengths.append(0)
                new_calls.add(call)
            gained = added.setdefault(call, Counter())
            for memory in turns:
                position = len(self.call_turns[call])
                terms = self._add(memory, shared, call=call, position=position)
                self.call_turns[call].append(self.units - 1)
                gained.update(terms)
        for conversation, summary in summaries.items():
            if conversation in call_of:
                added.setdefault(call_of[conversation], Counter()).update(tokenize(summary.content))
                self._recount(call_of[conversation], summary.content)
            else:
                standalone.append(summary)
        call_postings = self.call_postings.terms()
        for call, gained in added.items():
            for term, count in gained.items():
                posting = call_postings.get(term, "")
                if call in new_calls:  # calls are numbered in order: it goes last
                    call_postings[term] = f"{posting} {call} {count}".lstrip()
                else:  # a summary joining turns stored earlier
                    counts = dict(_pairs(posting))
                    counts[call] = counts.get(call, 0) + count
                    call_postings[term] = " ".join(f"{c} {n}" for c, n in sorted(counts.items()))
            self.call_lengths[call] += sum(gained.values())
        for memory in standalone:
            self._add(memory, shared, call=-1, position=0)
        self._learn_speaker_names()
        if self.vector_cache is not None:
            self.attach_vectors(self.vector_cache)  # the texts changed: so do the vectors

    def _share_metadata(self, memories: list[Memory]) -> dict[int, tuple[int, dict[str, Any]]]:
        """Keep once what the memories of one call share in their metadata (its
        conversation, agent and times: two thirds of an index, saved per turn).
        -> id(memory) -> (its entry in `shared_metadata`, that metadata)."""
        by_call: dict[str, list[Memory]] = {}
        for memory in memories:
            conversation = memory.metadata.get("conversation_id")
            if isinstance(conversation, str):
                by_call.setdefault(conversation, []).append(memory)
        shared: dict[int, tuple[int, dict[str, Any]]] = {}
        for group in by_call.values():
            if len(group) < 2:
                continue
            common = dict(group[0].metadata)
            for memory in group[1:]:
                common = {
                    key: value
                    for key, value in common.items()
                    # Typed: 1 == True == 1.0, yet they are different JSON.
                    if type(memory.metadata.get(key)) is type(value)
                    and memory.metadata[key] == value
                }
            entry = (len(self.shared_metadata), common)
            self.shared_metadata.append(encode(common).decode())
            for memory in group:
                shared[id(memory)] = entry
        return shared

    def _add(
        self,
        memory: Memory,
        shared: dict[int, tuple[int, dict[str, Any]]],
        *,
        call: int,
        position: int,
    ) -> Counter[str]:
        terms = Counter(tokenize(memory.content))
        unit = self.units
        role = memory.metadata.get("role")
        turn_number = memory.metadata.get("turn_index")
        self.user_id = self.user_id or memory.user_id
        entry, common = shared.get(id(memory), (-1, {}))
        own = {key: value for key, value in memory.metadata.items() if key not in common}
        self.records.append(memory, entry, own)
        self.roles.append(role if isinstance(role, str) else None)
        self.turn_numbers.append(turn_number if isinstance(turn_number, int) else None)
        self.lengths.append(sum(terms.values()) or 1)
        self.chars.append(len(_speaker_line(self.roles[unit], memory.content)) + 1)
        self.unit_calls.append(call)
        self.positions.append(position)
        self.numbers += "1" if _NUMBER.search(memory.content) else "0"
        self.total_length += self.lengths[unit]
        postings = self.postings.terms()
        for term, frequency in terms.items():
            posting = postings.get(term)
            postings[term] = f"{posting} {unit} {frequency}" if posting else f"{unit} {frequency}"
        return terms

    def _recount(self, call: int, summary: str) -> None:
        """Credit each sentence of a call's summary to the one turn of that call it recounts.

        A summary says in a few plain words what a turn said at length or in other words
        ("Melanie mentioned a book she read" for "This book I read last year reminds me
        to..."), and questions are asked in such words. The sentence's words become a
        weaker field of the turn that shares the most of its rare words (BM25 among the
        call's own turns, so a call's credit depends on that call alone and is given once,
        at ingestion, off the search path). The summary itself is still never quoted.
        """
        turns = self.call_turns[call]
        if not turns:
            return
        turn_terms = [Counter(tokenize(self.records.text(unit))) for unit in turns]
        in_turns: Counter[str] = Counter()
        for terms in turn_terms:
            in_turns.update(terms.keys())
        average = sum(self.lengths[unit] for unit in turns) / len(turns)
        postings = self.recounted_postings.terms()
        for sentence in _SENTENCE_END.split(summary):
            sentence_terms = Counter(tokenize(sentence))
            best, best_score = -1, 0.0
            for position, terms in enumerate(turn_terms):
                norm = self.k1 * (1 - self.b + self.b * self.lengths[turns[position]] / average)
                score = sum(
                    _bm25_idf(len(turns), in_turns[term]) * _saturate(terms[term], norm, self.k1)
                    for term in sentence_terms
                    if term in terms
                )
                if score > best_score:
                    best, best_score = position, score
            if best < 0:
                continue
            unit = turns[best]
            for term, frequency in sentence_terms.items():
                posting = postings.get(term)
                postings[term] = (
                    f"{posting} {unit} {frequency}" if posting else f"{unit} {frequency}"
                )
            key, length = str(unit), sum(sentence_terms.values())
            self.recounted_lengths[key] = self.recounted_lengths.get(key, 0) + length
            self.recounted_length += length

    def _learn_speaker_names(self) -> None:
        """Name (lower-cased) -> role, learnt from how the speakers address each other.

        People say the other's name ("Thanks, Maria!") and rarely their own, so a
        capitalised word that one role says in many calls, that the other role almost never
        says, that never appears lower-cased (not a common word) and that is capitalised
        inside a sentence at least once (not "Hello.") names the other role.
        A question about that person ("What did Maria paint?") is then about that role's
        turns, while the name itself only occurs in the other role's.

        Learnt again from every turn when the index grows (in the background, after a
        call): keeping what it learns from would make every saved index several thousand
        words larger, and every search loads one. Only the few words said often enough by
        one role are looked for lower-cased and inside sentences, in all turns at once.
        """
        words_said: dict[str, dict[str, set[int]]] = {}  # role -> word -> calls
        texts = self.texts
        turns: list[str] = []
        for unit, call in enumerate(self.unit_calls):
            if call < 0:
                continue
            text = texts[unit]
            turns.append(text)
            said = words_said.setdefault(self.roles[unit] or "", {})
            for word in set(_CAPITALISED.findall(text)):
                said.setdefault(word.lower(), set()).add(call)
        self.speaker_names = {}
        if len(words_said) != 2:
            return
        everything = "\n".join(turns)  # on separate lines: no pattern below spans two turns
        needed = max(2, self.speaker_name_calls * len(self.call_keys))
        (role_a, said_a), (role_b, said_b) = words_said.items()
        for speaker, said_by_other, said_by_self in (
            (role_a, said_b, said_a),
            (role_b, said_a, said_b),
        ):
            for word, calls in said_by_other.items():
                if (
                    len(calls) >= needed
                    and len(said_by_self.get(word, ())) <= 0.1 * len(calls)
                    and word not in STOP_WORDS
                    and word not in _CALENDAR_WORDS
                    and not _said_lower_cased(word, everything)
                    and _capitalised_mid_sentence(word, everything)
                ):
                    self.speaker_names[word] = speaker

    def _named_speaker(self, query: str) -> str | None:
        words = {word.removesuffix("'s") for word in _WORD.findall(query.lower())}
        roles = {self.speaker_names[word] for word in words if word in self.speaker_names}
        return roles.pop() if len(roles) == 1 else None

    # Scoring -----------------------------------------------------------------------------
    def _idf(self, term: str, df: int) -> float:
        n = self.units
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        calls = len(self.call_keys)
        if calls > 1 and self.call_idf_power:
            in_calls = _pair_count(self.call_postings.get(term))
            spread = _bm25_idf(calls, in_calls) / _bm25_idf(calls, 1)
            idf *= spread**self.call_idf_power
        return idf

    def _turn_scores(self, query_terms: Iterable[str]) -> dict[int, float]:
        scores: dict[int, float] = {}
        idfs: dict[str, float] = {}
        average_length = self.total_length / max(1, self.units)
        lengths, k1, b, get = self.lengths, self.k1, self.b, scores.get
        for term in query_terms:
            postings = _pairs(self.postings.get(term))
            if not postings:
                continue
            idf = idfs[term] = self._idf(term, len(postings))
            for index, frequency in postings:  # `_saturate`, inlined: the ranker's hot loop
                norm = k1 * (1 - b + b * lengths[index] / average_length)
                scores[index] = get(index, 0.0) + idf * (frequency * (k1 + 1) / (frequency + norm))
        if self.summary_weight and self.recounted_length:
            self._add_recounted(query_terms, scores, idfs)
        return scores

    def _add_recounted(
        self, query_terms: Iterable[str], scores: dict[int, float], idfs: dict[str, float]
    ) -> None:
        """The summary sentences' field (`_recount`), BM25 weighted by `summary_weight`.
        `idfs`: the query terms' IDF among the turns (a word rare in what was said stays
        rare in what recounts it)."""
        recounted = self.recounted_lengths
        average = self.recounted_length / len(recounted)
        k1, weight = self.k1, self.summary_weight
        for term in query_terms:
            posting = self.recounted_postings.get(term)
            if not posting:
                continue
            idf = idfs.get(term)
            if idf is None:  # no turn says it: only summaries do
                idf = self._idf(term, _pair_count(posting))
            idf *= weight
            for unit, frequency in _pairs(posting):
                norm = k1 * (1 - 0.75 + 0.75 * recounted[str(unit)] / average)
                scores[unit] = scores.get(unit, 0.0) + idf * _saturate(frequency, norm, k1)

    def _call_scores(self, query_terms: Iterable[str]) -> list[float]:
        """BM25 of each whole call (its turns and summary) against the query."""
        calls = len(self.call_keys)
        lengths = [length or 1 for length in self.call_lengths]
        average_call_length = sum(lengths) / max(1, calls)
        norms = [self.k1 * (1 - 0.75 + 0.75 * length / average_call_length) for length in lengths]
        scores = [0.0] * calls
        for term in query_terms:
            postings = _pairs(self.call_postings.get(term))
            idf = _bm25_idf(calls, len(postings))
            for call, frequency in postings:
                scores[call] += idf * _saturate(frequency, norms[call], self.k1)
        return scores

    def _dated_calls(self, query: str) -> set[int]:
        periods = query_periods(query)
        if not periods:
            return set()
        dated = {
            call
            for call, started in enumerate(self.call_started)
            if (moment := _moment(started)) is not None
            and any(
                period.contains(moment, self.date_before, self.date_after) for period in periods
            )
        }
        # A period that covers every call (or none) tells nothing about which one.
        return dated if len(dated) < len(self.call_keys) else set()

    def rank(self, query: str) -> list[tuple[int, float]]:
        """Every unit with a positive score, best first, as (unit index, score)."""
        # The work of one search is bounded whatever the query and the history: a query
        # of its first words, and the best-matching turns only go on to be smoothed.
        query = query[:MAX_QUERY_CHARS]
        # Sorted: adding the terms' scores in one order gives every process the same floats
        # (a set's order changes with each process's string hashing).
        query_terms = sorted(list(dict.fromkeys(tokenize(query)))[:MAX_QUERY_TERMS])
        if not query_terms:
            return []
        turn_scores = self._turn_scores(query_terms)
        if len(turn_scores) > MAX_CANDIDATES:
            turn_scores = dict(
                heapq.nlargest(MAX_CANDIDATES, turn_scores.items(), key=itemgetter(1))
            )
        if self.vectors is None and self.vector_cache is not None:
            self.vectors = self.vector_cache.cached(self.texts)
        if self.vectors is not None and self.vector_cache is not None and self.dense_weight:
            turn_scores = self._fuse(turn_scores, self.vector_cache.query(query))
        dated = self._dated_calls(query)
        combined: dict[int, float] = {}
        get, unit_calls, positions = combined.get, self.unit_calls, self.positions
        dated_factor = 1 + self.date_boost
        neighbour_weights = list(enumerate(self.neighbour_weights, start=1))
        for index, score in turn_scores.items():
            call = unit_calls[index]
            if call < 0:
                combined[index] = get(index, 0.0) + score
                continue
            if call in dated:
                score *= dated_factor
            turns = self.call_turns[call]
            combined[index] = get(index, 0.0) + score
            # The answer is often the turn just before or after the one using the query's
            # words ("What did you paint?" / "A sunset"), so neighbours share the score.
            position = positions[index]
            for distance, weight in neighbour_weights:
                share = weight * score
                if position - distance >= 0:
                    neighbour = turns[position - distance]
                    combined[neighbour] = get(neighbour, 0.0) + share
                if position + distance < len(turns):
                    neighbour = turns[position + distance]
                    combined[neighbour] = get(neighbour, 0.0) + share
        call_scores = self._call_scores(query_terms)
        best_call = max(call_scores, default=0.0)
        if best_call > 0 and self.call_prior:
            for index in combined:
                call = self.unit_calls[index]
                if call >= 0:
                    combined[index] *= 1 + self.call_prior * call_scores[call] / best_call
        speaker = self._named_speaker(query)
        if speaker is not None and self.speaker_boost:
            for index in combined:
                if self.roles[index] == speaker:
                    combined[index] *= 1 + self.speaker_boost
        if self.number_boost and _COUNTING_QUESTION.search(query):
            # "How many hikes has she been on?": the turns that count something say it.
            numbers, factor = self.numbers, 1 + self.number_boost
            for index in combined:
                if numbers[index] == "1":
                    combined[index] *= factor
        # Best first, ties by unit: sorted by unit, then (stably) by score.
        ranked = sorted((item for item in combined.items() if item[1] > 0), key=itemgetter(0))
        ranked.sort(key=itemgetter(1), reverse=True)
        return ranked

    def _fuse(self, turn_scores: dict[int, float], query_vector: Any) -> dict[int, float]:
        """BM25 scaled to 1 at the best turn, plus `dense_weight` x the cosine similarity
        scaled from `dense_floor` (0) to the best turn's (1), raised to `dense_power`.

        Then once more with the query vector moved toward the mean vector of the
        `dense_feedback_turns` best turns of that first sum (pseudo-relevance feedback, in
        the model's space: "What activities does Melanie partake in?" then also finds the
        turns that are like the pottery and camping ones it found first). No second model
        call: one more product of the turns' vectors with one vector."""
        fused = self._fuse_with(turn_scores, query_vector)
        if not self.dense_feedback or not fused:
            return fused
        best = heapq.nlargest(self.dense_feedback_turns, fused.items(), key=itemgetter(1))
        centroid = self.vectors[[index for index, _ in best]].mean(axis=0)
        moved = query_vector + self.dense_feedback * centroid
        norm = float((moved @ moved) ** 0.5)
        return self._fuse_with(turn_scores, moved / norm) if norm else fused

    def _fuse_with(self, turn_scores: dict[int, float], query_vector: Any) -> dict[int, float]:
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
        excerpts: dict[int, _Excerpt] = {}  # keyed by call, or by -1 - unit outside calls
        used = 0
        for index, score in self.rank(query):
            call = self.unit_calls[index]
            key = call if call >= 0 else -1 - index
            excerpt = excerpts.get(key)
            cost = self.chars[index] + (0 if excerpt else self.excerpt_header_chars)
            if used + cost > budget or (excerpt is None and len(excerpts) >= limit):
                continue
            if excerpt is None:
                excerpts[key] = _Excerpt(score=score, units={index}, chars=cost)
            else:
                excerpt.units.add(index)
                excerpt.chars += cost
            used += cost
        return [
            self._excerpt(sorted(excerpt.units, key=self.positions.__getitem__), excerpt.score)
            for excerpt in excerpts.values()
        ]

    def _memory(self, unit: int) -> Memory:
        memory_id, created, shared, own_metadata = self.records.line(unit)
        text = self.records.text(unit)
        metadata = (
            {**decode(self.shared_metadata[shared]), **own_metadata}
            if shared >= 0
            else own_metadata
        )
        return Memory(
            id=memory_id, user_id=self.user_id, content=text, metadata=metadata, created_at=created
        )

    def _excerpt(self, units: list[int], score: float) -> Memory:
        # Presented as its first turn's memory, with the excerpt's own text.
        first = self._memory(units[0])
        if len(units) == 1 and self.unit_calls[units[0]] < 0:
            return _with_metadata(first, one_line(first.content), score=round(score, 4))
        lines: list[str] = []
        for previous, current in zip([None, *units], units, strict=False):
            if previous is not None and self.positions[current] != self.positions[previous] + 1:
                lines.append(SEPARATOR)
            lines.append(_speaker_line(self.roles[current], self.records.text(current)))
        roles = {self.roles[unit] for unit in units}
        return _with_metadata(
            first,
            "\n".join(lines),
            kind="excerpt",
            role=roles.pop() if len(roles) == 1 else "mixed",
            turn_indexes=[self.turn_numbers[unit] for unit in units],
            score=round(score, 4),
        )


# The two searches below look for the word, then check what precedes it: a pattern that
# opens with `\b` or a look-behind is not searched by its literal prefix, and was twenty
# times slower on a long history.
_WORD_CHARACTER = re.compile(r"\w")
_WORD_AND_SPACE = re.compile(r"[A-Za-z0-9,;:] ")


def _said_lower_cased(word: str, text: str) -> bool:
    """Whether lower-cased `word` is a whole word of `text` (a common word, not a name)."""
    return any(
        match.start() == 0 or not _WORD_CHARACTER.match(text, match.start() - 1)
        for match in re.finditer(rf"{re.escape(word)}\b", text)
    )


def _capitalised_mid_sentence(word: str, text: str) -> bool:
    """Whether `text` capitalises `word` after a word and a space: "Hi Maria" names
    someone, "Hello." only opens a sentence."""
    return any(
        match.start() >= 2 and _WORD_AND_SPACE.match(text, match.start() - 2)
        for match in re.finditer(rf"{re.escape(word.capitalize())}\b", text)
    )


def _pairs(posting: str) -> list[tuple[int, int]]:
    """The (unit or call, frequency) pairs of a posting."""
    numbers = list(map(int, posting.split()))
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def _pair_count(posting: str) -> int:
    return (posting.count(" ") + 1) // 2 if posting else 0


def _bm25_idf(documents: int, frequency: int) -> float:
    return math.log(1 + (documents - frequency + 0.5) / (frequency + 0.5))


def _saturate(frequency: int, norm: float, k1: float) -> float:
    return frequency * (k1 + 1) / (frequency + norm)


def _started(memory: Memory) -> float | None:
    # A start no calendar holds (stored before ingestion checked it) is no start.
    return clamp_timestamp(memory.metadata.get("call_started_at"))


def _moment(started: float | None) -> datetime | None:
    """`started` as a date, or None for a value no calendar holds (a saved index of an
    earlier version may hold one)."""
    if started is None:
        return None
    try:
        return datetime.fromtimestamp(started, UTC)
    except (OverflowError, ValueError, OSError, TypeError):
        return None


def _turn_number(memory: Memory) -> int:
    number = memory.metadata.get("turn_index")
    return number if isinstance(number, int) and not isinstance(number, bool) else 0


def _within_call_caps(turns: list[Memory]) -> list[Memory]:
    if len(turns) <= MAX_TURNS and sum(len(turn.content) for turn in turns) <= MAX_CALL_CHARS:
        return turns
    kept: list[Memory] = []
    chars = 0
    for turn in turns[:MAX_TURNS]:
        chars += len(turn.content)
        if chars > MAX_CALL_CHARS:
            break
        kept.append(turn)
    return kept or turns[:1]


def _with_metadata(memory: Memory, content: str, **metadata: object) -> Memory:
    return Memory(
        id=memory.id,
        user_id=memory.user_id,
        content=content,
        metadata={**memory.metadata, **metadata},
        created_at=memory.created_at,
    )


def _speaker_line(role: str | None, text: str) -> str:
    # One turn, one line: a line break inside what someone said would let the quoted text
    # open a line of its own, a forged "[Call on ...]" header or "Agent: ..." turn.
    text = one_line(text)
    speaker = "Caller" if role == "user" else "Agent" if role == "agent" else role or ""
    return f"{speaker}: {text}" if speaker else text


def one_line(text: str) -> str:
    """`text` with every run of whitespace, line breaks of any kind included, one space."""
    return " ".join(text.split())


_thread_codecs = threading.local()


def _decompress(data: bytes) -> bytes:
    # A reused context decompresses an index in two thirds of the time of a new one; one
    # per thread, as a context must not be used by two threads at once.
    decompressor = getattr(_thread_codecs, "decompressor", None)
    if decompressor is None:
        decompressor = _thread_codecs.decompressor = zstandard.ZstdDecompressor()
    return decompressor.decompress(data)
