"""The caller indexes one process holds, and the callers whose saved index is behind.

Bookkeeping only, shared by the event loop and the store's threads (hence the lock): the
store decides what to read, save and rank.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from elaoms.search.ranking import CallerIndex

# (memories, last seq) of a caller's memories: an index describes one version.
Version = tuple[int, int]


class HeldIndexes:
    def __init__(self, size: int) -> None:
        self.size = size
        self._held: OrderedDict[str, tuple[Version, CallerIndex]] = OrderedDict()
        self._unsaved: set[str] = set()
        self._lock = threading.Lock()

    def holds(self, user_id: str) -> bool:
        with self._lock:
            return user_id in self._held

    def get(self, user_id: str, version: Version) -> CallerIndex | None:
        """The caller's index if it describes `version` of their memories."""
        with self._lock:
            held = self._held.get(user_id)
            if held is None or held[0] != version:
                return None
            self._held.move_to_end(user_id)
            return held[1]

    def put(self, user_id: str, version: Version, index: CallerIndex) -> None:
        """Hold `index`, dropping the least recently used beyond `size`."""
        with self._lock:
            self._held[user_id] = (version, index)
            self._held.move_to_end(user_id)
            while len(self._held) > self.size:
                self._held.popitem(last=False)

    def drop(self, user_id: str) -> None:
        with self._lock:
            self._held.pop(user_id, None)

    def mark_unsaved(self, user_id: str) -> None:
        with self._lock:
            self._unsaved.add(user_id)

    def take_unsaved(self) -> list[str]:
        """The callers marked since the last call, unmarked."""
        with self._lock:
            callers, self._unsaved = self._unsaved, set()
        return list(callers)

    def remark_unsaved(self, callers: Iterable[str]) -> None:
        with self._lock:
            self._unsaved.update(callers)
