"""Operational settings, each observable: metrics, readiness, logs, alerts, retention,
encryption at rest, file permissions and the source-IP allowlist."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from elaoms.crypto import PayloadCipher, generate_key
from elaoms.memory.sqlite import SQLiteStore
from elaoms.operations.retention import purge_expired
from elaoms.webhooks.storage import WebhookStorage, caller_dir_name

from conftest import (
    InThreadServer,
    ServiceProcess,
    clear_of_window_edge,
    free_port,
    load_fixture,
    signed_headers,
    transcription,
    wait_until,
)


def post(client: httpx.Client, payload: dict[str, Any] | bytes) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post("/webhooks/post-call", content=body, headers=signed_headers(body))


class AlertReceiver:
    """A local HTTP endpoint standing in for the operator's alert webhook."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                receiver.received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def alert_receiver() -> Iterator[AlertReceiver]:
    receiver = AlertReceiver()
    yield receiver
    receiver.close()


def test_metrics_count_requests_refusals_and_quarantine(service: ServiceProcess) -> None:
    with service.client() as client:
        post(client, transcription("conv_metrics", caller="+14155550701"))
        client.post("/webhooks/post-call", content=b"{}", headers={"ElevenLabs-Signature": "bad"})
        post(client, b"not json")
        # The call leaves the queue once its profile is prepared, after the answer.
        wait_until(lambda: not list((service.data_dir / "webhooks" / "_pending").iterdir()))
        text = client.get("/metrics").text
    assert 'elaoms_requests_total{endpoint="/webhooks/post-call",status="200"}' in text
    assert 'elaoms_requests_total{endpoint="/webhooks/post-call",status="401"}' in text
    assert 'elaoms_auth_failures_total{kind="post_call_signature"}' in text
    assert "elaoms_quarantined_total 1.0" in text
    assert "elaoms_request_seconds_bucket" in text
    assert "elaoms_pending_deliveries 0.0" in text


def test_ready_reports_the_store_and_the_disk(settings_factory, tmp_path: Path) -> None:
    settings = settings_factory()

    class BrokenStore(SQLiteStore):
        async def check(self) -> None:
            raise RuntimeError("store unreachable (injected)")

    with InThreadServer(settings) as server, server.client() as client:
        assert client.get("/ready").json() == {
            "status": "ready",
            "checks": {"store": "ok", "webhook_storage": "ok"},
        }
        pending = settings.pending_path
        pending.rename(pending.with_name("_pending_moved"))
        pending.write_text("a file where a directory should be")
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json()["checks"]["webhook_storage"].startswith("unavailable")
        assert client.get("/health").json() == {"status": "healthy"}
        pending.unlink()
        pending.with_name("_pending_moved").rename(pending)

    broken = settings_factory(sqlite_path=tmp_path / "other.sqlite3")
    with InThreadServer(broken, store=BrokenStore(broken.sqlite_path)) as server:
        response = server.client().get("/ready")
    assert response.status_code == 503
    assert "store unreachable" in response.json()["checks"]["store"]


def test_json_logs_mask_phone_numbers(tmp_path: Path) -> None:
    server = ServiceProcess(tmp_path, env={"LOG_FORMAT": "json"}).start()
    try:
        with server.client() as client:
            post(client, transcription("conv_json_logs", caller="+14155550702"))
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    assert any("conv_json_logs" in line["message"] for line in lines)
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert "+14155550702" not in server.logs()
    assert "***0702" in server.logs()


