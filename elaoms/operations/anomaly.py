"""Anomaly detection: bursts of failed signatures or header-auth attempts raise an alert."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

logger = logging.getLogger("elaoms.alerts")


class AuthFailureMonitor:
    """Counts authentication failures in a sliding window and alerts past a threshold.

    An alert fires once per window: a flood is one alert, not thousands of log lines.
    """

    def __init__(self, *, enabled: bool, threshold: int, window_seconds: int) -> None:
        self.enabled = enabled
        self.threshold = threshold
        self.window_seconds = window_seconds
        self._failures: deque[tuple[float, str, str]] = deque()
        self._last_alert = 0.0
        self._lock = threading.Lock()
        self.alerts_raised = 0

    def record(self, kind: str, source: str | None) -> bool:
        """Record one failure; return True when it raised an alert."""
        if not self.enabled:
            return False
        now = time.monotonic()
        with self._lock:
            self._failures.append((now, kind, source or "unknown"))
            while self._failures and self._failures[0][0] < now - self.window_seconds:
                self._failures.popleft()
            if (
                len(self._failures) <= self.threshold
                or now - self._last_alert < self.window_seconds
            ):
                return False
            self._last_alert = now
            self.alerts_raised += 1
            counts: dict[str, int] = {}
            sources: dict[str, int] = {}
            for _, failure_kind, failure_source in self._failures:
                counts[failure_kind] = counts.get(failure_kind, 0) + 1
                sources[failure_source] = sources.get(failure_source, 0) + 1
        logger.error(
            "ALERT: %d authentication failures in %ds (threshold %d): by kind %s, by source %s",
            sum(counts.values()),
            self.window_seconds,
            self.threshold,
            counts,
            sources,
        )
        return True
