"""What one process keeps of its callers' PostgreSQL rows, dropped the moment they change.

On a shared store any replica may change a caller at any moment, so a copy kept for a
while (the embedded store's way) would greet a caller from before the call another
replica just stored. Yet the two reads made while the phone rings or the agent waits (a
caller's prepared profile, and the version of their memories that a held search index is
checked against) would each cost a round trip to the database, twice the CPU of the
embedded store's read.

So every transaction that changes a caller's memories or profile also sends the caller's
key on `CHANNEL` (PostgreSQL delivers it when, and only if, the transaction commits), and
each process listens on one connection of its own and drops that caller's copies. While
it is not listening (starting, or the connection lost) it keeps and serves nothing, so a
notification missed can never leave a stale copy behind; a read that raced a change is
not kept (`CopyToken`).

Strangers (most numbers that ring have never called) would each cost a read too. So the
process also keeps a short hash of every caller who has a profile (`ProfiledCallers`,
read when listening starts, then grown by the same notifications): a number not among
them is answered "no profile" without a read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from array import array
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from elaoms.memory.base import MemoryVersion

logger = logging.getLogger(__name__)

CHANNEL: Final = "elaoms_callers"
EVERYONE: Final = "*"  # every caller changed: keys rewritten, or a store copied in
# Changes remembered to judge a read that was in flight meanwhile; a read older than
# all of them is simply not kept.
RECENT_CHANGES = 4096
# A quiet listening connection is checked this often (a notification sent from another
# connection must arrive): one that stopped hearing stops serving copies within it.
HEARTBEAT_SECONDS = 10.0
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
CLOSE_WAIT_SECONDS = 2.0
# A listener that hears nothing (a pooler in the way) is a setup to fix, not an outage:
# tried again rarely (each try is a notification every process receives).
DEAF_DELAYS = (5.0, 30.0, 60.0)
# A peer gone without a word (a network cut, a NAT that forgot the connection) makes the
# socket fail within about a minute instead of never.
KEEPALIVES: Final[dict[str, Any]] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
# The notifications a listener sends to check that it hears: never a caller's key
# (`copy_key`), and ignored by the other processes.
PROBE_PREFIX: Final = "probe:"
# How the listening connections show in pg_stat_activity.
APPLICATION_NAME: Final = "elaoms-caller-copies"


ProbeSender = Callable[[str, str], Awaitable[None]]
# Reads what is worth copying before anyone asks (`CallerCopies.start`).
Warmer = Callable[[], Awaitable[None]]


class DeafListenerError(Exception):
    """The listening connection does not hear notifications."""


class Absent:
    """No copy kept (as opposed to a kept "this caller has no profile")."""


ABSENT: Final = Absent()


def copy_key(caller_key: str) -> str:
    """What copies are kept under and notifications name: a short hash of the store's
    caller key, so a notification never carries a phone number (the key is the number
    itself when encryption is off) and stays far below NOTIFY's 8,000-byte limit."""
    return hashlib.blake2b(caller_key.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class CopyToken:
    """When a read began: what it found is kept only if nothing it read changed since."""

    session: int
    changes: int


def caller_hash(key: str) -> int:
    """A `copy_key` as the 64-bit number `ProfiledCallers` holds (8 bytes a caller)."""
    return int(key[:16], 16)


# `ProfiledCallers` sorts each bucket on its own (numbers by their top byte): a million
# callers are then sorted a bucket at a time, never in one stall of the event loop, and a
# newcomer is inserted into an array of a 256th of the callers.
BUCKET_SHIFT = 56
BUCKETS = 1 << (64 - BUCKET_SHIFT)


class ProfiledRead:
    """The `caller_hash`es a read of every profiled caller found, by bucket, unsorted."""

    def __init__(self) -> None:
        self.buckets = [array("Q") for _ in range(BUCKETS)]

    def add(self, caller_key: str) -> None:
        number = caller_hash(copy_key(caller_key))
        self.buckets[number >> BUCKET_SHIFT].append(number)


class ProfiledCallers:
    """The callers who have (or may have) a profile, as sorted arrays of `caller_hash`es.
    Complete from the end of a read of every profiled caller to the end of the listening
    session: a caller changed meanwhile is added by the change's notification, whatever
    the read saw. A hash shared by two callers only costs a read."""

    def __init__(self) -> None:
        self.complete = False
        self._buckets = [array("Q") for _ in range(BUCKETS)]

    def __contains__(self, key: str) -> bool:
        number = caller_hash(key)
        bucket = self._buckets[number >> BUCKET_SHIFT]
        at = bisect_left(bucket, number)
        return at < len(bucket) and bucket[at] == number

    def changed(self, key: str) -> None:
        """The caller may have a profile now."""
        number = caller_hash(key)
        bucket = self._buckets[number >> BUCKET_SHIFT]
        at = bisect_left(bucket, number)
        if at == len(bucket) or bucket[at] != number:
            bucket.insert(at, number)

    def merge(self, read: ProfiledRead, bucket: int) -> None:
        self._buckets[bucket] = array("Q", sorted({*self._buckets[bucket], *read.buckets[bucket]}))

    def clear(self) -> None:
        self.complete = False
        self._buckets = [array("Q") for _ in range(BUCKETS)]


class CallerCopies:
    """Profiles and memory versions of the callers this process read last (at most `size`
    each, the least recently used dropped first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._profiles: OrderedDict[str, bytes | None] = OrderedDict()
        self._versions: OrderedDict[str, MemoryVersion] = OrderedDict()
        self._session = 0  # odd while listening; each start and end adds one
        self._changes = 0
        self._recent: deque[tuple[int, str]] = deque(maxlen=RECENT_CHANGES)
        self._everyone_at = 0  # the `_changes` count of the last EVERYONE
        self.profiled = ProfiledCallers()
        self._warmer: Warmer | None = None
        self._listener: asyncio.Task[None] | None = None
        self._warming: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        return self._session % 2 == 1

    # Reading -----------------------------------------------------------------------------
    def token(self) -> CopyToken:
        return CopyToken(self._session, self._changes)

    def profile(self, caller_key: str) -> bytes | Absent | None:
        """The caller's profile as stored (JSON, unsealed), None for "no profile", or
        ABSENT. Bytes, not the dict: a third of the memory, and every reader decodes a
        dict of its own (tens of microseconds)."""
        key = copy_key(caller_key)
        if not self.listening:
            return ABSENT
        if key not in self._profiles:
            return None if self.profiled.complete and key not in self.profiled else ABSENT
        self._profiles.move_to_end(key)
        return self._profiles[key]

    def keep_profile(self, caller_key: str, token: CopyToken, profile: bytes | None) -> None:
        key = copy_key(caller_key)
        if self._unchanged_since(key, token):
            self._keep(self._profiles, key, profile)

    def keep_older_profile(self, caller_key: str, token: CopyToken, profile: bytes | None) -> bool:
        """Keep a profile read to fill the copies, of a caller who called before every
        caller kept: the first to go, and never in place of another. False once the
        copies are full."""
        if len(self._profiles) >= self.size:
            return False
        key = copy_key(caller_key)
        # A copy kept meanwhile came from a later read: kept as it is, and where it is.
        if key not in self._profiles and self._unchanged_since(key, token):
            self._profiles[key] = profile
            self._profiles.move_to_end(key, last=False)
        return True

    async def keep_profiled(self, token: CopyToken, read: ProfiledRead) -> None:
        """Every caller with a profile, as a read that began at `token` found them: merged
        a bucket at a time (the event loop serves between two), then trusted."""
        for bucket in range(BUCKETS):
            if not self._nobody_replaced_since(token):
                return
            self.profiled.merge(read, bucket)
            await asyncio.sleep(0)
        if self._nobody_replaced_since(token):
            self.profiled.complete = True

    def changing(self, caller_key: str) -> None:
        """The caller is about to change: from now on they may have a profile (said
        before the commit, so that no request in between answers "no profile")."""
        self.profiled.changed(copy_key(caller_key))

    def _nobody_replaced_since(self, token: CopyToken) -> bool:
        """Same listening session, and no EVERYONE, since `token`."""
        return (
            self.listening and token.session == self._session and self._everyone_at <= token.changes
        )

    def version(self, caller_key: str) -> MemoryVersion | None:
        key = copy_key(caller_key)
        if not self.listening or key not in self._versions:
            return None
        self._versions.move_to_end(key)
        return self._versions[key]

    def keep_version(self, caller_key: str, token: CopyToken, version: MemoryVersion) -> None:
        key = copy_key(caller_key)
        if self._unchanged_since(key, token):
            self._keep(self._versions, key, version)

    def _keep(self, copies: OrderedDict[str, Any], key: str, value: Any) -> None:
        copies[key] = value
        copies.move_to_end(key)
        while len(copies) > self.size:
            copies.popitem(last=False)

    def _unchanged_since(self, key: str, token: CopyToken) -> bool:
        if not self.listening or token.session != self._session:
            return False
        if token.changes == self._changes:
            return True
        if self._changes - token.changes > len(self._recent):
            return False  # more changes since than remembered: one may have been this caller
        for number, changed in reversed(self._recent):
            if number <= token.changes:
                return True  # newest first: the rest came before the read began
            if changed in (key, EVERYONE):
                return False
        return True

    # Changes -----------------------------------------------------------------------------
    def changed(self, caller_key: str) -> None:
        """The caller under the store's `caller_key` changed: their copies go."""
        self.notified(copy_key(caller_key))

    def notified(self, key: str) -> None:
        """A notification: a caller's `copy_key` (or `EVERYONE`) changed."""
        if key.startswith(PROBE_PREFIX):
            return  # some process checking that it hears: nobody changed
        self._changes += 1
        self._recent.append((self._changes, key))
        if key == EVERYONE:
            self._profiles.clear()
            self._versions.clear()
            self._everyone_at = self._changes
            self.profiled.clear()
            if self.listening:
                self._warm(self._warmer)  # the callers are read again
        else:
            self._profiles.pop(key, None)
            self._versions.pop(key, None)
            self.profiled.changed(key)  # whatever changed, they may have a profile now

    def _begin_session(self) -> None:
        self._session += 1 if not self.listening else 2

    def _end_session(self) -> None:
        if self.listening:
            self._session += 1
        self._profiles.clear()
        self._versions.clear()
        self.profiled.clear()
        self._stop_warming()

    def _stop_warming(self) -> None:
        # Once: cancelled again mid-read, psycopg gives up cancelling the query on the
        # server and closes the connection (with a warning).
        if self._warming is not None and not self._warming.cancelling():
            self._warming.cancel()

    def _warm(self, warm: Warmer | None) -> None:
        """Run `warm` beside the listening loop (notifications keep coming meanwhile, and
        what it reads is kept only if its caller did not change: `CopyToken`)."""
        self._warmer = warm
        if warm is None:
            return
        self._stop_warming()

        async def run() -> None:
            try:
                await warm()
            except Exception as error:  # copies are then made as callers are read
                logger.warning("caller copies: not warmed (%s)", type(error).__name__)

        self._warming = asyncio.create_task(run(), name="elaoms-caller-copies-warm")

    # Listening ---------------------------------------------------------------------------
    def start(
        self,
        database_url: str,
        connect_timeout: float,
        send: ProbeSender,
        warm: Warmer | None = None,
    ) -> None:
        """Listen from now on (in the running event loop), reconnecting after a loss.
        `send(channel, payload)` notifies from another connection than the listening one
        (the store's pool); `warm()` fills the copies each time listening (re)starts."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(
                self._listen(database_url, connect_timeout, send, warm),
                name="elaoms-caller-copies",
            )

    async def _listen(
        self, database_url: str, connect_timeout: float, send: ProbeSender, warm: Warmer | None
    ) -> None:
        import psycopg

        failures = 0
        while True:
            try:
                async with asyncio.timeout(max(connect_timeout, 1.0) + 1.0):
                    connection = await psycopg.AsyncConnection.connect(
                        database_url,
                        autocommit=True,
                        connect_timeout=max(1, round(connect_timeout)),
                        application_name=APPLICATION_NAME,
                        **KEEPALIVES,
                    )
                async with connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    await self._hear_probe(connection, connect_timeout, send)
                    self._begin_session()
                    self._warm(warm)
                    if failures:
                        logger.info("caller copies: listening again for changes")
                    failures = 0
                    while True:
                        async with contextlib.aclosing(
                            connection.notifies(timeout=HEARTBEAT_SECONDS)
                        ) as notifications:
                            async for notification in notifications:
                                self.notified(notification.payload)
                        # Quiet for a while: still heard? (A connection a pooler gave
                        # another server, or a network cut, says nothing by itself.)
                        await self._hear_probe(connection, connect_timeout, send)
            except asyncio.CancelledError:
                self._end_session()
                raise
            except Exception as error:
                self._end_session()
                deaf = isinstance(error, DeafListenerError)
                if failures == 0:
                    logger.warning(
                        "caller copies: not listening for changes (%s); reading the store"
                        " every time until back",
                        str(error) if deaf else type(error).__name__,
                    )
                delays = DEAF_DELAYS if deaf else RECONNECT_DELAYS
                delay = delays[min(failures, len(delays) - 1)]
                failures += 1
                await asyncio.sleep(delay)

    async def _hear_probe(self, connection: Any, timeout: float, send: ProbeSender) -> None:
        """Notify from another connection and wait for it on the listening one. Through a
        pooler in transaction mode (pgbouncer) LISTEN is accepted but nothing another
        session sends is heard, and copies kept then would never be dropped."""
        probe = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        async with asyncio.timeout(max(timeout, 1.0)):
            await send(CHANNEL, probe)
        async with contextlib.aclosing(
            connection.notifies(timeout=max(timeout, 1.0))
        ) as notifications:
            async for notification in notifications:
                if notification.payload == probe:
                    return
                self.notified(notification.payload)
        raise DeafListenerError(
            "a notification sent to the listening connection never came: connect it to"
            " PostgreSQL itself, not through a pooler in transaction mode"
        )

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            # Bounded: a listener stuck on a dead network must not hold up a shutdown.
            await asyncio.wait({listener}, timeout=CLOSE_WAIT_SECONDS)
            if listener.done() and not listener.cancelled():
                listener.exception()  # retrieved: it ended on its own (logged there)
        self._end_session()
        warming, self._warming = self._warming, None
        if warming is not None:
            # Cancelled mid-read, psycopg cancels the query on the server: a closing event
            # loop would cancel that too.
            await asyncio.wait({warming}, timeout=CLOSE_WAIT_SECONDS)
