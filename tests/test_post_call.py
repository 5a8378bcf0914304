"""POST /webhooks/post-call through a real server on loopback."""

from __future__ import annotations

import base64
import json
import sqlite3
import stat
import time
from pathlib import Path

import httpx
import pytest

from elaoms.webhooks.signature import sign
from elaoms.webhooks.storage import caller_dir_name

from conftest import (
    HMAC_KEY,
    ServiceProcess,
    load_fixture,
    signed_headers,
    transcription,
    wait_until,
)


def post(client: httpx.Client, payload: dict | bytes, **header_kwargs: object) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post(
        "/webhooks/post-call", content=body, headers=signed_headers(body, **header_kwargs)
    )


def stored_calls(service: ServiceProcess) -> list[tuple[str, str, str]]:
    with sqlite3.connect(service.data_dir / "memory.sqlite3") as connection:
        return connection.execute(
            "SELECT event_type, conversation_id, user_id FROM calls ORDER BY conversation_id"
        ).fetchall()


def memories_of(service: ServiceProcess, user_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(service.data_dir / "memory.sqlite3") as connection:
        return connection.execute(
            "SELECT kind, content FROM memories WHERE user_id = ? ORDER BY seq", (user_id,)
        ).fetchall()


def caller_files(service: ServiceProcess, user_id: str) -> list[Path]:
    directory = service.data_dir / "webhooks" / caller_dir_name(user_id)
    return sorted(directory.iterdir()) if directory.exists() else []


def test_service_identity_and_docs(service: ServiceProcess) -> None:
    with service.client() as client:
        root = client.get("/").json()
        assert root["service"] == "Eleven Labs Agents Open Memory System (ELAOMS)"
        assert root["status"] == "running" and root["version"]
        assert client.get("/health").json() == {"status": "healthy"}
        assert client.get("/docs").status_code == 200
        assert client.get("/redoc").status_code == 200
        assert "/webhooks/post-call" in client.get("/openapi.json").json()["paths"]


def test_fixture_transcription_is_kept_whole_and_broken_into_memories(
    service: ServiceProcess,
) -> None:
    payload = load_fixture("post_call_transcription")
    with service.client() as client:
        response = post(client, payload)
    assert response.status_code == 200
    assert response.json()["status"] == "received"
    assert response.json()["memory_id"]

    caller = "+14155550123"
    assert ("post_call_transcription", "conv_5301kb4c2yrj9e7qn8w6t3v0xa", caller) in stored_calls(
        service
    )
    kinds = [kind for kind, _ in memories_of(service, caller)]
    assert kinds.count("turn") == 7  # 8 turns, one of them tool-only
    assert "summary" in kinds and kinds.count("data_collection") == 2

    (kept,) = [
        p for p in caller_files(service, caller) if p.name.startswith("post_call_transcription")
    ]
    assert json.loads(kept.read_bytes()) == payload
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert caller not in service.logs(), "a whole phone number reached the log"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "Missing ElevenLabs-Signature header"),
        ({"ElevenLabs-Signature": "v0=abc"}, "Malformed signature header"),
        ({"ElevenLabs-Signature": "t=notanumber,v0=abc"}, "Malformed signature header"),
        ("stale", "Stale signature timestamp"),
        ("future", "Signature timestamp is in the future"),
        ("wrong-secret", "Invalid signature"),
        ("tampered", "Invalid signature"),
    ],
)
def test_bad_signatures_get_401_and_store_nothing(
    service: ServiceProcess, headers: dict[str, str] | str, detail: str
) -> None:
    payload = transcription(f"conv_badsig_{abs(hash(detail)) % 10**6}", caller="+14155559876")
    body = json.dumps(payload).encode()
    now = int(time.time())
    if headers == "stale":
        headers = {"ElevenLabs-Signature": sign(HMAC_KEY, body, now - 31 * 60)}
    elif headers == "future":
        headers = {"ElevenLabs-Signature": sign(HMAC_KEY, body, now + 6 * 60)}
    elif headers == "wrong-secret":
        headers = {"ElevenLabs-Signature": sign("another-secret", body)}
    elif headers == "tampered":
        headers = {"ElevenLabs-Signature": sign(HMAC_KEY, body)}
        body = body.replace(b"Maria", b"Mario")
    with service.client() as client:
        response = client.post("/webhooks/post-call", content=body, headers=headers)
    assert response.status_code == 401
    assert detail in response.json()["detail"]
    assert caller_files(service, "+14155559876") == []
    assert all(conv != payload["data"]["conversation_id"] for _, conv, _ in stored_calls(service))