def test_a_burst_of_bad_signatures_raises_one_alert(
    settings_factory, alert_receiver: AlertReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Counted per fixed window: a day, and the burst kept clear of its edge (a 60 s window
    # split a burst of a loaded host in two counts, each alerting or neither).
    window = 86400
    settings = settings_factory(
        anomaly_failure_threshold=3,
        anomaly_window_seconds=window,
        alert_webhook_url=alert_receiver.url,
    )
    with InThreadServer(settings) as server, server.client() as client:
        services = server.app.state.services
        clear_of_window_edge(window)
        for _ in range(10):
            response = client.post(
                "/webhooks/post-call", content=b"{}", headers={"ElevenLabs-Signature": "t=1,v0=00"}
            )
            assert response.status_code == 401
        for _ in range(3):
            client.post(
                "/webhooks/search-data", json={"query": "x"}, headers={"X-Api-Key": "wrong"}
            )
        # Every failure counted (in the background, after its answer), and any alert's POST
        # over: a second alert could only have come from these.
        wait_until(
            lambda: (
                alert_receiver.received
                and not services.auth_monitor._tasks
                and not services.alerts._tasks
            )
        )
        metrics = client.get("/metrics").text
    assert len(alert_receiver.received) == 1, "a flood must be one alert, not many"
    assert [alert.kind for alert in services.alerts.recent] == ["auth_failures"]
    alert = alert_receiver.received[0]
    assert alert["kind"] == "auth_failures"
    assert alert["details"]["by_source"] == {"127.0.0.1": 4}
    assert 'elaoms_alerts_total{kind="auth_failures"}' in metrics
    assert any("ALERT auth_failures" in record.message for record in caplog.records)


def test_a_payload_that_cannot_be_quarantined_alerts_and_answers_5xx(
    settings_factory, alert_receiver: AlertReceiver
) -> None:
    settings = settings_factory(alert_webhook_url=alert_receiver.url)
    with InThreadServer(settings) as server, server.client() as client:
        quarantine = settings.webhook_quarantine_path
        quarantine.rmdir()
        quarantine.write_text("not a directory")
        response = post(client, b"not json at all")
        wait_until(lambda: alert_receiver.received)
    assert response.status_code == 503
    assert alert_receiver.received[0]["kind"] == "quarantine_write_failed"


def test_retention_purges_old_files_but_keeps_memories_and_pending_work(
    settings_factory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_factory(webhook_retention_days=30, post_call_store_timeout_ms=2000)
    with InThreadServer(settings) as server, server.client() as client:
        post(client, transcription("conv_old", caller="+14155550703"))
        post(client, transcription("conv_new", caller="+14155550703"))
        post(client, b"old garbage")
    storage = server.app.state.services.storage
    caller_dir = settings.webhook_storage_path / caller_dir_name("+14155550703")
    old_file = caller_dir / "post_call_transcription__conv_old.json"
    new_file = caller_dir / "post_call_transcription__conv_new.json"
    pending_file = caller_dir / "post_call_transcription__conv_pending.json"
    storage.keep_queued(pending_file, b"{}").release()  # still waiting for the store
    month_ago = time.time() - 31 * 86400
    for path in [old_file, pending_file, *settings.webhook_quarantine_path.iterdir()]:
        os.utime(path, (month_ago, month_ago))

    report = purge_expired(storage, settings.webhook_retention_days, settings.audio_cache_ttl)

    assert report.files == 3  # the old call and the quarantined body with its reason
    assert not old_file.exists() and new_file.exists() and pending_file.exists()
    assert not list(settings.webhook_quarantine_path.iterdir())
    with sqlite3.connect(settings.sqlite_path) as connection:
        kept = connection.execute("SELECT count(*) FROM calls WHERE conversation_id='conv_old'")
        assert kept.fetchone()[0] == 1
    purge_lines = [r.getMessage() for r in caplog.records if r.name.endswith("retention")]
    assert purge_lines and "3 webhook files" in purge_lines[0]
    assert not any(caller_dir.name in line or "0703" in line for line in purge_lines)
    assert not any("+14155550703" in record.getMessage() for record in caplog.records)


def test_encryption_at_rest_hides_payloads_and_survives_key_rotation(
    settings_factory, tmp_path: Path
) -> None:
    old_key, new_key = generate_key(), generate_key()
    settings = settings_factory(enable_encryption_at_rest=True, encryption_key=old_key)
    with InThreadServer(settings) as server, server.client() as client:
        assert post(client, transcription("conv_secret", caller="+14155550704")).json()[
            "status"
        ] == ("received")
    # With encryption at rest the caller's directory is keyed: the storage names it.
    storage = WebhookStorage(settings, PayloadCipher(old_key, enabled=True))
    kept = next(storage.caller_dir("+14155550704").iterdir())
    assert b"Maria" not in kept.read_bytes()
    with sqlite3.connect(settings.sqlite_path) as connection:
        (blob,) = connection.execute("SELECT payload FROM calls").fetchone()
    assert b"Maria" not in blob

    rotated = PayloadCipher(f"{new_key},{old_key}", enabled=True)
    assert b"Maria" in WebhookStorage(settings, rotated).read(kept)
    store = SQLiteStore(settings.sqlite_path, cipher=rotated)
    import asyncio

    call = asyncio.run(store.get_call("conv_secret"))
    assert call is not None and call.payload["data"]["conversation_id"] == "conv_secret"


def test_encryption_enabled_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    server = ServiceProcess(
        tmp_path, env={"ENABLE_ENCRYPTION_AT_REST": "true", "ENCRYPTION_KEY": ""}
    )
    with pytest.raises(RuntimeError, match="needs ENCRYPTION_KEY"):
        server.start(timeout=15)


def test_every_file_and_directory_we_create_is_private(tmp_path: Path) -> None:
    server = ServiceProcess(tmp_path / "data").start()
    try:
        with server.client() as client:
            post(client, load_fixture("post_call_transcription"))
            post(client, load_fixture("post_call_audio"))
            post(client, b"quarantine me")
    finally:
        server.stop()
    checked = 0
    for root, directories, files in os.walk(tmp_path / "data"):
        for name in directories:
            assert stat.S_IMODE(Path(root, name).stat().st_mode) == 0o700, name
            checked += 1
        for name in files:
            if name.startswith("server-"):
                continue  # the test harness's own log
            assert stat.S_IMODE(Path(root, name).stat().st_mode) == 0o600, name
            checked += 1
    assert checked >= 8


def test_source_ip_allowlist_and_trusted_proxy_header(settings_factory) -> None:
    settings = settings_factory(allowed_source_ips="10.1.2.0/24", trusted_proxy_header="")
    body = json.dumps(transcription("conv_allowlist", caller="+14155550705")).encode()
    with InThreadServer(settings) as server, server.client() as client:
        refused = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
        assert refused.status_code == 403
        spoofed = client.post(
            "/webhooks/post-call",
            content=body,
            headers={**signed_headers(body), "X-Forwarded-For": "10.1.2.3"},
        )
        assert spoofed.status_code == 403, "an unconfigured proxy header must not be believed"
        assert client.get("/health").status_code == 200

    proxied = settings_factory(
        allowed_source_ips="10.1.2.0/24", trusted_proxy_header="X-Forwarded-For"
    )
    with InThreadServer(proxied) as server, server.client() as client:
        accepted = client.post(
            "/webhooks/post-call",
            content=body,
            headers={**signed_headers(body), "X-Forwarded-For": "10.1.2.3, 127.0.0.1"},
        )
        assert accepted.status_code == 200


def test_elaoms_purge_applies_retention_from_the_command_line(tmp_path: Path) -> None:
    from conftest import base_env, run_cli

    data = tmp_path / "data"
    env = {**os.environ, **base_env(data)}
    storage_dir = data / "webhooks" / caller_dir_name("+14155550706")
    old = storage_dir / "post_call_transcription__conv_ancient.json"
    fresh = storage_dir / "post_call_transcription__conv_recent.json"
    storage_dir.mkdir(parents=True)
    for path in (old, fresh):
        path.write_text("{}")
    long_ago = time.time() - 40 * 86400
    os.utime(old, (long_ago, long_ago))

    result = run_cli("purge", "--days", "30", "--json", env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"files": 1, "bytes": 2, "unclaimed_audio": 0}
    assert not old.exists() and fresh.exists()


def test_the_setup_placeholder_hmac_key_is_flagged_at_start_up(tmp_path: Path) -> None:
    from elaoms.config import HMAC_PLACEHOLDER_PREFIX

    env = {"ELEVENLABS_POST_CALL_HMAC_KEY": HMAC_PLACEHOLDER_PREFIX + "abc123"}
    server = ServiceProcess(tmp_path, env=env).start()
    server.stop()
    assert "still the placeholder" in server.logs()
