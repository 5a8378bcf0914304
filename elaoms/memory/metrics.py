"""The metric the stores count themselves (the others belong to the layers above)."""

from __future__ import annotations

from prometheus_client import Counter

FOREIGN_MEMORIES_DROPPED = Counter(
    "elaoms_foreign_memories_dropped_total",
    "Memories a backend returned for another user than the one asked for (dropped)",
)
