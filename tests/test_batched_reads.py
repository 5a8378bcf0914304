"""BatchedReads: lookups asked together go in one read, and one caller's deadline or a
failed read never leaves another caller waiting or answered wrong. The read here is an
in-process function (the helper knows no store); tests/test_postgres_copies.py runs it on
PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from elaoms.memory.batched import BatchedReads

STORED = {f"caller-{number}": f"profile-{number}" for number in range(0, 100, 2)}


class Store:
    """Answers from STORED; counts its reads and can be held or made to fail."""

    def __init__(self, *, held: bool = False) -> None:
        self.reads: list[list[str]] = []
        self.finished = 0
        self.release = asyncio.Event()  # a held store answers once released
        if not held:
            self.release.set()
        self.failing = False

    async def read(self, keys: list[str]) -> dict[str, str]:
        self.reads.append(keys)
        await self.release.wait()
        if self.failing:
            raise ConnectionError("the store went away")
        self.finished += 1
        return {key: STORED[key] for key in keys if key in STORED}


def test_keys_asked_together_are_one_read_and_each_gets_its_own_answer() -> None:
    async def scenario() -> None:
        store = Store()
        reads = BatchedReads(store.read)
        keys = [f"caller-{number}" for number in range(10)] + ["caller-2"]
        answers = await asyncio.gather(*(reads.get(key) for key in keys))
        assert answers == [STORED.get(key) for key in keys]
        assert len(store.reads) == 1 and sorted(store.reads[0]) == sorted(set(keys))
        assert await reads.get("caller-4") == "profile-4"  # asked alone: a read of its own
        assert store.reads[1] == ["caller-4"]

    asyncio.run(scenario())


def test_a_large_burst_is_read_in_bounded_chunks() -> None:
    async def scenario() -> None:
        store = Store()
        reads = BatchedReads(store.read, limit=16)
        keys = [f"caller-{number}" for number in range(40)]
        answers = await asyncio.gather(*(reads.get(key) for key in keys))
        assert answers == [STORED.get(key) for key in keys]
        assert [len(keys) for keys in store.reads] == [16, 16, 8]

    asyncio.run(scenario())


def test_a_caller_that_stops_waiting_leaves_the_read_to_the_others() -> None:
    async def scenario() -> None:
        store = Store(held=True)
        reads = BatchedReads(store.read)
        impatient = asyncio.ensure_future(asyncio.wait_for(reads.get("caller-0"), 0.01))
        patient = asyncio.ensure_future(reads.get("caller-2"))
        with pytest.raises(TimeoutError):
            await impatient
        store.release.set()
        assert await patient == "profile-2"
        await reads.close()
        assert store.finished == 1  # the read ran to its end: its connection went back

    asyncio.run(scenario())


def test_a_failed_read_fails_its_callers_only() -> None:
    async def scenario() -> None:
        store = Store()
        store.failing = True
        reads = BatchedReads(store.read)
        failed = await asyncio.gather(
            reads.get("caller-0"), reads.get("caller-1"), return_exceptions=True
        )
        assert [type(error) for error in failed] == [ConnectionError, ConnectionError]
        store.failing = False
        assert await reads.get("caller-0") == "profile-0"  # the next read is its own

    asyncio.run(scenario())


def test_callers_of_a_read_cancelled_at_shutdown_are_not_left_waiting() -> None:
    async def scenario() -> None:
        store = Store(held=True)
        reads = BatchedReads(store.read)
        waiting = asyncio.ensure_future(reads.get("caller-0"))
        for _ in range(1000):  # the read starts on the loop's next turn
            if store.reads:
                break
            await asyncio.sleep(0)
        assert store.reads
        for read in list(reads._reads):
            read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())


def test_a_read_cancelled_before_it_started_does_not_stop_the_next() -> None:
    async def scenario() -> None:
        store = Store()
        reads = BatchedReads(store.read)
        first = asyncio.ensure_future(reads.get("caller-0"))
        await asyncio.sleep(0)  # `first` asked: its read is scheduled, not started
        for read in list(reads._reads):
            read.cancel()
        first.cancel()
        assert await reads.get("caller-2") == "profile-2"
        assert store.reads == [["caller-0", "caller-2"]]  # the key left behind is read too

    asyncio.run(scenario())


@pytest.mark.parametrize("when", ["before the read starts", "during the read"])
def test_a_close_cancelled_leaves_the_reads_to_their_callers(when: str) -> None:
    # A shutdown under a deadline may cancel `close()`: the read it waits for must not be
    # cancelled with it (its callers would wait for ever, or fail without their deadline).
    async def scenario() -> None:
        store = Store(held=True)
        reads = BatchedReads(store.read)
        caller = asyncio.ensure_future(reads.get("caller-2"))
        await asyncio.sleep(0)  # asked: the read is scheduled
        if when == "during the read":
            for _ in range(1000):
                if store.reads:
                    break
                await asyncio.sleep(0)
            assert store.reads
        closing = asyncio.ensure_future(reads.close())
        await asyncio.sleep(0)
        closing.cancel()
        store.release.set()
        assert await asyncio.wait_for(caller, 5) == "profile-2"
        assert store.finished == 1

    asyncio.run(scenario())
