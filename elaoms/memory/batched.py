"""Lookups by key asked at about the same time, answered by one read.

Under load many requests miss a worker's copies at once (a caller asked for the first
time on this worker), and each read held a pooled connection for a turn of the event
loop or more, however fast the statement: at 100,000 stored calls the ten connections
of a worker queued, and the slowest tenth of client-data answers waited 34 to 54 ms for
a one-row read (docs/scaling.md). Keys asked while a read is being prepared go in that
read, so a burst of misses takes one connection and one statement. PostgreSQL reads
profiles (client-data) and search index states this way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Keys in one read at most: the statement and its answer stay small.
BATCH_LIMIT = 256


class BatchedReads(Generic[K, V]):
    """`get(key)` answers with `read(keys)[key]`, or None when the read did not find it.

    The read runs in a task of its own, so a caller that stops waiting (its deadline)
    leaves it to finish and give its connection back; the other callers still get their
    answer. A failed read fails every caller of that read."""

    def __init__(
        self, read: Callable[[list[K]], Awaitable[dict[K, V]]], *, limit: int = BATCH_LIMIT
    ) -> None:
        self._read = read
        self._limit = limit
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._reads: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references
        self._next: asyncio.Task[None] | None = None  # the read keys asked now will join

    async def get(self, key: K) -> V | None:
        answer: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(answer)
        # A read starts on the loop's next turn: every key asked meanwhile joins it. One
        # cancelled before it started will never read: the next one takes its keys.
        if self._next is None or self._next.done() or self._next.cancelling():
            self._next = asyncio.ensure_future(self._run())
            self._reads.add(self._next)
            self._next.add_done_callback(self._reads.discard)
        return await answer

    async def _run(self) -> None:
        self._next = None  # keys asked from now on wait for the next read
        waiting, self._waiting = self._waiting, {}
        keys = list(waiting)
        try:
            for start in range(0, len(keys), self._limit):
                chunk = keys[start : start + self._limit]
                try:
                    found = await self._read(chunk)
                except Exception as error:
                    for key in chunk:
                        for answer in waiting[key]:
                            if not answer.done():
                                answer.set_exception(error)
                    continue
                for key in chunk:
                    value = found.get(key)
                    for answer in waiting[key]:
                        if not answer.done():  # not a caller that stopped waiting
                            answer.set_result(value)
        finally:  # cancelled (the loop closing): nobody is left waiting for ever
            for answers in waiting.values():
                for answer in answers:
                    if not answer.done():
                        answer.cancel()

    async def close(self) -> None:
        """Wait for the reads under way (their connections go back to the pool). A close
        that is itself cancelled leaves them running: `wait`, unlike `gather`, does not
        cancel what it waits for (a read cut short would cancel the query on the server,
        and fail callers whose own deadline had not come)."""
        if self._reads:
            await asyncio.wait(set(self._reads))
