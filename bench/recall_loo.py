"""Leave-one-conversation-out evidence recall, in process (`bench/recall.py --leave-one-out`).

The ranker's settings were chosen on the same five files the dev figure is measured on, so
that figure flatters. Here each file is held out in turn: every candidate setting (a small
grid of the ranker's generic knobs, below) is measured on the other four, the best one
there is measured on the held-out file, and the mean and worst of those five figures are
what to expect on conversations the settings were not chosen on. For each signal, the
same is done with that signal switched off: the difference is what the signal buys on
left-out files. With the embeddings extra, only the summary weight, the counting boost and
the embedding's weight, feedback and power vary.

It runs the search path without HTTP: the memories ingestion makes of each call, the
caller's `CallerIndex`, its `search` with the service's budget and default limit, and the
service's `build_context`, cut to `--chars`: the same answers as the service gives (the
HTTP bench and this agree to the last evidence turn on the default settings).
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elaoms.memory.units import call_memories
from elaoms.phone import normalize_caller_id
from elaoms.search.ranking import CallerIndex
from elaoms.search.schemas import SearchRequest
from elaoms.search.service import SearchService, build_context

# Each signal's candidate values; the first is "off". The shipped value is among them.
# (The speaker boost's x2 was never chosen over x3 by any fold: it is left out to keep the
# grid, which doubles with each on/off signal, within half an hour on two cores.)
SIGNALS: dict[str, list[Any]] = {
    "summary_weight": [0.0, 0.3, 0.6],
    "call_prior": [0.0, 1.0, 2.0],
    "speaker_boost": [0.0, 2.0],
    "neighbour_weights": [(0.0, 0.0), (0.6, 0.3)],
    "date_boost": [0.0, 1.0],
    "number_boost": [0.0, 1.0],
}
DENSE_SIGNAL = {"dense_weight": [0.0, 0.5, 1.0], "dense_feedback": [0.0, 0.6]}
# Knobs with no "off" (`--vary k1,b`): chosen per fold like the signals, never reported as
# bought.
KNOBS: dict[str, list[Any]] = {
    "k1": [0.9, 1.2, 1.6],
    "b": [0.75, 0.9, 1.0],
    "dense_power": [2.0, 3.0],
}
# The signals of the latest round: the grid without them is the ranker before it, so one
# run gives the before and after figures side by side.
LATEST_ROUND = ("number_boost",)

Hits = dict[int, list[bool]]  # category -> found or not, per evidence turn


@dataclass
class File:
    name: str
    questions: list[dict[str, Any]]
    index: CallerIndex


def load(paths: Iterable[Path], vectors: Any) -> list[File]:
    files = []
    for path in paths:
        bench = json.loads(path.read_text())
        caller = normalize_caller_id(bench["caller_id"]) or bench["caller_id"]
        memories = [memory for call in bench["calls"] for memory in call_memories(caller, call)]
        index = CallerIndex(memories, vectors=vectors)
        if vectors is not None:
            index.vectors = vectors.vectors(index.texts)  # all of them now, not in background
        files.append(File(path.name, bench["questions"], index))
    return files


def measure(file: File, setting: dict[str, Any], chars: int) -> Hits:
    index = file.index
    defaults = {name: getattr(CallerIndex, name) for name in setting}
    for name, value in setting.items():
        setattr(index, name, value)
    try:
        service = SearchService(indexes=None, context_max_chars=chars)  # type: ignore[arg-type]
        limit = SearchRequest.model_fields["limit"].default
        hits: Hits = defaultdict(list)
        for question in file.questions:
            excerpts = index.search(question["question"], limit, max_chars=service.excerpt_budget)
            context = _normalize(build_context(excerpts, chars)[1][:chars])
            for evidence in question["evidence"]:
                hits[question["category"]].append(_normalize(evidence["text"]) in context)
        return hits
    finally:
        for name, value in defaults.items():
            setattr(index, name, value)


def recall(results: Iterable[Hits]) -> tuple[float, dict[int, float]]:
    merged: Hits = defaultdict(list)
    for hits in results:
        for category, found in hits.items():
            merged[category] += found
    every = [hit for found in merged.values() for hit in found]
    per_category = {c: sum(found) / len(found) for c, found in sorted(merged.items())}
    return sum(every) / max(1, len(every)), per_category


def leave_one_out(
    table: dict[tuple[Any, ...], dict[str, Hits]], names: Sequence[str]
) -> list[tuple[str, tuple[Any, ...], float, dict[int, float]]]:
    """For each file: the setting best on the others, and its recall on that file."""
    rows = []
    for held_out in names:
        others = [name for name in names if name != held_out]
        chosen = max(table, key=lambda key: recall(table[key][n] for n in others)[0])
        overall, categories = recall([table[chosen][held_out]])
        rows.append((held_out, chosen, overall, categories))
    return rows


def run(paths: Sequence[Path], chars: int, vectors: Any, vary: Sequence[str] | None = None) -> None:
    """`vary`: the signals whose values the grid tries (default: all of `SIGNALS`, or
    with embeddings the summary, counting and the embedding's settings); the others
    stay at their shipped values."""
    # With embeddings every search also runs the model's scoring: the whole grid times
    # the embedding weight takes too long on two cores, so by default only the fields
    # that carry meaning, the latest round's signals and the embedding's settings vary.
    every_signal = SIGNALS | KNOBS | (DENSE_SIGNAL if vectors is not None else {})
    if vary is None:
        vary = list(SIGNALS)
        if vectors is not None:
            vary = ["summary_weight", *LATEST_ROUND, *DENSE_SIGNAL, "dense_power"]
    unknown = [name for name in vary if name not in every_signal]
    if unknown:
        raise SystemExit(f"no such signal: {', '.join(unknown)} (known: {', '.join(every_signal)})")
    signals = {name: every_signal[name] for name in vary}
    files = load(paths, vectors)
    names = [file.name for file in files]
    keys = list(signals)
    table: dict[tuple[Any, ...], dict[str, Hits]] = {}
    for values in itertools.product(*signals.values()):
        setting = dict(zip(keys, values, strict=True))
        table[values] = {file.name: measure(file, setting, chars) for file in files}
    shipped = tuple(getattr(CallerIndex, key) for key in keys)
    print(f"settings tried: {len(table)} ({', '.join(keys)})")
    if shipped in table:
        overall, categories = recall(table[shipped].values())
        print(f"shipped setting on all files (dev): {overall:.3f} {_categories(categories)}")
    latest = [name for name in LATEST_ROUND if name in signals]
    before = {
        values: hits
        for values, hits in table.items()
        if all(values[keys.index(name)] == signals[name][0] for name in latest)
    }
    before_shipped = tuple(
        signals[key][0] if key in latest else value
        for key, value in zip(keys, shipped, strict=True)
    )
    if latest:
        if before_shipped in before:
            overall, categories = recall(before[before_shipped].values())
            print(
                f"the same without {', '.join(latest)} (dev): {overall:.3f} {_categories(categories)}"
            )
        print(f"leave one out without {', '.join(latest)} (before):")
        _print_rows(before, names, keys)
    print("leave one out (settings chosen on the other four files):")
    figures = _print_rows(table, names, keys)
    print("what each signal buys on left-out files (mean held-out recall, on - off):")
    for position, key in enumerate(keys):
        if key in KNOBS:
            continue
        off = signals[key][0]
        without = {k: v for k, v in table.items() if k[position] == off}
        held = [overall for _, _, overall, _ in leave_one_out(without, names)]
        print(f"  {key}: {sum(figures) / len(figures) - sum(held) / len(held):+.3f}")


def _print_rows(
    table: dict[tuple[Any, ...], dict[str, Hits]], names: Sequence[str], keys: Sequence[str]
) -> list[float]:
    """Each held-out file's recall with the setting chosen without it; the mean, worst and
    pooled figures. -> the held-out figures."""
    rows = leave_one_out(table, names)
    every: Hits = defaultdict(list)
    for held_out, chosen, overall, categories in rows:
        described = ", ".join(f"{k}={v}" for k, v in zip(keys, chosen, strict=True))
        print(f"  {held_out}: {overall:.3f} {_categories(categories)}  [{described}]")
        for category, found in table[chosen][held_out].items():
            every[category] += found
    figures = [overall for _, _, overall, _ in rows]
    pooled = recall([every])
    print(
        f"  mean {sum(figures) / len(figures):.3f}, worst {min(figures):.3f};"
        f" pooled {pooled[0]:.3f} {_categories(pooled[1])}"
    )
    return figures


def _categories(categories: dict[int, float]) -> str:
    return " ".join(f"{c}:{value:.3f}" for c, value in categories.items())


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())