def test_a_signature_within_the_allowed_skew_is_accepted(service: ServiceProcess) -> None:
    payload = transcription("conv_skew_ok", caller="+14155550300")
    with service.client() as client:
        assert (
            post(client, payload, timestamp=int(time.time()) - 29 * 60).json()["status"]
            == "received"
        )
        payload = transcription("conv_skew_ok_2", caller="+14155550300")
        assert (
            post(client, payload, timestamp=int(time.time()) + 4 * 60).json()["status"]
            == "received"
        )


def test_duplicate_deliveries_store_the_call_once(service: ServiceProcess) -> None:
    payload = transcription("conv_duplicate", caller="+14155550200")
    with service.client() as client:
        answers = [post(client, payload).json() for _ in range(3)]
    assert {answer["memory_id"] for answer in answers} == {answers[0]["memory_id"]}
    rows = [row for row in stored_calls(service) if row[1] == "conv_duplicate"]
    assert len(rows) == 1
    assert len([k for k, _ in memories_of(service, "+14155550200") if k == "summary"]) == 1


def test_phone_numbers_in_any_format_are_one_caller(service: ServiceProcess) -> None:
    with service.client() as client:
        post(client, transcription("conv_format_a", caller="+1 (415) 555-0144"))
        post(client, transcription("conv_format_b", caller="14155550144"))
    users = {user for _, conv, user in stored_calls(service) if conv.startswith("conv_format_")}
    assert users == {"+14155550144"}


def test_an_app_user_id_is_its_own_namespace_and_a_numberless_phone_call_its_own_call(
    service: ServiceProcess,
) -> None:
    web = transcription("conv_web_user", caller=None)
    del web["data"]["metadata"]["phone_call"]  # a web/SDK conversation: no phone line
    web["data"]["conversation_initiation_client_data"]["user_id"] = "account-42"
    numberless = transcription("conv_no_caller", caller=None)
    numberless["data"]["conversation_initiation_client_data"]["user_id"] = "account-42"
    with service.client() as client:
        post(client, web)
        post(client, numberless)
        post(client, transcription("conv_anonymous", caller=None))
    users = {conv: user for _, conv, user in stored_calls(service)}
    assert users["conv_web_user"] == "user:account-42"
    # A phone call whose number is missing is a withheld number, whatever user_id says.
    assert users["conv_no_caller"] == "conv_no_caller"
    assert users["conv_anonymous"] == "conv_anonymous"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"this is not json", "Invalid JSON"),
        (b'["a", "list"]', "body"),
        (
            json.dumps({"type": "post_call_transcription", "data": {"transcript": []}}).encode(),
            "conversation_id",
        ),
        (
            json.dumps(
                {"type": "post_call_transcription", "data": {"conversation_id": "c"}}
            ).encode(),
            "transcript",
        ),
        (
            json.dumps(
                {"type": "post_call_audio", "data": {"conversation_id": "c", "full_audio": "%%%"}}
            ).encode(),
            "base64",
        ),
    ],
)
def test_malformed_signed_bodies_are_quarantined_with_200(
    service: ServiceProcess, body: bytes, reason: str
) -> None:
    quarantine = service.data_dir / "webhooks" / "quarantine"
    before = set(quarantine.glob("*.reason.json"))
    with service.client() as client:
        response = post(client, body)
    assert response.status_code == 200
    assert response.json()["status"] == "quarantined"
    assert reason in response.json()["detail"]
    (new_reason,) = set(quarantine.glob("*.reason.json")) - before
    assert reason in json.loads(new_reason.read_text())["reason"]
    assert (
        new_reason.with_name(new_reason.name.replace(".reason.json", ".body")).read_bytes() == body
    )


def test_unknown_event_types_are_kept_and_answered_200(service: ServiceProcess) -> None:
    payload = {
        "type": "answering_machine_detection",
        "event_timestamp": int(time.time()),
        "data": {
            "conversation_id": "conv_amd_1",
            "metadata": {"phone_call": {"external_number": "+14155550777"}},
        },
    }
    with service.client() as client:
        response = post(client, payload)
    assert response.status_code == 200 and response.json()["status"] == "received"
    (kept,) = caller_files(service, "+14155550777")
    assert json.loads(kept.read_bytes()) == payload


def test_call_initiation_failure_is_recorded_against_the_caller(service: ServiceProcess) -> None:
    with service.client() as client:
        response = post(client, load_fixture("call_initiation_failure"))
    assert response.json()["status"] == "received"
    rows = [row for row in stored_calls(service) if row[0] == "call_initiation_failure"]
    assert rows == [("call_initiation_failure", "conv_6401kb5d3zsk0f8rp9x7u4w1yb", "+14155550123")]
    assert ("call_failure", "A call could not be connected (no-answer).") in memories_of(
        service, "+14155550123"
    )


