"""ASGI middleware on every request: the source-IP allowlist and request metrics.

Plain ASGI rather than BaseHTTPMiddleware: it adds microseconds, not a task per request,
to the client-data hot path, and leaves streamed audio bodies alone.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elaoms.operations.metrics import LATENCY, REQUESTS

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Label values are fixed so a scanner probing random paths cannot grow the metrics.
KNOWN_ENDPOINTS = frozenset(
    {
        "/",
        "/health",
        "/ready",
        "/metrics",
        "/webhooks/post-call",
        "/webhooks/client-data",
        "/webhooks/search-data",
    }
)


def endpoint_label(path: str) -> str:
    if path in KNOWN_ENDPOINTS:
        return path
    if path.startswith("/admin/"):
        return "/admin"
    if path.startswith(("/docs", "/redoc", "/openapi")):
        return "/docs"
    return "other"


# The labelled children, looked up once: `labels()` validates and locks on every call.
@lru_cache(maxsize=256)
def _requests(label: str, status: int) -> Any:
    return REQUESTS.labels(label, str(status))


@lru_cache(maxsize=64)
def _latency(label: str) -> Any:
    return LATENCY.labels(label)


def parse_networks(spec: str) -> list[IPNetwork]:
    """ALLOWED_SOURCE_IPS: comma-separated addresses or CIDR ranges."""
    return [
        ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()
    ]


class OperationsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_networks: Iterable[IPNetwork] = (),
        trusted_proxy_header: str = "",
    ) -> None:
        self.app = app
        self.allowed_networks = list(allowed_networks)
        self.proxy_header = trusted_proxy_header.lower().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        label = endpoint_label(path)
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            if self.allowed_networks and path.startswith("/webhooks/"):
                source = self._source_address(scope)
                if not self._allowed(source):
                    logger.warning("webhook request from %s refused by ALLOWED_SOURCE_IPS", source)
                    await _send_json(
                        send_with_status, 403, {"detail": "Source address not allowed"}
                    )
                    return
            await self.app(scope, receive, send_with_status)
        finally:
            _requests(label, status_holder["status"]).inc()
            _latency(label).observe(time.perf_counter() - started)

    def _source_address(self, scope: Scope) -> str:
        # Only a configured proxy header is believed: anyone can send X-Forwarded-For.
        if self.proxy_header:
            for name, value in scope.get("headers", []):
                if name == self.proxy_header:
                    return bytes(value).decode("latin-1").split(",")[0].strip()
        client = scope.get("client")
        return client[0] if client else ""

    def _allowed(self, source: str) -> bool:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return False
        return any(address in network for network in self.allowed_networks)


async def _send_json(send: Send, status: int, body: dict[str, object]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
