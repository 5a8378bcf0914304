"""Admin endpoints for data-protection requests, through a real server on loopback."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from elaoms.config import Settings
from elaoms.webhooks.storage import caller_dir_name

from conftest import InThreadServer, load_fixture, signed_headers, transcription, wait_until

ADMIN_KEY = "admin-test-key-0123456789abcdef"
MARIA = "+14155550123"
BOB = "+14155550177"


def deliver(client: httpx.Client, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "received", response.text


def calls_of(client: httpx.Client, caller: str) -> dict[str, Any]:
    return client.get(f"/admin/callers/{caller}/export", headers={"X-Admin-Key": ADMIN_KEY})


def test_without_a_key_there_are_no_admin_endpoints(
    settings_factory: Callable[..., Settings],
) -> None:
    with InThreadServer(settings_factory()) as server, server.client() as client:
        for method, path in (
            ("DELETE", f"/admin/callers/{MARIA}"),
            ("GET", f"/admin/callers/{MARIA}/export"),
        ):
            response = client.request(method, path, headers={"X-Admin-Key": "anything"})
            assert response.status_code == 404
        assert "/admin/callers/{caller_id}" not in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("headers", [{}, {"X-Admin-Key": "wrong"}, {"X-Admin-Key": ""}])
def test_a_missing_or_wrong_key_is_refused(
    settings_factory: Callable[..., Settings], headers: dict[str, str]
) -> None:
    with (
        InThreadServer(settings_factory(admin_api_key=ADMIN_KEY)) as server,
        server.client() as client,
    ):
        assert client.delete(f"/admin/callers/{MARIA}", headers=headers).status_code == 401
        assert client.get(f"/admin/callers/{MARIA}/export", headers=headers).status_code == 401


def test_export_then_forget_a_caller(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(admin_api_key=ADMIN_KEY)
    storage: Path = settings.webhook_storage_path
    recording = copy.deepcopy(load_fixture("post_call_audio"))
    recording["data"]["conversation_id"] = "conv_maria_1"
    with InThreadServer(settings) as server, server.client() as client:
        deliver(client, transcription("conv_maria_1", MARIA))
        deliver(client, recording)
        deliver(client, transcription("conv_bob_1", BOB))
        maria_dir = storage / caller_dir_name(MARIA)
        files = sorted(str(path) for path in maria_dir.iterdir())
        assert len(files) == 2

        export = calls_of(client, "%2B1 (415) 555-0123")  # any spelling of the number
        assert export.status_code == 200
        document = export.json()
        assert document["user_id"] == MARIA
        assert [call["conversation_id"] for call in document["calls"]] == ["conv_maria_1"]
        assert sorted(entry["path"] for entry in document["files"]) == files
        assert "conv_bob_1" not in export.text

        # The profile hook runs after the answer; forget must also drop what it prepares.
        wait_until(lambda: calls_of(client, MARIA).json()["profile"] is not None)
        forgotten = client.delete(f"/admin/callers/{MARIA}", headers={"X-Admin-Key": ADMIN_KEY})
        assert forgotten.status_code == 200
        report = forgotten.json()
        assert sorted(report["files_deleted"]) == files
        assert report["found_anything"] is True
        assert not maria_dir.exists()
        assert calls_of(client, MARIA).status_code == 404
        assert calls_of(client, BOB).status_code == 200
        assert (storage / caller_dir_name(BOB)).exists()
