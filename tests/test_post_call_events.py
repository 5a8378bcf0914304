"""Every post-call event ElevenLabs documents today, through the real signed webhook:
Twilio, SIP-trunk and Exotel calls are stored; answering-machine and unredacted events are
kept on disk beside the caller's other files, never indexed; audio that comes after its
transcription (`has_audio: true`) is filed as the call's recording, never dropped."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from elaoms.memory.base import StoredCall
from elaoms.memory.sqlite import SQLiteStore
from elaoms.webhooks.storage import caller_dir_name

from conftest import (
    WORKSPACE_SECRET,
    InThreadServer,
    load_fixture,
    make_settings,
    signed_headers,
    wait_until,
)


def post(client: httpx.Client, payload: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps(payload).encode()
    response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def search(client: httpx.Client, caller: str, query: str) -> dict[str, Any]:
    response = client.post(
        "/webhooks/search-data",
        json={"query": query, "user_id": caller},
        headers={"X-Api-Key": WORKSPACE_SECRET},
    )
    answer: dict[str, Any] = response.json()
    return answer


@pytest.mark.parametrize(
    ("fixture", "caller"),
    [
        ("post_call_transcription_sip_trunk", "+14155550144"),
        ("post_call_transcription_exotel", "+14155550155"),
    ],
)
def test_sip_trunk_and_exotel_calls_are_stored_under_their_caller(
    tmp_path: Path, fixture: str, caller: str
) -> None:
    settings = make_settings(tmp_path)
    with InThreadServer(settings) as server, server.client() as client:
        assert post(client, load_fixture(fixture))["status"] == "received"
        found = wait_until(lambda: search(client, caller, "daughter sore tooth")["memories_found"])
        assert found >= 1
        context = search(client, caller, "customer tier gold branch north")["context"]
    assert "X-Customer-Tier" not in context and "gold" not in context  # SIP headers: kept only
    kept = [
        path.name for path in (settings.webhook_storage_path / caller_dir_name(caller)).iterdir()
    ]
    assert any(name.startswith("post_call_transcription__") for name in kept)


@pytest.mark.parametrize(
    ("fixture", "party"),
    [
        ("answering_machine_detection", "+14155550166"),
        ("unredacted_transcript", "+14155550123"),
    ],
)
def test_answering_machine_and_unredacted_events_are_kept_beside_the_caller_never_indexed(
    tmp_path: Path, fixture: str, party: str
) -> None:
    settings = make_settings(tmp_path)
    with InThreadServer(settings) as server, server.client() as client:
        answer = post(client, load_fixture(fixture))
        assert answer["status"] == "received"
        assert f"event type '{fixture}' kept, not indexed" in answer["detail"]
        assert search(client, party, "card number 4111 voicemail")["memories_found"] == 0
    kept = sorted((settings.webhook_storage_path / caller_dir_name(party)).iterdir())
    assert [path.name.split("__")[0] for path in kept] == [fixture]
    assert "4155550" not in str(kept)  # never a phone number in a path


def test_unredacted_audio_is_kept_and_not_filed_as_the_recording(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with InThreadServer(settings) as server, server.client() as client:
        answer = post(client, load_fixture("unredacted_audio"))
    assert "kept, not indexed" in answer["detail"]
    assert not settings.audio_storage_path.exists() or not any(
        settings.audio_storage_path.iterdir()
    )


def test_audio_that_follows_its_stored_transcription_is_filed_never_dropped(
    tmp_path: Path,
) -> None:
    """`has_audio: true`: the audio follows. When the store could not say whose call it
    was in time, the audio waited as unclaimed and was deleted after AUDIO_CACHE_TTL."""
    settings = make_settings(tmp_path, audio_cache_ttl=0, pending_sweep_interval_seconds=0.1)
    transcription = load_fixture("post_call_transcription")
    assert transcription["data"]["has_audio"] is True
    conversation_id = transcription["data"]["conversation_id"]
    answered = threading.Event()

    class SlowLookups(SQLiteStore):
        """Lookups hang until the audio's webhook has answered (a busy store)."""

        slow = False

        async def get_call(self, *args: Any, **kwargs: Any) -> StoredCall | None:
            if self.slow:
                await asyncio.to_thread(answered.wait)
            return await super().get_call(*args, **kwargs)

    store = SlowLookups(settings.sqlite_path)
    with InThreadServer(settings, store=store) as server, server.client() as client:
        assert post(client, transcription)["status"] in ("received", "queued")
        wait_until(lambda: not any(settings.pending_path.iterdir()))  # stored, hooks done
        store.slow = True
        try:
            assert "audio kept" in post(client, load_fixture("post_call_audio"))["detail"]
        finally:
            answered.set()
        recording = (
            settings.webhook_storage_path
            / caller_dir_name("+14155550123")
            / f"{conversation_id}.mp3"
        )
        wait_until(recording.exists)
    assert not list(settings.audio_storage_path.glob("*.mp3"))
