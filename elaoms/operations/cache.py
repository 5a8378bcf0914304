"""A two-level cache: a dict in this process, and Redis shared by every worker when set.

Redis is an accelerator, never a dependency. Every Redis operation has a short deadline;
a failure switches this process to its local dict (logged once) and Redis is tried again
after a pause, so a Redis outage or a slow Redis costs at most one deadline per pause.
Values are anything JSON can carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from elaoms.crypto import KEYED_HASH_PREFIX, keyed_hash
from elaoms.payloads import decode, encode

logger = logging.getLogger(__name__)

RedisOperation = Callable[[aioredis.Redis], Awaitable[Any]]

CALLER_KEY_PREFIX = "elaoms:caller:"


# Set once per process from a secret every worker and replica shares (`use_caller_key_secret`).
_caller_key_secret = b""


def use_caller_key_secret(secret: str) -> None:
    """Key the caller hashes in Redis with `secret`: a plain SHA-256 of a phone number is
    reversed by trying the few billion numbers of a country in minutes."""
    global _caller_key_secret
    _caller_key_secret = (
        hashlib.sha256(b"elaoms caller cache keys\0" + secret.encode()).digest() if secret else b""
    )


def caller_key(user_id: str) -> str:
    """The cache key of a caller's prepared profile. Hashed, and keyed when a secret is set:
    phone numbers stay out of Redis keys (KEYS, MONITOR and slow logs show keys to whoever
    operates Redis)."""
    if _caller_key_secret:
        digest = keyed_hash(_caller_key_secret, user_id).removeprefix(KEYED_HASH_PREFIX)
    else:
        digest = hashlib.sha256(user_id.encode()).hexdigest()
    return CALLER_KEY_PREFIX + digest[:32]


class TwoLevelCache:
    def __init__(
        self,
        redis_url: str = "",
        *,
        redis_ttl: float = 3600,
        local_ttl: float = 60,
        max_local_entries: int = 10_000,
        operation_timeout: float = 0.05,
        retry_after: float = 5.0,
    ) -> None:
        self.redis_url = redis_url
        self.redis_ttl = redis_ttl
        self.local_ttl = local_ttl
        self.max_local_entries = max_local_entries
        self.operation_timeout = operation_timeout
        self.retry_after = retry_after
        self._local: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._redis: aioredis.Redis | None = None
        self._redis_down_until = 0.0
        self._redis_down = False

    # Public ------------------------------------------------------------------------------
    async def get(self, key: str, *, local_ttl: float | None = None) -> Any | None:
        """The value from this process, else from Redis (then kept here for `local_ttl`,
        default the cache's; 0 keeps no copy), else None."""
        entry = self._local.get(key)
        if entry is not None:
            if entry[0] > time.monotonic():
                self._local.move_to_end(key)
                return entry[1]
            self._local.pop(key, None)
        raw = await self._call_redis(lambda client: client.get(key))
        if raw is None:
            return None
        try:
            value = decode(raw)
        except ValueError:
            return None
        self._keep(key, value, self.local_ttl if local_ttl is None else local_ttl)
        return value

    async def set(
        self, key: str, value: Any, *, ttl: float | None = None, local_ttl: float | None = None
    ) -> None:
        """Keep `value` here for `local_ttl` and in Redis for `ttl` (defaults: the cache's)."""
        self._keep(key, value, self.local_ttl if local_ttl is None else local_ttl)
        if not self.redis_url:
            return  # nothing to encode for
        encoded = encode(value)
        seconds = max(1, int(self.redis_ttl if ttl is None else ttl))
        await self._call_redis(lambda client: client.set(key, encoded, ex=seconds))

    async def delete(self, key: str) -> None:
        self._local.pop(key, None)
        await self._call_redis(lambda client: client.delete(key))

    async def add(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Set `key` only if nobody has (de-duplication); True when this call set it.

        With Redis the answer holds across workers; without it, within this process only.
        """
        seconds = max(1, int(self.redis_ttl if ttl is None else ttl))
        encoded = encode(value)
        result = await self._call_redis(
            lambda client: client.set(key, encoded, ex=seconds, nx=True), missing=_NO_ANSWER
        )
        if result is not _NO_ANSWER:
            if result:
                self._keep(key, value, min(self.local_ttl, seconds))
            return bool(result)
        if await self.get(key) is not None:
            return False
        self._keep(key, value, seconds)
        return True

    async def incr(self, key: str, *, ttl: float | None = None) -> int:
        """Add one to a counter that expires `ttl` seconds after its first increment."""
        seconds = max(1, int(self.redis_ttl if ttl is None else ttl))

        async def increment(client: aioredis.Redis) -> int:
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, seconds, nx=True)
                count, _ = await pipe.execute()
            return int(count)

        count = await self._call_redis(increment, missing=_NO_ANSWER)
        if count is not _NO_ANSWER:
            return int(count)
        entry = self._local.get(key)
        now = time.monotonic()
        if entry is None or entry[0] <= now or not isinstance(entry[1], int):
            entry = (now + seconds, 0)
        self._local[key] = (entry[0], entry[1] + 1)
        self._trim()
        return entry[1] + 1

    async def invalidate_caller(self, user_id: str) -> None:
        """Forget a caller's prepared profile here and in Redis (privacy commands, tests).

        Other workers' local copies live at most their short local TTL."""
        await self.delete(caller_key(user_id))

    @property
    def redis_enabled(self) -> bool:
        return bool(self.redis_url)

    @property
    def redis_available(self) -> bool:
        return self.redis_enabled and not self._redis_down

    def peek(self, key: str) -> Any | None:
        """This process's copy only, expired or not: no I/O, for last-resort answers."""
        entry = self._local.get(key)
        return entry[1] if entry else None

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            try:
                await asyncio.wait_for(client.aclose(), max(self.operation_timeout, 1.0))
            except Exception as error:  # closing a dead connection is not worth a traceback
                logger.debug("closing redis: %s", error)

    # Internals ---------------------------------------------------------------------------
    def _keep(self, key: str, value: Any, ttl: float) -> None:
        if ttl <= 0:
            self._local.pop(key, None)
            return
        self._local[key] = (time.monotonic() + ttl, value)
        self._local.move_to_end(key)
        self._trim()

    def _trim(self) -> None:
        while len(self._local) > self.max_local_entries:
            self._local.popitem(last=False)

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            # Created lazily: the connection pool belongs to the event loop that uses it.
            self._redis = aioredis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=self.operation_timeout,
                socket_timeout=self.operation_timeout,
                retry_on_timeout=False,
                decode_responses=True,
            )
        return self._redis

    async def _call_redis(self, operation: RedisOperation, missing: Any = None) -> Any:
        """Run one Redis operation within the deadline; `missing` when Redis cannot answer."""
        if not self.redis_url or time.monotonic() < self._redis_down_until:
            return missing
        try:
            result = await asyncio.wait_for(operation(self._client()), self.operation_timeout)
        except Exception as error:
            self._redis_down_until = time.monotonic() + self.retry_after
            if not self._redis_down:
                self._redis_down = True
                logger.warning(
                    "redis unavailable (%s): caching in this process only, retrying every %gs",
                    _describe(error),
                    self.retry_after,
                )
            # A timed-out connection may hold a half-read reply: the next try gets a new pool.
            client, self._redis = self._redis, None
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), self.operation_timeout)
            return missing
        if self._redis_down:
            self._redis_down = False
            logger.info("redis is back: shared caching resumed")
        return result


_NO_ANSWER = object()


def _describe(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
