"""Anomaly detection: bursts of failed signatures or header-auth attempts raise an alert."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

from elaoms.operations.alerts import AlertSink
from elaoms.operations.metrics import AUTH_FAILURES


class AuthFailureMonitor:
    """Counts authentication failures in a sliding window and alerts past a threshold.

    One alert per window: a flood is one alert, not thousands of log lines.
    """

    def __init__(
        self, *, enabled: bool, threshold: int, window_seconds: int, alerts: AlertSink
    ) -> None:
        self.enabled = enabled
        self.threshold = threshold
        self.window_seconds = window_seconds
        self.alerts = alerts
        self._failures: deque[tuple[float, str, str]] = deque()
        self._last_alert = float("-inf")
        self._lock = threading.Lock()

    def record(self, kind: str, source: str | None) -> bool:
        """Record one failure; return True when it raised an alert."""
        AUTH_FAILURES.labels(kind).inc()
        if not self.enabled:
            return False
        now = time.monotonic()
        with self._lock:
            self._failures.append((now, kind, source or "unknown"))
            while self._failures and self._failures[0][0] < now - self.window_seconds:
                self._failures.popleft()
            if len(self._failures) <= self.threshold:
                return False
            if now - self._last_alert < self.window_seconds:
                return False
            self._last_alert = now
            by_kind = Counter(failure_kind for _, failure_kind, _ in self._failures)
            by_source = Counter(failure_source for _, _, failure_source in self._failures)
        self.alerts.raise_alert(
            "auth_failures",
            f"{sum(by_kind.values())} authentication failures in {self.window_seconds}s "
            f"(threshold {self.threshold})",
            {"by_kind": dict(by_kind), "by_source": dict(by_source)},
        )
        return True