def test_audio_is_linked_to_its_call_whichever_comes_first(service: ServiceProcess) -> None:
    audio = b"ID3" + bytes(range(256)) * 8

    def audio_payload(conversation_id: str) -> dict:
        payload = load_fixture("post_call_audio")
        payload["data"]["conversation_id"] = conversation_id
        payload["data"]["full_audio"] = base64.b64encode(audio).decode()
        return payload

    caller = "+14155550555"
    with service.client() as client:
        # Audio after its transcription: claimed at once.
        post(client, transcription("conv_audio_after", caller=caller))
        assert post(client, audio_payload("conv_audio_after")).json()["status"] == "received"
        # Audio before its transcription: waits unclaimed, then the transcription claims it.
        post(client, audio_payload("conv_audio_before"))
        unclaimed = service.data_dir / "webhooks" / "_audio" / "conv_audio_before.mp3"
        assert unclaimed.read_bytes() == audio
        post(client, transcription("conv_audio_before", caller=caller))
    names = {path.name for path in caller_files(service, caller)}
    assert {"conv_audio_after.mp3", "conv_audio_before.mp3"} <= names
    assert not unclaimed.exists()


def test_a_50_megabyte_audio_body_is_accepted(service: ServiceProcess) -> None:
    audio = bytes(37 * 1024 * 1024)  # base64 makes it ~50 MB on the wire
    payload = load_fixture("post_call_audio")
    payload["data"]["conversation_id"] = "conv_big_audio"
    payload["data"]["full_audio"] = base64.b64encode(audio).decode()
    body = json.dumps(payload).encode()
    assert len(body) > 49 * 1024 * 1024

    def chunks() -> object:  # chunked transfer encoding, as ElevenLabs sends audio
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    with service.client(timeout=120) as client:
        response = client.post(
            "/webhooks/post-call", content=chunks(), headers=signed_headers(body)
        )
    assert response.status_code == 200, response.text
    kept = service.data_dir / "webhooks" / "_audio" / "conv_big_audio.mp3"
    assert kept.stat().st_size == len(audio)
    kept.unlink()


def test_unclaimed_audio_is_dropped_after_the_cache_ttl(tmp_path: Path) -> None:
    server = ServiceProcess(
        tmp_path, env={"AUDIO_CACHE_TTL": "1", "PENDING_SWEEP_INTERVAL_SECONDS": "0.3"}
    ).start()
    try:
        payload = load_fixture("post_call_audio")
        kept = tmp_path / "webhooks" / "_audio" / "conv_5301kb4c2yrj9e7qn8w6t3v0xa.mp3"
        sent = time.time()
        with server.client() as client:
            answer = post(client, payload).json()
        # Kept (the answer says so: a look at the file could come after its second is up on
        # a loaded host), then dropped, not before the TTL (file times are a few ms coarse).
        assert answer == {"status": "received", "detail": f"audio kept as {kept.name}"}
        wait_until(lambda: not kept.exists())
        assert time.time() - sent > 0.9
    finally:
        server.stop()


def test_without_an_hmac_key_every_delivery_is_refused(tmp_path: Path) -> None:
    server = ServiceProcess(tmp_path, env={"ELEVENLABS_POST_CALL_HMAC_KEY": ""}).start()
    try:
        with server.client() as client:
            response = post(client, load_fixture("post_call_transcription"))
        assert response.status_code == 401
        assert "ELEVENLABS_POST_CALL_HMAC_KEY" in response.json()["detail"]
        assert "ELEVENLABS_POST_CALL_HMAC_KEY is not set" in server.logs()
    finally:
        server.stop()
    assert not list((tmp_path / "webhooks").glob("c_*"))


def test_our_signer_matches_the_official_elevenlabs_sdk() -> None:
    from elevenlabs.client import ElevenLabs

    body = json.dumps(load_fixture("post_call_transcription"))
    header = sign(HMAC_KEY, body.encode())
    event = ElevenLabs(api_key="unused").webhooks.construct_event(body, header, HMAC_KEY)
    assert event["data"]["conversation_id"] == "conv_5301kb4c2yrj9e7qn8w6t3v0xa"
    with pytest.raises(Exception, match=r"(?i)signature"):
        ElevenLabs(api_key="unused").webhooks.construct_event(body, header, "wrong-secret")
