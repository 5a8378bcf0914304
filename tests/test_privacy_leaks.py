"""Phone numbers out of the places around the data: Redis keys, alert webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis

from elaoms.operations import cache
from elaoms.operations.alerts import AlertSink
from elaoms.operations.cache import CALLER_KEY_PREFIX

from conftest import ServiceProcess, signed_headers, transcription, wait_until
from standins import RedisServer

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


def test_forget_removes_the_caller_s_receipts_and_profile_from_redis_and_keys_hide_the_number(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    admin = "admin-key-for-redis-privacy"
    server = ServiceProcess(
        tmp_path / "svc",
        env={
            "REDIS_URL": redis_server.url,
            # The 50 ms default sends a loaded machine's service to its own cache for a
            # while: the receipt and profile would then never reach Redis, nor their
            # deletion by the forget.
            "REDIS_TIMEOUT_MS": "1000",
            "ADMIN_API_KEY": admin,
        },
    ).start()
    client_redis = redis.Redis.from_url(redis_server.url, decode_responses=True)
    receipt = "elaoms:delivery:post_call_transcription:conv_redis_forget"
    try:
        with server.client() as client:
            body = json.dumps(transcription("conv_redis_forget", caller=NUMBER)).encode()
            answer = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
            assert answer.json()["status"] == "received"
            wait_until(lambda: client_redis.get(receipt))
            wait_until(lambda: any(k.startswith(CALLER_KEY_PREFIX) for k in client_redis.keys("*")))
            keys = client_redis.keys("*")
            unkeyed = hashlib.sha256(NUMBER.encode()).hexdigest()[:32]
            assert not [k for k in keys if unkeyed in k or "3125550142" in k]

            response = client.delete(
                "/admin/callers/%2B13125550142", headers={"X-Admin-Key": admin}
            )
            assert response.status_code == 200
            assert client_redis.get(receipt) is None
            assert not [k for k in client_redis.keys("*") if k.startswith(CALLER_KEY_PREFIX)]
    finally:
        client_redis.close()
        server.stop()
