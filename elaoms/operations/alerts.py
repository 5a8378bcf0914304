"""Alerts: an ERROR log line, a metric, and a POST to ALERT_WEBHOOK_URL when set.

The POST runs in the background with a short timeout and at most once per kind per
window, so an attack or a broken disk never slows a request or floods the receiver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

from elaoms import SERVICE_NAME
from elaoms.operations.metrics import ALERTS
from elaoms.phone import mask_phone_numbers

logger = logging.getLogger("elaoms.alerts")


RECENT_ALERTS = 50


@dataclass(frozen=True, slots=True)
class RaisedAlert:
    raised_at: float
    kind: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class AlertSink:
    def __init__(self, webhook_url: str = "", *, min_interval_seconds: float = 300.0) -> None:
        self.webhook_url = webhook_url
        self.min_interval_seconds = min_interval_seconds
        self._last_post: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.posts_sent = 0
        # The latest alerts of this process, newest last, for the operator console.
        self.recent: deque[RaisedAlert] = deque(maxlen=RECENT_ALERTS)

    def raise_alert(self, kind: str, message: str, details: dict[str, Any] | None = None) -> None:
        # The alert webhook is outside our logs' masking: an error text may quote a number.
        message = mask_phone_numbers(message)
        details = {key: _masked(value) for key, value in (details or {}).items()}
        ALERTS.labels(kind).inc()
        self.recent.append(RaisedAlert(time.time(), kind, message, dict(details or {})))
        logger.error("ALERT %s: %s %s", kind, message, details or "")
        if not self.webhook_url:
            return
        now = time.monotonic()
        if now - self._last_post.get(kind, -1e12) < self.min_interval_seconds:
            return
        self._last_post[kind] = now
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (CLI): alerts still reach the log and the metric
            return
        task = loop.create_task(self._post(kind, message, details or {}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, kind: str, message: str, details: dict[str, Any]) -> None:
        body = {"service": SERVICE_NAME, "kind": kind, "message": message, "details": details}
        try:
            async with (
                httpx.AsyncClient(timeout=5.0) as client,
                # Streamed and never read: only the status matters, and whatever answers
                # the alert URL must not be able to fill our memory.
                client.stream("POST", self.webhook_url, json=body) as response,
            ):
                response.raise_for_status()
            self.posts_sent += 1
        except httpx.HTTPError as error:
            logger.warning("alert webhook failed: %s", error)


def _masked(value: Any) -> Any:
    return mask_phone_numbers(value) if isinstance(value, str) else value
