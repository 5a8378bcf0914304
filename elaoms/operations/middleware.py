"""ASGI middleware on every request: the source-IP allowlist, request metrics, and bounds
on request bodies (size and time).

Plain ASGI rather than BaseHTTPMiddleware: it adds microseconds, not a task per request,
to the client-data hot path, and leaves streamed audio bodies alone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elaoms.operations.metrics import LATENCY, REQUESTS

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# nginx's code for "the client closed the request": not a server error, and not a 500 in
# the metrics an operator alerts on.
CLIENT_CLOSED_REQUEST = 499

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
    if path.startswith("/console"):
        return "/console"
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
        disconnected = False

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        async def receive_watching() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        try:
            if self.allowed_networks and path.startswith("/webhooks/"):
                source = self._source_address(scope)
                if not self._allowed(source):
                    logger.warning("webhook request from %s refused by ALLOWED_SOURCE_IPS", source)
                    await _send_json(
                        send_with_status, 403, {"detail": "Source address not allowed"}
                    )
                    return
            try:
                await self.app(scope, receive_watching, send_with_status)
            except ClientDisconnect:
                # The client left mid-body: no answer can reach it, and it is not a server
                # error (it was counted as a 500, a figure operators alert on).
                status_holder["status"] = CLIENT_CLOSED_REQUEST
            else:
                if disconnected and status_holder["status"] == 500:
                    status_holder["status"] = CLIENT_CLOSED_REQUEST
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


@dataclass(frozen=True, slots=True)
class BodyPolicy:
    """How much body a route may receive, and for how long."""

    max_bytes: int
    total_seconds: float


class BodyRefused(HTTPException):
    """Raised from `receive` inside the app. An HTTPException so that a framework reading
    the body for a route (FastAPI turns other errors there into a 400) passes it on; the
    middleware answers it when nothing else did. The connection is closed either way: the
    rest of the body is never read."""

    status = 400
    message = "Bad request body"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(self.status, detail or self.message, headers={"Connection": "close"})


class BodyTooLarge(BodyRefused):
    status = 413
    message = "Request body too large"


class BodyTimeout(BodyRefused):
    status = 408
    message = "Request body not received in time"


class BodyLimitMiddleware:
    """Bounds every request body: a declared `Content-Length` over the route's limit is
    refused before any byte is read, a streamed body is cut off when it passes the limit,
    and a body that stalls (no bytes for `idle_seconds`) or trickles (not complete within
    the route's total deadline) is dropped. Refusals close the connection, so the rest of
    a body is never read.

    The clock runs only while the application waits for body bytes: the sender, not our
    own work, is what is bounded.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        default: BodyPolicy,
        routes: Mapping[str, BodyPolicy] | None = None,
        idle_seconds: float,
    ) -> None:
        self.app = app
        self.default = default
        self.routes = dict(routes or {})
        self.idle_seconds = idle_seconds

    def policy(self, path: str) -> BodyPolicy:
        return self.routes.get(path, self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy(scope["path"])
        declared = _content_length(scope)
        if declared is None:
            await _refuse(send, BodyRefused("Invalid Content-Length header"))
            return
        if declared > policy.max_bytes:
            await _refuse(send, BodyTooLarge(_too_large(policy)))
            return
        deadline = time.monotonic() + policy.total_seconds
        received = 0
        response_started = False

        def refused(refusal: BodyRefused) -> BodyRefused:
            logger.warning(
                "request to %s refused: %s (%d bytes received)",
                scope["path"],
                refusal.detail,
                received,
            )
            return refusal

        async def bounded_receive() -> Message:
            nonlocal received
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise refused(BodyTimeout())
            try:
                # asyncio.timeout, not wait_for: no extra task on the client-data hot path.
                async with asyncio.timeout(min(self.idle_seconds, remaining)):
                    message = await receive()
            except TimeoutError:
                raise refused(BodyTimeout()) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > policy.max_bytes:
                    raise refused(BodyTooLarge(_too_large(policy)))
            return message

        async def watching_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, watching_send)
        except BodyRefused as refusal:  # where no exception handler answered it
            if not response_started:
                await _refuse(send, refusal)


def _content_length(scope: Scope) -> int | None:
    """The declared length (0 when none is declared), None when it is not a number."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.strip()
            # int() would take "+5", "5_000" and non-ASCII digits.
            if not text.isdigit() or not text.isascii():
                return None
            return int(text[:19]) if len(text) <= 18 else 10**18
    return 0


def _too_large(policy: BodyPolicy) -> str:
    return f"Request body too large: this endpoint accepts at most {policy.max_bytes} bytes"


async def _refuse(send: Send, refusal: BodyRefused) -> None:
    payload = json.dumps({"detail": refusal.detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                # The rest of the body is not read: the connection cannot serve another request.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
