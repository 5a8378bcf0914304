"""Phone numbers out of the places around the data: Redis keys, alert webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import pytest

from elaoms.operations import cache
from elaoms.operations.alerts import AlertSink

from conftest import wait_until

NUMBER = "+13125550142"


@pytest.fixture
def keyed() -> Iterator[None]:
    cache.use_caller_key_secret("a secret every replica shares")
    yield
    cache.use_caller_key_secret("")


def test_redis_caller_keys_are_keyed_so_a_list_of_numbers_cannot_reverse_them(
    keyed: None,
) -> None:
    unkeyed = cache.CALLER_KEY_PREFIX + hashlib.sha256(NUMBER.encode()).hexdigest()[:32]
    key = cache.caller_key(NUMBER)
    assert key.startswith(cache.CALLER_KEY_PREFIX)
    assert key != unkeyed
    assert cache.caller_key(NUMBER) == key  # stable: every worker finds the same entry
    cache.use_caller_key_secret("another deployment")
    assert cache.caller_key(NUMBER) != key


class _Receiver(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_an_alert_webhook_payload_carries_no_phone_number() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sink = AlertSink(f"http://127.0.0.1:{server.server_port}/alerts")

        async def alert() -> None:
            sink.raise_alert(
                "quarantine_write_failed",
                f"could not keep a delivery of {NUMBER}",
                {"error": "disk full writing callers/%2B13125550142", "bytes": 12},
            )
            await asyncio.wait_for(asyncio.gather(*sink._tasks), 10)

        asyncio.run(alert())
        (body,) = wait_until(lambda: _Receiver.bodies)
    finally:
        server.shutdown()
    text = json.dumps(body)
    assert "3125550142" not in text and "312555" not in text
    assert body["message"] == "could not keep a delivery of +***0142"
    assert body["details"] == {"error": "disk full writing callers/%2B***0142", "bytes": 12}
