"""Anomaly detection: bursts of failed signatures or header-auth attempts raise an alert.

Failures are counted per fixed window of ANOMALY_WINDOW_SECONDS where every worker and
replica adds to one count, so exactly one of them alerts: in Redis when set; else in the
memory store when other machines share it (PostgreSQL's `shared_counters`), since
replicas behind a load balancer each see a burst split N ways; else (an embedded store,
one machine) in this process. Who failed (kinds, source addresses) is kept per process
for the alert's details.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque

from elaoms.memory.base import MemoryStore
from elaoms.operations.alerts import AlertSink
from elaoms.operations.cache import TwoLevelCache
from elaoms.operations.metrics import AUTH_FAILURES

logger = logging.getLogger(__name__)

# After the store failed to count, how long failures are counted in this process instead:
# an attack during a database outage must not queue a connection attempt per request.
STORE_RETRY_AFTER_SECONDS = 5.0


class AuthFailureMonitor:
    def __init__(
        self,
        *,
        enabled: bool,
        threshold: int,
        window_seconds: int,
        alerts: AlertSink,
        counter: TwoLevelCache,
        store: MemoryStore | None = None,
    ) -> None:
        self.enabled = enabled
        self.threshold = threshold
        self.window_seconds = max(1, window_seconds)
        self.alerts = alerts
        self.counter = counter
        self.store = store
        self._store_down_until = 0.0
        self._recent: deque[tuple[float, str, str]] = deque()
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, kind: str, source: str | None) -> None:
        """Count one refused request. Never blocks: the shared count runs in the background."""
        AUTH_FAILURES.labels(kind).inc()
        if not self.enabled:
            return
        now = time.time()
        with self._lock:
            self._recent.append((now, kind, source or "unknown"))
            while self._recent and self._recent[0][0] < now - self.window_seconds:
                self._recent.popleft()
        task = asyncio.get_running_loop().create_task(self._count(now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _count(self, now: float) -> None:
        window = int(now // self.window_seconds)
        count = await self._increment(f"elaoms:auth-failures:{window}", self.window_seconds * 2)
        if count != self.threshold + 1:  # exactly one increment crosses the threshold
            return
        with self._lock:
            by_kind = Counter(kind for _, kind, _ in self._recent)
            by_source = Counter(source for _, _, source in self._recent)
        self.alerts.raise_alert(
            "auth_failures",
            f"more than {self.threshold} authentication failures within {self.window_seconds}s",
            {"count": count, "by_kind": dict(by_kind), "by_source": dict(by_source)},
        )

    async def _increment(self, name: str, ttl: float) -> int:
        """One more failure in the count every replica shares, where there is one."""
        if (
            not self.counter.redis_available
            and self.store is not None
            and time.monotonic() >= self._store_down_until
        ):
            try:
                shared = await self.store.shared_increment(name, ttl)
            except Exception as error:
                self._store_down_until = time.monotonic() + STORE_RETRY_AFTER_SECONDS
                logger.warning(
                    "authentication failures counted in this process for %gs: %s",
                    STORE_RETRY_AFTER_SECONDS,
                    error,
                )
            else:
                if shared is not None:
                    return shared
        return await self.counter.incr(name, ttl=ttl)
