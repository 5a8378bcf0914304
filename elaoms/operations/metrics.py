"""Prometheus metrics.

Per process by default. Under gunicorn with several workers, set PROMETHEUS_MULTIPROC_DIR
to an empty directory and /metrics aggregates every worker (prometheus_client's
multiprocess mode).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Counted by the stores, which sit below this layer; imported so /metrics always lists it.
from elaoms.memory.metrics import FOREIGN_MEMORIES_DROPPED as FOREIGN_MEMORIES_DROPPED

REQUESTS = Counter(
    "elaoms_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"]
)
LATENCY = Histogram(
    "elaoms_request_seconds",
    "HTTP request latency by endpoint",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
AUTH_FAILURES = Counter("elaoms_auth_failures_total", "Refused signatures and API keys", ["kind"])
PENDING_DELIVERIES = Gauge(
    "elaoms_pending_deliveries",
    "Deliveries on disk not yet in the memory store",
    multiprocess_mode="max",
)
STORE_RETRIES = Counter("elaoms_store_retries_total", "Retried attempts to store a delivery")
STORE_ERRORS = Counter("elaoms_store_errors_total", "Failed memory-store operations", ["operation"])
QUARANTINED = Counter("elaoms_quarantined_total", "Signed deliveries moved to quarantine")
ALERTS = Counter("elaoms_alerts_total", "Alerts raised", ["kind"])
EMBEDDING_BACKLOG = Gauge(
    "elaoms_embedding_batches_queued",
    "Batches of memories waiting to be embedded for search (optional embeddings extra)",
    multiprocess_mode="livesum",
)


def render_metrics() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
